//! The x86 kernels shared by the AVX2 and AVX-512 levels, generic over the block format
//! ([`Block`]: how 32 stored weights become 32 unsigned bytes and a scale) and the integer
//! product ([`IntDot`]: `vpmaddubsw` pairs, or VNNI `vpdpbusd`).
//!
//! Three kernels: [`rows`] multiplies weight rows in their GGUF layout (decode, few
//! activation rows); [`packed`] first interleaves eight weight rows so that one integer
//! instruction advances eight dot products (prefill, batches); [`packed16`] does the same
//! with sixteen rows in 512-bit vectors (AVX-512 VNNI). [`panel`] and [`panel16`] pick one.
//!
//! All give bit-identical results, so that an output does not depend on how many
//! activation rows share a call, where its row sits among them, or how the weight rows are
//! split into tasks. They compute eight weight rows at a time, one per float lane, and
//! every lane follows the one order of float operations of [`Acc::add_block`] and [`Acc::add_min`]: per
//! block in order, the exact integer block sum is converted and added with one FMA, then
//! the minimum term with another. The integer sums are exact whatever their order.
//!
//! Everything here is `#[inline(always)]` and only sound (and only fast) when inlined into
//! a `#[target_feature]` function of the level that owns the [`IntDot`].

mod packed;
mod packed16;
mod rows;

pub(super) use packed16::{Acc16, F32x16, F64x16};

use std::arch::x86_64::*;

use super::Panel;
use crate::quantize::ActRow;

/// Activation rows from which the packed kernel pays for its packing (a speed choice only:
/// all kernels give the same bits). The row kernel unpacks each weight block once for up to
/// four activation rows; measured on a Xeon (Q4_1, 1536 x 576 and 576 x 1536, 2 threads,
/// AVX2 level) it was ahead up to 4 rows, level at 6 to 8, behind from 12.
const PACKED_MIN_ROWS: usize = 8;

/// The same for the sixteen-row kernel (AVX-512 VNNI): level with the row kernel from 5 to
/// 12 rows, ahead from 16 (1.5x), and 3x at 128.
const PACKED16_MIN_ROWS: usize = 12;

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
    const BYTES: usize;
    const ZERO_POINT: i32;
    /// Whether the block has a minimum `m` (value `q * d + m`).
    const HAS_MIN: bool = false;
    /// Whether `q` is a signed byte (`Q8_0`), so that `u` spans `0..=255`.
    const SIGNED: bool = false;
    /// `u` of the 32 weights in element order, and `[d, m]` in lanes 0 and 1.
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128);
}

pub(super) struct Q4_0;
pub(super) struct Q4_1;
pub(super) struct Q5_0;
pub(super) struct Q5_1;
pub(super) struct Q8_0;

impl Block for Q4_0 {
    const BYTES: usize = 18;
    const ZERO_POINT: i32 = 8;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128) {
        // SAFETY: p points at a whole 18-byte block (caller contract).
        unsafe { (nibbles(p.add(2)), scale(p)) }
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const ZERO_POINT: i32 = 0;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128) {
        // SAFETY: p points at a whole 20-byte block (caller contract).
        unsafe { (nibbles(p.add(4)), scale_min(p)) }
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    const ZERO_POINT: i32 = 16;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128) {
        // SAFETY: p points at a whole 22-byte block (caller contract).
        unsafe {
            let qh = p.add(2).cast::<u32>().read_unaligned();
            (_mm256_or_si256(nibbles(p.add(6)), high_bits(qh)), scale(p))
        }
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const ZERO_POINT: i32 = 0;
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128) {
        // SAFETY: p points at a whole 24-byte block (caller contract).
        unsafe {
            let qh = p.add(4).cast::<u32>().read_unaligned();
            (
                _mm256_or_si256(nibbles(p.add(8)), high_bits(qh)),
                scale_min(p),
            )
        }
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    const ZERO_POINT: i32 = 128;
    const SIGNED: bool = true;
    #[inline(always)]
    unsafe fn unpack(p: *const u8) -> (__m256i, __m128) {
        // SAFETY: p points at a whole 34-byte block (caller contract).
        unsafe {
            let q = _mm256_loadu_si256(p.add(2).cast());
            (_mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN)), scale(p))
        }
    }
}

/// 16 bytes of packed nibbles as 32 bytes: low nibbles (elements 0..16), then high ones.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    // SAFETY: p points at 16 readable bytes (caller contract).
    unsafe {
        // The 16 bytes in both halves; the upper half shifted right by 4 (bits that cross
        // into a byte from its neighbour are masked off with the high nibble).
        let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
        let shifted = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
        _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
    }
}

/// Byte `e` is `0x10` where bit `e` of `qh` is set, else 0.
#[inline(always)]
unsafe fn high_bits(qh: u32) -> __m256i {
    // SAFETY: register-only intrinsics; the caller runs with AVX2 enabled.
    unsafe {
        let v = _mm256_set1_epi32(qh as i32);
        #[rustfmt::skip]
        let byte_of = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        );
        let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, byte_of), bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }
}

/// The block's f16 `d` in lane 0.
#[inline(always)]
unsafe fn scale(p: *const u8) -> __m128 {
    // SAFETY: p points at a block, whose first two bytes are d.
    unsafe {
        _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
            p.cast::<u16>().read_unaligned(),
        )))
    }
}

/// The block's f16 `d` and `m` in lanes 0 and 1.
#[inline(always)]
unsafe fn scale_min(p: *const u8) -> __m128 {
    // SAFETY: p points at a block, whose first four bytes are d and m.
    unsafe { _mm_cvtph_ps(_mm_cvtsi32_si128(p.cast::<i32>().read_unaligned())) }
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

/// Fill `out` for a whole panel (shape contract checked by [`super::panel`]).
#[inline(always)]
pub(super) unsafe fn panel<I: IntDot, B: Block, A: Acc>(p: &Panel, out: &mut [A::Out]) {
    // SAFETY: forwarded caller contract (shapes checked, features enabled).
    unsafe {
        if p.acts.rows() >= PACKED_MIN_ROWS && (I::FULL_RANGE || !B::SIGNED) {
            packed_panel::<packed::Packed8<I, B, A>>(p, out)
        } else {
            rows::panel::<I, B, A>(p, out)
        }
    }
}

/// The AVX-512 level's panel: the sixteen-row packed kernel ([`packed16`], VNNI only) for
/// batches, the row kernel below [`PACKED16_MIN_ROWS`]. Same bits as [`panel`].
#[inline(always)]
pub(super) unsafe fn panel16<I: IntDot, B: Block, A: Acc, W: Acc16<Out = A::Out>>(
    p: &Panel,
    out: &mut [A::Out],
) {
    // SAFETY: forwarded caller contract (shapes checked, AVX-512 VNNI enabled).
    unsafe {
        if p.acts.rows() >= PACKED16_MIN_ROWS {
            packed_panel::<packed16::Packed16<B, W>>(p, out)
        } else {
            rows::panel::<I, B, A>(p, out)
        }
    }
}

/// A packed kernel as [`packed_panel`] drives it: weight rows are packed [`Self::ROWS`] at
/// a time into a buffer the panel reuses, and each packed group is multiplied into every
/// activation row, [`ROWS_PER_PASS`] rows per pass.
pub(super) trait PackedKernel {
    /// Weight rows per packed group.
    const ROWS: usize;
    type Out: Copy;
    type Buf;
    /// A buffer for `groups` packed groups of `nb` blocks.
    fn buffer(groups: usize, nb: usize) -> Self::Buf;
    /// Pack `valid` (1..=ROWS) weight rows starting at `w` into group `group` of `buf`;
    /// missing rows are packed as zeros, scale 0.
    unsafe fn pack(p: &Panel, w: *const u8, valid: usize, group: usize, buf: &mut Self::Buf);
    /// Multiply packed group `group` (`valid` rows from weight row `row0`) into activation
    /// rows `a..a + R`, writing `out[(a + r) * rows + row0 + i]`.
    unsafe fn multiply<const R: usize>(
        p: &Panel,
        buf: &Self::Buf,
        group: (usize, usize, usize),
        a: usize,
        out: &mut [Self::Out],
    );
}

/// Weight rows packed per refill of a packed kernel's buffer (kept in L2 while all
/// activations pass).
const PACK_ROWS: usize = 64;
/// Activation rows multiplied per pass over a packed group.
const ROWS_PER_PASS: usize = 4;

/// Fill `out` for a whole panel with packed kernel `K` (shape contract checked by
/// [`super::panel`]).
#[inline(always)]
unsafe fn packed_panel<K: PackedKernel>(p: &Panel, out: &mut [K::Out]) {
    let (m, rows) = (p.acts.rows(), p.rows());
    let mut buf = K::buffer(PACK_ROWS.min(rows).div_ceil(K::ROWS), p.acts.blocks());
    for r0 in (0..rows).step_by(PACK_ROWS) {
        let r1 = (r0 + PACK_ROWS).min(rows);
        let groups: Vec<(usize, usize, usize)> = (r0..r1)
            .step_by(K::ROWS)
            .enumerate()
            .map(|(g, row0)| (g, row0, K::ROWS.min(r1 - row0)))
            .collect();
        for &(g, row0, valid) in &groups {
            // SAFETY: rows row0..row0+valid lie inside the panel.
            unsafe {
                let w = p.weights.as_ptr().add(row0 * p.row_bytes);
                K::pack(p, w, valid, g, &mut buf)
            };
        }
        for &group in &groups {
            let mut a = 0;
            // SAFETY (all calls below): activation rows a..a+R exist; the group is packed.
            while a + ROWS_PER_PASS <= m {
                unsafe { K::multiply::<ROWS_PER_PASS>(p, &buf, group, a, out) };
                a += ROWS_PER_PASS;
            }
            match m - a {
                3 => unsafe { K::multiply::<3>(p, &buf, group, a, out) },
                2 => unsafe { K::multiply::<2>(p, &buf, group, a, out) },
                1 => unsafe { K::multiply::<1>(p, &buf, group, a, out) },
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
    unsafe fn zero() -> Self;
    unsafe fn add_block(self, isum: __m256i, dw: __m256, da: f32) -> Self;
    unsafe fn add_min(self, mw: __m256, sa: f32) -> Self;
    /// The eight lanes, row 0 first.
    unsafe fn lanes(self) -> [Self::Out; LANES];
}

/// f32 lanes: `dw·da` is rounded to f32 first, then fused into the sum.
#[derive(Clone, Copy)]
pub(super) struct F32Acc(__m256);

impl Acc for F32Acc {
    type Out = f32;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; the caller runs with AVX enabled.
        unsafe { F32Acc(_mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m256i, dw: __m256, da: f32) -> Self {
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
    unsafe fn add_min(self, mw: __m256, sa: f32) -> Self {
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
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; the caller runs with AVX enabled.
        unsafe { F64Acc([_mm256_setzero_pd(); 2]) }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m256i, dw: __m256, da: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe {
            let da = _mm256_set1_pd(f64::from(da));
            let sumi = [
                _mm256_cvtepi32_pd(_mm256_castsi256_si128(isum)),
                _mm256_cvtepi32_pd(_mm256_extracti128_si256::<1>(isum)),
            ];
            let dw = halves_f64(dw);
            // No closures here: they would not inherit the caller's target features.
            F64Acc([
                _mm256_fmadd_pd(sumi[0], _mm256_mul_pd(dw[0], da), self.0[0]),
                _mm256_fmadd_pd(sumi[1], _mm256_mul_pd(dw[1], da), self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, mw: __m256, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; the caller runs with AVX2 and FMA enabled.
        unsafe {
            let sa = _mm256_set1_pd(f64::from(sa));
            let mw = halves_f64(mw);
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
