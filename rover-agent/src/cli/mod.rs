//! Command line: clap types → validated requests, human output, exit codes.

mod check;
mod engine_args;
mod output;
mod profile;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use engine_args::EngineArgs;
pub use profile::ProfileArgs;
pub use run::RunArgs;

#[derive(Debug, Parser)]
#[command(
    name = "rover-agent",
    version,
    about = "eBPF profiling agent for Apache SkyWalking"
)]
pub struct Cli {
    /// More log output on stderr (-v: lifecycle, -vv: every drain). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Profile processes (or the whole host) on this machine and write the result to a file.
    Profile(ProfileArgs),
    /// Tell whether this host can run the agent, item by item, with the settings given.
    Check(EngineArgs),
    /// Run as a node agent: report this host's processes to a SkyWalking OAP, run the
    /// profiling tasks it hands out and upload their results (Rover's configuration file).
    Run(RunArgs),
}

/// Parses the command line, runs it and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    crate::heap::use_one_arena();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Profile(args) => {
            init_logging(cli.verbose, None);
            profile::run(args)
        }
        Command::Check(args) => {
            init_logging(cli.verbose, None);
            check::run(&args)
        }
        Command::Run(args) => run::run(&args, cli.verbose),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rover-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Libraries whose logs the agent's own replace unless `-v` or `RUST_LOG` asks for them.
const QUIET_LIBRARIES: &str = "kube_client=off,kube_runtime=off";

/// Logs to stderr at `-v`'s level, else the configured one (`run`), else warnings; `RUST_LOG`
/// overrides all.
fn init_logging(verbose: u8, configured: Option<&str>) {
    let default = match (verbose, configured) {
        // The configured level is the agent's: its libraries (gRPC, HTTP/2) only warn, and
        // kube-rs not at all: it logs every retry while the API server is unreachable (an error
        // per refused connection), where `process::kubernetes` logs one line per outage.
        (0, Some(level)) => format!("warn,{QUIET_LIBRARIES},rover_agent={level}"),
        (0, None) => format!("warn,{QUIET_LIBRARIES}"),
        (1, _) => "info".to_owned(),
        _ => "debug".to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only for a person: a DaemonSet's log collector would store the escapes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Resolves with the name of the first SIGINT or SIGTERM.
pub(super) async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot listen for SIGINT/SIGTERM: the profile runs its full duration");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}
