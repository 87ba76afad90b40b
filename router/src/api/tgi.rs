//! TGI-compatible `POST /generate`, `POST /generate_stream` and the
//! compatibility route `POST /` (a one-element array, or a stream when
//! `stream: true`), as text-generation-inference's clients call them.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::generate_request::Prompt;
use shardserve_proto::v1::generate_response::Event;

use super::{
    ApiError, AppState, Collected, Limits, RequestBody, Sampling, Shape, Tracker, answer,
    check_max_tokens, parse_json, refuse_unhonoured, stop_list, stream_response, unhonoured,
};
use crate::dispatch::Generation;

/// TGI's default `max_new_tokens`.
const DEFAULT_MAX_NEW_TOKENS: u32 = 100;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Parameters {
    pub max_new_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub do_sample: Option<bool>,
    pub details: Option<bool>,
    pub return_full_text: Option<bool>,
    pub repetition_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    /// The LoRA adapter to run with (TGI's multi-LoRA parameter).
    pub adapter_id: Option<String>,
    /// Refused ([`refuse_unhonoured`]): output constrained to JSON or a regex.
    pub grammar: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GenerateBody {
    pub inputs: String,
    #[serde(default)]
    pub parameters: Parameters,
    pub stream: Option<bool>,
    /// Not in TGI (one model per server); lets a multi-model router pick.
    pub model: Option<String>,
}

/// The mapped request; `do_sample: false` without sampling parameters is
/// greedy, as in TGI.
pub(crate) fn generate_request(
    p: &Parameters,
    inputs: &str,
    limits: Limits,
) -> Result<pb::GenerateRequest, ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::bad_request("inputs is empty", Some("inputs")));
    }
    refuse_unhonoured(p.grammar.as_ref(), "grammar", unhonoured::STRUCTURED_OUTPUT)?;
    let sampled = p.do_sample.unwrap_or(false)
        || p.temperature.is_some_and(|t| t != 1.0)
        || p.top_p.is_some()
        || p.top_k.is_some();
    if p.temperature.is_some_and(|t| t <= 0.0) {
        return Err(ApiError::bad_request(
            "temperature must be strictly positive",
            Some("temperature"),
        ));
    }
    let sampling = Sampling {
        temperature: Some(if sampled {
            p.temperature.unwrap_or(1.0)
        } else {
            0.0
        }),
        top_p: p.top_p,
        top_k: p.top_k,
        min_p: None,
        seed: p.seed,
        presence_penalty: None,
        frequency_penalty: p.frequency_penalty,
        repetition_penalty: p.repetition_penalty,
    }
    .to_proto()?;
    let max_new_tokens = check_max_tokens(
        p.max_new_tokens,
        "max_new_tokens",
        limits,
        DEFAULT_MAX_NEW_TOKENS,
    )?;
    if max_new_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_new_tokens must be strictly positive",
            Some("max_new_tokens"),
        ));
    }
    Ok(pb::GenerateRequest {
        prompt: Some(Prompt::Text(inputs.to_string())),
        sampling: Some(sampling),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: max_new_tokens,
            stop: stop_list(p.stop.as_ref(), "stop")?,
            ..Default::default()
        }),
        // Every TGI token carries its logprob.
        logprobs: true,
        ..Default::default()
    })
}

fn finish_reason(finished: &pb::Finished) -> &'static str {
    match pb::FinishReason::try_from(finished.reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::Context) => "length",
        _ if !finished.matched_stop.is_empty() => "stop_sequence",
        _ => "eos_token",
    }
}

fn token_json(t: &pb::Token, text: &str) -> Value {
    let logprob = t
        .logprob
        .as_ref()
        .and_then(|e| e.token.as_ref())
        .map(|tok| tok.logprob);
    json!({"id": t.id, "text": text, "logprob": logprob, "special": false})
}

fn details(finished: &pb::Finished, seed: Option<u64>, tokens: Option<&[pb::Token]>) -> Value {
    let usage = finished.usage.unwrap_or_default();
    let mut d = json!({
        "finish_reason": finish_reason(finished),
        "generated_tokens": usage.completion_tokens,
        "seed": seed,
    });
    if let Some(tokens) = tokens {
        d["prefill"] = json!([]);
        d["tokens"] = tokens
            .iter()
            .map(|t| token_json(t, &t.text_delta))
            .collect();
    } else {
        d["input_length"] = json!(usage.prompt_tokens);
    }
    d
}

/// The `/generate` answer.
pub(crate) fn generate_response(
    c: &Collected,
    inputs: &str,
    p: &Parameters,
    seed: Option<u64>,
) -> Value {
    let mut text = c.finished.text.clone();
    if p.return_full_text.unwrap_or(false) {
        text.insert_str(0, inputs);
    }
    let mut v = json!({"generated_text": text});
    if p.details.unwrap_or(false) {
        v["details"] = details(&c.finished, seed, Some(&c.tokens));
    }
    v
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data:{v}\n\n"))
}

/// Streams TGI events. TGI's last event is the last token with the whole
/// text and details, so each token is held until the next event shows
/// whether it was the last.
fn tgi_stream(
    mut generation: Generation,
    seed: Option<u64>,
    prefix: String,
    tracker: Tracker,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let _tracker = tracker;
        let mut held: Option<pb::Token> = None;
        let mut index = 0u32;
        while let Some(event) = generation.next().await {
            match event {
                Ok(Event::Token(t)) => {
                    if let Some(prev) = held.replace(t) {
                        index += 1;
                        yield sse(&json!({
                            "index": index, "token": token_json(&prev, &prev.text_delta),
                            "generated_text": null, "details": null, "top_tokens": null,
                        }));
                    }
                }
                Ok(Event::Finished(done)) => {
                    index += 1;
                    let last = held.take().unwrap_or_default();
                    let text = format!("{}{}", last.text_delta, done.text_delta);
                    yield sse(&json!({
                        "index": index, "token": token_json(&last, &text),
                        "generated_text": format!("{prefix}{}", done.text),
                        "details": details(&done, seed, None), "top_tokens": null,
                    }));
                    break;
                }
                Err(status) => {
                    yield sse(&ApiError::from(status).tgi_body());
                    break;
                }
            }
        }
    }
}

/// Which route: the JSON object, the stream, or the compatibility route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Generate,
    Stream,
    Compat,
}

async fn handle(state: AppState, body: RequestBody, route: Route) -> Response {
    let endpoint = match route {
        Route::Generate => "tgi_generate",
        Route::Stream => "tgi_generate_stream",
        Route::Compat => "tgi_compat",
    };
    answer(state, endpoint, Shape::Tgi, async |state, tracker| {
        let body: GenerateBody = parse_json(body.bytes()?)?;
        let p = &body.parameters;
        // TGI names the adapter beside the model: `parameters.adapter_id`.
        let target = match p.adapter_id.as_deref().filter(|a| !a.is_empty()) {
            Some(adapter) => state
                .upstream
                .pool
                .resolve_adapter(body.model.as_deref().unwrap_or_default(), adapter)
                .map_err(ApiError::from)?,
            None => state.resolve(body.model.as_deref())?,
        };
        tracker.set_model(&target.model);
        let req = generate_request(p, &body.inputs, state.limits(&target))?;
        let seed = req.sampling.as_ref().and_then(|s| s.seed);
        let stream =
            route == Route::Stream || (route == Route::Compat && body.stream == Some(true));
        if stream {
            let generation = state.start(&target, req).await?;
            let prefix = if p.return_full_text.unwrap_or(false) {
                body.inputs.clone()
            } else {
                String::new()
            };
            let frames = tgi_stream(generation, seed, prefix, tracker.take());
            return Ok(stream_response("text/event-stream", frames));
        }
        let collected = state.complete(&target, req).await?;
        let v = generate_response(&collected, &body.inputs, p, seed);
        let v = if route == Route::Compat {
            json!([v])
        } else {
            v
        };
        Ok(Json(v).into_response())
    })
    .await
}

pub(crate) async fn generate(State(state): State<AppState>, body: RequestBody) -> Response {
    handle(state, body, Route::Generate).await
}

pub(crate) async fn generate_stream(State(state): State<AppState>, body: RequestBody) -> Response {
    handle(state, body, Route::Stream).await
}

pub(crate) async fn compat(State(state): State<AppState>, body: RequestBody) -> Response {
    handle(state, body, Route::Compat).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> Parameters {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_grammar_is_refused_not_ignored() {
        let grammar = json!({"grammar": {"type": "json", "value": {"type": "object"}}});
        let e = generate_request(&params(grammar), "Hi", Limits::default()).unwrap_err();
        assert_eq!(e.param, Some("grammar"));
        assert!(
            generate_request(&params(json!({"grammar": null})), "Hi", Limits::default()).is_ok()
        );
    }

    #[test]
    fn greedy_unless_sampling_is_asked() {
        let r = generate_request(&params(json!({})), "Hi", Limits::default()).unwrap();
        assert_eq!(r.sampling.unwrap().temperature, 0.0);
        assert_eq!(r.stopping.unwrap().max_tokens, DEFAULT_MAX_NEW_TOKENS);
        assert!(r.logprobs);
        let r = generate_request(
            &params(json!({"do_sample": true, "seed": 4})),
            "Hi",
            Limits::default(),
        )
        .unwrap();
        let s = r.sampling.unwrap();
        assert_eq!((s.temperature, s.seed), (1.0, Some(4)));
        let r = generate_request(
            &params(json!({"temperature": 0.5, "top_k": 10, "stop": ["\n"], "max_new_tokens": 5})),
            "Hi",
            Limits::default(),
        )
        .unwrap();
        assert_eq!(r.sampling.unwrap().temperature, 0.5);
        let stop = r.stopping.unwrap();
        assert_eq!((stop.max_tokens, stop.stop), (5, vec!["\n".to_string()]));
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let bad = |v: Value, inputs: &str| {
            generate_request(&params(v), inputs, Limits::default())
                .unwrap_err()
                .message
        };
        assert!(bad(json!({}), "").contains("inputs"));
        assert!(bad(json!({"temperature": 0}), "x").contains("temperature"));
        assert!(bad(json!({"max_new_tokens": 0}), "x").contains("max_new_tokens"));
        assert!(bad(json!({"max_new_tokens": -1}), "x").contains("max_new_tokens=-1"));
        assert!(bad(json!({"top_p": 2.0}), "x").contains("top_p"));
    }

    #[test]
    fn response_with_details_and_full_text() {
        let c = Collected {
            first_token: None,
            tokens: vec![pb::Token {
                id: 7,
                text_delta: " there".into(),
                logprob: Some(pb::LogprobEntry {
                    token: Some(pb::TokenLogprob {
                        id: 7,
                        logprob: -0.1,
                        text: " there".into(),
                    }),
                    top: vec![],
                }),
            }],
            finished: pb::Finished {
                reason: pb::FinishReason::Stop as i32,
                usage: Some(pb::Usage {
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    cached_prompt_tokens: 0,
                }),
                text: " there".into(),
                ..Default::default()
            },
        };
        let p = params(json!({"details": true, "return_full_text": true}));
        let v = generate_response(&c, "Hi", &p, Some(3));
        assert_eq!(v["generated_text"], "Hi there");
        assert_eq!(v["details"]["finish_reason"], "eos_token");
        assert_eq!(v["details"]["generated_tokens"], 1);
        assert_eq!(v["details"]["seed"], 3);
        assert_eq!(v["details"]["tokens"][0]["id"], 7);
        assert!((v["details"]["tokens"][0]["logprob"].as_f64().unwrap() + 0.1).abs() < 1e-6);
        let v = generate_response(&c, "Hi", &params(json!({})), None);
        assert_eq!(v, json!({"generated_text": " there"}));
    }

    #[test]
    fn finish_reasons_follow_tgi() {
        let f = |reason: pb::FinishReason, stop: &str| {
            finish_reason(&pb::Finished {
                reason: reason as i32,
                matched_stop: stop.into(),
                ..Default::default()
            })
        };
        assert_eq!(f(pb::FinishReason::Length, ""), "length");
        assert_eq!(f(pb::FinishReason::Stop, "\n"), "stop_sequence");
        assert_eq!(f(pb::FinishReason::Stop, ""), "eos_token");
    }
}
