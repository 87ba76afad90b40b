//! AVX-512 level: VNNI `vpdpbusd` (four `u8 x i8` products summed straight into i32 lanes,
//! no 16-bit intermediate, so weights may use the full byte range), in the shared kernels
//! of [`super::x86`]: the 256-bit row kernel for decode, the sixteen-row 512-bit packed
//! kernel for batches. The row kernel keeps to 256-bit registers (its f64 sums too):
//! 512-bit instructions in flight close a vector port to the 256-bit ones around them.

use std::arch::x86_64::*;

use super::x86::{self, Acc, Acc16, F32Acc, F32x16, F64Acc, F64x16, IntDot};
use super::{Outputs, Panel};
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

pub(super) fn panel(p: &Panel, out: &mut Outputs<f32>) {
    // SAFETY: as in `panel_wide`.
    unsafe { panel_avx512::<F32Acc, F32x16>(p, out) }
}

pub(super) fn panel_wide(p: &Panel, out: &mut Outputs<f64>) {
    // SAFETY: `super::panel` checked that this CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
    unsafe { panel_avx512::<F64Acc, F64x16>(p, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn panel_avx512<A: Acc, W: Acc16<Out = A::Out>>(p: &Panel, out: &mut Outputs<A::Out>) {
    // SAFETY: the panel's shapes were checked by `super::panel`; features are enabled here.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 => x86::panel16::<Vnni, x86::Q4_0, A, W>(p, out),
            QuantFormat::Q4_1 => x86::panel16::<Vnni, x86::Q4_1, A, W>(p, out),
            QuantFormat::Q5_0 => x86::panel16::<Vnni, x86::Q5_0, A, W>(p, out),
            QuantFormat::Q5_1 => x86::panel16::<Vnni, x86::Q5_1, A, W>(p, out),
            QuantFormat::Q8_0 => x86::panel16::<Vnni, x86::Q8_0, A, W>(p, out),
        }
    }
}
