//! The C workloads of tests/workloads, built for the demo and the benchmarks with the flags the
//! integration tests use (tests/build.rs): frame pointers on, no sibling-call optimization.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

use crate::{run, workspace_root};

/// Compiles `tests/workloads/NAME.c` into `out_dir/NAME` and returns the path.
pub(crate) fn build(name: &str, out_dir: &Path) -> anyhow::Result<PathBuf> {
    let source = workspace_root()
        .join("tests/workloads")
        .join(format!("{name}.c"));
    let binary = out_dir.join(name);
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    run(
        Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_owned()))
            .args([
                "-O0",
                "-g",
                "-fno-omit-frame-pointer",
                "-fno-optimize-sibling-calls",
                "-pthread",
            ])
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
    Ok(root.join("target/release/rover-agent"))
}
