//! The routers' load: what the builtin autoscaler scales on, and what tells that a
//! draining group has finished its streams.
//!
//! Every router replica exports, per model, the requests it holds or has sent and
//! not finished (`shardserve_router_model_in_flight_requests`, of which
//! `shardserve_router_model_held_requests` wait for a group), and per backend (a
//! group's leader pod) the requests outstanding on it. Routers are stateless and
//! replicated, each seeing its share, so the operator asks every ready pod behind the
//! router Service for its `/metrics` ([`scrape`]) and sums ([`RouterLoad::add`]).
//! This is KubeAI's way (its autoscaler scrapes its own replicas' metrics), chosen
//! over a Prometheus query because it needs no Prometheus in the cluster and sees the
//! load of this moment, not of the last scrape interval.

mod scrape;

use std::collections::BTreeMap;
use std::sync::Mutex;

use k8s_openapi::jiff::Timestamp;

use crate::autoscale::Load;

pub use scrape::RouterScraper;

/// The per-model gauge of requests received and not finished.
pub const IN_FLIGHT_METRIC: &str = "shardserve_router_model_in_flight_requests";
/// The per-model gauge of requests held while the model has no routable group.
pub const HELD_METRIC: &str = "shardserve_router_model_held_requests";
/// The per-backend gauge of requests sent and not finished.
pub const OUTSTANDING_METRIC: &str = "shardserve_router_backend_outstanding_requests";

/// The load of every router replica, summed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouterLoad {
    /// Router pods asked.
    pub asked: usize,
    /// Router pods that answered with their metrics.
    pub answered: usize,
    /// Per served model name.
    pub models: BTreeMap<String, Load>,
    /// Requests outstanding per backend, by the routers' backend id (`namespace/pod`).
    pub backends: BTreeMap<String, u64>,
}

impl RouterLoad {
    /// One router's load, from its Prometheus text exposition. Lines of other
    /// metrics, comments and malformed lines are skipped.
    pub fn from_metrics(text: &str) -> Self {
        let mut load = Self {
            asked: 1,
            answered: 1,
            ..Self::default()
        };
        for (name, labels, value) in text.lines().filter_map(sample) {
            let label = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            let count = if value.is_finite() && value > 0.0 {
                value.round() as u64
            } else {
                0
            };
            match name {
                IN_FLIGHT_METRIC | HELD_METRIC => {
                    let Some(model) = label("model") else {
                        continue;
                    };
                    let entry = load.models.entry(model.clone()).or_default();
                    match name {
                        IN_FLIGHT_METRIC => entry.in_flight += count,
                        _ => entry.waiting += count,
                    }
                }
                OUTSTANDING_METRIC => {
                    if let Some(backend) = label("backend") {
                        *load.backends.entry(backend.clone()).or_default() += count;
                    }
                }
                _ => {}
            }
        }
        load
    }

    /// Adds another router's load.
    pub fn add(&mut self, other: RouterLoad) {
        self.asked += other.asked;
        self.answered += other.answered;
        for (model, load) in other.models {
            let entry = self.models.entry(model).or_default();
            entry.in_flight += load.in_flight;
            entry.waiting += load.waiting;
        }
        for (backend, n) in other.backends {
            *self.backends.entry(backend).or_default() += n;
        }
    }

    /// Whether every router asked answered (and there was one): only then are the
    /// sums the whole load.
    pub fn complete(&self) -> bool {
        self.asked > 0 && self.answered == self.asked
    }

    /// A model's load (nothing when no router has seen it).
    pub fn model(&self, served_model_name: &str) -> Load {
        self.models
            .get(served_model_name)
            .copied()
            .unwrap_or_default()
    }
}

/// The latest complete [`RouterLoad`] and when it was taken: the autoscaler writes it,
/// reconciles read it.
#[derive(Debug, Default)]
pub struct LoadBoard {
    latest: Mutex<Option<(Timestamp, RouterLoad)>>,
}

impl LoadBoard {
    pub fn set(&self, at: Timestamp, load: RouterLoad) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((at, load));
    }

    /// Requests the routers have outstanding on `backend` (`namespace/pod`) and when
    /// they were counted; `None` before a complete count.
    pub fn outstanding(&self, backend: &str) -> Option<(Timestamp, u64)> {
        let latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
        let (at, load) = latest.as_ref()?;
        Some((*at, load.backends.get(backend).copied().unwrap_or(0)))
    }
}

/// A sample's labels, in the order written.
type Labels = Vec<(String, String)>;

/// One sample line: `name{label="value",...} value [timestamp]`.
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = label_set(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// `key="value",...}` (the opening brace already read): the pairs, and what
/// follows the closing brace. Values unescape `\\`, `\"` and `\n`.
fn label_set(mut s: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start_matches([',', ' ']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = s.split_once('=')?;
        let mut chars = after.strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        s = &after[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER_A: &str = r#"# HELP shardserve_router_model_in_flight_requests Requests received for a model and not finished.
# TYPE shardserve_router_model_in_flight_requests gauge
shardserve_router_model_in_flight_requests{model="smollm2"} 5
shardserve_router_model_in_flight_requests{model="llama \"big\""} 2
shardserve_router_model_held_requests{model="smollm2"} 1
shardserve_router_backend_outstanding_requests{backend="ml/smollm2-g0-0",model="smollm2"} 3
shardserve_router_backend_outstanding_requests{backend="ml/smollm2-g1-0",model="smollm2"} 1
shardserve_router_requests_total{endpoint="chat",model="smollm2",status="200"} 40
"#;
    const ROUTER_B: &str = "shardserve_router_model_in_flight_requests{model=\"smollm2\"} 4\n\
        shardserve_router_backend_outstanding_requests{model=\"smollm2\",backend=\"ml/smollm2-g1-0\"} 2 1700000000\n\
        garbage line\n";

    #[test]
    fn one_routers_metrics_give_its_load() {
        let load = RouterLoad::from_metrics(ROUTER_A);
        assert_eq!(
            load.model("smollm2"),
            Load {
                in_flight: 5,
                waiting: 1
            }
        );
        assert_eq!(load.model("llama \"big\"").in_flight, 2);
        assert_eq!(load.model("other"), Load::default());
        assert_eq!(load.backends["ml/smollm2-g0-0"], 3);
        assert!(load.complete());
    }

    #[test]
    fn routers_are_summed() {
        let mut total = RouterLoad::default();
        total.add(RouterLoad::from_metrics(ROUTER_A));
        total.add(RouterLoad::from_metrics(ROUTER_B));
        assert_eq!(total.model("smollm2").in_flight, 9);
        assert_eq!(total.backends["ml/smollm2-g1-0"], 3);
        assert_eq!((total.asked, total.answered), (2, 2));
        // A router that did not answer makes the sum partial.
        total.add(RouterLoad {
            asked: 1,
            ..RouterLoad::default()
        });
        assert!(!total.complete());
        assert!(!RouterLoad::default().complete());
    }

    #[test]
    fn the_board_counts_a_backend_absent_from_every_router_as_idle() {
        let board = LoadBoard::default();
        assert_eq!(board.outstanding("ml/smollm2-g0-0"), None);
        let at = Timestamp::UNIX_EPOCH;
        board.set(at, RouterLoad::from_metrics(ROUTER_A));
        assert_eq!(board.outstanding("ml/smollm2-g0-0"), Some((at, 3)));
        assert_eq!(board.outstanding("ml/smollm2-g7-0"), Some((at, 0)));
    }
}
