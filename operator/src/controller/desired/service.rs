//! The Services: `<md>` for the router (the rank-0 pods of every group) and
//! one headless `<md>-g<g>` per group (the ranks' DNS names).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::Owner;
use crate::controller::labels::{
    COORDINATOR_PORT, COORDINATOR_PORT_NAME, GRPC_PORT, GRPC_PORT_NAME, GroupId, MANAGED_BY,
    MANAGED_BY_LABEL, group_name, group_selector, leader_selector,
};

/// `<md>`: a ClusterIP Service on port `grpc` selecting every group's pod 0
/// (its rank 0, the only rank that serves). The router watches its
/// EndpointSlices; the contract is in [`crate::controller::labels`].
pub(super) fn leaders(owner: &Owner) -> Service {
    let name = &owner.name;
    Service {
        metadata: owner.model_meta(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(leader_selector(name)),
            ports: Some(vec![port(GRPC_PORT_NAME, GRPC_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// `<md>-g<g>`: headless, publishing addresses of pods not ready yet, so
/// that the ranks find rank 0 (`<md>-g<g>-0.<md>-g<g>.<ns>.svc`) while the
/// group is still forming.
pub(super) fn headless(owner: &Owner, id: GroupId) -> Service {
    let mut labels = group_selector(&owner.name, id);
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    Service {
        metadata: owner.meta(group_name(&owner.name, id), labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(group_selector(&owner.name, id)),
            ports: Some(vec![port(COORDINATOR_PORT_NAME, COORDINATOR_PORT)]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..ServicePort::default()
    }
}
