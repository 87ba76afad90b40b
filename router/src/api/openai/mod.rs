//! OpenAI-compatible `/v1/chat/completions`, `/v1/completions` and
//! `/v1/models`: parse and check (`request`), generate, shape (`response`).

pub(crate) mod request;
mod response;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{Value, json};
use shardserve_proto::v1::generate_response::Event;

use self::request::{ChatPlan, ChatRequest, CompletionPlan, CompletionRequest};
use self::response::{CompletionShape, Header};
use super::{
    ApiError, AppState, RequestBody, SSE_DONE, Shape, Tracker, answer, new_id, parse_json,
    sse_frame, stream_response, unix_now,
};
use crate::dispatch::Generation;

pub(crate) async fn chat_completions(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "chat_completions",
        Shape::OpenAi,
        async |state, tracker| {
            let req: ChatRequest = parse_json(body.bytes()?)?;
            let target = state.resolve(req.model.as_deref())?;
            tracker.set_model(&target.model);
            let plan = request::chat(&req, state.limits(&target))?;
            let header = Header {
                id: new_id("chatcmpl-"),
                created: unix_now(),
                model: target.name().to_string(),
            };
            if plan.stream {
                let generation = state.start(&target, plan.request.clone()).await?;
                let frames = chat_stream(generation, plan, header, tracker.take());
                return Ok(stream_response("text/event-stream", frames));
            }
            let collected = state.complete(&target, plan.request.clone()).await?;
            Ok(Json(response::chat_response(&header, &collected, plan.logprobs)).into_response())
        },
    )
    .await
}

fn chat_stream(
    mut generation: Generation,
    plan: ChatPlan,
    header: Header,
    tracker: Tracker,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let _tracker = tracker;
        let usage = plan.include_usage;
        let chunk = |delta: Value, logprobs: Option<Value>, finish: Option<&str>| {
            sse_frame(&response::chat_chunk(&header, delta, logprobs, finish, usage))
        };
        yield chunk(json!({"role": "assistant", "content": ""}), None, None);
        while let Some(event) = generation.next().await {
            match event {
                Ok(Event::Token(t)) => {
                    if t.text_delta.is_empty() && !plan.logprobs {
                        continue;
                    }
                    let logprobs = plan
                        .logprobs
                        .then(|| json!({"content": response::chat_logprob(&t).into_iter().collect::<Vec<_>>()}));
                    yield chunk(json!({"content": t.text_delta}), logprobs, None);
                }
                Ok(Event::Finished(done)) => {
                    let delta = if done.text_delta.is_empty() {
                        json!({})
                    } else {
                        json!({"content": done.text_delta})
                    };
                    yield chunk(delta, None, Some(response::finish_reason(&done)));
                    if usage {
                        yield sse_frame(&response::usage_chunk(&header, "chat.completion.chunk", &done));
                    }
                    break;
                }
                Err(status) => {
                    tracing::warn!(backend = generation.backend(), code = ?status.code(), "stream failed after its first token");
                    yield sse_frame(&ApiError::from(status).openai_body());
                    break;
                }
            }
        }
        yield Bytes::from_static(SSE_DONE);
    }
}

pub(crate) async fn completions(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "completions",
        Shape::OpenAi,
        async |state, tracker| {
            let req: CompletionRequest = parse_json(body.bytes()?)?;
            let target = state.resolve(req.model.as_deref())?;
            tracker.set_model(&target.model);
            let plan = request::completion(&req, state.limits(&target))?;
            let header = Header {
                id: new_id("cmpl-"),
                created: unix_now(),
                model: target.name().to_string(),
            };
            if plan.stream {
                let generation = state.start(&target, plan.request.clone()).await?;
                let frames = completion_stream(generation, plan, header, tracker.take());
                return Ok(stream_response("text/event-stream", frames));
            }
            let collected = state.complete(&target, plan.request.clone()).await?;
            let shape = CompletionShape {
                logprobs: plan.logprobs.is_some(),
                echo: plan.echo,
                score_only: plan.score_only,
                prompt_text: plan.prompt_text.as_deref(),
            };
            Ok(Json(response::completion_response(&header, &collected, shape)).into_response())
        },
    )
    .await
}

fn completion_stream(
    mut generation: Generation,
    plan: CompletionPlan,
    header: Header,
    tracker: Tracker,
) -> impl Stream<Item = Bytes> + Send + 'static {
    async_stream::stream! {
        let _tracker = tracker;
        let usage = plan.include_usage;
        let chunk = |text: &str, logprobs: Option<Value>, finish: Option<&str>| {
            sse_frame(&response::completion_chunk(&header, text, logprobs, finish, usage))
        };
        let mut offset = 0;
        if plan.echo
            && let Some(prompt) = &plan.prompt_text
        {
            offset = prompt.chars().count();
            yield chunk(prompt, None, None);
        }
        while let Some(event) = generation.next().await {
            match event {
                Ok(Event::Token(t)) => {
                    if plan.score_only || (t.text_delta.is_empty() && plan.logprobs.is_none()) {
                        continue;
                    }
                    let logprobs = plan
                        .logprobs
                        .map(|_| response::completion_token_logprobs(&t, offset));
                    offset += t.text_delta.chars().count();
                    yield chunk(&t.text_delta, logprobs, None);
                }
                Ok(Event::Finished(mut done)) => {
                    if plan.score_only {
                        done.text_delta.clear();
                        done.reason = shardserve_proto::v1::FinishReason::Length as i32;
                        if let Some(u) = done.usage.as_mut() {
                            u.completion_tokens = 0;
                        }
                    }
                    yield chunk(&done.text_delta, None, Some(response::finish_reason(&done)));
                    if usage {
                        yield sse_frame(&response::usage_chunk(&header, "text_completion", &done));
                    }
                    break;
                }
                Err(status) => {
                    yield sse_frame(&ApiError::from(status).openai_body());
                    break;
                }
            }
        }
        yield Bytes::from_static(SSE_DONE);
    }
}

pub(crate) async fn models(State(state): State<AppState>) -> Response {
    let created = unix_now();
    let data: Vec<Value> = state
        .upstream
        .pool
        .models()
        .into_iter()
        .flat_map(|m| {
            let max_model_len = m.info.as_ref().map(|i| i.max_sequence_length);
            let base = json!({
                "id": m.model,
                "object": "model",
                "created": created,
                "owned_by": "shardserve",
                "root": m.model,
                "parent": null,
                "max_model_len": max_model_len,
            });
            // vLLM's shape for adapters: `root` where it came from, `parent` its base.
            let adapters = m.adapters.into_iter().map(move |a| {
                json!({
                    "id": a.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "shardserve",
                    "root": a.source,
                    "parent": m.model,
                    "max_model_len": max_model_len,
                })
            });
            std::iter::once(base).chain(adapters)
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
