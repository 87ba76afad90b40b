//! vLLM's run-time LoRA endpoints: `POST /v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`, behind the API key like every generation route.
//! The router fans each call out to every backend of the base model (each is
//! a group, which loads on all its ranks) and reads their adapters back, so
//! requests naming the adapter route at once. Adapters loaded this way live as
//! long as the groups do: a group that restarts gets its deployment's
//! `spec.loraAdapters` again, from the operator or `shardserve up`, and no more.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::adapters_client::AdaptersClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{ApiError, AppState, ErrorKind, RequestBody, Shape, answer, parse_json};
use crate::pool::{PickError, refresh_info};

/// Deadline of reading a backend's adapters back after a change.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);

/// vLLM's `LoadLoRAAdapterRequest`, plus the base model for routers serving several.
#[derive(Debug, Deserialize)]
struct LoadBody {
    lora_name: String,
    /// A PEFT directory or GGUF LoRA file on the workers' file system (a PVC's
    /// mount), or a `file://`, `hf://` or `pip://` source they fetch.
    lora_path: String,
    /// The base model's served name; may be left out when the router serves one.
    #[serde(default)]
    model: Option<String>,
}

/// vLLM's `UnloadLoRAAdapterRequest` (`lora_int_id` is accepted and unused).
#[derive(Debug, Deserialize)]
struct UnloadBody {
    lora_name: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    lora_int_id: Option<i64>,
}

pub(crate) async fn load(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "load_lora_adapter",
        Shape::OpenAi,
        async |state, tracker| {
            let req: LoadBody = parse_json(body.bytes()?)?;
            if req.lora_name.is_empty() || req.lora_path.is_empty() {
                return Err(ApiError::bad_request(
                    "lora_name and lora_path are both required",
                    Some("lora_name"),
                ));
            }
            let model = state.upstream.pool.resolve_model(req.model.as_deref().unwrap_or_default())?;
            tracker.set_model(&model);
            if state.upstream.pool.resolve_model(&req.lora_name).is_ok() {
                return Err(ApiError::bad_request(
                    format!("'{}' is a served model's name; an adapter needs its own", req.lora_name),
                    Some("lora_name"),
                ));
            }
            let change = Change::Load(pb::LoadAdapterRequest {
                name: req.lora_name.clone(),
                path: req.lora_path.clone(),
                model: model.clone(),
            });
            let results = fan_out(state, &model, change).await?;
            judge(&results, false)?;
            tracing::info!(model, adapter = %req.lora_name, source = %req.lora_path, backends = results.len(), "LoRA adapter loaded");
            Ok(success(format!(
                "Success: LoRA adapter '{}' added successfully.",
                req.lora_name
            )))
        },
    )
    .await
}

pub(crate) async fn unload(State(state): State<AppState>, body: RequestBody) -> Response {
    answer(
        state,
        "unload_lora_adapter",
        Shape::OpenAi,
        async |state, tracker| {
            let req: UnloadBody = parse_json(body.bytes()?)?;
            // The adapter's own name finds its base when no model is given.
            let model = match req.model.as_deref() {
                Some(model) => state.upstream.pool.resolve_model(model)?,
                None => state.upstream.pool.resolve(&req.lora_name)?.model,
            };
            tracker.set_model(&model);
            let change = Change::Unload(pb::UnloadAdapterRequest {
                name: req.lora_name.clone(),
                model: model.clone(),
            });
            let results = fan_out(state, &model, change).await?;
            // A backend that restarted since lost its run-time adapters: gone there
            // already. Only when no backend had it is the name unknown.
            judge(&results, true)?;
            tracing::info!(model, adapter = %req.lora_name, "LoRA adapter unloaded (its running requests finish)");
            Ok(success(format!(
                "Success: LoRA adapter '{}' removed successfully.",
                req.lora_name
            )))
        },
    )
    .await
}

fn success(text: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// What is asked of every backend.
#[derive(Clone)]
enum Change {
    Load(pb::LoadAdapterRequest),
    Unload(pb::UnloadAdapterRequest),
}

impl Change {
    async fn send(self, channel: Channel) -> Result<(), Status> {
        let mut client = AdaptersClient::new(channel);
        match self {
            Change::Load(req) => client.load_adapter(req).await.map(|_| ()),
            Change::Unload(req) => client.unload_adapter(req).await.map(|_| ()),
        }
    }
}

/// Sends `change` to every routable backend of `model` at once, then reads each
/// one's adapters back into the pool: (backend, result).
async fn fan_out(
    state: &AppState,
    model: &str,
    change: Change,
) -> Result<Vec<(String, Result<(), Status>)>, ApiError> {
    let pool = &state.upstream.pool;
    let backends = pool.backends_of(model);
    if backends.is_empty() {
        return Err(PickError::NoBackends(model.to_string()).into());
    }
    let calls = backends.into_iter().map(|(id, channel)| {
        let change = change.clone();
        async move {
            let result = change.send(channel.clone()).await;
            refresh_info(pool, model, &id, channel, REFRESH_TIMEOUT).await;
            (id, result)
        }
    });
    Ok(futures::future::join_all(calls).await)
}

/// One answer for the fan-out: success when every backend did it (or, with
/// `absent_ok`, when those that failed did not have it and one did); otherwise
/// the most telling failure: the caller's mistake (bad file, unknown name) over
/// a backend being unavailable.
fn judge(results: &[(String, Result<(), Status>)], absent_ok: bool) -> Result<(), ApiError> {
    let failures: Vec<&(String, Result<(), Status>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    if failures.is_empty() {
        return Ok(());
    }
    let status =
        |r: &Result<(), Status>| r.as_ref().err().cloned().unwrap_or_else(|| Status::ok(""));
    let any_ok = failures.len() < results.len();
    if absent_ok
        && any_ok
        && failures
            .iter()
            .all(|(_, r)| status(r).code() == Code::NotFound)
    {
        return Ok(());
    }
    let worst = failures
        .iter()
        .map(|(id, r)| (id, status(r)))
        .min_by_key(|(_, s)| match s.code() {
            Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition => 0,
            Code::Unavailable => 2,
            _ => 1,
        });
    let Some((id, worst)) = worst else {
        return Ok(());
    };
    let mut error = ApiError::from(worst.clone());
    if worst.code() == Code::FailedPrecondition {
        // Loading over a name whose requests still run.
        error.kind = ErrorKind::Conflict;
    }
    if any_ok {
        error.message = format!(
            "{} (backend {id}; {} of {} backends did it)",
            error.message,
            results.len() - failures.len(),
            results.len()
        );
    }
    Err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(id: &str) -> (String, Result<(), Status>) {
        (id.into(), Ok(()))
    }

    fn failed(id: &str, status: Status) -> (String, Result<(), Status>) {
        (id.into(), Err(status))
    }

    #[test]
    fn every_backend_doing_it_is_success() {
        assert_eq!(judge(&[ok("a"), ok("b")], false), Ok(()));
    }

    #[test]
    fn a_bad_file_is_the_callers_mistake_even_beside_an_unavailable_backend() {
        let results = [
            failed("a", Status::unavailable("gone")),
            failed(
                "b",
                Status::invalid_argument("adapter x: tensor q_proj.lora_B has shape [3, 8]"),
            ),
        ];
        let e = judge(&results, false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::BadRequest);
        assert!(e.message.contains("q_proj.lora_B"), "{e:?}");
    }

    #[test]
    fn unloading_what_some_backends_lost_on_restart_is_success_but_not_what_none_had() {
        let missing = || Status::not_found("adapter 'x' is not served");
        assert_eq!(judge(&[ok("a"), failed("b", missing())], true), Ok(()));
        let none = judge(&[failed("a", missing()), failed("b", missing())], true).unwrap_err();
        assert_eq!(none.kind, ErrorKind::NotFound);
        // A load is not an unload: a backend that failed it is reported.
        let partial =
            judge(&[ok("a"), failed("b", Status::unavailable("gone"))], false).unwrap_err();
        assert_eq!(partial.kind, ErrorKind::Unavailable);
        assert!(partial.message.contains("1 of 2 backends"), "{partial:?}");
    }

    #[test]
    fn loading_over_a_busy_name_is_a_conflict() {
        let e = judge(&[failed("a", Status::failed_precondition("in use"))], false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Conflict);
    }
}
