//! `shardserve generate`: one prompt through a local engine, printed as text
//! (streamed) or as one JSON object (the contract tests and benchmarks use).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::{Value, json};
use shardserve_worker::device::DeviceSpec;
use shardserve_worker::engine::{EngineOptions, Flow, GenerationRequest, LogprobEntry, Prompt};
use shardserve_worker::sampling::SamplingParams;
use shardserve_worker::tokenizer::ChatMessage;

use crate::runtime::ThreadArgs;

/// The name `--lora`'s adapter is served under (never the base model's).
const LORA_NAME: &str = "lora";

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["chat", "prompt", "prompt_ids"])))]
pub struct GenerateArgs {
    /// GGUF model file or Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// One user message, wrapped in the model's chat template with its generation prompt.
    #[arg(long)]
    pub chat: Option<String>,
    /// Raw text, tokenized as given (BOS added only where the model's metadata says so).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Token ids, comma-separated, used as they are.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Most tokens to generate (0 = none: score the prompt only).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeat the flag for several).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and the K best alternatives.
    #[arg(long, value_name = "K")]
    pub logprobs: Option<usize>,
    /// Report each prompt token's log-probability and the K best alternatives.
    #[arg(long, value_name = "K")]
    pub prompt_logprobs: Option<usize>,
    /// Print one JSON object on one line instead of the streamed text.
    #[arg(long)]
    pub json: bool,
    /// Longest sequence the engine accepts (default: the model's context).
    #[arg(long)]
    pub max_seq_len: Option<usize>,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Tensor-parallel size: the model is split over this many local rank
    /// processes (TCP between them, as between pods).
    #[arg(long, default_value_t = 1)]
    pub tensor: usize,
    /// Where the ranks compute: `cpu`, `cuda:N`, or `cuda` (rank R on GPU R); GPUs
    /// need a CUDA build.
    #[arg(long, default_value_t = DeviceSpec::Cpu)]
    pub device: DeviceSpec,
    /// Generate through this LoRA adapter (a PEFT directory or a GGUF LoRA file),
    /// applied unmerged on the base model.
    #[arg(long, value_name = "PATH")]
    pub lora: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    crate::check_sampling(&sampling)?;
    let threads = args.threads.apply()?;
    let options = EngineOptions {
        max_seq_len: args.max_seq_len,
        ..EngineOptions::default()
    };
    let mut engine =
        crate::group::load_local(&args.model, &options, args.tensor, threads, args.device)?;
    if let Some(path) = &args.lora {
        engine
            .load_adapter(LORA_NAME, path)
            .with_context(|| format!("loading the LoRA adapter {}", path.display()))?;
    }
    let prompt = match (&args.chat, &args.prompt, &args.prompt_ids) {
        (Some(text), _, _) => Prompt::Chat(vec![ChatMessage {
            role: "user".into(),
            content: text.clone(),
        }]),
        (_, Some(text), _) => Prompt::Text(text.clone()),
        (_, _, Some(ids)) => Prompt::Ids(ids.clone()),
        _ => bail!("give one of --chat, --prompt or --prompt-ids"),
    };
    let mut request = GenerationRequest::new(prompt);
    request.sampling = sampling;
    request.stopping.max_tokens = Some(args.max_tokens);
    request.stopping.stop = args.stop.clone();
    request.logprobs = args.logprobs;
    request.prompt_logprobs = args.prompt_logprobs;
    request.adapter = args.lora.as_ref().map(|_| LORA_NAME.to_string());

    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let mut token_logprobs = Vec::new();
    let finished = engine
        .generate(&request, &mut |event| {
            if let Some(entry) = &event.logprob {
                token_logprobs.push(entry_json(entry));
            }
            if stream {
                // A closed stdout (a pipe to `head`) ends generation, not the process.
                if write!(stdout, "{}", event.text_delta)
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    return Flow::Cancel;
                }
            }
            Flow::Continue
        })
        .map_err(anyhow::Error::from)?;
    let Some(finished) = finished else {
        return Ok(());
    };
    if stream {
        println!("{}", finished.text_tail);
        return Ok(());
    }
    let mut out = json!({
        "prompt_token_ids": finished.prompt_token_ids,
        "token_ids": finished.token_ids,
        "text": finished.text,
        "finish_reason": finished.reason.as_str(),
    });
    if args.logprobs.is_some() {
        out["logprobs"] = Value::Array(token_logprobs);
    }
    if let Some(scores) = &finished.prompt_logprobs {
        out["prompt_logprobs"] = scores
            .iter()
            .map(|e| e.as_ref().map_or(Value::Null, entry_json))
            .collect();
    }
    println!("{out}");
    Ok(())
}

fn entry_json(e: &LogprobEntry) -> Value {
    json!({
        "id": e.token.id,
        "logprob": e.token.logprob,
        "top": e.top.iter().map(|t| json!({"id": t.id, "logprob": t.logprob})).collect::<Vec<_>>(),
    })
}
