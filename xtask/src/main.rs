//! Project commands: `cargo xtask setup | test | demo | bench ...`.

mod bench;
mod demo;
mod kubernetes_validate;
mod setup;
mod soak;
mod workloads;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "rover-rs project commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building the eBPF programs needs (nightly rust-src, bpf-linker); idempotent.
    Setup,
    /// Run every check and test: formatting, clippy, unit, BPF integration and protocol tests,
    /// and the deployment manifests against the Kubernetes schemas (installs
    /// `kubernetes-validate` from PyPI into the target directory on the first run).
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        cargo_test_args: Vec<String>,
    },
    /// Profile a bundled demo workload for a few seconds and write a flame graph.
    Demo {
        /// Where to write the flame graph [default: demo.svg, node-agent-demo.svg].
        #[arg(long)]
        output: Option<PathBuf>,
        /// Run the agent as a node agent (`rover-agent run`) against the in-repo fake OAP on
        /// loopback, which hands out an ON_CPU task and draws what it received.
        #[arg(long)]
        node_agent: bool,
    },
    /// Measure the agent's overhead against reference tools, side by side.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Profile every process for minutes while short-lived processes come and go: memory,
    /// descriptors, map entries and programs must not grow. Not part of `test`.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo { output, node_agent } => {
            if node_agent {
                demo::run_node_agent_demo(&output.unwrap_or_else(|| "node-agent-demo.svg".into()))
            } else {
                demo::run_demo(&output.unwrap_or_else(|| "demo.svg".into()))
            }
        }
        Task::Bench { bench } => bench::run(bench),
        Task::Soak { minutes } => soak::run(minutes),
    }
}

fn test(cargo_test_args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    kubernetes_validate::ensure()?;
    let root = workspace_root();
    run(cargo(&root).args(["fmt", "--all", "--", "--check"]))
        .context("formatting differs: run `cargo fmt --all`")?;
    // The default members (everything but the eBPF crate, which only builds for BPF)...
    run(cargo(&root).args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    // ...and the eBPF crate on its own target with nightly.
    run(Command::new("rustup")
        .current_dir(&root)
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "rover-ebpf",
            "--release",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]))?;
    // Tests that measure the machine serialize themselves (tests/src/lib.rs); cargo runs test
    // binaries one after another.
    run(cargo(&root)
        .args(["test", "--release", "--"])
        .args(cargo_test_args))
}

/// The repository root (xtask lives one level below it).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (relative to the root), else
/// `target` under the root.
pub(crate) fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// A cargo command run at `root`, without the variables `cargo run` set to describe xtask.
/// Build scripts watch some of them (ring: `CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`), so a
/// build run from here and one run by hand would each make the other rebuild ring and all
/// above it. The integration tests build the agent the same way (`agent_binary`).
pub(crate) fn cargo(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    command.current_dir(root);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(describes_running_package) {
            command.env_remove(key);
        }
    }
    command
}

/// A variable cargo sets for the package it runs (`cargo run`, `cargo test`).
fn describes_running_package(key: &str) -> bool {
    key == "OUT_DIR"
        || [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

/// Prepares a child process: no stdin (nothing here is interactive), and without the library
/// path `cargo run` gives xtask (its `target/debug/deps`), which is no business of the cargo,
/// rustc or rustup a task runs.
fn isolate(command: &mut Command) -> &mut Command {
    command
        .stdin(std::process::Stdio::null())
        .env_remove("LD_LIBRARY_PATH")
}

/// Runs a command to completion, failing with its command line if it fails.
pub(crate) fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = isolate(command)
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout, failing with its stderr if it fails.
pub(crate) fn output(command: &mut Command) -> anyhow::Result<String> {
    let output = isolate(command)
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
