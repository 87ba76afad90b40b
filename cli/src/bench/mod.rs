//! `shardserve bench`: two benchmarks behind one command. Without `--url`,
//! prefill and decode speed of a model file loaded in this process
//! (`local`); with `--url`, a bounded closed-loop load test of a server that
//! speaks the OpenAI API (`load`), ours or another one for comparison.

mod load;
mod local;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::Args;
use shardserve_worker::device::DeviceSpec;

use crate::runtime::ThreadArgs;

/// Text the benchmark prompts are cut from (its content does not change speed).
const FILLER: &str = "The history of computing is a story of people who wanted to calculate faster \
and more reliably than by hand. Mechanical calculators gave way to relays and vacuum tubes, then to \
transistors and integrated circuits, and each step made machines smaller, cheaper and more capable. ";

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Without --url: the GGUF model file or Hugging Face model directory to
    /// load. With --url: the served model name (default: the first one the
    /// server lists at /v1/models).
    #[arg(long, required_unless_present = "url")]
    pub model: Option<String>,
    /// Prompt lengths in tokens, comma-separated (default 128,512). With
    /// --url: one length, approximate (default 128).
    #[arg(long, value_delimiter = ',')]
    pub prompt_tokens: Vec<usize>,
    /// Tokens generated after each prompt.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3, conflicts_with = "url")]
    pub repetitions: usize,
    /// Without --url: sequences run together, one batch per value
    /// (comma-separated; decode tok/s is then the batch's aggregate).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1",
        conflicts_with = "url"
    )]
    pub batch: Vec<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Tensor-parallel size: the model is split over this many local rank
    /// processes (TCP between them, as between pods).
    #[arg(long, default_value_t = 1, conflicts_with = "url")]
    pub tensor: usize,
    /// Without --url: where the ranks compute, `cpu`, `cuda:N`, or `cuda` (rank R on
    /// GPU R); GPUs need a CUDA build.
    #[arg(long, default_value_t = DeviceSpec::Cpu, conflicts_with = "url")]
    pub device: DeviceSpec,
    /// Without --url: a LoRA adapter (PEFT directory or GGUF LoRA file) the batch's
    /// rows run on; repeat the flag to spread the rows over several adapters
    /// (row i on adapter i mod N).
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub lora: Vec<std::path::PathBuf>,
    /// Without --url: sample at this temperature (0, the default: greedy), to measure
    /// what drawing tokens costs.
    #[arg(long, default_value_t = 0.0, conflicts_with = "url")]
    pub temperature: f32,
    /// Without --url: nucleus filter of the sampled decode (1 = off).
    #[arg(long, default_value_t = 1.0, conflicts_with = "url")]
    pub top_p: f32,
    /// Without --url: top-k filter of the sampled decode (0 = off).
    #[arg(long, default_value_t = 0, conflicts_with = "url")]
    pub top_k: usize,
    /// Without --url: repetition penalty on every token seen (1 = off).
    #[arg(long, default_value_t = 1.0, conflicts_with = "url")]
    pub repetition_penalty: f32,
    /// Load-test the OpenAI API at this base URL (our router,
    /// llama-server, vLLM, ...) instead of loading a model here.
    #[arg(long)]
    pub url: Option<String>,
    /// With --url: requests in flight at a time, one level per value.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,4,8,16",
        requires = "url"
    )]
    pub concurrency: Vec<usize>,
    /// With --url: requests per level (default: twice the concurrency, at least 8).
    #[arg(long, requires = "url")]
    pub requests: Option<usize>,
    /// With --url: bearer token for servers that require API keys.
    #[arg(long, env = "SHARDSERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// With --url: seconds one request may take, streaming included, before
    /// it counts as an error.
    #[arg(long, default_value_t = 300, requires = "url")]
    pub request_timeout: u64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match &args.url {
        Some(url) => load::run(load_config(url, &args)?),
        None => {
            let model = args.model.clone().map(PathBuf::from);
            let Some(model) = model else {
                bail!("--model PATH is required without --url");
            };
            let prompt_tokens = match args.prompt_tokens.as_slice() {
                [] => vec![128, 512],
                given => given.to_vec(),
            };
            local::run(&args, &model, &prompt_tokens)
        }
    }
}

fn load_config(url: &str, args: &BenchArgs) -> Result<load::Config> {
    let prompt_tokens = match args.prompt_tokens.as_slice() {
        [] => 128,
        [p] => *p,
        many => bail!(
            "--prompt-tokens takes one value with --url, not {} ({many:?})",
            many.len()
        ),
    };
    if let Some(c) = args.concurrency.iter().find(|&&c| c == 0) {
        bail!("--concurrency {c} is invalid: each level needs at least 1 request in flight");
    }
    if args.requests == Some(0) {
        bail!("--requests 0 is invalid: each level needs at least 1 request");
    }
    if args.gen_tokens == 0 {
        bail!("--gen-tokens 0 is invalid with --url: time per token needs tokens");
    }
    Ok(load::Config {
        url: load::base_url(url)?,
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        concurrency: args.concurrency.clone(),
        requests: args.requests,
        prompt_tokens,
        gen_tokens: args.gen_tokens,
        request_timeout: Duration::from_secs(args.request_timeout.max(1)),
        json: args.json,
    })
}
