//! The `ModelDeployment` custom resource (`shardserve.io/v1alpha1`): what a
//! user writes to serve one model. `shardserve up` reads the same manifest
//! locally; the operator reconciles it on a cluster.
//!
//! The types carry the schema (their doc comments become `kubectl explain`);
//! [`source`] parses the model source, [`validate`] checks what the schema
//! cannot say, and [`manifest`] reads YAML files into checked resources.

mod generate;
pub mod manifest;
mod model;
mod pods;
mod serving;
pub mod source;
mod status;
pub mod validate;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use generate::crd_yaml;
pub use model::{ModelCache, ModelFormat, ModelShape, ModelSpec, TokenSecret, WeightDtype};
pub use pods::{ComputeResources, CpuMemory, DEFAULT_GPU_RESOURCE, DEFAULT_GPUS_PER_NODE, GpuSpec};
pub use serving::{
    AutoscalingMode, AutoscalingSpec, DEFAULT_GPU_MEMORY_UTILIZATION_PERCENT, EngineSpec,
    KvCacheDtype, LoraAdapter,
};
pub use status::{ConditionType, GroupPhase, GroupStatus, ModelDeploymentStatus};

/// The API group of every shardserve resource.
pub const GROUP: &str = "shardserve.io";
/// The version of `ModelDeployment` these types describe.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in a manifest.
pub const API_VERSION: &str = "shardserve.io/v1alpha1";
/// `kind` as written in a manifest.
pub const KIND: &str = "ModelDeployment";

/// A language model served by groups of worker ranks behind the router.
///
/// One group holds one copy of the model, split over `tensor` ranks; the
/// deployment runs `replicas` groups and the router spreads requests over them.
// Each `printcolumn(...)` repeats the same keys, which clippy takes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shardserve.io",
    version = "v1alpha1",
    kind = "ModelDeployment",
    plural = "modeldeployments",
    shortname = "md",
    namespaced,
    doc = "A language model served by groups of tensor-parallel ranks behind the shardserve router.",
    status = "ModelDeploymentStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.source"),
    printcolumn(name = "TP", type_ = "integer", json_path = ".spec.tensor"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Progress", type_ = "string", json_path = ".status.progress"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.gpu) || self.tensor <= self.gpu.perNode / self.gpu.perRank || self.tensor % (self.gpu.perNode / self.gpu.perRank) == 0",
        "message": "a group spanning nodes needs the same ranks in every pod: tensor must be a multiple of the ranks one node holds (gpu.perNode / gpu.perRank)"
    },
    {
        "rule": "!has(self.autoscaling) || (has(self.autoscaling.mode) ? self.autoscaling.mode == 'builtin' : has(self.autoscaling.targetInFlightRequests)) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)",
        "message": "replicas must lie within autoscaling.minReplicas and autoscaling.maxReplicas (unless autoscaling.mode is builtin, which sets replicas itself)"
    }
]))]
pub struct ModelDeploymentSpec {
    /// The model to serve: where its weights come from.
    pub model: ModelSpec,

    /// The name clients ask for in requests (`"model"` in the OpenAI API).
    /// Defaults to the resource's `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub served_model_name: Option<String>,

    /// Tensor parallel size: how many ranks one copy of the model is split
    /// across. Attention heads must divide evenly among them. Defaults to 1;
    /// at most 1024.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub tensor: u32,

    /// How many independent copies (groups of `tensor` ranks) serve the
    /// model. Defaults to 1; 0 keeps the resource but runs nothing; at most
    /// 1000.
    #[serde(default = "one")]
    #[schemars(range(max = 1000))]
    pub replicas: u32,

    /// Limits of the inference engine in every rank.
    #[serde(default, skip_serializing_if = "EngineSpec::is_default")]
    pub engine: EngineSpec,

    /// GPUs per rank and per node, and the resource name they are requested
    /// by.
    #[serde(default, skip_serializing_if = "GpuSpec::is_default")]
    pub gpu: GpuSpec,

    /// CPU and memory of every rank's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ComputeResources>,

    /// Labels a node must carry to run the ranks' pods.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,

    /// Taints the ranks' pods tolerate (GPU nodes are often tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Node and pod affinity of the ranks' pods. The operator adds its own
    /// anti-affinity spreading groups over nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// The container image of the ranks. Defaults to the operator's own
    /// image (one binary serves every role).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// LoRA adapters to serve next to the base model (declared now, served
    /// in a later release). Names are unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub lora_adapters: Vec<LoraAdapter>,

    /// Bounds within which an autoscaler may change `replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,

    /// How long a group leaving (scale-down, or a changed spec rolling it) may take
    /// to finish its streams: the routers send it nothing new, and it is deleted
    /// once idle or after this long. Its pods' termination grace period is this plus
    /// 30 s. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub drain_timeout_seconds: Option<u32>,

    /// Mutual TLS between the routers and this deployment's workers: their gRPC is
    /// served over TLS to clients holding a certificate of the Secret's CA (the
    /// routers, configured with one by the chart's `router.backendTls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<WorkerTls>,
}

/// The workers' certificates, from a Secret of the deployment's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkerTls {
    /// A Secret holding `tls.crt` and `tls.key` (the workers' certificate, whose DNS
    /// names include `shardserve-worker`, the name the routers check) and `ca.crt`
    /// (the CA whose certificates clients must present): what cert-manager writes.
    /// A changed Secret is served within about a minute, without a restart.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Where the rank containers mount [`WorkerTls::secret_name`].
pub const WORKER_TLS_DIR: &str = "/etc/shardserve/tls";

/// [`ModelDeploymentSpec::drain_timeout_seconds`]'s default.
pub const DEFAULT_DRAIN_TIMEOUT_SECONDS: u32 = 300;
/// What a pod's termination grace period adds to the drain timeout: time for the
/// worker to finish its streams after SIGTERM and exit.
pub const TERMINATION_GRACE_EXTRA_SECONDS: u32 = 30;

impl ModelDeploymentSpec {
    /// A spec serving `source` with every other field at its default.
    pub fn from_source(source: impl Into<String>) -> Self {
        Self {
            model: ModelSpec::from_source(source),
            served_model_name: None,
            tensor: 1,
            replicas: 1,
            engine: EngineSpec::default(),
            gpu: GpuSpec::default(),
            resources: None,
            node_selector: Default::default(),
            tolerations: Vec::new(),
            affinity: None,
            image: None,
            lora_adapters: Vec::new(),
            autoscaling: None,
            drain_timeout_seconds: None,
            tls: None,
        }
    }

    /// How long a leaving group may take to finish its streams.
    pub fn drain_timeout(&self) -> std::time::Duration {
        let seconds = self
            .drain_timeout_seconds
            .unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECONDS);
        std::time::Duration::from_secs(seconds.into())
    }
}

fn one() -> u32 {
    1
}

impl ModelDeployment {
    /// The resource's name (empty when the manifest has none; validation
    /// refuses that).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    /// The name clients use: `spec.servedModelName`, else `metadata.name`.
    pub fn served_model_name(&self) -> &str {
        self.spec
            .served_model_name
            .as_deref()
            .unwrap_or_else(|| self.name())
    }
}
