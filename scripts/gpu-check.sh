#!/usr/bin/env bash
# The GPU check, for a GPU machine with PyTorch (CUDA 13) and transformers, without Rust
# or internet: takes the binary of `make cuda-build` and, in under 8 minutes, compares its
# logits with transformers' on a random-weight Llama (f32, tensor 1 and 2 on one GPU),
# runs the GGUF demo model teacher-forced against ../shared/golden, and prints prefill and
# decode tok/s on Llama-3.1-8B's shape in bf16 at batch 1, 16 and 64 next to the GPU's
# HBM bound. Exits non-zero when a check fails. See scripts/gpu_check.py.
#
#   scripts/gpu-check.sh [BINARY]        (default target/gpu-carry/bin/shardserve)
#
# What travels to the GPU machine (at most 64 MiB a call) is prepared here by
# `make gpu-carry` under target/gpu-carry/: the binary and the golden answers in one
# folder, the demo model (94 MB) split over two more. Carry the two model parts in two
# calls (they stay on the warm machine), then the binary's folder in the call that runs
# this script; the parts are joined here.
#
# The binary links the CUDA 13 libraries by soname; a CUDA 13 PyTorch's NVIDIA wheels
# hold them, so they go on LD_LIBRARY_PATH. `GPU_CHECK_DRY_RUN=1` runs the same steps on
# a machine without a GPU (candle's CPU device, small shapes), to test this script.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-carry
BIN=${1:-$CARRY/bin/shardserve}
PYTHON=${PYTHON:-python3}
DEMO=${GPU_CHECK_DEMO:-$CARRY/demo/SmolLM2-135M-Instruct.Q4_1.gguf}
GOLDEN=${GPU_CHECK_GOLDEN:-$CARRY/bin/smollm2-q4_1-chat.jsonl}
DEVICE=cuda
DRY=()
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  DEVICE=candle-cpu
  DRY=(--dry-run)
fi

# The demo model, from its parts.
if [ ! -f "$DEMO" ] && compgen -G "$CARRY/demo-part-*/*.part" >/dev/null; then
  mkdir -p "$(dirname "$DEMO")"
  cat $(ls "$CARRY"/demo-part-*/*.part | sort) > "$DEMO"
fi

if [ -z "${DRY[*]}" ]; then
  LIBS=$("$PYTHON" - <<'EOF'
import glob, os
import nvidia
dirs = set()
for root in nvidia.__path__:
    dirs.update(os.path.dirname(p) for p in glob.glob(os.path.join(root, "**", "lib*.so*"), recursive=True))
print(":".join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH=$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  if ldd "$BIN" | grep "not found"; then
    echo "gpu-check: $BIN misses the libraries above" >&2
    exit 1
  fi
fi
chmod +x "$BIN"
exec timeout 470 "$PYTHON" scripts/gpu_check.py --bin "$BIN" --device "$DEVICE" \
  --demo "$DEMO" --golden "$GOLDEN" "${DRY[@]}"
