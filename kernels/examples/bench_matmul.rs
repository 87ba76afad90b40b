//! Times `QuantMatrix::matmul` on the demo model's shapes (SmolLM2-135M: Q4_1 linear layers,
//! Q8_0 output head) for every SIMD level this CPU has, at 1 and 2 threads, and estimates
//! the decode and prefill token rates the kernels alone would allow.
//!
//! `cargo run -p shardserve-kernels --example bench_matmul [-- LEVEL... m=M...]`, e.g.
//! `-- avx512 m=1`.

use std::time::{Duration, Instant};

use shardserve_kernels::{QuantFormat, QuantMatrix, SimdLevel};

/// (rows n, cols k) of the model's products, and how often each runs per layer.
const LAYER: [((usize, usize), usize); 4] = [
    ((576, 576), 2),  // q, o
    ((192, 576), 2),  // k, v
    ((1536, 576), 2), // gate, up
    ((576, 1536), 1), // down
];
const HEAD: (usize, usize) = (49152, 576);
const LAYERS: usize = 30;
const MIN_TIME: Duration = Duration::from_millis(300);

fn matrix(format: QuantFormat, n: usize, k: usize) -> QuantMatrix {
    // A cheap deterministic fill; scales kept small and finite.
    let mut state = 0x2545_f491_u32;
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

/// Milliseconds per call.
fn time(w: &QuantMatrix, level: SimdLevel, m: usize) -> f64 {
    let x: Vec<f32> = (0..m * w.cols())
        .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let mut y = vec![0.0; m * w.rows()];
    w.matmul_with(level, &x, m, &mut y);
    let start = Instant::now();
    let mut calls = 0;
    while calls < 3 || start.elapsed() < MIN_TIME {
        w.matmul_with(level, &x, m, &mut y);
        calls += 1;
    }
    start.elapsed().as_secs_f64() * 1e3 / calls as f64
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
    let ms: Vec<usize> = [1, 128]
        .into_iter()
        .filter(|m| m_args.is_empty() || m_args.iter().any(|a| **a == format!("m={m}")))
        .collect();
    let shapes: Vec<(usize, usize)> = LAYER.iter().map(|(s, _)| *s).chain([HEAD]).collect();
    println!(
        "{:<6} {:>6} {:>5} {:>4} {:<7} {:>3} {:>9} {:>8}",
        "format", "n", "k", "m", "level", "thr", "ms", "GFLOP/s"
    );
    let mut summary = Vec::new();
    for level in levels {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            for &m in &ms {
                let mut layer_ms = 0.0;
                let mut head_ms = 0.0;
                for format in [QuantFormat::Q4_1, QuantFormat::Q8_0] {
                    for &(n, k) in &shapes {
                        let w = matrix(format, n, k);
                        let ms = pool.install(|| time(&w, level, m));
                        let gflops = 2.0 * (m * n * k) as f64 / ms / 1e6;
                        println!(
                            "{format:<6} {n:>6} {k:>5} {m:>4} {level:<7} {threads:>3} {ms:>9.4} {gflops:>8.1}"
                        );
                        let per_layer = LAYER.iter().find(|(s, _)| *s == (n, k)).map(|(_, c)| *c);
                        match (format, per_layer) {
                            (QuantFormat::Q4_1, Some(count)) => layer_ms += ms * count as f64,
                            (QuantFormat::Q8_0, None) => head_ms = ms,
                            _ => {}
                        }
                    }
                }
                summary.push((level, threads, m, LAYERS as f64 * layer_ms, head_ms));
            }
        }
    }
    println!("\nkernel-only token rates (30 layers of Q4_1 products + Q8_0 head once per step):");
    for (level, threads, m, layers_ms, head_ms) in summary {
        let step_ms = layers_ms + head_ms;
        let what = if m == 1 { "decode " } else { "prefill" };
        println!(
            "{level:<7} {threads} thr {what} m={m:<3}: layers {layers_ms:8.2} ms + head {head_ms:7.2} ms = {step_ms:8.2} ms/step -> {:8.1} tok/s",
            m as f64 * 1e3 / step_ms
        );
    }
}
