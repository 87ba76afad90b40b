//! `exp` for the element-wise passes (softmax, SiLU), written without
//! branches or calls so that a loop over a slice compiles to vector
//! instructions. It uses no fused multiply-add, so every SIMD width and the
//! portable build give the same bits: a value's result never depends on
//! which kernel ran or where it sat in a vector.
//!
//! Cephes' `expf`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6
//! polynomial for `e^r`, then `2^n` put into the exponent. Relative error
//! about 1e-7 (one or two units in the last place, like a libm).

/// Below this, the result is flushed to zero (true value < 2.7e-38).
const LOW: f32 = -86.5;
/// Above this, `e^x` overflows f32.
const HIGH: f32 = 88.72;

/// `e^x`; `x < -86.5` gives 0, `x > 88.72` gives infinity, NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5·2^23 rounds to an integer (to nearest, ties to even) and
    // leaves that integer in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LOW, HIGH);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let y = (p * (r * r) + r) + 1.0;
    // 2^(n-1), then ×2: n reaches 128 just below HIGH, one past f32's exponents.
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half_scale = f32::from_bits((k.wrapping_add(126) as u32).wrapping_shl(23));
    let e = y * half_scale * 2.0;
    if x < LOW {
        0.0
    } else if x > HIGH {
        f32::INFINITY
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_the_library_exp_over_the_range_that_matters() {
        let mut worst = 0f64;
        let mut x = -86.0f32;
        while x < 88.5 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ends_and_nan() {
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1000.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(88.7).is_finite() && exp(88.7) > 3e38);
    }
}
