//! One rank's part of an adapter, cut like its base layers: for a
//! column-parallel layer (Q, K, V, gate, up) `A` whole and the rows of `B` for
//! the rank's outputs; for a row-parallel one (O, down) the columns of `A` for
//! the rank's inputs and `B` whole, its partial product added before the
//! all-reduce.

use std::ops::Range;

use super::{Adapter, Pair, Target};
use crate::model::{HeadRows, ModelConfig};
use crate::weights::Split;

/// `A: [rank, inputs]` and `B: [outputs, rank]` of one rank, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPair {
    pub rank: usize,
    pub inputs: usize,
    pub outputs: usize,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// The adapted layers of one block, by where they act; stacked layers (Q|K|V,
/// gate|up) name the column of the stacked output where each part starts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerShard {
    pub qkv: Vec<(usize, ShardPair)>,
    pub o: Option<ShardPair>,
    pub gate_up: Vec<(usize, ShardPair)>,
    pub down: Option<ShardPair>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdapterShard {
    pub scale: f32,
    pub layers: Vec<LayerShard>,
}

impl Adapter {
    /// Rank `rank` of `world`'s shard (the split was checked when the base loaded).
    pub fn shard(&self, cfg: &ModelConfig, rank: usize, world: usize) -> AdapterShard {
        let heads = HeadRows::of(cfg, rank, world);
        let even = |len: usize| Split::even(len, rank, world).unwrap_or(0..len);
        let ffn = even(cfg.intermediate_size);
        let q_width = heads.q_rows.len();
        let kv_width = heads.kv_rows.len();
        let layers = self
            .layers
            .iter()
            .map(|targets| {
                let column = |t: Target, rows: &Range<usize>| {
                    targets.get(&t).map(|p| column_part(p, self.rank, rows))
                };
                let row = |t: Target, cols: Range<usize>| {
                    targets.get(&t).map(|p| row_part(p, self.rank, cols))
                };
                let mut shard = LayerShard::default();
                for (t, rows, offset) in [
                    (Target::Q, &heads.q_rows, 0),
                    (Target::K, &heads.kv_rows, q_width),
                    (Target::V, &heads.kv_rows, q_width + kv_width),
                ] {
                    if let Some(p) = column(t, rows) {
                        shard.qkv.push((offset, p));
                    }
                }
                for (t, offset) in [(Target::Gate, 0), (Target::Up, ffn.len())] {
                    if let Some(p) = column(t, &ffn) {
                        shard.gate_up.push((offset, p));
                    }
                }
                shard.o = row(Target::O, even(cfg.num_heads * cfg.head_dim));
                shard.down = row(Target::Down, ffn.clone());
                shard
            })
            .collect();
        AdapterShard {
            scale: self.scale,
            layers,
        }
    }
}

/// `A` whole, the rows `rows` of `B`.
fn column_part(p: &Pair, rank: usize, rows: &Range<usize>) -> ShardPair {
    ShardPair {
        rank,
        inputs: p.a.len() / rank,
        outputs: rows.len(),
        a: p.a.clone(),
        b: p.b[rows.start * rank..rows.end * rank].to_vec(),
    }
}

/// The columns `cols` of `A`, `B` whole.
fn row_part(p: &Pair, rank: usize, cols: Range<usize>) -> ShardPair {
    let inputs = p.a.len() / rank;
    ShardPair {
        rank,
        inputs: cols.len(),
        outputs: p.b.len() / rank,
        a: p.a
            .chunks_exact(inputs)
            .flat_map(|row| row[cols.clone()].iter().copied())
            .collect(),
        b: p.b.clone(),
    }
}
