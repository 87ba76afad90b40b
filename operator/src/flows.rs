//! What a set of NetworkPolicies allows, read as the Kubernetes API documents it:
//! a pod that no policy selects for a direction (ingress or egress) is open in that
//! direction; once one does, a flow needs a rule of some selecting policy that
//! matches its peer and its port. A flow between two pods must be allowed at both
//! ends: egress at its source, ingress at its destination.
//!
//! The operator's policies and the chart's are read back with it in tests, as the
//! flows they allow, so a policy that opens more (or less) than the README lists
//! fails a test instead of a cluster.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// A pod: its namespace, labels and named container ports.
#[derive(Clone, Debug, Default)]
pub struct Pod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ports: BTreeMap<String, u16>,
}

impl Pod {
    pub fn new<'a>(namespace: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            namespace: namespace.to_string(),
            labels: labels
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: BTreeMap::new(),
        }
    }

    /// With a named container port (what a policy's named port resolves to).
    pub fn with_port(mut self, name: &str, port: u16) -> Self {
        self.ports.insert(name.to_string(), port);
        self
    }
}

/// One end of a flow: a pod, or an address outside the pod network (a client, the
/// API server's endpoint, a model hub).
#[derive(Clone, Debug)]
pub enum Endpoint {
    Pod(Pod),
    Address(IpAddr),
}

/// A connection attempt: from, to, port and protocol (`TCP`, `UDP`, `SCTP`).
#[derive(Clone, Debug)]
pub struct Flow {
    pub from: Endpoint,
    pub to: Endpoint,
    pub port: u16,
    pub protocol: &'static str,
}

impl Flow {
    pub fn tcp(from: &Endpoint, to: &Endpoint, port: u16) -> Self {
        Self {
            from: from.clone(),
            to: to.clone(),
            port,
            protocol: "TCP",
        }
    }

    pub fn udp(from: &Endpoint, to: &Endpoint, port: u16) -> Self {
        Self {
            protocol: "UDP",
            ..Self::tcp(from, to, port)
        }
    }
}

/// The cluster's namespaces and their labels (each also carries
/// `kubernetes.io/metadata.name`, as the API server sets it).
#[derive(Clone, Debug, Default)]
pub struct Namespaces(BTreeMap<String, BTreeMap<String, String>>);

impl Namespaces {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut namespaces = Self::default();
        for name in names {
            namespaces.add(name, []);
        }
        namespaces
    }

    pub fn add<'a>(&mut self, name: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let mut all: BTreeMap<String, String> = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        all.insert("kubernetes.io/metadata.name".into(), name.to_string());
        self.0.insert(name.to_string(), all);
    }

    fn labels(&self, name: &str) -> BTreeMap<String, String> {
        self.0.get(name).cloned().unwrap_or_else(|| {
            BTreeMap::from([("kubernetes.io/metadata.name".to_string(), name.to_string())])
        })
    }
}

/// A rule's peers and ports (either may be absent: anyone, any port).
type Rule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// Whether `policies` let `flow` through.
pub fn allows(policies: &[NetworkPolicy], namespaces: &Namespaces, flow: &Flow) -> bool {
    let egress = match &flow.from {
        Endpoint::Pod(pod) => end_allows(policies, namespaces, pod, Direction::Egress, flow),
        Endpoint::Address(_) => true,
    };
    let ingress = match &flow.to {
        Endpoint::Pod(pod) => end_allows(policies, namespaces, pod, Direction::Ingress, flow),
        Endpoint::Address(_) => true,
    };
    egress && ingress
}

/// Whether `pod`'s own policies allow `flow` in `direction`.
fn end_allows(
    policies: &[NetworkPolicy],
    namespaces: &Namespaces,
    pod: &Pod,
    direction: Direction,
    flow: &Flow,
) -> bool {
    let (peer, port_owner) = match direction {
        Direction::Ingress => (&flow.from, pod),
        Direction::Egress => (&flow.to, peer_pod(&flow.to).unwrap_or(pod)),
    };
    let mut selected = false;
    for policy in policies {
        let Some(spec) = &policy.spec else { continue };
        let namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        if namespace != pod.namespace
            // No podSelector, like an empty one, selects every pod of the namespace.
            || !spec
                .pod_selector
                .as_ref()
                .is_none_or(|selector| selector_matches(selector, &pod.labels))
            || !has_direction(spec, direction)
        {
            continue;
        }
        selected = true;
        let rules: Vec<Rule<'_>> = match direction {
            Direction::Ingress => spec
                .ingress
                .iter()
                .flatten()
                .map(|r| (r.from.as_ref(), r.ports.as_ref()))
                .collect(),
            Direction::Egress => spec
                .egress
                .iter()
                .flatten()
                .map(|r| (r.to.as_ref(), r.ports.as_ref()))
                .collect(),
        };
        let rule_matches = |(peers, ports): &Rule<'_>| {
            let peer_ok = match peers {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list
                    .iter()
                    .any(|p| peer_matches(p, namespace, namespaces, peer)),
            };
            let port_ok = match ports {
                None => true,
                Some(list) if list.is_empty() => true,
                Some(list) => list.iter().any(|p| port_matches(p, port_owner, flow)),
            };
            peer_ok && port_ok
        };
        if rules.iter().any(rule_matches) {
            return true;
        }
    }
    !selected
}

fn peer_pod(endpoint: &Endpoint) -> Option<&Pod> {
    match endpoint {
        Endpoint::Pod(pod) => Some(pod),
        Endpoint::Address(_) => None,
    }
}

/// `policyTypes`, defaulted as the API server does: Ingress always, Egress when the
/// policy has egress rules.
fn has_direction(spec: &NetworkPolicySpec, direction: Direction) -> bool {
    let wanted = match direction {
        Direction::Ingress => "Ingress",
        Direction::Egress => "Egress",
    };
    match &spec.policy_types {
        Some(types) => types.iter().any(|t| t == wanted),
        None => direction == Direction::Ingress || spec.egress.is_some(),
    }
}

fn peer_matches(
    peer: &NetworkPolicyPeer,
    policy_namespace: &str,
    namespaces: &Namespaces,
    endpoint: &Endpoint,
) -> bool {
    match endpoint {
        Endpoint::Address(ip) => peer.ip_block.as_ref().is_some_and(|block| {
            let inside = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|net| net.contains(ip));
            inside(&block.cidr) && !block.except.iter().flatten().any(|c| inside(c))
        }),
        // An ipBlock is meant for addresses outside the cluster; which pods it
        // matches is left to the network plugin, so it grants pods nothing here.
        Endpoint::Pod(pod) => {
            if peer.ip_block.is_some() {
                return false;
            }
            let namespace_ok = match &peer.namespace_selector {
                Some(selector) => selector_matches(selector, &namespaces.labels(&pod.namespace)),
                None => pod.namespace == policy_namespace,
            };
            let pod_ok = peer
                .pod_selector
                .as_ref()
                .is_none_or(|selector| selector_matches(selector, &pod.labels));
            namespace_ok && pod_ok
        }
    }
}

/// A port rule against a flow; named ports resolve on `owner`, the destination pod.
fn port_matches(rule: &NetworkPolicyPort, owner: &Pod, flow: &Flow) -> bool {
    if rule.protocol.as_deref().unwrap_or("TCP") != flow.protocol {
        return false;
    }
    let first = match &rule.port {
        None => return true,
        Some(IntOrString::Int(port)) => i64::from(*port),
        Some(IntOrString::String(name)) => match owner.ports.get(name) {
            Some(port) => i64::from(*port),
            None => return false,
        },
    };
    let last = rule.end_port.map_or(first, i64::from);
    (first..=last).contains(&i64::from(flow.port))
}

/// A label selector against labels: every `matchLabels` pair and every
/// `matchExpressions` requirement holds (an empty selector matches everything).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|req| {
        let value = labels.get(&req.key);
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && expressions
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{
        IPBlock, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelectorRequirement, ObjectMeta};

    fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            match_labels: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            match_expressions: None,
        }
    }

    fn policy(namespace: &str, spec: NetworkPolicySpec) -> NetworkPolicy {
        NetworkPolicy {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        }
    }

    fn tcp(port: i32) -> NetworkPolicyPort {
        NetworkPolicyPort {
            port: Some(IntOrString::Int(port)),
            protocol: Some("TCP".into()),
            end_port: None,
        }
    }

    #[test]
    fn unselected_pods_are_open_and_selected_ones_need_a_rule_at_both_ends() {
        let namespaces = Namespaces::new(["a", "b"]);
        let web = Endpoint::Pod(Pod::new("a", [("app", "web")]));
        let db = Endpoint::Pod(Pod::new("a", [("app", "db")]));
        let other = Endpoint::Pod(Pod::new("b", [("app", "web")]));
        assert!(allows(&[], &namespaces, &Flow::tcp(&web, &db, 5432)));

        let db_ingress = policy(
            "a",
            NetworkPolicySpec {
                pod_selector: Some(selector(&[("app", "db")])),
                ingress: Some(vec![NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(selector(&[("app", "web")])),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(5432)]),
                }]),
                policy_types: Some(vec!["Ingress".into()]),
                egress: None,
            },
        );
        let policies = vec![db_ingress];
        assert!(allows(&policies, &namespaces, &Flow::tcp(&web, &db, 5432)));
        assert!(!allows(&policies, &namespaces, &Flow::tcp(&web, &db, 5433)));
        assert!(!allows(&policies, &namespaces, &Flow::udp(&web, &db, 5432)));
        // A podSelector alone means the policy's own namespace.
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&other, &db, 5432)
        ));
        // db's egress is not restricted by an ingress-only policy.
        assert!(allows(&policies, &namespaces, &Flow::tcp(&db, &other, 80)));

        let web_egress = policy(
            "a",
            NetworkPolicySpec {
                pod_selector: Some(selector(&[("app", "web")])),
                egress: Some(vec![NetworkPolicyEgressRule {
                    to: Some(vec![NetworkPolicyPeer {
                        ip_block: Some(IPBlock {
                            cidr: "0.0.0.0/0".into(),
                            except: Some(vec!["10.0.0.0/8".into()]),
                        }),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(443)]),
                }]),
                policy_types: Some(vec!["Egress".into()]),
                ingress: None,
            },
        );
        let policies = vec![policies[0].clone(), web_egress];
        // Now web's egress is closed to db, even though db's ingress allows it.
        assert!(!allows(&policies, &namespaces, &Flow::tcp(&web, &db, 5432)));
        let internet = Endpoint::Address("203.0.113.7".parse().unwrap());
        let inside = Endpoint::Address("10.1.2.3".parse().unwrap());
        assert!(allows(
            &policies,
            &namespaces,
            &Flow::tcp(&web, &internet, 443)
        ));
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&web, &internet, 80)
        ));
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&web, &inside, 443)
        ));
    }

    #[test]
    fn namespace_selectors_expressions_named_ports_and_ranges() {
        let mut namespaces = Namespaces::new(["app"]);
        namespaces.add("monitoring", [("team", "obs")]);
        let target = Endpoint::Pod(Pod::new("app", [("role", "api")]).with_port("metrics", 9090));
        let prometheus = Endpoint::Pod(Pod::new("monitoring", [("name", "prometheus")]));
        let stranger = Endpoint::Pod(Pod::new("app", [("name", "prometheus")]));
        let spec = NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "role".into(),
                    operator: "In".into(),
                    values: Some(vec!["api".into(), "web".into()]),
                }]),
            }),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(selector(&[("team", "obs")])),
                        pod_selector: Some(selector(&[("name", "prometheus")])),
                        ip_block: None,
                    }]),
                    ports: Some(vec![NetworkPolicyPort {
                        port: Some(IntOrString::String("metrics".into())),
                        protocol: None,
                        end_port: None,
                    }]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![NetworkPolicyPort {
                        end_port: Some(8010),
                        ..tcp(8000)
                    }]),
                },
            ]),
            egress: None,
            policy_types: None,
        };
        let policies = vec![policy("app", spec)];
        assert!(allows(
            &policies,
            &namespaces,
            &Flow::tcp(&prometheus, &target, 9090)
        ));
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&stranger, &target, 9090)
        ));
        assert!(allows(
            &policies,
            &namespaces,
            &Flow::tcp(&stranger, &target, 8005)
        ));
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&stranger, &target, 8011)
        ));
        let client = Endpoint::Address("198.51.100.1".parse().unwrap());
        assert!(allows(
            &policies,
            &namespaces,
            &Flow::tcp(&client, &target, 8000)
        ));
        assert!(!allows(
            &policies,
            &namespaces,
            &Flow::tcp(&client, &target, 9090)
        ));
    }
}
