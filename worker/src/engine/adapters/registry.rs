//! Which LoRA adapters the engine knows, which are resident (loaded on every rank,
//! in one of `--max-loras` slots), and which sequences use each.
//!
//! Pure bookkeeping: the engine asks it where an adapter should go and does the
//! loading. An adapter in use is never evicted; a request for an adapter that
//! cannot be made resident (every slot held by running requests) waits. An
//! adapter removed while in use stays until its last request ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::kv::BlockHash;
use crate::scheduler::SeqId;

/// An adapter as the engine lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    pub name: String,
    /// What it was asked to be loaded from (a path or a `file://`, `hf://`,
    /// `pip://` source), as given.
    pub source: String,
    /// Where it was read from on this machine.
    pub path: PathBuf,
    pub rank: usize,
    /// Loaded on every rank now.
    pub resident: bool,
    /// Requests running or waiting with it.
    pub requests: usize,
    /// Of those, the ones waiting for it to get a slot (every slot held by
    /// adapters in use).
    pub waiting: usize,
}

#[derive(Debug)]
struct Entry {
    source: String,
    path: PathBuf,
    rank: usize,
    slot: Option<u32>,
    /// Unique per load: roots the prefix cache's hashes of its sequences, so a
    /// block computed under one adapter never serves another, nor the same name
    /// loaded again from another file.
    load: u64,
    users: usize,
    last_used: u64,
    /// Unloaded: no new requests; gone when the last one ends.
    removing: bool,
}

/// Where an adapter must go before a request can use it.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement {
    /// Resident in this slot.
    Resident(u32),
    /// Load it into this slot, unloading `evict` from it first when set.
    Load { slot: u32, evict: Option<String> },
    /// Every slot is held by adapters in use.
    Wait,
}

#[derive(Debug)]
pub struct Registry {
    slots: usize,
    entries: BTreeMap<String, Entry>,
    seqs: HashMap<SeqId, String>,
    clock: u64,
    loads: u64,
}

impl Registry {
    pub fn new(slots: usize) -> Self {
        Self {
            slots: slots.max(1),
            entries: BTreeMap::new(),
            seqs: HashMap::new(),
            clock: 0,
            loads: 0,
        }
    }

    /// Whether new requests may name `name`.
    pub fn serves(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| !e.removing)
    }

    /// The path `name` was registered from, while it is served.
    pub fn path(&self, name: &str) -> Option<&PathBuf> {
        self.entries
            .get(name)
            .filter(|e| !e.removing)
            .map(|e| &e.path)
    }

    /// Whether `name` is known at all (served, or leaving with requests on it).
    pub fn busy(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.users > 0)
    }

    /// Registers `name` (not resident yet). The caller has checked that no
    /// entry of that name is in use.
    pub fn insert(&mut self, name: &str, source: &str, path: PathBuf, rank: usize) -> Option<u32> {
        let old = self.entries.remove(name).and_then(|e| e.slot);
        self.loads += 1;
        self.entries.insert(
            name.to_string(),
            Entry {
                source: source.to_string(),
                path,
                rank,
                slot: None,
                load: self.loads,
                users: 0,
                last_used: 0,
                removing: false,
            },
        );
        old
    }

    /// Where `name` must be for a request: resident, a free slot, the least
    /// recently used slot whose adapter nobody uses, or nowhere yet.
    pub fn place(&self, name: &str) -> Placement {
        if let Some(slot) = self.entries.get(name).and_then(|e| e.slot) {
            return Placement::Resident(slot);
        }
        let taken: Vec<u32> = self.entries.values().filter_map(|e| e.slot).collect();
        if let Some(free) = (0..self.slots as u32).find(|s| !taken.contains(s)) {
            return Placement::Load {
                slot: free,
                evict: None,
            };
        }
        self.entries
            .iter()
            .filter(|(n, e)| e.slot.is_some() && e.users == 0 && n.as_str() != name)
            .min_by_key(|(_, e)| e.last_used)
            .map_or(Placement::Wait, |(n, e)| Placement::Load {
                slot: e.slot.unwrap_or_default(),
                evict: Some(n.clone()),
            })
    }

    /// `name` is now resident in `slot` (`evicted`, if any, no longer is).
    pub fn loaded(&mut self, name: &str, slot: u32, evicted: Option<&str>) {
        if let Some(e) = evicted.and_then(|n| self.entries.get_mut(n)) {
            e.slot = None;
        }
        if let Some(e) = self.entries.get_mut(name) {
            e.slot = Some(slot);
        }
    }

    /// `name` is not resident after all (its load failed on some rank).
    pub fn unplace(&mut self, name: &str) {
        if let Some(e) = self.entries.get_mut(name) {
            e.slot = None;
        }
    }

    /// Whether `seq` holds an adapter.
    pub fn holds(&self, seq: SeqId) -> bool {
        self.seqs.contains_key(&seq)
    }

    /// Sequence `seq` runs with `name` from now on.
    pub fn hold(&mut self, seq: SeqId, name: &str) {
        self.clock += 1;
        if let Some(e) = self.entries.get_mut(name) {
            e.users += 1;
            e.last_used = self.clock;
            self.seqs.insert(seq, name.to_string());
        }
    }

    /// The slot and the prefix cache's root of `seq`'s adapter.
    pub fn of_seq(&self, seq: SeqId) -> Option<(u32, BlockHash)> {
        let e = self.entries.get(self.seqs.get(&seq)?)?;
        Some((e.slot?, BlockHash::root(e.load)))
    }

    /// The prefix cache's root of sequences using `name`.
    pub fn root(&self, name: &str) -> Option<BlockHash> {
        self.entries.get(name).map(|e| BlockHash::root(e.load))
    }

    /// `seq` ended; returns the slot to unload when it was the last user of an
    /// adapter being removed.
    pub fn release(&mut self, seq: SeqId) -> Option<u32> {
        let name = self.seqs.remove(&seq)?;
        let e = self.entries.get_mut(&name)?;
        e.users = e.users.saturating_sub(1);
        if e.removing && e.users == 0 {
            return self.entries.remove(&name).and_then(|e| e.slot);
        }
        None
    }

    /// Stops serving `name`: `Some(slot)` to unload now (nobody uses it),
    /// `None` when it was not resident or will go with its last request.
    /// Returns `Err(())` for an unknown name.
    pub fn remove(&mut self, name: &str) -> Result<Option<u32>, ()> {
        let e = self
            .entries
            .get_mut(name)
            .filter(|e| !e.removing)
            .ok_or(())?;
        if e.users > 0 {
            e.removing = true;
            return Ok(None);
        }
        Ok(self.entries.remove(name).and_then(|e| e.slot))
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.removing)
            .map(|(name, e)| AdapterInfo {
                name: name.clone(),
                source: e.source.clone(),
                path: e.path.clone(),
                rank: e.rank,
                resident: e.slot.is_some(),
                requests: e.users,
                waiting: 0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(slots: usize, names: &[&str]) -> Registry {
        let mut r = Registry::new(slots);
        for n in names {
            r.insert(n, n, PathBuf::from(format!("/a/{n}")), 8);
        }
        r
    }

    /// Places and loads `name` as the engine does.
    fn make_resident(r: &mut Registry, name: &str) -> Placement {
        let p = r.place(name);
        if let Placement::Load { slot, evict } = &p {
            r.loaded(name, *slot, evict.as_deref());
        }
        p
    }

    #[test]
    fn free_slots_first_then_the_least_recently_used_idle_adapter() {
        let mut r = registry(2, &["a", "b", "c"]);
        assert_eq!(
            make_resident(&mut r, "a"),
            Placement::Load {
                slot: 0,
                evict: None
            }
        );
        assert_eq!(
            make_resident(&mut r, "b"),
            Placement::Load {
                slot: 1,
                evict: None
            }
        );
        r.hold(1, "b");
        r.release(1);
        r.hold(2, "a");
        r.release(2);
        // b was used before a: b goes.
        assert_eq!(
            make_resident(&mut r, "c"),
            Placement::Load {
                slot: 1,
                evict: Some("b".into())
            }
        );
        assert_eq!(r.place("a"), Placement::Resident(0));
        assert!(!r.list().iter().find(|i| i.name == "b").unwrap().resident);
    }

    #[test]
    fn an_adapter_in_use_is_never_evicted_and_others_wait() {
        let mut r = registry(1, &["a", "b"]);
        make_resident(&mut r, "a");
        r.hold(7, "a");
        assert_eq!(r.place("b"), Placement::Wait);
        assert_eq!(r.release(7), None);
        assert_eq!(
            r.place("b"),
            Placement::Load {
                slot: 0,
                evict: Some("a".into())
            }
        );
    }

    #[test]
    fn removal_waits_for_the_last_request_and_refuses_new_ones() {
        let mut r = registry(2, &["a"]);
        make_resident(&mut r, "a");
        r.hold(1, "a");
        r.hold(2, "a");
        assert_eq!(r.remove("a"), Ok(None), "in use: stays for now");
        assert!(!r.serves("a"));
        assert!(r.list().is_empty());
        assert_eq!(r.of_seq(1).map(|(s, _)| s), Some(0), "its requests go on");
        assert_eq!(r.release(1), None);
        assert_eq!(r.release(2), Some(0), "the last one frees the slot");
        assert_eq!(r.remove("a"), Err(()));
    }

    #[test]
    fn each_load_roots_the_prefix_cache_apart() {
        let mut r = registry(2, &["a", "b"]);
        assert_ne!(r.root("a"), r.root("b"));
        let before = r.root("a");
        r.insert("a", "/other", PathBuf::from("/other"), 8);
        assert_ne!(r.root("a"), before, "the same name from another file");
    }
}
