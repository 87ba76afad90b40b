//! Decode steps recorded and replayed. Every decode step of one shape (its tokens and
//! the width its block tables are padded to) launches the same kernels on inputs of the
//! same sizes, so the device backend keeps that shape's inputs in buffers of their own,
//! records the step's work once as a CUDA graph and replays it for each later step of
//! the shape, the step's inputs copied into the kept buffers first: the host issues one
//! launch a step instead of one per kernel. Opt-in (`SHARDSERVE_CUDA_GRAPHS=1`) until a
//! GPU has measured it; any failure to record turns it off for the process, with a
//! warning, and steps run as before.
//!
//! On candle's CPU device (the tests) a "replay" runs the step's work again over the
//! kept buffers: the same path of inputs, without a graph.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::Tensor;

use super::ops::{self, HostValues};
use super::tensors::{DeviceCache, DeviceStep, StepInputs, StepShape};
use super::{ModelError, StepLayout};
use crate::model::rope::Rope;

/// Shapes kept at once (each holds its buffers and, on a GPU, its graph's memory).
const KEPT: usize = 16;

/// Steps run from a kept shape in this process (every backend's).
static REPLAYED: AtomicUsize = AtomicUsize::new(0);

/// Steps run from a kept shape (replayed, on a GPU) in this process so far.
pub fn replayed_steps() -> usize {
    REPLAYED.load(Ordering::Relaxed)
}

/// The device work of one step: from its inputs to the normed rows whose logits are
/// wanted.
pub type Layers<'l> =
    dyn FnMut(&DeviceStep, &mut DeviceCache) -> Result<Option<Tensor>, ModelError> + 'l;

/// The recorded steps of one backend.
#[derive(Default)]
pub struct Replays {
    kept: Mutex<Vec<Kept>>,
    off: AtomicBool,
    replayed: AtomicUsize,
}

impl std::fmt::Debug for Replays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shapes = self.kept.lock().map(|k| k.len()).unwrap_or(0);
        f.debug_struct("Replays")
            .field("shapes", &shapes)
            .field("off", &self.off.load(Ordering::Relaxed))
            .finish()
    }
}

/// One shape's buffers, the step read from them, and its recording.
struct Kept {
    /// The cache the step wrote and read ([`DeviceCache::id`]).
    cache: u64,
    shape: StepShape,
    ints: Tensor,
    trig: Tensor,
    step: DeviceStep,
    recording: Option<Recording>,
}

/// A recorded step: the graph, and the buffer it leaves the step's output in.
#[cfg(feature = "cuda")]
struct Recording {
    graph: Graph,
    out: Tensor,
}

/// Without the `cuda` feature nothing is recorded: no value of this type exists.
#[cfg(not(feature = "cuda"))]
enum Recording {}

/// cudarc's graph holds raw driver handles and is not `Send`.
#[cfg(feature = "cuda")]
struct Graph(cudarc::driver::CudaGraph);

// SAFETY: a graph is launched and dropped only under the replays' lock, one thread at
// a time; CUDA graphs may be used from any thread when their uses are serialised.
#[cfg(feature = "cuda")]
unsafe impl Send for Graph {}

/// The width block tables are padded to: the next power of two, so that a shape serves
/// sequences as they grow.
fn padded_width(layout: &StepLayout<'_>) -> usize {
    layout
        .spans
        .iter()
        .map(|s| s.blocks.len())
        .max()
        .unwrap_or(1)
        .max(1)
        .next_power_of_two()
}

impl Replays {
    pub fn is_off(&self) -> bool {
        self.off.load(Ordering::Relaxed)
    }

    /// Steps run from a kept shape so far.
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::Relaxed)
    }

    /// Runs `layers` on the step `layout` describes, from this shape's kept buffers:
    /// replayed where the shape was recorded, else run and (on a GPU) recorded.
    pub fn run(
        &self,
        device: &candle_core::Device,
        layout: &StepLayout<'_>,
        rope: &Rope,
        cache: &mut DeviceCache,
        layers: &mut Layers<'_>,
    ) -> Result<Option<Tensor>, ModelError> {
        let inputs = StepInputs::new(layout, rope, cache, Some(padded_width(layout)))?;
        let mut kept = self.kept.lock().map_err(|_| {
            ModelError::from(candle_core::Error::Msg(
                "recorded steps: a step panicked holding them".into(),
            ))
        })?;
        // A recording holds the addresses of the cache (and the model) it was made
        // with: once a step comes with another cache, the old ones are dropped.
        if kept.first().is_some_and(|k| k.cache != cache.id()) {
            kept.clear();
        }
        if let Some(i) = kept.iter().position(|k| k.shape == inputs.shape) {
            let k = &kept[i];
            ops::overwrite(&k.ints, HostValues::U32(&inputs.ints))?;
            ops::overwrite(&k.trig, HostValues::F32(&inputs.trig))?;
            self.replayed.fetch_add(1, Ordering::Relaxed);
            REPLAYED.fetch_add(1, Ordering::Relaxed);
            return match &k.recording {
                Some(r) => r.replay().map(Some),
                None => layers(&k.step, cache),
            };
        }
        let shape = inputs.shape;
        let ints = Tensor::from_vec(inputs.ints, shape.ints_len(), device)?;
        let trig = Tensor::from_vec(inputs.trig, (2, shape.tokens, shape.half), device)?;
        let step = shape.device_step(&ints, &trig)?;
        let out = warm_up(device, &step, cache, layers)?;
        #[cfg(not(feature = "cuda"))]
        let recording: Option<Recording> = None;
        #[cfg(feature = "cuda")]
        let recording = match &out {
            Some(out) if device.is_cuda() => match Recording::new(out, &step, cache, layers) {
                Ok(r) => Some(r),
                Err(e) => {
                    self.off.store(true, Ordering::Relaxed);
                    tracing::warn!(
                        error = %e,
                        "recording a decode step as a CUDA graph failed; steps run eagerly from now on"
                    );
                    return Ok(Some(out.clone()));
                }
            },
            _ => None,
        };
        if kept.len() == KEPT {
            kept.remove(0);
        }
        tracing::debug!(
            tokens = shape.tokens,
            width = shape.width,
            recorded = recording.is_some(),
            "decode step shape kept"
        );
        kept.push(Kept {
            cache: cache.id(),
            shape,
            ints,
            trig,
            step,
            recording,
        });
        Ok(out)
    }
}

/// The first step of a shape, run eagerly; on a GPU with candle's cache of small
/// uploads filling, for the recording that follows.
fn warm_up(
    device: &candle_core::Device,
    step: &DeviceStep,
    cache: &mut DeviceCache,
    layers: &mut Layers<'_>,
) -> Result<Option<Tensor>, ModelError> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(cuda) = device {
        let _cache = cuda.enable_cuda_graph_htod_cache();
        let out = layers(step, cache)?;
        device.synchronize()?;
        return Ok(out);
    }
    let _ = device;
    layers(step, cache)
}

#[cfg(feature = "cuda")]
impl Recording {
    fn new(
        warm: &Tensor,
        step: &DeviceStep,
        cache: &mut DeviceCache,
        layers: &mut Layers<'_>,
    ) -> Result<Self, ModelError> {
        let candle_core::Device::Cuda(cuda) = warm.device() else {
            return Err(candle_core::Error::Msg("recording: not a GPU".into()).into());
        };
        // The buffer the recorded step leaves its output in, outside the graph's memory.
        let out = warm.copy()?;
        let mut failed = None;
        let graph = ops::record(cuda, || {
            let result = layers(step, cache).and_then(|h| match h {
                Some(h) => Ok(out.slice_set(&h, 0, 0)?),
                None => Err(candle_core::Error::Msg("the step wants no rows".into()).into()),
            });
            result.map_err(|e| {
                let msg = e.to_string();
                failed = Some(e);
                candle_core::Error::Msg(msg)
            })
        });
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(Self {
            graph: Graph(graph?),
            out,
        })
    }

    /// Launches the graph; the step's output is left in `out`.
    fn replay(&self) -> Result<Tensor, ModelError> {
        self.graph
            .0
            .launch()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(self.out.clone())
    }
}

#[cfg(not(feature = "cuda"))]
impl Recording {
    fn replay(&self) -> Result<Tensor, ModelError> {
        match *self {}
    }
}
