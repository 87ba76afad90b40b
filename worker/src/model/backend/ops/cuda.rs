//! Launching the device backend's kernels (`kernels.cu`, built into a fat binary for the
//! GPU generations the build names, with PTX for newer ones) on candle's stream. Each
//! launch's kernel, shape and arguments come from `calls.rs`, which the emulated tests
//! run too; here they get device addresses.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor, bail};
use cudarc::driver::{CudaFunction, CudaModule, DevicePtr, LaunchConfig, PushKernelArg};

use super::calls::{self, Arg, AttendBufs, AttendShape, AttendSplit, Buf, Call, Elem};
use super::launch::{Launch, MAX_HEAD_DIM};
use super::{AttendPlan, HostValues, Rotation};

/// `kernels.cu`, compiled by `build.rs`.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ops.fatbin"));

impl From<Launch> for LaunchConfig {
    fn from(l: Launch) -> Self {
        LaunchConfig {
            grid_dim: (l.blocks.0, l.blocks.1, 1),
            block_dim: (l.threads, 1, 1),
            shared_mem_bytes: l.shared_bytes,
        }
    }
}

fn cuda_error(e: impl std::error::Error + Send + Sync + 'static) -> candle_core::Error {
    candle_core::Error::Cuda(Box::new(e))
}

/// The kernels of one GPU: the module, loaded once, and each function looked up once
/// (a step launches a few per layer; the driver's lookup need not run for each).
struct Loaded {
    module: Arc<CudaModule>,
    functions: HashMap<String, CudaFunction>,
}

/// The kernel `name` on `storage`'s GPU.
fn function(storage: &CudaStorage, name: &str) -> Result<CudaFunction> {
    static GPUS: OnceLock<Mutex<HashMap<usize, Loaded>>> = OnceLock::new();
    let ctx = storage.device.cuda_stream().context().clone();
    let mut gpus = GPUS
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| candle_core::Error::Msg("device kernels: a load panicked".into()))?;
    let loaded = match gpus.entry(ctx.ordinal()) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(Loaded {
            module: ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(FATBIN.to_vec()))
                .map_err(cuda_error)?,
            functions: HashMap::new(),
        }),
    };
    if let Some(f) = loaded.functions.get(name) {
        return Ok(f.clone());
    }
    let f = loaded.module.load_function(name).map_err(cuda_error)?;
    loaded.functions.insert(name.to_string(), f.clone());
    Ok(f)
}

/// Elements `range` of `storage` as a kernel's argument: their device address and type.
/// The address is all a launch needs: a rank runs on one stream with cudarc's event
/// tracking off (`crate::device`), so the guard `device_ptr` returns does nothing.
fn buf(storage: &CudaStorage, range: Range<usize>) -> Result<Buf<u64>> {
    let stream = storage.device.cuda_stream();
    macro_rules! at {
        ($t:ty) => {
            storage
                .as_cuda_slice::<$t>()?
                .slice(range)
                .device_ptr(&stream)
                .0
        };
    }
    let elem = Elem::of(storage.dtype())?;
    let ptr = match elem {
        Elem::F32 => at!(f32),
        Elem::F16 => at!(half::f16),
        Elem::BF16 => at!(half::bf16),
        Elem::F64 => at!(f64),
        Elem::U32 => at!(u32),
    };
    Ok(Buf::new(ptr, elem))
}

/// `buf` of a tensor's storage, which must be on the GPU, contiguous.
fn tensor_buf(t: &Tensor, what: &str) -> Result<Buf<u64>> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(storage) = &*storage else {
        bail!("device kernels: {what} is not on the GPU");
    };
    let (start, end) = offsets(layout, what)?;
    buf(storage, start..end)
}

/// A new buffer of `n` elements of `T` on `storage`'s GPU, and its argument.
///
/// # Safety
/// The kernels launched on it must write every element before anything reads it.
unsafe fn output<T>(storage: &CudaStorage, n: usize) -> Result<(CudaStorage, Buf<u64>)>
where
    T: cudarc::driver::DeviceRepr + candle_core::cuda_backend::CudaDType,
{
    // SAFETY: the caller's promise.
    let slice = unsafe { storage.device.alloc::<T>(n) }?;
    wrapped(storage, slice)
}

/// The same, zeroed (for kernels that leave some of it as it is).
fn zeroed<T>(storage: &CudaStorage, n: usize) -> Result<(CudaStorage, Buf<u64>)>
where
    T: cudarc::driver::DeviceRepr
        + cudarc::driver::ValidAsZeroBits
        + candle_core::cuda_backend::CudaDType,
{
    wrapped(storage, storage.device.alloc_zeros::<T>(n)?)
}

/// `output` of `n` elements of `dtype` (f32, f16 or bf16).
///
/// # Safety
/// As `output`'s.
unsafe fn output_of(
    storage: &CudaStorage,
    n: usize,
    dtype: DType,
) -> Result<(CudaStorage, Buf<u64>)> {
    // SAFETY: the caller's promise.
    unsafe {
        match dtype {
            DType::F16 => output::<half::f16>(storage, n),
            DType::BF16 => output::<half::bf16>(storage, n),
            DType::F32 => output::<f32>(storage, n),
            other => bail!("device kernels: outputs of {other:?} are not supported"),
        }
    }
}

fn wrapped<T: candle_core::cuda_backend::CudaDType>(
    storage: &CudaStorage,
    slice: cudarc::driver::CudaSlice<T>,
) -> Result<(CudaStorage, Buf<u64>)> {
    let n = slice.len();
    let out = CudaStorage::wrap_cuda_slice(slice, storage.device.clone());
    let arg = buf(&out, 0..n)?;
    Ok((out, arg))
}

/// Launches `call` on `storage`'s GPU, on candle's stream.
///
/// # Safety
/// The call's buffers must be as large as its kernel reads and writes under its launch.
unsafe fn launch(storage: &CudaStorage, call: &Call<u64>) -> Result<()> {
    let func = function(storage, &call.kernel)?;
    let stream = storage.device.cuda_stream();
    let mut b = stream.launch_builder(&func);
    for arg in &call.args {
        match arg {
            Arg::Ptr(p) => b.arg(&p.ptr),
            Arg::U32(v) => b.arg(v),
            Arg::U64(v) => b.arg(v),
            Arg::F32(v) => b.arg(v),
        };
    }
    // SAFETY: the argument list is the kernel's signature (`calls.rs`, checked against
    // the compiled kernels by the emulated tests); sizes are the caller's promise.
    unsafe { b.launch(call.launch.into()) }.map_err(cuda_error)?;
    Ok(())
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("paged kernels: {what} must be contiguous")))
}

fn range(l: &Layout, what: &str) -> Result<Range<usize>> {
    let (start, end) = offsets(l, what)?;
    Ok(start..end)
}

/// Writes the keys and values into the cache and returns the rotated queries.
#[allow(clippy::too_many_arguments)] // candle's InplaceOp3::cuda_fwd, plus the op's fields
pub fn rotate_and_write(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    qkv: &CudaStorage,
    qkv_l: &Layout,
    trig: &CudaStorage,
    trig_l: &Layout,
    slots: &Tensor,
    rotation: &Rotation,
) -> Result<CudaStorage> {
    let tokens = qkv_l.dims()[0];
    let cache_range = range(cache_l, "the cache")?;
    // SAFETY: the kernel writes every query element.
    let (q, q_arg) = unsafe { output::<f32>(qkv, tokens * rotation.heads * rotation.head_dim) }?;
    let bufs = calls::RotateBufs {
        cache_len: cache_range.len(),
        cache: buf(cache, cache_range)?,
        q: q_arg,
        qkv: buf(qkv, range(qkv_l, "the QKV rows")?)?,
        trig: buf(trig, range(trig_l, "the angles")?)?,
        slots: tensor_buf(slots, "the slots")?,
    };
    // SAFETY: the op checked the shapes, and slots come from block tables checked
    // against the cache's size before the step.
    unsafe { launch(cache, &calls::rotate_write(&bufs, rotation, tokens)) }?;
    Ok(q)
}

pub fn attend(
    q: &CudaStorage,
    q_l: &Layout,
    cache: &CudaStorage,
    cache_l: &Layout,
    plan: &AttendPlan,
    scale: f32,
    out_dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    let [tokens, heads, d] = *q_l.dims() else {
        bail!("attend: queries must be [tokens, heads, head_dim]");
    };
    let [2, _, block_size, kv_heads, _] = *cache_l.dims() else {
        bail!("attend: the cache must be [2, blocks, block_size, kv_heads, head_dim]");
    };
    if d > MAX_HEAD_DIM {
        bail!("attend: head_dim {d} is above the kernel's {MAX_HEAD_DIM}");
    }
    let shape = AttendShape {
        heads,
        kv_heads,
        head_dim: d,
        block_size,
        max_blocks: plan.tables.dim(1)?,
        scale,
    };
    let split = AttendSplit::new(
        tokens,
        &shape,
        plan.tiles.dim(0)?,
        plan.singles,
        plan.longest,
        plan.longest_single,
    );
    // Keys, then values, each half of the layer's cache.
    let (k0, c1) = offsets(cache_l, "the cache")?;
    let v0 = k0 + (c1 - k0) / 2;
    // SAFETY: every element is written by one of the kernels before it is read:
    // `order` holds every token, the first `per_token` for the per-token kernel, the
    // rest in `tiles`; with chunks, every block writes its partial entries before
    // attend_combine reads them.
    let (out, out_arg) = unsafe { output_of(q, tokens * heads * d, out_dtype) }?;
    let (_partial, partial) = unsafe { output::<f32>(q, split.partial_len(&shape)) }?;
    let bufs = AttendBufs {
        out: out_arg,
        q: buf(q, range(q_l, "the queries")?)?,
        keys: buf(cache, k0..v0)?,
        values: buf(cache, v0..c1)?,
        tables: tensor_buf(&plan.tables, "the block tables")?,
        tokens: tensor_buf(&plan.tokens, "the token plan")?,
        order: tensor_buf(&plan.order, "the token order")?,
        tiles: tensor_buf(&plan.tiles, "the token tiles")?,
        partial,
    };
    for call in split.calls(&bufs, &shape) {
        // SAFETY: the plan's tables were checked against the cache's size before the
        // step, the first `per_token` entries of `order` are tokens of the step, each
        // tile a run of one sequence's tokens, and `partial` is sized by the split.
        unsafe { launch(q, &call) }?;
    }
    Ok((out, q_l.shape().clone()))
}

pub fn rms_norm(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    eps: f32,
    out_dtype: DType,
) -> Result<(CudaStorage, Shape)> {
    let (rows, width) = x_l.shape().dims2()?;
    // SAFETY: the kernel writes every element.
    let (out, out_arg) = unsafe { output_of(x, rows * width, out_dtype) }?;
    let call = calls::rms_norm(
        out_arg,
        buf(x, range(x_l, "the rows")?)?,
        buf(w, range(w_l, "the weight")?)?,
        rows,
        width,
        eps,
    );
    // SAFETY: the op checked the shapes.
    unsafe { launch(x, &call) }?;
    Ok((out, x_l.shape().clone()))
}

/// `x += y` in place and the norm of the sums, returned.
#[allow(clippy::too_many_arguments)] // candle's InplaceOp3::cuda_fwd, plus the op's fields
pub fn add_rms_norm(
    x: &mut CudaStorage,
    x_l: &Layout,
    y: &CudaStorage,
    y_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    eps: f32,
    out_dtype: DType,
) -> Result<CudaStorage> {
    let (rows, width) = x_l.shape().dims2()?;
    // SAFETY: the kernel writes every element.
    let (out, out_arg) = unsafe { output_of(x, rows * width, out_dtype) }?;
    let call = calls::add_rms_norm(
        out_arg,
        buf(x, range(x_l, "the rows")?)?,
        buf(y, range(y_l, "the added rows")?)?,
        buf(w, range(w_l, "the weight")?)?,
        rows,
        width,
        eps,
    );
    // SAFETY: the op checked the shapes.
    unsafe { launch(x, &call) }?;
    Ok(out)
}

pub fn swiglu(x: &CudaStorage, l: &Layout, out_dtype: DType) -> Result<(CudaStorage, Shape)> {
    let (rows, width) = l.shape().dims2()?;
    let half = width / 2;
    // SAFETY: the kernel writes every element.
    let (out, out_arg) = unsafe { output_of(x, rows * half, out_dtype) }?;
    let call = calls::swiglu(out_arg, buf(x, range(l, "the rows")?)?, rows, half);
    // SAFETY: the op checked the shapes.
    unsafe { launch(x, &call) }?;
    Ok((out, Shape::from((rows, half))))
}

pub fn draw(
    x: &CudaStorage,
    x_l: &Layout,
    settings: &CudaStorage,
    settings_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let (out, out_arg) = zeroed::<u32>(x, rows)?;
    let call = calls::draw(
        out_arg,
        buf(x, range(x_l, "the logits")?)?,
        buf(settings, range(settings_l, "the draw settings")?)?,
        rows,
        vocab,
    );
    // SAFETY: the op checked the shapes; the bitmap fits the shared memory of
    // `MAX_DRAW_VOCAB`.
    unsafe { launch(x, &call) }?;
    Ok((out, Shape::from(rows)))
}

pub fn top_logprobs(
    x: &CudaStorage,
    x_l: &Layout,
    chosen: &CudaStorage,
    chosen_l: &Layout,
    n: usize,
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let (out, out_arg) = zeroed::<f32>(x, rows * (1 + 3 * n))?;
    let call = calls::top_logprobs(
        out_arg,
        buf(x, range(x_l, "the logits")?)?,
        buf(chosen, range(chosen_l, "the chosen ids")?)?,
        rows,
        vocab,
        n,
    );
    // SAFETY: as `draw`'s; `n` is at most the vocabulary (checked by the op).
    unsafe { launch(x, &call) }?;
    Ok((out, Shape::from((rows, 1 + 3 * n))))
}

pub fn penalise(
    x: &mut CudaStorage,
    x_l: &Layout,
    entries: &CudaStorage,
    entries_l: &Layout,
    settings: &CudaStorage,
    settings_l: &Layout,
) -> Result<()> {
    let (_, vocab) = x_l.shape().dims2()?;
    let n = entries_l.dims()[0];
    if n == 0 {
        return Ok(());
    }
    let call = calls::penalise(
        buf(x, range(x_l, "the logits")?)?,
        buf(entries, range(entries_l, "the penalty entries")?)?,
        buf(settings, range(settings_l, "the penalty settings")?)?,
        n,
        vocab,
    );
    // SAFETY: the op checked the shapes, and the kernel skips ids outside the
    // vocabulary.
    unsafe { launch(x, &call) }
}

pub fn overwrite(s: &mut CudaStorage, l: &Layout, values: HostValues<'_>) -> Result<()> {
    let at = range(l, "the buffer")?;
    let stream = s.device.cuda_stream();
    // Straight on the stream, past candle's cache of small uploads (which a recording
    // reads instead of uploading): these values change every step.
    match values {
        HostValues::U32(v) => {
            let mut d = s.as_cuda_slice_mut::<u32>()?.slice_mut(at);
            stream.memcpy_htod(v, &mut d).map_err(cuda_error)?;
        }
        HostValues::F32(v) => {
            let mut d = s.as_cuda_slice_mut::<f32>()?.slice_mut(at);
            stream.memcpy_htod(v, &mut d).map_err(cuda_error)?;
        }
    }
    Ok(())
}

/// Records the work `body` puts on `device`'s stream as a CUDA graph, without running
/// it. candle's small uploads of kernel parameters are served from its cache meanwhile
/// (filled by an eager run of the same work just before: a recording cannot upload);
/// memory allocated inside is the graph's, freed inside or before its next launch.
pub fn record(
    device: &candle_core::CudaDevice,
    body: impl FnOnce() -> Result<()>,
) -> Result<cudarc::driver::CudaGraph> {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    let stream = device.cuda_stream();
    let _cache = device.enable_cuda_graph_htod_cache();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(cuda_error)?;
    let ran = body();
    // Capture always ends, also when the body failed.
    let graph = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    ran?;
    let graph = graph
        .map_err(cuda_error)?
        .ok_or_else(|| candle_core::Error::Msg("the recording holds no work".into()))?;
    graph.upload().map_err(cuda_error)?;
    Ok(graph)
}
