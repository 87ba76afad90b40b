//! `status`: what the operator observed, written only by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The observed state of a `ModelDeployment`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Groups that exist (read by the `scale` subresource).
    #[serde(default)]
    pub replicas: u32,
    /// Groups whose every rank is ready to serve.
    #[serde(default)]
    pub ready_replicas: u32,
    /// Label selector of the deployment's pods, as a string (read by the
    /// `scale` subresource, so that a HorizontalPodAutoscaler finds them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `Ready`, `Progressing` and `Degraded`, each with a reason and a
    /// message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Every group that exists or should, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub groups: Vec<GroupStatus>,
    /// The phase of the least advanced group (`Serving` when all serve), with its
    /// progress while it downloads or loads (`Loading 43%`), for the printer
    /// column: a column cannot compute over `groups`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// The names of `spec.loraAdapters` the operator last loaded into the groups: a
    /// name dropped from the spec is unloaded from them; adapters loaded at run
    /// time through the router are not its to unload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_adapters: Vec<String>,
}

/// One replica group as the operator last saw it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Its StatefulSet, `<md>-g<g>`.
    pub name: String,
    pub phase: GroupPhase,
    /// Ranks whose pod is ready, of `ranks`.
    pub ranks_ready: u32,
    pub ranks: u32,
    /// Restarts since it last served for 10 minutes.
    #[serde(default)]
    pub restarts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart_reason: Option<String>,
    /// While it downloads or loads: bytes fetched, or bytes of the checkpoint its
    /// ranks have gone through (each reads only its slices), summed over its pods
    /// that answered, of `bytesTotal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Why it is in its phase, when there is more to say (the scheduler's reason a
    /// pod is Pending, the failure of a rank).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The LoRA adapters it serves, as it last reported them to the operator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adapters: Vec<String>,
}

/// Where a group is, from least to most advanced.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum GroupPhase {
    /// A rank failed; the group restarts (after its backoff).
    Failed,
    /// Its pods are being deleted so that its ranks restart together.
    Restarting,
    /// Pods missing or not yet scheduled.
    #[default]
    Pending,
    /// The model is being fetched (the init container runs).
    Downloading,
    /// The ranks run and load their shards, or wait for each other.
    Loading,
    /// Every rank is ready.
    Serving,
    /// Above `replicas`: being removed.
    Draining,
}

impl GroupPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "Failed",
            Self::Restarting => "Restarting",
            Self::Pending => "Pending",
            Self::Downloading => "Downloading",
            Self::Loading => "Loading",
            Self::Serving => "Serving",
            Self::Draining => "Draining",
        }
    }
}

/// The condition types a `ModelDeployment` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionType {
    /// Every group serves.
    Ready,
    /// Groups are being created, rolled or scaled.
    Progressing,
    /// The spec cannot run as written (it does not fit, or is invalid), or
    /// groups keep failing.
    Degraded,
    /// The builtin autoscaler sets `replicas` (present in builtin mode only); the
    /// message says its last change and why.
    Autoscaling,
}

impl ConditionType {
    /// The `type` field as written in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
            Self::Autoscaling => "Autoscaling",
        }
    }
}
