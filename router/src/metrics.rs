//! Every metric the router exports, with its name and help text, in one
//! registry served as Prometheus text on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 5 ms to 2 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Per-token buckets from 1 ms to 2 s.
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.0,
];

pub(crate) struct Metrics {
    registry: Registry,
    /// `shardserve_router_requests_total{model,endpoint,status}`
    pub requests: IntCounterVec,
    /// `shardserve_router_time_to_first_token_seconds{model}`
    pub ttft: HistogramVec,
    /// `shardserve_router_time_per_output_token_seconds{model}`
    pub tpot: HistogramVec,
    /// `shardserve_router_request_duration_seconds{model,endpoint}`
    pub e2e: HistogramVec,
    /// `shardserve_router_backend_outstanding_requests{model,backend}`
    pub outstanding: IntGaugeVec,
    /// `shardserve_router_backend_healthy{model,backend}`
    pub healthy: IntGaugeVec,
    /// `shardserve_router_prompt_tokens_total{model}`
    pub prompt_tokens: IntCounterVec,
    /// `shardserve_router_generation_tokens_total{model}`
    pub generation_tokens: IntCounterVec,
    /// `shardserve_router_backend_requests_total{model,backend}`
    pub backend_requests: IntCounterVec,
    /// `shardserve_router_retries_total{model}`
    pub retries: IntCounterVec,
    /// `shardserve_router_model_in_flight_requests{model}`: the autoscaler's signal.
    pub in_flight: IntGaugeVec,
    /// `shardserve_router_model_held_requests{model}`
    pub held: IntGaugeVec,
}

impl Metrics {
    pub(crate) fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                labels,
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        Ok(Self {
            requests: counter(
                "shardserve_router_requests_total",
                "Requests answered, by model, endpoint and HTTP status (gRPC code for gRPC).",
                &["model", "endpoint", "status"],
            )?,
            ttft: histogram(
                "shardserve_router_time_to_first_token_seconds",
                "Time from the request's arrival to its first generated token.",
                &["model"],
                LATENCY_BUCKETS,
            )?,
            tpot: histogram(
                "shardserve_router_time_per_output_token_seconds",
                "Mean time between generated tokens after the first, per request.",
                &["model"],
                TOKEN_BUCKETS,
            )?,
            e2e: histogram(
                "shardserve_router_request_duration_seconds",
                "Time from the request's arrival to its last byte.",
                &["model", "endpoint"],
                LATENCY_BUCKETS,
            )?,
            outstanding: gauge(
                "shardserve_router_backend_outstanding_requests",
                "Requests sent to a backend and not finished (running or queued there).",
                &["model", "backend"],
            )?,
            healthy: gauge(
                "shardserve_router_backend_healthy",
                "1 when the backend passes its health checks, 0 when ejected.",
                &["model", "backend"],
            )?,
            prompt_tokens: counter(
                "shardserve_router_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                &["model"],
            )?,
            generation_tokens: counter(
                "shardserve_router_generation_tokens_total",
                "Tokens generated and relayed to clients.",
                &["model"],
            )?,
            backend_requests: counter(
                "shardserve_router_backend_requests_total",
                "Generations started on each backend.",
                &["model", "backend"],
            )?,
            retries: counter(
                "shardserve_router_retries_total",
                "Requests sent again to another backend: before their first token, or (a non-streamed answer) after their backend was lost midway.",
                &["model"],
            )?,
            in_flight: gauge(
                "shardserve_router_model_in_flight_requests",
                "Requests received for a model and not finished: held for a backend, queued or running on one. Summed over router replicas, the autoscaler's signal.",
                &["model"],
            )?,
            held: gauge(
                "shardserve_router_model_held_requests",
                "Requests held because their model has no routable backend yet (scaled to zero, or its groups are starting).",
                &["model"],
            )?,
            registry,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
