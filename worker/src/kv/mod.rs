//! The key/value cache, paged: storage cut into fixed-size blocks of
//! positions, and per sequence a block table naming the blocks that hold its
//! positions in order. The storage ([`KvCache`]) is passive: the leader's
//! block manager ([`BlockManager`]) decides which blocks a sequence gets, and
//! every rank of a group writes where the step plan says.
//!
//! Within a block, entries are head-major (`[kv_head][position][head_dim]`),
//! so one KV head's part of a block is one contiguous run that attention
//! reads in order. Entries are kept at half precision (f16), as in
//! llama.cpp's default cache: the model rounds keys and values to f16 before
//! writing them, so storing f16 loses nothing and halves the memory and the
//! bytes attention reads.

mod blocks;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

pub use blocks::{BlockHash, BlockId, BlockManager};

/// The memory a KV cache asked for could not be reserved.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reserve {bytes} bytes for the KV cache ({blocks} blocks of {block_size} positions): \
     lower --kv-cache-memory, or --max-seq-len if the model's context length sized it"
)]
pub struct KvCacheTooLarge {
    pub bytes: u128,
    pub blocks: usize,
    pub block_size: usize,
}

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
    /// Entries per position per layer, for keys or for values.
    pub fn row(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of one block of `block_size` positions, keys and values of every layer.
    pub fn block_bytes(&self, block_size: usize) -> usize {
        // Saturating: a block size or context nobody could allocate must be refused
        // by the allocation, not overflow here.
        [
            self.layers,
            block_size,
            self.row(),
            std::mem::size_of::<f16>(),
        ]
        .iter()
        .fold(2usize, |n, &f| n.saturating_mul(f))
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

/// One layer's entries.
#[derive(Debug)]
struct LayerStore {
    keys: HalfBuffer,
    values: HalfBuffer,
}

/// Zeroed f16 storage starting on a 128-byte boundary, so that each head's
/// run in a block starts on a cache-line pair (the unit the hardware
/// prefetches) when a run is a multiple of 128 bytes.
#[derive(Debug)]
struct HalfBuffer {
    /// f16 bit patterns: a zeroed `u16` buffer is reserved without touching
    /// its pages.
    bits: Vec<u16>,
    start: usize,
    len: usize,
}

impl HalfBuffer {
    const ALIGN: usize = 128;

    /// `None` when the memory cannot be had: `vec![0; n]` would abort the process.
    fn zeroed(len: usize) -> Option<Self> {
        let total = len.checked_add(Self::ALIGN / 2)?;
        let layout = std::alloc::Layout::array::<u16>(total).ok()?;
        // SAFETY: `total` is at least ALIGN / 2, so the layout is not zero-sized; a
        // non-null block from the global allocator with this layout, all zero (valid
        // u16s), is what `Vec::from_raw_parts` takes, with capacity `total`.
        let bits = unsafe {
            let ptr = std::alloc::alloc_zeroed(layout).cast::<u16>();
            if ptr.is_null() {
                return None;
            }
            Vec::from_raw_parts(ptr, total, total)
        };
        let misalign = bits.as_ptr() as usize % Self::ALIGN;
        let start = (Self::ALIGN - misalign) % Self::ALIGN / 2;
        Some(Self { bits, start, len })
    }

    fn get(&self) -> &[f16] {
        self.bits[self.start..self.start + self.len].reinterpret_cast()
    }

    fn get_mut(&mut self) -> &mut [f16] {
        self.bits[self.start..self.start + self.len].reinterpret_cast_mut()
    }
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
    /// Refused, rather than aborting the process, when it cannot be reserved.
    pub fn new(
        shape: KvShape,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Self, KvCacheTooLarge> {
        let too_large = || KvCacheTooLarge {
            bytes: (shape.block_bytes(block_size) as u128) * num_blocks as u128,
            blocks: num_blocks,
            block_size,
        };
        let entries = num_blocks
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(shape.row()))
            .ok_or_else(too_large)?;
        let layers = (0..shape.layers)
            .map(|_| {
                Some(LayerStore {
                    keys: HalfBuffer::zeroed(entries)?,
                    values: HalfBuffer::zeroed(entries)?,
                })
            })
            .collect::<Option<_>>()
            .ok_or_else(too_large)?;
        Ok(Self {
            shape,
            block_size,
            num_blocks,
            layers,
        })
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
    /// `start..` of `layer` into the blocks `table` names, each rounded to
    /// the nearest f16.
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
        let d = self.shape.head_dim;
        let store = &mut self.layers[layer];
        let (k_store, v_store) = (store.keys.get_mut(), store.values.get_mut());
        for t in 0..tokens {
            let pos = start + t;
            let block = table[pos / bs] as usize;
            for h in 0..self.shape.kv_heads {
                let at = ((block * self.shape.kv_heads + h) * bs + pos % bs) * d;
                let from = t * row + h * d..t * row + (h + 1) * d;
                k_store[at..at + d].convert_from_f32_slice(&keys[from.clone()]);
                v_store[at..at + d].convert_from_f32_slice(&values[from]);
            }
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
        let (keys, values) = (store.keys.get(), store.values.get());
        Ok(KvView {
            keys: used.iter().map(|&b| &keys[range(b)]).collect(),
            values: used.iter().map(|&b| &values[range(b)]).collect(),
            block_size: self.block_size,
            len,
        })
    }
}

/// One sequence's keys and values for one layer: `len` positions spread over
/// blocks of `block_size` positions (the last one possibly part-filled),
/// each block `[kv_head][block_size][head_dim]`.
#[derive(Debug)]
pub struct KvView<'a> {
    pub keys: Vec<&'a [f16]>,
    pub values: Vec<&'a [f16]>,
    pub block_size: usize,
    pub len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        layers: 2,
        kv_heads: 2,
        head_dim: 3,
    };

    /// Keys of every position, `[position][kv_head][head_dim]`.
    fn gather(view: &KvView<'_>, shape: KvShape) -> Vec<f32> {
        let (bs, d) = (view.block_size, shape.head_dim);
        let mut out = Vec::new();
        for pos in 0..view.len {
            let block = view.keys[pos / bs];
            for h in 0..shape.kv_heads {
                let at = (h * bs + pos % bs) * d;
                out.extend(block[at..at + d].iter().map(|x| x.to_f32()));
            }
        }
        out
    }

    #[test]
    fn entries_written_through_a_table_read_back_in_order() {
        let mut kv = KvCache::new(SHAPE, 8, 4).unwrap();
        // Blocks out of order, as a real table is.
        let table = [5, 2, 7];
        let entry = |pos: usize| (0..6).map(|i| (10 * pos + i) as f32).collect::<Vec<_>>();
        for step in 0..10usize {
            kv.write(1, &table, step, &entry(step), &entry(step))
                .unwrap();
        }
        let view = kv.view(1, &table, 10).unwrap();
        assert_eq!(view.keys.len(), 3);
        let keys = gather(&view, SHAPE);
        assert_eq!(keys.len(), 60);
        for (pos, chunk) in keys.chunks(6).enumerate() {
            assert_eq!(chunk, entry(pos));
        }
        assert_eq!(kv.bytes(), 8 * SHAPE.block_bytes(4));
    }

    #[test]
    fn entries_are_kept_at_half_precision() {
        let mut kv = KvCache::new(SHAPE, 2, 4).unwrap();
        let k = [0.1f32, 1.0 / 3.0, 65504.0, -2.5e-8, 1.0, 1e-3];
        kv.write(0, &[1], 0, &k, &k).unwrap();
        let view = kv.view(0, &[1], 1).unwrap();
        let want: Vec<f32> = k.iter().map(|x| f16::from_f32(*x).to_f32()).collect();
        assert_eq!(gather(&view, SHAPE), want);
        assert_eq!(SHAPE.block_bytes(4), 2 * 2 * 4 * 6 * 2);
    }

    #[test]
    fn short_tables_bad_blocks_and_ragged_rows_are_refused() {
        let mut kv = KvCache::new(SHAPE, 4, 2).unwrap();
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
