//! OpenAI request bodies and their mapping to `GenerateRequest`, as pure
//! functions. Unknown fields are ignored (clients send many); known fields of
//! the wrong type, or with values out of range, are 400s naming them.

use serde::Deserialize;
use serde_json::Value;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::generate_request::Prompt;

use crate::api::{
    ApiError, Limits, Sampling, check_max_tokens, refuse_unhonoured, stop_list, unhonoured,
};

/// Most alternatives per token (`top_logprobs`, completions' `logprobs`).
const MAX_TOP_LOGPROBS: i64 = 20;
/// OpenAI's default `max_tokens` for completions.
const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessageIn>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// vLLM's extension: generate `max_tokens` even past end-of-generation.
    pub ignore_eos: Option<bool>,
    // Asked for, and refused ([`refuse_unhonoured`]): this server generates free text.
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub logit_bias: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub best_of: Option<i64>,
    pub stop: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// Number of alternatives per token (the legacy API's integer form).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    /// vLLM's extension: generate `max_tokens` even past end-of-generation.
    pub ignore_eos: Option<bool>,
    // Asked for, and refused ([`refuse_unhonoured`]).
    pub response_format: Option<Value>,
    pub suffix: Option<Value>,
    pub logit_bias: Option<Value>,
}

const NO_TOOL_CALLS: &str =
    "this server does not call tools (with tool_choice \"none\" they are ignored)";

/// A response format this server keeps: absent, or `{"type": "text"}`.
fn check_response_format(format: Option<&Value>) -> Result<(), ApiError> {
    if format.and_then(|f| f.get("type")).and_then(Value::as_str) == Some("text") {
        return Ok(());
    }
    refuse_unhonoured(format, "response_format", unhonoured::STRUCTURED_OUTPUT)
}

/// Tools and functions (the older form) pass only where the request says not to call
/// them; a choice that demands a call is refused even without tools.
fn check_tools(req: &ChatRequest) -> Result<(), ApiError> {
    let is_none = |choice: Option<&Value>| choice.and_then(Value::as_str) == Some("none");
    if !is_none(req.tool_choice.as_ref()) {
        refuse_unhonoured(req.tools.as_ref(), "tools", NO_TOOL_CALLS)?;
    }
    if !is_none(req.function_call.as_ref()) {
        refuse_unhonoured(req.functions.as_ref(), "functions", NO_TOOL_CALLS)?;
    }
    for (choice, param) in [
        (&req.tool_choice, "tool_choice"),
        (&req.function_call, "function_call"),
    ] {
        let demands_a_call = match choice {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) => s != "none" && s != "auto",
            Some(_) => true,
        };
        if demands_a_call {
            refuse_unhonoured(choice.as_ref(), param, NO_TOOL_CALLS)?;
        }
    }
    Ok(())
}

/// A chat request, checked and mapped.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChatPlan {
    pub request: pb::GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

/// A completions request, checked and mapped.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CompletionPlan {
    pub request: pb::GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when logprobs were asked for.
    pub logprobs: Option<u32>,
    pub echo: bool,
    /// The prompt's text, when it was given as text.
    pub prompt_text: Option<String>,
    /// `max_tokens: 0`: score the prompt, generate nothing. The worker is
    /// asked for one token (its 0 means "no limit") which is not returned.
    pub score_only: bool,
}

fn check_n(n: Option<i64>, param: &'static str) -> Result<(), ApiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(ApiError::bad_request(
            format!("{param}={n} is not supported: only {param}=1"),
            Some(param),
        )),
    }
}

fn check_top(value: i64, param: &'static str) -> Result<u32, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&value) {
        Ok(value as u32)
    } else {
        Err(ApiError::bad_request(
            format!("{param}={value} is out of range: it must be between 0 and {MAX_TOP_LOGPROBS}"),
            Some(param),
        ))
    }
}

fn message_text(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.iter().enumerate() {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::bad_request(
                            format!(
                                "messages[{i}].content[{j}]: only text parts are supported, not {}",
                                kind.unwrap_or("an untyped part")
                            ),
                            Some("messages"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        Some(other) => Err(ApiError::bad_request(
            format!("messages[{i}].content must be a string or an array of parts, not {other}"),
            Some("messages"),
        )),
    }
}

pub(crate) fn chat(req: &ChatRequest, limits: Limits) -> Result<ChatPlan, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(
            "messages is empty: give at least one message",
            Some("messages"),
        ));
    }
    check_n(req.n, "n")?;
    check_response_format(req.response_format.as_ref())?;
    check_tools(req)?;
    refuse_unhonoured(
        req.logit_bias.as_ref(),
        "logit_bias",
        unhonoured::LOGIT_BIAS,
    )?;
    let messages = req
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(pb::ChatMessage {
                role: m.role.clone(),
                content: message_text(i, m.content.as_ref())?,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let (limit, param) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, v) => (v, "max_tokens"),
    };
    let max_tokens = check_max_tokens(limit, param, limits, 0)?;
    if max_tokens == 0 && limit.is_some() {
        return Err(ApiError::bad_request(
            format!("{param}=0 is invalid: it must be at least 1"),
            Some(param),
        ));
    }
    let top_logprobs = match req.top_logprobs {
        None => 0,
        Some(_) if req.logprobs != Some(true) => {
            return Err(ApiError::bad_request(
                "top_logprobs needs logprobs set to true",
                Some("top_logprobs"),
            ));
        }
        Some(k) => check_top(k, "top_logprobs")?,
    };
    let logprobs = req.logprobs == Some(true);
    let request = pb::GenerateRequest {
        prompt: Some(Prompt::Chat(pb::ChatPrompt { messages })),
        sampling: Some(sampling(
            req.temperature,
            req.top_p,
            req.top_k,
            req.min_p,
            req.seed,
            (
                req.presence_penalty,
                req.frequency_penalty,
                req.repetition_penalty,
            ),
        )?),
        stopping: Some(pb::StoppingCriteria {
            max_tokens,
            stop: stop_list(req.stop.as_ref(), "stop")?,
            ignore_eos: req.ignore_eos.unwrap_or(false),
            ..Default::default()
        }),
        logprobs,
        top_logprobs,
        ..Default::default()
    };
    let stream = req.stream.unwrap_or(false);
    Ok(ChatPlan {
        request,
        stream,
        include_usage: stream && include_usage(req.stream_options.as_ref()),
        logprobs,
    })
}

fn include_usage(options: Option<&StreamOptions>) -> bool {
    options.and_then(|o| o.include_usage).unwrap_or(false)
}

fn sampling(
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    seed: Option<i64>,
    (presence, frequency, repetition): (Option<f64>, Option<f64>, Option<f64>),
) -> Result<pb::SamplingParams, ApiError> {
    Sampling {
        // OpenAI's default temperature is 1.
        temperature: Some(temperature.unwrap_or(1.0)),
        top_p,
        top_k,
        min_p,
        seed,
        presence_penalty: presence,
        frequency_penalty: frequency,
        repetition_penalty: repetition,
    }
    .to_proto()
}

/// The one prompt of a completions request: a string, an array of token
/// ids, or a one-element array of either.
pub(crate) fn completion_prompt(value: &Value) -> Result<Prompt, ApiError> {
    let bad = |m: String| ApiError::bad_request(m, Some("prompt"));
    match value {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(items) if items.is_empty() => Err(bad("prompt is empty".into())),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            let ids = items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| bad(format!("prompt[{i}]={v} is not a token id")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Prompt::TokenIds(pb::TokenIds { ids }))
        }
        Value::Array(items)
            if items.len() == 1 && (items[0].is_string() || items[0].is_array()) =>
        {
            completion_prompt(&items[0])
        }
        Value::Array(items) if items.iter().all(|v| v.is_string() || v.is_array()) => {
            Err(bad(format!(
                "prompt holds {} prompts; this server takes one prompt per request",
                items.len()
            )))
        }
        Value::Null => Err(bad("prompt is required".into())),
        other => Err(bad(format!(
            "prompt must be a string, an array of token ids, or a one-element array of either, not {other}"
        ))),
    }
}

pub(crate) fn completion(
    req: &CompletionRequest,
    limits: Limits,
) -> Result<CompletionPlan, ApiError> {
    check_n(req.n, "n")?;
    check_n(req.best_of, "best_of")?;
    check_response_format(req.response_format.as_ref())?;
    refuse_unhonoured(
        req.logit_bias.as_ref(),
        "logit_bias",
        unhonoured::LOGIT_BIAS,
    )?;
    refuse_unhonoured(req.suffix.as_ref(), "suffix", unhonoured::SUFFIX)?;
    let prompt = completion_prompt(&req.prompt)?;
    let max_tokens = check_max_tokens(
        req.max_tokens,
        "max_tokens",
        limits,
        COMPLETIONS_DEFAULT_MAX_TOKENS,
    )?;
    let echo = req.echo.unwrap_or(false);
    let score_only = max_tokens == 0;
    if score_only && !echo {
        return Err(ApiError::bad_request(
            "max_tokens=0 generates nothing: it is allowed only with echo (to score the prompt)",
            Some("max_tokens"),
        ));
    }
    let logprobs = req.logprobs.map(|k| check_top(k, "logprobs")).transpose()?;
    let stream = req.stream.unwrap_or(false);
    let prompt_text = match &prompt {
        Prompt::Text(t) => Some(t.clone()),
        _ => None,
    };
    if stream && echo && prompt_text.is_none() {
        return Err(ApiError::bad_request(
            "echo with stream needs a text prompt",
            Some("echo"),
        ));
    }
    let request = pb::GenerateRequest {
        prompt: Some(prompt),
        sampling: Some(sampling(
            req.temperature,
            req.top_p,
            req.top_k,
            req.min_p,
            req.seed,
            (
                req.presence_penalty,
                req.frequency_penalty,
                req.repetition_penalty,
            ),
        )?),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: max_tokens.max(1),
            stop: stop_list(req.stop.as_ref(), "stop")?,
            ignore_eos: req.ignore_eos.unwrap_or(false),
            ..Default::default()
        }),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        // The echoed prompt's token texts (and scores) come from here.
        prompt_logprobs: (echo && !stream).then_some(logprobs.unwrap_or(0)),
        ..Default::default()
    };
    Ok(CompletionPlan {
        request,
        stream,
        include_usage: stream && include_usage(req.stream_options.as_ref()),
        logprobs,
        echo,
        prompt_text,
        score_only,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::parse_json;

    fn chat_plan(body: Value) -> Result<ChatPlan, ApiError> {
        let req: ChatRequest = parse_json(body.to_string().as_bytes())?;
        chat(
            &req,
            Limits {
                context: Some(8192),
                max_tokens: None,
            },
        )
    }

    fn completion_plan(body: Value) -> Result<CompletionPlan, ApiError> {
        let req: CompletionRequest = parse_json(body.to_string().as_bytes())?;
        completion(
            &req,
            Limits {
                context: Some(8192),
                max_tokens: None,
            },
        )
    }

    fn msg(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        r.unwrap_err().message
    }

    #[test]
    fn structured_output_tools_and_biases_are_refused_not_ignored() {
        let hi = json!([{"role": "user", "content": "Hi"}]);
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
        let refused = [
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
                "response_format",
            ),
            (json!({"tools": tool}), "tools"),
            (json!({"tools": tool, "tool_choice": "auto"}), "tools"),
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tool_choice": {"type": "function", "function": {"name": "f"}}}),
                "tool_choice",
            ),
            (json!({"functions": [{"name": "f"}]}), "functions"),
            (json!({"function_call": {"name": "f"}}), "function_call"),
            (json!({"logit_bias": {"50256": -100}}), "logit_bias"),
        ];
        for (extra, param) in refused {
            let body = crate::api::with_fields(json!({"model": "m", "messages": hi}), extra);
            let e = chat_plan(body.clone()).unwrap_err();
            assert_eq!(e.param, Some(param), "{body}");
            assert!(e.message.contains("not supported"), "{body}: {}", e.message);
        }
        // What asks for nothing a text server cannot give passes.
        let kept = [
            json!({"response_format": {"type": "text"}}),
            json!({"response_format": null, "tools": [], "logit_bias": {}}),
            json!({"tools": tool, "tool_choice": "none"}),
            json!({"tool_choice": "auto"}),
            json!({"functions": [{"name": "f"}], "function_call": "none"}),
        ];
        for extra in kept {
            let body = crate::api::with_fields(json!({"model": "m", "messages": hi}), extra);
            assert!(chat_plan(body.clone()).is_ok(), "{body}");
        }
        for (extra, param) in [
            (json!({"suffix": "}"}), "suffix"),
            (json!({"logit_bias": {"1": 5}}), "logit_bias"),
            (
                json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
        ] {
            let body = crate::api::with_fields(json!({"model": "m", "prompt": "def f():"}), extra);
            let e = completion_plan(body.clone()).unwrap_err();
            assert_eq!(e.param, Some(param), "{body}");
        }
        assert!(completion_plan(json!({"model": "m", "prompt": "x", "suffix": ""})).is_ok());
    }

    #[test]
    fn chat_defaults() {
        let plan =
            chat_plan(json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}))
                .unwrap();
        assert!(!plan.stream && !plan.include_usage && !plan.logprobs);
        let r = plan.request;
        let Some(Prompt::Chat(chat)) = r.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(chat.messages[0].content, "Hi");
        assert_eq!(r.sampling.unwrap().temperature, 1.0);
        assert_eq!(r.stopping.unwrap().max_tokens, 0);
    }

    #[test]
    fn chat_maps_every_parameter() {
        let plan = chat_plan(json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null}
            ],
            "stream": true, "stream_options": {"include_usage": true},
            "max_completion_tokens": 12, "temperature": 0, "top_p": 0.5, "seed": 7,
            "stop": ["\n"], "presence_penalty": 0.1, "frequency_penalty": 0.2,
            "logprobs": true, "top_logprobs": 3, "n": 1, "user": "ignored"
        }))
        .unwrap();
        assert!(plan.stream && plan.include_usage && plan.logprobs);
        let r = plan.request;
        let Some(Prompt::Chat(chat)) = &r.prompt else {
            panic!("chat prompt expected")
        };
        assert_eq!(chat.messages[1].content, "Hi there");
        assert_eq!(chat.messages[2].content, "");
        let s = r.sampling.unwrap();
        assert_eq!((s.temperature, s.top_p, s.seed), (0.0, 0.5, Some(7)));
        assert_eq!((s.presence_penalty, s.frequency_penalty), (0.1, 0.2));
        let stop = r.stopping.unwrap();
        assert_eq!((stop.max_tokens, stop.stop), (12, vec!["\n".to_string()]));
        assert_eq!((r.logprobs, r.top_logprobs), (true, 3));
    }

    #[test]
    fn chat_bad_requests_say_why() {
        let m = msg(chat_plan(json!({"model": "m", "messages": []})));
        assert!(m.contains("messages is empty"), "{m}");
        let m = msg(chat_plan(json!({"model": "m"})));
        assert!(m.contains("messages"), "{m}");
        let m = msg(chat_plan(json!({"model": "m", "messages": "hi"})));
        assert!(m.contains("invalid type"), "{m}");
        let user = json!([{"role": "user", "content": "Hi"}]);
        let m = msg(chat_plan(json!({"messages": user, "n": 2})));
        assert!(m.contains("n=2"), "{m}");
        let m = msg(chat_plan(json!({"messages": user, "max_tokens": -1})));
        assert!(m.contains("max_tokens=-1"), "{m}");
        let m = msg(chat_plan(
            json!({"messages": user, "max_tokens": 1_000_000}),
        ));
        assert!(m.contains("context of 8192"), "{m}");
        let m = msg(chat_plan(json!({"messages": user, "max_tokens": "ten"})));
        assert!(m.contains("invalid type"), "{m}");
        let m = msg(chat_plan(json!({"messages": user, "temperature": 5})));
        assert!(m.contains("temperature=5"), "{m}");
        let m = msg(chat_plan(
            json!({"messages": user, "logprobs": true, "top_logprobs": 30}),
        ));
        assert!(m.contains("top_logprobs=30"), "{m}");
        let m = msg(chat_plan(json!({"messages": user, "top_logprobs": 3})));
        assert!(m.contains("logprobs"), "{m}");
        let m = msg(chat_plan(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ));
        assert!(m.contains("messages[0].content[0]"), "{m}");
        let e = chat_plan(json!({"messages": user, "stop": [1]})).unwrap_err();
        assert_eq!(e.param, Some("stop"));
        assert!(parse_json::<ChatRequest>(b"{not json").is_err());
    }

    #[test]
    fn completion_prompts_as_text_or_ids() {
        let prompt = |v: Value| completion_prompt(&v);
        assert_eq!(prompt(json!("hi")).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(prompt(json!(["hi"])).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(
            prompt(json!([1, 2, 3])).unwrap(),
            Prompt::TokenIds(pb::TokenIds { ids: vec![1, 2, 3] })
        );
        assert_eq!(
            prompt(json!([[4, 5]])).unwrap(),
            Prompt::TokenIds(pb::TokenIds { ids: vec![4, 5] })
        );
        assert!(msg(prompt(json!(["a", "b"]))).contains("2 prompts"));
        assert!(msg(prompt(json!([[1], [2]]))).contains("2 prompts"));
        assert!(msg(prompt(json!([1, -2]))).contains("prompt[1]=-2"));
        assert!(msg(prompt(json!([]))).contains("empty"));
        assert!(msg(prompt(json!(null))).contains("required"));
        assert!(prompt(json!(5)).is_err());
    }

    #[test]
    fn completion_defaults_and_echo_scoring() {
        let plan = completion_plan(json!({"model": "m", "prompt": "Once"})).unwrap();
        assert_eq!(plan.request.stopping.as_ref().unwrap().max_tokens, 16);
        assert!(!plan.echo && plan.logprobs.is_none() && plan.request.prompt_logprobs.is_none());

        let plan = completion_plan(
            json!({"model": "m", "prompt": [1, 2, 3], "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0}),
        )
        .unwrap();
        assert!(plan.score_only && plan.echo);
        assert_eq!(plan.logprobs, Some(1));
        assert_eq!(plan.request.prompt_logprobs, Some(1));
        assert_eq!(plan.request.stopping.as_ref().unwrap().max_tokens, 1);
        assert_eq!(plan.prompt_text, None);
    }

    #[test]
    fn completion_bad_requests_say_why() {
        let m = msg(completion_plan(json!({"prompt": "x", "max_tokens": 0})));
        assert!(m.contains("echo"), "{m}");
        let m = msg(completion_plan(json!({"prompt": "x", "n": 3})));
        assert!(m.contains("n=3"), "{m}");
        let m = msg(completion_plan(json!({"prompt": "x", "best_of": 2})));
        assert!(m.contains("best_of=2"), "{m}");
        let m = msg(completion_plan(json!({"prompt": "x", "logprobs": 50})));
        assert!(m.contains("logprobs=50"), "{m}");
        let m = msg(completion_plan(
            json!({"prompt": [1], "echo": true, "stream": true}),
        ));
        assert!(m.contains("text prompt"), "{m}");
    }
}
