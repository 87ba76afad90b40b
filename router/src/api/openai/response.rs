//! OpenAI response bodies and stream chunks built from the worker's events,
//! as pure functions.

use serde_json::{Map, Value, json};
use shardserve_proto::v1 as pb;

use crate::api::Collected;

/// Names a chunk or response: id, creation time, model.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub(crate) fn finish_reason(finished: &pb::Finished) -> &'static str {
    match pb::FinishReason::try_from(finished.reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::Context) => "length",
        _ => "stop",
    }
}

pub(crate) fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

fn finished_usage(finished: &pb::Finished) -> Value {
    let u = finished.usage.unwrap_or_default();
    usage(u.prompt_tokens, u.completion_tokens)
}

fn token_entry(t: &pb::TokenLogprob) -> Value {
    json!({"token": t.text, "logprob": t.logprob, "bytes": t.text.as_bytes()})
}

/// One entry of chat `logprobs.content` for a generated token.
pub(crate) fn chat_logprob(token: &pb::Token) -> Option<Value> {
    let entry = token.logprob.as_ref()?;
    let chosen = entry.token.as_ref()?;
    let mut v = token_entry(chosen);
    v["top_logprobs"] = Value::Array(entry.top.iter().map(token_entry).collect());
    Some(v)
}

pub(crate) fn chat_response(h: &Header, c: &Collected, logprobs: bool) -> Value {
    let logprobs = logprobs
        .then(|| json!({"content": c.tokens.iter().filter_map(chat_logprob).collect::<Vec<_>>()}));
    json!({
        "id": h.id,
        "object": "chat.completion",
        "created": h.created,
        "model": h.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": c.finished.text},
            "logprobs": logprobs,
            "finish_reason": finish_reason(&c.finished),
        }],
        "usage": finished_usage(&c.finished),
    })
}

/// A `chat.completion.chunk`; `usage: null` is included when the client
/// asked for usage (OpenAI does so on every chunk but the last).
pub(crate) fn chat_chunk(
    h: &Header,
    delta: Value,
    logprobs: Option<Value>,
    finish: Option<&str>,
    include_usage: bool,
) -> Value {
    let mut chunk = json!({
        "id": h.id,
        "object": "chat.completion.chunk",
        "created": h.created,
        "model": h.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
    });
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// The last chunk when usage was asked for: no choices, the usage.
pub(crate) fn usage_chunk(h: &Header, object: &str, finished: &pb::Finished) -> Value {
    json!({
        "id": h.id,
        "object": object,
        "created": h.created,
        "model": h.model,
        "choices": [],
        "usage": finished_usage(finished),
    })
}

/// The completions API's logprobs object, built token by token.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top_logprobs: Vec<Option<Map<String, Value>>>,
    text_offset: Vec<usize>,
    /// Characters so far, for the next token's offset.
    offset: usize,
}

impl CompletionLogprobs {
    /// Starts at `offset` characters into the response text.
    pub(crate) fn at(offset: usize) -> Self {
        Self {
            offset,
            ..Self::default()
        }
    }

    /// Appends a token with its text; `entry` is None for the first prompt
    /// token, which nothing predicts.
    pub(crate) fn push(&mut self, text: &str, entry: Option<&pb::LogprobEntry>) {
        self.tokens.push(text.to_string());
        self.token_logprobs
            .push(entry.and_then(|e| e.token.as_ref()).map(|t| t.logprob));
        self.top_logprobs.push(entry.map(|e| {
            e.top
                .iter()
                .map(|t| (t.text.clone(), json!(t.logprob)))
                .collect()
        }));
        self.text_offset.push(self.offset);
        self.offset += text.chars().count();
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

/// The text of a generated token for `tokens`: its own text when it has a
/// logprob entry, else its text delta.
fn generated_token_text(t: &pb::Token) -> &str {
    t.logprob
        .as_ref()
        .and_then(|e| e.token.as_ref())
        .map_or(t.text_delta.as_str(), |tok| tok.text.as_str())
}

/// The echoed prompt: its text and its tokens with their scores (the first
/// token has none). The first token's text is what the prompt text has
/// before the others' (empty when the prompt was given as ids).
pub(crate) fn echoed_prompt(
    finished: &pb::Finished,
    prompt_text: Option<&str>,
    logprobs: &mut CompletionLogprobs,
) -> String {
    let rest: String = finished
        .prompt_logprobs
        .iter()
        .filter_map(|e| e.token.as_ref().map(|t| t.text.as_str()))
        .collect();
    let first = prompt_text
        .and_then(|p| p.strip_suffix(rest.as_str()))
        .unwrap_or_default();
    if !finished.prompt_token_ids.is_empty() {
        logprobs.push(first, None);
    }
    for entry in &finished.prompt_logprobs {
        let text = entry.token.as_ref().map_or("", |t| t.text.as_str());
        logprobs.push(text, Some(entry));
    }
    match prompt_text {
        Some(p) => p.to_string(),
        None => format!("{first}{rest}"),
    }
}

/// What the completions API needs to shape a whole answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CompletionShape<'a> {
    pub logprobs: bool,
    pub echo: bool,
    pub score_only: bool,
    pub prompt_text: Option<&'a str>,
}

pub(crate) fn completion_response(h: &Header, c: &Collected, shape: CompletionShape) -> Value {
    let mut lp = CompletionLogprobs::default();
    let mut text = String::new();
    if shape.echo {
        text = echoed_prompt(&c.finished, shape.prompt_text, &mut lp);
    }
    let usage_all = c.finished.usage.unwrap_or_default();
    let (completion_tokens, finish) = if shape.score_only {
        (0, "length")
    } else {
        let base = text.chars().count();
        lp.offset = base;
        for t in &c.tokens {
            lp.push(generated_token_text(t), t.logprob.as_ref());
        }
        text.push_str(&c.finished.text);
        (usage_all.completion_tokens, finish_reason(&c.finished))
    };
    json!({
        "id": h.id,
        "object": "text_completion",
        "created": h.created,
        "model": h.model,
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": shape.logprobs.then(|| lp.to_json()),
            "finish_reason": finish,
        }],
        "usage": usage(usage_all.prompt_tokens, completion_tokens),
    })
}

/// One streamed completions chunk.
pub(crate) fn completion_chunk(
    h: &Header,
    text: &str,
    logprobs: Option<Value>,
    finish: Option<&str>,
    include_usage: bool,
) -> Value {
    let mut chunk = json!({
        "id": h.id,
        "object": "text_completion",
        "created": h.created,
        "model": h.model,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}],
    });
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk
}

/// The logprobs object of one streamed completions token.
pub(crate) fn completion_token_logprobs(t: &pb::Token, offset: usize) -> Value {
    let mut lp = CompletionLogprobs::at(offset);
    lp.push(generated_token_text(t), t.logprob.as_ref());
    lp.to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            id: "x".into(),
            created: 1,
            model: "m".into(),
        }
    }

    fn lp(id: u32, text: &str, logprob: f32) -> pb::TokenLogprob {
        pb::TokenLogprob {
            id,
            logprob,
            text: text.into(),
        }
    }

    fn entry(id: u32, text: &str, logprob: f32) -> pb::LogprobEntry {
        pb::LogprobEntry {
            token: Some(lp(id, text, logprob)),
            top: vec![lp(id, text, logprob), lp(99, "z", -5.0)],
        }
    }

    fn token(id: u32, text: &str) -> pb::Token {
        pb::Token {
            id,
            text_delta: text.into(),
            logprob: Some(entry(id, text, -0.5)),
        }
    }

    fn collected() -> Collected {
        Collected {
            first_token: None,
            tokens: vec![token(10, " big"), token(11, " cat")],
            finished: pb::Finished {
                reason: pb::FinishReason::Length as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    cached_prompt_tokens: 0,
                }),
                text: " big cat".into(),
                prompt_token_ids: vec![1, 2, 3],
                prompt_logprobs: vec![entry(2, " a", -1.0), entry(3, " b", -2.0)],
                ..Default::default()
            },
        }
    }

    #[test]
    fn chat_response_shape() {
        let v = chat_response(&header(), &collected(), true);
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], " big cat");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["total_tokens"], 5);
        let first = &v["choices"][0]["logprobs"]["content"][0];
        assert_eq!(first["token"], " big");
        assert_eq!(first["logprob"], -0.5);
        assert_eq!(first["bytes"], json!(" big".as_bytes()));
        assert_eq!(first["top_logprobs"][1]["token"], "z");
        let v = chat_response(&header(), &collected(), false);
        assert!(v["choices"][0]["logprobs"].is_null());
    }

    #[test]
    fn chunks_carry_usage_null_only_when_asked() {
        let c = chat_chunk(&header(), json!({"content": "a"}), None, None, true);
        assert!(c.as_object().unwrap().contains_key("usage"));
        assert_eq!(c["object"], "chat.completion.chunk");
        let c = chat_chunk(&header(), json!({}), None, Some("stop"), false);
        assert!(!c.as_object().unwrap().contains_key("usage"));
        assert_eq!(c["choices"][0]["finish_reason"], "stop");
        let u = usage_chunk(&header(), "chat.completion.chunk", &collected().finished);
        assert_eq!(u["choices"], json!([]));
        assert_eq!(u["usage"]["prompt_tokens"], 3);
    }

    #[test]
    fn completion_with_logprobs_and_offsets() {
        let shape = CompletionShape {
            logprobs: true,
            echo: false,
            score_only: false,
            prompt_text: Some("A a b"),
        };
        let v = completion_response(&header(), &collected(), shape);
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], " big cat");
        assert_eq!(choice["logprobs"]["tokens"], json!([" big", " cat"]));
        assert_eq!(choice["logprobs"]["text_offset"], json!([0, 4]));
        assert_eq!(choice["logprobs"]["top_logprobs"][0]["z"], -5.0);
    }

    #[test]
    fn echo_scores_the_prompt_with_a_null_first() {
        let shape = CompletionShape {
            logprobs: true,
            echo: true,
            score_only: true,
            prompt_text: Some("A a b"),
        };
        let v = completion_response(&header(), &collected(), shape);
        let choice = &v["choices"][0];
        assert_eq!(choice["text"], "A a b");
        assert_eq!(choice["finish_reason"], "length");
        let lp = &choice["logprobs"];
        assert_eq!(lp["tokens"], json!(["A", " a", " b"]));
        assert_eq!(lp["token_logprobs"], json!([null, -1.0, -2.0]));
        assert!(lp["top_logprobs"][0].is_null());
        assert_eq!(lp["text_offset"], json!([0, 1, 3]));
        assert_eq!(v["usage"]["completion_tokens"], 0);

        // Echo and generation: the generated tokens follow the prompt's.
        let shape = CompletionShape {
            score_only: false,
            ..shape
        };
        let v = completion_response(&header(), &collected(), shape);
        assert_eq!(v["choices"][0]["text"], "A a b big cat");
        assert_eq!(
            v["choices"][0]["logprobs"]["text_offset"],
            json!([0, 1, 3, 5, 9])
        );
    }

    #[test]
    fn echo_of_token_ids_rebuilds_the_text() {
        let shape = CompletionShape {
            logprobs: false,
            echo: true,
            score_only: true,
            prompt_text: None,
        };
        let v = completion_response(&header(), &collected(), shape);
        assert_eq!(v["choices"][0]["text"], " a b");
        assert!(v["choices"][0]["logprobs"].is_null());
    }
}
