//! AVX-512 level: VNNI `vpdpbusd` (four `u8 x i8` products summed straight into i32 lanes,
//! no 16-bit intermediate, so weights may use the full byte range).
//!
//! One activation row (decode) runs [`row_dot`], which multiplies two weight blocks per
//! 512-bit instruction; more rows run the shared packed kernel in [`super::x86`].

use std::arch::x86_64::*;

use super::Panel;
use super::x86::{self, ActPtr, Block, IntDot};
use crate::QuantFormat;
use crate::format::BLOCK;

struct Vnni;

impl IntDot for Vnni {
    const FULL_RANGE: bool = true;
    #[inline(always)]
    unsafe fn dot(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
        // SAFETY: register-only intrinsic; inlined into an AVX-512 VNNI/VL function.
        unsafe { _mm256_dpbusd_epi32(acc, u, s) }
    }
}

pub(super) fn panel(p: &Panel, out: &mut [f32]) {
    // SAFETY: `super::panel` checked that this CPU has AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
    unsafe { panel_avx512(p, out) }
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn panel_avx512(p: &Panel, out: &mut [f32]) {
    // SAFETY: the panel's shapes were checked by `super::panel`; features are enabled here.
    unsafe {
        match p.format {
            QuantFormat::Q4_0 => for_format::<x86::Q4_0>(p, out),
            QuantFormat::Q4_1 => for_format::<x86::Q4_1>(p, out),
            QuantFormat::Q5_0 => for_format::<x86::Q5_0>(p, out),
            QuantFormat::Q5_1 => for_format::<x86::Q5_1>(p, out),
            QuantFormat::Q8_0 => for_format::<x86::Q8_0>(p, out),
        }
    }
}

#[inline(always)]
unsafe fn for_format<B: Block>(p: &Panel, out: &mut [f32]) {
    if p.acts.rows() == 1 {
        let act = ActPtr::from(p.acts.row(0));
        for (r, out) in out.iter_mut().enumerate() {
            // SAFETY: row r lies inside the panel and the activation row has nb blocks.
            *out = unsafe {
                row_dot::<B>(
                    p.weights.as_ptr().add(r * p.row_bytes),
                    p.acts.blocks(),
                    act,
                )
            };
        }
    } else {
        // SAFETY: forwarded caller contract.
        unsafe { x86::panel::<Vnni, B>(p, out) }
    }
}

/// One weight row (`nb` blocks at `w`) · one activation row, two blocks per step: lanes
/// 0..8 carry block `b`, lanes 8..16 block `b + 1`.
#[inline(always)]
unsafe fn row_dot<B: Block>(w: *const u8, nb: usize, act: ActPtr) -> f32 {
    // SAFETY: w holds nb blocks and the activation row nb blocks (caller contract).
    unsafe {
        // Lane i of a 4-float [d0, m0, d1, m1] product, spread over the block's 8 lanes.
        let spread = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
        let mut acc = _mm512_setzero_ps();
        let mut min_acc = _mm_setzero_ps();
        let pairs = nb / 2;
        for i in 0..pairs {
            let b = 2 * i;
            let (u0, dm0) = B::unpack(w.add(b * B::BYTES));
            let (u1, dm1) = B::unpack(w.add((b + 1) * B::BYTES));
            let u = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(u0), u1);
            let a = _mm512_loadu_si512(act.qs.add(b * BLOCK).cast());
            let init = if B::ZERO_POINT != 0 {
                // -ZERO_POINT·Σa of each block, in the block's first lane.
                let qsum = _mm_loadl_epi64(act.qsum.add(b).cast());
                let zp = _mm_mullo_epi32(qsum, _mm_set1_epi32(-B::ZERO_POINT));
                let first = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0);
                _mm512_maskz_permutexvar_epi32(0x0101, first, _mm512_castsi128_si512(zp))
            } else {
                _mm512_setzero_si512()
            };
            let isum = _mm512_dpbusd_epi32(init, u, a);
            // [dw0·da0, mw0·sa0, dw1·da1, mw1·sa1]
            let prod = _mm_mul_ps(_mm_movelh_ps(dm0, dm1), _mm_loadu_ps(act.ds.add(b).cast()));
            let scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(prod));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc);
            if B::HAS_MIN {
                min_acc = _mm_add_ps(min_acc, prod);
            }
        }
        let mut sum = _mm512_reduce_add_ps(acc);
        if B::HAS_MIN {
            let m = _mm_movehdup_ps(min_acc);
            sum += _mm_cvtss_f32(_mm_add_ss(m, _mm_movehl_ps(m, m)));
        }
        if nb % 2 == 1 {
            let b = nb - 1;
            let (u, dm) = B::unpack(w.add(b * B::BYTES));
            let a = _mm256_loadu_si256(act.qs.add(b * BLOCK).cast());
            let init = _mm256_setr_epi32(-B::ZERO_POINT * *act.qsum.add(b), 0, 0, 0, 0, 0, 0, 0);
            let isum = _mm256_dpbusd_epi32(init, u, a);
            let [da, sa] = *act.ds.add(b);
            let [dw, mw, ..] = std::mem::transmute::<__m128, [f32; 4]>(dm);
            let t = _mm256_cvtepi32_ps(isum);
            let t = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
            let t = _mm_add_ps(t, _mm_movehl_ps(t, t));
            let t = _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
            sum += t * (dw * da) + if B::HAS_MIN { mw * sa } else { 0.0 };
        }
        sum
    }
}
