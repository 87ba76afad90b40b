//! Parallel-ready building blocks over any [`Backend`]. A column-parallel layer owns
//! a range of output features and needs no communication; a row-parallel layer owns
//! a range of input features and sums its partial product over the group.

use std::sync::Arc;

use super::ModelError;
use super::backend::{Backend, LoraPair};
use crate::comm::Collective;
use crate::weights::{Split, TensorSource, Weight};

/// Where a layer reads its tensors from (by canonical GGUF names), which shard it
/// owns, and the backend that holds it.
pub struct LoadContext<'a, B: Backend> {
    pub file: &'a dyn TensorSource,
    pub comm: Arc<dyn Collective>,
    pub backend: &'a B,
}

impl<B: Backend> LoadContext<'_, B> {
    pub fn rank(&self) -> usize {
        self.comm.rank().0
    }

    pub fn world(&self) -> usize {
        self.comm.world_size()
    }

    pub fn load(&self, name: &str, split: &Split) -> Result<Weight, ModelError> {
        Ok(self.file.load(name, split, &self.backend.device())?)
    }

    pub fn matrix(&self, name: &str, split: &Split) -> Result<B::Matrix, ModelError> {
        self.backend.matrix(self.load(name, split)?)
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
struct ColumnParallelLinear<B: Backend> {
    weight: B::Matrix,
    bias: Option<B::Vector>,
}

impl<B: Backend> ColumnParallelLinear<B> {
    fn forward(&self, b: &B, x: &B::Hidden) -> Result<B::Hidden, ModelError> {
        b.linear(x, &self.weight, self.bias.as_ref())
    }
}

/// Column-parallel layers that read the same input (Q, K, V; gate, up),
/// stacked into one product where their weights allow: one pass over the
/// input and one parallel section instead of several.
#[derive(Debug)]
pub struct StackedColumns<B: Backend> {
    /// One layer when stacked, else one per part.
    layers: Vec<ColumnParallelLinear<B>>,
}

impl<B: Backend> StackedColumns<B> {
    /// Loads each `(prefix, rows)` part (with biases when `bias` is set).
    pub fn load(
        ctx: &LoadContext<'_, B>,
        parts: &[(String, Split)],
        bias: bool,
    ) -> Result<Self, ModelError> {
        let mut weights = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for (prefix, rows) in parts {
            weights.push(ctx.matrix(&format!("{prefix}.weight"), rows)?);
            if bias {
                biases.push(ctx.load_vector(&format!("{prefix}.bias"), rows)?);
            }
        }
        let vector = |v: Vec<f32>| ctx.backend.vector(v);
        let layers = match ctx.backend.stack(weights) {
            Ok(weight) => vec![ColumnParallelLinear {
                weight,
                bias: bias.then(|| vector(biases.concat())).transpose()?,
            }],
            Err(weights) => {
                let mut biases = biases.into_iter();
                weights
                    .into_iter()
                    .map(|weight| {
                        Ok(ColumnParallelLinear {
                            weight,
                            bias: biases.next().map(vector).transpose()?,
                        })
                    })
                    .collect::<Result<_, ModelError>>()?
            }
        };
        Ok(Self { layers })
    }

    /// The first part's weight: what the op before these layers hands its output to
    /// (parts of different types meet in f32 after their products anyway).
    pub fn first_weight(&self) -> &B::Matrix {
        &self.layers[0].weight
    }

    /// All parts side by side in each row, in the order they were loaded, with
    /// the adapters' products added to their rows.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Hidden,
        lora: &[LoraPair<'_, B>],
    ) -> Result<B::Hidden, ModelError> {
        let mut y = if let [stacked] = self.layers.as_slice() {
            stacked.forward(b, x)?
        } else {
            let parts = self
                .layers
                .iter()
                .map(|l| l.forward(b, x))
                .collect::<Result<Vec<_>, _>>()?;
            b.concat(parts)?
        };
        if !lora.is_empty() {
            b.add_lora(&mut y, x, lora)?;
        }
        Ok(y)
    }
}

/// `y = Σ_ranks x_r · W_rᵀ`: each rank multiplies its share of the input
/// features, then the partial sums are all-reduced.
#[derive(Debug)]
pub struct RowParallelLinear<B: Backend> {
    weight: B::Matrix,
    comm: Arc<dyn Collective>,
}

impl<B: Backend> RowParallelLinear<B> {
    pub fn load_even(ctx: &LoadContext<'_, B>, prefix: &str) -> Result<Self, ModelError> {
        let name = format!("{prefix}.weight");
        let cols = ctx.dims(&name)?[1];
        let range = even(&name, cols, ctx.rank(), ctx.world())?;
        Ok(Self {
            weight: ctx.matrix(&name, &Split::Cols(range))?,
            comm: ctx.comm.clone(),
        })
    }

    pub fn forward(
        &self,
        b: &B,
        x: &B::Hidden,
        lora: &[LoraPair<'_, B>],
    ) -> Result<B::Hidden, ModelError> {
        b.linear_all_reduce(x, &self.weight, self.comm.as_ref(), lora)
    }

    /// The rank's shard: what the op before this layer hands its output to.
    pub fn weight(&self) -> &B::Matrix {
        &self.weight
    }
}

/// Root-mean-square normalisation with a learned scale.
#[derive(Debug)]
pub struct RmsNorm<B: Backend> {
    weight: B::Vector,
    eps: f32,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(ctx: &LoadContext<'_, B>, name: &str, eps: f32) -> Result<Self, ModelError> {
        Ok(Self {
            weight: ctx.backend.vector(ctx.load_vector(name, &Split::Full)?)?,
            eps,
        })
    }

    /// The norm of `x`, for `next` to multiply.
    pub fn forward(&self, b: &B, x: &B::Hidden, next: &B::Matrix) -> Result<B::Hidden, ModelError> {
        b.rms_norm(x, &self.weight, self.eps, next)
    }

    /// `x += y` (a residual connection), then the norm of `x`, for `next`.
    pub fn forward_after_add(
        &self,
        b: &B,
        x: &mut B::Hidden,
        y: &B::Hidden,
        next: &B::Matrix,
    ) -> Result<B::Hidden, ModelError> {
        b.add_rms_norm(x, y, &self.weight, self.eps, next)
    }
}
