// What CUDA C++ source needs to compile for the host and run in the emulator
// (emu.cpp): the execution model's built-ins (threadIdx, blockIdx, __syncthreads, warp
// shuffles, shared memory) and the intrinsics the kernels use, with IEEE arithmetic.
//
// Each thread of a block is a fiber; a block runs to completion before the next one.
// So `__shared__` variables are function statics (one per kernel, shared by the
// block's fibers), and a barrier or shuffle is a switch back to the scheduler, which
// resumes the fibers once every live one has arrived (a kernel whose threads cannot
// all arrive is reported as a deadlock instead of hanging, as it would on a GPU).
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
// Dynamic shared memory: the launch's bytes (kernels.cu declares it through this).
#define DYNAMIC_SHARED(T, name) T *name = static_cast<T *>(emu::dynamic_shared())

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

// CUDA's 16-byte vector, for kernels' wide loads.
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

namespace emu {
// The running fiber's thread index, the block's index and shape.
const dim3 &thread_idx();
extern dim3 block_idx, block_dim, grid_dim;
void *dynamic_shared();
// Barriers: every live thread of the block, or of the calling thread's warp.
void sync_block();
void sync_warp();
// The calling thread's warp's exchange slots (32 words), for shuffles.
uint64_t *warp_slots();
// A shuffle that reads a lane which has exited: undefined on a GPU, fatal here.
void check_lane(unsigned lane);
}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }

namespace emu {
// A warp shuffle: each lane publishes `value` and reads lane `from`'s.
template <typename T> T exchange(T value, unsigned from) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 64 bits");
  const unsigned lane = threadIdx.x % 32;
  uint64_t *slots = warp_slots();
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  slots[lane] = bits;
  sync_warp();
  check_lane(from);
  T out;
  memcpy(&out, &slots[from], sizeof(T));
  sync_warp();
  return out;
}
}  // namespace emu

template <typename T> T __shfl_xor_sync(unsigned, T value, int mask) {
  return emu::exchange(value, (threadIdx.x % 32) ^ (unsigned)mask);
}

template <typename T> T __shfl_sync(unsigned, T value, int lane) {
  return emu::exchange(value, (unsigned)lane % 32);
}

template <typename T> inline T min(T a, T b) { return a < b ? a : b; }
template <typename T> inline T max(T a, T b) { return a > b ? a : b; }

inline float __expf(float x) { return expf(x); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }

inline uint32_t __float_as_uint(float x) {
  uint32_t b;
  memcpy(&b, &x, 4);
  return b;
}
inline float __uint_as_float(uint32_t b) {
  float x;
  memcpy(&x, &b, 4);
  return x;
}

// IEEE half (GCC's _Float16 converts with round-to-nearest-even, as __float2half_rn).
typedef _Float16 __half;
inline float __half2float(__half x) { return (float)x; }
inline __half __float2half_rn(float x) { return (__half)x; }

// bfloat16: the upper half of an f32, rounded to nearest even; NaN stays a quiet NaN.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) { return __uint_as_float((uint32_t)x.bits << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  const uint32_t b = __float_as_uint(x);
  if (isnan(x)) return {(uint16_t)((b >> 16) | 0x40)};
  return {(uint16_t)((b + 0x7fff + ((b >> 16) & 1)) >> 16)};
}
