//! Helpers of the end-to-end tests (in `tests/`), which drive the
//! `shardserve` binary as a user would.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `shardserve` binary of this build (next to the test executables).
pub fn shardserve_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/shardserve
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(format!("shardserve{}", std::env::consts::EXE_SUFFIX)))
        .expect("target directory");
    assert!(
        bin.exists(),
        "shardserve binary missing at {}; build it first (`make test` does: cargo build --workspace --all-targets)",
        bin.display()
    );
    bin
}

/// The demo model in the cache; fails with a clear message when it is missing.
pub fn demo_model() -> PathBuf {
    let cache = std::env::var_os("SHARDSERVE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/shardserve")
        });
    let path = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "demo model missing at {}; run `make fetch-demo` (make test does it first)",
        path.display()
    );
    path
}

/// Runs `shardserve` with `args` (two compute threads) and returns its output.
pub fn run(args: &[&str]) -> Output {
    Command::new(shardserve_bin())
        .args(args)
        .env("SHARDSERVE_THREADS", "2")
        .output()
        .expect("shardserve runs")
}

/// Runs `shardserve` expecting success and one JSON object on stdout.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "shardserve {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("stdout is UTF-8");
    assert_eq!(
        stdout.trim_end().lines().count(),
        1,
        "one line of JSON expected, got: {stdout}"
    );
    serde_json::from_str(stdout.trim()).expect("stdout is JSON")
}
