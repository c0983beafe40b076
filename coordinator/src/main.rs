//! `strata`: run a GGUF model on this machine's GPU (and, later, a cluster of them).

mod chat_cmd;
mod cli;
mod discovery;
mod engine;
mod generate;
mod node_cmd;
mod pipeline;
mod plan;
mod progress;
mod quantize;
mod scheduler;
mod server;
mod shipping;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        cli::Command::Run(args) => generate::run(args),
        cli::Command::Serve(args) => server::run(args),
        cli::Command::Chat(args) => chat_cmd::run(args),
        cli::Command::Bench(args) => generate::bench(args),
        cli::Command::Quantize(args) => quantize::run(args),
        cli::Command::Node(args) => node_cmd::run(args),
        cli::Command::BenchHop(args) => node_cmd::bench_hop(args),
        cli::Command::Plan(args) => plan::run(args),
        cli::Command::Synthesize(args) => plan::synthesize(args),
        cli::Command::Nodes(args) => discovery::run_nodes(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
