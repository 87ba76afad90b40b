//! `shardserve chat`: a terminal chat that streams each answer as it is
//! generated, like `ollama run`. By default it talks to a router's OpenAI API
//! (`shardserve up`); `--model-path` runs a model file in this process
//! instead. The conversation is kept between turns.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use shardserve_worker::engine::{Engine, EngineOptions, Flow, GenerationRequest, Prompt};
use shardserve_worker::sampling::SamplingParams;
use shardserve_worker::tokenizer::ChatMessage;

use crate::runtime::ThreadArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// The router (or any OpenAI-compatible server) to talk to.
    #[arg(
        long,
        default_value = "http://127.0.0.1:8080",
        conflicts_with = "model_path"
    )]
    pub url: String,
    /// Served model name (default: the only model the server lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token for servers that require API keys.
    #[arg(long, env = "SHARDSERVE_API_KEY")]
    pub api_key: Option<String>,
    /// Chat with this GGUF file in-process instead of a server.
    #[arg(long)]
    pub model_path: Option<PathBuf>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// A system message to start the conversation with.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub threads: ThreadArgs,
}

pub fn run(args: ChatArgs) -> Result<()> {
    crate::check_sampling(&SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        ..SamplingParams::default()
    })?;
    let history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    match &args.model_path {
        Some(path) => {
            args.threads.apply()?;
            let mut engine = Engine::load(path, &EngineOptions::default())
                .with_context(|| format!("loading {}", path.display()))?;
            let name = engine.info().served_model_name.clone();
            repl(&name, history, |messages, out| {
                local_turn(&mut engine, &args, messages, out)
            })
        }
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let remote = runtime.block_on(Remote::connect(&args))?;
            let name = format!("{} at {}", remote.model, args.url);
            repl(&name, history, |messages, out| {
                runtime.block_on(remote.turn(&args, messages, out))
            })
        }
    }
}

/// Reads lines, asks `turn` for each answer (streamed to stdout by it) and
/// keeps the conversation. A turn that fails is reported, not fatal.
fn repl(
    name: &str,
    mut history: Vec<ChatMessage>,
    mut turn: impl FnMut(&[ChatMessage], &mut dyn Write) -> Result<String>,
) -> Result<()> {
    eprintln!("chatting with {name} (type /reset to start over, Ctrl-D to quit)");
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        write!(stdout, ">>> ")?;
        stdout.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            writeln!(stdout)?;
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            history.retain(|m| m.role == "system");
            continue;
        }
        history.push(ChatMessage {
            role: "user".into(),
            content: line.into(),
        });
        match turn(&history, &mut stdout) {
            Ok(answer) => {
                writeln!(stdout)?;
                history.push(ChatMessage {
                    role: "assistant".into(),
                    content: answer,
                });
            }
            Err(e) => {
                writeln!(stdout)?;
                eprintln!("error: {e:#}");
                history.pop();
            }
        }
    }
}

fn local_turn(
    engine: &mut Engine,
    args: &ChatArgs,
    messages: &[ChatMessage],
    out: &mut dyn Write,
) -> Result<String> {
    let mut request = GenerationRequest::new(Prompt::Chat(messages.to_vec()));
    request.sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        ..SamplingParams::default()
    };
    request.stopping.max_tokens = Some(args.max_tokens);
    let result = engine.generate(&request, &mut |event| {
        let _ = write!(out, "{}", event.text_delta).and_then(|_| out.flush());
        Flow::Continue
    })?;
    match result {
        Some(done) => {
            write!(out, "{}", done.text_tail)?;
            Ok(done.text)
        }
        None => bail!("the generation was cancelled"),
    }
}

/// A server's OpenAI API and the model chosen on it.
struct Remote {
    client: reqwest::Client,
    base: String,
    model: String,
}

impl Remote {
    async fn connect(args: &ChatArgs) -> Result<Self> {
        let client = reqwest::Client::new();
        let base = args.url.trim_end_matches('/').to_string();
        let model = match &args.model {
            Some(model) => model.clone(),
            None => {
                let url = format!("{base}/v1/models");
                let reply = authorized(client.get(&url), args)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {url}; is `shardserve up` running?"))?;
                let body: Value = checked(reply).await?.json().await?;
                let ids: Vec<&str> = body["data"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|m| m["id"].as_str()).collect())
                    .unwrap_or_default();
                match ids.as_slice() {
                    [one] => one.to_string(),
                    [] => bail!("{url} lists no model"),
                    many => bail!(
                        "{url} lists several models ({}); pick one with --model",
                        many.join(", ")
                    ),
                }
            }
        };
        Ok(Self {
            client,
            base,
            model,
        })
    }

    /// One streamed chat completion (server-sent events), written to `out`
    /// as it arrives.
    async fn turn(
        &self,
        args: &ChatArgs,
        messages: &[ChatMessage],
        out: &mut dyn Write,
    ) -> Result<String> {
        let body = json!({
            "model": self.model,
            "messages": messages,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "stream": true,
        });
        let url = format!("{}/v1/chat/completions", self.base);
        let reply = authorized(self.client.post(&url), args)
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let mut reply = checked(reply).await?;
        let mut answer = String::new();
        let mut pending = Vec::new();
        while let Some(chunk) = reply.chunk().await? {
            pending.extend_from_slice(&chunk);
            while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                match sse_delta(line.trim_end())? {
                    SseLine::Delta(text) => {
                        write!(out, "{text}")?;
                        out.flush()?;
                        answer.push_str(&text);
                    }
                    SseLine::Done => return Ok(answer),
                    SseLine::Other => {}
                }
            }
        }
        Ok(answer)
    }
}

fn authorized(request: reqwest::RequestBuilder, args: &ChatArgs) -> reqwest::RequestBuilder {
    match &args.api_key {
        Some(key) => request.bearer_auth(key),
        None => request,
    }
}

/// The reply when it succeeded, else an error with the server's message.
async fn checked(reply: reqwest::Response) -> Result<reqwest::Response> {
    let status = reply.status();
    if status.is_success() {
        return Ok(reply);
    }
    let text = reply.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    bail!("the server answered {status}: {message}")
}

#[derive(Debug, PartialEq)]
enum SseLine {
    Delta(String),
    Done,
    Other,
}

/// One line of an OpenAI chat completion stream.
fn sse_delta(line: &str) -> Result<SseLine> {
    let Some(data) = line.strip_prefix("data:") else {
        return Ok(SseLine::Other);
    };
    let data = data.trim_start();
    if data == "[DONE]" {
        return Ok(SseLine::Done);
    }
    let event: Value =
        serde_json::from_str(data).with_context(|| format!("malformed event: {data}"))?;
    if let Some(message) = event["error"]["message"].as_str() {
        bail!("{message}");
    }
    Ok(match event["choices"][0]["delta"]["content"].as_str() {
        Some(text) if !text.is_empty() => SseLine::Delta(text.to_string()),
        _ => SseLine::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_lines_become_deltas() {
        let line = r#"data: {"choices":[{"index":0,"delta":{"content":"Pa"}}]}"#;
        assert_eq!(sse_delta(line).unwrap(), SseLine::Delta("Pa".into()));
        assert_eq!(sse_delta("data: [DONE]").unwrap(), SseLine::Done);
        assert_eq!(sse_delta("").unwrap(), SseLine::Other);
        let role = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(sse_delta(role).unwrap(), SseLine::Other);
        let err = sse_delta(r#"data: {"error":{"message":"boom"}}"#).unwrap_err();
        assert_eq!(err.to_string(), "boom");
    }
}
