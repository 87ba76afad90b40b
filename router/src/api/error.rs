//! One error type for every HTTP front end, rendered in each API's shape:
//! OpenAI `{"error": {"message", "type", "param", "code"}}`, Ollama
//! `{"error": "..."}`, TGI `{"error": "...", "error_type": "..."}`.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tonic::{Code, Status};

use crate::dispatch::DispatchError;
use crate::pool::PickError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    BadRequest,
    Unauthorized,
    NotFound,
    /// The request conflicts with what is running (an adapter loaded again
    /// under a name its requests still use).
    Conflict,
    /// The body is larger than `--max-body-bytes`.
    TooLarge,
    /// The body did not arrive within `--body-timeout`.
    BodyTimeout,
    Overloaded,
    Unavailable,
    /// The request ran past `--request-timeout`.
    Deadline,
    Internal,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request parameter at fault, when one is.
    pub param: Option<&'static str>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            param: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            kind: ErrorKind::BadRequest,
            message: message.into(),
            param,
        }
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::Deadline => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` and `code`.
    fn openai_type_code(&self) -> (&'static str, Option<&'static str>) {
        match self.kind {
            ErrorKind::BadRequest => ("invalid_request_error", None),
            ErrorKind::Unauthorized => ("authentication_error", Some("invalid_api_key")),
            ErrorKind::NotFound => ("invalid_request_error", Some("model_not_found")),
            ErrorKind::Conflict => ("invalid_request_error", Some("conflict")),
            ErrorKind::TooLarge => ("invalid_request_error", Some("request_too_large")),
            ErrorKind::BodyTimeout => ("invalid_request_error", Some("request_timeout")),
            ErrorKind::Deadline => ("timeout", Some("deadline_exceeded")),
            ErrorKind::Overloaded => ("rate_limit_error", Some("rate_limit_exceeded")),
            ErrorKind::Unavailable => ("service_unavailable", Some("no_healthy_backend")),
            ErrorKind::Internal => ("server_error", None),
        }
    }

    /// The OpenAI error object (also sent as an SSE event mid-stream).
    pub(crate) fn openai_body(&self) -> serde_json::Value {
        let (kind, code) = self.openai_type_code();
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
    }

    pub(crate) fn ollama_response(&self) -> Response {
        self.with_status(Json(json!({"error": self.message})))
    }

    pub(crate) fn tgi_body(&self) -> serde_json::Value {
        let kind = match self.kind {
            ErrorKind::BadRequest
            | ErrorKind::NotFound
            | ErrorKind::Conflict
            | ErrorKind::TooLarge
            | ErrorKind::BodyTimeout => "validation",
            ErrorKind::Deadline => "generation",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unauthorized => "authentication",
            ErrorKind::Unavailable | ErrorKind::Internal => "generation",
        };
        json!({"error": self.message, "error_type": kind})
    }

    /// TGI answers validation errors with 422.
    pub(crate) fn tgi_response(&self) -> Response {
        let mut response = self.with_status(Json(self.tgi_body()));
        if self.kind == ErrorKind::BadRequest {
            *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
        }
        response
    }

    /// The error as the front end `shape` answers it.
    pub(crate) fn in_shape(self, shape: super::Shape) -> Response {
        match shape {
            super::Shape::OpenAi => self.into_response(),
            super::Shape::Ollama => self.ollama_response(),
            super::Shape::Tgi => self.tgi_response(),
        }
    }

    fn with_status(&self, body: impl IntoResponse) -> Response {
        let mut response = (self.status(), body).into_response();
        // Both say "come back": soon for a full queue, later for a model that has
        // no backend (one is starting).
        let retry_after = match self.kind {
            ErrorKind::Overloaded => Some("1"),
            ErrorKind::Unavailable => Some("10"),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(seconds));
        }
        response
    }
}

impl IntoResponse for ApiError {
    /// The OpenAI shape, the default for the router's own routes.
    fn into_response(self) -> Response {
        self.with_status(Json(self.openai_body()))
    }
}

impl From<PickError> for ApiError {
    fn from(e: PickError) -> Self {
        let message = e.to_string();
        match e {
            PickError::UnknownModel(_) => ApiError {
                kind: ErrorKind::NotFound,
                message,
                param: Some("model"),
            },
            PickError::UnknownAdapter { .. } => ApiError {
                kind: ErrorKind::NotFound,
                message,
                param: Some("adapter_id"),
            },
            PickError::ModelRequired(_) => ApiError::bad_request(message, Some("model")),
            PickError::Overloaded(_) => ApiError::new(ErrorKind::Overloaded, message),
            PickError::NoBackends(_)
            | PickError::NoHealthy(_)
            | PickError::HoldTimeout { .. }
            | PickError::HoldFull { .. } => ApiError::new(ErrorKind::Unavailable, message),
        }
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let message = status.message().to_string();
        let kind = match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ErrorKind::BadRequest
            }
            Code::NotFound => ErrorKind::NotFound,
            Code::ResourceExhausted => ErrorKind::Overloaded,
            Code::DeadlineExceeded => ErrorKind::Deadline,
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted => {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Internal,
        };
        let message = match kind {
            ErrorKind::BadRequest | ErrorKind::Deadline => message,
            _ => format!("backend error ({:?}): {message}", status.code()),
        };
        ApiError::new(kind, message)
    }
}

impl From<DispatchError> for ApiError {
    fn from(e: DispatchError) -> Self {
        match e {
            DispatchError::Pick(p) => p.into(),
            DispatchError::Upstream(s) => s.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_http_codes() {
        let code = |s: Status| ApiError::from(s).status();
        assert_eq!(code(Status::invalid_argument("x")), StatusCode::BAD_REQUEST);
        assert_eq!(
            code(Status::unavailable("x")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            code(Status::resource_exhausted("x")),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            code(Status::internal("x")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        let e = ApiError::from(Status::invalid_argument("the prompt has 9000 tokens"));
        assert_eq!(e.message, "the prompt has 9000 tokens");
    }

    #[test]
    fn pick_errors_map_to_404_429_503() {
        let e = ApiError::from(PickError::UnknownModel("x".into()));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.openai_body()["error"]["code"], "model_not_found");
        assert_eq!(e.openai_body()["error"]["param"], "model");
        let e = ApiError::from(PickError::Overloaded("m".into()));
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        let response = e.into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let e = ApiError::from(PickError::NoHealthy("m".into()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(PickError::NoBackends("m".into()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.starts_with("no backend ready for model \"m\""));
        let e = ApiError::from(PickError::HoldTimeout {
            model: "m".into(),
            waited: std::time::Duration::from_secs(300),
        });
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("within 300s"), "{}", e.message);
        assert_eq!(e.into_response().headers()[header::RETRY_AFTER], "10");
    }

    #[test]
    fn openai_error_shape() {
        let body = ApiError::bad_request("n=2 is not supported", Some("n")).openai_body();
        assert_eq!(
            body,
            json!({"error": {"message": "n=2 is not supported", "type": "invalid_request_error", "param": "n", "code": null}})
        );
    }
}
