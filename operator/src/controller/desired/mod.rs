//! The objects a `ModelDeployment` should have, built as plain values from
//! its spec and topology: the `<md>` Service, and per replica group a
//! headless Service and a StatefulSet. Pure; the reconcile applies them with
//! server-side apply.

mod disruption;
pub(crate) mod model;
mod network;
mod pod;
mod service;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{PodTemplateSpec, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::Resource;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use crate::crd::ModelDeployment;
use crate::crd::source::{ModelSource, SourceError};

use super::check::Topology;
use super::labels::{
    APP_NAME, GroupId, MANAGED_BY, MANAGED_BY_LABEL, SPEC_HASH_ANNOTATION, WORKER_COMPONENT,
    group_name, group_selector, labels,
};

pub use model::{MODEL_DIR, ModelFiles};
pub use network::{NetworkPeers, Peer, PeerError, fetch_ports};

/// Operator-wide settings the objects depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSettings {
    /// The image of rank pods when `spec.image` is unset: the operator's own.
    pub image: String,
    /// A Hugging Face Hub mirror or proxy (`HF_ENDPOINT` of the model fetch), for
    /// clusters that must not reach the public Hub.
    pub hub_endpoint: Option<String>,
    /// Whether ranks compute on their GPUs (`--device cuda:0`: each rank container is
    /// given its own): the worker image is a CUDA build.
    pub cuda: bool,
    /// Who may reach rank pods: each deployment gets a NetworkPolicy `<md>` letting
    /// in only these (and its own ranks). None: no policy (`--network-policies` off).
    pub network: Option<NetworkPeers>,
}

/// Everything one `ModelDeployment` should have.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// `<md>`: the rank-0 pods of every group (what the router finds).
    pub service: Service,
    /// `<md>`: evictions take one rank pod, so one group, at a time.
    pub disruption_budget: k8s_openapi::api::policy::v1::PodDisruptionBudget,
    /// `<md>`: who reaches the rank pods and whom they reach, when the operator
    /// makes NetworkPolicies.
    pub network_policy: Option<k8s_openapi::api::networking::v1::NetworkPolicy>,
    /// Groups `0..replicas`.
    pub groups: Vec<DesiredGroup>,
    /// How long a leaving group may take to finish its streams.
    pub drain_timeout: std::time::Duration,
}

/// One replica group's objects.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredGroup {
    pub id: GroupId,
    /// `<md>-g<g>`, headless: the ranks' DNS names.
    pub service: Service,
    /// `<md>-g<g>`: the group's pods.
    pub statefulset: StatefulSet,
    /// The hash of the pod template (also in the StatefulSet's and pods'
    /// `shardserve.io/spec-hash` annotation).
    pub spec_hash: String,
}

/// Why the objects cannot be built. Objects from the API server always
/// have what is needed; a hand-made one may not.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("ModelDeployment {name:?} has no {field}")]
    Incomplete { name: String, field: &'static str },
    #[error("spec.model.source: {0}")]
    Source(#[from] SourceError),
}

/// The objects of `md`, laid out as `topology` says.
pub fn desired(
    md: &ModelDeployment,
    topology: &Topology,
    settings: &WorkerSettings,
) -> Result<Desired, BuildError> {
    let members: Vec<GroupId> = (0..topology.groups).map(GroupId).collect();
    desired_members(md, topology, settings, &members)
}

/// [`desired`] with the groups `members` (see [`super::members`]).
pub fn desired_members(
    md: &ModelDeployment,
    topology: &Topology,
    settings: &WorkerSettings,
    members: &[GroupId],
) -> Result<Desired, BuildError> {
    let owner = Owner::of(md)?;
    let files = ModelFiles::of(&ModelSource::parse(&md.spec.model.source)?);
    let groups = members
        .iter()
        .copied()
        .map(|id| {
            let group = GroupContext {
                md,
                owner: &owner,
                id,
                topology,
                image: md.spec.image.as_deref().unwrap_or(&settings.image),
                hub_endpoint: settings.hub_endpoint.as_deref(),
                cuda: settings.cuda,
                files: &files,
            };
            let (statefulset, spec_hash) = statefulset(&group);
            DesiredGroup {
                id,
                service: service::headless(&owner, id),
                statefulset,
                spec_hash,
            }
        })
        .collect();
    Ok(Desired {
        service: service::leaders(&owner),
        disruption_budget: disruption::budget(&owner),
        network_policy: settings
            .network
            .as_ref()
            .map(|peers| network::policy(&owner, peers, &files, settings.hub_endpoint.as_deref())),
        groups,
        drain_timeout: md.spec.drain_timeout(),
    })
}

/// Who owns the objects: name, namespace and the controller reference that
/// makes Kubernetes delete them with the `ModelDeployment`.
pub(super) struct Owner {
    name: String,
    namespace: String,
    reference: OwnerReference,
}

impl Owner {
    fn of(md: &ModelDeployment) -> Result<Self, BuildError> {
        let incomplete = |field| BuildError::Incomplete {
            name: md.name().to_string(),
            field,
        };
        let mut reference = md
            .controller_owner_ref(&())
            .ok_or_else(|| incomplete("metadata.uid"))?;
        reference.block_owner_deletion = Some(true);
        Ok(Self {
            name: md.name().to_string(),
            namespace: md
                .metadata
                .namespace
                .clone()
                .ok_or_else(|| incomplete("metadata.namespace"))?,
            reference,
        })
    }

    /// Metadata of an owned object.
    fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }

    /// Metadata of a deployment-wide object named `<md>` (its Service, its
    /// disruption budget).
    fn model_meta(&self) -> ObjectMeta {
        self.meta(
            super::labels::service_name(&self.name),
            super::labels::labels([
                (super::labels::MODEL_DEPLOYMENT_LABEL, self.name.as_str()),
                (MANAGED_BY_LABEL, MANAGED_BY),
            ]),
        )
    }

    /// Labels of a group's objects and pods.
    fn group_labels(&self, id: GroupId) -> BTreeMap<String, String> {
        let mut labels = group_selector(&self.name, id);
        labels.extend(super::labels::labels([
            (MANAGED_BY_LABEL, MANAGED_BY),
            ("app.kubernetes.io/name", APP_NAME),
            ("app.kubernetes.io/instance", &self.name),
            ("app.kubernetes.io/component", WORKER_COMPONENT),
        ]));
        labels
    }
}

/// What the builders of one group's objects read.
pub(super) struct GroupContext<'a> {
    md: &'a ModelDeployment,
    owner: &'a Owner,
    id: GroupId,
    topology: &'a Topology,
    image: &'a str,
    hub_endpoint: Option<&'a str>,
    cuda: bool,
    files: &'a ModelFiles,
}

/// A group's StatefulSet and the hash of what its pods run. Pods are
/// created together (`Parallel`: ranks wait for each other anyway) and
/// replaced only when the operator deletes them (`OnDelete`), so that a
/// group restarts or rolls as a whole, never rank by rank.
fn statefulset(group: &GroupContext<'_>) -> (StatefulSet, String) {
    let owner = group.owner;
    let name = group_name(&owner.name, group.id);
    let pods = i32::try_from(group.topology.pods_per_group).unwrap_or(i32::MAX);
    let mut template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(owner.group_labels(group.id)),
            ..ObjectMeta::default()
        }),
        spec: Some(pod::pod_spec(group)),
    };
    let spec_hash = spec_hash(&template, pods);
    let annotations = labels([(SPEC_HASH_ANNOTATION, spec_hash.as_str())]);
    if let Some(meta) = template.metadata.as_mut() {
        meta.annotations = Some(annotations.clone());
    }
    let mut metadata = owner.meta(name.clone(), owner.group_labels(group.id));
    metadata.annotations = Some(annotations);
    let statefulset = StatefulSet {
        metadata,
        spec: Some(StatefulSetSpec {
            service_name: Some(name),
            replicas: Some(pods),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(group_selector(&owner.name, group.id)),
                match_expressions: None,
            },
            template,
            ..StatefulSetSpec::default()
        }),
        status: None,
    };
    (statefulset, spec_hash)
}

/// The first 16 hex digits of the SHA-256 of what a group's pods run.
fn spec_hash(template: &PodTemplateSpec, pods: i32) -> String {
    let mut hasher = Sha256::new();
    hasher.update(pods.to_le_bytes());
    // Serialising typed objects cannot fail; an empty hash would only roll.
    hasher.update(serde_json::to_vec(template).unwrap_or_default());
    hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests;
