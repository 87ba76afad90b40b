//! The x86 kernels of the AVX2 and AVX-512 levels, on weights interleaved sixteen rows at
//! a time ([`crate::interleaved`]), generic over the block format ([`Block`]: how a record
//! holds the unsigned bytes `u` and the scales) and, for 256-bit vectors, the integer
//! product ([`IntDot`]: `vpmaddubsw` pairs, or VNNI `vpdpbusd`).
//!
//! Two kernels: [`packed`] multiplies eight weight rows (half a group) at once, one
//! integer instruction advancing eight dot products (AVX2); [`packed16`] does the same
//! with a whole group of sixteen rows in 512-bit vectors (AVX-512 VNNI). [`panel`] and
//! [`panel16`] drive them.
//!
//! Both give bit-identical results, so that an output does not depend on how many
//! activation rows share a call, where its row sits among them, or how the weight rows are
//! split into tasks or levels. Every lane follows the one order of float operations of
//! [`Acc::add_block`] and [`Acc::add_min`]: per block in order, the exact integer block sum
//! is converted and added with one FMA, then the minimum term with another. The integer
//! sums are exact whatever their order.
//!
//! Everything here is `#[inline(always)]` and only sound (and only fast) when inlined into
//! a `#[target_feature]` function of the level that owns the [`IntDot`].

mod packed;
mod packed16;

pub(super) use packed16::{Acc16, F32x16, F64x16};

use std::arch::x86_64::*;

use super::{Outputs, Panel};
use crate::QuantFormat;
use crate::interleaved::{GROUP_ROWS, Line, record_lines, weight_lines};
use crate::quantize::ActRow;

/// Weight rows computed together, one per lane of a 256-bit vector.
pub(super) const LANES: usize = 8;

/// `acc + Σ u8 x i8` over each group of four bytes, in eight i32 lanes.
pub(super) trait IntDot {
    /// Whether `u` may use all of `0..=255` (else at most 128: `vpmaddubsw` saturates
    /// pairs at `i16::MAX`).
    const FULL_RANGE: bool;
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// A ggml block format as the x86 kernels see it: the weight integer `q` is stored as the
/// unsigned byte `u = q + ZERO_POINT`, and `Σ q·a = Σ u·a - ZERO_POINT·Σa`.
pub(super) trait Block {
    const FORMAT: QuantFormat;
    const ZERO_POINT: i32 = Self::FORMAT.zero_point();
    /// Whether the block has a minimum `m` (value `q * d + m`).
    const HAS_MIN: bool = Self::FORMAT.has_min();
    /// Whether `q` is a signed byte (`Q8_0`), so that `u` spans `0..=255`.
    const SIGNED: bool = matches!(Self::FORMAT, QuantFormat::Q8_0);
    /// Whether interleaved records hold `u` as nibbles ([`crate::interleaved`]).
    const NIBBLES: bool = Self::FORMAT.is_nibbles();
    /// Lines per interleaved record, and of them the weight lines.
    const RECORD_LINES: usize = record_lines(Self::FORMAT);
    const WEIGHT_LINES: usize = weight_lines(Self::FORMAT);
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;

impl Block for Q4_0 {
    const FORMAT: QuantFormat = QuantFormat::Q4_0;
}

impl Block for Q4_1 {
    const FORMAT: QuantFormat = QuantFormat::Q4_1;
}

impl Block for Q5_0 {
    const FORMAT: QuantFormat = QuantFormat::Q5_0;
}

impl Block for Q5_1 {
    const FORMAT: QuantFormat = QuantFormat::Q5_1;
}

impl Block for Q8_0 {
    const FORMAT: QuantFormat = QuantFormat::Q8_0;
}

/// Raw pointers into one activation row (lengths checked by [`super::panel`]).
#[derive(Clone, Copy)]
pub(super) struct ActPtr {
    pub qs: *const i8,
    pub ds: *const [f32; 2],
    pub qsum: *const i32,
}

impl From<ActRow<'_>> for ActPtr {
    fn from(a: ActRow<'_>) -> Self {
        ActPtr {
            qs: a.qs.as_ptr(),
            ds: a.ds.as_ptr(),
            qsum: a.qsum.as_ptr(),
        }
    }
}

/// Fill `out` for a whole panel with the eight-row kernel (shape contract checked by
/// [`super::panel`]; the panel's interleaved records are `lines`).
#[inline(always)]
pub(super) unsafe fn panel<I: IntDot, B: Block, A: Acc>(
    p: &Panel,
    lines: &[Line],
    out: &mut Outputs<A::Out>,
) {
    // SAFETY: forwarded caller contract (shapes checked, features enabled).
    unsafe { interleaved_panel::<packed::Packed8<I, B, A>>(p, lines, out) }
}

/// The AVX-512 level's panel: the sixteen-row kernel ([`packed16`], VNNI). Same bits as
/// [`panel`].
#[inline(always)]
pub(super) unsafe fn panel16<B: Block, W: Acc16>(
    p: &Panel,
    lines: &[Line],
    out: &mut Outputs<W::Out>,
) {
    // SAFETY: forwarded caller contract (shapes checked, AVX-512 VNNI enabled).
    unsafe { interleaved_panel::<packed16::Packed16<B, W>>(p, lines, out) }
}

/// A packed kernel as [`interleaved_panel`] drives it: [`Self::ROWS`] weight rows of one
/// interleaved group (all sixteen, or the low or high eight) multiplied into `R`
/// activation rows at once.
pub(super) trait GroupKernel {
    /// Weight rows per call: [`GROUP_ROWS`] or half of it.
    const ROWS: usize;
    type Out: Copy;
    /// Multiply part `part` (rows `part * ROWS..`) of the group whose records start at
    /// `rec` into activation rows `a..a + R`, writing `out.row(a + r)[row0 + i]` for
    /// `i < valid`, where `rows` is `(row0, valid)`.
    unsafe fn multiply<const R: usize>(
        p: &Panel,
        rec: *const Line,
        part: usize,
        rows: (usize, usize),
        a: usize,
        out: &mut Outputs<Self::Out>,
    );
}

/// Pointers into activation rows `a..a + R` of the panel.
#[inline(always)]
fn act_rows<const R: usize>(p: &Panel, a: usize) -> [ActPtr; R] {
    let mut acts = [ActPtr::from(p.acts.row(a)); R];
    for (i, act) in acts.iter_mut().enumerate() {
        *act = p.acts.row(a + i).into();
    }
    acts
}

/// Writes the first `valid` lanes of each of `rows` (activation rows `a..`, weight rows
/// `row0..` of the panel) into `out`.
#[inline(always)]
fn write_rows<T: Copy, const L: usize>(
    out: &mut Outputs<T>,
    a: usize,
    (row0, valid): (usize, usize),
    rows: impl IntoIterator<Item = [T; L]>,
) {
    for (r, lanes) in rows.into_iter().enumerate() {
        out.row(a + r)[row0..row0 + valid].copy_from_slice(&lanes[..valid]);
    }
}

/// Activation rows multiplied per pass over a group's records (kept in L1 meanwhile).
const ROWS_PER_PASS: usize = 4;

/// Fill `out` for a whole panel with packed kernel `K` on the panel's interleaved records
/// (`lines`, checked by [`super::panel`] to cover its groups).
#[inline(always)]
unsafe fn interleaved_panel<K: GroupKernel>(p: &Panel, lines: &[Line], out: &mut Outputs<K::Out>) {
    let (m, rows) = (p.acts.rows(), p.rows());
    let group_lines = p.acts.blocks() * record_lines(p.format);
    for (g, g0) in (0..rows).step_by(GROUP_ROWS).enumerate() {
        let rec = lines[g * group_lines..].as_ptr();
        for part in 0..GROUP_ROWS / K::ROWS {
            let row0 = g0 + part * K::ROWS;
            if row0 >= rows {
                break;
            }
            let rows = (row0, K::ROWS.min(rows - row0));
            let mut a = 0;
            // SAFETY (all calls below): activation rows a..a+R exist; the group's records
            // are in `lines`.
            while a + ROWS_PER_PASS <= m {
                unsafe { K::multiply::<ROWS_PER_PASS>(p, rec, part, rows, a, out) };
                a += ROWS_PER_PASS;
            }
            match m - a {
                3 => unsafe { K::multiply::<3>(p, rec, part, rows, a, out) },
                2 => unsafe { K::multiply::<2>(p, rec, part, rows, a, out) },
                1 => unsafe { K::multiply::<1>(p, rec, part, rows, a, out) },
                _ => {}
            }
        }
    }
}

/// How a kernel turns exact integer block sums into its outputs, lane by lane (one lane
/// per weight row): per block in order, `acc + sumi·(dw·da)` as one FMA, then, for formats
/// with a minimum, `acc + mw·sa` as another. `isum` holds exact integer block sums (below
/// 2^24, so their conversion is exact); `dw` and `mw` the weight rows' scales and minimums.
///
/// Every x86 kernel ends each block with these calls, in this order, so that an output's
/// bits depend only on its weight row and activation row. [`F32Acc`] rounds every step to
/// f32 (the ordinary products); [`F64Acc`] keeps them in f64, where a row split into column
/// slices sums to what the whole row gives (see `QuantMatrix::matmul_wide`).
pub(super) trait Acc: Copy {
    type Out: Copy;
    /// A block's `dw` and `mw` as [`Acc::add_block`] and [`Acc::add_min`] take them,
    /// formed once per block for all the activation rows it multiplies.
    type Scales: Copy;
    unsafe fn zero() -> Self;
    unsafe fn scales(dw: __m256, mw: __m256) -> Self::Scales;
    unsafe fn add_block(self, isum: __m256i, s: Self::Scales, da: f32) -> Self;
    unsafe fn add_min(self, s: Self::Scales, sa: f32) -> Self;
    /// The eight lanes, row 0 first.
    unsafe fn lanes(self) -> [Self::Out; LANES];
}

/// f32 lanes: `dw·da` is rounded to f32 first, then fused into the sum.
#[derive(Clone, Copy)]
pub(super) struct F32Acc(__m256);

impl Acc for F32Acc {
    type Out = f32;
    type Scales = [__m256; 2];
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; the caller runs with AVX enabled.
        unsafe { F32Acc(_mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn scales(dw: __m256, mw: __m256) -> [__m256; 2] {
        [dw, mw]
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m256i, [dw, _]: [__m256; 2], da: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe {
            let sumi = _mm256_cvtepi32_ps(isum);
            F32Acc(_mm256_fmadd_ps(
                sumi,
                _mm256_mul_ps(dw, _mm256_set1_ps(da)),
                self.0,
            ))
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, [_, mw]: [__m256; 2], sa: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe { F32Acc(_mm256_fmadd_ps(mw, _mm256_set1_ps(sa), self.0)) }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f32; LANES] {
        // SAFETY: __m256 and [f32; 8] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<__m256, [f32; LANES]>(self.0) }
    }
}

/// f64 lanes (rows 0..4, 4..8): `dw·da` is exact in f64, and so is its product with the
/// integer sum as long as that stays below 2^18; the FMA rounds only the running sum.
#[derive(Clone, Copy)]
pub(super) struct F64Acc([__m256d; 2]);

impl Acc for F64Acc {
    type Out = f64;
    /// `dw` and `mw`, each widened to two halves of f64.
    type Scales = [[__m256d; 2]; 2];
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; the caller runs with AVX enabled.
        unsafe { F64Acc([_mm256_setzero_pd(); 2]) }
    }
    #[inline(always)]
    unsafe fn scales(dw: __m256, mw: __m256) -> [[__m256d; 2]; 2] {
        // SAFETY: register-only intrinsics; the caller runs with AVX enabled.
        unsafe { [halves_f64(dw), halves_f64(mw)] }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m256i, [dw, _]: Self::Scales, da: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe {
            let da = _mm256_set1_pd(f64::from(da));
            let sumi = [
                _mm256_cvtepi32_pd(_mm256_castsi256_si128(isum)),
                _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(isum)),
            ];
            // No closures here: they would not inherit the caller's target features.
            F64Acc([
                _mm256_fmadd_pd(sumi[0], _mm256_mul_pd(dw[0], da), self.0[0]),
                _mm256_fmadd_pd(sumi[1], _mm256_mul_pd(dw[1], da), self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, [_, mw]: Self::Scales, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe {
            let sa = _mm256_set1_pd(f64::from(sa));
            F64Acc([
                _mm256_fmadd_pd(mw[0], sa, self.0[0]),
                _mm256_fmadd_pd(mw[1], sa, self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f64; LANES] {
        // SAFETY: [__m256d; 2] and [f64; 8] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<[__m256d; 2], [f64; LANES]>(self.0) }
    }
}

/// Lanes 0..4 and 4..8 of `v`, widened to f64 (exactly).
#[inline(always)]
unsafe fn halves_f64(v: __m256) -> [__m256d; 2] {
    // SAFETY: register-only intrinsics; the caller runs with AVX enabled.
    unsafe {
        [
            _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
        ]
    }
}
