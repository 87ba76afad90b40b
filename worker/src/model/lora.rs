//! Adapters held by a rank, in its backend's form, and which of them act on
//! which rows of a step.
//!
//! On the host an adapter's product is computed in f64 from f32 inputs (each
//! product exact, the sums as the base's block-quantised row-parallel products
//! do), so that column-parallel parts give every rank one rank's numbers and
//! row-parallel partial sums, all-reduced, give tensor 1's to the rounding of
//! f64: tensor N answers with adapters as exactly as without.

use std::collections::BTreeMap;

use rayon::prelude::*;

use super::ModelError;
use super::backend::{Backend, LoraPair};
use super::rows::Rows;
use crate::lora::{AdapterShard, ShardPair};

/// Rows below this many multiply-adds are not worth spreading over threads.
const PARALLEL_WORK: usize = 1 << 16;

#[derive(Debug)]
pub struct DensePair<B: Backend> {
    a: B::Dense,
    b: B::Dense,
}

/// One block's adapted layers: `(offset in the stacked output, pair)`.
#[derive(Debug)]
pub struct LayerAdapter<B: Backend> {
    qkv: Vec<(usize, DensePair<B>)>,
    o: Vec<(usize, DensePair<B>)>,
    gate_up: Vec<(usize, DensePair<B>)>,
    down: Vec<(usize, DensePair<B>)>,
}

/// An adapter's shard on a backend.
#[derive(Debug)]
pub struct LoadedAdapter<B: Backend> {
    scale: f32,
    layers: Vec<LayerAdapter<B>>,
}

impl<B: Backend> LoadedAdapter<B> {
    pub fn new(backend: &B, shard: &AdapterShard) -> Result<Self, ModelError> {
        let pair = |p: &ShardPair| -> Result<DensePair<B>, ModelError> {
            Ok(DensePair {
                a: backend.dense(p.rank, p.inputs, p.a.clone())?,
                b: backend.dense(p.outputs, p.rank, p.b.clone())?,
            })
        };
        let parts = |ps: &[(usize, ShardPair)]| -> Result<Vec<_>, ModelError> {
            ps.iter().map(|(o, p)| Ok((*o, pair(p)?))).collect()
        };
        let single = |p: &Option<ShardPair>| -> Result<Vec<_>, ModelError> {
            p.iter().map(|p| Ok((0, pair(p)?))).collect()
        };
        let layers = shard
            .layers
            .iter()
            .map(|l| {
                Ok(LayerAdapter {
                    qkv: parts(&l.qkv)?,
                    o: single(&l.o)?,
                    gate_up: parts(&l.gate_up)?,
                    down: single(&l.down)?,
                })
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self {
            scale: shard.scale,
            layers,
        })
    }
}

/// Where in a block an adapter acts.
#[derive(Clone, Copy, Debug)]
pub enum Site {
    Qkv,
    O,
    GateUp,
    Down,
}

/// A step's adapters and the rows each acts on.
pub struct StepAdapters<'a, B: Backend> {
    groups: Vec<(&'a LoadedAdapter<B>, Vec<usize>)>,
}

impl<'a, B: Backend> StepAdapters<'a, B> {
    /// Groups the rows of a step's spans (`(adapter, rows)` per span) by adapter.
    pub fn new(
        loaded: &'a BTreeMap<u32, LoadedAdapter<B>>,
        spans: impl IntoIterator<Item = (Option<u32>, std::ops::Range<usize>)>,
    ) -> Result<Self, ModelError> {
        let mut rows: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (adapter, range) in spans {
            if let Some(slot) = adapter {
                rows.entry(slot).or_default().extend(range);
            }
        }
        let groups = rows
            .into_iter()
            .map(|(slot, rows)| {
                let adapter = loaded
                    .get(&slot)
                    .ok_or(ModelError::UnknownAdapter { slot })?;
                Ok((adapter, rows))
            })
            .collect::<Result<_, ModelError>>()?;
        Ok(Self { groups })
    }

    pub fn none() -> Self {
        Self { groups: Vec::new() }
    }

    /// No adapter acts on the step.
    pub fn is_none(&self) -> bool {
        self.groups.is_empty()
    }

    /// The pairs acting at `site` of block `layer`.
    pub fn at(&self, layer: usize, site: Site) -> Vec<LoraPair<'_, B>> {
        let mut pairs = Vec::new();
        for (adapter, rows) in &self.groups {
            let Some(l) = adapter.layers.get(layer) else {
                continue;
            };
            let parts = match site {
                Site::Qkv => &l.qkv,
                Site::O => &l.o,
                Site::GateUp => &l.gate_up,
                Site::Down => &l.down,
            };
            pairs.extend(parts.iter().map(|(offset, p)| LoraPair {
                rows,
                a: &p.a,
                b: &p.b,
                scale: adapter.scale,
                offset: *offset,
            }));
        }
        pairs
    }
}

/// An adapter matrix on the host: `rows × cols` f32, row-major.
#[derive(Debug)]
pub struct HostDense {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<f32>,
}

/// `scale · B·(A·x)` for one row `x`, in f64 (`A: [r, in]`, `B: [out, r]`).
pub fn delta_f64(a: &[f32], b: &[f32], rank: usize, x: &[f32], scale: f32) -> Vec<f64> {
    let t: Vec<f64> = a.chunks_exact(x.len()).map(|row| dot_f64(row, x)).collect();
    let scale = f64::from(scale);
    b.chunks_exact(rank)
        .map(|row| {
            row.iter()
                .zip(&t)
                .fold(0f64, |s, (&w, &v)| s + f64::from(w) * v)
                * scale
        })
        .collect()
}

/// `w·x` summed in f64 over eight independent lanes (the order is fixed by the
/// length alone, so a row's result never depends on its batch): a single
/// running sum is bound by the latency of each add, the lanes vectorise.
fn dot_f64(w: &[f32], x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let (w_body, w_tail) = w.split_at(w.len() - w.len() % LANES);
    let (x_body, x_tail) = x.split_at(w_body.len());
    for (wc, xc) in w_body.chunks_exact(LANES).zip(x_body.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += f64::from(wc[i]) * f64::from(xc[i]);
        }
    }
    let tail: f64 = w_tail
        .iter()
        .zip(x_tail)
        .map(|(&a, &b)| f64::from(a) * f64::from(b))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Each pair's `(row, delta)` for its rows of `x` (`width` floats a row), in
/// parallel over every (pair, row) of the step when there is enough work: rows
/// spread over several adapters are as many small products as rows on one.
pub fn deltas(
    pairs: &[(&[usize], &HostDense, &HostDense, f32, usize)],
    x: &[f32],
    width: usize,
) -> Vec<Vec<(usize, Vec<f64>)>> {
    let tasks: Vec<(usize, usize)> = pairs
        .iter()
        .enumerate()
        .flat_map(|(p, (rows, ..))| rows.iter().map(move |&row| (p, row)))
        .collect();
    let work: usize = pairs
        .iter()
        .map(|(rows, a, b, ..)| rows.len() * a.rows * (a.cols + b.rows))
        .sum();
    let one = |&(p, row): &(usize, usize)| {
        let (_, a, b, scale, _) = pairs[p];
        let xr = &x[row * width..(row + 1) * width];
        (p, row, delta_f64(&a.values, &b.values, a.rows, xr, scale))
    };
    let done: Vec<(usize, usize, Vec<f64>)> = if work >= PARALLEL_WORK {
        tasks.par_iter().map(one).collect()
    } else {
        tasks.iter().map(one).collect()
    };
    let mut out: Vec<Vec<(usize, Vec<f64>)>> = pairs.iter().map(|_| Vec::new()).collect();
    for (p, row, delta) in done {
        out[p].push((row, delta));
    }
    out
}

/// The host form of [`LoraPair`]s: `(rows, A, B, scale, offset)`.
pub fn host_pairs<'a>(
    pairs: &'a [LoraPair<'a, super::Host>],
) -> Vec<(&'a [usize], &'a HostDense, &'a HostDense, f32, usize)> {
    pairs
        .iter()
        .map(|p| (p.rows, p.a, p.b, p.scale, p.offset))
        .collect()
}

/// Adds every pair's delta to `y` (rounded to f32 once, after the f64 sums).
pub fn add_to_rows(
    y: &mut Rows,
    x: &Rows,
    pairs: &[(&[usize], &HostDense, &HostDense, f32, usize)],
) {
    let all = deltas(pairs, x.as_slice(), x.width());
    for (pair, rows) in pairs.iter().zip(all) {
        let offset = pair.4;
        for (row, delta) in rows {
            let out = &mut y.row_mut(row)[offset..offset + delta.len()];
            for (o, d) in out.iter_mut().zip(delta) {
                *o += d as f32;
            }
        }
    }
}

/// Adds every pair's delta to `wide` (`n` f64 a row), before its all-reduce.
pub fn add_to_wide(
    wide: &mut [f64],
    n: usize,
    x: &Rows,
    pairs: &[(&[usize], &HostDense, &HostDense, f32, usize)],
) {
    let all = deltas(pairs, x.as_slice(), x.width());
    for (pair, rows) in pairs.iter().zip(all) {
        let offset = pair.4;
        for (row, delta) in rows {
            for (o, d) in wide[row * n + offset..].iter_mut().zip(delta) {
                *o += d;
            }
        }
    }
}
