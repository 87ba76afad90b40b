//! AVX2 activation quantiser; bit-identical to the scalar one (max, one multiply, round
//! half to even), only faster on long prefill rows.

use std::arch::x86_64::*;

use super::scales;
use crate::format::BLOCK;

type Block<'a> = ((&'a [f32], &'a mut [i8]), (&'a mut [f32; 2], &'a mut i32));

/// Quantise each `(x, q)` pair of 32 values, writing `[d, s]` and `Σq`.
pub(super) fn quantize_blocks<'a>(blocks: impl Iterator<Item = Block<'a>>) {
    // SAFETY: callers reach this only for levels whose features `SimdLevel::is_available` confirmed.
    unsafe { quantize_blocks_avx2(blocks) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_blocks_avx2<'a>(blocks: impl Iterator<Item = Block<'a>>) {
    for ((x, q), (ds, qsum)) in blocks {
        assert!(x.len() == BLOCK && q.len() == BLOCK);
        // SAFETY: both slices hold exactly 32 elements (asserted above); loads and stores are unaligned.
        let (amax, sum) = unsafe { quantize_block(x.as_ptr(), q.as_mut_ptr()) };
        *ds = scales(amax, sum);
        *qsum = sum;
    }
}

/// Returns `(amax, Σq)`; writes 32 `i8` to `q`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block(x: *const f32, q: *mut i8) -> (f32, i32) {
    // SAFETY: the caller guarantees 32 readable floats at x and 32 writable bytes at q.
    unsafe {
        let v = [
            _mm256_loadu_ps(x),
            _mm256_loadu_ps(x.add(8)),
            _mm256_loadu_ps(x.add(16)),
            _mm256_loadu_ps(x.add(24)),
        ];
        let sign = _mm256_set1_ps(-0.0);
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let i = v.map(|v| {
            let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v, id),
            );
            _mm256_cvtps_epi32(r)
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s));
        // Packing works per 128-bit lane; the permute restores element order.
        let p01 = _mm256_packs_epi32(i[0], i[1]);
        let p23 = _mm256_packs_epi32(i[2], i[3]);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.cast(), p);
        (amax, _mm_cvtsi128_si32(s))
    }
}
