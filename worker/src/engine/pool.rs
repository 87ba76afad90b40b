//! How a forward step uses the compute pool.
//!
//! A step is a few hundred parallel sections (the products, attention) separated by short
//! serial stretches (norms, RoPE, cache writes). Left alone, an idle pool thread spins for
//! a few tens of microseconds, then sleeps, and the next section must wake it through the
//! kernel: measured on a 2-core machine, about 260 context switches per batch-16 step and
//! some 10% of its time in the scheduler. So the step runs on one pool thread while every
//! other pool thread stays in the step, running the sections' work as it appears and
//! otherwise yielding its core, until the step ends.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `step` on the compute pool, keeping the pool's other threads awake for it.
pub(super) fn step<R: Send>(step: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    rayon::scope(|scope| {
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(|_| {
                while !done.load(Ordering::Acquire) {
                    // Someone else's share of a section, if there is one; else let
                    // other processes run (the router, the tokenizer) for a moment.
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::thread::yield_now();
                    }
                }
            });
        }
        let out = step();
        done.store(true, Ordering::Release);
        out
    })
}
