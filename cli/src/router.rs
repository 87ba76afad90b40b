//! `shardserve router`: the OpenAI/Ollama/TGI HTTP and gRPC front, over a
//! static list of backends, a file of them that `shardserve up` rewrites, or
//! the ModelDeployments of a Kubernetes cluster, until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use shardserve_router::{
    Backend, BackendTls, Deployment, Discovery, FileDiscovery, KubernetesDiscovery, MAX_BODY_BYTES,
    Readiness, RequestLimits, RouterConfig, StaticDiscovery,
};

use crate::tls_args::{TlsArgs, pair};

/// Where the router learns its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryKind {
    /// The `--backend` list.
    Static,
    /// ModelDeployments and the EndpointSlices of their rank-0 Services, through the Kubernetes API.
    Kubernetes,
    /// A JSON file another process rewrites (`shardserve up` does): `--backends-file`.
    File,
}

#[derive(Args, Debug)]
pub struct RouterArgs {
    /// Address of the HTTP API (OpenAI, Ollama, TGI), /metrics, /healthz, /readyz.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Address of the gRPC API (shardserve.v1.Inference, grpc.health.v1.Health).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Also serve /healthz, /readyz and /metrics alone on this address, in plain HTTP
    /// (probes and Prometheus while --tls-cert puts the API behind TLS).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Where backends come from: the --backend list, or the cluster's ModelDeployments.
    #[arg(long, value_enum, default_value_t = DiscoveryKind::Static)]
    pub discovery: DiscoveryKind,
    /// With --discovery kubernetes: watch this namespace only (default: every namespace).
    #[arg(long)]
    pub namespace: Option<String>,
    /// A backend as MODEL=URL (for example smollm2=http://127.0.0.1:50061); repeat for more.
    /// Needed with --discovery static.
    #[arg(long = "backend", value_name = "MODEL=URL")]
    pub backends: Vec<String>,
    /// With --discovery file: the JSON file of backends, followed as it changes
    /// (`{"models": {"MODEL": ["http://HOST:PORT", ...]}}`).
    #[arg(long, value_name = "PATH")]
    pub backends_file: Option<std::path::PathBuf>,
    /// Accepted API key (Authorization: Bearer KEY); repeat for more. None: no authentication.
    #[arg(long = "api-key", value_name = "KEY", env = "SHARDSERVE_API_KEY")]
    pub api_keys: Vec<String>,
    /// Most requests outstanding per backend; past the total, 429 / RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Seconds between health checks of each backend.
    #[arg(long, default_value_t = 1.0)]
    pub health_interval: f64,
    /// Seconds a request waits for its model to get a ready backend (scaled from
    /// zero, or its workers restarting) before it is answered 503 with Retry-After.
    /// 0 answers at once.
    #[arg(long, default_value_t = 300.0)]
    pub hold_timeout: f64,
    /// Most requests held per model while it has no ready backend; past it, 503.
    #[arg(long, default_value_t = 1024)]
    pub max_held: usize,
    /// Largest request body in bytes; past it, 413 (at most 64 MiB, what workers accept).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client may take to send its request body; past it, 408.
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Seconds a client may take to send its request headers; past it the connection closes.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Most prompt tokens per request; past it, 400 (default: the model's context).
    #[arg(long)]
    pub max_prompt_tokens: Option<u32>,
    /// Most tokens a request may ask to generate, and the limit of those that ask
    /// none; past it, 400 (default: the model's context).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Most requests one API key may have running at once over HTTP; past it, 429.
    #[arg(long)]
    pub max_streams_per_key: Option<usize>,
    /// Seconds a request may take from its arrival to its last token; past it, 504
    /// (or an error event ending a stream). Default: no limit.
    #[arg(long)]
    pub request_timeout: Option<f64>,
    /// TLS on the HTTP and gRPC listeners (HTTP/2 as well as HTTP/1.1 over TLS).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Reach the workers over TLS, their certificates checked against this CA bundle (PEM).
    #[arg(long, value_name = "PEM")]
    pub backend_tls_ca: Option<std::path::PathBuf>,
    /// The router's certificate for workers that require one (mutual TLS); needs
    /// --backend-tls-key and --backend-tls-ca.
    #[arg(long, value_name = "PEM", requires = "backend_tls_ca")]
    pub backend_tls_cert: Option<std::path::PathBuf>,
    /// The private key of --backend-tls-cert.
    #[arg(long, value_name = "PEM", requires = "backend_tls_ca")]
    pub backend_tls_key: Option<std::path::PathBuf>,
    /// The name workers' certificates carry (they are reached by address, which changes).
    #[arg(long, value_name = "NAME", default_value = "shardserve-worker")]
    pub backend_tls_server_name: String,
}

/// `value` seconds of flag `--name`, which must be positive.
fn seconds(name: &str, value: f64) -> Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        bail!("--{name} {value} must be a positive number of seconds");
    }
    Ok(Duration::from_secs_f64(value))
}

/// Groups `MODEL=URL` pairs into deployments; a backend's id is its `host:port`.
fn deployments(specs: &[String]) -> Result<Vec<Deployment>> {
    let mut out: Vec<Deployment> = Vec::new();
    for spec in specs {
        let Some((model, uri)) = spec.split_once('=') else {
            bail!("--backend {spec:?} is not MODEL=URL");
        };
        if model.is_empty() || uri.is_empty() {
            bail!("--backend {spec:?} has an empty model or URL");
        }
        let backend =
            Backend::from_url(uri).map_err(|e| anyhow::anyhow!("--backend {spec:?}: {e}"))?;
        match out.iter_mut().find(|d| d.model == model) {
            Some(d) if d.backends.contains(&backend) => bail!("--backend {spec:?} is given twice"),
            Some(d) => d.backends.push(backend),
            None => out.push(Deployment {
                model: model.to_string(),
                backends: vec![backend],
                adapters: Vec::new(),
            }),
        }
    }
    Ok(out)
}

/// Where the backends come from, as the flags say.
#[derive(Debug)]
enum Source {
    Fixed(Vec<Deployment>),
    Kubernetes,
    File(std::path::PathBuf),
}

/// The backends' source; refuses flags that belong to another kind.
fn discovery_source(args: &RouterArgs) -> Result<Source> {
    let kind = args.discovery;
    if args.namespace.is_some() && kind != DiscoveryKind::Kubernetes {
        bail!("--namespace is for --discovery kubernetes");
    }
    if !args.backends.is_empty() && kind != DiscoveryKind::Static {
        bail!("--backend is for --discovery static");
    }
    if args.backends_file.is_some() && kind != DiscoveryKind::File {
        bail!("--backends-file is for --discovery file");
    }
    match kind {
        DiscoveryKind::Static => {
            if args.backends.is_empty() {
                bail!("--discovery static needs at least one --backend MODEL=URL");
            }
            deployments(&args.backends).map(Source::Fixed)
        }
        DiscoveryKind::Kubernetes => {
            if args.namespace.as_deref().is_some_and(str::is_empty) {
                bail!("--namespace is empty; leave it out to watch every namespace");
            }
            Ok(Source::Kubernetes)
        }
        DiscoveryKind::File => match &args.backends_file {
            Some(path) => Ok(Source::File(path.clone())),
            None => bail!("--discovery file needs --backends-file PATH"),
        },
    }
}

pub fn run(args: RouterArgs) -> Result<()> {
    let source = discovery_source(&args)?;
    if !(args.health_interval.is_finite() && args.health_interval > 0.0) {
        bail!(
            "--health-interval {} must be a positive number of seconds",
            args.health_interval
        );
    }
    let health_interval = Duration::from_secs_f64(args.health_interval);
    if !(args.hold_timeout.is_finite() && args.hold_timeout >= 0.0) {
        bail!(
            "--hold-timeout {} must be zero or a positive number of seconds",
            args.hold_timeout
        );
    }
    if args.max_body_bytes == 0 || args.max_body_bytes > MAX_BODY_BYTES {
        bail!(
            "--max-body-bytes {} must be between 1 and {MAX_BODY_BYTES} (what workers accept)",
            args.max_body_bytes
        );
    }
    let limits = RequestLimits {
        max_body_bytes: args.max_body_bytes,
        body_timeout: seconds("body-timeout", args.body_timeout)?,
        header_timeout: seconds("header-timeout", args.header_timeout)?,
        max_prompt_tokens: args.max_prompt_tokens,
        max_tokens: args.max_tokens,
        max_streams_per_key: args.max_streams_per_key,
        request_timeout: args
            .request_timeout
            .map(|t| seconds("request-timeout", t))
            .transpose()?,
    };
    let config = RouterConfig {
        limits,
        http_addr: args.http_addr,
        grpc_addr: args.grpc_addr,
        metrics_addr: args.metrics_addr,
        api_keys: args.api_keys,
        max_queue_per_backend: args.max_queue.max(1),
        health_interval,
        health_timeout: health_interval.min(Duration::from_millis(500)),
        hold_timeout: Duration::from_secs_f64(args.hold_timeout),
        max_held_per_model: args.max_held,
        // In a cluster, or under `up`, the router stays ready while some models
        // load, restart or are scaled to zero.
        readiness: match args.discovery {
            DiscoveryKind::Static => Readiness::EveryModel,
            DiscoveryKind::Kubernetes | DiscoveryKind::File => Readiness::Discovered,
        },
        tls: args.tls.files(),
        backend_tls: match &args.backend_tls_ca {
            Some(ca) => Some(BackendTls {
                ca: ca.clone(),
                certificate: pair(
                    "backend-tls-cert",
                    &args.backend_tls_cert,
                    "backend-tls-key",
                    &args.backend_tls_key,
                )?,
                server_name: args.backend_tls_server_name.clone(),
            }),
            None => None,
        },
        ..RouterConfig::default()
    };
    if let Source::Fixed(fixed) = &source {
        for d in fixed {
            tracing::info!(model = %d.model, backends = d.backends.len(), "deployment");
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let discovery: Arc<dyn Discovery> = match source {
            Source::Fixed(deployments) => Arc::new(StaticDiscovery::new(deployments)),
            Source::Kubernetes => {
                Arc::new(KubernetesDiscovery::connect(args.namespace.as_deref()).await?)
            }
            Source::File(path) => Arc::new(FileDiscovery::open(&path)?),
        };
        shardserve_router::serve(config, discovery, shutdown_signal())
            .await
            .context("router failed")
    })
}

/// Ctrl-C or SIGTERM (what `shardserve up` and Kubernetes send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_group_by_model() {
        let specs = [
            "a=http://127.0.0.1:1".to_string(),
            "b=http://127.0.0.1:2".to_string(),
            "a=http://127.0.0.1:3".to_string(),
        ];
        let d = deployments(&specs).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].model, "a");
        assert_eq!(d[0].backends.len(), 2);
        assert_eq!(d[0].backends[1].id, "127.0.0.1:3");
    }

    fn args(extra: &[&str]) -> RouterArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            router: RouterArgs,
        }
        let argv = std::iter::once("router").chain(extra.iter().copied());
        Cli::try_parse_from(argv).unwrap().router
    }

    #[test]
    fn the_charts_kubernetes_flags_parse() {
        let a = args(&[
            "--http-addr=0.0.0.0:8080",
            "--grpc-addr=0.0.0.0:50051",
            "--max-queue=64",
            "--health-interval=1",
            "--discovery=kubernetes",
            "--namespace=ml",
        ]);
        assert_eq!(a.discovery, DiscoveryKind::Kubernetes);
        assert_eq!(a.namespace.as_deref(), Some("ml"));
        assert!(matches!(discovery_source(&a), Ok(Source::Kubernetes)));
        assert!(matches!(
            discovery_source(&args(&["--discovery=kubernetes"])),
            Ok(Source::Kubernetes)
        ));
    }

    #[test]
    fn discovery_flags_of_the_other_kind_are_refused() {
        let refused = |flags: &[&str]| discovery_source(&args(flags)).is_err();
        assert!(refused(&[]));
        assert!(refused(&["--namespace=ml", "--backend=m=http://x:1"]));
        assert!(refused(&[
            "--discovery=kubernetes",
            "--backend=m=http://x:1"
        ]));
        assert!(refused(&["--discovery=kubernetes", "--namespace="]));
        assert!(refused(&["--discovery=file"]));
        assert!(refused(&[
            "--backends-file=b.json",
            "--backend=m=http://x:1"
        ]));
        match discovery_source(&args(&["--backend=m=http://x:1"])).unwrap() {
            Source::Fixed(fixed) => assert_eq!(fixed[0].model, "m"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            discovery_source(&args(&["--discovery=file", "--backends-file=b.json"])),
            Ok(Source::File(_))
        ));
    }

    #[test]
    fn bad_backend_specs_are_refused() {
        for bad in ["nomodel", "=http://x:1", "m=", "m=127.0.0.1:1"] {
            assert!(deployments(&[bad.to_string()]).is_err(), "{bad}");
        }
        let twice = ["m=http://x:1".to_string(), "m=http://x:1".to_string()];
        assert!(deployments(&twice).is_err());
    }
}
