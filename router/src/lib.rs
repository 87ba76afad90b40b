//! The shardserve router: the front door of a deployment.
//!
//! It serves the OpenAI-, Ollama- and TGI-compatible HTTP APIs (`api/`,
//! assembled in `http`) and the gRPC `shardserve.v1.Inference` service
//! (`grpc`), and sends each request to a backend of its model: discovery
//! (static, or Kubernetes ModelDeployments and EndpointSlices: `discovery`)
//! feeds the backend index (`pool`), which health-checks
//! backends and leases them to requests by least outstanding load with
//! prefix affinity (`balance`, pure); `dispatch` starts a generation on a
//! leased backend, retrying elsewhere until the first token. Metrics live in
//! `metrics`. The CLI's `shardserve router` calls [`serve`].

mod api;
mod auth;
mod balance;
mod config;
mod discovery;
mod dispatch;
mod grpc;
mod http;
mod metrics;
mod pool;

use std::future::Future;
use std::sync::Arc;

use shardserve_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};
use tonic_health::ServingStatus;

pub use api::{ApiEndpoint, BodyRefused, Limits, map_body};
pub use config::{
    BackendTls, CertFiles, MAX_BODY_BYTES, Readiness, RequestLimits, RouterConfig, RouterError,
};
pub use discovery::{
    Backend, BackendsFile, Deployment, Discovery, FileDiscovery, FileDiscoveryError,
    KubernetesDiscovery, StaticDiscovery,
};

use crate::api::AppState;
use crate::dispatch::Upstream;
use crate::metrics::Metrics;
use crate::pool::{Pool, PoolLimits};

/// The router's bound sockets, for callers that bind themselves (tests bind
/// port 0).
pub struct Listeners {
    pub http: TcpListener,
    pub grpc: TcpListener,
    /// `/healthz`, `/readyz` and `/metrics` alone, in plain HTTP (`--metrics-addr`).
    pub metrics: Option<TcpListener>,
}

/// Binds `config.http_addr` and `config.grpc_addr` and serves until
/// `shutdown` completes.
pub async fn serve(
    config: RouterConfig,
    discovery: Arc<dyn Discovery>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let bind = async |addr| {
        TcpListener::bind(addr)
            .await
            .map_err(|source| RouterError::Bind { addr, source })
    };
    let listeners = Listeners {
        http: bind(config.http_addr).await?,
        grpc: bind(config.grpc_addr).await?,
        metrics: match config.metrics_addr {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        },
    };
    serve_on(config, listeners, discovery, shutdown).await
}

/// Checks that every backend's URI is a valid gRPC endpoint.
fn check_uris(deployments: &[Deployment]) -> Result<(), RouterError> {
    for d in deployments {
        for b in &d.backends {
            Endpoint::from_shared(b.grpc_uri.clone()).map_err(|e| RouterError::BackendUri {
                model: d.model.clone(),
                id: b.id.clone(),
                uri: b.grpc_uri.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    Ok(())
}

/// The listeners' TLS (HTTP's and gRPC's, one certificate) and the backends', as
/// configured, with the tasks that re-read their certificate files.
#[allow(clippy::type_complexity)]
fn tls_of(
    config: &RouterConfig,
) -> Result<
    (
        Option<(shardserve_tls::ServerTls, shardserve_tls::ServerTls)>,
        Option<shardserve_tls::ClientTls>,
        Vec<WatchGuard>,
    ),
    RouterError,
> {
    use shardserve_tls::{Certified, ClientTls, ServerTls};
    let mut watches = Vec::new();
    let listeners = match &config.tls {
        Some(files) => {
            let cert = Certified::load(files.clone())?;
            watches.push(WatchGuard(cert.watch(config::TLS_RELOAD_INTERVAL)));
            // A handshake is part of sending the headers: the same bound.
            let timeout = config.limits.header_timeout;
            Some((
                ServerTls::new(Arc::clone(&cert), None, false, timeout)?,
                ServerTls::new(cert, None, true, timeout)?,
            ))
        }
        None => None,
    };
    let backends = match &config.backend_tls {
        Some(tls) => {
            let cert = match &tls.certificate {
                Some(files) => {
                    let cert = Certified::load(files.clone())?;
                    watches.push(WatchGuard(cert.watch(config::TLS_RELOAD_INTERVAL)));
                    Some(cert)
                }
                None => None,
            };
            Some(ClientTls::new(&tls.ca, cert, &tls.server_name)?)
        }
        None => None,
    };
    Ok((listeners, backends, watches))
}

/// Stops a certificate watch when dropped.
struct WatchGuard(tokio::task::JoinHandle<()>);

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves on already bound listeners until `shutdown` completes: HTTP and
/// gRPC stop taking new connections and in-flight requests finish.
pub async fn serve_on(
    config: RouterConfig,
    listeners: Listeners,
    discovery: Arc<dyn Discovery>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RouterError> {
    let metrics = Arc::new(Metrics::new()?);
    // Certificates are read (and refused) before anything is served; the watches
    // end with the router.
    let (listener_tls, backend_tls, _watches) = tls_of(&config)?;
    let pool = Arc::new(Pool::new(
        Arc::clone(&metrics),
        PoolLimits {
            max_queue_per_backend: config.max_queue_per_backend,
            max_held_per_model: config.max_held_per_model,
            connect_timeout: config.health_timeout,
            affinity_capacity: config.affinity_capacity,
        },
        backend_tls,
    ));
    let mut deployments = discovery.watch();
    {
        let initial = deployments.borrow_and_update();
        check_uris(&initial)?;
        pool.update(&initial);
    }
    let follow = tokio::spawn({
        let pool = Arc::clone(&pool);
        let source = Arc::clone(&discovery);
        async move {
            // Holding the source keeps its watchers running.
            let _source = source;
            while deployments.changed().await.is_ok() {
                let latest = deployments.borrow_and_update().clone();
                pool.update(&latest);
            }
        }
    });
    let health = tokio::spawn(pool::run_health_checks(
        Arc::clone(&pool),
        config.health_interval,
        config.health_timeout,
    ));

    let upstream = Upstream {
        pool,
        metrics,
        affinity_prefix: config.affinity_prefix,
        hold_timeout: config.hold_timeout,
        max_prompt_tokens: config.limits.max_prompt_tokens,
        request_timeout: config.limits.request_timeout,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    tracing::info!(
        http = ?listeners.http.local_addr().ok(),
        grpc = ?listeners.grpc.local_addr().ok(),
        metrics = ?listeners.metrics.as_ref().and_then(|l| l.local_addr().ok()),
        "router serving"
    );
    let keys = auth::Keys::new(config.api_keys.clone(), config.limits.max_streams_per_key);
    let state = AppState {
        upstream: upstream.clone(),
        discovery,
        readiness: config.readiness,
        limits: config.limits,
    };
    let operational = listeners.metrics.map(|listener| {
        http::serve(
            listener,
            http::operational(state.clone()),
            config.limits.header_timeout,
            None,
            stopped(stop_rx.clone()),
        )
    });
    let app = http::router(state, keys.clone());
    let http = http::serve(
        listeners.http,
        app,
        config.limits.header_timeout,
        listener_tls.as_ref().map(|(http, _)| http.clone()),
        stopped(stop_rx.clone()),
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    health_reporter
        .set_service_status(
            shardserve_proto::v1::inference_server::SERVICE_NAME,
            ServingStatus::Serving,
        )
        .await;
    let grpc = Server::builder().add_service(health_service).add_service(
        InferenceServer::with_interceptor(
            grpc::RouterInference {
                upstream,
                keys: keys.clone(),
            },
            move |request| keys.intercept(request),
        ),
    );
    let grpc: std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match listener_tls {
            Some((_, grpc_tls)) => Box::pin(grpc.serve_with_incoming_shutdown(
                shardserve_tls::incoming(
                    listeners.grpc,
                    grpc_tls,
                    shardserve_tls::Plaintext::Refused,
                ),
                stopped(stop_rx),
            )),
            None => Box::pin(grpc.serve_with_incoming_shutdown(
                TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
                stopped(stop_rx),
            )),
        };

    let operational = async {
        match operational {
            Some(serving) => serving.await.map_err(RouterError::Http),
            None => Ok(()),
        }
    };
    let result = tokio::try_join!(
        async { http.await.map_err(RouterError::Http) },
        async { grpc.await.map_err(RouterError::Grpc) },
        operational,
    );
    follow.abort();
    health.abort();
    tracing::info!("router stopped");
    result.map(|_| ())
}
