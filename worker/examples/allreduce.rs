//! All-reduce latency and bandwidth of the TCP backend, ranks as threads on
//! loopback: `cargo run --example allreduce -p shardserve-worker`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shardserve_worker::comm::{Collective, CommConfig, RankId, connect};

fn group(world: usize) -> Vec<Arc<dyn Collective>> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29_500);
    let coordinator = format!("127.0.0.1:{port}");
    std::thread::scope(|s| {
        let joins: Vec<_> = (0..world)
            .map(|r| {
                let cfg = CommConfig::tcp(RankId(r), world, coordinator.clone());
                s.spawn(move || connect(&cfg))
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread").expect("rendezvous"))
            .collect()
    })
}

/// Mean time of one all-reduce of `len` floats, over `iters` calls.
fn time_all_reduce(group: &[Arc<dyn Collective>], len: usize, iters: usize) -> Duration {
    let times: Vec<Duration> = std::thread::scope(|s| {
        let joins: Vec<_> = group
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut data = vec![1.0f32; len];
                    c.all_reduce_sum(&mut data).expect("warm-up");
                    c.barrier().expect("barrier");
                    let start = Instant::now();
                    for _ in 0..iters {
                        c.all_reduce_sum(&mut data).expect("all_reduce");
                    }
                    start.elapsed()
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("rank thread"))
            .collect()
    });
    times.into_iter().max().unwrap_or_default() / iters as u32
}

fn main() {
    for world in [2, 3] {
        let g = group(world);
        let small = time_all_reduce(&g, 576, 2000);
        let big_len = 4 << 20; // 16 MiB of f32
        let big = time_all_reduce(&g, big_len, 10);
        let gbs = (big_len * 4) as f64 / big.as_secs_f64() / 1e9;
        println!(
            "tcp world {world}: 576-float all-reduce {:.1} µs; 16 MiB all-reduce {:.1} ms = {gbs:.2} GB/s (buffer size / time)",
            small.as_secs_f64() * 1e6,
            big.as_secs_f64() * 1e3,
        );
    }
}
