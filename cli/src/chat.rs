//! `shardserve chat`: a terminal chat with a local model, streaming each
//! answer as it is generated. The conversation is kept between turns.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use shardserve_worker::engine::{Engine, EngineOptions, Flow, GenerationRequest, Prompt};
use shardserve_worker::sampling::SamplingParams;
use shardserve_worker::tokenizer::ChatMessage;

use crate::runtime::ThreadArgs;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// GGUF model file.
    #[arg(long)]
    pub model: PathBuf,
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
    args.threads.apply()?;
    let mut engine = Engine::load(&args.model, &EngineOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let mut history: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    eprintln!(
        "chatting with {} (type /reset to start over, Ctrl-D to quit)",
        engine.info().served_model_name
    );
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
        let mut request = GenerationRequest::new(Prompt::Chat(history.clone()));
        request.sampling = SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            ..SamplingParams::default()
        };
        request.stopping.max_tokens = Some(args.max_tokens);
        let result = engine.generate(&request, &mut |event| {
            let _ = write!(stdout, "{}", event.text_delta).and_then(|_| stdout.flush());
            Flow::Continue
        });
        match result {
            Ok(Some(done)) => {
                writeln!(stdout, "{}", done.text_tail)?;
                history.push(ChatMessage {
                    role: "assistant".into(),
                    content: done.text,
                });
            }
            Ok(None) => {}
            Err(e) => {
                // A turn that cannot run (too long a conversation) is reported, not fatal.
                writeln!(stdout)?;
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
}
