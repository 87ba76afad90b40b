//! Tensor parallelism through the binary: `generate --tensor 3` against
//! `--tensor 1` on the golden prompts, and a group whose rank is killed
//! mid-generation (the request fails fast, every process exits); a pod's
//! ranks report their load progress together while their group meets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use shardserve_e2e::{
    children_of, cmdline, demo_model, free_port, is_alive, repo_root, run_json, shardserve_bin,
    signal,
};

fn golden() -> Vec<Value> {
    let path = repo_root().join("../shared/golden/smollm2-q4_1-chat.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file missing at {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Greedy answers at tensor 3 are tensor 1's, token for token, on every golden
/// prompt, and so are the log-probabilities of the top tokens at every step:
/// the row-parallel shards all-reduce unrounded f64 sums and round once, so
/// the ranks' numbers are one rank's (tolerance 1e-6 nats; in practice equal).
#[test]
fn tensor_3_greedy_equals_tensor_1_token_for_token() {
    let model = demo_model();
    let m = model.to_str().unwrap();
    for case in &golden() {
        let prompt: Vec<String> = ids(&case["chat_prompt_ids"])
            .iter()
            .map(u64::to_string)
            .collect();
        let prompt = prompt.join(",");
        let greedy = |tensor: &str| {
            run_json(&[
                "generate",
                "--model",
                m,
                "--prompt-ids",
                &prompt,
                "--max-tokens",
                "48",
                "--logprobs",
                "2",
                "--json",
                "--tensor",
                tensor,
            ])
        };
        let (one, three) = (greedy("1"), greedy("3"));
        assert_eq!(
            ids(&one["token_ids"]),
            ids(&three["token_ids"]),
            "{}: tensor 3's greedy tokens differ from tensor 1's",
            case["id"]
        );
        let top = |v: &Value| -> Vec<(u64, f64)> {
            v["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|step| step["top"].as_array().unwrap().clone())
                .map(|t| (t["id"].as_u64().unwrap(), t["logprob"].as_f64().unwrap()))
                .collect()
        };
        let (a, b) = (top(&one), top(&three));
        assert_eq!(a.len(), b.len());
        for (i, ((ida, la), (idb, lb))) in a.iter().zip(&b).enumerate() {
            assert!(
                ida == idb && (la - lb).abs() <= 1e-6,
                "{}: top logprob {i}: tensor 1 ({ida}, {la}) vs tensor 3 ({idb}, {lb})",
                case["id"]
            );
        }
    }
}

/// POSTs `body` to `url_path` on `addr` and returns the raw response text
/// (the server closes the connection at the end of a stream).
fn post(addr: &str, url_path: &str, body: &str, timeout: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    write!(
        s,
        "POST {url_path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Starts `shardserve up examples/smollm2-tp3.yaml` and waits until it answers;
/// returns the process and its HTTP address.
fn start_tensor_3_stack() -> (std::process::Child, String) {
    demo_model();
    let http = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let manifest = repo_root().join("examples/smollm2-tp3.yaml");
    let mut up = Command::new(shardserve_bin())
        .args([
            "up",
            manifest.to_str().unwrap(),
            "--http-addr",
            &http,
            "--grpc-addr",
            &grpc,
        ])
        .env("SHARDSERVE_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let ready = loop {
        let body = r#"{"model":"smollm2-tp3","prompt":"Hi","max_tokens":2}"#;
        if TcpStream::connect(&http).is_ok()
            && post(&http, "/v1/completions", body, Duration::from_secs(30)).contains("200 OK")
        {
            break true;
        }
        if started.elapsed() > Duration::from_secs(300) || up.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    if !ready {
        let _ = up.kill();
        panic!("the tensor-3 stack did not come up");
    }
    (up, http)
}

/// The generated text of a non-streamed completion response.
fn completion_text(response: &str) -> String {
    let body = &response[response.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let json: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("not a JSON completion ({e}): {response}"));
    json["choices"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {json}"))
        .to_string()
}

#[test]
fn tensor_3_batches_requests_and_each_answer_is_the_one_it_gets_alone() {
    let (mut up, http) = start_tensor_3_stack();
    let request = |prompt: &str| {
        format!(
            r#"{{"model":"smollm2-tp3","prompt":{},"max_tokens":12,"temperature":0}}"#,
            serde_json::Value::from(prompt)
        )
    };
    let target = "The three primary colours are";
    let alone = completion_text(&post(
        &http,
        "/v1/completions",
        &request(target),
        Duration::from_secs(120),
    ));
    let others = [
        "Once upon a time",
        "The capital of Italy is",
        "def fibonacci(n):",
        "My favourite food is",
        "Water boils at",
    ];
    // All at once: the leader runs them as one batch and every rank follows
    // the same batched steps.
    let threads: Vec<_> = std::iter::once(target)
        .chain(others)
        .map(|prompt| {
            let (http, body) = (http.clone(), request(prompt));
            std::thread::spawn(move || {
                completion_text(&post(
                    &http,
                    "/v1/completions",
                    &body,
                    Duration::from_secs(300),
                ))
            })
        })
        .collect();
    let answers: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let _ = up.kill();
    let _ = up.wait();
    assert_eq!(answers[0], alone, "batched at tensor 3, the answer changed");
    assert!(answers.iter().all(|a| !a.is_empty()));
}

#[test]
fn a_killed_rank_fails_the_request_fast_and_the_group_starts_again() {
    let (mut up, http) = start_tensor_3_stack();
    let ranks: Vec<u32> = children_of(up.id())
        .into_iter()
        .filter(|&p| cmdline(p).contains(" worker "))
        .collect();
    assert_eq!(ranks.len(), 3, "three rank processes expected");
    let follower = *ranks
        .iter()
        .find(|&&p| cmdline(p).contains("--rank 1"))
        .expect("rank 1 runs");

    let http2 = http.clone();
    let stream = std::thread::spawn(move || {
        let body = r#"{"model":"smollm2-tp3","prompt":"Count:","max_tokens":2000,"ignore_eos":true,"stream":true}"#;
        post(&http2, "/v1/completions", body, Duration::from_secs(60))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let killed = Instant::now();
    signal(follower, "KILL");
    let out = stream.join().unwrap();
    let failed_after = killed.elapsed();
    assert!(
        out.contains("\"error\""),
        "the stream did not end with an error: {}",
        &out[out.len().saturating_sub(500)..]
    );
    assert!(
        out.contains("Unavailable") || out.contains("service_unavailable"),
        "not an UNAVAILABLE failure: {out}"
    );
    assert!(
        failed_after < Duration::from_secs(15),
        "the request failed only after {failed_after:?}"
    );
    // Every rank of the group goes with it; `up` starts the group again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ranks.iter().any(|&pid| is_alive(pid)) {
        assert!(
            Instant::now() < deadline,
            "a rank process outlived its group"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(up.try_wait().unwrap().is_none(), "up must keep running");
        let fresh: Vec<u32> = children_of(up.id())
            .into_iter()
            .filter(|&p| cmdline(p).contains(" worker ") && !ranks.contains(&p))
            .collect();
        let body = r#"{"model":"smollm2-tp3","prompt":"Hi","max_tokens":2}"#;
        if fresh.len() == 3
            && post(&http, "/v1/completions", body, Duration::from_secs(30)).contains("200 OK")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the group did not serve again after a rank died"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = up.kill();
    let _ = up.wait();
}

/// The operator's GPU layout, on CPUs: one `worker --local-ranks 3` process is rank
/// 0 and starts ranks 1 and 2 itself; the group meets and loads, and when one of
/// its ranks is killed the whole process exits non-zero, taking the others along
/// (as a pod's container does, so the group restarts together).
#[test]
fn a_worker_running_its_pods_ranks_lives_and_dies_with_them() {
    let model = demo_model();
    let (listen, coordinator) = (free_port(), free_port());
    let mut worker = Command::new(shardserve_bin())
        .args(["worker", "--model", model.to_str().unwrap()])
        .args(["--tensor", "3", "--local-ranks", "3", "--threads", "1"])
        .args(["--coordinator", &format!("127.0.0.1:{coordinator}")])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = worker.stderr.take().unwrap();
    let (loaded_tx, loaded) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut log = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            log.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&log).contains("model loaded") {
                let _ = loaded_tx.send(());
            }
        }
    });
    loaded
        .recv_timeout(Duration::from_secs(180))
        .expect("the three ranks did not meet and load");
    let ranks = children_of(worker.id());
    let args: Vec<String> = ranks.iter().map(|&p| cmdline(p)).collect();
    assert_eq!(ranks.len(), 2, "ranks 1 and 2 run as children: {args:?}");
    for (rank, line) in [1, 2].iter().zip({
        let mut sorted = args.clone();
        sorted.sort();
        sorted
    }) {
        assert!(
            line.trim_end().ends_with(&format!("--rank {rank}")),
            "{line}"
        );
        assert!(!line.contains("--local-ranks"), "{line}");
    }
    assert!(
        TcpStream::connect(("127.0.0.1", listen)).is_ok(),
        "rank 0 serves"
    );

    signal(ranks[1], "KILL");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = worker.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "rank 0 outlived a killed rank");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while ranks.iter().any(|&p| is_alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in ranks {
        assert!(!is_alive(pid), "rank process {pid} outlived its group");
    }
}

/// What a pod answers the operator's progress question (`shardserve.v1.Progress`).
fn progress_of(port: u16) -> Option<shardserve_proto::v1::ProgressResponse> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut client = shardserve_proto::v1::progress_client::ProgressClient::connect(format!(
            "http://127.0.0.1:{port}"
        ))
        .await
        .ok()?;
        let request = shardserve_proto::v1::ProgressRequest {};
        Some(client.get(request).await.ok()?.into_inner())
    })
}

#[test]
fn a_pods_ranks_report_their_load_together_while_their_group_meets() {
    use shardserve_proto::v1::progress_response::Stage;

    let model = demo_model();
    let (listen, coordinator) = (free_port(), free_port());
    // Pod 0 of a group of three ranks, two per pod: ranks 0 and 1 load and wait
    // for rank 2, which never comes.
    let mut worker = Command::new(shardserve_bin())
        .args(["worker", "--model", model.to_str().unwrap()])
        .args(["--tensor", "3", "--local-ranks", "2", "--threads", "1"])
        .args(["--pod-index", "0", "--ranks-per-pod", "2"])
        .args(["--coordinator", &format!("127.0.0.1:{coordinator}")])
        .args(["--listen", &format!("127.0.0.1:{listen}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let file = std::fs::metadata(&model).unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(120);
    let answer = loop {
        let answer = progress_of(listen);
        // A rank that has not opened the file yet reports nothing to do (total 0),
        // so the pod can look done while one rank alone is counted: wait until
        // more than one file's worth is counted (a pod that counted only one rank
        // never gets there and fails at the deadline).
        if let Some(a) = &answer
            && a.processes == 2
            && a.total_bytes > file
            && a.done_bytes == a.total_bytes
        {
            break *a;
        }
        if Instant::now() > deadline {
            let _ = worker.kill();
            panic!("the pod never reported both ranks loaded; last answer: {answer:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = worker.kill();
    let _ = worker.wait();
    // Each rank goes through every tensor of the file once: twice the file's
    // tensors, a little less than twice the file (its header holds the tokenizer).
    assert!(
        answer.total_bytes <= 2 * file && answer.total_bytes > 2 * file * 9 / 10,
        "{} bytes counted for two ranks of a {file}-byte file",
        answer.total_bytes
    );
    assert_eq!(answer.stage(), Stage::Loading, "the group has not met");
}
