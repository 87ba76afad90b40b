use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use shardserve_kernels::QuantMatrix;

/// One loaded tensor (or a rank's slice of it), in the form its products use.
#[derive(Debug)]
pub enum Weight {
    /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 on CPU: the project's own SIMD kernels.
    Blocks(QuantMatrix),
    /// Other ggml quantisations (K-quants), and every quantisation off-CPU.
    Ggml(Arc<QTensor>),
    /// F32, F16 or BF16.
    Dense(Tensor),
}

impl Weight {
    /// `[rows, cols]` of a matrix, `[len]` of a vector.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Blocks(m) => vec![m.rows(), m.cols()],
            Weight::Ggml(q) => q.shape().dims().to_vec(),
            Weight::Dense(t) => t.dims().to_vec(),
        }
    }

    /// `x · Wᵀ` for `x` of shape `[m, cols]` (f32); returns `[m, rows]` (f32).
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Weight::Blocks(w) => {
                let (m, k) = x.dims2()?;
                if k != w.cols() {
                    candle_core::bail!(
                        "matmul: input has {k} features, weight expects {}",
                        w.cols()
                    );
                }
                let xs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut y = vec![0f32; m * w.rows()];
                w.matmul(&xs, m, &mut y);
                Tensor::from_vec(y, (m, w.rows()), x.device())
            }
            Weight::Ggml(q) => QMatMul::from_arc(q.clone())?.forward(x),
            Weight::Dense(w) => {
                let wt = w.t()?;
                if w.dtype() == DType::F32 {
                    x.matmul(&wt)
                } else {
                    x.to_dtype(w.dtype())?.matmul(&wt)?.to_dtype(DType::F32)
                }
            }
        }
    }

    /// Rows `ids` as f32 `[ids.len(), cols]`: an embedding lookup.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Weight::Blocks(w) => {
                let cols = w.cols();
                let mut out = vec![0f32; ids.len() * cols];
                for (i, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    if id >= w.rows() {
                        candle_core::bail!(
                            "token id {id} is outside the vocabulary of {}",
                            w.rows()
                        );
                    }
                    w.dequantize_row(id, &mut out[i * cols..(i + 1) * cols]);
                }
                Tensor::from_vec(out, (ids.len(), cols), &candle_core::Device::Cpu)
            }
            Weight::Ggml(q) => {
                let device = q.device();
                let idx = Tensor::new(ids, &device)?;
                q.embedding(&idx)?.to_dtype(DType::F32)
            }
            Weight::Dense(t) => {
                let idx = Tensor::new(ids, t.device())?;
                t.index_select(&idx, 0)?.to_dtype(DType::F32)
            }
        }
    }

    /// The whole tensor as dense f32 (for vectors such as norms and biases).
    pub fn to_dense_f32(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(DType::F32),
            Weight::Ggml(q) => q.dequantize(&q.device()),
            Weight::Blocks(w) => {
                let mut out = vec![0f32; w.rows() * w.cols()];
                for r in 0..w.rows() {
                    w.dequantize_row(r, &mut out[r * w.cols()..(r + 1) * w.cols()]);
                }
                Tensor::from_vec(out, (w.rows(), w.cols()), &candle_core::Device::Cpu)
            }
        }
    }
}
