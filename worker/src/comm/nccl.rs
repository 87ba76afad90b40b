//! The NCCL backend (cargo feature `nccl`): all-reduce on CUDA devices
//! through cudarc's NCCL bindings, loaded at run time.
//!
//! The ranks first join a TCP group (the same rendezvous as the `tcp`
//! backend); rank 0 creates the NCCL unique id and broadcasts it over that
//! group. All-reduce, the per-layer hot path, runs in NCCL; all-gather,
//! broadcast and barrier are host-side control traffic and use the TCP
//! group. In `cuda` builds the communicator runs on the stream of the rank's
//! candle device ([`CommConfig::device`]) and `all_reduce_tensor` reduces the
//! device buffers the model holds, on that stream, with no host copy; host
//! slices (the `Collective` trait's other calls) are staged through device memory.
//!
//! cudarc panics when `libcuda` or `libnccl` is missing, so [`probe`] checks
//! for them (and for a device) before anything else touches cudarc. In `cuda`
//! builds candle's backend links them instead of loading them at run time.

use std::sync::Mutex;

use cudarc::driver::{CudaContext, DeviceRepr};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};

use super::tcp::TcpGroup;
use super::{Collective, CommConfig, CommError, HostSlice, HostSliceMut, HostVec, RankId};

/// Whether NCCL can run here: the CUDA driver, NCCL and a device.
pub(crate) fn probe() -> Result<(), CommError> {
    libraries_present()?;
    match CudaContext::device_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => Err(CommError::Unavailable("no CUDA device visible".into())),
        Err(e) => Err(CommError::Unavailable(format!(
            "the CUDA driver failed: {e}"
        ))),
    }
}

/// Whether libcuda and libnccl can be loaded. A `cuda` build links them (candle's CUDA
/// backend makes cudarc link rather than load), so a running process has them.
fn libraries_present() -> Result<(), CommError> {
    #[cfg(not(feature = "cuda"))]
    {
        // SAFETY: these only try to open the shared libraries by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CommError::Unavailable(
                "no CUDA driver (libcuda.so.1) on this machine".into(),
            ));
        }
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(CommError::Unavailable(
                "no NCCL library (libnccl.so.2) on this machine".into(),
            ));
        }
    }
    Ok(())
}

/// The NCCL communicator. NCCL allows a communicator to be used from any
/// thread as long as calls are serialised, which the mutex around it does.
struct SendComm(Comm);
// SAFETY: see above; cudarc leaves `Comm` !Send only because it holds a raw
// pointer.
unsafe impl Send for SendComm {}

/// One rank of an NCCL group.
pub(crate) struct NcclGroup {
    /// Host-side control traffic (TCP, or nothing for a group of one).
    control: Box<dyn Collective>,
    device: usize,
    comm: Mutex<SendComm>,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclGroup")
            .field("rank", &self.control.rank())
            .field("world", &self.control.world_size())
            .field("device", &self.device)
            .finish()
    }
}

fn cuda_err(op: &'static str, rank: RankId, e: impl std::fmt::Debug) -> CommError {
    CommError::Protocol {
        rank,
        op,
        detail: format!("CUDA/NCCL error: {e:?}"),
    }
}

impl NcclGroup {
    pub(crate) fn connect(cfg: &CommConfig, device: usize) -> Result<Self, CommError> {
        probe()?;
        let rank = cfg.rank;
        let control: Box<dyn Collective> = if cfg.world_size == 1 {
            Box::new(super::SingleRank)
        } else {
            Box::new(TcpGroup::connect(cfg)?)
        };
        let id = if rank.0 == 0 {
            let id = Id::new().map_err(|e| cuda_err("nccl id", rank, e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let id = control.broadcast_bytes(id)?;
        let mut raw = [0 as std::ffi::c_char; 128];
        if id.len() != raw.len() {
            return Err(CommError::Protocol {
                rank: RankId(0),
                op: "nccl id",
                detail: format!("{} bytes instead of 128", id.len()),
            });
        }
        for (r, b) in raw.iter_mut().zip(&id) {
            *r = *b as std::ffi::c_char;
        }
        let stream = match compute_stream(cfg) {
            Some(stream) => stream,
            None => CudaContext::new(device)
                .map_err(|e| cuda_err("cuda init", rank, e))?
                .default_stream(),
        };
        let comm = Comm::from_rank(stream, rank.0, cfg.world_size, Id::uninit(raw))
            .map_err(|e| cuda_err("nccl init", rank, e))?;
        Ok(Self {
            control,
            device,
            comm: Mutex::new(SendComm(comm)),
        })
    }

    fn reduce<T: NcclType + DeviceRepr>(&self, data: &mut [T]) -> Result<(), CommError> {
        let rank = self.control.rank();
        let err = |e: &dyn std::fmt::Debug| cuda_err("all_reduce", rank, format!("{e:?}"));
        let comm = self
            .comm
            .lock()
            .map_err(|_| CommError::Broken("an NCCL call panicked".into()))?;
        let stream = comm.0.stream();
        let mut buf = stream.clone_htod(&*data).map_err(|e| err(&e))?;
        comm.0
            .all_reduce_in_place(&mut buf, &ReduceOp::Sum)
            .map_err(|e| err(&e))?;
        stream.memcpy_dtoh(&buf, data).map_err(|e| err(&e))?;
        stream.synchronize().map_err(|e| err(&e))
    }
}

/// The stream of the candle device the model computes on, so that collectives queue
/// behind the products that feed them (`cuda` builds with a CUDA device configured).
#[cfg(feature = "cuda")]
fn compute_stream(cfg: &CommConfig) -> Option<std::sync::Arc<cudarc::driver::CudaStream>> {
    let device = cfg.device.as_ref()?.as_cuda_device().ok()?;
    Some(device.cuda_stream())
}

#[cfg(not(feature = "cuda"))]
fn compute_stream(_: &CommConfig) -> Option<std::sync::Arc<cudarc::driver::CudaStream>> {
    None
}

/// All-reduce of a CUDA tensor as a candle op: NCCL sums the tensor's buffer into a
/// new one on the communicator's stream (the compute stream).
#[cfg(feature = "cuda")]
struct DeviceAllReduce<'a> {
    comm: &'a Comm,
}

#[cfg(feature = "cuda")]
impl candle_core::CustomOp1 for DeviceAllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("nccl-all-reduce: the tensor is not on a GPU")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("nccl-all-reduce: the tensor must be contiguous");
        };
        let src = s.as_cuda_slice::<f32>()?.slice(start..end);
        let mut dst = s.device.alloc_zeros::<f32>(end - start)?;
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(dst, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

impl Collective for NcclGroup {
    #[cfg(feature = "cuda")]
    fn all_reduce_tensor(&self, t: &candle_core::Tensor) -> Result<candle_core::Tensor, CommError> {
        if !t.device().is_cuda() {
            return super::host_all_reduce(self, t);
        }
        let rank = self.control.rank();
        let comm = self
            .comm
            .lock()
            .map_err(|_| CommError::Broken("an NCCL call panicked".into()))?;
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.contiguous())
            .and_then(|t| t.apply_op1_no_bwd(&DeviceAllReduce { comm: &comm.0 }))
            .map_err(|e| cuda_err("all_reduce", rank, e))
    }
    fn rank(&self) -> RankId {
        self.control.rank()
    }
    fn world_size(&self) -> usize {
        self.control.world_size()
    }
    fn all_reduce(&self, data: HostSliceMut<'_>) -> Result<(), CommError> {
        match data {
            HostSliceMut::F32(d) => self.reduce(d),
            HostSliceMut::F64(d) => self.reduce(d),
            HostSliceMut::F16(d) => self.reduce(d),
            HostSliceMut::BF16(d) => self.reduce(d),
        }
    }
    fn all_gather_host(&self, data: HostSlice<'_>) -> Result<HostVec, CommError> {
        self.control.all_gather_host(data)
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CommError> {
        self.control.broadcast_bytes(bytes)
    }
    fn barrier(&self) -> Result<(), CommError> {
        self.control.barrier()
    }
}
