//! The engine: a model, its tokenizer and its KV cache, running requests.
//!
//! `Engine` is synchronous and owns everything it touches; it runs on its own
//! thread (`EngineHandle`), fed by a channel from the async gRPC side, so
//! matrix maths never blocks a tokio worker. Requests are batched
//! continuously: each [`Engine::step`] runs one forward pass over the tokens
//! the scheduler picked from every sequence in flight, then samples a token
//! for each sequence that reached its end.

mod adapters;
mod group;
mod handle;
mod pool;
mod request;
mod sequence;
mod stats;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use adapters::{AdapterInfo, DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS};
pub use handle::{AdapterChange, AdapterFetch, EngineHandle, EngineLoad};
pub use request::{
    FinishReason, Finished, GenerationRequest, LogprobEntry, Prompt, Stopping, TokenEvent,
};
pub use stats::EngineStats;

use crate::comm::{Collective, SingleRank};
use crate::device::Compute;
use crate::kv::{BlockManager, DEFAULT_BLOCK_SIZE};
use crate::model::{
    Backend, CacheDtype, HEAD_ROWS, HfCheckpoint, Host, LogitsFor, ModelConfig, ModelError,
    SeqSpan, StepModel, Tensors, Transformer, WithCache,
};
use crate::progress::Tally;
use crate::sampling::{SamplingError, SamplingParams};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId};
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::weights::{GgufFile, TensorSource, WeightsError};
use sequence::{Active, Advance};
use stats::StatsCell;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    KvCache(#[from] crate::kv::KvCacheTooLarge),
    /// The request cannot run as asked; the message says which part and why.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the engine has stopped")]
    Stopped,
    /// The tensor-parallel group broke during a step this request was in.
    #[error("the tensor-parallel group failed: {0}")]
    GroupFailed(String),
    /// A step this request was in failed (a bug, not the request's fault).
    #[error("the engine failed: {0}")]
    StepFailed(String),
    /// The weights do not fit the GPU.
    #[error("{0}")]
    OutOfMemory(String),
    /// No adapter of this name is served.
    #[error("no LoRA adapter named '{0}' is loaded")]
    UnknownAdapter(String),
    /// An adapter file was refused (the message names the file and the tensor).
    #[error(transparent)]
    Adapter(#[from] crate::lora::LoraError),
    /// The adapter is in use by requests: it cannot be replaced now.
    #[error(
        "LoRA adapter '{0}' is in use; unload it first (its requests finish) and load it again"
    )]
    AdapterBusy(String),
}

impl EngineError {
    /// Whether the tensor-parallel group broke (a rank died or stalled): the
    /// request may succeed on another group, this one cannot go on.
    pub fn is_group_failure(&self) -> bool {
        matches!(
            self,
            EngineError::Model(ModelError::Comm(_)) | EngineError::GroupFailed(_)
        )
    }

    /// Whether a step failed inside the device's computation. On a GPU that leaves
    /// its context in an unknown state (CUDA errors are sticky): the rank cannot go
    /// on, and its group fails as when a rank is killed.
    pub fn is_device_failure(&self) -> bool {
        matches!(self, EngineError::Model(ModelError::Candle { .. }))
    }
}

/// Whether `error` says the device ran out of memory (cudarc's
/// `CUDA_ERROR_OUT_OF_MEMORY`, cuBLAS' allocation failures).
fn is_out_of_memory(error: &EngineError) -> bool {
    let text = error.to_string();
    text.contains("OUT_OF_MEMORY")
        || text.contains("ALLOC_FAILED")
        || text.contains("out of memory")
}

/// The bytes of a model's weights on disk: a GGUF file, or a directory's safetensors.
fn weights_on_disk(path: &Path) -> u64 {
    if !path.is_dir() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// What to say when a rank's weights do not fit its GPU: how much they need and what
/// to change.
fn weights_do_not_fit(total: u64, world: usize, memory: Option<(usize, usize)>) -> EngineError {
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let total = total as f64;
    let gpu = match memory {
        Some((free, all)) => format!(
            "the GPU has {:.1} GiB, {:.1} GiB of it free now",
            gib(all as f64),
            gib(free as f64)
        ),
        None => "the GPU's memory could not be read".into(),
    };
    EngineError::OutOfMemory(format!(
        "out of GPU memory while loading the weights: this rank needs at least {:.1} GiB          ({:.1} GiB of weights over tensor={world}; the embedding and the output head are          whole on every rank), and {gpu}. Raise tensor (more GPUs share the weights) or          serve a smaller quantisation; --gpu-memory-utilization, --max-seq-len and          --max-num-seqs size the KV cache, which comes after the weights",
        gib(total / world.max(1) as f64),
        gib(total),
    ))
}

impl From<candle_core::Error> for EngineError {
    fn from(source: candle_core::Error) -> Self {
        EngineError::Model(ModelError::Candle { source })
    }
}

/// What the event stream of a request carries, in order: tokens, then one
/// `Finished` or one `Error`.
#[derive(Debug)]
pub enum EngineEvent {
    Token(TokenEvent),
    Finished(Finished),
    Error(EngineError),
}

/// KV cache memory when the options do not say: enough for every sequence
/// at full length, up to this much.
pub const DEFAULT_KV_CACHE_BYTES: usize = 1 << 30;

/// The running batch on a GPU unless configured otherwise (a CPU's is 16).
pub const GPU_MAX_NUM_SEQS: usize = 256;
/// Tokens per step on a GPU unless configured otherwise (a CPU's is 256).
pub const GPU_MAX_BATCH_TOKENS: usize = 8192;

/// What a GPU's memory leaves for the KV cache: `utilization_percent` of it for
/// weights and cache together, less what is in use once the weights are loaded (the
/// weights, the CUDA context, the collectives' buffers) and a step's activations.
/// The planner (`shardserve plan`, the operator's fit check) applies the same rule
/// with the weights computed from the shape and 2 GiB for the rest.
#[derive(Clone, Copy, Debug)]
pub struct GpuBudget {
    /// `(free, total)` bytes of the GPU, measured after loading.
    pub memory: (usize, usize),
    pub utilization_percent: u8,
    pub activations: usize,
}

impl GpuBudget {
    /// Bytes for the KV cache, `None` when nothing is left.
    pub fn kv_cache_bytes(&self) -> Option<usize> {
        let (free, total) = self.memory;
        let allowed = (total as u128 * self.utilization_percent.min(100) as u128 / 100) as usize;
        let used = total.saturating_sub(free);
        allowed
            .checked_sub(used)?
            .checked_sub(self.activations)
            .filter(|&b| b > 0)
    }

    /// Why no cache fits, and what to change.
    fn too_small(&self) -> EngineError {
        let (free, total) = self.memory;
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        EngineError::InvalidRequest(format!(
            "the GPU has no room for a KV cache: {:.2} GiB in use after loading the weights, \
             {:.2} GiB for a step's activations, {}% of {:.2} GiB allowed; raise tensor (more \
             GPUs share the weights) or --gpu-memory-utilization, or lower --max-seq-len, \
             --max-num-seqs or --max-batch-tokens",
            gib(total.saturating_sub(free)),
            gib(self.activations),
            self.utilization_percent,
            gib(total)
        ))
    }
}

/// Device memory a step's activations may take at most: each of `max_batch_tokens`
/// tokens holds a few hidden-size rows and this rank's share of the MLP and the
/// attention (f32), and every sequence of the batch may want a row of logits (a
/// prompt scored wants one per token, [`HEAD_ROWS`] at a time).
fn activation_bytes(config: &ModelConfig, options: &EngineOptions, world: usize) -> usize {
    let world = world.max(1);
    let per_token = 6 * config.hidden_size
        + 3 * config.intermediate_size / world
        + 3 * config.num_heads * config.head_dim / world;
    let tokens = options.max_batch_tokens.saturating_mul(per_token);
    let logit_rows = options.max_num_seqs.max(HEAD_ROWS / 2);
    let logits = logit_rows.saturating_mul(2 * config.vocab_size);
    tokens.saturating_add(logits).saturating_mul(4)
}

/// A prompt's token ids for a model with `vocab` tokens (its chat template rendered and
/// the text tokenized as the model asks), or why the request cannot run. A free function
/// so that servers can run it on their own threads: a long prompt or a heavy template
/// then never stalls the engine's steps.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    vocab: usize,
    prompt: &Prompt,
) -> Result<Vec<u32>, EngineError> {
    let ids = match prompt {
        Prompt::Text(text) => tokenizer.encode(text, true, true)?,
        Prompt::Chat(messages) => {
            let template = tokenizer.chat_template().ok_or_else(|| {
                EngineError::InvalidRequest(
                    "this model has no chat template; send a text prompt".into(),
                )
            })?;
            let text = template.render(messages, true)?;
            tokenizer.encode(&text, false, true)?
        }
        Prompt::Ids(ids) => ids.clone(),
    };
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(EngineError::InvalidRequest(format!(
            "prompt token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(ids)
}

/// Limits of the engine, set at start-up.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Longest sequence (prompt + generation); `None` = the model's trained context.
    pub max_seq_len: Option<usize>,
    /// Most sequences generated at once; more wait in the queue.
    pub max_num_seqs: usize,
    /// Most tokens one forward step computes (decodes plus prompt chunks):
    /// a long prompt is cut into chunks of this size, so the sequences
    /// already decoding keep going while it is read.
    pub max_batch_tokens: usize,
    /// Memory for the KV cache; `None` = enough for `max_num_seqs` sequences
    /// of `max_seq_len`, at most [`DEFAULT_KV_CACHE_BYTES`], at least one
    /// sequence of `max_seq_len`.
    pub kv_cache_bytes: Option<usize>,
    /// Positions per KV cache block.
    pub block_size: usize,
    /// Element type of the KV cache (the CPU engine keeps f16 only).
    pub kv_cache_dtype: CacheDtype,
    /// On a GPU, without `kv_cache_bytes`: percent of its memory for weights and
    /// cache together ([`GpuBudget`]).
    pub gpu_memory_utilization: u8,
    /// What the weights must be stored as (a manifest's `model.dtype`, in its names:
    /// `q4_1`, `bfloat16`, ...); a model stored otherwise is refused, since the
    /// engine does not convert weights between types.
    pub weight_dtype: Option<String>,
    /// Name clients use for the model; defaults to the file's stem.
    pub served_model_name: Option<String>,
    /// Counts the bytes of the model the load has gone through (for the progress
    /// a pod reports while it loads).
    pub load_tally: Arc<Tally>,
    /// Most LoRA adapters resident at once (more may be served: the least
    /// recently used idle one makes room).
    pub max_loras: usize,
    /// Highest LoRA rank accepted.
    pub max_lora_rank: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seq_len: None,
            max_num_seqs: 16,
            max_batch_tokens: 256,
            kv_cache_bytes: None,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_dtype: CacheDtype::F16,
            gpu_memory_utilization: 90,
            weight_dtype: None,
            served_model_name: None,
            load_tally: Arc::default(),
            max_loras: DEFAULT_MAX_LORAS,
            max_lora_rank: DEFAULT_MAX_LORA_RANK,
        }
    }
}

/// The KV cache's size, reported at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheInfo {
    pub blocks: usize,
    pub block_size: usize,
    pub bytes: usize,
}

impl KvCacheInfo {
    pub fn tokens(&self) -> usize {
        self.blocks * self.block_size
    }
}

/// What the engine says about itself (gRPC `ModelInfo`).
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub served_model_name: String,
    pub config: ModelConfig,
    pub max_seq_len: usize,
    pub weight_format: String,
    pub eos_token_ids: Vec<u32>,
    pub has_chat_template: bool,
    pub tensor_parallel_size: usize,
    pub kv_cache: KvCacheInfo,
    pub max_num_seqs: usize,
    /// Most LoRA adapters resident at once (`--max-loras`).
    pub max_loras: usize,
}

/// One request's event, from [`Engine::step`].
#[derive(Debug)]
pub struct StepEvent {
    pub seq: SeqId,
    pub event: EngineEvent,
}

pub struct Engine {
    /// This rank's shard and its KV cache, on the CPU kernels or on a device.
    model: Box<dyn StepModel>,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    /// This rank's group; the leader announces each step to the others.
    group: Arc<dyn Collective>,
    scheduler: Scheduler,
    active: std::collections::HashMap<SeqId, Active>,
    next_seq: SeqId,
    stats: Arc<StatsCell>,
    /// A failed step ends the engine (and its group), not only its requests: set on
    /// a GPU, whose context a failed kernel leaves unusable.
    device_failures_are_fatal: bool,
    /// LoRA adapters served, resident or not, and who uses them.
    adapters: adapters::Registry,
    max_lora_rank: usize,
    /// Requests whose adapter waits for a slot (every slot in use).
    waiting_for_adapter: Vec<adapters::WaitingForAdapter>,
    /// The adapters as last listed, for readers on other threads.
    adapter_list: Arc<std::sync::RwLock<Vec<AdapterInfo>>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_group();
    }
}

/// What a caller's sink says after each token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// The caller went away: stop now and free the sequence's memory.
    Cancel,
}

/// A weight format (`gguf:Q4_1`, `safetensors:BF16`) in a manifest's `model.dtype`
/// names (`q4_1`, `bfloat16`, `q6_k`).
pub fn weight_dtype_name(format: &str) -> String {
    let stored = format.rsplit(':').next().unwrap_or(format).to_lowercase();
    match stored.as_str() {
        "f32" => "float32".into(),
        "f16" => "float16".into(),
        "bf16" => "bfloat16".into(),
        // K-quants: Q6K is `q6_k`.
        k if k.ends_with('k') && !k.ends_with("_k") => format!("{}_k", &k[..k.len() - 1]),
        other => other.into(),
    }
}

/// This rank's shard of a model (a GGUF file or a Hugging Face directory) on
/// `backend`, with the model's tokenizer and its weight format.
/// Counts the bytes it goes through in `tally`.
fn load_shard<B: Backend>(
    path: &Path,
    comm: Arc<dyn Collective>,
    backend: B,
    tally: &Arc<Tally>,
) -> Result<(Box<dyn StepModel>, Tokenizer, String), EngineError> {
    let loaded = if path.is_dir() {
        let mut checkpoint = HfCheckpoint::open(path)?;
        checkpoint.count_into(tally.clone());
        let tokenizer = hf_tokenizer(path)?;
        let model = Transformer::from_hf(&checkpoint, comm, backend)?;
        (
            Box::new(WithCache::new(model)) as Box<dyn StepModel>,
            tokenizer,
            checkpoint.format(),
        )
    } else {
        let mut file = GgufFile::open(path)?;
        file.count_into(tally.clone());
        let tokenizer = Tokenizer::from_gguf(file.metadata())?;
        let model = Transformer::from_gguf(&file, comm, backend)?;
        (
            Box::new(WithCache::new(model)) as _,
            tokenizer,
            file.format(),
        )
    };
    tally.finish();
    Ok(loaded)
}

/// The tokenizer of a Hugging Face directory: `tokenizer.json`, with
/// `tokenizer_config.json` (BOS/EOS, chat template) when there is one.
fn hf_tokenizer(dir: &Path) -> Result<Tokenizer, EngineError> {
    let config_path = dir.join("tokenizer_config.json");
    let config = match std::fs::read_to_string(&config_path) {
        Ok(text) => Some(
            serde_json::from_str::<serde_json::Value>(&text).map_err(|e| ModelError::Config {
                path: config_path.clone(),
                key: "(document)".into(),
                problem: format!("not valid JSON: {e}"),
            })?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(WeightsError::Io {
                path: config_path,
                source,
            }
            .into());
        }
    };
    Ok(Tokenizer::from_tokenizer_json(
        &dir.join("tokenizer.json"),
        config.as_ref(),
    )?)
}

impl Engine {
    /// Loads a model (a GGUF file or a Hugging Face directory) on CPU as a
    /// group of one rank.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<Self, EngineError> {
        Self::load_rank(path, options, Arc::new(SingleRank), Compute::Host)
    }

    /// Loads this rank's shard of a model: a GGUF file, or a Hugging Face
    /// directory (`config.json`, safetensors, `tokenizer.json` and
    /// `tokenizer_config.json`).
    pub fn load_rank(
        path: &Path,
        options: &EngineOptions,
        comm: Arc<dyn Collective>,
        compute: Compute,
    ) -> Result<Self, EngineError> {
        let world = comm.world_size();
        let is_gpu = compute.is_gpu();
        let (mut model, tokenizer, format) = match compute.clone() {
            Compute::Host => {
                if options.kv_cache_dtype != CacheDtype::F16 {
                    return Err(EngineError::InvalidRequest(format!(
                        "--kv-cache-dtype {}: the CPU engine keeps its cache in float16 \
                         (other cache types need --device cuda)",
                        options.kv_cache_dtype
                    )));
                }
                load_shard(path, comm.clone(), Host, &options.load_tally)?
            }
            Compute::Device(device) => {
                let before = compute.gpu_memory();
                load_shard(
                    path,
                    comm.clone(),
                    Tensors::new(device, options.kv_cache_dtype),
                    &options.load_tally,
                )
                .map_err(|e| match is_gpu && is_out_of_memory(&e) {
                    true => weights_do_not_fit(weights_on_disk(path), world, before),
                    false => e,
                })?
            }
        };
        if let Some(want) = &options.weight_dtype {
            let stored = weight_dtype_name(&format);
            if *want != stored {
                return Err(EngineError::InvalidRequest(format!(
                    "the model's weights are {stored} ({format}) but --dtype (model.dtype) asks \
                     for {want}: weights are served as stored, not converted; set model.dtype \
                     to {stored} or leave it out"
                )));
            }
        }
        let tokenizer = Arc::new(tokenizer);
        let config = model.config().clone();
        // Measured once the weights are on the GPU: what is left is the cache's.
        let compute_memory = compute.gpu_memory();
        if is_gpu && compute_memory.is_none() && options.kv_cache_bytes.is_none() {
            return Err(EngineError::InvalidRequest(
                "cannot read the GPU's free memory to size the KV cache; set --kv-cache-memory"
                    .into(),
            ));
        }
        let max_seq_len = options
            .max_seq_len
            .map_or(config.max_position, |m| m.min(config.max_position));
        let shape = model.kv_shape();
        let block_size = options.block_size.max(1);
        let block_bytes = shape.block_bytes(block_size).max(1);
        let max_num_seqs = options.max_num_seqs.max(1);
        let bytes = match (options.kv_cache_bytes, compute_memory) {
            (Some(bytes), _) => bytes,
            (None, Some(memory)) => {
                let budget = GpuBudget {
                    memory,
                    utilization_percent: options.gpu_memory_utilization,
                    activations: activation_bytes(&config, options, world),
                };
                budget.kv_cache_bytes().ok_or_else(|| budget.too_small())?
            }
            (None, None) => {
                let one = max_seq_len.div_ceil(block_size).saturating_mul(block_bytes);
                let want = max_num_seqs.saturating_mul(one);
                want.min(DEFAULT_KV_CACHE_BYTES).max(one)
            }
        };
        let blocks = (bytes / block_bytes).max(1);
        let kv_cache = KvCacheInfo {
            blocks,
            block_size,
            bytes: blocks.saturating_mul(block_bytes),
        };
        // A sequence can never outgrow the whole cache.
        let max_seq_len = max_seq_len.min(kv_cache.tokens());
        let dtype = format;
        let name = options.served_model_name.clone().unwrap_or_else(|| {
            // A directory's whole name (`Llama-3.1-8B`), a file's stem.
            let name = if path.is_dir() {
                path.file_name()
            } else {
                path.file_stem()
            };
            name.map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let info = ModelInfo {
            served_model_name: name,
            max_seq_len,
            weight_format: dtype,
            eos_token_ids: tokenizer.eog_ids().to_vec(),
            has_chat_template: tokenizer.chat_template().is_some(),
            tensor_parallel_size: world,
            config,
            kv_cache,
            max_num_seqs,
            max_loras: options.max_loras.max(1),
        };
        release_freed_memory();
        model.reserve_cache(blocks, block_size)?;
        let scheduler = Scheduler::new(
            SchedulerConfig {
                max_num_seqs,
                max_batch_tokens: options.max_batch_tokens.max(1),
            },
            BlockManager::new(blocks, block_size),
        );
        let stats = Arc::new(StatsCell::default());
        stats.publish(&scheduler, 0, 0);
        Ok(Self {
            model,
            tokenizer,
            info,
            group: comm,
            scheduler,
            active: Default::default(),
            next_seq: 0,
            stats,
            device_failures_are_fatal: is_gpu,
            adapters: adapters::Registry::new(options.max_loras),
            max_lora_rank: options.max_lora_rank,
            waiting_for_adapter: Vec::new(),
            adapter_list: Arc::default(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Counters and gauges of the scheduler and the cache, shared with
    /// whoever reads metrics.
    pub fn stats(&self) -> EngineStats {
        self.stats.snapshot()
    }

    pub(crate) fn stats_cell(&self) -> Arc<StatsCell> {
        self.stats.clone()
    }

    /// Once the ranks of a group have met: every rank takes the leader's KV
    /// cache size, since followers write where the leader's block tables
    /// say, whatever options they were started with.
    pub fn agree_on_kv_cache(&mut self) -> Result<(), EngineError> {
        if self.group.world_size() <= 1 {
            return Ok(());
        }
        let mine = (self.info.kv_cache.blocks as u64).to_le_bytes().to_vec();
        let leader = self
            .group
            .broadcast_bytes(if self.rank() == 0 { mine } else { Vec::new() })
            .map_err(ModelError::from)?;
        let leader: [u8; 8] = leader.try_into().map_err(|_| {
            ModelError::from(crate::comm::CommError::Failed {
                op: "kv cache size",
                reason: "the leader sent no block count".into(),
            })
        })?;
        let blocks = u64::from_le_bytes(leader) as usize;
        let info = &mut self.info.kv_cache;
        if blocks != info.blocks {
            tracing::info!(
                mine = info.blocks,
                leader = blocks,
                "KV cache resized to the leader's block count"
            );
            info.bytes = info.bytes / info.blocks * blocks;
            info.blocks = blocks;
            self.info.max_seq_len = self.info.max_seq_len.min(info.tokens());
            self.model.reserve_cache(blocks, info.block_size)?;
            self.scheduler = Scheduler::new(
                self.scheduler.config(),
                BlockManager::new(blocks, info.block_size),
            );
            self.stats.publish(&self.scheduler, 0, 0);
        }
        Ok(())
    }

    /// The prompt's token ids, or why the request cannot run.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        prompt_ids(&self.tokenizer, self.info.config.vocab_size, prompt)
    }

    /// Checks a request and returns its prompt ids.
    pub fn validate(&self, req: &GenerationRequest) -> Result<Vec<u32>, EngineError> {
        req.sampling.validate()?;
        for (what, k) in [
            ("logprobs", req.logprobs),
            ("prompt_logprobs", req.prompt_logprobs),
        ] {
            if let Some(k) = k
                && k > 20
            {
                return Err(EngineError::InvalidRequest(format!(
                    "{what}={k} is more than 20 alternatives"
                )));
            }
        }
        let ids = self.prompt_ids(&req.prompt)?;
        let max = self.info.max_seq_len;
        if ids.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if let Some(limit) = req.max_prompt_tokens
            && ids.len() > limit
        {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; this server accepts at most {limit}",
                ids.len()
            )));
        }
        let gen_min = usize::from(req.stopping.max_tokens != Some(0));
        if ids.len() + gen_min > max {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the context holds {max} (prompt plus at least one generated token)",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// Queues a request; its events come out of later [`Engine::step`]s.
    pub fn add(&mut self, request: GenerationRequest) -> Result<SeqId, EngineError> {
        // Prompt scoring needs every prompt position's logits, so it computes
        // the whole prompt rather than starting from cached blocks.
        let prefix_cache = request.prompt_logprobs.is_none();
        self.add_with(request, prefix_cache)
    }

    fn add_with(
        &mut self,
        request: GenerationRequest,
        prefix_cache: bool,
    ) -> Result<SeqId, EngineError> {
        let prompt = self.validate(&request)?;
        if let Some(name) = &request.adapter
            && !self.adapters.serves(name)
        {
            return Err(EngineError::UnknownAdapter(name.clone()));
        }
        let id = self.next_seq;
        self.next_seq += 1;
        let priority = request.priority;
        let adapter = request.adapter.clone();
        self.active.insert(
            id,
            Active::new(request, prompt.clone(), self.info.max_seq_len),
        );
        match adapter {
            None => self.scheduler.add(id, prompt, priority, prefix_cache),
            Some(name) => {
                self.adapters.hold(id, &name);
                match self.place_adapter(&name) {
                    Ok(true) => {
                        let root = self.adapters.root(&name);
                        self.scheduler
                            .add_under(id, prompt, priority, prefix_cache, root);
                    }
                    Ok(false) => self.waiting_for_adapter.push(adapters::WaitingForAdapter {
                        seq: id,
                        prompt,
                        priority,
                        prefix_cache,
                    }),
                    Err(e) => {
                        self.end(id);
                        return Err(e);
                    }
                }
                self.publish_adapters();
            }
        }
        self.stats.publish(&self.scheduler, 0, 0);
        Ok(id)
    }

    /// Drops a request (its caller went away) and frees its memory.
    pub fn cancel(&mut self, seq: SeqId) {
        self.end(seq);
        self.stats.publish(&self.scheduler, 0, 0);
    }

    /// Forgets `seq` everywhere: its state, its blocks, its hold on an adapter.
    fn end(&mut self, seq: SeqId) {
        self.active.remove(&seq);
        self.scheduler.remove(seq);
        self.waiting_for_adapter.retain(|w| w.seq != seq);
        self.release_adapter(seq);
    }

    /// Requests whose adapter now has a slot join the scheduler, in arrival
    /// order; one whose adapter cannot be loaded fails.
    fn admit_waiting_for_adapters(&mut self) -> Vec<StepEvent> {
        let mut failed = Vec::new();
        let waiting = std::mem::take(&mut self.waiting_for_adapter);
        for w in waiting {
            let Some(name) = self
                .active
                .get(&w.seq)
                .and_then(|a| a.request.adapter.clone())
            else {
                continue;
            };
            match self.place_adapter(&name) {
                Ok(true) => {
                    let root = self.adapters.root(&name);
                    self.scheduler
                        .add_under(w.seq, w.prompt, w.priority, w.prefix_cache, root);
                }
                Ok(false) => self.waiting_for_adapter.push(w),
                Err(e) => failed.push(StepEvent {
                    seq: w.seq,
                    event: EngineEvent::Error(e),
                }),
            }
        }
        for f in &failed {
            self.end(f.seq);
        }
        self.publish_adapters();
        failed
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        self.scheduler.has_work() || !self.waiting_for_adapter.is_empty()
    }

    /// Runs one forward pass over the scheduler's next batch and samples
    /// the sequences that reached their end. An error fails every request
    /// in flight (they are dropped); a group failure ends the engine.
    pub fn step(&mut self) -> Result<Vec<StepEvent>, EngineError> {
        match self.try_step() {
            Ok(events) => Ok(events),
            Err(e) => {
                let message = e.to_string();
                let group = self.ends_the_engine(&e);
                let ids: Vec<SeqId> = self.active.keys().copied().collect();
                for &id in &ids {
                    self.cancel(id);
                }
                if group {
                    return Err(e);
                }
                tracing::error!(error = %message, "engine step failed; its requests fail");
                Ok(ids
                    .into_iter()
                    .map(|seq| StepEvent {
                        seq,
                        event: EngineEvent::Error(EngineError::StepFailed(message.clone())),
                    })
                    .collect())
            }
        }
    }

    /// Whether a failed step ends the engine and its group (UNAVAILABLE, the group
    /// restarts) rather than only the requests it held.
    fn ends_the_engine(&self, e: &EngineError) -> bool {
        e.is_group_failure() || (self.device_failures_are_fatal && e.is_device_failure())
    }

    fn try_step(&mut self) -> Result<Vec<StepEvent>, EngineError> {
        let started = Instant::now();
        let mut events = if self.waiting_for_adapter.is_empty() {
            Vec::new()
        } else {
            self.admit_waiting_for_adapters()
        };
        let plan = self.scheduler.schedule();
        if plan.spans.is_empty() {
            return Ok(events);
        }
        let active = &mut self.active;
        let wants: Vec<LogitsFor> = plan
            .spans
            .iter()
            .map(|sp| {
                let a = active
                    .get_mut(&sp.seq)
                    .expect("scheduled sequences are active");
                if a.wants_prompt_scores() {
                    LogitsFor::Score(a.score_there(sp.start, sp.len, sp.completes))
                } else if sp.completes {
                    LogitsFor::Pick(a.pick_there())
                } else {
                    LogitsFor::None
                }
            })
            .collect();
        let scheduler = &self.scheduler;
        let adapters = &self.adapters;
        let spans: Vec<SeqSpan<'_>> = plan
            .spans
            .iter()
            .zip(wants)
            .map(|(sp, logits)| SeqSpan {
                tokens: &scheduler.tokens(sp.seq)[sp.start..sp.start + sp.len],
                start_pos: sp.start,
                blocks: scheduler.block_table(sp.seq),
                logits,
                adapter: adapters.of_seq(sp.seq).map(|(slot, _)| slot),
            })
            .collect();
        if self.group.world_size() > 1 {
            let message = group::GroupMessage::step(&spans);
            group::announce(self.group.as_ref(), &message).map_err(ModelError::from)?;
        }
        let forward_started = Instant::now();
        let output = pool::forward(self.model.as_mut(), &spans)?;
        let forward = forward_started.elapsed();
        drop(spans);
        self.scheduler.complete(&plan);

        let outputs = output.scores.into_iter().zip(output.picked);
        for (span, (scores, picked)) in plan.spans.iter().zip(outputs) {
            let active = self
                .active
                .get_mut(&span.seq)
                .expect("scheduled sequences are active");
            if !scores.is_empty() {
                active.record_prompt_scores(span.start, scores);
            }
            let Some(picked) = picked.filter(|_| span.completes) else {
                continue;
            };
            match active.advance(picked, &self.tokenizer) {
                Advance::Token(token) => {
                    self.scheduler.append(span.seq, token.id);
                    events.push(StepEvent {
                        seq: span.seq,
                        event: EngineEvent::Token(token),
                    });
                }
                Advance::Finished { last, finished } => {
                    if let Some(token) = last {
                        events.push(StepEvent {
                            seq: span.seq,
                            event: EngineEvent::Token(token),
                        });
                    }
                    events.push(StepEvent {
                        seq: span.seq,
                        event: EngineEvent::Finished(finished),
                    });
                    self.end(span.seq);
                }
            }
        }
        self.stats
            .publish(&self.scheduler, plan.spans.len(), plan.tokens());
        self.stats.add_step_time(started.elapsed(), forward);
        Ok(events)
    }

    /// Runs one request to its end, calling `sink` with each token. For
    /// callers that run requests one at a time (the command line, tests):
    /// requests added with [`Engine::add`] run alongside, but their events
    /// are dropped.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        sink: &mut dyn FnMut(TokenEvent) -> Flow,
    ) -> Result<Option<Finished>, EngineError> {
        let id = self.add(req.clone())?;
        self.run_alone(id, sink)
    }

    fn run_alone(
        &mut self,
        id: SeqId,
        sink: &mut dyn FnMut(TokenEvent) -> Flow,
    ) -> Result<Option<Finished>, EngineError> {
        loop {
            for StepEvent { seq, event } in self.step()? {
                if seq != id {
                    continue;
                }
                match event {
                    EngineEvent::Token(token) => {
                        if sink(token) == Flow::Cancel {
                            self.cancel(id);
                            return Ok(None);
                        }
                    }
                    EngineEvent::Finished(finished) => return Ok(Some(finished)),
                    EngineEvent::Error(e) => return Err(e),
                }
            }
            if !self.active.contains_key(&id) {
                return Err(EngineError::Stopped);
            }
        }
    }

    /// This rank's position in its group.
    pub fn rank(&self) -> usize {
        self.group.rank().0
    }

    /// A follower rank's life: run the leader's steps on this shard until it
    /// stops (`Ok`) or the group breaks (`Err`, the process should exit).
    pub fn follow(mut self) -> Result<(), EngineError> {
        group::follow(self.model.as_mut(), self.group.as_ref())
    }

    /// Leader, while idle: tells the followers it is alive (and learns
    /// whether they are).
    pub fn heartbeat(&mut self) -> Result<(), EngineError> {
        if self.group.world_size() > 1 {
            group::announce(self.group.as_ref(), &group::GroupMessage::Heartbeat)
                .map_err(ModelError::from)?;
        }
        Ok(())
    }

    /// Leader: tells the followers to exit (best effort; they also exit when
    /// the leader's connections close).
    pub fn stop_group(&mut self) {
        if self.group.world_size() > 1 && self.group.rank().0 == 0 {
            let _ = group::announce(self.group.as_ref(), &group::GroupMessage::Stop);
            // Once: the followers are gone after this.
            self.group = Arc::new(SingleRank);
        }
    }

    /// For benchmarks: runs `prompt` alone, then `new_tokens` greedy decode
    /// steps (one forward pass each). `on_phase` is called when each phase
    /// ends, with the time spent in collectives so far, so the caller can
    /// time them. Returns the generated ids.
    pub fn run_fixed(
        &mut self,
        prompt: &[u32],
        new_tokens: usize,
        on_phase: impl FnMut(BenchPhase, EngineTime),
    ) -> Result<Vec<u32>, EngineError> {
        let greedy = SamplingParams::default();
        let mut out =
            self.run_fixed_batch(&[prompt.to_vec()], &[], &greedy, new_tokens, on_phase)?;
        Ok(out.pop().unwrap_or_default())
    }

    /// For benchmarks: `prompts` together, as one batch: every prompt is
    /// prefilled (in chunks, several per step), then `new_tokens` decode steps
    /// run over all of them, each picking its tokens as `sampling` says (sequence
    /// `i` seeded with `i` when it has no seed). `on_phase` marks the end of the
    /// prefill (every sequence has its first token) and of the decode.
    /// Prompt `i` runs on adapter `adapters[i % adapters.len()]` (none when
    /// `adapters` is empty).
    pub fn run_fixed_batch(
        &mut self,
        prompts: &[Vec<u32>],
        adapters: &[String],
        sampling: &SamplingParams,
        new_tokens: usize,
        mut on_phase: impl FnMut(BenchPhase, EngineTime),
    ) -> Result<Vec<Vec<u32>>, EngineError> {
        let mut ids = Vec::with_capacity(prompts.len());
        for (i, prompt) in prompts.iter().enumerate() {
            if prompt.is_empty() || prompt.len() + new_tokens + 1 > self.info.max_seq_len {
                return Err(EngineError::InvalidRequest(format!(
                    "{} prompt and {new_tokens} generated tokens do not fit the context of {}",
                    prompt.len(),
                    self.info.max_seq_len
                )));
            }
            let mut request = GenerationRequest::new(Prompt::Ids(prompt.clone()));
            request.sampling = SamplingParams {
                seed: sampling.seed.or(Some(i as u64)),
                ..sampling.clone()
            };
            // The prefill's token, then one per decode step.
            request.stopping.max_tokens = Some(new_tokens + 1);
            request.stopping.ignore_eos = true;
            request.adapter = (!adapters.is_empty()).then(|| adapters[i % adapters.len()].clone());
            // Repetitions of one prompt must compute it every time.
            ids.push(self.add_with(request, false)?);
        }
        let mut started = 0;
        let mut done = std::collections::HashMap::new();
        while done.len() < ids.len() {
            for StepEvent { seq, event } in self.step()? {
                match event {
                    EngineEvent::Token(_) => {}
                    EngineEvent::Finished(f) => {
                        done.insert(seq, f.token_ids);
                    }
                    EngineEvent::Error(e) => return Err(e),
                }
            }
            if started < ids.len() {
                started = ids.iter().filter(|id| self.started(**id)).count();
                if started == ids.len() {
                    on_phase(BenchPhase::Prefilled, self.time_spent());
                }
            }
            if !self.has_work() && done.len() < ids.len() {
                return Err(EngineError::Stopped);
            }
        }
        on_phase(BenchPhase::Decoded, self.time_spent());
        Ok(ids
            .iter()
            .map(|id| {
                let mut out = done.remove(id).unwrap_or_default();
                out.truncate(new_tokens);
                out
            })
            .collect())
    }

    /// Where this rank's time has gone since it started.
    pub fn time_spent(&self) -> EngineTime {
        let stats = self.stats.snapshot();
        EngineTime {
            steps: stats.steps,
            step: Duration::from_nanos(stats.step_nanos),
            forward: Duration::from_nanos(stats.forward_nanos),
            comm: self.group.time_spent(),
        }
    }

    /// Whether a sequence has sampled its first token (or ended).
    fn started(&self, seq: SeqId) -> bool {
        self.active.get(&seq).is_none_or(|a| a.generated() > 0)
    }
}

/// Where an engine's time has gone, summed since it started ([`Engine::time_spent`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineTime {
    /// Forward steps run.
    pub steps: u64,
    /// In those steps, from scheduling to the tokens handed out.
    pub step: Duration,
    /// In their forward passes (within `step`); the rest of `step` is the engine's
    /// own work, which on a GPU the device waits for.
    pub forward: Duration,
    /// In collectives, waiting for peers included (within `forward`).
    pub comm: Duration,
}

impl EngineTime {
    /// The time from `earlier` to `self`.
    pub fn since(&self, earlier: &EngineTime) -> EngineTime {
        EngineTime {
            steps: self.steps.saturating_sub(earlier.steps),
            step: self.step.saturating_sub(earlier.step),
            forward: self.forward.saturating_sub(earlier.forward),
            comm: self.comm.saturating_sub(earlier.comm),
        }
    }
}

/// Phases of `Engine::run_fixed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchPhase {
    Prefilled,
    Decoded,
}

/// Hands the heap freed while loading (tensors copied out of the file, then rearranged
/// for the kernels) back to the system, so a loaded model's resident memory is what it
/// keeps, not its loading peak.
///
/// Then fixes the allocator's thresholds: a step's activations (a 512-token prompt's
/// products take megabytes each) are allocated and freed every step, and above glibc's
/// mmap threshold each one is a fresh mapping the kernel zeroes page by page (6x the
/// page faults, a fifth of a long prefill). Kept on the heap and not trimmed, the same
/// pages serve every step; the explicit trim above still returns the loading peak.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; mallopt only
    // sets the allocator's thresholds.
    unsafe {
        libc::malloc_trim(0);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(test)]
mod tests;
