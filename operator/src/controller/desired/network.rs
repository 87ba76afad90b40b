//! `<md>`: the NetworkPolicy of a deployment's rank pods. Workers serve whoever
//! reaches them (their gRPC takes no key: the router checks keys), so only the
//! router, the operator, the deployment's own ranks and the metrics scrapers get
//! in; out, ranks reach each other, DNS, and the model's source while it is fetched.
//!
//! Ranks talk to each other on every port: the TCP collective and NCCL open
//! connections on ephemeral ports beside the coordinator's. Groups of one
//! deployment share this (same image, same weights); other deployments' ranks do not.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ModelFiles, Owner};
use crate::controller::labels::{GRPC_PORT, METRICS_PORT, MODEL_DEPLOYMENT_LABEL, labels};

/// Port of the fetch's downloads (the Hub, PyPI) unless a Hub mirror says otherwise.
pub const HTTPS_PORT: u16 = 443;

/// Who may reach the rank pods, and whom they need (`--network-policies`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPeers {
    /// The routers: worker gRPC.
    pub router: Peer,
    /// The operator itself: load progress on worker gRPC.
    pub operator: Peer,
    /// Prometheus (or another scraper): the metrics port. None: nobody scrapes.
    pub scrapers: Vec<Peer>,
}

/// Pods of a namespace (or of any namespace) with some labels: `NAMESPACE:k=v,k=v`,
/// `*` for every namespace, no labels for every pod of the namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// None: every namespace.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Why a `--*-pods` value is not `NAMESPACE:k=v,...`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{problem} in {text:?}; expected NAMESPACE:key=value,... (NAMESPACE may be *)")]
pub struct PeerError {
    problem: &'static str,
    text: String,
}

impl std::str::FromStr for Peer {
    type Err = PeerError;

    fn from_str(text: &str) -> Result<Self, PeerError> {
        let error = |problem| PeerError {
            problem,
            text: text.to_string(),
        };
        let (namespace, selector) = text.split_once(':').unwrap_or((text, ""));
        if namespace.is_empty() {
            return Err(error("no namespace"));
        }
        let mut labels = BTreeMap::new();
        for pair in selector.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| error("a label without '='"))?;
            if key.is_empty() {
                return Err(error("an empty label key"));
            }
            labels.insert(key.to_string(), value.to_string());
        }
        Ok(Self {
            namespace: (namespace != "*").then(|| namespace.to_string()),
            labels,
        })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        write!(
            f,
            "{}:{}",
            self.namespace.as_deref().unwrap_or("*"),
            pairs.join(",")
        )
    }
}

impl Peer {
    fn policy_peer(&self) -> NetworkPolicyPeer {
        let namespace_labels = self
            .namespace
            .as_ref()
            .map(|ns| labels([("kubernetes.io/metadata.name", ns.as_str())]));
        NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: namespace_labels,
                match_expressions: None,
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(self.labels.clone()),
                match_expressions: None,
            }),
            ip_block: None,
        }
    }
}

pub(super) fn policy(
    owner: &Owner,
    peers: &NetworkPeers,
    files: &ModelFiles,
    hub_endpoint: Option<&str>,
) -> NetworkPolicy {
    let ranks = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels([(MODEL_DEPLOYMENT_LABEL, owner.name.as_str())])),
            match_expressions: None,
        }),
        namespace_selector: None,
        ip_block: None,
    };
    let mut ingress = vec![
        NetworkPolicyIngressRule {
            from: Some(vec![ranks.clone()]),
            ports: None,
        },
        NetworkPolicyIngressRule {
            from: Some(vec![
                peers.router.policy_peer(),
                peers.operator.policy_peer(),
            ]),
            ports: Some(vec![tcp(GRPC_PORT.try_into().unwrap_or(u16::MAX))]),
        },
    ];
    if !peers.scrapers.is_empty() {
        ingress.push(NetworkPolicyIngressRule {
            from: Some(peers.scrapers.iter().map(Peer::policy_peer).collect()),
            ports: Some(vec![tcp(METRICS_PORT.try_into().unwrap_or(u16::MAX))]),
        });
    }
    let mut egress = vec![
        NetworkPolicyEgressRule {
            to: Some(vec![ranks]),
            ports: None,
        },
        // DNS, wherever the cluster's resolver runs.
        NetworkPolicyEgressRule {
            to: None,
            ports: Some(vec![port("UDP", 53), port("TCP", 53)]),
        },
    ];
    if let ModelFiles::Fetched { .. } = files {
        egress.push(NetworkPolicyEgressRule {
            to: None,
            ports: Some(fetch_ports(hub_endpoint).into_iter().map(tcp).collect()),
        });
    }
    NetworkPolicy {
        metadata: owner.model_meta(),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(labels([(MODEL_DEPLOYMENT_LABEL, owner.name.as_str())])),
                match_expressions: None,
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(ingress),
            egress: Some(egress),
        }),
    }
}

/// The ports the model fetch downloads from: HTTPS, and a Hub mirror's own port.
pub fn fetch_ports(hub_endpoint: Option<&str>) -> Vec<u16> {
    let mut ports = vec![HTTPS_PORT];
    if let Some(port) = hub_endpoint.and_then(endpoint_port)
        && !ports.contains(&port)
    {
        ports.push(port);
    }
    ports
}

/// The port of `scheme://host[:port][/path]`, the scheme's default when none is given.
fn endpoint_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    // `[fd00::1]` has colons but no port: its last part does not parse.
    match host_port.rsplit_once(':') {
        Some((_, port)) => port.parse().ok().or(default_port(scheme)),
        None => default_port(scheme),
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

fn tcp(number: u16) -> NetworkPolicyPort {
    port("TCP", number)
}

fn port(protocol: &str, number: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(number))),
        protocol: Some(protocol.into()),
        end_port: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_print() {
        let peer: Peer =
            "shardserve:app.kubernetes.io/component=router,app.kubernetes.io/instance=x"
                .parse()
                .unwrap();
        assert_eq!(peer.namespace.as_deref(), Some("shardserve"));
        assert_eq!(peer.labels.len(), 2);
        assert_eq!(
            peer.to_string(),
            "shardserve:app.kubernetes.io/component=router,app.kubernetes.io/instance=x"
        );
        let any: Peer = "*:app=prometheus".parse().unwrap();
        assert_eq!(any.namespace, None);
        let whole: Peer = "monitoring".parse().unwrap();
        assert!(whole.labels.is_empty());
        assert!(":a=b".parse::<Peer>().is_err());
        assert!(
            "ns:a"
                .parse::<Peer>()
                .unwrap_err()
                .to_string()
                .contains("without '='")
        );
        assert!("ns:=b".parse::<Peer>().is_err());
    }

    #[test]
    fn the_fetch_reaches_https_and_a_mirrors_port() {
        assert_eq!(fetch_ports(None), vec![443]);
        assert_eq!(fetch_ports(Some("https://hub-mirror.internal")), vec![443]);
        assert_eq!(
            fetch_ports(Some("http://hub-mirror.internal")),
            vec![443, 80]
        );
        assert_eq!(
            fetch_ports(Some("http://user@mirror.internal:8080/hf")),
            vec![443, 8080]
        );
        assert_eq!(fetch_ports(Some("http://[fd00::1]:8081")), vec![443, 8081]);
        assert_eq!(fetch_ports(Some("http://[fd00::1]")), vec![443, 80]);
    }
}
