//! The HTTP edge of the load test: the server's model list and one streamed
//! completion, timed as its bytes arrive.

use std::error::Error as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::sse::{SseDecoder, SseEvent, error_text, excerpt, parse_chunk};
use super::stats::{Sample, Tally};

/// Waiting for a TCP connection longer than this is an error of its own.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A server's OpenAI API.
#[derive(Clone)]
pub(super) struct Target {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl Target {
    /// `base` is `http://HOST:PORT` (no trailing `/v1`); each request may
    /// take `timeout`, streaming included.
    pub(super) fn new(base: &str, api_key: Option<String>, timeout: Duration) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            // A fresh connection per request: some servers (llama-server)
            // close idle keep-alive connections just as a client reuses them,
            // which would count as a failed request.
            .pool_max_idle_per_host(0)
            .build()
            .context("setting up the HTTP client")?;
        Ok(Self {
            client,
            base: base.to_string(),
            api_key,
            timeout,
        })
    }

    pub(super) fn completions_url(&self) -> String {
        format!("{}/v1/completions", self.base)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    /// The first model the server lists at `/v1/models`.
    pub(super) async fn first_model(&self) -> Result<String> {
        let url = format!("{}/v1/models", self.base);
        let reply = self
            .authorized(self.client.get(&url))
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", self.describe(&e)))?;
        let status = reply.status();
        let text = reply.text().await.unwrap_or_default();
        if !status.is_success() {
            bail!("{url} answered {status}: {}", error_text(&text));
        }
        let body: Value = serde_json::from_str(&text)
            .with_context(|| format!("{url} answered with something other than JSON"))?;
        match body["data"][0]["id"].as_str() {
            Some(id) => Ok(id.to_string()),
            None => bail!("{url} lists no model; name one with --model"),
        }
    }

    /// One streamed completion of `body`; any failure is an `Err` with a
    /// message that says what went wrong, never a panic or an abort.
    pub(super) async fn complete(&self, body: &Value) -> Result<Sample, String> {
        let start = Instant::now();
        let mut tally = Tally::new(start);
        let reply = self
            .authorized(self.client.post(self.completions_url()))
            .json(body)
            .send()
            .await
            .map_err(|e| self.describe(&e))?;
        let status = reply.status();
        if status != reqwest::StatusCode::OK {
            let text = reply.text().await.unwrap_or_default();
            return Err(format!("HTTP {status}: {}", error_text(&text)));
        }
        let mut reply = reply;
        let mut decoder = SseDecoder::default();
        loop {
            let bytes = match reply.chunk().await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                Err(e) => {
                    return Err(format!(
                        "the stream broke after {} text chunks: {}",
                        tally.text_chunks(),
                        self.describe(&e)
                    ));
                }
            };
            let at = Instant::now();
            for event in decoder.feed(&bytes) {
                observe(&mut tally, event, at)?;
            }
        }
        if let Some(event) = decoder.finish() {
            observe(&mut tally, event, Instant::now())?;
        }
        tally.outcome()
    }

    /// A reqwest error with its causes ("connection refused" sits deep in
    /// the chain), or the timeout it hit.
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!(
                "timed out after {} s (--request-timeout)",
                self.timeout.as_secs()
            );
        }
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        excerpt(&text)
    }
}

fn observe(tally: &mut Tally, event: SseEvent, at: Instant) -> Result<(), String> {
    match event {
        SseEvent::Data(data) => {
            tally.observe(parse_chunk(&data)?, at);
            Ok(())
        }
        SseEvent::Error(data) => Err(format!("error in the stream: {}", error_text(&data))),
    }
}
