#!/usr/bin/env bash
# scripts/device/build.sh — builds the device kit here (no GPU needed) for scripts/device/run.sh
# on the lent GPU machine (which has no Rust): the CUDA test binaries of snapmix-cam, snapmix-mix,
# snapmix-models and snapmix-train (--features cuda) and the release xtask (--features cuda), all
# stripped of debug info and packed into one xz tarball, plus device-env.sh and torch_baseline.py
# from ../shared/gpu (data/golden is tracked, so it travels with the working tree). Output:
# target/device-kit/ (git-ignored); with the tracked files it must stay under the device tool's
# 64 MiB carry limit.
#
# Usage (from anywhere in the repository):  bash scripts/device/build.sh
# Environment: CARGO_TARGET_DIR [/var/tmp/snapmix-target], CUDA_COMPUTE_CAP [90],
#   SHARED_GPU [../shared/gpu] (setup-cuda-toolchain.sh, device-env.sh, torch_baseline.py),
#   KIT_TESTS  the test binaries to pack: <crate>.<test> for an integration test, <crate> for a
#              library's unit tests [snapmix_cam.cuda snapmix_mix.cuda snapmix_mix.golden snapmix_models
#              snapmix_train.cuda]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
SHARED_GPU="${SHARED_GPU:-$ROOT/../shared/gpu}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/snapmix-target}"
KIT="$ROOT/target/device-kit"
KIT_TESTS="${KIT_TESTS:-snapmix_cam.cuda snapmix_mix.cuda snapmix_mix.golden snapmix_models snapmix_train.cuda}"
LIMIT_BYTES=$((64 * 1024 * 1024))
say() { echo "[build.sh $(date -u +%H:%M:%S)] $*" >&2; }

[[ -f "$SHARED_GPU/setup-cuda-toolchain.sh" ]] || { say "no $SHARED_GPU/setup-cuda-toolchain.sh (set SHARED_GPU)"; exit 1; }
eval "$(bash "$SHARED_GPU/setup-cuda-toolchain.sh" --env 2>/dev/null)"
command -v nvcc > /dev/null || { say "nvcc not found after the toolchain setup: run bash $SHARED_GPU/setup-cuda-toolchain.sh once"; exit 1; }
say "nvcc: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bin"

# 1. Test binaries (dev profile: optimised dependencies, our crates at opt-level 3).
say "building the CUDA test binaries"
nice -n 10 cargo test --no-run --features cuda -p snapmix-cam -p snapmix-mix -p snapmix-models -p snapmix-train \
  --lib --test cuda --test golden --message-format=json > "$stage/tests.json"
# Library tests keep cargo's name (<lib>-<hash>, which parts/train.sh looks for); integration
# tests are named <crate>.<test> (two crates have a `cuda` test).
python3 - "$stage/tests.json" "$stage/bin" $KIT_TESTS <<'EOF'
import json, shutil, sys
listing, dest, wanted = sys.argv[1], sys.argv[2], set(sys.argv[3:])
for line in open(listing):
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    target, exe = msg["target"], msg["executable"]
    path, _, fragment = msg["package_id"].partition("#")
    package = fragment.split("@")[0] if "@" in fragment else path.rsplit("/", 1)[-1]
    crate = package.replace("-", "_")
    key = f"{crate}.{target['name']}" if "test" in target["kind"] else crate
    if key not in wanted:
        continue
    wanted.discard(key)
    name = key if "test" in target["kind"] else exe.rsplit("/", 1)[-1]
    shutil.copy2(exe, f"{dest}/{name}")
    print(name, file=sys.stderr)
if wanted:
    sys.exit(f"no test binary built for: {' '.join(sorted(wanted))}")
EOF

# 2. The release runner (bench-mix, bench-train, train).
say "building the release xtask"
nice -n 10 cargo build --release -p xtask --features cuda
cp "$CARGO_TARGET_DIR/release/xtask" "$stage/xtask"

# Debug info goes, symbols stay: backtraces from the device name their functions.
strip --strip-debug "$stage/xtask" "$stage"/bin/*

# 3. One solid xz tarball: the binaries share candle's kernels, so a large dictionary packs the
#    copies into little more than one.
rm -rf "$KIT"
mkdir -p "$KIT"
say "compressing ($(du -sh "$stage" | cut -f1) staged)"
tar -C "$stage" -cf - xtask bin | xz -9 --lzma2=preset=9,dict=256MiB -T1 > "$KIT/kit.tar.xz"
cp "$SHARED_GPU/device-env.sh" "$SHARED_GPU/torch_baseline.py" "$KIT/"
chmod u+w "$KIT"/*
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- crates xtask || echo ' (with uncommitted changes)')"
  echo "nvcc: $(nvcc --version | tail -1); CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP"
  (cd "$stage" && ls -l xtask bin)
} > "$KIT/MANIFEST.txt"

total=$(du -sb "$KIT" | cut -f1)
tracked=$(git ls-files -z | xargs -0 du -cb 2> /dev/null | tail -n 1 | cut -f1)
say "kit: $KIT, $((total / 1024 / 1024)) MiB; tracked files $((tracked / 1024 / 1024)) MiB"
cat "$KIT/MANIFEST.txt" >&2
if (( total + tracked > LIMIT_BYTES )); then
  say "the kit and the tracked files together are over the device tool's 64 MiB carry limit"
  exit 1
fi
