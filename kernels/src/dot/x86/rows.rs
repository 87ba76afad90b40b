//! The row kernel (decode): weight rows read in their GGUF layout, eight at a time, each
//! block unpacked once for up to four activation rows. Each row's blocks are multiplied
//! into the activation blocks in eight i32 lanes each; then,
//! per block, the eight rows' lanes are summed across into one vector (lane `i` = row `i`'s
//! exact block sum), which is scaled exactly as the [`super::packed`] kernel scales its
//! own, so both give the same bits.

use std::arch::x86_64::*;

use super::{Acc, ActPtr, Block, IntDot, LANES};
use crate::dot::{Outputs, Panel};
use crate::format::BLOCK;

/// Lane `i` of the result is the sum of the eight lanes of `v[i]`.
#[inline(always)]
unsafe fn sum_across(v: [__m256i; LANES]) -> __m256i {
    // SAFETY: register-only intrinsics; the caller runs with AVX2 enabled.
    unsafe {
        // Per 128-bit half: [Σv0, Σv1, Σv2, Σv3] over that half's four lanes.
        let lo = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
        let hi = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
        // [lo.low + lo.high, hi.low + hi.high]
        _mm256_add_epi32(
            _mm256_blend_epi32::<0xF0>(lo, hi),
            _mm256_permute2x128_si256::<0x21>(lo, hi),
        )
    }
}

/// The eight rows' `d` and `m` (zero without minimum) from their blocks' first four bytes.
#[inline(always)]
unsafe fn scales<B: Block>(dm: __m256i) -> (__m256, __m256) {
    // SAFETY: register-only intrinsics; the caller runs with AVX2 and F16C enabled.
    unsafe {
        // Per 128-bit half: the four d (low halves of the u32), then the four m.
        #[rustfmt::skip]
        let split = _mm256_setr_epi8(
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
        );
        // [d0..4, d4..8, m0..4, m4..8]
        let v = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_shuffle_epi8(dm, split));
        let d = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
        let m = if B::HAS_MIN {
            _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(v))
        } else {
            _mm256_setzero_ps()
        };
        (d, m)
    }
}

/// Whether signed weights go through `vpmaddubsw`: then |q| is multiplied by the
/// activations carrying q's sign, so that pairs stay within its i16 range, and the zero
/// point needs no correction.
#[inline(always)]
fn sign_trick<I: IntDot, B: Block>() -> bool {
    B::SIGNED && !I::FULL_RANGE
}

/// Row `i`'s exact partial sums of one unpacked block `u` times the activation block `a`,
/// in eight i32 lanes.
#[inline(always)]
unsafe fn block_sums<I: IntDot, B: Block>(u: __m256i, a: __m256i) -> __m256i {
    // SAFETY: register-only intrinsics, enabled by the caller's level.
    unsafe {
        if sign_trick::<I, B>() {
            let q = _mm256_xor_si256(u, _mm256_set1_epi8(i8::MIN));
            I::dot(
                _mm256_setzero_si256(),
                _mm256_abs_epi8(q),
                _mm256_sign_epi8(a, q),
            )
        } else {
            I::dot(_mm256_setzero_si256(), u, a)
        }
    }
}

/// How far ahead, in weight rows, [`dot8`] prefetches (into L2).
const AHEAD: usize = 2 * LANES;

/// Activation rows multiplied per pass over a group of eight weight rows.
const ROWS_PER_PASS: usize = 4;

/// Dot products of eight weight rows (`nb` blocks each, row `i` at `w + i * stride`) with
/// `R` activation rows: lane `i` of result `r` is row `i` · activation row `r`. Each
/// weight block is unpacked once for the `R` rows.
///
/// The rows are read side by side, a block of each per step, which hardware prefetchers do
/// not follow as streams: each step prefetches the same blocks of the next eight rows.
#[inline(always)]
unsafe fn dot8<I: IntDot, B: Block, A: Acc, const R: usize>(
    w: *const u8,
    stride: usize,
    nb: usize,
    acts: [ActPtr; R],
) -> [A; R] {
    let zero_point = B::ZERO_POINT != 0 && !sign_trick::<I, B>();
    // SAFETY: the eight rows hold nb blocks and each activation row nb blocks (caller
    // contract); intrinsics are enabled by the caller's level. Plain loops, not closures,
    // which would not inherit the target features.
    unsafe {
        let mut acc = [A::zero(); R];
        for b in 0..nb {
            let at = w.add(b * B::BYTES);
            let mut u = [_mm256_setzero_si256(); LANES];
            let mut dm = [0i32; LANES];
            for i in 0..LANES {
                let block = at.add(i * stride);
                // A prefetch never faults, wherever it points.
                _mm_prefetch::<_MM_HINT_T1>(block.wrapping_add(AHEAD * stride).cast());
                u[i] = B::unpack(block).0;
                dm[i] = block.cast::<i32>().read_unaligned();
            }
            let dm = _mm256_setr_epi32(dm[0], dm[1], dm[2], dm[3], dm[4], dm[5], dm[6], dm[7]);
            let (dw, mw) = scales::<B>(dm);
            let scales = A::scales(dw, mw);
            for r in 0..R {
                let a = _mm256_loadu_si256(acts[r].qs.add(b * BLOCK).cast());
                let mut sums = [_mm256_setzero_si256(); LANES];
                for i in 0..LANES {
                    sums[i] = block_sums::<I, B>(u[i], a);
                }
                let mut isum = sum_across(sums);
                if zero_point {
                    let zero_point = -B::ZERO_POINT * *acts[r].qsum.add(b);
                    isum = _mm256_add_epi32(isum, _mm256_set1_epi32(zero_point));
                }
                let [da, sa] = *acts[r].ds.add(b);
                acc[r] = acc[r].add_block(isum, scales, da);
                if B::HAS_MIN {
                    acc[r] = acc[r].add_min(scales, sa);
                }
            }
        }
        acc
    }
}

/// Multiply the eight weight rows at `w` into activation rows `a..a + R`, writing the
/// first `valid` of them to `out.row(a + r)[row0..]`.
#[inline(always)]
unsafe fn rows_at<I: IntDot, B: Block, A: Acc, const R: usize>(
    p: &Panel,
    (w, row0, valid): (*const u8, usize, usize),
    a: usize,
    out: &mut Outputs<A::Out>,
) {
    let mut acts = [ActPtr::from(p.acts.row(a)); R];
    for (i, act) in acts.iter_mut().enumerate() {
        *act = p.acts.row(a + i).into();
    }
    // SAFETY: w points at eight whole weight rows; activation rows a..a+R exist.
    let dots = unsafe { dot8::<I, B, A, R>(w, p.row_bytes, p.acts.blocks(), acts) };
    for (r, dots) in dots.into_iter().enumerate() {
        // SAFETY: register-only; the caller's level enables the accumulator's intrinsics.
        let lanes = unsafe { dots.lanes() };
        out.row(a + r)[row0..row0 + valid].copy_from_slice(&lanes[..valid]);
    }
}

/// Fill `out` for a whole panel (shape contract checked by [`crate::dot::panel`]).
#[inline(always)]
pub(super) unsafe fn panel<I: IntDot, B: Block, A: Acc>(p: &Panel, out: &mut Outputs<A::Out>) {
    let (m, rows, stride) = (p.acts.rows(), p.rows(), p.row_bytes);
    // The last rows when fewer than eight remain, zero-padded (zero scales) to eight.
    let mut tail = Vec::new();
    // The rows that no earlier step prefetches.
    let first = &p.weights[..AHEAD.min(rows) * stride];
    for line in first.chunks(64) {
        // SAFETY: a prefetch has no effect on memory; the line lies in the panel anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
    for row0 in (0..rows).step_by(LANES) {
        let valid = LANES.min(rows - row0);
        let w = if valid == LANES {
            // SAFETY: rows row0..row0+8 lie inside the panel.
            unsafe { p.weights.as_ptr().add(row0 * stride) }
        } else {
            tail.resize(LANES * stride, 0);
            tail[..valid * stride].copy_from_slice(&p.weights[row0 * stride..]);
            tail.as_ptr()
        };
        let group = (w, row0, valid);
        let mut a = 0;
        // SAFETY (all calls below): w holds eight whole rows; activation rows a..a+R exist.
        while a + ROWS_PER_PASS <= m {
            unsafe { rows_at::<I, B, A, ROWS_PER_PASS>(p, group, a, out) };
            a += ROWS_PER_PASS;
        }
        match m - a {
            3 => unsafe { rows_at::<I, B, A, 3>(p, group, a, out) },
            2 => unsafe { rows_at::<I, B, A, 2>(p, group, a, out) },
            1 => unsafe { rows_at::<I, B, A, 1>(p, group, a, out) },
            _ => {}
        }
    }
}
