//! The key/value cache: per sequence and layer, the keys and values of every
//! position computed so far. The model writes a span's new entries and reads
//! the whole prefix back for attention.
//!
//! Each sequence owns a slot of contiguous buffers that grow by doubling.
//! The paged cache of the batching issue replaces the slot with a block table
//! behind the same `append`/`view` calls, so the model does not change.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

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

#[derive(Debug)]
struct LayerBuffers {
    /// `[kv_heads, capacity, head_dim]` each.
    k: Tensor,
    v: Tensor,
    capacity: usize,
}

#[derive(Debug)]
pub struct KvCache {
    shape: KvShape,
    device: Device,
    dtype: DType,
    slots: HashMap<SlotId, Vec<Option<LayerBuffers>>>,
    next: u64,
}

/// Smallest buffer a slot starts with, in positions.
const MIN_CAPACITY: usize = 64;

impl KvCache {
    pub fn new(shape: KvShape, device: Device) -> Self {
        Self {
            shape,
            device,
            dtype: DType::F32,
            slots: HashMap::new(),
            next: 0,
        }
    }

    pub fn allocate(&mut self) -> SlotId {
        let id = SlotId(self.next);
        self.next += 1;
        self.slots
            .insert(id, (0..self.shape.layers).map(|_| None).collect());
        id
    }

    /// Frees the slot's memory at once.
    pub fn free(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    pub fn live_slots(&self) -> usize {
        self.slots.len()
    }

    /// Bytes held by all slots.
    pub fn bytes(&self) -> usize {
        let per_pos = self.shape.kv_heads * self.shape.head_dim * self.dtype.size_in_bytes() * 2;
        self.slots
            .values()
            .flatten()
            .flatten()
            .map(|b| b.capacity * per_pos)
            .sum()
    }

    /// Writes `k`, `v` of shape `[kv_heads, tokens, head_dim]` at positions
    /// `start..start + tokens` of `layer`.
    pub fn append(
        &mut self,
        slot: SlotId,
        layer: usize,
        start: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        let (_, t, _) = k.dims3()?;
        let (shape, device, dtype) = (self.shape, self.device.clone(), self.dtype);
        let Some(layers) = self.slots.get_mut(&slot) else {
            candle_core::bail!("kv cache: slot {slot:?} is not allocated");
        };
        let need = start + t;
        let entry = &mut layers[layer];
        let grow = match entry {
            Some(b) => b.capacity < need,
            None => true,
        };
        if grow {
            let capacity = need.next_power_of_two().max(MIN_CAPACITY);
            let dims = (shape.kv_heads, capacity, shape.head_dim);
            let nk = Tensor::zeros(dims, dtype, &device)?;
            let nv = Tensor::zeros(dims, dtype, &device)?;
            if let Some(old) = entry.take() {
                nk.slice_set(&old.k, 1, 0)?;
                nv.slice_set(&old.v, 1, 0)?;
            }
            *entry = Some(LayerBuffers {
                k: nk,
                v: nv,
                capacity,
            });
        }
        let Some(b) = entry.as_ref() else {
            candle_core::bail!("kv cache: layer {layer} buffers missing");
        };
        b.k.slice_set(&k.to_dtype(dtype)?.contiguous()?, 1, start)?;
        b.v.slice_set(&v.to_dtype(dtype)?.contiguous()?, 1, start)?;
        Ok(())
    }

    /// Keys and values of positions `0..len`, each `[kv_heads, len, head_dim]`.
    pub fn view(&self, slot: SlotId, layer: usize, len: usize) -> Result<(Tensor, Tensor)> {
        let Some(Some(b)) = self.slots.get(&slot).map(|l| &l[layer]) else {
            candle_core::bail!("kv cache: slot {slot:?} layer {layer} is empty");
        };
        Ok((b.k.narrow(1, 0, len)?, b.v.narrow(1, 0, len)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_entries_read_back_across_growth() {
        let shape = KvShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 3,
        };
        let mut kv = KvCache::new(shape, Device::Cpu);
        let slot = kv.allocate();
        let mut all = Vec::new();
        for step in 0..100usize {
            let k = Tensor::full(step as f32, (2, 1, 3), &Device::Cpu).unwrap();
            kv.append(slot, 0, step, &k, &k).unwrap();
            all.push(step as f32);
        }
        let (k, _) = kv.view(slot, 0, 100).unwrap();
        let got = k.contiguous().unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(got[1].iter().map(|r| r[0]).collect::<Vec<_>>(), all);
        assert!(kv.bytes() > 0);
        kv.free(slot);
        assert_eq!(kv.bytes(), 0);
        assert_eq!(kv.live_slots(), 0);
    }
}
