//! The HTTP face: every API route, the optional API-key layer in front of
//! them, and the open operational routes `/healthz`, `/readyz`, `/metrics`.

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, ErrorKind, Shape, lora, ollama, openai, tgi};
use crate::auth::Keys;
use crate::config::Readiness;
use crate::pool::ModelSummary;
use futures::StreamExt;

/// Serves `app` on `listener` until `stop`, then lets open requests (streams)
/// finish. HTTP/1 with a header read timeout: a client that sends its headers
/// slowly holds no connection past `header_timeout` (nor, under `tls`, one that
/// stalls its handshake). With `tls`, HTTP/2 as well when the client offers it.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: std::time::Duration,
    tls: Option<shardserve_tls::ServerTls>,
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("accepting an HTTP connection failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let (builder, watcher, tls) = (builder.clone(), graceful.watcher(), tls.clone());
        // The handshake runs in the connection's task, so a slow client holds up
        // no other.
        tokio::spawn(async move {
            let result = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => {
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        watcher.watch(connection.into_owned()).await
                    }
                    Err(e) => {
                        tracing::debug!("TLS handshake failed: {e}");
                        return;
                    }
                },
                None => {
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    watcher.watch(connection.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!("HTTP connection ended: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

pub(crate) fn router(state: AppState, keys: Keys) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/load_lora_adapter", post(lora::load))
        .route("/v1/unload_lora_adapter", post(lora::unload))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/version", get(ollama::version))
        .route("/generate", post(tgi::generate))
        .route("/generate_stream", post(tgi::generate_stream))
        .route("/", post(tgi::compat));
    let api = match keys.enabled() {
        false => api,
        true => api.route_layer(middleware::from_fn_with_state(keys, require_key)),
    };
    // The handlers read bodies themselves, within `--max-body-bytes`.
    api.merge(open_routes())
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The routes that need no key: probes and Prometheus.
fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// `/healthz`, `/readyz` and `/metrics` alone (`--metrics-addr`): plain HTTP for
/// probes, Prometheus and the operator while the API listeners speak TLS.
pub(crate) fn operational(state: AppState) -> Router {
    open_routes().with_state(state)
}

/// `Authorization: Bearer KEY` with one of the configured keys, else 401; at most
/// `--max-streams-per-key` requests of one key at once, else 429. The answer is in
/// the shape of the API asked.
async fn require_key(State(keys): State<Keys>, request: Request, next: Next) -> Response {
    let shape = Shape::of_path(request.uri().path());
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let index = match keys.check(authorization) {
        Ok(index) => index,
        Err(refusal) => {
            let mut response =
                ApiError::new(ErrorKind::Unauthorized, refusal.message()).in_shape(shape);
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    };
    let Some(index) = index else {
        return next.run(request).await;
    };
    let slot = match keys.enter(index) {
        Ok(slot) => slot,
        Err(running) => {
            let message = format!(
                "this API key already has {running} requests running, this server's limit; \
                 try again when one ends"
            );
            return ApiError::new(ErrorKind::Overloaded, message).in_shape(shape);
        }
    };
    // The slot is held until the body ends: a stream runs as long as it is read.
    let (parts, body) = next.run(request).await.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _running = &slot;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let models = state.upstream.pool.models();
    let (status, body) = readiness(state.readiness, state.discovery.synced(), &models);
    (status, Json(body)).into_response()
}

/// `/readyz`'s answer. Not ready until discovery has listed everything; then
/// [`Readiness::EveryModel`] wants a healthy backend for every model (and at
/// least one model), [`Readiness::Discovered`] nothing more. The models
/// without a healthy backend are named either way.
fn readiness(mode: Readiness, synced: bool, models: &[ModelSummary]) -> (StatusCode, Value) {
    if !synced {
        let reason = "discovery has not listed the deployments yet";
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": reason}),
        );
    }
    // A model with no backend at all is scaled to zero (or its groups are starting):
    // its requests wait for one, so it holds no router back.
    let unready: Vec<_> = models
        .iter()
        .filter(|m| m.healthy == 0 && m.backends > 0)
        .map(|m| json!({"model": m.model, "backends": m.backends, "healthy": 0}))
        .collect();
    let without_backends: Vec<_> = models
        .iter()
        .filter(|m| m.backends == 0)
        .map(|m| m.model.as_str())
        .collect();
    match mode {
        Readiness::EveryModel if models.is_empty() => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reason": "no deployments discovered"}),
        ),
        Readiness::EveryModel if !unready.is_empty() => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "models_without_healthy_backend": unready}),
        ),
        _ => {
            let mut body = json!({"ready": true});
            if !unready.is_empty() {
                body["models_without_healthy_backend"] = json!(unready);
            }
            if !without_backends.is_empty() {
                body["models_without_backends"] = json!(without_backends);
            }
            (StatusCode::OK, body)
        }
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        state.upstream.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, backends: usize, healthy: usize) -> ModelSummary {
        ModelSummary {
            model: name.into(),
            backends,
            healthy,
            info: None,
            adapters: Vec::new(),
        }
    }

    #[test]
    fn not_ready_before_discovery_has_listed() {
        for mode in [Readiness::EveryModel, Readiness::Discovered] {
            let (status, body) = readiness(mode, false, &[model("m", 1, 1)]);
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(
                body["reason"],
                "discovery has not listed the deployments yet"
            );
        }
    }

    #[test]
    fn every_model_mode_wants_a_healthy_backend_per_model() {
        let mode = Readiness::EveryModel;
        assert_eq!(
            readiness(mode, true, &[]).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let (status, body) = readiness(mode, true, &[model("a", 1, 1), model("b", 2, 0)]);
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["models_without_healthy_backend"][0]["model"], "b");
        assert_eq!(readiness(mode, true, &[model("a", 2, 1)]).0, StatusCode::OK);
    }

    #[test]
    fn a_model_scaled_to_zero_holds_no_mode_back() {
        for mode in [Readiness::EveryModel, Readiness::Discovered] {
            let (status, body) = readiness(mode, true, &[model("a", 1, 1), model("b", 0, 0)]);
            assert_eq!(status, StatusCode::OK, "{mode:?}");
            assert_eq!(body["models_without_backends"], json!(["b"]));
        }
    }

    #[test]
    fn discovered_mode_is_ready_with_models_still_starting() {
        let mode = Readiness::Discovered;
        assert_eq!(readiness(mode, true, &[]).0, StatusCode::OK);
        let (status, body) = readiness(mode, true, &[model("a", 1, 1), model("b", 1, 0)]);
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["ready"], true);
        assert_eq!(body["models_without_healthy_backend"][0]["model"], "b");
    }
}
