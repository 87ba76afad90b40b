//! The 256-bit packed kernel (batches on AVX2): eight weight rows, the low or high half of
//! an interleaved group ([`crate::interleaved`]), each in one i32 lane, so that one
//! integer instruction multiplies four activation bytes (broadcast) into the running sums
//! of all eight rows. A block's eight integer sums then come out one per lane, ready for
//! [`super::Acc::add_block`], without the sum across lanes the [`super::rows`] kernel needs.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{Acc, ActPtr, Block, GroupKernel, IntDot, LANES, act_rows, write_rows};
use crate::dot::{Outputs, Panel};
use crate::format::BLOCK;
use crate::interleaved::{GROUP_ROWS, Line};

/// The eight `u` vectors of one record's half `part` (vector `g`: elements `4g..4g+4` of
/// the eight rows, row `i` in lane `i`), and the rows' `d` and `m` (zero without minimum).
#[inline(always)]
pub(super) unsafe fn record_half<B: Block>(
    rec: *const Line,
    part: usize,
) -> ([__m256i; LANES], __m256, __m256) {
    // SAFETY: rec points at a whole record (caller contract); lines are 64-byte aligned,
    // so each 32-byte half is 32-byte aligned.
    unsafe {
        let half = |line: usize| rec.add(line).cast::<u8>().add(32 * part);
        let mut w = [_mm256_setzero_si256(); LANES];
        if B::NIBBLES {
            let low = _mm256_set1_epi8(0x0F);
            for g in 0..LANES / 2 {
                let v = _mm256_load_si256(half(g).cast());
                w[g] = _mm256_and_si256(v, low);
                w[g + LANES / 2] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            }
        } else {
            for (g, w) in w.iter_mut().enumerate() {
                *w = _mm256_load_si256(half(g).cast());
            }
        }
        let scales = rec.add(B::WEIGHT_LINES).cast::<u8>();
        let dw = _mm256_cvtph_ps(_mm_load_si128(scales.add(16 * part).cast()));
        let mw = if B::HAS_MIN {
            _mm256_cvtph_ps(_mm_load_si128(scales.add(32 + 16 * part).cast()))
        } else {
            _mm256_setzero_ps()
        };
        (w, dw, mw)
    }
}

/// Dot products of half `part` of one group (`nb` records from `rec`) with `R` activation
/// rows: lane `i` of result `r` is weight row `i` · activation row `r`.
#[inline(always)]
unsafe fn dot_half<I: IntDot, B: Block, A: Acc, const R: usize>(
    rec: *const Line,
    part: usize,
    nb: usize,
    acts: [ActPtr; R],
) -> [A; R] {
    // With vpmaddubsw, Q8_0's full byte range would saturate its pairs: the signed
    // weights' magnitudes multiply the activations carrying the weights' signs instead
    // (|q|·sign(a, q) = q·a), and no zero point is subtracted.
    let sign_trick = B::SIGNED && !I::FULL_RANGE;
    // SAFETY: rec holds nb records and each activation row nb blocks (caller contract).
    // Plain loops: closures would not inherit the caller's target features.
    unsafe {
        let mut acc = [A::zero(); R];
        for b in 0..nb {
            let (mut w, dw, mw) = record_half::<B>(rec.add(b * B::RECORD_LINES), part);
            let mut signed = [_mm256_setzero_si256(); LANES];
            if sign_trick {
                for g in 0..LANES {
                    signed[g] = _mm256_xor_si256(w[g], _mm256_set1_epi8(i8::MIN));
                    w[g] = _mm256_abs_epi8(signed[g]);
                }
            }
            let scales = A::scales(dw, mw);
            for r in 0..R {
                let qs = acts[r].qs.add(b * BLOCK).cast::<i32>();
                let init = if B::ZERO_POINT != 0 && !sign_trick {
                    _mm256_set1_epi32(-B::ZERO_POINT * *acts[r].qsum.add(b))
                } else {
                    _mm256_setzero_si256()
                };
                // Two chains, so consecutive products do not wait on each other.
                let mut even = init;
                let mut odd = _mm256_setzero_si256();
                for g in (0..LANES).step_by(2) {
                    let mut a0 = _mm256_set1_epi32(qs.add(g).read_unaligned());
                    let mut a1 = _mm256_set1_epi32(qs.add(g + 1).read_unaligned());
                    if sign_trick {
                        a0 = _mm256_sign_epi8(a0, signed[g]);
                        a1 = _mm256_sign_epi8(a1, signed[g + 1]);
                    }
                    even = I::dot(even, w[g], a0);
                    odd = I::dot(odd, w[g + 1], a1);
                }
                let [da, sa] = *acts[r].ds.add(b);
                acc[r] = acc[r].add_block(_mm256_add_epi32(even, odd), scales, da);
                if B::HAS_MIN {
                    acc[r] = acc[r].add_min(scales, sa);
                }
            }
        }
        acc
    }
}

/// The kernel, for [`super::interleaved_panel`]: eight rows, half a group, per call.
pub(super) struct Packed8<I, B, A>(PhantomData<(I, B, A)>);

impl<I: IntDot, B: Block, A: Acc> GroupKernel for Packed8<I, B, A> {
    const ROWS: usize = GROUP_ROWS / 2;
    type Out = A::Out;
    #[inline(always)]
    unsafe fn multiply<const R: usize>(
        p: &Panel,
        rec: *const Line,
        part: usize,
        rows: (usize, usize),
        a: usize,
        out: &mut Outputs<A::Out>,
    ) {
        // SAFETY: forwarded caller contract (the group's records, activation rows a..a+R);
        // `lanes` is register-only, its intrinsics enabled by the caller's level.
        unsafe {
            let acc = dot_half::<I, B, A, R>(rec, part, p.acts.blocks(), act_rows(p, a));
            write_rows(out, a, rows, acc.map(|acc| acc.lanes()));
        }
    }
}
