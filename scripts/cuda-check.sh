#!/usr/bin/env bash
# `make cuda-check`: the `cuda` build (candle's CUDA backend + NCCL) compiles and is
# clippy-clean, on a machine without a GPU or a system CUDA toolkit. nvcc compiles
# candle's kernels for real (PTX and the quantised/MoE objects); only linking, which
# needs the CUDA libraries, is left to Dockerfile.cuda.
#
# nvcc comes from the system when it is on PATH, else from NVIDIA's pinned PyPI wheels
# into .tools/cuda. Its own target dir (another feature set would rebuild the world in
# target/). Not part of `make test`: cold, it takes about 11 minutes on 2 cores, most of
# it nvcc.
set -euo pipefail
TOOLS=${TOOLS:-.tools}
CUDA_VENV=$TOOLS/cuda
CUDA_STAMP=$CUDA_VENV/.nvcc-13.0.88
CARGO=${CARGO:-cargo}
TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda-check}
# Hopper (H100/H200); any one architecture proves the kernels compile.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if ! command -v nvcc >/dev/null; then
  if [ ! -f "$CUDA_STAMP" ]; then
    python3 -m venv "$CUDA_VENV"
    # One CUDA release throughout: pip would otherwise pull the newest nvvm/crt, whose
    # PTX this ptxas refuses.
    "$CUDA_VENV/bin/pip" install --quiet \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    touch "$CUDA_STAMP"
  fi
  CUDA_HOME=$(cd "$(echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)" && pwd)
  export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
fi
echo "cuda-check: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"
"$CARGO" clippy --target-dir "$TARGET_DIR" --workspace --all-targets \
  --features shardserve/cuda -- -D warnings
echo "cuda-check: ok"
