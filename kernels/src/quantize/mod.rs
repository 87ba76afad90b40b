//! Activation quantisation: rows of f32 become ggml `Q8_0`/`Q8_1` blocks (one scale per 32
//! values, `q = round(x * 127 / amax)`), the form every weight format is multiplied against.
//!
//! The numbers follow ggml's x86 quantiser exactly (scale `d = amax / 127` stored as f16,
//! multiplier `127 / amax` in f32, round half to even, `s = f16(d * Σq)`), so integer block
//! sums match llama.cpp's bit for bit.

#[cfg(target_arch = "x86_64")]
mod avx2;

use half::f16;

use crate::SimdLevel;
use crate::format::BLOCK;

/// `rows` activation rows, each `blocks` Q8 blocks, stored as parallel arrays.
pub(crate) struct QuantizedActs {
    rows: usize,
    blocks: usize,
    /// `rows * blocks * 32` quantised values, row-major.
    qs: Vec<i8>,
    /// Per block `[d, s]`: the f16-rounded scale and `f16(d * Σq)` (the Q8_1 sum).
    ds: Vec<[f32; 2]>,
    /// Per block `Σq`, exact, for formats whose zero point is folded into the integer sum.
    qsum: Vec<i32>,
}

/// One activation row's blocks.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub qs: &'a [i8],
    pub ds: &'a [[f32; 2]],
    /// Read by the x86 kernels, which fold weight zero points into the integer sum.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub qsum: &'a [i32],
}

impl QuantizedActs {
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn blocks(&self) -> usize {
        self.blocks
    }

    pub fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.blocks;
        ActRow {
            qs: &self.qs[r * nb * BLOCK..(r + 1) * nb * BLOCK],
            ds: &self.ds[r * nb..(r + 1) * nb],
            qsum: &self.qsum[r * nb..(r + 1) * nb],
        }
    }
}

/// Quantise `x` (`rows x cols`, row-major, `cols % 32 == 0`).
pub(crate) fn quantize(level: SimdLevel, x: &[f32], rows: usize, cols: usize) -> QuantizedActs {
    assert_eq!(x.len(), rows * cols, "activations are not {rows}x{cols}");
    assert_eq!(
        cols % BLOCK,
        0,
        "{cols} columns is not a multiple of {BLOCK}"
    );
    let blocks = cols / BLOCK;
    let mut acts = QuantizedActs {
        rows,
        blocks,
        qs: vec![0; rows * cols],
        ds: vec![[0.0; 2]; rows * blocks],
        qsum: vec![0; rows * blocks],
    };
    let chunks = x
        .chunks_exact(BLOCK)
        .zip(acts.qs.chunks_exact_mut(BLOCK))
        .zip(acts.ds.iter_mut().zip(acts.qsum.iter_mut()));
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 | SimdLevel::Avx512 => avx2::quantize_blocks(chunks),
        _ => chunks.for_each(|((x, q), (ds, qsum))| (*ds, *qsum) = quantize_block(x, q)),
    }
    acts
}

/// The scalar quantiser of one block: returns `([d, s], Σq)`.
pub(crate) fn quantize_block(x: &[f32], q: &mut [i8]) -> ([f32; 2], i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round_ties_even() as i32;
        *q = r as i8;
        sum += r;
    }
    (scales(amax, sum), sum)
}

/// `[f16(amax / 127), f16(d * Σq)]`, each widened back to f32, as ggml stores them.
pub(crate) fn scales(amax: f32, sum: i32) -> [f32; 2] {
    let d = amax / 127.0;
    [
        f16::from_f32(d).to_f32(),
        f16::from_f32(d * sum as f32).to_f32(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_quantisation_follows_ggml() {
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 10.5) * 0.25).collect();
        let mut q = [0i8; 32];
        let ([d, s], sum) = quantize_block(&x, &mut q);
        // amax = 20.5 * 0.25 = 5.125 at i = 31; the largest magnitude maps to 127.
        assert_eq!(q[31], 127);
        assert_eq!(
            q[0],
            (-10.5f32 * 0.25 * (127.0 / 5.125)).round_ties_even() as i8
        );
        assert_eq!(sum, q.iter().map(|&v| i32::from(v)).sum::<i32>());
        assert_eq!(d, f16::from_f32(5.125 / 127.0).to_f32());
        assert_eq!(s, f16::from_f32(5.125 / 127.0 * sum as f32).to_f32());
    }

    #[test]
    fn zero_block_quantises_to_zero() {
        let mut q = [1i8; 32];
        assert_eq!(quantize_block(&[0.0; 32], &mut q), ([0.0, 0.0], 0));
        assert_eq!(q, [0; 32]);
    }

    #[test]
    fn every_level_quantises_identically() {
        let x: Vec<f32> = (0..3 * 96)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0)
            .chain([0.0; 96]) // an all-zero row
            .collect();
        let reference = quantize(SimdLevel::Scalar, &x, 4, 96);
        for level in SimdLevel::available() {
            let got = quantize(level, &x, 4, 96);
            assert_eq!(got.qs, reference.qs, "{level}");
            assert_eq!(got.ds, reference.ds, "{level}");
            assert_eq!(got.qsum, reference.qsum, "{level}");
        }
    }
}
