//! The command-line contract of `shardserve generate` and `shardserve bench`
//! on the demo model, and how bad model files are refused.

use serde_json::Value;
use shardserve_e2e::{demo_model, run, run_json};

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id"))
        .collect()
}

#[test]
fn generate_json_follows_the_contract() {
    let model = demo_model();
    let out = run_json(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "What is 2+2?",
        "--max-tokens",
        "8",
        "--json",
    ]);
    let prompt = ids(&out["prompt_token_ids"]);
    assert_eq!(prompt[0], 1, "the chat template starts with <|im_start|>");
    let generated = ids(&out["token_ids"]);
    assert!(!generated.is_empty() && generated.len() <= 8);
    assert!(out["text"].as_str().is_some_and(|t| !t.is_empty()));
    let reason = out["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length");
    assert!(out.get("logprobs").is_none());
}

#[test]
fn prompt_logprobs_equal_generation_logprobs() {
    let model = demo_model();
    let m = model.to_str().unwrap();
    let first = run_json(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "12",
        "--logprobs",
        "3",
        "--json",
    ]);
    let prompt = ids(&first["prompt_token_ids"]);
    let generated = ids(&first["token_ids"]);
    let all: Vec<String> = prompt
        .iter()
        .chain(&generated)
        .map(u64::to_string)
        .collect();
    let scored = run_json(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        &all.join(","),
        "--max-tokens",
        "0",
        "--prompt-logprobs",
        "3",
        "--json",
    ]);
    assert_eq!(ids(&scored["token_ids"]), Vec::<u64>::new());
    let gen_lp = first["logprobs"].as_array().unwrap();
    let prompt_lp = scored["prompt_logprobs"].as_array().unwrap();
    assert_eq!(prompt_lp.len(), all.len());
    assert!(prompt_lp[0].is_null());
    assert_eq!(gen_lp.len(), generated.len());
    for (i, g) in gen_lp.iter().enumerate() {
        let p = &prompt_lp[prompt.len() + i];
        assert_eq!(g["id"], p["id"]);
        let (a, b) = (
            g["logprob"].as_f64().unwrap(),
            p["logprob"].as_f64().unwrap(),
        );
        assert!(
            a == b,
            "token {i}: generation logprob {a} vs prompt logprob {b}"
        );
        let top_ids = |v: &Value| {
            v["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            top_ids(g)[0],
            top_ids(p)[0],
            "token {i}: best alternative differs"
        );
    }
}

#[test]
fn same_seed_gives_same_sample() {
    let model = demo_model();
    let m = model.to_str().unwrap();
    let args = |seed: &'static str| {
        [
            "generate",
            "--model",
            m,
            "--chat",
            "Tell me a story.",
            "--max-tokens",
            "16",
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--json",
        ]
    };
    let a = run_json(&args("7"));
    let b = run_json(&args("7"));
    assert_eq!(a["token_ids"], b["token_ids"]);
}

#[test]
fn bench_json_reports_each_setting() {
    let model = demo_model();
    let out = run_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "16,32",
        "--gen-tokens",
        "4",
        "--repetitions",
        "1",
        "--json",
    ]);
    assert_eq!(out["threads"], 2);
    let results = out["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (row, p) in results.iter().zip([16, 32]) {
        assert_eq!(row["prompt_tokens"], p);
        assert_eq!(row["gen_tokens"], 4);
        assert!(row["prefill_tok_s"].as_f64().unwrap() > 0.0);
        assert!(row["decode_tok_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(out["sampling"]["temperature"], 0.0);
}

#[test]
fn bench_decodes_sampled_when_asked() {
    let model = demo_model();
    let out = run_json(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--repetitions",
        "1",
        "--batch",
        "2",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
        "--json",
    ]);
    let sampling = &out["sampling"];
    assert_eq!(sampling["top_p"].as_f64().unwrap() as f32, 0.9);
    assert_eq!(sampling["repetition_penalty"].as_f64().unwrap() as f32, 1.2);
    assert!(out["results"][0]["decode_tok_s"].as_f64().unwrap() > 0.0);
    let bad = run(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "-1",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("temperature=-1 is out of range"));
}

fn refused(model: &std::path::Path) -> String {
    let out = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--json",
    ]);
    assert!(!out.status.success(), "a bad model file must be refused");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for a refused model"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn truncated_gguf_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(demo_model()).unwrap();
    let path = dir.path().join("half.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = refused(&path);
    assert!(
        err.contains("truncated") && err.contains("half.gguf"),
        "unclear error: {err}"
    );
}

#[test]
fn non_gguf_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, b"this is not a model file at all").unwrap();
    let err = refused(&path);
    assert!(
        err.contains("not a GGUF file") && err.contains("notes.gguf"),
        "unclear error: {err}"
    );
}

#[test]
fn missing_model_file_is_refused() {
    let err = refused(std::path::Path::new("/nonexistent/model.gguf"));
    assert!(
        err.contains("/nonexistent/model.gguf"),
        "unclear error: {err}"
    );
}

#[test]
fn overlong_prompt_is_refused_with_counts() {
    let model = demo_model();
    let out = run(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &"word ".repeat(100),
        "--max-seq-len",
        "32",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokens") && err.contains("32"),
        "unclear error: {err}"
    );
}

/// `--device cuda` on a build without CUDA (as `make test` builds) stops before loading,
/// saying what is missing; `--device cpu` is the default and works; a bad name is refused
/// by the argument parser.
#[test]
fn cuda_without_a_cuda_build_is_refused_clearly() {
    let model = demo_model();
    let model = model.to_str().unwrap();
    let out = run(&[
        "generate", "--model", model, "--device", "cuda:0", "--prompt", "Hi",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--device cuda:0: this shardserve was built without CUDA"),
        "{stderr}"
    );
    let out = run(&["bench", "--model", model, "--device", "gpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("expected `cpu`, `cuda`, `cuda:N` or `candle-cpu`")
    );
    let out = run_json(&[
        "generate",
        "--model",
        model,
        "--device",
        "cpu",
        "--prompt",
        "Hi",
        "--max-tokens",
        "2",
        "--json",
    ]);
    assert!(!ids(&out["token_ids"]).is_empty());
}

/// `--device candle-cpu` runs the GPU engine's device backend on the CPU: the same
/// greedy answer as the CPU engine, alone and as a local group of three ranks.
#[test]
fn the_device_backend_answers_as_the_cpu_engine() {
    let model = demo_model();
    let answer = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--chat",
            "Name three colours.",
            "--max-tokens",
            "16",
            "--json",
        ];
        args.extend_from_slice(extra);
        ids(&run_json(&args)["token_ids"])
    };
    let cpu = answer(&[]);
    assert_eq!(answer(&["--device", "candle-cpu"]), cpu);
    assert_eq!(answer(&["--device", "candle-cpu", "--tensor", "3"]), cpu);
}
