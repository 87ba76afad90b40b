//! Grouped-query attention over this rank's heads, reading and writing the KV cache.

use super::causal::{Heads, attend, to_half_precision};
use super::config::ModelConfig;
use super::layers::{LoadContext, RowParallelLinear, StackedColumns};
use super::rope::Rope;
use super::rows::Rows;
use super::{ModelError, SeqSpan};
use crate::kv::KvCache;
use crate::weights::Split;

#[derive(Debug)]
pub struct Attention {
    /// Q, K and V, stacked.
    qkv: StackedColumns,
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
    ) -> Result<Self, ModelError> {
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
        x: &Rows,
        spans: &[SeqSpan<'_>],
        layer: usize,
        kv: &mut KvCache,
    ) -> Result<Rows, ModelError> {
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let qkv = self.qkv.forward(x)?.split_columns(self.qkv.widths());
        let (q, k, v) = (qkv[0].as_slice(), qkv[1].as_slice(), qkv[2].as_slice());
        let mut queries = Vec::with_capacity(q.len());
        let mut offset = 0;
        for span in spans {
            let t = span.tokens.len();
            let mut qs = q[offset * h * d..(offset + t) * h * d].to_vec();
            let mut ks = k[offset * kvh * d..(offset + t) * kvh * d].to_vec();
            let mut vs = v[offset * kvh * d..(offset + t) * kvh * d].to_vec();
            self.rope.apply(&mut qs, h, d, span.start_pos);
            self.rope.apply(&mut ks, kvh, d, span.start_pos);
            // Keys, values and queries meet at half precision, as in llama.cpp's
            // f16 cache: on small models, where the best two tokens are often
            // hundredths of a nat apart, matching its rounding keeps answers aligned.
            for x in qs.iter_mut().chain(ks.iter_mut()).chain(vs.iter_mut()) {
                *x = to_half_precision(*x);
            }
            kv.write(layer, span.blocks, span.start_pos, &ks, &vs)?;
            queries.extend_from_slice(&qs);
            offset += t;
        }
        // Every span's entries are in place: attend over all of them at once.
        let views = spans
            .iter()
            .map(|s| kv.view(layer, s.blocks, s.start_pos + s.tokens.len()))
            .collect::<Result<Vec<_>, _>>()?;
        let seen: Vec<(usize, usize)> = spans
            .iter()
            .enumerate()
            .flat_map(|(i, s)| (1..=s.tokens.len()).map(move |t| (i, s.start_pos + t)))
            .collect();
        let shape = Heads {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
        };
        let mut out = vec![0f32; x.m() * h * d];
        attend(&queries, &views, &seen, shape, &mut out);
        self.o.forward(&Rows::new(out, h * d))
    }
}
