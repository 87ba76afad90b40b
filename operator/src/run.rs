//! `shardserve operator`: the health server, the client, leader election,
//! the controller and the builtin autoscaler, put together. Settings come from
//! the command line (the CLI parses them); the Kubernetes configuration is the
//! usual one (in-cluster, else `KUBECONFIG` / `~/.kube/config`).

use std::net::SocketAddr;
use std::sync::Arc;

use kube::api::ListParams;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};

use crate::autoscale::Autoscaler;
use crate::controller::desired::WorkerSettings;
use crate::controller::labels::MANAGED_BY;
use crate::controller::{Context, Metrics, run_controller};
use crate::crd::ModelDeployment;
use crate::health::{self, Health};
use crate::leader::{LeaderElector, LeaseLost, LeaseSettings};
use crate::load::RouterScraper;

/// Everything `shardserve operator` is told.
#[derive(Clone, Debug)]
pub struct OperatorSettings {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub health_addr: SocketAddr,
    /// The image of rank pods (unless a spec names its own).
    pub worker_image: String,
    /// `HF_ENDPOINT` of the pods' model fetch (a Hub mirror), if any.
    pub hub_endpoint: Option<String>,
    /// Whether rank pods compute on their GPUs (a CUDA worker image).
    pub worker_cuda: bool,
    /// Watch this namespace only (else every namespace).
    pub namespace: Option<String>,
    /// Lead through this Lease (else lead alone).
    pub leader_election: Option<LeaseSettings>,
    /// This replica's name in events and the Lease (its pod name).
    pub identity: String,
    /// The router Service (namespace, name) whose pods give the load; without it no
    /// builtin autoscaling, and draining groups wait their whole timeout.
    pub router_service: Option<(String, String)>,
    /// Make each deployment's NetworkPolicy, letting in these peers.
    pub network: Option<crate::controller::desired::NetworkPeers>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot serve health on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no Kubernetes configuration (in-cluster, KUBECONFIG or ~/.kube/config): {0}")]
    Client(#[source] kube::Error),
    #[error(
        "cannot list ModelDeployments{scope} (is the CRD installed? `shardserve crd | kubectl apply -f -`): {source}"
    )]
    Crd { scope: String, source: kube::Error },
    #[error("lost leadership: {0}")]
    Lease(#[from] LeaseLost),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Runs the operator until SIGTERM or Ctrl-C (or until it loses the Lease,
/// which is an error: the pod restarts and waits for the Lease again).
pub async fn run(settings: OperatorSettings) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new()?);
    let health = Arc::new(Health::new(metrics.clone()));
    let addr = settings.health_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { addr, source })?;
    let app = health::router(health.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the health server stopped: {e}");
        }
    });
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");

    let client = Client::try_default().await.map_err(RunError::Client)?;
    let namespace = settings.namespace.as_deref();
    let deployments: Api<ModelDeployment> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    deployments
        .list(&ListParams::default().limit(1))
        .await
        .map_err(|source| RunError::Crd {
            scope: namespace.map(|ns| format!(" in {ns}")).unwrap_or_default(),
            source,
        })?;
    health.set_ready();

    let reporter = Reporter {
        controller: MANAGED_BY.into(),
        instance: Some(settings.identity.clone()),
    };
    let worker = WorkerSettings {
        image: settings.worker_image.clone(),
        hub_endpoint: settings.hub_endpoint.clone(),
        cuda: settings.worker_cuda,
        network: settings.network.clone(),
    };
    let autoscaler = match &settings.router_service {
        Some((ns, name)) => Some(Autoscaler::new(
            client.clone(),
            settings.namespace.clone(),
            RouterScraper::new(client.clone(), ns, name),
            Arc::default(),
            Recorder::new(client.clone(), reporter.clone()),
        )),
        None => {
            tracing::warn!(
                "no --router-service: builtin autoscaling is off, and draining groups wait \
                 their whole drainTimeoutSeconds"
            );
            None
        }
    };
    let mut ctx = Context::new(client.clone(), worker, reporter, metrics.clone());
    if let Some(autoscaler) = &autoscaler {
        ctx.load = autoscaler.board();
    }
    let ctx = Arc::new(ctx);
    let lead = async {
        let autoscale = async {
            match &autoscaler {
                Some(autoscaler) => autoscaler.run().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = run_controller(client.clone(), namespace, ctx) => {}
            () = autoscale => {}
        }
    };
    let result = match settings.leader_election {
        None => {
            metrics.leader.set(1);
            lead.await;
            Ok(())
        }
        Some(lease) => {
            let elector = LeaderElector::new(client.clone(), lease);
            tokio::select! {
                () = elector.acquire() => {}
                () = shutdown_signal() => {
                    server.abort();
                    return Ok(());
                }
            }
            metrics.leader.set(1);
            let result = tokio::select! {
                () = lead => Ok(()),
                lost = elector.hold() => Err(RunError::Lease(lost)),
            };
            metrics.leader.set(0);
            if result.is_ok() {
                elector.release().await;
            }
            result
        }
    };
    server.abort();
    tracing::info!("operator stopped");
    result
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
