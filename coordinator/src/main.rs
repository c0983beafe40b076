//! `strata`: run a GGUF model on this machine's GPU, or across the GPUs of a LAN.

mod blocks;
mod chat_cmd;
mod cli;
mod cluster_key;
mod concurrent;
mod discovery;
mod engine;
mod generate;
#[cfg(test)]
mod module_graph;
mod node_cmd;
mod plan;
mod progress;
mod quantize;
mod scheduler;
mod server;
mod speculative;

use clap::Parser;

/// Keeps the Vulkan loader from printing an error nobody caused. Mesa's device-selection
/// layer (an implicit layer, loaded into every Vulkan program) asks the Wayland
/// compositor which GPU drives the display; without `XDG_RUNTIME_DIR`, libwayland then
/// prints `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` for each
/// Vulkan instance, although nothing failed. With neither a runtime dir nor a Wayland
/// display there is no compositor to ask, and strata ranks adapters itself, so the layer
/// is switched off by its own switch, unless the user set any of this themselves.
fn quiet_display_probe() {
    let unset = |name: &str| std::env::var_os(name).is_none_or(|v| v.is_empty());
    let vars = ["XDG_RUNTIME_DIR", "WAYLAND_DISPLAY", "WAYLAND_SOCKET", "MESA_VK_DEVICE_SELECT", "NODEVICE_SELECT"];
    if vars.iter().all(|v| unset(v)) {
        // SAFETY: called first in `main`, before any thread exists, so nothing reads or
        // writes the environment at the same time.
        unsafe { std::env::set_var("NODEVICE_SELECT", "1") };
    }
}

fn main() -> std::process::ExitCode {
    quiet_display_probe();
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        cli::Command::Run(args) => generate::run(args),
        cli::Command::Serve(args) => server::run(args),
        cli::Command::Chat(args) => chat_cmd::run(args),
        // Speculation and prompt files run through the scheduler, as `serve` does.
        cli::Command::Bench(args) => match args.concurrency {
            Some(n) => concurrent::run(args, n),
            None if args.engine.speculative != cli::SpeculativeMode::Off || args.prompt_file.is_some() => {
                concurrent::run(args, 1)
            }
            None => generate::bench(args),
        },
        cli::Command::Quantize(args) => quantize::run(args),
        cli::Command::Node(args) => node_cmd::run(args),
        cli::Command::Init(args) => cluster_key::run_init(args),
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
