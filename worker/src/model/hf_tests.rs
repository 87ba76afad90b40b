//! Hugging Face directories: the same weights load to the same model as GGUF.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

use super::hf::hf_name;
use super::tiny::{TinySpec, tiny_tensors, write_gguf};
use super::*;
use crate::comm::SingleRank;
use crate::engine::{Engine, EngineOptions, Flow, GenerationRequest, Prompt};
use crate::kv::KvCache;
use crate::weights::GgufFile;

/// Room for the 256 byte tokens and `<|endoftext|>`.
fn spec() -> TinySpec {
    TinySpec {
        vocab: 260,
        heads: 4,
        kv_heads: 2,
        separate_head: true,
        ..TinySpec::default()
    }
}

fn hf_config(spec: &TinySpec) -> serde_json::Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": !spec.separate_head,
    })
}

/// GPT-2's byte-to-character table: printable bytes map to themselves.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

/// A byte-level BPE tokenizer without merges: one token per byte (id = byte).
fn write_tokenizer(dir: &Path) {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_chars()
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 256, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true,
            "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = json!({"eos_token": "<|endoftext|>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// Little-endian bytes of `t` stored as `dtype`.
fn bytes_of(t: &Tensor, dtype: Dtype) -> Vec<u8> {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("{other:?}"),
    }
}

/// Writes `tensors` (GGUF names, unpermuted Q/K) as a Hugging Face
/// directory in `shards` files (an index when more than one).
fn write_hf_dir(
    dir: &Path,
    spec: &TinySpec,
    tensors: &[(String, Tensor)],
    dtype: Dtype,
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), hf_config(spec).to_string()).unwrap();
    write_tokenizer(dir);
    let named: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, t)| (hf_name(n).unwrap(), t.dims().to_vec(), bytes_of(t, dtype)))
        .collect();
    let per = named.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in named.chunks(per).enumerate() {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        };
        let views: Vec<(String, TensorView<'_>)> = part
            .iter()
            .map(|(n, dims, bytes)| {
                (
                    n.clone(),
                    TensorView::new(dtype, dims.clone(), bytes).unwrap(),
                )
            })
            .collect();
        for (n, _) in &views {
            weight_map.insert(n.clone(), json!(file));
        }
        std::fs::write(
            dir.join(&file),
            safetensors::serialize(views, None).unwrap(),
        )
        .unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// Q/K rows reordered as llama.cpp's converter does for interleaved RoPE:
/// within each head, row `j·d/2 + i` moves to `2i + j`.
fn permute_for_interleaved(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let d = rows / heads;
    t.reshape((heads, 2, d / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn gguf_tensors(spec: &TinySpec, tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(n, t)| {
            let t = if n.ends_with("attn_q.weight") {
                permute_for_interleaved(t, spec.heads)
            } else if n.ends_with("attn_k.weight") {
                permute_for_interleaved(t, spec.kv_heads)
            } else {
                t.clone()
            };
            (n.clone(), t)
        })
        .collect()
}

fn logits(model: &Transformer, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
    let slot: Vec<u32> = (0..32).collect();
    let span = SeqSpan {
        tokens,
        start_pos: 0,
        blocks: &slot,
        logits: LogitsFor::All,
        adapter: None,
    };
    model.forward(&[span], &mut kv).unwrap().logits.remove(0)
}

fn hf_model(dir: &Path) -> Transformer {
    let checkpoint = HfCheckpoint::open(dir).unwrap();
    Transformer::from_hf(&checkpoint, Arc::new(SingleRank), Host).unwrap()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

const TOKENS: [u32; 9] = [72, 101, 108, 108, 111, 32, 255, 0, 256];

#[test]
fn hf_directory_equals_the_same_weights_as_gguf() {
    let root = tempfile::tempdir().unwrap();
    for spec in [
        spec(),
        TinySpec {
            separate_head: false,
            kv_heads: 4,
            seed: 7,
            ..spec()
        },
    ] {
        let tensors = tiny_tensors(&spec).unwrap();
        let gguf_path = root.path().join(format!("m{}.gguf", spec.seed));
        write_gguf(&gguf_path, &spec, &gguf_tensors(&spec, &tensors)).unwrap();
        let file = GgufFile::open(&gguf_path).unwrap();
        let gguf = Transformer::from_gguf(&file, Arc::new(SingleRank), Host).unwrap();
        let want = logits(&gguf, &TOKENS);
        for shards in [1, 3] {
            let dir = root.path().join(format!("hf{}-{shards}", spec.seed));
            write_hf_dir(&dir, &spec, &tensors, Dtype::F32, shards);
            let hf = hf_model(&dir);
            assert_eq!(hf.config().rope.style, RopeStyle::Halves);
            assert_eq!(hf.config().tied_embeddings, !spec.separate_head);
            let got = logits(&hf, &TOKENS);
            let diff = worst(&got, &want);
            assert!(diff < 1e-4, "{shards} shards, seed {}: {diff}", spec.seed);
        }
    }
}

#[test]
fn bf16_checkpoint_equals_its_weights_rounded_in_f32() {
    let spec = spec();
    let tensors = tiny_tensors(&spec).unwrap();
    let rounded: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let r = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            (n.clone(), r)
        })
        .collect();
    let root = tempfile::tempdir().unwrap();
    write_hf_dir(&root.path().join("bf16"), &spec, &tensors, Dtype::BF16, 2);
    write_hf_dir(&root.path().join("f32"), &spec, &rounded, Dtype::F32, 1);
    let bf16 = HfCheckpoint::open(root.path().join("bf16")).unwrap();
    assert_eq!(bf16.format(), "safetensors:BF16");
    let bf16 = Transformer::from_hf(&bf16, Arc::new(SingleRank), Host).unwrap();
    let f32 = hf_model(&root.path().join("f32"));
    assert_eq!(logits(&bf16, &TOKENS), logits(&f32, &TOKENS));
}

#[test]
fn f16_checkpoint_stays_close_to_f32() {
    let spec = spec();
    let tensors = tiny_tensors(&spec).unwrap();
    let root = tempfile::tempdir().unwrap();
    write_hf_dir(&root.path().join("f16"), &spec, &tensors, Dtype::F16, 1);
    write_hf_dir(&root.path().join("f32"), &spec, &tensors, Dtype::F32, 1);
    let diff = worst(
        &logits(&hf_model(&root.path().join("f16")), &TOKENS),
        &logits(&hf_model(&root.path().join("f32")), &TOKENS),
    );
    assert!(diff < 0.05, "{diff}");
}

#[test]
fn engine_loads_an_hf_directory_and_generates() {
    let spec = spec();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("Tiny-Llama-0.1");
    write_hf_dir(&dir, &spec, &tiny_tensors(&spec).unwrap(), Dtype::BF16, 2);
    let mut engine = Engine::load(&dir, &EngineOptions::default()).unwrap();
    assert_eq!(engine.info().served_model_name, "Tiny-Llama-0.1");
    assert_eq!(engine.info().eos_token_ids, vec![256]);
    let mut req = GenerationRequest::new(Prompt::Text("Hello".into()));
    req.stopping.max_tokens = Some(6);
    req.stopping.ignore_eos = true;
    let mut seen = 0;
    let done = engine
        .generate(&req, &mut |_| {
            seen += 1;
            Flow::Continue
        })
        .unwrap()
        .unwrap();
    assert_eq!(done.prompt_token_ids, vec![72, 101, 108, 108, 111]);
    assert_eq!(done.token_ids.len(), 6);
    assert!(seen > 0);
}

#[test]
fn llama3_rope_scaling_follows_the_reference() {
    let mut config = hf_config(&spec());
    config["rope_theta"] = json!(500000.0);
    config["rope_scaling"] = json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let cfg = ModelConfig::from_hf_config(&config).unwrap();
    let RopeScaling::FreqFactors(div) = &cfg.rope.scaling else {
        panic!("{:?}", cfg.rope.scaling);
    };
    assert_eq!(div.len(), cfg.head_dim / 2);
    // Short wavelengths kept, long ones slowed by the factor, a smooth blend between.
    assert_eq!(div[0], 1.0);
    assert_eq!(*div.last().unwrap(), 8.0);
    assert!(div.windows(2).all(|w| w[0] <= w[1]), "{div:?}");
    assert!(div.iter().any(|d| *d > 1.0 && *d < 8.0), "{div:?}");

    config["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    let cfg = ModelConfig::from_hf_config(&config).unwrap();
    assert_eq!(cfg.rope.scaling, RopeScaling::Linear { factor: 2.0 });

    config["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let err = ModelConfig::from_hf_config(&config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rope_scaling.rope_type") && err.contains("yarn"),
        "{err}"
    );
}

#[test]
fn transformers_5_rope_parameters_give_the_same_rope() {
    // transformers 5 saves theta and scaling together under `rope_parameters`.
    let mut old = hf_config(&spec());
    old["rope_theta"] = json!(500000.0);
    old["rope_scaling"] = json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let mut new = hf_config(&spec());
    new.as_object_mut().unwrap().remove("rope_theta");
    new["rope_parameters"] = json!({
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192
    });
    let (old, new_cfg) = (
        ModelConfig::from_hf_config(&old).unwrap(),
        ModelConfig::from_hf_config(&new).unwrap(),
    );
    assert_eq!(old.rope, new_cfg.rope);
    assert_eq!(new_cfg.rope.theta, 500000.0);

    new["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e6});
    let cfg = ModelConfig::from_hf_config(&new).unwrap();
    assert_eq!(
        (cfg.rope.theta, &cfg.rope.scaling),
        (1e6, &RopeScaling::None)
    );
    new["rope_parameters"] = json!({"rope_theta": 1e6});
    assert_eq!(ModelConfig::from_hf_config(&new).unwrap().rope.theta, 1e6);
    new["rope_parameters"] = json!({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0});
    let err = ModelConfig::from_hf_config(&new).unwrap_err().to_string();
    assert!(err.contains("rope_parameters.rope_type"), "{err}");
}

#[test]
fn qwen2_config_has_qkv_bias() {
    let mut config = hf_config(&spec());
    config["architectures"] = json!(["Qwen2ForCausalLM"]);
    let cfg = ModelConfig::from_hf_config(&config).unwrap();
    assert_eq!(cfg.architecture, "qwen2");
    assert!(cfg.qkv_bias);
}

#[test]
fn missing_config_key_is_named() {
    let spec = spec();
    let root = tempfile::tempdir().unwrap();
    write_hf_dir(
        root.path(),
        &spec,
        &tiny_tensors(&spec).unwrap(),
        Dtype::F32,
        1,
    );
    let mut config = hf_config(&spec);
    config.as_object_mut().unwrap().remove("intermediate_size");
    std::fs::write(root.path().join("config.json"), config.to_string()).unwrap();
    let err = HfCheckpoint::open(root.path()).unwrap_err().to_string();
    assert!(
        err.contains("intermediate_size") && err.contains("missing") && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_refused() {
    let mut config = hf_config(&spec());
    config["architectures"] = json!(["GPT2LMHeadModel"]);
    let err = ModelConfig::from_hf_config(&config)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPT2LMHeadModel") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_named() {
    let spec = spec();
    let root = tempfile::tempdir().unwrap();
    write_hf_dir(
        root.path(),
        &spec,
        &tiny_tensors(&spec).unwrap(),
        Dtype::F32,
        3,
    );
    let gone = root.path().join("model-00002-of-00003.safetensors");
    std::fs::remove_file(&gone).unwrap();
    let err = HfCheckpoint::open(root.path()).unwrap_err().to_string();
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
}

#[test]
fn truncated_shard_is_refused() {
    let spec = spec();
    let root = tempfile::tempdir().unwrap();
    write_hf_dir(
        root.path(),
        &spec,
        &tiny_tensors(&spec).unwrap(),
        Dtype::F32,
        3,
    );
    let shard = root.path().join("model-00003-of-00003.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = HfCheckpoint::open(root.path()).unwrap_err().to_string();
    assert!(
        err.contains("model-00003-of-00003.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

/// Loads `dir` and generates two tokens; `Err` is a refusal, a panic fails the caller.
fn load_and_generate(dir: &Path) -> std::thread::Result<Result<(), String>> {
    std::panic::catch_unwind(|| {
        let mut engine = Engine::load(dir, &EngineOptions::default()).map_err(|e| e.to_string())?;
        let mut req = GenerationRequest::new(Prompt::Text("Hello".into()));
        req.stopping.max_tokens = Some(2);
        engine
            .generate(&req, &mut |_| Flow::Continue)
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Every config.json key set to zero, a negative, a huge number, a string, null or
/// removed, and every byte of a safetensors header (its length and JSON) damaged: each
/// directory is refused with an error or loads and generates. Never a panic.
#[test]
fn damaged_checkpoints_are_refused_or_run_never_panic() {
    let spec = TinySpec {
        layers: 1,
        ..spec()
    };
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny");
    write_hf_dir(&dir, &spec, &tiny_tensors(&spec).unwrap(), Dtype::BF16, 1);
    let (mut ran, mut refused) = (0, 0);
    let mut count = |what: &str, outcome: std::thread::Result<Result<(), String>>| match outcome {
        Ok(Ok(())) => ran += 1,
        Ok(Err(_)) => refused += 1,
        Err(_) => panic!("{what}: panicked"),
    };

    let good = hf_config(&spec);
    let keys: Vec<String> = good.as_object().unwrap().keys().cloned().collect();
    let damages = [
        Some(json!(0)),
        Some(json!(-1)),
        Some(json!(1_000_000_000_000u64)),
        Some(json!("x")),
        Some(json!(null)),
        Some(json!(true)),
        None,
    ];
    for key in &keys {
        for damage in &damages {
            let mut config = good.clone();
            match damage {
                Some(value) => config[key] = value.clone(),
                None => {
                    config.as_object_mut().unwrap().remove(key);
                }
            }
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            count(
                &format!("config {key} = {damage:?}"),
                load_and_generate(&dir),
            );
        }
    }
    std::fs::write(dir.join("config.json"), good.to_string()).unwrap();

    let shard = dir.join("model.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    // Every byte of the length, then every 3rd byte of the JSON (numbers and names).
    for at in (0..8).chain((8..header_end).step_by(3)) {
        for value in [b'0', b'9', b'"', 0xFF] {
            if bytes[at] == value {
                continue;
            }
            let mut damaged = bytes.clone();
            damaged[at] = value;
            std::fs::write(&shard, &damaged).unwrap();
            count(
                &format!("safetensors byte {at} -> {value:#04x}"),
                load_and_generate(&dir),
            );
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

#[test]
fn a_kv_cache_that_cannot_be_had_is_refused_not_aborted() {
    let spec = spec();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("tiny");
    write_hf_dir(&dir, &spec, &tiny_tensors(&spec).unwrap(), Dtype::BF16, 1);
    // A context length nobody could cache, sized by default...
    let mut config = hf_config(&spec);
    config["max_position_embeddings"] = json!(1_000_000_000_000u64);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let err = Engine::load(&dir, &EngineOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cannot reserve") && err.contains("--max-seq-len"),
        "{err}"
    );
    // ... and fine again once the sequences are limited.
    let limited = EngineOptions {
        max_seq_len: Some(512),
        ..EngineOptions::default()
    };
    assert!(Engine::load(&dir, &limited).is_ok());
    // An explicit budget beyond any machine.
    let huge = EngineOptions {
        kv_cache_bytes: Some(usize::MAX / 2),
        ..limited
    };
    let err = Engine::load(&dir, &huge).err().unwrap().to_string();
    assert!(
        err.contains("cannot reserve") && err.contains("--kv-cache-memory"),
        "{err}"
    );
}

/// A PEFT adapter (Hugging Face row layout) serves the same on an HF base and on
/// the same weights as GGUF, whose Q and K rows are permuted: its B rows of Q
/// and K are permuted like the base's.
#[test]
fn a_peft_adapter_answers_the_same_on_an_hf_base_and_on_its_gguf() {
    let root = tempfile::tempdir().unwrap();
    let spec = spec();
    let tensors = tiny_tensors(&spec).unwrap();
    let gguf_path = root.path().join("m.gguf");
    write_gguf(&gguf_path, &spec, &gguf_tensors(&spec, &tensors)).unwrap();
    let file = GgufFile::open(&gguf_path).unwrap();
    let mut gguf = Transformer::from_gguf(&file, Arc::new(SingleRank), Host).unwrap();
    let hf_dir = root.path().join("hf");
    write_hf_dir(&hf_dir, &spec, &tensors, Dtype::F32, 1);
    let mut hf = hf_model(&hf_dir);

    let lora = root.path().join("lora");
    crate::lora::testing::TestAdapter::random(hf.config(), 4, &crate::lora::Target::ALL, 8)
        .write_peft(&lora, hf.config(), json!({}));
    for model in [&mut gguf, &mut hf] {
        let adapter = crate::lora::Adapter::open(&lora, model.config(), 16).unwrap();
        model.load_adapter(0, &adapter).unwrap();
    }
    let with = |model: &Transformer| {
        let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
        let slot: Vec<u32> = (0..32).collect();
        let span = SeqSpan {
            tokens: &TOKENS,
            start_pos: 0,
            blocks: &slot,
            logits: LogitsFor::All,
            adapter: Some(0),
        };
        model.forward(&[span], &mut kv).unwrap().logits.remove(0)
    };
    let (a, b) = (with(&gguf), with(&hf));
    assert!(worst(&a, &b) < 1e-4, "differ by {}", worst(&a, &b));
    assert!(
        worst(&a, &logits(&gguf, &TOKENS)) > 0.1,
        "the adapter changes the answer"
    );
}
