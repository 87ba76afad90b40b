//! LoRA adapters through the CLI: `shardserve generate --lora` and `shardserve
//! bench --lora` on the demo model with a PEFT adapter the test writes (f16
//! weights, rank 8 on q_proj and v_proj, as fine-tunes usually ship); and a
//! manifest's `spec.loraAdapters` served by `shardserve up` to the official
//! `openai` client.

use shardserve_e2e::lora::{KV_WIDTH, write_peft};
use std::process::Command;

use shardserve_e2e::{Process, demo_model, e2e_python, free_port, repo_root, run, run_json};

fn greedy(extra: &[&str]) -> Vec<u64> {
    let model = demo_model();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "Name three colours.",
        "--max-tokens",
        "12",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = run_json(&args);
    out["token_ids"]
        .as_array()
        .expect("token_ids")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn an_adapter_changes_the_answer_and_a_broken_one_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    let other = dir.path().join("other");
    let broken = dir.path().join("broken");
    write_peft(&good, 1, KV_WIDTH);
    write_peft(&other, 2, KV_WIDTH);
    write_peft(&broken, 3, KV_WIDTH + 1);

    let base = greedy(&[]);
    let tuned = greedy(&["--lora", good.to_str().unwrap()]);
    let tuned_other = greedy(&["--lora", other.to_str().unwrap()]);
    assert_eq!(base.len(), 12);
    assert_ne!(tuned, base, "the adapter changed nothing");
    assert_ne!(tuned_other, tuned, "two adapters gave one answer");
    // Deterministic: the same adapter gives the same answer again.
    assert_eq!(greedy(&["--lora", good.to_str().unwrap()]), tuned);

    let model = demo_model();
    let out = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Hi",
        "--lora",
        broken.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a broken adapter was accepted");
    assert!(
        err.contains("broken") && err.contains("v_proj"),
        "the refusal names neither the file nor the tensor: {err}"
    );
}

#[test]
fn bench_runs_its_rows_on_adapters() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    write_peft(&a, 4, KV_WIDTH);
    write_peft(&b, 5, KV_WIDTH);
    let model = demo_model();
    let report = run_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--batch",
        "4",
        "--repetitions",
        "1",
        "--lora",
        a.to_str().unwrap(),
        "--lora",
        b.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(report["lora"].as_array().map(Vec::len), Some(2), "{report}");
    let row = &report["results"][0];
    assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn up_serves_a_manifests_adapters_by_name_to_openai_clients() {
    let python = e2e_python();
    let dir = tempfile::tempdir().unwrap();
    let (sql, poetry, broken) = (
        dir.path().join("sql"),
        dir.path().join("poetry"),
        dir.path().join("broken"),
    );
    write_peft(&sql, 21, KV_WIDTH);
    write_peft(&poetry, 22, KV_WIDTH);
    write_peft(&broken, 23, KV_WIDTH + 1);
    let manifest = dir.path().join("lora.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: smollm2\n\
             spec:\n  model:\n    source: file://{}\n  engine:\n    maxSeqLen: 512\n    maxLoras: 2\n\
             \x20 loraAdapters:\n    - name: sql\n      source: file://{}\n    - name: poetry\n      source: file://{}\n",
            demo_model().display(),
            sql.display(),
            poetry.display()
        ),
    )
    .unwrap();
    let (http, grpc) = (free_port(), free_port());
    let mut up = Process::start(&[
        "up".to_string(),
        manifest.display().to_string(),
        "--http-addr".into(),
        format!("127.0.0.1:{http}"),
        "--grpc-addr".into(),
        format!("127.0.0.1:{grpc}"),
    ]);
    up.wait_ready();
    let out = Command::new(&python)
        .arg(repo_root().join("e2e/python/lora_client.py"))
        .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{http}/v1"))
        .env("SHARDSERVE_MODEL", "smollm2")
        .env("SHARDSERVE_ADAPTERS", "sql,poetry")
        .env("SHARDSERVE_BROKEN_ADAPTER", &broken)
        .env("SHARDSERVE_RELOAD", &sql)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "LoRA client checks failed:\n{}{}\nup's log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        up.stderr()
    );
}

#[test]
fn up_refuses_a_manifests_broken_adapter_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    write_peft(&broken, 24, KV_WIDTH + 1);
    let manifest = dir.path().join("lora.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: shardserve.io/v1alpha1\nkind: ModelDeployment\nmetadata:\n  name: smollm2\n\
             spec:\n  model:\n    source: file://{}\n  engine:\n    maxSeqLen: 256\n\
             \x20 loraAdapters:\n    - name: broken\n      source: file://{}\n",
            demo_model().display(),
            broken.display()
        ),
    )
    .unwrap();
    let port = free_port().to_string();
    let mut up = Process::start(&[
        "up",
        manifest.to_str().unwrap(),
        "--no-router",
        "--http-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let status = up.wait_exit(std::time::Duration::from_secs(300));
    let err = up.stderr();
    assert!(!status.success(), "up served a broken adapter:\n{err}");
    assert!(
        err.contains("spec.loraAdapters broken") && err.contains("v_proj"),
        "{err}"
    );
}

/// The operator's way on a cluster, against a real worker: each reconcile
/// brings a serving group's adapters to `spec.loraAdapters` through its API,
/// unloads names the spec dropped, and leaves adapters loaded at run time alone.
#[test]
fn the_operator_brings_a_serving_groups_adapters_to_the_spec() {
    use shardserve_operator::controller::adapters::sync_groups;
    use shardserve_operator::controller::labels::GroupId;
    use shardserve_operator::controller::observe::{GroupObserved, Observed, PodObserved};
    use shardserve_operator::crd::LoraAdapter;
    use shardserve_operator::{ModelDeployment, ModelDeploymentSpec, ModelDeploymentStatus};
    use shardserve_proto::v1 as pb;
    use shardserve_proto::v1::adapters_client::AdaptersClient;
    use shardserve_proto::v1::inference_client::InferenceClient;

    let dir = tempfile::tempdir().unwrap();
    for (name, seed, rows) in [
        ("sql", 31, KV_WIDTH),
        ("poetry", 32, KV_WIDTH),
        ("runtime", 33, KV_WIDTH),
        ("broken", 34, KV_WIDTH + 1),
    ] {
        write_peft(&dir.path().join(name), seed, rows);
    }
    let adapter = |name: &str| LoraAdapter {
        name: name.into(),
        source: format!("file://{}", dir.path().join(name).display()),
    };
    let port = free_port();
    let model = demo_model();
    let _worker = Process::start(&[
        "worker",
        "--model",
        model.to_str().unwrap(),
        "--max-seq-len",
        "256",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ]);
    let uri = format!("http://127.0.0.1:{port}");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let start = std::time::Instant::now();
        // Until the model is loaded the port answers health and progress only.
        let mut client = loop {
            if let Ok(mut client) = InferenceClient::connect(uri.clone()).await
                && client
                    .model_info(pb::ModelInfoRequest::default())
                    .await
                    .is_ok()
            {
                break client;
            }
            assert!(
                start.elapsed() < std::time::Duration::from_secs(120),
                "worker never listened"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        let served = async |client: &mut InferenceClient<tonic::transport::Channel>| {
            let info = client
                .model_info(pb::ModelInfoRequest::default())
                .await
                .unwrap();
            let mut names: Vec<String> = info
                .into_inner()
                .adapters
                .into_iter()
                .map(|a| a.name)
                .collect();
            names.sort();
            names
        };
        // One serving group whose leader is this worker.
        let observed = || Observed {
            groups: [(
                GroupId(0),
                GroupObserved {
                    pods: vec![PodObserved {
                        index: Some(0),
                        running: true,
                        ready: true,
                        ip: Some("127.0.0.1".into()),
                        ..PodObserved::default()
                    }],
                    ..GroupObserved::default()
                },
            )]
            .into(),
        };
        let deployment = |adapters: Vec<LoraAdapter>, applied: &[&str]| {
            let mut md =
                ModelDeployment::new("m", ModelDeploymentSpec::from_source("pip://p==1/m.gguf"));
            md.spec.lora_adapters = adapters;
            md.status = Some(ModelDeploymentStatus {
                lora_adapters: applied.iter().map(|s| s.to_string()).collect(),
                ..ModelDeploymentStatus::default()
            });
            md
        };
        let name = |id: GroupId| format!("m-g{}", id.0);

        let md = deployment(vec![adapter("sql"), adapter("poetry")], &[]);
        let mut seen = observed();
        let failures = sync_groups(&md, &mut seen, 1, port, name).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(
            seen.groups[&GroupId(0)].adapters,
            Some(vec!["sql".into(), "poetry".into()])
        );
        assert_eq!(served(&mut client).await, ["poetry", "sql"]);

        // Someone loads one through the router; then the spec drops poetry.
        AdaptersClient::connect(uri.clone())
            .await
            .unwrap()
            .load_adapter(pb::LoadAdapterRequest {
                name: "runtime".into(),
                path: dir.path().join("runtime").display().to_string(),
                model: String::new(),
            })
            .await
            .unwrap();
        let md = deployment(vec![adapter("sql")], &["sql", "poetry"]);
        let failures = sync_groups(&md, &mut observed(), 1, port, name).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(served(&mut client).await, ["runtime", "sql"]);

        // A broken adapter is reported, naming it and the tensor; the rest stays.
        let md = deployment(vec![adapter("sql"), adapter("broken")], &["sql"]);
        let failures = sync_groups(&md, &mut observed(), 1, port, name).await;
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert_eq!(
            (failures[0].group.as_str(), failures[0].adapter.as_str()),
            ("m-g0", "broken")
        );
        assert!(failures[0].message.contains("v_proj"), "{failures:?}");
        assert_eq!(served(&mut client).await, ["runtime", "sql"]);
    });
}
