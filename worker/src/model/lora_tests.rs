//! LoRA adapters applied unmerged, per row: equal to the merged weights, mixed
//! in one step with other adapters and the base, and split over ranks.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

use super::tiny::{TinySpec, tiny_tensors, write_gguf, write_tiny_gguf};
use super::*;
use crate::comm::{LocalGroup, SingleRank};
use crate::lora::testing::TestAdapter;
use crate::lora::{Adapter, Target};
use crate::weights::GgufFile;

const TOKENS: [u32; 7] = [5, 17, 3, 90, 42, 7, 61];

fn open(path: &std::path::Path, comm: Arc<dyn Collective>) -> Transformer {
    Transformer::from_gguf(&GgufFile::open(path).unwrap(), comm, Host).unwrap()
}

/// Every token's logits of `tokens` for each `(adapter slot, tokens)` span,
/// prefilled together in one step.
fn step<B: Backend>(model: &Transformer<B>, spans: &[(Option<u32>, &[u32])]) -> Vec<Vec<Vec<f32>>> {
    let mut kv = model.new_cache(64, 4).unwrap();
    let tables: Vec<Vec<u32>> = (0..spans.len() as u32)
        .map(|i| (i * 8..i * 8 + 8).collect())
        .collect();
    let spans: Vec<SeqSpan<'_>> = spans
        .iter()
        .zip(&tables)
        .map(|(&(adapter, tokens), blocks)| SeqSpan {
            tokens,
            start_pos: 0,
            blocks,
            logits: LogitsFor::All,
            adapter,
        })
        .collect();
    model.forward(&spans, &mut kv).unwrap().logits
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn an_adapter_unmerged_equals_its_weights_merged_into_the_base() {
    let spec = TinySpec::default();
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.gguf");
    let mut tensors = tiny_tensors(&spec).unwrap();
    write_gguf(&base_path, &spec, &tensors).unwrap();
    let mut base = open(&base_path, Arc::new(SingleRank));
    let cfg = base.config().clone();

    let adapter = TestAdapter::random(&cfg, 4, &Target::ALL, 21);
    let lora_path = dir.path().join("lora.gguf");
    adapter.write_gguf(&lora_path, &cfg);
    adapter.merge_into(&mut tensors);
    let merged_path = dir.path().join("merged.gguf");
    write_gguf(&merged_path, &spec, &tensors).unwrap();
    let merged = open(&merged_path, Arc::new(SingleRank));

    base.load_adapter(3, &Adapter::open(&lora_path, &cfg, 16).unwrap())
        .unwrap();
    let with = step(&base, &[(Some(3), &TOKENS)]).remove(0);
    let plain = step(&base, &[(None, &TOKENS)]).remove(0);
    let want = step(&merged, &[(None, &TOKENS)]).remove(0);
    assert!(
        worst(&with, &want) < 1e-3,
        "differ by {}",
        worst(&with, &want)
    );
    assert!(
        worst(&plain, &want) > 0.1,
        "the adapter must change the answer"
    );
}

#[test]
fn rows_of_two_adapters_and_the_base_in_one_step_equal_each_alone() {
    let spec = TinySpec {
        dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    write_tiny_gguf(&path, &spec).unwrap();
    let mut model = open(&path, Arc::new(SingleRank));
    let cfg = model.config().clone();
    for (slot, targets, seed) in [
        (1, &[Target::Q, Target::V][..], 1),
        (2, &Target::ALL[..], 2),
    ] {
        let lora = dir.path().join(format!("lora{slot}"));
        TestAdapter::random(&cfg, 2 * slot as usize, targets, seed).write_peft(
            &lora,
            &cfg,
            serde_json::json!({}),
        );
        model
            .load_adapter(slot, &Adapter::open(&lora, &cfg, 16).unwrap())
            .unwrap();
    }
    let spans: [(Option<u32>, &[u32]); 4] = [
        (Some(2), &TOKENS[..5]),
        (None, &TOKENS[2..]),
        (Some(1), &TOKENS),
        (Some(2), &TOKENS[1..4]),
    ];
    let together = step(&model, &spans);
    for (i, span) in spans.iter().enumerate() {
        let alone = step(&model, &[*span]).remove(0);
        assert_eq!(together[i], alone, "span {i} differs in the batch");
    }
    assert_ne!(
        step(&model, &[(Some(1), &TOKENS)]),
        step(&model, &[(Some(2), &TOKENS)])
    );

    model.unload_adapter(1);
    let mut kv = model.new_cache(8, 4).unwrap();
    let span = SeqSpan {
        tokens: &TOKENS,
        start_pos: 0,
        blocks: &[0, 1],
        logits: LogitsFor::Last,
        adapter: Some(1),
    };
    let err = model.forward(&[span], &mut kv).unwrap_err();
    assert!(
        matches!(err, ModelError::UnknownAdapter { slot: 1 }),
        "{err}"
    );
}

/// Rank 0's logits of the spans on `world` ranks, each rank with its shard of
/// the adapter in slot 0.
fn logits_on_ranks(path: &std::path::Path, adapter: &Adapter, world: usize) -> Vec<Vec<Vec<f32>>> {
    let comms: Vec<Arc<dyn Collective>> = if world == 1 {
        vec![Arc::new(SingleRank)]
    } else {
        LocalGroup::new(world)
    };
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let path = path.to_path_buf();
            let adapter = adapter.clone();
            std::thread::spawn(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut model = open(&path, comm);
                    model.load_adapter(0, &adapter).unwrap();
                    step(
                        &model,
                        &[
                            (Some(0), &TOKENS),
                            (None, &TOKENS[..4]),
                            (Some(0), &TOKENS[3..]),
                        ],
                    )
                })
            })
        })
        .collect();
    let mut results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.swap_remove(0)
}

#[test]
fn tensor_2_and_4_with_an_adapter_equal_tensor_1_to_the_bit_on_block_formats() {
    let spec = TinySpec {
        dtype: GgmlDType::Q8_0,
        hidden: 128,
        ffn: 256,
        heads: 4,
        kv_heads: 2,
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    write_tiny_gguf(&path, &spec).unwrap();
    let cfg = ModelConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let lora = dir.path().join("lora");
    TestAdapter::random(&cfg, 8, &Target::ALL, 4).write_peft(&lora, &cfg, serde_json::json!({}));
    let adapter = Adapter::open(&lora, &cfg, 16).unwrap();
    let one = logits_on_ranks(&path, &adapter, 1);
    for world in [2, 4] {
        assert_eq!(
            logits_on_ranks(&path, &adapter, world),
            one,
            "tensor {world} differs from tensor 1"
        );
    }
}

/// The device backend with candle's own products (what a GPU runs): an adapter's
/// rows gathered, two small products and an index-add on the device agree with
/// the CPU engine's f64 adapter products, rows of two adapters and the base mixed.
#[test]
fn the_device_backends_adapter_products_agree_with_the_cpu_engines() {
    adapter_products_agree(TinySpec::default(), 1e-4);
}

/// The same over bf16 base weights, whose products stay bf16 on the device backend
/// until the adapters add to them in f32.
#[test]
fn adapters_add_to_bf16_products_on_the_device_backend() {
    let spec = TinySpec {
        dtype: candle_core::quantized::GgmlDType::BF16,
        ..TinySpec::default()
    };
    adapter_products_agree(spec, 1e-2);
}

fn adapter_products_agree(spec: TinySpec, tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.gguf");
    write_tiny_gguf(&path, &spec).unwrap();
    let mut host = open(&path, Arc::new(SingleRank));
    let cfg = host.config().clone();
    let backend = Tensors::new(candle_core::Device::Cpu, CacheDtype::F16).with_candle_kernels();
    let mut device = Transformer::from_gguf(
        &GgufFile::open(&path).unwrap(),
        Arc::new(SingleRank),
        backend,
    )
    .unwrap();
    for (slot, seed) in [(0, 31), (1, 32)] {
        let lora = dir.path().join(format!("lora{slot}.gguf"));
        TestAdapter::random(&cfg, 4, &Target::ALL, seed).write_gguf(&lora, &cfg);
        let adapter = Adapter::open(&lora, &cfg, 16).unwrap();
        host.load_adapter(slot, &adapter).unwrap();
        device.load_adapter(slot, &adapter).unwrap();
    }
    let spans: [(Option<u32>, &[u32]); 3] =
        [(Some(0), &TOKENS), (None, &TOKENS), (Some(1), &TOKENS[2..])];
    let want = step(&host, &spans);
    let got = step(&device, &spans);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let largest = w.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        let diff = worst(w, g);
        assert!(
            diff <= tolerance * largest.max(1.0),
            "span {i}: differ by {diff} (largest {largest})"
        );
    }
    assert!(
        worst(&want[0], &want[1]) > 0.1,
        "the adapter must change the answer"
    );
}
