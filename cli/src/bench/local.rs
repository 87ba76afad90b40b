//! `shardserve bench --model PATH`: prefill and decode tokens per second of
//! a model loaded in this process, the median of several repetitions per
//! setting.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;
use shardserve_worker::engine::{BenchPhase, EngineOptions, EngineTime};
use shardserve_worker::model::backend::profile::{self, OpTime};
use shardserve_worker::sampling::SamplingParams;

use super::BenchArgs;

#[derive(Serialize)]
struct Report {
    model: String,
    threads: usize,
    tensor: usize,
    simd: String,
    /// The LoRA adapters the rows ran on (row i on adapter i mod N).
    lora: Vec<String>,
    /// How decode steps picked their tokens.
    sampling: SamplingParams,
    results: Vec<Row>,
    /// With `SHARDSERVE_PROFILE=1` on the device backend: rank 0's time by op over
    /// every measured step (each op synchronised, so slower than the rows above).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    profile: Vec<OpTime>,
    /// Decode steps replayed from a recording (`SHARDSERVE_CUDA_GRAPHS=1`), warm-up
    /// included.
    replayed_steps: usize,
}

#[derive(Serialize)]
struct Row {
    batch: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    /// Rank 0's time in collectives per decode step (ms), waiting for peers included.
    /// (Per step, which is per token of each sequence of the batch.)
    decode_comm_ms_per_token: f64,
    /// The engine's own time per decode step outside the forward pass (scheduling,
    /// building the step, handing out tokens), in µs: on a GPU the device waits for it.
    decode_engine_us_per_step: f64,
}

pub(super) fn run(args: &BenchArgs, model: &Path, prompt_tokens: &[usize]) -> Result<()> {
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        repetition_penalty: args.repetition_penalty,
        ..SamplingParams::default()
    };
    sampling
        .validate()
        .context("bench: bad sampling settings")?;
    let threads = args.threads.apply()?;
    let longest = prompt_tokens.iter().max().copied().unwrap_or(0) + args.gen_tokens + 1;
    let widest = args.batch.iter().copied().max().unwrap_or(1).max(1);
    let options = EngineOptions {
        max_seq_len: Some(longest.max(64)),
        max_num_seqs: widest,
        max_loras: args.lora.len().max(EngineOptions::default().max_loras),
        ..EngineOptions::default()
    };
    let mut engine = crate::group::load_local(model, &options, args.tensor, threads, args.device)?;
    let mut adapters = Vec::with_capacity(args.lora.len());
    for (i, path) in args.lora.iter().enumerate() {
        let name = format!("lora-{i}");
        engine
            .load_adapter(&name, path)
            .with_context(|| format!("loading the LoRA adapter {}", path.display()))?;
        adapters.push(name);
    }
    let filler = engine.tokenizer().encode(super::FILLER, false, false)?;
    // Sequence i starts i tokens into the filler: equal lengths, different tokens.
    let prompt_of = |n: usize, i: usize| -> Vec<u32> {
        filler.iter().copied().cycle().skip(i).take(n).collect()
    };
    // Warm-up: first-touch of the weights and the allocator's arenas.
    engine.run_fixed(&prompt_of(16, 0), 4, |_, _| {})?;
    profile::take();

    let mut results = Vec::new();
    for &batch in &args.batch {
        let batch = batch.max(1);
        for &p in prompt_tokens {
            let prompts: Vec<Vec<u32>> = (0..batch).map(|i| prompt_of(p, i)).collect();
            let mut prefill = Vec::new();
            let mut decode = Vec::new();
            let mut comm = Vec::new();
            let mut own = Vec::new();
            for _ in 0..args.repetitions.max(1) {
                let start = Instant::now();
                let mut marks = Vec::with_capacity(2);
                engine.run_fixed_batch(
                    &prompts,
                    &adapters,
                    &sampling,
                    args.gen_tokens,
                    |phase: BenchPhase, spent: EngineTime| {
                        marks.push((phase, Instant::now(), spent));
                    },
                )?;
                let (_, prefilled, at_prefilled) = marks[0];
                let (_, decoded, at_decoded) = marks[1];
                let tokens = (batch * args.gen_tokens) as f64;
                prefill.push((batch * p) as f64 / (prefilled - start).as_secs_f64());
                decode.push(tokens / (decoded - prefilled).as_secs_f64());
                let spent = at_decoded.since(&at_prefilled);
                comm.push(spent.comm.as_secs_f64() * 1e3 / args.gen_tokens as f64);
                own.push(
                    spent.step.saturating_sub(spent.forward).as_secs_f64() * 1e6
                        / spent.steps.max(1) as f64,
                );
            }
            results.push(Row {
                batch,
                prompt_tokens: p,
                gen_tokens: args.gen_tokens,
                prefill_tok_s: median(prefill),
                decode_tok_s: median(decode),
                decode_comm_ms_per_token: median(comm),
                decode_engine_us_per_step: median(own),
            });
        }
    }
    let report = Report {
        model: model.display().to_string(),
        threads,
        tensor: args.tensor,
        simd: format!("{:?}", shardserve_kernels::simd_level()),
        lora: args.lora.iter().map(|p| p.display().to_string()).collect(),
        sampling,
        results,
        profile: profile::take(),
        replayed_steps: shardserve_worker::model::backend::replayed_steps(),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let s = &report.sampling;
        let picks = if s.is_greedy() && !s.has_penalties() {
            "greedy".to_string()
        } else {
            format!(
                "temperature {} top-p {} top-k {} repetition-penalty {}",
                s.temperature, s.top_p, s.top_k, s.repetition_penalty
            )
        };
        println!(
            "model {}  threads {}  tensor {}  simd {}  lora [{}]  {picks}",
            report.model,
            report.threads,
            report.tensor,
            report.simd,
            report.lora.join(", ")
        );
        println!(
            "{:>5} {:>13} {:>10} {:>14} {:>13} {:>13} {:>15}",
            "batch",
            "prompt_tokens",
            "gen_tokens",
            "prefill tok/s",
            "decode tok/s",
            "comm ms/step",
            "engine us/step"
        );
        for r in &report.results {
            println!(
                "{:>5} {:>13} {:>10} {:>14.1} {:>13.1} {:>13.3} {:>15.1}",
                r.batch,
                r.prompt_tokens,
                r.gen_tokens,
                r.prefill_tok_s,
                r.decode_tok_s,
                r.decode_comm_ms_per_token,
                r.decode_engine_us_per_step
            );
        }
        if report.replayed_steps > 0 {
            println!(
                "{} decode steps replayed from recordings",
                report.replayed_steps
            );
        }
        print_profile(&report.profile);
    }
    Ok(())
}

/// The profile by op, per step (a step uploads once), largest device time first.
fn print_profile(ops: &[OpTime]) {
    let Some(steps) = ops
        .iter()
        .find(|t| t.op == "upload (begin)")
        .map(|t| t.calls)
    else {
        return;
    };
    let mut ops = ops.to_vec();
    ops.sort_by(|a, b| b.total_us.total_cmp(&a.total_us));
    let per_step = |us: f64| us / steps as f64;
    let (host, total): (f64, f64) = ops
        .iter()
        .map(|t| (t.host_us, t.total_us))
        .fold((0.0, 0.0), |(h, t), (a, b)| (h + a, t + b));
    println!("profile over {steps} steps, each op synchronised (us per step):");
    println!(
        "{:<26} {:>8} {:>10} {:>10}",
        "op", "calls", "host", "device"
    );
    for t in &ops {
        println!(
            "{:<26} {:>8.1} {:>10.1} {:>10.1}",
            t.op,
            t.calls as f64 / steps as f64,
            per_step(t.host_us),
            per_step(t.total_us)
        );
    }
    println!(
        "{:<26} {:>8} {:>10.1} {:>10.1}",
        "all",
        "",
        per_step(host),
        per_step(total)
    );
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}
