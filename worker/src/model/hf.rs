//! Hugging Face checkpoints: a directory with `config.json` and safetensors
//! weights. `HfCheckpoint` reads the config into a [`ModelConfig`] and serves
//! the tensors under the canonical GGUF names the transformer asks for, so
//! one transformer loads from either source.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde_json::Value as Json;

use super::ModelError;
use super::config::{ModelConfig, RopeConfig, RopeScaling, RopeStyle};
use crate::progress::Tally;
use crate::weights::{Safetensors, Split, TensorSource, Weight, WeightsError};

const CONFIG_FILE: &str = "config.json";

/// Hugging Face architectures and the GGUF names of their families.
const ARCHITECTURES: &[(&str, &str)] = &[
    ("LlamaForCausalLM", "llama"),
    ("MistralForCausalLM", "mistral"),
    ("Qwen2ForCausalLM", "qwen2"),
];

/// An opened Hugging Face model directory.
#[derive(Debug)]
pub struct HfCheckpoint {
    dir: PathBuf,
    config: ModelConfig,
    tensors: Safetensors,
}

impl HfCheckpoint {
    /// Reads `dir/config.json` and opens the safetensors files next to it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(CONFIG_FILE);
        let bytes = std::fs::read(&path).map_err(|source| WeightsError::Io {
            path: path.clone(),
            source,
        })?;
        let mut config = ModelConfig::from_hf_config_bytes(&bytes).map_err(|e| match e {
            ModelError::Config { key, problem, .. } => ModelError::Config {
                path: path.clone(),
                key,
                problem,
            },
            other => other,
        })?;
        let tensors = Safetensors::open(&dir)?;
        // A checkpoint without its own head uses the embedding, whatever the config says.
        config.tied_embeddings |= !tensors.contains("lm_head.weight");
        config.qkv_bias |= tensors.contains("model.layers.0.self_attn.q_proj.bias");
        Ok(Self {
            dir,
            config,
            tensors,
        })
    }

    /// Counts the load's progress in `tally` (see [`Safetensors::count_into`]).
    pub fn count_into(&mut self, tally: Arc<Tally>) {
        self.tensors.count_into(tally);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The raw safetensors files (Hugging Face names).
    pub fn tensors(&self) -> &Safetensors {
        &self.tensors
    }

    /// The stored name of a canonical tensor, `None` when this checkpoint has none.
    fn stored(&self, canonical: &str) -> Option<String> {
        if canonical == "output.weight" && self.config.tied_embeddings {
            return None;
        }
        hf_name(canonical)
    }
}

impl TensorSource for HfCheckpoint {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.stored(name).is_some_and(|n| self.tensors.contains(&n))
    }

    fn tensor_dims(&self, name: &str) -> Result<Vec<usize>, WeightsError> {
        Ok(self.tensors.tensor_info(&self.stored_or_missing(name)?)?.1)
    }

    fn load(&self, name: &str, split: &Split, device: &Device) -> Result<Weight, WeightsError> {
        self.tensors
            .load(&self.stored_or_missing(name)?, split, device)
    }

    fn format(&self) -> String {
        self.tensors.format()
    }
}

impl HfCheckpoint {
    fn stored_or_missing(&self, name: &str) -> Result<String, WeightsError> {
        self.stored(name)
            .ok_or_else(|| WeightsError::MissingTensor {
                path: self.dir.clone(),
                name: name.into(),
            })
    }
}

/// The Hugging Face name of a canonical (GGUF) Llama-family tensor name.
pub fn hf_name(canonical: &str) -> Option<String> {
    let fixed = match canonical {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some(name.into());
    }
    let rest = canonical.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

impl ModelConfig {
    /// Reads the bytes of a Hugging Face `config.json`: JSON, then
    /// [`ModelConfig::from_hf_config`].
    pub fn from_hf_config_bytes(bytes: &[u8]) -> Result<Self, ModelError> {
        let json: Json = serde_json::from_slice(bytes).map_err(|e| ModelError::Config {
            path: PathBuf::from(CONFIG_FILE),
            key: "(document)".into(),
            problem: format!("not valid JSON: {e}"),
        })?;
        Self::from_hf_config(&json)
    }

    /// Reads a Hugging Face `config.json`. Errors name the key (the path in
    /// them is `config.json`; [`HfCheckpoint::open`] puts the full path).
    pub fn from_hf_config(json: &Json) -> Result<Self, ModelError> {
        let c = HfKeys(json);
        let names: Vec<&str> = match json.get("architectures") {
            Some(Json::Array(items)) => items.iter().filter_map(Json::as_str).collect(),
            Some(other) => return Err(c.bad("architectures", format!("{other}, not a list"))),
            None => return Err(c.bad("architectures", "missing".into())),
        };
        let Some(&(_, arch)) = names
            .iter()
            .find_map(|n| ARCHITECTURES.iter().find(|(hf, _)| hf == n))
        else {
            return Err(ModelError::UnsupportedArchitecture {
                architecture: names.join(", "),
                supported: ARCHITECTURES
                    .iter()
                    .map(|(hf, _)| *hf)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let hidden_size = c.usize("hidden_size")?;
        let num_heads = c.usize("num_attention_heads")?;
        let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(c.bad(
                "num_key_value_heads",
                format!("{num_kv_heads}, which does not divide {num_heads} attention heads"),
            ));
        }
        let head_dim = match c.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(c.bad(
                    "hidden_size",
                    format!("{hidden_size}, not a multiple of {num_heads} heads"),
                ));
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(c.bad("head_dim", format!("{head_dim}, which must be even")));
        }
        // transformers 5 writes `rope_parameters` (theta and scaling in one object)
        // where earlier versions wrote `rope_theta` and `rope_scaling`.
        let parameters = match c.0.get("rope_parameters") {
            None | Some(Json::Null) => None,
            Some(p @ Json::Object(_)) => Some(HfKeys(p)),
            Some(other) => {
                return Err(c.bad("rope_parameters", format!("{other}, not an object")));
            }
        };
        let theta = match c.opt_f64("rope_theta")? {
            Some(theta) => theta,
            None => match &parameters {
                Some(p) => p
                    .opt_f64("rope_theta")
                    .map_err(|e| c.rename(e, "rope_parameters.rope_theta"))?,
                None => None,
            }
            .unwrap_or(10_000.0),
        };
        let scaling = match c.0.get("rope_scaling") {
            None | Some(Json::Null) if parameters.is_some() => "rope_parameters",
            _ => "rope_scaling",
        };
        let scaling = rope_scaling(&c, scaling, theta, head_dim)?;
        Ok(Self {
            architecture: arch.into(),
            num_layers: c.usize("num_hidden_layers")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: c.usize("vocab_size")?,
            max_position: c.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rms_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            // Hugging Face Q/K rows are not permuted: rotate halves.
            rope: RopeConfig {
                theta: theta as f32,
                dims: head_dim,
                style: RopeStyle::Halves,
                scaling,
            },
            qkv_bias: arch == "qwen2" || c.opt_bool("attention_bias")?.unwrap_or(false),
            tied_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        })
    }
}

/// The scaling of `key` (`rope_scaling`, or transformers 5's `rope_parameters`):
/// absent, null or `default` → none; `linear`; `llama3` (per-frequency divisors as in
/// the Llama 3.1 reference); others refused.
fn rope_scaling(
    c: &HfKeys<'_>,
    key: &str,
    theta: f64,
    dims: usize,
) -> Result<RopeScaling, ModelError> {
    let scaling = match c.0.get(key) {
        None | Some(Json::Null) => return Ok(RopeScaling::None),
        Some(s @ Json::Object(_)) => HfKeys(s),
        Some(other) => return Err(c.bad(key, format!("{other}, not an object"))),
    };
    let prefixed = |name: &str| format!("{key}.{name}");
    let kind = match (scaling.0.get("rope_type"), scaling.0.get("type")) {
        (Some(Json::String(t)), _) | (None, Some(Json::String(t))) => t.as_str(),
        // `rope_parameters` may hold only the theta.
        (None, None) if key == "rope_parameters" => "default",
        _ => {
            return Err(c.bad(&prefixed("rope_type"), "missing or not a string".into()));
        }
    };
    let number = |key: &str| -> Result<f64, ModelError> {
        scaling
            .opt_f64(key)
            .map_err(|e| c.rename(e, &prefixed(key)))?
            .ok_or_else(|| c.bad(&prefixed(key), "missing".into()))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")? as f32,
        }),
        "llama3" => {
            let factor = number("factor")?;
            let low = number("low_freq_factor")?;
            let high = number("high_freq_factor")?;
            let original = number("original_max_position_embeddings")?;
            if high <= low {
                return Err(c.bad(
                    &prefixed("high_freq_factor"),
                    format!("{high}, which must exceed low_freq_factor {low}"),
                ));
            }
            Ok(RopeScaling::FreqFactors(llama3_divisors(
                theta, dims, factor, low, high, original,
            )))
        }
        other => Err(c.bad(
            &prefixed("rope_type"),
            format!("'{other}', which is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// Divisors of each rotated pair's frequency: long wavelengths (beyond
/// `original / low`) are slowed by `factor`, short ones (below
/// `original / high`) kept, and those between blended smoothly.
fn llama3_divisors(
    theta: f64,
    dims: usize,
    factor: f64,
    low: f64,
    high: f64,
    original: f64,
) -> Vec<f32> {
    (0..dims / 2)
        .map(|i| {
            let freq = theta.powf(-2.0 * i as f64 / dims as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < original / high {
                1.0
            } else if wavelen > original / low {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Typed access to `config.json` with errors that name the key.
struct HfKeys<'a>(&'a Json);

impl HfKeys<'_> {
    fn bad(&self, key: &str, problem: String) -> ModelError {
        ModelError::Config {
            path: PathBuf::from(CONFIG_FILE),
            key: key.into(),
            problem,
        }
    }

    fn rename(&self, e: ModelError, key: &str) -> ModelError {
        match e {
            ModelError::Config { problem, .. } => self.bad(key, problem),
            other => other,
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.0.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(key, format!("{v}, not a non-negative integer"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?
            .ok_or_else(|| self.bad(key, "missing".into()))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.0.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.bad(key, format!("{v}, not a number"))),
        }
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.0.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(key, format!("{v}, not true or false"))),
        }
    }
}
