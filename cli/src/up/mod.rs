//! `shardserve up`: runs ModelDeployment manifests on this machine, as a
//! launcher. It reads and checks every manifest (as a cluster would), resolves
//! each model source to a local file, starts each replica group's worker
//! processes and waits until each reports SERVING over gRPC health, then starts
//! the router in front and waits for its `/readyz`. It stays in the foreground
//! and keeps the groups running ([`fleet`]): a crashed group starts again after
//! a backoff while the router routes around it, builtin autoscaling adds and
//! drains groups, and the router follows through a backends file. Ctrl-C (or
//! SIGTERM) stops every child; the router dying or a group crash-looping stops
//! them too and makes `up` fail, saying why.

mod fleet;
mod plan;
mod restart;
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
use fleet::{Fleet, GroupState};
use plan::{DeploymentPlan, Resolved};
use shardserve_operator::autoscale::Timestamp;
use shardserve_operator::load::RouterLoad;
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
        // Adapters are fetched (and checked to exist) before anything starts.
        let mut adapters = Vec::new();
        for (i, adapter) in md.spec.lora_adapters.iter().enumerate() {
            let field = || format!("{file}: spec.loraAdapters[{i}].source");
            let source = ModelSource::parse(&adapter.source).with_context(field)?;
            let path = model::resolve(&source, base, &cache).with_context(field)?;
            adapters.push((adapter.name.clone(), path));
        }
        resolved.push(Resolved {
            deployment: md,
            model_path,
            adapters,
        });
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let deployments = plan::plan_deployments(&resolved, cores, args.threads);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // Children are started from this (the main) thread: PR_SET_PDEATHSIG
    // follows the thread that forked them.
    runtime.block_on(supervise(&args, deployments))
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

/// How often the router's load is read (to scale, and to end drains).
const LOAD_INTERVAL: Duration = Duration::from_secs(1);
/// How often starting groups are asked whether they serve.
const READY_INTERVAL: Duration = Duration::from_secs(1);

async fn supervise(args: &UpArgs, deployments: Vec<DeploymentPlan>) -> Result<()> {
    let bars = MultiProgress::new();
    let mut sup = Supervisor::new(bars.clone());
    let mut interrupt = Interrupt::new()?;
    let exe = std::env::current_exe().context("finding the shardserve binary")?;
    // The router's list of serving groups, rewritten as they come and go.
    let state = tempfile::Builder::new()
        .prefix("shardserve-up-")
        .tempdir()
        .context("creating a folder for the router's backends file")?;
    let ready_timeout = Duration::from_secs(args.ready_timeout);
    let mut fleet = Fleet::new(
        exe.clone(),
        deployments,
        state.path().join("backends.json"),
        ready_timeout,
    );
    let outcome = {
        let startup = start_all(args, &exe, &mut fleet, &mut sup, &bars);
        tokio::select! {
            started = startup => Ok(started),
            signal = interrupt.recv() => Err(signal),
        }
    };
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            sup.stop_all(STOP_GRACE);
            return Err(e);
        }
        Err(signal) => {
            eprintln!("{signal}: stopping");
            sup.stop_all(STOP_GRACE);
            return Ok(());
        }
    }
    print_ready(args, &fleet);
    if args.no_router && fleet.autoscaled() {
        eprintln!("--no-router: no load to scale on; autoscaled deployments keep their groups");
    }
    let result = run_fleet(args, &mut fleet, &mut sup, &mut interrupt).await;
    match &result {
        Ok(()) => eprintln!("stopping every child"),
        Err(e) => eprintln!("{e:#}; stopping the others"),
    }
    sup.stop_all(STOP_GRACE);
    if result.is_ok() {
        eprintln!("stopped");
    }
    result
}

/// Keeps the groups running until a signal (`Ok`) or the router dying or a group
/// crash-looping (`Err`).
async fn run_fleet(
    args: &UpArgs,
    fleet: &mut Fleet,
    sup: &mut Supervisor,
    interrupt: &mut Interrupt,
) -> Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building an HTTP client")?;
    let metrics_url = format!("http://{}/metrics", args.http_addr);
    let mut tick = tokio::time::interval(POLL);
    let mut last_load_read = None::<tokio::time::Instant>;
    let mut last_ready_check = tokio::time::Instant::now();
    let mut load = None::<RouterLoad>;
    loop {
        tokio::select! {
            signal = interrupt.recv() => {
                eprintln!("{signal}");
                return Ok(());
            }
            _ = tick.tick() => {}
        }
        let now = std::time::Instant::now();
        while let Some(exited) = sup.poll_exited() {
            if !fleet.exited(&exited, sup, now)? {
                bail!("{exited}");
            }
        }
        fleet.restart_due(sup, now)?;
        if last_ready_check.elapsed() >= READY_INTERVAL {
            last_ready_check = tokio::time::Instant::now();
            fleet.check_starting(sup, now).await?;
        }
        if !args.no_router
            && fleet.wants_load()
            && last_load_read.is_none_or(|t| t.elapsed() >= LOAD_INTERVAL)
        {
            last_load_read = Some(tokio::time::Instant::now());
            load = router_load(&client, &metrics_url).await;
            if let Some(load) = &load {
                fleet.scale(load, Timestamp::now(), sup, now)?;
            }
        }
        fleet.finish_drains(load.as_ref().filter(|_| !args.no_router), sup, now);
        fleet.write_backends()?;
    }
}

/// The router's load from its `/metrics`; `None` when it does not answer.
async fn router_load(client: &reqwest::Client, url: &str) -> Option<RouterLoad> {
    let response = client.get(url).send().await.ok()?.error_for_status().ok()?;
    Some(RouterLoad::from_metrics(&response.text().await.ok()?))
}

async fn start_all(
    args: &UpArgs,
    exe: &Path,
    fleet: &mut Fleet,
    sup: &mut Supervisor,
    bars: &MultiProgress,
) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout);
    fleet.start_all(sup)?;
    let mut spinners: Vec<ProgressBar> = fleet
        .groups
        .iter()
        .map(|g| {
            spinner(
                bars,
                format!(
                    "worker {} (pid {}): loading {}",
                    g.plan.name,
                    g.pids[0],
                    g.plan.model_path.display()
                ),
            )
        })
        .collect();
    // The groups load in parallel; a child dying now is a broken setup, not a crash
    // to restart.
    loop {
        if let Some(exited) = sup.poll_exited() {
            bail!("{exited} before it was ready");
        }
        fleet.check_starting(sup, std::time::Instant::now()).await?;
        for (g, bar) in fleet.groups.iter().zip(&mut spinners) {
            if matches!(g.state, GroupState::Serving { .. }) && !bar.is_finished() {
                bar.finish_with_message(format!("worker {}: serving on {}", g.plan.name, g.grpc));
            }
        }
        if fleet.all_serving() {
            fleet.started();
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the workers were not ready in time (--ready-timeout)");
        }
        tokio::time::sleep(POLL).await;
    }
    fleet.write_backends()?;
    if !args.no_router {
        let mut cmd = Command::new(exe);
        cmd.arg("router")
            .arg("--http-addr")
            .arg(args.http_addr.to_string())
            .arg("--grpc-addr")
            .arg(args.grpc_addr.to_string())
            .arg("--discovery=file")
            .arg("--backends-file")
            .arg(fleet.backends_file());
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
    Ok(())
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

pub(crate) async fn worker_serving(uri: String) -> bool {
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
pub(crate) fn free_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

fn print_ready(args: &UpArgs, fleet: &Fleet) {
    println!();
    for g in &fleet.groups {
        println!(
            "worker {:<16} model {:<16} gRPC {}  metrics http://{}/metrics",
            g.plan.name, g.plan.model, g.grpc, g.metrics
        );
    }
    for d in fleet.deployments.iter().filter(|d| d.replicas == 0) {
        println!(
            "model {:<16} scaled to zero: its first request starts a group",
            d.template.model
        );
    }
    if args.no_router {
        println!("\nworkers ready (no router). Ctrl-C stops them.");
        return;
    }
    let model = fleet
        .deployments
        .first()
        .map_or("MODEL", |d| d.template.model.as_str());
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
