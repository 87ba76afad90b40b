// The emulator's stand-in for CUDA's header: __half lives in cuda_emu.h.
#pragma once
#include "cuda_emu.h"
