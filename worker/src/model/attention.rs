//! Grouped-query attention over this rank's heads, reading and writing the KV cache.

use super::ModelError;
use super::backend::{AttentionShape, Backend};
use super::config::ModelConfig;
use super::layers::{LoadContext, RowParallelLinear, StackedColumns};
use super::lora::{Site, StepAdapters};
use crate::weights::Split;

/// One rank's heads and the rows of Q and of K/V they own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadRows {
    pub heads: usize,
    pub kv_heads: usize,
    pub q_rows: std::ops::Range<usize>,
    pub kv_rows: std::ops::Range<usize>,
}

impl HeadRows {
    pub fn of(cfg: &ModelConfig, rank: usize, world: usize) -> Self {
        let d = cfg.head_dim;
        let heads = cfg.num_heads / world;
        // KV heads are split like the query heads, or replicated when there are
        // fewer KV heads than ranks: rank r then keeps the KV head its queries use.
        let (kv_heads, kv_rows) = if cfg.num_kv_heads >= world {
            let n = cfg.num_kv_heads / world;
            (n, rank * n * d..(rank + 1) * n * d)
        } else {
            let h = rank * cfg.num_kv_heads / world;
            (1, h * d..(h + 1) * d)
        };
        Self {
            heads,
            kv_heads,
            q_rows: rank * heads * d..(rank + 1) * heads * d,
            kv_rows,
        }
    }
}

#[derive(Debug)]
pub struct Attention<B: Backend> {
    /// Q, K and V, stacked.
    qkv: StackedColumns<B>,
    o: RowParallelLinear<B>,
    shape: AttentionShape,
}

impl<B: Backend> Attention<B> {
    pub fn load(
        ctx: &LoadContext<'_, B>,
        prefix: &str,
        cfg: &ModelConfig,
    ) -> Result<Self, ModelError> {
        let HeadRows {
            heads,
            kv_heads,
            q_rows,
            kv_rows,
        } = HeadRows::of(cfg, ctx.rank(), ctx.world());
        let d = cfg.head_dim;
        Ok(Self {
            qkv: StackedColumns::load(
                ctx,
                &[
                    (format!("{prefix}.attn_q"), Split::Rows(q_rows)),
                    (format!("{prefix}.attn_k"), Split::Rows(kv_rows.clone())),
                    (format!("{prefix}.attn_v"), Split::Rows(kv_rows)),
                ],
                cfg.qkv_bias,
            )?,
            o: RowParallelLinear::load_even(ctx, &format!("{prefix}.attn_output"))?,
            shape: AttentionShape {
                heads,
                kv_heads,
                head_dim: d,
            },
        })
    }

    /// The QKV product's (first) weight: what the norm before attention hands its
    /// output to.
    pub fn input_weight(&self) -> &B::Matrix {
        self.qkv.first_weight()
    }

    pub fn local_kv_heads(&self) -> usize {
        self.shape.kv_heads
    }

    /// `x` holds the normalised hidden states of every span's tokens, in order.
    pub fn forward(
        &self,
        b: &B,
        x: &B::Hidden,
        layer: usize,
        step: &B::Step<'_>,
        cache: &mut B::Cache,
        adapters: &StepAdapters<'_, B>,
    ) -> Result<B::Hidden, ModelError> {
        let qkv = self.qkv.forward(b, x, &adapters.at(layer, Site::Qkv))?;
        let out = b.attention(qkv, self.shape, layer, step, cache, self.o.weight())?;
        self.o.forward(b, &out, &adapters.at(layer, Site::O))
    }
}
