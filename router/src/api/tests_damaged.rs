//! Damaged request bodies never panic: every field of a full request of each API
//! (OpenAI chat and completions, Ollama chat and generate, TGI), replaced by numbers at
//! and past the edges of the integer and float types, strings, null, booleans, arrays
//! and objects, is either a 400 (bad JSON or a bad value, naming it) or a request for
//! the workers.

use serde_json::{Value, json};

use super::{ApiEndpoint, Limits, map_body};

/// Every path to a leaf of `value` (objects by key, arrays by index).
fn leaf_paths(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                leaf_paths(v, path, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(i.to_string());
                leaf_paths(v, path, out);
                path.pop();
            }
        }
        _ => out.push(path.clone()),
    }
}

fn at<'v>(value: &'v mut Value, path: &[String]) -> &'v mut Value {
    path.iter().fold(value, |v, key| match v {
        Value::Array(items) => &mut items[key.parse::<usize>().unwrap()],
        v => &mut v[key.as_str()],
    })
}

#[test]
fn damaged_request_bodies_are_refused_or_mapped_never_panic() {
    let sampling = json!({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "seed": 7, "presence_penalty": 0.1, "frequency_penalty": 0.2,
        "repetition_penalty": 1.1, "stop": ["\n", "END"]});
    let mut openai_chat_body = json!({"model": "m", "stream": true,
        "stream_options": {"include_usage": true}, "max_tokens": 16,
        "max_completion_tokens": 16, "n": 1, "logprobs": true, "top_logprobs": 2,
        "ignore_eos": false, "messages": [{"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
    let mut openai_completion_body = json!({"model": "m", "prompt": ["hello"],
        "max_tokens": 16, "n": 1, "best_of": 1, "logprobs": 2, "echo": true,
        "stream": false, "ignore_eos": true});
    for body in [&mut openai_chat_body, &mut openai_completion_body] {
        body.as_object_mut()
            .unwrap()
            .extend(sampling.as_object().unwrap().clone());
    }
    let options = json!({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "min_p": 0.05,
        "seed": 7, "num_predict": 16, "stop": ["\n"], "repeat_penalty": 1.1,
        "presence_penalty": 0.1, "frequency_penalty": 0.2});
    let bodies: [(&str, Value, ApiEndpoint); 5] = [
        ("openai chat", openai_chat_body, ApiEndpoint::OpenAiChat),
        (
            "openai completion",
            openai_completion_body,
            ApiEndpoint::OpenAiCompletion,
        ),
        (
            "ollama chat",
            json!({"model": "m", "stream": false, "options": options,
                "messages": [{"role": "user", "content": "hi"}]}),
            ApiEndpoint::OllamaChat,
        ),
        (
            "ollama generate",
            json!({"model": "m", "prompt": "hi", "system": "s", "raw": false,
                "stream": true, "options": options}),
            ApiEndpoint::OllamaGenerate,
        ),
        (
            "tgi",
            json!({"inputs": "hi", "stream": false, "model": "m", "parameters": {
                "max_new_tokens": 16, "temperature": 0.7, "top_p": 0.9, "top_k": 40,
                "seed": 7, "stop": ["\n"], "do_sample": true, "details": true,
                "return_full_text": false, "repetition_penalty": 1.1,
                "frequency_penalty": 0.2}}),
            ApiEndpoint::TgiGenerate,
        ),
    ];
    let damages = [
        json!(0),
        json!(-1),
        json!(i64::MAX),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e308),
        json!(-1e308),
        json!(5e-324),
        json!(""),
        json!("x".repeat(100_000)),
        json!(null),
        json!(true),
        json!([]),
        json!([null, 1, "x"]),
        json!({}),
    ];
    let limits = [
        Limits {
            context: None,
            max_tokens: None,
        },
        Limits {
            context: Some(0),
            max_tokens: None,
        },
        Limits {
            context: Some(64),
            max_tokens: Some(32),
        },
    ];
    let (mut mapped, mut refused) = (0, 0);
    for &(api, ref good, endpoint) in &bodies {
        for limit in limits {
            assert!(
                map_body(endpoint, good.to_string().as_bytes(), limit).is_ok()
                    || limit.context == Some(0),
                "{api}: the full request itself is refused"
            );
        }
        let mut paths = Vec::new();
        leaf_paths(good, &mut Vec::new(), &mut paths);
        for path in &paths {
            for damage in &damages {
                let mut body = good.clone();
                *at(&mut body, path) = damage.clone();
                let bytes = body.to_string();
                for limit in limits {
                    match std::panic::catch_unwind(|| map_body(endpoint, bytes.as_bytes(), limit)) {
                        Ok(Ok(_)) => mapped += 1,
                        Ok(Err(e)) => {
                            assert_eq!(e.status, 400, "{api} {path:?}: {e}");
                            refused += 1;
                        }
                        Err(_) => panic!("{api}: {path:?} = {damage} panicked"),
                    }
                }
            }
        }
    }
    assert!(
        mapped > 0 && refused > 0,
        "mapped {mapped}, refused {refused}"
    );
}
