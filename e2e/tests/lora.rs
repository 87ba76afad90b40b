//! LoRA adapters through the CLI: `shardserve generate --lora` and `shardserve
//! bench --lora` on the demo model with a PEFT adapter the test writes (f16
//! weights, rank 8 on q_proj and v_proj, as fine-tunes usually ship).

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use shardserve_e2e::{demo_model, run, run_json};

/// SmolLM2-135M: hidden size 576, 9 query and 3 key/value heads of 64, 30 layers.
const HIDDEN: usize = 576;
const KV_WIDTH: usize = 3 * 64;
const LAYERS: usize = 30;
const RANK: usize = 8;

/// Deterministic values in [-scale, scale), as f16 bytes.
fn f16_bytes(n: usize, seed: &mut u64, scale: f32) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = ((*seed >> 40) as f32) / (1u64 << 24) as f32;
            half::f16::from_f32((2.0 * unit - 1.0) * scale).to_le_bytes()
        })
        .collect()
}

/// A PEFT directory; `v_rows` is the row count written for v_proj's B (the
/// base's is KV_WIDTH: anything else is a broken adapter).
fn write_peft(dir: &Path, seed: u64, v_rows: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"], "bias": "none",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut seed = seed;
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for layer in 0..LAYERS {
        for (module, rows) in [("q_proj", HIDDEN), ("v_proj", v_rows)] {
            let p = format!("base_model.model.model.layers.{layer}.self_attn.{module}");
            let a = f16_bytes(RANK * HIDDEN, &mut seed, 0.05);
            let b = f16_bytes(rows * RANK, &mut seed, 0.05);
            data.push((format!("{p}.lora_A.weight"), vec![RANK, HIDDEN], a));
            data.push((format!("{p}.lora_B.weight"), vec![rows, RANK], b));
        }
    }
    let views: HashMap<String, TensorView<'_>> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::F16, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(&views, None, &dir.join("adapter_model.safetensors")).unwrap();
}

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
