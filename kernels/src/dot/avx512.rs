//! AVX-512 level: the sixteen-row packed kernel of [`super::x86`] on 512-bit vectors, with
//! VNNI `vpdpbusd` (four `u8 x i8` products summed straight into i32 lanes, no 16-bit
//! intermediate, so weights may use the full byte range).

use super::x86::{self, F32x16, F64x16};
use super::{Outputs, Panel};
use crate::QuantFormat;
use crate::interleaved::Line;

pub(super) fn panel(p: &Panel, lines: &[Line], out: &mut Outputs<f32>) {
    // SAFETY: as in `panel_wide`.
    unsafe { panel_avx512::<F32x16>(p, lines, out) }
}

pub(super) fn panel_wide(p: &Panel, lines: &[Line], out: &mut Outputs<f64>) {
    // SAFETY: `super::panel` checked that this CPU has AVX2, FMA, F16C and AVX-512
    // F/BW/VL/VNNI, and the shapes.
    unsafe { panel_avx512::<F64x16>(p, lines, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn panel_avx512<W: x86::Acc16>(p: &Panel, lines: &[Line], out: &mut Outputs<W::Out>) {
    // SAFETY: the panel's shapes were checked by `super::panel`; features are enabled here.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 => x86::panel16::<x86::Q4_0, W>(p, lines, out),
            QuantFormat::Q4_1 => x86::panel16::<x86::Q4_1, W>(p, lines, out),
            QuantFormat::Q5_0 => x86::panel16::<x86::Q5_0, W>(p, lines, out),
            QuantFormat::Q5_1 => x86::panel16::<x86::Q5_1, W>(p, lines, out),
            QuantFormat::Q8_0 => x86::panel16::<x86::Q8_0, W>(p, lines, out),
        }
    }
}
