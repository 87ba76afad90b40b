# Sourced by scripts/cuda-check.sh and scripts/cuda-build.sh: CUDA 13.0's nvcc (the
# system's when on PATH, else NVIDIA's pinned PyPI wheels in $TOOLS/cuda), exported as
# CUDA_HOME and on PATH. One CUDA release throughout: pip would otherwise pull the
# newest nvvm/crt, whose PTX this ptxas refuses.
TOOLS=${TOOLS:-.tools}
CUDA_VENV=$TOOLS/cuda
CUDA_STAMP=$CUDA_VENV/.nvcc-13.0.88

if ! command -v nvcc >/dev/null; then
  if [ ! -f "$CUDA_STAMP" ]; then
    python3 -m venv "$CUDA_VENV"
    "$CUDA_VENV/bin/pip" install --quiet --disable-pip-version-check \
      nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
    touch "$CUDA_STAMP"
  fi
  CUDA_HOME=$(cd "$(echo "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)" && pwd)
  export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH
fi
