//! Exactness of the engine on the demo model against llama.cpp's reference
//! outputs in `shared/golden/` (see its README): teacher-forced agreement of
//! the engine's best token with the reference at every answer position, and
//! a report of where free-running greedy answers part.

use std::path::PathBuf;

use serde_json::Value;
use shardserve_e2e::demo_model;
use shardserve_worker::engine::{Engine, EngineOptions, GenerationRequest, Prompt};

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

fn engine() -> Engine {
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global();
    Engine::load(&demo_model(), &EngineOptions::default()).expect("demo model loads")
}

#[test]
fn teacher_forced_argmax_agrees_with_reference() {
    let mut engine = engine();
    let (mut agree, mut total) = (0usize, 0usize);
    let mut worst: f32 = 0.0;
    for case in golden_prompts() {
        let prompt = ids(&case["chat_prompt_ids"]);
        let answer = ids(&case["greedy_ids"]);
        let all: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
        let mut req = GenerationRequest::new(Prompt::Ids(all.clone()));
        req.stopping.max_tokens = Some(0);
        req.prompt_logprobs = Some(1);
        let done = engine
            .generate(&req, &mut |_| unreachable!("no tokens generated"))
            .unwrap()
            .unwrap();
        let scores = done.prompt_logprobs.expect("prompt logprobs");
        assert_eq!(scores.len(), all.len());
        let mut case_agree = 0;
        for (i, &want) in answer.iter().enumerate() {
            let entry = scores[prompt.len() + i].as_ref().expect("entry");
            assert_eq!(entry.token.id, want);
            let best = &entry.top[0];
            let margin = best.logprob - entry.token.logprob;
            worst = worst.max(margin);
            if best.id == want || margin == 0.0 {
                case_agree += 1;
            }
        }
        eprintln!(
            "{}: best token equals the reference at {case_agree}/{} answer positions",
            case["id"],
            answer.len()
        );
        agree += case_agree;
        total += answer.len();
    }
    let rate = agree as f64 / total as f64;
    eprintln!(
        "teacher-forced agreement {agree}/{total} = {:.1}%, worst margin {worst:.3} nats",
        rate * 100.0
    );
    assert!(rate >= 0.96, "agreement {:.1}% is below 96%", rate * 100.0);
    assert!(
        worst <= 0.5,
        "the reference token was {worst:.3} nats below the engine's best (limit 0.5)"
    );
}

#[test]
fn first_step_logprobs_are_close_to_reference() {
    let mut engine = engine();
    let mut worst: f32 = 0.0;
    let mut compared = 0;
    for case in golden_prompts() {
        let prompt = ids(&case["chat_prompt_ids"]);
        let answer = ids(&case["greedy_ids"]);
        // Only some reference lines carry the first steps' log-probabilities.
        let Some(steps) = case["top5_logprobs_first8"].as_array() else {
            continue;
        };
        let all: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
        let mut req = GenerationRequest::new(Prompt::Ids(all));
        req.stopping.max_tokens = Some(0);
        req.prompt_logprobs = Some(5);
        let done = engine
            .generate(&req, &mut |_| unreachable!())
            .unwrap()
            .unwrap();
        let scores = done.prompt_logprobs.unwrap();
        // llama-server reports one step per whole UTF-8 character: a step belongs
        // to the last token of its character, found by id from where the last one was.
        let mut next = 0;
        for step in steps {
            let id = step["id"].as_u64().unwrap() as u32;
            let Some(i) = answer[next..]
                .iter()
                .position(|&a| a == id)
                .map(|i| i + next)
            else {
                continue;
            };
            next = i + 1;
            let entry = scores[prompt.len() + i].as_ref().unwrap();
            let want = step["logprob"].as_f64().unwrap() as f32;
            worst = worst.max((entry.token.logprob - want).abs());
            compared += 1;
        }
    }
    eprintln!(
        "largest difference from the reference's log-probabilities over {compared} steps: {worst:.3} nats"
    );
    assert!(
        compared >= 12,
        "only {compared} reference steps could be aligned"
    );
    assert!(
        worst < 0.2,
        "log-probabilities differ from the reference by {worst:.3} nats"
    );
}

#[test]
fn free_running_greedy_answers_are_reported() {
    let mut engine = engine();
    let mut identical = 0;
    let cases = golden_prompts();
    for case in &cases {
        let prompt = ids(&case["chat_prompt_ids"]);
        let reference = ids(&case["greedy_ids"]);
        let mut req = GenerationRequest::new(Prompt::Ids(prompt.clone()));
        let ended_with_eos = case["finish"] == "eos";
        req.stopping.max_tokens = Some(reference.len() + usize::from(ended_with_eos));
        req.logprobs = Some(2);
        let mut steps = Vec::new();
        let done = engine
            .generate(&req, &mut |t| {
                steps.push(t.logprob.clone().expect("logprobs asked"));
                shardserve_worker::engine::Flow::Continue
            })
            .unwrap()
            .unwrap();
        let parted = done
            .token_ids
            .iter()
            .zip(&reference)
            .position(|(a, b)| a != b)
            .or((done.token_ids.len() != reference.len())
                .then(|| done.token_ids.len().min(reference.len())));
        match parted {
            None => {
                identical += 1;
                eprintln!(
                    "{}: identical to the reference for {} tokens",
                    case["id"],
                    done.token_ids.len()
                );
            }
            Some(i) if i == done.token_ids.len() => {
                eprintln!(
                    "{}: the engine ended its answer at token {i}, the reference did not",
                    case["id"]
                );
            }
            Some(i) if i == reference.len() => {
                eprintln!(
                    "{}: the reference ended at token {i}, the engine went on",
                    case["id"]
                );
            }
            Some(i) => {
                let e = &steps[i];
                let margin =
                    e.top[0].logprob - e.top.get(1).map_or(f32::NEG_INFINITY, |t| t.logprob);
                eprintln!(
                    "{}: parts from the reference at token {i}: engine {} vs reference {} (engine's margin between its best two: {margin:.3} nats)",
                    case["id"], done.token_ids[i], reference[i]
                );
                // A faithful engine only parts where the model itself hesitates.
                assert!(
                    margin < 0.5,
                    "{}: confident divergence ({margin:.3} nats) at token {i}",
                    case["id"]
                );
            }
        }
    }
    eprintln!(
        "{identical}/{} free-running answers identical to the reference",
        cases.len()
    );
}
