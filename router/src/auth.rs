//! API keys: one check for both fronts. HTTP sends `Authorization: Bearer KEY`
//! (the OpenAI convention), gRPC the same in its `authorization` metadata. Health,
//! readiness and metrics stay open on both.

use std::sync::Arc;

/// Accepted API keys; empty = authentication off.
#[derive(Clone, Default)]
pub(crate) struct Keys(Arc<Vec<String>>);

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Missing,
    Invalid,
}

impl Refusal {
    pub(crate) fn message(self) -> &'static str {
        match self {
            Self::Missing => "missing API key: send Authorization: Bearer <key>",
            Self::Invalid => "invalid API key",
        }
    }
}

impl Keys {
    pub(crate) fn new(keys: Vec<String>) -> Self {
        Self(Arc::new(keys))
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.0.is_empty()
    }

    /// Checks an `authorization` value (`Bearer KEY`).
    pub(crate) fn check(&self, authorization: Option<&str>) -> Result<(), Refusal> {
        if !self.enabled() {
            return Ok(());
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Refusal::Missing)?;
        match self
            .0
            .iter()
            .any(|k| constant_time_eq(k.as_bytes(), presented.as_bytes()))
        {
            true => Ok(()),
            false => Err(Refusal::Invalid),
        }
    }

    /// The gRPC interceptor: UNAUTHENTICATED without a valid key.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub(crate) fn intercept(
        &self,
        request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.check(authorization) {
            Ok(()) => Ok(request),
            Err(refusal) => Err(tonic::Status::unauthenticated(refusal.message())),
        }
    }
}

/// Compares without an early exit, so timing does not leak the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked_and_none_configured_lets_all_in() {
        let keys = Keys::new(vec!["a".into(), "secret".into()]);
        assert_eq!(keys.check(Some("Bearer secret")), Ok(()));
        assert_eq!(keys.check(Some("Bearer  secret ")), Ok(()));
        assert_eq!(keys.check(Some("Bearer guess")), Err(Refusal::Invalid));
        assert_eq!(keys.check(Some("secret")), Err(Refusal::Missing));
        assert_eq!(keys.check(None), Err(Refusal::Missing));
        assert_eq!(Keys::default().check(None), Ok(()));
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
