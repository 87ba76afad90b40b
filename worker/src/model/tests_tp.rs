//! Tensor parallelism: a model split over N ranks (threads over the local
//! collective) computes the same logits as one rank.

use std::sync::Arc;

use candle_core::quantized::GgmlDType;

use super::tiny::{TinySpec, write_tiny_gguf};
use super::*;
use crate::comm::{Collective, LocalGroup, SingleRank};
use crate::weights::GgufFile;

const TOKENS: [u32; 9] = [5, 17, 3, 90, 42, 42, 7, 0, 61];

/// Logits of every token, prefilled in two chunks then one decode step, on a
/// group of `world` ranks; rank 0's answer.
fn logits(path: &std::path::Path, world: usize) -> Vec<Vec<f32>> {
    logits_on(path, world, Host)
}

/// [`logits`] on `backend`.
pub(super) fn logits_on<B: Backend + Clone>(
    path: &std::path::Path,
    world: usize,
    backend: B,
) -> Vec<Vec<f32>> {
    let comms: Vec<Arc<dyn Collective>> = if world == 1 {
        vec![Arc::new(SingleRank)]
    } else {
        LocalGroup::new(world)
    };
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let path = path.to_path_buf();
            let backend = backend.clone();
            std::thread::spawn(move || {
                // Each rank computes on its own pool, as a rank process would.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let file = GgufFile::open(&path).unwrap();
                    let model = Transformer::from_gguf(&file, comm, backend).unwrap();
                    let mut kv = model.new_cache(64, 4).unwrap();
                    let slot: Vec<u32> = (0..32).collect();
                    let mut out = Vec::new();
                    let steps: [(&[u32], usize); 3] =
                        [(&TOKENS[..4], 0), (&TOKENS[4..8], 4), (&TOKENS[8..], 8)];
                    for (tokens, start_pos) in steps {
                        let span = SeqSpan {
                            tokens,
                            start_pos,
                            blocks: &slot,
                            logits: LogitsFor::All,
                            adapter: None,
                        };
                        out.extend(model.forward(&[span], &mut kv).unwrap().logits.remove(0));
                    }
                    out
                })
            })
        })
        .collect();
    let mut results: Vec<Vec<Vec<f32>>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    results.swap_remove(0)
}

fn check(spec: &TinySpec, worlds: &[usize], tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    let one = logits(&path, 1);
    for &world in worlds {
        let many = logits(&path, world);
        let worst = one
            .iter()
            .flatten()
            .zip(many.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < tolerance,
            "{spec:?} tensor={world}: logits differ by {worst}"
        );
        let argmax = |rows: &Vec<Vec<f32>>| {
            rows.iter()
                .map(|r| crate::sampling::argmax(r))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            argmax(&one),
            argmax(&many),
            "tensor={world}: greedy tokens differ"
        );
    }
}

#[test]
fn tensor_2_4_8_match_tensor_1_with_4_kv_heads() {
    let spec = TinySpec {
        heads: 8,
        kv_heads: 4,
        ..TinySpec::default()
    };
    check(&spec, &[2, 4, 8], 1e-4);
}

#[test]
fn kv_heads_are_replicated_when_ranks_outnumber_them() {
    // 2 KV heads over 4 and 8 ranks: each rank keeps the KV head its queries use.
    let spec = TinySpec {
        heads: 8,
        kv_heads: 2,
        ..TinySpec::default()
    };
    check(&spec, &[2, 4, 8], 1e-4);
}

#[test]
fn quantised_shards_give_tensor_1_logits_bit_for_bit() {
    // Splits fall on Q8_0 blocks: 512 / 4 and 1024 / 4 are multiples of 32. The
    // row-parallel shards all-reduce f64 sums, rounded once, so every number matches.
    let spec = TinySpec {
        hidden: 512,
        heads: 8,
        kv_heads: 2,
        ffn: 1024,
        dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &spec).unwrap();
    let bits = |rows: Vec<Vec<f32>>| -> Vec<u32> {
        rows.into_iter().flatten().map(f32::to_bits).collect()
    };
    let one = bits(logits(&path, 1));
    for world in [2, 4] {
        let many = bits(logits(&path, world));
        let differ = one.iter().zip(&many).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ,
            0,
            "tensor={world}: {differ} of {} logits differ",
            one.len()
        );
    }
}

#[test]
fn splits_that_cut_quantisation_blocks_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // 64 columns over 4 ranks: 16 per rank, inside one Q8_0 block of 32.
    write_tiny_gguf(
        &path,
        &TinySpec {
            heads: 8,
            kv_heads: 4,
            dtype: GgmlDType::Q8_0,
            ..TinySpec::default()
        },
    )
    .unwrap();
    let comms = LocalGroup::new(4);
    let file = GgufFile::open(&path).unwrap();
    let err = Transformer::from_gguf(&file, comms[1].clone(), Host)
        .unwrap_err()
        .to_string();
    assert!(err.contains("32"), "{err}");
}
