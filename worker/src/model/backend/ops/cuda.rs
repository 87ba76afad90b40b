//! Launching the device backend's kernels (`kernels.cu`, built into a fat binary for the
//! GPU generations the build names, with PTX for newer ones) on candle's stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout, Result, Shape, Tensor, bail};
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};

use super::launch::{Launch, MAX_HEAD_DIM};
use super::{AttendPlan, Rotation};

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

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        other => bail!("device kernels: elements of {other:?} are not supported"),
    })
}

/// Runs `$body` with `$view` bound to elements `$range` of `$storage`, a product's
/// output, as the type it holds (f32, or a half-precision weight's f16 or bf16).
macro_rules! product_view {
    ($storage:expr, $range:expr, |$view:ident| $body:block) => {
        match $storage.dtype() {
            DType::F16 => {
                let $view = $storage.as_cuda_slice::<half::f16>()?.slice($range);
                $body
            }
            DType::BF16 => {
                let $view = $storage.as_cuda_slice::<half::bf16>()?.slice($range);
                $body
            }
            _ => {
                let $view = $storage.as_cuda_slice::<f32>()?.slice($range);
                $body
            }
        }
    };
}

fn offsets(l: &Layout, what: &str) -> Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("paged kernels: {what} must be contiguous")))
}

/// The rotation's integer arguments, as the kernels take them: tokens, row width,
/// query width, KV width, head_dim, half, interleaved.
fn rotation_args(r: &Rotation, tokens: usize) -> [u32; 7] {
    [
        tokens as u32,
        (r.q_width() + 2 * r.kv_width()) as u32,
        r.q_width() as u32,
        r.kv_width() as u32,
        r.head_dim as u32,
        r.half as u32,
        u32::from(r.interleaved),
    ]
}

#[allow(clippy::too_many_arguments)] // candle's InplaceOp3::cuda_fwd, plus the op's fields
pub fn write_kv(
    cache: &mut CudaStorage,
    cache_l: &Layout,
    qkv: &CudaStorage,
    qkv_l: &Layout,
    trig: &CudaStorage,
    trig_l: &Layout,
    slots: &Tensor,
    rotation: &Rotation,
) -> Result<()> {
    let tokens = qkv_l.dims()[0];
    let (c0, c1) = offsets(cache_l, "the cache")?;
    let (q0, q1) = offsets(qkv_l, "the QKV rows")?;
    let (t0, t1) = offsets(trig_l, "the angles")?;
    let (slots, slots_l) = slots.storage_and_layout();
    let candle_core::Storage::Cuda(slots) = &*slots else {
        bail!("write_kv: the slots are not on the GPU with the cache");
    };
    let (s0, s1) = offsets(slots_l, "the slots")?;
    let name = format!(
        "paged_write_kv_{}_{}",
        suffix(cache.dtype())?,
        suffix(qkv.dtype())?
    );
    let func = function(cache, &name)?;
    let stream = cache.device.cuda_stream();
    let trig = trig.as_cuda_slice::<f32>()?.slice(t0..t1);
    let slots = slots.as_cuda_slice::<u32>()?.slice(s0..s1);
    let [tokens32, width, q_width, kv_width, d, half, interleaved] =
        rotation_args(rotation, tokens);
    // Keys, then values, each half of the layer's cache.
    let values_at = ((c1 - c0) / 2) as u64;
    let cfg = Launch::elementwise(tokens32 * 2 * kv_width).into();
    macro_rules! launch {
        ($t:ty) => {{
            let mut c = cache.as_cuda_slice_mut::<$t>()?.slice_mut(c0..c1);
            product_view!(qkv, q0..q1, |qkv| {
                let mut b = stream.launch_builder(&func);
                b.arg(&mut c).arg(&qkv).arg(&trig).arg(&slots);
                b.arg(&tokens32)
                    .arg(&width)
                    .arg(&q_width)
                    .arg(&kv_width)
                    .arg(&d)
                    .arg(&half)
                    .arg(&interleaved)
                    .arg(&values_at);
                // SAFETY: the arguments match the kernel's signature; the op checked
                // the shapes, and slots come from block tables checked against the
                // cache's size before the step.
                unsafe { b.launch(cfg) }.map_err(cuda_error)?;
            })
        }};
    }
    match cache.dtype() {
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
        _ => launch!(f32),
    }
    Ok(())
}

pub fn rotate_queries(
    qkv: &CudaStorage,
    qkv_l: &Layout,
    trig: &CudaStorage,
    trig_l: &Layout,
    rotation: &Rotation,
    round_to: DType,
) -> Result<(CudaStorage, Shape)> {
    let tokens = qkv_l.dims()[0];
    let (q0, q1) = offsets(qkv_l, "the QKV rows")?;
    let (t0, t1) = offsets(trig_l, "the angles")?;
    let dev = &qkv.device;
    let n = tokens * rotation.q_width();
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<f32>(n) }?;
    let name = format!(
        "rotate_queries_{}_{}",
        suffix(round_to)?,
        suffix(qkv.dtype())?
    );
    let func = function(qkv, &name)?;
    let stream = dev.cuda_stream();
    let trig = trig.as_cuda_slice::<f32>()?.slice(t0..t1);
    let [tokens32, width, q_width, _, d, half, interleaved] = rotation_args(rotation, tokens);
    product_view!(qkv, q0..q1, |qkv_s| {
        let mut b = stream.launch_builder(&func);
        b.arg(&out).arg(&qkv_s).arg(&trig);
        b.arg(&tokens32)
            .arg(&width)
            .arg(&q_width)
            .arg(&d)
            .arg(&half)
            .arg(&interleaved);
        // SAFETY: the arguments match the kernel's signature and the op checked the
        // shapes.
        unsafe { b.launch(Launch::elementwise(n as u32).into()) }.map_err(cuda_error)?;
    });
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((tokens, rotation.heads, rotation.head_dim)),
    ))
}

pub fn attend(
    q: &CudaStorage,
    q_l: &Layout,
    cache: &CudaStorage,
    cache_l: &Layout,
    plan: &AttendPlan,
    scale: f32,
) -> Result<(CudaStorage, Shape)> {
    let [tokens, heads, d] = *q_l.dims() else {
        bail!("attend: queries must be [tokens, heads, head_dim]");
    };
    let [2, _, bs, kv_heads, _] = *cache_l.dims() else {
        bail!("attend: the cache must be [2, blocks, block_size, kv_heads, head_dim]");
    };
    if d > MAX_HEAD_DIM {
        bail!("attend: head_dim {d} is above the kernel's {MAX_HEAD_DIM}");
    }
    let (tables, tables_l) = plan.tables.storage_and_layout();
    let (meta, meta_l) = plan.tokens.storage_and_layout();
    let (order, order_l) = plan.order.storage_and_layout();
    let (tiles, tiles_l) = plan.tiles.storage_and_layout();
    let (
        candle_core::Storage::Cuda(tables),
        candle_core::Storage::Cuda(meta),
        candle_core::Storage::Cuda(order),
        candle_core::Storage::Cuda(tiles),
    ) = (&*tables, &*meta, &*order, &*tiles)
    else {
        bail!("attend: the plan is not on the GPU with the queries");
    };
    let max_blocks = tables_l.dims()[1] as u32;
    let (t0, t1) = offsets(tables_l, "the block tables")?;
    let (m0, m1) = offsets(meta_l, "the token plan")?;
    let (o0, o1) = offsets(order_l, "the token order")?;
    let (r0, r1) = offsets(tiles_l, "the token tiles")?;
    let (q0, q1) = offsets(q_l, "the queries")?;
    // Keys, then values, each half of the layer's cache.
    let (k0, c1) = offsets(cache_l, "the cache")?;
    let v0 = k0 + (c1 - k0) / 2;
    let dev = &q.device;
    // SAFETY: every element is written by one of the two kernels before it is read:
    // `order` holds every token, the first `singles` for the per-token kernel, the rest
    // in `tiles`.
    let out = unsafe { dev.alloc::<f32>(tokens * heads * d) }?;
    let stream = dev.cuda_stream();
    let q_s = q.as_cuda_slice::<f32>()?.slice(q0..q1);
    let tables = tables.as_cuda_slice::<u32>()?.slice(t0..t1);
    let meta = meta.as_cuda_slice::<u32>()?.slice(m0..m1);
    let order = order.as_cuda_slice::<u32>()?.slice(o0..o1);
    let tiles_s = tiles.as_cuda_slice::<u32>()?.slice(r0..r1);
    let n_tiles = tiles_l.dims()[0];
    // Prompts' runs to the tiled kernel where the head fits it; else every token to
    // the per-token kernel.
    let tiled = Launch::attend_tiles(n_tiles, heads, d).filter(|_| n_tiles > 0);
    let (per_token, longest) = match tiled {
        Some(_) => (plan.singles, plan.longest_single),
        None => (tokens, plan.longest),
    };
    let (chunks, chunk_len) = Launch::attend_chunks(per_token, heads, longest);
    // Each chunk's maximum, sum and unnormalised sums, when sequences are split.
    let partial_len = if chunks > 1 {
        per_token * chunks as usize * heads * (d + 2)
    } else {
        // Not read with one chunk; the kernel still takes a pointer.
        1
    };
    // SAFETY: with chunks, every block writes its entries before attend_combine reads.
    let partial = unsafe { dev.alloc::<f32>(partial_len) }?;
    let suffix = suffix(cache.dtype())?;
    let (heads, kv_heads, d32, bs) = (heads as u32, kv_heads as u32, d as u32, bs as u32);
    macro_rules! launch {
        ($t:ty) => {{
            let keys = cache.as_cuda_slice::<$t>()?.slice(k0..v0);
            let values = cache.as_cuda_slice::<$t>()?.slice(v0..c1);
            let common = CacheArgs {
                out: &out,
                q: &q_s,
                keys: &keys,
                values: &values,
                tables: &tables,
                max_blocks: &max_blocks,
                tokens: &meta,
            };
            if per_token > 0 {
                let func = function(q, &format!("paged_attend_{suffix}"))?;
                let mut b = stream.launch_builder(&func);
                common.push(&mut b);
                b.arg(&order)
                    .arg(&heads)
                    .arg(&kv_heads)
                    .arg(&d32)
                    .arg(&bs)
                    .arg(&scale)
                    .arg(&chunks)
                    .arg(&chunk_len)
                    .arg(&partial);
                let cfg = Launch::attend(per_token, heads as usize, d, chunks).into();
                // SAFETY: the arguments match the kernel's signature; the plan's tables
                // were checked against the cache's size before the step, the first
                // `per_token` entries of `order` are tokens of the step, and `partial`
                // holds `d + 2` floats for each block when there are chunks.
                unsafe { b.launch(cfg) }.map_err(cuda_error)?;
                if chunks > 1 {
                    let func = function(q, "paged_attend_combine")?;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&out)
                        .arg(&partial)
                        .arg(&order)
                        .arg(&heads)
                        .arg(&d32)
                        .arg(&chunks);
                    let cfg = Launch::attend_combine(per_token, heads as usize).into();
                    // SAFETY: as above; the chunks' entries were written just before,
                    // on the same stream.
                    unsafe { b.launch(cfg) }.map_err(cuda_error)?;
                }
            }
            if let Some((shape, positions)) = tiled {
                let func = function(q, &format!("paged_attend_tiles_{suffix}"))?;
                let mut b = stream.launch_builder(&func);
                common.push(&mut b);
                b.arg(&tiles_s)
                    .arg(&heads)
                    .arg(&kv_heads)
                    .arg(&d32)
                    .arg(&bs)
                    .arg(&positions)
                    .arg(&scale);
                // SAFETY: as above; each tile is a run of one sequence's tokens.
                unsafe { b.launch(shape.into()) }.map_err(cuda_error)?;
            }
        }};
    }
    match cache.dtype() {
        DType::F16 => launch!(half::f16),
        DType::BF16 => launch!(half::bf16),
        _ => launch!(f32),
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        q_l.shape().clone(),
    ))
}

/// The arguments both attention kernels begin with: the output, the queries, the
/// layer's keys and values, the block tables and each token's (sequence, length).
struct CacheArgs<'a, 'c, T> {
    out: &'a CudaSlice<f32>,
    q: &'a CudaView<'c, f32>,
    keys: &'a CudaView<'c, T>,
    values: &'a CudaView<'c, T>,
    tables: &'a CudaView<'c, u32>,
    max_blocks: &'a u32,
    tokens: &'a CudaView<'c, u32>,
}

impl<'a, 'c: 'a, T> CacheArgs<'a, 'c, T> {
    fn push(&self, b: &mut LaunchArgs<'a>) {
        b.arg(self.out)
            .arg(self.q)
            .arg(self.keys)
            .arg(self.values)
            .arg(self.tables)
            .arg(self.max_blocks)
            .arg(self.tokens);
    }
}

pub fn rms_norm(
    x: &CudaStorage,
    x_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let (rows, width) = x_l.shape().dims2()?;
    let (x0, x1) = offsets(x_l, "the rows")?;
    let (w0, w1) = offsets(w_l, "the weight")?;
    let dev = &x.device;
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<f32>(rows * width) }?;
    let func = function(x, "rms_norm_f32")?;
    let stream = dev.cuda_stream();
    let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
    let ws = w.as_cuda_slice::<f32>()?.slice(w0..w1);
    let width32 = width as u32;
    let cfg = Launch::per_row(rows).into();
    let mut b = stream.launch_builder(&func);
    b.arg(&out).arg(&xs).arg(&ws).arg(&width32).arg(&eps);
    // SAFETY: the arguments match the kernel's signature and the shapes were checked.
    unsafe { b.launch(cfg) }.map_err(cuda_error)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        x_l.shape().clone(),
    ))
}

#[allow(clippy::too_many_arguments)] // candle's CustomOp3::cuda_fwd, plus the op's field
pub fn add_rms_norm(
    x: &CudaStorage,
    x_l: &Layout,
    y: &CudaStorage,
    y_l: &Layout,
    w: &CudaStorage,
    w_l: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let (rows, width) = x_l.shape().dims2()?;
    let (x0, x1) = offsets(x_l, "the rows")?;
    let (y0, y1) = offsets(y_l, "the added rows")?;
    let (w0, w1) = offsets(w_l, "the weight")?;
    let dev = &x.device;
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<f32>(2 * rows * width) }?;
    let func = function(x, &format!("add_rms_norm_{}", suffix(y.dtype())?))?;
    let stream = dev.cuda_stream();
    let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
    let ws = w.as_cuda_slice::<f32>()?.slice(w0..w1);
    let (rows32, width32) = (rows as u32, width as u32);
    product_view!(y, y0..y1, |ys| {
        let mut b = stream.launch_builder(&func);
        b.arg(&out).arg(&xs).arg(&ys).arg(&ws);
        b.arg(&rows32).arg(&width32).arg(&eps);
        // SAFETY: the arguments match the kernel's signature and the shapes were checked.
        unsafe { b.launch(Launch::per_row(rows).into()) }.map_err(cuda_error)?;
    });
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((2, rows, width)),
    ))
}

pub fn swiglu(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let (rows, width) = l.shape().dims2()?;
    let half = width / 2;
    let (x0, x1) = offsets(l, "the rows")?;
    let dev = &x.device;
    // SAFETY: every element is written by the kernel before it is read.
    let out = unsafe { dev.alloc::<f32>(rows * half) }?;
    let func = function(x, &format!("swiglu_{}", suffix(x.dtype())?))?;
    let stream = dev.cuda_stream();
    let (rows32, half32) = (rows as u32, half as u32);
    product_view!(x, x0..x1, |xs| {
        let mut b = stream.launch_builder(&func);
        b.arg(&out).arg(&xs).arg(&rows32).arg(&half32);
        // SAFETY: the arguments match the kernel's signature and the shapes were checked.
        unsafe { b.launch(Launch::elementwise(rows32 * half32).into()) }.map_err(cuda_error)?;
    });
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, half)),
    ))
}

pub fn draw(
    x: &CudaStorage,
    x_l: &Layout,
    settings: &CudaStorage,
    settings_l: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let (x0, x1) = offsets(x_l, "the logits")?;
    let (s0, s1) = offsets(settings_l, "the draw settings")?;
    let (launch, chunk) = Launch::draw(rows, vocab);
    let dev = &x.device;
    let out = dev.alloc_zeros::<u32>(rows)?;
    let func = function(x, "draw_f32")?;
    let stream = dev.cuda_stream();
    let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
    let ss = settings.as_cuda_slice::<f64>()?.slice(s0..s1);
    let vocab32 = vocab as u32;
    let mut b = stream.launch_builder(&func);
    b.arg(&out).arg(&xs).arg(&ss).arg(&vocab32).arg(&chunk);
    // SAFETY: the arguments match the kernel's signature, the shapes were checked and
    // the bitmap (`chunk` bits a thread) fits the 40 KiB of `MAX_DRAW_VOCAB`.
    unsafe { b.launch(launch.into()) }.map_err(cuda_error)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from(rows),
    ))
}

pub fn top_logprobs(
    x: &CudaStorage,
    x_l: &Layout,
    chosen: &CudaStorage,
    chosen_l: &Layout,
    n: usize,
) -> Result<(CudaStorage, Shape)> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let (x0, x1) = offsets(x_l, "the logits")?;
    let (c0, c1) = offsets(chosen_l, "the chosen ids")?;
    let (launch, chunk) = Launch::draw(rows, vocab);
    let dev = &x.device;
    let out = dev.alloc_zeros::<f32>(rows * (1 + 3 * n))?;
    let func = function(x, "top_logprobs_f32")?;
    let stream = dev.cuda_stream();
    let xs = x.as_cuda_slice::<f32>()?.slice(x0..x1);
    let cs = chosen.as_cuda_slice::<u32>()?.slice(c0..c1);
    let (vocab32, n32) = (vocab as u32, n as u32);
    let mut b = stream.launch_builder(&func);
    b.arg(&out)
        .arg(&xs)
        .arg(&cs)
        .arg(&vocab32)
        .arg(&n32)
        .arg(&chunk);
    // SAFETY: as `draw`'s; `n` is at most the vocabulary (checked by the op).
    unsafe { b.launch(launch.into()) }.map_err(cuda_error)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev.clone()),
        Shape::from((rows, 1 + 3 * n)),
    ))
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
    let n = entries_l.dims()[0] as u32;
    if n == 0 {
        return Ok(());
    }
    let (x0, x1) = offsets(x_l, "the logits")?;
    let (e0, e1) = offsets(entries_l, "the penalty entries")?;
    let (s0, s1) = offsets(settings_l, "the penalty settings")?;
    let func = function(x, "penalise_f32")?;
    let stream = x.device.cuda_stream();
    let es = entries.as_cuda_slice::<u32>()?.slice(e0..e1);
    let ss = settings.as_cuda_slice::<f32>()?.slice(s0..s1);
    let mut xs = x.as_cuda_slice_mut::<f32>()?.slice_mut(x0..x1);
    let vocab32 = vocab as u32;
    let mut b = stream.launch_builder(&func);
    b.arg(&mut xs).arg(&es).arg(&ss).arg(&n).arg(&vocab32);
    // SAFETY: the arguments match the kernel's signature; the op checked the shapes,
    // and the kernel skips ids outside the vocabulary.
    unsafe { b.launch(Launch::elementwise(n).into()) }.map_err(cuda_error)?;
    Ok(())
}
