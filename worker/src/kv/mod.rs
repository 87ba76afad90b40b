//! The key/value cache: per sequence and layer, the keys and values of every
//! position computed so far. The model writes a span's new entries and reads
//! the whole prefix back for attention.
//!
//! Each sequence owns a slot of buffers laid out position-major
//! (`[position][kv_head][head_dim]`), so appending is a copy onto the end
//! and a growing sequence never moves what it has. The paged cache of the
//! batching issue replaces the slot with a block table behind the same calls.

use std::collections::HashMap;

/// A sequence's place in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotId(pub u64);

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
}

#[derive(Debug, Default)]
struct LayerEntries {
    keys: Vec<f32>,
    values: Vec<f32>,
}

#[derive(Debug)]
pub struct KvCache {
    shape: KvShape,
    slots: HashMap<SlotId, Vec<LayerEntries>>,
    next: u64,
}

/// Why a cache operation was refused (a bug in the caller, never user input).
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("kv cache: slot {0:?} is not allocated")]
    UnknownSlot(SlotId),
    #[error(
        "kv cache: layer {layer} of slot {slot:?} holds {held} positions; writing at {start} would leave a gap"
    )]
    Gap {
        slot: SlotId,
        layer: usize,
        held: usize,
        start: usize,
    },
    #[error("kv cache: {got} floats do not make whole positions of {row}")]
    Ragged { got: usize, row: usize },
}

impl KvCache {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            slots: HashMap::new(),
            next: 0,
        }
    }

    pub fn shape(&self) -> KvShape {
        self.shape
    }

    pub fn allocate(&mut self) -> SlotId {
        let id = SlotId(self.next);
        self.next += 1;
        let layers = (0..self.shape.layers)
            .map(|_| LayerEntries::default())
            .collect();
        self.slots.insert(id, layers);
        id
    }

    /// Makes sure `slot` exists (a follower mirrors the leader's slots).
    pub fn ensure(&mut self, slot: SlotId) {
        let layers = self.shape.layers;
        self.slots
            .entry(slot)
            .or_insert_with(|| (0..layers).map(|_| LayerEntries::default()).collect());
        self.next = self.next.max(slot.0 + 1);
    }

    /// Frees the slot's memory at once.
    pub fn free(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    pub fn live_slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes reserved by all slots.
    pub fn bytes(&self) -> usize {
        let floats: usize = self
            .slots
            .values()
            .flatten()
            .map(|l| l.keys.capacity() + l.values.capacity())
            .sum();
        floats * std::mem::size_of::<f32>()
    }

    /// Writes keys and values (`[tokens][kv_head][head_dim]`) at positions
    /// `start..` of `layer`. Rewriting from an earlier position drops what
    /// followed it (a recomputed suffix).
    pub fn append(
        &mut self,
        slot: SlotId,
        layer: usize,
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
        let entries = self
            .slots
            .get_mut(&slot)
            .ok_or(KvError::UnknownSlot(slot))?
            .get_mut(layer)
            .ok_or(KvError::UnknownSlot(slot))?;
        let held = entries.keys.len() / row;
        if start > held {
            return Err(KvError::Gap {
                slot,
                layer,
                held,
                start,
            });
        }
        entries.keys.truncate(start * row);
        entries.values.truncate(start * row);
        entries.keys.extend_from_slice(keys);
        entries.values.extend_from_slice(values);
        Ok(())
    }

    /// Keys and values of positions `0..len` of `layer`.
    pub fn entries(
        &self,
        slot: SlotId,
        layer: usize,
        len: usize,
    ) -> Result<(&[f32], &[f32]), KvError> {
        let row = self.shape.row();
        let e = self
            .slots
            .get(&slot)
            .and_then(|l| l.get(layer))
            .ok_or(KvError::UnknownSlot(slot))?;
        let held = e.keys.len() / row;
        if len > held {
            return Err(KvError::Gap {
                slot,
                layer,
                held,
                start: len,
            });
        }
        Ok((&e.keys[..len * row], &e.values[..len * row]))
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

    #[test]
    fn appended_entries_read_back() {
        let mut kv = KvCache::new(SHAPE);
        let slot = kv.allocate();
        for step in 0..100usize {
            let k = vec![step as f32; 6];
            kv.append(slot, 1, step, &k, &k).unwrap();
        }
        let (k, v) = kv.entries(slot, 1, 100).unwrap();
        assert_eq!(k.len(), 600);
        assert_eq!(k[6 * 42], 42.0);
        assert_eq!(k, v);
        assert!(kv.bytes() > 0);
        kv.free(slot);
        assert_eq!(kv.bytes(), 0);
        assert_eq!(kv.live_slots(), 0);
    }

    #[test]
    fn gaps_and_unknown_slots_are_refused() {
        let mut kv = KvCache::new(SHAPE);
        let slot = kv.allocate();
        assert!(matches!(
            kv.append(slot, 0, 3, &[0.0; 6], &[0.0; 6]),
            Err(KvError::Gap { .. })
        ));
        assert!(matches!(
            kv.append(SlotId(99), 0, 0, &[0.0; 6], &[0.0; 6]),
            Err(KvError::UnknownSlot(_))
        ));
        assert!(matches!(
            kv.append(slot, 0, 0, &[0.0; 5], &[0.0; 5]),
            Err(KvError::Ragged { .. })
        ));
        assert!(kv.entries(slot, 0, 1).is_err());
    }

    #[test]
    fn rewriting_drops_the_old_suffix() {
        let mut kv = KvCache::new(SHAPE);
        let slot = kv.allocate();
        kv.append(slot, 0, 0, &[1.0; 18], &[1.0; 18]).unwrap();
        kv.append(slot, 0, 1, &[2.0; 6], &[2.0; 6]).unwrap();
        let (k, _) = kv.entries(slot, 0, 2).unwrap();
        assert_eq!(&k[6..], &[2.0; 6]);
        assert!(kv.entries(slot, 0, 3).is_err());
    }
}
