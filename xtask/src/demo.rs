//! `cargo xtask demo`: the first thing to run. Profiles a toy request handler for five seconds
//! and writes its flame graph.

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

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

/// `cargo xtask demo --node-agent`: the fake OAP on a loopback port, the demo workload, and the
/// agent in `run` mode with `configs/demo.yaml`; the fake OAP hands out a 10 s ON_CPU task for
/// the workload once the agent reports it, and draws the flame graph of what it received.
pub(crate) fn run_node_agent_demo(output: &Path) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let fake_oap = workloads::build_tests_binary("fake-oap")?;
    let demo = workloads::build("demo", &workspace_root().join("target/workloads"))?;
    let port = free_loopback_port()?;
    let mut oap = Command::new(&fake_oap)
        .args(["--port", &port.to_string(), "--process-name", "demo"])
        .args(["--duration", "10", "--timeout", "120", "--output"])
        .arg(output)
        .spawn()
        .with_context(|| format!("starting {}", fake_oap.display()))?;
    let mut workload = Command::new(&demo)
        .arg("60")
        .spawn()
        .with_context(|| format!("starting {}", demo.display()))?;
    let mut node_agent = Command::new(&agent)
        .args(["run", "--config"])
        .arg(workspace_root().join("configs/demo.yaml"))
        .env("ROVER_BACKEND_ADDR", format!("127.0.0.1:{port}"))
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    eprintln!(
        "xtask demo: fake OAP on 127.0.0.1:{port}, demo workload pid {}, node agent pid {}",
        workload.id(),
        node_agent.id()
    );
    let received = oap.wait().context("waiting for the fake OAP");
    // SAFETY: kill only sends a signal; SIGTERM is the agent's orderly shutdown.
    unsafe { libc::kill(node_agent.id() as libc::pid_t, libc::SIGTERM) };
    let stopped = node_agent.wait().context("waiting for the node agent");
    let _ = workload.kill();
    let _ = workload.wait();
    let received = received?;
    if !received.success() {
        bail!("the fake OAP received no profile ({received}); see the agent's log above");
    }
    let stopped = stopped?;
    if !stopped.success() {
        bail!("the node agent did not stop cleanly on SIGTERM ({stopped})");
    }
    eprintln!("xtask demo: open {} in a browser", output.display());
    Ok(())
}

/// A port nothing listens on now (the OS picks it), for the fake OAP.
fn free_loopback_port() -> anyhow::Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(listener.local_addr()?.port())
}
