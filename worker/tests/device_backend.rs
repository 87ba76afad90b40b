//! The device backend (candle tensors; here on candle's CPU device, as
//! `--device candle-cpu` runs it) against the CPU engine on the demo model: the same
//! best token, teacher-forced over `shared/golden/`'s prompts, at tensor 1 and 3; and
//! under continuous batching each greedy answer is the answer the model gives alone;
//! a seeded sampled answer is drawn alike on both.

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use serde_json::Value;
use shardserve_e2e::demo_model;
use shardserve_worker::comm::{Collective, LocalGroup, SingleRank};
use shardserve_worker::device::Compute;
use shardserve_worker::engine::{
    Engine, EngineEvent, EngineOptions, GenerationRequest, LogprobEntry, Prompt, StepEvent,
};
use shardserve_worker::sampling::SamplingParams;

fn golden_prompts() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/golden/smollm2-q4_1-chat.jsonl");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("golden file missing at {}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).expect("golden line is JSON"))
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Each rank on a compute pool of its own, as a rank process would be: a rank
/// blocked in a collective must not hold a thread another rank needs.
fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

/// Rank 0 of a group of `tensor` ranks on `compute` (the followers run on threads of
/// their own until the leader drops), and the leader's pool.
struct Group {
    leader: Option<Engine>,
    pool: rayon::ThreadPool,
    followers: Vec<std::thread::JoinHandle<()>>,
}

impl Group {
    fn load(tensor: usize, compute: Compute) -> Self {
        let path = demo_model();
        let comms: Vec<Arc<dyn Collective>> = if tensor == 1 {
            vec![Arc::new(SingleRank)]
        } else {
            LocalGroup::new(tensor)
        };
        let mut comms = comms.into_iter();
        let leader_comm = comms.next().unwrap();
        let followers = comms
            .map(|comm| {
                let (path, compute) = (path.clone(), compute.clone());
                std::thread::spawn(move || {
                    pool(1).install(|| {
                        let mut engine =
                            Engine::load_rank(&path, &EngineOptions::default(), comm, compute)
                                .expect("follower loads");
                        engine.agree_on_kv_cache().expect("follower meets");
                        let _ = engine.follow();
                    })
                })
            })
            .collect();
        let pool = pool(2);
        let leader = pool.install(|| {
            let mut engine =
                Engine::load_rank(&path, &EngineOptions::default(), leader_comm, compute)
                    .unwrap_or_else(|e| {
                        panic!("cannot load the demo model {}: {e}", path.display())
                    });
            engine.agree_on_kv_cache().expect("leader meets");
            engine
        });
        Self {
            leader: Some(leader),
            pool,
            followers,
        }
    }

    fn run<R: Send>(&mut self, f: impl FnOnce(&mut Engine) -> R + Send) -> R {
        let engine = self.leader.as_mut().unwrap();
        self.pool.install(|| f(engine))
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        drop(self.leader.take()); // tells the followers to stop
        for f in self.followers.drain(..) {
            let _ = f.join();
        }
    }
}

fn candle_cpu() -> Compute {
    Compute::Device(Device::Cpu)
}

/// Scores `prompt + answer` teacher-forced: per answer position, the best `k`
/// alternatives `(id, logprob)`.
fn score(engine: &mut Engine, prompt: &[u32], answer: &[u32], k: usize) -> Vec<Vec<(u32, f32)>> {
    let all: Vec<u32> = prompt.iter().chain(answer).copied().collect();
    let mut req = GenerationRequest::new(Prompt::Ids(all));
    req.stopping.max_tokens = Some(0);
    req.prompt_logprobs = Some(k);
    let done = engine
        .generate(&req, &mut |_| unreachable!("no tokens generated"))
        .unwrap()
        .unwrap();
    let scores = done.prompt_logprobs.expect("prompt logprobs");
    (0..answer.len())
        .map(|i| {
            scores[prompt.len() + i]
                .as_ref()
                .expect("entry")
                .top
                .iter()
                .map(|t| (t.id, t.logprob))
                .collect()
        })
        .collect()
}

fn teacher_forced_agreement(tensor: usize) {
    let cases = golden_prompts();
    let mut host = Group::load(1, Compute::Host);
    let reference: Vec<Vec<Vec<(u32, f32)>>> = cases
        .iter()
        .map(|c| host.run(|e| score(e, &ids(&c["chat_prompt_ids"]), &ids(&c["greedy_ids"]), 1)))
        .collect();
    drop(host);
    let mut device = Group::load(tensor, candle_cpu());
    let (mut agree, mut total, mut worst) = (0usize, 0usize, 0f32);
    for (case, want) in cases.iter().zip(&reference) {
        let got = device.run(|e| {
            score(
                e,
                &ids(&case["chat_prompt_ids"]),
                &ids(&case["greedy_ids"]),
                20,
            )
        });
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let (host_best, best) = (w[0].0, g[0]);
            total += 1;
            if host_best == best.0 {
                agree += 1;
                continue;
            }
            // The CPU engine's choice, as the device backend scores it.
            let margin = g
                .iter()
                .find(|(id, _)| *id == host_best)
                .map_or(f32::INFINITY, |(_, lp)| best.1 - lp);
            eprintln!(
                "{} position {i}: CPU engine {host_best}, device backend {} ({margin:.3} nats apart)",
                case["id"], best.0
            );
            worst = worst.max(margin);
        }
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "tensor {tensor}: device backend's best token equals the CPU engine's at {agree}/{total} = {:.2}%, worst margin {worst:.3} nats",
        rate * 100.0
    );
    assert!(rate >= 0.99, "agreement {:.2}% is below 99%", rate * 100.0);
    assert!(
        worst <= 0.1,
        "the CPU engine's token is {worst:.3} nats below the device's best (limit 0.1)"
    );
}

#[test]
fn device_backend_agrees_with_the_cpu_engine_at_tensor_1() {
    teacher_forced_agreement(1);
}

#[test]
fn device_backend_agrees_with_the_cpu_engine_at_tensor_3() {
    teacher_forced_agreement(3);
}

fn chat(question: &str, max_tokens: usize) -> GenerationRequest {
    let mut req = GenerationRequest::new(Prompt::Chat(vec![
        shardserve_worker::tokenizer::ChatMessage {
            role: "user".into(),
            content: question.into(),
        },
    ]));
    req.stopping.max_tokens = Some(max_tokens);
    req
}

#[test]
fn device_backend_answers_in_a_batch_of_16_as_alone() {
    let questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three prime numbers.",
        "Explain photosynthesis in one sentence.",
        "Tell me a short story about a robot.",
        "Name a famous painter.",
        "한국의 수도는 어디인가요?",
        "Translate 'good morning' into German.",
    ];
    let mut device = Group::load(1, candle_cpu());
    device.run(|engine| {
        // Sixteen requests: greedy ones of several lengths, sampled ones, stop strings,
        // prompt scoring and a long prompt read in chunks, joining while others run.
        let mut greedy = Vec::new();
        let mut ids = Vec::new();
        for i in 0..16 {
            let q = questions[i % questions.len()];
            let mut req = chat(q, 12 + (i * 7) % 28);
            match i % 4 {
                1 => {
                    req.sampling = SamplingParams {
                        temperature: 0.8,
                        seed: Some(i as u64),
                        ..SamplingParams::default()
                    }
                }
                2 if i == 6 => req.prompt_logprobs = Some(1),
                3 if i == 7 => {
                    req = chat(&format!("{} {q}", "Be helpful and precise.".repeat(60)), 8)
                }
                _ => {}
            }
            let greedy_request = req.sampling.temperature == 0.0;
            let id = engine.add(req.clone()).unwrap();
            if greedy_request {
                greedy.push((id, req));
            }
            ids.push(id);
            if i % 3 == 0 {
                engine.step().unwrap();
            }
        }
        let mut answers = std::collections::HashMap::new();
        let mut widest = 0;
        while engine.has_work() {
            for StepEvent { seq, event } in engine.step().unwrap() {
                match event {
                    EngineEvent::Finished(f) => {
                        answers.insert(seq, f);
                    }
                    EngineEvent::Error(e) => panic!("request {seq} failed: {e}"),
                    EngineEvent::Token(_) => {}
                }
            }
            widest = widest.max(engine.stats().last_batch_seqs);
        }
        assert_eq!(answers.len(), 16);
        assert!(widest >= 8, "the batch held {widest} sequences at most");
        // Each greedy answer, scored alone and teacher-forced: its tokens are the
        // model's own best choices.
        let (mut agree, mut total) = (0usize, 0usize);
        for (id, req) in &greedy {
            let answer = &answers[id];
            let prompt = engine.validate(req).unwrap();
            let alone = score(engine, &prompt, &answer.token_ids, 1);
            for (i, (tok, best)) in answer.token_ids.iter().zip(&alone).enumerate() {
                total += 1;
                if *tok == best[0].0 {
                    agree += 1;
                } else {
                    eprintln!("request {id} token {i}: batch {tok}, alone {}", best[0].0);
                }
            }
        }
        let rate = agree as f64 / total as f64;
        eprintln!(
            "greedy answers in the batch agree with the alone answers at {agree}/{total} = {:.2}%",
            rate * 100.0
        );
        assert!(total >= 100, "only {total} greedy tokens compared");
        assert!(
            rate >= 0.995,
            "agreement {:.2}% is below 99.5%",
            rate * 100.0
        );
        assert_eq!(engine.stats().kv_blocks_used, 0, "every block came back");
    });
}

/// Every answer of `requests`, run together on `engine`, in order: its tokens and
/// their log-probability entries (when asked for).
fn answers(
    engine: &mut Engine,
    requests: &[GenerationRequest],
) -> Vec<Vec<(u32, Option<LogprobEntry>)>> {
    let ids: Vec<_> = requests
        .iter()
        .map(|r| engine.add(r.clone()).unwrap())
        .collect();
    let mut tokens: std::collections::HashMap<_, Vec<_>> = std::collections::HashMap::new();
    while engine.has_work() {
        for StepEvent { seq, event } in engine.step().unwrap() {
            match event {
                EngineEvent::Token(t) => tokens.entry(seq).or_default().push((t.id, t.logprob)),
                EngineEvent::Error(e) => panic!("request {seq} failed: {e}"),
                EngineEvent::Finished(_) => {}
            }
        }
    }
    ids.iter()
        .map(|id| tokens.remove(id).unwrap_or_default())
        .collect()
}

#[test]
fn a_seeded_sampled_answer_is_drawn_alike_on_the_device_and_the_cpu_engine() {
    // The device draws sampled tokens itself, after their penalties (only their ids,
    // and the log-probabilities asked for, come back) from the sequence's seeded
    // uniform numbers, as the CPU engine draws them on the host: the same seed gives
    // the same answer where the logits agree.
    // (temperature, top-k, top-p, min-p, repetition, presence, frequency penalties)
    let settings = [
        (0.8, 0, 1.0, 0.0, 1.0, 0.0, 0.0),
        (1.0, 0, 0.9, 0.0, 1.3, 0.0, 0.0),
        (0.7, 40, 1.0, 0.0, 1.0, 0.5, 0.3),
        (1.2, 0, 1.0, 0.05, 1.0, 0.0, 0.0),
        (0.9, 20, 0.8, 0.02, 1.1, 0.2, 0.1),
        (1.5, 0, 0.95, 0.0, 1.0, 0.0, 0.0),
        (0.0, 0, 1.0, 0.0, 1.5, 0.0, 0.8),
    ];
    let requests: Vec<GenerationRequest> = settings
        .iter()
        .enumerate()
        .map(
            |(i, &(temperature, top_k, top_p, min_p, repetition, presence, frequency))| {
                let mut req = chat("Tell me a short story about a robot.", 24);
                req.sampling = SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repetition_penalty: repetition,
                    presence_penalty: presence,
                    frequency_penalty: frequency,
                    seed: Some(100 + i as u64),
                };
                req.logprobs = (i % 2 == 0).then_some(3);
                req
            },
        )
        .collect();
    let on_cpu = Group::load(1, Compute::Host).run(|e| answers(e, &requests));
    let on_device = Group::load(1, candle_cpu()).run(|e| answers(e, &requests));
    let ids = |a: &Vec<(u32, Option<LogprobEntry>)>| a.iter().map(|t| t.0).collect::<Vec<_>>();
    let same = on_cpu
        .iter()
        .zip(&on_device)
        .filter(|(a, b)| ids(a) == ids(b))
        .count();
    for (i, (a, b)) in on_cpu.iter().zip(&on_device).enumerate() {
        eprintln!(
            "{:?}: cpu {:?}\n        device {:?}",
            settings[i],
            ids(a),
            ids(b)
        );
    }
    eprintln!("{same}/{} seeded answers identical", requests.len());
    assert!(same >= 6, "only {same} of 7 seeded answers are the same");
    // Log-probabilities taken on the device: the CPU engine's, for the same tokens.
    let mut entries = 0;
    for (a, b) in on_cpu
        .iter()
        .zip(&on_device)
        .filter(|(a, b)| ids(a) == ids(b))
    {
        for ((_, x), (_, y)) in a.iter().zip(b) {
            assert_eq!(x.is_some(), y.is_some());
            let (Some(x), Some(y)) = (x, y) else { continue };
            let pairs = std::iter::once((&x.token, &y.token)).chain(x.top.iter().zip(&y.top));
            for (p, q) in pairs {
                assert_eq!(p.id, q.id);
                assert!((p.logprob - q.logprob).abs() < 1e-4, "{x:?} vs {y:?}");
            }
            assert_eq!(x.top.len(), 3);
            entries += 1;
        }
    }
    assert!(
        entries >= 24,
        "only {entries} log-probability entries compared"
    );
    // And they are draws: not every answer is the greedy one.
    let mut greedy = requests[0].clone();
    greedy.sampling = SamplingParams::default();
    let best = Group::load(1, Compute::Host).run(|e| answers(e, &[greedy]));
    assert!(on_device.iter().any(|a| ids(a) != ids(&best[0])));
}
