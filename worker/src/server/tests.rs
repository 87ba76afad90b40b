//! The worker's gRPC API over a real socket, with the demo model.
//!
//! One engine per configuration is loaded once per test binary and served on
//! 127.0.0.1:0 from its own thread and runtime (each `#[tokio::test]` has a
//! runtime of its own that ends with the test). Tests reach it with the
//! generated client, as the router does.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use shardserve_proto::v1 as pb;
use shardserve_proto::v1::ProgressRequest;
use shardserve_proto::v1::generate_response::Event;
use shardserve_proto::v1::inference_client::InferenceClient;
use shardserve_proto::v1::progress_client::ProgressClient;
use shardserve_proto::v1::progress_response::Stage as WireStage;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{ProgressService, serve_on};
use crate::engine::{Engine, EngineHandle, EngineOptions};
use crate::progress::{PodProgress, Progress, Stage, Tally};
use shardserve_e2e::demo_model;

/// Guards against a hung call; generous, since it is no speed check.
const HANG_GUARD: Duration = Duration::from_secs(300);

struct Fixture {
    addr: SocketAddr,
    engine: EngineHandle,
}

/// Loads the demo model and serves it from a thread of its own, forever.
fn start(options: EngineOptions) -> Fixture {
    // The machine is small and tests run side by side.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    let path = demo_model();
    let engine = Engine::load(&path, &options)
        .unwrap_or_else(|e| panic!("cannot load the demo model {}: {e}", path.display()));
    let engine = EngineHandle::spawn(engine).expect("engine thread starts");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    let addr = listener.local_addr().expect("local address");
    let served = engine.clone();
    std::thread::Builder::new()
        .name("grpc-test-server".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                serve_on(served, listener, std::future::pending())
                    .await
                    .expect("server runs");
            });
        })
        .expect("server thread starts");
    Fixture { addr, engine }
}

/// The demo model with its full context.
fn demo() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| start(EngineOptions::default()))
}

/// The demo model limited to 64 tokens of context.
fn small_context() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        start(EngineOptions {
            max_seq_len: Some(64),
            ..EngineOptions::default()
        })
    })
}

async fn connect(addr: SocketAddr) -> InferenceClient<Channel> {
    InferenceClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// tonic-health builds its client without transport; connect a channel here.
async fn health_client(addr: SocketAddr) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    HealthClient::new(channel)
}

fn text_request(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Text(text.into())),
        stopping: Some(pb::StoppingCriteria {
            max_tokens,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Runs a Generate call to its end: the tokens, then the one Finished message
/// that must close the stream.
async fn generate(
    client: &mut InferenceClient<Channel>,
    req: pb::GenerateRequest,
) -> (Vec<pb::Token>, pb::Finished) {
    let call = async {
        let mut stream = client
            .generate(req)
            .await
            .expect("Generate accepted")
            .into_inner();
        let mut tokens = Vec::new();
        let mut finished = None;
        while let Some(msg) = stream.next().await {
            let event = msg.expect("stream message").event.expect("event set");
            assert!(
                finished.is_none(),
                "a message arrived after Finished: {event:?}"
            );
            match event {
                Event::Token(t) => tokens.push(t),
                Event::Finished(f) => finished = Some(f),
            }
        }
        (tokens, finished.expect("the stream ends with Finished"))
    };
    tokio::time::timeout(HANG_GUARD, call)
        .await
        .expect("Generate finishes")
}

fn has_hangul(text: &str) -> bool {
    text.chars()
        .any(|c| matches!(c, '\u{AC00}'..='\u{D7A3}' | '\u{1100}'..='\u{11FF}' | '\u{3130}'..='\u{318F}'))
}

#[tokio::test]
async fn korean_answer_streams_whole_utf8() {
    let mut client = connect(demo().addr).await;
    let req = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
            messages: vec![pb::ChatMessage {
                role: "user".into(),
                content: "한국의 수도는 어디인가요? 한국어로 대답해 주세요.".into(),
            }],
        })),
        sampling: Some(pb::SamplingParams::default()),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: 48,
            ..Default::default()
        }),
        ..Default::default()
    };
    let (tokens, finished) = generate(&mut client, req).await;

    let streamed: String = tokens.iter().map(|t| t.text_delta.as_str()).collect();
    assert_eq!(
        streamed + &finished.text_delta,
        finished.text,
        "deltas plus the final text_delta must equal the text"
    );
    // Streamed deltas hold whole characters only. The tail may end in U+FFFD
    // when max_tokens cuts a character in half (the engine flushes the
    // partial bytes lossily), so only the deltas are checked.
    for t in &tokens {
        assert!(
            !t.text_delta.contains('\u{FFFD}'),
            "token {} streamed a broken character: {:?} (text {:?})",
            t.id,
            t.text_delta,
            finished.text
        );
    }
    assert!(
        has_hangul(&finished.text),
        "expected a Korean answer, got {:?}",
        finished.text
    );
    // Hangul syllables are three UTF-8 bytes, often split across tokens: the
    // token that starts one must wait for the one that ends it.
    assert!(
        tokens.iter().any(|t| t.text_delta.is_empty()),
        "no token ended inside a character, so the test checked nothing; text {:?}",
        finished.text
    );

    let usage = finished.usage.expect("usage set");
    assert_eq!(usage.completion_tokens as usize, tokens.len());
    assert_eq!(
        usage.prompt_tokens as usize,
        finished.prompt_token_ids.len()
    );
    assert!(tokens.len() <= 48);
    let reason = pb::FinishReason::try_from(finished.reason).expect("known reason");
    assert!(
        matches!(reason, pb::FinishReason::Stop | pb::FinishReason::Length),
        "{reason:?}"
    );
    if reason == pb::FinishReason::Length {
        assert_eq!(tokens.len(), 48);
    }
}

#[tokio::test]
async fn tokenize_matches_the_engine() {
    let fixture = demo();
    let mut client = connect(fixture.addr).await;
    let text = "<|im_start|>user\nHello, 세계! 👋<|im_end|>";
    let tokenizer = fixture.engine.tokenizer();
    for (add_special_tokens, parse_special) in
        [(false, false), (false, true), (true, false), (true, true)]
    {
        let ids = client
            .tokenize(pb::TokenizeRequest {
                text: text.into(),
                add_special_tokens,
                parse_special,
                ..Default::default()
            })
            .await
            .expect("Tokenize")
            .into_inner()
            .ids;
        let want = tokenizer
            .encode(text, add_special_tokens, parse_special)
            .expect("encode");
        assert_eq!(
            ids, want,
            "add_special_tokens={add_special_tokens} parse_special={parse_special}"
        );
    }
    let plain = tokenizer.encode(text, false, false).unwrap();
    let special = tokenizer.encode(text, false, true).unwrap();
    assert_ne!(
        plain, special,
        "parse_special must change how <|im_start|> is read"
    );

    // A text prompt is tokenized the same way (BOS where the model asks, specials parsed).
    let (_, finished) = generate(&mut client, text_request(text, 1)).await;
    assert_eq!(
        finished.prompt_token_ids,
        tokenizer.encode(text, true, true).unwrap()
    );
}

#[tokio::test]
async fn model_info_describes_the_demo_model() {
    let fixture = demo();
    let mut client = connect(fixture.addr).await;
    let info = client
        .model_info(pb::ModelInfoRequest::default())
        .await
        .expect("ModelInfo")
        .into_inner();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.num_layers, 30);
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.hidden_size, 576);
    assert_eq!(info.tensor_parallel_size, 1);
    assert_eq!(info.served_model_name, "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(
        info.max_sequence_length as usize,
        fixture.engine.info().max_seq_len
    );
    assert!(
        info.weight_format.starts_with("gguf"),
        "{}",
        info.weight_format
    );
    assert!(info.has_chat_template);
    assert!(!info.eos_token_ids.is_empty());
    assert_eq!(info.eos_token_ids, fixture.engine.info().eos_token_ids);

    let small = connect(small_context().addr)
        .await
        .model_info(pb::ModelInfoRequest::default())
        .await
        .expect("ModelInfo")
        .into_inner();
    assert_eq!(small.max_sequence_length, 64);
}

#[tokio::test]
async fn invalid_requests_fail_the_call_with_invalid_argument() {
    let fixture = small_context();
    let mut client = connect(fixture.addr).await;

    let long = "The quick brown fox jumps over the lazy dog. ".repeat(20);
    let prompt_tokens = fixture
        .engine
        .tokenizer()
        .encode(&long, true, true)
        .unwrap()
        .len();
    assert!(prompt_tokens > 64);
    let status = client
        .generate(text_request(&long, 8))
        .await
        .expect_err("prompt too long");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&prompt_tokens.to_string()) && status.message().contains("64"),
        "message should give both token counts: {}",
        status.message()
    );

    let mut bad_top_p = text_request("Hello", 4);
    bad_top_p.sampling = Some(pb::SamplingParams {
        top_p: 1.5,
        ..Default::default()
    });
    let status = client
        .generate(bad_top_p)
        .await
        .expect_err("top_p out of range");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("top_p"), "{}", status.message());

    let bad_id = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: vec![1, 999_999],
        })),
        ..Default::default()
    };
    let status = client
        .generate(bad_id)
        .await
        .expect_err("id outside the vocabulary");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("999999"), "{}", status.message());

    let status = client
        .generate(pb::GenerateRequest::default())
        .await
        .expect_err("no prompt");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The engine is still fine afterwards.
    let (tokens, finished) = generate(&mut client, text_request("Hello", 2)).await;
    assert_eq!(tokens.len(), 2);
    assert_eq!(finished.reason, pb::FinishReason::Length as i32);
}

#[tokio::test]
async fn context_limit_ends_generation_with_reason_context() {
    let fixture = small_context();
    let mut client = connect(fixture.addr).await;
    let mut req = text_request("Once upon a time", 0);
    req.stopping.as_mut().unwrap().ignore_eos = true;
    let (tokens, finished) = generate(&mut client, req).await;
    assert_eq!(finished.reason, pb::FinishReason::Context as i32);
    assert_eq!(finished.prompt_token_ids.len() + tokens.len(), 64);
}

#[tokio::test]
async fn logprobs_are_reported_for_tokens_and_prompt() {
    let mut client = connect(demo().addr).await;
    let req = pb::GenerateRequest {
        logprobs: true,
        top_logprobs: 3,
        prompt_logprobs: Some(2),
        ..text_request("The capital of France is", 4)
    };
    let (tokens, finished) = generate(&mut client, req).await;
    assert_eq!(tokens.len(), 4);
    for t in &tokens {
        let entry = t.logprob.as_ref().expect("logprob asked for");
        let chosen = entry.token.as_ref().expect("chosen token");
        assert_eq!(chosen.id, t.id);
        assert!(chosen.logprob <= 0.0);
        assert_eq!(entry.top.len(), 3);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(entry.top[0].id, t.id);
        assert!(entry.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
    }
    assert_eq!(
        finished.prompt_logprobs.len(),
        finished.prompt_token_ids.len() - 1
    );
    for (entry, &id) in finished
        .prompt_logprobs
        .iter()
        .zip(&finished.prompt_token_ids[1..])
    {
        assert_eq!(entry.token.as_ref().unwrap().id, id);
        assert_eq!(entry.top.len(), 2);
    }
}

#[tokio::test]
async fn stop_string_ends_generation_and_is_left_out() {
    let mut client = connect(demo().addr).await;
    // Greedy counting goes on with " 5, 6, 7,"; stopping at " 6" holds back
    // " " and "6" until the match is certain.
    let mut req = text_request("1, 2, 3, 4,", 16);
    req.stopping.as_mut().unwrap().stop = vec![" 6".into()];
    let (tokens, finished) = generate(&mut client, req).await;
    let streamed: String = tokens.iter().map(|t| t.text_delta.as_str()).collect();
    assert_eq!(streamed.clone() + &finished.text_delta, finished.text);
    assert_eq!(finished.matched_stop, " 6", "text {:?}", finished.text);
    assert_eq!(finished.reason, pb::FinishReason::Stop as i32);
    assert!(!finished.text.contains('6'), "{:?}", finished.text);
}

#[tokio::test]
async fn health_reports_serving() {
    let addr = demo().addr;
    let mut health = health_client(addr).await;
    for service in ["", "shardserve.v1.Inference"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("Check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let status = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn shutdown_turns_health_not_serving_and_stops() {
    let engine = demo().engine.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve_on(engine, listener, async {
        let _ = stopped.await;
    }));

    let mut health = health_client(addr).await;
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch")
        .into_inner();
    let first = watch.next().await.expect("a status").expect("ok");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    stop.send(()).unwrap();
    let next = tokio::time::timeout(HANG_GUARD, watch.next())
        .await
        .expect("a status after shutdown")
        .expect("stream open")
        .expect("ok");
    assert_eq!(next.status, ServingStatus::NotServing as i32);

    // The open Watch is the last call; once it goes, the server stops.
    drop(watch);
    drop(health);
    let result = tokio::time::timeout(HANG_GUARD, server)
        .await
        .expect("server stops")
        .expect("server task");
    result.expect("clean stop");
}

#[tokio::test]
async fn cancelled_generation_frees_the_engine() {
    let mut client = connect(demo().addr).await;
    // Without cancellation this would run to the end of an 8k context.
    let mut long = text_request("Write a very long story about a dragon.", 0);
    long.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = client
        .generate(long)
        .await
        .expect("Generate accepted")
        .into_inner();
    let first = stream.next().await.expect("a message").expect("ok");
    assert!(matches!(first.event, Some(Event::Token(_))), "{first:?}");
    drop(stream);

    let mut client = connect(demo().addr).await;
    let (tokens, finished) = generate(&mut client, text_request("Hello", 3)).await;
    assert_eq!(tokens.len(), 3);
    assert_eq!(finished.reason, pb::FinishReason::Length as i32);
}

/// GETs `path` from the worker's metrics server (plain HTTP/1.0, no client crate).
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).await.expect("read");
    let status = reply
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
}

/// Serves `engine` on fresh ports, gRPC and the HTTP metrics beside it, from this
/// test's runtime: (gRPC, HTTP) addresses.
async fn serve_with_http(engine: Engine) -> (SocketAddr, SocketAddr) {
    let engine = EngineHandle::spawn(engine).expect("engine thread starts");
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
    tokio::spawn(super::serve_with_metrics(
        engine,
        grpc,
        Some(http),
        None,
        std::future::pending(),
        super::DRAIN_GRACE,
    ));
    addrs
}

#[tokio::test]
async fn metrics_count_requests_and_running_drops_to_zero_on_disconnect() {
    let path = demo_model();
    let engine = Engine::load(&path, &EngineOptions::default()).expect("demo model loads");
    let (grpc_addr, http_addr) = serve_with_http(engine).await;
    let mut client = connect(grpc_addr).await;
    assert_eq!(http_get(http_addr, "/healthz").await.0, 200);
    assert_eq!(http_get(http_addr, "/readyz").await.0, 200);

    let (tokens, _) = generate(&mut client, text_request("Hello", 3)).await;
    let (_, text) = http_get(http_addr, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "shardserve_worker_requests_total{model=\"SmolLM2-135M-Instruct.Q4_1\",status=\"ok\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "shardserve_worker_generation_tokens_total"),
        tokens.len() as f64
    );
    assert!(metric(&text, "shardserve_worker_prompt_tokens_total") > 0.0);
    assert_eq!(
        metric(&text, "shardserve_worker_time_to_first_token_seconds_count"),
        1.0
    );
    // Steps took time, most of it in the forward pass, and never less than it.
    let step = metric(&text, "shardserve_worker_step_seconds_total");
    let forward = metric(&text, "shardserve_worker_forward_seconds_total");
    assert!(
        forward > 0.0 && step >= forward,
        "step {step} forward {forward}"
    );
    // Every worker series the chart's dashboard queries is served.
    assert!(shardserve_e2e::dashboard_series("shardserve_worker_").len() >= 10);
    let missing = shardserve_e2e::dashboard_series_missing("shardserve_worker_", &text);
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}: {text}"
    );

    let mut long = text_request("Write a very long story about a dragon.", 0);
    long.stopping.as_mut().unwrap().ignore_eos = true;
    let mut stream = client
        .generate(long)
        .await
        .expect("Generate accepted")
        .into_inner();
    stream.next().await.expect("a message").expect("ok");
    let (_, text) = http_get(http_addr, "/metrics").await;
    assert_eq!(
        metric(&text, "shardserve_worker_running_sequences"),
        1.0,
        "{text}"
    );
    drop(stream);
    // The engine notices at its next token: well under a second.
    let start = std::time::Instant::now();
    loop {
        let (_, text) = http_get(http_addr, "/metrics").await;
        if metric(&text, "shardserve_worker_running_sequences") == 0.0 {
            assert_eq!(
                metric(
                    &text,
                    "shardserve_worker_requests_total{model=\"SmolLM2-135M-Instruct.Q4_1\",status=\"cancelled\"}"
                ),
                1.0,
                "{text}"
            );
            assert_eq!(metric(&text, "shardserve_worker_queue_depth"), 0.0);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "running sequences stayed at 1:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_followers_health_follows_its_group_meeting_and_breaking() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (joined, joined_rx) = tokio::sync::watch::channel(false);
    let tally = Arc::new(Tally::default());
    tally.add_total(4096);
    tally.add_done(1024);
    let own = Progress::new(Stage::Loading, tally);
    let progress = ProgressService::new(PodProgress::new(own.clone(), None), 0);
    tokio::spawn(super::serve_health(
        listener,
        joined_rx,
        progress,
        std::future::pending(),
    ));
    let mut client = health_client(addr).await;
    let mut progress_client = ProgressClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let answer = progress_client
        .get(ProgressRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.stage(), WireStage::Loading);
    assert_eq!(
        (answer.done_bytes, answer.total_bytes, answer.processes),
        (1024, 4096, 1)
    );
    own.set_stage(Stage::Loaded);
    let answer = progress_client.get(ProgressRequest {}).await.unwrap();
    assert_eq!(answer.into_inner().stage(), WireStage::Loaded);
    let mut status = async || {
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status()
    };
    // The status is set from a task of its own: poll until it shows.
    async fn until(
        want: ServingStatus,
        status: &mut impl AsyncFnMut() -> ServingStatus,
    ) -> ServingStatus {
        for _ in 0..100 {
            let now = status().await;
            if now == want {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        status().await
    }
    assert_eq!(
        until(ServingStatus::NotServing, &mut status).await,
        ServingStatus::NotServing
    );
    joined.send(true).unwrap();
    assert_eq!(
        until(ServingStatus::Serving, &mut status).await,
        ServingStatus::Serving
    );
    joined.send(false).unwrap();
    assert_eq!(
        until(ServingStatus::NotServing, &mut status).await,
        ServingStatus::NotServing
    );
}

/// The Adapters service and the LoRA metrics: adapters loaded and unloaded over
/// gRPC, bad ones refused with the reason, requests counted per adapter, and
/// vLLM's `vllm:lora_requests_info` telling running from waiting adapters.
#[tokio::test]
async fn adapters_load_over_grpc_and_their_requests_show_in_the_metrics() {
    use crate::lora::Target;
    use crate::lora::testing::TestAdapter;
    use shardserve_proto::v1::adapters_client::AdaptersClient;

    let path = demo_model();
    // One slot: a second adapter waits while the first is in use.
    let options = EngineOptions {
        max_loras: 1,
        ..EngineOptions::default()
    };
    let engine = Engine::load(&path, &options).expect("demo model loads");
    let config = engine.info().config.clone();
    let (grpc_addr, http_addr) = serve_with_http(engine).await;
    let dirs: Vec<tempfile::TempDir> = (0..2)
        .map(|seed| {
            let dir = tempfile::tempdir().unwrap();
            TestAdapter::random(&config, 4, &[Target::Q, Target::V], seed).write_peft(
                dir.path(),
                &config,
                serde_json::json!({}),
            );
            dir
        })
        .collect();
    let mut client = connect(grpc_addr).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc_addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut adapters = AdaptersClient::new(channel);
    let load = |name: &str, path: String| pb::LoadAdapterRequest {
        name: name.into(),
        path,
        model: String::new(),
    };
    let source_a = format!("file://{}", dirs[0].path().display());
    let loaded = adapters
        .load_adapter(load("a", source_a.clone()))
        .await
        .expect("a loads")
        .into_inner()
        .adapter
        .expect("listed");
    assert_eq!(
        (loaded.rank, loaded.source.as_str()),
        (4, source_a.as_str())
    );
    adapters
        .load_adapter(load("b", dirs[1].path().display().to_string()))
        .await
        .expect("b loads");
    let missing = adapters
        .load_adapter(load("c", "/nowhere/adapter".into()))
        .await
        .expect_err("a missing adapter is refused");
    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    assert!(
        missing.message().contains("/nowhere/adapter"),
        "{missing:?}"
    );
    // This worker was given no fetcher: a hub source is refused, saying so.
    let remote = adapters
        .load_adapter(load("d", "hf://org/adapter".into()))
        .await
        .expect_err("no fetcher");
    assert_eq!(remote.code(), Code::InvalidArgument);
    assert!(remote.message().contains("cannot fetch"), "{remote:?}");

    let info = client
        .model_info(pb::ModelInfoRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = info.adapters.iter().map(|a| a.name.as_str()).collect();
    assert_eq!((names, info.max_loras), (vec!["a", "b"], 1));

    // A long request on a holds the only slot; one on b waits for it.
    let on = |adapter: &str| {
        let mut req = text_request("Write a very long story about a dragon.", 0);
        req.stopping.as_mut().unwrap().ignore_eos = true;
        req.adapter = adapter.into();
        req
    };
    let mut long = client.generate(on("a")).await.unwrap().into_inner();
    long.next().await.expect("a message").expect("ok");
    let mut second = connect(grpc_addr).await;
    let waiting = tokio::spawn(async move {
        let mut req = on("b");
        req.stopping.as_mut().unwrap().max_tokens = 2;
        generate(&mut second, req).await
    });
    let start = std::time::Instant::now();
    let text = loop {
        let (_, text) = http_get(http_addr, "/metrics").await;
        if text.contains("waiting_lora_adapters=\"b\"") {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "b never showed as waiting:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains(
            "vllm:lora_requests_info{max_lora=\"1\",running_lora_adapters=\"a\",waiting_lora_adapters=\"b\"}"
        ),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "shardserve_worker_lora_requests_total{adapter=\"a\",model=\"SmolLM2-135M-Instruct.Q4_1\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "shardserve_worker_lora_adapter_resident{adapter=\"b\",model=\"SmolLM2-135M-Instruct.Q4_1\"}"
        ),
        0.0
    );

    // Unloading a lets its running request go on; new ones are refused.
    adapters
        .unload_adapter(pb::UnloadAdapterRequest {
            name: "a".into(),
            model: String::new(),
        })
        .await
        .expect("a unloads");
    long.next().await.expect("the stream goes on").expect("ok");
    let refused = client
        .generate(on("a"))
        .await
        .expect_err("a is no longer served");
    assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    drop(long);
    // Its slot is free once the stream is gone: b runs.
    let (tokens, _) = tokio::time::timeout(HANG_GUARD, waiting)
        .await
        .expect("b finishes")
        .unwrap();
    assert_eq!(tokens.len(), 2);
}
