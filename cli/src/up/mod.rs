//! `shardserve up`: runs ModelDeployment manifests on this machine, as a
//! launcher. It reads and checks every manifest, resolves each model source
//! to a local file, starts one worker process per replica and waits until
//! each reports SERVING over gRPC health, then starts the router in front
//! and waits for its `/readyz`. It stays in the foreground: Ctrl-C (or
//! SIGTERM) stops every child, and a child that dies stops all the others
//! and makes `up` fail, naming that child.

mod plan;
mod supervisor;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use shardserve_operator::{ModelDeployment, ModelSource, parse_manifests};
use tokio::signal::unix::{SignalKind, signal};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::model;
use plan::{Resolved, WorkerPlan};
use supervisor::Supervisor;

/// How long children get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the supervisor looks at its children.
const POLL: Duration = Duration::from_millis(200);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// ModelDeployment manifests (YAML; several documents per file allowed).
    #[arg(default_value = "examples/smollm2.yaml")]
    pub manifests: Vec<PathBuf>,
    /// Where the router serves HTTP (OpenAI, Ollama and TGI APIs, /metrics).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// Where the router serves gRPC (shardserve.v1.Inference).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,
    /// Compute threads per worker (default: the cores split evenly between workers).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Start only the workers, no router (their gRPC addresses are printed).
    #[arg(long)]
    pub no_router: bool,
    /// Give up when a child is not healthy after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub ready_timeout: u64,
    /// Model cache directory.
    #[arg(long, env = "SHARDSERVE_CACHE")]
    pub cache: Option<PathBuf>,
}

pub fn run(args: UpArgs) -> Result<()> {
    let manifests = read_manifests(&args.manifests)?;
    plan::check_local(&manifests)?;
    let cache = model::cache_dir(args.cache.clone())?;
    let mut resolved = Vec::new();
    for ((file, md), path) in manifests.into_iter().zip(&args.manifests) {
        let base = path.parent().unwrap_or(Path::new("."));
        // Validation parsed it already; parse again for the typed form.
        let source = ModelSource::parse(&md.spec.model.source)
            .with_context(|| format!("{file}: spec.model.source"))?;
        let model_path = model::resolve(&source, base, &cache)
            .with_context(|| format!("{file}: spec.model.source"))?;
        resolved.push(Resolved {
            deployment: md,
            model_path,
        });
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = plan::plan_workers(&resolved, cores, args.threads);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Children are started from this (the main) thread: PR_SET_PDEATHSIG
    // follows the thread that forked them.
    runtime.block_on(supervise(&args, &workers))
}

/// Reads every manifest file; one (file, deployment) per document.
fn read_manifests(files: &[PathBuf]) -> Result<Vec<(String, ModelDeployment)>> {
    let mut out = Vec::new();
    for path in files {
        let file = path.display().to_string();
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading manifest {file}"))?;
        let mds = parse_manifests(&text).map_err(|e| anyhow!("{file}: {e}"))?;
        if mds.len() > 1 {
            // One path per manifest keeps relative file:// sources simple.
            bail!(
                "{file}: holds {} documents; `up` takes one ModelDeployment per file",
                mds.len()
            );
        }
        out.extend(mds.into_iter().map(|md| (file.clone(), md)));
    }
    Ok(out)
}

/// A worker once started.
struct Started {
    plan: WorkerPlan,
    grpc: SocketAddr,
    metrics: SocketAddr,
}

async fn supervise(args: &UpArgs, workers: &[WorkerPlan]) -> Result<()> {
    let bars = MultiProgress::new();
    let mut sup = Supervisor::new(bars.clone());
    let mut interrupt = Interrupt::new()?;
    let outcome = {
        let startup = start_all(args, workers, &mut sup, &bars);
        tokio::select! {
            started = startup => Ok(started),
            signal = interrupt.recv() => Err(signal),
        }
    };
    let started = match outcome {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => {
            sup.stop_all(STOP_GRACE);
            return Err(e);
        }
        Err(signal) => {
            eprintln!("{signal}: stopping");
            sup.stop_all(STOP_GRACE);
            return Ok(());
        }
    };
    print_ready(args, &started);
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            signal = interrupt.recv() => {
                eprintln!("{signal}: stopping every child");
                sup.stop_all(STOP_GRACE);
                eprintln!("stopped");
                return Ok(());
            }
            _ = tick.tick() => {
                if let Some(exited) = sup.poll_exited() {
                    eprintln!("{exited}; stopping the others");
                    sup.stop_all(STOP_GRACE);
                    bail!("{exited}");
                }
            }
        }
    }
}

async fn start_all(
    args: &UpArgs,
    workers: &[WorkerPlan],
    sup: &mut Supervisor,
    bars: &MultiProgress,
) -> Result<Vec<Started>> {
    let exe = std::env::current_exe().context("finding the shardserve binary")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout);
    let mut started = Vec::new();
    let mut waiting = Vec::new();
    for plan in workers {
        let grpc = free_port()?;
        let metrics = free_port()?;
        let mut cmd = Command::new(&exe);
        cmd.arg("worker")
            .arg("--model")
            .arg(&plan.model_path)
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--served-model-name")
            .arg(&plan.model)
            .arg("--threads")
            .arg(plan.threads.to_string());
        if let Some(n) = plan.max_seq_len {
            cmd.arg("--max-seq-len").arg(n.to_string());
        }
        if let Some(n) = plan.max_num_seqs {
            cmd.arg("--max-num-seqs").arg(n.to_string());
        }
        let name = format!("worker {}", plan.name);
        if plan.tensor > 1 {
            // Rank 0 serves; ranks 1.. follow it, meeting at its coordinator port.
            let coordinator = free_port()?.to_string();
            cmd.args([
                "--tensor",
                &plan.tensor.to_string(),
                "--rank",
                "0",
                "--coordinator",
                &coordinator,
            ]);
            for rank in 1..plan.tensor {
                let mut follower = Command::new(&exe);
                follower
                    .arg("worker")
                    .arg("--model")
                    .arg(&plan.model_path)
                    .args([
                        "--tensor",
                        &plan.tensor.to_string(),
                        "--rank",
                        &rank.to_string(),
                    ])
                    .args([
                        "--coordinator",
                        &coordinator,
                        "--threads",
                        &plan.threads.to_string(),
                    ]);
                if let Some(n) = plan.max_seq_len {
                    follower.arg("--max-seq-len").arg(n.to_string());
                }
                sup.spawn(&format!("{name} rank {rank}"), follower)?;
            }
        }
        let pid = sup.spawn(&name, cmd)?;
        let bar = spinner(
            bars,
            format!("{name} (pid {pid}): loading {}", plan.model_path.display()),
        );
        waiting.push((name, bar));
        started.push(Started {
            plan: plan.clone(),
            grpc,
            metrics,
        });
    }
    // The workers load in parallel; wait for each in turn.
    for ((name, bar), s) in waiting.into_iter().zip(&started) {
        let uri = format!("http://{}", s.grpc);
        wait_for(sup, deadline, &name, || worker_serving(uri.clone())).await?;
        bar.finish_with_message(format!("{name}: serving on {}", s.grpc));
    }
    if !args.no_router {
        let mut cmd = Command::new(&exe);
        cmd.arg("router")
            .arg("--http-addr")
            .arg(args.http_addr.to_string())
            .arg("--grpc-addr")
            .arg(args.grpc_addr.to_string());
        for s in &started {
            cmd.arg("--backend")
                .arg(format!("{}=http://{}", s.plan.model, s.grpc));
        }
        let pid = sup.spawn("router", cmd)?;
        let bar = spinner(bars, format!("router (pid {pid}): waiting for /readyz"));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building an HTTP client")?;
        let url = format!("http://{}/readyz", args.http_addr);
        wait_for(sup, deadline, "router", || router_ready(&client, &url)).await?;
        bar.finish_with_message(format!("router: serving on {}", args.http_addr));
    }
    bars.clear().ok();
    Ok(started)
}

/// Polls `check` until it says ready, failing when a child dies meanwhile
/// or `deadline` passes.
async fn wait_for<F, Fut>(
    sup: &mut Supervisor,
    deadline: tokio::time::Instant,
    name: &str,
    mut check: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        if let Some(exited) = sup.poll_exited() {
            bail!("{exited} before it was ready");
        }
        if check().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("{name} was not ready in time (--ready-timeout)");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn worker_serving(uri: String) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(uri) else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    reply.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
}

async fn router_ready(client: &reqwest::Client, url: &str) -> bool {
    client
        .get(url)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

fn spinner(bars: &MultiProgress, message: String) -> ProgressBar {
    let bar = bars.add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A port nobody listens on now (the child binds it moments later).
fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

fn print_ready(args: &UpArgs, started: &[Started]) {
    println!();
    for s in started {
        println!(
            "worker {:<16} model {:<16} gRPC {}  metrics http://{}/metrics",
            s.plan.name, s.plan.model, s.grpc, s.metrics
        );
    }
    if args.no_router {
        println!("\nworkers ready (no router). Ctrl-C stops them.");
        return;
    }
    let model = started.first().map_or("MODEL", |s| s.plan.model.as_str());
    let http = args.http_addr;
    println!(
        "\nready:\n  OpenAI API   http://{http}/v1  (chat/completions, completions, models)\n  \
         Ollama API   http://{http}/api\n  gRPC         {}  (shardserve.v1.Inference)\n  \
         metrics      http://{http}/metrics\n\ntry it:\n  curl http://{http}/v1/chat/completions \\\n    \
         -H 'Content-Type: application/json' \\\n    \
         -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'\n\
         or: shardserve chat --url http://{http}\n\nCtrl-C stops everything.",
        args.grpc_addr
    );
}

/// Ctrl-C or SIGTERM, whichever comes first.
struct Interrupt {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Interrupt {
    fn new() -> Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "interrupted (SIGINT)",
            _ = self.term.recv() => "terminated (SIGTERM)",
        }
    }
}
