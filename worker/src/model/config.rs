use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;

use super::ModelError;
use crate::weights::GgufFile;

/// How rotary embeddings pair the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): Llama GGUF files, whose Q/K rows the
    /// converter permuted for it.
    Interleaved,
    /// First half with second half (i, i + d/2): Hugging Face checkpoints, Qwen2.
    Halves,
}

/// How positions are stretched beyond the trained context.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
    /// Per-frequency divisors (Llama 3.1 style), one per rotated pair.
    FreqFactors(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    pub theta: f32,
    /// Number of rotated dimensions of each head (≤ head_dim).
    pub dims: usize,
    pub style: RopeStyle,
    pub scaling: RopeScaling,
}

/// Architecture hyper-parameters, all read from the model's own metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub num_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub max_position: usize,
    pub rms_eps: f32,
    pub rope: RopeConfig,
    /// Whether Q, K and V carry biases (Qwen2).
    pub qkv_bias: bool,
    /// Whether the output head reuses the token embedding.
    pub tied_embeddings: bool,
}

const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

impl ModelConfig {
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        let meta = Meta {
            path: file.path(),
            md: file.metadata(),
        };
        let arch = meta.string("general.architecture")?.to_string();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(ModelError::UnsupportedArchitecture {
                architecture: arch,
                supported: SUPPORTED.join(", "),
            });
        }
        let key = |k: &str| format!("{arch}.{k}");
        let hidden_size = meta.usize(&key("embedding_length"))?;
        let num_heads = meta.usize(&key("attention.head_count"))?;
        let num_kv_heads = meta
            .opt_usize(&key("attention.head_count_kv"))?
            .unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(meta.bad(
                &key("attention.head_count_kv"),
                format!("{num_kv_heads}, which does not divide {num_heads} attention heads"),
            ));
        }
        let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(meta.bad(
                    &key("embedding_length"),
                    format!("{hidden_size}, not a multiple of {num_heads} heads"),
                ));
            }
        };
        let vocab_size = match meta.opt_usize(&key("vocab_size"))? {
            Some(v) => v,
            None => file.tensor_meta("token_embd.weight")?.dims[0],
        };
        let rope_dims = meta
            .opt_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dims > head_dim || !rope_dims.is_multiple_of(2) {
            return Err(meta.bad(
                &key("rope.dimension_count"),
                format!("{rope_dims}, which must be even and at most the head size {head_dim}"),
            ));
        }
        let scaling = match meta.opt_string(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: meta.f32(&key("rope.scaling.factor"))?,
            },
            Some(other) => {
                return Err(meta.bad(
                    &key("rope.scaling.type"),
                    format!("'{other}'; supported: none, linear (and rope_freqs.weight)"),
                ));
            }
        };
        // Llama 3.1 GGUF files carry their frequency scaling as a tensor.
        let scaling = if file.contains("rope_freqs.weight") {
            let w = file.load(
                "rope_freqs.weight",
                &crate::weights::Split::Full,
                &candle_core::Device::Cpu,
            )?;
            let factors = w
                .to_dense_f32()
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .map_err(|e| ModelError::Candle { source: e })?;
            RopeScaling::FreqFactors(factors)
        } else {
            scaling
        };
        let style = if arch == "qwen2" {
            RopeStyle::Halves
        } else {
            RopeStyle::Interleaved
        };
        Ok(Self {
            num_layers: meta.usize(&key("block_count"))?,
            intermediate_size: meta.usize(&key("feed_forward_length"))?,
            max_position: meta.opt_usize(&key("context_length"))?.unwrap_or(4096),
            rms_eps: meta.f32(&key("attention.layer_norm_rms_epsilon"))?,
            rope: RopeConfig {
                theta: meta.opt_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
                dims: rope_dims,
                style,
                scaling,
            },
            qkv_bias: file.contains("blk.0.attn_q.bias"),
            tied_embeddings: !file.contains("output.weight"),
            architecture: arch,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
        })
    }

    /// Checks that `world` ranks can split this model; the error names the numbers.
    pub fn check_split(&self, world: usize) -> Result<(), ModelError> {
        let refuse = |reason: String| Err(ModelError::ImpossibleSplit { world, reason });
        if world == 0 {
            return refuse("a group needs at least one rank".into());
        }
        if !self.num_heads.is_multiple_of(world) {
            return refuse(format!(
                "tensor={world} does not divide {} attention heads",
                self.num_heads
            ));
        }
        if !self.num_kv_heads.is_multiple_of(world) && !world.is_multiple_of(self.num_kv_heads) {
            return refuse(format!(
                "tensor={world} neither divides nor is a multiple of {} KV heads",
                self.num_kv_heads
            ));
        }
        if !self.intermediate_size.is_multiple_of(world) {
            return refuse(format!(
                "tensor={world} does not divide the MLP width {}",
                self.intermediate_size
            ));
        }
        Ok(())
    }
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn bad(&self, key: &str, problem: String) -> ModelError {
        ModelError::Weights(crate::weights::WeightsError::Metadata {
            path: self.path.to_path_buf(),
            key: key.into(),
            problem,
        })
    }

    fn get(&self, key: &str) -> Result<&Value, ModelError> {
        self.md
            .get(key)
            .ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n = match v {
            Value::U8(n) => *n as u64,
            Value::U16(n) => *n as u64,
            Value::U32(n) => *n as u64,
            Value::U64(n) => *n,
            Value::I8(n) if *n >= 0 => *n as u64,
            Value::I16(n) if *n >= 0 => *n as u64,
            Value::I32(n) if *n >= 0 => *n as u64,
            Value::I64(n) if *n >= 0 => *n as u64,
            other => return Err(self.bad(key, format!("{other:?}, not a non-negative integer"))),
        };
        Ok(Some(n as usize))
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.get(key)?;
        self.opt_usize(key)?
            .ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x)),
            Some(Value::F64(x)) => Ok(Some(*x as f32)),
            Some(other) => Err(self.bad(key, format!("{other:?}, not a number"))),
        }
    }

    fn f32(&self, key: &str) -> Result<f32, ModelError> {
        self.get(key)?;
        self.opt_f32(key)?
            .ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn opt_string(&self, key: &str) -> Result<Option<&str>, ModelError> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.bad(key, format!("{other:?}, not a string"))),
        }
    }

    fn string(&self, key: &str) -> Result<&str, ModelError> {
        self.get(key)?;
        self.opt_string(key)?
            .ok_or_else(|| self.bad(key, "missing".into()))
    }
}
