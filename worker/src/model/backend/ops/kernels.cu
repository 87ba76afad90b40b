// The device backend's kernels (see mod.rs): the rotation of a step's queries and keys
// and the write of its keys and values through a slot mapping into the paged KV cache,
// causal attention reading each token's sequence through its block table, RMSNorm,
// SwiGLU, and the picks of tokens (penalties, draw, log-probabilities). Compiled by
// nvcc (worker/build.rs) in the `cuda` feature, and for the host by cuda-emu/ for the
// tests; their CPU twins are in cpu.rs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <float.h>
#include <stdint.h>

// Dynamic shared memory (the host emulator, cuda-emu/, gives its own).
#ifndef DYNAMIC_SHARED
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

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

// One head's feature `x` after the rotation (RoPE): `head` holds the head's features,
// `cos` and `sin` the token's `half` angles; pairs of halves (i, i + half) or of
// neighbours (2i, 2i + 1). Rounded step by step, unfused, as candle's element-wise
// ops and the CPU twin (cpu.rs's `rotated`) compute it.
template <typename I>
__device__ __forceinline__ float rotated(const I *head, uint32_t x, const float *cos,
                                         const float *sin, uint32_t half, uint32_t interleaved) {
  if (x >= 2 * half) return to_f32(head[x]);
  const uint32_t i = interleaved ? x / 2 : (x < half ? x : x - half);
  const bool first = interleaved ? x % 2 == 0 : x < half;
  const float x0 = to_f32(interleaved ? head[2 * i] : head[i]);
  const float x1 = to_f32(interleaved ? head[2 * i + 1] : head[i + half]);
  const float c = cos[i], s = sin[i];
  return first ? __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s))
               : __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// A step's queries and keys rotated and its values, straight from the QKV product's
// rows (`width` elements of type `I`, the product's: `q_width` of queries, then
// `kv_width` of keys, then of values): the keys and values into one layer's cache
// (`[2, blocks, block_size, kv_heads, head_dim]` of `T`: keys, then values `values_at`
// elements further) at `slots`, the queries, rounded to the cache's type (they meet the
// keys at its precision), into `q` as f32 `[tokens, heads, head_dim]`. `trig` holds
// every token's cosines, then every token's sines. One thread per element of the rows.
template <typename T, typename I>
__device__ void rotate_write(T *cache, float *q, const I *qkv, const float *trig,
                             const uint32_t *slots, uint32_t tokens, uint32_t width,
                             uint32_t q_width, uint32_t kv_width, uint32_t d, uint32_t half,
                             uint32_t interleaved, uint64_t values_at) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (uint64_t)tokens * width) return;
  const uint32_t t = i / width, j = i % width;
  const float *cos = trig + (uint64_t)t * half, *sin = trig + ((uint64_t)tokens + t) * half;
  const I *row = qkv + (uint64_t)t * width;
  if (j < q_width) {
    const uint32_t x = j % d;
    q[(uint64_t)t * q_width + j] =
        to_f32(from_f32<T>(rotated(row + (j - x), x, cos, sin, half, interleaved)));
    return;
  }
  const uint32_t k = j - q_width;
  const bool value = k >= kv_width;
  const uint32_t e = value ? k - kv_width : k, x = e % d;
  const I *head = row + q_width + (value ? kv_width : 0) + (e - x);
  const float v = value ? to_f32(head[x]) : rotated(head, x, cos, sin, half, interleaved);
  cache[(value ? values_at : 0) + (uint64_t)slots[t] * kv_width + e] = from_f32<T>(v);
}

// Kernels named `paged_rotate_write_<cache type>_<product type>`.
#define ROTATE(NAME, T, I)                                                                     \
  extern "C" __global__ void NAME(T *cache, float *q, const I *qkv, const float *trig,         \
                                  const uint32_t *slots, uint32_t tokens, uint32_t width,      \
                                  uint32_t q_width, uint32_t kv_width, uint32_t d,             \
                                  uint32_t half, uint32_t interleaved, uint64_t values_at) {   \
    rotate_write<T, I>(cache, q, qkv, trig, slots, tokens, width, q_width, kv_width, d, half,  \
                       interleaved, values_at);                                                \
  }
#define ROTATE_FROM(C, T)                                                                      \
  ROTATE(paged_rotate_write_##C##_f32, T, float)                                               \
  ROTATE(paged_rotate_write_##C##_f16, T, __half)                                              \
  ROTATE(paged_rotate_write_##C##_bf16, T, __nv_bfloat16)
ROTATE_FROM(f16, __half)
ROTATE_FROM(bf16, __nv_bfloat16)
ROTATE_FROM(f32, float)

// Threads per block of the attention kernel (and of RMSNorm's).
#define THREADS 128
#define WARPS (THREADS / 32)
// Output features each lane of a warp accumulates: head_dim <= 32 * PER_LANE.
#define PER_LANE 16

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, o));
  return x;
}

// The query (f32, in shared memory) dotted with a key row of `d` elements of `T`, the
// row read 16 bytes at a time where its width allows (rows then start 16-byte aligned:
// the cache's allocation does, and every row is a whole number of 16 bytes).
template <typename T>
__device__ __forceinline__ float dot_row(const float *qs, const T *k, uint32_t d) {
  constexpr uint32_t per = 16 / sizeof(T);
  float dot = 0.0f;
  if (d % per == 0) {
    const uint4 *k16 = reinterpret_cast<const uint4 *>(k);
#pragma unroll 8
    for (uint32_t c = 0; c < d / per; ++c) {
      const uint4 raw = k16[c];
      const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
      for (uint32_t i = 0; i < per; ++i) dot += qs[c * per + i] * to_f32(e[i]);
    }
    return dot;
  }
  for (uint32_t x = 0; x < d; ++x) dot += qs[x] * to_f32(k[x]);
  return dot;
}

// One block per (token, head, chunk of positions), the token `order[blockIdx.x /
// chunks]` (decode tokens, or every token where heads are too wide for the tiles below);
// the token attends to the first `len` positions of its sequence. Each warp is an
// online softmax of its own over runs of 32 positions (run r of the chunk to warp
// r % WARPS): lane i scores position p + i whole (`dot_row`), so a warp has 32 keys'
// reads in flight at once rather than one; then the warp adds the run's weighted values, lanes across head_dim. No
// barrier inside the loop: the warps' maxima, sums and accumulators are merged once at
// the end. With one chunk the block writes the output, rounded to `O` (f32, or the
// half-precision type of the product it feeds); with several (long sequences, few
// tokens: more blocks than (token, head) pairs keep the GPU busy) each chunk of
// `chunk_len` positions writes its maximum, sum and unnormalised sums to `partial`
// (`d + 2` floats a block) and attend_combine merges them.
template <typename T, typename O>
__device__ void attend(O *out, const float *q, const T *keys, const T *values,
                       const uint32_t *tables, uint32_t max_blocks, const uint32_t *tokens,
                       const uint32_t *order, uint32_t heads, uint32_t kv_heads, uint32_t d,
                       uint32_t bs, float scale, uint32_t chunks, uint32_t chunk_len,
                       float *partial) {
  DYNAMIC_SHARED(float, shared);
  float *qs = shared;         // [d]
  float *sums = shared + d;   // [WARPS][rows][d]: each warp's accumulators, for the merge
  __shared__ float warp_maxima[WARPS], warp_totals[WARPS];

  const uint32_t t = order[blockIdx.x / chunks], h = blockIdx.y, tid = threadIdx.x;
  const uint32_t chunk = blockIdx.x % chunks, lane = tid % 32, warp = tid / 32;
  const uint32_t seq = tokens[2 * t], len = tokens[2 * t + 1];
  const uint32_t kv_head = h / (heads / kv_heads);
  const uint32_t *table = tables + (uint64_t)seq * max_blocks;
  const uint64_t row = (uint64_t)t * heads + h;
  for (uint32_t i = tid; i < d; i += THREADS) qs[i] = q[row * d + i];
  __syncthreads();

  // Values: where a row is a whole number of 16-byte reads, at most a warp's worth, it
  // is `lanes` lanes of `per` features, and the warp takes `groups` positions at a
  // time, group g's lanes adding position i + g (one wide read a lane, several in
  // flight); else every lane takes features lane + 32 j of each position in turn.
  constexpr uint32_t per = 16 / sizeof(T);
  const bool wide = d % per == 0 && d / per <= 32;
  const uint32_t lanes = wide ? d / per : 32, groups = 32 / lanes;
  const uint32_t group = lane / lanes, slice = lane % lanes;
  float acc[PER_LANE];
  for (int j = 0; j < PER_LANE; ++j) acc[j] = 0.0f;
  float running_max = -INFINITY, running_sum = 0.0f;
  const uint32_t from = min(len, chunk * chunk_len), to = min(len - from, chunk_len) + from;
  // Whole-warp loop bounds: every lane takes every shuffle.
  for (uint32_t p0 = from + warp * 32; p0 < to; p0 += WARPS * 32) {
    const uint32_t n = min(32u, to - p0), p = p0 + lane;
    float s = -INFINITY;
    if (lane < n) {
      const T *k = keys + (((uint64_t)table[p / bs] * bs + p % bs) * kv_heads + kv_head) * d;
      s = dot_row(qs, k, d) * scale;
    }
    // Lane 0 always holds a position, so the maximum is finite.
    const float new_max = fmaxf(running_max, warp_max(s));
    const float w = lane < n ? __expf(s - new_max) : 0.0f;
    const float correction = __expf(running_max - new_max);
    running_sum = running_sum * correction + warp_sum(w);
    running_max = new_max;
    for (int j = 0; j < PER_LANE; ++j) acc[j] *= correction;
    if (wide) {
#pragma unroll 4
      for (uint32_t base = 0; base < n; base += groups) {
        const uint32_t i = base + group;
        const float wi = __shfl_sync(0xffffffff, w, i % 32);
        if (group < groups && i < n) {
          const uint32_t pi = p0 + i;
          const uint64_t at = ((uint64_t)table[pi / bs] * bs + pi % bs) * kv_heads + kv_head;
          const uint4 raw = reinterpret_cast<const uint4 *>(values + at * d)[slice];
          const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
          for (uint32_t k = 0; k < per; ++k) acc[k] += wi * to_f32(e[k]);
        }
      }
    } else {
      for (uint32_t i = 0; i < n; ++i) {
        const float wi = __shfl_sync(0xffffffff, w, i);
        const uint32_t pi = p0 + i;
        const uint64_t at = ((uint64_t)table[pi / bs] * bs + pi % bs) * kv_heads + kv_head;
        for (int j = 0; j < PER_LANE; ++j) {
          const uint32_t x = lane + 32 * j;
          if (x >= d) break;
          acc[j] += wi * to_f32(values[at * d + x]);
        }
      }
    }
  }

  // The warps' results merged, each weighted by exp(its maximum - the block's); a warp
  // that had no positions (-inf) weighs nothing. Each warp leaves a row of sums per
  // group in shared memory (one row where not wide).
  const uint32_t rows = wide ? groups : 1;
  if (lane == 0) {
    warp_maxima[warp] = running_max;
    warp_totals[warp] = running_sum;
  }
  float *mine = sums + (uint64_t)warp * rows * d;
  if (wide) {
    if (group < groups)
      for (uint32_t k = 0; k < per; ++k) mine[group * d + slice * per + k] = acc[k];
  } else {
    for (int j = 0; j < PER_LANE; ++j) {
      const uint32_t x = lane + 32 * j;
      if (x < d) mine[x] = acc[j];
    }
  }
  __syncthreads();
  float block_max = -INFINITY, total = 0.0f;
  for (int w = 0; w < WARPS; ++w) block_max = fmaxf(block_max, warp_maxima[w]);
  float weight[WARPS];
  for (int w = 0; w < WARPS; ++w) {
    weight[w] = warp_maxima[w] > -INFINITY ? __expf(warp_maxima[w] - block_max) : 0.0f;
    total += warp_totals[w] * weight[w];
  }
  float *part = partial + ((uint64_t)blockIdx.x * heads + h) * (d + 2);
  for (uint32_t x = tid; x < d; x += THREADS) {
    float a = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      float warp_sum_x = 0.0f;
      for (uint32_t g = 0; g < rows; ++g) warp_sum_x += sums[((uint64_t)w * rows + g) * d + x];
      a += warp_sum_x * weight[w];
    }
    if (chunks == 1) out[row * d + x] = from_f32<O>(a / total);
    else part[x] = a;
  }
  if (chunks > 1 && tid == 0) {
    part[d] = block_max;
    part[d + 1] = total;
  }
}

// Merges the chunks of attend's blocks: one block per (token, head), each chunk's sums
// weighted by exp(its maximum - the overall maximum); empty chunks weigh nothing.
template <typename O>
__device__ void attend_combine(O *out, const float *partial, const uint32_t *order,
                               uint32_t heads, uint32_t d, uint32_t chunks) {
  const uint32_t i = blockIdx.x, h = blockIdx.y;
  const uint64_t row = (uint64_t)order[i] * heads + h;
  float m = -INFINITY;
  for (uint32_t c = 0; c < chunks; ++c)
    m = fmaxf(m, partial[(((uint64_t)i * chunks + c) * heads + h) * (d + 2) + d]);
  for (uint32_t x = threadIdx.x; x < d; x += THREADS) {
    float sum = 0.0f, total = 0.0f;
    for (uint32_t c = 0; c < chunks; ++c) {
      const float *part = partial + (((uint64_t)i * chunks + c) * heads + h) * (d + 2);
      const float w = part[d] > -INFINITY ? __expf(part[d] - m) : 0.0f;
      sum += part[x] * w;
      total += part[d + 1] * w;
    }
    out[row * d + x] = from_f32<O>(sum / total);
  }
}

// Tiles of a prompt's tokens: one block per (run of up to TILE_TOKENS consecutive tokens
// of one sequence, head). Each tile of positions' keys and values is read from the cache
// once into shared memory and serves every token of the run (the per-token kernel reads
// a sequence's cache once per token: for long prompts that traffic grows with the
// square of the length). Scores are a warp per (token, position), lanes across the head;
// the softmax is online per token; each thread accumulates a few (token, feature)
// outputs. `positions` (at most 32) positions a tile, chosen by the host to fit shared
// memory: queries [TILE_TOKENS][d], keys and values [positions][d], weights
// [TILE_TOKENS][positions], all f32.
#define TILE_TOKENS 16
#define TILE_THREADS 256
#define TILE_WARPS (TILE_THREADS / 32)
// (token, feature) outputs a thread accumulates: heads up to 256 wide.
#define TILE_OUTPUTS (TILE_TOKENS * 256 / TILE_THREADS)

template <typename T, typename O>
__device__ void attend_tiles(O *out, const float *q, const T *keys, const T *values,
                             const uint32_t *tables, uint32_t max_blocks, const uint32_t *tokens,
                             const uint32_t *tiles, uint32_t heads, uint32_t kv_heads, uint32_t d,
                             uint32_t bs, uint32_t positions, float scale) {
  DYNAMIC_SHARED(float, shared);
  float *qs = shared;                         // [TILE_TOKENS][d]
  float *ks = qs + TILE_TOKENS * d;           // [positions][d]
  float *vs = ks + positions * d;             // [positions][d]
  float *w = vs + positions * d;              // [TILE_TOKENS][positions]
  __shared__ float correction[TILE_TOKENS], row_sum[TILE_TOKENS], row_max[TILE_TOKENS];
  __shared__ uint32_t row_len[TILE_TOKENS];

  const uint32_t first = tiles[2 * blockIdx.x], count = tiles[2 * blockIdx.x + 1];
  const uint32_t h = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const uint32_t kv_head = h / (heads / kv_heads);
  const uint32_t *table = tables + (uint64_t)tokens[2 * first] * max_blocks;
  for (uint32_t i = tid; i < TILE_TOKENS * d; i += TILE_THREADS) {
    const uint32_t r = i / d, x = i % d;
    qs[i] = r < count ? q[((uint64_t)(first + r) * heads + h) * d + x] : 0.0f;
  }
  if (tid < TILE_TOKENS) {
    row_len[tid] = tid < count ? tokens[2 * (first + tid) + 1] : 0;
    row_max[tid] = -INFINITY;
    row_sum[tid] = 0.0f;
  }
  float acc[TILE_OUTPUTS];
  for (int k = 0; k < TILE_OUTPUTS; ++k) acc[k] = 0.0f;
  __syncthreads();
  uint32_t span = 0;
  for (uint32_t r = 0; r < count; ++r) span = max(span, row_len[r]);

  for (uint32_t p0 = 0; p0 < span; p0 += positions) {
    const uint32_t n = min(positions, span - p0);
    // Independent reads, several in flight per thread.
#pragma unroll 4
    for (uint32_t i = tid; i < n * d; i += TILE_THREADS) {
      const uint32_t j = i / d, x = i % d, p = p0 + j;
      const uint64_t at = (((uint64_t)table[p / bs] * bs + p % bs) * kv_heads + kv_head) * d + x;
      ks[i] = to_f32(keys[at]);
      vs[i] = to_f32(values[at]);
    }
    __syncthreads();
    for (uint32_t k = warp; k < TILE_TOKENS * positions; k += TILE_WARPS) {
      const uint32_t r = k / positions, j = k % positions;
      float dot = 0.0f;
      if (r < count && j < n)
        for (uint32_t x = lane; x < d; x += 32) dot += qs[r * d + x] * ks[j * d + x];
      dot = warp_sum(dot);
      if (lane == 0) w[k] = (r < count && j < n && p0 + j < row_len[r]) ? dot * scale : -INFINITY;
    }
    __syncthreads();
    for (uint32_t r = warp; r < TILE_TOKENS; r += TILE_WARPS) {
      const float s = lane < positions ? w[r * positions + lane] : -INFINITY;
      const float new_max = fmaxf(row_max[r], warp_max(s));
      const float e = s > -INFINITY ? __expf(s - new_max) : 0.0f;
      const float total = warp_sum(e);
      if (lane < positions) w[r * positions + lane] = e;
      if (lane == 0) {
        const float c = new_max > -INFINITY ? __expf(row_max[r] - new_max) : 1.0f;
        correction[r] = c;
        row_sum[r] = row_sum[r] * c + total;
        row_max[r] = new_max;
      }
    }
    __syncthreads();
    for (int k = 0; k < TILE_OUTPUTS; ++k) {
      const uint32_t i = tid + k * TILE_THREADS;
      if (i >= TILE_TOKENS * d) break;
      const uint32_t r = i / d, x = i % d;
      float a = acc[k] * correction[r];
      for (uint32_t j = 0; j < n; ++j) a += w[r * positions + j] * vs[j * d + x];
      acc[k] = a;
    }
    __syncthreads();
  }
  for (int k = 0; k < TILE_OUTPUTS; ++k) {
    const uint32_t i = tid + k * TILE_THREADS;
    if (i >= TILE_TOKENS * d) break;
    const uint32_t r = i / d, x = i % d;
    if (r < count)
      out[((uint64_t)(first + r) * heads + h) * d + x] = from_f32<O>(acc[k] / row_sum[r]);
  }
}

// Kernels named `NAME_<cache type>_<output type>`, and the merge `NAME_<output type>`.
#define ATTEND(NAME, TILES, T, O)                                                              \
  extern "C" __global__ void NAME(O *out, const float *q, const T *keys, const T *values,       \
                                  const uint32_t *tables, uint32_t max_blocks,                 \
                                  const uint32_t *tokens, const uint32_t *order, uint32_t heads, \
                                  uint32_t kv_heads, uint32_t d, uint32_t bs, float scale,     \
                                  uint32_t chunks, uint32_t chunk_len, float *partial) {       \
    attend<T, O>(out, q, keys, values, tables, max_blocks, tokens, order, heads, kv_heads, d,  \
                 bs, scale, chunks, chunk_len, partial);                                       \
  }                                                                                            \
  extern "C" __global__ void TILES(O *out, const float *q, const T *keys, const T *values,      \
                                   const uint32_t *tables, uint32_t max_blocks,                \
                                   const uint32_t *tokens, const uint32_t *tiles,              \
                                   uint32_t heads, uint32_t kv_heads, uint32_t d, uint32_t bs, \
                                   uint32_t positions, float scale) {                          \
    attend_tiles<T, O>(out, q, keys, values, tables, max_blocks, tokens, tiles, heads,         \
                       kv_heads, d, bs, positions, scale);                                     \
  }
#define ATTEND_INTO(C, T)                                                                      \
  ATTEND(paged_attend_##C##_f32, paged_attend_tiles_##C##_f32, T, float)                       \
  ATTEND(paged_attend_##C##_f16, paged_attend_tiles_##C##_f16, T, __half)                      \
  ATTEND(paged_attend_##C##_bf16, paged_attend_tiles_##C##_bf16, T, __nv_bfloat16)
ATTEND_INTO(f16, __half)
ATTEND_INTO(bf16, __nv_bfloat16)
ATTEND_INTO(f32, float)
#define COMBINE(S, O)                                                                          \
  extern "C" __global__ void paged_attend_combine_##S(O *out, const float *partial,            \
                                                      const uint32_t *order, uint32_t heads,   \
                                                      uint32_t d, uint32_t chunks) {           \
    attend_combine<O>(out, partial, order, heads, d, chunks);                                  \
  }
COMBINE(f32, float)
COMBINE(f16, __half)
COMBINE(bf16, __nv_bfloat16)

// RMSNorm of one row, by one block: the sum of squares in double (as the CPU engine and
// llama.cpp take it), then each element scaled and multiplied by the weight, into `O`
// (f32, or the half-precision type of the product the norm feeds, rounded once). Each
// thread reads the elements it may have written just before (same stride).
template <typename O>
__device__ void rms_norm_row(O *out, const float *xr, const float *weight, uint32_t width,
                             float eps) {
  __shared__ double partial[THREADS];
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
    out[i] = from_f32<O>((xr[i] * scale) * weight[i]);
}

// The residual connection and the next norm in one pass, one block per row: `x += y`
// in place (`y` of the product's type `I`), then the RMSNorm of the sums into `out`.
template <typename I, typename O>
__device__ void add_rms_norm(O *out, float *x, const I *y, const float *weight, uint32_t width,
                             float eps) {
  const uint64_t at = (uint64_t)blockIdx.x * width;
  for (uint32_t i = threadIdx.x; i < width; i += THREADS) x[at + i] = x[at + i] + to_f32(y[at + i]);
  rms_norm_row(out + at, x + at, weight, width, eps);
}

// Kernels named `rms_norm_<output type>` (one block per row) and
// `add_rms_norm_<output type>_<product type>`.
#define ADD_RMS_NORM(OS, O, S, I)                                                              \
  extern "C" __global__ void add_rms_norm_##OS##_##S(O *out, float *x, const I *y,             \
                                                     const float *weight, uint32_t width,      \
                                                     float eps) {                              \
    add_rms_norm<I, O>(out, x, y, weight, width, eps);                                         \
  }
#define NORM_INTO(OS, O)                                                                       \
  extern "C" __global__ void rms_norm_##OS(O *out, const float *x, const float *weight,        \
                                           uint32_t width, float eps) {                        \
    const uint64_t row = blockIdx.x;                                                           \
    rms_norm_row(out + row * width, x + row * width, weight, width, eps);                      \
  }                                                                                            \
  ADD_RMS_NORM(OS, O, f32, float)                                                              \
  ADD_RMS_NORM(OS, O, f16, __half)                                                             \
  ADD_RMS_NORM(OS, O, bf16, __nv_bfloat16)
NORM_INTO(f32, float)
NORM_INTO(f16, __half)
NORM_INTO(bf16, __nv_bfloat16)

// SwiGLU: rows of gate then up (`2 * half` each, of the product's type `I`) into rows of
// `half` of type `O` (f32, or the half-precision type of the product it feeds).
template <typename I, typename O>
__device__ void swiglu(O *out, const I *gate_up, uint32_t rows, uint32_t half) {
  const uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (uint64_t)rows * half) return;
  const uint64_t r = i / half, c = i % half;
  const float g = to_f32(gate_up[r * 2 * half + c]), u = to_f32(gate_up[r * 2 * half + half + c]);
  out[i] = from_f32<O>(g / (1.0f + expf(-g)) * u);
}

// Kernels named `swiglu_<output type>_<product type>`.
#define SWIGLU(S, I, OS, O)                                                                    \
  extern "C" __global__ void swiglu_##OS##_##S(O *out, const I *gate_up, uint32_t rows,        \
                                               uint32_t half) {                                \
    swiglu<I, O>(out, gate_up, rows, half);                                                    \
  }
#define FROM_PRODUCT(S, I)                                                                     \
  SWIGLU(S, I, f32, float)                                                                     \
  SWIGLU(S, I, f16, __half)                                                                    \
  SWIGLU(S, I, bf16, __nv_bfloat16)
FROM_PRODUCT(f32, float)
FROM_PRODUCT(f16, __half)
FROM_PRODUCT(bf16, __nv_bfloat16)

// The draw of sampled tokens (crate::sampling::draw; its CPU twin is cpu.rs's
// draw_row, step for step): one block per row, each thread owning a run of `chunk`
// consecutive ids and their words of a bitmap of kept tokens in shared memory. The
// thresholds of top-k and top-p are found by bisection on the logits' order keys
// rather than by sorting the vocabulary; ties at a threshold are kept by rank in id
// order, as the host sampler keeps them; the draw walks the kept tokens in id order.
// Every sum is a fixed tree, so a row draws the same token whatever else is in the step.
#define DRAW_THREADS 256

__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float from_order_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// NaN reads as -inf, +inf as the largest float (the host sampler's rules).
__device__ __forceinline__ float clean_logit(float l) {
  return isnan(l) ? -INFINITY : fminf(l, FLT_MAX);
}

struct SumOp {
  template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct MinOp {
  template <typename T> __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// `op` over every thread's `x` in a fixed tree; every thread gets the result.
template <typename T, typename Op> __device__ T block_all(T x, Op op, T *scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (uint32_t stride = DRAW_THREADS / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) scratch[threadIdx.x] = op(scratch[threadIdx.x], scratch[threadIdx.x + stride]);
    __syncthreads();
  }
  const T r = scratch[0];
  __syncthreads();
  return r;
}

// The sum of the `x` of the threads before this one.
template <typename T> __device__ T block_exclusive_sum(T x, T *scratch) {
  scratch[threadIdx.x] = x;
  __syncthreads();
  for (uint32_t offset = 1; offset < DRAW_THREADS; offset <<= 1) {
    const T before = threadIdx.x >= offset ? scratch[threadIdx.x - offset] : (T)0;
    __syncthreads();
    scratch[threadIdx.x] += before;
    __syncthreads();
  }
  const T r = threadIdx.x > 0 ? scratch[threadIdx.x - 1] : (T)0;
  __syncthreads();
  return r;
}

__device__ __forceinline__ bool is_kept(const uint32_t *kept, uint32_t i) {
  return (kept[i >> 5] >> (i & 31)) & 1u;
}
__device__ __forceinline__ void set_kept(uint32_t *kept, uint32_t i, bool on) {
  const uint32_t bit = 1u << (i & 31);
  kept[i >> 5] = on ? (kept[i >> 5] | bit) : (kept[i >> 5] & ~bit);
}

// Keeps, of this thread's kept tokens at key `t`, those whose rank among all the
// row's (in id order) is below `need`; drops those below `t`.
__device__ void cut_at(uint32_t *kept, const float *l, uint32_t begin, uint32_t end, uint32_t t,
                       unsigned long long need, unsigned long long *scratch) {
  unsigned long long ties = 0;
  for (uint32_t i = begin; i < end; ++i)
    if (is_kept(kept, i) && order_key(clean_logit(l[i])) == t) ++ties;
  unsigned long long rank = block_exclusive_sum(ties, scratch);
  for (uint32_t i = begin; i < end; ++i) {
    if (!is_kept(kept, i)) continue;
    const uint32_t k = order_key(clean_logit(l[i]));
    if (k == t) set_kept(kept, i, rank++ < need);
    else if (k < t) set_kept(kept, i, false);
  }
}

// A token's weight, exp((logit - max) / temperature), in double as the host's.
struct Weight {
  double max, temperature;
  __device__ double operator()(float x) const { return exp(((double)x - max) / temperature); }
};
struct One {
  __device__ unsigned long long operator()(float) const { return 1ull; }
};

// The largest key v whose kept tokens at keys >= v measure at least `goal`, by
// bisection: one pass over the row per halving (the measure does not grow with v).
template <typename T, typename Measure>
__device__ uint32_t bisect(const uint32_t *kept, const float *l, uint32_t begin, uint32_t end,
                           T goal, Measure measure, T *scratch) {
  uint32_t lo = 0, hi = UINT32_MAX;
  while (lo < hi) {
    const uint32_t v = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
    T local = 0;
    for (uint32_t i = begin; i < end; ++i) {
      const float x = clean_logit(l[i]);
      if (is_kept(kept, i) && order_key(x) >= v) local += measure(x);
    }
    if (block_all(local, SumOp(), scratch) >= goal) lo = v;
    else hi = v - 1;
  }
  return lo;
}

// What the kept tokens of this thread at keys above `t` measure, over the block.
template <typename T, typename Measure>
__device__ T measure_above(const uint32_t *kept, const float *l, uint32_t begin, uint32_t end,
                           uint32_t t, Measure measure, T *scratch) {
  T local = 0;
  for (uint32_t i = begin; i < end; ++i) {
    const float x = clean_logit(l[i]);
    if (is_kept(kept, i) && order_key(x) > t) local += measure(x);
  }
  return block_all(local, SumOp(), scratch);
}

extern "C" __global__ void draw_f32(uint32_t *out, const float *logits, const double *settings,
                                    uint32_t vocab, uint32_t chunk) {
  DYNAMIC_SHARED(uint32_t, kept);
  __shared__ double sum_d[DRAW_THREADS];
  __shared__ unsigned long long sum_u[DRAW_THREADS];
  __shared__ float max_f[DRAW_THREADS];
  __shared__ uint32_t min_u[DRAW_THREADS];
  const float *l = logits + (uint64_t)blockIdx.x * vocab;
  const double *s = settings + (uint64_t)blockIdx.x * 5;
  const double temperature = s[0], top_p = s[2], min_p = s[3], uniform = s[4];
  const unsigned long long top_k = (unsigned long long)s[1];
  const uint32_t begin = min(threadIdx.x * chunk, vocab), end = min(begin + chunk, vocab);

  float m = -INFINITY;
  unsigned long long n = 0;
  for (uint32_t w = threadIdx.x * chunk / 32; w < (threadIdx.x + 1) * chunk / 32; ++w) kept[w] = 0;
  for (uint32_t i = begin; i < end; ++i) {
    const float x = clean_logit(l[i]);
    if (x > -INFINITY) {
      ++n;
      set_kept(kept, i, true);
    }
    m = fmaxf(m, x);
  }
  m = block_all(m, MaxOp(), max_f);
  n = block_all(n, SumOp(), sum_u);

  // The argmax (lowest id among equals): greedy rows, and rows with nothing to draw.
  uint32_t first = UINT32_MAX;
  for (uint32_t i = begin; i < end && first == UINT32_MAX; ++i)
    if (clean_logit(l[i]) == m) first = i;
  first = block_all(first, MinOp(), min_u);
  if (first == UINT32_MAX) first = 0;
  if (n == 0 || temperature == 0.0) {
    if (threadIdx.x == 0) out[blockIdx.x] = first;
    return;
  }

  if (top_k > 0 && top_k < n) {
    const uint32_t t = bisect(kept, l, begin, end, top_k, One(), sum_u);
    const unsigned long long above = measure_above(kept, l, begin, end, t, One(), sum_u);
    cut_at(kept, l, begin, end, t, top_k - above, sum_u);
  }

  const Weight weight{(double)m, temperature};
  if (top_p < 1.0) {
    // Every kept token's key is above 0 (the key of a NaN pattern).
    const double goal = top_p * measure_above(kept, l, begin, end, 0u, weight, sum_d);
    const uint32_t t = bisect(kept, l, begin, end, goal, weight, sum_d);
    const double above = measure_above(kept, l, begin, end, t, weight, sum_d);
    // Ties weigh the same: enough of them to reach the goal, at least one.
    const double need = fmax(1.0, ceil((goal - above) / weight(from_order_key(t))));
    cut_at(kept, l, begin, end, t, (unsigned long long)need, sum_u);
  }

  if (min_p > 0.0)
    for (uint32_t i = begin; i < end; ++i)
      if (is_kept(kept, i) && weight(clean_logit(l[i])) < min_p) set_kept(kept, i, false);

  // The draw: the kept tokens share [0, total) in id order.
  double local = 0.0;
  uint32_t last = 0;
  bool any = false;
  for (uint32_t i = begin; i < end; ++i)
    if (is_kept(kept, i)) {
      local += weight(clean_logit(l[i]));
      last = i;
      any = true;
    }
  const double total = block_all(local, SumOp(), sum_d);
  const double before = block_exclusive_sum(local, sum_d);
  const double target = uniform * total;
  uint32_t found = UINT32_MAX;
  if (any && before <= target && target < before + local) {
    double prefix = before;
    for (uint32_t i = begin; i < end; ++i)
      if (is_kept(kept, i)) {
        prefix += weight(clean_logit(l[i]));
        if (target < prefix) {
          found = i;
          break;
        }
      }
    if (found == UINT32_MAX) found = last;
  }
  found = block_all(found, MinOp(), min_u);
  // Rounding put the target past every share: it belongs to the last kept token.
  const uint32_t last_kept = block_all(any ? last : 0u, MaxOp(), min_u);
  if (threadIdx.x == 0) {
    if (!(isfinite(total) && total > 0.0)) out[blockIdx.x] = first;
    else out[blockIdx.x] = found != UINT32_MAX ? found : last_kept;
  }
}

// Log-probabilities where the logits are (crate::sampling::logprobs_of; CPU twin:
// cpu.rs's top_logprobs_row): the chosen token's and the `n` most likely tokens'
// (highest logit first, ties to the lower id), natural-log softmax of the raw logits
// in double. One block per row; the `n` best are found as the draw's top-k is (every
// token is a candidate here, -inf included), then written in id order: the host
// orders them. Out: per row `1 + 3n` floats: the chosen token's log-probability, then
// (id, logit, log-probability) triples (the host orders by logit: beside +inf logits,
// every log-probability is -inf).
extern "C" __global__ void top_logprobs_f32(float *out, const float *logits,
                                            const uint32_t *chosen, uint32_t vocab,
                                            uint32_t n, uint32_t chunk) {
  DYNAMIC_SHARED(uint32_t, kept);
  __shared__ double sum_d[DRAW_THREADS];
  __shared__ unsigned long long sum_u[DRAW_THREADS];
  __shared__ float max_f[DRAW_THREADS];
  const float *l = logits + (uint64_t)blockIdx.x * vocab;
  float *o = out + (uint64_t)blockIdx.x * (1 + 3 * n);
  const uint32_t begin = min(threadIdx.x * chunk, vocab), end = min(begin + chunk, vocab);

  // NaN reads as -inf; +inf stays (those share the mass).
  float m = -INFINITY;
  unsigned long long infinite = 0;
  for (uint32_t w = threadIdx.x * chunk / 32; w < (threadIdx.x + 1) * chunk / 32; ++w) kept[w] = 0;
  for (uint32_t i = begin; i < end; ++i) {
    const float x = isnan(l[i]) ? -INFINITY : l[i];
    set_kept(kept, i, true);
    m = fmaxf(m, x);
    infinite += x == INFINITY;
  }
  m = block_all(m, MaxOp(), max_f);
  infinite = block_all(infinite, SumOp(), sum_u);
  double sum = 0.0;
  if (m > -INFINITY && m < INFINITY)
    for (uint32_t i = begin; i < end; ++i) {
      const float x = isnan(l[i]) ? -INFINITY : l[i];
      sum += exp((double)x - (double)m);
    }
  sum = block_all(sum, SumOp(), sum_d);
  const double lse = (double)m + log(sum);
  // The host's normaliser: a finite maximum, +inf logits sharing the mass, or none usable.
  auto logprob = [&](float raw) -> float {
    const float x = isnan(raw) ? -INFINITY : raw;
    if (m == -INFINITY) return -logf((float)vocab);
    if (m == INFINITY) return x == INFINITY ? -logf((float)infinite) : -INFINITY;
    return (float)((double)x - lse);
  };

  // The n best by key, as the draw's top-k (keys of cleaned logits; -inf has one).
  const uint32_t t = bisect(kept, l, begin, end, (unsigned long long)n, One(), sum_u);
  const unsigned long long above = measure_above(kept, l, begin, end, t, One(), sum_u);
  cut_at(kept, l, begin, end, t, n - above, sum_u);
  unsigned long long mine = 0;
  for (uint32_t i = begin; i < end; ++i) mine += is_kept(kept, i);
  unsigned long long at = block_exclusive_sum(mine, sum_u);
  for (uint32_t i = begin; i < end; ++i)
    if (is_kept(kept, i)) {
      o[1 + 3 * at] = (float)i;
      o[2 + 3 * at] = isnan(l[i]) ? -INFINITY : l[i];
      o[3 + 3 * at] = logprob(l[i]);
      ++at;
    }
  if (threadIdx.x == 0) {
    const uint32_t c = chosen[blockIdx.x];
    o[0] = c < vocab ? logprob(l[c]) : -INFINITY;
  }
}

// Penalties (crate::sampling::Penalties; CPU twin: cpu.rs's penalise), one thread per
// (row, id, times generated) entry, ids unique within a row. IEEE operations, neither
// approximated nor fused, so that the host's arithmetic is reproduced.
extern "C" __global__ void penalise_f32(float *rows, const uint32_t *entries,
                                        const float *settings, uint32_t n, uint32_t vocab) {
  const uint32_t e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= n) return;
  const uint32_t r = entries[3 * e], id = entries[3 * e + 1], count = entries[3 * e + 2];
  if (id >= vocab) return;
  const float repetition = settings[3 * r], presence = settings[3 * r + 1],
              frequency = settings[3 * r + 2];
  float *l = rows + (uint64_t)r * vocab + id;
  float x = *l;
  if (repetition != 1.0f) x = x > 0.0f ? __fdiv_rn(x, repetition) : __fmul_rn(x, repetition);
  if (count > 0 && (presence != 0.0f || frequency != 0.0f))
    x = __fsub_rn(x, __fadd_rn(presence, __fmul_rn(frequency, (float)count)));
  *l = x;
}
