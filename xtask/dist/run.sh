#!/usr/bin/env bash
# Runs the packed snapmix binary on a machine without Rust. For a CUDA build it first finds the
# CUDA user-space libraries (cudart, cuBLAS, cuRAND, NVRTC) and the driver's libcuda on the usual
# paths and says which one is missing instead of failing inside the dynamic loader.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="$here/bin/snapmix"

user_paths="${LD_LIBRARY_PATH:-}"
shopt -s nullglob
candidates=(
  ${user_paths//:/ }
  /usr/local/cuda/lib64 /usr/local/cuda-*/lib64 /usr/local/cuda/targets/*/lib
  /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib64 /usr/lib/wsl/lib
  /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib
  /usr/local/lib/python3*/dist-packages/nvidia/*/lib
)
shopt -u nullglob

# The libraries the binary asks for by name (empty for a CPU-only build).
mapfile -t needed < <(cat "$here/NEEDED" 2>/dev/null || true)
missing=()
for lib in "${needed[@]}"; do
  [ -n "$lib" ] || continue
  found=""
  for dir in "${candidates[@]}"; do
    if [ -e "$dir/$lib" ]; then found="$dir"; break; fi
  done
  if [ -z "$found" ]; then
    missing+=("$lib")
  else
    case ":${LD_LIBRARY_PATH:-}:" in *":$found:"*) ;; *) LD_LIBRARY_PATH="$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "snapmix: cannot find these libraries: ${missing[*]}" >&2
  for lib in "${missing[@]}"; do
    case "$lib" in
      libcuda.so*) echo "  $lib comes with the NVIDIA driver: install the driver (580+ for CUDA 13)." >&2 ;;
      libcudnn*) echo "  $lib comes with cuDNN 9: install it or add its lib/ folder to LD_LIBRARY_PATH." >&2 ;;
      *) echo "  $lib comes with the CUDA toolkit this binary was built with: install it or add its lib64/ folder to LD_LIBRARY_PATH." >&2 ;;
    esac
  done
  echo "  searched: LD_LIBRARY_PATH, /usr/local/cuda*/lib64, /usr/local/nvidia/lib64, system lib dirs, pip nvidia-* wheels" >&2
  exit 127
fi
export LD_LIBRARY_PATH
# The driver compiles candle's PTX on first use: keep its cache between runs.
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-${XDG_CACHE_HOME:-$HOME/.cache}/snapmix-nv}" CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"
exec "$bin" "$@"
