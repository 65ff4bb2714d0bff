//! Command line: clap types → validated requests, human output, exit codes.

mod check;
mod engine_args;
mod output;
mod profile;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub use engine_args::EngineArgs;
pub use profile::ProfileArgs;

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
}

/// Parses the command line, runs it and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let result = match cli.command {
        Command::Profile(args) => profile::run(args),
        Command::Check(args) => check::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("rover-agent: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
