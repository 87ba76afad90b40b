//! `shardserve`: the one binary. Each subcommand lives in its own module;
//! this file parses the command line once and dispatches.

mod bench;
mod chat;
mod demo_model;
mod generate;
mod runtime;
mod worker;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

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
    /// Measure prefill and decode speed of a local model.
    Bench(bench::BenchArgs),
    /// Serve a model over gRPC (shardserve.v1.Inference and grpc.health.v1.Health).
    Worker(worker::WorkerArgs),
    /// Chat with a local model in the terminal, streaming the answers.
    Chat(chat::ChatArgs),
    /// Model files: fetch the demo model.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    runtime::init_logging();
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Model { command } => match command {
            ModelCommand::FetchDemo { cache } => {
                let path = demo_model::fetch(&demo_model::cache_dir(cache)?)?;
                println!("{}", path.display());
                Ok(())
            }
            ModelCommand::DemoPath { cache } => {
                println!(
                    "{}",
                    demo_model::path_in(&demo_model::cache_dir(cache)?).display()
                );
                Ok(())
            }
        },
    }
}
