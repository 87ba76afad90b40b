//! What the operator puts into every rank's pod: GPUs, CPU and memory, and
//! where the pods may be scheduled.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The extended resource most GPU clusters expose (the NVIDIA device plugin).
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";
/// GPUs in one node when `spec.gpu.perNode` is not given (an 8-GPU server).
pub const DEFAULT_GPUS_PER_NODE: u32 = 8;

/// The GPUs of every rank, and of the nodes they run on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.perRank <= self.perNode",
    "message": "gpu.perRank must not exceed gpu.perNode: a rank cannot span nodes"
}]))]
pub struct GpuSpec {
    /// The extended resource name requested for GPUs. Defaults to
    /// `nvidia.com/gpu`.
    #[serde(default = "default_resource_name")]
    #[schemars(length(min = 1, max = 253))]
    pub resource_name: String,
    /// GPUs one rank uses. Defaults to 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub per_rank: u32,
    /// GPUs in one node; a group whose ranks need more spans several pods
    /// on several nodes. Defaults to 8.
    #[serde(default = "default_per_node")]
    #[schemars(range(min = 1))]
    pub per_node: u32,
    /// Memory of one GPU (e.g. `80Gi`), used to plan whether the model fits
    /// and how long a context its KV cache holds. Unset: the operator does
    /// not check the fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self {
            resource_name: default_resource_name(),
            per_rank: 1,
            per_node: DEFAULT_GPUS_PER_NODE,
            memory: None,
        }
    }
}

impl GpuSpec {
    pub(crate) fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

fn default_resource_name() -> String {
    DEFAULT_GPU_RESOURCE.to_string()
}

fn default_per_node() -> u32 {
    DEFAULT_GPUS_PER_NODE
}

fn one() -> u32 {
    1
}

/// CPU and memory of every rank's container (GPUs come from `spec.gpu`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ComputeResources {
    /// What the scheduler reserves for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<CpuMemory>,
    /// The most the container may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<CpuMemory>,
}

/// An amount of CPU and of memory.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuMemory {
    /// CPU cores, e.g. `8` or `7500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory, e.g. `64Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}
