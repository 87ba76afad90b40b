//! Parallel-ready building blocks. A column-parallel layer owns a range of
//! output features and needs no communication; a row-parallel layer owns a
//! range of input features and sums its partial product over the group.

use std::sync::Arc;

use candle_core::Device;

use super::ModelError;
use super::rows::{Rows, rms_norm};
use crate::comm::{Collective, HostSliceMut};
use crate::weights::{Split, TensorSource, Weight};

/// Where a layer reads its tensors from (by canonical GGUF names) and which
/// shard it owns.
pub struct LoadContext<'a> {
    pub file: &'a dyn TensorSource,
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

    pub fn load(&self, name: &str, split: &Split) -> Result<Weight, ModelError> {
        Ok(self.file.load(name, split, &self.device)?)
    }

    /// A vector (norm weight, bias) as plain floats.
    pub fn load_vector(&self, name: &str, split: &Split) -> Result<Vec<f32>, ModelError> {
        Ok(self
            .load(name, split)?
            .to_dense_f32()?
            .flatten_all()?
            .to_vec1()?)
    }

    /// `[rows, cols]` of a matrix; a vector is refused where a matrix is needed.
    pub fn dims(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        let dims = self.file.tensor_dims(name)?;
        if dims.len() != 2 {
            return Err(ModelError::Shape {
                tensor: name.into(),
                found: dims,
                expected: vec![0, 0],
            });
        }
        Ok(dims)
    }

    /// The rows `[rank·n/world, (rank+1)·n/world)` of a tensor with `n` rows.
    pub fn even_rows(&self, name: &str) -> Result<Split, ModelError> {
        let rows = self.dims(name)?[0];
        even(name, rows, self.rank(), self.world()).map(Split::Rows)
    }
}

fn even(
    name: &str,
    len: usize,
    rank: usize,
    world: usize,
) -> Result<std::ops::Range<usize>, ModelError> {
    Split::even(len, rank, world).ok_or_else(|| ModelError::ImpossibleSplit {
        world,
        reason: format!("'{name}' has {len} rows, not divisible by {world} ranks"),
    })
}

/// `y = x · Wᵀ (+ b)` over this rank's output features.
#[derive(Debug)]
pub struct ColumnParallelLinear {
    weight: Weight,
    bias: Option<Vec<f32>>,
}

impl ColumnParallelLinear {
    /// Loads `rows` of `{prefix}.weight` (and its bias when `bias` is set).
    pub fn load(
        ctx: &LoadContext<'_>,
        prefix: &str,
        rows: Split,
        bias: bool,
    ) -> Result<Self, ModelError> {
        let weight = ctx.load(&format!("{prefix}.weight"), &rows)?;
        let bias = if bias {
            Some(ctx.load_vector(&format!("{prefix}.bias"), &rows)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Rows) -> Result<Rows, ModelError> {
        let mut y = Rows::new(
            self.weight.matmul_t(x.as_slice(), x.m())?,
            self.weight.dims()[0],
        );
        if let Some(b) = &self.bias {
            y.add_row_vector(b);
        }
        Ok(y)
    }
}

/// Column-parallel layers that read the same input (Q, K, V; gate, up),
/// stacked into one product where their weights allow: one pass over the
/// input and one parallel section instead of several.
#[derive(Debug)]
pub struct StackedColumns {
    /// One layer when stacked, else one per part.
    layers: Vec<ColumnParallelLinear>,
    widths: Vec<usize>,
}

impl StackedColumns {
    /// Loads each `(prefix, rows)` part (with biases when `bias` is set).
    pub fn load(
        ctx: &LoadContext<'_>,
        parts: &[(String, Split)],
        bias: bool,
    ) -> Result<Self, ModelError> {
        let layers = parts
            .iter()
            .map(|(prefix, rows)| ColumnParallelLinear::load(ctx, prefix, rows.clone(), bias))
            .collect::<Result<Vec<_>, _>>()?;
        let widths: Vec<usize> = layers.iter().map(|l| l.weight.dims()[0]).collect();
        let biases: Option<Vec<Vec<f32>>> = layers.iter().map(|l| l.bias.clone()).collect();
        let weights: Vec<Weight> = layers.into_iter().map(|l| l.weight).collect();
        let layers = match Weight::stack_rows(weights) {
            Ok(weight) => vec![ColumnParallelLinear {
                weight,
                bias: biases.map(|b| b.concat()),
            }],
            Err(weights) => {
                let biases: Vec<Option<Vec<f32>>> = match biases {
                    Some(b) => b.into_iter().map(Some).collect(),
                    None => vec![None; weights.len()],
                };
                weights
                    .into_iter()
                    .zip(biases)
                    .map(|(weight, bias)| ColumnParallelLinear { weight, bias })
                    .collect()
            }
        };
        Ok(Self { layers, widths })
    }

    /// All parts side by side in each row, in the order they were loaded.
    pub fn forward(&self, x: &Rows) -> Result<Rows, ModelError> {
        if let [stacked] = self.layers.as_slice() {
            return stacked.forward(x);
        }
        let parts = self
            .layers
            .iter()
            .map(|l| l.forward(x))
            .collect::<Result<Vec<_>, _>>()?;
        let width: usize = self.widths.iter().sum();
        let mut out = Vec::with_capacity(x.m() * width);
        for i in 0..x.m() {
            for p in &parts {
                out.extend_from_slice(p.row(i));
            }
        }
        Ok(Rows::new(out, width))
    }

    pub fn widths(&self) -> &[usize] {
        &self.widths
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
    pub fn load_even(ctx: &LoadContext<'_>, prefix: &str) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let cols = ctx.dims(&name)?[1];
        let range = even(&name, cols, ctx.rank(), ctx.world())?;
        let weight = ctx.load(&name, &Split::Cols(range))?;
        Ok(Self {
            weight,
            comm: ctx.comm.clone(),
        })
    }

    /// Block-quantised shards all-reduce unrounded f64 sums and round once,
    /// so that the result is the one rank's product whatever the tensor size
    /// (tensor 3 answers exactly as tensor 1). Other weight forms sum f32
    /// partial products, which agree with one rank's to rounding only.
    pub fn forward(&self, x: &Rows) -> Result<Rows, ModelError> {
        let n = self.weight.dims()[0];
        if let Some(mut wide) = self.weight.matmul_t_wide(x.as_slice(), x.m())? {
            self.comm.all_reduce(HostSliceMut::F64(&mut wide))?;
            return Ok(Rows::new(wide.into_iter().map(|v| v as f32).collect(), n));
        }
        let mut partial = self.weight.matmul_t(x.as_slice(), x.m())?;
        self.comm.all_reduce_sum(&mut partial)?;
        Ok(Rows::new(partial, n))
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

impl RmsNorm {
    pub fn load(ctx: &LoadContext<'_>, name: &str, eps: f32) -> Result<Self, ModelError> {
        Ok(Self {
            weight: ctx.load_vector(name, &Split::Full)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Rows) -> Rows {
        rms_norm(x, &self.weight, self.eps)
    }
}

/// Token embedding, replicated on every rank (it is read, not multiplied).
#[derive(Debug)]
pub struct Embedding {
    table: Weight,
}

impl Embedding {
    pub fn load(ctx: &LoadContext<'_>, name: &str) -> Result<Self, ModelError> {
        Ok(Self {
            table: ctx.load(name, &Split::Full)?,
        })
    }

    pub fn forward(&self, ids: &[u32]) -> Result<Rows, ModelError> {
        Ok(Rows::new(
            self.table.gather_rows(ids)?,
            self.table.dims()[1],
        ))
    }

    pub fn weight(&self) -> &Weight {
        &self.table
    }
}
