//! The block manager: which cache blocks are free, who holds the others, and
//! which full blocks hold a known run of tokens (the prefix cache).
//!
//! A block's identity in the prefix cache is the hash of its tokens chained
//! with the hash of every block before it, so a hit means the whole prefix up
//! to and including the block is the same. Blocks nobody holds keep their
//! contents and stay findable until a new allocation needs them; the least
//! recently released are taken first.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

/// Index of a block in the cache's storage.
pub type BlockId = u32;

/// Identity of a full block's contents and everything before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockHash(u64);

impl BlockHash {
    /// The hash of a block holding `tokens` after the block hashed `parent`.
    pub fn of(parent: Option<BlockHash>, tokens: &[u32]) -> Self {
        // SipHash with fixed keys: the same on every run and every rank.
        let mut h = std::hash::DefaultHasher::new();
        parent.map(|p| p.0).hash(&mut h);
        tokens.hash(&mut h);
        BlockHash(h.finish())
    }

    /// The root a sequence's first block chains from when its keys and values
    /// depend on more than its tokens (a LoRA adapter, by its load): blocks
    /// under another root, or none, never match.
    pub fn root(key: u64) -> Self {
        let mut h = std::hash::DefaultHasher::new();
        "root".hash(&mut h);
        key.hash(&mut h);
        BlockHash(h.finish())
    }
}

#[derive(Clone, Debug, Default)]
struct BlockState {
    refs: u32,
    /// Set while the block is in the prefix cache.
    hash: Option<BlockHash>,
    /// When it was last released (for least-recently-used eviction).
    released_at: u64,
}

/// A cached block's contents, kept to rule out hash collisions.
#[derive(Debug)]
struct Cached {
    block: BlockId,
    parent: Option<BlockHash>,
    tokens: Vec<u32>,
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    blocks: Vec<BlockState>,
    /// Blocks with no holder and no cached contents.
    free: Vec<BlockId>,
    cached: HashMap<BlockHash, Cached>,
    /// Cached blocks with no holder, oldest release first.
    evictable: BTreeSet<(u64, BlockId)>,
    clock: u64,
    /// Blocks never handed out yet. `free` starts as every block and is a stack
    /// (freed blocks go back on top), so the untouched ones are its bottom part
    /// and this is the least length it has had.
    untouched: usize,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        assert!(block_size > 0, "blocks hold at least one token");
        Self {
            block_size,
            blocks: vec![BlockState::default(); num_blocks],
            // Popped from the end: block 0 goes first.
            free: (0..num_blocks as BlockId).rev().collect(),
            cached: HashMap::new(),
            evictable: BTreeSet::new(),
            clock: 0,
            untouched: num_blocks,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks an allocation can take now (free, or cached and unheld).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks held by at least one sequence.
    pub fn used(&self) -> usize {
        self.num_blocks() - self.available()
    }

    /// Blocks handed out at least once: the part of the cache whose memory has
    /// been written, which the process's resident memory grows by until every
    /// block has been (the storage is reserved untouched).
    pub fn touched(&self) -> usize {
        self.num_blocks() - self.untouched
    }

    /// Blocks whose contents the prefix cache can still find.
    pub fn cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Finds the cached blocks holding the longest prefix of `tokens` made of
    /// whole blocks, and takes a hold on each. Returns them with their hashes.
    pub fn take_prefix(&mut self, tokens: &[u32]) -> (Vec<BlockId>, Vec<BlockHash>) {
        self.take_prefix_under(None, tokens)
    }

    /// [`BlockManager::take_prefix`] for a sequence whose first block chains
    /// from `root` ([`BlockHash::root`]).
    pub fn take_prefix_under(
        &mut self,
        root: Option<BlockHash>,
        tokens: &[u32],
    ) -> (Vec<BlockId>, Vec<BlockHash>) {
        let mut ids = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = root;
        for chunk in tokens.chunks_exact(self.block_size) {
            let hash = BlockHash::of(parent, chunk);
            let Some(hit) = self.cached.get(&hash) else {
                break;
            };
            if hit.parent != parent || hit.tokens != chunk {
                break;
            }
            let block = hit.block;
            let state = &mut self.blocks[block as usize];
            if state.refs == 0 {
                self.evictable.remove(&(state.released_at, block));
            }
            state.refs += 1;
            ids.push(block);
            hashes.push(hash);
            parent = Some(hash);
        }
        (ids, hashes)
    }

    /// Takes `n` blocks, or none when fewer are available. Free blocks go
    /// first, then the least recently released cached ones (forgotten by the
    /// prefix cache).
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.available() {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let block = match self.free.pop() {
                Some(b) => {
                    self.untouched = self.untouched.min(self.free.len());
                    b
                }
                None => {
                    let (_, b) = self.evictable.pop_first()?;
                    if let Some(hash) = self.blocks[b as usize].hash.take() {
                        self.cached.remove(&hash);
                    }
                    b
                }
            };
            self.blocks[block as usize].refs = 1;
            out.push(block);
        }
        Some(out)
    }

    /// Records that `block` (held, full) holds `tokens` after the block
    /// hashed `parent`, so later sequences can reuse it. Returns its hash.
    pub fn register(
        &mut self,
        block: BlockId,
        parent: Option<BlockHash>,
        tokens: &[u32],
    ) -> BlockHash {
        debug_assert_eq!(tokens.len(), self.block_size);
        let hash = BlockHash::of(parent, tokens);
        let state = &mut self.blocks[block as usize];
        if state.hash.is_none() && !self.cached.contains_key(&hash) {
            // A second copy of cached contents (two equal prompts prefilled
            // at once) stays private and is freed normally.
            state.hash = Some(hash);
            self.cached.insert(
                hash,
                Cached {
                    block,
                    parent,
                    tokens: tokens.to_vec(),
                },
            );
        }
        hash
    }

    /// Drops a hold on each of `blocks`. Released in reverse, so that a
    /// sequence's last blocks are evicted before its first (which more
    /// sequences share).
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &block in blocks.iter().rev() {
            let state = &mut self.blocks[block as usize];
            debug_assert!(state.refs > 0, "block {block} released twice");
            state.refs = state.refs.saturating_sub(1);
            if state.refs > 0 {
                continue;
            }
            if state.hash.is_some() {
                self.clock += 1;
                state.released_at = self.clock;
                self.evictable.insert((self.clock, block));
            } else {
                self.free.push(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, seed: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + seed).collect()
    }

    /// Registers every full block of `seq`, as the scheduler does once they are computed.
    fn register_all(m: &mut BlockManager, blocks: &[BlockId], seq: &[u32]) {
        let mut parent = None;
        for (b, chunk) in blocks.iter().zip(seq.chunks_exact(m.block_size())) {
            parent = Some(m.register(*b, parent, chunk));
        }
    }

    #[test]
    fn allocation_and_release_balance() {
        let mut m = BlockManager::new(8, 4);
        let a = m.allocate(5).unwrap();
        assert_eq!(m.used(), 5);
        assert!(m.allocate(4).is_none(), "only 3 left");
        let b = m.allocate(3).unwrap();
        assert_eq!(m.available(), 0);
        m.release(&a);
        m.release(&b);
        assert_eq!(m.available(), 8);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn touched_counts_blocks_ever_handed_out_and_freed_ones_are_reused_first() {
        let mut m = BlockManager::new(8, 4);
        assert_eq!(m.touched(), 0);
        let a = m.allocate(3).unwrap();
        assert_eq!(m.touched(), 3);
        m.release(&a);
        // The freed blocks go back on top and are handed out again first.
        let b = m.allocate(2).unwrap();
        assert!(b.iter().all(|x| a.contains(x)), "{b:?} not from {a:?}");
        assert_eq!(m.touched(), 3);
        let c = m.allocate(4).unwrap();
        assert_eq!(m.touched(), 6);
        m.release(&b);
        m.release(&c);
        m.allocate(8).unwrap();
        assert_eq!(m.touched(), 8);
    }

    #[test]
    fn a_shared_prefix_is_found_and_held() {
        let mut m = BlockManager::new(16, 4);
        let seq = tokens(10, 1);
        let blocks = m.allocate(3).unwrap();
        register_all(&mut m, &blocks, &seq);
        // Two full blocks (8 tokens) are cached; the third holds 2 tokens.
        assert_eq!(m.cached(), 2);

        let mut other = seq[..8].to_vec();
        other.extend([99, 98, 97, 96, 95]);
        let (hit, hashes) = m.take_prefix(&other);
        assert_eq!(hit, blocks[..2]);
        assert_eq!(hashes.len(), 2);
        // Held twice now: releasing the first sequence keeps them held.
        m.release(&blocks);
        assert_eq!(m.used(), 2);
        m.release(&hit);
        assert_eq!(m.used(), 0);
        assert_eq!(m.cached(), 2, "released blocks stay findable");
        let (again, _) = m.take_prefix(&seq);
        assert_eq!(again, blocks[..2]);
        m.release(&again);
    }

    #[test]
    fn a_different_earlier_block_breaks_the_chain() {
        let mut m = BlockManager::new(8, 2);
        let seq = tokens(6, 0);
        let blocks = m.allocate(3).unwrap();
        register_all(&mut m, &blocks, &seq);
        let mut changed = seq.clone();
        changed[0] += 1;
        let (hit, _) = m.take_prefix(&changed);
        assert!(
            hit.is_empty(),
            "same later blocks, different start: no reuse"
        );
        m.release(&blocks);
    }

    #[test]
    fn eviction_takes_the_least_recently_released_first() {
        let mut m = BlockManager::new(4, 2);
        let (s1, s2) = (tokens(4, 1), tokens(4, 2));
        let b1 = m.allocate(2).unwrap();
        register_all(&mut m, &b1, &s1);
        let b2 = m.allocate(2).unwrap();
        register_all(&mut m, &b2, &s2);
        m.release(&b1);
        m.release(&b2);
        assert_eq!(m.cached(), 4);
        // Needs two: s1's blocks go (last block first), s2's stay.
        let fresh = m.allocate(2).unwrap();
        assert_eq!(m.cached(), 2);
        assert!(m.take_prefix(&s1).0.is_empty());
        let (hit, _) = m.take_prefix(&s2);
        assert_eq!(hit, b2);
        m.release(&hit);
        m.release(&fresh);
        assert_eq!(m.available(), 4);
    }

    #[test]
    fn a_duplicate_block_stays_private() {
        let mut m = BlockManager::new(4, 2);
        let seq = tokens(2, 3);
        let a = m.allocate(1).unwrap();
        let b = m.allocate(1).unwrap();
        let ha = m.register(a[0], None, &seq);
        let hb = m.register(b[0], None, &seq);
        assert_eq!(ha, hb);
        assert_eq!(m.cached(), 1);
        m.release(&b);
        assert_eq!(m.free.len(), 3, "the private copy is plainly free");
        m.release(&a);
        assert_eq!(m.available(), 4);
    }
}
