//! Every metric the operator exports, with its name and help text, in one
//! registry served as Prometheus text on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Reconcile durations from 5 ms to 1 min.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// How a reconcile ended: the `result` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReconcileResult {
    /// The objects were applied and the status written.
    Applied,
    /// The spec cannot run: `Degraded` written, nothing created.
    Refused,
    /// The deployment is being deleted, or is gone: nothing to do.
    Skipped,
    /// A request to the API server failed; retried with backoff.
    Error,
}

impl ReconcileResult {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Refused => "refused",
            Self::Skipped => "skipped",
            Self::Error => "error",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// `shardserve_operator_reconciles_total{result}`
    pub reconciles: IntCounterVec,
    /// `shardserve_operator_reconcile_errors_total{error}`
    pub errors: IntCounterVec,
    /// `shardserve_operator_reconcile_duration_seconds{result}`
    pub duration: HistogramVec,
    /// `shardserve_operator_group_restarts_total{reason}`
    pub restarts: IntCounterVec,
    /// `shardserve_operator_leader`
    pub leader: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "shardserve_operator_reconcile_duration_seconds",
                "Time one reconcile of a ModelDeployment took, by result.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["result"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        let leader = IntGauge::new(
            "shardserve_operator_leader",
            "1 while this replica holds the leader Lease (or runs without leader election).",
        )?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            reconciles: counter(
                "shardserve_operator_reconciles_total",
                "Reconciles of ModelDeployments, by result (applied, refused, skipped, error).",
                &["result"],
            )?,
            errors: counter(
                "shardserve_operator_reconcile_errors_total",
                "Reconciles that failed, by the kind of error.",
                &["error"],
            )?,
            restarts: counter(
                "shardserve_operator_group_restarts_total",
                "Groups whose pods were deleted to restart them together, by reason (rank_failed, roll).",
                &["reason"],
            )?,
            duration,
            leader,
            registry,
        })
    }

    /// Counts one reconcile.
    pub fn reconciled(&self, result: ReconcileResult, seconds: f64) {
        self.reconciles.with_label_values(&[result.as_str()]).inc();
        self.duration
            .with_label_values(&[result.as_str()])
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
