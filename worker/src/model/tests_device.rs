//! The device backend (candle tensors, here on candle's CPU device) against the CPU
//! engine on tiny models: the same model split over 1, 2 and 4 ranks gives the CPU
//! engine's logits to within rounding and its greedy tokens exactly.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

use super::tests_tp::logits_on;
use super::tiny::{TinySpec, write_tiny_gguf};
use super::*;

fn device() -> Tensors {
    Tensors::new(Device::Cpu, CacheDtype::F16)
}

fn check(spec: &TinySpec, worlds: &[usize], tolerance: f32) {
    check_on(spec, worlds, tolerance, device());
}

fn check_on(spec: &TinySpec, worlds: &[usize], tolerance: f32, backend: Tensors) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, spec).unwrap();
    let host = logits_on(&path, 1, Host);
    for &world in worlds {
        let dev = logits_on(&path, world, backend.clone());
        assert_eq!(host.len(), dev.len());
        let worst = host
            .iter()
            .flatten()
            .zip(dev.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let largest = host.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
        eprintln!(
            "{:?} tensor={world}: worst logit difference {worst} (largest logit {largest})",
            spec.dtype
        );
        assert!(
            worst < tolerance,
            "tensor={world}: logits differ by {worst}"
        );
        let argmax = |rows: &Vec<Vec<f32>>| {
            rows.iter()
                .map(|r| crate::sampling::argmax(r))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            argmax(&host),
            argmax(&dev),
            "tensor={world}: greedy tokens differ"
        );
    }
}

#[test]
fn device_backend_gives_the_cpu_engines_logits_at_tensor_1_2_4() {
    let spec = TinySpec {
        heads: 8,
        kv_heads: 4,
        ..TinySpec::default()
    };
    check(&spec, &[1, 2, 4], 1e-4);
}

#[test]
fn device_backend_replicates_kv_heads_and_runs_quantised_weights() {
    // 2 KV heads over 4 ranks, Q8_0 weights: on the CPU device through the CPU
    // engine's kernels, and through candle's quantised kernels (a GPU's path), which
    // round the activations to 8 bits apart from ours (a product differs by ~0.5%, see
    // below), so the logits of this random model (up to ~25) agree to about 1.
    let spec = TinySpec {
        hidden: 512,
        heads: 8,
        kv_heads: 2,
        ffn: 1024,
        dtype: GgmlDType::Q8_0,
        ..TinySpec::default()
    };
    check(&spec, &[1, 2, 4], 1e-4);
    check_on(&spec, &[1, 2, 4], 1.5, device().with_candle_kernels());
}

#[test]
fn device_backend_handles_qkv_biases_and_a_separate_head() {
    let spec = TinySpec {
        architecture: "qwen2",
        qkv_bias: true,
        separate_head: true,
        ..TinySpec::default()
    };
    // Dense f32 shards sum their partial products in f32: equal to rounding only.
    check(&spec, &[1, 2], 1e-3);
}

#[test]
fn device_backend_runs_bf16_weights_as_a_gpu_does() {
    // Dense bf16 weights (most safetensors checkpoints): the device backend rounds the
    // activations to bf16 and multiplies in bf16 (cuBLAS on a GPU, candle's CPU gemm
    // here), the CPU engine keeps f32 activations; with a bias and a separate head.
    let spec = TinySpec {
        architecture: "qwen2",
        qkv_bias: true,
        separate_head: true,
        dtype: GgmlDType::BF16,
        ..TinySpec::default()
    };
    check(&spec, &[1, 2], 0.1);
}

#[test]
fn products_of_different_types_are_joined_in_f32() {
    // A layer whose Q/K/V weights differ in type gives an f32 product beside a bf16 one.
    let b = device();
    let a = Tensor::new(&[[1.5f32, -2.0]], &Device::Cpu).unwrap();
    let h = Tensor::new(&[[0.25f32, 3.0, 8.0]], &Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
    let joined = b.concat(vec![a, h]).unwrap();
    assert_eq!(joined.dtype(), candle_core::DType::F32);
    assert_eq!(
        joined.to_vec2::<f32>().unwrap(),
        vec![vec![1.5, -2.0, 0.25, 3.0, 8.0]]
    );
}

#[test]
fn ops_before_a_half_precision_product_hand_it_its_type() {
    // SwiGLU, the norms (and attention) write the type of the product after them: bf16 before a
    // bf16 weight, which then multiplies it without a cast launch; f32 before a
    // quantised one. The values are the f32 ones rounded once.
    use candle_core::DType;
    let b = device();
    let gate_up = Tensor::new(&[[0.5f32, -1.25, 2.0, 3.0]], &Device::Cpu).unwrap();
    let dense = |dtype| {
        let w = Tensor::new(&[[1.0f32, 0.5], [0.25, 2.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        b.matrix(crate::weights::Weight::Dense(w)).unwrap()
    };
    let f32_out = b.swiglu(&gate_up, &dense(DType::F32)).unwrap();
    assert_eq!(f32_out.dtype(), DType::F32);
    for half in [DType::BF16, DType::F16] {
        let out = b.swiglu(&gate_up, &dense(half)).unwrap();
        assert_eq!(out.dtype(), half);
        assert_eq!(
            out.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
            f32_out
                .to_dtype(half)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        );
    }
    let quantised = b
        .matrix(crate::weights::Weight::Ggml(std::sync::Arc::new(
            candle_core::quantized::QTensor::quantize(
                &Tensor::zeros((32, 32), DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::Q8_0,
            )
            .unwrap(),
        )))
        .unwrap();
    assert_eq!(b.swiglu(&gate_up, &quantised).unwrap().dtype(), DType::F32);

    // The norms likewise; the residual add goes into `x` itself, kept in f32.
    let weight = b.vector(vec![1.0, 0.5, 2.0, 1.5]).unwrap();
    let rows = || Tensor::new(&[[0.5f32, -1.25, 2.0, 3.0]], &Device::Cpu).unwrap();
    let y = Tensor::new(&[[1.0f32, 1.0, -1.0, 0.25]], &Device::Cpu).unwrap();
    let mut x = rows();
    let normed = b
        .add_rms_norm(&mut x, &y, &weight, 1e-5, &dense(DType::BF16))
        .unwrap();
    assert_eq!(normed.dtype(), DType::BF16);
    assert_eq!(x.dtype(), DType::F32);
    assert_eq!(
        x.to_vec2::<f32>().unwrap(),
        vec![vec![1.5, -0.25, 1.0, 3.25]]
    );
    let want = b.rms_norm(&x, &weight, 1e-5, &dense(DType::F32)).unwrap();
    assert_eq!(
        normed
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap(),
        want.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
    assert_eq!(
        b.rms_norm(&rows(), &weight, 1e-5, &quantised)
            .unwrap()
            .dtype(),
        DType::F32
    );
}

#[test]
fn a_quantised_product_agrees_with_the_cpu_kernels() {
    use crate::weights::Weight;
    let (n, k, m) = (64, 512, 3);
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|i| ((i * 104729) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    let qt = candle_core::quantized::QTensor::quantize(
        &candle_core::Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(),
        GgmlDType::Q8_0,
    )
    .unwrap();
    let bytes = qt.data().unwrap().to_vec();
    let blocks = shardserve_kernels::QuantMatrix::prepared(
        shardserve_kernels::QuantFormat::Q8_0,
        n,
        k,
        &bytes,
    )
    .unwrap();
    let host = Weight::Blocks(blocks).matmul_t(&x, m).unwrap();
    let blocks = shardserve_kernels::QuantMatrix::prepared(
        shardserve_kernels::QuantFormat::Q8_0,
        n,
        k,
        &bytes,
    )
    .unwrap();
    let dev = device().with_candle_kernels();
    let matrix = dev.matrix(Weight::Blocks(blocks)).unwrap();
    let xt = candle_core::Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap();
    let got = dev
        .linear(&xt, &matrix, None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let worst = host
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let exact = candle_core::Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)
        .unwrap()
        .matmul(&qt.dequantize(&Device::Cpu).unwrap().t().unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let off = |a: &[f32]| {
        exact
            .iter()
            .zip(a)
            .map(|(e, v)| (e - v).abs())
            .fold(0f32, f32::max)
    };
    eprintln!(
        "from the exact product: ours {} candle's {}",
        off(&host),
        off(&got)
    );
    // Both quantise the activations to 8 bits per block of 32, with their own rounding.
    let largest = host.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(
        worst < 0.01 * largest,
        "worst {worst}: {:?} vs {:?}",
        &host[..4],
        &got[..4]
    );
}

/// One prompt as one sequence per `wants` in one step on the device backend (the
/// tiny model), each wanting its logits as told.
fn once_each(tokens: &[u32], wants: Vec<LogitsFor>) -> StepOutput {
    once_each_on(device(), tokens, wants)
}

fn once_each_on<B: Backend>(backend: B, tokens: &[u32], wants: Vec<LogitsFor>) -> StepOutput {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    let file = crate::weights::GgufFile::open(&path).unwrap();
    let model = Transformer::from_gguf(&file, Arc::new(crate::comm::SingleRank), backend).unwrap();
    let per_seq = tokens.len().div_ceil(4) as u32;
    let mut kv = model.new_cache(per_seq as usize * wants.len(), 4).unwrap();
    let slots: Vec<Vec<u32>> = (0..wants.len() as u32)
        .map(|s| (s * per_seq..(s + 1) * per_seq).collect())
        .collect();
    let spans: Vec<SeqSpan<'_>> = slots
        .iter()
        .zip(wants)
        .map(|(blocks, logits)| SeqSpan {
            tokens,
            start_pos: 0,
            blocks,
            logits,
            adapter: None,
        })
        .collect();
    model.forward(&spans, &mut kv).unwrap()
}

/// `got` is `logprobs_of`'s answer for `row` and `id`, to rounding.
fn assert_scores(got: &TokenScores, row: &[f32], id: u32, k: usize) {
    let want = crate::sampling::logprobs_of(row, id, k);
    let pairs = std::iter::once((&got.0, &want.0)).chain(got.1.iter().zip(&want.1));
    for (g, w) in pairs {
        assert_eq!(g.id, w.id);
        assert!((g.logprob - w.logprob).abs() < 1e-5, "{g:?} vs {w:?}");
    }
    assert_eq!(got.1.len(), want.1.len());
}

#[test]
fn the_device_picks_ids_and_log_probabilities_itself() {
    // One prompt three times in a step: the best id with log-probabilities, an id
    // drawn after penalties with them (only those come back), and `Last` (the row
    // comes back): what the device picked is what the host picks from that row.
    let best = Pick {
        logprobs: Some(3),
        ..Pick::BEST
    };
    let drawn = Pick {
        // Penalties on tokens seen (33 is this model's best next token), applied on the
        // device before the draw; log-probabilities stay the raw row's.
        penalties: Some(crate::sampling::Penalties {
            repetition: 1.3,
            presence: 0.5,
            frequency: 0.2,
            seen: vec![(5, 0), (17, 1), (33, 2), (90, 0)],
        }),
        draw: Some(crate::sampling::Draw {
            // Hot, so that the tiny model's draw is not its best id.
            temperature: 8.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.0,
            uniform: 0.61,
        }),
        logprobs: Some(5),
    };
    let out = once_each(
        &[5, 17, 3, 90, 42],
        vec![
            LogitsFor::Pick(best.clone()),
            LogitsFor::Pick(drawn.clone()),
            LogitsFor::Last,
        ],
    );
    assert!(out.logits[0].is_empty() && out.logits[1].is_empty());
    let row = &out.logits[2][0];
    for (got, pick) in out.picked.iter().zip([best, drawn]) {
        let got = got.as_ref().unwrap();
        let want = pick.on_host(row);
        assert_eq!(got.id, want.id);
        let ((g, gtop), (w, wtop)) = (got.logprobs.clone().unwrap(), want.logprobs.unwrap());
        assert_eq!(g.id, w.id);
        assert!((g.logprob - w.logprob).abs() < 1e-5, "{g:?} vs {w:?}");
        assert_eq!(gtop.len(), wtop.len());
        for (g, w) in gtop.iter().zip(&wtop) {
            assert_eq!(g.id, w.id);
            assert!((g.logprob - w.logprob).abs() < 1e-5, "{g:?} vs {w:?}");
        }
    }
    assert_eq!(out.picked[2], None);
    let id = |i: usize| out.picked[i].as_ref().unwrap().id;
    assert_ne!(id(0), id(1), "the draw is not the best id here");
}

#[test]
fn the_device_scores_a_prompt_itself() {
    // A prompt scored where its logits are (only log-probabilities come back), ending
    // in a pick, against the same prompt's rows brought back whole (`All`).
    let tokens = [5, 17, 3, 90, 42, 8];
    let ending = Score {
        next: tokens[1..].to_vec(),
        k: 4,
        pick: Some(Pick::BEST),
    };
    // A chunk whose prompt goes on: every row scored, nothing picked.
    let chunk = Score {
        next: [&tokens[1..], &[77]].concat(),
        k: 2,
        pick: Some(Pick::BEST),
    };
    let out = once_each(
        &tokens,
        vec![
            LogitsFor::Score(ending.clone()),
            LogitsFor::Score(chunk.clone()),
            LogitsFor::All,
        ],
    );
    let rows = &out.logits[2];
    assert!(out.logits[0].is_empty() && out.logits[1].is_empty());
    for (span, score) in [(0, &ending), (1, &chunk)] {
        assert_eq!(out.scores[span].len(), score.next.len());
        for ((got, row), &id) in out.scores[span].iter().zip(rows).zip(&score.next) {
            assert_scores(got, row, id, score.k);
        }
    }
    let last = rows.last().unwrap();
    assert_eq!(
        out.picked,
        [Some(Pick::BEST.on_host(last)), None, None],
        "the ending span picks from its last row; the chunk does not"
    );
}

#[test]
fn a_prompt_longer_than_the_heads_chunk_is_scored_across_chunks() {
    // 300 tokens scored and the same 300 brought back whole: 600 wanted rows, the
    // head computing HEAD_ROWS at a time, the scored rows straddling chunks; on the
    // device backend and on the CPU kernels.
    let tokens: Vec<u32> = (0..300).map(|i| (i * 37 % 96) as u32).collect();
    let score = Score {
        next: tokens[1..].to_vec(),
        k: 3,
        pick: Some(Pick::BEST),
    };
    let wants = || vec![LogitsFor::Score(score.clone()), LogitsFor::All];
    for out in [
        once_each(&tokens, wants()),
        once_each_on(Host, &tokens, wants()),
    ] {
        let rows = &out.logits[1];
        assert_eq!(rows.len(), 300);
        assert_eq!(out.scores[0].len(), 299);
        for ((got, row), &id) in out.scores[0].iter().zip(rows).zip(&score.next) {
            assert_scores(got, row, id, 3);
        }
        assert_eq!(out.picked[0], Some(Pick::BEST.on_host(&rows[299])));
    }
}

/// Greedy decode of three sequences, joining and leaving the batch, on `backend`: each
/// step's logits.
fn decode_steps(path: &std::path::Path, backend: Tensors) -> (Vec<Vec<Vec<f32>>>, Tensors) {
    let file = GgufFile::open(path).unwrap();
    let comm: std::sync::Arc<dyn crate::comm::Collective> =
        std::sync::Arc::new(crate::comm::SingleRank);
    let model = Transformer::from_gguf(&file, comm, backend.clone()).unwrap();
    let mut kv = model.new_cache(48, 4).unwrap();
    let blocks: Vec<Vec<u32>> = (0..3).map(|s| (s * 16..s * 16 + 16).collect()).collect();
    let mut seqs: Vec<Vec<u32>> = vec![vec![5, 9, 2], vec![7, 1, 3, 8, 4, 6], vec![11; 9]];
    let mut steps = Vec::new();
    // The prompts, together (not a decode step).
    let spans: Vec<SeqSpan> = seqs
        .iter()
        .zip(&blocks)
        .map(|(s, b)| SeqSpan {
            tokens: s,
            start_pos: 0,
            blocks: &b[..s.len().div_ceil(4)],
            logits: LogitsFor::Last,
            adapter: None,
        })
        .collect();
    let out = model.forward(&spans, &mut kv).unwrap().logits;
    let mut next: Vec<u32> = out
        .iter()
        .map(|rows| crate::sampling::argmax(&rows[0]))
        .collect();
    steps.push(out.into_iter().flatten().collect());
    // Decode: sequence 2 sits out every third step, so batches of 3 and 2 alternate,
    // and positions cross blocks (of 4), so tables grow from 1 to 2, 4 and 8 blocks.
    for i in 0..18 {
        let active: Vec<usize> = if i % 3 == 2 {
            vec![0, 1]
        } else {
            vec![0, 1, 2]
        };
        let tokens: Vec<[u32; 1]> = active.iter().map(|&s| [next[s]]).collect();
        let spans: Vec<SeqSpan> = active
            .iter()
            .zip(&tokens)
            .map(|(&s, t)| SeqSpan {
                tokens: t,
                start_pos: seqs[s].len(),
                // The blocks the sequence holds so far, as the block manager hands them.
                blocks: &blocks[s][..(seqs[s].len() + 1).div_ceil(4)],
                logits: LogitsFor::Last,
                adapter: None,
            })
            .collect();
        let out = model.forward(&spans, &mut kv).unwrap().logits;
        for (&s, rows) in active.iter().zip(&out) {
            seqs[s].push(next[s]);
            next[s] = crate::sampling::argmax(&rows[0]);
        }
        steps.push(out.into_iter().flatten().collect());
    }
    (steps, backend)
}

#[test]
fn decode_steps_from_kept_buffers_give_fresh_steps_logits() {
    // What a GPU records once per shape and replays (`SHARDSERVE_CUDA_GRAPHS=1`), on
    // candle's CPU device: the step's work run again over the shape's kept buffers,
    // each step's inputs copied in, block tables padded to a power of two. Bit for bit
    // the logits of steps uploaded afresh.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let spec = TinySpec {
        heads: 8,
        kv_heads: 4,
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec).unwrap();
    let (fresh, _) = decode_steps(&path, device());
    let (kept, backend) = decode_steps(&path, device().with_replays());
    assert_eq!(fresh, kept);
    // 18 decode steps over four (batch, padded table width) shapes: batches of 3 and
    // 2, the longest table 3 to 6 blocks, padded to 4 or 8: all but each shape's first
    // step replayed.
    let replayed = backend.replayed().unwrap();
    eprintln!("{replayed} of 18 decode steps replayed");
    assert_eq!(replayed, 14);
    // The same backend with another model and cache: the shapes kept for the first
    // are dropped (a recording holds its cache's and model's addresses) and kept anew.
    let (again, backend) = decode_steps(&path, backend);
    assert_eq!(fresh, again);
    assert_eq!(backend.replayed().unwrap(), 28);
}

#[test]
fn kept_decode_shapes_are_bounded() {
    // Decode steps of 17 batch sizes keep 17 shapes one after another: the first is
    // dropped when the 17th comes, so a step of batch 1 afterwards is run (and kept)
    // anew, while one of batch 17 is replayed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_tiny_gguf(&path, &TinySpec::default()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let comm: std::sync::Arc<dyn crate::comm::Collective> =
        std::sync::Arc::new(crate::comm::SingleRank);
    let backend = device().with_replays();
    let model = Transformer::from_gguf(&file, comm, backend.clone()).unwrap();
    let mut kv = model.new_cache(32, 4).unwrap();
    let blocks: Vec<Vec<u32>> = (0..17).map(|s| vec![s]).collect();
    let step = |batch: usize, kv: &mut _| {
        let tokens = [3u32];
        let spans: Vec<SeqSpan> = (0..batch)
            .map(|s| SeqSpan {
                tokens: &tokens,
                start_pos: 0,
                blocks: &blocks[s],
                logits: LogitsFor::Last,
                adapter: None,
            })
            .collect();
        model.forward(&spans, kv).unwrap();
    };
    for batch in 1..=17 {
        step(batch, &mut kv);
    }
    assert_eq!(backend.replayed(), Some(0));
    step(17, &mut kv);
    assert_eq!(backend.replayed(), Some(1));
    step(1, &mut kv);
    assert_eq!(backend.replayed(), Some(1), "batch 1's shape was dropped");
    step(1, &mut kv);
    assert_eq!(backend.replayed(), Some(2));
}
