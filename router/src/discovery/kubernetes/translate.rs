//! The pure half of Kubernetes discovery: ModelDeployments and
//! EndpointSlices in, one [`Deployment`] per served model name out. The
//! watcher (`super`) calls [`translate`] with its stores' contents after every
//! change; nothing here talks to the API server.
//!
//! The contract with the operator: a ModelDeployment `<md>` has a Service
//! named `<md>` in its namespace that selects the rank-0 pod of every group
//! and has a port named `grpc`; the endpoint-slice controller labels that
//! Service's slices `kubernetes.io/service-name: <md>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv6Addr;

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use kube::api::DynamicObject;

use crate::discovery::{Backend, Deployment};

/// The standard label naming the Service an EndpointSlice belongs to.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The port of the rank-0 Service that leaders serve gRPC on.
const GRPC_PORT_NAME: &str = "grpc";

/// What discovery publishes, plus what it had to skip.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Translation {
    /// Sorted by model; each deployment's backends sorted by id.
    pub deployments: Vec<Deployment>,
    /// Problems a user can fix (one line each, sorted), for the log.
    pub warnings: Vec<String>,
}

/// The served model name: `spec.servedModelName` when set, else the name.
fn served_model_name(md: &DynamicObject) -> Option<&str> {
    md.data
        .pointer("/spec/servedModelName")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .or(md.metadata.name.as_deref())
}

/// The names of `spec.loraAdapters`.
fn declared_adapters(md: &DynamicObject) -> Vec<String> {
    md.data
        .pointer("/spec/loraAdapters")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("name").and_then(serde_json::Value::as_str))
        .map(str::to_string)
        .collect()
}

/// The leader pods (`<group>-0`) of the groups the operator drains: it lists them
/// in `status.groups[]` with phase `Draining` until their streams have finished and
/// it deletes them. They get nothing new.
fn draining_leaders(md: &DynamicObject) -> HashSet<String> {
    md.data
        .pointer("/status/groups")
        .and_then(serde_json::Value::as_array)
        .into_iter()
        .flatten()
        .filter(|g| g.get("phase").and_then(serde_json::Value::as_str) == Some("Draining"))
        .filter_map(|g| g.get("name").and_then(serde_json::Value::as_str))
        .map(|group| format!("{group}-0"))
        .collect()
}

/// Ready and not terminating; a condition left unset counts as ready, as the
/// EndpointSlice API documents.
fn is_ready(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
    let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
    ready && !terminating
}

/// The slice's port named `grpc`, when it has a usable one.
fn grpc_port(slice: &EndpointSlice) -> Option<u16> {
    slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(GRPC_PORT_NAME))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

/// `http://address:port` (`https://` for a deployment whose workers serve TLS),
/// with an IPv6 address in brackets.
fn grpc_uri(address: &str, port: u16, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if address.parse::<Ipv6Addr>().is_ok() {
        format!("{scheme}://[{address}]:{port}")
    } else {
        format!("{scheme}://{address}:{port}")
    }
}

/// Whether a ModelDeployment's workers serve TLS (`spec.tls`).
fn serves_tls(md: &DynamicObject) -> bool {
    md.data
        .get("spec")
        .and_then(|spec| spec.get("tls"))
        .is_some_and(|tls| tls.is_object())
}

/// Joins ModelDeployments to the slices of their rank-0 Services. Every
/// ModelDeployment yields a deployment, with no backends while none is ready;
/// ModelDeployments sharing a served model name (an old and a new one during
/// a migration) share its backends. A backend is one ready endpoint; its id
/// is `namespace/pod` (pod names repeat across namespaces), or
/// `namespace/address` when the endpoint names no pod.
pub(super) fn translate<'a>(
    model_deployments: impl IntoIterator<Item = &'a DynamicObject>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Translation {
    // (namespace, Service name = ModelDeployment name) -> served model name, TLS.
    let mut services: HashMap<(&str, &str), (&str, bool)> = HashMap::new();
    // (namespace, pod) of the leaders of draining groups.
    let mut draining: HashSet<(&str, String)> = HashSet::new();
    let mut models: BTreeMap<String, BTreeMap<String, Backend>> = BTreeMap::new();
    let mut adapters: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for md in model_deployments {
        let Some(name) = md.metadata.name.as_deref() else {
            continue;
        };
        let namespace = md.metadata.namespace.as_deref().unwrap_or_default();
        let model = served_model_name(md).unwrap_or(name);
        services.insert((namespace, name), (model, serves_tls(md)));
        draining.extend(draining_leaders(md).into_iter().map(|pod| (namespace, pod)));
        models.entry(model.to_string()).or_default();
        adapters
            .entry(model.to_string())
            .or_default()
            .extend(declared_adapters(md));
    }

    let mut warnings = Vec::new();
    for slice in slices {
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let Some(&(model, tls)) = services.get(&(namespace, service.as_str())) else {
            continue;
        };
        let Some(port) = grpc_port(slice) else {
            // The EndpointSlice controller writes a placeholder slice, with no
            // endpoints and no ports, while a Service has no ready pod: normal.
            if slice.endpoints.is_empty() {
                continue;
            }
            warnings.push(format!(
                "EndpointSlice {namespace}/{} of Service {namespace}/{service} has no port named \"{GRPC_PORT_NAME}\"; model {model:?} gets no backends from it",
                slice.metadata.name.as_deref().unwrap_or_default(),
            ));
            continue;
        };
        let Some(backends) = models.get_mut(model) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| is_ready(e)) {
            // The API server lists one address per endpoint; any one reaches the pod.
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let who = endpoint
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref().is_none_or(|k| k == "Pod"))
                .and_then(|r| r.name.as_deref())
                .unwrap_or(address);
            if draining.contains(&(namespace, who.to_string())) {
                continue;
            }
            let id = format!("{namespace}/{who}");
            // The same pod can sit in two slices while the controller moves it.
            backends.entry(id.clone()).or_insert_with(|| Backend {
                id,
                grpc_uri: grpc_uri(address, port, tls),
            });
        }
    }
    warnings.sort();
    Translation {
        deployments: models
            .into_iter()
            .map(|(model, backends)| Deployment {
                adapters: adapters.remove(&model).unwrap_or_default(),
                model,
                backends: backends.into_values().collect(),
            })
            .collect(),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::discovery::kubernetes::fixtures::{endpoint, grpc, md_json, ready, slice_json};

    fn md(namespace: &str, name: &str, served: Option<&str>) -> DynamicObject {
        serde_json::from_value(md_json(namespace, name, served)).unwrap()
    }

    fn slice(
        namespace: &str,
        name: &str,
        service: &str,
        ports: Value,
        endpoints: Vec<Value>,
    ) -> EndpointSlice {
        serde_json::from_value(slice_json(namespace, name, service, ports, endpoints)).unwrap()
    }

    fn backend(id: &str, uri: &str) -> Backend {
        Backend {
            id: id.into(),
            grpc_uri: uri.into(),
        }
    }

    /// (model, [backend ids]) of a translation.
    fn shape(t: &Translation) -> Vec<(String, Vec<String>)> {
        t.deployments
            .iter()
            .map(|d| {
                (
                    d.model.clone(),
                    d.backends.iter().map(|b| b.id.clone()).collect(),
                )
            })
            .collect()
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn one_model_deployment_with_one_slice() {
        let mds = [md("ml", "llama", None)];
        let slices = [slice(
            "ml",
            "llama-abc",
            "llama",
            grpc(),
            vec![ready("llama-g0-0", "10.0.0.5")],
        )];
        let t = translate(&mds, &slices);
        assert_eq!(
            t.deployments,
            [Deployment {
                model: "llama".into(),
                backends: vec![backend("ml/llama-g0-0", "http://10.0.0.5:50051")],
                adapters: vec![],
            }]
        );
        assert!(t.warnings.is_empty());
    }

    #[test]
    fn the_leaders_of_draining_groups_get_nothing_new() {
        let mut md_value = md_json("ml", "llama", None);
        md_value["status"] = json!({"groups": [
            {"name": "llama-g0", "phase": "Serving"},
            {"name": "llama-g1", "phase": "Draining"},
        ]});
        let mds = [serde_json::from_value::<DynamicObject>(md_value).unwrap()];
        let slices = [slice(
            "ml",
            "llama-abc",
            "llama",
            grpc(),
            vec![
                ready("llama-g0-0", "10.0.0.5"),
                ready("llama-g1-0", "10.0.1.5"),
            ],
        )];
        assert_eq!(
            shape(&translate(&mds, &slices)),
            [("llama".to_string(), ids(&["ml/llama-g0-0"]))]
        );
    }

    #[test]
    fn several_model_deployments_and_several_slices_per_service() {
        let mds = [
            md("ml", "llama", None),
            md("ml", "smol", None),
            md("other", "qwen", None),
        ];
        let slices = [
            slice(
                "ml",
                "llama-1",
                "llama",
                grpc(),
                vec![
                    ready("llama-g1-0", "10.0.1.1"),
                    ready("llama-g0-0", "10.0.0.1"),
                ],
            ),
            slice(
                "ml",
                "llama-2",
                "llama",
                grpc(),
                vec![ready("llama-g2-0", "10.0.2.1")],
            ),
            slice(
                "ml",
                "smol-1",
                "smol",
                grpc(),
                vec![ready("smol-g0-0", "10.0.3.1")],
            ),
            slice(
                "other",
                "qwen-1",
                "qwen",
                grpc(),
                vec![ready("qwen-g0-0", "10.0.4.1")],
            ),
        ];
        let t = translate(&mds, &slices);
        assert_eq!(
            shape(&t),
            [
                (
                    "llama".into(),
                    ids(&["ml/llama-g0-0", "ml/llama-g1-0", "ml/llama-g2-0"])
                ),
                ("qwen".into(), ids(&["other/qwen-g0-0"])),
                ("smol".into(), ids(&["ml/smol-g0-0"])),
            ]
        );
        // The order of the inputs does not matter.
        let reversed: Vec<_> = slices.iter().rev().collect();
        assert_eq!(translate(mds.iter().rev(), reversed), t);
    }

    #[test]
    fn not_ready_and_terminating_endpoints_are_skipped() {
        let mds = [md("ml", "llama", None)];
        let slices = [slice(
            "ml",
            "llama-1",
            "llama",
            grpc(),
            vec![
                ready("up", "10.0.0.1"),
                endpoint(Some("unset"), "10.0.0.2", None, None),
                endpoint(Some("loading"), "10.0.0.3", Some(false), None),
                endpoint(Some("leaving"), "10.0.0.4", Some(true), Some(true)),
                endpoint(Some("gone"), "10.0.0.5", Some(false), Some(true)),
            ],
        )];
        assert_eq!(
            shape(&translate(&mds, &slices)),
            [("llama".into(), ids(&["ml/unset", "ml/up"]))]
        );
    }

    #[test]
    fn a_model_deployments_adapters_are_known_from_its_spec() {
        let mut json = crate::discovery::kubernetes::fixtures::md_json("ml", "llama", None);
        json["spec"]["loraAdapters"] = json!([
            {"name": "sql", "source": "hf://org/sql"},
            {"name": "poetry", "source": "pip://p==1/a"}
        ]);
        let mds = [serde_json::from_value::<DynamicObject>(json).unwrap()];
        let t = translate(&mds, std::iter::empty());
        assert_eq!(t.deployments[0].adapters, ["sql", "poetry"]);
    }

    #[test]
    fn a_model_deployment_without_ready_endpoints_is_known_with_no_backends() {
        let mds = [md("ml", "llama", None), md("ml", "starting", None)];
        let slices = [slice(
            "ml",
            "starting-1",
            "starting",
            grpc(),
            vec![endpoint(Some("p"), "10.0.0.1", Some(false), None)],
        )];
        let t = translate(&mds, &slices);
        assert_eq!(
            t.deployments,
            [
                Deployment {
                    model: "llama".into(),
                    backends: vec![],
                    adapters: vec![],
                },
                Deployment {
                    model: "starting".into(),
                    backends: vec![],
                    adapters: vec![],
                },
            ]
        );
    }

    #[test]
    fn a_slice_without_a_grpc_port_is_skipped_with_a_warning() {
        let mds = [md("ml", "llama", None)];
        let slices = [
            slice(
                "ml",
                "llama-1",
                "llama",
                json!([{"name": "http", "port": 8080}]),
                vec![ready("a", "10.0.0.1")],
            ),
            slice(
                "ml",
                "llama-2",
                "llama",
                json!([{"name": "grpc"}]),
                vec![ready("b", "10.0.0.2")],
            ),
            slice(
                "ml",
                "llama-3",
                "llama",
                grpc(),
                vec![ready("c", "10.0.0.3")],
            ),
        ];
        let t = translate(&mds, &slices);
        assert_eq!(shape(&t), [("llama".into(), ids(&["ml/c"]))]);
        assert_eq!(t.warnings.len(), 2);
        assert!(
            t.warnings[0].starts_with(
                "EndpointSlice ml/llama-1 of Service ml/llama has no port named \"grpc\""
            ),
            "{:?}",
            t.warnings
        );
        assert!(t.warnings[1].contains("ml/llama-2"));

        // A Service with no ready pod has a placeholder slice: no ports, no endpoints.
        let placeholder = [slice("ml", "llama-x", "llama", json!(null), vec![])];
        let t = translate(&mds, &placeholder);
        assert!(t.warnings.is_empty(), "{:?}", t.warnings);
    }

    #[test]
    fn ipv6_addresses_are_bracketed() {
        let mds = [md("ml", "llama", None)];
        let slices = [slice(
            "ml",
            "llama-1",
            "llama",
            grpc(),
            vec![ready("p", "fd00::1:5")],
        )];
        assert_eq!(
            translate(&mds, &slices).deployments[0].backends,
            [backend("ml/p", "http://[fd00::1:5]:50051")]
        );
    }

    #[test]
    fn the_served_model_name_overrides_the_resource_name() {
        let mds = [
            md("ml", "llama-70b-prod", Some("llama-3-70b")),
            md("ml", "empty", Some("")),
        ];
        let slices = [
            slice(
                "ml",
                "prod-1",
                "llama-70b-prod",
                grpc(),
                vec![ready("llama-70b-prod-g0-0", "10.0.0.1")],
            ),
            slice(
                "ml",
                "stray",
                "llama-3-70b",
                grpc(),
                vec![ready("stray", "10.0.0.9")],
            ),
        ];
        assert_eq!(
            shape(&translate(&mds, &slices)),
            [
                ("empty".into(), vec![]),
                ("llama-3-70b".into(), ids(&["ml/llama-70b-prod-g0-0"])),
            ]
        );
    }

    #[test]
    fn a_deleted_model_deployment_takes_its_model_away_even_while_slices_linger() {
        let slices = [
            slice(
                "ml",
                "llama-1",
                "llama",
                grpc(),
                vec![ready("llama-g0-0", "10.0.0.1")],
            ),
            slice(
                "ml",
                "smol-1",
                "smol",
                grpc(),
                vec![ready("smol-g0-0", "10.0.0.2")],
            ),
        ];
        let before = translate(&[md("ml", "llama", None), md("ml", "smol", None)], &slices);
        assert_eq!(before.deployments.len(), 2);
        let after = translate(&[md("ml", "smol", None)], &slices);
        assert_eq!(shape(&after), [("smol".into(), ids(&["ml/smol-g0-0"]))]);
    }

    #[test]
    fn slices_of_other_services_and_namespaces_are_ignored() {
        let mds = [md("ml", "llama", None)];
        let unlabelled: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "manual", "namespace": "ml"},
            "addressType": "IPv4",
            "ports": grpc(),
            "endpoints": [ready("manual", "10.0.0.7")],
        }))
        .unwrap();
        let slices = [
            slice(
                "ml",
                "llama-g0-1",
                "llama-g0",
                grpc(),
                vec![ready("llama-g0-1", "10.0.0.2")],
            ),
            slice(
                "elsewhere",
                "llama-1",
                "llama",
                grpc(),
                vec![ready("impostor", "10.0.0.3")],
            ),
            unlabelled,
        ];
        assert_eq!(shape(&translate(&mds, &slices)), [("llama".into(), vec![])]);
    }

    #[test]
    fn model_deployments_sharing_a_served_name_share_its_backends() {
        // The same name in two namespaces, and a blue/green pair in one.
        let mds = [
            md("team-a", "smollm2", None),
            md("team-b", "smollm2", None),
            md("team-b", "smollm2-next", Some("smollm2")),
        ];
        let slices = [
            slice(
                "team-a",
                "s-1",
                "smollm2",
                grpc(),
                vec![ready("smollm2-g0-0", "10.0.0.1")],
            ),
            slice(
                "team-b",
                "s-1",
                "smollm2",
                grpc(),
                vec![ready("smollm2-g0-0", "10.0.1.1")],
            ),
            slice(
                "team-b",
                "n-1",
                "smollm2-next",
                grpc(),
                vec![ready("smollm2-next-g0-0", "10.0.1.2")],
            ),
        ];
        assert_eq!(
            shape(&translate(&mds, &slices)),
            [(
                "smollm2".into(),
                ids(&[
                    "team-a/smollm2-g0-0",
                    "team-b/smollm2-g0-0",
                    "team-b/smollm2-next-g0-0"
                ])
            )]
        );
    }

    #[test]
    fn an_endpoint_in_two_slices_is_one_backend_and_addresses_stand_in_for_pods() {
        let mds = [md("ml", "llama", None)];
        let slices = [
            slice(
                "ml",
                "llama-1",
                "llama",
                grpc(),
                vec![
                    ready("p", "10.0.0.1"),
                    endpoint(None, "10.0.0.8", Some(true), None),
                ],
            ),
            slice(
                "ml",
                "llama-2",
                "llama",
                grpc(),
                vec![ready("p", "10.0.0.1")],
            ),
        ];
        assert_eq!(
            translate(&mds, &slices).deployments[0].backends,
            [
                backend("ml/10.0.0.8", "http://10.0.0.8:50051"),
                backend("ml/p", "http://10.0.0.1:50051"),
            ]
        );
    }

    #[test]
    fn the_grpc_port_is_found_among_several() {
        let mds = [md("ml", "llama", None)];
        let ports = json!([{"name": "metrics", "port": 9090}, {"name": "grpc", "port": 50061}]);
        let slices = [slice(
            "ml",
            "llama-1",
            "llama",
            ports,
            vec![ready("p", "10.0.0.1")],
        )];
        assert_eq!(
            translate(&mds, &slices).deployments[0].backends[0].grpc_uri,
            "http://10.0.0.1:50061"
        );
    }

    #[test]
    fn workers_serving_tls_are_reached_over_https() {
        let mut with_tls = md_json("ml", "llama", None);
        with_tls["spec"]["tls"] = json!({"secretName": "llama-tls"});
        let mds = [
            serde_json::from_value::<DynamicObject>(with_tls).unwrap(),
            md("ml", "plain", None),
        ];
        let slices = [
            slice(
                "ml",
                "llama-1",
                "llama",
                grpc(),
                vec![ready("p", "10.0.0.1")],
            ),
            slice(
                "ml",
                "plain-1",
                "plain",
                grpc(),
                vec![ready("q", "fd00::2")],
            ),
        ];
        let out = translate(&mds, &slices).deployments;
        assert_eq!(out[0].backends[0].grpc_uri, "https://10.0.0.1:50051");
        assert_eq!(out[1].backends[0].grpc_uri, "http://[fd00::2]:50051");
    }

    #[test]
    fn nothing_in_gives_nothing_out() {
        let none: [DynamicObject; 0] = [];
        let slices = [slice("ml", "x", "x", grpc(), vec![ready("p", "10.0.0.1")])];
        assert_eq!(translate(&none, &slices), Translation::default());
    }
}
