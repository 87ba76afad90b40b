//! Rotary position embeddings, computed for the positions of each span
//! (no table sized to the context, so a 128k-context model costs nothing up front).

use candle_core::{Result, Tensor};

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

    /// Rotates `x` of shape `[tokens, heads, head_dim]` whose first token is
    /// at position `start`.
    pub fn apply(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (t, h, d) = x.dims3()?;
        let mut data = x.flatten_all()?.to_vec1::<f32>()?;
        let half = self.dims / 2;
        let mut cos = vec![0f32; half];
        let mut sin = vec![0f32; half];
        for tok in 0..t {
            let pos = (start + tok) as f64;
            for i in 0..half {
                let (s, c) = (pos * self.inv_freq[i]).sin_cos();
                cos[i] = c as f32;
                sin[i] = s as f32;
            }
            for head in 0..h {
                let v = &mut data[(tok * h + head) * d..(tok * h + head + 1) * d];
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
        Tensor::from_vec(data, (t, h, d), x.device())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 4))
            .unwrap();
        let y = rope(RopeStyle::Interleaved).apply(&x, 0).unwrap();
        assert_eq!(x.to_vec3::<f32>().unwrap(), y.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn rotation_keeps_pair_norms_and_styles_pair_differently() {
        let x = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let inter = rope(RopeStyle::Interleaved)
            .apply(&x, 5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let halves = rope(RopeStyle::Halves)
            .apply(&x, 5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
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
        let x = Tensor::new(&[[[1f32, 2.0, 3.0, 4.0]]], &Device::Cpu).unwrap();
        let a = scaled
            .apply(&x, 6)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = rope(RopeStyle::Halves)
            .apply(&x, 3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5);
        }
    }
}
