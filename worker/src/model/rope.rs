//! Rotary position embeddings, computed for the positions of each span
//! (no table sized to the context, so a 128k-context model costs nothing up front).

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

    /// Rotates `x`, laid out `[tokens][heads][head_dim]`, in place; its
    /// first token is at position `start`.
    pub fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize, start: usize) {
        let half = self.dims / 2;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for (tok, rows) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let pos = (start + tok) as f64;
            for i in 0..half {
                let (s, c) = (pos * self.inv_freq[i]).sin_cos();
                cos[i] = c as f32;
                sin[i] = s as f32;
            }
            for v in rows.chunks_exact_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = match self.style {
                        RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        RopeStyle::Halves => (i, i + half),
                    };
                    let (x0, x1) = (v[a], v[b]);
                    v[a] = x0 * cos[i] - x1 * sin[i];
                    v[b] = x0 * sin[i] + x1 * cos[i];
                }
            }
        }
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
