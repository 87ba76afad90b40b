use serde_json::json;

use super::testing::TestAdapter;
use super::*;
use crate::model::tiny::{TinySpec, write_tiny_gguf};
use crate::weights::GgufFile;

fn tiny_config() -> ModelConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap()
}

fn all_targets() -> Vec<Target> {
    Target::ALL.to_vec()
}

#[test]
fn a_peft_directory_reads_with_its_scale_and_every_target() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let adapter = TestAdapter::random(&cfg, 4, &all_targets(), 7);
    adapter.write_peft(dir.path(), &cfg, json!({}));
    let read = Adapter::open(dir.path(), &cfg, 16).unwrap();
    assert_eq!(read.rank, 4);
    assert_eq!(read.scale, 2.0, "lora_alpha 8 / r 4");
    assert_eq!(read.targets(), all_targets());
    assert_eq!(read.layers.len(), cfg.num_layers);
    // V is not rotated: its rows are as written.
    let (a, b) = &adapter.pairs[&(1, Target::V)];
    assert_eq!(
        read.layers[1][&Target::V],
        Pair {
            a: a.clone(),
            b: b.clone()
        }
    );

    let dir = tempfile::tempdir().unwrap();
    adapter.write_peft(dir.path(), &cfg, json!({"use_rslora": true}));
    let read = Adapter::open(dir.path(), &cfg, 16).unwrap();
    assert_eq!(read.scale, 4.0, "rsLoRA: lora_alpha 8 / sqrt(r 4)");
}

#[test]
fn a_peft_adapter_on_a_gguf_base_gets_q_and_k_rows_permuted_like_the_base() {
    let cfg = tiny_config();
    assert_eq!(cfg.rope.style, RopeStyle::Interleaved);
    let dir = tempfile::tempdir().unwrap();
    let adapter = TestAdapter::random(&cfg, 2, &[Target::Q, Target::K], 3);
    adapter.write_peft(dir.path(), &cfg, json!({}));
    let read = Adapter::open(dir.path(), &cfg, 16).unwrap();
    let d = cfg.head_dim;
    let (_, b) = &adapter.pairs[&(0, Target::K)];
    let got = &read.layers[0][&Target::K].b;
    // Row 2i + h of each head comes from Hugging Face row h·d/2 + i.
    for head in 0..cfg.num_kv_heads {
        for i in 0..d / 2 {
            for h in 0..2 {
                let to = head * d + 2 * i + h;
                let from = head * d + h * d / 2 + i;
                assert_eq!(got[to * 2..to * 2 + 2], b[from * 2..from * 2 + 2]);
            }
        }
    }
}

#[test]
fn the_rope_permutation_is_llama_cpps() {
    // numpy: b.reshape(heads, 2, d/2, r).swapaxes(1, 2).reshape(heads·d, r).
    let b: Vec<f32> = (0..8).map(|v| v as f32).collect();
    assert_eq!(
        permute_rows_for_interleaved_rope(&b, 1, 4),
        [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    );
}

#[test]
fn a_gguf_lora_file_reads_without_permutation() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    let adapter = TestAdapter::random(&cfg, 4, &[Target::Q, Target::Down], 11);
    adapter.write_gguf(&path, &cfg);
    let read = Adapter::open(&path, &cfg, 16).unwrap();
    assert_eq!((read.rank, read.scale), (4, 2.0));
    let (a, b) = &adapter.pairs[&(1, Target::Q)];
    assert_eq!(
        read.layers[1][&Target::Q],
        Pair {
            a: a.clone(),
            b: b.clone()
        }
    );
    assert_eq!(read.targets(), [Target::Q, Target::Down]);
}

/// The message of refusing the adapter in `dir`.
fn refusal(path: &Path, cfg: &ModelConfig, max_rank: usize) -> String {
    Adapter::open(path, cfg, max_rank).unwrap_err().to_string()
}

#[test]
fn bad_adapters_are_refused_naming_the_file_and_the_tensor_or_field() {
    let cfg = tiny_config();
    let adapter = TestAdapter::random(&cfg, 4, &[Target::Q, Target::V], 5);

    let dir = tempfile::tempdir().unwrap();
    adapter.write_peft(dir.path(), &cfg, json!({}));
    let msg = refusal(dir.path(), &cfg, 2);
    assert!(msg.contains("rank 4 is above --max-lora-rank 2"), "{msg}");

    // A base with another hidden size: every A is the wrong shape.
    let mut other = cfg.clone();
    other.hidden_size = 32;
    let msg = refusal(dir.path(), &other, 16);
    assert!(
        msg.contains("adapter_model.safetensors")
            && msg.contains("layers.0.self_attn.q_proj.lora_A.weight")
            && msg.contains("expected [4, 32]"),
        "{msg}"
    );

    let mut fewer = cfg.clone();
    fewer.num_layers = 1;
    let msg = refusal(dir.path(), &fewer, 16);
    assert!(msg.contains("layer 1, but the base model has 1"), "{msg}");

    for (config, field) in [
        (
            json!({"target_modules": ["q_proj", "lm_head"]}),
            "'lm_head'",
        ),
        (json!({"peft_type": "IA3"}), "peft_type"),
        (json!({"use_dora": true}), "DoRA"),
        (json!({"bias": "all"}), "bias"),
        (json!({"rank_pattern": {"q_proj": 8}}), "rank_pattern"),
        (json!({"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (json!({"r": 8}), "expected [8, 64]"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        adapter.write_peft(dir.path(), &cfg, config.clone());
        let msg = refusal(dir.path(), &cfg, 16);
        assert!(msg.contains(field), "{config}: {msg}");
    }

    // A half of a pair missing.
    let dir = tempfile::tempdir().unwrap();
    let mut half = adapter.clone();
    half.pairs.retain(|&(_, t), _| t == Target::Q);
    half.write_peft(dir.path(), &cfg, json!({}));
    let weights = dir.path().join(peft::WEIGHTS_FILE);
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors.remove("base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let msg = refusal(dir.path(), &cfg, 16);
    assert!(
        msg.contains("layers.1.q_proj") && msg.contains("only one of"),
        "{msg}"
    );

    // Not an adapter at all: a model file, a directory without a config, junk.
    let model = dir.path().join("model.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).unwrap();
    let msg = refusal(&model, &cfg, 16);
    assert!(msg.contains("not a LoRA adapter"), "{msg}");
    let empty = tempfile::tempdir().unwrap();
    let msg = refusal(empty.path(), &cfg, 16);
    assert!(msg.contains("adapter_config.json"), "{msg}");
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\0\0\0garbage").unwrap();
    let msg = refusal(&junk, &cfg, 16);
    assert!(msg.contains("junk.gguf"), "{msg}");
}

#[test]
fn non_finite_values_are_refused() {
    let cfg = tiny_config();
    let mut adapter = TestAdapter::random(&cfg, 2, &[Target::O], 9);
    adapter.pairs.get_mut(&(0, Target::O)).unwrap().1[3] = f32::NAN;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.gguf");
    adapter.write_gguf(&path, &cfg);
    let msg = refusal(&path, &cfg, 16);
    assert!(
        msg.contains("blk.0.attn_output.weight.lora_b") && msg.contains("NaN"),
        "{msg}"
    );
}

#[test]
fn shards_cut_a_like_the_base_and_cover_the_whole() {
    let cfg = tiny_config();
    let dir = tempfile::tempdir().unwrap();
    TestAdapter::random(&cfg, 3, &all_targets(), 2).write_peft(dir.path(), &cfg, json!({}));
    let adapter = Adapter::open(dir.path(), &cfg, 16).unwrap();
    let one = adapter.shard(&cfg, 0, 1);
    let two: Vec<AdapterShard> = (0..2).map(|r| adapter.shard(&cfg, r, 2)).collect();
    for layer in 0..cfg.num_layers {
        // Column-parallel: A whole, B's rows split in order.
        for (i, (offset, whole)) in one.layers[layer].qkv.iter().enumerate() {
            let parts: Vec<&ShardPair> = two.iter().map(|s| &s.layers[layer].qkv[i].1).collect();
            assert!(parts.iter().all(|p| p.a == whole.a));
            let joined: Vec<f32> = parts.iter().flat_map(|p| p.b.clone()).collect();
            assert_eq!(joined, whole.b, "layer {layer} part at {offset}");
        }
        // Row-parallel: A's columns split, B whole.
        let whole = one.layers[layer].down.as_ref().unwrap();
        let parts: Vec<&ShardPair> = two
            .iter()
            .map(|s| s.layers[layer].down.as_ref().unwrap())
            .collect();
        assert!(parts.iter().all(|p| p.b == whole.b));
        for r in 0..3 {
            let joined: Vec<f32> = parts
                .iter()
                .flat_map(|p| p.a[r * p.inputs..(r + 1) * p.inputs].to_vec())
                .collect();
            assert_eq!(joined, whole.a[r * whole.inputs..(r + 1) * whole.inputs]);
        }
    }
    // Offsets in the stacked outputs: Q at 0, K after this rank's Q, V after K.
    let q = cfg.num_heads * cfg.head_dim / 2;
    let kv = cfg.num_kv_heads * cfg.head_dim / 2;
    let offsets: Vec<usize> = two[1].layers[0].qkv.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [0, q, q + kv]);
    let offsets: Vec<usize> = two[1].layers[0].gate_up.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, [0, cfg.intermediate_size / 2]);
}

/// The acceptance check on the demo model: a PEFT adapter on q_proj and v_proj,
/// applied unmerged, gives the first token's logits of a reference whose q and v
/// weights are the demo's dequantised plus s·B·A (B's q rows permuted into GGUF's
/// layout by the test, as llama.cpp's converter does). Both models carry q and v
/// dequantised to f32 (the rest stays Q4_1), so that they differ only in how the
/// adapter is applied: the Q4_1 kernels round their activations, dequantised
/// weights do not.
///
/// The first token only: from the second position on, this model turns any
/// last-bit difference into logits apart by up to ~1 (its attention sinks): a
/// 1-ulp change of its q/k/v weights moved the logits of a 2-token prompt by 0.43
/// and unmerged against merged by 0.48, so no order of rounding could agree
/// there within 1e-3. The Q rows' permutation is checked on a tiny model instead
/// (`a_peft_adapter_answers_the_same_on_an_hf_base_and_on_its_gguf`).
#[test]
fn a_peft_adapter_on_the_demo_model_matches_its_weights_merged_into_the_dequantised_base() {
    use std::sync::Arc;

    use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
    use candle_core::{Device, Tensor};

    use crate::comm::SingleRank;
    use crate::kv::KvCache;
    use crate::model::{Host, LogitsFor, SeqSpan, Transformer};
    use crate::weights::GgufFile;

    let demo = shardserve_e2e::demo_model();
    let cfg = crate::model::ModelConfig::from_gguf(&GgufFile::open(&demo).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut adapter = testing::TestAdapter::random(&cfg, 8, &[Target::Q, Target::V], 41);
    // A fine-tune's size of change (s = 0.25), not a random model's.
    adapter.alpha = 2.0;
    adapter.write_peft(&dir.path().join("peft"), &cfg, serde_json::json!({}));
    let scale = adapter.scale();

    // The demo with q and v dequantised, plus the adapter's product when `merge`.
    let variant = |merge: bool| {
        let mut reader = std::fs::File::open(&demo).unwrap();
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let mut tensors: Vec<(String, QTensor)> = Vec::new();
        for name in content.tensor_infos.keys() {
            let q = content.tensor(&mut reader, name, &Device::Cpu).unwrap();
            let target = [("attn_q", Target::Q), ("attn_v", Target::V)]
                .into_iter()
                .find(|(t, _)| name.ends_with(&format!("{t}.weight")));
            let Some((_, target)) = target else {
                tensors.push((name.clone(), q));
                continue;
            };
            let mut w = q.dequantize(&Device::Cpu).unwrap();
            if merge {
                let layer: usize = name.split('.').nth(1).unwrap().parse().unwrap();
                let (a, b) = &adapter.pairs[&(layer, target)];
                let b = match target {
                    Target::Q => permute_rows_for_interleaved_rope(b, adapter.rank, cfg.head_dim),
                    _ => b.clone(),
                };
                let (outputs, inputs) = w.dims2().unwrap();
                let a = Tensor::from_vec(a.clone(), (adapter.rank, inputs), &Device::Cpu).unwrap();
                let b = Tensor::from_vec(b, (outputs, adapter.rank), &Device::Cpu).unwrap();
                w = (w + (b.matmul(&a).unwrap() * f64::from(scale)).unwrap()).unwrap();
            }
            tensors.push((name.clone(), QTensor::quantize(&w, GgmlDType::F32).unwrap()));
        }
        let path = dir.path().join(format!("demo-merged-{merge}.gguf"));
        let metadata: Vec<(&str, &gguf_file::Value)> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &metadata, &refs).unwrap();
        Transformer::from_gguf(&GgufFile::open(&path).unwrap(), Arc::new(SingleRank), Host).unwrap()
    };
    let mut base = variant(false);
    let merged = variant(true);
    base.load_adapter(
        0,
        &Adapter::open(&dir.path().join("peft"), &cfg, 64).unwrap(),
    )
    .unwrap();

    let first = |model: &Transformer, adapter: Option<u32>| {
        let mut kv = KvCache::new(model.kv_shape(), 1, 16).unwrap();
        let span = SeqSpan {
            tokens: &[504],
            start_pos: 0,
            blocks: &[0],
            logits: LogitsFor::Last,
            adapter,
        };
        model
            .forward(&[span], &mut kv)
            .unwrap()
            .logits
            .remove(0)
            .remove(0)
    };
    let (unmerged, reference, plain) = (
        first(&base, Some(0)),
        first(&merged, None),
        first(&base, None),
    );
    let worst = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    };
    let (diff, moved) = (worst(&unmerged, &reference), worst(&unmerged, &plain));
    assert!(diff < 1e-3, "unmerged and merged differ by {diff}");
    assert!(
        moved > 0.1,
        "the adapter must change the logits (moved {moved})"
    );
}
