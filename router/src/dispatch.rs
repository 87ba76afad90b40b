//! Sending one generation to a backend: pick (via the pool), call, and retry
//! on another backend while no token has been produced. The returned
//! [`Generation`] relays the backend's events, keeps the backend leased until
//! it is dropped, and records the latency and token metrics. Dropping it
//! drops the upstream call, which cancels the generation on the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Stream;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::generate_response::Event;
use shardserve_proto::v1::inference_client::InferenceClient;
use tonic::{Code, Status, Streaming};

use crate::balance::prefix_key;
use crate::metrics::Metrics;
use crate::pool::{Held, InFlight, Lease, PickError, Pool};

/// How often a held request looks for a routable backend even without a wake-up.
const HOLD_RECHECK: Duration = Duration::from_secs(1);

/// Why a generation did not start.
#[derive(Debug)]
pub(crate) enum DispatchError {
    Pick(PickError),
    /// The backend refused or failed the call (INVALID_ARGUMENT and others).
    Upstream(Status),
}

impl From<PickError> for DispatchError {
    fn from(e: PickError) -> Self {
        Self::Pick(e)
    }
}

/// The request paths' handle on the backends.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub affinity_prefix: usize,
    /// How long a request waits for a routable backend of its model.
    pub hold_timeout: Duration,
    /// The router's limit on prompt tokens, which the worker (it tokenizes) applies.
    pub max_prompt_tokens: Option<u32>,
    /// How long a request may take from its arrival to its last event.
    pub request_timeout: Option<Duration>,
}

/// Statuses that mean "this backend could not serve it" rather than "this
/// request is wrong": safe to send elsewhere while nothing was streamed.
pub(crate) fn retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted
    )
}

impl Upstream {
    /// Starts `req` on a backend of `model` (already resolved) that serves its
    /// adapter, if it names one, and waits for its first event, retrying on
    /// other backends as long as none came.
    pub(crate) async fn generate(
        &self,
        model: &str,
        mut req: pb::GenerateRequest,
    ) -> Result<Generation, DispatchError> {
        let started = Instant::now();
        req.model = model.to_string();
        req.max_prompt_tokens = match (req.max_prompt_tokens, self.max_prompt_tokens) {
            (Some(asked), Some(limit)) => Some(asked.min(limit)),
            (asked, limit) => asked.or(limit),
        };
        let adapter = (!req.adapter.is_empty()).then(|| req.adapter.clone());
        // A prefix computed under an adapter is cached under it alone.
        let scope = match &adapter {
            Some(a) => format!("{model}\u{0}{a}"),
            None => model.to_string(),
        };
        let key = prefix_key(&scope, req.prompt.as_ref(), self.affinity_prefix);
        let mut tried: Vec<String> = Vec::new();
        let mut last_error: Option<Status> = None;
        let in_flight = self.pool.enter(model);
        let mut held: Option<Held> = None;
        loop {
            let changed = self.pool.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let lease = match self.pool.lease_for(model, adapter.as_deref(), key, &tried) {
                Ok(lease) => lease,
                // Nothing routable: the model is scaled to zero or its groups are
                // (re)starting, or every backend left failed this request before its
                // first token (their workers died: they restart). Hold the request
                // until a backend comes (it counts as load meanwhile, so the
                // autoscaler starts one): nothing was streamed, so it is not lost.
                Err(PickError::NoBackends(_) | PickError::NoHealthy(_))
                    if started.elapsed() < self.hold_timeout =>
                {
                    if held.is_none() {
                        held = Some(self.pool.hold(model)?);
                        tracing::info!(model, "no routable backend: request held");
                    }
                    let left = self.hold_timeout.saturating_sub(started.elapsed());
                    // Health checks change routability without a wake-up only when a
                    // backend is first checked: look again every second regardless.
                    let _ = tokio::time::timeout(left.min(HOLD_RECHECK), changed).await;
                    if started.elapsed() >= self.hold_timeout {
                        return Err(match last_error {
                            Some(status) => no_backend_took_it(model, &status),
                            None => PickError::HoldTimeout {
                                model: model.to_string(),
                                waited: self.hold_timeout,
                            }
                            .into(),
                        });
                    }
                    // A backend that failed is routable again only once a health
                    // check passed (a restarted worker): it may take the request now.
                    tried.clear();
                    continue;
                }
                // Held for as long as allowed: report the backends' own error.
                Err(PickError::NoHealthy(_)) if last_error.is_some() => {
                    let status = last_error.unwrap_or_else(|| Status::unavailable(""));
                    return Err(no_backend_took_it(model, &status));
                }
                Err(e) => return Err(e.into()),
            };
            if !tried.is_empty() {
                self.metrics.retries.with_label_values(&[model]).inc();
            }
            match start(&lease, req.clone()).await {
                Ok((first, stream)) => {
                    if held.take().is_some() {
                        tracing::info!(
                            model,
                            waited_ms = started.elapsed().as_millis() as u64,
                            "held request sent"
                        );
                    }
                    self.metrics
                        .backend_requests
                        .with_label_values(&[model, lease.backend.as_str()])
                        .inc();
                    let deadline = self.request_timeout.map(|timeout| {
                        let at = tokio::time::Instant::from_std(started + timeout);
                        (Box::pin(tokio::time::sleep_until(at)), timeout)
                    });
                    return Ok(Generation {
                        pending: Some(first),
                        stream,
                        deadline,
                        lease,
                        _in_flight: in_flight,
                        metrics: Arc::clone(&self.metrics),
                        started,
                        first_token: None,
                        tokens: 0,
                        done: false,
                    });
                }
                Err(status) if retryable(&status) => {
                    tracing::warn!(model, backend = %lease.backend, code = ?status.code(), message = status.message(), "backend failed before the first token; trying another");
                    self.pool
                        .report_failure(model, &lease.backend, status.message());
                    tried.push(lease.backend.clone());
                    last_error = Some(status);
                }
                Err(status) => return Err(DispatchError::Upstream(status)),
            }
        }
    }
}

/// Every backend failed the request and none came back within the hold timeout.
fn no_backend_took_it(model: &str, last: &Status) -> DispatchError {
    DispatchError::Upstream(Status::unavailable(format!(
        "no healthy backend for model {model:?} could take the request (last error: {})",
        last.message()
    )))
}

/// Calls Generate and reads the first event.
async fn start(
    lease: &Lease,
    req: pb::GenerateRequest,
) -> Result<(Event, Streaming<pb::GenerateResponse>), Status> {
    let mut client = InferenceClient::new(lease.channel.clone());
    let mut stream = client.generate(req).await?.into_inner();
    match stream.message().await? {
        Some(pb::GenerateResponse { event: Some(event) }) => Ok((event, stream)),
        _ => Err(Status::unavailable(
            "the backend ended the stream before its first event",
        )),
    }
}

/// A started generation: the backend's events, in order, ending after
/// `Finished` or an error.
pub(crate) struct Generation {
    pending: Option<Event>,
    stream: Streaming<pb::GenerateResponse>,
    /// When the request's time is up (`--request-timeout`), and that time.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    lease: Lease,
    /// Counts the request in its model's in-flight requests until it is dropped.
    _in_flight: InFlight,
    metrics: Arc<Metrics>,
    started: Instant,
    first_token: Option<Instant>,
    tokens: u64,
    done: bool,
}

impl Generation {
    pub(crate) fn backend(&self) -> &str {
        &self.lease.backend
    }

    fn observe(&mut self, event: &Event) {
        let model = [self.lease.model.as_str()];
        match event {
            Event::Token(_) => {
                self.tokens += 1;
                if self.first_token.is_none() {
                    self.first_token = Some(Instant::now());
                    self.metrics
                        .ttft
                        .with_label_values(&model)
                        .observe(self.started.elapsed().as_secs_f64());
                }
            }
            Event::Finished(done) => {
                self.done = true;
                let usage = done.usage.unwrap_or_default();
                self.metrics
                    .prompt_tokens
                    .with_label_values(&model)
                    .inc_by(u64::from(usage.prompt_tokens));
                self.metrics
                    .generation_tokens
                    .with_label_values(&model)
                    .inc_by(self.tokens);
                if let Some(first) = self.first_token
                    && self.tokens > 1
                {
                    let per_token = first.elapsed().as_secs_f64() / (self.tokens - 1) as f64;
                    self.metrics
                        .tpot
                        .with_label_values(&model)
                        .observe(per_token);
                }
            }
        }
    }
}

impl Stream for Generation {
    type Item = Result<Event, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some((deadline, timeout)) = self.deadline.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                // Dropping the upstream stream cancels the generation on the worker.
                let message = format!(
                    "the request ran past this server's limit of {} s and was stopped",
                    timeout.as_secs_f64()
                );
                self.done = true;
                return Poll::Ready(Some(Err(Status::deadline_exceeded(message))));
            }
            let event = match self.pending.take() {
                Some(event) => event,
                None => match Pin::new(&mut self.stream).poll_next(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(pb::GenerateResponse { event: Some(event) }))) => event,
                    // A message without an event carries nothing to relay.
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(status))) => {
                        self.done = true;
                        if retryable(&status) {
                            self.lease.report_failure(status.message());
                        }
                        return Poll::Ready(Some(Err(status)));
                    }
                    Poll::Ready(None) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(Status::unavailable(
                            "the backend ended the stream without finishing the generation",
                        ))));
                    }
                },
            };
            self.observe(&event);
            return Poll::Ready(Some(Ok(event)));
        }
    }
}
