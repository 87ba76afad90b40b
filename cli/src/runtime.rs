//! Process-wide settings made once at the binary's edge: logging and the
//! number of compute threads.

use anyhow::{Context, Result};
use clap::Args;

/// Compute threads for the forward pass.
#[derive(Args, Clone, Debug)]
pub struct ThreadArgs {
    /// Threads for matrix products (default: all cores). On a busy machine
    /// fewer threads than cores is faster: the pool spins while it waits.
    #[arg(long, short = 't', env = "SHARDSERVE_THREADS")]
    pub threads: Option<usize>,
}

impl ThreadArgs {
    /// Sizes the compute pool; call before anything computes.
    pub fn apply(&self) -> Result<usize> {
        let n = self
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        // candle sizes its own matmul parallelism from this variable.
        // SAFETY: called at start-up, before this process starts other threads.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("compute-{i}"))
            .build_global()
            .context("setting up the compute thread pool")?;
        Ok(n)
    }
}

/// Logs to stderr (stdout is for results), filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
