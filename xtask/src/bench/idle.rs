//! `cargo xtask bench idle`: what the agent costs with no task: no program attached, next to no
//! CPU, little memory; before any task ran, and after tasks came and went (their programs and
//! maps unloaded).

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{KillOnDrop, ProcessSample, sample_process};
use crate::{setup, workloads};

pub(super) fn run(seconds: u64) -> anyhow::Result<()> {
    setup::run()?;
    let harness = workloads::build_tests_binary("agent-harness")?;
    eprintln!("bench idle: the agent with no task, {seconds} s before and after tasks");
    let mut child = KillOnDrop(
        Command::new(&harness)
            .args(["idle", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", harness.display()))?,
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().context("harness stdout")?;
    let mut marks: Vec<(String, Instant, ProcessSample)> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading the harness")?;
        let sample = sample_process(pid)?;
        eprintln!("bench idle: {line}");
        marks.push((line, Instant::now(), sample));
        if marks.last().is_some_and(|(line, ..)| line == "done") {
            break;
        }
    }
    let status = child.0.wait().context("waiting for the harness")?;
    if !status.success() {
        bail!("the harness failed ({status})");
    }
    let find = |prefix: &str| {
        marks
            .iter()
            .find(|(line, ..)| line.starts_with(prefix))
            .with_context(|| format!("the harness never said {prefix:?}"))
    };
    let (_, before_start, before) = find("idle-before")?;
    let (_, tasks_start, tasks) = find("tasks")?;
    let (after_line, after_start, after) = find("idle-after")?;
    let (_, done_at, done) = find("done")?;
    let percent = |from: &ProcessSample, to: &ProcessSample, wall: Duration| {
        100.0 * to.cpu.saturating_sub(from.cpu).as_secs_f64() / wall.as_secs_f64()
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\nidle agent (engine up, no task), {seconds} s per phase");
    println!(
        "{:<34} {:>12} {:>10} {:>10} {:>6}",
        "", "programs", "CPU", "RSS (MiB)", "fds"
    );
    let row = |name: &str, from: &ProcessSample, to: &ProcessSample, wall: Duration| {
        println!(
            "{name:<34} {:>12} {:>9.3}% {:>10.1} {:>6}",
            to.programs,
            percent(from, to, wall),
            mib(to.rss_kib),
            to.fds
        )
    };
    row(
        "before any task",
        before,
        tasks,
        *tasks_start - *before_start,
    );
    row(
        "after tasks came and went",
        after,
        done,
        *done_at - *after_start,
    );
    println!(
        "goals: 0 programs attached, CPU <= 0.05% of a core, RSS <= 25 MiB \
         (peak over the run, tasks included: {:.1} MiB)",
        mib(done.peak_rss_kib)
    );
    println!("engine after the tasks: {after_line}");
    Ok(())
}
