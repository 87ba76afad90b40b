//! `shardserve bench --url`: the load generator against the real stack
//! (`shardserve up` on the demo model), and against an address where
//! nothing listens (it fails fast, saying why, instead of hanging).

use std::time::{Duration, Instant};

use serde_json::Value;
use shardserve_e2e::{Process, demo_manifest, free_port};

/// The bench below takes seconds; this only guards against a hang.
const BENCH: Duration = Duration::from_secs(180);

#[test]
fn bench_url_measures_every_level_against_up() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = demo_manifest(dir.path(), "bench", 1);
    let (http, grpc) = (free_port(), free_port());
    let http_addr = format!("127.0.0.1:{http}");
    let grpc_addr = format!("127.0.0.1:{grpc}");
    let mut up = Process::start(&[
        "up",
        manifest.to_str().unwrap(),
        "--http-addr",
        http_addr.as_str(),
        "--grpc-addr",
        grpc_addr.as_str(),
    ]);
    up.wait_ready();

    // The model is not named: bench asks /v1/models. A trailing /v1 (an
    // OpenAI base URL) is accepted.
    let url = format!("http://{http_addr}/v1");
    let mut bench = Process::start(&[
        "bench",
        "--url",
        url.as_str(),
        "--concurrency",
        "1,2",
        "--requests",
        "4",
        "--gen-tokens",
        "8",
        "--prompt-tokens",
        "32",
        "--json",
    ]);
    let status = bench.wait_exit(BENCH);
    assert!(
        status.success(),
        "bench failed ({status}):\n{}\n{}\nup's log:\n{}",
        bench.stdout(),
        bench.stderr(),
        up.stderr()
    );
    let stdout = bench.stdout();
    assert_eq!(
        stdout.trim_end().lines().count(),
        1,
        "one JSON line: {stdout}"
    );
    let report: Value = serde_json::from_str(stdout.trim()).expect("stdout is JSON");
    assert_eq!(report["url"], format!("http://{http_addr}"));
    assert_eq!(report["model"], "bench");
    assert_eq!(report["prompt_tokens"], 32);
    assert_eq!(report["gen_tokens"], 8);
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2, "{report}");
    for (level, concurrency) in levels.iter().zip([1, 2]) {
        assert_eq!(level["concurrency"], concurrency, "{level}");
        assert_eq!(level["requests"], 4, "{level}");
        assert_eq!(level["errors"], 0, "{level}");
        assert_eq!(level["error_samples"], Value::Array(vec![]), "{level}");
        // ignore_eos: every request generates exactly --gen-tokens.
        assert_eq!(level["generated_tokens"], 4 * 8, "{level}");
        assert!(
            level["tokens_per_second"].as_f64().unwrap() > 0.0,
            "{level}"
        );
        for measure in ["ttft_ms", "tpot_ms"] {
            for q in ["p50", "p99"] {
                let v = level[measure][q].as_f64();
                assert!(v.is_some_and(|v| v > 0.0), "{measure}.{q}: {level}");
            }
        }
        assert!(
            level["ttft_ms"]["p50"].as_f64() <= level["ttft_ms"]["p99"].as_f64(),
            "{level}"
        );
        // The prompt is calibrated by the server's count to about 32 tokens.
        let prompt = level["prompt_tokens_mean"].as_f64().unwrap();
        assert!(
            (28.0..=36.0).contains(&prompt),
            "prompt tokens {prompt}: {level}"
        );
    }
}

#[test]
fn bench_url_without_a_server_fails_fast_saying_why() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for model in [None, Some("m")] {
        let mut args = vec![
            "bench",
            "--url",
            url.as_str(),
            "--concurrency",
            "1,2",
            "--json",
        ];
        if let Some(m) = model {
            args.extend(["--model", m]);
        }
        let start = Instant::now();
        let mut bench = Process::start(&args);
        let status = bench.wait_exit(Duration::from_secs(60));
        assert!(!status.success(), "bench must fail without a server");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            start.elapsed()
        );
        let stderr = bench.stderr();
        assert!(stderr.contains(&url), "{stderr}");
        assert!(
            stderr.to_lowercase().contains("connection refused"),
            "{stderr}"
        );
        assert_eq!(bench.stdout(), "", "no report without a warm-up");
    }
}
