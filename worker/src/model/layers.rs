//! Parallel-ready building blocks. A column-parallel layer owns a range of
//! output features and needs no communication; a row-parallel layer owns a
//! range of input features and sums its partial product over the group.

use std::sync::Arc;

use candle_core::{D, Device, Result, Tensor};

use super::ModelError;
use crate::comm::Collective;
use crate::weights::{GgufFile, Split, Weight};

/// Where a layer reads its tensors from and which shard it owns.
pub struct LoadContext<'a> {
    pub file: &'a GgufFile,
    pub comm: Arc<dyn Collective>,
    pub device: Device,
}

impl LoadContext<'_> {
    pub fn rank(&self) -> usize {
        self.comm.rank().0
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    pub fn load(&self, name: &str, split: &Split) -> std::result::Result<Weight, ModelError> {
        Ok(self.file.load(name, split, &self.device)?)
    }

    /// The rows `[rank·n/world, (rank+1)·n/world)` of a tensor with `n` rows.
    pub fn even_rows(&self, name: &str) -> std::result::Result<Split, ModelError> {
        let rows = self.file.tensor_meta(name)?.dims[0];
        even(name, rows, self.rank(), self.world()).map(Split::Rows)
    }
}

fn even(
    name: &str,
    len: usize,
    rank: usize,
    world: usize,
) -> std::result::Result<std::ops::Range<usize>, ModelError> {
    Split::even(len, rank, world).ok_or_else(|| ModelError::ImpossibleSplit {
        world,
        reason: format!("'{name}' has {len} rows, not divisible by {world} ranks"),
    })
}

/// `y = x · Wᵀ (+ b)` over this rank's output features.
#[derive(Debug)]
pub struct ColumnParallelLinear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl ColumnParallelLinear {
    /// Loads `rows` of `{prefix}.weight` (and its bias when `bias` is set).
    pub fn load(
        ctx: &LoadContext<'_>,
        prefix: &str,
        rows: Split,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let weight = ctx.load(&format!("{prefix}.weight"), &rows)?;
        let bias = if bias {
            Some(ctx.load(&format!("{prefix}.bias"), &rows)?.to_dense_f32()?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// This rank's contiguous share of the output features.
    pub fn load_even(
        ctx: &LoadContext<'_>,
        prefix: &str,
        bias: bool,
    ) -> std::result::Result<Self, ModelError> {
        let rows = ctx.even_rows(&format!("{prefix}.weight"))?;
        Self::load(ctx, prefix, rows, bias)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.matmul_t(x)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// `y = Σ_ranks x_r · W_rᵀ`: each rank multiplies its share of the input
/// features, then the partial sums are all-reduced.
#[derive(Debug)]
pub struct RowParallelLinear {
    weight: Weight,
    comm: Arc<dyn Collective>,
}

impl RowParallelLinear {
    pub fn load_even(ctx: &LoadContext<'_>, prefix: &str) -> std::result::Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let cols = ctx.file.tensor_meta(&name)?.dims[1];
        let range = even(&name, cols, ctx.rank(), ctx.world())?;
        let weight = ctx.load(&name, &Split::Cols(range))?;
        Ok(Self {
            weight,
            comm: ctx.comm.clone(),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let partial = self.weight.matmul_t(x)?;
        self.comm.all_reduce_sum(&partial)
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(
        ctx: &LoadContext<'_>,
        name: &str,
        eps: f32,
    ) -> std::result::Result<Self, ModelError> {
        let weight = ctx.load(name, &Split::Full)?.to_dense_f32()?;
        Ok(Self {
            weight,
            eps: eps as f64,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
        let scale = (mean_sq + self.eps)?.sqrt()?.recip()?;
        x.broadcast_mul(&scale)?.broadcast_mul(&self.weight)
    }
}

/// Token embedding, replicated on every rank (it is read, not multiplied).
#[derive(Debug)]
pub struct Embedding {
    table: Weight,
}

impl Embedding {
    pub fn load(ctx: &LoadContext<'_>, name: &str) -> std::result::Result<Self, ModelError> {
        Ok(Self {
            table: ctx.load(name, &Split::Full)?,
        })
    }

    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        self.table.gather_rows(ids)
    }

    pub fn weight(&self) -> &Weight {
        &self.table
    }
}

/// `silu(gate) * up`, the SwiGLU activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}
