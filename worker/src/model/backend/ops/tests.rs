use candle_core::{DType, Device, Tensor};

use super::*;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Softmax attention of one query row over `len` key/value rows, in f64.
fn naive(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    let scale = 1.0 / (q.len() as f64).sqrt();
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            q.iter()
                .zip(k)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    (0..q.len())
        .map(|x| {
            (weights
                .iter()
                .zip(values)
                .map(|(w, v)| w * v[x] as f64)
                .sum::<f64>()
                / total) as f32
        })
        .collect()
}

#[test]
fn entries_written_through_slots_land_in_their_blocks() {
    let dev = Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        let cache = Tensor::zeros((4, 3, 2, 8), dtype, &dev).unwrap();
        let new = Tensor::from_vec(values(3 * 16, 1), (3, 2, 8), &dev).unwrap();
        // Slots 10, 0, 5: block 3 offset 1, block 0 offset 0, block 1 offset 2.
        let slots = Tensor::new(&[10u32, 0, 5], &dev).unwrap();
        write_cache(&cache, &new, &slots).unwrap();
        let back = cache
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((12, 16))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want = new
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((3, 16))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(back[10], want[0]);
        assert_eq!(back[0], want[1]);
        assert_eq!(back[5], want[2]);
        assert!(back[1].iter().all(|x| *x == 0.0), "other slots untouched");
        let err = write_cache(&cache, &new, &Tensor::new(&[12u32, 0, 1], &dev).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot 12"), "{err}");
    }
}

#[test]
fn paged_attention_matches_a_naive_softmax_over_shuffled_blocks() {
    let dev = Device::Cpu;
    let (heads, kvh, d, bs, blocks) = (6, 2, 20, 4, 16);
    // Two sequences of 9 and 6 positions, on blocks out of order; the first is
    // decoding (one token at position 8), the second prefilling all 6 tokens.
    let tables: [&[u32]; 2] = [&[7, 2, 12], &[5, 0]];
    let lens = [9usize, 6];
    let entries = |seed| -> Vec<Vec<Vec<f32>>> {
        lens.iter()
            .enumerate()
            .map(|(s, &len)| {
                (0..len)
                    .map(|p| values(kvh * d, seed + 100 * s as u32 + p as u32))
                    .collect()
            })
            .collect()
    };
    let (k, v) = (entries(1), entries(2));
    let keys = Tensor::zeros((blocks, bs, kvh, d), DType::F16, &dev).unwrap();
    let vals = keys.zeros_like().unwrap();
    for s in 0..2 {
        let slots: Vec<u32> = (0..lens[s])
            .map(|p| tables[s][p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        let slots = Tensor::new(slots.as_slice(), &dev).unwrap();
        let flat =
            |e: &Vec<Vec<f32>>| Tensor::from_vec(e.concat(), (e.len(), kvh, d), &dev).unwrap();
        write_cache(&keys, &flat(&k[s]), &slots).unwrap();
        write_cache(&vals, &flat(&v[s]), &slots).unwrap();
    }
    // Tokens: sequence 0 at position 8, then sequence 1 at positions 0..6.
    let seen: Vec<(usize, usize)> = std::iter::once((0, 9))
        .chain((1..=6).map(|n| (1, n)))
        .collect();
    let tokens: Vec<u32> = seen
        .iter()
        .flat_map(|&(s, n)| [s as u32, n as u32])
        .collect();
    let mut table = vec![0u32; 2 * 3];
    table[..3].copy_from_slice(tables[0]);
    table[3..5].copy_from_slice(tables[1]);
    let plan = AttendPlan {
        tables: Tensor::from_vec(table, (2, 3), &dev).unwrap(),
        tokens: Tensor::from_vec(tokens, (seen.len(), 2), &dev).unwrap(),
    };
    let q = values(seen.len() * heads * d, 3);
    let qt = Tensor::from_vec(q.clone(), (seen.len(), heads, d), &dev).unwrap();
    let out = attend(&qt, &keys, &vals, &plan)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let half =
        |x: &[f32]| -> Vec<f32> { x.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect() };
    for (t, &(s, n)) in seen.iter().enumerate() {
        for h in 0..heads {
            let kv_head = h / (heads / kvh);
            let pick = |e: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                e[..n]
                    .iter()
                    .map(|row| half(&row[kv_head * d..(kv_head + 1) * d]))
                    .collect()
            };
            let row = t * heads + h;
            let want = naive(&q[row * d..(row + 1) * d], &pick(&k[s]), &pick(&v[s]));
            for (a, b) in out[row * d..(row + 1) * d].iter().zip(want) {
                // Weights are rounded to the cache's f16 before they meet the values.
                assert!((a - b).abs() < 2e-3, "token {t} head {h}: {a} vs {b}");
            }
        }
    }
}

#[test]
fn plans_that_read_outside_the_cache_are_refused() {
    let dev = Device::Cpu;
    let keys = Tensor::zeros((2, 4, 1, 8), DType::F16, &dev).unwrap();
    let q = Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap();
    let plan = |table: &[u32], len: u32| AttendPlan {
        tables: Tensor::new(table, &dev)
            .unwrap()
            .reshape((1, table.len()))
            .unwrap(),
        tokens: Tensor::new(&[0u32, len], &dev)
            .unwrap()
            .reshape((1, 2))
            .unwrap(),
    };
    let err = attend(&q, &keys, &keys, &plan(&[0, 5], 6))
        .unwrap_err()
        .to_string();
    assert!(err.contains("block 5"), "{err}");
    let err = attend(&q, &keys, &keys, &plan(&[0], 6))
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond the tables"), "{err}");
}
