//! Behaviour of the public API: every SIMD level agrees with the scalar path, the scalar
//! path agrees with dequantise-then-f32 within quantisation error, shapes and errors.

use half::f16;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::{KernelError, QuantFormat, QuantMatrix, SimdLevel};

/// Random but well-formed blocks: positive f16 scales, negative minimums, random quants
/// (including `-128` for `Q8_0`).
fn random_matrix(format: QuantFormat, rows: usize, cols: usize, seed: u64) -> QuantMatrix {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut bytes = Vec::new();
    for _ in 0..rows * cols / 32 {
        let start = bytes.len();
        bytes.extend(f16::from_f32(rng.random_range(0.001..0.05)).to_le_bytes());
        if format.has_min() {
            bytes.extend(f16::from_f32(rng.random_range(-0.5..0.0)).to_le_bytes());
        }
        while bytes.len() < start + format.block_bytes() {
            bytes.push(rng.random());
        }
    }
    QuantMatrix::new(format, rows, cols, bytes).unwrap()
}

fn random_activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..m * k)
        .map(|i| {
            let x: f32 = rng.random_range(-1.0..1.0);
            // An occasional outlier, as real hidden states have.
            if i % 97 == 13 { x * 40.0 } else { x }
        })
        .collect()
}

fn matmul(w: &QuantMatrix, level: SimdLevel, x: &[f32], m: usize) -> Vec<f32> {
    let mut y = vec![f32::NAN; m * w.rows()];
    w.matmul_with(level, x, m, &mut y);
    y
}

fn in_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(f)
}

/// `level` agrees with the scalar path to float-summation-order error.
fn assert_matches_scalar(format: QuantFormat, level: SimdLevel) {
    if !level.is_available() {
        eprintln!("skipped: {level} is not available on this CPU");
        return;
    }
    for (n, k, m) in [
        (64, 256, 1),
        (45, 96, 1),
        (5, 32, 1),
        (37, 96, 3),
        (19, 64, 17),
        (1031, 128, 5),
    ] {
        let w = random_matrix(format, n, k, (n * k + m) as u64);
        let x = random_activations(m, k, m as u64);
        let want = in_pool(1, || matmul(&w, SimdLevel::Scalar, &x, m));
        let got = in_pool(2, || matmul(&w, level, &x, m));
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * scale,
                "{format} {level} n={n} k={k} m={m} y[{i}]: {g} vs scalar {w}"
            );
        }
    }
}

macro_rules! level_matches_scalar {
    ($($name:ident: $format:ident, $level:ident;)*) => {$(
        #[test]
        fn $name() {
            assert_matches_scalar(QuantFormat::$format, SimdLevel::$level);
        }
    )*};
}

level_matches_scalar! {
    q4_0_avx2_matches_scalar: Q4_0, Avx2;
    q4_1_avx2_matches_scalar: Q4_1, Avx2;
    q5_0_avx2_matches_scalar: Q5_0, Avx2;
    q5_1_avx2_matches_scalar: Q5_1, Avx2;
    q8_0_avx2_matches_scalar: Q8_0, Avx2;
    q4_0_avx512_matches_scalar: Q4_0, Avx512;
    q4_1_avx512_matches_scalar: Q4_1, Avx512;
    q5_0_avx512_matches_scalar: Q5_0, Avx512;
    q5_1_avx512_matches_scalar: Q5_1, Avx512;
    q8_0_avx512_matches_scalar: Q8_0, Avx512;
    q4_0_neon_matches_scalar: Q4_0, Neon;
    q4_1_neon_matches_scalar: Q4_1, Neon;
    q5_0_neon_matches_scalar: Q5_0, Neon;
    q5_1_neon_matches_scalar: Q5_1, Neon;
    q8_0_neon_matches_scalar: Q8_0, Neon;
}

#[test]
fn scalar_matches_dequantised_f32_within_quantisation_error() {
    for format in QuantFormat::ALL {
        let (n, k, m) = (23, 160, 3);
        let w = random_matrix(format, n, k, 11);
        let x = random_activations(m, k, 12);
        let y = matmul(&w, SimdLevel::Scalar, &x, m);
        let mut row = vec![0.0; k];
        for r in 0..n {
            w.dequantize_row(r, &mut row);
            for a in 0..m {
                let xa = &x[a * k..(a + 1) * k];
                let exact: f32 = row.iter().zip(xa).map(|(w, x)| w * x).sum();
                // Each x is off by at most half a step (amax/254) plus the f16 rounding of d.
                let bound: f32 = row
                    .chunks(32)
                    .zip(xa.chunks(32))
                    .map(|(w, x)| {
                        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                        let abs_w: f32 = w.iter().map(|w| w.abs()).sum();
                        abs_w * amax * (0.5 / 127.0 + 1e-3)
                    })
                    .sum();
                let got = y[a * n + r];
                assert!(
                    (got - exact).abs() <= bound + 1e-4,
                    "{format} y[{a},{r}] = {got}, f32 gives {exact} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    for level in SimdLevel::available() {
        let w = random_matrix(QuantFormat::Q4_1, 1031, 128, 3);
        let x = random_activations(17, 128, 4);
        let one = in_pool(1, || matmul(&w, level, &x, 17));
        let two = in_pool(2, || matmul(&w, level, &x, 17));
        assert_eq!(one, two, "{level}");
    }
}

/// Each output is a function of its weight row and activation row alone: the same bits
/// whether the row is multiplied alone (m = 1, the decode kernel) or in a batch of any size
/// (the prefill kernel), at any position in it, on one thread or two (other task splits).
#[test]
fn row_results_do_not_depend_on_batch() {
    // (n, k): n = 1, n not a multiple of 8 or 16 (ragged last groups), k = one block.
    let shapes = [
        (1, 32),
        (3, 64),
        (8, 32),
        (13, 96),
        (45, 160),
        (64, 256),
        (259, 128),
    ];
    const ROWS: usize = 20;
    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for level in SimdLevel::available() {
        for format in QuantFormat::ALL {
            for (n, k) in shapes {
                let w = random_matrix(format, n, k, (n * k) as u64);
                let x = random_activations(ROWS, k, (n + k) as u64);
                for threads in [1, 2] {
                    in_pool(threads, || {
                        let alone: Vec<Vec<u32>> = x
                            .chunks_exact(k)
                            .map(|xa| bits(&matmul(&w, level, xa, 1)))
                            .collect();
                        // Offsets move each row to other positions in the kernels' groups.
                        for (m, offset) in (1..=17).flat_map(|m| [(m, 0), (m, 3)]) {
                            let batch = &x[offset * k..(offset + m) * k];
                            let y = matmul(&w, level, batch, m);
                            for (a, y) in y.chunks_exact(n).enumerate() {
                                assert_eq!(
                                    bits(y),
                                    alone[offset + a],
                                    "{format} {level} n={n} k={k} m={m} offset={offset} \
                                     row {a} threads={threads}: batched != alone"
                                );
                            }
                        }
                    });
                }
            }
        }
    }
}

#[test]
fn exact_integer_inputs_give_exact_products() {
    // Blocks whose amax is 127 quantise with d = 1, so q = x and every product is an
    // integer: all levels must return exactly Σ w·x.
    let k = 64;
    let x: Vec<f32> = (0..k)
        .map(|i| {
            if i % 32 == 0 {
                127.0
            } else {
                (i % 7) as f32 - 3.0
            }
        })
        .collect();
    let one = f16::from_f32(1.0).to_le_bytes();
    let mut bytes = Vec::new();
    for _ in 0..k / 32 {
        bytes.extend(one);
        bytes.extend((0..32u8).map(|j| j.wrapping_mul(37).wrapping_sub(100)));
    }
    let w = QuantMatrix::new(QuantFormat::Q8_0, 1, k, bytes).unwrap();
    let mut row = vec![0.0; k];
    w.dequantize_row(0, &mut row);
    let exact: f32 = row.iter().zip(&x).map(|(w, x)| w * x).sum();
    for level in SimdLevel::available() {
        assert_eq!(matmul(&w, level, &x, 1), [exact], "{level}");
    }
}

#[test]
fn q4_1_minimum_uses_the_f16_rounded_activation_sum() {
    // ggml stores s = d·Σq as f16: with d = 1 and Σq = 2049 it becomes 2048, and llama.cpp's
    // result carries that rounding. All weights are 0 with minimum 1, so y = s.
    let mut x = vec![127.0f32; 32];
    let mut sum = 127 * 32;
    for v in x.iter_mut().skip(1) {
        if sum == 2049 {
            break;
        }
        let step = (sum - 2049).min(127 + 127);
        *v -= step as f32;
        sum -= step;
    }
    assert_eq!(x.iter().sum::<f32>(), 2049.0);
    let mut bytes = Vec::new();
    bytes.extend(f16::from_f32(1.0).to_le_bytes());
    bytes.extend(f16::from_f32(1.0).to_le_bytes());
    bytes.extend([0u8; 16]);
    let w = QuantMatrix::new(QuantFormat::Q4_1, 1, 32, bytes).unwrap();
    for level in SimdLevel::available() {
        assert_eq!(matmul(&w, level, &x, 1), [2048.0], "{level}");
    }
}

/// The x86 levels follow the same float steps in their kernels (eight rows per 256-bit
/// vector with `vpmaddubsw`, Q8_0 through the sign trick; sixteen per 512-bit vector with
/// VNNI), so AVX2 and AVX-512 give the same bits.
#[test]
fn x86_levels_give_the_same_bits() {
    let levels = [SimdLevel::Avx2, SimdLevel::Avx512];
    if !levels.iter().all(|l| l.is_available()) {
        eprintln!("skipped: this CPU lacks AVX2 or AVX-512 VNNI");
        return;
    }
    let bits = |y: Vec<f32>| y.into_iter().map(f32::to_bits).collect::<Vec<u32>>();
    for format in QuantFormat::ALL {
        for (n, k, m) in [(45, 160, 1), (37, 96, 5), (259, 128, 17)] {
            let w = random_matrix(format, n, k, (n + k + m) as u64);
            let x = random_activations(m, k, k as u64);
            let [avx2, avx512] = levels.map(|l| bits(matmul(&w, l, &x, m)));
            assert_eq!(avx2, avx512, "{format} n={n} k={k} m={m}");
        }
    }
}

/// A prepared matrix may hold only its interleaved copy: its products on every level, its
/// rows and its GGUF bytes are what the unprepared matrix gives.
#[test]
fn prepared_matrices_answer_as_before() {
    for format in QuantFormat::ALL {
        let (n, k, m) = (37, 96, 13);
        let original = random_matrix(format, n, k, 7);
        let mut prepared = original.clone();
        prepared.prepare();
        // Rows first, while the GGUF bytes may be gone; the scalar level (which rebuilds
        // them) last.
        for r in [0, 17, n - 1] {
            let (mut got, mut want) = (vec![0.0; k], vec![0.0; k]);
            prepared.dequantize_row(r, &mut got);
            original.dequantize_row(r, &mut want);
            assert_eq!(got, want, "{format} row {r}");
        }
        let x = random_activations(m, k, 3);
        for level in SimdLevel::available().into_iter().rev() {
            assert_eq!(
                matmul(&prepared, level, &x, m),
                matmul(&original, level, &x, m),
                "{format} {level}"
            );
        }
        assert!(prepared == original, "{format}: GGUF bytes rebuilt");
    }
}

/// A matrix prepared straight from borrowed bytes is the one `new` then `prepare` give.
#[test]
fn prepared_from_bytes_equals_new_then_prepare() {
    for format in QuantFormat::ALL {
        let original = random_matrix(format, 37, 96, 11);
        let from_bytes = QuantMatrix::prepared(format, 37, 96, original.bytes()).unwrap();
        let mut prepared = original.clone();
        prepared.prepare();
        assert_eq!(
            from_bytes.memory_bytes(),
            prepared.memory_bytes(),
            "{format}"
        );
        let x = random_activations(5, 96, 2);
        for level in SimdLevel::available().into_iter().rev() {
            assert_eq!(
                matmul(&from_bytes, level, &x, 5),
                matmul(&original, level, &x, 5),
                "{format} {level}"
            );
        }
        assert!(from_bytes == original, "{format}");
    }
    let err = QuantMatrix::prepared(QuantFormat::Q4_0, 2, 32, &[0; 35]).unwrap_err();
    assert!(
        matches!(err, KernelError::ByteLength { actual: 35, .. }),
        "{err}"
    );
}

/// Stacking keeps every row where it belongs, in either layout: parts that fill whole
/// groups of sixteen join their records, others go through the GGUF bytes.
#[test]
fn stacked_matrices_are_their_parts_one_under_the_other() {
    for format in QuantFormat::ALL {
        for sizes in [[32, 16, 7], [16, 7, 16]] {
            let parts: Vec<QuantMatrix> = sizes
                .iter()
                .enumerate()
                .map(|(i, &rows)| random_matrix(format, rows, 64, i as u64))
                .collect();
            let bytes: Vec<u8> = parts.iter().flat_map(|p| p.bytes().to_vec()).collect();
            let whole = QuantMatrix::new(format, sizes.iter().sum(), 64, bytes).unwrap();
            let prepared: Vec<QuantMatrix> = parts
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    p.prepare();
                    p
                })
                .collect();
            let x = random_activations(3, 64, 5);
            for stack in [&parts, &prepared] {
                let stacked = QuantMatrix::stack(&stack.iter().collect::<Vec<_>>()).unwrap();
                for level in SimdLevel::available().into_iter().rev() {
                    assert_eq!(
                        matmul(&stacked, level, &x, 3),
                        matmul(&whole, level, &x, 3),
                        "{format} {sizes:?} {level}"
                    );
                }
                assert!(stacked == whole, "{format} {sizes:?}");
            }
        }
    }
    assert_eq!(
        QuantMatrix::stack(&[]).unwrap_err(),
        KernelError::NothingToStack
    );
    let (a, b) = (
        random_matrix(QuantFormat::Q4_1, 16, 64, 1),
        random_matrix(QuantFormat::Q4_1, 16, 96, 2),
    );
    assert!(matches!(
        QuantMatrix::stack(&[&a, &b]).unwrap_err(),
        KernelError::StackMismatch { .. }
    ));
}

/// Preparing keeps one layout: a 4-bit matrix holds what its GGUF bytes take.
#[test]
fn prepared_q4_matrices_hold_their_weights_once() {
    let original = random_matrix(QuantFormat::Q4_1, 64, 256, 1);
    let mut prepared = original.clone();
    prepared.prepare();
    assert_eq!(prepared.memory_bytes(), original.bytes().len());
}

#[test]
fn dequantize_reads_the_ggml_layouts() {
    let half = |v: f32| f16::from_f32(v).to_le_bytes();
    // Q4_0: low nibbles are elements 0..16, high nibbles 16..32; value (q - 8)·d.
    let mut q4_0 = half(0.5).to_vec();
    q4_0.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    // Q5_1: q = e through nibble and qh bit e; value q·d + m.
    let mut q5_1 = [half(1.0), half(-2.0)].concat();
    q5_1.extend(0xFFFF_0000u32.to_le_bytes());
    q5_1.extend((0..16u8).map(|j| j | (j << 4)));
    // Q5_0: same quants, value (q - 16)·d.
    let mut q5_0 = half(2.0).to_vec();
    q5_0.extend(&q5_1[4..]);
    type Case = (QuantFormat, Vec<u8>, fn(usize) -> f32);
    let cases: [Case; 3] = [
        (QuantFormat::Q4_0, q4_0, |e| if e < 16 { e as f32 - 8.0 } else { 31.0 - e as f32 - 8.0 } * 0.5),
        (QuantFormat::Q5_1, q5_1, |e| e as f32 - 2.0),
        (QuantFormat::Q5_0, q5_0, |e| (e as f32 - 16.0) * 2.0),
    ];
    for (format, bytes, value) in cases {
        let w = QuantMatrix::new(format, 1, 32, bytes).unwrap();
        let mut out = [0.0; 32];
        w.dequantize_row(0, &mut out);
        let want: Vec<f32> = (0..32).map(value).collect();
        assert_eq!(out.to_vec(), want, "{format}");
    }
}

#[test]
fn zero_sized_products_are_empty_or_zero() {
    let w = QuantMatrix::new(QuantFormat::Q4_1, 3, 0, vec![]).unwrap();
    let mut y = vec![f32::NAN; 6];
    w.matmul(&[], 2, &mut y);
    assert_eq!(y, [0.0; 6]);
    let w = random_matrix(QuantFormat::Q8_0, 4, 64, 1);
    w.matmul(&[], 0, &mut []);
}

#[test]
fn ragged_columns_are_refused() {
    let err = QuantMatrix::new(QuantFormat::Q4_1, 2, 48, vec![0; 40]).unwrap_err();
    assert_eq!(
        err,
        KernelError::RaggedColumns {
            format: QuantFormat::Q4_1,
            cols: 48,
            block_len: 32
        }
    );
    assert_eq!(
        err.to_string(),
        "48 columns is not a multiple of the Q4_1 block length 32"
    );
}

#[test]
fn wrong_byte_length_is_refused() {
    let err = QuantMatrix::new(QuantFormat::Q8_0, 3, 64, vec![0; 203]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "a Q8_0 matrix of 3x64 needs 204 bytes (6 blocks of 34), got 203"
    );
}

#[test]
#[should_panic(expected = "x has 5 values")]
fn wrong_activation_length_panics() {
    let w = random_matrix(QuantFormat::Q4_0, 2, 32, 1);
    w.matmul(&[0.0; 5], 1, &mut [0.0; 2]);
}

fn matmul_wide(w: &QuantMatrix, level: SimdLevel, x: &[f32], m: usize) -> Vec<f64> {
    let mut y = vec![f64::NAN; m * w.rows()];
    w.matmul_wide_with(level, x, m, &mut y);
    y
}

/// Columns `cols` (whole blocks) of every row of `w`, as its own matrix: one rank's shard
/// of a row-parallel layer.
fn column_slice(w: &QuantMatrix, cols: std::ops::Range<usize>) -> QuantMatrix {
    let (block_bytes, nb) = (w.format().block_bytes(), w.cols() / 32);
    let bytes = w
        .bytes()
        .chunks_exact(nb * block_bytes)
        .flat_map(|row| &row[cols.start / 32 * block_bytes..cols.end / 32 * block_bytes])
        .copied()
        .collect();
    QuantMatrix::new(w.format(), w.rows(), cols.len(), bytes).unwrap()
}

/// The f64 sums are the same bits on every level, whatever the batch, the row's place in
/// it and the threads: decode, prefill and every instruction set agree exactly.
#[test]
fn wide_sums_are_the_same_bits_on_every_level_and_batch() {
    for format in QuantFormat::ALL {
        for (n, k) in [(1, 32), (13, 96), (45, 160), (259, 128)] {
            let w = random_matrix(format, n, k, (n * k) as u64);
            let x = random_activations(20, k, (n + k) as u64);
            let alone: Vec<Vec<f64>> = x
                .chunks_exact(k)
                .map(|xa| matmul_wide(&w, SimdLevel::Scalar, xa, 1))
                .collect();
            for level in SimdLevel::available() {
                for (threads, m, offset) in [(1, 1, 0), (2, 5, 1), (2, 8, 3), (1, 17, 2)] {
                    let batch = &x[offset * k..(offset + m) * k];
                    let y = in_pool(threads, || matmul_wide(&w, level, batch, m));
                    for (a, y) in y.chunks_exact(n).enumerate() {
                        assert!(
                            y.iter()
                                .zip(&alone[offset + a])
                                .all(|(g, w)| g.to_bits() == w.to_bits()),
                            "{format} {level} n={n} k={k} m={m} row {a}: wide sums differ"
                        );
                    }
                }
            }
        }
    }
}

/// Wide sums round to within a few f32 steps of the ordinary products.
#[test]
fn wide_sums_round_close_to_the_f32_products() {
    for format in QuantFormat::ALL {
        let (n, k, m) = (37, 256, 7);
        let w = random_matrix(format, n, k, 5);
        let x = random_activations(m, k, 6);
        let narrow = matmul(&w, crate::simd_level(), &x, m);
        let wide = matmul_wide(&w, crate::simd_level(), &x, m);
        let scale = narrow.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (i, (a, b)) in narrow.iter().zip(&wide).enumerate() {
            assert!(
                (a - *b as f32).abs() <= 1e-5 * scale,
                "{format} y[{i}]: {a} vs wide {b}"
            );
        }
    }
}

/// What tensor parallelism relies on: a row split into column shards (at block
/// boundaries, in any number of pieces), each shard's wide sums added in f64 in shard
/// order and rounded once, gives exactly the whole row's rounded wide sum.
#[test]
fn sharded_wide_sums_round_to_the_unsharded_result() {
    for format in QuantFormat::ALL {
        let (n, k, m) = (67, 1536, 9);
        let w = random_matrix(format, n, k, 21);
        let x = random_activations(m, k, 22);
        let whole: Vec<f32> = matmul_wide(&w, crate::simd_level(), &x, m)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        for shards in [2, 3, 4, 6, 8, 12] {
            let len = k / shards;
            let mut sum = vec![0.0f64; m * n];
            for s in 0..shards {
                let cols = s * len..(s + 1) * len;
                let part = column_slice(&w, cols.clone());
                let xs: Vec<f32> = x
                    .chunks_exact(k)
                    .flat_map(|row| &row[cols.clone()])
                    .copied()
                    .collect();
                for (acc, v) in sum
                    .iter_mut()
                    .zip(matmul_wide(&part, crate::simd_level(), &xs, m))
                {
                    *acc += v;
                }
            }
            let sharded: Vec<f32> = sum.into_iter().map(|v| v as f32).collect();
            assert_eq!(
                sharded.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{format} over {shards} shards"
            );
        }
    }
}
