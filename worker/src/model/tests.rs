use std::sync::Arc;

use candle_core::quantized::GgmlDType;

use super::tiny::{TinySpec, write_tiny_gguf};
use super::*;
use crate::comm::SingleRank;
use crate::kv::KvCache;
use crate::weights::GgufFile;

fn load(spec: &TinySpec) -> (tempfile::TempDir, Transformer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let model = Transformer::from_gguf(&file, Arc::new(SingleRank), Host).unwrap();
    (dir, model)
}

fn logits_all(model: &Transformer, kv: &mut KvCache, tokens: &[u32]) -> Vec<Vec<f32>> {
    let slot: Vec<u32> = (0..32).collect();
    let span = SeqSpan {
        tokens,
        start_pos: 0,
        blocks: &slot,
        logits: LogitsFor::All,
        adapter: None,
    };
    let out = model.forward(&[span], kv).unwrap().logits;
    out[0].clone()
}

const TOKENS: [u32; 11] = [5, 17, 3, 90, 42, 42, 7, 0, 61, 33, 12];

#[test]
fn token_by_token_decode_equals_full_prefill() {
    for dtype in [GgmlDType::F32, GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let (_dir, model) = load(&TinySpec {
            dtype,
            ..TinySpec::default()
        });
        let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
        let full = logits_all(&model, &mut kv, &TOKENS);
        let slot: Vec<u32> = (0..32).collect();
        for (pos, tok) in TOKENS.iter().enumerate() {
            let span = SeqSpan {
                tokens: std::slice::from_ref(tok),
                start_pos: pos,
                blocks: &slot,
                logits: LogitsFor::Last,
                adapter: None,
            };
            let step = model.forward(&[span], &mut kv).unwrap().logits[0].clone();
            if dtype == GgmlDType::F32 {
                // Dense products go through a general matmul whose order depends on the shape.
                let worst = step[0]
                    .iter()
                    .zip(&full[pos])
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{dtype:?} position {pos}: {worst}");
            } else {
                // Block-quantised rows are computed in the same order whatever their batch.
                assert_eq!(step[0], full[pos], "{dtype:?} position {pos}");
            }
        }
    }
}

#[test]
fn spans_batched_together_equal_separate_runs() {
    let (_dir, model) = load(&TinySpec {
        dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    });
    let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
    let a = &TOKENS[..7];
    let b = &TOKENS[3..];
    let alone_a = logits_all(&model, &mut kv, a);
    let alone_b = logits_all(&model, &mut kv, b);
    // Disjoint block tables, interleaved in storage.
    let sa: Vec<u32> = (0..32).map(|i| 2 * i).collect();
    let sb: Vec<u32> = (0..32).map(|i| 2 * i + 1).collect();
    let spans = [
        SeqSpan {
            tokens: a,
            start_pos: 0,
            blocks: &sa,
            logits: LogitsFor::All,
            adapter: None,
        },
        SeqSpan {
            tokens: b,
            start_pos: 0,
            blocks: &sb,
            logits: LogitsFor::Last,
            adapter: None,
        },
    ];
    let out = model.forward(&spans, &mut kv).unwrap().logits;
    let batched_a = &out[0];
    let batched_b = &out[1];
    for (x, y) in batched_a.iter().zip(&alone_a) {
        assert_eq!(x, y, "sequence a");
    }
    assert_eq!(batched_b.len(), 1);
    assert_eq!(&batched_b[0], alone_b.last().unwrap(), "sequence b");
}

#[test]
fn chunked_prefill_equals_one_shot() {
    let (_dir, model) = load(&TinySpec {
        dtype: GgmlDType::Q4_1,
        ..TinySpec::default()
    });
    let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
    let full = logits_all(&model, &mut kv, &TOKENS);
    let slot: Vec<u32> = (0..32).collect();
    let (first, rest) = TOKENS.split_at(4);
    let span = |tokens, start_pos, logits| SeqSpan {
        tokens,
        start_pos,
        blocks: &slot,
        logits,
        adapter: None,
    };
    let none = model
        .forward(&[span(first, 0, LogitsFor::None)], &mut kv)
        .unwrap();
    assert!(none.logits[0].is_empty());
    assert_eq!(none.picked, [None]);
    let last = model
        .forward(&[span(rest, 4, LogitsFor::Last)], &mut kv)
        .unwrap();
    assert_eq!(&last.logits[0][0], full.last().unwrap(), "last token");
    assert_eq!(last.picked, [None]);
}

#[test]
fn a_best_span_gets_its_last_rows_argmax_and_no_rows() {
    let (_dir, model) = load(&TinySpec::default());
    let mut kv = KvCache::new(model.kv_shape(), 64, 4).unwrap();
    let (a, b) = TOKENS.split_at(5);
    let full_a = logits_all(&model, &mut kv, a);
    let slots: [Vec<u32>; 2] = [(0..8).collect(), (8..16).collect()];
    let spans = [
        SeqSpan {
            tokens: a,
            start_pos: 0,
            blocks: &slots[0],
            logits: LogitsFor::Pick(Pick::BEST),
            adapter: None,
        },
        SeqSpan {
            tokens: b,
            start_pos: 0,
            blocks: &slots[1],
            logits: LogitsFor::All,
            adapter: None,
        },
    ];
    let out = model.forward(&spans, &mut kv).unwrap();
    let best = crate::sampling::argmax(full_a.last().unwrap());
    let picked = out.picked.iter().map(|p| p.as_ref().map(|p| p.id));
    assert_eq!(picked.collect::<Vec<_>>(), [Some(best), None]);
    assert!(out.logits[0].is_empty());
    assert_eq!(
        out.logits[1].len(),
        b.len(),
        "the other span's rows come whole"
    );
}

#[test]
fn separate_head_and_qkv_bias_change_the_output() {
    let (_d1, tied) = load(&TinySpec::default());
    let (_d2, separate) = load(&TinySpec {
        separate_head: true,
        ..TinySpec::default()
    });
    let (_d3, biased) = load(&TinySpec {
        architecture: "qwen2",
        qkv_bias: true,
        ..TinySpec::default()
    });
    assert!(tied.config().tied_embeddings);
    assert!(!separate.config().tied_embeddings);
    assert!(biased.config().qkv_bias);
    assert_eq!(biased.config().rope.style, RopeStyle::Halves);
    let mut kv = KvCache::new(tied.kv_shape(), 64, 4).unwrap();
    let a = logits_all(&tied, &mut kv, &TOKENS);
    let b = logits_all(&separate, &mut kv, &TOKENS);
    let c = logits_all(&biased, &mut kv, &TOKENS);
    assert_ne!(a, b);
    assert_ne!(a, c);
}

#[test]
fn config_comes_from_metadata() {
    let (_dir, model) = load(&TinySpec {
        layers: 3,
        heads: 8,
        kv_heads: 2,
        ..TinySpec::default()
    });
    let c = model.config();
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim
        ),
        (3, 64, 8, 2, 8)
    );
    assert_eq!(
        (c.intermediate_size, c.vocab_size, c.max_position),
        (128, 96, 256)
    );
    assert_eq!(c.rope.style, RopeStyle::Interleaved);
}

#[test]
fn impossible_splits_are_refused_with_the_numbers() {
    let (_dir, model) = load(&TinySpec {
        heads: 8,
        kv_heads: 2,
        ..TinySpec::default()
    });
    let c = model.config();
    assert!(c.check_split(2).is_ok());
    assert!(c.check_split(4).is_ok(), "4 ranks replicate 2 KV heads");
    let err = c.check_split(3).unwrap_err().to_string();
    assert!(
        err.contains("tensor=3") && err.contains("8 attention heads"),
        "{err}"
    );
}

#[test]
fn missing_tensor_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    let spec = TinySpec {
        omit: Some("blk.1.ffn_up.weight"),
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let err = Transformer::from_gguf(&file, Arc::new(SingleRank), Host)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.1.ffn_up.weight") && err.contains("broken.gguf"),
        "{err}"
    );
}

#[test]
fn unknown_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt.gguf");
    write_tiny_gguf(
        &path,
        &TinySpec {
            architecture: "gptneox",
            ..TinySpec::default()
        },
    )
    .unwrap();
    let file = GgufFile::open(&path).unwrap();
    let err = Transformer::from_gguf(&file, Arc::new(SingleRank), Host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("gptneox"), "{err}");
}

/// Every byte of the header, metadata and tensor table of a small model, set to 0x00,
/// 0xFF or with its top bit flipped, and the file cut at every 7th byte: each is either
/// refused with an error or loads and runs a forward step. Never a panic: a worker
/// handed a damaged file must say so, not crash.
#[test]
fn damaged_files_are_refused_or_run_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("tiny.gguf");
    write_tiny_gguf(
        &good,
        &TinySpec {
            dtype: GgmlDType::Q4_1,
            hidden: 64,
            ffn: 128,
            vocab: 64,
            layers: 1,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let bytes = std::fs::read(&good).unwrap();
    // The tensor table ends where the tensors' data starts.
    let data_start =
        candle_core::quantized::gguf_file::Content::read(&mut std::fs::File::open(&good).unwrap())
            .unwrap()
            .tensor_data_offset as usize;
    let path = dir.path().join("damaged.gguf");
    let (mut ran, mut refused) = (0, 0);
    let mut try_file = |damaged: &[u8], what: &str| {
        std::fs::write(&path, damaged).unwrap();
        let outcome = std::panic::catch_unwind(|| -> Result<(), String> {
            let file = GgufFile::open(&path).map_err(|e| e.to_string())?;
            let model = Transformer::from_gguf(&file, Arc::new(SingleRank), Host)
                .map_err(|e| e.to_string())?;
            let mut kv = KvCache::new(model.kv_shape(), 16, 4).unwrap();
            let slot: Vec<u32> = (0..4).collect();
            let span = SeqSpan {
                tokens: &[1, 2, 3],
                start_pos: 0,
                blocks: &slot,
                logits: LogitsFor::Last,
                adapter: None,
            };
            model.forward(&[span], &mut kv).map_err(|e| e.to_string())?;
            Ok(())
        });
        match outcome {
            Ok(Ok(())) => ran += 1,
            Ok(Err(_)) => refused += 1,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{what}: panicked: {msg}");
            }
        }
    };
    for at in 0..data_start {
        let original = bytes[at];
        for value in [0x00, 0xFF, original ^ 0x80] {
            if value == original {
                continue;
            }
            let mut damaged = bytes.clone();
            damaged[at] = value;
            try_file(
                &damaged,
                &format!("byte {at} {original:#04x} -> {value:#04x}"),
            );
        }
    }
    for len in (0..bytes.len()).step_by(7) {
        try_file(&bytes[..len], &format!("cut at {len} of {}", bytes.len()));
    }
    // Both kinds of outcome occur: some damage (a float's low bits) still runs.
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}
