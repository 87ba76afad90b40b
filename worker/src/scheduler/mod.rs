//! Continuous batching: which sequences run in the next forward step, how
//! many of their tokens, and in which cache blocks.
//!
//! Each step the scheduler fills a token budget: first one token for every
//! decoding sequence, then chunks of prompts being prefilled, then new
//! sequences from the queue (highest priority first, then first come first
//! served) while there are free blocks and room in the running set. A long
//! prompt is cut into chunks, so it never stalls the decoders for long. When
//! a running sequence needs a block and none is left, the most recently
//! admitted sequence is preempted: its blocks go back and it returns to the
//! head of the queue, to be recomputed from its tokens later (never dropped).
//!
//! The scheduler knows tokens and blocks only; what the tokens mean
//! (sampling, stop rules, streaming) is the engine's business.

use std::collections::HashMap;

use crate::kv::{BlockHash, BlockId, BlockManager};

/// A sequence's identity, chosen by the engine.
pub type SeqId = u64;

#[derive(Clone, Copy, Debug)]
pub struct SchedulerConfig {
    /// Most sequences in the running batch.
    pub max_num_seqs: usize,
    /// Most tokens computed in one step (decodes plus prefill chunks).
    pub max_batch_tokens: usize,
}

/// One sequence's part of a step: its tokens `start..start + len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledSpan {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// The span reaches the sequence's last known token, so its logits give
    /// the next token.
    pub completes: bool,
}

/// What one step computes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub spans: Vec<ScheduledSpan>,
    /// Sequences preempted while planning this step (their blocks freed).
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn tokens(&self) -> usize {
        self.spans.iter().map(|s| s.len).sum()
    }
}

/// Counters since start-up, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tokens computed by forward steps (prompts, recomputation and decodes).
    pub computed_tokens: u64,
    /// Prompt tokens of admitted sequences that the prefix cache could serve
    /// (whole blocks before the last token).
    pub prefix_query_tokens: u64,
    /// Of those, tokens found in the prefix cache and not computed again.
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
}

#[derive(Debug)]
struct Sequence {
    priority: i32,
    /// Order of arrival: ties of priority go to the earliest.
    arrival: u64,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<BlockId>,
    /// Hashes of the full blocks registered with the prefix cache, in order.
    hashes: Vec<BlockHash>,
    prefix_cache: bool,
    /// What its first block's hash chains from (an adapter's load), if anything.
    root: Option<BlockHash>,
}

#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Waiting, in the order they will be admitted.
    waiting: Vec<SeqId>,
    /// Running, in the order they were admitted.
    running: Vec<SeqId>,
    arrivals: u64,
    stats: SchedulerStats,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            config: SchedulerConfig {
                max_num_seqs: config.max_num_seqs.max(1),
                max_batch_tokens: config.max_batch_tokens.max(1),
            },
            blocks,
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            arrivals: 0,
            stats: SchedulerStats::default(),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn stats(&self) -> SchedulerStats {
        self.stats
    }

    /// Positions the whole cache holds: no sequence can grow past this.
    pub fn capacity_tokens(&self) -> usize {
        self.blocks.num_blocks() * self.blocks.block_size()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Queues a sequence of `tokens` (its prompt). `prefix_cache` lets it
    /// start from cached blocks of an equal prefix.
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>, priority: i32, prefix_cache: bool) {
        self.add_under(id, tokens, priority, prefix_cache, None);
    }

    /// [`Scheduler::add`] for a sequence whose cached blocks chain from `root`
    /// (its adapter's): it shares cached blocks only with sequences of that root.
    pub fn add_under(
        &mut self,
        id: SeqId,
        tokens: Vec<u32>,
        priority: i32,
        prefix_cache: bool,
        root: Option<BlockHash>,
    ) {
        assert!(!tokens.is_empty(), "a sequence has at least one token");
        self.arrivals += 1;
        self.seqs.insert(
            id,
            Sequence {
                priority,
                arrival: self.arrivals,
                tokens,
                computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                prefix_cache,
                root,
            },
        );
        self.enqueue(id);
    }

    /// Puts `id` in the queue in admission order: priority, then arrival.
    fn enqueue(&mut self, id: SeqId) {
        let key = |s: &Sequence| (-s.priority, s.arrival);
        let k = key(&self.seqs[&id]);
        let at = self.waiting.partition_point(|w| key(&self.seqs[w]) <= k);
        self.waiting.insert(at, id);
    }

    /// The sequence's tokens (prompt and generated so far).
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        &self.seqs[&id].tokens
    }

    /// The sequence's block table.
    pub fn block_table(&self, id: SeqId) -> &[BlockId] {
        &self.seqs[&id].blocks
    }

    /// Adds a sampled token to a sequence; the next step computes it.
    pub fn append(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Ends a sequence (finished, cancelled or failed) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.blocks.release(&seq.blocks);
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
    }

    /// Plans the next step: one token for every decoding sequence, then the
    /// first chunk of newly admitted requests, then further chunks of
    /// prompts already being read. New requests go before continuing
    /// prompts so that a short request's first token never waits for a long
    /// prompt to be read; half the budget stays for those prompts when there
    /// are any, so they keep progressing too.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batch_tokens;
        let (decoding, prefilling): (Vec<SeqId>, Vec<SeqId>) =
            self.running.iter().partition(|id| {
                let s = &self.seqs[id];
                s.tokens.len() - s.computed <= 1
            });
        self.continue_running(&decoding, &mut plan, &mut budget);
        let reserve = if prefilling.is_empty() { 0 } else { budget / 2 };
        let mut admission = budget - reserve;
        while admission > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.first() else {
                break;
            };
            let Some(n) = self.admit(id, admission) else {
                break;
            };
            admission -= n;
            budget -= n;
            plan.spans.push(self.span(id, n));
        }
        self.continue_running(&prefilling, &mut plan, &mut budget);
        plan
    }

    /// Gives each of `ids` (running, in admission order) its next span,
    /// within `budget`.
    fn continue_running(&mut self, ids: &[SeqId], plan: &mut StepPlan, budget: &mut usize) {
        for &id in ids {
            if *budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted for an earlier sequence in this step
            }
            let (need, computed, held) = {
                let s = &self.seqs[&id];
                (s.tokens.len() - s.computed, s.computed, s.blocks.len())
            };
            let n = need.min(*budget);
            if n == 0 {
                continue;
            }
            let want = self.blocks.blocks_for(computed + n).saturating_sub(held);
            if !self.make_room(id, want, plan, budget) {
                continue; // it was preempted itself
            }
            self.grant(id, want);
            *budget -= n;
            plan.spans.push(self.span(id, n));
        }
    }

    fn span(&self, id: SeqId, n: usize) -> ScheduledSpan {
        let s = &self.seqs[&id];
        ScheduledSpan {
            seq: id,
            start: s.computed,
            len: n,
            completes: s.computed + n == s.tokens.len(),
        }
    }

    fn grant(&mut self, id: SeqId, want: usize) {
        if want > 0 {
            let new = self
                .blocks
                .allocate(want)
                .expect("make_room checked the blocks are available");
            self.seqs.get_mut(&id).unwrap().blocks.extend(new);
        }
    }

    /// Frees blocks until `want` are available for `id`, preempting the most
    /// recently admitted sequences (and taking back their part of this step
    /// if they had one). False when `id` itself had to go.
    fn make_room(
        &mut self,
        id: SeqId,
        want: usize,
        plan: &mut StepPlan,
        budget: &mut usize,
    ) -> bool {
        while self.blocks.available() < want {
            let victim = *self.running.last().expect("id itself is running");
            self.preempt(victim);
            plan.preempted.push(victim);
            if let Some(at) = plan.spans.iter().position(|s| s.seq == victim) {
                *budget += plan.spans.remove(at).len;
            }
            if victim == id {
                return false;
            }
        }
        true
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        let seq = self.seqs.get_mut(&id).unwrap();
        let blocks = std::mem::take(&mut seq.blocks);
        seq.hashes.clear();
        seq.computed = 0;
        self.blocks.release(&blocks);
        self.stats.preemptions += 1;
        self.enqueue(id);
    }

    /// Moves the head of the queue into the running set when its first
    /// chunk fits; returns the chunk's length.
    fn admit(&mut self, id: SeqId, budget: usize) -> Option<usize> {
        let bs = self.blocks.block_size();
        let seq = &self.seqs[&id];
        let len = seq.tokens.len();
        // Whole blocks before the last token: the last is always computed,
        // since its logits are what the step is for.
        let reusable = (len - 1) / bs * bs;
        let (hit, hashes) = if seq.prefix_cache {
            self.blocks
                .take_prefix_under(seq.root, &seq.tokens[..reusable])
        } else {
            (Vec::new(), Vec::new())
        };
        let computed = hit.len() * bs;
        let n = (len - computed).min(budget);
        let want = self.blocks.blocks_for(computed + n) - hit.len();
        if self.blocks.available() < want {
            self.blocks.release(&hit);
            return None;
        }
        if seq.prefix_cache {
            self.stats.prefix_query_tokens += reusable as u64;
            self.stats.prefix_hit_tokens += computed as u64;
        }
        let seq = self.seqs.get_mut(&id).unwrap();
        seq.blocks = hit;
        seq.hashes = hashes;
        seq.computed = computed;
        self.waiting.remove(0);
        self.running.push(id);
        self.grant(id, want);
        Some(n)
    }

    /// Records that `plan` ran: its tokens are in the cache, and full blocks
    /// join the prefix cache.
    pub fn complete(&mut self, plan: &StepPlan) {
        let bs = self.blocks.block_size();
        for span in &plan.spans {
            let Some(seq) = self.seqs.get_mut(&span.seq) else {
                continue;
            };
            seq.computed = seq.computed.max(span.start + span.len);
            self.stats.computed_tokens += span.len as u64;
            while seq.hashes.len() < seq.computed / bs {
                let b = seq.hashes.len();
                let parent = seq.hashes.last().copied().or(seq.root);
                let hash =
                    self.blocks
                        .register(seq.blocks[b], parent, &seq.tokens[b * bs..(b + 1) * bs]);
                seq.hashes.push(hash);
            }
        }
    }
}

#[cfg(test)]
mod tests;
