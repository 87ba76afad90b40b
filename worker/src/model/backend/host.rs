//! The CPU backend: activations as host rows, products by the project's kernels
//! (`shardserve-kernels`) or candle's CPU ones, attention over the f16 [`KvCache`].
//! Every operation computes each row in one fixed order, so a token's numbers do not
//! depend on the batch it is in, and block-quantised row-parallel products all-reduce
//! unrounded f64 sums, so tensor N gives tensor 1's bits.

use candle_core::Device;
use rayon::prelude::*;

use super::{AttentionShape, Backend, Downloaded, LoraPair, ModelError, Pick, StepLayout};
use crate::comm::{Collective, HostSliceMut};
use crate::kv::{KvCache, KvCacheTooLarge, KvShape};
use crate::model::causal::{Heads, Queries, attend, round_to_half};
use crate::model::lora::{self, HostDense};
use crate::model::rope::{Angles, Rope};
use crate::model::rows::{Rows, rms_norm, swiglu};
use crate::sampling::logprobs_of;
use crate::weights::Weight;

/// The CPU kernels on host memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct Host;

/// A step on the host: its layout and the rotary angles of its positions.
pub struct HostStep<'a> {
    layout: &'a StepLayout<'a>,
    rope: &'a Rope,
    angles: Angles,
}

impl Backend for Host {
    type Hidden = Rows;
    type Matrix = Weight;
    type Vector = Vec<f32>;
    type Dense = HostDense;
    type Cache = KvCache;
    type Step<'a> = HostStep<'a>;

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn matrix(&self, weight: Weight) -> Result<Weight, ModelError> {
        Ok(weight)
    }

    fn vector(&self, values: Vec<f32>) -> Result<Vec<f32>, ModelError> {
        Ok(values)
    }

    fn dense(&self, rows: usize, cols: usize, values: Vec<f32>) -> Result<HostDense, ModelError> {
        debug_assert_eq!(values.len(), rows * cols);
        Ok(HostDense { rows, cols, values })
    }

    fn dims(matrix: &Weight) -> [usize; 2] {
        let dims = matrix.dims();
        [dims[0], dims.get(1).copied().unwrap_or(1)]
    }

    fn stack(&self, parts: Vec<Weight>) -> Result<Weight, Vec<Weight>> {
        Weight::stack_rows(parts)
    }

    fn new_cache(
        &self,
        shape: KvShape,
        blocks: usize,
        block_size: usize,
    ) -> Result<KvCache, KvCacheTooLarge> {
        KvCache::new(shape, blocks, block_size)
    }

    fn begin<'a>(
        &self,
        layout: &'a StepLayout<'a>,
        rope: &'a Rope,
        _cache: &KvCache,
    ) -> Result<HostStep<'a>, ModelError> {
        Ok(HostStep {
            layout,
            rope,
            angles: rope.angles(layout.positions.iter().copied()),
        })
    }

    fn embed(&self, table: &Weight, step: &HostStep<'_>) -> Result<Rows, ModelError> {
        Ok(Rows::new(
            table.gather_rows(&step.layout.ids)?,
            Self::dims(table)[1],
        ))
    }

    fn linear(&self, x: &Rows, w: &Weight, bias: Option<&Vec<f32>>) -> Result<Rows, ModelError> {
        let mut y = Rows::new(w.matmul_t(x.as_slice(), x.m())?, Self::dims(w)[0]);
        if let Some(b) = bias {
            y.add_row_vector(b);
        }
        Ok(y)
    }

    fn concat(&self, parts: Vec<Rows>) -> Result<Rows, ModelError> {
        let width: usize = parts.iter().map(Rows::width).sum();
        let m = parts.first().map_or(0, Rows::m);
        let mut out = Vec::with_capacity(m * width);
        for i in 0..m {
            for p in &parts {
                out.extend_from_slice(p.row(i));
            }
        }
        Ok(Rows::new(out, width))
    }

    fn add_lora(
        &self,
        y: &mut Rows,
        x: &Rows,
        pairs: &[LoraPair<'_, Self>],
    ) -> Result<(), ModelError> {
        lora::add_to_rows(y, x, &lora::host_pairs(pairs));
        Ok(())
    }

    /// Block-quantised shards all-reduce unrounded f64 sums and round once, so that
    /// the result is the one rank's product whatever the tensor size (tensor 3 answers
    /// exactly as tensor 1). Other weight forms sum f32 partial products, which agree
    /// with one rank's to rounding only. Adapters' partial products join the sums
    /// (in f64 on the f64 path) before the all-reduce.
    fn linear_all_reduce(
        &self,
        x: &Rows,
        w: &Weight,
        comm: &dyn Collective,
        lora: &[LoraPair<'_, Self>],
    ) -> Result<Rows, ModelError> {
        let n = Self::dims(w)[0];
        let pairs = lora::host_pairs(lora);
        if let Some(mut wide) = w.matmul_t_wide(x.as_slice(), x.m())? {
            lora::add_to_wide(&mut wide, n, x, &pairs);
            comm.all_reduce(HostSliceMut::F64(&mut wide))?;
            return Ok(Rows::new(wide.into_iter().map(|v| v as f32).collect(), n));
        }
        let mut partial = Rows::new(w.matmul_t(x.as_slice(), x.m())?, n);
        lora::add_to_rows(&mut partial, x, &pairs);
        let mut partial = partial.into_vec();
        comm.all_reduce_sum(&mut partial)?;
        Ok(Rows::new(partial, n))
    }

    fn rms_norm(
        &self,
        x: &Rows,
        weight: &Vec<f32>,
        eps: f32,
        _: &Weight,
    ) -> Result<Rows, ModelError> {
        Ok(rms_norm(x, weight, eps))
    }

    fn swiglu(&self, gate_up: &Rows, _: &Weight) -> Result<Rows, ModelError> {
        Ok(swiglu(gate_up))
    }

    fn add(&self, x: &mut Rows, y: &Rows) -> Result<(), ModelError> {
        x.add_assign(y);
        Ok(())
    }

    fn attention(
        &self,
        mut qkv: Rows,
        shape: AttentionShape,
        layer: usize,
        step: &HostStep<'_>,
        kv: &mut KvCache,
        _: &Weight,
    ) -> Result<Rows, ModelError> {
        let (d, qw, kw) = (shape.head_dim, shape.q_width(), shape.kv_width());
        let spans = step.layout.spans;
        // Queries are rotated and rounded in place, keys and values go straight
        // into the cache.
        let mut row = 0;
        for span in spans {
            for t in 0..span.tokens.len() {
                let (q, kv_part) = qkv.row_mut(row).split_at_mut(qw);
                let (k, v) = kv_part.split_at_mut(kw);
                step.rope.rotate(q, d, &step.angles, row);
                step.rope.rotate(k, d, &step.angles, row);
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
        let heads = Heads {
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: d,
        };
        let queries = Queries {
            data: qkv.as_slice(),
            stride: qkv.width(),
        };
        let mut out = vec![0f32; qkv.m() * qw];
        attend(queries, &views, &seen, heads, &mut out);
        Ok(Rows::new(out, qw))
    }

    fn rows(&self, x: &Rows, start: usize, len: usize) -> Result<Rows, ModelError> {
        Ok(x.gather(&(start..start + len).collect::<Vec<_>>()))
    }

    fn wanted_rows(&self, x: &Rows, step: &HostStep<'_>) -> Result<Rows, ModelError> {
        Ok(x.gather(&step.layout.wanted))
    }

    fn download(
        &self,
        x: &Rows,
        whole: usize,
        scored: &[(u32, usize)],
        picks: &[Pick],
    ) -> Result<Downloaded, ModelError> {
        let width = x.width();
        let (whole_rows, rest) = x.as_slice().split_at(whole * width);
        let (scored_rows, picked_rows) = rest.split_at(scored.len() * width);
        // A row's scores or draw read the whole vocabulary (an exponential each for
        // a draw): the rows are spread over the compute threads.
        Ok(Downloaded {
            rows: whole_rows
                .chunks_exact(width)
                .map(<[f32]>::to_vec)
                .collect(),
            scores: scored_rows
                .par_chunks_exact(width)
                .zip(scored)
                .map(|(row, &(id, k))| logprobs_of(row, id, k))
                .collect(),
            picked: picked_rows
                .par_chunks_exact(width)
                .zip(picks)
                .map(|(row, pick)| pick.on_host(row))
                .collect(),
        })
    }
}
