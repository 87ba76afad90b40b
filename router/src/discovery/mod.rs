//! Where backends come from. The router watches a [`Discovery`] and rebuilds
//! its index whenever the list changes: [`StaticDiscovery`] for local runs
//! (`shardserve up`, `--backend MODEL=URL`), a Kubernetes watcher later.

use tokio::sync::watch;

/// One worker group's leader, reachable over gRPC.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Stable identity within its deployment (a pod name, `host:port`, ...).
    pub id: String,
    /// gRPC endpoint, for example `http://127.0.0.1:50061`.
    pub grpc_uri: String,
}

/// The backends that serve one model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The served model name clients ask for.
    pub model: String,
    pub backends: Vec<Backend>,
}

/// A source of deployments; the router follows the latest value.
pub trait Discovery: Send + Sync + 'static {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>>;
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

impl Discovery for StaticDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<Deployment>> {
        self.tx.subscribe()
    }
}
