//! Causal attention on CPU over one sequence's cached keys and values.
//!
//! Each (token, head) row is computed on its own, in a fixed order of
//! operations, so a token's output does not depend on how many tokens were
//! computed with it: prefill and decode give the same numbers, and so will a
//! request alone or inside a batch.
//!
//! The work is cut into (tile, KV head) tasks: a tile is a run of up to
//! [`TILE_TOKENS`] consecutive tokens of one sequence (a prompt chunk; a
//! decoding sequence is a tile of one), and all its query heads that share a
//! KV head read the cached entries once (widened from f16 into a small f32
//! buffer, block by block), each row keeping its own scores and output. A
//! prompt's tokens thus read its cache once per tile rather than once each.
//! Tiling and the SIMD width change how many rows run at a time, never a
//! row's operations.

use half::f16;
use rayon::prelude::*;

use super::exp::exp;
use crate::kv::KvView;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The queries of one call: token `t`'s `[heads][head_dim]` start at
/// `data[t * stride]` (rows of a wider activation, such as fused Q|K|V).
#[derive(Clone, Copy, Debug)]
pub struct Queries<'a> {
    pub data: &'a [f32],
    pub stride: usize,
}

/// Most consecutive tokens of one sequence in a tile: each tile reads its
/// sequence's cache once, so a long prompt chunk is read `tokens / 16` times
/// instead of once per token, while a chunk still splits into tasks enough
/// for every core.
const TILE_TOKENS: usize = 16;

/// Token `t` attends to the first `seen[t].1` positions of
/// `views[seen[t].0]` (its sequence's keys and values, `[position][kv_head]
/// [head_dim]` block by block). Writes `[tokens][heads][head_dim]` into
/// `out`. Every (tile, KV head) pair is one parallel task, so a batch of
/// one-token decodes spreads over the cores, and so does a prompt chunk.
pub fn attend(
    q: Queries<'_>,
    views: &[KvView<'_>],
    seen: &[(usize, usize)],
    shape: Heads,
    out: &mut [f32],
) {
    let d = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let kernel = group_kernel();
    let tasks: Vec<(std::ops::Range<usize>, usize)> = tiles(seen)
        .into_iter()
        .flat_map(|tile| (0..shape.kv_heads).map(move |kv_head| (tile.clone(), kv_head)))
        .collect();
    // Each task's rows are `[token][group][head_dim]`, strided in `out`:
    // computed apart, then put in place.
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map_init(Scratch::default, |scratch, (tile, kv_head)| {
            let args = GroupArgs {
                q,
                first: tile.start,
                lens: &seen[tile.clone()].iter().map(|s| s.1).collect::<Vec<_>>(),
                view: &views[seen[tile.start].0],
                kv_head: *kv_head,
                shape,
            };
            let mut o = vec![0f32; tile.len() * group * d];
            kernel(&args, scratch, &mut o);
            o
        })
        .collect();
    for ((tile, kv_head), part) in tasks.iter().zip(parts) {
        for (t, rows) in tile.clone().zip(part.chunks_exact(group * d)) {
            out[(t * shape.kv_heads + kv_head) * group * d..][..group * d].copy_from_slice(rows);
        }
    }
}

/// Runs of at most [`TILE_TOKENS`] consecutive tokens reading the same view.
fn tiles(seen: &[(usize, usize)]) -> Vec<std::ops::Range<usize>> {
    let mut tiles: Vec<std::ops::Range<usize>> = Vec::new();
    for (t, &(view, _)) in seen.iter().enumerate() {
        match tiles.last_mut() {
            Some(last) if seen[last.start].0 == view && last.len() < TILE_TOKENS => {
                last.end = t + 1
            }
            _ => tiles.push(t..t + 1),
        }
    }
    tiles
}

/// Rounds every element to the nearest f16 value, in place (kept as f32 for
/// the arithmetic).
pub fn round_to_half(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("f16c") {
        // SAFETY: F16C was detected on this CPU just above.
        return unsafe { round_f16c(x) };
    }
    Portable::round(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn round_f16c(x: &mut [f32]) {
    F16c::round(x)
}

/// The query heads sharing one KV head, for a tile of tokens: token
/// `first + i` sees the first `lens[i]` positions of `view`.
struct GroupArgs<'a> {
    q: Queries<'a>,
    first: usize,
    lens: &'a [usize],
    view: &'a KvView<'a>,
    kv_head: usize,
    shape: Heads,
}

impl GroupArgs<'_> {
    /// Query row of tile token `i`, head `h` of the group.
    fn query(&self, i: usize, h: usize) -> &[f32] {
        let Heads {
            heads,
            kv_heads,
            head_dim: d,
        } = self.shape;
        let head = self.kv_head * (heads / kv_heads) + h;
        &self.q.data[(self.first + i) * self.q.stride + head * d..][..d]
    }
}

/// Buffers a task reuses from group to group.
#[derive(Default)]
struct Scratch {
    /// `[token][group][longest len]`: scores, then weights.
    scores: Vec<f32>,
    /// One block's keys or values of the KV head, widened: `[position][head_dim]`.
    block: Vec<f32>,
}

type GroupFn = fn(&GroupArgs<'_>, &mut Scratch, &mut [f32]);

/// The group kernel for this CPU: the same code compiled for wider vectors
/// where the CPU has them. Every multiply-add is fused (one rounding), in
/// the portable code too (`f32::mul_add`, a library call where the CPU has
/// no FMA), so all do the same operations and give the same bits.
fn group_kernel() -> GroupFn {
    #[cfg(target_arch = "x86_64")]
    {
        let fma = std::is_x86_feature_detected!("fma");
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("f16c")
            && fma
        {
            return |a, s, o| {
                // SAFETY: AVX-512F/VL, F16C and FMA were detected on this CPU just above.
                unsafe { attend_group_avx512(a, s, o) }
            };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("f16c") && fma {
            return |a, s, o| {
                // SAFETY: AVX2, F16C and FMA were detected on this CPU just above.
                unsafe { attend_group_avx2(a, s, o) }
            };
        }
    }
    attend_group::<Portable>
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn attend_group_avx512(args: &GroupArgs<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    attend_group::<F16c>(args, scratch, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_group_avx2(args: &GroupArgs<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    attend_group::<F16c>(args, scratch, out)
}

/// The vector parts of a group: f16 ↔ f32 conversions of slices (exact
/// widening; rounding to nearest even) and the query-key scores.
trait Simd {
    /// Asks for `x` to be brought into the cache (the next block, read soon).
    fn prefetch(x: &[f16]);
    fn widen(src: &[f16], dst: &mut [f32]);
    fn round(x: &mut [f32]);
    /// `out[j] = dot(q, keys[j]) · scale` for the `out.len()` rows of `keys`.
    fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]);
}

struct Portable;

impl Simd for Portable {
    #[inline(always)]
    fn prefetch(_: &[f16]) {}

    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }

    #[inline(always)]
    fn round(x: &mut [f32]) {
        for v in x {
            *v = f16::from_f32(*v).to_f32();
        }
    }

    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        for (o, key) in out.iter_mut().zip(keys.chunks_exact(q.len())) {
            *o = dot(q, key) * scale;
        }
    }
}

/// F16C instructions; only called from functions compiled with F16C.
#[cfg(target_arch = "x86_64")]
struct F16c;

#[cfg(target_arch = "x86_64")]
impl Simd for F16c {
    #[inline(always)]
    fn prefetch(x: &[f16]) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        for line in x.chunks(32) {
            // SAFETY: a prefetch only hints; the address is within `x`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
        }
    }

    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm256_cvtph_ps, _mm256_storeu_ps};
        let mut s = src.chunks_exact(8);
        let mut d = dst.chunks_exact_mut(8);
        for (s, d) in (&mut s).zip(&mut d) {
            // SAFETY: 8 f16 are read and 8 f32 written, within the chunks;
            // callers are compiled with F16C.
            unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
                _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        Portable::widen(s.remainder(), d.into_remainder());
    }

    #[inline(always)]
    fn round(x: &mut [f32]) {
        use std::arch::x86_64::{
            _MM_FROUND_TO_NEAREST_INT, _mm256_cvtph_ps, _mm256_cvtps_ph, _mm256_loadu_ps,
            _mm256_storeu_ps,
        };
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // SAFETY: 8 f32 read and written within the chunk; callers are
            // compiled with F16C (which implies AVX).
            unsafe {
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
            }
        }
        Portable::round(chunks.into_remainder());
    }

    /// Eight keys at a time: eight independent chains of additions instead
    /// of one, and the eight lane sums of [`finish`] done for all eight keys
    /// at once, in the same order.
    #[inline(always)]
    fn scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let d = q.len();
        let whole = d / 8 * 8;
        let mut j = 0;
        while j + 8 <= out.len() {
            let k = &keys[j * d..(j + 8) * d];
            let mut tails = [0f32; 8];
            for (t, key) in tails.iter_mut().zip(k.chunks_exact(d)) {
                for (x, y) in q[whole..].iter().zip(&key[whole..]) {
                    *t = x.mul_add(*y, *t);
                }
            }
            // SAFETY: every load reads 8 floats at `c < whole ≤ d` within one
            // of the 8 keys (`k` holds 8·d floats) or within `q`; the store
            // writes out[j..j + 8]. Callers are compiled with AVX2.
            unsafe {
                let mut acc = [_mm256_setzero_ps(); 8];
                for c in (0..whole).step_by(8) {
                    let qc = _mm256_loadu_ps(q.as_ptr().add(c));
                    for (i, a) in acc.iter_mut().enumerate() {
                        let kc = _mm256_loadu_ps(k.as_ptr().add(i * d + c));
                        *a = _mm256_fmadd_ps(qc, kc, *a);
                    }
                }
                // Halves: [l0+l4, l1+l5, l2+l6, l3+l7] of key i beside key i+4's.
                // (A function, not a closure: it must inline to get AVX.)
                #[inline(always)]
                unsafe fn half(a: __m256, b: __m256) -> __m256 {
                    // SAFETY: inlined into callers compiled with AVX.
                    unsafe {
                        _mm256_add_ps(
                            _mm256_permute2f128_ps::<0x20>(a, b),
                            _mm256_permute2f128_ps::<0x31>(a, b),
                        )
                    }
                }
                let h04 = half(acc[0], acc[4]);
                let h15 = half(acc[1], acc[5]);
                let h26 = half(acc[2], acc[6]);
                let h37 = half(acc[3], acc[7]);
                // Pairs, then the pairs' sum: keys 0..3 in the low half, 4..7 in the high.
                let sums = _mm256_hadd_ps(_mm256_hadd_ps(h04, h15), _mm256_hadd_ps(h26, h37));
                let dots = _mm256_add_ps(sums, _mm256_loadu_ps(tails.as_ptr()));
                let scaled = _mm256_mul_ps(dots, _mm256_set1_ps(scale));
                _mm256_storeu_ps(out.as_mut_ptr().add(j), scaled);
            }
            j += 8;
        }
        Portable::scores(q, &keys[j * d..], scale, &mut out[j..]);
    }
}

#[inline(always)]
fn attend_group<H: Simd>(args: &GroupArgs<'_>, scratch: &mut Scratch, out: &mut [f32]) {
    let Heads {
        heads,
        kv_heads,
        head_dim: d,
    } = args.shape;
    let group = heads / kv_heads;
    let view = args.view;
    let bs = view.block_size;
    let lens = args.lens;
    // Row (i, h) keeps its scores at `(i * group + h) * longest`.
    let longest = lens.iter().copied().max().unwrap_or(0);
    // This head's run in each block.
    let off = args.kv_head * bs * d;
    let scale = 1.0 / (d as f32).sqrt();
    let Scratch { scores, block } = scratch;
    scores.clear();
    scores.resize(lens.len() * group * longest, 0.0);
    block.resize(bs * d, 0.0);

    // Scores, block by block, each block widened once for the whole tile.
    // Plain loops, not iterator closures: a closure is compiled on its own,
    // without this function's target features.
    let mut pos = 0;
    for (b, keys) in view.keys.iter().enumerate() {
        let n = (longest - pos).min(bs);
        if n == 0 {
            break;
        }
        if let Some(next) = view.keys.get(b + 1) {
            H::prefetch(&next[off..off + (longest - pos - n).min(bs) * d]);
        }
        let k = &mut block[..n * d];
        H::widen(&keys[off..off + n * d], k);
        for (i, &len) in lens.iter().enumerate() {
            let seen = len.saturating_sub(pos).min(n);
            for h in 0..group {
                let s = &mut scores[(i * group + h) * longest + pos..][..seen];
                H::scores(args.query(i, h), &k[..seen * d], scale, s);
            }
        }
        pos += n;
    }

    // Softmax per row, each weight rounded to f16 as llama.cpp's f16 cache does.
    for (i, &len) in lens.iter().enumerate() {
        for h in 0..group {
            let s = &mut scores[(i * group + h) * longest..][..len];
            let max = max(s);
            for x in s.iter_mut() {
                *x = exp(*x - max);
            }
            let inv = 1.0 / sum(s);
            for x in s.iter_mut() {
                *x *= inv;
            }
            H::round(s);
        }
    }

    // Weighted sum of the values, position by position from zero.
    out.fill(0.0);
    let mut pos = 0;
    for (b, values) in view.values.iter().enumerate() {
        let n = (longest - pos).min(bs);
        if n == 0 {
            break;
        }
        if let Some(next) = view.values.get(b + 1) {
            H::prefetch(&next[off..off + (longest - pos - n).min(bs) * d]);
        }
        let v = &mut block[..n * d];
        H::widen(&values[off..off + n * d], v);
        for (i, &len) in lens.iter().enumerate() {
            let seen = len.saturating_sub(pos).min(n);
            for h in 0..group {
                let row = i * group + h;
                accumulate(
                    &scores[row * longest + pos..][..seen],
                    &v[..seen * d],
                    &mut out[row * d..(row + 1) * d],
                );
            }
        }
        pos += n;
    }
}

/// Dot product in eight lanes, summed in a fixed order (vectorises well and
/// gives the same bits for the same inputs whatever else runs).
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let whole = a.len() / 8 * 8;
    let mut lanes = [0f32; 8];
    for c in (0..whole).step_by(8) {
        let (x, y): (&[f32; 8], &[f32; 8]) = (
            a[c..c + 8].try_into().unwrap(),
            b[c..c + 8].try_into().unwrap(),
        );
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    finish(&lanes, &a[whole..], &b[whole..])
}

/// The eight lanes summed pairwise, then the products of the leftover tail.
#[inline(always)]
fn finish(lanes: &[f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let mut tail = 0f32;
    for (x, y) in a.iter().zip(b) {
        tail = x.mul_add(*y, tail);
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// The largest element (exact in any order).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    let rest = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The sum in eight lanes, combined in a fixed order (one order for a given
/// length, whatever else runs).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] += c[l];
        }
    }
    let mut tail = 0f32;
    for v in chunks.remainder() {
        tail += v;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

/// Output columns accumulated at a time, held in registers across positions.
const COLS: usize = 64;

/// `out[x] += w[j] · values[j][x]` for every position `j`, in order.
#[inline(always)]
fn accumulate(w: &[f32], values: &[f32], out: &mut [f32]) {
    let d = out.len();
    let mut x0 = 0;
    while x0 + COLS <= d {
        let mut acc: [f32; COLS] = out[x0..x0 + COLS].try_into().unwrap();
        for (j, &wj) in w.iter().enumerate() {
            let v: &[f32; COLS] = values[j * d + x0..][..COLS].try_into().unwrap();
            for l in 0..COLS {
                acc[l] = wj.mul_add(v[l], acc[l]);
            }
        }
        out[x0..x0 + COLS].copy_from_slice(&acc);
        x0 += COLS;
    }
    if x0 < d {
        for (j, &wj) in w.iter().enumerate() {
            for (o, v) in out[x0..].iter_mut().zip(&values[j * d + x0..(j + 1) * d]) {
                *o = wj.mul_add(*v, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], start: usize, s: Heads) -> Vec<f32> {
        let d = s.head_dim;
        let tokens = q.len() / (s.heads * d);
        let mut out = vec![0f32; q.len()];
        for t in 0..tokens {
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv_heads);
                let qv = &q[(t * s.heads + h) * d..][..d];
                let len = start + t + 1;
                let sc: Vec<f64> = (0..len)
                    .map(|j| {
                        let kj = &k[(j * s.kv_heads + kvh) * d..][..d];
                        qv.iter()
                            .zip(kj)
                            .map(|(a, b)| (*a * *b) as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for j in 0..len {
                    let p = (sc[j] - m).exp() / z;
                    for x in 0..d {
                        out[(t * s.heads + h) * d + x] +=
                            (p * v[(j * s.kv_heads + kvh) * d + x] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn halves(x: &[f32]) -> Vec<f16> {
        x.iter().map(|v| f16::from_f32(*v)).collect()
    }

    /// `[position][kv_head][head_dim]` entries cut into blocks of `bs`
    /// positions laid out as the cache does (`[kv_head][bs][head_dim]`).
    fn paged(x: &[f16], s: Heads, bs: usize) -> Vec<Vec<f16>> {
        let (kvh, d) = (s.kv_heads, s.head_dim);
        let len = x.len() / (kvh * d);
        (0..len.div_ceil(bs))
            .map(|b| {
                let mut block = vec![f16::ZERO; kvh * bs * d];
                for p in b * bs..len.min((b + 1) * bs) {
                    for h in 0..kvh {
                        block[(h * bs + p % bs) * d..][..d]
                            .copy_from_slice(&x[(p * kvh + h) * d..][..d]);
                    }
                }
                block
            })
            .collect()
    }

    fn view<'a>(k: &'a [Vec<f16>], v: &'a [Vec<f16>], bs: usize, len: usize) -> KvView<'a> {
        KvView {
            keys: k.iter().map(Vec::as_slice).collect(),
            values: v.iter().map(Vec::as_slice).collect(),
            block_size: bs,
            len,
        }
    }

    fn queries(q: &[f32], s: Heads) -> Queries<'_> {
        Queries {
            data: q,
            stride: s.heads * s.head_dim,
        }
    }

    #[test]
    fn matches_a_naive_softmax_attention() {
        // 20 and 72: a dimension with a tail after the 8-lane chunks, and one
        // with columns beyond the 64 accumulated in registers.
        for head_dim in [20, 72] {
            let s = Heads {
                heads: 6,
                kv_heads: 2,
                head_dim,
            };
            let (start, tokens) = (5, 4);
            let q = values(tokens * 6 * head_dim, 1);
            let k = halves(&values((start + tokens) * 2 * head_dim, 2));
            let v = halves(&values((start + tokens) * 2 * head_dim, 3));
            let mut out = vec![0f32; q.len()];
            let (pk, pv) = (paged(&k, s, 4), paged(&v, s, 4));
            let views = [view(&pk, &pv, 4, start + tokens)];
            let seen: Vec<_> = (0..tokens).map(|t| (0, start + t + 1)).collect();
            attend(queries(&q, s), &views, &seen, s, &mut out);
            let widen = |x: &[f16]| x.iter().map(|h| h.to_f32()).collect::<Vec<_>>();
            let want = naive(&q, &widen(&k), &widen(&v), start, s);
            for (a, b) in out.iter().zip(want) {
                assert!((a - b).abs() < 2e-3, "head_dim {head_dim}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn a_token_gives_the_same_bits_alone_or_with_others() {
        let s = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        };
        // 20 positions in one block (scored eight keys at a time, then four)
        // against blocks of 3 (never eight at a time).
        let tokens = 20;
        let q = values(tokens * 64, 4);
        let k = halves(&values(tokens * 32, 5));
        let v = halves(&values(tokens * 32, 6));
        let mut all = vec![0f32; q.len()];
        let (wk, wv) = (paged(&k, s, tokens), paged(&v, s, tokens));
        let whole = [view(&wk, &wv, tokens, tokens)];
        let seen: Vec<_> = (0..tokens).map(|t| (0, t + 1)).collect();
        attend(queries(&q, s), &whole, &seen, s, &mut all);
        let (pk, pv) = (paged(&k, s, 3), paged(&v, s, 3));
        for t in 0..tokens {
            // Alone, and reading the same entries cut into blocks of 3.
            let mut one = vec![0f32; 64];
            let blocks = [view(&pk, &pv, 3, t + 1)];
            let q = &q[t * 64..(t + 1) * 64];
            attend(queries(q, s), &blocks, &[(0, t + 1)], s, &mut one);
            assert_eq!(one, all[t * 64..(t + 1) * 64], "token {t}");
        }
    }

    #[test]
    fn every_kernel_gives_the_same_bits() {
        let shape = Heads {
            heads: 3,
            kv_heads: 1,
            head_dim: 72,
        };
        let len = 37;
        let q = values(3 * 72, 7);
        let k = paged(&halves(&values(len * 72, 8)), shape, 16);
        let v = paged(&halves(&values(len * 72, 9)), shape, 16);
        let view = view(&k, &v, 16, len);
        let args = GroupArgs {
            q: queries(&q, shape),
            first: 0,
            lens: &[len],
            view: &view,
            kv_head: 0,
            shape,
        };
        let mut portable = vec![0f32; 3 * 72];
        attend_group::<Portable>(&args, &mut Scratch::default(), &mut portable);
        let mut chosen = vec![0f32; 3 * 72];
        group_kernel()(&args, &mut Scratch::default(), &mut chosen);
        assert_eq!(portable, chosen);

        let mut rounded = values(37, 10);
        let mut one_by_one = rounded.clone();
        round_to_half(&mut rounded);
        Portable::round(&mut one_by_one);
        assert_eq!(rounded, one_by_one);
    }
}
