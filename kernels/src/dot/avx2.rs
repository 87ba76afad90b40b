//! AVX2 level: the shared x86 kernels with `vpmaddubsw` + `vpmaddwd` as the integer product.
//! Pairs of `u8 x i8` products stay below `i16::MAX` because weights are at most 31 (or a
//! `Q8_0` magnitude of 128) and activations at most 127 in magnitude.

use std::arch::x86_64::*;

use super::x86::{self, Acc, F32Acc, F64Acc, IntDot};
use super::{Outputs, Panel};
use crate::QuantFormat;
use crate::interleaved::Line;

struct Maddubs;

impl IntDot for Maddubs {
    const FULL_RANGE: bool = false;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: register-only intrinsics; inlined into an AVX2 function.
        unsafe {
            let pairs = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }
}

pub(super) fn panel(p: &Panel, lines: &[Line], out: &mut Outputs<f32>) {
    // SAFETY: as in `panel_wide`.
    unsafe { panel_avx2::<F32Acc>(p, lines, out) }
}

pub(super) fn panel_wide(p: &Panel, lines: &[Line], out: &mut Outputs<f64>) {
    // SAFETY: `super::panel` checked that this CPU has AVX2, FMA and F16C, and the shapes.
    unsafe { panel_avx2::<F64Acc>(p, lines, out) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn panel_avx2<A: Acc>(p: &Panel, lines: &[Line], out: &mut Outputs<A::Out>) {
    // SAFETY: the panel's shapes were checked by `super::panel`; features are enabled here.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 => x86::panel::<Maddubs, x86::Q4_0, A>(p, lines, out),
            QuantFormat::Q4_1 => x86::panel::<Maddubs, x86::Q4_1, A>(p, lines, out),
            QuantFormat::Q5_0 => x86::panel::<Maddubs, x86::Q5_0, A>(p, lines, out),
            QuantFormat::Q5_1 => x86::panel::<Maddubs, x86::Q5_1, A>(p, lines, out),
            QuantFormat::Q8_0 => x86::panel::<Maddubs, x86::Q8_0, A>(p, lines, out),
        }
    }
}
