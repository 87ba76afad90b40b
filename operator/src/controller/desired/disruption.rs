//! `<md>`: the PodDisruptionBudget of a deployment's rank pods. A voluntary
//! disruption (a node drain, a cluster upgrade) may evict one rank pod at a time;
//! losing a rank restarts its whole group, and until that group serves again its
//! pods count as unavailable, so further evictions wait: at most one group is down
//! for a drain at a time. Pods that are not ready (a broken group) may always be
//! evicted, so a drain never waits on a group that serves nothing anyway.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Owner;
use crate::controller::labels::{MODEL_DEPLOYMENT_LABEL, labels};

pub(super) fn budget(owner: &Owner) -> PodDisruptionBudget {
    let name = &owner.name;
    PodDisruptionBudget {
        metadata: owner.model_meta(),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels([(MODEL_DEPLOYMENT_LABEL, name.as_str())])),
                match_expressions: None,
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            min_available: None,
        }),
        status: None,
    }
}
