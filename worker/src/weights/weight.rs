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

    /// The matrices `parts` one under the other, as one weight, when they
    /// share a form that stacks (same block format and width, or same dense
    /// type); otherwise the parts are handed back unchanged.
    pub fn stack_rows(parts: Vec<Weight>) -> std::result::Result<Weight, Vec<Weight>> {
        let blocks: Option<Vec<&QuantMatrix>> = parts
            .iter()
            .map(|w| match w {
                Weight::Blocks(m) => Some(m),
                _ => None,
            })
            .collect();
        if let Some(ms) = blocks
            && let Ok(m) = QuantMatrix::stack(&ms)
        {
            return Ok(Weight::Blocks(m));
        }
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|w| match w {
                Weight::Dense(t) if t.rank() == 2 => Some(t),
                _ => None,
            })
            .collect();
        if let Some(ts) = dense
            && let Ok(t) = Tensor::cat(&ts, 0)
        {
            return Ok(Weight::Dense(t));
        }
        Err(parts)
    }

    /// `[rows, cols]` of a matrix whose product with `m` rows of `x` is asked for.
    fn product_shape(&self, x: &[f32], m: usize) -> Result<(usize, usize)> {
        let dims = self.dims();
        let (n, k) = (dims[0], dims.get(1).copied().unwrap_or(1));
        if x.len() != m * k {
            candle_core::bail!(
                "matmul: {} inputs are not {m} rows of {k} features",
                x.len()
            );
        }
        Ok((n, k))
    }

    /// `x · Wᵀ` as unrounded f64 sums of the blocks' terms, for weights in the project's
    /// block formats (`None` for the others): what a row-parallel shard all-reduces, so
    /// that the sum over shards, rounded once, is what one rank's product gives (see
    /// `QuantMatrix::matmul_wide`).
    pub fn matmul_t_wide(&self, x: &[f32], m: usize) -> Result<Option<Vec<f64>>> {
        let (n, _) = self.product_shape(x, m)?;
        match self {
            Weight::Blocks(w) => {
                let mut y = vec![0f64; m * n];
                w.matmul_wide(x, m, &mut y);
                Ok(Some(y))
            }
            Weight::Ggml(_) | Weight::Dense(_) => Ok(None),
        }
    }

    /// `x · Wᵀ` for `m` rows of `cols` floats in `x`; returns `m` rows of `rows` floats.
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = self.product_shape(x, m)?;
        match self {
            Weight::Blocks(w) => {
                let mut y = vec![0f32; m * n];
                w.matmul(x, m, &mut y);
                Ok(y)
            }
            Weight::Ggml(q) => {
                let xt = Tensor::from_slice(x, (m, k), &q.device())?;
                QMatMul::from_arc(q.clone())?
                    .forward(&xt)?
                    .flatten_all()?
                    .to_vec1()
            }
            Weight::Dense(w) => {
                let xt = Tensor::from_slice(x, (m, k), w.device())?.to_dtype(w.dtype())?;
                xt.matmul(&w.t()?)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            }
        }
    }

    /// Rows `ids`, as f32, one after the other: an embedding lookup.
    pub fn gather_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let dims = self.dims();
        let (n, k) = (dims[0], dims.get(1).copied().unwrap_or(1));
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= n) {
            candle_core::bail!("token id {bad} is outside the vocabulary of {n}");
        }
        match self {
            Weight::Blocks(w) => {
                let mut out = vec![0f32; ids.len() * k];
                for (row, &id) in out.chunks_exact_mut(k).zip(ids) {
                    w.dequantize_row(id as usize, row);
                }
                Ok(out)
            }
            Weight::Ggml(q) => {
                let idx = Tensor::new(ids, &q.device())?;
                q.embedding(&idx)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            }
            Weight::Dense(t) => {
                let idx = Tensor::new(ids, t.device())?;
                t.index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
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
