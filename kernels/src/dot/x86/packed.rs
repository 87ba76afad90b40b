//! The packed kernel (prefill): eight weight rows are unpacked to unsigned bytes and
//! interleaved four bytes at a time, so that one integer instruction multiplies four
//! activation bytes (broadcast) into the running sums of all eight rows, one row per i32
//! lane. A block's eight integer sums then come out one per lane, ready for
//! [`super::Acc::add_block`], without the sum across lanes the [`super::rows`] kernel needs.
//!
//! Rows are packed [`super::PACK_ROWS`] at a time into a buffer the panel reuses; each packed group
//! is multiplied into every activation row, four rows per pass.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::{Acc, ActPtr, Block, IntDot, LANES, PackedKernel};
use crate::dot::Panel;
use crate::format::BLOCK;

/// One 32-byte vector of packed weights, aligned for `vmovdqa`.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Lane32([u8; 32]);

/// Up to [`super::PACK_ROWS`] weight rows, packed. For group `G` (rows `8G..8G+8`) and block `b`,
/// vector `(G * nb + b) * 8 + g` holds elements `4g..4g+4` of the eight rows, row `i` in
/// lane `i`; `d` and `m` hold the rows' scales and minimums at `(G * nb + b) * 8 + i`.
pub(super) struct PackBuf {
    u: Vec<Lane32>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// Transpose an 8x8 matrix of 32-bit elements: row `i` of the result is column `i`.
#[inline(always)]
unsafe fn transpose8(v: [__m256i; 8]) -> [__m256i; 8] {
    // SAFETY: register-only intrinsics; the caller runs with AVX2 enabled.
    unsafe {
        let t: [__m256i; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[i / 4 * 4 + i % 2 * 2], v[i / 4 * 4 + i % 2 * 2 + 1]);
            if i % 4 < 2 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        // t[0] = unpacklo(v0,v1), t[1] = unpacklo(v2,v3), t[2] = unpackhi(v0,v1), ...
        let q: [__m256i; 8] = std::array::from_fn(|i| {
            let (a, b) = (
                t[i / 4 * 4 + i % 4 / 2 * 2],
                t[i / 4 * 4 + i % 4 / 2 * 2 + 1],
            );
            if i % 2 == 0 {
                _mm256_unpacklo_epi64(a, b)
            } else {
                _mm256_unpackhi_epi64(a, b)
            }
        });
        // q[0..4] hold columns 0..4 (lanes 0..4 in the low half, columns 4..8 in the high
        // half) of rows 0..4; q[4..8] the same of rows 4..8.
        std::array::from_fn(|c| {
            let (a, b) = (q[c % 4], q[4 + c % 4]);
            if c < 4 {
                _mm256_permute2x128_si256::<0x20>(a, b)
            } else {
                _mm256_permute2x128_si256::<0x31>(a, b)
            }
        })
    }
}

/// Block `b` of `valid` (0..=8) weight rows from `w`, transposed for a packed group:
/// vector `g` holds elements `4g..4g+4` of the eight rows, row `i` in lane `i`, and entry
/// `i` of the second value row `i`'s `[d, m, ..]`; missing rows are zeros (scale 0).
#[inline(always)]
pub(super) unsafe fn columns8<B: Block>(
    p: &Panel,
    w: *const u8,
    valid: usize,
    b: usize,
) -> ([__m256i; LANES], [[f32; 4]; LANES]) {
    // SAFETY: rows below `valid` lie inside the panel and block b inside each row (caller
    // contract); register-only intrinsics otherwise.
    unsafe {
        let mut u = [_mm256_setzero_si256(); LANES];
        let mut dm = [[0.0f32; 4]; LANES];
        for i in 0..valid {
            let (ui, dmi) = B::unpack(w.add(i * p.row_bytes + b * B::BYTES));
            u[i] = ui;
            _mm_storeu_ps(dm[i].as_mut_ptr(), dmi);
        }
        (transpose8(u), dm)
    }
}

/// Pack `valid` (1..=8) weight rows starting at `w` into group `group` of `buf`; missing
/// rows are packed as zeros, scale 0.
#[inline(always)]
unsafe fn pack_group<B: Block>(
    p: &Panel,
    w: *const u8,
    valid: usize,
    group: usize,
    buf: &mut PackBuf,
) {
    let nb = p.acts.blocks();
    // SAFETY: rows below `valid` lie inside the panel and block b < nb inside each row;
    // stores go to Lane32 values (32 bytes, 32-byte aligned) borrowed from `buf`.
    unsafe {
        for b in 0..nb {
            let (cols, dm) = columns8::<B>(p, w, valid, b);
            let at = (group * nb + b) * LANES;
            for (dst, col) in buf.u[at..at + LANES].iter_mut().zip(cols) {
                _mm256_store_si256((dst as *mut Lane32).cast(), col);
            }
            for (i, [d, m, ..]) in dm.into_iter().enumerate() {
                buf.d[at + i] = d;
                if B::HAS_MIN {
                    buf.m[at + i] = m;
                }
            }
        }
    }
}

/// Dot products of one packed group (`nb` blocks from `u`, `d`, `m`) with `R` activation
/// rows: lane `i` of result `r` is weight row `i` · activation row `r`.
#[inline(always)]
unsafe fn dot_group<I: IntDot, B: Block, A: Acc, const R: usize>(
    u: *const Lane32,
    d: *const f32,
    m: *const f32,
    nb: usize,
    acts: [ActPtr; R],
) -> [A; R] {
    // SAFETY: u, d, m hold nb * 8 entries and each activation row nb blocks (caller contract).
    unsafe {
        let mut acc = [A::zero(); R];
        for b in 0..nb {
            let w: [__m256i; LANES] =
                std::array::from_fn(|g| _mm256_load_si256(u.add(b * LANES + g).cast()));
            let dw = _mm256_loadu_ps(d.add(b * LANES));
            for r in 0..R {
                let qs = acts[r].qs.add(b * BLOCK).cast::<i32>();
                let init = if B::ZERO_POINT != 0 {
                    _mm256_set1_epi32(-B::ZERO_POINT * *acts[r].qsum.add(b))
                } else {
                    _mm256_setzero_si256()
                };
                // Two chains, so consecutive products do not wait on each other.
                let mut even = init;
                let mut odd = _mm256_setzero_si256();
                for g in (0..LANES).step_by(2) {
                    let a0 = _mm256_set1_epi32(qs.add(g).read_unaligned());
                    let a1 = _mm256_set1_epi32(qs.add(g + 1).read_unaligned());
                    even = I::dot(even, w[g], a0);
                    odd = I::dot(odd, w[g + 1], a1);
                }
                let [da, sa] = *acts[r].ds.add(b);
                acc[r] = acc[r].add_block(_mm256_add_epi32(even, odd), dw, da);
                if B::HAS_MIN {
                    acc[r] = acc[r].add_min(_mm256_loadu_ps(m.add(b * LANES)), sa);
                }
            }
        }
        acc
    }
}

/// Multiply packed group `group` (`valid` rows from weight row `row0`) into activation rows
/// `a..a + R`, writing `out[(a + r) * rows + row0 + i]`.
#[inline(always)]
unsafe fn group_at<I: IntDot, B: Block, A: Acc, const R: usize>(
    p: &Panel,
    buf: &PackBuf,
    (group, row0, valid): (usize, usize, usize),
    a: usize,
    out: &mut [A::Out],
) {
    let (rows, nb) = (p.rows(), p.acts.blocks());
    let at = group * nb * LANES;
    let acts: [ActPtr; R] = std::array::from_fn(|i| p.acts.row(a + i).into());
    // SAFETY: the group's nb * 8 entries start at `at`; activation rows a..a+R exist.
    let acc = unsafe {
        dot_group::<I, B, A, R>(
            buf.u[at..].as_ptr(),
            buf.d[at..].as_ptr(),
            buf.m[at..].as_ptr(),
            nb,
            acts,
        )
    };
    for (r, acc) in acc.into_iter().enumerate() {
        // SAFETY: register-only; the caller's level enables the accumulator's intrinsics.
        let lanes = unsafe { acc.lanes() };
        let at = (a + r) * rows + row0;
        out[at..at + valid].copy_from_slice(&lanes[..valid]);
    }
}

/// The kernel, for [`super::packed_panel`].
pub(super) struct Packed8<I, B, A>(PhantomData<(I, B, A)>);

impl<I: IntDot, B: Block, A: Acc> PackedKernel for Packed8<I, B, A> {
    const ROWS: usize = LANES;
    type Out = A::Out;
    type Buf = PackBuf;
    fn buffer(groups: usize, nb: usize) -> PackBuf {
        let entries = groups * nb * LANES;
        PackBuf {
            u: vec![Lane32([0; 32]); entries],
            d: vec![0.0; entries],
            m: vec![0.0; entries],
        }
    }
    #[inline(always)]
    unsafe fn pack(p: &Panel, w: *const u8, valid: usize, group: usize, buf: &mut PackBuf) {
        // SAFETY: forwarded caller contract.
        unsafe { pack_group::<B>(p, w, valid, group, buf) }
    }
    #[inline(always)]
    unsafe fn multiply<const R: usize>(
        p: &Panel,
        buf: &PackBuf,
        group: (usize, usize, usize),
        a: usize,
        out: &mut [A::Out],
    ) {
        // SAFETY: forwarded caller contract.
        unsafe { group_at::<I, B, A, R>(p, buf, group, a, out) }
    }
}
