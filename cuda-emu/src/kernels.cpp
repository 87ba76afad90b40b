// The device backend's kernels, compiled for the host against the emulator's
// built-ins (build.rs puts worker/src/model/backend/ops on the include path).
#include "cuda_emu.h"
#include "kernels.cu"
