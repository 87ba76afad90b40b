//! The router's configuration (parsed once by the CLI) and its errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use shardserve_tls::CertFiles;

/// Everything the router needs besides its discovery source.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// OpenAI/Ollama/TGI HTTP API, `/metrics`, `/healthz`, `/readyz`.
    pub http_addr: SocketAddr,
    /// gRPC `shardserve.v1.Inference` and `grpc.health.v1.Health`.
    pub grpc_addr: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics` alone, in plain HTTP (for probes and
    /// scrapers when the API listeners speak TLS).
    pub metrics_addr: Option<SocketAddr>,
    /// Accepted bearer keys; empty turns authentication off.
    pub api_keys: Vec<String>,
    /// Most requests outstanding on one backend (running plus queued inside
    /// it); past the sum over healthy backends the router answers 429.
    pub max_queue_per_backend: usize,
    /// How often each backend's `grpc.health.v1.Health/Check` is polled.
    pub health_interval: Duration,
    /// Deadline of one health check and of connecting to a backend.
    pub health_timeout: Duration,
    /// Characters (or token ids) of the prompt hashed for prefix affinity.
    pub affinity_prefix: usize,
    /// Prompt prefixes remembered for affinity (a bounded LRU).
    pub affinity_capacity: usize,
    /// When `/readyz` answers 200.
    pub readiness: Readiness,
    /// How long a request waits for its model to get a routable backend (scaled
    /// from zero, or its groups restarting) before it is answered 503 with
    /// `Retry-After`. Zero answers at once.
    pub hold_timeout: Duration,
    /// Most requests held per model; past it, 503 at once.
    pub max_held_per_model: usize,
    /// What one request may ask and take.
    pub limits: RequestLimits,
    /// TLS on both listeners: the certificate and key, re-read when they change.
    pub tls: Option<CertFiles>,
    /// TLS (and, with a certificate, mutual TLS) to the workers.
    pub backend_tls: Option<BackendTls>,
}

/// How the router reaches workers over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTls {
    /// The CA bundle workers' certificates must chain to.
    pub ca: PathBuf,
    /// The router's own certificate, for workers that require one (mutual TLS).
    pub certificate: Option<CertFiles>,
    /// The name every worker certificate carries (workers are reached by pod
    /// address, which changes).
    pub server_name: String,
}

/// How often certificate files are looked at for a change.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Limits on one request, each a flag of `shardserve router`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Largest request body (413 past it). Workers accept gRPC messages of up to
    /// [`MAX_BODY_BYTES`], so no body the router accepts is refused further on.
    pub max_body_bytes: usize,
    /// How long a client may take to send its body once its headers came (408).
    pub body_timeout: Duration,
    /// How long a client may take to send a request's headers (the connection is
    /// closed past it: a slow client holds no connection for long).
    pub header_timeout: Duration,
    /// Most prompt tokens (400 past it, from the worker, which tokenizes).
    pub max_prompt_tokens: Option<u32>,
    /// Most tokens a request may ask to generate (400 past it); also the limit of
    /// requests that ask none.
    pub max_tokens: Option<u32>,
    /// Most requests one API key may have running at once (429 past it).
    pub max_streams_per_key: Option<usize>,
    /// How long a request may take from its arrival to its last token: 504, or an
    /// error event in a stream, past it.
    pub request_timeout: Option<Duration>,
}

/// The largest request body a router may be told to accept: what a worker's
/// gRPC server decodes (`shardserve_worker::server::MAX_MESSAGE_BYTES`).
pub const MAX_BODY_BYTES: usize = 64 << 20;

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_prompt_tokens: None,
            max_tokens: None,
            max_streams_per_key: None,
            request_timeout: None,
        }
    }
}

/// What `/readyz` waits for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Readiness {
    /// Every discovered model that has backends has a healthy one (and there
    /// is at least one model): what `shardserve up` waits for before it
    /// reports the stack ready. A model scaled to zero does not hold readiness
    /// back: its requests are held until a backend comes.
    #[default]
    EveryModel,
    /// Discovery has listed what exists. A model without a healthy backend
    /// answers 503 on its own, and the others keep being served: in a
    /// cluster, one model that is still loading must not take every router
    /// pod out of its Service.
    Discovered,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_addr: None,
            api_keys: Vec::new(),
            max_queue_per_backend: 64,
            health_interval: Duration::from_secs(1),
            health_timeout: Duration::from_millis(500),
            affinity_prefix: 256,
            affinity_capacity: 4096,
            readiness: Readiness::EveryModel,
            hold_timeout: Duration::from_secs(300),
            max_held_per_model: 1024,
            limits: RequestLimits::default(),
            tls: None,
            backend_tls: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("backend {id} of model {model} has an invalid gRPC URI {uri:?}: {reason}")]
    BackendUri {
        model: String,
        id: String,
        uri: String,
        reason: String,
    },
    #[error("HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("TLS: {0}")]
    Tls(#[from] shardserve_tls::TlsError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(
        "cannot reach the Kubernetes API (in a pod: its service account; outside: KUBECONFIG): {0}"
    )]
    Kubernetes(#[source] kube::Error),
}
