//! The device backend's own operations on candle tensors, as custom ops, each with a
//! CPU implementation (what `--device candle-cpu` and the tests run, with the CPU
//! engine's arithmetic) and a CUDA kernel (`kernels.cu`, compiled by nvcc in the
//! `cuda` feature): the paged KV cache's write and attention, and RMSNorm and SwiGLU
//! fused into one kernel each (several candle ops otherwise, each a launch), and the
//! draw of sampled tokens, so that a step downloads ids rather than rows of logits.
//!
//! The cache of one layer is a pair of tensors `[blocks, block_size, kv_heads,
//! head_dim]` (keys, values). [`write_cache`] stores a step's new keys or values
//! through a slot mapping (slot = block · block_size + offset, one per token);
//! [`attend`] computes each query token's causal attention by reading its sequence's
//! positions through that sequence's block table. One op serves decode, prefill and
//! chunked prefill alike: every token carries its sequence and how many positions it
//! sees.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
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
}

/// Stores `new` (`[tokens, kv_heads, head_dim]`, f32) into `cache` (`[blocks,
/// block_size, kv_heads, head_dim]`, f16, bf16 or f32) at `slots` (`[tokens]` u32),
/// converting to the cache's type.
pub fn write_cache(cache: &Tensor, new: &Tensor, slots: &Tensor) -> Result<()> {
    let (blocks, bs, kvh, d) = cache.dims4()?;
    let (tokens, nkvh, nd) = new.dims3()?;
    if (nkvh, nd) != (kvh, d) || new.dtype() != DType::F32 {
        bail!(
            "write_cache: entries {:?} {:?} do not fit a cache of [{blocks}, {bs}, {kvh}, {d}]",
            new.dims(),
            new.dtype()
        );
    }
    if slots.dims1()? != tokens || slots.dtype() != DType::U32 {
        bail!("write_cache: {tokens} entries need {tokens} u32 slots");
    }
    cache.inplace_op3(new, slots, &WriteCache)
}

struct WriteCache;

impl candle_core::InplaceOp3 for WriteCache {
    fn name(&self) -> &'static str {
        "paged-write-cache"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        new: &CpuStorage,
        new_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        cpu::write_cache(dst, dst_l, new, new_l, slots, slots_l)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        new: &candle_core::CudaStorage,
        new_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        cuda::write_cache(dst, dst_l, new, new_l, slots, slots_l)
    }
}

/// Causal attention of `q` (`[tokens, heads, head_dim]`, f32) over the cached `keys`
/// and `values` (`[blocks, block_size, kv_heads, head_dim]`): token `t` attends to the
/// first `len` positions of its sequence, as `plan` says. Returns `[tokens, heads,
/// head_dim]` f32.
pub fn attend(q: &Tensor, keys: &Tensor, values: &Tensor, plan: &AttendPlan) -> Result<Tensor> {
    let (tokens, heads, d) = q.dims3()?;
    let (_, _, kvh, kd) = keys.dims4()?;
    if kd != d || keys.dims() != values.dims() || keys.dtype() != values.dtype() {
        bail!(
            "attend: queries {:?}, keys {:?} and values {:?} do not agree",
            q.dims(),
            keys.dims(),
            values.dims()
        );
    }
    if kvh == 0 || !heads.is_multiple_of(kvh) || q.dtype() != DType::F32 {
        bail!("attend: {heads} query heads cannot share {kvh} KV heads");
    }
    if plan.tokens.dims2()? != (tokens, 2) || plan.tokens.dtype() != DType::U32 {
        bail!("attend: {tokens} tokens need a [{tokens}, 2] u32 plan");
    }
    if plan.tables.rank() != 2 || plan.tables.dtype() != DType::U32 {
        bail!("attend: block tables must be [sequences, blocks] u32");
    }
    let op = Attend {
        plan: plan.clone(),
        scale: 1.0 / (d as f32).sqrt(),
    };
    q.contiguous()?.apply_op3_no_bwd(keys, values, &op)
}

struct Attend {
    plan: AttendPlan,
    scale: f32,
}

impl candle_core::CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "paged-attend"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
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
        let out = cpu::attend(q, q_l, k, k_l, v, v_l, &args)?;
        Ok((out, q_l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::attend(q, q_l, k, k_l, v, v_l, &self.plan, self.scale)
    }
}

/// RMSNorm of each row of `x` (`[rows, width]` f32) scaled by `weight` (`[width]`):
/// the sum of squares in f64, as the CPU engine and llama.cpp take it.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let (_, width) = x.dims2()?;
    if weight.dims1()? != width || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        bail!(
            "rms_norm: rows {:?} and weight {:?} must be f32 of one width",
            x.dims(),
            weight.dims()
        );
    }
    x.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &RmsNorm { eps })
}

struct RmsNorm {
    eps: f32,
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
            cpu::rms_norm(x, x_l, w, w_l, self.eps)?,
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
        cuda::rms_norm(x, x_l, w, w_l, self.eps)
    }
}

/// `silu(gate) · up` of rows holding gate then up (`[rows, 2 · h]` f32) → `[rows, h]`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    let (_, width) = gate_up.dims2()?;
    if !width.is_multiple_of(2) || gate_up.dtype() != DType::F32 {
        bail!(
            "swiglu: rows {:?} must be f32 of an even width",
            gate_up.dims()
        );
    }
    gate_up.contiguous()?.apply_op1_no_bwd(&Swiglu)
}

struct Swiglu;

impl candle_core::CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        Ok((cpu::swiglu(x, l)?, Shape::from((rows, width / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::swiglu(x, l)
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
