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
}

impl ConditionType {
    /// The `type` field as written in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Progressing => "Progressing",
            Self::Degraded => "Degraded",
        }
    }
}
