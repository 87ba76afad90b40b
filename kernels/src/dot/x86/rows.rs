//! The row kernel: weight rows read in their GGUF layout, each block unpacked once and
//! multiplied into up to four activation rows. Scaling follows ggml's AVX2 `vec_dot`: the
//! exact integer block sum, in eight lanes, times `d_w * d_a`, accumulated in floats.

use std::arch::x86_64::*;

use super::{ActPtr, Block, IntDot};
use crate::dot::Panel;
use crate::format::BLOCK;

/// Activation rows multiplied per pass over a weight row.
const ROWS_PER_PASS: usize = 4;

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    // SAFETY: register-only intrinsics; the caller runs with AVX enabled.
    unsafe {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
}

/// Dot products of one weight row (`nb` blocks at `w`) with `R` activation rows.
#[inline(always)]
unsafe fn dot_rows<I: IntDot, B: Block, const R: usize>(
    w: *const u8,
    nb: usize,
    acts: [ActPtr; R],
) -> [f32; R] {
    // SAFETY: w holds nb blocks and every activation row nb blocks (checked by `panel`).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut min_acc = [0.0f32; R];
        for b in 0..nb {
            let (u, dm) = B::unpack(w.add(b * B::BYTES));
            // Signed weights: multiply |q| by the activations carrying q's sign, so pairs
            // stay within vpmaddubsw's i16 range.
            let (u, q) = if B::SIGNED {
                let q = _mm256_xor_si256(u, _mm256_set1_epi8(i8::MIN));
                (_mm256_abs_epi8(q), q)
            } else {
                (u, u)
            };
            let dw = _mm256_broadcastss_ps(dm);
            let mw = _mm_cvtss_f32(_mm_movehdup_ps(dm));
            for r in 0..R {
                let a = _mm256_loadu_si256(acts[r].qs.add(b * BLOCK).cast());
                let (a, init) = if B::SIGNED {
                    (_mm256_sign_epi8(a, q), _mm256_setzero_si256())
                } else if B::ZERO_POINT != 0 {
                    let zero_point = -B::ZERO_POINT * *acts[r].qsum.add(b);
                    (a, _mm256_setr_epi32(zero_point, 0, 0, 0, 0, 0, 0, 0))
                } else {
                    (a, _mm256_setzero_si256())
                };
                let isum = I::dot(init, u, a);
                let [da, sa] = *acts[r].ds.add(b);
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(da));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, acc[r]);
                if B::HAS_MIN {
                    min_acc[r] += mw * sa;
                }
            }
        }
        std::array::from_fn(|r| hsum(acc[r]) + min_acc[r])
    }
}

#[inline(always)]
unsafe fn rows_at<I: IntDot, B: Block, const R: usize>(
    p: &Panel,
    (r, w): (usize, *const u8),
    a: usize,
    out: &mut [f32],
) {
    let acts: [ActPtr; R] = std::array::from_fn(|i| p.acts.row(a + i).into());
    // SAFETY: forwarded caller contract.
    let dots = unsafe { dot_rows::<I, B, R>(w, p.acts.blocks(), acts) };
    for (i, dot) in dots.into_iter().enumerate() {
        out[(a + i) * p.rows() + r] = dot;
    }
}

/// Fill `out` for a whole panel (shape contract checked by [`crate::dot::panel`]).
#[inline(always)]
pub(super) unsafe fn panel<I: IntDot, B: Block>(p: &Panel, out: &mut [f32]) {
    let m = p.acts.rows();
    for r in 0..p.rows() {
        // SAFETY: row r < p.rows(), so the row's bytes lie inside p.weights.
        let w = (r, unsafe { p.weights.as_ptr().add(r * p.row_bytes) });
        let mut a = 0;
        // SAFETY (all calls below): rows a..a+R exist; w points at a whole weight row.
        while a + ROWS_PER_PASS <= m {
            unsafe { rows_at::<I, B, ROWS_PER_PASS>(p, w, a, out) };
            a += ROWS_PER_PASS;
        }
        match m - a {
            3 => unsafe { rows_at::<I, B, 3>(p, w, a, out) },
            2 => unsafe { rows_at::<I, B, 2>(p, w, a, out) },
            1 => unsafe { rows_at::<I, B, 1>(p, w, a, out) },
            _ => {}
        }
    }
}
