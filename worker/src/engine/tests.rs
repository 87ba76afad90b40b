//! Continuous batching on the demo model: a request's greedy answer does not
//! depend on what runs beside it, every block comes back, preemption under a
//! tiny cache changes nothing, and a shared prefix is computed once.

use std::collections::HashMap;

use super::*;
use crate::sampling::SamplingParams;
use crate::tokenizer::ChatMessage;
use shardserve_e2e::demo_model;

fn load(options: EngineOptions) -> Engine {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    let path = demo_model();
    Engine::load(&path, &options)
        .unwrap_or_else(|e| panic!("cannot load the demo model {}: {e}", path.display()))
}

fn chat(system: Option<&str>, user: &str, max_tokens: usize) -> GenerationRequest {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage {
            role: "system".into(),
            content: system.into(),
        });
    }
    messages.push(ChatMessage {
        role: "user".into(),
        content: user.into(),
    });
    let mut req = GenerationRequest::new(Prompt::Chat(messages));
    req.stopping.max_tokens = Some(max_tokens);
    req
}

/// Steps until every added request has ended; returns each one's events.
fn drain(engine: &mut Engine) -> (HashMap<SeqId, Finished>, usize) {
    let mut finished = HashMap::new();
    let mut widest = 0;
    while engine.has_work() {
        let events = engine.step().expect("step");
        widest = widest.max(engine.stats().last_batch_seqs as usize);
        for StepEvent { seq, event } in events {
            match event {
                EngineEvent::Token(_) => {}
                EngineEvent::Finished(f) => {
                    finished.insert(seq, f);
                }
                EngineEvent::Error(e) => panic!("request {seq} failed: {e}"),
            }
        }
    }
    (finished, widest)
}

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 12?",
    "Name a famous painter.",
    "한국의 수도는 어디인가요?",
    "Translate 'good morning' into German.",
];

#[test]
fn a_greedy_answer_is_the_same_alone_and_in_a_batch_of_16() {
    let target = chat(None, "Tell me a short story about a robot.", 32);
    let mut engine = load(EngineOptions::default());
    let alone = engine
        .generate(&target, &mut |_| Flow::Continue)
        .unwrap()
        .unwrap();

    // Fifteen others: short and long prompts, sampled and greedy, stop strings,
    // prompt scoring, different lengths; they join while the target runs.
    let mut ids = Vec::new();
    for (i, q) in QUESTIONS
        .iter()
        .chain(QUESTIONS.iter())
        .take(15)
        .enumerate()
    {
        let mut req = chat(None, q, 8 + (i * 5) % 30);
        match i % 4 {
            0 => {
                req.sampling = SamplingParams {
                    temperature: 0.8,
                    seed: Some(i as u64),
                    ..SamplingParams::default()
                }
            }
            1 => req.stopping.stop = vec![".".into()],
            2 => req.prompt_logprobs = Some(1),
            _ => {}
        }
        if i == 7 {
            // A long prompt, read in several chunks while the others decode.
            req = chat(Some(&"Be helpful and precise. ".repeat(120)), q, 6);
        }
        ids.push(engine.add(req).unwrap());
        if i == 3 {
            ids.push(engine.add(target.clone()).unwrap());
        }
        // Let some start before others arrive.
        if i % 5 == 0 {
            engine.step().unwrap();
        }
    }
    let target_id = ids[4];
    let (finished, widest) = drain(&mut engine);
    assert!(widest >= 8, "the batch held {widest} sequences at most");
    assert_eq!(finished.len(), 16);
    assert_eq!(finished[&target_id].token_ids, alone.token_ids);
    assert_eq!(finished[&target_id].text, alone.text);
    let stats = engine.stats();
    assert_eq!(stats.kv_blocks_used, 0, "every block came back");
    assert_eq!(stats.running + stats.waiting, 0);
}

#[test]
fn a_tiny_cache_preempts_and_every_answer_stays_the_same() {
    let requests: Vec<_> = QUESTIONS[..6]
        .iter()
        .map(|q| {
            let mut r = chat(Some("You answer at length."), q, 40);
            r.stopping.ignore_eos = true;
            r
        })
        .collect();
    let run = |options: EngineOptions| {
        let mut engine = load(options);
        let ids: Vec<_> = requests
            .iter()
            .map(|r| engine.add(r.clone()).unwrap())
            .collect();
        let (finished, _) = drain(&mut engine);
        let stats = engine.stats();
        assert_eq!(stats.kv_blocks_used, 0);
        let answers: Vec<_> = ids
            .iter()
            .map(|id| finished[id].token_ids.clone())
            .collect();
        (answers, stats.preemptions)
    };
    let (roomy, none) = run(EngineOptions::default());
    assert_eq!(none, 0);
    let mut tight = EngineOptions {
        block_size: 16,
        ..EngineOptions::default()
    };
    // Eight blocks of 16: 128 positions, a little more than one sequence.
    let probe = load(EngineOptions::default());
    let block = crate::kv::KvShape {
        layers: probe.info().config.num_layers,
        kv_heads: probe.info().config.num_kv_heads,
        head_dim: probe.info().config.head_dim,
    }
    .block_bytes(16);
    drop(probe);
    tight.kv_cache_bytes = Some(8 * block);
    let (squeezed, preemptions) = run(tight);
    assert!(preemptions > 0, "the tiny cache forced preemptions");
    assert_eq!(squeezed, roomy);
}

#[test]
fn a_shared_1000_token_system_prompt_is_computed_once() {
    let system =
        "You are the support assistant of a bank. Answer briefly and politely. ".repeat(80);
    let first = chat(Some(&system), "How do I open an account?", 4);
    let second = chat(Some(&system), "What are your opening hours?", 4);

    let mut engine = load(EngineOptions::default());
    let prompt_len = engine.validate(&second).unwrap().len();
    assert!(prompt_len > 1000, "the prompt has {prompt_len} tokens");
    engine.generate(&first, &mut |_| Flow::Continue).unwrap();
    let before = engine.stats();
    let reused = engine
        .generate(&second, &mut |_| Flow::Continue)
        .unwrap()
        .unwrap();
    let after = engine.stats();
    let hit = (after.prefix_hit_tokens - before.prefix_hit_tokens) as usize;
    let computed = (after.computed_tokens - before.computed_tokens) as usize;
    assert!(hit >= 1000, "{hit} prompt tokens came from the cache");
    // Only the new tokens (the part after the last shared block) and the
    // decode steps were computed.
    assert_eq!(computed, prompt_len - hit + reused.token_ids.len() - 1);

    // The same answer as computing everything.
    let mut fresh = load(EngineOptions::default());
    let full = fresh
        .generate(&second, &mut |_| Flow::Continue)
        .unwrap()
        .unwrap();
    assert_eq!(reused.token_ids, full.token_ids);
}

#[test]
fn cancelled_and_refused_requests_leave_no_blocks_behind() {
    let mut engine = load(EngineOptions {
        max_seq_len: Some(256),
        ..EngineOptions::default()
    });
    let a = engine.add(chat(None, QUESTIONS[0], 50)).unwrap();
    let b = engine.add(chat(None, QUESTIONS[1], 50)).unwrap();
    for _ in 0..3 {
        engine.step().unwrap();
    }
    assert!(engine.stats().kv_blocks_used > 0);
    engine.cancel(a);
    engine.cancel(b);
    assert_eq!(engine.stats().kv_blocks_used, 0);
    assert!(!engine.has_work());

    let too_long = GenerationRequest::new(Prompt::Ids(vec![1; 300]));
    assert!(matches!(
        engine.add(too_long),
        Err(EngineError::InvalidRequest(_))
    ));
    assert_eq!(engine.stats().kv_blocks_used, 0);
    assert!(!engine.has_work());
}

#[test]
fn a_model_stored_otherwise_than_its_manifest_says_is_refused() {
    assert_eq!(weight_dtype_name("gguf:Q4_1"), "q4_1");
    assert_eq!(weight_dtype_name("gguf:Q6K"), "q6_k");
    assert_eq!(weight_dtype_name("safetensors:BF16"), "bfloat16");
    let err = Engine::load(
        &demo_model(),
        &EngineOptions {
            weight_dtype: Some("float16".into()),
            ..EngineOptions::default()
        },
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("q4_1 (gguf:Q4_1)") && err.contains("float16"),
        "{err}"
    );
    load(EngineOptions {
        weight_dtype: Some("q4_1".into()),
        ..EngineOptions::default()
    });
}

#[test]
fn a_failed_kernel_ends_a_gpu_engine_but_only_the_requests_of_a_cpu_engine() {
    let mut engine = load(EngineOptions::default());
    let kernel = EngineError::from(candle_core::Error::Msg(
        "DriverError(CUDA_ERROR_ILLEGAL_ADDRESS, \"an illegal memory access\")".into(),
    ));
    let caller = EngineError::InvalidRequest("bad".into());
    assert!(!engine.ends_the_engine(&kernel), "the CPU engine goes on");
    engine.device_failures_are_fatal = true;
    assert!(engine.ends_the_engine(&kernel), "a GPU's context is gone");
    assert!(!engine.ends_the_engine(&caller));
    let group = EngineError::GroupFailed("rank 1 is gone".into());
    assert!(group.is_group_failure() && engine.ends_the_engine(&group));
}

#[test]
fn out_of_memory_at_load_says_what_was_needed_and_what_to_change() {
    let oom = EngineError::from(candle_core::Error::Msg(
        "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
    ));
    assert!(is_out_of_memory(&oom));
    assert!(!is_out_of_memory(&EngineError::InvalidRequest("x".into())));

    let gib = 1usize << 30;
    let message = weights_do_not_fit(140 * gib as u64, 2, Some((gib / 2, 80 * gib))).to_string();
    for part in [
        "at least 70.0 GiB",
        "140.0 GiB of weights over tensor=2",
        "80.0 GiB, 0.5 GiB of it free",
        "Raise tensor",
        "--gpu-memory-utilization",
    ] {
        assert!(message.contains(part), "{part}: {message}");
    }
    // On disk: a GGUF file's size, a directory's safetensors shards.
    let dir = tempfile::tempdir().unwrap();
    for (name, len) in [
        ("a.safetensors", 3000),
        ("b.safetensors", 500),
        ("config.json", 99),
    ] {
        std::fs::write(dir.path().join(name), vec![0u8; len]).unwrap();
    }
    assert_eq!(weights_on_disk(dir.path()), 3500);
    assert_eq!(weights_on_disk(&dir.path().join("config.json")), 99);
}

#[test]
fn the_engine_times_its_steps_and_their_forward_passes() {
    let mut engine = load(EngineOptions::default());
    let before = engine.time_spent();
    let mut marks = Vec::new();
    engine
        .run_fixed_batch(
            &[vec![1, 9690, 198], vec![1, 9690, 198, 42]],
            &[],
            &SamplingParams::default(),
            4,
            |_, spent| marks.push(spent),
        )
        .unwrap();
    let spent = engine.time_spent().since(&before);
    assert_eq!(spent.steps, engine.stats().steps - before.steps);
    assert!(spent.steps >= 4, "{spent:?}");
    assert!(
        spent.forward > Duration::ZERO && spent.step > spent.forward,
        "{spent:?}"
    );
    // Prefilled, then decoded: the decode's four steps are the marks' difference.
    let decode = marks[1].since(&marks[0]);
    assert_eq!(decode.steps, 4, "{marks:?}");
    assert!(decode.step >= decode.forward && decode.forward > Duration::ZERO);
}
