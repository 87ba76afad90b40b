//! Command-line settings of the engine's batching and KV cache, shared by
//! every command that serves a model.

use clap::Args;
use shardserve_worker::device::DeviceSpec;
use shardserve_worker::engine::{EngineOptions, GPU_MAX_BATCH_TOKENS, GPU_MAX_NUM_SEQS};
use shardserve_worker::kv::DEFAULT_BLOCK_SIZE;
use shardserve_worker::model::CacheDtype;

#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Most sequences generated at once (the running batch); more wait in the queue.
    /// Default: 16 on a CPU, 256 on a GPU.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// Most tokens one forward step computes: decodes plus chunks of prompts, so a
    /// long prompt is read in chunks while the running sequences keep decoding.
    /// Default: 256 on a CPU, 8192 on a GPU.
    #[arg(long)]
    pub max_batch_tokens: Option<usize>,
    /// KV cache memory, for example 512MiB or 4GiB (default on a CPU: room for
    /// max-num-seqs sequences of max-seq-len, at most 1 GiB, at least one sequence;
    /// on a GPU: what --gpu-memory-utilization leaves). Wins over
    /// --gpu-memory-utilization.
    #[arg(long, value_parser = parse_memory)]
    pub kv_cache_memory: Option<u64>,
    /// Percent of the GPU's memory that weights and KV cache may take together (the
    /// manifest's engine.gpuMemoryUtilizationPercent); the cache gets what the
    /// weights and a step's activations leave. GPUs only.
    #[arg(long, default_value_t = EngineOptions::default().gpu_memory_utilization, value_parser = clap::builder::RangedU64ValueParser::<u8>::new().range(1..=100))]
    pub gpu_memory_utilization: u8,
    /// Element type of the KV cache: float16 or bfloat16 (the manifest's
    /// engine.kvCacheDtype). The CPU engine keeps float16 only and refuses others.
    #[arg(long, default_value_t = CacheDtype::F16)]
    pub kv_cache_dtype: CacheDtype,
    /// Positions per KV cache block (the unit of allocation and prefix reuse).
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub block_size: usize,
}

fn parse_memory(text: &str) -> Result<u64, String> {
    shardserve_operator::plan::parse_bytes(text).map_err(|e| e.to_string())
}

impl BatchArgs {
    /// Copies these settings into `options`, with the defaults of `device`.
    pub fn apply(&self, options: &mut EngineOptions, device: DeviceSpec) {
        let gpu = matches!(device, DeviceSpec::Cuda(_));
        let (seqs, tokens) = if gpu {
            (GPU_MAX_NUM_SEQS, GPU_MAX_BATCH_TOKENS)
        } else {
            let cpu = EngineOptions::default();
            (cpu.max_num_seqs, cpu.max_batch_tokens)
        };
        options.max_num_seqs = self.max_num_seqs.unwrap_or(seqs).max(1);
        options.max_batch_tokens = self.max_batch_tokens.unwrap_or(tokens).max(1);
        options.kv_cache_bytes = self.kv_cache_memory.map(|b| b as usize);
        options.gpu_memory_utilization = self.gpu_memory_utilization;
        options.kv_cache_dtype = self.kv_cache_dtype;
        options.block_size = self.block_size;
    }
}
