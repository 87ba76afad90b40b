//! `shardserve bench --url URL`: a bounded load test of a server that speaks
//! the OpenAI API. Two warm-up requests, then per concurrency level C a
//! closed loop: C workers, each sending its next streamed `/v1/completions`
//! request when the previous one ends, until the level's N requests are
//! done. Each request asks for exactly G tokens (`ignore_eos`, `min_tokens`)
//! after a prompt of about P tokens that starts differently every time, so a
//! prefix cache cannot answer it for free. A failing request is counted and
//! its message kept; it never stops the run.

mod client;
mod report;
mod sse;
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::task::JoinSet;

use self::client::Target;
use self::report::Report;
use self::stats::{Level, summarize};

/// Tokens asked of each warm-up request.
const WARMUP_TOKENS: usize = 4;

/// The load test, as given on the command line.
#[derive(Debug, Clone)]
pub(super) struct Config {
    /// `http://HOST:PORT`, without a trailing `/` or `/v1`.
    pub url: String,
    /// The served model name; none asks the server.
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub concurrency: Vec<usize>,
    /// Requests per level; none is `default_requests(concurrency)`.
    pub requests: Option<usize>,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub request_timeout: Duration,
    pub json: bool,
}

/// The server's base URL from what a user types: `http://host:port`,
/// with or without a trailing `/` or `/v1` (an OpenAI base URL).
pub(super) fn base_url(url: &str) -> Result<String> {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let parsed =
        reqwest::Url::parse(trimmed).with_context(|| format!("--url {url} is not a URL"))?;
    match parsed.scheme() {
        "http" => Ok(trimmed.to_string()),
        "https" => bail!(
            "--url {url}: https is not supported (this build has no TLS); use the server's plain-HTTP address or a port-forward"
        ),
        other => bail!("--url {url}: the scheme must be http, not {other}"),
    }
}

/// Requests per level when `--requests` is not given.
fn default_requests(concurrency: usize) -> usize {
    (2 * concurrency).max(8)
}

/// What every request of the run asks for.
#[derive(Debug, Clone)]
struct Workload {
    model: String,
    /// Differs between runs, so one run cannot feed the next one's cache.
    nonce: u32,
    /// Filler words after the request's own tag.
    words: usize,
    gen_tokens: usize,
}

impl Workload {
    /// A streamed completion of `gen_tokens` tokens, no fewer and no more
    /// where the server allows it, after the prompt tagged `tag`.
    fn body(&self, tag: &str, gen_tokens: usize) -> Value {
        json!({
            "model": self.model,
            "prompt": prompt(&format!("[{} {tag}]", self.nonce), self.words),
            "max_tokens": gen_tokens,
            "min_tokens": gen_tokens,
            "ignore_eos": true,
            "temperature": 0.0,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    }
}

/// `tag` then `words` words of filler text: the tag comes first, so no two
/// prompts share more than a token or two of prefix.
fn prompt(tag: &str, words: usize) -> String {
    let mut text = tag.to_string();
    for word in super::FILLER.split_whitespace().cycle().take(words) {
        text.push(' ');
        text.push_str(word);
    }
    text
}

/// Filler words for a prompt of about `asked` tokens, from the warm-ups'
/// prompts by the server's count: `bare` tokens for the tag alone, `full`
/// for the tag and `used` words.
fn calibrated_words(asked: usize, used: usize, bare: Option<u64>, full: Option<u64>) -> usize {
    match (bare, full) {
        (Some(bare), Some(full)) if full > bare && used > 0 => {
            let per_word = (full - bare) as f64 / used as f64;
            ((asked as f64 - bare as f64) / per_word).round().max(0.0) as usize
        }
        _ => asked,
    }
}

fn nonce() -> u32 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (now.as_secs() as u32 ^ now.subsec_nanos()) % 1_000_000
}

pub(super) fn run(config: Config) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = runtime.block_on(bench(&config, nonce()))?;
    if config.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    match report.failures() {
        (0, _, _) => Ok(()),
        (failed, total, first) => bail!(
            "{failed} of {total} requests to {} failed; first error: {}",
            config.url,
            first.unwrap_or("unknown")
        ),
    }
}

/// The warm-ups, then every level in turn.
async fn bench(config: &Config, nonce: u32) -> Result<Report> {
    let target = Target::new(&config.url, config.api_key.clone(), config.request_timeout)?;
    let model = match &config.model {
        Some(model) => model.clone(),
        None => {
            let model = target.first_model().await?;
            eprintln!(
                "model {model} (the first listed at {}/v1/models)",
                config.url
            );
            model
        }
    };
    let mut work = Workload {
        model,
        nonce,
        words: config.prompt_tokens,
        gen_tokens: config.gen_tokens,
    };
    // The warm-ups are left out of the numbers. They wake the server, check
    // that it answers at all, and measure how many tokens the tag and the
    // filler words make: the tag alone, then the tag and P words.
    let bare = warm_up(&target, &work, 0).await?;
    let full = warm_up(&target, &work, config.prompt_tokens).await?;
    work.words = calibrated_words(config.prompt_tokens, config.prompt_tokens, bare, full);

    let mut levels = Vec::with_capacity(config.concurrency.len());
    for &concurrency in &config.concurrency {
        let requests = config
            .requests
            .unwrap_or_else(|| default_requests(concurrency));
        eprintln!("concurrency {concurrency}: {requests} requests");
        let level = run_level(&target, &work, concurrency, requests).await;
        warn_if_short(&level, config.gen_tokens);
        levels.push(level);
    }
    Ok(Report {
        url: config.url.clone(),
        model: work.model,
        prompt_tokens: config.prompt_tokens,
        gen_tokens: config.gen_tokens,
        levels,
    })
}

/// One warm-up request with `words` filler words: the prompt's tokens by
/// the server's count, when it reports usage.
async fn warm_up(target: &Target, work: &Workload, words: usize) -> Result<Option<u64>> {
    let warm = Workload {
        words,
        ..work.clone()
    };
    let body = warm.body(
        &format!("warm-up {words}"),
        WARMUP_TOKENS.min(work.gen_tokens),
    );
    match target.complete(&body).await {
        Ok(sample) => Ok(sample.prompt_tokens),
        Err(e) => bail!(
            "the warm-up request to {} failed, so the benchmark did not start: {e}",
            target.completions_url()
        ),
    }
}

/// A closed loop: `concurrency` workers share `requests` requests, each
/// sending its next one when the previous one ends.
async fn run_level(target: &Target, work: &Workload, concurrency: usize, requests: usize) -> Level {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    let start = Instant::now();
    for _ in 0..concurrency.min(requests) {
        let (target, work, next) = (target.clone(), work.clone(), next.clone());
        workers.spawn(async move {
            let mut results = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    return results;
                }
                let body = work.body(&format!("c{concurrency} #{i}"), work.gen_tokens);
                results.push((i, target.complete(&body).await));
            }
        });
    }
    let mut results = Vec::with_capacity(requests);
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(worker) => results.extend(worker),
            Err(e) => results.push((usize::MAX, Err(format!("a load worker failed: {e}")))),
        }
    }
    let wall = start.elapsed();
    // In the order sent, so that the error samples come in that order.
    results.sort_by_key(|(i, _)| *i);
    let results: Vec<_> = results.into_iter().map(|(_, r)| r).collect();
    summarize(concurrency, &results, wall)
}

/// Says so when the server generated fewer tokens than asked: it then
/// ignores `ignore_eos`/`min_tokens`, and its numbers are not comparable.
fn warn_if_short(level: &Level, gen_tokens: usize) {
    let ok = (level.requests - level.errors) as u64;
    if ok > 0 && level.generated_tokens < ok * gen_tokens as u64 {
        eprintln!(
            "warning: at concurrency {} the server generated {:.1} tokens per request, not {gen_tokens}; it may not honour ignore_eos or min_tokens",
            level.concurrency,
            level.generated_tokens as f64 / ok as f64
        );
    }
}

#[cfg(test)]
mod tests;
