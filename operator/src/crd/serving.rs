//! How the model is served: engine limits, LoRA adapters and autoscaling.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// GPU memory the engine may use when `engine.gpuMemoryUtilization` is unset.
pub const DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT: u32 = 90;

/// Engine limits. Unset fields take the engine's defaults.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EngineSpec {
    /// Longest sequence, prompt plus generated tokens. Defaults to the
    /// model's trained context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_seq_len: Option<u32>,

    /// Most sequences one group generates at the same time; further requests
    /// wait in the queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_num_seqs: Option<u32>,

    /// Percent of each GPU's memory the engine may use for weights,
    /// activations and the KV cache. Defaults to 90.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub gpu_memory_utilization_percent: Option<u32>,

    /// Data type of the KV cache on GPUs: `bfloat16` (the default) or `float16`. CPU
    /// workers keep `float16` and refuse other types. `fp8` and `float32` are refused
    /// (not supported by the engine yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_dtype: Option<KvCacheDtype>,

    /// Most LoRA adapters resident in a group at once (more may be served: the
    /// least recently used idle one makes room). Defaults to 8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_loras: Option<u32>,

    /// Highest LoRA rank accepted; an adapter of a higher rank is refused.
    /// Defaults to 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_lora_rank: Option<u32>,
}

impl EngineSpec {
    pub(crate) fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// The data type keys and values are cached in on GPUs: `bfloat16` (the default) or
/// `float16`; CPU workers keep `float16`. `fp8` and `float32` are refused (not
/// supported by the engine yet).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    Float32,
    Float16,
    #[default]
    Bfloat16,
    /// 8-bit floating point (E4M3), half the memory of bfloat16.
    Fp8,
}

impl KvCacheDtype {
    /// Bytes of one cached element.
    pub fn bytes(self) -> u64 {
        match self {
            Self::Float32 => 4,
            Self::Float16 | Self::Bfloat16 => 2,
            Self::Fp8 => 1,
        }
    }
}

/// A LoRA adapter served next to the base model: clients ask for it by `name`
/// (as `model` in the OpenAI API). The operator loads it into running groups
/// through their API, so changing the list never restarts a group.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoraAdapter {
    /// The model name clients ask for to use this adapter.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Where the adapter's weights come from (a PEFT directory or a GGUF LoRA
    /// file), in the same forms as `spec.model.source`; each group fetches it
    /// into its model cache.
    #[schemars(length(min = 1), regex(pattern = r"^(hf|file|pvc|pip)://.+$"))]
    pub source: String,
}

/// How `spec.replicas` follows the load: by the operator itself (`builtin`, from the
/// routers' in-flight requests), or by an HPA or KEDA through the `scale` subresource
/// (`external`), within the same bounds.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minReplicas <= self.maxReplicas",
    "message": "autoscaling.minReplicas must not exceed autoscaling.maxReplicas"
}]))]
pub struct AutoscalingSpec {
    /// `builtin`: the operator (and `shardserve up`) sets `replicas` from the routers'
    /// in-flight requests; `external`: an HPA or KEDA does. Default: `builtin` when
    /// `targetInFlightRequests` is set, else `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<AutoscalingMode>,
    /// Fewest groups to keep. Defaults to 1; 0 allows scaling to zero.
    #[serde(default = "one")]
    pub min_replicas: u32,
    /// Most groups to run.
    #[schemars(range(min = 1))]
    pub max_replicas: u32,
    /// Requests in flight (waiting or running) per group the autoscaler aims for.
    /// Default 8 in builtin mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_in_flight_requests: Option<u32>,
    /// How long the load must ask for more groups before they are added. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub scale_up_delay_seconds: Option<u32>,
    /// How long the load must ask for fewer groups before one is removed. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub scale_down_delay_seconds: Option<u32>,
}

/// Who scales `replicas`.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum AutoscalingMode {
    Builtin,
    External,
}

/// The builtin autoscaler's defaults.
pub const DEFAULT_TARGET_IN_FLIGHT_REQUESTS: u32 = 8;
pub const DEFAULT_SCALE_UP_DELAY_SECONDS: u32 = 0;
pub const DEFAULT_SCALE_DOWN_DELAY_SECONDS: u32 = 300;

impl AutoscalingSpec {
    /// The mode, its default applied.
    pub fn mode(&self) -> AutoscalingMode {
        self.mode.unwrap_or(match self.target_in_flight_requests {
            Some(_) => AutoscalingMode::Builtin,
            None => AutoscalingMode::External,
        })
    }

    pub fn target_in_flight_requests(&self) -> u32 {
        self.target_in_flight_requests
            .unwrap_or(DEFAULT_TARGET_IN_FLIGHT_REQUESTS)
            .max(1)
    }

    pub fn scale_up_delay(&self) -> std::time::Duration {
        let seconds = self
            .scale_up_delay_seconds
            .unwrap_or(DEFAULT_SCALE_UP_DELAY_SECONDS);
        std::time::Duration::from_secs(seconds.into())
    }

    pub fn scale_down_delay(&self) -> std::time::Duration {
        let seconds = self
            .scale_down_delay_seconds
            .unwrap_or(DEFAULT_SCALE_DOWN_DELAY_SECONDS);
        std::time::Duration::from_secs(seconds.into())
    }
}

fn one() -> u32 {
    1
}
