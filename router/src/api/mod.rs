//! The HTTP front ends: OpenAI (`openai`), Ollama (`ollama`) and TGI
//! (`tgi`). Each maps its requests to `shardserve.v1.GenerateRequest` with
//! pure functions, starts the generation through [`Upstream`], and maps the
//! event stream back to its own response shapes. Shared here: the error type,
//! the JSON body parser, sampling checks and the per-request metrics tracker.

mod bodies;
mod body;
mod error;
pub(crate) mod lora;
pub(crate) mod ollama;
pub(crate) mod openai;
mod params;
#[cfg(test)]
mod tests_damaged;
pub(crate) mod tgi;

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::generate_response::Event;

pub use bodies::{ApiEndpoint, BodyRefused, map_body};
pub(crate) use body::RequestBody;
pub(crate) use error::{ApiError, ErrorKind};
pub use params::Limits;
pub(crate) use params::{Sampling, check_max_tokens, refuse_unhonoured, stop_list, unhonoured};

use tonic::Status;

use crate::config::{Readiness, RequestLimits};
use crate::discovery::Discovery;
use crate::dispatch::{Generation, Upstream, retryable};
use crate::pool::Target;

/// What every HTTP handler gets.
#[derive(Clone)]
pub(crate) struct AppState {
    pub upstream: Upstream,
    /// Asked by `/readyz` whether the deployments are known yet.
    pub discovery: Arc<dyn Discovery>,
    pub readiness: Readiness,
    /// What one request may ask and take.
    pub limits: RequestLimits,
}

/// Parses a JSON body; malformed JSON and wrong types are 400s whose message
/// says where.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}"), None))
}

/// Counts a request by status when answered and records its end-to-end
/// latency when dropped (for a stream: when the stream ends or the client
/// leaves).
pub(crate) struct Tracker {
    upstream: Upstream,
    model: String,
    endpoint: &'static str,
    started: Instant,
    /// Only the armed copy records the latency (see [`Tracker::take`]).
    armed: bool,
}

impl Tracker {
    pub(crate) fn new(state: &AppState, endpoint: &'static str) -> Self {
        Self {
            upstream: state.upstream.clone(),
            model: String::new(),
            endpoint,
            started: Instant::now(),
            armed: true,
        }
    }

    /// Moves the latency recording into a response stream: the returned
    /// tracker records when the stream is dropped; this one no longer does.
    pub(crate) fn take(&mut self) -> Tracker {
        self.armed = false;
        Tracker {
            upstream: self.upstream.clone(),
            model: self.model.clone(),
            endpoint: self.endpoint,
            started: self.started,
            armed: true,
        }
    }

    pub(crate) fn set_model(&mut self, model: &str) {
        self.model = model.to_string();
    }

    pub(crate) fn status(&self, code: u16) {
        self.upstream
            .metrics
            .requests
            .with_label_values(&[self.model.as_str(), self.endpoint, &code.to_string()])
            .inc();
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.upstream
            .metrics
            .e2e
            .with_label_values(&[self.model.as_str(), self.endpoint])
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl AppState {
    /// The model or LoRA adapter a request names (empty: the only model),
    /// known to the pool.
    pub(crate) fn resolve(&self, model: Option<&str>) -> Result<Target, ApiError> {
        self.upstream
            .pool
            .resolve(model.unwrap_or_default())
            .map_err(ApiError::from)
    }

    pub(crate) fn limits(&self, target: &Target) -> Limits {
        Limits {
            context: self.upstream.pool.max_sequence_length(&target.model),
            max_tokens: self.limits.max_tokens,
        }
    }

    /// Generates to the end, for a non-streaming answer. Nothing has reached
    /// the client until the end, so a backend lost mid-generation is
    /// replaced by another (a bounded number of times).
    pub(crate) async fn complete(
        &self,
        target: &Target,
        req: pb::GenerateRequest,
    ) -> Result<Collected, ApiError> {
        const ATTEMPTS: usize = 3;
        let model = target.model.as_str();
        let mut attempt = 1;
        loop {
            let generation = self.start(target, req.clone()).await?;
            let backend = generation.backend().to_string();
            match collect(generation).await {
                Ok(collected) => return Ok(collected),
                Err(status) if retryable(&status) && attempt < ATTEMPTS => {
                    tracing::warn!(
                        model,
                        backend,
                        message = status.message(),
                        "backend lost mid-generation; generating again on another"
                    );
                    self.upstream
                        .metrics
                        .retries
                        .with_label_values(&[model])
                        .inc();
                    attempt += 1;
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Starts a generation on the target's model, with its adapter.
    pub(crate) async fn start(
        &self,
        target: &Target,
        mut req: pb::GenerateRequest,
    ) -> Result<Generation, ApiError> {
        if let Some(adapter) = &target.adapter {
            req.adapter = adapter.clone();
        }
        self.upstream
            .generate(&target.model, req)
            .await
            .map_err(ApiError::from)
    }
}

/// The error body shape of a front end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    OpenAi,
    Ollama,
    Tgi,
}

impl Shape {
    /// The front end a route belongs to.
    pub(crate) fn of_path(path: &str) -> Self {
        if path.starts_with("/api/") {
            Self::Ollama
        } else if path == "/" || path.starts_with("/generate") {
            Self::Tgi
        } else {
            Self::OpenAi
        }
    }
}

/// Runs a handler body, counting its status and answering errors in the
/// front end's shape.
pub(crate) async fn answer<F>(
    state: AppState,
    endpoint: &'static str,
    shape: Shape,
    f: F,
) -> Response
where
    F: AsyncFnOnce(&AppState, &mut Tracker) -> Result<Response, ApiError>,
{
    let mut tracker = Tracker::new(&state, endpoint);
    match f(&state, &mut tracker).await {
        Ok(response) => {
            tracker.status(response.status().as_u16());
            response
        }
        Err(e) => {
            let response = e.clone().in_shape(shape);
            tracker.status(response.status().as_u16());
            tracing::info!(endpoint, status = response.status().as_u16(), message = %e.message, "request refused");
            response
        }
    }
}

/// A whole generation, for non-streaming answers.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Collected {
    pub tokens: Vec<pb::Token>,
    pub finished: pb::Finished,
    /// When the first token came (the end of the prompt's evaluation), if one did.
    pub first_token: Option<std::time::Instant>,
}

async fn collect(mut generation: Generation) -> Result<Collected, Status> {
    let mut tokens = Vec::new();
    let mut first_token = None;
    while let Some(event) = generation.next().await {
        match event? {
            Event::Token(t) => {
                first_token.get_or_insert_with(std::time::Instant::now);
                tokens.push(t);
            }
            Event::Finished(finished) => {
                return Ok(Collected {
                    tokens,
                    finished,
                    first_token,
                });
            }
        }
    }
    Err(Status::internal(
        "the backend ended the stream without finishing",
    ))
}

/// A streamed response: `content_type` (SSE or NDJSON) from a stream of
/// ready-made frames. Dropping the body (the client left) drops the stream,
/// and with it the upstream generation.
pub(crate) fn stream_response(
    content_type: &'static str,
    frames: impl futures::Stream<Item = Bytes> + Send + 'static,
) -> Response {
    let mut response = Response::new(Body::from_stream(frames.map(Ok::<_, Infallible>)));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One SSE event: `data: {json}` and a blank line.
pub(crate) fn sse_frame(value: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

/// The OpenAI end-of-stream marker.
pub(crate) const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A short process-unique id with a prefix (`chatcmpl-`, `cmpl-`).
pub(crate) fn new_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}{:08x}{n:06x}", nanos)
}

/// `body` with `extra`'s fields added (replacing any of the same name), for tests that
/// vary one field of a request.
#[cfg(test)]
pub(crate) fn with_fields(
    mut body: serde_json::Value,
    extra: serde_json::Value,
) -> serde_json::Value {
    if let (Some(fields), serde_json::Value::Object(extra)) = (body.as_object_mut(), extra) {
        fields.extend(extra);
    }
    body
}
