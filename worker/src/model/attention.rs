//! Grouped-query attention over this rank's heads, reading and writing the KV cache.

use candle_core::{Result, Tensor};

use super::config::ModelConfig;
use super::layers::{ColumnParallelLinear, LoadContext, RowParallelLinear, softmax_last_dim};
use super::rope::Rope;
use super::{ModelError, SeqSpan};
use crate::kv::KvCache;
use crate::weights::Split;

#[derive(Debug)]
pub struct Attention {
    q: ColumnParallelLinear,
    k: ColumnParallelLinear,
    v: ColumnParallelLinear,
    o: RowParallelLinear,
    rope: Rope,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    pub fn load(
        ctx: &LoadContext<'_>,
        prefix: &str,
        cfg: &ModelConfig,
    ) -> std::result::Result<Self, ModelError> {
        let world = ctx.world();
        let rank = ctx.rank();
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
        let q_rows = rank * heads * d..(rank + 1) * heads * d;
        Ok(Self {
            q: ColumnParallelLinear::load(
                ctx,
                &format!("{prefix}.attn_q"),
                Split::Rows(q_rows),
                cfg.qkv_bias,
            )?,
            k: ColumnParallelLinear::load(
                ctx,
                &format!("{prefix}.attn_k"),
                Split::Rows(kv_rows.clone()),
                cfg.qkv_bias,
            )?,
            v: ColumnParallelLinear::load(
                ctx,
                &format!("{prefix}.attn_v"),
                Split::Rows(kv_rows),
                cfg.qkv_bias,
            )?,
            o: RowParallelLinear::load_even(ctx, &format!("{prefix}.attn_output"))?,
            rope: Rope::new(&cfg.rope),
            heads,
            kv_heads,
            head_dim: d,
        })
    }

    pub fn local_kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// `x` holds the normalised hidden states of every span's tokens, in order.
    pub fn forward(
        &self,
        x: &Tensor,
        spans: &[SeqSpan<'_>],
        layer: usize,
        kv: &mut KvCache,
    ) -> Result<Tensor> {
        let q = self.q.forward(x)?;
        let k = self.k.forward(x)?;
        let v = self.v.forward(x)?;
        let mut outs = Vec::with_capacity(spans.len());
        let mut offset = 0;
        for span in spans {
            let t = span.tokens.len();
            let qs = q
                .narrow(0, offset, t)?
                .reshape((t, self.heads, self.head_dim))?;
            let ks = k
                .narrow(0, offset, t)?
                .reshape((t, self.kv_heads, self.head_dim))?;
            let vs = v
                .narrow(0, offset, t)?
                .reshape((t, self.kv_heads, self.head_dim))?;
            let qs = self.rope.apply(&qs, span.start_pos)?;
            let ks = self.rope.apply(&ks, span.start_pos)?;
            kv.append(
                span.slot,
                layer,
                span.start_pos,
                &ks.transpose(0, 1)?,
                &vs.transpose(0, 1)?,
            )?;
            let len = span.start_pos + t;
            let (kc, vc) = kv.view(span.slot, layer, len)?;
            outs.push(self.attend(&qs, &kc, &vc, span.start_pos)?);
            offset += t;
        }
        let y = Tensor::cat(&outs, 0)?;
        self.o.forward(&y)
    }

    /// Causal attention of `q` `[t, heads, d]` at positions `start..start+t`
    /// over cached `k`, `v` `[kv_heads, start+t, d]`; returns `[t, heads·d]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, start: usize) -> Result<Tensor> {
        let (t, _, d) = q.dims3()?;
        let group = self.heads / self.kv_heads;
        let len = start + t;
        // Queries of one KV head side by side: [kv_heads, group·t, d], so the
        // cache is never repeated per query head.
        let q = q
            .reshape((t, self.kv_heads, group, d))?
            .permute((1, 2, 0, 3))?
            .reshape((self.kv_heads, group * t, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? * scale)?;
        let scores = if t > 1 {
            let mut mask = vec![0f32; group * t * len];
            for g in 0..group {
                for i in 0..t {
                    let row = &mut mask[(g * t + i) * len..(g * t + i + 1) * len];
                    row[start + i + 1..].fill(f32::NEG_INFINITY);
                }
            }
            let mask = Tensor::from_vec(mask, (group * t, len), q.device())?;
            scores.broadcast_add(&mask)?
        } else {
            scores
        };
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&v.contiguous()?)?;
        out.reshape((self.kv_heads, group, t, d))?
            .permute((2, 0, 1, 3))?
            .reshape((t, self.heads * d))
    }
}
