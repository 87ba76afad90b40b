//! `shardserve worker`: load a model and serve it over gRPC (plus metrics
//! over HTTP when asked) until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use shardserve_worker::engine::{EngineHandle, EngineOptions};
use shardserve_worker::progress::{PEERS_ENV, PodProgress, Progress, Stage, Tally, keep_in_file};
use shardserve_worker::server::ProgressService;

use crate::batching::BatchArgs;
use crate::group::GroupArgs;
use crate::runtime::ThreadArgs;
use crate::tls_args::TlsArgs;

#[derive(Args, Debug)]
pub struct WorkerArgs {
    /// GGUF model file or Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Address to serve /metrics, /healthz and /readyz on over HTTP (off when unset).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Seconds streams may run on after SIGTERM (the ModelDeployment's
    /// drainTimeoutSeconds; its pods' grace period is 30 s more).
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub drain_timeout: u64,
    /// Name clients use for the model (default: the file name without extension).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Longest sequence the engine accepts (default: the model's context).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    /// What the weights are stored as, in the manifest's `model.dtype` names (`q4_1`,
    /// `q8_0`, `q4_k`, `float16`, `bfloat16`, ...): a model stored otherwise is refused
    /// at start-up (weights are served as stored, never converted).
    #[arg(long)]
    pub dtype: Option<String>,
    #[command(flatten)]
    pub batching: BatchArgs,
    #[command(flatten)]
    pub threads: ThreadArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    /// This pod's index in its group (Kubernetes: the StatefulSet pod index):
    /// the rank becomes pod-index × ranks-per-pod + --rank, --rank counting
    /// the ranks within the pod.
    #[arg(long, requires = "ranks_per_pod")]
    pub pod_index: Option<usize>,
    /// Ranks each pod of the group holds (with --pod-index).
    #[arg(long, requires = "pod_index")]
    pub ranks_per_pod: Option<usize>,
    /// Run this pod's (or machine's) K ranks from this process: it is local rank 0 and
    /// starts ranks 1 .. K-1 as child processes with the same arguments, each on its
    /// own GPU under `--device cuda`. One container then holds all of a node's GPUs,
    /// so NCCL sees its peers (NVLink) — the operator's GPU layout. The process exits,
    /// failing the group, when any of its ranks exits.
    #[arg(long, value_name = "K")]
    pub local_ranks: Option<usize>,
    /// Serve gRPC over TLS (the leader, once loaded).
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Require client certificates signed by this CA bundle (PEM): mutual TLS, so only
    /// the router (holding such a certificate) is served. Needs --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve a LoRA adapter next to the base model, as NAME=SOURCE (a PEFT
    /// directory or GGUF LoRA file: a path, `file://`, `hf://` or `pip://`;
    /// repeat the flag for several). More can be loaded at run time through the
    /// Adapters gRPC service (the router's /v1/load_lora_adapter).
    #[arg(long, value_name = "NAME=SOURCE", value_parser = parse_lora)]
    pub lora: Vec<(String, String)>,
    /// Most adapters resident at once (beyond that the least recently used idle
    /// one makes room; one in use is never evicted).
    #[arg(long, default_value_t = shardserve_worker::engine::DEFAULT_MAX_LORAS)]
    pub max_loras: usize,
    /// Highest adapter rank accepted.
    #[arg(long, default_value_t = shardserve_worker::engine::DEFAULT_MAX_LORA_RANK)]
    pub max_lora_rank: usize,
    /// Where `hf://` and `pip://` adapter sources are fetched to.
    #[arg(long, env = "SHARDSERVE_CACHE")]
    pub cache: Option<PathBuf>,
}

fn parse_lora(arg: &str) -> Result<(String, String), String> {
    match arg.split_once('=') {
        Some((name, source)) if !name.is_empty() && !source.is_empty() => {
            Ok((name.to_string(), source.to_string()))
        }
        _ => Err(format!("expected NAME=SOURCE, got '{arg}'")),
    }
}

/// The local path of an adapter source (fetched into `cache` when it is a
/// hub or package source); a bare path is taken as it is.
fn adapter_path(source: &str, cache: Option<&PathBuf>) -> Result<PathBuf> {
    if !source.contains("://") {
        return Ok(PathBuf::from(source));
    }
    let parsed = shardserve_operator::ModelSource::parse(source)
        .map_err(|e| anyhow::anyhow!("LoRA source {source}: {e}"))?;
    let cache = crate::model::cache_dir(cache.cloned())?;
    crate::model::resolve(&parsed, std::path::Path::new("."), &cache)
}

impl WorkerArgs {
    /// The group arguments with the rank made global (see --pod-index).
    pub fn global_group(&self) -> Result<GroupArgs> {
        let mut group = self.group.clone();
        if let (Some(index), Some(per_pod)) = (self.pod_index, self.ranks_per_pod) {
            anyhow::ensure!(
                group.rank < per_pod,
                "--rank {} is not below --ranks-per-pod {per_pod}",
                group.rank
            );
            // Bare `cuda` means the rank's GPU on its machine: fixed before the
            // rank becomes global.
            group.device = group.device.for_local_rank(group.rank);
            group.rank += index * per_pod;
        }
        Ok(group)
    }
}

pub fn run(mut args: WorkerArgs) -> Result<()> {
    // The rank within the pod: its first rank answers the pod's probes.
    let first_in_pod = args.group.rank == 0;
    let load_tally = Arc::new(Tally::default());
    let progress = Progress::new(Stage::Loading, load_tally.clone());
    // The pod's other ranks, whose progress the first rank reports with its own:
    // their folder and how many.
    let mut peers: Option<(PathBuf, usize)> = None;
    let mut _peers_dir = None;
    if let Some(k) = args.local_ranks.filter(|&k| k > 1) {
        anyhow::ensure!(
            first_in_pod,
            "--local-ranks starts local ranks 1..{k} itself; give it to rank 0 only"
        );
        if let Some(per_pod) = args.ranks_per_pod {
            anyhow::ensure!(
                per_pod == k,
                "--local-ranks {k} and --ranks-per-pod {per_pod} disagree"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("shardserve-progress-")
            .tempdir()
            .context("making the folder for the local ranks' progress")?;
        start_local_ranks(k, dir.path())?;
        peers = Some((dir.path().to_path_buf(), k - 1));
        _peers_dir = Some(dir);
    } else if let Some(dir) = std::env::var_os(PEERS_ENV).map(PathBuf::from) {
        if first_in_pod {
            // Ranks in containers of their own (the CPU layout) share the pod's
            // /tmp: their files count from their first write, which comes at once.
            peers = Some((dir, 0));
        } else {
            // A rank the first one reports for: it counts in its file.
            let name = format!("rank-{}", args.group.rank);
            keep_in_file(&dir, &name, progress.clone()).context("starting the progress file")?;
        }
    }
    args.group = args.global_group()?;
    // Certificates are checked before a model loads for minutes.
    let tls = match args.tls.files() {
        Some(files) => {
            let cert = shardserve_tls::Certified::load(files).context("--tls-cert/--tls-key")?;
            let tls = shardserve_tls::ServerTls::new(
                Arc::clone(&cert),
                args.tls_client_ca.as_deref(),
                true,
                Duration::from_secs(10),
            )
            .context("--tls-client-ca")?;
            Some((cert, tls))
        }
        None => None,
    };
    let threads = args.threads.apply()?;
    let mut options = EngineOptions {
        max_seq_len: args.max_seq_len,
        served_model_name: args.served_model_name.clone(),
        weight_dtype: args.dtype.clone(),
        load_tally,
        max_loras: args.max_loras,
        max_lora_rank: args.max_lora_rank,
        ..EngineOptions::default()
    };
    args.batching.apply(&mut options, args.group.device);
    // The first rank of every pod answers gRPC health (NOT_SERVING) and the pod's
    // load progress while its ranks load; a follower's for the process's life, so
    // every pod of a group turns Ready once the group has met.
    let early = first_in_pod
        .then(|| {
            let pod =
                PodProgress::new(progress.clone(), peers.as_ref().map(|(dir, _)| dir.clone()));
            let peer_count = peers.as_ref().map_or(0, |(_, n)| *n);
            EarlyServer::start(args.listen, ProgressService::new(pod, peer_count))
        })
        .transpose()?;
    if args.group.rank > 0 {
        // A follower serves no calls: it runs the leader's steps on its shard.
        let followed = crate::group::follow(&args.model, &options, &args.group, || {
            progress.set_stage(Stage::Loaded);
            if let Some(early) = &early {
                early.set_serving(true);
            }
        });
        if followed.is_err()
            && let Some(early) = &early
        {
            // The group broke: NOT_SERVING for the moment before the process exits.
            early.set_serving(false);
        }
        return followed;
    }
    // Adapter sources are fetched before the model loads for minutes.
    let loras = args
        .lora
        .iter()
        .map(|(name, source)| Ok((name.clone(), adapter_path(source, args.cache.as_ref())?)))
        .collect::<Result<Vec<_>>>()?;
    let mut engine = args.group.load(&args.model, &options)?;
    for (name, path) in &loras {
        engine
            .load_adapter(name, path)
            .with_context(|| format!("--lora {name}={}", path.display()))?;
    }
    progress.set_stage(Stage::Loaded);
    // The port is the engine's from here on: bound before "model loaded" is logged,
    // so whoever waits for that line finds it accepting.
    if let Some(early) = early {
        early.stop();
    }
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("binding {}", args.listen))?;
    listener.set_nonblocking(true)?;
    let info = engine.info().clone();
    tracing::info!(
        model = %info.served_model_name,
        layers = info.config.num_layers,
        max_seq_len = info.max_seq_len,
        max_num_seqs = info.max_num_seqs,
        kv_cache_blocks = info.kv_cache.blocks,
        kv_cache_tokens = info.kv_cache.tokens(),
        kv_cache_mib = info.kv_cache.bytes >> 20,
        threads,
        "model loaded"
    );
    // Adapters loaded at run time (the router's /v1/load_lora_adapter, the operator,
    // `up`) may name hub and package sources too: fetched into the model cache.
    let cache = args.cache.clone();
    let fetch: shardserve_worker::engine::AdapterFetch = Arc::new(move |source: &str| {
        adapter_path(source, cache.as_ref()).map_err(|e| format!("{e:#}"))
    });
    let handle = EngineHandle::spawn(engine)
        .context("starting the engine thread")?
        .with_adapter_fetch(fetch);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let metrics_listener = match args.metrics_addr {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr} for metrics"))?,
            ),
            None => None,
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("listening for SIGTERM")?;
        let engine_gone = handle.clone();
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
                _ = engine_gone.stopped() => {
                    // The group broke (a rank died or stalled): stop serving.
                    let _ = failed_tx.send(());
                }
            }
            tracing::info!("shutting down");
        };
        let drain = std::time::Duration::from_secs(args.drain_timeout);
        // The watch ends with the process.
        let tls = tls.map(|(cert, tls)| {
            cert.watch(Duration::from_secs(10));
            tls
        });
        shardserve_worker::server::serve_with_metrics(
            handle,
            listener,
            metrics_listener,
            tls,
            shutdown,
            drain,
        )
        .await
        .context("gRPC server failed")?;
        if failed_rx.await.is_ok() {
            anyhow::bail!("the tensor-parallel group failed (a rank died or stalled); exiting");
        }
        Ok(())
    })
}

/// Starts local ranks 1..k as children of this process (same arguments, their own
/// `--rank`, no `--local-ranks`), and watches them: when one exits, so does this
/// process, as a pod loses a killed rank, so the group restarts together.
/// Each keeps its progress in a file in `progress_dir`.
fn start_local_ranks(k: usize, progress_dir: &std::path::Path) -> Result<()> {
    use std::os::unix::process::CommandExt;

    let exe = std::env::current_exe().context("finding the shardserve binary")?;
    let args = child_rank_args(std::env::args().skip(1));
    for rank in 1..k {
        let mut command = std::process::Command::new(&exe);
        command
            .args(&args)
            .args(["--rank", &rank.to_string()])
            .env(PEERS_ENV, progress_dir)
            .stdin(std::process::Stdio::null());
        // SAFETY: prctl only sets this child's parent-death signal, between fork
        // and exec: a rank never outlives the process that started it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting local rank {rank}"))?;
        std::thread::Builder::new()
            .name(format!("rank-{rank}-watch"))
            .spawn(move || {
                let status = child.wait();
                tracing::error!(rank, ?status, "a local rank exited; its group fails");
                std::process::exit(1);
            })
            .context("watching a local rank")?;
    }
    Ok(())
}

/// This process's arguments for a child rank: without `--local-ranks` and `--rank`
/// (either form, `--flag value` or `--flag=value`).
pub(crate) fn child_rank_args(args: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        match arg.as_str() {
            "--local-ranks" | "--rank" => skip_value = true,
            a if a.starts_with("--local-ranks=") || a.starts_with("--rank=") => {}
            _ => out.push(arg),
        }
    }
    out
}

/// The server of a rank that does not serve calls (yet): gRPC health and the pod's
/// load progress, on a thread of its own, until [`EarlyServer::stop`] or the end of
/// the process.
pub(crate) struct EarlyServer {
    joined: tokio::sync::watch::Sender<bool>,
    stop: tokio::sync::watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl EarlyServer {
    /// Binds `addr` (an error now if it cannot) and serves NOT_SERVING until
    /// [`EarlyServer::set_serving`].
    pub(crate) fn start(addr: SocketAddr, progress: ProgressService) -> Result<Self> {
        let listener =
            std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        listener.set_nonblocking(true)?;
        let (joined, joined_rx) = tokio::sync::watch::channel(false);
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("early-server".into())
            .spawn(move || {
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|runtime| {
                        runtime.block_on(async {
                            let listener = tokio::net::TcpListener::from_std(listener)?;
                            let mut asked = stopped.clone();
                            let server = shardserve_worker::server::serve_health(
                                listener,
                                joined_rx,
                                progress,
                                async move {
                                    let _ = asked.wait_for(|stop| *stop).await;
                                },
                            );
                            // A client's health Watch would hold a graceful stop open:
                            // a second, then the listener and its calls are dropped.
                            let mut asked = stopped;
                            let deadline = async move {
                                let _ = asked.wait_for(|stop| *stop).await;
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            };
                            tokio::select! {
                                served = server => served?,
                                () = deadline => {}
                            }
                            Ok(())
                        })
                    });
                if let Err(e) = served {
                    tracing::error!(error = %e, "the rank's health and progress server failed");
                }
            })
            .context("starting the rank's health and progress server")?;
        Ok(Self {
            joined,
            stop,
            thread,
        })
    }

    /// SERVING once the group has met; NOT_SERVING again when it breaks.
    fn set_serving(&self, serving: bool) {
        let _ = self.joined.send(serving);
    }

    /// Stops serving and waits until the port is free.
    pub(crate) fn stop(self) {
        let _ = self.stop.send(true);
        if self.thread.join().is_err() {
            tracing::warn!("the rank's health and progress server panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_ranks_get_the_arguments_without_rank_and_local_ranks() {
        let args = [
            "worker",
            "--model",
            "/m",
            "--rank",
            "0",
            "--local-ranks",
            "4",
            "--device",
            "cuda",
            "--ranks-per-pod=4",
            "--rank=0",
            "--local-ranks=4",
            "--tensor",
            "8",
        ]
        .map(String::from);
        assert_eq!(
            child_rank_args(args.into_iter()),
            [
                "worker",
                "--model",
                "/m",
                "--device",
                "cuda",
                "--ranks-per-pod=4",
                "--tensor",
                "8"
            ]
        );
    }
}
