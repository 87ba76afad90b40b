//! LoRA adapters in the engine: loaded and unloaded at run time on every rank of
//! the group, made resident on demand within `--max-loras` slots, and held by the
//! requests that use them.
//!
//! The leader checks an adapter against the base before anything is sent; each
//! follower then reads the same path and loads its shard, and the group agrees
//! (an all-reduce of one flag) that every rank has it, or every rank drops it.

mod registry;

use std::path::{Path, PathBuf};

pub use registry::AdapterInfo;
pub(crate) use registry::{Placement, Registry};

use super::group::{self, GroupMessage};
use super::{Engine, EngineError};
use crate::comm::Collective;
use crate::lora::Adapter;
use crate::model::{ModelError, StepModel};
use crate::scheduler::SeqId;

/// Most adapters resident on a worker unless configured otherwise.
pub const DEFAULT_MAX_LORAS: usize = 8;
/// Highest adapter rank accepted unless configured otherwise.
pub const DEFAULT_MAX_LORA_RANK: usize = 64;

/// A request waiting for its adapter to get a slot.
pub(super) struct WaitingForAdapter {
    pub seq: SeqId,
    pub prompt: Vec<u32>,
    pub priority: i32,
    pub prefix_cache: bool,
}

impl Engine {
    /// Serves adapter `name` from `path` (a PEFT directory or a GGUF LoRA file),
    /// checked against the base model now, and loads it on every rank if a slot
    /// is free or idle. A name in use by requests must be unloaded first.
    pub fn load_adapter(&mut self, name: &str, path: &Path) -> Result<AdapterInfo, EngineError> {
        self.load_adapter_from(name, &path.display().to_string(), path)
    }

    /// [`Engine::load_adapter`] for an adapter fetched from `source` (a hub or
    /// package source, listed as given) to `path`.
    pub fn load_adapter_from(
        &mut self,
        name: &str,
        source: &str,
        path: &Path,
    ) -> Result<AdapterInfo, EngineError> {
        if name.is_empty() || name == self.info.served_model_name {
            return Err(EngineError::InvalidRequest(format!(
                "an adapter cannot be named '{name}' (the base model's name, or empty)"
            )));
        }
        if self.adapters.busy(name) {
            return Err(EngineError::AdapterBusy(name.to_string()));
        }
        let adapter = Adapter::open(path, &self.info.config, self.max_lora_rank)?;
        if let Some(old) = self
            .adapters
            .insert(name, source, path.to_path_buf(), adapter.rank)
        {
            self.unload_slot(old)?;
        }
        if let Placement::Load { slot, evict } = self.adapters.place(name)
            && let Err(e) = self.load_slot(name, slot, evict, Some(adapter))
        {
            let _ = self.adapters.remove(name);
            self.publish_adapters();
            return Err(e);
        }
        self.publish_adapters();
        tracing::info!(adapter = name, path = %path.display(), "LoRA adapter loaded");
        self.adapter_info(name)
            .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))
    }

    /// Stops serving `name`: new requests for it are refused at once; it leaves
    /// the ranks when the requests already using it end.
    pub fn unload_adapter(&mut self, name: &str) -> Result<(), EngineError> {
        let slot = self
            .adapters
            .remove(name)
            .map_err(|()| EngineError::UnknownAdapter(name.to_string()))?;
        if let Some(slot) = slot {
            self.unload_slot(slot)?;
        }
        self.publish_adapters();
        tracing::info!(adapter = name, "LoRA adapter unloaded");
        Ok(())
    }

    /// The adapters served, as listed to clients.
    pub fn adapters(&self) -> Vec<AdapterInfo> {
        self.adapters.list()
    }

    fn adapter_info(&self, name: &str) -> Option<AdapterInfo> {
        self.adapters.list().into_iter().find(|a| a.name == name)
    }

    pub(super) fn publish_adapters(&self) {
        let mut listed = self.adapters.list();
        for w in &self.waiting_for_adapter {
            let name = self
                .active
                .get(&w.seq)
                .and_then(|a| a.request.adapter.as_ref());
            if let Some(a) = listed.iter_mut().find(|a| Some(&a.name) == name) {
                a.waiting += 1;
            }
        }
        if let Ok(mut list) = self.adapter_list.write() {
            *list = listed;
        }
    }

    /// Makes `name` resident if it can be now: `Ok(false)` when every slot is
    /// held by adapters in use.
    pub(super) fn place_adapter(&mut self, name: &str) -> Result<bool, EngineError> {
        match self.adapters.place(name) {
            Placement::Resident(_) => Ok(true),
            Placement::Load { slot, evict } => {
                self.load_slot(name, slot, evict, None)?;
                Ok(true)
            }
            Placement::Wait => Ok(false),
        }
    }

    /// Loads `name` into `slot` on every rank (replacing `evict`, which nobody uses).
    fn load_slot(
        &mut self,
        name: &str,
        slot: u32,
        evict: Option<String>,
        adapter: Option<Adapter>,
    ) -> Result<(), EngineError> {
        let path: PathBuf = self
            .adapters
            .path(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownAdapter(name.to_string()))?;
        let adapter = match adapter {
            Some(a) => a,
            None => Adapter::open(&path, &self.info.config, self.max_lora_rank)?,
        };
        if self.group.world_size() > 1 {
            let message = GroupMessage::LoadAdapter {
                slot,
                path: path.clone(),
            };
            group::announce(self.group.as_ref(), &message).map_err(ModelError::from)?;
        }
        let mine = self.model.load_adapter(slot, &adapter);
        let everywhere = agree(self.model.as_mut(), self.group.as_ref(), slot, mine.is_ok())?;
        // The slot's old adapter is gone whatever happened.
        self.adapters.loaded(name, slot, evict.as_deref());
        if !everywhere {
            self.adapters.unplace(name);
            return Err(match mine {
                Err(e) => e.into(),
                Ok(()) => EngineError::InvalidRequest(format!(
                    "adapter '{name}': a rank of the group could not load {}",
                    path.display()
                )),
            });
        }
        Ok(())
    }

    fn unload_slot(&mut self, slot: u32) -> Result<(), EngineError> {
        if self.group.world_size() > 1 {
            group::announce(self.group.as_ref(), &GroupMessage::UnloadAdapter { slot })
                .map_err(ModelError::from)?;
        }
        self.model.unload_adapter(slot);
        Ok(())
    }

    /// `seq` ended: its hold on its adapter goes, and an adapter being unloaded
    /// leaves the ranks with its last request.
    pub(super) fn release_adapter(&mut self, seq: SeqId) {
        let had = self.adapters.of_seq(seq).is_some() || self.adapters.holds(seq);
        if let Some(slot) = self.adapters.release(seq)
            && let Err(e) = self.unload_slot(slot)
        {
            tracing::warn!(error = %e, slot, "unloading an adapter failed");
        }
        if had {
            self.publish_adapters();
        }
    }
}

/// Every rank, after trying to load an adapter into `slot`: whether all did. If
/// one did not, every rank drops the slot, so the group stays alike.
pub(super) fn agree(
    model: &mut dyn StepModel,
    group: &dyn Collective,
    slot: u32,
    loaded: bool,
) -> Result<bool, ModelError> {
    if group.world_size() <= 1 {
        return Ok(loaded);
    }
    let mut flag = [f32::from(u8::from(loaded))];
    group.all_reduce_sum(&mut flag)?;
    let everywhere = flag[0] as usize == group.world_size();
    if !everywhere {
        model.unload_adapter(slot);
    }
    Ok(everywhere)
}

/// A follower's side of [`GroupMessage::LoadAdapter`].
pub(super) fn follow_load(
    model: &mut dyn StepModel,
    group: &dyn Collective,
    slot: u32,
    path: &Path,
) -> Result<(), ModelError> {
    // The leader checked the rank against its limit.
    let loaded = Adapter::open(path, model.config(), usize::MAX)
        .map_err(|e| e.to_string())
        .and_then(|a| model.load_adapter(slot, &a).map_err(|e| e.to_string()));
    if let Err(e) = &loaded {
        tracing::error!(error = %e, slot, "this rank could not load the adapter");
    }
    agree(model, group, slot, loaded.is_ok()).map(|_| ())
}

#[cfg(test)]
mod tests;
