//! Command-line settings of the engine's batching and KV cache, shared by
//! every command that serves a model.

use clap::Args;
use shardserve_worker::engine::EngineOptions;
use shardserve_worker::kv::DEFAULT_BLOCK_SIZE;

#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Most sequences generated at once (the running batch); more wait in the queue.
    #[arg(long, default_value_t = EngineOptions::default().max_num_seqs)]
    pub max_num_seqs: usize,
    /// Most tokens one forward step computes: decodes plus chunks of prompts, so a
    /// long prompt is read in chunks while the running sequences keep decoding.
    #[arg(long, default_value_t = EngineOptions::default().max_batch_tokens)]
    pub max_batch_tokens: usize,
    /// KV cache memory, for example 512MiB or 4GiB (default: room for max-num-seqs
    /// sequences of max-seq-len, at most 1 GiB, at least one sequence).
    #[arg(long, value_parser = parse_memory)]
    pub kv_cache_memory: Option<u64>,
    /// Positions per KV cache block (the unit of allocation and prefix reuse).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub block_size: usize,
}

fn parse_memory(text: &str) -> Result<u64, String> {
    shardserve_operator::plan::parse_bytes(text).map_err(|e| e.to_string())
}

impl BatchArgs {
    /// Copies these settings into `options`.
    pub fn apply(&self, options: &mut EngineOptions) {
        options.max_num_seqs = self.max_num_seqs.max(1);
        options.max_batch_tokens = self.max_batch_tokens.max(1);
        options.kv_cache_bytes = self.kv_cache_memory.map(|b| b as usize);
        options.block_size = self.block_size;
    }
}
