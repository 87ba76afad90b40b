//! Grouped-query attention over this rank's heads, reading and writing the KV cache.

use candle_core::{Result, Tensor};

use super::causal::{Heads, attend, to_half_precision};
use super::config::ModelConfig;
use super::layers::{ColumnParallelLinear, LoadContext, RowParallelLinear};
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
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let q = self.q.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let k = self.k.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let v = self.v.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
        let tokens: usize = spans.iter().map(|s| s.tokens.len()).sum();
        let mut out = vec![0f32; tokens * h * d];
        let mut offset = 0;
        for span in spans {
            let t = span.tokens.len();
            let mut qs = q[offset * h * d..(offset + t) * h * d].to_vec();
            let mut ks = k[offset * kvh * d..(offset + t) * kvh * d].to_vec();
            let vs = &v[offset * kvh * d..(offset + t) * kvh * d];
            self.rope.apply(&mut qs, h, d, span.start_pos);
            self.rope.apply(&mut ks, kvh, d, span.start_pos);
            let mut vs = vs.to_vec();
            // Keys, values and queries meet at half precision, as in llama.cpp's
            // f16 cache: on small models, where the best two tokens are often
            // hundredths of a nat apart, matching its rounding keeps answers aligned.
            for x in qs.iter_mut().chain(ks.iter_mut()).chain(vs.iter_mut()) {
                *x = to_half_precision(*x);
            }
            let err = |e: crate::kv::KvError| candle_core::Error::Msg(e.to_string());
            kv.append(span.slot, layer, span.start_pos, &ks, &vs)
                .map_err(err)?;
            let (keys, values) = kv
                .entries(span.slot, layer, span.start_pos + t)
                .map_err(err)?;
            let shape = Heads {
                heads: h,
                kv_heads: kvh,
                head_dim: d,
            };
            attend(
                &qs,
                keys,
                values,
                span.start_pos,
                shape,
                &mut out[offset * h * d..(offset + t) * h * d],
            );
            offset += t;
        }
        let y = Tensor::from_vec(out, (tokens, h * d), x.device())?;
        self.o.forward(&y)
    }
}
