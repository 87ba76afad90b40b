//! The Llama-family transformer (Llama, SmolLM, Mistral, Qwen2), built from
//! parallel-ready layers so that a rank computes only its shard.
//!
//! `Transformer::forward` takes a batch of token spans, each with its first
//! position and its KV cache block table, runs the linear layers once over
//! all their tokens, attention per span, and returns the logits each span
//! asked for.

mod attention;
pub mod backend;
mod causal;
mod config;
mod exp;
mod hf;
mod layers;
mod lora;
mod rope;
mod rows;

use std::collections::BTreeMap;
use std::sync::Arc;

use backend::Downloaded;
pub use backend::{
    Backend, CacheDtype, Host, Pick, Picked, SpanLogits, StepOutput, Tensors, TokenScores,
};
pub use config::{ModelConfig, RopeConfig, RopeScaling, RopeStyle};
pub use hf::HfCheckpoint;
pub use layers::LoadContext;

use crate::comm::{Collective, CommError};
use crate::kv::{BlockId, KvShape};
use crate::lora::Adapter;
use crate::weights::{GgufFile, Split, TensorSource, WeightsError};
use attention::Attention;
pub(crate) use attention::HeadRows;
use backend::StepLayout;
use layers::{RmsNorm, RowParallelLinear, StackedColumns};
use lora::{LoadedAdapter, Site, StepAdapters};
use rope::Rope;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("architecture '{architecture}' is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        architecture: String,
        supported: String,
    },
    #[error("{path}: key '{key}' is {problem}")]
    Config {
        path: std::path::PathBuf,
        key: String,
        problem: String,
    },
    #[error("cannot split the model over tensor={world} ranks: {reason}")]
    ImpossibleSplit { world: usize, reason: String },
    #[error("tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error("adapter slot {slot} is not loaded on this rank")]
    UnknownAdapter { slot: u32 },
    #[error("model computation failed: {source}")]
    Candle {
        #[from]
        source: candle_core::Error,
    },
}

/// Rows of logits the output head computes at once: a prompt scored whole would
/// otherwise hold `[tokens, vocab]` f32 (2 GiB for 4096 tokens of a 128k vocabulary).
pub const HEAD_ROWS: usize = 256;

/// Which logits a span wants back.
#[derive(Clone, Debug, PartialEq)]
pub enum LogitsFor {
    /// Only its last token's (the next-token distribution).
    Last,
    /// Only a token picked from its last token's, the best or one drawn ([`Pick`];
    /// nothing on the host reads the row): a device backend picks it there and
    /// downloads the id (and the log-probabilities asked for), not the row.
    Pick(Pick),
    /// Every token's.
    All,
    /// Prompt scoring where the logits are ([`Score`]): a device backend downloads
    /// log-probabilities, not rows.
    Score(Score),
    /// None (a chunk of a prompt whose end comes in a later step).
    None,
}

/// A prompt span scored where its logits are: row `i` gets the log-probability of
/// `next[i]` (the prompt's token it predicts) and the `k` most likely tokens'; when
/// the span ends the prompt, its last row predicts no prompt token (`next` is one
/// shorter than the span) and the first generated one is picked from it (`pick`).
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    pub next: Vec<u32>,
    pub k: usize,
    pub pick: Option<Pick>,
}

/// A run of consecutive tokens of one sequence.
#[derive(Clone, Debug)]
pub struct SeqSpan<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in its sequence; the cache holds `0..start_pos`.
    pub start_pos: usize,
    /// The cache blocks of the sequence's positions, in order; enough for
    /// `start_pos + tokens.len()` positions.
    pub blocks: &'a [BlockId],
    pub logits: LogitsFor,
    /// The LoRA adapter (its slot, see [`Transformer::load_adapter`]) the
    /// sequence runs with; `None`: the base model.
    pub adapter: Option<u32>,
}

#[derive(Debug)]
struct Block<B: Backend> {
    attn_norm: RmsNorm<B>,
    attn: Attention<B>,
    mlp_norm: RmsNorm<B>,
    /// Gate and up, stacked.
    gate_up: StackedColumns<B>,
    down: RowParallelLinear<B>,
}

/// One rank's shard of the model, on backend `B` (the CPU kernels by default).
#[derive(Debug)]
pub struct Transformer<B: Backend = Host> {
    config: ModelConfig,
    /// The token embedding, replicated on every rank (read, and the tied head).
    embed: B::Matrix,
    blocks: Vec<Block<B>>,
    norm: RmsNorm<B>,
    /// `None` when the output head is the token embedding.
    head: Option<B::Matrix>,
    /// Every layer rotates by the same positions.
    rope: Rope,
    backend: B,
    /// This rank's place in its group (adapters are cut like the base).
    rank: usize,
    world: usize,
    /// LoRA adapters by slot, each this rank's shard.
    adapters: BTreeMap<u32, LoadedAdapter<B>>,
}

impl<B: Backend> Transformer<B> {
    /// Loads this rank's shard of a GGUF model.
    pub fn from_gguf(
        file: &GgufFile,
        comm: Arc<dyn Collective>,
        backend: B,
    ) -> Result<Self, ModelError> {
        Self::load(file, ModelConfig::from_gguf(file)?, comm, backend)
    }

    /// Loads this rank's shard of a Hugging Face checkpoint.
    pub fn from_hf(
        checkpoint: &HfCheckpoint,
        comm: Arc<dyn Collective>,
        backend: B,
    ) -> Result<Self, ModelError> {
        Self::load(checkpoint, checkpoint.config().clone(), comm, backend)
    }

    /// Loads this rank's shard of the model `config` describes from `file`
    /// (tensors by their canonical GGUF names).
    pub fn load(
        file: &dyn TensorSource,
        config: ModelConfig,
        comm: Arc<dyn Collective>,
        backend: B,
    ) -> Result<Self, ModelError> {
        config.check_split(comm.world_size())?;
        let (rank, world) = (comm.rank().0, comm.world_size());
        let ctx = LoadContext {
            file,
            comm,
            backend: &backend,
        };
        let embed = ctx.matrix("token_embd.weight", &Split::Full)?;
        let dims = B::dims(&embed);
        if dims != [config.vocab_size, config.hidden_size] {
            return Err(ModelError::Shape {
                tensor: "token_embd.weight".into(),
                found: dims.to_vec(),
                expected: vec![config.vocab_size, config.hidden_size],
            });
        }
        let blocks = (0..config.num_layers)
            .map(|i| {
                let p = format!("blk.{i}");
                Ok(Block {
                    attn_norm: RmsNorm::load(
                        &ctx,
                        &format!("{p}.attn_norm.weight"),
                        config.rms_eps,
                    )?,
                    attn: Attention::load(&ctx, &p, &config)?,
                    mlp_norm: RmsNorm::load(&ctx, &format!("{p}.ffn_norm.weight"), config.rms_eps)?,
                    gate_up: StackedColumns::load(
                        &ctx,
                        &[
                            (
                                format!("{p}.ffn_gate"),
                                ctx.even_rows(&format!("{p}.ffn_gate.weight"))?,
                            ),
                            (
                                format!("{p}.ffn_up"),
                                ctx.even_rows(&format!("{p}.ffn_up.weight"))?,
                            ),
                        ],
                        false,
                    )?,
                    down: RowParallelLinear::load_even(&ctx, &format!("{p}.ffn_down"))?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = RmsNorm::load(&ctx, "output_norm.weight", config.rms_eps)?;
        let head = if config.tied_embeddings {
            None
        } else {
            Some(ctx.matrix("output.weight", &Split::Full)?)
        };
        let rope = Rope::new(&config.rope);
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            head,
            rope,
            backend,
            rank,
            world,
            adapters: BTreeMap::new(),
        })
    }

    /// Makes `adapter` (this rank's shard of it) available to spans naming `slot`,
    /// replacing what the slot held.
    pub fn load_adapter(&mut self, slot: u32, adapter: &Adapter) -> Result<(), ModelError> {
        let shard = adapter.shard(&self.config, self.rank, self.world);
        let loaded = LoadedAdapter::new(&self.backend, &shard)?;
        self.adapters.insert(slot, loaded);
        Ok(())
    }

    pub fn unload_adapter(&mut self, slot: u32) {
        self.adapters.remove(&slot);
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The cache shape this rank needs.
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.config.num_layers,
            kv_heads: self.blocks.first().map_or(0, |b| b.attn.local_kv_heads()),
            head_dim: self.config.head_dim,
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A zeroed KV cache of `blocks` blocks of `block_size` positions for this shard.
    pub fn new_cache(
        &self,
        blocks: usize,
        block_size: usize,
    ) -> Result<B::Cache, crate::kv::KvCacheTooLarge> {
        self.backend.new_cache(self.kv_shape(), blocks, block_size)
    }

    /// Runs one step over `spans`, writing their keys and values into `kv`.
    /// Returns, per span, the logits rows it asked for (one, one per token,
    /// or none), each over the whole vocabulary, or its best id.
    pub fn forward(
        &self,
        spans: &[SeqSpan<'_>],
        kv: &mut B::Cache,
    ) -> Result<StepOutput, ModelError> {
        let layout = StepLayout::new(spans);
        if layout.ids.is_empty() {
            return Ok(StepOutput {
                logits: vec![Vec::new(); spans.len()],
                scores: vec![Vec::new(); spans.len()],
                picked: vec![None; spans.len()],
            });
        }
        let b = &self.backend;
        let adapters = if spans.iter().any(|s| s.adapter.is_some()) {
            let mut offset = 0;
            StepAdapters::new(
                &self.adapters,
                spans.iter().map(|s| {
                    let rows = offset..offset + s.tokens.len();
                    offset = rows.end;
                    (s.adapter, rows)
                }),
            )?
        } else {
            StepAdapters::none()
        };
        // A decode step (a token a span, every span wanting its row) of one rank
        // without adapters has the same launches for every step of its shape: a backend
        // may record it and replay the recording.
        let replayable = adapters.is_none()
            && self.world == 1
            && layout.ids.len() == spans.len()
            && layout.wanted.len() == spans.len();
        let wants_rows = !layout.wanted.is_empty();
        let mut layers =
            |step: &B::Step<'_>, kv: &mut B::Cache| self.layers(step, kv, &adapters, wants_rows);
        let h = b.run_layers(&layout, &self.rope, kv, replayable, &mut layers)?;
        // Every row any span wants, gathered so the head runs once per step.
        let got = match h {
            None => Downloaded::default(),
            Some(h) => self.head_in_chunks(&h, &layout)?,
        };
        let mut picked = vec![None; spans.len()];
        for (&span, p) in layout.picked_spans.iter().zip(got.picked) {
            picked[span] = Some(p);
        }
        let (mut rows, mut scores) = (got.rows.into_iter(), got.scores.into_iter());
        Ok(StepOutput {
            logits: layout
                .counts
                .iter()
                .map(|&n| rows.by_ref().take(n).collect())
                .collect(),
            scores: layout
                .scored_counts
                .iter()
                .map(|&n| scores.by_ref().take(n).collect())
                .collect(),
            picked,
        })
    }
}

impl<B: Backend> Transformer<B> {
    /// A step's device work: the embedding, every layer, and the final norm of the rows
    /// whose logits are wanted (`None` when none are).
    fn layers(
        &self,
        step: &B::Step<'_>,
        kv: &mut B::Cache,
        adapters: &StepAdapters<'_, B>,
        wants_rows: bool,
    ) -> Result<Option<B::Hidden>, ModelError> {
        let b = &self.backend;
        let mut x = b.embed(&self.embed, step)?;
        // Each residual connection and the norm after it go together (one kernel on
        // the device backend); the last layer's output is normed only where wanted.
        let mut normed_next = None;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = match normed_next.take() {
                Some(h) => h,
                None => block.attn_norm.forward(b, &x, block.attn.input_weight())?,
            };
            let a = block.attn.forward(b, &h, layer, step, kv, adapters)?;
            let normed =
                block
                    .mlp_norm
                    .forward_after_add(b, &mut x, &a, block.gate_up.first_weight())?;
            let gate_up = block
                .gate_up
                .forward(b, &normed, &adapters.at(layer, Site::GateUp))?;
            let activated = b.swiglu(&gate_up, block.down.weight())?;
            let m = block
                .down
                .forward(b, &activated, &adapters.at(layer, Site::Down))?;
            match self.blocks.get(layer + 1) {
                Some(next) => {
                    normed_next = Some(next.attn_norm.forward_after_add(
                        b,
                        &mut x,
                        &m,
                        next.attn.input_weight(),
                    )?)
                }
                None => b.add(&mut x, &m)?,
            }
        }
        if !wants_rows {
            return Ok(None);
        }
        let head = self.head.as_ref().unwrap_or(&self.embed);
        Ok(Some(self.norm.forward(
            b,
            &b.wanted_rows(&x, step)?,
            head,
        )?))
    }

    /// The output head over the normed wanted rows `h`, [`HEAD_ROWS`] at a time, each
    /// chunk's logits downloaded (scored, picked) before the next is computed.
    fn head_in_chunks(
        &self,
        h: &B::Hidden,
        layout: &StepLayout<'_>,
    ) -> Result<Downloaded, ModelError> {
        let b = &self.backend;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let n = layout.wanted.len();
        let scored_from = n - layout.scored.len() - layout.picks.len();
        let picked_from = n - layout.picks.len();
        let mut got = Downloaded::default();
        for start in (0..n).step_by(HEAD_ROWS) {
            let end = (start + HEAD_ROWS).min(n);
            // This chunk's share of the wanted rows' three parts.
            let part = |from: usize, to: usize| {
                let first = from.max(start).min(to);
                first..to.min(end).max(first)
            };
            let whole = part(0, scored_from);
            let scored = part(scored_from, picked_from);
            let picked = part(picked_from, n);
            let chunk;
            let rows = if (start, end) == (0, n) {
                h
            } else {
                chunk = b.rows(h, start, end - start)?;
                &chunk
            };
            let part = b.download(
                &b.linear(rows, head, None)?,
                whole.len(),
                &layout.scored[scored.start - scored_from..scored.end - scored_from],
                &layout.picks[picked.start - picked_from..picked.end - picked_from],
            )?;
            got.rows.extend(part.rows);
            got.scores.extend(part.scores);
            got.picked.extend(part.picked);
        }
        Ok(got)
    }
}

impl<'a> StepLayout<'a> {
    fn new(spans: &'a [SeqSpan<'a>]) -> Self {
        let mut layout = StepLayout {
            spans,
            ids: Vec::new(),
            positions: Vec::new(),
            wanted: Vec::new(),
            counts: Vec::with_capacity(spans.len()),
            scored_counts: Vec::with_capacity(spans.len()),
            scored: Vec::new(),
            picked_spans: Vec::new(),
            picks: Vec::new(),
        };
        let (mut scored_rows, mut picked_rows) = (Vec::new(), Vec::new());
        for (i, span) in spans.iter().enumerate() {
            let (offset, n) = (layout.ids.len(), span.tokens.len());
            layout.ids.extend_from_slice(span.tokens);
            layout.positions.extend(span.start_pos..span.start_pos + n);
            // (rows downloaded whole, rows scored with their ids, the pick of the last row)
            let (rows, scored, pick) = match &span.logits {
                LogitsFor::Last if n > 0 => (offset + n - 1..offset + n, &[][..], None),
                LogitsFor::All => (offset..offset + n, &[][..], None),
                LogitsFor::Pick(p) if n > 0 => (0..0, &[][..], Some(p)),
                LogitsFor::Score(score) => {
                    let next = &score.next[..score.next.len().min(n)];
                    let pick = score.pick.as_ref().filter(|_| next.len() < n);
                    layout.scored.extend(next.iter().map(|&id| (id, score.k)));
                    (0..0, next, pick)
                }
                _ => (0..0, &[][..], None),
            };
            scored_rows.extend(offset..offset + scored.len());
            if let Some(p) = pick {
                layout.picked_spans.push(i);
                layout.picks.push(p.clone());
                picked_rows.push(offset + n - 1);
            }
            layout.counts.push(rows.len());
            layout.scored_counts.push(scored.len());
            layout.wanted.extend(rows);
        }
        // The rows downloaded whole first, then those scored, then those of which only
        // a picked id is.
        layout.wanted.extend(scored_rows);
        layout.wanted.extend(picked_rows);
        layout
    }
}

/// A loaded shard and its KV cache, on whichever backend: what the engine steps.
pub trait StepModel: Send + std::fmt::Debug {
    fn config(&self) -> &ModelConfig;
    fn kv_shape(&self) -> KvShape;
    /// (Re)makes the KV cache: `blocks` blocks of `block_size` positions, zeroed.
    fn reserve_cache(
        &mut self,
        blocks: usize,
        block_size: usize,
    ) -> Result<(), crate::kv::KvCacheTooLarge>;
    /// [`Transformer::forward`] over the cache.
    fn forward(&mut self, spans: &[SeqSpan<'_>]) -> Result<StepOutput, ModelError>;
    /// [`Transformer::load_adapter`].
    fn load_adapter(&mut self, slot: u32, adapter: &Adapter) -> Result<(), ModelError>;
    fn unload_adapter(&mut self, slot: u32);
    /// Whether its steps compute on the CPU (the host engine, or candle's CPU
    /// device), with the compute pool doing the work; not on a GPU.
    fn computes_on_host(&self) -> bool;
}

/// [`StepModel`] for a transformer on backend `B`.
#[derive(Debug)]
pub struct WithCache<B: Backend> {
    model: Transformer<B>,
    cache: Option<B::Cache>,
}

impl<B: Backend> WithCache<B> {
    pub fn new(model: Transformer<B>) -> Self {
        Self { model, cache: None }
    }
}

impl<B: Backend> StepModel for WithCache<B> {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn kv_shape(&self) -> KvShape {
        self.model.kv_shape()
    }

    fn reserve_cache(
        &mut self,
        blocks: usize,
        block_size: usize,
    ) -> Result<(), crate::kv::KvCacheTooLarge> {
        // The old cache goes first: both may not fit at once.
        self.cache = None;
        self.cache = Some(self.model.new_cache(blocks, block_size)?);
        Ok(())
    }

    fn forward(&mut self, spans: &[SeqSpan<'_>]) -> Result<StepOutput, ModelError> {
        let cache = self.cache.as_mut().ok_or_else(|| {
            ModelError::from(CommError::Config("the KV cache was not reserved".into()))
        })?;
        self.model.forward(spans, cache)
    }

    fn load_adapter(&mut self, slot: u32, adapter: &Adapter) -> Result<(), ModelError> {
        self.model.load_adapter(slot, adapter)
    }

    fn unload_adapter(&mut self, slot: u32) {
        self.model.unload_adapter(slot)
    }

    fn computes_on_host(&self) -> bool {
        self.model.backend().device().is_cpu()
    }
}

#[cfg(test)]
pub(crate) mod tiny;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_tp;

#[cfg(test)]
mod lora_tests;

#[cfg(test)]
mod tests_device;

#[cfg(test)]
mod hf_tests;
