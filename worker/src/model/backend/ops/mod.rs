//! The device backend's own operations on candle tensors, as custom ops, each with a
//! CPU implementation (what `--device candle-cpu` and the tests run, with the CPU
//! engine's arithmetic) and a CUDA kernel (`kernels.cu`, compiled by nvcc in the
//! `cuda` feature): the paged KV cache's write and attention, and RMSNorm and SwiGLU
//! fused into one kernel each (several candle ops otherwise, each a launch), and the
//! draw of sampled tokens, so that a step downloads ids rather than rows of logits.
//!
//! The cache of one layer is one tensor `[2, blocks, block_size, kv_heads, head_dim]`
//! (keys, then values). [`rotate_and_write`] rotates a step's new keys and stores them
//! and the values through a slot mapping (slot = block · block_size + offset, one per
//! token), and rotates its queries, all straight from the QKV product's rows in one
//! kernel (a rotation in candle ops is a dozen launches a layer);
//! [`attend`] computes each query token's causal attention by reading its sequence's
//! positions through that sequence's block table. One op serves decode, prefill and
//! chunked prefill alike: every token carries its sequence and how many positions it
//! sees.

#[cfg(any(feature = "cuda", test))]
mod calls;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::record;
#[cfg(any(feature = "cuda", test))]
mod launch;

use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor, bail};

use crate::sampling::{Draw, TokenLogprob};

/// Where each query token of a step reads the cache.
#[derive(Clone, Debug)]
pub struct AttendPlan {
    /// `[sequences, max_blocks]` u32: each sequence's block table, padded.
    pub tables: Tensor,
    /// `[tokens, 2]` u32: the token's sequence (a row of `tables`) and the number of
    /// positions it attends to (its own position + 1).
    pub tokens: Tensor,
    /// How the GPU's kernels share the tokens out ([`TokenTiles`]; the CPU twin takes
    /// every token alike): `[tokens]` u32, the tokens of one-token spans first.
    pub order: Tensor,
    /// How many of `order` are one-token spans' (the per-token kernel's).
    pub singles: usize,
    /// `[tiles, 2]` u32: (first token, count) of the other spans' runs of tokens (the
    /// tiled kernel's).
    pub tiles: Tensor,
    /// The most positions any token sees, and any one-token span's token: how finely
    /// the per-token kernel splits sequences (the CPU twin needs neither).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub longest: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub longest_single: usize,
}

#[cfg(test)]
impl AttendPlan {
    /// A plan on `device` from host values: `tables` (`sequences` rows), `tokens` (the
    /// (sequence, positions seen) pairs) and the step's spans' lengths.
    pub fn new(
        tables: Vec<u32>,
        sequences: usize,
        tokens: Vec<u32>,
        span_lens: impl IntoIterator<Item = usize>,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let lens: Vec<usize> = span_lens.into_iter().collect();
        let tiled = TokenTiles::new(lens.iter().copied());
        let n = tokens.len() / 2;
        let max_blocks = tables.len() / sequences.max(1);
        let seen = |t: usize| tokens[2 * t + 1] as usize;
        let longest = (0..n).map(seen).max().unwrap_or(0);
        let longest_single = tiled.order[..tiled.singles]
            .iter()
            .map(|&t| seen(t as usize))
            .max()
            .unwrap_or(0);
        Ok(Self {
            longest,
            longest_single,
            tables: Tensor::from_vec(tables, (sequences, max_blocks), device)?,
            tokens: Tensor::from_vec(tokens, (n, 2), device)?,
            order: Tensor::from_vec(tiled.order, n, device)?,
            singles: tiled.singles,
            tiles: Tensor::from_vec(tiled.tiles.clone(), (tiled.tiles.len() / 2, 2), device)?,
        })
    }
}

/// Tokens a run of the tiled attention kernel holds (`TILE_TOKENS` in `kernels.cu`).
pub const TILE_TOKENS: usize = 16;

/// A step's tokens as the attention kernels share them out: decoding sequences' single
/// tokens to the per-token kernel, prompts' tokens in runs of up to [`TILE_TOKENS`] of
/// one sequence to the tiled kernel, which reads the cache once per run instead of once
/// per token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenTiles {
    /// Every token once: one-token spans' first, then the others in step order.
    pub order: Vec<u32>,
    pub singles: usize,
    /// (first token, count) per run.
    pub tiles: Vec<u32>,
}

impl TokenTiles {
    /// For spans of `lens` tokens, laid out one after another in the step.
    pub fn new(lens: impl IntoIterator<Item = usize>) -> Self {
        let (mut singles, mut others, mut tiles) = (Vec::new(), Vec::new(), Vec::new());
        let mut at = 0u32;
        for len in lens {
            let len = len as u32;
            if len == 1 {
                singles.push(at);
            } else {
                others.extend(at..at + len);
                for first in (at..at + len).step_by(TILE_TOKENS) {
                    tiles.extend([first, (at + len - first).min(TILE_TOKENS as u32)]);
                }
            }
            at += len;
        }
        let n = singles.len();
        singles.extend(others);
        Self {
            order: singles,
            singles: n,
            tiles,
        }
    }
}

/// A type a product's output may have where an op reads it: f32, or the f16/bf16 of a
/// dense half-precision weight (read as f32, exactly; no cast launch between).
fn is_product(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// How a step's queries and keys are rotated (RoPE) as they leave the QKV product,
/// whose rows hold every query head, then every KV head's key, then its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Pairs rotated per head: the first `2 · half` features of a head turn, the
    /// rest pass through (0: none turn).
    pub half: usize,
    /// Pairs of neighbours (`2i`, `2i + 1`) rather than of halves (`i`, `i + half`).
    pub interleaved: bool,
}

impl Rotation {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Checks `qkv` (`[tokens, q | k | v]` f32) and `trig` (`[2, tokens, half]` f32:
    /// cosines, then sines, per token); returns the number of tokens.
    fn check(&self, what: &str, qkv: &Tensor, trig: &Tensor) -> Result<usize> {
        let (tokens, width) = qkv.dims2()?;
        if width != self.q_width() + 2 * self.kv_width() || !is_product(qkv.dtype()) {
            bail!(
                "{what}: rows {:?} {:?} are not Q|K|V of {self:?}",
                qkv.dims(),
                qkv.dtype()
            );
        }
        if 2 * self.half > self.head_dim
            || self.kv_heads == 0
            || !self.heads.is_multiple_of(self.kv_heads)
        {
            bail!("{what}: {self:?} is not a rotation of heads");
        }
        if trig.dims3()? != (2, tokens, self.half) || trig.dtype() != DType::F32 {
            bail!(
                "{what}: {tokens} tokens need [2, {tokens}, {}] f32 angles",
                self.half
            );
        }
        Ok(tokens)
    }
}

/// Writes a step's keys, rotated, and values from `qkv` into one layer's `cache`
/// (`[2, blocks, block_size, kv_heads, head_dim]`: keys, then values; f16, bf16 or
/// f32) at `slots` (`[tokens]` u32, slot = block · block_size + offset), converting to
/// the cache's type, and returns the step's queries rotated and rounded to the cache's
/// type (queries meet keys at the cache's precision, as in the CPU engine and in
/// half-precision attention kernels), as f32 `[tokens, heads, head_dim]`; `trig` holds
/// the tokens' angles (see [`Rotation`]). One kernel.
pub fn rotate_and_write(
    cache: &Tensor,
    qkv: &Tensor,
    trig: &Tensor,
    slots: &Tensor,
    rotation: Rotation,
) -> Result<Tensor> {
    let tokens = rotation.check("rotate_and_write", qkv, trig)?;
    let (two, _, _, kvh, d) = cache.dims5()?;
    if two != 2 || (kvh, d) != (rotation.kv_heads, rotation.head_dim) {
        bail!(
            "rotate_and_write: {rotation:?} does not fit a cache of {:?}",
            cache.dims()
        );
    }
    if !matches!(cache.dtype(), DType::F16 | DType::BF16 | DType::F32) {
        bail!(
            "rotate_and_write: a cache of {:?} is not supported",
            cache.dtype()
        );
    }
    if slots.dims1()? != tokens || slots.dtype() != DType::U32 {
        bail!("rotate_and_write: {tokens} tokens need {tokens} u32 slots");
    }
    let op = RotateAndWrite {
        slots: slots.contiguous()?,
        rotation,
        queries: SecondOutput::default(),
    };
    cache.inplace_op3(&qkv.contiguous()?, &trig.contiguous()?, &op)?;
    op.queries.take(cache)
}

struct RotateAndWrite {
    slots: Tensor,
    rotation: Rotation,
    queries: SecondOutput,
}

impl candle_core::InplaceOp3 for RotateAndWrite {
    fn name(&self) -> &'static str {
        "paged-rotate-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_l: &Layout,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        trig: &CpuStorage,
        trig_l: &Layout,
    ) -> Result<()> {
        let (slots, slots_l) = self.slots.storage_and_layout();
        let candle_core::Storage::Cpu(slots) = &*slots else {
            bail!("rotate_and_write: the slots are not on the CPU with the cache");
        };
        let slots = cpu::u32s(slots, slots_l)?;
        let r = &self.rotation;
        cpu::write_kv(cache, cache_l, qkv, qkv_l, trig, trig_l, slots, r)?;
        let round_to = candle_core::backend::BackendStorage::dtype(&*cache);
        let q = cpu::rotate_queries(qkv, qkv_l, trig, trig_l, r, round_to)?;
        let shape = Shape::from((qkv_l.dims()[0], r.heads, r.head_dim));
        self.queries.put_cpu(q, shape)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        qkv: &candle_core::CudaStorage,
        qkv_l: &Layout,
        trig: &candle_core::CudaStorage,
        trig_l: &Layout,
    ) -> Result<()> {
        let r = &self.rotation;
        let q = cuda::rotate_and_write(cache, cache_l, qkv, qkv_l, trig, trig_l, &self.slots, r)?;
        let shape = Shape::from((qkv_l.dims()[0], r.heads, r.head_dim));
        self.queries.put_cuda(q, shape)
    }
}

/// Causal attention of `q` (`[tokens, heads, head_dim]`, f32) over one layer's
/// `cache` (`[2, blocks, block_size, kv_heads, head_dim]`: keys, then values): token
/// `t` attends to the first `len` positions of its sequence, as `plan` says. Returns
/// `[tokens, heads, head_dim]` of `out`: f32, or the half-precision type of the product
/// the output feeds (rounded once, where a cast after the op would round it).
pub fn attend(q: &Tensor, cache: &Tensor, plan: &AttendPlan, out: DType) -> Result<Tensor> {
    let (tokens, heads, d) = q.dims3()?;
    let (two, _, _, kvh, kd) = cache.dims5()?;
    if two != 2 || kd != d {
        bail!(
            "attend: queries {:?} and the cache {:?} do not agree",
            q.dims(),
            cache.dims()
        );
    }
    if kvh == 0 || !heads.is_multiple_of(kvh) || q.dtype() != DType::F32 {
        bail!("attend: {heads} query heads cannot share {kvh} KV heads");
    }
    if !is_product(out) {
        bail!("attend: outputs of {out:?} are not supported");
    }
    if plan.tokens.dims2()? != (tokens, 2) || plan.tokens.dtype() != DType::U32 {
        bail!("attend: {tokens} tokens need a [{tokens}, 2] u32 plan");
    }
    if plan.tables.rank() != 2 || plan.tables.dtype() != DType::U32 {
        bail!("attend: block tables must be [sequences, blocks] u32");
    }
    if plan.order.dims1()? != tokens || plan.order.dtype() != DType::U32 || plan.singles > tokens {
        bail!("attend: {tokens} tokens need an order of {tokens} u32");
    }
    let (_, two) = plan.tiles.dims2()?;
    if two != 2 || plan.tiles.dtype() != DType::U32 {
        bail!("attend: token tiles must be [tiles, 2] u32");
    }
    let op = Attend {
        plan: plan.clone(),
        scale: 1.0 / (d as f32).sqrt(),
        out,
    };
    q.contiguous()?.apply_op2_no_bwd(cache, &op)
}

struct Attend {
    plan: AttendPlan,
    scale: f32,
    out: DType,
}

impl candle_core::CustomOp2 for Attend {
    fn name(&self) -> &'static str {
        "paged-attend"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        cache: &CpuStorage,
        cache_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tables, tables_l) = self.plan.tables.storage_and_layout();
        let (tokens, tokens_l) = self.plan.tokens.storage_and_layout();
        let (candle_core::Storage::Cpu(tables), candle_core::Storage::Cpu(tokens)) =
            (&*tables, &*tokens)
        else {
            bail!("attend: the plan is not on the CPU with the queries");
        };
        let args = cpu::AttendArgs {
            tables: cpu::u32s(tables, tables_l)?,
            max_blocks: tables_l.dims()[1],
            tokens: cpu::u32s(tokens, tokens_l)?,
            scale: self.scale,
        };
        let out = cpu::attend(q, q_l, cache, cache_l, &args, self.out)?;
        Ok((out, q_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        cache: &candle_core::CudaStorage,
        cache_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::attend(q, q_l, cache, cache_l, &self.plan, self.scale, self.out)
    }
}

/// RMSNorm of each row of `x` (`[rows, width]` f32) scaled by `weight` (`[width]`):
/// the sum of squares in f64, as the CPU engine and llama.cpp take it. The rows come
/// out as `out`: f32, or the half-precision type of the product they feed (rounded
/// once, where a cast after the op would round them).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32, out: DType) -> Result<Tensor> {
    let (_, width) = x.dims2()?;
    if weight.dims1()? != width || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        bail!(
            "rms_norm: rows {:?} and weight {:?} must be f32 of one width",
            x.dims(),
            weight.dims()
        );
    }
    if !is_product(out) {
        bail!("rms_norm: outputs of {out:?} are not supported");
    }
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps, out })
}

struct RmsNorm {
    eps: f32,
    out: DType,
}

impl candle_core::CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu::rms_norm(x, x_l, w, w_l, self.eps, self.out)?,
            x_l.shape().clone(),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm(x, x_l, w, w_l, self.eps, self.out)
    }
}

/// The residual connection and the next RMSNorm in one kernel: `x += y` in place (`x`
/// `[rows, width]` f32, contiguous; `y` a product's output, f32, f16 or bf16), and the
/// RMSNorm of the sums scaled by `weight`, returned as `out` (see [`rms_norm`]).
pub fn add_rms_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    eps: f32,
    out: DType,
) -> Result<Tensor> {
    let (_, width) = x.dims2()?;
    if x.dims() != y.dims()
        || x.dtype() != DType::F32
        || !x.is_contiguous()
        || !is_product(y.dtype())
    {
        bail!(
            "add_rms_norm: rows {:?} (f32, contiguous) and {:?} (f32, f16 or bf16) must be of one shape",
            x.dims(),
            y.dims()
        );
    }
    if weight.dims1()? != width || weight.dtype() != DType::F32 || !is_product(out) {
        bail!(
            "add_rms_norm: the weight {:?} must be f32 of width {width}, the output f32, f16 or bf16",
            weight.dims()
        );
    }
    let op = AddRmsNorm {
        eps,
        out,
        normed: SecondOutput::default(),
    };
    x.inplace_op3(&y.contiguous()?, &weight.contiguous()?, &op)?;
    op.normed.take(x)
}

struct AddRmsNorm {
    eps: f32,
    out: DType,
    normed: SecondOutput,
}

impl candle_core::InplaceOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        x_l: &Layout,
        y: &CpuStorage,
        y_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<()> {
        let normed = cpu::add_rms_norm(x, x_l, y, y_l, w, w_l, self.eps, self.out)?;
        self.normed.put_cpu(normed, x_l.shape().clone())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut candle_core::CudaStorage,
        x_l: &Layout,
        y: &candle_core::CudaStorage,
        y_l: &Layout,
        w: &candle_core::CudaStorage,
        w_l: &Layout,
    ) -> Result<()> {
        let normed = cuda::add_rms_norm(x, x_l, y, y_l, w, w_l, self.eps, self.out)?;
        self.normed.put_cuda(normed, x_l.shape().clone())
    }
}

/// Host values to copy into a kept device buffer.
#[derive(Clone, Copy, Debug)]
pub enum HostValues<'a> {
    U32(&'a [u32]),
    F32(&'a [f32]),
}

impl HostValues<'_> {
    fn len(&self) -> usize {
        match self {
            Self::U32(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }
}

/// Copies `values` over the elements of `t` (contiguous, of their type and number), in
/// place: the inputs of a step into buffers a recorded step reads.
pub fn overwrite(t: &Tensor, values: HostValues<'_>) -> Result<()> {
    let dtype = match values {
        HostValues::U32(_) => DType::U32,
        HostValues::F32(_) => DType::F32,
    };
    if t.dtype() != dtype || t.elem_count() != values.len() || !t.is_contiguous() {
        bail!(
            "overwrite: {} {dtype:?} values into {:?} {:?}",
            values.len(),
            t.dims(),
            t.dtype()
        );
    }
    t.inplace_op1(&Overwrite(values))
}

struct Overwrite<'a>(HostValues<'a>);

impl candle_core::InplaceOp1 for Overwrite<'_> {
    fn name(&self) -> &'static str {
        "overwrite"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("overwrite: the buffer must be contiguous");
        };
        match (s, self.0) {
            (CpuStorage::U32(d), HostValues::U32(v)) => d[start..end].copy_from_slice(v),
            (CpuStorage::F32(d), HostValues::F32(v)) => d[start..end].copy_from_slice(v),
            _ => bail!("overwrite: values of another type than the buffer's"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        cuda::overwrite(s, l, self.0)
    }
}

/// A second output of an in-place op: candle's in-place ops return nothing and its
/// custom ops one tensor, so the op's forward leaves its other output here and
/// [`SecondOutput::take`] hands it out as a tensor through an op that returns it as it
/// is (no copy, no launch).
#[derive(Default)]
struct SecondOutput {
    cpu: std::sync::Mutex<Option<(CpuStorage, Shape)>>,
    #[cfg(feature = "cuda")]
    cuda: std::sync::Mutex<Option<(candle_core::CudaStorage, Shape)>>,
}

fn poisoned<T>(_: T) -> candle_core::Error {
    candle_core::Error::Msg("device ops: a second output's lock was poisoned".into())
}

impl SecondOutput {
    fn put_cpu(&self, storage: CpuStorage, shape: Shape) -> Result<()> {
        *self.cpu.lock().map_err(poisoned)? = Some((storage, shape));
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn put_cuda(&self, storage: candle_core::CudaStorage, shape: Shape) -> Result<()> {
        *self.cuda.lock().map_err(poisoned)? = Some((storage, shape));
        Ok(())
    }

    /// The output, on `anchor`'s device (any tensor there; it is not read).
    fn take(&self, anchor: &Tensor) -> Result<Tensor> {
        anchor.apply_op1_no_bwd(&Adopt(self))
    }
}

struct Adopt<'a>(&'a SecondOutput);

fn missing() -> candle_core::Error {
    candle_core::Error::Msg("device ops: an in-place op left no second output".into())
}

impl candle_core::CustomOp1 for Adopt<'_> {
    fn name(&self) -> &'static str {
        "second-output"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0
            .cpu
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(missing)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0
            .cuda
            .lock()
            .map_err(poisoned)?
            .take()
            .ok_or_else(missing)
    }
}

/// `silu(gate) · up` of rows holding gate then up (`[rows, 2 · h]` f32) → `[rows, h]`.
pub fn swiglu(gate_up: &Tensor, out: DType) -> Result<Tensor> {
    let (_, width) = gate_up.dims2()?;
    if !width.is_multiple_of(2) || !is_product(gate_up.dtype()) || !is_product(out) {
        bail!(
            "swiglu: rows {:?} must be f32, f16 or bf16 of an even width, into f32, f16 or bf16",
            gate_up.dims()
        );
    }
    gate_up.contiguous()?.apply_op1_no_bwd(&Swiglu { out })
}

struct Swiglu {
    out: DType,
}

impl candle_core::CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        Ok((cpu::swiglu(x, l, self.out)?, Shape::from((rows, width / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu(x, l, self.out)
    }
}

/// Applies penalties to rows of logits (`[rows, vocab]` f32) in place, as
/// [`crate::sampling::Penalties`] defines them: `entries` (`[n, 3]` u32) are (row, token
/// id, times generated) of each token a row's sequence has seen, `settings` (`[rows, 3]`
/// f32) each row's repetition, presence and frequency penalties.
pub fn penalise(logits: &Tensor, entries: &Tensor, settings: &Tensor) -> Result<()> {
    let (rows, _) = logits.dims2()?;
    if logits.dtype() != DType::F32 || !logits.is_contiguous() {
        bail!(
            "penalise: logits {:?} must be contiguous f32 rows",
            logits.dims()
        );
    }
    let (_, three) = entries.dims2()?;
    if three != 3 || entries.dtype() != DType::U32 {
        bail!("penalise: entries {:?} must be [n, 3] u32", entries.dims());
    }
    if settings.dims2()? != (rows, 3) || settings.dtype() != DType::F32 {
        bail!("penalise: {rows} rows need [{rows}, 3] f32 settings");
    }
    logits.inplace_op3(&entries.contiguous()?, &settings.contiguous()?, &Penalise)
}

struct Penalise;

impl candle_core::InplaceOp3 for Penalise {
    fn name(&self) -> &'static str {
        "penalise"
    }

    fn cpu_fwd(
        &self,
        x: &mut CpuStorage,
        x_l: &Layout,
        entries: &CpuStorage,
        entries_l: &Layout,
        settings: &CpuStorage,
        settings_l: &Layout,
    ) -> Result<()> {
        cpu::penalise(x, x_l, entries, entries_l, settings, settings_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &mut candle_core::CudaStorage,
        x_l: &Layout,
        entries: &candle_core::CudaStorage,
        entries_l: &Layout,
        settings: &candle_core::CudaStorage,
        settings_l: &Layout,
    ) -> Result<()> {
        cuda::penalise(x, x_l, entries, entries_l, settings, settings_l)
    }
}

/// The largest vocabulary the draw kernels take: they mark kept tokens in a bitmap of
/// shared memory, at most 40 KiB of the 48 KiB a block has without opting in (their
/// reductions take 6 KiB).
pub const MAX_DRAW_VOCAB: usize = 40 * 1024 * 8;

/// Draws one token id from each row of `logits` (`[rows, vocab]` f32) as
/// [`crate::sampling::draw`] defines it, at the row's settings in `settings`
/// (`[rows, 5]` f64: temperature, top-k, top-p, min-p, uniform; temperature 0 is
/// the argmax). Returns `[rows]` u32.
pub fn draw(logits: &Tensor, settings: &Tensor) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || vocab > MAX_DRAW_VOCAB {
        bail!(
            "draw: logits {:?} {:?} must be f32 rows of at most {MAX_DRAW_VOCAB}",
            logits.dims(),
            logits.dtype()
        );
    }
    if settings.dims2()? != (rows, 5) || settings.dtype() != DType::F64 {
        bail!("draw: {rows} rows need [{rows}, 5] f64 settings");
    }
    logits
        .contiguous()?
        .apply_op2_no_bwd(&settings.contiguous()?, &DrawOp)
}

/// A pick as the draw op reads it: temperature, top-k, top-p, min-p, uniform
/// (temperature 0: the best id).
pub fn draw_settings(draw: &Option<Draw>) -> [f64; 5] {
    match draw {
        None => [0.0, 0.0, 1.0, 0.0, 0.0],
        Some(d) => [
            f64::from(d.temperature),
            // Beyond the vocabulary, top-k keeps everything, as at 0.
            d.top_k.min(u32::MAX as usize) as f64,
            f64::from(d.top_p),
            f64::from(d.min_p),
            d.uniform,
        ],
    }
}

struct DrawOp;

impl candle_core::CustomOp2 for DrawOp {
    fn name(&self) -> &'static str {
        "draw"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        settings: &CpuStorage,
        settings_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu::draw(x, x_l, settings, settings_l)?,
            Shape::from(x_l.dims()[0]),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        settings: &candle_core::CudaStorage,
        settings_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::draw(x, x_l, settings, settings_l)
    }
}

/// The log-probabilities of each row's `chosen` id (`[rows]` u32) and of its `n` most
/// likely tokens, as [`crate::sampling::logprobs_of`] defines them, from `logits`
/// (`[rows, vocab]` f32, at most [`MAX_DRAW_VOCAB`] wide). Returns `[rows, 1 + 3n]`
/// f32: the chosen id's log-probability, then `n` triples (id, logit with NaN read as
/// `-inf`, log-probability) in id order ([`read_top_logprobs`] reads a row).
pub fn top_logprobs(logits: &Tensor, chosen: &Tensor, n: usize) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if logits.dtype() != DType::F32 || vocab > MAX_DRAW_VOCAB || n > vocab {
        bail!(
            "top_logprobs: logits {:?} {:?} must be f32 rows of at most {MAX_DRAW_VOCAB}, \
             at least {n} wide",
            logits.dims(),
            logits.dtype()
        );
    }
    if chosen.dims1()? != rows || chosen.dtype() != DType::U32 {
        bail!("top_logprobs: {rows} rows need {rows} u32 chosen ids");
    }
    logits
        .contiguous()?
        .apply_op2_no_bwd(&chosen.contiguous()?, &TopLogprobs { n })
}

/// One row of [`top_logprobs`] as the sampling module gives it: the chosen id's
/// entry and the `k` most likely, best first (ties to the lower id).
pub fn read_top_logprobs(row: &[f32], chosen: u32, k: usize) -> (TokenLogprob, Vec<TokenLogprob>) {
    let mut top: Vec<(f32, TokenLogprob)> = row[1..]
        .chunks_exact(3)
        .map(|entry| {
            let token = TokenLogprob {
                // Ids are below MAX_DRAW_VOCAB < 2^24: exact in an f32.
                id: entry[0] as u32,
                logprob: entry[2],
            };
            (entry[1], token)
        })
        .collect();
    // By logit (log-probabilities can tie where logits do not: beside +inf, all are -inf).
    top.sort_by(|(la, a), (lb, b)| lb.total_cmp(la).then(a.id.cmp(&b.id)));
    let top = top.into_iter().take(k).map(|(_, t)| t).collect();
    (
        TokenLogprob {
            id: chosen,
            logprob: row[0],
        },
        top,
    )
}

struct TopLogprobs {
    n: usize,
}

impl candle_core::CustomOp2 for TopLogprobs {
    fn name(&self) -> &'static str {
        "top-logprobs"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        chosen: &CpuStorage,
        chosen_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((
            cpu::top_logprobs(x, x_l, chosen, chosen_l, self.n)?,
            Shape::from((x_l.dims()[0], 1 + 3 * self.n)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_l: &Layout,
        chosen: &candle_core::CudaStorage,
        chosen_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::top_logprobs(x, x_l, chosen, chosen_l, self.n)
    }
}

#[cfg(test)]
mod tests;
