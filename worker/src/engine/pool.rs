//! How a forward step uses the compute pool.
//!
//! A step is a few hundred parallel sections (the products, attention) separated by short
//! serial stretches (norms, RoPE, cache writes). Left alone, an idle pool thread spins for
//! a few tens of microseconds, then sleeps, and the next section must wake it through the
//! kernel: measured on a 2-core machine, about 260 context switches per batch-16 step and
//! some 10% of its time in the scheduler. So the step runs on one pool thread while every
//! other pool thread stays in the step, running the sections' work as it appears and
//! otherwise yielding its core, until the step ends.
//!
//! A step on a GPU leaves the CPU waiting for the device: there the pool's threads
//! sleep, as spinning ones would only burn the cores and, in a container with a CPU
//! limit, its quota, which throttles the thread that launches the kernels.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::model::{ModelError, SeqSpan, StepModel, StepOutput};

/// Runs `model`'s step over `spans`: on the compute pool, kept awake, when the model
/// computes on the CPU; on the calling thread when it computes on a GPU.
pub(super) fn forward(
    model: &mut dyn StepModel,
    spans: &[SeqSpan<'_>],
) -> Result<StepOutput, ModelError> {
    if model.computes_on_host() {
        step(|| model.forward(spans))
    } else {
        model.forward(spans)
    }
}

/// Runs `step` on the compute pool, keeping the pool's other threads awake for it.
fn step<R: Send>(step: impl FnOnce() -> R + Send) -> R {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::forward;
    use crate::comm::SingleRank;
    use crate::kv::{KvCacheTooLarge, KvShape};
    use crate::lora::Adapter;
    use crate::model::tiny::{TinySpec, write_tiny_gguf};
    use crate::model::{
        Host, LogitsFor, ModelConfig, ModelError, SeqSpan, StepModel, StepOutput, Transformer,
        WithCache,
    };
    use crate::weights::GgufFile;

    /// The tiny model on the host, saying where it computes as `on_host` says, and
    /// noting the pool thread its steps ran on (`None`: a thread outside the pool).
    #[derive(Debug)]
    struct Placed {
        model: WithCache<Host>,
        on_host: bool,
        ran_on: Vec<Option<usize>>,
    }

    impl StepModel for Placed {
        fn config(&self) -> &ModelConfig {
            self.model.config()
        }
        fn kv_shape(&self) -> KvShape {
            self.model.kv_shape()
        }
        fn reserve_cache(&mut self, blocks: usize, size: usize) -> Result<(), KvCacheTooLarge> {
            self.model.reserve_cache(blocks, size)
        }
        fn forward(&mut self, spans: &[SeqSpan<'_>]) -> Result<StepOutput, ModelError> {
            self.ran_on.push(rayon::current_thread_index());
            self.model.forward(spans)
        }
        fn load_adapter(&mut self, slot: u32, adapter: &Adapter) -> Result<(), ModelError> {
            self.model.load_adapter(slot, adapter)
        }
        fn unload_adapter(&mut self, slot: u32) {
            self.model.unload_adapter(slot)
        }
        fn computes_on_host(&self) -> bool {
            self.on_host
        }
    }

    #[test]
    fn host_steps_run_on_the_pool_and_gpu_steps_on_the_calling_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_gguf(&path, &TinySpec::default()).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let mut answers = Vec::new();
        for on_host in [true, false] {
            let model = Transformer::from_gguf(&file, Arc::new(SingleRank), Host).unwrap();
            let mut placed = Placed {
                model: WithCache::new(model),
                on_host,
                ran_on: Vec::new(),
            };
            placed.reserve_cache(4, 16).unwrap();
            let blocks = [0, 1];
            let span = SeqSpan {
                tokens: &[5, 17, 3],
                start_pos: 0,
                blocks: &blocks,
                logits: LogitsFor::Last,
                adapter: None,
            };
            let out = forward(&mut placed, &[span]).unwrap();
            answers.push(out.logits);
            // The test's own thread is not one of the pool's.
            assert_eq!(placed.ran_on.len(), 1);
            assert_eq!(placed.ran_on[0].is_some(), on_host, "on_host {on_host}");
        }
        assert_eq!(answers[0], answers[1]);
    }
}
