//! `cargo xtask demo`: the first thing to run. Profiles a toy request handler for five seconds
//! and writes its flame graph.

use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use crate::{run, setup, workloads, workspace_root};

pub(crate) fn run_demo(output: &Path) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let demo = workloads::build("demo", &workspace_root().join("target/workloads"))?;
    let mut workload = Command::new(&demo)
        .arg("8")
        .spawn()
        .with_context(|| format!("starting {}", demo.display()))?;
    eprintln!(
        "xtask demo: profiling the demo workload (pid {}) for 5 s",
        workload.id()
    );
    let result = run(Command::new(&agent)
        .args([
            "profile",
            "--pid",
            &workload.id().to_string(),
            "--duration",
            "5s",
            "--output",
        ])
        .arg(output));
    let _ = workload.kill();
    let _ = workload.wait();
    result?;
    eprintln!("xtask demo: open {} in a browser", output.display());
    Ok(())
}
