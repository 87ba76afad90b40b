//! Causal attention on CPU over one sequence's cached keys and values.
//!
//! Each (token, head) row is computed on its own, in a fixed order of
//! operations, so a token's output does not depend on how many tokens were
//! computed with it: prefill and decode give the same numbers, and so will a
//! request alone or inside a batch.

use rayon::prelude::*;

use crate::kv::KvView;

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// `q` is `[tokens][heads][head_dim]`; token `t` attends to the first
/// `seen[t].1` positions of `views[seen[t].0]` (its sequence's keys and
/// values, `[position][kv_head][head_dim]` block by block). Writes
/// `[tokens][heads][head_dim]` into `out`. Every (token, head) row is one
/// parallel task, so a batch of one-token decodes spreads over the cores.
pub fn attend(
    q: &[f32],
    views: &[KvView<'_>],
    seen: &[(usize, usize)],
    shape: Heads,
    out: &mut [f32],
) {
    let d = shape.head_dim;
    let row_fn = row_kernel();
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, o)| {
            let (view, len) = seen[row / shape.heads];
            let args = RowArgs {
                q: &q[row * d..(row + 1) * d],
                view: &views[view],
                kv_head: (row % shape.heads) / (shape.heads / shape.kv_heads),
                len,
                shape,
            };
            row_fn(&args, scores, o);
        });
}

/// One query row's inputs.
struct RowArgs<'a> {
    q: &'a [f32],
    view: &'a KvView<'a>,
    kv_head: usize,
    len: usize,
    shape: Heads,
}

type RowFn = fn(&RowArgs<'_>, &mut Vec<f32>, &mut [f32]);

/// The row kernel for this CPU: the same code compiled for wider vectors
/// where the CPU has them (the operations, hence the results, are the same).
fn row_kernel() -> RowFn {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        return |a, s, o| {
            // SAFETY: AVX2 was detected on this CPU just above.
            unsafe { attend_row_avx2(a, s, o) }
        };
    }
    attend_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_row_avx2(args: &RowArgs<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_row(args, scores, out)
}

#[inline(always)]
fn attend_row(args: &RowArgs<'_>, scores: &mut Vec<f32>, out: &mut [f32]) {
    let Heads {
        kv_heads,
        head_dim: d,
        ..
    } = args.shape;
    let kv_row = kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let off = args.kv_head * d;
    let view = args.view;
    let bs = view.block_size;
    scores.clear();
    let mut left = args.len;
    for block in &view.keys {
        let n = left.min(bs);
        // A plain loop, not an iterator closure: a closure is compiled on its
        // own, without the AVX2 of this function, and `dot` would not vectorise.
        for i in 0..n {
            scores.push(dot(args.q, &block[i * kv_row + off..][..d]) * scale);
        }
        left -= n;
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (probs, block) in scores.chunks(bs).zip(&view.values) {
        for (i, p) in probs.iter().enumerate() {
            let v = &block[i * kv_row + off..][..d];
            let w = to_half_precision(p * inv);
            for (acc, x) in out.iter_mut().zip(v) {
                *acc += w * x;
            }
        }
    }
}

/// `x` rounded to the nearest f16 value (kept as f32 for the arithmetic).
#[inline(always)]
pub fn to_half_precision(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[inline(always)]
/// Dot product in eight lanes, summed in a fixed order (vectorises well and
/// gives the same bits for the same inputs whatever else runs).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(q: &[f32], k: &[f32], v: &[f32], start: usize, s: Heads) -> Vec<f32> {
        let d = s.head_dim;
        let tokens = q.len() / (s.heads * d);
        let mut out = vec![0f32; q.len()];
        for t in 0..tokens {
            for h in 0..s.heads {
                let kvh = h / (s.heads / s.kv_heads);
                let qv = &q[(t * s.heads + h) * d..][..d];
                let len = start + t + 1;
                let sc: Vec<f64> = (0..len)
                    .map(|j| {
                        let kj = &k[(j * s.kv_heads + kvh) * d..][..d];
                        qv.iter()
                            .zip(kj)
                            .map(|(a, b)| (*a * *b) as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                for j in 0..len {
                    let p = (sc[j] - m).exp() / z;
                    for x in 0..d {
                        out[(t * s.heads + h) * d + x] +=
                            (p * v[(j * s.kv_heads + kvh) * d + x] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn matches_a_naive_softmax_attention() {
        let s = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 20,
        };
        let (start, tokens) = (5, 4);
        let q = values(tokens * 6 * 20, 1);
        let k = values((start + tokens) * 2 * 20, 2);
        let v = values((start + tokens) * 2 * 20, 3);
        let mut out = vec![0f32; q.len()];
        let views = [KvView::contiguous(&k, &v, start + tokens)];
        let seen: Vec<_> = (0..tokens).map(|t| (0, start + t + 1)).collect();
        attend(&q, &views, &seen, s, &mut out);
        for (a, b) in out.iter().zip(naive(&q, &k, &v, start, s)) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
    }

    #[test]
    fn a_token_gives_the_same_bits_alone_or_with_others() {
        let s = Heads {
            heads: 4,
            kv_heads: 4,
            head_dim: 16,
        };
        let tokens = 7;
        let q = values(tokens * 64, 4);
        let k = values(tokens * 64, 5);
        let v = values(tokens * 64, 6);
        let mut all = vec![0f32; q.len()];
        let whole = [KvView::contiguous(&k, &v, tokens)];
        let seen: Vec<_> = (0..tokens).map(|t| (0, t + 1)).collect();
        attend(&q, &whole, &seen, s, &mut all);
        for t in 0..tokens {
            // Alone, and reading the same entries cut into blocks of 3.
            let mut one = vec![0f32; 64];
            let blocks = [KvView {
                keys: k[..(t + 1) * 64].chunks(3 * 64).collect(),
                values: v[..(t + 1) * 64].chunks(3 * 64).collect(),
                block_size: 3,
                len: t + 1,
            }];
            attend(
                &q[t * 64..(t + 1) * 64],
                &blocks,
                &[(0, t + 1)],
                s,
                &mut one,
            );
            assert_eq!(one, all[t * 64..(t + 1) * 64], "token {t}");
        }
    }
}
