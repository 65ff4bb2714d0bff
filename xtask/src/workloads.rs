//! The C workloads of tests/workloads, built for the demo and the benchmarks with the flags the
//! integration tests use (`tests/workloads/cflags`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// Compiles `tests/workloads/NAME.c` into `out_dir/NAME` and returns the path.
pub(crate) fn build(name: &str, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let workloads = workspace_root().join("tests/workloads");
    let source = workloads.join(format!("{name}.c"));
    let cflags = std::fs::read_to_string(workloads.join("cflags"))
        .with_context(|| format!("reading {}/cflags", workloads.display()))?;
    let binary = out_dir.join(name);
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    run(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_owned()))
            .args(cflags.split_whitespace())
            .arg(&source)
            .arg("-o")
            .arg(&binary),
    )
    .with_context(|| {
        format!(
            "compiling {} (needs a C compiler, e.g. Debian's gcc)",
            source.display()
        )
    })?;
    Ok(binary)
}

/// Builds the release agent (and its eBPF objects) and returns the binary's path.
pub(crate) fn build_agent() -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    run(crate::cargo(&root).args(["build", "--release", "-p", "rover-agent"]))?;
    Ok(crate::target_dir().join("release/rover-agent"))
}

/// Builds a binary of the tests crate (`tests/src/bin/NAME.rs`) in release and returns its path:
/// the agent harness (the agent through its library API, for the benchmarks that need a
/// long-lived agent), the fake OAP.
pub(crate) fn build_tests_binary(name: &str) -> anyhow::Result<PathBuf> {
    let root = workspace_root();
    run(crate::cargo(&root).args([
        "build",
        "--release",
        "-p",
        "integration-tests",
        "--bin",
        name,
    ]))?;
    Ok(crate::target_dir().join("release").join(name))
}
