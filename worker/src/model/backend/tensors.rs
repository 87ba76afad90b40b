//! The device backend: activations, weights and the paged KV cache as candle tensors
//! on one device (an NVIDIA GPU, or candle's CPU device under `--device candle-cpu`,
//! which is how the tests run it). A step uploads its integers (ids, slot mapping,
//! per-token sequence and length, wanted rows, block tables) in one buffer and its
//! rotary angles in another, runs every layer on the device, and downloads only the
//! logits rows it was asked for.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use shardserve_kernels::QuantFormat;

use super::ops::{self, AttendPlan};
use super::profile;
use super::replay::Replays;
use super::{
    AttentionShape, Backend, Downloaded, LoraPair, ModelError, Pick, Picked, StepLayers, StepLayout,
};
use crate::comm::Collective;
use crate::kv::{KvCacheTooLarge, KvShape};
use crate::model::config::RopeStyle;
use crate::model::lora::{self, HostDense};
use crate::model::rope::Rope;
use crate::model::rows::Rows;
use crate::sampling::logprobs_of;
use crate::weights::Weight;

/// Element type of the device KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheDtype {
    #[default]
    F16,
    BF16,
}

impl std::fmt::Display for CacheDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F16 => "float16",
            Self::BF16 => "bfloat16",
        })
    }
}

impl std::str::FromStr for CacheDtype {
    type Err = String;

    /// The names of the CRD's `engine.kvCacheDtype`, and their short forms. FP8 caches
    /// are refused by name, not taken for something else.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "float16" | "f16" | "fp16" | "half" => Ok(Self::F16),
            "bfloat16" | "bf16" => Ok(Self::BF16),
            "fp8" | "fp8_e4m3" | "fp8_e5m2" | "float8" => Err(format!(
                "KV cache type `{s}` is not supported yet (float16 or bfloat16)"
            )),
            _ => Err(format!(
                "`{s}` is not a KV cache type: expected float16 or bfloat16"
            )),
        }
    }
}

impl CacheDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
        }
    }
}

/// Candle tensors on `device`.
#[derive(Clone, Debug)]
pub struct Tensors {
    device: Device,
    cache_dtype: CacheDtype,
    /// On candle's CPU device, multiply the project's block formats with the CPU
    /// engine's kernels ([`DeviceMatrix::Kernels`]).
    cpu_kernels: bool,
    /// Decode steps recorded and replayed ([`super::replay`]).
    replays: Option<std::sync::Arc<Replays>>,
}

impl Tensors {
    /// On a GPU, decode steps are recorded as CUDA graphs and replayed where
    /// `SHARDSERVE_CUDA_GRAPHS=1` asks for it (on candle's CPU device the flag runs them
    /// from kept buffers, [`Tensors::with_replays`]).
    pub fn new(device: Device, cache_dtype: CacheDtype) -> Self {
        let graphs = std::env::var("SHARDSERVE_CUDA_GRAPHS").is_ok_and(|v| v == "1");
        let backend = Self {
            device,
            cache_dtype,
            cpu_kernels: true,
            replays: None,
        };
        if graphs {
            backend.with_replays()
        } else {
            backend
        }
    }

    /// Decode steps from kept buffers, recorded and replayed on a GPU (on candle's CPU
    /// device, run again over the kept buffers: how the tests check that path).
    pub fn with_replays(mut self) -> Self {
        self.replays = Some(Default::default());
        self
    }

    /// Decode steps run from kept buffers (replayed) so far, when they are kept.
    pub fn replayed(&self) -> Option<usize> {
        self.replays.as_ref().map(|r| r.replayed())
    }

    /// The same, with candle's own quantised kernels for every quantised product
    /// (what a GPU runs), on the CPU device too.
    pub fn with_candle_kernels(mut self) -> Self {
        self.cpu_kernels = false;
        self
    }

    /// Adapters computed on the host in f64, as the CPU engine does, where the
    /// base's products are the CPU engine's too.
    fn host_adapters(&self) -> bool {
        self.device.is_cpu() && self.cpu_kernels
    }
}

/// A matrix on the device: quantised (candle's quantised products) or dense; on
/// candle's CPU device, the project's block formats keep the project's kernels.
#[derive(Debug)]
pub enum DeviceMatrix {
    Quant(QMatMul),
    Dense(Tensor),
    /// Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 on candle's CPU device, multiplied by the CPU
    /// engine's kernels: candle's own CPU kernels round the activations differently
    /// (the demo model's best token then differs from the CPU engine's at ~3% of
    /// positions instead of <1%) and are several times slower. GPUs use candle's
    /// quantised CUDA kernels.
    Kernels(Weight),
}

impl DeviceMatrix {
    /// The type of the activations it multiplies: a dense weight's own (a
    /// half-precision product takes half-precision input, so the ops that feed one
    /// write it in that type rather than f32 and a cast launch after them), else f32.
    fn input_dtype(&self) -> DType {
        match self {
            Self::Dense(t) => t.dtype(),
            Self::Quant(_) | Self::Kernels(_) => DType::F32,
        }
    }
}

/// An adapter's matrix on the device, with its host copy for the CPU kernels'
/// path (which computes adapters in f64 as the CPU engine does).
#[derive(Debug)]
pub struct DeviceDense {
    tensor: Tensor,
    host: HostDense,
}

/// A `[m, width]` tensor's rows on the host, as f32.
fn host_rows(t: &Tensor) -> Result<Rows, ModelError> {
    let width = t.dim(1)?;
    Ok(Rows::new(
        t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        width,
    ))
}

fn host_pairs<'a>(
    pairs: &'a [LoraPair<'a, Tensors>],
) -> Vec<(&'a [usize], &'a HostDense, &'a HostDense, f32, usize)> {
    pairs
        .iter()
        .map(|p| (p.rows, &p.a.host, &p.b.host, p.scale, p.offset))
        .collect()
}

/// Every layer's keys and values, `[2, blocks, block_size, kv_heads, head_dim]` a
/// layer (keys, then values: one kernel writes both).
#[derive(Debug)]
pub struct DeviceCache {
    layers: Vec<Tensor>,
    blocks: usize,
    block_size: usize,
    /// Which cache of the process this is (recorded steps hold its addresses).
    id: u64,
}

impl DeviceCache {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// A step's uploads, as views into the two buffers.
pub struct DeviceStep {
    ids: Tensor,
    slots: Tensor,
    plan: AttendPlan,
    wanted: Option<Tensor>,
    /// `[2, tokens, half]`: the tokens' rotary cosines, then sines.
    trig: Tensor,
    interleaved: bool,
}

/// A step's inputs on the host, as its uploads carry them: the integers (ids, slot
/// mapping, per-token sequence and length, wanted rows, block tables, token order,
/// tiles) in one buffer, the rotary angles in another.
pub(crate) struct StepInputs {
    pub ints: Vec<u32>,
    /// `[2, tokens, half]`: cosines, then sines.
    pub trig: Vec<f32>,
    pub shape: StepShape,
}

/// Where each part sits in a step's buffers, and what the attention launches need to
/// know of the step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct StepShape {
    pub tokens: usize,
    pub half: usize,
    pub wanted: usize,
    pub sequences: usize,
    /// Entries a row of the block tables.
    pub width: usize,
    pub tiles: usize,
    pub singles: usize,
    pub longest: usize,
    pub longest_single: usize,
    pub interleaved: bool,
}

impl StepInputs {
    /// The inputs of the step `layout` describes; `width` pads each block table to that
    /// many entries (at least the longest table), and then has the attention split as
    /// for sequences that fill them, so that every step of the same (tokens, width)
    /// has the same shape and launches.
    pub fn new(
        layout: &StepLayout<'_>,
        rope: &Rope,
        cache: &DeviceCache,
        width: Option<usize>,
    ) -> Result<Self, ModelError> {
        let bs = cache.block_size;
        let tokens = layout.ids.len();
        let spans = layout.spans;
        let longest_table = spans
            .iter()
            .map(|s| s.blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let max_blocks = width.unwrap_or(longest_table).max(longest_table);
        // Followers run the leader's block tables: an index outside the cache must be
        // refused here, the kernels do not check.
        for s in spans {
            let used = (s.start_pos + s.tokens.len()).div_ceil(bs);
            let table = s.blocks.get(..used).ok_or(crate::kv::KvError::ShortTable {
                table: s.blocks.len(),
                positions: s.start_pos + s.tokens.len(),
            })?;
            if let Some(&block) = table.iter().find(|&&b| b as usize >= cache.blocks) {
                return Err(crate::kv::KvError::NoSuchBlock {
                    block,
                    blocks: cache.blocks,
                }
                .into());
            }
        }
        let wanted = layout.wanted.len();
        let mut ints: Vec<u32> = Vec::with_capacity(6 * tokens + wanted + spans.len() * max_blocks);
        ints.extend(&layout.ids);
        for s in spans {
            ints.extend(
                (s.start_pos..s.start_pos + s.tokens.len())
                    .map(|p| s.blocks[p / bs] * bs as u32 + (p % bs) as u32),
            );
        }
        for (i, s) in spans.iter().enumerate() {
            for p in s.start_pos..s.start_pos + s.tokens.len() {
                ints.extend([i as u32, p as u32 + 1]);
            }
        }
        ints.extend(layout.wanted.iter().map(|&r| r as u32));
        for s in spans {
            ints.extend(s.blocks);
            ints.extend(std::iter::repeat_n(0, max_blocks - s.blocks.len()));
        }
        let tiled = ops::TokenTiles::new(spans.iter().map(|s| s.tokens.len()));
        ints.extend(&tiled.order);
        ints.extend(&tiled.tiles);
        let angles = rope.angles(layout.positions.iter().copied());
        let mut trig = angles.cos().to_vec();
        trig.extend_from_slice(angles.sin());
        let (longest, longest_single) = match width {
            Some(_) => (max_blocks * bs, max_blocks * bs),
            None => (
                spans
                    .iter()
                    .map(|s| s.start_pos + s.tokens.len())
                    .max()
                    .unwrap_or(0),
                spans
                    .iter()
                    .filter(|s| s.tokens.len() == 1)
                    .map(|s| s.start_pos + 1)
                    .max()
                    .unwrap_or(0),
            ),
        };
        Ok(Self {
            ints,
            trig,
            shape: StepShape {
                tokens,
                half: angles.half(),
                wanted,
                sequences: spans.len(),
                width: max_blocks,
                tiles: tiled.tiles.len() / 2,
                singles: tiled.singles,
                longest,
                longest_single,
                interleaved: rope.style() == RopeStyle::Interleaved,
            },
        })
    }
}

impl StepShape {
    pub fn ints_len(&self) -> usize {
        5 * self.tokens + self.wanted + self.sequences * self.width + 2 * self.tiles
    }

    /// The step's tensors as views into its two buffers (`ints`, `trig`: uploaded, or
    /// buffers kept for replays).
    pub fn device_step(&self, ints: &Tensor, trig: &Tensor) -> Result<DeviceStep, ModelError> {
        let (tokens, wanted) = (self.tokens, self.wanted);
        let tables_end = 4 * tokens + wanted + self.sequences * self.width;
        Ok(DeviceStep {
            ids: ints.narrow(0, 0, tokens)?,
            slots: ints.narrow(0, tokens, tokens)?,
            plan: AttendPlan {
                tokens: ints
                    .narrow(0, 2 * tokens, 2 * tokens)?
                    .reshape((tokens, 2))?,
                tables: ints
                    .narrow(0, 4 * tokens + wanted, self.sequences * self.width)?
                    .reshape((self.sequences, self.width))?,
                order: ints.narrow(0, tables_end, tokens)?,
                singles: self.singles,
                longest: self.longest,
                longest_single: self.longest_single,
                tiles: ints
                    .narrow(0, tables_end + tokens, 2 * self.tiles)?
                    .reshape((self.tiles, 2))?,
            },
            wanted: (wanted > 0)
                .then(|| ints.narrow(0, 4 * tokens, wanted))
                .transpose()?,
            trig: trig.clone(),
            interleaved: self.interleaved,
        })
    }
}

fn ggml_dtype(format: QuantFormat) -> GgmlDType {
    match format {
        QuantFormat::Q4_0 => GgmlDType::Q4_0,
        QuantFormat::Q4_1 => GgmlDType::Q4_1,
        QuantFormat::Q5_0 => GgmlDType::Q5_0,
        QuantFormat::Q5_1 => GgmlDType::Q5_1,
        QuantFormat::Q8_0 => GgmlDType::Q8_0,
    }
}

fn quant(
    bytes: Cow<'_, [u8]>,
    dtype: GgmlDType,
    dims: [usize; 2],
    device: &Device,
) -> candle_core::Result<DeviceMatrix> {
    let storage = QStorage::from_data(bytes, device, dtype)?;
    let q = QTensor::new(storage, (dims[0], dims[1]))?;
    Ok(DeviceMatrix::Quant(QMatMul::from_arc(
        std::sync::Arc::new(q),
    )?))
}

/// Physical memory of this machine, for refusing a cache on candle's CPU device that
/// could never be held (allocating it would abort the process).
fn host_memory() -> u128 {
    // SAFETY: sysconf only reads system values.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    (pages.max(0) as u128) * (size.max(0) as u128)
}

impl Backend for Tensors {
    type Hidden = Tensor;
    type Matrix = DeviceMatrix;
    type Vector = Tensor;
    type Dense = DeviceDense;
    type Cache = DeviceCache;
    type Step<'a> = DeviceStep;

    fn device(&self) -> Device {
        self.device.clone()
    }

    fn matrix(&self, weight: Weight) -> Result<DeviceMatrix, ModelError> {
        Ok(match weight {
            // The project's block formats, loaded for the CPU kernels: the same
            // GGUF blocks, handed to candle.
            Weight::Blocks(m) if self.device.is_cpu() && self.cpu_kernels => {
                DeviceMatrix::Kernels(Weight::Blocks(m))
            }
            Weight::Blocks(m) => quant(
                Cow::Borrowed(m.bytes()),
                ggml_dtype(m.format()),
                [m.rows(), m.cols()],
                &self.device,
            )?,
            Weight::Ggml(q) => DeviceMatrix::Quant(QMatMul::from_arc(q)?),
            Weight::Dense(t) => DeviceMatrix::Dense(t.to_device(&self.device)?),
        })
    }

    fn vector(&self, values: Vec<f32>) -> Result<Tensor, ModelError> {
        let n = values.len();
        Ok(Tensor::from_vec(values, n, &self.device)?)
    }

    fn dense(&self, rows: usize, cols: usize, values: Vec<f32>) -> Result<DeviceDense, ModelError> {
        Ok(DeviceDense {
            tensor: Tensor::from_slice(&values, (rows, cols), &self.device)?,
            host: HostDense { rows, cols, values },
        })
    }

    fn dims(matrix: &DeviceMatrix) -> [usize; 2] {
        let dims = match matrix {
            DeviceMatrix::Quant(QMatMul::QTensor(q)) => q.shape().dims().to_vec(),
            DeviceMatrix::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t))
            | DeviceMatrix::Dense(t) => t.dims().to_vec(),
            DeviceMatrix::Kernels(w) => w.dims(),
        };
        [dims[0], dims.get(1).copied().unwrap_or(1)]
    }

    fn stack(&self, parts: Vec<DeviceMatrix>) -> Result<DeviceMatrix, Vec<DeviceMatrix>> {
        if parts.iter().all(|p| matches!(p, DeviceMatrix::Kernels(_))) {
            let weights = parts
                .into_iter()
                .filter_map(|p| match p {
                    DeviceMatrix::Kernels(w) => Some(w),
                    _ => None,
                })
                .collect();
            return Weight::stack_rows(weights)
                .map(DeviceMatrix::Kernels)
                .map_err(|ws| ws.into_iter().map(DeviceMatrix::Kernels).collect());
        }
        let stacked = || -> candle_core::Result<Option<DeviceMatrix>> {
            let quantised: Option<Vec<&QTensor>> = parts
                .iter()
                .map(|p| match p {
                    DeviceMatrix::Quant(QMatMul::QTensor(q)) => Some(q.as_ref()),
                    _ => None,
                })
                .collect();
            if let Some(qs) = quantised {
                let dtype = qs[0].dtype();
                let cols = qs[0].shape().dims2()?.1;
                let mut rows = 0;
                let mut bytes = Vec::new();
                for q in &qs {
                    let (r, c) = q.shape().dims2()?;
                    if q.dtype() != dtype || c != cols {
                        return Ok(None);
                    }
                    rows += r;
                    // Rows of blocks, one after another: stacking is concatenation.
                    bytes.extend_from_slice(&q.data()?);
                }
                return quant(Cow::Owned(bytes), dtype, [rows, cols], &self.device).map(Some);
            }
            let dense: Option<Vec<&Tensor>> = parts
                .iter()
                .map(|p| match p {
                    DeviceMatrix::Dense(t) if t.rank() == 2 => Some(t),
                    _ => None,
                })
                .collect();
            match dense {
                Some(ts) if ts.iter().all(|t| t.dtype() == ts[0].dtype()) => {
                    Ok(Some(DeviceMatrix::Dense(Tensor::cat(&ts, 0)?)))
                }
                _ => Ok(None),
            }
        };
        match stacked() {
            Ok(Some(m)) => Ok(m),
            _ => Err(parts),
        }
    }

    fn new_cache(
        &self,
        shape: KvShape,
        blocks: usize,
        block_size: usize,
    ) -> Result<DeviceCache, KvCacheTooLarge> {
        let bytes = (shape.block_bytes(block_size) as u128) * blocks as u128;
        let too_large = KvCacheTooLarge {
            bytes,
            blocks,
            block_size,
        };
        if self.device.is_cpu() && bytes > host_memory() {
            return Err(too_large);
        }
        let dims = (2, blocks, block_size, shape.kv_heads, shape.head_dim);
        let dtype = self.cache_dtype.dtype();
        let layers = (0..shape.layers)
            .map(|_| Tensor::zeros(dims, dtype, &self.device))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| too_large)?;
        static CACHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(DeviceCache {
            layers,
            blocks,
            block_size,
            id: CACHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

    fn begin<'a>(
        &self,
        layout: &'a StepLayout<'a>,
        rope: &'a Rope,
        cache: &DeviceCache,
    ) -> Result<DeviceStep, ModelError> {
        let _time = profile::span("upload (begin)", &self.device);
        let inputs = StepInputs::new(layout, rope, cache, None)?;
        let shape = inputs.shape;
        let ints = Tensor::from_vec(inputs.ints, shape.ints_len(), &self.device)?;
        let trig = Tensor::from_vec(inputs.trig, (2, shape.tokens, shape.half), &self.device)?;
        shape.device_step(&ints, &trig)
    }

    fn run_layers<'a>(
        &self,
        layout: &'a StepLayout<'a>,
        rope: &'a Rope,
        cache: &mut DeviceCache,
        replayable: bool,
        layers: &mut StepLayers<'_, 'a, Self>,
    ) -> Result<Option<Tensor>, ModelError> {
        match &self.replays {
            // A recorded step cannot be timed op by op.
            Some(replays) if replayable && !replays.is_off() && !profile::enabled() => {
                replays.run(&self.device, layout, rope, cache, layers)
            }
            _ => {
                let step = self.begin(layout, rope, cache)?;
                layers(&step, cache)
            }
        }
    }

    fn embed(&self, table: &DeviceMatrix, step: &DeviceStep) -> Result<Tensor, ModelError> {
        let _time = profile::span("embed", &self.device);
        let rows = match table {
            DeviceMatrix::Quant(q) => q.embedding(&step.ids)?,
            DeviceMatrix::Dense(t) => t.index_select(&step.ids, 0)?,
            DeviceMatrix::Kernels(w) => {
                let ids = step.ids.to_vec1::<u32>()?;
                let k = w.dims()[1];
                Tensor::from_vec(w.gather_rows(&ids)?, (ids.len(), k), &self.device)?
            }
        };
        Ok(rows.to_dtype(DType::F32)?)
    }

    fn linear(
        &self,
        x: &Tensor,
        w: &DeviceMatrix,
        bias: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let _time = profile::span(
            match w {
                DeviceMatrix::Quant(_) => "linear (quantised)",
                DeviceMatrix::Dense(_) => "linear (dense)",
                DeviceMatrix::Kernels(_) => "linear (CPU kernels)",
            },
            &self.device,
        );
        let y = match w {
            DeviceMatrix::Quant(q) => q.forward(x)?,
            // A half-precision weight's product stays in its type: the ops that read it
            // (rotation and cache write, SwiGLU, add + norm, the download) widen it as
            // they read, a launch fewer each than a cast.
            DeviceMatrix::Dense(w) => {
                let y = x.to_dtype(w.dtype())?.matmul(&w.t()?)?;
                match bias {
                    Some(_) => y.to_dtype(DType::F32)?,
                    None => y,
                }
            }
            DeviceMatrix::Kernels(w) => {
                let m = x.dim(0)?;
                let rows = host_rows(x)?.into_vec();
                Tensor::from_vec(w.matmul_t(&rows, m)?, (m, w.dims()[0]), &self.device)?
            }
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    fn concat(&self, parts: Vec<Tensor>) -> Result<Tensor, ModelError> {
        // Parts of one layer may come from weights of different types (a GGUF file's
        // V in F16 beside Q and K in a block format): their products meet in f32.
        if parts.iter().any(|p| p.dtype() != parts[0].dtype()) {
            let widened = parts
                .iter()
                .map(|p| p.to_dtype(DType::F32))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&widened, 1)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    fn add_lora(
        &self,
        y: &mut Tensor,
        x: &Tensor,
        pairs: &[LoraPair<'_, Self>],
    ) -> Result<(), ModelError> {
        if pairs.is_empty() {
            return Ok(());
        }
        // Adapters add in f32, to a half-precision weight's product too.
        *y = y.to_dtype(DType::F32)?;
        if self.host_adapters() {
            let mut rows = host_rows(y)?;
            lora::add_to_rows(&mut rows, &host_rows(x)?, &host_pairs(pairs));
            *y = Tensor::from_vec(rows.into_vec(), y.dims(), &self.device)?;
            return Ok(());
        }
        let width = y.dim(1)?;
        for p in pairs {
            let rows: Vec<u32> = p.rows.iter().map(|&r| r as u32).collect();
            let index = Tensor::new(rows.as_slice(), &self.device)?;
            // The layer's input may be half-precision (its weight's); adapters take f32.
            let t = x
                .index_select(&index, 0)?
                .to_dtype(DType::F32)?
                .matmul(&p.a.tensor.t()?)?;
            let delta = (t.matmul(&p.b.tensor.t()?)? * f64::from(p.scale))?;
            let outputs = delta.dim(1)?;
            let delta = delta.pad_with_zeros(1, p.offset, width - p.offset - outputs)?;
            *y = y.index_add(&index, &delta, 0)?;
        }
        Ok(())
    }

    fn linear_all_reduce(
        &self,
        x: &Tensor,
        w: &DeviceMatrix,
        comm: &dyn Collective,
        lora: &[LoraPair<'_, Self>],
    ) -> Result<Tensor, ModelError> {
        if let DeviceMatrix::Kernels(w) = w {
            let _time = profile::span("linear (CPU kernels)", &self.device);
            // As the CPU engine does: block formats all-reduce unrounded f64 sums.
            let m = x.dim(0)?;
            let x_rows = host_rows(x)?;
            if let Some(mut wide) = w.matmul_t_wide(x_rows.as_slice(), m)? {
                let n = w.dims()[0];
                lora::add_to_wide(&mut wide, n, &x_rows, &host_pairs(lora));
                comm.all_reduce(crate::comm::HostSliceMut::F64(&mut wide))?;
                let y: Vec<f32> = wide.into_iter().map(|v| v as f32).collect();
                return Ok(Tensor::from_vec(y, (m, n), &self.device)?);
            }
        }
        let mut partial = self.linear(x, w, None)?;
        self.add_lora(&mut partial, x, lora)?;
        if comm.world_size() == 1 {
            return Ok(partial);
        }
        let _time = profile::span("all-reduce", &self.device);
        // Ranks' partial sums add up in f32, whatever the weights' type.
        Ok(comm.all_reduce_tensor(&partial.to_dtype(DType::F32)?)?)
    }

    fn rms_norm(
        &self,
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
        next: &DeviceMatrix,
    ) -> Result<Tensor, ModelError> {
        let _time = profile::span("rms_norm", &self.device);
        Ok(ops::rms_norm(x, weight, eps, next.input_dtype())?)
    }

    fn swiglu(&self, gate_up: &Tensor, next: &DeviceMatrix) -> Result<Tensor, ModelError> {
        let _time = profile::span("swiglu", &self.device);
        Ok(ops::swiglu(gate_up, next.input_dtype())?)
    }

    fn add(&self, x: &mut Tensor, y: &Tensor) -> Result<(), ModelError> {
        let _time = profile::span("add", &self.device);
        *x = (&*x + &y.to_dtype(x.dtype())?)?;
        Ok(())
    }

    fn add_rms_norm(
        &self,
        x: &mut Tensor,
        y: &Tensor,
        weight: &Tensor,
        eps: f32,
        next: &DeviceMatrix,
    ) -> Result<Tensor, ModelError> {
        let _time = profile::span("add_rms_norm", &self.device);
        // The sums go into `x` itself (the residual stream: no other tensor shares it),
        // the norm comes out in the type `next` multiplies.
        if !x.is_contiguous() {
            *x = x.contiguous()?;
        }
        Ok(ops::add_rms_norm(x, y, weight, eps, next.input_dtype())?)
    }

    fn attention(
        &self,
        qkv: Tensor,
        shape: AttentionShape,
        layer: usize,
        step: &DeviceStep,
        cache: &mut DeviceCache,
        next: &DeviceMatrix,
    ) -> Result<Tensor, ModelError> {
        let tokens = qkv.dim(0)?;
        let rotation = ops::Rotation {
            heads: shape.heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            half: step.trig.dim(2)?,
            interleaved: step.interleaved,
        };
        let layer = &cache.layers[layer];
        let q = {
            let _time = profile::span("rotate_and_write", &self.device);
            ops::rotate_and_write(layer, &qkv, &step.trig, &step.slots, rotation)?
        };
        let _time = profile::span("attend", &self.device);
        let out = ops::attend(&q, layer, &step.plan, next.input_dtype())?;
        Ok(out.reshape((tokens, shape.q_width()))?)
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor, ModelError> {
        Ok(x.narrow(0, start, len)?)
    }

    fn wanted_rows(&self, x: &Tensor, step: &DeviceStep) -> Result<Tensor, ModelError> {
        let _time = profile::span("wanted_rows", &self.device);
        match &step.wanted {
            Some(rows) => Ok(x.index_select(rows, 0)?),
            None => Ok(x.narrow(0, 0, 0)?),
        }
    }

    fn download(
        &self,
        x: &Tensor,
        whole: usize,
        scored: &[(u32, usize)],
        picks: &[Pick],
    ) -> Result<Downloaded, ModelError> {
        let _time = profile::span("download (scores, picks)", &self.device);
        let (n, vocab) = x.dims2()?;
        let part = |start: usize, len: usize| x.narrow(0, start, len)?.to_dtype(DType::F32);
        let rows = if whole == 0 {
            Vec::new()
        } else {
            part(0, whole)?.to_vec2()?
        };
        if vocab > ops::MAX_DRAW_VOCAB {
            // A vocabulary wider than the kernels' bitmap: every row comes back whole.
            let rest: Vec<Vec<f32>> = part(whole, n - whole)?.to_vec2()?;
            let (scored_rows, picked_rows) = rest.split_at(scored.len());
            return Ok(Downloaded {
                rows,
                scores: scored_rows
                    .iter()
                    .zip(scored)
                    .map(|(row, &(id, k))| logprobs_of(row, id, k))
                    .collect(),
                picked: picked_rows
                    .iter()
                    .zip(picks)
                    .map(|(r, p)| p.on_host(r))
                    .collect(),
            });
        }
        // Scores and picks are taken on the device: a few bytes per row come back,
        // not a vocabulary's worth of logits.
        let scores = if scored.is_empty() {
            Vec::new()
        } else {
            let ids: Vec<u32> = scored.iter().map(|&(id, _)| id).collect();
            let ids = Tensor::from_vec(ids, scored.len(), &self.device)?;
            let k = scored.iter().map(|&(_, k)| k).max().unwrap_or(0).min(vocab);
            let table = ops::top_logprobs(&part(whole, scored.len())?, &ids, k)?;
            let table: Vec<Vec<f32>> = table.to_vec2()?;
            table
                .iter()
                .zip(scored)
                .map(|(row, &(id, k))| ops::read_top_logprobs(row, id, k))
                .collect()
        };
        let picked = if picks.is_empty() {
            Vec::new()
        } else {
            self.pick(&part(whole + scored.len(), picks.len())?, picks)?
        };
        Ok(Downloaded {
            rows,
            scores,
            picked,
        })
    }
}

impl Tensors {
    /// What `picks` pick from `rows` (f32, one row each), on the device.
    fn pick(&self, rows: &Tensor, picks: &[Pick]) -> Result<Vec<Picked>, ModelError> {
        let penalised = self.penalised(rows, picks)?;
        let ids = if picks.iter().all(|p| p.draw.is_none()) {
            penalised.argmax(candle_core::D::Minus1)?
        } else {
            let settings: Vec<f64> = picks
                .iter()
                .flat_map(|p| ops::draw_settings(&p.draw))
                .collect();
            let settings = Tensor::from_vec(settings, (picks.len(), 5), &self.device)?;
            ops::draw(&penalised, &settings)?
        };
        let top = picks.iter().filter_map(|p| p.logprobs).max();
        let scores = match top {
            Some(k) => {
                let k = k.min(rows.dim(1)?);
                Some(ops::top_logprobs(rows, &ids, k)?.to_vec2::<f32>()?)
            }
            None => None,
        };
        let ids = ids.to_vec1::<u32>()?;
        Ok(ids
            .into_iter()
            .zip(picks)
            .enumerate()
            .map(|(i, (id, pick))| Picked {
                id,
                logprobs: pick
                    .logprobs
                    .zip(scores.as_ref())
                    .map(|(k, scores)| ops::read_top_logprobs(&scores[i], id, k)),
            })
            .collect())
    }

    /// `rows` with the picks' penalties applied (a copy: log-probabilities read the
    /// raw rows); `rows` itself when no pick has any. One upload of the tokens they
    /// touch.
    fn penalised(&self, rows: &Tensor, picks: &[Pick]) -> Result<Tensor, ModelError> {
        let mut entries = Vec::new();
        let mut settings = Vec::with_capacity(picks.len() * 3);
        for (row, pick) in picks.iter().enumerate() {
            let Some(p) = &pick.penalties else {
                settings.extend([1.0, 0.0, 0.0]);
                continue;
            };
            settings.extend([p.repetition, p.presence, p.frequency]);
            entries.extend(
                p.seen
                    .iter()
                    .flat_map(|&(id, count)| [row as u32, id, count]),
            );
        }
        if entries.is_empty() {
            return Ok(rows.clone());
        }
        let n = entries.len() / 3;
        let penalised = rows.copy()?;
        ops::penalise(
            &penalised,
            &Tensor::from_vec(entries, (n, 3), &self.device)?,
            &Tensor::from_vec(settings, (picks.len(), 3), &self.device)?,
        )?;
        Ok(penalised)
    }
}
