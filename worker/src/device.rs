//! Where a rank computes: `cpu` (the project's own kernels), or an NVIDIA GPU through
//! the device backend on candle's CUDA backend (`cuda`, `cuda:N`), in builds with the
//! `cuda` feature. `candle-cpu` runs that device backend on candle's CPU device: the
//! GPU engine's code path without a GPU, for tests and CI, never for speed.
//!
//! A build without CUDA refuses `cuda` with a message saying so. A `cuda` build links
//! libcuda (candle's CUDA backend has cudarc link its libraries), so it starts only
//! where the NVIDIA driver is; the chart therefore runs it only in worker pods.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device as `--device` names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The device backend on candle's CPU device (test-only: slow).
    CandleCpu,
    /// `cuda:N` names GPU `N`; bare `cuda` lets each rank take its own (see
    /// [`DeviceSpec::ordinal`]).
    Cuda(Option<usize>),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("`{0}` is not a device: expected `cpu`, `cuda`, `cuda:N` or `candle-cpu`")]
    Parse(String),
    #[error(
        "--device {0}: this shardserve was built without CUDA (the `cuda` cargo feature, \
         which needs a CUDA toolkit to build); use --device cpu, or a CUDA build such as \
         the chart's `image.flavor: cuda`"
    )]
    NotBuilt(DeviceSpec),
    #[error("--device {spec}: opening GPU {ordinal}: {source}")]
    Open {
        spec: DeviceSpec,
        ordinal: usize,
        source: candle_core::Error,
    },
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "candle-cpu" => Ok(Self::CandleCpu),
            "cuda" => Ok(Self::Cuda(None)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(|n| Self::Cuda(Some(n)))
                .ok_or_else(|| DeviceError::Parse(s.into())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::CandleCpu => f.write_str("candle-cpu"),
            Self::Cuda(None) => f.write_str("cuda"),
            Self::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// The GPU the rank that is `local_rank`-th on its machine uses: `cuda:N` names it,
    /// bare `cuda` gives rank R the R-th visible GPU. `None` on CPU.
    pub fn ordinal(self, local_rank: usize) -> Option<usize> {
        match self {
            Self::Cpu | Self::CandleCpu => None,
            Self::Cuda(n) => Some(n.unwrap_or(local_rank)),
        }
    }

    /// The same device with bare `cuda` made explicit for the `local_rank`-th rank of a
    /// machine, for a process that will not know its place on the machine.
    pub fn for_local_rank(self, local_rank: usize) -> Self {
        match self {
            Self::Cpu | Self::CandleCpu => self,
            Self::Cuda(_) => Self::Cuda(self.ordinal(local_rank)),
        }
    }

    /// Opens the device of the `local_rank`-th rank of this machine.
    pub fn open(self, local_rank: usize) -> Result<Compute, DeviceError> {
        let ordinal = match self.ordinal(local_rank) {
            Some(ordinal) => ordinal,
            None if self == Self::CandleCpu => return Ok(Compute::Device(Device::Cpu)),
            None => return Ok(Compute::Host),
        };
        if !cfg!(feature = "cuda") {
            return Err(DeviceError::NotBuilt(self));
        }
        let device = Device::new_cuda(ordinal).map_err(|source| DeviceError::Open {
            spec: self,
            ordinal,
            source,
        })?;
        single_stream(&device);
        Ok(Compute::Device(device))
    }
}

/// Turns off cudarc's tracking of each buffer's uses by CUDA events on a new GPU
/// device, before anything is allocated on it. candle gives the device a stream of its
/// own, which puts cudarc in its multi-stream mode: every allocation would then create
/// two events and every kernel argument wait on one and record another, several driver
/// calls per launch for ordering that one stream already gives. A rank runs everything
/// on that stream: candle's ops, the device backend's kernels, uploads, downloads and
/// NCCL's collectives (made on the same stream); frees are stream-ordered.
///
/// It also keeps freed memory in the device's memory pool (release threshold: all of
/// it): the pool's default returns freed memory to the driver at every synchronisation,
/// and a decode step synchronises once (its download), so every step would map its
/// intermediates' memory afresh.
#[cfg(feature = "cuda")]
fn single_stream(device: &Device) {
    if let Ok(cuda) = device.as_cuda_device() {
        // SAFETY: as above, no buffer of this device is used on a second stream, so
        // stream order is the only synchronisation its uses and frees need.
        unsafe { cuda.disable_event_tracking() };
        let ctx = cuda.cuda_stream().context().clone();
        if ctx.has_async_alloc() {
            use cudarc::driver::{result, sys};
            let mut keep = u64::MAX;
            // SAFETY: the device is the context's; the attribute takes a u64.
            let kept = unsafe {
                result::device::get_mem_pool(ctx.cu_device()).and_then(|pool| {
                    result::mem_pool::set_attribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        (&raw mut keep).cast(),
                    )
                })
            };
            if let Err(e) = kept {
                tracing::warn!(error = %e, "the GPU's memory pool releases freed memory at every synchronisation");
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn single_stream(_: &Device) {}

/// Where a rank's model runs, once its device is open.
#[derive(Clone, Debug)]
pub enum Compute {
    /// The CPU kernels on host rows (`--device cpu`).
    Host,
    /// The device backend: candle tensors on this device.
    Device(Device),
}

impl Compute {
    /// Whether this is a GPU (its memory, not the host's, holds weights and cache).
    pub fn is_gpu(&self) -> bool {
        matches!(self, Self::Device(d) if !d.is_cpu())
    }

    /// `(free, total)` bytes of the GPU's memory; `None` off GPUs.
    pub fn gpu_memory(&self) -> Option<(usize, usize)> {
        match self {
            Self::Device(d) if !d.is_cpu() => gpu_memory(d),
            _ => None,
        }
    }
}

#[cfg(feature = "cuda")]
fn gpu_memory(device: &Device) -> Option<(usize, usize)> {
    let cuda = device.as_cuda_device().ok()?;
    cuda.cuda_stream().context().mem_get_info().ok()
}

#[cfg(not(feature = "cuda"))]
fn gpu_memory(_: &Device) -> Option<(usize, usize)> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda", DeviceSpec::Cuda(None)),
            ("cuda:3", DeviceSpec::Cuda(Some(3))),
            ("candle-cpu", DeviceSpec::CandleCpu),
        ] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", ""] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(
                err.to_string()
                    .contains("expected `cpu`, `cuda`, `cuda:N` or `candle-cpu`"),
                "{bad}"
            );
        }
    }

    #[test]
    fn bare_cuda_gives_each_rank_its_own_gpu() {
        assert_eq!(DeviceSpec::Cpu.ordinal(2), None);
        assert_eq!(DeviceSpec::Cuda(None).ordinal(2), Some(2));
        assert_eq!(DeviceSpec::Cuda(Some(5)).ordinal(2), Some(5));
        assert_eq!(
            DeviceSpec::Cuda(None).for_local_rank(1),
            DeviceSpec::Cuda(Some(1))
        );
        assert_eq!(DeviceSpec::Cpu.for_local_rank(1), DeviceSpec::Cpu);
    }

    #[test]
    fn cpu_opens_and_cuda_says_what_is_missing() {
        assert!(matches!(DeviceSpec::Cpu.open(0), Ok(Compute::Host)));
        assert!(matches!(
            DeviceSpec::CandleCpu.open(1),
            Ok(Compute::Device(Device::Cpu))
        ));
        if cfg!(feature = "cuda") {
            return; // a CUDA build runs only where libcuda is: opening may well succeed
        }
        let err = DeviceSpec::Cuda(Some(0)).open(0).unwrap_err().to_string();
        assert!(
            err.starts_with("--device cuda:0: ") && err.contains("built without CUDA"),
            "{err}"
        );
    }
}
