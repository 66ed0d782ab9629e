#!/usr/bin/env bash
# scripts/device/parts/train.sh — the CUDA training checks of issue 7, run on the lent GPU machine
# by scripts/device/run.sh (after it unpacked the kit and sourced device-env.sh). Steps, each with
# its own timeout (cut to what is left of TRAIN_BUDGET) and its log under $OUT:
#   models-cuda  snapmix-models' CUDA op tests: forward and every gradient of conv2d (cuDNN),
#                batch norm and max pool against the CPU path, and a ResNet-18 training step
#   torch-train  python3 torch_baseline.py --sections train (-> $OUT/torch_baseline_train.json)
#   bench-train  xtask --device cuda bench-train, ResNet-50 b16 and b32 448, fp32 and tf32, with peak
#                memory and the ratios to PyTorch's rows (-> $OUT/bench-train.json)
#   train-run    xtask --device cuda train --preset cub-resnet50 on synthetic data, 200 steps
# A failing step does not stop the others; the exit status says whether any failed.
#
# Environment: KIT [target/device-kit] (bin/snapmix_models-<hash>, xtask, torch_baseline.py,
#   device-env.sh), OUT [./device-out], TRAIN_BUDGET seconds in all [540], TRAIN_STEPS the steps
#   [models-cuda torch-train bench-train train-run], and per-step timeouts MODELS_CUDA_TIMEOUT
#   TORCH_TRAIN_TIMEOUT BENCH_TRAIN_TIMEOUT TRAIN_RUN_TIMEOUT.
set -uo pipefail

KIT="${KIT:-target/device-kit}"
OUT="${OUT:-./device-out}"
TRAIN_BUDGET="${TRAIN_BUDGET:-540}"
TRAIN_STEPS=" ${TRAIN_STEPS:-models-cuda torch-train bench-train train-run} "
mkdir -p "$OUT"
LOG="$OUT/train-summary.txt"
: > "$LOG"
SCRIPT_NAME=train.sh
STEP_BUDGET="$TRAIN_BUDGET"
# shellcheck source=scripts/device/lib.sh
source "$(dirname "$0")/../lib.sh"

# run.sh has sourced it already; when run alone, do it here.
if [[ ":${LD_LIBRARY_PATH:-}:" != *cudnn* && -f "$KIT/device-env.sh" ]]; then
  # shellcheck disable=SC1091
  source "$KIT/device-env.sh"
fi

wanted() { [[ "$TRAIN_STEPS" == *" $1 "* ]]; }

if wanted models-cuda; then
  tests_bin="$(find "$KIT/bin" -maxdepth 1 -type f -name 'snapmix_models-*' 2>/dev/null | head -n 1)"
  if [[ -n "$tests_bin" ]]; then
    step models-cuda "${MODELS_CUDA_TIMEOUT:-150}" "$tests_bin" ops::cuda --test-threads=1 --nocapture
  else
    say "models-cuda: no $KIT/bin/snapmix_models-* test binary"; failures=$((failures + 1))
  fi
fi

torch_json=""
if wanted torch-train; then
  rm -f "$OUT/torch_baseline.json"
  step torch-train "${TORCH_TRAIN_TIMEOUT:-150}" env OUT="$OUT" python3 "$KIT/torch_baseline.py" \
    --sections train --iters 10 --warmup 3
  if [[ -f "$OUT/torch_baseline.json" ]]; then
    mv "$OUT/torch_baseline.json" "$OUT/torch_baseline_train.json"
    torch_json="$OUT/torch_baseline_train.json"
  fi
fi

if wanted bench-train; then
  # bench-train writes target/bench/bench-train.json under the repository root (here: the cwd).
  rm -f target/bench/bench-train.json
  step bench-train "${BENCH_TRAIN_TIMEOUT:-150}" "$KIT/xtask" --device cuda bench-train \
    --configs resnet50:16:448,resnet50:32:448 --precisions fp32,tf32 --steps 10 --warmup 3 --no-reference \
    ${torch_json:+--torch-json "$torch_json"}
  [[ -f target/bench/bench-train.json ]] && cp target/bench/bench-train.json "$OUT/bench-train.json"
fi

if wanted train-run; then
  # The CUB ResNet-50 recipe (448 crops, batch 16) from scratch on the synthetic set, which needs
  # no files: 16 classes (its most) x 100 images = 100 steps per epoch, 2 epochs.
  step train-run "${TRAIN_RUN_TIMEOUT:-240}" "$KIT/xtask" --device cuda train \
    --preset cub-resnet50 --dataset synthetic --pretrained none --epochs 2 --plain --overwrite \
    --run-dir "$OUT/train-run" \
    --set data.synthetic.classes=16 --set data.synthetic.train_per_class=100 \
    --set data.synthetic.test_per_class=2 --set data.synthetic.image_size=448 \
    --set run.log_every_steps=10
fi

say "done in ${SECONDS}s: $failures step(s) failed"
(( failures == 0 ))
