//! The AVX-512 packed kernel (prefill and batched decode): a whole interleaved group
//! ([`crate::interleaved`]), sixteen weight rows, one per i32 lane of a 512-bit vector, so
//! that one VNNI `vpdpbusd` advances sixteen dot products by four bytes each (twice the
//! work of the 256-bit kernel per instruction, and per broadcast activation word).
//!
//! Every lane follows the float steps of [`super::Acc`] (`acc + sumi·(dw·da)`, then the
//! minimum term), so its outputs are the same bits as the 256-bit kernels' and the row
//! kernel's.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{ActPtr, Block, GroupKernel, LANES, act_rows, write_rows};
use crate::dot::{Outputs, Panel};
use crate::format::BLOCK;
use crate::interleaved::{GROUP_ROWS, Line};

/// Weight rows per group: one per lane of a 512-bit vector.
const ROWS16: usize = GROUP_ROWS;

/// How sixteen lanes of exact integer block sums become outputs: the float steps of
/// [`super::Acc`], sixteen lanes at a time.
pub(in crate::dot) trait Acc16: Copy {
    type Out: Copy;
    /// A block's `dw` and `mw`, formed once per block (see [`super::Acc::Scales`]).
    type Scales: Copy;
    unsafe fn zero() -> Self;
    unsafe fn scales(dw: __m512, mw: __m512) -> Self::Scales;
    unsafe fn add_block(self, isum: __m512i, s: Self::Scales, da: f32) -> Self;
    unsafe fn add_min(self, s: Self::Scales, sa: f32) -> Self;
    unsafe fn lanes(self) -> [Self::Out; ROWS16];
}

/// f32 lanes, as [`super::F32Acc`].
#[derive(Clone, Copy)]
pub(in crate::dot) struct F32x16(__m512);

impl Acc16 for F32x16 {
    type Out = f32;
    type Scales = [__m512; 2];
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 function.
        unsafe { F32x16(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn scales(dw: __m512, mw: __m512) -> [__m512; 2] {
        [dw, mw]
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m512i, [dw, _]: [__m512; 2], da: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(da));
            F32x16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, self.0))
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, [_, mw]: [__m512; 2], sa: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe { F32x16(_mm512_fmadd_ps(mw, _mm512_set1_ps(sa), self.0)) }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f32; ROWS16] {
        // SAFETY: __m512 and [f32; 16] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<__m512, [f32; ROWS16]>(self.0) }
    }
}

/// f64 lanes (rows 0..8, 8..16), as [`super::F64Acc`].
#[derive(Clone, Copy)]
pub(in crate::dot) struct F64x16([__m512d; 2]);

impl Acc16 for F64x16 {
    type Out = f64;
    /// `dw` and `mw`, each widened to two halves of f64.
    type Scales = [(__m512d, __m512d); 2];
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 function.
        unsafe { F64x16([_mm512_setzero_pd(); 2]) }
    }
    #[inline(always)]
    unsafe fn scales(dw: __m512, mw: __m512) -> Self::Scales {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe { [halves_f64(dw), halves_f64(mw)] }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m512i, [(lo, hi), _]: Self::Scales, da: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function. No
        // closures: they would not inherit the caller's target features.
        unsafe {
            let da = _mm512_set1_pd(f64::from(da));
            let sumi_lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(isum));
            let sumi_hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(isum));
            F64x16([
                _mm512_fmadd_pd(sumi_lo, _mm512_mul_pd(lo, da), self.0[0]),
                _mm512_fmadd_pd(sumi_hi, _mm512_mul_pd(hi, da), self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, [_, (lo, hi)]: Self::Scales, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            let sa = _mm512_set1_pd(f64::from(sa));
            F64x16([
                _mm512_fmadd_pd(lo, sa, self.0[0]),
                _mm512_fmadd_pd(hi, sa, self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f64; ROWS16] {
        // SAFETY: [__m512d; 2] and [f64; 16] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<[__m512d; 2], [f64; ROWS16]>(self.0) }
    }
}

/// Lanes 0..8 and 8..16 of `v`, widened to f64 (exactly).
#[inline(always)]
unsafe fn halves_f64(v: __m512) -> (__m512d, __m512d) {
    // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(hi),
        )
    }
}

/// The eight `u` vectors of one record (vector `g`: elements `4g..4g+4` of the sixteen rows,
/// row `i` in lane `i`), and the rows' `d` and `m` (zero without minimum).
#[inline(always)]
unsafe fn record<B: Block>(rec: *const Line) -> ([__m512i; LANES], __m512, __m512) {
    // SAFETY: rec points at a whole record of 64-byte aligned lines (caller contract).
    unsafe {
        let mut w = [_mm512_setzero_si512(); LANES];
        if B::NIBBLES {
            let low = _mm512_set1_epi8(0x0F);
            for g in 0..LANES / 2 {
                let v = _mm512_load_si512(rec.add(g).cast());
                w[g] = _mm512_and_si512(v, low);
                w[g + LANES / 2] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
        } else {
            for (g, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_si512(rec.add(g).cast());
            }
        }
        let scales = rec.add(B::WEIGHT_LINES).cast::<u8>();
        let dw = _mm512_cvtph_ps(_mm256_load_si256(scales.cast()));
        let mw = if B::HAS_MIN {
            _mm512_cvtph_ps(_mm256_load_si256(scales.add(32).cast()))
        } else {
            _mm512_setzero_ps()
        };
        (w, dw, mw)
    }
}

/// Dot products of one group (`nb` records from `rec`) with `R` activation rows: lane `i`
/// of result `r` is weight row `i` · activation row `r`.
#[inline(always)]
unsafe fn dot_group<B: Block, A: Acc16, const R: usize>(
    rec: *const Line,
    nb: usize,
    acts: [ActPtr; R],
) -> [A; R] {
    // SAFETY: rec holds nb records and each activation row nb blocks (caller contract).
    // Plain loops: closures would not inherit the caller's target features.
    unsafe {
        let mut acc = [A::zero(); R];
        for b in 0..nb {
            let (w, dw, mw) = record::<B>(rec.add(b * B::RECORD_LINES));
            let scales = A::scales(dw, mw);
            for r in 0..R {
                let qs = acts[r].qs.add(b * BLOCK).cast::<i32>();
                let init = if B::ZERO_POINT != 0 {
                    _mm512_set1_epi32(-B::ZERO_POINT * *acts[r].qsum.add(b))
                } else {
                    _mm512_setzero_si512()
                };
                // Two chains, so consecutive products do not wait on each other.
                let mut even = init;
                let mut odd = _mm512_setzero_si512();
                for g in (0..LANES).step_by(2) {
                    let a0 = _mm512_set1_epi32(qs.add(g).read_unaligned());
                    let a1 = _mm512_set1_epi32(qs.add(g + 1).read_unaligned());
                    even = _mm512_dpbusd_epi32(even, w[g], a0);
                    odd = _mm512_dpbusd_epi32(odd, w[g + 1], a1);
                }
                let [da, sa] = *acts[r].ds.add(b);
                acc[r] = acc[r].add_block(_mm512_add_epi32(even, odd), scales, da);
                if B::HAS_MIN {
                    acc[r] = acc[r].add_min(scales, sa);
                }
            }
        }
        acc
    }
}

/// The kernel, for [`super::interleaved_panel`]: a whole group per call.
pub(super) struct Packed16<B, A>(PhantomData<(B, A)>);

impl<B: Block, A: Acc16> GroupKernel for Packed16<B, A> {
    const ROWS: usize = GROUP_ROWS;
    type Out = A::Out;
    #[inline(always)]
    unsafe fn multiply<const R: usize>(
        p: &Panel,
        rec: *const Line,
        _part: usize,
        rows: (usize, usize),
        a: usize,
        out: &mut Outputs<A::Out>,
    ) {
        // SAFETY: forwarded caller contract (the group's records, activation rows a..a+R);
        // `lanes` is register-only, and the caller runs with AVX-512 enabled.
        unsafe {
            let acc = dot_group::<B, A, R>(rec, p.acts.blocks(), act_rows(p, a));
            write_rows(out, a, rows, acc.map(|acc| acc.lanes()));
        }
    }
}
