#!/usr/bin/env bash
# `make cuda-build`: a stripped release `shardserve` for NVIDIA GPU machines (the `cuda`
# feature: candle's CUDA backend, the project's attention kernels, NCCL), built on a
# machine with no GPU and no CUDA toolkit.
#
# CUDA 13.0 throughout (NVIDIA driver 580 or newer; what PyTorch's CUDA 13 wheels
# carry). nvcc and the libraries candle links at build time (cuBLAS, cuBLASLt, cuRAND,
# NVRTC, the CUDA runtime, NCCL) come from NVIDIA's pinned PyPI wheels in .tools/cuda.
# No wheel ships libcuda (it belongs to the driver), so the link uses a stub made here
# from the driver functions cudarc declares; the real libcuda.so.1 is the driver's at
# run time. The binary needs the same libraries at run time, by soname: the wheels of a
# CUDA 13 PyTorch have them (scripts/gpu-check.sh puts them on LD_LIBRARY_PATH), as
# does the nvidia/cuda:13.0 runtime image (Dockerfile.cuda).
#
# Kernels for Hopper (sm_90a: H100, H200) unless CUDA_COMPUTE_CAP says otherwise (80
# for A100, 89 for L40S); the project's own attention kernels are always built for
# sm_80, sm_89 and sm_90 plus PTX. Cold: about an hour on 2 cores, most of it nvcc.
set -euo pipefail
CARGO=${CARGO:-cargo}
TARGET_DIR=${CUDA_BUILD_TARGET_DIR:-target/cuda-build}
OUT=${CUDA_BUILD_OUT:-$TARGET_DIR/shardserve}
LIMIT_MB=60
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

# The toolchain, then the libraries to link.
. "$(dirname "$0")/cuda-env.sh"
[ -d "$CUDA_VENV" ] || python3 -m venv "$CUDA_VENV"
LIBS_STAMP=$CUDA_VENV/.libs-13.0
if [ ! -f "$LIBS_STAMP" ]; then
  "$CUDA_VENV/bin/pip" install --quiet --disable-pip-version-check \
    nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-nccl-cu13==2.27.7
  touch "$LIBS_STAMP"
fi
NVIDIA=$(cd "$(echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia)" && pwd)

# The wheels hold versioned sonames only; the linker looks for libNAME.so.
LINK_DIR=$(mkdir -p "$TARGET_DIR/link" && cd "$TARGET_DIR/link" && pwd)
for lib in cublas cublasLt curand nvrtc cudart nccl; do
  found=$(find "$NVIDIA" -name "lib$lib.so.[0-9]*" | sort | head -1)
  [ -n "$found" ] || { echo "cuda-build: lib$lib not found under $NVIDIA" >&2; exit 1; }
  ln -sf "$found" "$LINK_DIR/lib$lib.so"
done

# The libcuda stub: every driver function cudarc can call, each answering
# CUDA_ERROR_UNKNOWN; only its soname and symbols matter, it is never loaded.
CUDARC_SRC=$("$CARGO" metadata --format-version 1 --locked --features shardserve/cuda | python3 -c '
import json, os, sys
meta = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in meta["packages"] if p["name"] == "cudarc"))')
grep -ohE 'pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys/mod.rs" \
  | sed -E 's/pub unsafe fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 999; }/' \
  | sort -u > "$LINK_DIR/libcuda_stub.c"
cc -shared -fPIC -o "$LINK_DIR/libcuda.so" -Wl,-soname,libcuda.so.1 "$LINK_DIR/libcuda_stub.c"

# Size: the binary travels to GPU machines in 64 MiB loads. candle's quantised
# kernels (SASS) are the largest part: nvcc compresses them for size (through $NVCC,
# which candle's kernel builder runs and watches); fat LTO in one codegen unit shrinks
# the host code (the first build without either was 71 MiB stripped).
NVCC_SIZE=$LINK_DIR/nvcc
printf '#!/bin/sh\nexec %s --compress-mode=size "$@"\n' "$(command -v nvcc)" > "$NVCC_SIZE"
chmod +x "$NVCC_SIZE"
export NVCC=$NVCC_SIZE CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1

echo "cuda-build: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"
RUSTFLAGS="${RUSTFLAGS:-} -L native=$LINK_DIR" "$CARGO" build --release --locked \
  --target-dir "$TARGET_DIR" -p shardserve --features cuda
strip -o "$OUT" "$TARGET_DIR/release/shardserve"

size=$(stat -c %s "$OUT")
echo "cuda-build: $OUT, $((size / 1048576)) MiB stripped; needs at run time:"
readelf -d "$OUT" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/  \1/p'
if [ "$size" -gt $((LIMIT_MB * 1048576)) ]; then
  echo "cuda-build: larger than $LIMIT_MB MiB" >&2
  exit 1
fi
