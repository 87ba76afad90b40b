//! A request's body, read within the router's limits: at most `--max-body-bytes`
//! (413), within `--body-timeout` of the headers (408). It never rejects on its
//! own: the handler answers its error in the API's own shape.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures::StreamExt;

use super::AppState;
use super::error::{ApiError, ErrorKind};

/// The body, or why there is none.
pub(crate) struct RequestBody(Result<Bytes, ApiError>);

impl RequestBody {
    pub(crate) fn bytes(&self) -> Result<&Bytes, ApiError> {
        self.0.as_ref().map_err(Clone::clone)
    }
}

impl FromRequest<AppState> for RequestBody {
    type Rejection = std::convert::Infallible;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limits = state.limits;
        let max = limits.max_body_bytes;
        let too_large = || {
            ApiError::new(
                ErrorKind::TooLarge,
                format!("the request body is larger than this server's limit of {max} bytes"),
            )
        };
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Ok(Self(Err(too_large())));
        }
        let read = async {
            let mut stream = request.into_body().into_data_stream();
            let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    ApiError::bad_request(format!("cannot read the request body: {e}"), None)
                })?;
                if body.len() + chunk.len() > max {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Bytes::from(body))
        };
        let body = match tokio::time::timeout(limits.body_timeout, read).await {
            Ok(read) => read,
            Err(_) => Err(ApiError::new(
                ErrorKind::BodyTimeout,
                format!(
                    "the request body did not arrive within {} s",
                    limits.body_timeout.as_secs_f64()
                ),
            )),
        };
        Ok(Self(body))
    }
}
