//! The worker's gRPC face: `shardserve.v1.Inference` over an [`EngineHandle`],
//! plus `grpc.health.v1.Health` for probes and the router.
//!
//! The CLI's `worker` command loads the model, spawns the engine and calls
//! [`serve`]; tests bind port 0 themselves and call [`serve_on`]. Handlers
//! are thin: `convert` maps messages to engine types (pure, unit-tested) and
//! `service` forwards them to the engine thread and streams its events back.

mod convert;
mod metrics;
mod progress;
mod service;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use shardserve_proto::v1::adapters_server::AdaptersServer;
use shardserve_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use convert::generation_request;
pub use metrics::Metrics;
pub use progress::ProgressService;
pub use service::{GenerateStream, InferenceService};

use crate::engine::EngineHandle;

/// How long in-flight calls may run on after shutdown is asked, unless told
/// otherwise ([`serve_with_metrics`]'s `drain`); long-lived streams (a health
/// `Watch`, a generation without a limit) must not keep the process alive past
/// its pod's termination grace period.
pub const DRAIN_GRACE: Duration = Duration::from_secs(20);

/// The largest request message accepted (tonic's default is 4 MiB): the router
/// accepts bodies up to this size, so nothing it lets in is refused here.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("cannot set up the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the metrics HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// Binds `listen` and serves the engine until `shutdown` completes.
pub async fn serve(
    engine: EngineHandle,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServerError::Bind {
            addr: listen,
            source,
        })?;
    serve_on(engine, listener, shutdown).await
}

/// Serves the engine on an already bound listener until `shutdown` completes.
///
/// The model is loaded before this is called, so health reports SERVING from
/// the start; on shutdown it turns NOT_SERVING, the listener closes, and
/// in-flight calls get 20 s ([`DRAIN_GRACE`]) to finish.
pub async fn serve_on(
    engine: EngineHandle,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    serve_with_metrics(engine, listener, None, None, shutdown, DRAIN_GRACE).await
}

/// [`serve_on`], plus `/metrics`, `/healthz` and `/readyz` over HTTP on
/// `metrics_listener` when there is one, and gRPC over `tls` when given (which
/// may require client certificates: mutual TLS with the router); in-flight calls
/// get `drain` to finish after shutdown is asked.
pub async fn serve_with_metrics(
    engine: EngineHandle,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    tls: Option<shardserve_tls::ServerTls>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_status(&health, ServingStatus::Serving).await;
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        model = %engine.info().served_model_name,
        "serving shardserve.v1.Inference"
    );
    let metrics = Arc::new(Metrics::new(&engine.info().served_model_name)?);
    let ready = Arc::new(AtomicBool::new(true));
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let http = match metrics_listener {
        Some(http_listener) => {
            let mut stopped = http_stopped;
            Some(tokio::spawn(metrics::serve_http(
                http_listener,
                metrics.clone(),
                engine.clone(),
                ready.clone(),
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };

    let (draining, drained_by) = oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        ready.store(false, Ordering::Relaxed);
        set_status(&health, ServingStatus::NotServing).await;
        tracing::info!("shutting down: no new calls, draining in-flight ones");
        let _ = draining.send(());
    };
    let service = InferenceService::with_metrics(engine, metrics);
    let guard = TlsGuard(tls.as_ref().map(|t| t.verifies_clients()));
    let adapters = tonic::service::interceptor::InterceptedService::new(
        AdaptersServer::new(service.clone()),
        move |request| guard.check(request),
    );
    let inference = tonic::service::interceptor::InterceptedService::new(
        InferenceServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES),
        move |request| guard.check(request),
    );
    let router = Server::builder()
        .add_service(health_service)
        .add_service(inference)
        .add_service(adapters);
    // Either, not a boxed future: the server stays Send whenever `shutdown` is.
    let server = match tls {
        // Health stays open in plain text beside TLS: kubelet's gRPC probes
        // speak no TLS. The Inference API checks the connection ([`TlsGuard`]).
        Some(tls) => futures::future::Either::Left(router.serve_with_incoming_shutdown(
            shardserve_tls::incoming(listener, tls, shardserve_tls::Plaintext::Allowed),
            signal,
        )),
        None => futures::future::Either::Right(router.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        )),
    };
    let deadline = async move {
        match drained_by.await {
            Ok(()) => tokio::time::sleep(drain).await,
            // The server ended on its own; the other branch has the result.
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = server => result?,
        () = deadline => tracing::warn!(grace = ?drain, "calls still open after the grace period; stopping anyway"),
    }
    let _ = stop_http.send(true);
    if let Some(http) = http {
        match http.await {
            Ok(result) => result.map_err(ServerError::Http)?,
            Err(e) => tracing::warn!(error = %e, "the metrics server task failed"),
        }
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Who may call the Inference API of a worker serving TLS: `Some(true)` callers
/// with a certificate its client CA verified (mutual TLS), `Some(false)` any TLS
/// caller; `None` (no TLS) everyone.
#[derive(Clone, Copy)]
struct TlsGuard(Option<bool>);

impl TlsGuard {
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    fn check(self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(needs_certificate) = self.0 else {
            return Ok(request);
        };
        let info = request.extensions().get::<shardserve_tls::TlsConnectInfo>();
        let allowed = info.is_some_and(|info| match needs_certificate {
            true => info.authenticated(),
            false => info.tls,
        });
        if allowed {
            Ok(request)
        } else if needs_certificate {
            Err(tonic::Status::unauthenticated(
                "this worker serves shardserve.v1.Inference over mutual TLS only: \
                 connect with TLS and a client certificate of its CA",
            ))
        } else {
            Err(tonic::Status::unauthenticated(
                "this worker serves shardserve.v1.Inference over TLS only",
            ))
        }
    }
}

/// Serves `grpc.health.v1.Health` and `shardserve.v1.Progress` on `listener`, for a
/// rank whose pod must answer probes and the operator but serves no calls (yet): a
/// follower, or the leader while it loads. The overall health status ("") follows
/// `joined`, NOT_SERVING until it turns true (the rank's shard is loaded and its group
/// has met), SERVING while it stays true, NOT_SERVING again when it turns false (the
/// group broke), until `shutdown` completes.
pub async fn serve_health(
    listener: TcpListener,
    mut joined: tokio::sync::watch::Receiver<bool>,
    progress: ProgressService,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    tokio::spawn(async move {
        loop {
            let status = match *joined.borrow_and_update() {
                true => ServingStatus::Serving,
                false => ServingStatus::NotServing,
            };
            health.set_service_status("", status).await;
            if joined.changed().await.is_err() {
                return;
            }
        }
    });
    Server::builder()
        .add_service(health_service)
        .add_service(progress.server())
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), shutdown)
        .await?;
    Ok(())
}

/// Sets the overall status ("") and the Inference service's together.
async fn set_status(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(shardserve_proto::v1::inference_server::SERVICE_NAME, status)
        .await;
}
