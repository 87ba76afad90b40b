//! The CPU implementations of the device backend's ops, with the CPU engine's
//! arithmetic (its dot products, exponential, sums and row kernels), so that on
//! candle's CPU device the device backend computes the CPU engine's numbers.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, WithDType, bail};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::model::causal::{dot, max, sum};
use crate::model::exp::exp;
use crate::model::rows::{self, Rows};

/// The elements of a contiguous tensor's storage, from its offset.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("paged op: {what} must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[start..end])
}

pub fn u32s<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    slice(s, l, "an index tensor")
}

/// A product's output as f32: f32 as it is, f16 and bf16 widened (exactly).
fn product<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Cow<'a, [f32]>> {
    Ok(match s {
        CpuStorage::F16(_) => slice::<f16>(s, l, what)?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        CpuStorage::BF16(_) => slice::<bf16>(s, l, what)?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        _ => Cow::Borrowed(slice::<f32>(s, l, what)?),
    })
}

/// One head's feature `x` after the rotation: `head` is the head's features, `cos`
/// and `sin` the token's angles (`half` each). The products and the sum rounded one
/// by one, as candle's element-wise ops and the kernel's `_rn` operations do.
fn rotated(head: &[f32], x: usize, cos: &[f32], sin: &[f32], interleaved: bool) -> f32 {
    let half = cos.len();
    if x >= 2 * half {
        return head[x];
    }
    let (i, first) = if interleaved {
        (x / 2, x.is_multiple_of(2))
    } else {
        (x % half, x < half)
    };
    let (x0, x1) = if interleaved {
        (head[2 * i], head[2 * i + 1])
    } else {
        (head[i], head[i + half])
    };
    let (c, s) = (cos[i], sin[i]);
    if first {
        x0 * c - x1 * s
    } else {
        x0 * s + x1 * c
    }
}

/// A step's QKV rows as f32, and its tokens' cosines and sines.
type RotationInputs<'a> = (Cow<'a, [f32]>, &'a [f32], &'a [f32]);

/// Each token's row of `qkv` and its angles, checked against the rotation.
fn rotation_inputs<'a>(
    qkv: &'a CpuStorage,
    qkv_l: &Layout,
    trig: &'a CpuStorage,
    trig_l: &Layout,
    r: &super::Rotation,
) -> Result<RotationInputs<'a>> {
    let qkv = product(qkv, qkv_l, "the QKV rows")?;
    let trig = slice::<f32>(trig, trig_l, "the angles")?;
    let tokens = qkv_l.dims()[0];
    let (cos, sin) = trig.split_at(tokens * r.half);
    Ok((qkv, cos, sin))
}

#[allow(clippy::too_many_arguments)] // candle's InplaceOp3::cpu_fwd, plus the op's fields
pub fn write_kv(
    cache: &mut CpuStorage,
    cache_l: &Layout,
    qkv: &CpuStorage,
    qkv_l: &Layout,
    trig: &CpuStorage,
    trig_l: &Layout,
    slots: &[u32],
    r: &super::Rotation,
) -> Result<()> {
    let (qkv, cos, sin) = rotation_inputs(qkv, qkv_l, trig, trig_l, r)?;
    let Some((start, end)) = cache_l.contiguous_offsets() else {
        bail!("write_kv: the cache must be contiguous");
    };
    let (d, kvw) = (r.head_dim, r.kv_width());
    let width = qkv_l.dims()[1];
    let capacity = cache_l.dims()[1] * cache_l.dims()[2];
    fn store<T: WithDType + Stored>(
        cache: &mut [T],
        rows: impl Iterator<Item = (u32, Vec<f32>, Vec<f32>)>,
        capacity: usize,
        kvw: usize,
    ) -> Result<()> {
        let (keys, values) = cache.split_at_mut(capacity * kvw);
        for (slot, k, v) in rows {
            let slot = slot as usize;
            if slot >= capacity {
                bail!("write_kv: slot {slot} is outside the cache of {capacity}");
            }
            T::store(&mut keys[slot * kvw..][..kvw], &k);
            T::store(&mut values[slot * kvw..][..kvw], &v);
        }
        Ok(())
    }
    let rows = slots.iter().enumerate().map(|(t, &slot)| {
        let row = &qkv[t * width..][..width];
        let (cos, sin) = (&cos[t * r.half..][..r.half], &sin[t * r.half..][..r.half]);
        let k_part = &row[r.q_width()..][..kvw];
        let k: Vec<f32> = (0..kvw)
            .map(|e| rotated(&k_part[e - e % d..][..d], e % d, cos, sin, r.interleaved))
            .collect();
        (slot, k, row[r.q_width() + kvw..][..kvw].to_vec())
    });
    match cache {
        CpuStorage::F16(c) => store::<f16>(&mut c[start..end], rows, capacity, kvw),
        CpuStorage::BF16(c) => store::<bf16>(&mut c[start..end], rows, capacity, kvw),
        CpuStorage::F32(c) => store::<f32>(&mut c[start..end], rows, capacity, kvw),
        other => bail!("write_kv: a cache of {:?} is not supported", other.dtype()),
    }
}

pub fn rotate_queries(
    qkv: &CpuStorage,
    qkv_l: &Layout,
    trig: &CpuStorage,
    trig_l: &Layout,
    r: &super::Rotation,
    round_to: candle_core::DType,
) -> Result<CpuStorage> {
    let (qkv, cos, sin) = rotation_inputs(qkv, qkv_l, trig, trig_l, r)?;
    let (tokens, width) = (qkv_l.dims()[0], qkv_l.dims()[1]);
    let (d, qw) = (r.head_dim, r.q_width());
    let mut out = Vec::with_capacity(tokens * qw);
    for t in 0..tokens {
        let row = &qkv[t * width..][..qw];
        let (cos, sin) = (&cos[t * r.half..][..r.half], &sin[t * r.half..][..r.half]);
        out.extend(
            (0..qw).map(|e| rotated(&row[e - e % d..][..d], e % d, cos, sin, r.interleaved)),
        );
    }
    match round_to {
        candle_core::DType::F16 => f16::round(&mut out),
        candle_core::DType::BF16 => bf16::round(&mut out),
        _ => {}
    }
    Ok(CpuStorage::F32(out))
}

pub struct AttendArgs<'a> {
    pub tables: &'a [u32],
    pub max_blocks: usize,
    /// `(sequence, positions seen)` per token, flattened.
    pub tokens: &'a [u32],
    pub scale: f32,
}

pub fn attend(
    q: &CpuStorage,
    q_l: &Layout,
    cache: &CpuStorage,
    cache_l: &Layout,
    args: &AttendArgs<'_>,
    out: candle_core::DType,
) -> Result<CpuStorage> {
    let q = slice::<f32>(q, q_l, "the queries")?;
    let values = match cache {
        CpuStorage::F16(_) => attend_typed::<f16>(q, q_l, cache, cache_l, args)?,
        CpuStorage::BF16(_) => attend_typed::<bf16>(q, q_l, cache, cache_l, args)?,
        CpuStorage::F32(_) => attend_typed::<f32>(q, q_l, cache, cache_l, args)?,
        _ => bail!("attend: a cache of {:?} is not supported", cache.dtype()),
    };
    typed(values, out)
}

fn attend_typed<T: WithDType + Stored>(
    q: &[f32],
    q_l: &Layout,
    cache: &CpuStorage,
    cache_l: &Layout,
    args: &AttendArgs<'_>,
) -> Result<Vec<f32>> {
    let [tokens, heads, d] = q_l.dims() else {
        bail!("attend: queries must be [tokens, heads, head_dim]");
    };
    let (tokens, heads, d) = (*tokens, *heads, *d);
    let [2, blocks, bs, kvh, _] = cache_l.dims() else {
        bail!("attend: the cache must be [2, blocks, block_size, kv_heads, head_dim]");
    };
    let (blocks, bs, kvh) = (*blocks, *bs, *kvh);
    let (keys, values) = slice::<T>(cache, cache_l, "the cache")?.split_at(blocks * bs * kvh * d);
    let group = heads / kvh;
    let sequences = args.tables.len() / args.max_blocks.max(1);
    // Every token's table and length checked once, before the parallel part.
    for t in 0..tokens {
        let (seq, len) = (args.tokens[2 * t] as usize, args.tokens[2 * t + 1] as usize);
        if seq >= sequences || len.div_ceil(bs) > args.max_blocks {
            bail!("attend: token {t} reads sequence {seq} ({len} positions) beyond the tables");
        }
        let table = &args.tables[seq * args.max_blocks..][..len.div_ceil(bs)];
        if let Some(b) = table.iter().find(|&&b| b as usize >= blocks) {
            bail!("attend: block {b} is outside the cache of {blocks}");
        }
    }
    // One task per (sequence, KV head): its cached positions are widened to f32 once,
    // then every query head of the group, for every token of the sequence, reads them.
    let mut by_seq: Vec<Vec<usize>> = vec![Vec::new(); sequences];
    for t in 0..tokens {
        by_seq[args.tokens[2 * t] as usize].push(t);
    }
    let tasks: Vec<(usize, usize)> = (0..sequences)
        .filter(|&s| !by_seq[s].is_empty())
        .flat_map(|s| (0..kvh).map(move |h| (s, h)))
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(seq, kv_head)| {
            let task = Task {
                q,
                keys,
                values,
                args,
                tokens: &by_seq[seq],
                seq,
                kv_head,
                shape: (heads, kvh, d, bs),
            };
            task.run()
        })
        .collect();
    let mut out = vec![0f32; tokens * heads * d];
    for (&(seq, kv_head), part) in tasks.iter().zip(parts) {
        for (&t, rows) in by_seq[seq].iter().zip(part.chunks_exact(group * d)) {
            out[(t * heads + kv_head * group) * d..][..group * d].copy_from_slice(rows);
        }
    }
    Ok(out)
}

pub fn rms_norm(
    x: &CpuStorage,
    x_l: &Layout,
    w: &CpuStorage,
    w_l: &Layout,
    eps: f32,
    out: candle_core::DType,
) -> Result<CpuStorage> {
    let width = x_l.dims()[1];
    let x = Rows::new(slice::<f32>(x, x_l, "the rows")?.to_vec(), width);
    let w = slice::<f32>(w, w_l, "the weight")?;
    typed(rows::rms_norm(&x, w, eps).into_vec(), out)
}

/// `x += y` in place, and the RMSNorm of the sums (as `out`).
#[allow(clippy::too_many_arguments)] // candle's InplaceOp3::cpu_fwd, plus the op's fields
pub fn add_rms_norm(
    x: &mut CpuStorage,
    x_l: &Layout,
    y: &CpuStorage,
    y_l: &Layout,
    w: &CpuStorage,
    w_l: &Layout,
    eps: f32,
    out: candle_core::DType,
) -> Result<CpuStorage> {
    let width = x_l.dims()[1];
    let (Some((start, end)), CpuStorage::F32(x)) = (x_l.contiguous_offsets(), x) else {
        bail!("add_rms_norm: the rows must be contiguous f32");
    };
    let x = &mut x[start..end];
    let y = product(y, y_l, "the added rows")?;
    x.iter_mut().zip(y.iter()).for_each(|(a, b)| *a += b);
    let sums = Rows::new(x.to_vec(), width);
    let normed = rows::rms_norm(&sums, slice::<f32>(w, w_l, "the weight")?, eps);
    typed(normed.into_vec(), out)
}

pub fn swiglu(x: &CpuStorage, l: &Layout, out: candle_core::DType) -> Result<CpuStorage> {
    let width = l.dims()[1];
    let x = Rows::new(product(x, l, "the rows")?.into_owned(), width);
    typed(rows::swiglu(&x).into_vec(), out)
}

/// `values` as elements of `dtype`: f32, or rounded to the nearest f16 or bf16, as a
/// cast after the op would round them (and the kernels' `from_f32` does).
pub fn typed(values: Vec<f32>, dtype: candle_core::DType) -> Result<CpuStorage> {
    Ok(match dtype {
        candle_core::DType::F32 => CpuStorage::F32(values),
        candle_core::DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        candle_core::DType::BF16 => {
            CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect())
        }
        other => bail!("device ops: outputs of {other:?} are not supported"),
    })
}

/// How entries of the cache's type are stored and weights rounded to it: f16 with the
/// CPU engine's own conversions (F16C where the CPU has it), the others through f64.
pub trait Stored: Sized {
    fn store(dst: &mut [Self], src: &[f32]);
    fn round(x: &mut [f32]);
}

impl Stored for f16 {
    fn store(dst: &mut [f16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn round(x: &mut [f32]) {
        crate::model::causal::round_to_half(x);
    }
}

impl Stored for bf16 {
    fn store(dst: &mut [bf16], src: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
    fn round(x: &mut [f32]) {
        for v in x {
            *v = bf16::from_f32(*v).to_f32();
        }
    }
}

impl Stored for f32 {
    fn store(dst: &mut [f32], src: &[f32]) {
        dst.copy_from_slice(src);
    }
    fn round(_: &mut [f32]) {}
}

/// One (sequence, KV head) of an attention call.
struct Task<'a, T> {
    q: &'a [f32],
    keys: &'a [T],
    values: &'a [T],
    args: &'a AttendArgs<'a>,
    /// The step's tokens of this sequence.
    tokens: &'a [usize],
    seq: usize,
    kv_head: usize,
    /// Query heads, KV heads, head size, block size.
    shape: (usize, usize, usize, usize),
}

impl<T: WithDType + Stored> Task<'_, T> {
    /// The rows `[token][group][head_dim]`, with fused multiply-adds in hardware where
    /// the CPU has them (the CPU engine's kernels make the same choice; the bits are
    /// the same either way).
    fn run(&self) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA were detected on this CPU just above.
            return unsafe { self.run_fma() };
        }
        self.compute()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_fma(&self) -> Vec<f32> {
        self.compute()
    }

    #[inline(always)]
    fn compute(&self) -> Vec<f32> {
        let Self {
            q,
            keys,
            values,
            args,
            tokens: mine,
            seq,
            kv_head,
            shape: (heads, kvh, d, bs),
        } = *self;
        let group = heads / kvh;
        let len = mine
            .iter()
            .map(|&t| args.tokens[2 * t + 1] as usize)
            .max()
            .unwrap_or(0);
        let table = &args.tables[seq * args.max_blocks..];
        // Plain loops, not closures: a closure is compiled on its own, without this
        // function's target features.
        let (mut k, mut v) = (Vec::with_capacity(len * d), Vec::with_capacity(len * d));
        for p in 0..len {
            let at = ((table[p / bs] as usize * bs + p % bs) * kvh + kv_head) * d;
            for x in &keys[at..at + d] {
                k.push(x.to_f64() as f32);
            }
            for x in &values[at..at + d] {
                v.push(x.to_f64() as f32);
            }
        }
        let mut out = vec![0f32; mine.len() * group * d];
        let mut scores = Vec::with_capacity(len);
        for (i, &t) in mine.iter().enumerate() {
            let seen = args.tokens[2 * t + 1] as usize;
            for g in 0..group {
                let h = kv_head * group + g;
                let qr = &q[(t * heads + h) * d..][..d];
                scores.clear();
                for key in k[..seen * d].chunks_exact(d) {
                    scores.push(dot(qr, key) * args.scale);
                }
                // The CPU engine's softmax, step for step: on the CPU device this
                // backend gives its numbers.
                let max = max(&scores);
                for s in scores.iter_mut() {
                    *s = exp(*s - max);
                }
                let inv = 1.0 / sum(&scores);
                // Weights meet values at the cache's precision, as in half-precision
                // attention kernels (and the CPU engine).
                for s in scores.iter_mut() {
                    *s *= inv;
                }
                T::round(&mut scores);
                let o = &mut out[(i * group + g) * d..][..d];
                for (w, value) in scores.iter().zip(v.chunks_exact(d)) {
                    for (x, val) in o.iter_mut().zip(value) {
                        *x = w.mul_add(*val, *x);
                    }
                }
            }
        }
        out
    }
}

/// The draw op of rows of logits (`[rows, vocab]` f32) at each row's settings
/// (`[rows, 5]` f64: temperature, top-k, top-p, min-p, uniform).
pub fn draw(x: &CpuStorage, x_l: &Layout, params: &CpuStorage, p_l: &Layout) -> Result<CpuStorage> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let x = slice::<f32>(x, x_l, "the logits")?;
    let params = slice::<f64>(params, p_l, "the draw settings")?;
    let ids = (0..rows)
        .map(|r| {
            let row = &x[r * vocab..(r + 1) * vocab];
            draw_row(row, &DrawParams::from_row(&params[r * 5..r * 5 + 5]))
        })
        .collect();
    Ok(CpuStorage::U32(ids))
}

/// One row's settings as the kernel reads them.
pub struct DrawParams {
    pub temperature: f64,
    pub top_k: u32,
    pub top_p: f64,
    pub min_p: f64,
    pub uniform: f64,
}

impl DrawParams {
    pub fn from_row(p: &[f64]) -> Self {
        Self {
            temperature: p[0],
            top_k: p[1] as u32,
            top_p: p[2],
            min_p: p[3],
            uniform: p[4],
        }
    }
}

/// A float's bits as a key that orders like the float (no NaN reaches here).
fn key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn unkey(k: u32) -> f32 {
    f32::from_bits(if k & 0x8000_0000 != 0 {
        k & 0x7fff_ffff
    } else {
        !k
    })
}

/// The largest key `v` with `measure(v) ≥ goal`, for a `measure` that does not
/// grow with `v` (the kept tokens' count or weight at keys ≥ `v`): the kernel's
/// bisection, one pass over the row per halving.
fn threshold<T: PartialOrd>(goal: T, measure: impl Fn(u32) -> T) -> u32 {
    let (mut lo, mut hi) = (0u32, u32::MAX);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if measure(mid) >= goal {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// Keeps, of the tokens at key `t`, the first `need` by id (ties of top-k and
/// top-p are broken by id as the host sampler breaks them), drops those below.
fn cut_at(kept: &mut [bool], keys: &[u32], t: u32, need: u64) {
    let mut rank = 0;
    for (k, &key) in kept.iter_mut().zip(keys) {
        if *k && key == t {
            *k = rank < need;
            rank += 1;
        } else if key < t {
            *k = false;
        }
    }
}

/// [`crate::sampling::draw`] as the draw kernel computes it (`draw_f32` in
/// `kernels.cu`): thresholds found by bisection on the logits' keys instead of a
/// sort, ties by rank in id order, the draw by prefix sums in id order. Equal to
/// the host's pick but for rounding in the sums' order.
pub fn draw_row(row: &[f32], p: &DrawParams) -> u32 {
    let logits: Vec<f32> = row
        .iter()
        .map(|&l| {
            if l.is_nan() {
                f32::NEG_INFINITY
            } else {
                l.min(f32::MAX)
            }
        })
        .collect();
    let mut kept: Vec<bool> = logits.iter().map(|&l| l > f32::NEG_INFINITY).collect();
    let candidates = kept.iter().filter(|&&k| k).count() as u64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let argmax = || logits.iter().position(|&l| l == max).unwrap_or(0) as u32;
    if candidates == 0 || p.temperature == 0.0 {
        return argmax();
    }
    let keys: Vec<u32> = logits.iter().map(|&l| key(l)).collect();
    let kept_where = |kept: &[bool], pred: &dyn Fn(u32) -> bool| -> u64 {
        kept.iter()
            .zip(&keys)
            .filter(|&(&k, &key)| k && pred(key))
            .count() as u64
    };

    let k = u64::from(p.top_k);
    if k > 0 && k < candidates {
        let t = threshold(k, |v| kept_where(&kept, &|key| key >= v));
        let above = kept_where(&kept, &|key| key > t);
        cut_at(&mut kept, &keys, t, k - above);
    }

    let weight = |l: f32| ((f64::from(l) - f64::from(max)) / p.temperature).exp();
    let weights: Vec<f64> = logits.iter().map(|&l| weight(l)).collect();
    let mass = |kept: &[bool], pred: &dyn Fn(u32) -> bool| -> f64 {
        kept.iter()
            .zip(&keys)
            .zip(&weights)
            .filter(|&((&k, &key), _)| k && pred(key))
            .map(|(_, w)| w)
            .sum()
    };
    if p.top_p < 1.0 {
        let goal = p.top_p * mass(&kept, &|_| true);
        let t = threshold(goal, |v| mass(&kept, &|key| key >= v));
        let above = mass(&kept, &|key| key > t);
        // Ties weigh the same: enough of them to reach the goal, at least one.
        let need = ((goal - above) / weight(unkey(t))).ceil().max(1.0) as u64;
        cut_at(&mut kept, &keys, t, need);
    }
    if p.min_p > 0.0 {
        for (k, w) in kept.iter_mut().zip(&weights) {
            *k &= *w >= p.min_p;
        }
    }

    let total = mass(&kept, &|_| true);
    if !(total.is_finite() && total > 0.0) {
        return argmax();
    }
    let target = p.uniform * total;
    let mut prefix = 0.0;
    let mut last = None;
    for (id, (&k, &w)) in kept.iter().zip(&weights).enumerate() {
        if k {
            prefix += w;
            if target < prefix {
                return id as u32;
            }
            last = Some(id as u32);
        }
    }
    last.unwrap_or_else(argmax)
}

/// The top-logprobs op of rows of logits (`[rows, vocab]` f32) and each row's
/// chosen id (`[rows]` u32): `[rows, 1 + 3n]`.
pub fn top_logprobs(
    x: &CpuStorage,
    x_l: &Layout,
    chosen: &CpuStorage,
    chosen_l: &Layout,
    n: usize,
) -> Result<CpuStorage> {
    let (rows, vocab) = x_l.shape().dims2()?;
    let x = slice::<f32>(x, x_l, "the logits")?;
    let chosen = u32s(chosen, chosen_l)?;
    let out = (0..rows)
        .flat_map(|r| top_logprobs_row(&x[r * vocab..(r + 1) * vocab], chosen[r], n))
        .collect();
    Ok(CpuStorage::F32(out))
}

/// [`crate::sampling::logprobs_of`] as the kernel computes it (`top_logprobs_f32`):
/// the `n` best found as the draw's top-k is (every token a candidate), written in
/// id order (id, logit, log-probability) after the chosen id's log-probability.
pub fn top_logprobs_row(row: &[f32], chosen: u32, n: usize) -> Vec<f32> {
    let raw: Vec<f32> = row
        .iter()
        .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l })
        .collect();
    let max = raw.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let infinite = raw.iter().filter(|&&l| l == f32::INFINITY).count();
    let sum: f64 = raw
        .iter()
        .map(|&l| (f64::from(l) - f64::from(max)).exp())
        .sum();
    let lse = f64::from(max) + sum.ln();
    let logprob = |l: f32| {
        if max == f32::NEG_INFINITY {
            -(row.len() as f32).ln()
        } else if max == f32::INFINITY {
            if l == f32::INFINITY {
                -(infinite as f32).ln()
            } else {
                f32::NEG_INFINITY
            }
        } else {
            (f64::from(l) - lse) as f32
        }
    };

    let keys: Vec<u32> = raw.iter().map(|&l| key(l.min(f32::MAX))).collect();
    let mut kept = vec![true; row.len()];
    let n = n as u64;
    let t = threshold(n, |v| keys.iter().filter(|&&k| k >= v).count() as u64);
    let above = keys.iter().filter(|&&k| k > t).count() as u64;
    cut_at(&mut kept, &keys, t, n - above);

    let chosen_logprob = raw
        .get(chosen as usize)
        .map_or(f32::NEG_INFINITY, |&l| logprob(l));
    let mut out = vec![chosen_logprob];
    for (id, (&k, &l)) in kept.iter().zip(&raw).enumerate() {
        if k {
            out.extend([id as f32, l, logprob(l)]);
        }
    }
    out
}

/// The penalise op: each (row, id, times generated) entry's logit penalised by its
/// row's (repetition, presence, frequency).
pub fn penalise(
    x: &mut CpuStorage,
    x_l: &Layout,
    entries: &CpuStorage,
    entries_l: &Layout,
    settings: &CpuStorage,
    settings_l: &Layout,
) -> Result<()> {
    let (_, vocab) = x_l.shape().dims2()?;
    let entries = u32s(entries, entries_l)?;
    let settings = slice::<f32>(settings, settings_l, "the penalty settings")?;
    let Some((start, end)) = x_l.contiguous_offsets() else {
        bail!("penalise: the logits must be contiguous");
    };
    let CpuStorage::F32(x) = x else {
        bail!("penalise: the logits must be f32");
    };
    let x = &mut x[start..end];
    for e in entries.chunks_exact(3) {
        let (row, id, count) = (e[0] as usize, e[1] as usize, e[2]);
        if id >= vocab {
            continue;
        }
        let s = &settings[row * 3..row * 3 + 3];
        let penalties = crate::sampling::Penalties {
            repetition: s[0],
            presence: s[1],
            frequency: s[2],
            seen: Vec::new(),
        };
        let l = &mut x[row * vocab + id];
        *l = penalties.penalise(*l, count);
    }
    Ok(())
}
