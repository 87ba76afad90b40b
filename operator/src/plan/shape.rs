//! A model's architecture sizes as the planner sees them, and how many of
//! its weights one rank holds.

use crate::crd::{ModelShape, WeightDtype};

/// Bytes per weight when neither the shape nor the dtype says (bfloat16).
pub const DEFAULT_BYTES_PER_WEIGHT: f64 = 2.0;

/// Architecture sizes of a decoder-only transformer with grouped-query
/// attention and a gated (three-matrix) MLP.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub layers: u64,
    pub hidden_size: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub vocab_size: u64,
    pub intermediate_size: u64,
    pub tied_embeddings: bool,
    /// Average bytes of one weight (2 for bfloat16, 0.625 for Q4_1).
    pub bytes_per_weight: f64,
}

impl Shape {
    /// The shape a manifest gives; `dtype` supplies the bytes per weight
    /// when the shape does not.
    pub fn from_spec(shape: &ModelShape, dtype: Option<WeightDtype>) -> Self {
        let heads = u64::from(shape.heads);
        let hidden = u64::from(shape.hidden_size);
        Self {
            layers: shape.layers.into(),
            hidden_size: hidden,
            heads,
            kv_heads: shape.kv_heads.map_or(heads, u64::from),
            head_dim: shape.head_dim.map_or(hidden / heads.max(1), u64::from),
            vocab_size: shape.vocab_size.into(),
            intermediate_size: shape.intermediate_size.into(),
            tied_embeddings: shape.tied_embeddings,
            bytes_per_weight: shape
                .bytes_per_weight
                .or(dtype.map(WeightDtype::bytes_per_weight))
                .unwrap_or(DEFAULT_BYTES_PER_WEIGHT),
        }
    }

    /// Key/value heads one rank of `tensor` holds: a share when `tensor`
    /// divides them, one (replicated) when they divide `tensor`.
    pub fn local_kv_heads(&self, tensor: u64) -> u64 {
        self.kv_heads.div_ceil(tensor).max(1)
    }

    /// Weights of the whole model.
    pub fn total_params(&self) -> u64 {
        self.rank_params(1)
    }

    /// Weights one rank of `tensor` holds. Embedding, output head, query,
    /// output projection and MLP are split `tensor` ways; key/value
    /// projections by KV head (replicated once `tensor` exceeds the KV
    /// heads); norms are replicated.
    /// Saturating, as is the rest of the planner's arithmetic: a shape no GPU could
    /// hold must come out as too big, not overflow.
    pub fn rank_params(&self, tensor: u64) -> u64 {
        let tensor = tensor.max(1);
        let h = self.hidden_size;
        let vocab_share = product(&[self.vocab_size.div_ceil(tensor), h]);
        let embeddings = if self.tied_embeddings {
            vocab_share
        } else {
            vocab_share.saturating_mul(2)
        };
        let q_o = product(&[2, h, self.heads.div_ceil(tensor), self.head_dim]);
        let k_v = product(&[2, h, self.local_kv_heads(tensor), self.head_dim]);
        let mlp = product(&[3, h, self.intermediate_size.div_ceil(tensor)]);
        let norms = h.saturating_mul(2);
        let layer = q_o
            .saturating_add(k_v)
            .saturating_add(mlp)
            .saturating_add(norms);
        embeddings
            .saturating_add(self.layers.saturating_mul(layer))
            .saturating_add(h)
    }

    /// KV cache bytes of one token in one rank: keys and values of every
    /// layer for the rank's KV heads.
    pub fn rank_kv_bytes_per_token(&self, tensor: u64, kv_dtype_bytes: u64) -> u64 {
        product(&[
            2,
            self.layers,
            self.local_kv_heads(tensor.max(1)),
            self.head_dim,
            kv_dtype_bytes,
        ])
    }
}

/// The product of `factors`, saturating at `u64::MAX`.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |n, &f| n.saturating_mul(f))
}
