//! LoRA adapters through the CLI: `shardserve generate --lora` and `shardserve
//! bench --lora` on the demo model with a PEFT adapter the test writes (f16
//! weights, rank 8 on q_proj and v_proj, as fine-tunes usually ship).

use shardserve_e2e::lora::{KV_WIDTH, write_peft};
use shardserve_e2e::{demo_model, run, run_json};

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
