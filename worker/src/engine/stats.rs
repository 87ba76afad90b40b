//! What the engine thread tells the rest of the process about itself:
//! written after every step, read by metrics without locking.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::scheduler::Scheduler;

/// A snapshot of the engine's counters and gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub kv_blocks_total: u64,
    pub kv_blocks_used: u64,
    /// Blocks the prefix cache can still find (held or not).
    pub kv_blocks_cached: u64,
    /// Blocks written at least once since the start (see [`crate::kv::BlockManager::touched`]).
    pub kv_blocks_touched: u64,
    /// Requests waiting for room in the batch.
    pub waiting: u64,
    /// Sequences in the running batch.
    pub running: u64,
    /// Forward steps run.
    pub steps: u64,
    /// Sequences and tokens of the last step.
    pub last_batch_seqs: u64,
    pub last_batch_tokens: u64,
    /// Sequences summed over every step (divided by `steps`: the mean batch).
    pub batched_seqs: u64,
    /// Tokens computed by forward steps (prompts, recomputation, decodes).
    pub computed_tokens: u64,
    /// Prompt tokens the prefix cache could have served, and did.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub preemptions: u64,
    /// Nanoseconds in forward steps, from scheduling to the tokens handed out, and
    /// the part of it in the model's forward pass: the rest is the engine's own
    /// work, which on a GPU the device waits for.
    pub step_nanos: u64,
    pub forward_nanos: u64,
}

#[derive(Debug, Default)]
pub struct StatsCell {
    kv_blocks_total: AtomicU64,
    kv_blocks_used: AtomicU64,
    kv_blocks_cached: AtomicU64,
    kv_blocks_touched: AtomicU64,
    waiting: AtomicU64,
    running: AtomicU64,
    steps: AtomicU64,
    last_batch_seqs: AtomicU64,
    last_batch_tokens: AtomicU64,
    batched_seqs: AtomicU64,
    computed_tokens: AtomicU64,
    prefix_query_tokens: AtomicU64,
    prefix_hit_tokens: AtomicU64,
    preemptions: AtomicU64,
    step_nanos: AtomicU64,
    forward_nanos: AtomicU64,
}

impl StatsCell {
    /// Records the scheduler's state after a step of `seqs` sequences and
    /// `tokens` tokens (zero when nothing ran).
    pub fn publish(&self, scheduler: &Scheduler, seqs: usize, tokens: usize) {
        let set = |cell: &AtomicU64, v: u64| cell.store(v, Ordering::Relaxed);
        let blocks = scheduler.blocks();
        let counters = scheduler.stats();
        set(&self.kv_blocks_total, blocks.num_blocks() as u64);
        set(&self.kv_blocks_used, blocks.used() as u64);
        set(&self.kv_blocks_cached, blocks.cached() as u64);
        set(&self.kv_blocks_touched, blocks.touched() as u64);
        set(&self.waiting, scheduler.waiting() as u64);
        set(&self.running, scheduler.running() as u64);
        set(&self.computed_tokens, counters.computed_tokens);
        set(&self.prefix_query_tokens, counters.prefix_query_tokens);
        set(&self.prefix_hit_tokens, counters.prefix_hit_tokens);
        set(&self.preemptions, counters.preemptions);
        if seqs > 0 {
            self.steps.fetch_add(1, Ordering::Relaxed);
            self.batched_seqs.fetch_add(seqs as u64, Ordering::Relaxed);
            set(&self.last_batch_seqs, seqs as u64);
            set(&self.last_batch_tokens, tokens as u64);
        }
    }

    /// Adds a forward step's time, and its forward pass's.
    pub fn add_step_time(&self, step: Duration, forward: Duration) {
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.step_nanos.fetch_add(nanos(step), Ordering::Relaxed);
        self.forward_nanos
            .fetch_add(nanos(forward), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> EngineStats {
        let get = |cell: &AtomicU64| cell.load(Ordering::Relaxed);
        EngineStats {
            kv_blocks_total: get(&self.kv_blocks_total),
            kv_blocks_used: get(&self.kv_blocks_used),
            kv_blocks_cached: get(&self.kv_blocks_cached),
            kv_blocks_touched: get(&self.kv_blocks_touched),
            waiting: get(&self.waiting),
            running: get(&self.running),
            steps: get(&self.steps),
            last_batch_seqs: get(&self.last_batch_seqs),
            last_batch_tokens: get(&self.last_batch_tokens),
            batched_seqs: get(&self.batched_seqs),
            computed_tokens: get(&self.computed_tokens),
            prefix_query_tokens: get(&self.prefix_query_tokens),
            prefix_hit_tokens: get(&self.prefix_hit_tokens),
            preemptions: get(&self.preemptions),
            step_nanos: get(&self.step_nanos),
            forward_nanos: get(&self.forward_nanos),
        }
    }
}
