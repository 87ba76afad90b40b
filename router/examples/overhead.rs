//! Router overhead: the time to first token added by the router, and the
//! most streamed tokens per second one router core relays.
//!
//! `cargo run --release -p shardserve-router --example overhead` (or in the dev
//! profile, which optimises dependencies). Part 1 needs the demo model
//! (`make fetch-demo`): it times single-token generations against a worker
//! directly and through the router (gRPC and HTTP SSE). Part 2 puts the
//! router, on a single-threaded runtime, in front of a fake backend that
//! streams tokens as fast as it can, and counts what clients receive.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use serde_json::json;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::inference_client::InferenceClient;
use shardserve_proto::v1::inference_server::{Inference, InferenceServer};
use shardserve_router::{Backend, Deployment, Listeners, RouterConfig, StaticDiscovery, serve_on};
use tonic::{Request, Response, Status};

const SAMPLES: usize = 200;
const FAKE_TOKENS: u32 = 10_000;
const STREAMS: usize = 16;

fn main() {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global();
    match demo_model() {
        Some(path) => ttft_overhead(&path),
        None => println!("part 1 skipped: demo model missing; run `make fetch-demo`"),
    }
    relay_throughput();
}

fn demo_model() -> Option<PathBuf> {
    let dir = std::env::var_os("SHARDSERVE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/shardserve")))?;
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

/// Runs `fut` on a runtime of its own thread (`threads` workers, 0 = current thread).
fn spawn_runtime<F>(threads: usize, fut: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        let rt = if threads == 0 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
        }
        .expect("runtime");
        rt.block_on(fut);
    });
}

/// Starts a router (single-threaded runtime) in front of `backend`; returns
/// its HTTP and gRPC addresses once it is ready.
fn start_router(model: &str, backend: SocketAddr) -> (SocketAddr, SocketAddr) {
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let grpc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    http.set_nonblocking(true).unwrap();
    grpc.set_nonblocking(true).unwrap();
    let addrs = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
    let deployments = vec![Deployment {
        model: model.into(),
        backends: vec![Backend {
            id: "b0".into(),
            grpc_uri: format!("http://{backend}"),
        }],
        adapters: Vec::new(),
    }];
    spawn_runtime(0, async move {
        let listeners = Listeners {
            http: tokio::net::TcpListener::from_std(http).unwrap(),
            grpc: tokio::net::TcpListener::from_std(grpc).unwrap(),
            metrics: None,
        };
        let config = RouterConfig {
            max_queue_per_backend: 1024,
            ..RouterConfig::default()
        };
        let discovery = Arc::new(StaticDiscovery::new(deployments));
        serve_on(config, listeners, discovery, std::future::pending())
            .await
            .expect("router serves");
    });
    let url = format!("http://{}/readyz", addrs.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = client.get(&url).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("router not ready");
    });
    addrs
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (
        percentile(samples, 0.5) * 1e3,
        percentile(samples, 0.99) * 1e3,
    )
}

fn ttft_overhead(path: &std::path::Path) {
    use shardserve_worker::engine::{Engine, EngineHandle, EngineOptions};
    let options = EngineOptions {
        served_model_name: Some("demo".into()),
        ..EngineOptions::default()
    };
    let engine = EngineHandle::spawn(Engine::load(path, &options).expect("load")).expect("spawn");
    let worker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    worker.set_nonblocking(true).unwrap();
    let worker_addr = worker.local_addr().unwrap();
    spawn_runtime(1, async move {
        let l = tokio::net::TcpListener::from_std(worker).unwrap();
        let _ = shardserve_worker::server::serve_on(engine, l, std::future::pending()).await;
    });
    let (http, grpc) = start_router("demo", worker_addr);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let request = || pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text("Hi".into())),
            stopping: Some(pb::StoppingCriteria { max_tokens: 1, ..Default::default() }),
            ..Default::default()
        };
        let mut direct = InferenceClient::connect(format!("http://{worker_addr}")).await.unwrap();
        let mut routed = InferenceClient::connect(format!("http://{grpc}")).await.unwrap();
        let http_client = reqwest::Client::new();
        let url = format!("http://{http}/v1/completions");
        let body = json!({"model": "demo", "prompt": "Hi", "max_tokens": 1, "stream": true});
        let (mut d, mut g, mut h) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..SAMPLES + 10 {
            let t = Instant::now();
            let mut s = direct.generate(request()).await.unwrap().into_inner();
            s.message().await.unwrap();
            let direct_s = t.elapsed().as_secs_f64();
            while s.message().await.unwrap().is_some() {}

            let t = Instant::now();
            let mut s = routed.generate(request()).await.unwrap().into_inner();
            s.message().await.unwrap();
            let routed_s = t.elapsed().as_secs_f64();
            while s.message().await.unwrap().is_some() {}

            let t = Instant::now();
            let resp = http_client.post(&url).json(&body).send().await.unwrap();
            let mut chunks = resp.bytes_stream();
            chunks.next().await.unwrap().unwrap();
            let http_s = t.elapsed().as_secs_f64();
            while chunks.next().await.is_some() {}
            if i >= 10 {
                d.push(direct_s);
                g.push(routed_s);
                h.push(http_s);
            }
        }
        let (d50, d99) = ms(&mut d);
        let (g50, g99) = ms(&mut g);
        let (h50, h99) = ms(&mut h);
        println!("time to first token over {SAMPLES} one-token generations (demo model, 1 compute thread):");
        println!("  worker gRPC directly : p50 {d50:.2} ms  p99 {d99:.2} ms");
        println!("  router gRPC          : p50 {g50:.2} ms  p99 {g99:.2} ms  (added: p50 {:.2} ms, p99 {:.2} ms)", g50 - d50, g99 - d99);
        println!("  router HTTP SSE      : p50 {h50:.2} ms  p99 {h99:.2} ms  (added: p50 {:.2} ms, p99 {:.2} ms)", h50 - d50, h99 - d99);
    });
}

/// A backend that streams `FAKE_TOKENS` tokens as fast as it can.
struct Fake;

type Events = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for Fake {
    type GenerateStream = Events;

    async fn generate(&self, _: Request<pb::GenerateRequest>) -> Result<Response<Events>, Status> {
        use pb::generate_response::Event;
        let tokens = (0..FAKE_TOKENS).map(|i| {
            Ok(pb::GenerateResponse {
                event: Some(Event::Token(pb::Token {
                    id: i,
                    text_delta: " tok".into(),
                    logprob: None,
                })),
            })
        });
        let done = std::iter::once(Ok(pb::GenerateResponse {
            event: Some(Event::Finished(pb::Finished {
                reason: pb::FinishReason::Length as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: 1,
                    completion_tokens: FAKE_TOKENS,
                    cached_prompt_tokens: 0,
                }),
                ..Default::default()
            })),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(
            tokens.chain(done),
        ))))
    }

    async fn tokenize(
        &self,
        _: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        Ok(Response::new(pb::TokenizeResponse::default()))
    }

    async fn model_info(
        &self,
        _: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            served_model_name: "fake".into(),
            max_sequence_length: 1 << 20,
            ..Default::default()
        }))
    }
}

fn relay_throughput() {
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fake.set_nonblocking(true).unwrap();
    let fake_addr = fake.local_addr().unwrap();
    spawn_runtime(1, async move {
        let (health, service) = tonic_health::server::health_reporter();
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let incoming = tonic::transport::server::TcpIncoming::from(
            tokio::net::TcpListener::from_std(fake).unwrap(),
        );
        let _ = tonic::transport::Server::builder()
            .add_service(service)
            .add_service(InferenceServer::new(Fake))
            .serve_with_incoming(incoming)
            .await;
    });
    let (http, grpc) = start_router("fake", fake_addr);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let client = reqwest::Client::new();
        let url = format!("http://{http}/v1/completions");
        let body = json!({"model": "fake", "prompt": "x", "max_tokens": FAKE_TOKENS, "stream": true});
        let t = Instant::now();
        let streams = (0..STREAMS).map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            async move {
                let text = client.post(&url).json(&body).send().await.unwrap().text().await.unwrap();
                text.matches("\"text\":\" tok\"").count()
            }
        });
        let tokens: usize = futures::future::join_all(streams).await.into_iter().sum();
        let secs = t.elapsed().as_secs_f64();
        println!("relay, HTTP SSE (/v1/completions, {STREAMS} streams x {FAKE_TOKENS} tokens, router on one thread): {tokens} tokens in {secs:.2} s = {:.0} tokens/s", tokens as f64 / secs);

        let t = Instant::now();
        let streams = (0..STREAMS).map(|_| async move {
            let mut c = InferenceClient::connect(format!("http://{grpc}")).await.unwrap();
            let mut s = c.generate(pb::GenerateRequest { model: "fake".into(), ..Default::default() }).await.unwrap().into_inner();
            let mut n = 0;
            while let Some(m) = s.message().await.unwrap() {
                n += usize::from(matches!(m.event, Some(pb::generate_response::Event::Token(_))));
            }
            n
        });
        let tokens: usize = futures::future::join_all(streams).await.into_iter().sum();
        let secs = t.elapsed().as_secs_f64();
        println!("relay, gRPC ({STREAMS} streams x {FAKE_TOKENS} tokens, router on one thread): {tokens} tokens in {secs:.2} s = {:.0} tokens/s", tokens as f64 / secs);
    });
}
