//! The HTTP face: every API route, the optional API-key layer in front of
//! them, and the open operational routes `/healthz`, `/readyz`, `/metrics`.


use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, ErrorKind, ollama, openai, tgi};
use crate::auth::Keys;
use crate::config::Readiness;
use crate::pool::ModelSummary;

/// Largest request body (long prompts as token ids are big).
const BODY_LIMIT: usize = 64 << 20;

pub(crate) fn router(state: AppState, keys: Keys) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
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
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    api.merge(open)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// `Authorization: Bearer KEY` with one of the configured keys, else 401.
async fn require_key(State(keys): State<Keys>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match keys.check(authorization) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            let mut response =
                ApiError::new(ErrorKind::Unauthorized, refusal.message()).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
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
