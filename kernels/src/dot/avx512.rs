//! AVX-512 level: VNNI `vpdpbusd` (four `u8 x i8` products summed straight into i32 lanes,
//! no 16-bit intermediate, so weights may use the full byte range), in the shared kernels
//! of [`super::x86`].

use std::arch::x86_64::*;

use super::Panel;
use super::x86::{self, Acc, F32Acc, IntDot, LANES};
use crate::QuantFormat;

struct Vnni;

impl IntDot for Vnni {
    const FULL_RANGE: bool = true;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 VNNI/VL function.
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

/// The f64 sums of `x86::F64Acc` in one 512-bit register: the same operations per lane,
/// hence the same bits, in half the instructions.
#[derive(Clone, Copy)]
struct F64x8(__m512d);

impl Acc for F64x8 {
    type Out = f64;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 function.
        unsafe { F64x8(_mm512_setzero_pd()) }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m256i, dw: __m256, da: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            let scale = _mm512_mul_pd(_mm512_cvtps_pd(dw), _mm512_set1_pd(f64::from(da)));
            F64x8(_mm512_fmadd_pd(_mm512_cvtepi32_pd(isum), scale, self.0))
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, mw: __m256, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            F64x8(_mm512_fmadd_pd(
                _mm512_cvtps_pd(mw),
                _mm512_set1_pd(f64::from(sa)),
                self.0,
            ))
        }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f64; LANES] {
        // SAFETY: __m512d and [f64; 8] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<__m512d, [f64; LANES]>(self.0) }
    }
}

pub(super) fn panel(p: &Panel, out: &mut [f32]) {
    // SAFETY: as in `panel_wide`.
    unsafe { panel_avx512::<F32Acc>(p, out) }
}

pub(super) fn panel_wide(p: &Panel, out: &mut [f64]) {
    // SAFETY: `super::panel` checked that this CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
    unsafe { panel_avx512::<F64x8>(p, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn panel_avx512<A: Acc>(p: &Panel, out: &mut [A::Out]) {
    // SAFETY: the panel's shapes were checked by `super::panel`; features are enabled here.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 => x86::panel::<Vnni, x86::Q4_0, A>(p, out),
            QuantFormat::Q4_1 => x86::panel::<Vnni, x86::Q4_1, A>(p, out),
            QuantFormat::Q5_0 => x86::panel::<Vnni, x86::Q5_0, A>(p, out),
            QuantFormat::Q5_1 => x86::panel::<Vnni, x86::Q5_1, A>(p, out),
            QuantFormat::Q8_0 => x86::panel::<Vnni, x86::Q8_0, A>(p, out),
        }
    }
}
