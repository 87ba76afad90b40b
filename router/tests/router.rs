//! The router over real sockets, in front of real workers serving the demo
//! model in-process. Each test starts its own router; tests that count,
//! kill or fill workers start their own workers too.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use shardserve_e2e::demo_model;
use shardserve_proto::v1 as pb;
use shardserve_router::{Backend, Deployment, Listeners, RouterConfig, StaticDiscovery, serve_on};
use shardserve_worker::engine::{Engine, EngineHandle, EngineOptions};
use tokio::sync::oneshot;

const MODEL: &str = "smollm2";
/// Guards against a hung test; generous, since it is no speed check.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// A worker on its own thread and runtime; `kill` drops every connection
/// at once, as a crashed process would.
struct Worker {
    addr: SocketAddr,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    /// The worker's engine, to read its running-sequences gauge.
    engine: EngineHandle,
}

impl Worker {
    fn start(max_seq_len: Option<usize>) -> Worker {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build_global();
        let path = demo_model();
        let options = EngineOptions {
            served_model_name: Some(MODEL.into()),
            max_seq_len,
            ..EngineOptions::default()
        };
        let engine = Engine::load(&path, &options)
            .unwrap_or_else(|e| panic!("cannot load the demo model {}: {e}", path.display()));
        let engine = EngineHandle::spawn(engine).expect("engine thread starts");
        let handle = engine.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("address");
        let (kill, killed) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                tokio::select! {
                    result = shardserve_worker::server::serve_on(engine, listener, std::future::pending()) => result.expect("worker serves"),
                    _ = killed => {}
                }
            });
            runtime.shutdown_background();
        });
        Worker {
            addr,
            kill: Mutex::new(Some(kill)),
            engine: handle,
        }
    }

    fn kill(&self) {
        if let Some(kill) = self.kill.lock().unwrap().take() {
            let _ = kill.send(());
        }
    }

    fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// One worker shared by the tests that only read answers.
fn shared() -> &'static Worker {
    static WORKER: OnceLock<Worker> = OnceLock::new();
    WORKER.get_or_init(|| Worker::start(None))
}

struct Router {
    base: String,
    grpc: SocketAddr,
    http: reqwest::Client,
    discovery: Arc<StaticDiscovery>,
    _stop: oneshot::Sender<()>,
}

async fn router_with(
    backends: &[(&str, &str, String)],
    tweak: impl FnOnce(&mut RouterConfig),
) -> Router {
    let mut by_model: BTreeMap<String, Vec<Backend>> = BTreeMap::new();
    for (model, id, uri) in backends {
        by_model
            .entry(model.to_string())
            .or_default()
            .push(Backend {
                id: id.to_string(),
                grpc_uri: uri.clone(),
            });
    }
    let deployments = by_model
        .into_iter()
        .map(|(model, backends)| Deployment {
            model,
            backends,
            adapters: Vec::new(),
        })
        .collect();
    router_over(deployments, tweak).await
}

/// A router over `deployments` as given (some may have no backends).
async fn router_over(
    deployments: Vec<Deployment>,
    tweak: impl FnOnce(&mut RouterConfig),
) -> Router {
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", http.local_addr().unwrap());
    let grpc_addr = grpc.local_addr().unwrap();
    let mut config = RouterConfig {
        health_interval: Duration::from_millis(200),
        ..RouterConfig::default()
    };
    tweak(&mut config);
    let (stop, stopped) = oneshot::channel::<()>();
    let discovery = Arc::new(StaticDiscovery::new(deployments));
    tokio::spawn(serve_on(
        config,
        Listeners {
            http,
            grpc,
            metrics: None,
        },
        discovery.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    Router {
        base,
        grpc: grpc_addr,
        http: reqwest::Client::new(),
        discovery,
        _stop: stop,
    }
}

/// A router in front of `workers` (ids "w0", "w1", ...), ready.
async fn router(workers: &[&Worker], tweak: impl FnOnce(&mut RouterConfig)) -> Router {
    let backends: Vec<_> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| (MODEL, ["w0", "w1", "w2"][i], w.uri()))
        .collect();
    let r = router_with(&backends, tweak).await;
    r.wait_ready().await;
    r
}

impl Router {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + HANG_GUARD;
        loop {
            if let Ok(r) = self.http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "router never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = tokio::time::timeout(
            HANG_GUARD,
            self.http.post(self.url(path)).json(&body).send(),
        )
        .await
        .expect("no hang")
        .expect("request sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// Posts and returns the raw streamed body.
    async fn post_stream(&self, path: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("sent");
        let status = r.status().as_u16();
        let text = tokio::time::timeout(HANG_GUARD, r.text())
            .await
            .expect("no hang")
            .expect("body");
        (status, text)
    }

    /// GETs `path` and reads its JSON body.
    async fn get_json(&self, path: &str) -> Value {
        self.http
            .get(self.url(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The JSON objects of an SSE body (`data: {...}` lines; `[DONE]` skipped).
fn sse_events(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("bad event {d}: {e}")))
        .collect()
}

/// A metric's value for a label set given as `key="value"` pieces.
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn chat_body(content: &str, max_tokens: u32) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
}

#[tokio::test]
async fn chat_streamed_text_equals_non_streamed_at_temperature_0() {
    let r = router(&[shared()], |_| {}).await;
    let (status, whole) = r
        .post(
            "/v1/chat/completions",
            chat_body("What is the capital of France?", 12),
        )
        .await;
    assert_eq!(status, 200, "{whole}");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.is_empty());
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(
        whole["usage"]["total_tokens"],
        whole["usage"]["prompt_tokens"].as_u64().unwrap()
            + whole["usage"]["completion_tokens"].as_u64().unwrap()
    );

    let mut body = chat_body("What is the capital of France?", 12);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, raw) = r.post_stream("/v1/chat/completions", body).await;
    assert_eq!(status, 200);
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    let events = sse_events(&raw);
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = events.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], whole["usage"]);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
}

#[tokio::test]
async fn completions_score_token_ids_with_echo_and_logprobs() {
    let r = router(&[shared()], |_| {}).await;
    let ids = [504, 3458, 282, 4649, 314];
    let (status, v) = r
        .post("/v1/completions", json!({"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}))
        .await;
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), ids.len());
    assert!(lp["token_logprobs"][0].is_null());
    for i in 1..ids.len() {
        assert!(lp["token_logprobs"][i].as_f64().unwrap() <= 0.0, "{lp}");
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    assert_eq!(v["usage"]["completion_tokens"], 0);

    // Text prompt, generating, with logprobs, streamed and not.
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0, "logprobs": 2});
    let (status, v) = r.post("/v1/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
    let mut stream = body;
    stream["stream"] = json!(true);
    let (_, raw) = r.post_stream("/v1/completions", stream).await;
    let streamed: String = sse_events(&raw)
        .iter()
        .filter_map(|e| e["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test]
async fn models_list_and_unknown_model_is_404() {
    let r = router(&[shared()], |_| {}).await;
    let v = r.get_json("/v1/models").await;
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["object"], "list");
    let mut body = chat_body("hi", 4);
    body["model"] = json!("nope");
    let (status, v) = r.post("/v1/chat/completions", body).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn bad_requests_are_4xx_with_clear_messages_and_serving_goes_on() {
    let r = router(&[shared()], |_| {}).await;
    let raw = r
        .http
        .post(r.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
    let v: Value = raw.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid JSON"),
        "{v}"
    );

    let cases = [
        (json!({"model": MODEL, "messages": []}), "messages is empty"),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}),
            "max_tokens=-1",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000}),
            "context of",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}),
            "invalid type",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}),
            "n=2",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 7}),
            "top_p=7",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}),
            "response_format is not supported",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools is not supported",
        ),
    ];
    for (body, want) in cases {
        let (status, v) = r.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 400, "{body} → {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(want), "{body}: {message}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    // Longer than the context: the worker says so; the router passes it on.
    let long: Vec<u32> = vec![504; 9000];
    let (status, v) = r
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": long, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("context")
            || v["error"]["message"].as_str().unwrap().contains("long"),
        "{v}"
    );

    let (status, _) = r.post("/v1/chat/completions", chat_body("hi", 2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn requests_spread_over_two_backends() {
    let (a, b) = (Worker::start(Some(512)), Worker::start(Some(512)));
    let r = router(&[&a, &b], |_| {}).await;
    let calls = (0..6).map(|i| {
        r.post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": format!("Story number {i}:"), "max_tokens": 4}),
        )
    });
    for (status, v) in futures::future::join_all(calls).await {
        assert_eq!(status, 200, "{v}");
    }
    let m = r.metrics().await;
    let served = |id: &str| {
        metric(
            &m,
            "shardserve_router_backend_requests_total",
            &[&format!("backend=\"{id}\"")],
        )
        .unwrap_or(0.0)
    };
    assert!(served("w0") >= 1.0 && served("w1") >= 1.0, "{m}");
    assert_eq!(served("w0") + served("w1"), 6.0);
}

#[tokio::test]
async fn a_killed_backend_loses_no_request_that_had_not_streamed() {
    let (a, b) = (Worker::start(Some(512)), Worker::start(Some(512)));
    let r = router(&[&a, &b], |_| {}).await;
    // Each backend gets 4 requests of 64 tokens, run one at a time: the
    // kill lands while w1 still has requests queued or running.
    let calls: Vec<_> = (0..8)
        .map(|i| {
            r.post(
                "/v1/completions",
                json!({"model": MODEL, "prompt": format!("Tale {i}:"), "max_tokens": 64, "ignore_eos": true}),
            )
        })
        .collect();
    let killer = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        b.kill();
    };
    let (results, ()) = tokio::join!(futures::future::join_all(calls), killer);
    for (status, v) in results {
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 64);
    }
    // w1's unfinished requests were started again on w0.
    let m = r.metrics().await;
    let started_on_w0 = metric(
        &m,
        "shardserve_router_backend_requests_total",
        &["backend=\"w0\""],
    )
    .unwrap();
    assert!(started_on_w0 > 4.0, "{m}");
    // Every router series the chart's dashboard queries is served (retries included).
    let missing = shardserve_e2e::dashboard_series_missing("shardserve_router_", &m);
    assert!(missing.is_empty(), "the dashboard queries {missing:?}: {m}");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let m = r.metrics().await;
        if metric(&m, "shardserve_router_backend_healthy", &["backend=\"w1\""]) == Some(0.0) {
            assert_eq!(
                metric(&m, "shardserve_router_backend_healthy", &["backend=\"w0\""]),
                Some(1.0)
            );
            break;
        }
        assert!(Instant::now() < deadline, "w1 never marked unhealthy: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One healthy backend is enough to be ready.
    assert_eq!(
        r.http.get(r.url("/readyz")).send().await.unwrap().status(),
        200
    );
    let (status, _) = r.post("/v1/chat/completions", chat_body("hi", 2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn no_healthy_backend_is_503_and_not_ready() {
    // A port that nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let r = router_with(&[(MODEL, "gone", format!("http://{closed}"))], |c| {
        c.hold_timeout = Duration::ZERO
    })
    .await;
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let resp = r.http.get(r.url("/readyz")).send().await.unwrap();
        if resp.status() == 503 {
            let v: Value = resp.json().await.unwrap();
            let unready = &v["models_without_healthy_backend"];
            if unready[0]["model"] == MODEL {
                break;
            }
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, v) = r.post("/v1/chat/completions", chat_body("hi", 2)).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(
        r.http.get(r.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

#[tokio::test]
async fn a_known_model_without_backends_is_held_then_503_and_readiness_stays_ready() {
    // What Kubernetes discovery publishes for a ModelDeployment whose pods
    // are still loading, or one scaled to zero; no worker (nor the demo model)
    // is needed.
    let starting = Deployment {
        model: "starting".into(),
        backends: Vec::new(),
        adapters: Vec::new(),
    };
    let r = router_over(vec![starting], |c| {
        c.hold_timeout = Duration::from_millis(300);
    })
    .await;
    r.wait_ready().await;
    let resp = r.http.get(r.url("/readyz")).send().await.unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["models_without_backends"], json!(["starting"]), "{v}");
    let asked = Instant::now();
    let resp = r
        .http
        .post(r.url("/v1/chat/completions"))
        .json(&json!({"model": "starting", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert!(asked.elapsed() >= Duration::from_millis(300), "held first");
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "10");
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("no backend of model \"starting\" became ready within 300ms"),
        "{v}"
    );
    let (status, _) = r
        .post(
            "/v1/chat/completions",
            json!({"model": "other", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, v) = r
        .post(
            "/api/generate",
            json!({"model": "starting", "prompt": "hi"}),
        )
        .await;
    assert_eq!(status, 503, "{v}");
    let (status, v) = r
        .http
        .get(r.url("/v1/models"))
        .send()
        .await
        .map(|x| (x.status(), x))
        .unwrap();
    assert_eq!(status, 200);
    let v: Value = v.json().await.unwrap();
    assert_eq!(v["data"][0]["id"], "starting", "{v}");

    use shardserve_proto::v1::inference_client::InferenceClient;
    let mut client = InferenceClient::connect(format!("http://{}", r.grpc))
        .await
        .unwrap();
    let err = client
        .generate(pb::GenerateRequest {
            model: "starting".into(),
            prompt: Some(pb::generate_request::Prompt::Text("Hello".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_generation() {
    let w = Worker::start(Some(4096));
    let r = router(&[&w], |_| {}).await;
    let long = json!({"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": true, "stream": true, "temperature": 0});
    let response = r
        .http
        .post(r.url("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let started = Instant::now();
    let mut chunks = 0;
    while chunks < 20 {
        body.next().await.expect("chunk").expect("bytes");
        chunks += 1;
    }
    // Time per chunk so far: what the rest would take were it not cancelled.
    let remaining = started.elapsed() / chunks * (4000 - chunks);
    assert_eq!(w.engine.load().running, 1);
    drop(body);
    // The worker's running-sequences gauge drops to 0 promptly.
    let dropped = Instant::now();
    while w.engine.load().running != 0 {
        assert!(
            dropped.elapsed() < Duration::from_secs(2),
            "the worker still runs the cancelled sequence"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let begun = Instant::now();
    let (status, _) = r
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Hi", "max_tokens": 4}),
        )
        .await;
    assert_eq!(status, 200);
    let took = begun.elapsed();
    assert!(
        took < remaining / 2,
        "the next request took {took:?}; the cancelled one had {remaining:?} left"
    );
    let m = r.metrics().await;
    assert_eq!(
        metric(
            &m,
            "shardserve_router_backend_outstanding_requests",
            &["backend=\"w0\""]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn a_full_queue_answers_429_then_recovers() {
    let w = Worker::start(Some(512));
    let r = router(&[&w], |c| c.max_queue_per_backend = 1).await;
    let r = &r;
    let calls = (0..6).map(|i| async move {
        let resp = r
            .http
            .post(r.url("/v1/completions"))
            .json(&json!({"model": MODEL, "prompt": format!("Item {i}"), "max_tokens": 8}))
            .send()
            .await
            .unwrap();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (resp.status().as_u16(), retry_after)
    });
    let results = futures::future::join_all(calls).await;
    let rejected: Vec<_> = results.iter().filter(|(s, _)| *s == 429).collect();
    assert!(!rejected.is_empty(), "{results:?}");
    assert!(rejected.iter().all(|(_, ra)| ra.as_deref() == Some("1")));
    assert!(results.iter().any(|(s, _)| *s == 200), "{results:?}");
    let (status, _) = r
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Again", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn ollama_endpoints_as_ollama_clients_use_them() {
    let r = router(&[shared()], |_| {}).await;
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "options": {"temperature": 0, "num_predict": 8}});
    let (status, raw) = r.post_stream("/api/chat", chat.clone()).await;
    assert_eq!(status, 200);
    let lines: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    assert!(last["eval_count"].as_u64().unwrap() > 0);
    assert!(last["total_duration"].as_u64().unwrap() > 0);
    assert!(lines[..lines.len() - 1].iter().all(|l| l["done"] == false));
    let streamed: String = lines
        .iter()
        .map(|l| l["message"]["content"].as_str().unwrap())
        .collect();

    let mut whole = chat;
    whole["stream"] = json!(false);
    let (status, v) = r.post("/api/chat", whole).await;
    assert_eq!(status, 200);
    assert_eq!(v["message"]["content"].as_str().unwrap(), streamed);
    assert_eq!(v["done"], true);

    let (status, v) = r.post("/api/generate", json!({"model": MODEL, "prompt": "Why is the sky blue?", "stream": false, "options": {"temperature": 0, "num_predict": 6}})).await;
    assert_eq!(status, 200, "{v}");
    assert!(!v["response"].as_str().unwrap().is_empty());
    assert_eq!(v["done_reason"], "length");
    // Real durations, as Ollama gives them: clients show eval_count / eval_duration.
    let ns = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}: {v}"));
    assert!(ns("eval_duration") > 0, "{v}");
    assert!(ns("prompt_eval_duration") > 0, "{v}");
    assert!(ns("prompt_eval_duration") < ns("total_duration"), "{v}");
    assert!(
        ns("prompt_eval_duration") + ns("eval_duration") <= ns("total_duration"),
        "{v}"
    );

    let v = r.get_json("/api/tags").await;
    assert_eq!(v["models"][0]["name"], MODEL);
    let (status, v) = r
        .post(
            "/api/chat",
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 404);
    assert!(v["error"].is_string());
}

#[tokio::test]
async fn tgi_endpoints_as_tgi_clients_use_them() {
    let r = router(&[shared()], |_| {}).await;
    let body = json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "details": true}});
    let (status, v) = r.post("/generate", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let text = v["generated_text"].as_str().unwrap().to_string();
    assert_eq!(v["details"]["generated_tokens"], 6);
    assert_eq!(v["details"]["tokens"].as_array().unwrap().len(), 6);

    let (status, raw) = r.post_stream("/generate_stream", body.clone()).await;
    assert_eq!(status, 200);
    let events = sse_events(&raw);
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"].as_str().unwrap(), text);
    assert_eq!(last["details"]["finish_reason"], "length");
    let streamed: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert!(
        events[..events.len() - 1]
            .iter()
            .all(|e| e["generated_text"].is_null())
    );

    let (status, v) = r.post("/", body).await;
    assert_eq!(status, 200);
    assert_eq!(v[0]["generated_text"].as_str().unwrap(), text);

    let (status, v) = r
        .post(
            "/generate",
            json!({"inputs": "x", "parameters": {"max_new_tokens": 0}}),
        )
        .await;
    assert_eq!(status, 422);
    assert_eq!(v["error_type"], "validation");
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health() {
    let r = router(&[shared()], |c| c.api_keys = vec!["secret".into()]).await;
    let (status, v) = r.post("/v1/chat/completions", chat_body("hi", 2)).await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["type"], "authentication_error");
    let wrong = r
        .http
        .post(r.url("/v1/chat/completions"))
        .bearer_auth("guess")
        .json(&chat_body("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = r
        .http
        .post(r.url("/v1/chat/completions"))
        .bearer_auth("secret")
        .json(&chat_body("hi", 2))
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            r.http.get(r.url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }

    // gRPC checks the same keys, in the `authorization` metadata; health stays open.
    use shardserve_proto::v1::inference_client::InferenceClient;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", r.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = |key: Option<&str>| {
        let mut request = tonic::Request::new(pb::ModelInfoRequest::default());
        if let Some(key) = key {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        request
    };
    let mut client = InferenceClient::new(channel.clone());
    for (key, message) in [
        (None, "missing API key"),
        (Some("guess"), "invalid API key"),
    ] {
        let err = client.model_info(request(key)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(err.message().starts_with(message), "{err:?}");
    }
    let info = client.model_info(request(Some("secret"))).await.unwrap();
    assert_eq!(info.into_inner().served_model_name, MODEL);
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await;
    assert!(health.is_ok(), "{health:?}");
}

#[tokio::test]
async fn grpc_generate_is_proxied() {
    use shardserve_proto::v1::generate_response::Event;
    use shardserve_proto::v1::inference_client::InferenceClient;
    let r = router(&[shared()], |_| {}).await;
    let mut client = InferenceClient::connect(format!("http://{}", r.grpc))
        .await
        .unwrap();
    let request = |model: &str| pb::GenerateRequest {
        model: model.into(),
        prompt: Some(pb::generate_request::Prompt::Text("Hello".into())),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: 5,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request(MODEL)).await.unwrap().into_inner();
    let (mut text, mut finished) = (String::new(), None);
    while let Some(msg) = stream.message().await.unwrap() {
        match msg.event.unwrap() {
            Event::Token(t) => text.push_str(&t.text_delta),
            Event::Finished(f) => finished = Some(f),
        }
    }
    let finished = finished.expect("a Finished message");
    assert_eq!(text + &finished.text_delta, finished.text);
    assert_eq!(finished.usage.unwrap().completion_tokens, 5);
    // The only deployment is the default.
    assert!(client.generate(request("")).await.is_ok());
    let err = client.generate(request("nope")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let info = client
        .model_info(pb::ModelInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.served_model_name, MODEL);

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", r.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn a_held_request_is_counted_as_load_and_sent_when_a_backend_comes() {
    let w = shared();
    let scaled_to_zero = Deployment {
        model: MODEL.into(),
        backends: Vec::new(),
        adapters: Vec::new(),
    };
    let r = router_over(vec![scaled_to_zero], |_| {}).await;
    r.wait_ready().await;
    let request = tokio::spawn({
        let client = r.http.clone();
        let url = r.url("/v1/chat/completions");
        async move {
            let resp = client
                .post(url)
                .json(&chat_body("hi", 2))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.json::<Value>().await.unwrap())
        }
    });
    let model = format!("model=\"{MODEL}\"");
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let text = r.metrics().await;
        let held = metric(&text, "shardserve_router_model_held_requests", &[&model]);
        if held == Some(1.0) {
            let in_flight = metric(
                &text,
                "shardserve_router_model_in_flight_requests",
                &[&model],
            );
            assert_eq!(in_flight, Some(1.0), "a held request is load:\n{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request was never held:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.discovery.replace(vec![Deployment {
        model: MODEL.into(),
        backends: vec![Backend {
            id: "w0".into(),
            grpc_uri: w.uri(),
        }],
        adapters: Vec::new(),
    }]);
    let (status, v) = tokio::time::timeout(HANG_GUARD, request)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{v}");
    let text = r.metrics().await;
    for name in [
        "shardserve_router_model_held_requests",
        "shardserve_router_model_in_flight_requests",
    ] {
        assert_eq!(metric(&text, name, &[&model]), Some(0.0), "{name}:\n{text}");
    }
}

#[tokio::test]
async fn requests_past_the_hold_limit_are_503_at_once() {
    let starting = Deployment {
        model: "starting".into(),
        backends: Vec::new(),
        adapters: Vec::new(),
    };
    let r = router_over(vec![starting], |c| {
        c.max_held_per_model = 1;
        c.hold_timeout = Duration::from_secs(60);
    })
    .await;
    r.wait_ready().await;
    let body = json!({"model": "starting", "messages": [{"role": "user", "content": "hi"}]});
    let first = tokio::spawn({
        let client = r.http.clone();
        let (url, body) = (r.url("/v1/chat/completions"), body.clone());
        async move { client.post(url).json(&body).send().await }
    });
    let deadline = Instant::now() + HANG_GUARD;
    while metric(
        &r.metrics().await,
        "shardserve_router_model_held_requests",
        &["model=\"starting\""],
    ) != Some(1.0)
    {
        assert!(
            Instant::now() < deadline,
            "the first request was never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = r.post("/v1/chat/completions", body).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("1 requests already wait"),
        "{v}"
    );
    first.abort();
}

/// One raw HTTP/1.1 exchange: `request` sent as given, then what comes back until
/// the server closes or `within` passes (`None`: nothing within it).
async fn raw_http(base: &str, request: &[u8], within: Duration) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    match tokio::time::timeout(within, stream.read_to_end(&mut answer)).await {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        Err(_) => None,
    }
}

#[tokio::test]
async fn request_limits_answer_in_each_apis_shape() {
    use shardserve_router::RequestLimits;
    let r = router(&[shared()], |c| {
        c.limits = RequestLimits {
            max_body_bytes: 2000,
            body_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(1),
            max_prompt_tokens: Some(40),
            max_tokens: Some(6),
            ..RequestLimits::default()
        }
    })
    .await;
    // Bodies past the limit: 413, in the shape of the API asked.
    let big = "x".repeat(3000);
    let (status, v) = r.post("/v1/chat/completions", chat_body(&big, 2)).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (413, Some("request_too_large")),
        "{v}"
    );
    let ollama = json!({"model": MODEL, "messages": [{"role": "user", "content": big}]});
    let (status, v) = r.post("/api/chat", ollama).await;
    assert_eq!(status, 413);
    assert!(
        v["error"].as_str().unwrap().contains("limit of 2000 bytes"),
        "{v}"
    );
    let (status, v) = r.post("/generate", json!({"inputs": big})).await;
    assert_eq!(
        (status, v["error_type"].as_str()),
        (413, Some("validation")),
        "{v}"
    );

    // Tokens to generate: more than the limit is refused, none asked is the limit.
    let (status, v) = r.post("/v1/chat/completions", chat_body("Hi", 7)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["error"]["message"],
        "max_tokens=7 is more than this server's limit of 6 tokens"
    );
    let open_ended = json!({"model": MODEL, "prompt": "Once upon a time", "ignore_eos": true});
    let (status, v) = r.post("/v1/completions", open_ended).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 6);

    // Prompt tokens: the worker counts them.
    let long = "the cat sat on the mat ".repeat(20);
    let (status, v) = r
        .post(
            "/v1/completions",
            json!({"model": MODEL, "prompt": long, "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("this server accepts at most 40"),
        "{message}"
    );

    // A body that does not come: 408 once the body timeout passes.
    let slow = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n{\"model\"";
    let answer = raw_http(&r.base, slow.as_bytes(), Duration::from_secs(10)).await;
    let answer = answer.expect("an answer within 10 s");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("did not arrive within 1 s"), "{answer}");
    // Headers that do not end: the connection is closed.
    let started = Instant::now();
    let answer = raw_http(
        &r.base,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(answer.is_some(), "the connection stayed open past 10 s");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_key_runs_its_limit_of_requests_and_requests_end_at_their_deadline() {
    use shardserve_router::RequestLimits;
    let r = router(&[shared()], |c| {
        c.api_keys = vec!["k".into()];
        c.limits = RequestLimits {
            max_streams_per_key: Some(1),
            request_timeout: Some(Duration::from_secs(2)),
            ..RequestLimits::default()
        }
    })
    .await;
    let long = json!({"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let stream = r
        .http
        .post(r.url("/v1/completions"))
        .bearer_auth("k")
        .json(&long)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    // The key's one request runs: a second is 429, in the shape of its API.
    let ollama_generate = || async {
        r.http
            .post(r.url("/api/generate"))
            .bearer_auth("k")
            .json(&json!({"model": MODEL, "prompt": "Hi", "stream": false}))
            .send()
            .await
            .unwrap()
    };
    let second = ollama_generate().await;
    assert_eq!(second.status(), 429);
    let v: Value = second.json().await.unwrap();
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("already has 1 requests running"),
        "{v}"
    );
    // gRPC counts against the same key: RESOURCE_EXHAUSTED while the HTTP stream runs.
    use shardserve_proto::v1::inference_client::InferenceClient;
    let mut grpc = InferenceClient::connect(format!("http://{}", r.grpc))
        .await
        .unwrap();
    let grpc_request = |max_tokens: u32| {
        let mut request = tonic::Request::new(pb::GenerateRequest {
            model: MODEL.into(),
            prompt: Some(pb::generate_request::Prompt::Text("Hi".into())),
            stopping: Some(pb::StoppingCriteria {
                max_tokens,
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer k".parse().unwrap());
        request
    };
    let refused = grpc.generate(grpc_request(2)).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(refused.message().contains("already has 1 requests running"));
    // The stream ends at the deadline with an error event, not silently.
    let started = Instant::now();
    let text = tokio::time::timeout(HANG_GUARD, stream.text())
        .await
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let last_event = text.lines().rfind(|l| l.starts_with("data: {")).unwrap();
    assert!(last_event.contains("deadline_exceeded"), "{last_event}");
    // Its slot came back with the end of its body; not streamed, the deadline is a 504.
    let whole = r
        .http
        .post(r.url("/v1/completions"))
        .bearer_auth("k")
        .json(&json!({"model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 504);
    let v: Value = whole.json().await.unwrap();
    assert_eq!(v["error"]["code"], "deadline_exceeded", "{v}");
    // Every slot is back: a gRPC stream runs, and holds the key's slot until it ends
    // (here: until its client goes away).
    let mut stream = grpc
        .generate(grpc_request(4000))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().expect("a first token");
    let busy = ollama_generate().await;
    assert_eq!(busy.status(), 429, "the gRPC stream holds the key's slot");
    drop(stream);
    let mut back = false;
    for _ in 0..50 {
        if grpc.generate(grpc_request(2)).await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the slot came back when the gRPC stream ended");
}

#[path = "router/adapters.rs"]
mod adapters;
