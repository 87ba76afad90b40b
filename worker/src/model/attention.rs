//! Grouped-query attention over this rank's heads, reading and writing the KV cache.

use super::causal::{Heads, Queries, attend, round_to_half};
use super::config::ModelConfig;
use super::layers::{LoadContext, RowParallelLinear, StackedColumns};
use super::rope::{Angles, Rope};
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

    /// The rotary angles of every span's token positions, in order: the
    /// same for every layer, so computed once per step.
    pub fn angles(&self, spans: &[SeqSpan<'_>]) -> Angles {
        self.rope.angles(
            spans
                .iter()
                .flat_map(|s| s.start_pos..s.start_pos + s.tokens.len()),
        )
    }

    /// `x` holds the normalised hidden states of every span's tokens, in
    /// order; `angles` their rotary angles ([`Attention::angles`]).
    pub fn forward(
        &self,
        x: &Rows,
        spans: &[SeqSpan<'_>],
        angles: &Angles,
        layer: usize,
        kv: &mut KvCache,
    ) -> Result<Rows, ModelError> {
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        // Q|K|V side by side in each row; queries are rotated and rounded in
        // place, keys and values go straight into the cache.
        let (qw, kw) = match self.qkv.widths() {
            [q, k, _] => (*q, *k),
            _ => (h * d, kvh * d),
        };
        let mut qkv = self.qkv.forward(x)?;
        let mut row = 0;
        for span in spans {
            for t in 0..span.tokens.len() {
                let (q, kv_part) = qkv.row_mut(row).split_at_mut(qw);
                let (k, v) = kv_part.split_at_mut(kw);
                self.rope.rotate(q, d, angles, row);
                self.rope.rotate(k, d, angles, row);
                // Keys, values and queries meet at half precision, as in llama.cpp's
                // f16 cache: on small models, where the best two tokens are often
                // hundredths of a nat apart, matching its rounding keeps answers
                // aligned. The cache rounds keys and values as it stores them.
                round_to_half(q);
                kv.write(layer, span.blocks, span.start_pos + t, k, v)?;
                row += 1;
            }
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
        let queries = Queries {
            data: qkv.as_slice(),
            stride: qkv.width(),
        };
        let mut out = vec![0f32; x.m() * h * d];
        attend(queries, &views, &seen, shape, &mut out);
        self.o.forward(&Rows::new(out, h * d))
    }
}
