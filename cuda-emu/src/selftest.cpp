// Kernels that break the execution model's rules, for the emulator's own tests: the
// scheduler must report them rather than hang or read garbage.
#include "cuda_emu.h"

// Half of each warp waits at the block's barrier, the other half at a shuffle: neither
// can open (a GPU hangs or misbehaves; the emulator reports a deadlock).
extern "C" __global__ void emu_selftest_split_warp(float *out) {
  float x = 1.0f;
  if (threadIdx.x % 32 < 16) __syncthreads();
  else x = __shfl_xor_sync(0xffffffff, x, 1);
  out[threadIdx.x] = x;
}

// A warp sum by shuffles, the way the kernels reduce; with `exited` lanes returning
// first, their values are read after they have gone.
extern "C" __global__ void emu_selftest_warp_sum(float *out, unsigned exited) {
  if (threadIdx.x % 32 < exited) return;
  float x = (float)threadIdx.x;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  out[threadIdx.x] = x;
}

// Thread 0 writes what the last thread reads, with no barrier between the two: the
// reader sees the write in one order of the threads and not in the other.
extern "C" __global__ void emu_selftest_missing_barrier(float *out) {
  __shared__ float x;
  if (threadIdx.x == blockDim.x - 1) x = 0.0f;
  __syncthreads();
  if (threadIdx.x == 0) x = 1.0f;
  if (threadIdx.x == blockDim.x - 1) out[blockIdx.x] = x;
}
