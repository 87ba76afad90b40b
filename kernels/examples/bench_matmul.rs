//! Times `QuantMatrix::matmul` on the demo model's shapes (SmolLM2-135M: Q4_1 linear layers,
//! Q8_0 output head) for every SIMD level this CPU has, at 1 and 2 threads.
//!
//! Two tables: each shape alone (the matrix stays in cache between calls), then a whole
//! model step over 30 distinct layers and the head (~96 MB of weights streamed from memory
//! per step, as real decoding does), from which it estimates the token rates the kernels
//! alone allow: decode (m=1) and prefill (m=128 through the layers, head on one row).
//!
//! `cargo run -p shardserve-kernels --example bench_matmul [-- LEVEL... m=M...]`, e.g.
//! `-- avx512 m=1` (any row counts; 1 and 128 by default).

use std::time::{Duration, Instant};

use shardserve_kernels::{QuantFormat, QuantMatrix, SimdLevel};

/// (rows n, cols k) of a layer's products: q, k, v, o, gate, up, down.
/// The row-parallel ones (o and down, see `ROW_PARALLEL`) run as `matmul_wide`, as the model
/// runs them.
const LAYER: [(usize, usize); 7] = [
    (576, 576),
    (192, 576),
    (192, 576),
    (576, 576),
    (1536, 576),
    (1536, 576),
    (576, 1536),
];
/// Indices in [`LAYER`] of the row-parallel products.
const ROW_PARALLEL: [usize; 2] = [3, 6];
const HEAD: (usize, usize) = (49152, 576);
const LAYERS: usize = 30;
const MIN_TIME: Duration = Duration::from_millis(300);
/// Scalar runs of more multiply-adds than this are skipped (they take seconds).
const SCALAR_MAX_MACS: usize = 500_000_000;

fn matrix(format: QuantFormat, (n, k): (usize, usize), seed: u32) -> QuantMatrix {
    // A cheap deterministic fill; scales kept small and finite.
    let mut state = 0x2545_f491_u32 ^ seed.wrapping_mul(0x9e37_79b9);
    let mut bytes = vec![0u8; n * k / 32 * format.block_bytes()];
    for (i, b) in bytes.iter_mut().enumerate() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        *b = if i % format.block_bytes() < 4 {
            [0x1e, 0x20][i % 2]
        } else {
            state as u8
        };
    }
    QuantMatrix::new(format, n, k, bytes).expect("sizes are consistent")
}

fn activations(m: usize, k: usize) -> Vec<f32> {
    (0..m * k)
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

/// Milliseconds per run of `f`: the fastest of several batches, so that other processes on
/// the machine disturb the figure as little as possible.
fn time(mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut best = f64::INFINITY;
    while start.elapsed() < MIN_TIME {
        let batch = Instant::now();
        let mut calls = 0;
        while calls < 2 || batch.elapsed() < MIN_TIME / 10 {
            f();
            calls += 1;
        }
        best = best.min(batch.elapsed().as_secs_f64() * 1e3 / calls as f64);
    }
    best
}

/// One forward step's products: every layer's seven, then the head on the last row.
fn model_step(layers: &[Vec<QuantMatrix>], head: &QuantMatrix, level: SimdLevel, m: usize) {
    let x = activations(m, 1536);
    let mut y = vec![0.0; m * 1536];
    let mut wide = vec![0.0; m * 1536];
    for layer in layers {
        for (i, w) in layer.iter().enumerate() {
            let (n, k) = (w.rows(), w.cols());
            if ROW_PARALLEL.contains(&i) {
                w.matmul_wide_with(level, &x[..m * k], m, &mut wide[..m * n]);
            } else {
                w.matmul_with(level, &x[..m * k], m, &mut y[..m * n]);
            }
        }
    }
    let mut logits = vec![0.0; head.rows()];
    head.matmul_with(level, &x[..head.cols()], 1, &mut logits);
}

fn main() {
    // Arguments: level names (`avx512`) and/or `m=1`, `m=128` to run a subset.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (m_args, level_args): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| a.starts_with("m="));
    let levels: Vec<SimdLevel> = SimdLevel::available()
        .into_iter()
        .filter(|l| level_args.is_empty() || level_args.iter().any(|w| *w == l.name()))
        .collect();
    let ms: Vec<usize> = if m_args.is_empty() {
        vec![1, 128]
    } else {
        m_args
            .iter()
            .filter_map(|a| a.strip_prefix("m=")?.parse().ok())
            .collect()
    };
    let pools: Vec<(usize, rayon::ThreadPool)> = [1, 2]
        .into_iter()
        .map(|t| {
            (
                t,
                rayon::ThreadPoolBuilder::new()
                    .num_threads(t)
                    .build()
                    .expect("thread pool"),
            )
        })
        .collect();

    println!("each shape alone (weights cache-resident):");
    println!(
        "{:<6} {:>6} {:>5} {:>4} {:<7} {:>3} {:>9} {:>8}",
        "format", "n", "k", "m", "level", "thr", "ms", "GFLOP/s"
    );
    let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), HEAD];
    for &level in &levels {
        for (threads, pool) in &pools {
            for &m in &ms {
                for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
                    for (n, k) in shapes {
                        if level == SimdLevel::Scalar && m * n * k > SCALAR_MAX_MACS {
                            continue;
                        }
                        let w = matrix(format, (n, k), 0);
                        let x = activations(m, k);
                        let mut y = vec![0.0; m * n];
                        let ms = pool.install(|| time(|| w.matmul_with(level, &x, m, &mut y)));
                        let gflops = 2.0 * (m * n * k) as f64 / ms / 1e6;
                        println!(
                            "{format:<6} {n:>6} {k:>5} {m:>4} {level:<7} {threads:>3} {ms:>9.4} {gflops:>8.1}"
                        );
                        if n == 576 {
                            // The row-parallel shapes, as f64 sums.
                            let mut y = vec![0.0; m * n];
                            let ms =
                                pool.install(|| time(|| w.matmul_wide_with(level, &x, m, &mut y)));
                            let gflops = 2.0 * (m * n * k) as f64 / ms / 1e6;
                            println!(
                                "{:<6} {n:>6} {k:>5} {m:>4} {level:<7} {threads:>3} {ms:>9.4} {gflops:>8.1}",
                                "  wide"
                            );
                        }
                    }
                }
            }
        }
    }

    let layers: Vec<Vec<QuantMatrix>> = (0..LAYERS)
        .map(|l| {
            LAYER
                .iter()
                .enumerate()
                .map(|(i, &s)| matrix(QuantFormat::Q4_1, s, (l * 7 + i) as u32))
                .collect()
        })
        .collect();
    let head = matrix(QuantFormat::Q8_0, HEAD, 999);
    println!("\nwhole model step (30 distinct Q4_1 layers + Q8_0 head on one row), kernels only:");
    for &level in &levels {
        for (threads, pool) in &pools {
            for &m in &ms {
                if level == SimdLevel::Scalar && m > 1 {
                    continue;
                }
                let ms = pool.install(|| time(|| model_step(&layers, &head, level, m)));
                let what = if m == 1 { "decode " } else { "prefill" };
                println!(
                    "{level:<7} {threads} thr {what} m={m:<3}: {ms:8.2} ms/step -> {:8.1} tok/s",
                    m as f64 * 1e3 / ms
                );
            }
        }
    }
}
