#!/usr/bin/env bash
# `make cuda-check`: the `cuda` build (candle's CUDA backend + NCCL) compiles and is
# clippy-clean, on a machine without a GPU or a system CUDA toolkit. nvcc compiles
# candle's kernels and the project's for real; linking is `make cuda-build`'s.
#
# Its own target dir (another feature set would rebuild the world in target/). Not
# part of `make test`: cold, it takes 15 to 60 minutes on 2 cores, most of it nvcc.
set -euo pipefail
CARGO=${CARGO:-cargo}
TARGET_DIR=${CUDA_TARGET_DIR:-target/cuda-check}
# Hopper (H100/H200); any one architecture proves candle's kernels compile.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
. "$(dirname "$0")/cuda-env.sh"

echo "cuda-check: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"
"$CARGO" clippy --target-dir "$TARGET_DIR" --workspace --all-targets \
  --features shardserve/cuda -- -D warnings
echo "cuda-check: ok"
