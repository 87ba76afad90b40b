//! Ollama-compatible `/api/chat`, `/api/generate`, `/api/tags` and
//! `/api/version`: newline-delimited JSON streaming (on by default, as in
//! Ollama), `options` mapped to sampling, and a last object with
//! `done: true`, the token counts and durations in nanoseconds.

use std::time::{Duration, Instant};

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
    ApiError, AppState, Limits, RequestBody, Sampling, Shape, Tracker, answer, check_max_tokens,
    parse_json, refuse_unhonoured, stop_list, stream_response, unhonoured, unix_now,
};
use crate::dispatch::Generation;
use crate::pool::Target;

/// Ollama's sampling defaults, used where `options` leaves a value unset.
const DEFAULT_TEMPERATURE: f64 = 0.8;
const DEFAULT_TOP_K: i64 = 40;
const DEFAULT_TOP_P: f64 = 0.9;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Options {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub num_predict: Option<i64>,
    pub stop: Option<Value>,
    pub repeat_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    /// Refused: the served models read text only.
    pub images: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub stream: Option<bool>,
    pub options: Option<Options>,
    // Asked for, and refused ([`refuse_unhonoured`]).
    pub format: Option<Value>,
    pub tools: Option<Value>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct GenerateRequest {
    pub model: String,
    #[serde(default)]
    pub prompt: String,
    pub system: Option<String>,
    /// Send the prompt as it is, without the chat template.
    pub raw: Option<bool>,
    pub stream: Option<bool>,
    pub options: Option<Options>,
    // Asked for, and refused ([`refuse_unhonoured`]).
    pub format: Option<Value>,
    pub images: Option<Value>,
    pub suffix: Option<Value>,
}

/// Sampling and stopping from `options`, with Ollama's defaults.
pub(crate) fn options(
    o: Option<&Options>,
    limits: Limits,
) -> Result<(pb::SamplingParams, pb::StoppingCriteria), ApiError> {
    let default = Options::default();
    let o = o.unwrap_or(&default);
    let sampling = Sampling {
        temperature: Some(o.temperature.unwrap_or(DEFAULT_TEMPERATURE)),
        top_p: Some(o.top_p.unwrap_or(DEFAULT_TOP_P)),
        top_k: Some(o.top_k.unwrap_or(DEFAULT_TOP_K)),
        min_p: o.min_p,
        seed: o.seed,
        presence_penalty: o.presence_penalty,
        frequency_penalty: o.frequency_penalty,
        repetition_penalty: o.repeat_penalty,
    }
    .to_proto()?;
    // -1 (no limit) and -2 (fill the context) both mean "no limit" here.
    let num_predict = o.num_predict.filter(|&n| n > 0);
    let max_tokens = check_max_tokens(num_predict, "num_predict", limits, 0)?;
    let stopping = pb::StoppingCriteria {
        max_tokens,
        stop: stop_list(o.stop.as_ref(), "stop")?,
        ..Default::default()
    };
    Ok((sampling, stopping))
}

pub(crate) fn chat_request(
    req: &ChatRequest,
    limits: Limits,
) -> Result<pb::GenerateRequest, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages is empty: give at least one message",
            Some("messages"),
        ));
    }
    refuse_unhonoured(req.format.as_ref(), "format", unhonoured::STRUCTURED_OUTPUT)?;
    refuse_unhonoured(req.tools.as_ref(), "tools", unhonoured::TOOL_CALLS)?;
    let (sampling, stopping) = options(req.options.as_ref(), limits)?;
    let messages = req
        .messages
        .iter()
        .map(|m| {
            refuse_unhonoured(m.images.as_ref(), "images", unhonoured::IMAGES)?;
            Ok(pb::ChatMessage {
                role: m.role.clone(),
                content: m.content.clone(),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(pb::GenerateRequest {
        prompt: Some(Prompt::Chat(pb::ChatPrompt { messages })),
        sampling: Some(sampling),
        stopping: Some(stopping),
        ..Default::default()
    })
}

/// `/api/generate`: the prompt as a user message (after `system`), or as
/// raw text with `raw: true`.
pub(crate) fn generate_request(
    req: &GenerateRequest,
    limits: Limits,
) -> Result<pb::GenerateRequest, ApiError> {
    refuse_unhonoured(req.format.as_ref(), "format", unhonoured::STRUCTURED_OUTPUT)?;
    refuse_unhonoured(req.images.as_ref(), "images", unhonoured::IMAGES)?;
    refuse_unhonoured(req.suffix.as_ref(), "suffix", unhonoured::SUFFIX)?;
    let (sampling, stopping) = options(req.options.as_ref(), limits)?;
    let prompt = if req.raw.unwrap_or(false) {
        Prompt::Text(req.prompt.clone())
    } else {
        let mut messages = Vec::new();
        if let Some(system) = req.system.as_ref().filter(|s| !s.is_empty()) {
            messages.push(pb::ChatMessage {
                role: "system".into(),
                content: system.clone(),
            });
        }
        messages.push(pb::ChatMessage {
            role: "user".into(),
            content: req.prompt.clone(),
        });
        Prompt::Chat(pb::ChatPrompt { messages })
    };
    Ok(pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(sampling),
        stopping: Some(stopping),
        ..Default::default()
    })
}

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Generate,
}

/// One line of output: the text piece as `message` (chat) or `response`.
fn piece(kind: Kind, model: &str, text: &str, done: bool) -> Value {
    let mut v = json!({"model": model, "created_at": rfc3339(unix_now()), "done": done});
    match kind {
        Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
        Kind::Generate => v["response"] = json!(text),
    }
    v
}

/// Times of one request, for the last object's durations.
#[derive(Debug, Clone, Copy)]
struct Timing {
    started: Instant,
    first_token: Option<Instant>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The last object: `done`, `done_reason`, counts and durations (ns).
fn done_object(kind: Kind, model: &str, text: &str, finished: &pb::Finished, t: Timing) -> Value {
    let usage = finished.usage.unwrap_or_default();
    let now = Instant::now();
    let first = t.first_token.unwrap_or(now);
    let mut v = piece(kind, model, text, true);
    let reason = match pb::FinishReason::try_from(finished.reason) {
        Ok(pb::FinishReason::Length | pb::FinishReason::Context) => "length",
        _ => "stop",
    };
    v["done_reason"] = json!(reason);
    v["total_duration"] = json!(nanos(now - t.started));
    v["load_duration"] = json!(0);
    v["prompt_eval_count"] = json!(usage.prompt_tokens);
    v["prompt_eval_duration"] = json!(nanos(first - t.started));
    v["eval_count"] = json!(usage.completion_tokens);
    v["eval_duration"] = json!(nanos(now - first));
    v
}

fn ndjson(v: &Value) -> Bytes {
    Bytes::from(format!("{v}\n"))
}

async fn run(
    state: &AppState,
    tracker: &mut Tracker,
    kind: Kind,
    target: &Target,
    req: pb::GenerateRequest,
    stream: bool,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    // Answers name what was asked for: the adapter, when one was.
    let model = target.name();
    if stream {
        let generation = state.start(target, req).await?;
        let frames = ndjson_stream(generation, kind, model.to_string(), started, tracker.take());
        return Ok(stream_response("application/x-ndjson", frames));
    }
    let collected = state.complete(target, req).await?;
    let timing = Timing {
        started,
        first_token: collected.first_token,
    };
    let body = done_object(
        kind,
        model,
        &collected.finished.text,
        &collected.finished,
        timing,
    );
    Ok(Json(body).into_response())
}

fn ndjson_stream(
    mut generation: Generation,
    kind: Kind,
    model: String,
    started: Instant,
    tracker: Tracker,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let _tracker = tracker;
        let mut timing = Timing { started, first_token: None };
        while let Some(event) = generation.next().await {
            match event {
                Ok(Event::Token(t)) => {
                    timing.first_token.get_or_insert_with(Instant::now);
                    if !t.text_delta.is_empty() {
                        yield ndjson(&piece(kind, &model, &t.text_delta, false));
                    }
                }
                Ok(Event::Finished(done)) => {
                    yield ndjson(&done_object(kind, &model, &done.text_delta, &done, timing));
                    break;
                }
                Err(status) => {
                    yield ndjson(&json!({"error": ApiError::from(status).message}));
                    break;
                }
            }
        }
    }
}

pub(crate) async fn chat(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "ollama_chat",
        Shape::Ollama,
        async |state, tracker| {
            let req: ChatRequest = parse_json(body.bytes()?)?;
            let target = state.resolve(Some(&req.model))?;
            tracker.set_model(&target.model);
            let grpc = chat_request(&req, state.limits(&target))?;
            run(
                state,
                tracker,
                Kind::Chat,
                &target,
                grpc,
                req.stream.unwrap_or(true),
            )
            .await
        },
    )
    .await
}

pub(crate) async fn generate(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "ollama_generate",
        Shape::Ollama,
        async |state, tracker| {
            let req: GenerateRequest = parse_json(body.bytes()?)?;
            let target = state.resolve(Some(&req.model))?;
            tracker.set_model(&target.model);
            if req.prompt.is_empty() {
                // Ollama's "load the model" call: nothing to generate.
                let mut v = piece(Kind::Generate, target.name(), "", true);
                v["done_reason"] = json!("load");
                return Ok(Json(v).into_response());
            }
            let grpc = generate_request(&req, state.limits(&target))?;
            run(
                state,
                tracker,
                Kind::Generate,
                &target,
                grpc,
                req.stream.unwrap_or(true),
            )
            .await
        },
    )
    .await
}

pub(crate) async fn tags(State(state): State<AppState>) -> Response {
    let now = rfc3339(unix_now());
    let models: Vec<Value> = state
        .upstream
        .pool
        .models()
        .into_iter()
        .flat_map(|m| {
            let info = m.info.unwrap_or_default();
            let (format, quantization) = info
                .weight_format
                .split_once(':')
                .unwrap_or((info.weight_format.as_str(), ""));
            // Each adapter is a model of its own to Ollama clients, with its
            // base as parent (as a Modelfile's ADAPTER makes one).
            let names = std::iter::once((m.model.clone(), String::new()))
                .chain(m.adapters.into_iter().map(|a| (a.name, m.model.clone())));
            names
                .map(|(name, parent)| {
                    json!({
                        "name": name,
                        "model": name,
                        "modified_at": now,
                        "size": 0,
                        "digest": "",
                        "details": {
                            "parent_model": parent,
                            "format": format,
                            "family": info.architecture,
                            "families": [info.architecture],
                            "parameter_size": "",
                            "quantization_level": quantization,
                        },
                    })
                })
                .collect::<Vec<_>>()
        })
        .collect();
    Json(json!({"models": models})).into_response()
}

pub(crate) async fn version() -> Response {
    Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (UTC).
pub(crate) fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_tools_and_images_are_refused_not_ignored() {
        let chat = |extra: Value| {
            let body = crate::api::with_fields(
                json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
                extra,
            );
            let req: ChatRequest = serde_json::from_value(body).unwrap();
            chat_request(&req, Limits::default()).map_err(|e| e.param)
        };
        assert_eq!(chat(json!({"format": "json"})), Err(Some("format")));
        assert_eq!(
            chat(json!({"format": {"type": "object"}})),
            Err(Some("format"))
        );
        assert_eq!(
            chat(json!({"tools": [{"type": "function"}]})),
            Err(Some("tools"))
        );
        assert_eq!(
            chat(json!({"messages": [{"role": "user", "content": "Hi", "images": ["aGk="]}]})),
            Err(Some("images"))
        );
        assert!(chat(json!({"format": "", "tools": [], "images": null})).is_ok());
        let generate = |extra: Value| {
            let body = crate::api::with_fields(json!({"model": "m", "prompt": "Hi"}), extra);
            let req: GenerateRequest = serde_json::from_value(body).unwrap();
            generate_request(&req, Limits::default()).map_err(|e| e.param)
        };
        assert_eq!(generate(json!({"format": "json"})), Err(Some("format")));
        assert_eq!(generate(json!({"images": ["aGk="]})), Err(Some("images")));
        assert_eq!(generate(json!({"suffix": "}"})), Err(Some("suffix")));
        assert!(generate(json!({"format": null})).is_ok());
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_709_251_199), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn options_default_like_ollama_and_map_through() {
        let (s, stop) = options(None, Limits::default()).unwrap();
        assert_eq!((s.temperature, s.top_p, s.top_k), (0.8, 0.9, 40));
        assert_eq!(stop.max_tokens, 0);
        let o: Options = serde_json::from_value(json!({
            "temperature": 0, "top_p": 0.5, "top_k": 5, "seed": 3, "num_predict": 8, "stop": ["\n"], "repeat_penalty": 1.1
        }))
        .unwrap();
        let (s, stop) = options(Some(&o), Limits::default()).unwrap();
        assert_eq!(
            (s.temperature, s.top_p, s.top_k, s.seed),
            (0.0, 0.5, 5, Some(3))
        );
        assert!((s.repetition_penalty - 1.1).abs() < 1e-6);
        assert_eq!((stop.max_tokens, stop.stop), (8, vec!["\n".to_string()]));
        let o: Options = serde_json::from_value(json!({"num_predict": -1})).unwrap();
        assert_eq!(
            options(Some(&o), Limits::default()).unwrap().1.max_tokens,
            0
        );
        let o: Options = serde_json::from_value(json!({"temperature": -3})).unwrap();
        assert!(
            options(Some(&o), Limits::default())
                .unwrap_err()
                .message
                .contains("temperature")
        );
    }

    #[test]
    fn generate_uses_the_chat_template_unless_raw() {
        let req: GenerateRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "Hi", "system": "Be brief"}))
                .unwrap();
        let g = generate_request(&req, Limits::default()).unwrap();
        let Some(Prompt::Chat(chat)) = g.prompt else {
            panic!("chat expected")
        };
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(chat.messages[1].content, "Hi");
        let req: GenerateRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "Hi", "raw": true})).unwrap();
        let g = generate_request(&req, Limits::default()).unwrap();
        assert_eq!(g.prompt, Some(Prompt::Text("Hi".into())));
    }

    #[test]
    fn chat_requires_messages() {
        let req: ChatRequest =
            serde_json::from_value(json!({"model": "m", "messages": []})).unwrap();
        assert!(chat_request(&req, Limits::default()).is_err());
    }

    #[test]
    fn done_object_has_counts_and_durations() {
        let finished = pb::Finished {
            reason: pb::FinishReason::Length as i32,
            usage: Some(pb::Usage {
                prompt_tokens: 5,
                completion_tokens: 2,
                cached_prompt_tokens: 0,
            }),
            ..Default::default()
        };
        let t = Timing {
            started: Instant::now(),
            first_token: None,
        };
        let v = done_object(Kind::Chat, "m", "hi", &finished, t);
        assert_eq!(v["done"], true);
        assert_eq!(v["done_reason"], "length");
        assert_eq!(v["message"]["content"], "hi");
        assert_eq!(
            (v["prompt_eval_count"].as_u64(), v["eval_count"].as_u64()),
            (Some(5), Some(2))
        );
        assert!(v["total_duration"].is_u64());
        let v = done_object(Kind::Generate, "m", "", &finished, t);
        assert_eq!(v["response"], "");
    }
}
