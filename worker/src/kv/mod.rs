//! The key/value cache, paged: storage cut into fixed-size blocks of
//! positions, and per sequence a block table naming the blocks that hold its
//! positions in order. The storage ([`KvCache`]) is passive: the leader's
//! block manager ([`BlockManager`]) decides which blocks a sequence gets, and
//! every rank of a group writes where the step plan says.
//!
//! Within a block, entries are position-major (`[position][kv_head][head_dim]`),
//! so a block is one contiguous run that attention reads in order.

mod blocks;

pub use blocks::{BlockHash, BlockId, BlockManager};

/// Positions per block unless configured otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The per-layer shape of the entries this rank keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    /// Floats per position per layer, for keys or for values.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of one block of `block_size` positions, keys and values of every layer.
    pub fn block_bytes(&self, block_size: usize) -> usize {
        2 * self.layers * block_size * self.row() * std::mem::size_of::<f32>()
    }
}

/// Why a cache operation was refused (a bug in the caller, never user input).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kv cache: block {block} is outside the cache of {blocks} blocks")]
    NoSuchBlock { block: BlockId, blocks: usize },
    #[error("kv cache: a block table of {table} blocks cannot hold {positions} positions")]
    ShortTable { table: usize, positions: usize },
    #[error("kv cache: layer {layer} is outside the model's {layers} layers")]
    NoSuchLayer { layer: usize, layers: usize },
    #[error("kv cache: {got} floats do not make whole positions of {row}")]
    Ragged { got: usize, row: usize },
}

#[derive(Debug)]
struct LayerStore {
    keys: Vec<f32>,
    values: Vec<f32>,
}

#[derive(Debug)]
pub struct KvCache {
    shape: KvShape,
    block_size: usize,
    num_blocks: usize,
    layers: Vec<LayerStore>,
}

impl KvCache {
    /// Storage for `num_blocks` blocks of `block_size` positions. The memory
    /// is reserved zeroed, so the system commits pages only as they are used.
    pub fn new(shape: KvShape, num_blocks: usize, block_size: usize) -> Self {
        let floats = num_blocks * block_size * shape.row();
        let layers = (0..shape.layers)
            .map(|_| LayerStore {
                keys: vec![0.0; floats],
                values: vec![0.0; floats],
            })
            .collect();
        Self {
            shape,
            block_size,
            num_blocks,
            layers,
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Bytes reserved for the whole cache.
    pub fn bytes(&self) -> usize {
        self.num_blocks * self.shape.block_bytes(self.block_size)
    }

    fn check(&self, layer: usize, table: &[BlockId], positions: usize) -> Result<(), KvError> {
        if layer >= self.layers.len() {
            return Err(KvError::NoSuchLayer {
                layer,
                layers: self.layers.len(),
            });
        }
        if table.len() * self.block_size < positions {
            return Err(KvError::ShortTable {
                table: table.len(),
                positions,
            });
        }
        let used = positions.div_ceil(self.block_size);
        if let Some(&block) = table[..used]
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            return Err(KvError::NoSuchBlock {
                block,
                blocks: self.num_blocks,
            });
        }
        Ok(())
    }

    /// Writes keys and values (`[tokens][kv_head][head_dim]`) of positions
    /// `start..` of `layer` into the blocks `table` names.
    pub fn write(
        &mut self,
        layer: usize,
        table: &[BlockId],
        start: usize,
        keys: &[f32],
        values: &[f32],
    ) -> Result<(), KvError> {
        let row = self.shape.row();
        if !keys.len().is_multiple_of(row) || keys.len() != values.len() {
            return Err(KvError::Ragged {
                got: keys.len(),
                row,
            });
        }
        let tokens = keys.len() / row;
        self.check(layer, table, start + tokens)?;
        let bs = self.block_size;
        let store = &mut self.layers[layer];
        for t in 0..tokens {
            let pos = start + t;
            let at = (table[pos / bs] as usize * bs + pos % bs) * row;
            store.keys[at..at + row].copy_from_slice(&keys[t * row..(t + 1) * row]);
            store.values[at..at + row].copy_from_slice(&values[t * row..(t + 1) * row]);
        }
        Ok(())
    }

    /// Keys and values of positions `0..len` of `layer`, block by block.
    pub fn view(&self, layer: usize, table: &[BlockId], len: usize) -> Result<KvView<'_>, KvError> {
        self.check(layer, table, len)?;
        let store = &self.layers[layer];
        let block = self.block_size * self.shape.row();
        let used = &table[..len.div_ceil(self.block_size)];
        let range = |b: BlockId| b as usize * block..(b as usize + 1) * block;
        Ok(KvView {
            keys: used.iter().map(|&b| &store.keys[range(b)]).collect(),
            values: used.iter().map(|&b| &store.values[range(b)]).collect(),
            block_size: self.block_size,
            len,
        })
    }
}

/// One sequence's keys and values for one layer: `len` positions spread over
/// blocks of `block_size` positions (the last one possibly part-filled).
#[derive(Debug)]
pub struct KvView<'a> {
    pub keys: Vec<&'a [f32]>,
    pub values: Vec<&'a [f32]>,
    pub block_size: usize,
    pub len: usize,
}

impl<'a> KvView<'a> {
    /// A view of contiguous `[position][kv_head][head_dim]` entries (one block).
    pub fn contiguous(keys: &'a [f32], values: &'a [f32], len: usize) -> Self {
        Self {
            keys: vec![keys],
            values: vec![values],
            block_size: len.max(1),
            len,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 3,
    };

    fn gather(view: &KvView<'_>, row: usize) -> Vec<f32> {
        let mut out = Vec::new();
        for (i, block) in view.keys.iter().enumerate() {
            let n = view.block_size.min(view.len - i * view.block_size);
            out.extend_from_slice(&block[..n * row]);
        }
        out
    }

    #[test]
    fn entries_written_through_a_table_read_back_in_order() {
        let mut kv = KvCache::new(SHAPE, 8, 4);
        // Blocks out of order, as a real table is.
        let table = [5, 2, 7];
        for step in 0..10usize {
            let k = vec![step as f32; 6];
            kv.write(1, &table, step, &k, &k).unwrap();
        }
        let view = kv.view(1, &table, 10).unwrap();
        assert_eq!(view.keys.len(), 3);
        let keys = gather(&view, 6);
        assert_eq!(keys.len(), 60);
        for (pos, chunk) in keys.chunks(6).enumerate() {
            assert_eq!(chunk, &[pos as f32; 6]);
        }
        assert_eq!(kv.bytes(), 8 * SHAPE.block_bytes(4));
    }

    #[test]
    fn short_tables_bad_blocks_and_ragged_rows_are_refused() {
        let mut kv = KvCache::new(SHAPE, 4, 2);
        assert!(matches!(
            kv.write(0, &[0], 1, &[0.0; 12], &[0.0; 12]),
            Err(KvError::ShortTable { .. })
        ));
        assert!(matches!(
            kv.write(0, &[9], 0, &[0.0; 6], &[0.0; 6]),
            Err(KvError::NoSuchBlock { .. })
        ));
        assert!(matches!(
            kv.write(0, &[0], 0, &[0.0; 5], &[0.0; 5]),
            Err(KvError::Ragged { .. })
        ));
        assert!(matches!(
            kv.view(2, &[0], 1),
            Err(KvError::NoSuchLayer { .. })
        ));
    }
}
