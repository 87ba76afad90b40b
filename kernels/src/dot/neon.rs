//! AArch64 Advanced SIMD level. Weights are unpacked to signed bytes (`q - zero point`, so
//! no correction term is needed) and multiplied with `smull`/`smlal2` into i16 pairs (at
//! most 2·128·127 in magnitude, no overflow), then pairwise-added into four i32 lanes. The
//! exact block sum is scaled by `d_w * d_a` into float lanes as ggml's NEON `vec_dot` does.
//!
//! Each weight block is unpacked once and multiplied into up to four activation rows; each
//! activation row keeps its own accumulators, so its result is the same however many rows
//! share the pass.
//! Loads read from bounds-checked slices; only the intrinsics themselves are `unsafe`.

use std::arch::aarch64::*;

use half::f16;

use super::{Outputs, Panel};
use crate::QuantFormat;
use crate::format::BLOCK;
use crate::quantize::ActRow;

/// Activation rows multiplied per pass over a weight row.
const ROWS_PER_PASS: usize = 4;

/// A ggml block format as the NEON kernel sees it.
trait Block {
    const BYTES: usize;
    /// Whether the block has a minimum `m` (value `q * d + m`).
    const HAS_MIN: bool = false;
    /// Signed weights `q - zero point` (elements 0..16, 16..32), `d` and `m`.
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32);
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q5_1;
struct Q8_0;

fn f16_at(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Low nibbles (elements 0..16) and high nibbles (16..32) of 16 bytes.
fn nibbles(qs: &[u8]) -> [uint8x16_t; 2] {
    let qs = &qs[..16];
    // SAFETY: qs holds 16 bytes; NEON is a baseline feature of every AArch64 target.
    unsafe {
        let q = vld1q_u8(qs.as_ptr());
        [vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q)]
    }
}

/// Byte `e` is `0x10` where bit `e` of `bits` is set, else 0.
fn high_bits(bits: u16) -> uint8x16_t {
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    // SAFETY: BIT holds 16 bytes; register-only intrinsics otherwise.
    unsafe {
        let v = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vandq_u8(vtstq_u8(v, vld1q_u8(BIT.as_ptr())), vdupq_n_u8(0x10))
    }
}

/// `u - zero_point` as signed bytes.
fn signed(u: uint8x16_t, zero_point: i8) -> int8x16_t {
    // SAFETY: register-only intrinsics.
    unsafe { vsubq_s8(vreinterpretq_s8_u8(u), vdupq_n_s8(zero_point)) }
}

impl Block for Q4_0 {
    const BYTES: usize = 18;
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
        let [lo, hi] = nibbles(&b[2..18]);
        ([signed(lo, 8), signed(hi, 8)], f16_at(b, 0), 0.0)
    }
}

impl Block for Q4_1 {
    const BYTES: usize = 20;
    const HAS_MIN: bool = true;
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
        let [lo, hi] = nibbles(&b[4..20]);
        ([signed(lo, 0), signed(hi, 0)], f16_at(b, 0), f16_at(b, 2))
    }
}

impl Block for Q5_0 {
    const BYTES: usize = 22;
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
        let qh = u32_at(b, 2);
        let [lo, hi] = nibbles(&b[6..22]);
        // SAFETY: register-only intrinsics.
        let (lo, hi) = unsafe {
            (
                vorrq_u8(lo, high_bits(qh as u16)),
                vorrq_u8(hi, high_bits((qh >> 16) as u16)),
            )
        };
        ([signed(lo, 16), signed(hi, 16)], f16_at(b, 0), 0.0)
    }
}

impl Block for Q5_1 {
    const BYTES: usize = 24;
    const HAS_MIN: bool = true;
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
        let qh = u32_at(b, 4);
        let [lo, hi] = nibbles(&b[8..24]);
        // SAFETY: register-only intrinsics.
        let (lo, hi) = unsafe {
            (
                vorrq_u8(lo, high_bits(qh as u16)),
                vorrq_u8(hi, high_bits((qh >> 16) as u16)),
            )
        };
        ([signed(lo, 0), signed(hi, 0)], f16_at(b, 0), f16_at(b, 2))
    }
}

impl Block for Q8_0 {
    const BYTES: usize = 34;
    fn unpack(b: &[u8]) -> ([int8x16_t; 2], f32, f32) {
        let q = &b[2..34];
        // SAFETY: q holds 32 bytes; i8 and u8 have the same layout.
        let w = unsafe {
            [
                vld1q_s8(q.as_ptr().cast()),
                vld1q_s8(q[16..].as_ptr().cast()),
            ]
        };
        (w, f16_at(b, 0), 0.0)
    }
}

/// Exact `Σ w·a` of one block, in four i32 lanes.
fn block_sum([w0, w1]: [int8x16_t; 2], a: &[i8]) -> int32x4_t {
    let a = &a[..BLOCK];
    // SAFETY: a holds 32 bytes; register-only intrinsics otherwise.
    unsafe {
        let (a0, a1) = (vld1q_s8(a.as_ptr()), vld1q_s8(a[16..].as_ptr()));
        let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(w0), vget_low_s8(a0)), w0, a0);
        let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(w1), vget_low_s8(a1)), w1, a1);
        vpadalq_s16(vpaddlq_s16(p0), p1)
    }
}

/// Dot products of one weight row with `R` activation rows.
fn dot_rows<B: Block, const R: usize>(row: &[u8], acts: [ActRow; R]) -> [f32; R] {
    // SAFETY: register-only intrinsics.
    let mut acc = [unsafe { vdupq_n_f32(0.0) }; R];
    let mut min_acc = [0.0f32; R];
    for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
        let (w, dw, mw) = B::unpack(block);
        for r in 0..R {
            let isum = block_sum(w, &acts[r].qs[b * BLOCK..]);
            let [da, sa] = acts[r].ds[b];
            // SAFETY: register-only intrinsics.
            acc[r] = unsafe { vfmaq_f32(acc[r], vcvtq_f32_s32(isum), vdupq_n_f32(dw * da)) };
            if B::HAS_MIN {
                min_acc[r] += mw * sa;
            }
        }
    }
    // SAFETY: register-only intrinsic.
    std::array::from_fn(|r| unsafe { vaddvq_f32(acc[r]) } + min_acc[r])
}

/// The f64 sums of [`super::panel_wide`] of one weight row with `R` activation rows: the
/// exact block sum leaves the vector as one integer, and the float steps are the scalar
/// reference's.
fn dot_rows_wide<B: Block, const R: usize>(row: &[u8], acts: [ActRow; R]) -> [f64; R] {
    let mut acc = [0.0f64; R];
    for (b, block) in row.chunks_exact(B::BYTES).enumerate() {
        let (w, dw, mw) = B::unpack(block);
        for r in 0..R {
            // SAFETY: register-only intrinsic.
            let sumi = unsafe { vaddvq_s32(block_sum(w, &acts[r].qs[b * BLOCK..])) };
            let [da, sa] = acts[r].ds[b];
            acc[r] = f64::from(sumi).mul_add(f64::from(dw) * f64::from(da), acc[r]);
            if B::HAS_MIN {
                acc[r] = f64::from(mw).mul_add(f64::from(sa), acc[r]);
            }
        }
    }
    acc
}

/// A dot-product routine of one weight row with `R` activation rows.
trait RowDots {
    type Out: Copy;
    fn dots<B: Block, const R: usize>(row: &[u8], acts: [ActRow; R]) -> [Self::Out; R];
}

struct Narrow;
struct Wide;

impl RowDots for Narrow {
    type Out = f32;
    fn dots<B: Block, const R: usize>(row: &[u8], acts: [ActRow; R]) -> [f32; R] {
        dot_rows::<B, R>(row, acts)
    }
}

impl RowDots for Wide {
    type Out = f64;
    fn dots<B: Block, const R: usize>(row: &[u8], acts: [ActRow; R]) -> [f64; R] {
        dot_rows_wide::<B, R>(row, acts)
    }
}

fn rows_at<D: RowDots, B: Block, const R: usize>(
    p: &Panel,
    (r, row): (usize, &[u8]),
    a: usize,
    out: &mut Outputs<D::Out>,
) {
    let acts: [ActRow; R] = std::array::from_fn(|i| p.acts.row(a + i));
    for (i, dot) in D::dots::<B, R>(row, acts).into_iter().enumerate() {
        out.row(a + i)[r] = dot;
    }
}

fn panel_for<D: RowDots, B: Block>(p: &Panel, out: &mut Outputs<D::Out>) {
    let m = p.acts.rows();
    for (r, row) in p.weights.chunks_exact(p.row_bytes).enumerate() {
        let mut a = 0;
        while a + ROWS_PER_PASS <= m {
            rows_at::<D, B, ROWS_PER_PASS>(p, (r, row), a, out);
            a += ROWS_PER_PASS;
        }
        match m - a {
            3 => rows_at::<D, B, 3>(p, (r, row), a, out),
            2 => rows_at::<D, B, 2>(p, (r, row), a, out),
            1 => rows_at::<D, B, 1>(p, (r, row), a, out),
            _ => {}
        }
    }
}

fn panel_of<D: RowDots>(p: &Panel, out: &mut Outputs<D::Out>) {
    match p.format {
        QuantFormat::Q4_0 => panel_for::<D, Q4_0>(p, out),
        QuantFormat::Q4_1 => panel_for::<D, Q4_1>(p, out),
        QuantFormat::Q5_0 => panel_for::<D, Q5_0>(p, out),
        QuantFormat::Q5_1 => panel_for::<D, Q5_1>(p, out),
        QuantFormat::Q8_0 => panel_for::<D, Q8_0>(p, out),
    }
}

pub(super) fn panel(p: &Panel, out: &mut Outputs<f32>) {
    panel_of::<Narrow>(p, out)
}

pub(super) fn panel_wide(p: &Panel, out: &mut Outputs<f64>) {
    panel_of::<Wide>(p, out)
}
