//! LoRA adapters: read from a PEFT directory or a llama.cpp GGUF LoRA file,
//! checked against the base model, and cut into one rank's shard.
//!
//! An adapter changes a linear layer `y = W·x` into `y = W·x + s·B·(A·x)` with
//! `A: [r, in]`, `B: [out, r]` and a scale `s` (`alpha / r`, or `alpha / √r` for
//! rsLoRA). It is applied unmerged, per row of a batch (`crate::model` does
//! that), so the base weights are never touched and one step can mix adapters.
//!
//! Everything here is plain f32 rows on the host; the backend turns a shard's
//! matrices into its own form when it is loaded.

mod gguf;
mod peft;
mod shard;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;

pub use shard::{AdapterShard, LayerShard, ShardPair};

use crate::model::{ModelConfig, RopeStyle};
use crate::weights::{Split, TensorSource};

/// The linear layers of a Llama block an adapter may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The module's name in Hugging Face / PEFT checkpoints.
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The tensor's name in GGUF files (`blk.N.<name>.weight`).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    fn from_peft(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.peft_name() == name)
    }

    fn from_gguf(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.gguf_name() == name)
    }

    /// `(inputs, outputs)` of the base layer.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let q = cfg.num_heads * cfg.head_dim;
        let kv = cfg.num_kv_heads * cfg.head_dim;
        match self {
            Target::Q => (cfg.hidden_size, q),
            Target::K | Target::V => (cfg.hidden_size, kv),
            Target::O => (q, cfg.hidden_size),
            Target::Gate | Target::Up => (cfg.hidden_size, cfg.intermediate_size),
            Target::Down => (cfg.intermediate_size, cfg.hidden_size),
        }
    }

    /// Row-parallel layers (O, down) split their inputs over ranks; the others
    /// their outputs.
    pub fn row_parallel(self) -> bool {
        matches!(self, Target::O | Target::Down)
    }
}

/// Why an adapter was refused. Each names the file and, where one is at fault, the
/// tensor or field.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a LoRA adapter: {reason}")]
    NotAnAdapter { path: PathBuf, reason: String },
    #[error("{path}: {field}: {problem}")]
    Config {
        path: PathBuf,
        field: String,
        problem: String,
    },
    #[error("{path}: tensor '{tensor}': {problem}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    #[error("{path}: rank {rank} is above --max-lora-rank {max}")]
    RankTooHigh {
        path: PathBuf,
        rank: usize,
        max: usize,
    },
}

/// `A` and `B` of one layer, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Pair {
    /// `[rank, inputs]`.
    pub a: Vec<f32>,
    /// `[outputs, rank]`.
    pub b: Vec<f32>,
}

/// A whole adapter, checked against its base model.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub path: PathBuf,
    pub rank: usize,
    pub scale: f32,
    /// Per layer of the base model, the layers the adapter changes.
    pub layers: Vec<BTreeMap<Target, Pair>>,
}

impl Adapter {
    /// Reads the adapter at `path` (a PEFT directory, or a GGUF LoRA file) and
    /// checks it against `base`: layer count, every matrix's shape, rank at most
    /// `max_rank`. A PEFT adapter on a GGUF base gets its Q and K rows of `B`
    /// permuted into the base's rotary layout.
    pub fn open(path: &Path, base: &ModelConfig, max_rank: usize) -> Result<Adapter, LoraError> {
        let read = if path.is_dir() {
            peft::read(path)?
        } else {
            gguf::read(path, base)?
        };
        let adapter = read.check(path, base, max_rank)?;
        Ok(adapter)
    }

    /// The layers' targets, for messages and listings.
    pub fn targets(&self) -> Vec<Target> {
        let mut all: Vec<Target> = self.layers.iter().flat_map(|l| l.keys().copied()).collect();
        all.sort();
        all.dedup();
        all
    }
}

/// What a reader found, before it is checked against the base.
struct ReadAdapter {
    /// The file the tensors came from (named in messages about them).
    file: PathBuf,
    /// `None`: taken from the tensors (GGUF files do not state it).
    rank: Option<usize>,
    /// `scale = alpha / rank` (or `/ √rank`), computed once the rank is known.
    alpha: f32,
    rslora: bool,
    /// The Hugging Face row layout, whose Q and K rows a GGUF base permutes.
    hf_layout: bool,
    /// `(layer, target)` → `(A dims, A, B dims, B)` and the names they came from.
    tensors: BTreeMap<(usize, Target), ReadPair>,
}

struct ReadPair {
    a_name: String,
    a_dims: Vec<usize>,
    a: Vec<f32>,
    b_name: String,
    b_dims: Vec<usize>,
    b: Vec<f32>,
}

impl ReadAdapter {
    fn check(self, path: &Path, base: &ModelConfig, max_rank: usize) -> Result<Adapter, LoraError> {
        let tensor_error = |tensor: &str, problem: String| LoraError::Tensor {
            path: self.file.clone(),
            tensor: tensor.to_string(),
            problem,
        };
        let Some(((_, _), first)) = self.tensors.iter().next() else {
            return Err(LoraError::NotAnAdapter {
                path: path.to_path_buf(),
                reason: format!("{} holds no lora_A/lora_B pairs", self.file.display()),
            });
        };
        let rank = self
            .rank
            .unwrap_or_else(|| first.a_dims.first().copied().unwrap_or(0));
        if rank == 0 {
            return Err(tensor_error(&first.a_name, "rank 0".into()));
        }
        if rank > max_rank {
            return Err(LoraError::RankTooHigh {
                path: path.to_path_buf(),
                rank,
                max: max_rank,
            });
        }
        let scale = if self.alpha == 0.0 {
            // llama.cpp's rule for GGUF adapters without an alpha.
            1.0
        } else if self.rslora {
            self.alpha / (rank as f32).sqrt()
        } else {
            self.alpha / rank as f32
        };
        let file = self.file.clone();
        let tensor_error = |tensor: &str, problem: String| LoraError::Tensor {
            path: file.clone(),
            tensor: tensor.to_string(),
            problem,
        };
        let permute = self.hf_layout && base.rope.style == RopeStyle::Interleaved;
        let mut layers = vec![BTreeMap::new(); base.num_layers];
        for ((layer, target), pair) in self.tensors {
            if layer >= base.num_layers {
                return Err(tensor_error(
                    &pair.a_name,
                    format!("layer {layer}, but the base model has {}", base.num_layers),
                ));
            }
            let (inputs, outputs) = target.dims(base);
            if pair.a_dims != [rank, inputs] {
                return Err(tensor_error(
                    &pair.a_name,
                    format!(
                        "shape {:?}, expected [{rank}, {inputs}] for the base's {}",
                        pair.a_dims,
                        target.peft_name()
                    ),
                ));
            }
            if pair.b_dims != [outputs, rank] {
                return Err(tensor_error(
                    &pair.b_name,
                    format!(
                        "shape {:?}, expected [{outputs}, {rank}] for the base's {}",
                        pair.b_dims,
                        target.peft_name()
                    ),
                ));
            }
            if let Some(bad) = pair.a.iter().chain(&pair.b).find(|v| !v.is_finite()) {
                let name = if pair.a.iter().any(|v| !v.is_finite()) {
                    &pair.a_name
                } else {
                    &pair.b_name
                };
                return Err(tensor_error(name, format!("holds {bad}")));
            }
            let mut b = pair.b;
            if permute && matches!(target, Target::Q | Target::K) {
                b = permute_rows_for_interleaved_rope(&b, rank, base.head_dim);
            }
            layers[layer].insert(target, Pair { a: pair.a, b });
        }
        Ok(Adapter {
            path: path.to_path_buf(),
            rank,
            scale,
            layers,
        })
    }
}

/// A loaded tensor's dims and values as f32 (any stored type, quantised ones
/// dequantised), or why not.
/// How an adapter format names its tensors, for [`read_pairs`].
struct PairNames {
    /// A tensor's layer, target and half (0: A, 1: B); `None`: not an adapter's.
    parse: fn(&str) -> Option<(usize, Target, usize)>,
    /// What an adapter tensor's name is, for a name refused.
    expected: &'static str,
    /// The name of `layer`'s `target`, for a pair missing a half.
    pair: fn(usize, Target) -> String,
    /// The halves as the format names them ("lora_a and lora_b").
    halves: &'static str,
}

/// Every tensor of an adapter file (`names`, read from `source`), paired into each
/// (layer, target)'s A and B and loaded as f32.
fn read_pairs<'n>(
    names: impl Iterator<Item = &'n str>,
    source: &impl TensorSource,
    naming: &PairNames,
    tensor_error: impl Fn(&str, String) -> LoraError,
) -> Result<BTreeMap<(usize, Target), ReadPair>, LoraError> {
    let mut halves: BTreeMap<(usize, Target), [Option<String>; 2]> = BTreeMap::new();
    for name in names {
        let (layer, target, half) = (naming.parse)(name)
            .ok_or_else(|| tensor_error(name, format!("not {}", naming.expected)))?;
        halves.entry((layer, target)).or_default()[half] = Some(name.to_string());
    }
    let mut tensors = BTreeMap::new();
    for (key, [a, b]) in halves {
        let (Some(a_name), Some(b_name)) = (a, b) else {
            let (layer, target) = key;
            return Err(tensor_error(
                &(naming.pair)(layer, target),
                format!("has only one of {}", naming.halves),
            ));
        };
        let load = |name: &str| {
            dense_values(source.load(name, &Split::Full, &Device::Cpu))
                .map_err(|e| tensor_error(name, e))
        };
        let (a_dims, a) = load(&a_name)?;
        let (b_dims, b) = load(&b_name)?;
        tensors.insert(
            key,
            ReadPair {
                a_name,
                a_dims,
                a,
                b_name,
                b_dims,
                b,
            },
        );
    }
    Ok(tensors)
}

fn dense_values(
    weight: Result<crate::weights::Weight, crate::weights::WeightsError>,
) -> Result<(Vec<usize>, Vec<f32>), String> {
    let dense = weight
        .map_err(|e| e.to_string())?
        .to_dense_f32()
        .map_err(|e| e.to_string())?;
    let values = dense
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| e.to_string())?;
    Ok((dense.dims().to_vec(), values))
}

/// Reorders the rows of each head of `b` (`[heads·d, rank]`) from the Hugging
/// Face layout (rotated halves: row `h·d/2 + i`) into the GGUF one (adjacent
/// pairs: row `2i + h`), as llama.cpp's converter does to Q and K.
pub(crate) fn permute_rows_for_interleaved_rope(
    b: &[f32],
    rank: usize,
    head_dim: usize,
) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; b.len()];
    for (head_in, head_out) in b
        .chunks_exact(head_dim * rank)
        .zip(out.chunks_exact_mut(head_dim * rank))
    {
        for h in 0..2 {
            for i in 0..half {
                let from = h * half + i;
                let to = 2 * i + h;
                head_out[to * rank..(to + 1) * rank]
                    .copy_from_slice(&head_in[from * rank..(from + 1) * rank]);
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
