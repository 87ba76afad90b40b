//! TLS end to end: a worker that requires client certificates (mutual TLS), a router
//! that reaches it with its own certificate and serves HTTPS and gRPC over TLS, the
//! official `openai` client over HTTPS, and a renewed certificate served without a
//! restart. Certificates are made by the test (`shardserve_e2e::pki`).

use std::process::Command;
use std::time::{Duration, Instant};

use shardserve_e2e::pki::{Leaf, TestCa};
use shardserve_e2e::{Process, demo_model, e2e_python, free_port, repo_root};
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::inference_client::InferenceClient;
use shardserve_tls::{CertFiles, Certified, ClientTls};

const MODEL: &str = "smollm2";

fn tls_client(args: &[&str]) -> String {
    let out = Command::new(e2e_python())
        .arg(repo_root().join("e2e/python/tls_client.py"))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "tls_client.py {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn wait_for_log(process: &Process, line: &str) {
    let start = Instant::now();
    while !process.stderr().contains(line) {
        assert!(
            start.elapsed() < shardserve_e2e::STARTUP,
            "no {line:?} in:\n{}",
            process.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

async fn grpc_client(
    port: u16,
    tls: &ClientTls,
) -> Result<InferenceClient<tonic::transport::Channel>, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tls.connector())
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(InferenceClient::new(channel))
}

async fn generate(
    client: &mut InferenceClient<tonic::transport::Channel>,
) -> Result<String, tonic::Status> {
    let request = pb::GenerateRequest {
        model: MODEL.into(),
        prompt: Some(pb::generate_request::Prompt::Text("Hello".into())),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: 4,
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut stream = client.generate(request).await?.into_inner();
    while let Some(message) = stream.message().await? {
        if let Some(pb::generate_response::Event::Finished(finished)) = message.event {
            return Ok(finished.text);
        }
    }
    Err(tonic::Status::unknown("no Finished message"))
}

fn files(leaf: &Leaf) -> CertFiles {
    CertFiles {
        cert: leaf.cert.clone(),
        key: leaf.key.clone(),
    }
}

#[test]
fn router_serves_tls_and_reaches_workers_over_mutual_tls() {
    let model = demo_model();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "ca");
    let worker_cert = ca.leaf("worker", &["shardserve-worker"]);
    let router_client = ca.leaf("router-client", &["shardserve-router"]);
    let router_cert = ca.leaf("router", &["localhost", "127.0.0.1"]);
    let (worker_port, http, grpc) = (free_port(), free_port(), free_port());

    let worker = Process::start(&[
        "worker",
        "--model",
        model.to_str().unwrap(),
        "--served-model-name",
        MODEL,
        "--listen",
        &format!("127.0.0.1:{worker_port}"),
        "--tls-cert",
        worker_cert.cert.to_str().unwrap(),
        "--tls-key",
        worker_cert.key.to_str().unwrap(),
        "--tls-client-ca",
        ca.ca_file.to_str().unwrap(),
    ]);
    wait_for_log(&worker, "model loaded");
    let _router = Process::start(&[
        "router",
        "--http-addr",
        &format!("127.0.0.1:{http}"),
        "--grpc-addr",
        &format!("127.0.0.1:{grpc}"),
        // https://: the router reaches this worker over (mutual) TLS.
        "--backend",
        &format!("{MODEL}=https://127.0.0.1:{worker_port}"),
        "--backend-tls-ca",
        ca.ca_file.to_str().unwrap(),
        "--backend-tls-cert",
        router_client.cert.to_str().unwrap(),
        "--backend-tls-key",
        router_client.key.to_str().unwrap(),
        "--tls-cert",
        router_cert.cert.to_str().unwrap(),
        "--tls-key",
        router_cert.key.to_str().unwrap(),
    ]);
    let url = format!("https://localhost:{http}");
    let ca_file = ca.ca_file.to_str().unwrap();

    // HTTPS with the official client, through the router's mutual TLS to the worker.
    let answer: serde_json::Value =
        serde_json::from_str(&tls_client(&["chat", &url, ca_file, MODEL])).unwrap();
    assert_eq!(answer["finish_reason"], "length", "{answer}");
    assert!(!answer["text"].as_str().unwrap().is_empty(), "{answer}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        // gRPC over TLS at the router.
        let to_router = ClientTls::new(&ca.ca_file, None, "localhost").unwrap();
        let mut client = grpc_client(grpc, &to_router).await.unwrap();
        assert!(!generate(&mut client).await.unwrap().is_empty());

        // The worker serves the router's certificate, and nobody without one.
        let with_cert = Certified::load(files(&router_client)).unwrap();
        let as_router = ClientTls::new(&ca.ca_file, Some(with_cert), "shardserve-worker").unwrap();
        let mut direct = grpc_client(worker_port, &as_router).await.unwrap();
        assert!(!generate(&mut direct).await.unwrap().is_empty());
        let anonymous = ClientTls::new(&ca.ca_file, None, "shardserve-worker").unwrap();
        let refused = match grpc_client(worker_port, &anonymous).await {
            Err(e) => e,
            Ok(mut client) => format!("{:?}", generate(&mut client).await.unwrap_err()),
        };
        assert!(!refused.is_empty());
        // Nor in plain text, where only health is served (kubelet's gRPC probes
        // speak no TLS).
        let plain =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{worker_port}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(5))
                .connect()
                .await
                .expect("a plain connection is accepted");
        let refused = generate(&mut InferenceClient::new(plain.clone()))
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("mutual TLS only"), "{refused:?}");
        let health = tonic_health::pb::health_client::HealthClient::new(plain)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers in plain text");
        assert_eq!(health.into_inner().status, 1, "SERVING");
    });

    // A renewed certificate (same files, as a Secret update writes them) is served
    // from a handshake within the reload interval, without a restart.
    let before = tls_client(&["served", &url, ca_file]);
    let renewed = ca.leaf("router", &["localhost", "127.0.0.1"]);
    assert_eq!(renewed.cert, router_cert.cert);
    let start = Instant::now();
    loop {
        let now = tls_client(&["served", &url, ca_file]);
        if now != before {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the router still serves the old certificate after 30 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("renewed certificate served after {:?}", start.elapsed());
}
