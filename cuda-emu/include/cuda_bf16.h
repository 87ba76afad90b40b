// The emulator's stand-in for CUDA's header: __nv_bfloat16 lives in cuda_emu.h.
#pragma once
#include "cuda_emu.h"
