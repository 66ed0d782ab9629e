#!/usr/bin/env bash
# scripts/device/run.sh — runs the device kit (built here by scripts/device/build.sh) on the lent
# GPU machine, from the repository root: unpacks target/device-kit/kit.tar.xz, sources
# device-env.sh, then runs each step with its own timeout, logs and JSON under $OUT:
#   cam-cuda   snapmix-cam's CPU-vs-CUDA kernel tests (a skip for lack of a GPU is a failure)
#   mix-cuda   snapmix-mix's CPU-vs-CUDA kernel tests (likewise)
#   train-cuda snapmix-train's CPU-vs-CUDA fused SGD test (likewise)
#   golden     the golden test on the GPU (SNAPMIX_TEST_DEVICE=cuda)
#   bench-mix  xtask --device cuda bench-mix --batches 16,32,64 (-> $OUT/bench-mix.json)
#   torch-spm  python3 torch_baseline.py --sections spm (-> $OUT/torch_baseline_spm.json)
#   parts      every scripts/device/parts/*.sh (KIT and OUT passed on)
# A failing step does not stop the others; the exit status says whether any failed.
#
# Usage on the device:  bash scripts/device/run.sh
# Environment: OUT [./device-out], KIT [target/device-kit],
#   STEPS  the steps to run, space separated [all of the above, in that order]
#   BUDGET seconds this script may use in all [570]: each step's timeout is cut to what is left,
#          so one hang cannot eat the whole device call and the logs still come back
#   CAM_TIMEOUT MIX_TIMEOUT TRAIN_CUDA_TIMEOUT GOLDEN_TIMEOUT BENCH_TIMEOUT TORCH_TIMEOUT PARTS_TIMEOUT  per step
set -uo pipefail

KIT="${KIT:-target/device-kit}"
OUT="${OUT:-./device-out}"
STEPS=" ${STEPS:-cam-cuda mix-cuda train-cuda golden bench-mix torch-spm parts} "
BUDGET="${BUDGET:-570}"
mkdir -p "$OUT"
KIT="$(cd "$KIT" && pwd)" || { echo "no kit folder $KIT: build it with scripts/device/build.sh and carry it" >&2; exit 1; }
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/run-summary.txt"
: > "$LOG"
SCRIPT_NAME=run.sh
STEP_BUDGET="$BUDGET"
# shellcheck source=scripts/device/lib.sh
source "$(dirname "$0")/lib.sh"

# Unpack once per kit (the stamp is newer than the tarball after a successful unpack).
if [[ ! -f "$KIT/.unpacked" || "$KIT/kit.tar.xz" -nt "$KIT/.unpacked" ]]; then
  say "unpacking $KIT/kit.tar.xz"
  if command -v xz > /dev/null; then
    xz -dc "$KIT/kit.tar.xz" | tar -C "$KIT" -xf -
  else
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), sys.stdout.buffer)' \
      "$KIT/kit.tar.xz" | tar -C "$KIT" -xf -
  fi || { say "cannot unpack $KIT/kit.tar.xz"; exit 1; }
  touch "$KIT/.unpacked"
fi
cat "$KIT/MANIFEST.txt" >> "$LOG" 2>/dev/null || true
# shellcheck disable=SC1091
source "$KIT/device-env.sh"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >> "$LOG" 2>&1 || true

wanted() { [[ "$STEPS" == *" $1 "* ]]; }

# The CUDA tests pass by skipping when no GPU is visible: on the device, a skip is a failure.
gpu_tests() {
  local name="$1"; shift
  wanted "$name" || return 0
  step "$name" "$@"
  if grep -q "skipped for lack of a device" "$OUT/$name.log"; then
    say "$name: the tests found no CUDA device (skipped): counted as a failure"
    failures=$((failures + 1))
  fi
}
gpu_tests cam-cuda "${CAM_TIMEOUT:-120}" "$KIT/bin/snapmix_cam.cuda" --test-threads=1 --nocapture
gpu_tests mix-cuda "${MIX_TIMEOUT:-180}" "$KIT/bin/snapmix_mix.cuda" --test-threads=1 --nocapture
gpu_tests train-cuda "${TRAIN_CUDA_TIMEOUT:-60}" "$KIT/bin/snapmix_train.cuda" --test-threads=1 --nocapture
wanted golden && step golden "${GOLDEN_TIMEOUT:-120}" env SNAPMIX_TEST_DEVICE=cuda \
  SNAPMIX_GOLDEN_DIR=data/golden/mix "$KIT/bin/snapmix_mix.golden" --nocapture
if wanted bench-mix; then
  # bench-mix writes target/bench/bench-mix.json under the repository root (here: the cwd).
  rm -f target/bench/bench-mix.json
  step bench-mix "${BENCH_TIMEOUT:-240}" "$KIT/xtask" --device cuda bench-mix --batches 16,32,64
  [[ -f target/bench/bench-mix.json ]] && cp target/bench/bench-mix.json "$OUT/bench-mix.json"
fi
if wanted torch-spm; then
  step torch-spm "${TORCH_TIMEOUT:-120}" env OUT="$OUT" python3 "$KIT/torch_baseline.py" --sections spm
  [[ -f "$OUT/torch_baseline.json" ]] && mv "$OUT/torch_baseline.json" "$OUT/torch_baseline_spm.json"
fi
if wanted parts; then
  for part in scripts/device/parts/*.sh; do
    [[ -f "$part" ]] || continue
    step "part-$(basename "$part" .sh)" "${PARTS_TIMEOUT:-540}" env KIT="$KIT" OUT="$OUT" bash "$part"
  done
fi

say "done in ${SECONDS}s: $failures step(s) failed"
(( failures == 0 ))
