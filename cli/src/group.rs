//! Tensor-parallel groups from the command line: a rank process joins its
//! group (`worker --tensor N --rank R --coordinator HOST:PORT`), and the
//! single-process commands (`generate`, `bench`) start N local rank
//! processes over TCP — the same code path as workers on a cluster.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use shardserve_worker::comm::{CommBackend, CommConfig, Deferred, RankId, SingleRank};
use shardserve_worker::device::{Compute, DeviceSpec};
use shardserve_worker::engine::{Engine, EngineOptions};

/// How this process takes part in a tensor-parallel group.
#[derive(Args, Clone, Debug)]
pub struct GroupArgs {
    /// Tensor-parallel size: ranks that share the model.
    #[arg(long, default_value_t = 1)]
    pub tensor: usize,
    /// This process's rank (0 is the leader that serves requests).
    #[arg(long, default_value_t = 0)]
    pub rank: usize,
    /// Rank 0's rendezvous address, `HOST:PORT` (rank 0 listens there).
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Seconds a collective may wait for a peer before the group is declared broken.
    #[arg(long, default_value_t = 10)]
    pub comm_timeout: u64,
    /// Seconds the ranks wait for each other to finish loading and meet.
    #[arg(long, default_value_t = 1800)]
    pub rendezvous_timeout: u64,
    /// Where this rank computes: `cpu`, or an NVIDIA GPU, `cuda:N` (GPU N) or `cuda`
    /// (rank R of a machine takes its R-th visible GPU); GPUs need a CUDA build.
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    pub device: DeviceSpec,
    /// How the ranks exchange activations: `auto` (NCCL on device buffers when the
    /// ranks compute on GPUs, TCP otherwise), `tcp`, or `nccl`. Ranks sharing one GPU
    /// need `tcp` (NCCL allows one rank per GPU).
    #[arg(long, value_enum, default_value_t = CollectiveChoice::Auto)]
    pub collective: CollectiveChoice,
}

/// `--collective`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollectiveChoice {
    Auto,
    Tcp,
    Nccl,
}

impl GroupArgs {
    /// Loads this rank's shard, then meets the other ranks: every rank loads
    /// first, so the slowest load never trips a collective's timeout.
    pub fn load(&self, model: &Path, options: &EngineOptions) -> Result<Engine> {
        let device = self.device.open(self.rank)?;
        let nccl = match (self.collective, self.device.ordinal(self.rank)) {
            (CollectiveChoice::Tcp, _) => None,
            (CollectiveChoice::Auto | CollectiveChoice::Nccl, Some(gpu)) => Some(gpu),
            (CollectiveChoice::Auto, None) => None,
            (CollectiveChoice::Nccl, None) => bail!("--collective nccl needs --device cuda"),
        };
        if self.tensor <= 1 {
            return Engine::load_rank(model, options, Arc::new(SingleRank), device.clone())
                .with_context(|| format!("loading {} ({})", model.display(), self.device));
        }
        let coordinator = self
            .coordinator
            .clone()
            .context("--tensor above 1 needs --coordinator HOST:PORT (rank 0's address)")?;
        let member = Arc::new(Deferred::new(RankId(self.rank), self.tensor));
        let mut engine = Engine::load_rank(model, options, member.clone(), device.clone())
            .with_context(|| {
                format!("loading rank {}'s shard of {}", self.rank, model.display())
            })?;
        let mut config = CommConfig::tcp(RankId(self.rank), self.tensor, coordinator);
        config.timeout = Duration::from_secs(self.comm_timeout);
        config.connect_timeout = Duration::from_secs(self.rendezvous_timeout);
        if let (Some(gpu), Compute::Device(device)) = (nccl, &device) {
            // NCCL reduces the model's device buffers on its compute stream.
            config.backend = CommBackend::Nccl { device: gpu };
            config.device = Some(device.clone());
        }
        member.connect(&config).with_context(|| {
            format!(
                "rank {} of {} joining its group at {}",
                self.rank, self.tensor, config.coordinator
            )
        })?;
        engine
            .agree_on_kv_cache()
            .context("agreeing on the KV cache size with the group")?;
        Ok(engine)
    }
}

/// The follower processes of a local group; killed when dropped.
pub struct LocalRanks {
    children: Vec<Child>,
}

impl Drop for LocalRanks {
    fn drop(&mut self) {
        for child in &mut self.children {
            // Followers exit by themselves when the leader stops; this covers errors.
            if matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(200));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// Rank 0's engine with its local follower processes. Fields drop in order:
/// the engine first (it tells the followers to stop), then the followers.
pub struct LocalEngine {
    engine: Engine,
    _ranks: LocalRanks,
}

impl std::ops::Deref for LocalEngine {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        &self.engine
    }
}

impl std::ops::DerefMut for LocalEngine {
    fn deref_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }
}

/// Loads `model` as rank 0 of a local group of `tensor` ranks (the others
/// are child processes of this one) — or alone when `tensor` is 1 — on
/// `device` (bare `cuda`: rank R on GPU R).
pub fn load_local(
    model: &Path,
    options: &EngineOptions,
    tensor: usize,
    threads: usize,
    device: DeviceSpec,
) -> Result<LocalEngine> {
    let mut ranks = LocalRanks {
        children: Vec::new(),
    };
    let mut group = GroupArgs {
        tensor: tensor.max(1),
        rank: 0,
        coordinator: None,
        comm_timeout: 10,
        rendezvous_timeout: 600,
        device,
        // Ranks named onto one GPU (`cuda:N`) cannot be NCCL peers.
        collective: if matches!(device, DeviceSpec::Cuda(Some(_))) {
            CollectiveChoice::Tcp
        } else {
            CollectiveChoice::Auto
        },
    };
    if tensor > 1 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let coordinator = format!("127.0.0.1:{port}");
        let exe = std::env::current_exe().context("finding the shardserve binary")?;
        let per_rank = (threads / tensor).max(1);
        for rank in 1..tensor {
            let child = Command::new(&exe)
                .args(["worker", "--model"])
                .arg(model)
                .args(["--tensor", &tensor.to_string(), "--rank", &rank.to_string()])
                .args([
                    "--coordinator",
                    &coordinator,
                    "--threads",
                    &per_rank.to_string(),
                    "--device",
                    &device.for_local_rank(rank).to_string(),
                ])
                .args(["--collective", collective_name(group.collective)])
                .stdin(Stdio::null())
                .spawn()
                .with_context(|| format!("starting rank {rank}"))?;
            ranks.children.push(child);
        }
        group.coordinator = Some(coordinator);
    }
    let engine = group.load(model, options)?;
    Ok(LocalEngine {
        engine,
        _ranks: ranks,
    })
}

fn collective_name(c: CollectiveChoice) -> &'static str {
    match c {
        CollectiveChoice::Auto => "auto",
        CollectiveChoice::Tcp => "tcp",
        CollectiveChoice::Nccl => "nccl",
    }
}

/// A follower rank's whole life: load its shard, meet the group (then call
/// `joined`), run the leader's steps.
pub fn follow(
    model: &Path,
    options: &EngineOptions,
    group: &GroupArgs,
    joined: impl FnOnce(),
) -> Result<()> {
    if group.rank == 0 || group.rank >= group.tensor {
        bail!(
            "rank {} cannot follow in a group of {}",
            group.rank,
            group.tensor
        );
    }
    let engine = group.load(model, options)?;
    joined();
    tracing::info!(
        rank = group.rank,
        tensor = group.tensor,
        "shard loaded; following the leader"
    );
    engine.follow().context("the tensor-parallel group broke")
}
