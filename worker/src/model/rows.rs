//! Activations on CPU: `m` rows of `width` floats, one row per token, and the
//! element-wise operations of the transformer on them. Every operation works
//! row by row in a fixed order, so a token's numbers never depend on which
//! other tokens share its step.

use rayon::prelude::*;

use super::exp::exp;

/// Rows of this many elements or more are processed in parallel.
const PARALLEL_ELEMENTS: usize = 1 << 15;

#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    data: Vec<f32>,
    width: usize,
}

impl Rows {
    pub fn new(data: Vec<f32>, width: usize) -> Self {
        debug_assert!(width > 0 && data.len().is_multiple_of(width));
        Self { data, width }
    }

    /// Number of rows.
    pub fn m(&self) -> usize {
        self.data.len() / self.width
    }

    /// Floats per row.
    pub fn width(&self) -> usize {
        self.width
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i * self.width..(i + 1) * self.width]
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.width..(i + 1) * self.width]
    }

    /// The rows at `indices`, in that order, as a new block.
    pub fn gather(&self, indices: &[usize]) -> Rows {
        let mut data = Vec::with_capacity(indices.len() * self.width);
        for &i in indices {
            data.extend_from_slice(self.row(i));
        }
        Rows::new(data, self.width)
    }

    /// `self += other`, element-wise (the residual connection).
    pub fn add_assign(&mut self, other: &Rows) {
        debug_assert_eq!(self.data.len(), other.data.len());
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += *b;
        }
    }

    /// Adds `bias` to every row.
    pub fn add_row_vector(&mut self, bias: &[f32]) {
        for row in self.data.chunks_exact_mut(self.width) {
            for (a, b) in row.iter_mut().zip(bias) {
                *a += *b;
            }
        }
    }

    fn map_rows(&self, f: impl Fn(&[f32], &mut [f32]) + Sync + Send) -> Rows {
        let mut out = vec![0f32; self.data.len()];
        let w = self.width;
        if self.data.len() >= PARALLEL_ELEMENTS {
            out.par_chunks_mut(w)
                .zip(self.data.par_chunks(w))
                .for_each(|(o, x)| f(x, o));
        } else {
            out.chunks_mut(w)
                .zip(self.data.chunks(w))
                .for_each(|(o, x)| f(x, o));
        }
        Rows::new(out, w)
    }
}

/// Root-mean-square normalisation of each row, scaled by `weight`. The sum
/// of squares is taken in f64, as llama.cpp does (in eight lanes, combined in
/// a fixed order).
pub fn rms_norm(x: &Rows, weight: &[f32], eps: f32) -> Rows {
    let norm_row = norm_row_kernel();
    x.map_rows(|row, out| norm_row(row, weight, eps, out))
}

type NormFn = fn(&[f32], &[f32], f32, &mut [f32]);

/// The row kernel for this CPU (the same operations, hence bits, in each).
fn norm_row_kernel() -> NormFn {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return |row, w, eps, out| {
            // SAFETY: AVX2 was detected on this CPU just above.
            unsafe { norm_row_avx2(row, w, eps, out) }
        };
    }
    norm_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn norm_row_avx2(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    norm_row(row, weight, eps, out)
}

#[inline(always)]
fn norm_row(row: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mut lanes = [0f64; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            lanes[l] += (c[l] as f64) * (c[l] as f64);
        }
    }
    let mut tail = 0f64;
    for v in chunks.remainder() {
        tail += (*v as f64) * (*v as f64);
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail;
    let scale = 1.0 / ((sum / row.len() as f64) as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
        *o = (*v * scale) * *w;
    }
}

/// `silu(gate) · up`, the SwiGLU activation; `gate_up` holds gate then up in each row.
pub fn swiglu(gate_up: &Rows) -> Rows {
    let half = gate_up.width / 2;
    let mut out = vec![0f32; gate_up.m() * half];
    let silu_row = swiglu_row_kernel();
    let f = |(o, row): (&mut [f32], &[f32])| {
        let (gate, up) = row.split_at(half);
        silu_row(gate, up, o);
    };
    if gate_up.data.len() >= PARALLEL_ELEMENTS {
        out.par_chunks_mut(half)
            .zip(gate_up.data.par_chunks(gate_up.width))
            .for_each(f);
    } else {
        out.chunks_mut(half)
            .zip(gate_up.data.chunks(gate_up.width))
            .for_each(f);
    }
    Rows::new(out, half)
}

type SwigluFn = fn(&[f32], &[f32], &mut [f32]);

fn swiglu_row_kernel() -> SwigluFn {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return |g, u, o| {
            // SAFETY: AVX2 was detected on this CPU just above.
            unsafe { swiglu_row_avx2(g, u, o) }
        };
    }
    swiglu_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn swiglu_row_avx2(gate: &[f32], up: &[f32], out: &mut [f32]) {
    swiglu_row(gate, up, out)
}

#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = *g / (1.0 + exp(-*g)) * *u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_gives_unit_rms_before_the_weight() {
        let x = Rows::new(vec![3.0, 4.0, 0.0, 0.0, 1.0, 1.0], 2);
        let y = rms_norm(&x, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        assert_eq!(y.row(0), &[3.0 / r, 2.0 * 4.0 / r]);
        assert_eq!(y.row(2), &[1.0, 2.0]);
    }

    #[test]
    fn swiglu_multiplies_silu_of_gate_by_up() {
        let y = swiglu(&Rows::new(vec![0.0, 2.0, 5.0, 3.0], 4));
        let silu2 = 2.0 / (1.0 + exp(-2.0));
        assert_eq!(y.as_slice(), &[0.0, silu2 * 3.0]);
        assert!((silu2 - 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
    }

    #[test]
    fn row_results_do_not_depend_on_the_batch() {
        let data: Vec<f32> = (0..64 * 1200)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect();
        let all = Rows::new(data, 1200);
        let w: Vec<f32> = (0..1200).map(|i| i as f32 / 600.0).collect();
        let big = rms_norm(&all, &w, 1e-5);
        for i in [0, 31, 63] {
            assert_eq!(rms_norm(&all.gather(&[i]), &w, 1e-5).row(0), big.row(i));
        }
    }
}
