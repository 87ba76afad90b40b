//! Mapping between the `shardserve.v1` messages and the engine's request and
//! event types, as pure functions on plain data.
//!
//! Proto3 cannot tell an unset scalar from zero, so zeros take the documented
//! defaults here (top_p 0 → 1, max_tokens 0 → no limit, ...). Values that stay
//! invalid are refused with INVALID_ARGUMENT naming the proto field, before the
//! request reaches the engine.

use shardserve_proto::v1 as pb;
use tonic::Status;

use crate::engine::{
    AdapterInfo, EngineError, FinishReason, Finished, GenerationRequest, LogprobEntry, ModelInfo,
    Prompt, Stopping, TokenEvent,
};
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::tokenizer::{ChatMessage, TokenizerError};

/// Most alternatives a request may ask for, per token (`top_logprobs`,
/// `prompt_logprobs`).
const MAX_ALTERNATIVES: u32 = 20;

/// The engine request for a `GenerateRequest`, or INVALID_ARGUMENT naming the
/// field at fault.
pub fn generation_request(req: &pb::GenerateRequest) -> Result<GenerationRequest, Status> {
    let prompt = prompt(req.prompt.as_ref())?;
    let sampling = sampling_params(req.sampling.as_ref())?;
    let stopping = stopping(req.stopping.as_ref())?;
    if req.top_logprobs > MAX_ALTERNATIVES {
        return Err(Status::invalid_argument(format!(
            "top_logprobs={} is more than {MAX_ALTERNATIVES} alternatives",
            req.top_logprobs
        )));
    }
    let logprobs = (req.logprobs || req.top_logprobs > 0).then_some(req.top_logprobs as usize);
    let prompt_logprobs = match req.prompt_logprobs {
        Some(k) if k > MAX_ALTERNATIVES => {
            return Err(Status::invalid_argument(format!(
                "prompt_logprobs={k} is more than {MAX_ALTERNATIVES} alternatives"
            )));
        }
        other => other.map(|k| k as usize),
    };
    Ok(GenerationRequest {
        prompt,
        sampling,
        stopping,
        logprobs,
        prompt_logprobs,
        priority: req.priority,
        max_prompt_tokens: req.max_prompt_tokens.map(|n| n as usize),
        adapter: (!req.adapter.is_empty()).then(|| req.adapter.clone()),
    })
}

fn prompt(prompt: Option<&pb::generate_request::Prompt>) -> Result<Prompt, Status> {
    use pb::generate_request::Prompt as P;
    match prompt {
        None => Err(Status::invalid_argument(
            "prompt is missing: set one of text, chat or token_ids",
        )),
        Some(P::Text(text)) => Ok(Prompt::Text(text.clone())),
        Some(P::Chat(chat)) if chat.messages.is_empty() => {
            Err(Status::invalid_argument("chat.messages is empty"))
        }
        Some(P::Chat(chat)) => Ok(Prompt::Chat(
            chat.messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: m.content.clone(),
                })
                .collect(),
        )),
        Some(P::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids.clone())),
    }
}

/// Sampling parameters with proto3's zeros read as "unset"; the ranges are
/// checked here so that the message names the field.
fn sampling_params(p: Option<&pb::SamplingParams>) -> Result<SamplingParams, Status> {
    let Some(p) = p else {
        return Ok(SamplingParams::default());
    };
    let or_one = |v: f32| if v == 0.0 { 1.0 } else { v };
    let params = SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: or_one(p.top_p),
        min_p: p.min_p,
        repetition_penalty: or_one(p.repetition_penalty),
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
    };
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("sampling.{e}")))?;
    Ok(params)
}

fn stopping(s: Option<&pb::StoppingCriteria>) -> Result<Stopping, Status> {
    let Some(s) = s else {
        return Ok(Stopping::default());
    };
    // An empty stop string would match before the first token.
    if let Some(i) = s.stop.iter().position(String::is_empty) {
        return Err(Status::invalid_argument(format!(
            "stopping.stop[{i}] is empty"
        )));
    }
    Ok(Stopping {
        max_tokens: (s.max_tokens > 0).then_some(s.max_tokens as usize),
        stop: s.stop.clone(),
        stop_token_ids: s.stop_token_ids.clone(),
        ignore_eos: s.ignore_eos,
    })
}

/// One streamed token; `text_of` gives a token's text for logprob entries.
pub(crate) fn token_message(event: TokenEvent, text_of: &dyn Fn(u32) -> String) -> pb::Token {
    pb::Token {
        id: event.id,
        text_delta: event.text_delta,
        logprob: event.logprob.map(|e| logprob_entry(e, text_of)),
    }
}

/// The last message of a stream.
pub(crate) fn finished_message(done: Finished, text_of: &dyn Fn(u32) -> String) -> pb::Finished {
    let usage = pb::Usage {
        prompt_tokens: count(done.prompt_token_ids.len()),
        completion_tokens: count(done.token_ids.len()),
        cached_prompt_tokens: 0,
    };
    // The first prompt token has no score (nothing predicts it): the proto
    // list starts at the second.
    let prompt_logprobs = done
        .prompt_logprobs
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .map(|e| logprob_entry(e, text_of))
        .collect();
    pb::Finished {
        reason: finish_reason(done.reason) as i32,
        usage: Some(usage),
        text: done.text,
        prompt_token_ids: done.prompt_token_ids,
        prompt_logprobs,
        matched_stop: done.matched_stop.unwrap_or_default(),
        text_delta: done.text_tail,
    }
}

fn finish_reason(reason: FinishReason) -> pb::FinishReason {
    match reason {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Context => pb::FinishReason::Context,
    }
}

fn logprob_entry(entry: LogprobEntry, text_of: &dyn Fn(u32) -> String) -> pb::LogprobEntry {
    let one = |t: TokenLogprob| pb::TokenLogprob {
        id: t.id,
        logprob: t.logprob,
        text: text_of(t.id),
    };
    pb::LogprobEntry {
        token: Some(one(entry.token)),
        top: entry.top.into_iter().map(one).collect(),
    }
}

pub(crate) fn model_info(info: &ModelInfo, adapters: &[AdapterInfo]) -> pb::ModelInfoResponse {
    let c = &info.config;
    pb::ModelInfoResponse {
        served_model_name: info.served_model_name.clone(),
        architecture: c.architecture.clone(),
        max_sequence_length: count(info.max_seq_len),
        vocab_size: count(c.vocab_size),
        tensor_parallel_size: count(info.tensor_parallel_size),
        weight_format: info.weight_format.clone(),
        eos_token_ids: info.eos_token_ids.clone(),
        has_chat_template: info.has_chat_template,
        num_layers: count(c.num_layers),
        hidden_size: count(c.hidden_size),
        adapters: adapters.iter().map(lora_adapter).collect(),
        max_loras: count(info.max_loras),
    }
}

pub(crate) fn lora_adapter(a: &AdapterInfo) -> pb::LoraAdapter {
    pb::LoraAdapter {
        name: a.name.clone(),
        path: a.path.display().to_string(),
        rank: count(a.rank),
        resident: a.resident,
        requests: count(a.requests),
        waiting: count(a.waiting),
        source: a.source.clone(),
    }
}

/// The gRPC status for an engine error: the caller's mistakes are
/// INVALID_ARGUMENT, a stopped engine is UNAVAILABLE (another worker may
/// serve), the rest INTERNAL.
pub(crate) fn engine_status(err: &EngineError) -> Status {
    let message = err.to_string();
    match err {
        EngineError::InvalidRequest(_) | EngineError::Sampling(_) | EngineError::Adapter(_) => {
            Status::invalid_argument(message)
        }
        EngineError::UnknownAdapter(_) => Status::not_found(message),
        EngineError::AdapterBusy(_) => Status::failed_precondition(message),
        EngineError::Tokenizer(e) if tokenizer_input_error(e) => Status::invalid_argument(message),
        EngineError::Stopped => Status::unavailable(message),
        e if e.is_group_failure() => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// Errors that come from what the caller sent (text, ids, chat messages),
/// not from the model's files.
pub(crate) fn tokenizer_input_error(err: &TokenizerError) -> bool {
    matches!(
        err,
        TokenizerError::Encode(_)
            | TokenizerError::Decode(_)
            | TokenizerError::UnknownId { .. }
            | TokenizerError::Render(_)
    )
}

/// Counts on the wire are u32; saturate rather than wrap.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn text_request(text: &str) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Text(text.into())),
            ..Default::default()
        }
    }

    fn invalid(req: &pb::GenerateRequest) -> String {
        let status = generation_request(req).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        status.message().to_string()
    }

    fn id_text(id: u32) -> String {
        format!("<{id}>")
    }

    #[test]
    fn unset_fields_take_the_defaults() {
        let req = generation_request(&text_request("hi")).unwrap();
        assert!(matches!(&req.prompt, Prompt::Text(t) if t == "hi"));
        assert_eq!(req.sampling, SamplingParams::default());
        assert!(req.sampling.is_greedy());
        assert_eq!(req.stopping.max_tokens, None);
        assert!(req.stopping.stop.is_empty());
        assert!(!req.stopping.ignore_eos);
        assert_eq!(req.logprobs, None);
        assert_eq!(req.prompt_logprobs, None);
    }

    #[test]
    fn zero_sampling_fields_mean_off() {
        let req = pb::GenerateRequest {
            sampling: Some(pb::SamplingParams::default()),
            stopping: Some(pb::StoppingCriteria::default()),
            ..text_request("hi")
        };
        let req = generation_request(&req).unwrap();
        assert_eq!(req.sampling, SamplingParams::default());
        assert_eq!(req.stopping.max_tokens, None);
    }

    #[test]
    fn set_fields_are_carried_over() {
        let req = pb::GenerateRequest {
            sampling: Some(pb::SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 40,
                min_p: 0.05,
                repetition_penalty: 1.1,
                seed: Some(42),
                presence_penalty: 0.5,
                frequency_penalty: -0.5,
            }),
            stopping: Some(pb::StoppingCriteria {
                max_tokens: 16,
                stop: vec!["\n\n".into()],
                stop_token_ids: vec![7],
                ignore_eos: true,
            }),
            ..text_request("hi")
        };
        let req = generation_request(&req).unwrap();
        assert_eq!(
            req.sampling,
            SamplingParams {
                temperature: 0.7,
                top_k: 40,
                top_p: 0.9,
                min_p: 0.05,
                repetition_penalty: 1.1,
                presence_penalty: 0.5,
                frequency_penalty: -0.5,
                seed: Some(42),
            }
        );
        assert_eq!(req.stopping.max_tokens, Some(16));
        assert_eq!(req.stopping.stop, ["\n\n"]);
        assert_eq!(req.stopping.stop_token_ids, [7]);
        assert!(req.stopping.ignore_eos);
    }

    #[test]
    fn chat_and_token_id_prompts_map_through() {
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt {
                messages: vec![pb::ChatMessage {
                    role: "user".into(),
                    content: "안녕".into(),
                }],
            })),
            ..Default::default()
        };
        match generation_request(&req).unwrap().prompt {
            Prompt::Chat(m) => {
                assert_eq!(m.len(), 1);
                assert_eq!(
                    (m[0].role.as_str(), m[0].content.as_str()),
                    ("user", "안녕")
                );
            }
            other => panic!("expected a chat prompt, got {other:?}"),
        }
        let req = pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                ids: vec![1, 2, 3],
            })),
            ..Default::default()
        };
        assert!(
            matches!(generation_request(&req).unwrap().prompt, Prompt::Ids(ids) if ids == [1, 2, 3])
        );
    }

    #[test]
    fn logprobs_flags_map_to_alternative_counts() {
        let with = |logprobs, top_logprobs, prompt_logprobs| {
            generation_request(&pb::GenerateRequest {
                logprobs,
                top_logprobs,
                prompt_logprobs,
                ..text_request("hi")
            })
            .unwrap()
        };
        assert_eq!(with(true, 0, None).logprobs, Some(0));
        assert_eq!(with(false, 5, None).logprobs, Some(5));
        assert_eq!(with(true, 20, None).logprobs, Some(20));
        assert_eq!(with(false, 0, Some(0)).prompt_logprobs, Some(0));
        assert_eq!(with(false, 0, Some(3)).prompt_logprobs, Some(3));
    }

    #[test]
    fn invalid_values_name_the_field() {
        let sampling = |s: pb::SamplingParams| pb::GenerateRequest {
            sampling: Some(s),
            ..text_request("hi")
        };
        let msg = invalid(&sampling(pb::SamplingParams {
            top_p: 1.5,
            ..Default::default()
        }));
        assert!(msg.contains("top_p=1.5"), "{msg}");
        let msg = invalid(&sampling(pb::SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }));
        assert!(msg.contains("temperature"), "{msg}");
        let msg = invalid(&sampling(pb::SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        }));
        assert!(msg.contains("temperature"), "{msg}");
        let msg = invalid(&sampling(pb::SamplingParams {
            repetition_penalty: -1.0,
            ..Default::default()
        }));
        assert!(msg.contains("repetition_penalty"), "{msg}");
        let msg = invalid(&sampling(pb::SamplingParams {
            min_p: 1.5,
            ..Default::default()
        }));
        assert!(msg.contains("min_p"), "{msg}");

        let msg = invalid(&pb::GenerateRequest {
            top_logprobs: 21,
            ..text_request("hi")
        });
        assert!(msg.contains("top_logprobs=21"), "{msg}");
        let msg = invalid(&pb::GenerateRequest {
            prompt_logprobs: Some(50),
            ..text_request("hi")
        });
        assert!(msg.contains("prompt_logprobs=50"), "{msg}");
        let msg = invalid(&pb::GenerateRequest {
            stopping: Some(pb::StoppingCriteria {
                stop: vec!["ok".into(), String::new()],
                ..Default::default()
            }),
            ..text_request("hi")
        });
        assert!(msg.contains("stopping.stop[1]"), "{msg}");
        let msg = invalid(&pb::GenerateRequest::default());
        assert!(msg.contains("prompt"), "{msg}");
        let msg = invalid(&pb::GenerateRequest {
            prompt: Some(pb::generate_request::Prompt::Chat(pb::ChatPrompt::default())),
            ..Default::default()
        });
        assert!(msg.contains("chat.messages"), "{msg}");
    }

    #[test]
    fn token_event_maps_with_logprob_texts() {
        let event = TokenEvent {
            id: 5,
            text_delta: "한".into(),
            logprob: Some(LogprobEntry {
                token: TokenLogprob {
                    id: 5,
                    logprob: -0.25,
                },
                top: vec![
                    TokenLogprob {
                        id: 5,
                        logprob: -0.25,
                    },
                    TokenLogprob {
                        id: 9,
                        logprob: -2.0,
                    },
                ],
            }),
        };
        let msg = token_message(event, &id_text);
        assert_eq!(msg.id, 5);
        assert_eq!(msg.text_delta, "한");
        let lp = msg.logprob.unwrap();
        let token = lp.token.unwrap();
        assert_eq!(
            (token.id, token.logprob, token.text.as_str()),
            (5, -0.25, "<5>")
        );
        let top: Vec<_> = lp.top.iter().map(|t| (t.id, t.text.as_str())).collect();
        assert_eq!(top, [(5, "<5>"), (9, "<9>")]);

        let plain = token_message(
            TokenEvent {
                id: 1,
                text_delta: String::new(),
                logprob: None,
            },
            &id_text,
        );
        assert!(plain.logprob.is_none());
    }

    #[test]
    fn finished_maps_usage_tail_and_prompt_scores() {
        let entry = |id| LogprobEntry {
            token: TokenLogprob { id, logprob: -1.0 },
            top: vec![],
        };
        let done = Finished {
            reason: FinishReason::Stop,
            prompt_token_ids: vec![1, 2, 3],
            token_ids: vec![10, 11],
            text: "ab".into(),
            text_tail: "b".into(),
            prompt_logprobs: Some(vec![None, Some(entry(2)), Some(entry(3))]),
            matched_stop: Some("\n".into()),
        };
        let msg = finished_message(done, &id_text);
        assert_eq!(msg.reason, pb::FinishReason::Stop as i32);
        let usage = msg.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 2));
        assert_eq!(msg.text, "ab");
        assert_eq!(msg.text_delta, "b");
        assert_eq!(msg.prompt_token_ids, [1, 2, 3]);
        let ids: Vec<_> = msg
            .prompt_logprobs
            .iter()
            .map(|e| e.token.as_ref().unwrap().id)
            .collect();
        assert_eq!(ids, [2, 3]);
        assert_eq!(msg.matched_stop, "\n");

        for (reason, want) in [
            (FinishReason::Length, pb::FinishReason::Length),
            (FinishReason::Context, pb::FinishReason::Context),
        ] {
            let done = Finished {
                reason,
                prompt_token_ids: vec![1],
                token_ids: vec![],
                text: String::new(),
                text_tail: String::new(),
                prompt_logprobs: None,
                matched_stop: None,
            };
            let msg = finished_message(done, &id_text);
            assert_eq!(msg.reason, want as i32);
            assert!(msg.prompt_logprobs.is_empty());
            assert_eq!(msg.matched_stop, "");
        }
    }

    #[test]
    fn engine_errors_map_to_codes() {
        let code = |e: EngineError| engine_status(&e).code();
        assert_eq!(
            code(EngineError::InvalidRequest("x".into())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(EngineError::Sampling(
                crate::sampling::SamplingError::OutOfRange {
                    field: "top_p",
                    value: 2.0,
                    range: "(0, 1]",
                }
            )),
            Code::InvalidArgument
        );
        assert_eq!(
            code(EngineError::Tokenizer(TokenizerError::Encode("bad".into()))),
            Code::InvalidArgument
        );
        assert_eq!(
            code(EngineError::Tokenizer(TokenizerError::MissingKey {
                key: "k"
            })),
            Code::Internal
        );
        assert_eq!(code(EngineError::Stopped), Code::Unavailable);
        let status = engine_status(&EngineError::InvalidRequest("the prompt is empty".into()));
        assert!(status.message().contains("the prompt is empty"));
    }
}
