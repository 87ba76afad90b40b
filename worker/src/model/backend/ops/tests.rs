use candle_core::{DType, Device, Tensor};

use super::*;

mod emulated;

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

/// Writes `keys` and `values` (`[tokens, kv_heads · head_dim]` each, unrotated) into
/// one layer's `cache` at `slots`, through the write op's QKV rows.
pub(super) fn fill(cache: &Tensor, keys: &[f32], values: &[f32], slots: &[u32]) {
    let (_, _, _, kvh, d) = cache.dims5().unwrap();
    let tokens = slots.len();
    let kvw = kvh * d;
    let mut qkv = Vec::with_capacity(tokens * 3 * kvw);
    for t in 0..tokens {
        qkv.extend(std::iter::repeat_n(0.0, kvw));
        qkv.extend(&keys[t * kvw..][..kvw]);
        qkv.extend(&values[t * kvw..][..kvw]);
    }
    let dev = cache.device();
    let rotation = Rotation {
        heads: kvh,
        kv_heads: kvh,
        head_dim: d,
        half: 0,
        interleaved: false,
    };
    rotate_and_write(
        cache,
        &Tensor::from_vec(qkv, (tokens, 3 * kvw), dev).unwrap(),
        &Tensor::zeros((2, tokens, 0), DType::F32, dev).unwrap(),
        &Tensor::new(slots, dev).unwrap(),
        rotation,
    )
    .unwrap();
}

#[test]
fn keys_and_values_written_through_slots_land_in_their_blocks() {
    let dev = Device::Cpu;
    for dtype in [DType::F16, DType::BF16] {
        let cache = Tensor::zeros((2, 4, 3, 2, 8), dtype, &dev).unwrap();
        let (k, v) = (values(3 * 16, 1), values(3 * 16, 2));
        // Slots 10, 0, 5: block 3 offset 1, block 0 offset 0, block 1 offset 2.
        fill(&cache, &k, &v, &[10, 0, 5]);
        let back = cache
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((2, 12, 16))
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (half, written) in back.iter().zip([&k, &v]) {
            let want: Vec<Vec<f32>> = written
                .chunks(16)
                .map(|row| {
                    let t = Tensor::new(row, &dev).unwrap().to_dtype(dtype).unwrap();
                    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
                })
                .collect();
            assert_eq!(half[10], want[0]);
            assert_eq!(half[0], want[1]);
            assert_eq!(half[5], want[2]);
            assert!(half[1].iter().all(|x| *x == 0.0), "other slots untouched");
        }
    }
    let cache = Tensor::zeros((2, 4, 3, 1, 8), DType::F16, &dev).unwrap();
    let qkv = Tensor::zeros((3, 24), DType::F32, &dev).unwrap();
    let rotation = Rotation {
        heads: 1,
        kv_heads: 1,
        head_dim: 8,
        half: 4,
        interleaved: false,
    };
    let trig = Tensor::zeros((2, 3, 4), DType::F32, &dev).unwrap();
    let err = rotate_and_write(
        &cache,
        &qkv,
        &trig,
        &Tensor::new(&[12u32, 0, 1], &dev).unwrap(),
        rotation,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("slot 12"), "{err}");
    let short = Tensor::zeros((2, 2, 4), DType::F32, &dev).unwrap();
    let err = rotate_and_write(
        &cache,
        &qkv,
        &short,
        &Tensor::new(&[1u32, 0, 2], &dev).unwrap(),
        rotation,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("angles"), "{err}");
}

#[test]
fn keys_and_queries_are_rotated_as_the_cpu_engine_rotates_them() {
    use crate::model::rope::Rope;
    use crate::model::{RopeConfig, RopeScaling, RopeStyle};
    let dev = Device::Cpu;
    let (heads, kvh, d, tokens) = (4, 2, 16, 5);
    let positions = [0usize, 7, 8, 300, 4095];
    // Whole heads and a partial rotation (the first 10 of 16 features), both styles.
    for (style, dims) in [
        (RopeStyle::Halves, 16),
        (RopeStyle::Interleaved, 16),
        (RopeStyle::Halves, 10),
        (RopeStyle::Interleaved, 10),
    ] {
        let rope = Rope::new(&RopeConfig {
            dims,
            theta: 10000.0,
            style,
            scaling: RopeScaling::None,
        });
        let angles = rope.angles(positions);
        let half = angles.half();
        let mut trig = angles.cos().to_vec();
        trig.extend_from_slice(angles.sin());
        let trig = Tensor::from_vec(trig, (2, tokens, half), &dev).unwrap();
        let (qw, kvw) = (heads * d, kvh * d);
        let qkv = values(tokens * (qw + 2 * kvw), 5);
        let qkv_t = Tensor::from_vec(qkv.clone(), (tokens, qw + 2 * kvw), &dev).unwrap();
        let rotation = Rotation {
            heads,
            kv_heads: kvh,
            head_dim: d,
            half,
            interleaved: style == RopeStyle::Interleaved,
        };
        let slots = Tensor::new(&[3u32, 0, 7, 1, 4], &dev).unwrap();
        let cache_of = |dtype| Tensor::zeros((2, 2, 4, kvh, d), dtype, &dev).unwrap();
        let cache = cache_of(DType::F32);
        let q = rotate_and_write(&cache, &qkv_t, &trig, &slots, rotation).unwrap();
        let slots: Vec<u32> = slots.to_vec1().unwrap();
        let q: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        let cached = cache
            .reshape((2, 8, kvw))
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for t in 0..tokens {
            let row = &qkv[t * (qw + 2 * kvw)..][..qw + 2 * kvw];
            let (mut want_q, mut want_k) = (row[..qw].to_vec(), row[qw..qw + kvw].to_vec());
            rope.rotate(&mut want_q, d, &angles, t);
            rope.rotate(&mut want_k, d, &angles, t);
            let slot = slots[t] as usize;
            assert_eq!(
                &q[t * qw..][..qw],
                want_q.as_slice(),
                "{style:?} {dims}, token {t}"
            );
            assert_eq!(cached[0][slot], want_k, "{style:?} {dims}, token {t}");
            assert_eq!(
                cached[1][slot],
                row[qw + kvw..].to_vec(),
                "values pass unrotated"
            );
        }
        // Rounded to the cache's type as the keys are.
        let q16 = rotate_and_write(
            &cache_of(DType::F16),
            &qkv_t,
            &trig,
            &Tensor::new(slots.as_slice(), &dev).unwrap(),
            rotation,
        )
        .unwrap();
        let rounded: Vec<f32> = q.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
        assert_eq!(
            q16.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            rounded
        );
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
    let cache = Tensor::zeros((2, blocks, bs, kvh, d), DType::F16, &dev).unwrap();
    for s in 0..2 {
        let slots: Vec<u32> = (0..lens[s])
            .map(|p| tables[s][p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        fill(&cache, &k[s].concat(), &v[s].concat(), &slots);
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
    let plan = AttendPlan::new(table, 2, tokens, [1, 6], &dev).unwrap();
    let q = values(seen.len() * heads * d, 3);
    let qt = Tensor::from_vec(q.clone(), (seen.len(), heads, d), &dev).unwrap();
    let out = attend(&qt, &cache, &plan, DType::F32)
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
    let cache = Tensor::zeros((2, 2, 4, 1, 8), DType::F16, &dev).unwrap();
    let q = Tensor::zeros((1, 2, 8), DType::F32, &dev).unwrap();
    let plan = |table: &[u32], len: u32| {
        AttendPlan::new(table.to_vec(), 1, vec![0, len], [1], &dev).unwrap()
    };
    let err = attend(&q, &cache, &plan(&[0, 5], 6), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("block 5"), "{err}");
    let err = attend(&q, &cache, &plan(&[0], 6), DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beyond the tables"), "{err}");
}

mod draws {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::super::cpu::{DrawParams, draw_row, top_logprobs_row};
    use super::*;
    use crate::sampling::{self, Draw};

    /// Rows with what a draw meets: spread logits, ties (logits on a coarse grid,
    /// as a bf16 head gives them), a flat row, NaN, ±inf, rows with one candidate or
    /// none.
    pub(super) fn rows(vocab: usize, rng: &mut StdRng) -> Vec<Vec<f32>> {
        let spread: Vec<f32> = (0..vocab)
            .map(|_| rng.random::<f32>() * 16.0 - 8.0)
            .collect();
        let coarse: Vec<f32> = spread.iter().map(|x| (x * 2.0).round() / 2.0).collect();
        let mut broken = spread.clone();
        for i in (0..vocab).step_by(7) {
            broken[i] = [f32::NAN, f32::NEG_INFINITY][i % 2];
        }
        let mut infinite = coarse.clone();
        infinite[vocab / 3] = f32::INFINITY;
        infinite[vocab / 2] = f32::INFINITY;
        let mut single = vec![f32::NEG_INFINITY; vocab];
        single[vocab - 1] = -3.0;
        vec![
            spread,
            coarse,
            vec![0.25; vocab],
            broken,
            infinite,
            single,
            vec![f32::NAN; vocab],
        ]
    }

    pub(super) fn settings(vocab: usize, rng: &mut StdRng) -> Vec<Draw> {
        let mut all = Vec::new();
        for temperature in [0.3, 1.0, 1.7] {
            for top_k in [0, 1, 2, 5, 40, vocab, vocab + 5] {
                for top_p in [1.0, 0.95, 0.5, 1e-6] {
                    for min_p in [0.0, 0.05, 0.5] {
                        for uniform in [0.0, 0.999_999, rng.random::<f64>()] {
                            all.push(Draw {
                                temperature,
                                top_k,
                                top_p,
                                min_p,
                                uniform,
                            });
                        }
                    }
                }
            }
        }
        all
    }

    /// A draw as the kernel reads it: through the op's own encoding.
    fn kernel_params(d: &Draw) -> DrawParams {
        DrawParams::from_row(&draw_settings(&Some(*d)))
    }

    #[test]
    fn the_kernels_draw_picks_the_host_samplers_token() {
        // The kernel's steps (bisection on keys, ties by rank, prefix sums), on the
        // CPU, against the host sampler's (sort, walk) over every kind of row and
        // setting: the same token each time.
        let mut rng = StdRng::seed_from_u64(7);
        let mut compared = 0;
        for vocab in [1, 3, 64, 1000] {
            for row in rows(vocab, &mut rng) {
                for d in settings(vocab, &mut rng) {
                    assert_eq!(
                        draw_row(&row, &kernel_params(&d)),
                        sampling::draw(&row, &d),
                        "vocab {vocab}, {d:?}, row {:?}",
                        &row[..vocab.min(8)]
                    );
                    compared += 1;
                }
            }
        }
        assert!(compared > 10_000);
    }

    #[test]
    fn the_draw_op_picks_each_rows_token_greedy_or_drawn() {
        let mut rng = StdRng::seed_from_u64(3);
        let vocab = 5000;
        let rows: Vec<Vec<f32>> = (0..6)
            .map(|_| (0..vocab).map(|_| rng.random::<f32>() * 6.0).collect())
            .collect();
        let picks: Vec<Option<Draw>> = (0..6)
            .map(|i| {
                (i % 3 != 0).then(|| Draw {
                    temperature: 0.9,
                    top_k: 50 * i,
                    top_p: 0.9,
                    min_p: 0.0,
                    uniform: rng.random(),
                })
            })
            .collect();
        let settings: Vec<f64> = picks.iter().flat_map(draw_settings).collect();
        let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let settings = Tensor::from_vec(settings, (6, 5), &Device::Cpu).unwrap();
        let ids = draw(&logits, &settings).unwrap().to_vec1::<u32>().unwrap();
        let expected: Vec<u32> = rows
            .iter()
            .zip(&picks)
            .map(|(row, pick)| sampling::pick(row, None, pick))
            .collect();
        assert_eq!(ids, expected);
        // Not every draw is its row's best token.
        assert!(
            ids.iter()
                .zip(&rows)
                .any(|(&id, row)| id != sampling::argmax(row))
        );
    }

    #[test]
    fn the_kernels_log_probabilities_are_the_host_samplers() {
        // The kernel's steps on the CPU, read back as the backend reads them, against
        // `logprobs_of`: the same ids in the same order, log-probabilities to rounding
        // (a tree sum on the GPU), over ties, NaN, ±inf and rows with nothing usable.
        let mut rng = StdRng::seed_from_u64(11);
        for vocab in [1, 3, 64, 1000] {
            for row in rows(vocab, &mut rng) {
                for k in [0, 1, 2, 5, 20] {
                    let n = k.min(vocab);
                    let chosen = rng.random_range(0..vocab as u32 + 1);
                    let got = read_top_logprobs(&top_logprobs_row(&row, chosen, n), chosen, k);
                    let want = sampling::logprobs_of(&row, chosen, k);
                    let close = |a: f32, b: f32| a == b || (a - b).abs() < 1e-5;
                    assert_eq!(got.0.id, want.0.id);
                    assert!(close(got.0.logprob, want.0.logprob), "{got:?} vs {want:?}");
                    assert_eq!(
                        got.1.iter().map(|t| t.id).collect::<Vec<_>>(),
                        want.1.iter().map(|t| t.id).collect::<Vec<_>>(),
                        "vocab {vocab} k {k}: {:?}",
                        &row[..vocab.min(8)]
                    );
                    for (g, w) in got.1.iter().zip(&want.1) {
                        assert!(close(g.logprob, w.logprob), "{g:?} vs {w:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_penalise_op_penalises_each_rows_tokens_seen() {
        let mut rng = StdRng::seed_from_u64(5);
        let vocab = 300;
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                (0..vocab)
                    .map(|_| rng.random::<f32>() * 8.0 - 4.0)
                    .collect()
            })
            .collect();
        let penalties = [
            sampling::Penalties {
                repetition: 1.3,
                presence: 0.0,
                frequency: 0.0,
                seen: vec![(0, 0), (7, 2), (299, 1)],
            },
            sampling::Penalties {
                repetition: 1.0,
                presence: 0.4,
                frequency: 0.3,
                seen: vec![(7, 3), (8, 1), (1000, 2)],
            },
            sampling::Penalties {
                repetition: 1.0,
                presence: 0.0,
                frequency: 0.0,
                seen: Vec::new(),
            },
        ];
        let mut entries = Vec::new();
        let mut settings = Vec::new();
        for (r, p) in penalties.iter().enumerate() {
            settings.extend([p.repetition, p.presence, p.frequency]);
            for &(id, count) in &p.seen {
                entries.extend([r as u32, id, count]);
            }
        }
        let logits = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
        let n = entries.len() / 3;
        penalise(
            &logits,
            &Tensor::from_vec(entries, (n, 3), &Device::Cpu).unwrap(),
            &Tensor::from_vec(settings, (3, 3), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let got = logits.to_vec2::<f32>().unwrap();
        for ((mut want, p), got) in rows.into_iter().zip(&penalties).zip(got) {
            p.apply(&mut want);
            assert_eq!(got, want);
        }
    }

    #[test]
    fn draws_with_bad_shapes_are_refused() {
        let logits = Tensor::zeros((2, 10), DType::F32, &Device::Cpu).unwrap();
        let short = Tensor::zeros((2, 4), DType::F64, &Device::Cpu).unwrap();
        assert!(draw(&logits, &short).is_err());
        let wide = Tensor::zeros((1, MAX_DRAW_VOCAB + 1), DType::F32, &Device::Cpu).unwrap();
        let one = Tensor::zeros((1, 5), DType::F64, &Device::Cpu).unwrap();
        assert!(draw(&wide, &one).is_err());
    }
}
