//! Rotary position embeddings, computed for the positions of each step
//! (no table sized to the context, so a 128k-context model costs nothing up
//! front): [`Rope::angles`] once per step, then [`Rope::rotate`] in every layer.

use super::config::{RopeConfig, RopeScaling, RopeStyle};

#[derive(Debug)]
pub struct Rope {
    inv_freq: Vec<f64>,
    style: RopeStyle,
    dims: usize,
}

impl Rope {
    pub fn new(cfg: &RopeConfig) -> Self {
        let half = cfg.dims / 2;
        let inv_freq = (0..half)
            .map(|i| {
                let f = (cfg.theta as f64).powf(-2.0 * i as f64 / cfg.dims as f64);
                match &cfg.scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / *factor as f64,
                    RopeScaling::FreqFactors(div) => f / div.get(i).copied().unwrap_or(1.0) as f64,
                }
            })
            .collect();
        Self {
            inv_freq,
            style: cfg.style,
            dims: cfg.dims,
        }
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// The cosines and sines of each of `positions`, in order.
    pub fn angles(&self, positions: impl IntoIterator<Item = usize>) -> Angles {
        let half = self.dims / 2;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for pos in positions {
            for f in &self.inv_freq {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Angles { half, cos, sin }
    }

    /// Rotates one token's `[heads][head_dim]` in place by the `i`-th
    /// position of `angles`.
    pub fn rotate(&self, x: &mut [f32], head_dim: usize, angles: &Angles, i: usize) {
        let half = angles.half;
        let cos = &angles.cos[i * half..(i + 1) * half];
        let sin = &angles.sin[i * half..(i + 1) * half];
        for v in x.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Halves => {
                    let (lo, hi) = v[..2 * half].split_at_mut(half);
                    for (((a, b), c), s) in lo.iter_mut().zip(hi).zip(cos).zip(sin) {
                        let (x0, x1) = (*a, *b);
                        *a = x0 * c - x1 * s;
                        *b = x0 * s + x1 * c;
                    }
                }
                RopeStyle::Interleaved => {
                    for ((p, c), s) in v[..2 * half].chunks_exact_mut(2).zip(cos).zip(sin) {
                        let (x0, x1) = (p[0], p[1]);
                        p[0] = x0 * c - x1 * s;
                        p[1] = x0 * s + x1 * c;
                    }
                }
            }
        }
    }

    /// Rotates `x`, laid out `[tokens][heads][head_dim]`, in place; its
    /// first token is at position `start`.
    #[cfg(test)]
    pub fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, start: usize) {
        let tokens = x.len() / (heads * head_dim);
        let angles = self.angles(start..start + tokens);
        for (i, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            self.rotate(row, head_dim, &angles, i);
        }
    }
}

/// Cosines and sines of the rotary frequencies for a run of positions:
/// `[position][dims / 2]`.
#[derive(Debug)]
pub struct Angles {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Angles {
    /// Frequencies per position (`dims / 2`).
    pub fn half(&self) -> usize {
        self.half
    }

    /// `[position][half]`.
    pub fn cos(&self) -> &[f32] {
        &self.cos
    }

    /// `[position][half]`.
    pub fn sin(&self) -> &[f32] {
        &self.sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rope(style: RopeStyle) -> Rope {
        Rope::new(&RopeConfig {
            theta: 10_000.0,
            dims: 4,
            style,
            scaling: RopeScaling::None,
        })
    }

    #[test]
    fn position_zero_is_identity() {
        let x: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let mut y = x.clone();
        rope(RopeStyle::Interleaved).apply(&mut y, 2, 4, 0);
        assert_eq!(x, y);
    }

    #[test]
    fn rotation_keeps_pair_norms_and_styles_pair_differently() {
        let x = [1f32, 2.0, 3.0, 4.0];
        let (mut inter, mut halves) = (x.to_vec(), x.to_vec());
        rope(RopeStyle::Interleaved).apply(&mut inter, 1, 4, 5);
        rope(RopeStyle::Halves).apply(&mut halves, 1, 4, 5);
        let n = |a: f32, b: f32| (a * a + b * b).sqrt();
        assert!((n(inter[0], inter[1]) - n(1.0, 2.0)).abs() < 1e-5);
        assert!((n(halves[0], halves[2]) - n(1.0, 3.0)).abs() < 1e-5);
        assert_ne!(inter, halves);
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let scaled = Rope::new(&RopeConfig {
            theta: 10_000.0,
            dims: 4,
            style: RopeStyle::Halves,
            scaling: RopeScaling::Linear { factor: 2.0 },
        });
        let (mut a, mut b) = (vec![1f32, 2.0, 3.0, 4.0], vec![1f32, 2.0, 3.0, 4.0]);
        scaled.apply(&mut a, 1, 4, 6);
        rope(RopeStyle::Halves).apply(&mut b, 1, 4, 3);
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5);
        }
    }
}
