//! Runs the agent through its library API for the benchmarks that need a long-lived agent
//! (`cargo xtask bench idle`, `cargo xtask soak`), printing one status line at each step for
//! the bench to read; the bench measures the process from outside.
//!
//! - `agent-harness idle SECONDS`: the engine up with no task for SECONDS ("idle-before"), a
//!   3-second on-CPU and off-CPU task, then no task again for SECONDS ("idle-after").
//! - `agent-harness soak`: on-CPU profiling of every process with 1-second windows until stdin
//!   closes; a status line per minute.

use std::io::BufRead as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use integration_tests::{agent_config, runtime, task_spec};
use rover_agent::bpf::{ProfilerKind, Targets};
use rover_agent::task::{Agent, ProfileWindow, WindowSink};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["idle", seconds] => idle(Duration::from_secs(seconds.parse().context("SECONDS")?)),
        ["soak"] => soak(),
        _ => bail!("usage: agent-harness idle SECONDS | agent-harness soak"),
    }
}

/// Counts what windows hold.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<Counts>>);

#[derive(Default)]
struct Counts {
    windows: u64,
    samples: u64,
    /// Samples of the soak's short-lived processes (`cpu_split`), and those of them in its
    /// named functions.
    churn_samples: u64,
    churn_named: u64,
}

impl WindowSink for Tally {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()> {
        let profile = &window.profile;
        let mut counts = self
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("tally poisoned"))?;
        counts.windows += 1;
        counts.samples += profile.recorded_total(0);
        for sample in profile.samples() {
            if sample.process.name != "cpu_split" {
                continue;
            }
            counts.churn_samples += sample.values[0];
            let named = sample.frames.iter().any(|&id| {
                let name = profile.frame(id).display_name();
                name == "hot_a" || name == "hot_b"
            });
            if named {
                counts.churn_named += sample.values[0];
            }
        }
        Ok(())
    }
}

/// The agent as `rover-agent profile` runs it by default.
fn default_agent() -> anyhow::Result<Agent> {
    let mut config = agent_config(99, Duration::from_secs(1));
    config.exited_process_grace = Duration::from_secs(10);
    Agent::start(config)
}

fn idle(seconds: Duration) -> anyhow::Result<()> {
    let agent = default_agent()?;
    let runtime = runtime();
    // Answered once the engine's thread is up (and its loader made).
    runtime.block_on(agent.status())?;
    println!("idle-before");
    std::thread::sleep(seconds);
    println!("tasks");
    runtime.block_on(async {
        let on_cpu = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::All, None),
                Box::new(Tally::default()),
            )
            .await?;
        let off_cpu = agent
            .start_task(
                task_spec(
                    ProfilerKind::OffCpu,
                    Targets::Pids(vec![std::process::id()]),
                    None,
                ),
                Box::new(Tally::default()),
            )
            .await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        on_cpu.stop().await?;
        off_cpu.stop().await?;
        anyhow::Ok(())
    })?;
    let status = runtime.block_on(agent.status())?;
    // The collector drops what the tasks held once it sees them end.
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "idle-after profilers={} target_entries={} process_events={}",
        status.profilers.len(),
        status.target_entries,
        status.process_events
    );
    std::thread::sleep(seconds);
    println!("done");
    Ok(())
}

fn soak() -> anyhow::Result<()> {
    let agent = default_agent()?;
    let runtime = runtime();
    let tally = Tally::default();
    let task = runtime.block_on(agent.start_task(
        task_spec(
            ProfilerKind::OnCpu,
            Targets::All,
            Some(Duration::from_secs(1)),
        ),
        Box::new(tally.clone()),
    ))?;
    // Stdin closes when the bench is done; a reader thread tells the status loop.
    let (closed, stdin_closed) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
        }
        let _ = closed.send(());
    });
    let started = Instant::now();
    let mut minute = 0;
    loop {
        let next = started + Duration::from_secs(60 * (minute + 1));
        let timeout = next.saturating_duration_since(Instant::now());
        if stdin_closed.recv_timeout(timeout).is_ok() {
            break;
        }
        minute += 1;
        let status = runtime.block_on(agent.status())?;
        let processes = agent.processes();
        let counts = tally
            .0
            .lock()
            .map_err(|_| anyhow::anyhow!("tally poisoned"))?;
        println!(
            "minute={minute} windows={} samples={} churn_samples={} churn_named={} \
             processes={} exited_processes={} open_files={} target_entries={} \
             aggregate_entries={} process_events_lost={} unrouted_stacks={}",
            counts.windows,
            counts.samples,
            counts.churn_samples,
            counts.churn_named,
            processes.processes,
            processes.exited,
            processes.open_files,
            status.target_entries,
            status.aggregate_entries,
            status.process_events_lost,
            status.unrouted_stacks,
        );
    }
    let summary = runtime.block_on(task.stop())?;
    println!(
        "stopped windows={} recorded={} losses={} symbolization_misses={} frames={} \
         stacks_cut={} cache_bytes={} open_binaries={}",
        summary.windows,
        summary.counters.recorded,
        summary.counters.losses(),
        summary.symbolize.unknown_frames,
        summary.symbolize.frames,
        summary.stacks_cut,
        summary.symbolize.cache_bytes,
        summary.symbolize.open_binaries,
    );
    Ok(())
}
