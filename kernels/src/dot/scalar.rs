//! Portable kernels, written as ggml's reference `vec_dot` loops: an exact integer sum per
//! block, scaled by `d_w * d_a`, plus `m_w * s_a` for formats with a minimum.

use super::{Outputs, Panel};
use crate::QuantFormat;
use crate::format::{BLOCK, decode_block};
use crate::quantize::ActRow;

pub(super) fn panel(p: &Panel, out: &mut Outputs<f32>) {
    panel_with(p, out, row_dot);
}

pub(super) fn panel_wide(p: &Panel, out: &mut Outputs<f64>) {
    panel_with(p, out, row_dot_wide);
}

/// Every (weight row, activation row) product of the panel, by `dot`.
fn panel_with<T>(p: &Panel, out: &mut Outputs<T>, dot: fn(QuantFormat, &[u8], ActRow) -> T) {
    for a in 0..p.acts.rows() {
        for (w, o) in p.weights.chunks_exact(p.row_bytes).zip(out.row(a)) {
            *o = dot(p.format, w, p.acts.row(a));
        }
    }
}

fn row_dot(format: QuantFormat, w: &[u8], act: ActRow) -> f32 {
    let blocks = w
        .chunks_exact(format.block_bytes())
        .zip(act.qs.chunks_exact(BLOCK))
        .zip(act.ds);
    blocks.fold(0.0, |sum, ((w, a), &[da, sa])| {
        // decode_block folds the zero point into q, so Σ q·a is ggml's sumi for every format.
        let (q, dw, mw) = decode_block(format, w);
        let sumi: i32 = q.iter().zip(a).map(|(&q, &a)| q * i32::from(a)).sum();
        sum + sumi as f32 * (dw * da) + mw * sa
    })
}

/// The f64 sum of [`super::panel_wide`]: the operations every level follows.
fn row_dot_wide(format: QuantFormat, w: &[u8], act: ActRow) -> f64 {
    let blocks = w
        .chunks_exact(format.block_bytes())
        .zip(act.qs.chunks_exact(BLOCK))
        .zip(act.ds);
    blocks.fold(0.0, |sum, ((w, a), &[da, sa])| {
        let (q, dw, mw) = decode_block(format, w);
        let sumi: i32 = q.iter().zip(a).map(|(&q, &a)| q * i32::from(a)).sum();
        let sum = f64::from(sumi).mul_add(f64::from(dw) * f64::from(da), sum);
        if format.has_min() {
            f64::from(mw).mul_add(f64::from(sa), sum)
        } else {
            sum
        }
    })
}
