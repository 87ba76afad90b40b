//! Names, labels, annotations and ports of what the operator creates. The
//! router discovers models through these (the `<md>` Service selecting the
//! rank-0 pods of every group), so they are a contract: change them only
//! together with the router.

use std::collections::BTreeMap;
use std::fmt;

/// Label on everything made for a ModelDeployment (Services, StatefulSets,
/// pods): the ModelDeployment's name.
pub const MODEL_DEPLOYMENT_LABEL: &str = "shardserve.io/model-deployment";
/// Label on a group's StatefulSet, headless Service and pods: the group's
/// index, `"0"`, `"1"`, …
pub const GROUP_LABEL: &str = "shardserve.io/group";
/// The label Kubernetes (1.28+) puts on every StatefulSet pod: its ordinal.
/// Pod 0 of a group holds rank 0, the group's leader.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The standard label naming who manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// [`MANAGED_BY_LABEL`]'s value on everything the operator creates.
pub const MANAGED_BY: &str = "shardserve-operator";
/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "shardserve-operator";
/// Annotation on a group's StatefulSet and pods: the hash of the pod
/// template they run, so that a changed spec is rolled one group at a time.
pub const SPEC_HASH_ANNOTATION: &str = "shardserve.io/spec-hash";
/// Annotation on a group's StatefulSet: the uids of the pods the group formed with,
/// by pod index, comma-separated. A pod of the group not among them (recreated by
/// the StatefulSet controller before the operator saw it fail), or one of them gone,
/// means a rank left the group: it restarts whole.
pub const POD_UIDS_ANNOTATION: &str = "shardserve.io/pod-uids";
/// Annotation on a group's StatefulSet: its restarts since it last served for a
/// while, the time of the last one and why, `N;RFC 3339 time;reason` (the backoff's
/// memory; the operator keeps no state of its own).
pub const RESTARTS_ANNOTATION: &str = "shardserve.io/restarts";

/// Annotation on a group's StatefulSet: when it began to drain (RFC 3339). The
/// group is shown `Draining` in the status, so the routers send it nothing new, and
/// is deleted (scale-down) or restarted (a roll) once its streams have finished.
pub const DRAINING_SINCE_ANNOTATION: &str = "shardserve.io/draining-since";

/// The `app.kubernetes.io/name` of worker pods (as the chart's PodMonitor
/// selects them).
pub const APP_NAME: &str = "shardserve";
/// The `app.kubernetes.io/component` of worker pods.
pub const WORKER_COMPONENT: &str = "worker";

/// Port name of the gRPC API (`shardserve.v1.Inference`, gRPC health) on a
/// group's leader, and of the `<md>` Service's only port.
pub const GRPC_PORT_NAME: &str = "grpc";
/// The gRPC port, on pods and on the `<md>` Service.
pub const GRPC_PORT: i32 = 50051;
/// Port name of the leader's `/metrics`, `/healthz` and `/readyz`.
pub const METRICS_PORT_NAME: &str = "metrics";
pub const METRICS_PORT: i32 = 9090;
/// Port name of the rank-0 rendezvous the other ranks connect to.
pub const COORDINATOR_PORT_NAME: &str = "coordinator";
pub const COORDINATOR_PORT: i32 = 29500;

/// A replica group: one copy of the model, `tensor` ranks wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl GroupId {
    /// The group a `shardserve.io/group` label value names.
    pub fn parse(label: &str) -> Option<Self> {
        label.parse().ok().map(GroupId)
    }
}

/// The Service selecting the rank-0 pods of every group: `<md>`.
pub fn service_name(md: &str) -> String {
    md.to_string()
}

/// A group's StatefulSet and headless Service: `<md>-g<g>`.
pub fn group_name(md: &str, group: GroupId) -> String {
    format!("{md}-g{group}")
}

/// Where a group's ranks meet its rank 0: the DNS name of the group's pod 0
/// through the headless Service, and the coordinator port.
pub fn coordinator_address(md: &str, group: GroupId, namespace: &str) -> String {
    let name = group_name(md, group);
    format!("{name}-0.{name}.{namespace}.svc:{COORDINATOR_PORT}")
}

/// `shardserve.io/model-deployment=<md>`: every object and pod of `md`.
pub fn model_selector(md: &str) -> String {
    format!("{MODEL_DEPLOYMENT_LABEL}={md}")
}

/// The selector of the `<md>` Service: the rank-0 pods of every group.
pub fn leader_selector(md: &str) -> BTreeMap<String, String> {
    labels([(MODEL_DEPLOYMENT_LABEL, md), (POD_INDEX_LABEL, "0")])
}

/// The selector of group `g`'s pods.
pub fn group_selector(md: &str, group: GroupId) -> BTreeMap<String, String> {
    labels([
        (MODEL_DEPLOYMENT_LABEL, md),
        (GROUP_LABEL, &group.to_string()),
    ])
}

pub(crate) fn labels<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    pairs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_router_contract() {
        assert_eq!(service_name("smollm2"), "smollm2");
        assert_eq!(group_name("smollm2", GroupId(2)), "smollm2-g2");
        assert_eq!(
            coordinator_address("smollm2", GroupId(0), "models"),
            "smollm2-g0-0.smollm2-g0.models.svc:29500"
        );
        assert_eq!(
            leader_selector("smollm2"),
            labels([
                ("shardserve.io/model-deployment", "smollm2"),
                ("apps.kubernetes.io/pod-index", "0")
            ])
        );
        assert_eq!(GroupId::parse("12"), Some(GroupId(12)));
        assert_eq!(GroupId::parse("x"), None);
    }
}
