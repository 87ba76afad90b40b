//! `InferenceService`: the generated `Inference` trait over an `EngineHandle`.

use std::hash::{BuildHasher, Hasher, RandomState};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use shardserve_proto::v1 as pb;
use shardserve_proto::v1::adapters_server::Adapters;
use shardserve_proto::v1::inference_server::Inference;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span};

use super::convert;
use super::metrics::{Metrics, RequestRecord};
use crate::engine::{AdapterChange, EngineEvent, EngineHandle, Prompt, prompt_ids};
use crate::tokenizer::Tokenizer;

/// Serves `shardserve.v1.Inference` from one engine.
#[derive(Clone)]
pub struct InferenceService {
    engine: EngineHandle,
    metrics: Arc<Metrics>,
}

impl InferenceService {
    /// A service whose metrics nobody reads.
    pub fn new(engine: EngineHandle) -> Self {
        let metrics = Metrics::new(&engine.info().served_model_name)
            .expect("a fresh registry takes the fixed set of metrics");
        Self::with_metrics(engine, Arc::new(metrics))
    }

    /// A service recording its calls into `metrics`.
    pub fn with_metrics(engine: EngineHandle, metrics: Arc<Metrics>) -> Self {
        Self { engine, metrics }
    }
}

#[tonic::async_trait]
impl Inference for InferenceService {
    type GenerateStream = GenerateStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let mut record = self.metrics.start();
        let req = request.into_inner();
        if !req.adapter.is_empty() {
            self.metrics.adapter_request(&req.adapter);
        }
        let request_id = if req.request_id.is_empty() {
            new_request_id()
        } else {
            req.request_id.clone()
        };
        let span = tracing::info_span!("generate", request_id = %request_id);
        let (first, events) = match self.start(&req).instrument(span.clone()).await {
            Ok(started) => started,
            Err(status) => {
                record.failed(status.code());
                span.in_scope(
                    || tracing::info!(code = ?status.code(), message = status.message(), "refused"),
                );
                return Err(status);
            }
        };
        let token_text = token_text(self.engine.tokenizer().clone());
        let stream = GenerateStream::new(first, events, token_text, span).recorded_by(record);
        let mut response = Response::new(stream);
        if let Ok(value) = request_id.parse() {
            response.metadata_mut().insert("x-request-id", value);
        }
        Ok(response)
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let tokenizer = self.engine.tokenizer().clone();
        // Long texts take real CPU time: keep it off the async workers.
        let ids = tokio::task::spawn_blocking(move || {
            tokenizer.encode(&req.text, req.add_special_tokens, req.parse_special)
        })
        .await
        .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| {
            if convert::tokenizer_input_error(&e) {
                Status::invalid_argument(e.to_string())
            } else {
                Status::internal(e.to_string())
            }
        })?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn model_info(
        &self,
        _request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(convert::model_info(
            self.engine.info(),
            &self.engine.adapters(),
        )))
    }
}

#[tonic::async_trait]
impl Adapters for InferenceService {
    async fn load_adapter(
        &self,
        request: Request<pb::LoadAdapterRequest>,
    ) -> Result<Response<pb::LoadAdapterResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() || req.path.is_empty() {
            return Err(Status::invalid_argument("name and path are both required"));
        }
        let path = self
            .engine
            .adapter_path(&req.path)
            .await
            .map_err(|e| convert::engine_status(&e))?;
        let change = AdapterChange::Load {
            name: req.name,
            source: req.path,
            path,
        };
        let adapter = self
            .engine
            .change_adapter(change)
            .await
            .map_err(|e| convert::engine_status(&e))?;
        Ok(Response::new(pb::LoadAdapterResponse {
            adapter: adapter.as_ref().map(convert::lora_adapter),
        }))
    }

    async fn unload_adapter(
        &self,
        request: Request<pb::UnloadAdapterRequest>,
    ) -> Result<Response<pb::UnloadAdapterResponse>, Status> {
        let change = AdapterChange::Unload {
            name: request.into_inner().name,
        };
        self.engine
            .change_adapter(change)
            .await
            .map_err(|e| convert::engine_status(&e))?;
        Ok(Response::new(pb::UnloadAdapterResponse {}))
    }
}

impl InferenceService {
    /// Submits the request and waits for its first event, so that a request
    /// the engine refuses fails the call itself rather than its stream.
    async fn start(
        &self,
        req: &pb::GenerateRequest,
    ) -> Result<(EngineEvent, mpsc::UnboundedReceiver<EngineEvent>), Status> {
        let mut gen_request = convert::generation_request(req)?;
        // Template and tokenizer run here, on a blocking thread: on the engine's thread
        // a long prompt (~0.5 ms per thousand tokens) or a heavy template would stall
        // every running sequence's next step.
        if !matches!(gen_request.prompt, Prompt::Ids(_)) {
            let tokenizer = self.engine.tokenizer().clone();
            let vocab = self.engine.info().config.vocab_size;
            let prompt = std::mem::replace(&mut gen_request.prompt, Prompt::Ids(Vec::new()));
            let ids = tokio::task::spawn_blocking(move || prompt_ids(&tokenizer, vocab, &prompt))
                .await
                .map_err(|e| Status::internal(format!("tokenizer task failed: {e}")))?
                .map_err(|e| convert::engine_status(&e))?;
            gen_request.prompt = Prompt::Ids(ids);
        }
        tracing::info!(prompt = prompt_kind(req), "submitted");
        let mut events = self
            .engine
            .submit(gen_request)
            .map_err(|e| convert::engine_status(&e))?;
        match events.recv().await {
            Some(EngineEvent::Error(e)) => Err(convert::engine_status(&e)),
            Some(first) => Ok((first, events)),
            None => Err(Status::unavailable("the engine dropped the request")),
        }
    }
}

fn prompt_kind(req: &pb::GenerateRequest) -> &'static str {
    use pb::generate_request::Prompt as P;
    match req.prompt {
        Some(P::Text(_)) => "text",
        Some(P::Chat(_)) => "chat",
        Some(P::TokenIds(_)) => "token_ids",
        None => "none",
    }
}

/// A process-unique id for requests that came without one.
fn new_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // RandomState is keyed per process, so ids differ across restarts too.
    static KEYS: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);
    let mut hasher = KEYS.build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    format!("gen-{:016x}", hasher.finish())
}

/// A token's text for logprob entries (lossy where a token is part of a
/// UTF-8 character).
type TokenText = Arc<dyn Fn(u32) -> String + Send + Sync>;

fn token_text(tokenizer: Arc<Tokenizer>) -> TokenText {
    Arc::new(move |id| {
        tokenizer
            .token_bytes(id)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    })
}

/// The response stream of one `Generate` call. It owns the engine's event
/// receiver: when the client goes away, tonic drops the stream, the receiver
/// goes with it, and the engine cancels the request and frees its memory.
pub struct GenerateStream {
    /// The first event, received before the call was answered.
    pending: Option<EngineEvent>,
    events: mpsc::UnboundedReceiver<EngineEvent>,
    token_text: TokenText,
    span: Span,
    streamed: usize,
    done: bool,
    /// Metrics of the call; dropped with the stream (cancelled, if unfinished).
    record: Option<RequestRecord>,
}

impl GenerateStream {
    fn new(
        first: EngineEvent,
        events: mpsc::UnboundedReceiver<EngineEvent>,
        token_text: TokenText,
        span: Span,
    ) -> Self {
        Self {
            pending: Some(first),
            events,
            token_text,
            span,
            streamed: 0,
            done: false,
            record: None,
        }
    }

    fn recorded_by(mut self, record: RequestRecord) -> Self {
        self.record = Some(record);
        self
    }

    fn response(&mut self, event: EngineEvent) -> Result<pb::GenerateResponse, Status> {
        use pb::generate_response::Event;
        let text_of = &*self.token_text;
        let _enter = self.span.enter();
        match event {
            EngineEvent::Token(token) => {
                self.streamed += 1;
                if let Some(record) = &mut self.record {
                    record.token();
                }
                Ok(pb::GenerateResponse {
                    event: Some(Event::Token(convert::token_message(token, text_of))),
                })
            }
            EngineEvent::Finished(done) => {
                self.done = true;
                if let Some(record) = &mut self.record {
                    record.finished(done.prompt_token_ids.len());
                }
                tracing::info!(
                    reason = done.reason.as_str(),
                    prompt_tokens = done.prompt_token_ids.len(),
                    completion_tokens = done.token_ids.len(),
                    "finished"
                );
                Ok(pb::GenerateResponse {
                    event: Some(Event::Finished(convert::finished_message(done, text_of))),
                })
            }
            EngineEvent::Error(e) => {
                self.done = true;
                tracing::warn!(error = %e, tokens = self.streamed, "failed mid-stream");
                let status = convert::engine_status(&e);
                if let Some(record) = &mut self.record {
                    record.failed(status.code());
                }
                Err(status)
            }
        }
    }
}

impl Stream for GenerateStream {
    type Item = Result<pb::GenerateResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let event = match self.pending.take() {
            Some(event) => event,
            None => match self.events.poll_recv(cx) {
                Poll::Ready(Some(event)) => event,
                Poll::Ready(None) => {
                    self.done = true;
                    if let Some(record) = &mut self.record {
                        record.failed(tonic::Code::Internal);
                    }
                    return Poll::Ready(Some(Err(Status::internal(
                        "the engine ended the request without finishing it",
                    ))));
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        Poll::Ready(Some(self.response(event)))
    }
}

impl Drop for GenerateStream {
    fn drop(&mut self) {
        if !self.done {
            let _enter = self.span.enter();
            tracing::info!(tokens = self.streamed, "cancelled by the client");
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;
    use crate::engine::{FinishReason, Finished, TokenEvent};

    fn token(id: u32, text: &str) -> EngineEvent {
        EngineEvent::Token(TokenEvent {
            id,
            text_delta: text.into(),
            logprob: None,
        })
    }

    fn stream(first: EngineEvent) -> (mpsc::UnboundedSender<EngineEvent>, GenerateStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let text: TokenText = Arc::new(|id| id.to_string());
        (tx, GenerateStream::new(first, rx, text, Span::none()))
    }

    #[tokio::test]
    async fn stream_yields_first_event_tokens_then_finished_and_ends() {
        let (tx, mut s) = stream(token(1, "a"));
        tx.send(token(2, "b")).unwrap();
        tx.send(EngineEvent::Finished(Finished {
            reason: FinishReason::Length,
            prompt_token_ids: vec![9],
            token_ids: vec![1, 2],
            text: "abc".into(),
            text_tail: "c".into(),
            prompt_logprobs: None,
            matched_stop: None,
        }))
        .unwrap();
        let mut deltas = String::new();
        let mut finished = None;
        while let Some(item) = s.next().await {
            match item.unwrap().event.unwrap() {
                pb::generate_response::Event::Token(t) => deltas.push_str(&t.text_delta),
                pb::generate_response::Event::Finished(f) => finished = Some(f),
            }
        }
        let finished = finished.unwrap();
        assert_eq!(deltas + &finished.text_delta, finished.text);
        // The engine's sender is still alive, but the stream has ended.
        assert!(!tx.is_closed());
    }

    #[tokio::test]
    async fn dropping_the_stream_drops_the_engine_receiver() {
        let (tx, mut s) = stream(token(1, "a"));
        assert!(s.next().await.unwrap().is_ok());
        assert!(!tx.is_closed());
        drop(s);
        // The engine's next send fails: that is how it learns to cancel.
        assert!(tx.is_closed());
        assert!(tx.send(token(2, "b")).is_err());
    }

    #[tokio::test]
    async fn engine_going_away_mid_stream_is_an_error() {
        let (tx, mut s) = stream(token(1, "a"));
        drop(tx);
        assert!(s.next().await.unwrap().is_ok());
        let err = s.next().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::Internal);
        assert!(s.next().await.is_none());
    }

    #[test]
    fn request_ids_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert!(a.starts_with("gen-"));
    }
}
