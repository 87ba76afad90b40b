//! Every metric the worker exports, with its name and help text, and the
//! small HTTP server that serves them (`/metrics` in Prometheus text,
//! `/healthz`, `/readyz`) next to the gRPC API.
//!
//! Request metrics are recorded by the gRPC service as events stream out;
//! queue depth, running sequences, batch and KV cache figures are read from
//! the engine handle's atomics at scrape time (the engine thread stays the only owner of its
//! state).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Counter, Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

use crate::engine::EngineHandle;

/// Latency buckets from 5 ms to 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Per-token buckets from 1 ms to 2 s.
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.0,
];

/// The worker's metrics, labelled with the served model name.
pub struct Metrics {
    registry: Registry,
    /// `shardserve_worker_requests_total{status}`: `ok`, `cancelled` or the
    /// gRPC code of the failure in snake case (`invalid_argument`, ...).
    requests: IntCounterVec,
    /// `shardserve_worker_time_to_first_token_seconds`
    ttft: Histogram,
    /// `shardserve_worker_time_per_output_token_seconds`
    tpot: Histogram,
    /// `shardserve_worker_request_duration_seconds`
    e2e: Histogram,
    /// `shardserve_worker_queue_depth`
    queue_depth: IntGauge,
    /// `shardserve_worker_running_sequences`
    running: IntGauge,
    /// `shardserve_worker_prompt_tokens_total`
    prompt_tokens: IntCounter,
    /// `shardserve_worker_generation_tokens_total`
    generation_tokens: IntCounter,
    /// Scheduler and KV cache figures, copied from the engine at scrape time.
    engine: EngineGauges,
    /// LoRA adapters' requests and residency.
    lora: LoraMetrics,
}

/// Per-adapter metrics, and vLLM's `vllm:lora_requests_info`, which LoRA-aware
/// endpoint pickers (the Gateway API Inference Extension's) read to send a
/// request where its adapter is already running.
struct LoraMetrics {
    /// `shardserve_worker_lora_requests_total{adapter}`: Generate calls naming it.
    requests: IntCounterVec,
    /// `shardserve_worker_lora_adapter_requests{adapter}`: running or waiting now.
    in_flight: IntGaugeVec,
    /// `shardserve_worker_lora_adapter_resident{adapter}`: 1 when loaded on every rank.
    resident: IntGaugeVec,
    /// `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters,
    /// max_lora}`: one series, the scrape's Unix time as its value, as vLLM does.
    info: GaugeVec,
}

impl LoraMetrics {
    fn new(registry: &Registry, opts: &dyn Fn(&str, &str) -> Opts) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            opts(
                "shardserve_worker_lora_requests_total",
                "Generate calls that named a LoRA adapter, by adapter.",
            ),
            &["adapter"],
        )?;
        let in_flight = IntGaugeVec::new(
            opts(
                "shardserve_worker_lora_adapter_requests",
                "Requests running or waiting with each LoRA adapter served.",
            ),
            &["adapter"],
        )?;
        let resident = IntGaugeVec::new(
            opts(
                "shardserve_worker_lora_adapter_resident",
                "1 for a LoRA adapter loaded on every rank now, 0 for one served but loaded on its next request.",
            ),
            &["adapter"],
        )?;
        // vLLM's name and labels, without the model label, so that tools written
        // for vLLM read it unchanged.
        let info = GaugeVec::new(
            Opts::new(
                "vllm:lora_requests_info",
                "Running and waiting LoRA adapters (comma-separated) and the most resident at once; \
                 the value is the time of the scrape.",
            ),
            &["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(resident.clone()))?;
        registry.register(Box::new(info.clone()))?;
        Ok(Self {
            requests,
            in_flight,
            resident,
            info,
        })
    }

    fn update(&self, adapters: &[crate::engine::AdapterInfo], max_loras: usize) {
        self.in_flight.reset();
        self.resident.reset();
        self.info.reset();
        let mut running = Vec::new();
        let mut waiting = Vec::new();
        for a in adapters {
            let name = [a.name.as_str()];
            self.in_flight
                .with_label_values(&name)
                .set(a.requests as i64);
            self.resident
                .with_label_values(&name)
                .set(i64::from(a.resident));
            if a.requests > a.waiting {
                running.push(a.name.as_str());
            }
            if a.waiting > 0 {
                waiting.push(a.name.as_str());
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.info
            .with_label_values(&[
                running.join(",").as_str(),
                waiting.join(",").as_str(),
                max_loras.to_string().as_str(),
            ])
            .set(now);
    }
}

/// Metrics mirrored from [`crate::engine::EngineStats`].
struct EngineGauges {
    kv_blocks_total: IntGauge,
    kv_blocks_used: IntGauge,
    kv_blocks_cached: IntGauge,
    kv_blocks_touched: IntGauge,
    kv_bytes: IntGauge,
    batch_size: IntGauge,
    steps: IntCounter,
    batched_seqs: IntCounter,
    computed_tokens: IntCounter,
    prefix_query_tokens: IntCounter,
    prefix_hit_tokens: IntCounter,
    preemptions: IntCounter,
    step_seconds: Counter,
    forward_seconds: Counter,
}

impl EngineGauges {
    fn new(registry: &Registry, opts: &dyn Fn(&str, &str) -> Opts) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let seconds = |name: &str, help: &str| -> prometheus::Result<Counter> {
            let c = Counter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            kv_blocks_total: gauge(
                "shardserve_worker_kv_cache_blocks",
                "Blocks of the KV cache (its whole size).",
            )?,
            kv_blocks_used: gauge(
                "shardserve_worker_kv_cache_blocks_used",
                "KV cache blocks held by running sequences.",
            )?,
            kv_blocks_cached: gauge(
                "shardserve_worker_kv_cache_blocks_cached",
                "KV cache blocks the prefix cache can find (held or free to evict).",
            )?,
            kv_blocks_touched: gauge(
                "shardserve_worker_kv_cache_blocks_touched",
                "KV cache blocks written at least once since the start: the cache is reserved \
                 untouched, so resident memory grows with this until it equals the whole cache.",
            )?,
            kv_bytes: gauge(
                "shardserve_worker_kv_cache_bytes",
                "Bytes of the KV cache on this rank (its whole size).",
            )?,
            batch_size: gauge(
                "shardserve_worker_batch_size",
                "Sequences in the last forward step.",
            )?,
            steps: counter(
                "shardserve_worker_steps_total",
                "Forward steps run (one batch each).",
            )?,
            batched_seqs: counter(
                "shardserve_worker_batched_sequences_total",
                "Sequences summed over every step; divided by steps: the mean batch size.",
            )?,
            computed_tokens: counter(
                "shardserve_worker_computed_tokens_total",
                "Tokens run through the model: prompts (less prefix cache hits), recomputation and decodes.",
            )?,
            prefix_query_tokens: counter(
                "shardserve_worker_prefix_cache_queried_tokens_total",
                "Prompt tokens the prefix cache was asked for (whole blocks before the last token).",
            )?,
            prefix_hit_tokens: counter(
                "shardserve_worker_prefix_cache_hit_tokens_total",
                "Prompt tokens found in the prefix cache and not computed again.",
            )?,
            preemptions: counter(
                "shardserve_worker_preemptions_total",
                "Sequences preempted for lack of KV cache blocks (recomputed later).",
            )?,
            step_seconds: seconds(
                "shardserve_worker_step_seconds_total",
                "Time in forward steps, from scheduling to the tokens handed out.",
            )?,
            forward_seconds: seconds(
                "shardserve_worker_forward_seconds_total",
                "Time in the model's forward passes (part of the steps' time); the rest is the \
                 engine's own work between passes, which a GPU waits for.",
            )?,
        })
    }

    fn update(&self, s: &crate::engine::EngineStats, kv_bytes: usize) {
        let to = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        self.kv_blocks_total.set(s.kv_blocks_total as i64);
        self.kv_blocks_touched.set(s.kv_blocks_touched as i64);
        self.kv_bytes.set(kv_bytes as i64);
        self.kv_blocks_used.set(s.kv_blocks_used as i64);
        self.kv_blocks_cached.set(s.kv_blocks_cached as i64);
        self.batch_size.set(s.last_batch_seqs as i64);
        to(&self.steps, s.steps);
        to(&self.batched_seqs, s.batched_seqs);
        to(&self.computed_tokens, s.computed_tokens);
        to(&self.prefix_query_tokens, s.prefix_query_tokens);
        to(&self.prefix_hit_tokens, s.prefix_hit_tokens);
        to(&self.preemptions, s.preemptions);
        let seconds = |c: &Counter, nanos: u64| {
            let gained = nanos as f64 * 1e-9 - c.get();
            if gained > 0.0 {
                c.inc_by(gained);
            }
        };
        seconds(&self.step_seconds, s.step_nanos);
        seconds(&self.forward_seconds, s.forward_nanos);
    }
}

impl Metrics {
    pub fn new(model: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model", model);
        let hist = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::from(opts(name, help)).buckets(buckets.to_vec())
        };
        let requests = IntCounterVec::new(
            opts(
                "shardserve_worker_requests_total",
                "Generate calls ended, by status: ok, cancelled, or the gRPC code of the failure.",
            ),
            &["status"],
        )?;
        let ttft = Histogram::with_opts(hist(
            "shardserve_worker_time_to_first_token_seconds",
            "Time from a Generate call's arrival to its first generated token.",
            LATENCY_BUCKETS,
        ))?;
        let tpot = Histogram::with_opts(hist(
            "shardserve_worker_time_per_output_token_seconds",
            "Mean time between generated tokens after the first, per request.",
            TOKEN_BUCKETS,
        ))?;
        let e2e = Histogram::with_opts(hist(
            "shardserve_worker_request_duration_seconds",
            "Time from a Generate call's arrival to its end.",
            LATENCY_BUCKETS,
        ))?;
        let queue_depth = IntGauge::with_opts(opts(
            "shardserve_worker_queue_depth",
            "Requests waiting for room in the running batch.",
        ))?;
        let running = IntGauge::with_opts(opts(
            "shardserve_worker_running_sequences",
            "Sequences the engine is generating now.",
        ))?;
        let prompt_tokens = IntCounter::with_opts(opts(
            "shardserve_worker_prompt_tokens_total",
            "Prompt tokens of finished requests.",
        ))?;
        let generation_tokens = IntCounter::with_opts(opts(
            "shardserve_worker_generation_tokens_total",
            "Tokens generated, counted as they stream.",
        ))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(tpot.clone()))?;
        registry.register(Box::new(e2e.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generation_tokens.clone()))?;
        let engine = EngineGauges::new(&registry, &opts)?;
        let lora = LoraMetrics::new(&registry, &opts)?;
        Ok(Self {
            registry,
            requests,
            ttft,
            tpot,
            e2e,
            queue_depth,
            running,
            prompt_tokens,
            generation_tokens,
            engine,
            lora,
        })
    }

    /// Counts a Generate call naming `adapter`.
    pub fn adapter_request(&self, adapter: &str) {
        self.lora.requests.with_label_values(&[adapter]).inc();
    }

    /// Starts the record of one Generate call.
    pub fn start(self: &Arc<Self>) -> RequestRecord {
        RequestRecord {
            metrics: self.clone(),
            arrived: Instant::now(),
            first_token: None,
            tokens: 0,
            ended: false,
        }
    }

    /// Prometheus text, with the engine's load read now.
    pub fn render(&self, engine: &EngineHandle) -> String {
        let load = engine.load();
        self.queue_depth.set(load.queued as i64);
        self.running.set(load.running as i64);
        self.engine
            .update(&engine.stats(), engine.info().kv_cache.bytes);
        self.lora
            .update(&engine.adapters(), engine.info().max_loras);
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// What one Generate call does, recorded as it happens. A record dropped
/// before it ended counts as cancelled (the client went away).
pub struct RequestRecord {
    metrics: Arc<Metrics>,
    arrived: Instant,
    first_token: Option<Instant>,
    tokens: u64,
    ended: bool,
}

impl RequestRecord {
    pub fn token(&mut self) {
        let now = Instant::now();
        if self.first_token.is_none() {
            self.first_token = Some(now);
            self.metrics
                .ttft
                .observe(now.duration_since(self.arrived).as_secs_f64());
        }
        self.tokens += 1;
        self.metrics.generation_tokens.inc();
    }

    /// The call finished normally after `prompt_tokens` of prompt.
    pub fn finished(&mut self, prompt_tokens: usize) {
        self.metrics.prompt_tokens.inc_by(prompt_tokens as u64);
        if let Some(first) = self.first_token
            && self.tokens > 1
        {
            let per_token = first.elapsed() / (self.tokens - 1) as u32;
            self.metrics.tpot.observe(per_token.as_secs_f64());
        }
        self.end("ok");
    }

    /// The call failed with `code`.
    pub fn failed(&mut self, code: tonic::Code) {
        self.end(&status_label(code));
    }

    fn end(&mut self, status: &str) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.metrics.requests.with_label_values(&[status]).inc();
        self.metrics
            .e2e
            .observe(self.arrived.elapsed().as_secs_f64());
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.end("cancelled");
    }
}

/// `InvalidArgument` → `invalid_argument`.
fn status_label(code: tonic::Code) -> String {
    let name = format!("{code:?}");
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether the worker takes requests (true from start to shutdown).
pub type Ready = Arc<AtomicBool>;

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    engine: EngineHandle,
    ready: Ready,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown` completes.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    engine: EngineHandle,
    ready: Ready,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = ?listener.local_addr().ok(), "serving /metrics, /healthz and /readyz over HTTP");
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            engine,
            ready,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.engine),
    )
}

async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_snake_case() {
        assert_eq!(
            status_label(tonic::Code::InvalidArgument),
            "invalid_argument"
        );
        assert_eq!(status_label(tonic::Code::Ok), "ok");
        assert_eq!(
            status_label(tonic::Code::ResourceExhausted),
            "resource_exhausted"
        );
    }

    #[test]
    fn a_dropped_record_counts_as_cancelled_once() {
        let metrics = Arc::new(Metrics::new("m").unwrap());
        let mut done = metrics.start();
        done.token();
        done.token();
        done.finished(5);
        drop(done);
        let mut gone = metrics.start();
        gone.token();
        drop(gone);
        let ok = metrics.requests.with_label_values(&["ok"]).get();
        let cancelled = metrics.requests.with_label_values(&["cancelled"]).get();
        assert_eq!((ok, cancelled), (1, 1));
        assert_eq!(metrics.generation_tokens.get(), 3);
        assert_eq!(metrics.prompt_tokens.get(), 5);
        assert_eq!(metrics.ttft.get_sample_count(), 2);
        assert_eq!(metrics.tpot.get_sample_count(), 1);
        assert_eq!(metrics.e2e.get_sample_count(), 2);
    }
}
