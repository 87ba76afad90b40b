//! The Llama-family transformer (Llama, SmolLM, Mistral, Qwen2), built from
//! parallel-ready layers so that a rank computes only its shard.
//!
//! `Transformer::forward` takes a batch of token spans, each with its first
//! position and its KV cache block table, runs the linear layers once over
//! all their tokens, attention per span, and returns the logits each span
//! asked for.

mod attention;
mod causal;
mod config;
mod exp;
mod hf;
mod layers;
mod rope;
mod rows;

use std::sync::Arc;

use candle_core::Device;

pub use config::{ModelConfig, RopeConfig, RopeScaling, RopeStyle};
pub use hf::HfCheckpoint;
pub use layers::LoadContext;

use crate::comm::Collective;
use crate::kv::{BlockId, KvCache, KvShape};
use crate::weights::{GgufFile, TensorSource, Weight, WeightsError};
use attention::Attention;
use layers::{Embedding, RmsNorm, RowParallelLinear, StackedColumns};
use rows::{Rows, swiglu};

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
    #[error("model computation failed: {source}")]
    Candle {
        #[from]
        source: candle_core::Error,
    },
}

/// Which logits a span wants back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Only its last token's (the next-token distribution).
    Last,
    /// Every token's (prompt scoring).
    All,
    /// None (a chunk of a prompt whose end comes in a later step).
    None,
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
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    /// Gate and up, stacked.
    gate_up: StackedColumns,
    down: RowParallelLinear,
}

#[derive(Debug)]
pub struct Transformer {
    config: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the output head is the token embedding.
    head: Option<Weight>,
    device: Device,
}

impl Transformer {
    /// Loads this rank's shard of a GGUF model.
    pub fn from_gguf(
        file: &GgufFile,
        comm: Arc<dyn Collective>,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::load(file, ModelConfig::from_gguf(file)?, comm, device)
    }

    /// Loads this rank's shard of a Hugging Face checkpoint.
    pub fn from_hf(
        checkpoint: &HfCheckpoint,
        comm: Arc<dyn Collective>,
        device: Device,
    ) -> Result<Self, ModelError> {
        Self::load(checkpoint, checkpoint.config().clone(), comm, device)
    }

    /// Loads this rank's shard of the model `config` describes from `file`
    /// (tensors by their canonical GGUF names).
    pub fn load(
        file: &dyn TensorSource,
        config: ModelConfig,
        comm: Arc<dyn Collective>,
        device: Device,
    ) -> Result<Self, ModelError> {
        config.check_split(comm.world_size())?;
        let ctx = LoadContext {
            file,
            comm,
            device: device.clone(),
        };
        let embed = Embedding::load(&ctx, "token_embd.weight")?;
        let dims = embed.weight().dims();
        if dims != [config.vocab_size, config.hidden_size] {
            return Err(ModelError::Shape {
                tensor: "token_embd.weight".into(),
                found: dims,
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
            Some(ctx.load("output.weight", &crate::weights::Split::Full)?)
        };
        Ok(Self {
            config,
            embed,
            blocks,
            norm,
            head,
            device,
        })
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

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step over `spans`, writing their keys and values into `kv`.
    /// Returns, per span, the logits rows it asked for (one, one per token,
    /// or none), each over the whole vocabulary.
    pub fn forward(
        &self,
        spans: &[SeqSpan<'_>],
        kv: &mut KvCache,
    ) -> Result<Vec<Vec<Vec<f32>>>, ModelError> {
        let ids: Vec<u32> = spans
            .iter()
            .flat_map(|s| s.tokens.iter().copied())
            .collect();
        let mut x = self.embed.forward(&ids)?;
        // Every layer rotates by the same positions: one table per step.
        let mut angles = None;
        for (layer, block) in self.blocks.iter().enumerate() {
            let angles = angles.get_or_insert_with(|| block.attn.angles(spans));
            let h = block.attn_norm.forward(&x);
            x.add_assign(&block.attn.forward(&h, spans, angles, layer, kv)?);
            let h = block.mlp_norm.forward(&x);
            let h = swiglu(&block.gate_up.forward(&h)?);
            x.add_assign(&block.down.forward(&h)?);
        }
        // Every row any span wants, gathered so the head runs once per step.
        let mut wanted = Vec::new();
        let mut counts = Vec::with_capacity(spans.len());
        let mut offset = 0;
        for span in spans {
            let n = span.tokens.len();
            let rows = match span.logits {
                LogitsFor::Last if n > 0 => offset + n - 1..offset + n,
                LogitsFor::All => offset..offset + n,
                _ => 0..0,
            };
            counts.push(rows.len());
            wanted.extend(rows);
            offset += n;
        }
        let mut rows = if wanted.is_empty() {
            Vec::new()
        } else {
            self.logits(&x.gather(&wanted))?
        }
        .into_iter();
        Ok(counts
            .into_iter()
            .map(|n| rows.by_ref().take(n).collect())
            .collect())
    }

    fn logits(&self, hidden: &Rows) -> Result<Vec<Vec<f32>>, ModelError> {
        let h = self.norm.forward(hidden);
        let head = self.head.as_ref().unwrap_or(self.embed.weight());
        let flat = head.matmul_t(h.as_slice(), h.m())?;
        Ok(flat
            .chunks_exact(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tiny;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod tests_tp;

#[cfg(test)]
mod hf_tests;
