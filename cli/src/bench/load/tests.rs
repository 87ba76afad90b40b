//! The load test against a scripted server on a local port: request bodies,
//! the closed loop, error accounting, and that nothing hangs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use serde_json::Value;

use super::*;

#[test]
fn base_urls_are_normalised_and_checked() {
    let base = |u: &str| base_url(u).map_err(|e| e.to_string());
    assert_eq!(
        base("http://127.0.0.1:8080").unwrap(),
        "http://127.0.0.1:8080"
    );
    assert_eq!(base("http://h:1/v1/").unwrap(), "http://h:1");
    assert_eq!(base(" http://h:1/ ").unwrap(), "http://h:1");
    assert!(
        base("https://api.example.com")
            .unwrap_err()
            .contains("no TLS")
    );
    assert!(base("localhost:8080").is_err());
    assert!(base("not a url").unwrap_err().contains("not a URL"));
}

#[test]
fn requests_ask_for_exactly_g_tokens_with_distinct_prompts() {
    let work = Workload {
        model: "m".into(),
        nonce: 42,
        words: 5,
        gen_tokens: 8,
    };
    let a = work.body("c1 #0", 8);
    let b = work.body("c1 #1", 8);
    assert_eq!(a["model"], "m");
    assert_eq!(
        (a["max_tokens"].as_u64(), a["min_tokens"].as_u64()),
        (Some(8), Some(8))
    );
    assert_eq!(a["ignore_eos"], true);
    assert_eq!(a["stream"], true);
    assert_eq!(a["temperature"], 0.0);
    assert_eq!(a["stream_options"]["include_usage"], true);
    let (pa, pb) = (a["prompt"].as_str().unwrap(), b["prompt"].as_str().unwrap());
    assert_eq!(pa, "[42 c1 #0] The history of computing is");
    assert_ne!(pa[..10], pb[..10], "prompts differ from their start");
    assert_eq!(prompt("t", 0), "t");
}

#[test]
fn prompt_length_is_calibrated_by_the_servers_count() {
    // The tag alone made 8 tokens, with 32 words 48 tokens: 1.25 tokens a
    // word, so 19 words after the tag make about 32.
    assert_eq!(calibrated_words(32, 32, Some(8), Some(48)), 19);
    // A prompt shorter than the tag is the tag alone.
    assert_eq!(calibrated_words(4, 4, Some(8), Some(13)), 0);
    // Without usage, a word counts as a token.
    assert_eq!(calibrated_words(32, 32, None, None), 32);
    assert_eq!(calibrated_words(32, 32, Some(8), Some(8)), 32);
    assert_eq!(calibrated_words(0, 0, Some(8), Some(8)), 0);
    assert_eq!(default_requests(1), 8);
    assert_eq!(default_requests(16), 32);
}

/// How the scripted server answers a request.
#[derive(Clone, Copy)]
enum Script {
    /// Every completion streams its `max_tokens` tokens, except `#2`
    /// (503) and `#3` (the connection drops after one token).
    Mixed,
    /// Reads the request and never answers.
    Silent,
}

/// A scripted HTTP server on a free local port (plain threads, so that it
/// does not depend on the runtime under test); its base URL.
fn serve(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for socket in listener.incoming().flatten() {
            std::thread::spawn(move || answer(socket, script));
        }
    });
    url
}

/// Reads one request (head and `Content-Length` body): its first line and body.
fn read_request(socket: &mut TcpStream) -> (String, Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match socket.read(&mut chunk) {
            Ok(0) | Err(_) => return (String::new(), Value::Null),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            let l = l.to_ascii_lowercase();
            l.strip_prefix("content-length:")?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match socket.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf
        .get(head_end..head_end + length)
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null);
    (head.lines().next().unwrap_or_default().to_string(), body)
}

fn reply(status: &str, json: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
        json.len()
    )
}

fn answer(mut socket: TcpStream, script: Script) {
    let (line, body) = read_request(&mut socket);
    if matches!(script, Script::Silent) {
        // Until the client gives up and closes.
        let _ = socket.read(&mut [0u8; 1]);
        return;
    }
    if line.starts_with("GET /v1/models") {
        let json = r#"{"object":"list","data":[{"id":"fake-model"},{"id":"other"}]}"#;
        let _ = socket.write_all(reply("200 OK", json).as_bytes());
        return;
    }
    let prompt = body["prompt"].as_str().unwrap_or_default().to_string();
    if prompt.contains("#2]") {
        let json = r#"{"error":{"message":"busy","type":"server_error"}}"#;
        let _ = socket.write_all(reply("503 Service Unavailable", json).as_bytes());
        return;
    }
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let _ = socket.write_all(head.as_bytes());
    let tokens = body["max_tokens"].as_u64().unwrap_or(1);
    for _ in 0..tokens {
        let chunk =
            r#"data: {"choices":[{"index":0,"text":" a","finish_reason":null}],"usage":null}"#;
        let _ = socket.write_all(format!("{chunk}\n\n").as_bytes());
        std::thread::sleep(Duration::from_millis(2));
        if prompt.contains("#3]") {
            return;
        }
    }
    // One token per word, as the calibration then sees it.
    let usage = format!(
        r#"{{"choices":[],"usage":{{"prompt_tokens":{},"completion_tokens":{tokens}}}}}"#,
        prompt.split_whitespace().count()
    );
    let tail = format!(
        "data: {{\"choices\":[{{\"index\":0,\"text\":\"\",\"finish_reason\":\"length\"}}]}}\n\ndata: {usage}\n\ndata: [DONE]\n\n"
    );
    let _ = socket.write_all(tail.as_bytes());
}

fn config(url: String) -> Config {
    Config {
        url,
        model: None,
        api_key: None,
        concurrency: vec![1, 2],
        requests: Some(4),
        prompt_tokens: 16,
        gen_tokens: 3,
        request_timeout: Duration::from_secs(10),
        json: true,
    }
}

#[tokio::test]
async fn failing_requests_are_counted_and_the_rest_measured() {
    let url = serve(Script::Mixed);
    let report = bench(&config(url.clone()), 7).await.unwrap();
    assert_eq!(report.model, "fake-model");
    assert_eq!(report.levels.len(), 2);
    for (level, concurrency) in report.levels.iter().zip([1, 2]) {
        assert_eq!(level.concurrency, concurrency);
        assert_eq!((level.requests, level.errors), (4, 2));
        assert_eq!(level.generated_tokens, 2 * 3);
        assert!(level.tokens_per_second > 0.0);
        assert!(level.ttft_ms.p50.is_some() && level.tpot_ms.p99.is_some());
        // Calibrated: the tag's 3 words and the filler make 16 tokens.
        assert_eq!(level.prompt_tokens_mean, Some(16.0));
        assert_eq!(level.error_samples.len(), 2, "{:?}", level.error_samples);
        assert_eq!(level.error_samples[0], "HTTP 503 Service Unavailable: busy");
        assert!(
            level.error_samples[1].contains("ended early")
                || level.error_samples[1].contains("stream broke"),
            "{:?}",
            level.error_samples
        );
    }
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["url"], url);
    assert!(json["levels"][1]["ttft_ms"]["p50"].is_f64());
    assert_eq!(report.failures().0, 4);
}

#[tokio::test]
async fn an_unreachable_server_fails_fast_with_the_reason() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let e = bench(&config(url.clone()), 7)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("cannot reach {url}/v1/models")), "{e}");
    assert!(e.to_lowercase().contains("connection refused"), "{e}");
    let mut named = config(url);
    named.model = Some("m".into());
    let e = bench(&named, 7).await.unwrap_err().to_string();
    assert!(e.contains("warm-up request"), "{e}");
    assert!(e.to_lowercase().contains("connection refused"), "{e}");
}

#[tokio::test]
async fn a_silent_server_times_out_instead_of_hanging() {
    let url = serve(Script::Silent);
    let mut silent = config(url);
    silent.model = Some("m".into());
    silent.request_timeout = Duration::from_secs(1);
    let e = bench(&silent, 7).await.unwrap_err().to_string();
    assert!(e.contains("timed out after 1 s"), "{e}");
}
