//! Collectives between the ranks of a tensor-parallel group.
//!
//! The model's row-parallel layers call `all_reduce_sum` after their partial
//! products; the leader broadcasts each step's plan with `broadcast_bytes`.
//! Activations travel as host slices of f32, f16 or bf16 ([`HostSliceMut`]);
//! anything else (step plans, ids) travels as bytes. Backends:
//!
//! - [`SingleRank`]: the group of one, no communication at all;
//! - [`LocalGroup`]: ranks as threads of one process (unit tests);
//! - TCP ([`CommBackend::Tcp`]): ranks in processes or hosts, ring
//!   algorithms over persistent connections, rendezvous at rank 0's
//!   coordinator address;
//! - NCCL ([`CommBackend::Nccl`], cargo feature `nccl`): GPUs, the NCCL id
//!   handed out over the TCP rendezvous.
//!
//! [`connect`] is the one place that chooses a backend from a [`CommConfig`].
//! Every backend sums in a fixed order, so all ranks get bit-identical results.

mod element;
mod local;
#[cfg(feature = "nccl")]
mod nccl;
mod tcp;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use element::{DType, HostSlice, HostSliceMut, HostVec};
pub use local::LocalGroup;

/// Position of this process in its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankId(pub usize);

impl std::fmt::Display for RankId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a collective failed: a peer died, stalled or broke the protocol.
/// After any error but `Unavailable`/`Config` the group is unusable (the
/// connections are in an unknown state): the rank should exit.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank} closed its connection during {op}")]
    PeerClosed { rank: RankId, op: &'static str },
    #[error("rank {rank} sent nothing for {after:?} during {op}")]
    Timeout {
        rank: RankId,
        op: &'static str,
        after: Duration,
    },
    #[error("protocol mismatch with rank {rank} during {op}: {detail}")]
    Protocol {
        rank: RankId,
        op: &'static str,
        detail: String,
    },
    #[error("i/o error with rank {rank} during {op}: {source}")]
    Io {
        rank: RankId,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("rendezvous at {addr} failed: {detail}")]
    Rendezvous { addr: String, detail: String },
    /// A caller-side failure around a collective (e.g. encoding a message).
    #[error("collective {op} failed: {reason}")]
    Failed { op: &'static str, reason: String },
    #[error("invalid collective configuration: {0}")]
    Config(String),
    #[error("collective backend unavailable: {0}")]
    Unavailable(String),
    #[error("the group is broken by an earlier error ({0}); the rank must restart")]
    Broken(String),
}

/// Operations every rank of a group calls in the same order.
pub trait Collective: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> RankId;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, in place on every rank. Every rank
    /// gets bit-identical results (a fixed summation order; half types are
    /// rounded after each addition).
    fn all_reduce(&self, data: HostSliceMut<'_>) -> Result<(), CommError>;
    /// Every rank's `data` concatenated in rank order (lengths may differ
    /// between ranks, the dtype may not).
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError>;
    /// Rank 0's `bytes` on every rank (other ranks' input is ignored).
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<(), CommError>;
    /// Time spent in collectives so far, waiting for peers included (for
    /// benchmarks; zero where not measured).
    fn time_spent(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// `all_reduce` of f32 activations (what the row-parallel layers call).
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce(HostSliceMut::F32(data))
    }
    /// The element-wise sum over all ranks of an f32 tensor, as a new tensor on the
    /// same device. This default goes through host memory (what the TCP and
    /// in-process groups need anyway); NCCL reduces device buffers in place.
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, CommError> {
        host_all_reduce(self, t)
    }
    /// `all_gather_host` of f32 data.
    fn all_gather(&self, data: &[f32]) -> Result<Vec<f32>, CommError> {
        match self.all_gather_host(HostSlice::F32(data))? {
            HostVec::F32(v) => Ok(v),
            other => Err(CommError::Protocol {
                rank: self.rank(),
                op: "all_gather",
                detail: format!("asked for f32, got {:?}", other.dtype()),
            }),
        }
    }
}

/// [`Collective::all_reduce_tensor`] through host memory.
pub(crate) fn host_all_reduce<C: Collective + ?Sized>(
    comm: &C,
    t: &candle_core::Tensor,
) -> Result<candle_core::Tensor, CommError> {
    let failed = |e: candle_core::Error| CommError::Failed {
        op: "all_reduce_tensor",
        reason: e.to_string(),
    };
    let mut host = t
        .to_dtype(candle_core::DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(failed)?;
    comm.all_reduce_sum(&mut host)?;
    candle_core::Tensor::from_vec(host, t.shape(), t.device()).map_err(failed)
}

/// Any group, with the time its collectives take added up.
#[derive(Debug)]
pub struct Timed {
    inner: Arc<dyn Collective>,
    nanos: std::sync::atomic::AtomicU64,
}

impl Timed {
    pub fn new(inner: Arc<dyn Collective>) -> Self {
        Self {
            inner,
            nanos: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn timed<R>(&self, op: impl FnOnce(&dyn Collective) -> R) -> R {
        let start = std::time::Instant::now();
        let r = op(self.inner.as_ref());
        let spent = start.elapsed().as_nanos() as u64;
        self.nanos
            .fetch_add(spent, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl Collective for Timed {
    fn rank(&self) -> RankId {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, data: HostSliceMut<'_>) -> Result<(), CommError> {
        self.timed(|c| c.all_reduce(data))
    }
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError> {
        self.timed(|c| c.all_gather_host(data))
    }
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, CommError> {
        self.timed(|c| c.all_reduce_tensor(t))
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        self.timed(|c| c.broadcast_bytes(bytes))
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.timed(|c| c.barrier())
    }
    fn time_spent(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.nanos.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// A group member whose connections are made later: a rank knows its place
/// (and so its shard) before it meets the others, so every rank loads its
/// weights first and the group meets once all are loaded — however long the
/// slowest load takes, no collective times out waiting for it.
#[derive(Debug)]
pub struct Deferred {
    rank: RankId,
    world: usize,
    group: std::sync::OnceLock<Arc<dyn Collective>>,
}

impl Deferred {
    pub fn new(rank: RankId, world: usize) -> Self {
        Self {
            rank,
            world,
            group: std::sync::OnceLock::new(),
        }
    }

    /// Joins the group (once); collectives before this fail with `Config`.
    pub fn connect(&self, config: &CommConfig) -> Result<(), CommError> {
        if config.rank != self.rank || config.world_size != self.world {
            return Err(CommError::Config(format!(
                "deferred rank {} of {} cannot join as rank {} of {}",
                self.rank, self.world, config.rank, config.world_size
            )));
        }
        let group = connect(config)?;
        self.group
            .set(group)
            .map_err(|_| CommError::Config("the group is already connected".into()))
    }

    fn group(&self) -> Result<&dyn Collective, CommError> {
        self.group.get().map(|g| g.as_ref()).ok_or_else(|| {
            CommError::Config(format!("rank {} has not joined its group yet", self.rank))
        })
    }
}

impl Collective for Deferred {
    fn rank(&self) -> RankId {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn all_reduce(&self, data: HostSliceMut<'_>) -> Result<(), CommError> {
        self.group()?.all_reduce(data)
    }
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError> {
        self.group()?.all_gather_host(data)
    }
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, CommError> {
        self.group()?.all_reduce_tensor(t)
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        self.group()?.broadcast_bytes(bytes)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.group()?.barrier()
    }
    fn time_spent(&self) -> std::time::Duration {
        self.group
            .get()
            .map_or(std::time::Duration::ZERO, |g| g.time_spent())
    }
}

/// A group of one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> RankId {
        RankId(0)
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&self, _data: HostSliceMut<'_>) -> Result<(), CommError> {
        Ok(())
    }
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError> {
        Ok(data.to_vec())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        Ok(bytes)
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
}

/// Which transport a rank process uses between the ranks of its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommBackend {
    /// Ring algorithms over TCP: CPU ranks, across processes, pods, hosts.
    Tcp,
    /// NCCL on CUDA device `device` (cargo feature `nccl`); the rendezvous
    /// and the host-side control messages still go over TCP.
    Nccl { device: usize },
}

/// How one rank joins its group. Built once from the CLI and passed down.
#[derive(Clone, Debug)]
pub struct CommConfig {
    pub backend: CommBackend,
    pub rank: RankId,
    pub world_size: usize,
    /// Rank 0 listens here; the others connect here (`HOST:PORT`).
    pub coordinator: String,
    /// Where this rank accepts its ring neighbour. `None`: the local address
    /// of its coordinator connection, any port (reachable by the peers).
    pub listen: Option<SocketAddr>,
    /// The longest any blocking read or write may wait before the peer is
    /// declared dead or stalled.
    pub timeout: Duration,
    /// How long the rendezvous waits for the other ranks to show up.
    pub connect_timeout: Duration,
    /// NCCL: the candle device the model computes on, whose stream the collectives
    /// join (`None`: the GPU's default stream).
    pub device: Option<candle_core::Device>,
}

impl CommConfig {
    /// TCP with the default timeouts (10 s per operation, 120 s to meet).
    pub fn tcp(rank: RankId, world_size: usize, coordinator: impl Into<String>) -> Self {
        Self {
            backend: CommBackend::Tcp,
            rank,
            world_size,
            coordinator: coordinator.into(),
            listen: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(120),
            device: None,
        }
    }
}

/// Joins the group described by `config` (blocks until every rank met).
pub fn connect(config: &CommConfig) -> Result<Arc<dyn Collective>, CommError> {
    if config.world_size == 0 || config.rank.0 >= config.world_size {
        return Err(CommError::Config(format!(
            "rank {} is outside a group of {}",
            config.rank, config.world_size
        )));
    }
    match config.backend {
        CommBackend::Tcp if config.world_size == 1 => Ok(Arc::new(SingleRank)),
        CommBackend::Tcp => Ok(Arc::new(Timed::new(Arc::new(tcp::TcpGroup::connect(
            config,
        )?)))),
        #[cfg(feature = "nccl")]
        CommBackend::Nccl { device } => Ok(Arc::new(nccl::NcclGroup::connect(config, device)?)),
        #[cfg(not(feature = "nccl"))]
        CommBackend::Nccl { .. } => Err(CommError::Unavailable(
            "this binary was built without the `nccl` feature".into(),
        )),
    }
}

/// Whether NCCL can run here: `Err` names what is missing (the driver,
/// NCCL, a device). Checked before cudarc is touched, which panics instead.
pub fn nccl_available() -> Result<(), CommError> {
    #[cfg(feature = "nccl")]
    {
        nccl::probe()
    }
    #[cfg(not(feature = "nccl"))]
    {
        Err(CommError::Unavailable(
            "this binary was built without the `nccl` feature".into(),
        ))
    }
}
