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

use crate::interleaved::{GROUP_ROWS, Line, record_lines};
use crate::quantize::QuantizedActs;
use crate::{QuantFormat, SimdLevel};

/// A run of whole weight rows and the activations they multiply.
pub(crate) struct Panel<'a> {
    pub format: QuantFormat,
    pub rows: usize,
    /// `rows * row_bytes` bytes, GGUF block layout (empty where `interleaved` is set).
    pub weights: &'a [u8],
    pub row_bytes: usize,
    /// The same rows interleaved ([`crate::interleaved`]), from the group of the first row,
    /// which starts a group, where [`uses_interleaved`] chose them.
    pub interleaved: Option<&'a [Line]>,
    pub acts: &'a QuantizedActs,
}

impl Panel<'_> {
    pub fn rows(&self) -> usize {
        self.rows
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

/// Whether products on `level` run on the interleaved copy of the weights (the packed
/// kernels) rather than on their GGUF layout (the row kernel). Measured on a Xeon (Q4_1,
/// the demo's shapes, 1 and 2 threads): on interleaved records the packed kernels are
/// ahead at every row count, from one (AVX-512 VNNI 2-3x, AVX2 1.4-2x) to batches.
pub(crate) fn uses_interleaved(level: SimdLevel, format: QuantFormat) -> bool {
    match level {
        // vpmaddubsw would saturate on Q8_0's full byte range.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => format != QuantFormat::Q8_0,
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => true,
        _ => {
            let _ = format;
            false
        }
    }
}

fn check(level: SimdLevel, p: &Panel, outputs: usize) {
    // The SIMD kernels index with raw pointers: these checks are what makes that sound.
    assert_eq!(p.row_bytes, p.acts.blocks() * p.format.block_bytes());
    assert_eq!(outputs, p.rows() * p.acts.rows());
    match p.interleaved {
        Some(lines) => {
            let groups = p.rows().div_ceil(GROUP_ROWS);
            assert!(lines.len() >= groups * p.acts.blocks() * record_lines(p.format));
        }
        None => assert_eq!(p.weights.len(), p.rows() * p.row_bytes),
    }
    assert!(level.is_available(), "{level} is not available on this CPU");
}
