//! A request body of each HTTP API mapped to the `GenerateRequest` the workers
//! would be sent, with no server around it: the same parse and checks the
//! handlers run, less the model lookup (the limits stand for what the lookup
//! finds). The damaged-body sweep and the fuzz targets call it.

use shardserve_proto::v1 as pb;

use super::openai::request::{ChatRequest, CompletionRequest, chat, completion};
use super::{ApiError, Limits, ollama, parse_json, tgi};

/// The endpoints whose bodies map to a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiEndpoint {
    /// `POST /v1/chat/completions`
    OpenAiChat,
    /// `POST /v1/completions`
    OpenAiCompletion,
    /// `POST /api/chat`
    OllamaChat,
    /// `POST /api/generate`
    OllamaGenerate,
    /// `POST /generate`, `/generate_stream` and `/` (one body for all three).
    TgiGenerate,
}

/// Why a body was refused: the HTTP status the handler answers and its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct BodyRefused {
    pub status: u16,
    pub message: String,
}

impl From<ApiError> for BodyRefused {
    fn from(e: ApiError) -> Self {
        Self {
            status: e.status().as_u16(),
            message: e.message,
        }
    }
}

/// The request `body` sent to `endpoint` asks of the workers, or the answer
/// that refuses it.
pub fn map_body(
    endpoint: ApiEndpoint,
    body: &[u8],
    limits: Limits,
) -> Result<pb::GenerateRequest, BodyRefused> {
    let mapped = match endpoint {
        ApiEndpoint::OpenAiChat => {
            chat(&parse_json::<ChatRequest>(body)?, limits).map(|plan| plan.request)
        }
        ApiEndpoint::OpenAiCompletion => {
            completion(&parse_json::<CompletionRequest>(body)?, limits).map(|plan| plan.request)
        }
        ApiEndpoint::OllamaChat => ollama::chat_request(&parse_json(body)?, limits),
        ApiEndpoint::OllamaGenerate => ollama::generate_request(&parse_json(body)?, limits),
        ApiEndpoint::TgiGenerate => {
            let body: tgi::GenerateBody = parse_json(body)?;
            tgi::generate_request(&body.parameters, &body.inputs, limits)
        }
    };
    Ok(mapped?)
}
