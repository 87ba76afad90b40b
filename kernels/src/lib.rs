//! CPU kernels of the shardserve engine: matrix products on weights kept in GGUF/ggml block
//! formats (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`, `Q8_0`), with the instruction set chosen at
//! run time.
//!
//! The crate owns the numerics of a quantised linear layer. Activations are quantised per
//! 32 values to 8 bits (ggml `Q8_0`/`Q8_1`), each weight block is multiplied as an exact
//! integer dot product and scaled, exactly as llama.cpp's CPU backend does, so greedy
//! decoding agrees with it. The model code calls [`QuantMatrix::matmul`] for its linear
//! layers ([`QuantMatrix::matmul_wide`] for tensor-parallel shards whose sums must round
//! like the whole) and [`QuantMatrix::dequantize_row`] for embedding lookups; parallelism runs on
//! the caller's rayon pool.
//!
//! Layout: `format` (block layouts, reference dequantiser), `quantize` (activations),
//! `dot` (one kernel module per instruction set: scalar reference, AVX2, AVX-512 VNNI,
//! NEON; on x86 packed eight- or sixteen-row kernels on an interleaved copy for
//! batches),
//! `matmul` (threading over weight rows), `simd` (run-time detection).

mod dot;
mod error;
mod format;
mod interleaved;
mod matmul;
mod matrix;
mod quantize;
mod simd;

#[cfg(test)]
mod tests;

pub use error::KernelError;
pub use format::QuantFormat;
pub use matrix::QuantMatrix;
pub use simd::{SimdLevel, simd_level};
