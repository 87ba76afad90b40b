//! LoRA adapters at the router: asked for by name in every API, routed to the
//! backends that serve them, loaded and unloaded on every backend at once.

use shardserve_e2e::lora::{KV_WIDTH, write_peft};
use shardserve_proto::v1::adapters_client::AdaptersClient;
use shardserve_proto::v1::inference_client::InferenceClient;

use super::*;

/// Greedy chat answer of `model` (a base or an adapter name) and the name the
/// answer gives.
async fn answer(r: &Router, model: &str) -> (String, String) {
    let mut body = chat_body("Name a colour.", 12);
    body["model"] = json!(model);
    let (status, v) = r.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{model}: {v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    (text.to_string(), v["model"].as_str().unwrap().to_string())
}

/// `/v1/models` as (id, parent) pairs, once `ids` are all listed.
async fn models_once_listed(r: &Router, ids: &[&str]) -> Vec<(String, Value)> {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let v: Value = r.get_json("/v1/models").await;
        let listed: Vec<(String, Value)> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["id"].as_str().unwrap().to_string(), m["parent"].clone()))
            .collect();
        if ids.iter().all(|id| listed.iter().any(|(l, _)| l == id)) {
            return listed;
        }
        assert!(Instant::now() < deadline, "never listed {ids:?}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn served_by(metrics: &str, backend: &str) -> f64 {
    metric(
        metrics,
        "shardserve_router_backend_requests_total",
        &[&format!("backend=\"{backend}\"")],
    )
    .unwrap_or(0.0)
}

#[tokio::test]
async fn adapters_are_routed_by_name_loaded_everywhere_and_unloaded() {
    let (w0, w1) = (Worker::start(None), Worker::start(None));
    let r = router(&[&w0, &w1], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let (only, sql, broken) = (
        dir.path().join("only"),
        dir.path().join("sql"),
        dir.path().join("broken"),
    );
    write_peft(&only, 11, KV_WIDTH);
    write_peft(&sql, 12, KV_WIDTH);
    write_peft(&broken, 13, KV_WIDTH + 1);

    // An adapter one backend has (loaded there directly): its requests go there alone.
    let mut direct = AdaptersClient::connect(w1.uri()).await.unwrap();
    direct
        .load_adapter(pb::LoadAdapterRequest {
            name: "only".into(),
            path: only.display().to_string(),
            model: String::new(),
        })
        .await
        .expect("w1 loads it");
    models_once_listed(&r, &["only"]).await;
    let before = r.metrics().await;
    for _ in 0..4 {
        answer(&r, "only").await;
    }
    let after = r.metrics().await;
    assert_eq!(served_by(&after, "w1") - served_by(&before, "w1"), 4.0);
    assert_eq!(served_by(&after, "w0"), served_by(&before, "w0"));

    // Loaded through the router: on both backends, listed with its base as parent.
    let (status, v) = r
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "sql", "lora_path": sql.display().to_string()}),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let listed = models_once_listed(&r, &[MODEL, "only", "sql"]).await;
    assert_eq!(listed.len(), 3, "{listed:?}");
    for (id, parent) in &listed {
        let want = if id == MODEL {
            Value::Null
        } else {
            json!(MODEL)
        };
        assert_eq!(parent, &want, "{id}");
    }
    let (base, named) = answer(&r, MODEL).await;
    assert_eq!(named, MODEL);
    let (tuned, named) = answer(&r, "sql").await;
    assert_eq!(named, "sql", "the answer names what was asked for");
    assert_ne!(base, tuned, "the adapter changes the greedy answer");
    for w in [&w0, &w1] {
        let info = InferenceClient::connect(w.uri())
            .await
            .unwrap()
            .model_info(pb::ModelInfoRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(info.adapters.iter().any(|a| a.name == "sql"), "{info:?}");
    }

    // TGI's adapter_id, Ollama's model name, gRPC's adapter field.
    let tgi = |adapter: &str| json!({"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "adapter_id": adapter}});
    let (status, v) = r.post("/generate", tgi("sql")).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = r.post("/generate", tgi("nope")).await;
    assert_eq!(status, 404, "{v}");
    let tags: Value = r.get_json("/api/tags").await;
    let sql_tag = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "sql")
        .unwrap_or_else(|| panic!("sql missing from {tags}"));
    assert_eq!(sql_tag["details"]["parent_model"], MODEL);
    let (status, v) = r
        .post(
            "/api/generate",
            json!({"model": "sql", "prompt": "Hi", "stream": false, "options": {"num_predict": 3}}),
        )
        .await;
    assert_eq!((status, v["model"].clone()), (200, json!("sql")), "{v}");
    let mut grpc = InferenceClient::connect(format!("http://{}", r.grpc))
        .await
        .unwrap();
    for (model, adapter) in [(MODEL, "sql"), ("sql", ""), ("", "sql")] {
        let req = pb::GenerateRequest {
            model: model.into(),
            adapter: adapter.into(),
            prompt: Some(pb::generate_request::Prompt::Text("Hello".into())),
            stopping: Some(pb::StoppingCriteria {
                max_tokens: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(grpc.generate(req).await.is_ok(), "{model}/{adapter}");
    }

    // A broken adapter: 400 naming the tensor; the base serves on.
    let (status, v) = r
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "broken", "lora_path": broken.display().to_string()}),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("v_proj"), "{message}");
    assert_eq!(answer(&r, MODEL).await.0, base);
    let (status, v) = r
        .post(
            "/v1/load_lora_adapter",
            json!({"lora_name": MODEL, "lora_path": sql.display().to_string()}),
        )
        .await;
    assert_eq!(status, 400, "an adapter cannot take the base's name: {v}");

    // Unloaded: gone from every backend; asking for it is a 404 in the API's shape.
    let (status, v) = r
        .post("/v1/unload_lora_adapter", json!({"lora_name": "sql"}))
        .await;
    assert_eq!(status, 200, "{v}");
    let mut body = chat_body("Hi", 2);
    body["model"] = json!("sql");
    let (status, v) = r.post("/v1/chat/completions", body).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found");
    let (status, _) = r
        .post("/v1/unload_lora_adapter", json!({"lora_name": "sql"}))
        .await;
    assert_eq!(status, 404);
    w0.kill();
    w1.kill();
}
