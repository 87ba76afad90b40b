//! Dot products of weight rows with quantised activation rows, one module per instruction
//! set. [`panel`] is the single entry point: the matmul driver hands it a run of weight rows
//! and all activation rows and it fills their products.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::quantize::QuantizedActs;
use crate::{QuantFormat, SimdLevel};

/// A run of whole weight rows and the activations they multiply.
pub(crate) struct Panel<'a> {
    pub format: QuantFormat,
    /// `rows * row_bytes` bytes, GGUF block layout.
    pub weights: &'a [u8],
    pub row_bytes: usize,
    pub acts: &'a QuantizedActs,
}

impl Panel<'_> {
    pub fn rows(&self) -> usize {
        self.weights.len() / self.row_bytes
    }
}

/// `out[a * rows + r] = weight row r · activation row a` for the panel's `rows` weight rows
/// and all activation rows. `level` must be available on this CPU.
///
/// Every kernel of a level computes a given (weight row, activation row) product with the
/// same sequence of float operations, whatever the panel's shape, so results do not depend
/// on batch size or task split (see `row_results_do_not_depend_on_batch`).
pub(crate) fn panel(level: SimdLevel, p: &Panel, out: &mut [f32]) {
    check(level, p, out.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => avx2::panel(p, out),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => avx512::panel(p, out),
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => neon::panel(p, out),
        _ => scalar::panel(p, out),
    }
}

/// [`panel`] with every block's term added into an f64 sum, left unrounded: per block in
/// order, `sum + f64(sumi)·(f64(dw)·f64(da))` as one FMA, then `sum + f64(mw)·f64(sa)` for
/// formats with a minimum. Every level follows these same operations, so unlike [`panel`]
/// all levels agree bit for bit.
pub(crate) fn panel_wide(level: SimdLevel, p: &Panel, out: &mut [f64]) {
    check(level, p, out.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => avx2::panel_wide(p, out),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => avx512::panel_wide(p, out),
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => neon::panel_wide(p, out),
        _ => scalar::panel_wide(p, out),
    }
}

fn check(level: SimdLevel, p: &Panel, outputs: usize) {
    // The SIMD kernels index with raw pointers: these checks are what makes that sound.
    assert_eq!(p.row_bytes, p.acts.blocks() * p.format.block_bytes());
    assert_eq!(p.weights.len(), p.rows() * p.row_bytes);
    assert_eq!(outputs, p.rows() * p.acts.rows());
    assert!(level.is_available(), "{level} is not available on this CPU");
}
