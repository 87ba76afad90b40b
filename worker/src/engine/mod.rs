//! The engine: a model, its tokenizer and its KV cache, running requests.
//!
//! `Engine` is synchronous and owns everything it touches; it runs on its own
//! thread (`EngineHandle`), fed by a channel from the async gRPC side, so
//! matrix maths never blocks a tokio worker. One request runs at a time for
//! now; the batching issue replaces the loop with a scheduler over the same
//! `Transformer::forward`.

mod group;
mod handle;
mod request;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;

pub use handle::{EngineEvent, EngineHandle, EngineLoad};
pub use request::{
    FinishReason, Finished, GenerationRequest, LogprobEntry, Prompt, Stopping, TokenEvent,
};

use crate::comm::{Collective, SingleRank};
use crate::kv::{KvCache, SlotId};
use crate::model::{HfCheckpoint, LogitsFor, ModelConfig, ModelError, SeqSpan, Transformer};
use crate::sampling::{Sampler, SamplingError, StopMatcher, logprobs_of};
use crate::tokenizer::{IncrementalDetokenizer, Tokenizer, TokenizerError};
use crate::weights::{GgufFile, TensorSource, WeightsError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The request cannot run as asked; the message says which part and why.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the engine has stopped")]
    Stopped,
}

impl EngineError {
    /// Whether the tensor-parallel group broke (a rank died or stalled): the
    /// request may succeed on another group, this one cannot go on.
    pub fn is_group_failure(&self) -> bool {
        matches!(self, EngineError::Model(ModelError::Comm(_)))
    }
}

impl From<candle_core::Error> for EngineError {
    fn from(source: candle_core::Error) -> Self {
        EngineError::Model(ModelError::Candle { source })
    }
}

/// Limits of the engine, set at start-up.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Longest sequence (prompt + generation); `None` = the model's trained context.
    pub max_seq_len: Option<usize>,
    /// Prompt tokens per forward step, so a long prompt runs in bounded memory.
    pub prefill_chunk: usize,
    /// Name clients use for the model; defaults to the file's stem.
    pub served_model_name: Option<String>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_seq_len: None,
            prefill_chunk: 512,
            served_model_name: None,
        }
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
}

pub struct Engine {
    model: Transformer,
    tokenizer: Arc<Tokenizer>,
    kv: KvCache,
    info: ModelInfo,
    prefill_chunk: usize,
    /// This rank's group; the leader announces each step to the others.
    group: Arc<dyn Collective>,
    /// Slots freed since the last announced step.
    pending_free: Vec<SlotId>,
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
        Self::load_rank(path, options, Arc::new(SingleRank), Device::Cpu)
    }

    /// Loads this rank's shard of a model: a GGUF file, or a Hugging Face
    /// directory (`config.json`, safetensors, `tokenizer.json` and
    /// `tokenizer_config.json`).
    pub fn load_rank(
        path: &Path,
        options: &EngineOptions,
        comm: Arc<dyn Collective>,
        device: Device,
    ) -> Result<Self, EngineError> {
        let world = comm.world_size();
        let (model, tokenizer, format) = if path.is_dir() {
            let checkpoint = HfCheckpoint::open(path)?;
            let tokenizer = hf_tokenizer(path)?;
            let model = Transformer::from_hf(&checkpoint, comm.clone(), device.clone())?;
            (model, tokenizer, checkpoint.format())
        } else {
            let file = GgufFile::open(path)?;
            let tokenizer = Tokenizer::from_gguf(file.metadata())?;
            let model = Transformer::from_gguf(&file, comm.clone(), device.clone())?;
            (model, tokenizer, file.format())
        };
        let tokenizer = Arc::new(tokenizer);
        let config = model.config().clone();
        let max_seq_len = options
            .max_seq_len
            .map_or(config.max_position, |m| m.min(config.max_position));
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
        };
        let kv = KvCache::new(model.kv_shape());
        Ok(Self {
            model,
            tokenizer,
            kv,
            info,
            prefill_chunk: options.prefill_chunk.max(1),
            group: comm,
            pending_free: Vec::new(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Bytes of KV cache in use (0 between requests).
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// The prompt's token ids, or why the request cannot run.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let ids = match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text, true, true)?,
            Prompt::Chat(messages) => {
                let template = self.tokenizer.chat_template().ok_or_else(|| {
                    EngineError::InvalidRequest(
                        "this model has no chat template; send a text prompt".into(),
                    )
                })?;
                let text = template.render(messages, true)?;
                self.tokenizer.encode(&text, false, true)?
            }
            Prompt::Ids(ids) => ids.clone(),
        };
        let vocab = self.info.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "prompt token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        Ok(ids)
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
        let gen_min = usize::from(req.stopping.max_tokens != Some(0));
        if ids.len() + gen_min > max {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens; the context holds {max} (prompt plus at least one generated token)",
                ids.len()
            )));
        }
        Ok(ids)
    }

    /// Runs one request to its end, calling `sink` with each token.
    pub fn generate(
        &mut self,
        req: &GenerationRequest,
        sink: &mut dyn FnMut(TokenEvent) -> Flow,
    ) -> Result<Option<Finished>, EngineError> {
        let prompt = self.validate(req)?;
        let slot = self.kv.allocate();
        let result = self.run(req, prompt, slot, sink);
        self.release(slot);
        result
    }

    fn run(
        &mut self,
        req: &GenerationRequest,
        prompt: Vec<u32>,
        slot: SlotId,
        sink: &mut dyn FnMut(TokenEvent) -> Flow,
    ) -> Result<Option<Finished>, EngineError> {
        let (mut logits, prompt_logprobs) = self.prefill(&prompt, slot, req.prompt_logprobs)?;
        let max_seq = self.info.max_seq_len;
        let budget = (max_seq - prompt.len()).min(req.stopping.max_tokens.unwrap_or(usize::MAX));
        let mut sampler = Sampler::new(req.sampling.clone());
        let mut detok = IncrementalDetokenizer::new();
        let mut stops = StopMatcher::new(req.stopping.stop.clone());
        let mut generated: Vec<u32> = Vec::new();
        let mut text = String::new();
        let mut matched_stop = None;
        let tokenizer = self.tokenizer.clone();
        let eog = tokenizer.eog_ids();
        let reason = loop {
            if generated.len() >= budget {
                break if req
                    .stopping
                    .max_tokens
                    .is_some_and(|m| generated.len() >= m)
                {
                    FinishReason::Length
                } else {
                    FinishReason::Context
                };
            }
            let Some(row) = logits.as_ref() else {
                break FinishReason::Length;
            };
            let id = sampler.sample(row, &prompt, &generated);
            if (!req.stopping.ignore_eos && eog.contains(&id))
                || req.stopping.stop_token_ids.contains(&id)
            {
                break FinishReason::Stop;
            }
            let logprob = req.logprobs.map(|k| {
                let (token, top) = logprobs_of(row, id, k);
                LogprobEntry { token, top }
            });
            generated.push(id);
            let step = stops.push(&detok.push(&tokenizer, id));
            text.push_str(&step.emit);
            let stopped = step.matched.is_some();
            matched_stop = step.matched;
            if sink(TokenEvent {
                id,
                text_delta: step.emit,
                logprob,
            }) == Flow::Cancel
            {
                return Ok(None);
            }
            if stopped {
                break FinishReason::Stop;
            }
            if generated.len() < budget {
                let pos = prompt.len() + generated.len() - 1;
                logits = self.step(&[id], pos, slot, LogitsFor::Last)?.pop();
            }
        };
        let mut text_tail = String::new();
        if matched_stop.is_none() {
            let step = stops.push(&detok.finish());
            text_tail = step.emit + &stops.flush();
            text.push_str(&text_tail);
        }
        Ok(Some(Finished {
            reason,
            prompt_token_ids: prompt,
            token_ids: generated,
            text,
            text_tail,
            prompt_logprobs,
            matched_stop,
        }))
    }

    /// Runs the prompt through the model in chunks; returns the next-token
    /// logits and, when asked, the prompt tokens' log-probabilities.
    #[allow(clippy::type_complexity)]
    fn prefill(
        &mut self,
        prompt: &[u32],
        slot: SlotId,
        top_k: Option<usize>,
    ) -> Result<(Option<Vec<f32>>, Option<Vec<Option<LogprobEntry>>>), EngineError> {
        let mut scores = top_k.map(|_| vec![None]);
        let mut last = None;
        let mut pos = 0;
        for chunk in prompt.chunks(self.prefill_chunk) {
            let end = pos + chunk.len() == prompt.len();
            let want = match (top_k.is_some(), end) {
                (true, _) => LogitsFor::All,
                (false, true) => LogitsFor::Last,
                (false, false) => LogitsFor::None,
            };
            let logits = self.step(chunk, pos, slot, want)?;
            if let (Some(k), Some(scores)) = (top_k, scores.as_mut()) {
                // Row i predicts token pos+i+1.
                for (i, row) in logits.iter().enumerate() {
                    if let Some(&next) = prompt.get(pos + i + 1) {
                        let (token, top) = logprobs_of(row, next, k);
                        scores.push(Some(LogprobEntry { token, top }));
                    }
                }
            }
            last = logits.into_iter().last();
            pos += chunk.len();
        }
        Ok((last, scores))
    }

    /// One forward step of `tokens` at `pos`; returns the requested logits rows.
    fn step(
        &mut self,
        tokens: &[u32],
        pos: usize,
        slot: SlotId,
        want: LogitsFor,
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let span = SeqSpan {
            tokens,
            start_pos: pos,
            slot,
            logits: want,
        };
        if self.group.world_size() > 1 {
            let free = std::mem::take(&mut self.pending_free);
            let message = group::GroupMessage::step(free, std::slice::from_ref(&span));
            group::announce(self.group.as_ref(), &message).map_err(ModelError::from)?;
        }
        // The whole step runs on a compute-pool thread: its parallel products
        // then fork from inside the pool instead of waking it once per product.
        let (model, kv) = (&self.model, &mut self.kv);
        let out = rayon::scope(|_| model.forward(std::slice::from_ref(&span), kv))?;
        Ok(out.into_iter().next().unwrap_or_default())
    }

    /// Frees a sequence's cache here and, with the next step, on the followers.
    fn release(&mut self, slot: SlotId) {
        self.kv.free(slot);
        if self.group.world_size() > 1 {
            self.pending_free.push(slot);
        }
    }

    /// Time this rank has spent in collectives (waiting for peers included).
    pub fn comm_time(&self) -> std::time::Duration {
        self.group.time_spent()
    }

    /// This rank's position in its group.
    pub fn rank(&self) -> usize {
        self.group.rank().0
    }

    /// A follower rank's life: run the leader's steps on this shard until it
    /// stops (`Ok`) or the group breaks (`Err`, the process should exit).
    pub fn follow(mut self) -> Result<(), EngineError> {
        group::follow(&self.model, &mut self.kv, self.group.as_ref())
    }

    /// Leader, while idle: tells the followers it is alive (and learns
    /// whether they are).
    pub fn heartbeat(&mut self) -> Result<(), EngineError> {
        if self.group.world_size() > 1 {
            let free = std::mem::take(&mut self.pending_free);
            let message = if free.is_empty() {
                group::GroupMessage::Heartbeat
            } else {
                group::GroupMessage::step(free, &[])
            };
            group::announce(self.group.as_ref(), &message).map_err(ModelError::from)?;
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

    /// For benchmarks: prefills `prompt` on a fresh slot, then runs `gen`
    /// greedy decode steps (one forward pass each). `on_phase` is called when
    /// each phase ends, so the caller can time them. Returns the generated ids.
    pub fn run_fixed(
        &mut self,
        prompt: &[u32],
        new_tokens: usize,
        mut on_phase: impl FnMut(BenchPhase, std::time::Duration),
    ) -> Result<Vec<u32>, EngineError> {
        if prompt.is_empty() || prompt.len() + new_tokens > self.info.max_seq_len {
            return Err(EngineError::InvalidRequest(format!(
                "{} prompt and {new_tokens} generated tokens do not fit the context of {}",
                prompt.len(),
                self.info.max_seq_len
            )));
        }
        let slot = self.kv.allocate();
        let result = (|| {
            let (mut logits, _) = self.prefill(prompt, slot, None)?;
            on_phase(BenchPhase::Prefilled, self.group.time_spent());
            let mut out = Vec::with_capacity(new_tokens);
            for i in 0..new_tokens {
                let row = logits.take().ok_or(EngineError::Stopped)?;
                let id = crate::sampling::argmax(&row);
                out.push(id);
                logits = self
                    .step(&[id], prompt.len() + i, slot, LogitsFor::Last)?
                    .pop();
            }
            on_phase(BenchPhase::Decoded, self.group.time_spent());
            Ok(out)
        })();
        self.release(slot);
        result
    }
}

/// Phases of `Engine::run_fixed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchPhase {
    Prefilled,
    Decoded,
}
