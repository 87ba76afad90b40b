//! API keys: one check for both fronts. HTTP sends `Authorization: Bearer KEY`
//! (the OpenAI convention), gRPC the same in its `authorization` metadata. Health,
//! readiness and metrics stay open on both.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Accepted API keys (empty = authentication off), and how many requests each
/// has running.
#[derive(Clone, Default)]
pub(crate) struct Keys {
    keys: Arc<Vec<String>>,
    running: Arc<Vec<AtomicUsize>>,
    /// Most requests one key may have running (`--max-streams-per-key`).
    max_running: Option<usize>,
}

/// One running request of a key; dropping it ends it.
pub(crate) struct KeySlot {
    running: Arc<Vec<AtomicUsize>>,
    index: usize,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        self.running[self.index].fetch_sub(1, Ordering::AcqRel);
    }
}

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
    pub(crate) fn new(keys: Vec<String>, max_running: Option<usize>) -> Self {
        Self {
            running: Arc::new(keys.iter().map(|_| AtomicUsize::new(0)).collect()),
            keys: Arc::new(keys),
            max_running,
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks an `authorization` value (`Bearer KEY`); the index of the key.
    pub(crate) fn check(&self, authorization: Option<&str>) -> Result<Option<usize>, Refusal> {
        if !self.enabled() {
            return Ok(None);
        }
        let presented = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(Refusal::Missing)?;
        // Every key is compared, so timing does not tell which one matched.
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if constant_time_eq(key.as_bytes(), presented.as_bytes()) {
                found = Some(i);
            }
        }
        found.map(Some).ok_or(Refusal::Invalid)
    }

    /// A running request of key `index`, or how many it already runs when that is
    /// its limit.
    pub(crate) fn enter(&self, index: usize) -> Result<KeySlot, usize> {
        let counter = &self.running[index];
        let before = counter.fetch_add(1, Ordering::AcqRel);
        let slot = KeySlot {
            running: self.running.clone(),
            index,
        };
        match self.max_running {
            Some(max) if before >= max => Err(before),
            _ => Ok(slot),
        }
    }

    /// The gRPC interceptor: UNAUTHENTICATED without a valid key; the key's index
    /// rides along in the request's extensions ([`KeyIndex`]) for its limit.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub(crate) fn intercept(
        &self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        match self.check(authorization) {
            Ok(index) => {
                if let Some(index) = index {
                    request.extensions_mut().insert(KeyIndex(index));
                }
                Ok(request)
            }
            Err(refusal) => Err(tonic::Status::unauthenticated(refusal.message())),
        }
    }

    /// A gRPC call's slot under its key's `--max-streams-per-key`, held as long as
    /// the returned guard lives; RESOURCE_EXHAUSTED when the key runs its limit.
    #[allow(clippy::result_large_err)] // a Status is what the handler returns
    pub(crate) fn enter_grpc(
        &self,
        extensions: &tonic::Extensions,
    ) -> Result<Option<KeySlot>, tonic::Status> {
        let Some(KeyIndex(index)) = extensions.get::<KeyIndex>() else {
            return Ok(None);
        };
        self.enter(*index).map(Some).map_err(|running| {
            tonic::Status::resource_exhausted(format!(
                "this API key already has {running} requests running, this server's limit; \
                 try again when one ends"
            ))
        })
    }
}

/// The index of the API key a gRPC call presented.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyIndex(pub usize);

/// Compares without an early exit, so timing does not leak the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_checked_and_none_configured_lets_all_in() {
        let keys = Keys::new(vec!["a".into(), "secret".into()], None);
        assert_eq!(keys.check(Some("Bearer secret")), Ok(Some(1)));
        assert_eq!(keys.check(Some("Bearer  secret ")), Ok(Some(1)));
        assert_eq!(keys.check(Some("Bearer guess")), Err(Refusal::Invalid));
        assert_eq!(keys.check(Some("secret")), Err(Refusal::Missing));
        assert_eq!(keys.check(None), Err(Refusal::Missing));
        assert_eq!(Keys::default().check(None), Ok(None));
    }

    #[test]
    fn a_key_runs_at_most_its_limit_at_once() {
        let keys = Keys::new(vec!["a".into(), "b".into()], Some(2));
        let first = keys.enter(0).unwrap();
        let _second = keys.enter(0).unwrap();
        assert_eq!(keys.enter(0).err(), Some(2));
        assert!(keys.enter(1).is_ok(), "another key has its own count");
        drop(first);
        assert!(
            keys.enter(0).is_ok(),
            "a slot comes back when a request ends"
        );
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
