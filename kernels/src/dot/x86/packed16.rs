//! The AVX-512 packed kernel (prefill and batched decode): the [`super::packed`] layout
//! widened to sixteen weight rows, one per i32 lane of a 512-bit vector, so that one VNNI
//! `vpdpbusd` advances sixteen dot products by four bytes each (twice the work of the
//! 256-bit kernel per instruction, and per broadcast activation word).
//!
//! Every lane follows the float steps of [`super::Acc`] (`acc + sumi·(dw·da)`, then the
//! minimum term), so its outputs are the same bits as the 256-bit kernels' and the row
//! kernel's.

use std::arch::x86_64::*;
use std::marker::PhantomData;

use super::packed::columns8;
use super::{ActPtr, Block, LANES, PackedKernel};
use crate::dot::Panel;
use crate::format::BLOCK;

/// Weight rows per packed group: one per lane of a 512-bit vector.
const ROWS16: usize = 2 * LANES;

/// One 64-byte vector of packed weights, aligned for `vmovdqa64`.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Lane64([u8; 64]);

/// How sixteen lanes of exact integer block sums become outputs: the float steps of
/// [`super::Acc`], sixteen lanes at a time.
pub(in crate::dot) trait Acc16: Copy {
    type Out: Copy;
    unsafe fn zero() -> Self;
    unsafe fn add_block(self, isum: __m512i, dw: __m512, da: f32) -> Self;
    unsafe fn add_min(self, mw: __m512, sa: f32) -> Self;
    unsafe fn lanes(self) -> [Self::Out; ROWS16];
}

/// f32 lanes, as [`super::F32Acc`].
#[derive(Clone, Copy)]
pub(in crate::dot) struct F32x16(__m512);

impl Acc16 for F32x16 {
    type Out = f32;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 function.
        unsafe { F32x16(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m512i, dw: __m512, da: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(da));
            F32x16(_mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, self.0))
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, mw: __m512, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe { F32x16(_mm512_fmadd_ps(mw, _mm512_set1_ps(sa), self.0)) }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f32; ROWS16] {
        // SAFETY: __m512 and [f32; 16] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<__m512, [f32; ROWS16]>(self.0) }
    }
}

/// f64 lanes (rows 0..8, 8..16), as [`super::F64Acc`].
#[derive(Clone, Copy)]
pub(in crate::dot) struct F64x16([__m512d; 2]);

impl Acc16 for F64x16 {
    type Out = f64;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 function.
        unsafe { F64x16([_mm512_setzero_pd(); 2]) }
    }
    #[inline(always)]
    unsafe fn add_block(self, isum: __m512i, dw: __m512, da: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function. No
        // closures: they would not inherit the caller's target features.
        unsafe {
            let da = _mm512_set1_pd(f64::from(da));
            let (lo, hi) = halves_f64(dw);
            let sumi_lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(isum));
            let sumi_hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64::<1>(isum));
            F64x16([
                _mm512_fmadd_pd(sumi_lo, _mm512_mul_pd(lo, da), self.0[0]),
                _mm512_fmadd_pd(sumi_hi, _mm512_mul_pd(hi, da), self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn add_min(self, mw: __m512, sa: f32) -> Self {
        // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
        unsafe {
            let sa = _mm512_set1_pd(f64::from(sa));
            let (lo, hi) = halves_f64(mw);
            F64x16([
                _mm512_fmadd_pd(lo, sa, self.0[0]),
                _mm512_fmadd_pd(hi, sa, self.0[1]),
            ])
        }
    }
    #[inline(always)]
    unsafe fn lanes(self) -> [f64; ROWS16] {
        // SAFETY: [__m512d; 2] and [f64; 16] have the same size and no invalid bit patterns.
        unsafe { std::mem::transmute::<[__m512d; 2], [f64; ROWS16]>(self.0) }
    }
}

/// Lanes 0..8 and 8..16 of `v`, widened to f64 (exactly).
#[inline(always)]
unsafe fn halves_f64(v: __m512) -> (__m512d, __m512d) {
    // SAFETY: register-only intrinsics; inlined into an AVX-512 function.
    unsafe {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        (
            _mm512_cvtps_pd(_mm512_castps512_ps256(v)),
            _mm512_cvtps_pd(hi),
        )
    }
}

/// Up to [`super::PACK_ROWS`] weight rows, packed. For group `G` (rows `16G..16G+16`) and block
/// `b`, vector `(G * nb + b) * 8 + g` holds elements `4g..4g+4` of the sixteen rows, row
/// `i` in lane `i`; `d` and `m` hold the rows' scales and minimums at
/// `(G * nb + b) * 16 + i`.
pub(super) struct PackBuf {
    u: Vec<Lane64>,
    d: Vec<f32>,
    m: Vec<f32>,
}

/// Pack `valid` (1..=16) weight rows starting at `w` into group `group` of `buf`; missing
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
    // stores go to Lane64 values (64 bytes, 64-byte aligned) borrowed from `buf`.
    unsafe {
        for b in 0..nb {
            // Rows 0..8 in the low 256 bits of each vector, rows 8..16 in the high ones
            // (not read when there are none: wrapping_add keeps the pointer harmless).
            let (lo, dm_lo) = columns8::<B>(p, w, valid.min(LANES), b);
            let w_hi = w.wrapping_add(LANES * p.row_bytes);
            let (hi, dm_hi) = columns8::<B>(p, w_hi, valid.saturating_sub(LANES), b);
            let at = (group * nb + b) * LANES;
            for g in 0..LANES {
                let col = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo[g]), hi[g]);
                _mm512_store_si512((&mut buf.u[at + g] as *mut Lane64).cast(), col);
            }
            let at = (group * nb + b) * ROWS16;
            for (i, [d, m, ..]) in dm_lo.into_iter().chain(dm_hi).enumerate() {
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
unsafe fn dot_group<B: Block, A: Acc16, const R: usize>(
    u: *const Lane64,
    d: *const f32,
    m: *const f32,
    nb: usize,
    acts: [ActPtr; R],
) -> [A; R] {
    // SAFETY: u holds nb * 8 vectors, d and m nb * 16 entries and each activation row nb
    // blocks (caller contract). Plain loops: closures would not inherit target features.
    unsafe {
        let mut acc = [A::zero(); R];
        for b in 0..nb {
            let mut w = [_mm512_setzero_si512(); LANES];
            for (g, w) in w.iter_mut().enumerate() {
                *w = _mm512_load_si512(u.add(b * LANES + g).cast());
            }
            let dw = _mm512_loadu_ps(d.add(b * ROWS16));
            for r in 0..R {
                let qs = acts[r].qs.add(b * BLOCK).cast::<i32>();
                let init = if B::ZERO_POINT != 0 {
                    _mm512_set1_epi32(-B::ZERO_POINT * *acts[r].qsum.add(b))
                } else {
                    _mm512_setzero_si512()
                };
                // Two chains, so consecutive products do not wait on each other.
                let mut even = init;
                let mut odd = _mm512_setzero_si512();
                for g in (0..LANES).step_by(2) {
                    let a0 = _mm512_set1_epi32(qs.add(g).read_unaligned());
                    let a1 = _mm512_set1_epi32(qs.add(g + 1).read_unaligned());
                    even = _mm512_dpbusd_epi32(even, w[g], a0);
                    odd = _mm512_dpbusd_epi32(odd, w[g + 1], a1);
                }
                let [da, sa] = *acts[r].ds.add(b);
                acc[r] = acc[r].add_block(_mm512_add_epi32(even, odd), dw, da);
                if B::HAS_MIN {
                    acc[r] = acc[r].add_min(_mm512_loadu_ps(m.add(b * ROWS16)), sa);
                }
            }
        }
        acc
    }
}

/// Multiply packed group `group` (`valid` rows from weight row `row0`) into activation rows
/// `a..a + R`, writing `out[(a + r) * rows + row0 + i]`.
#[inline(always)]
unsafe fn group_at<B: Block, A: Acc16, const R: usize>(
    p: &Panel,
    buf: &PackBuf,
    (group, row0, valid): (usize, usize, usize),
    a: usize,
    out: &mut [A::Out],
) {
    let (rows, nb) = (p.rows(), p.acts.blocks());
    let mut acts = [ActPtr::from(p.acts.row(a)); R];
    for (i, act) in acts.iter_mut().enumerate() {
        *act = p.acts.row(a + i).into();
    }
    // SAFETY: the group's entries start at these offsets; activation rows a..a+R exist.
    let acc = unsafe {
        dot_group::<B, A, R>(
            buf.u[group * nb * LANES..].as_ptr(),
            buf.d[group * nb * ROWS16..].as_ptr(),
            buf.m[group * nb * ROWS16..].as_ptr(),
            nb,
            acts,
        )
    };
    for (r, acc) in acc.into_iter().enumerate() {
        // SAFETY: register-only; the caller runs with AVX-512 enabled.
        let lanes = unsafe { acc.lanes() };
        let at = (a + r) * rows + row0;
        out[at..at + valid].copy_from_slice(&lanes[..valid]);
    }
}

/// The kernel, for [`super::packed_panel`].
pub(super) struct Packed16<B, A>(PhantomData<(B, A)>);

impl<B: Block, A: Acc16> PackedKernel for Packed16<B, A> {
    const ROWS: usize = ROWS16;
    type Out = A::Out;
    type Buf = PackBuf;
    fn buffer(groups: usize, nb: usize) -> PackBuf {
        PackBuf {
            u: vec![Lane64([0; 64]); groups * nb * LANES],
            d: vec![0.0; groups * nb * ROWS16],
            m: vec![0.0; groups * nb * ROWS16],
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
        unsafe { group_at::<B, A, R>(p, buf, group, a, out) }
    }
}
