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

use std::marker::PhantomData;

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

/// Where a panel writes its products: for each activation row, the panel's columns of a
/// row-major `m x n` output that other panels (other column ranges) fill at the same time.
pub(crate) struct Outputs<'a, T> {
    first: *mut T,
    stride: usize,
    m: usize,
    cols: usize,
    _rows: PhantomData<&'a mut [T]>,
}

// SAFETY: an `Outputs` is the only access to its columns (see `Outputs::columns`).
unsafe impl<T: Send> Send for Outputs<'_, T> {}

impl<'a, T> Outputs<'a, T> {
    /// Columns `cols` of each of the `m` rows of `stride` outputs starting at `y`.
    ///
    /// # Safety
    /// `y` must point at `m * stride` outputs that live, and are accessed only through
    /// `Outputs` of disjoint column ranges, for `'a`; `cols` must lie within `0..stride`.
    pub unsafe fn columns(
        y: *mut T,
        stride: usize,
        m: usize,
        cols: std::ops::Range<usize>,
    ) -> Self {
        Self {
            // SAFETY: cols.start <= stride, inside row 0 (or one past it when empty).
            first: unsafe { y.add(cols.start) },
            stride,
            m,
            cols: cols.len(),
            _rows: PhantomData,
        }
    }

    /// The panel's outputs of activation row `a`.
    pub fn row(&mut self, a: usize) -> &mut [T] {
        assert!(a < self.m, "activation row {a} of {}", self.m);
        // SAFETY: row a's columns lie inside the outputs and no other `Outputs` reaches
        // them (constructor contracts); `&mut self` keeps the slices from overlapping.
        unsafe { std::slice::from_raw_parts_mut(self.first.add(a * self.stride), self.cols) }
    }
}

/// `out.row(a)[r] = weight row r · activation row a` for the panel's `rows` weight rows
/// and all activation rows. `level` must be available on this CPU.
///
/// Every kernel of a level computes a given (weight row, activation row) product with the
/// same sequence of float operations, whatever the panel's shape, so results do not depend
/// on batch size or task split (see `row_results_do_not_depend_on_batch`).
pub(crate) fn panel(level: SimdLevel, p: &Panel, out: &mut Outputs<f32>) {
    check(level, p, out);
    match (level, p.interleaved) {
        #[cfg(target_arch = "x86_64")]
        (SimdLevel::Avx2, Some(lines)) => avx2::panel(p, lines, out),
        #[cfg(target_arch = "x86_64")]
        (SimdLevel::Avx512, Some(lines)) => avx512::panel(p, lines, out),
        #[cfg(target_arch = "aarch64")]
        (SimdLevel::Neon, _) => neon::panel(p, out),
        _ => scalar::panel(p, out),
    }
}

/// [`panel`] with every block's term added into an f64 sum, left unrounded: per block in
/// order, `sum + f64(sumi)·(f64(dw)·f64(da))` as one FMA, then `sum + f64(mw)·f64(sa)` for
/// formats with a minimum. Every level follows these same operations, so unlike [`panel`]
/// all levels agree bit for bit.
pub(crate) fn panel_wide(level: SimdLevel, p: &Panel, out: &mut Outputs<f64>) {
    check(level, p, out);
    match (level, p.interleaved) {
        #[cfg(target_arch = "x86_64")]
        (SimdLevel::Avx2, Some(lines)) => avx2::panel_wide(p, lines, out),
        #[cfg(target_arch = "x86_64")]
        (SimdLevel::Avx512, Some(lines)) => avx512::panel_wide(p, lines, out),
        #[cfg(target_arch = "aarch64")]
        (SimdLevel::Neon, _) => neon::panel_wide(p, out),
        _ => scalar::panel_wide(p, out),
    }
}

/// Whether products on `level` run on the interleaved copy of the weights (the packed
/// kernels of the x86 levels) rather than on their GGUF layout (the scalar and NEON
/// kernels). Measured on a Xeon (the demo's shapes, 1 and 2 threads): on interleaved
/// records the packed kernels were ahead of the former GGUF row kernel at every row
/// count, from one (AVX-512 VNNI 2-3x, AVX2 1.1-2x) to batches.
pub(crate) fn uses_interleaved(level: SimdLevel) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(level, SimdLevel::Avx2 | SimdLevel::Avx512) {
        return true;
    }
    let _ = level;
    false
}

fn check<T>(level: SimdLevel, p: &Panel, out: &Outputs<T>) {
    // The SIMD kernels index with raw pointers: these checks are what makes that sound.
    assert_eq!(p.row_bytes, p.acts.blocks() * p.format.block_bytes());
    assert_eq!((out.m, out.cols), (p.acts.rows(), p.rows()));
    assert_eq!(
        p.interleaved.is_some(),
        uses_interleaved(level),
        "{level} reads interleaved weights exactly when uses_interleaved says so"
    );
    match p.interleaved {
        Some(lines) => {
            let groups = p.rows().div_ceil(GROUP_ROWS);
            assert!(lines.len() >= groups * p.acts.blocks() * record_lines(p.format));
        }
        None => assert_eq!(p.weights.len(), p.rows() * p.row_bytes),
    }
    assert!(level.is_available(), "{level} is not available on this CPU");
}
