//! Where backends come from. The router watches a [`Discovery`] and rebuilds
//! its index whenever the list changes: [`StaticDiscovery`] for local runs
//! (`--backend MODEL=URL`), [`FileDiscovery`] for `shardserve up` (which
//! rewrites the list as workers come and go), [`KubernetesDiscovery`] in a
//! cluster (ModelDeployments and the EndpointSlices of their rank-0
//! Services).

mod file;
mod kubernetes;

use tokio::sync::watch;

pub use file::{BackendsFile, FileDiscovery, FileDiscoveryError};
pub use kubernetes::KubernetesDiscovery;

/// One worker group's leader, reachable over gRPC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Stable identity within its deployment (a pod name, `host:port`, ...).
    pub id: String,
    /// gRPC endpoint, for example `http://127.0.0.1:50061`.
    pub grpc_uri: String,
}

impl Backend {
    /// A backend known by its URL alone (local runs): its id is `host:port`.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let Some(authority) = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
        else {
            return Err(format!(
                "{url:?}: the URL must start with http:// or https://"
            ));
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: the URL names no host"));
        }
        Ok(Self {
            id: authority.trim_end_matches('/').to_string(),
            grpc_uri: url.to_string(),
        })
    }
}

/// The backends that serve one model. A deployment without backends is a
/// model that exists but has nothing ready yet (its pods are starting):
/// requests for it answer 503, not 404.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The served model name clients ask for.
    pub model: String,
    pub backends: Vec<Backend>,
    /// LoRA adapters its manifest declares (`spec.loraAdapters`): known names even
    /// while no backend serves them yet (scaled to zero, starting, loading them),
    /// so that their requests are held as the model's are, not refused.
    pub adapters: Vec<String>,
}

/// A source of deployments; the router follows the latest value.
pub trait Discovery: Send + Sync + 'static {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>>;

    /// Whether the deployments are complete: a watcher has listed everything
    /// once. Until then an empty list means "not known yet", not "none".
    fn synced(&self) -> bool {
        true
    }
}

/// A fixed list of deployments.
pub struct StaticDiscovery {
    // Kept so that receivers never see the channel closed.
    tx: watch::Sender<Vec<Deployment>>,
}

impl StaticDiscovery {
    pub fn new(deployments: Vec<Deployment>) -> Self {
        let (tx, _) = watch::channel(deployments);
        Self { tx }
    }
}

impl StaticDiscovery {
    /// Replaces the list: a supervisor that starts and stops workers tells the
    /// router here.
    pub fn replace(&self, deployments: Vec<Deployment>) {
        self.tx.send_replace(deployments);
    }
}

impl Discovery for StaticDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>> {
        self.tx.subscribe()
    }
}
