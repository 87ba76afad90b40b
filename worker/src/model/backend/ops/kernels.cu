// The paged KV cache kernels of the device backend (see mod.rs): writing a step's
// keys or values through a slot mapping, and causal attention reading each token's
// sequence through its block table. Compiled by nvcc (worker/build.rs) in the `cuda`
// feature; their CPU twins are in cpu.rs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

template <typename T> __device__ __forceinline__ float to_f32(T x);
template <> __device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One thread per element of the new entries: entry `t` (`row` floats) goes to slot
// `slots[t]` of the cache (`row` elements per slot).
template <typename T>
__device__ void write_cache(T *cache, const float *src, const uint32_t *slots, uint32_t tokens,
                            uint32_t row) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (uint64_t)tokens * row) return;
  const uint32_t t = i / row, e = i % row;
  cache[(uint64_t)slots[t] * row + e] = from_f32<T>(src[i]);
}

#define WRITE(NAME, T)                                                                         \
  extern "C" __global__ void NAME(T *cache, const float *src, const uint32_t *slots,            \
                                  uint32_t tokens, uint32_t row) {                             \
    write_cache<T>(cache, src, slots, tokens, row);                                            \
  }
WRITE(paged_write_f16, __half)
WRITE(paged_write_bf16, __nv_bfloat16)
WRITE(paged_write_f32, float)

// Threads per block of the attention kernel, and positions scored per tile.
#define THREADS 128
#define WARPS (THREADS / 32)
// Output features each thread accumulates: head_dim <= THREADS * PER_THREAD.
#define PER_THREAD 4

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

// The sum (or max) over the block of each thread's `x`; every thread gets it.
__device__ float block_reduce(float x, bool is_max, float *scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = is_max ? warp_max(x) : warp_sum(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float r = is_max ? -INFINITY : 0.0f;
  for (int w = 0; w < WARPS; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  return r;
}

// One block per (token, head); the token attends to the first `len` positions of its
// sequence. Positions go in tiles of THREADS: each warp scores a quarter of the tile
// (lanes across head_dim, so reads of a key are coalesced), then every thread adds the
// tile's weighted values for its output features, with the running maximum and sum of
// an online softmax.
template <typename T>
__device__ void attend(float *out, const float *q, const T *keys, const T *values,
                       const uint32_t *tables, uint32_t max_blocks, const uint32_t *tokens,
                       uint32_t heads, uint32_t kv_heads, uint32_t d, uint32_t bs, float scale) {
  extern __shared__ float shared[];
  float *qs = shared;          // [d]
  float *weights = shared + d; // [THREADS]
  __shared__ float scratch[WARPS];

  const uint32_t t = blockIdx.x, h = blockIdx.y, tid = threadIdx.x;
  const uint32_t seq = tokens[2 * t], len = tokens[2 * t + 1];
  const uint32_t kv_head = h / (heads / kv_heads);
  const uint32_t *table = tables + (uint64_t)seq * max_blocks;
  const uint64_t row = (uint64_t)t * heads + h;
  for (uint32_t i = tid; i < d; i += THREADS) qs[i] = q[row * d + i];
  __syncthreads();

  float acc[PER_THREAD];
  for (int j = 0; j < PER_THREAD; ++j) acc[j] = 0.0f;
  float running_max = -INFINITY, running_sum = 0.0f;
  const int lane = tid % 32, warp = tid / 32;
  for (uint32_t p0 = 0; p0 < len; p0 += THREADS) {
    const uint32_t n = min((uint32_t)THREADS, len - p0);
    // Scores of the tile, a warp per position.
    for (uint32_t i = warp; i < n; i += WARPS) {
      const uint32_t p = p0 + i;
      const T *k = keys + (((uint64_t)table[p / bs] * bs + p % bs) * kv_heads + kv_head) * d;
      float dot = 0.0f;
      for (uint32_t x = lane; x < d; x += 32) dot += qs[x] * to_f32(k[x]);
      dot = warp_sum(dot);
      if (lane == 0) weights[i] = dot * scale;
    }
    __syncthreads();
    const float s = tid < n ? weights[tid] : -INFINITY;
    const float new_max = fmaxf(running_max, block_reduce(s, true, scratch));
    const float w = tid < n ? __expf(s - new_max) : 0.0f;
    const float correction = __expf(running_max - new_max);
    __syncthreads();
    weights[tid] = w;
    running_sum = running_sum * correction + block_reduce(w, false, scratch);
    running_max = new_max;
    // block_reduce's barriers made every weight visible.
    for (int j = 0; j < PER_THREAD; ++j) {
      const uint32_t x = tid + j * THREADS;
      if (x >= d) break;
      float a = acc[j] * correction;
      for (uint32_t i = 0; i < n; ++i) {
        const uint32_t p = p0 + i;
        const T *v = values + (((uint64_t)table[p / bs] * bs + p % bs) * kv_heads + kv_head) * d;
        a += weights[i] * to_f32(v[x]);
      }
      acc[j] = a;
    }
    __syncthreads();
  }
  for (int j = 0; j < PER_THREAD; ++j) {
    const uint32_t x = tid + j * THREADS;
    if (x < d) out[row * d + x] = acc[j] / running_sum;
  }
}

#define ATTEND(NAME, T)                                                                        \
  extern "C" __global__ void NAME(float *out, const float *q, const T *keys, const T *values,   \
                                  const uint32_t *tables, uint32_t max_blocks,                 \
                                  const uint32_t *tokens, uint32_t heads, uint32_t kv_heads,   \
                                  uint32_t d, uint32_t bs, float scale) {                      \
    attend<T>(out, q, keys, values, tables, max_blocks, tokens, heads, kv_heads, d, bs, scale); \
  }
ATTEND(paged_attend_f16, __half)
ATTEND(paged_attend_bf16, __nv_bfloat16)
ATTEND(paged_attend_f32, float)

// RMSNorm, one block per row: the sum of squares in double (as the CPU engine and
// llama.cpp take it), then each element scaled and multiplied by the weight.
extern "C" __global__ void rms_norm_f32(float *out, const float *x, const float *weight,
                                       uint32_t width, float eps) {
  __shared__ double partial[THREADS];
  const uint64_t row = blockIdx.x;
  const float *xr = x + row * width;
  double s = 0.0;
  for (uint32_t i = threadIdx.x; i < width; i += THREADS) s += (double)xr[i] * (double)xr[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (uint32_t stride = THREADS / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  const float scale = 1.0f / sqrtf((float)(partial[0] / width) + eps);
  for (uint32_t i = threadIdx.x; i < width; i += THREADS)
    out[row * width + i] = (xr[i] * scale) * weight[i];
}

// SwiGLU: rows of gate then up (`2 * half` each) into rows of `half`.
extern "C" __global__ void swiglu_f32(float *out, const float *gate_up, uint32_t rows,
                                      uint32_t half) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (uint64_t)rows * half) return;
  const uint64_t r = i / half, c = i % half;
  const float g = gate_up[r * 2 * half + c], u = gate_up[r * 2 * half + half + c];
  out[i] = g / (1.0f + expf(-g)) * u;
}
