//! `cargo xtask soak --minutes N`: the agent profiling every process, with 1-second windows,
//! while 1,000 short-lived processes start per minute; memory, descriptors, map entries and
//! programs must not grow. Not part of the test suite (it takes minutes by design).

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::bench::{ProcessSample, machine_lock, sample_process};
use crate::{setup, workloads, workspace_root};

/// One short-lived process every this long: 1,000 a minute.
const SPAWN_EVERY: Duration = Duration::from_millis(60);

pub(crate) fn run(minutes: u64) -> anyhow::Result<()> {
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    let _lock = machine_lock()?;
    setup::run()?;
    let harness = workloads::build_tests_binary("agent-harness")?;
    let churn = workloads::build("cpu_split", &workspace_root().join("target/bench"))?;
    eprintln!(
        "soak: every process profiled on-CPU with 1-s windows for {minutes} min, while a \
         process burning 20 ms of CPU in hot_a/hot_b starts every {SPAWN_EVERY:?}"
    );
    let mut agent = Command::new(&harness)
        .arg("soak")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", harness.display()))?;
    let pid = agent.id();
    let stdout = agent.stdout.take().context("harness stdout")?;
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let started = Instant::now();
    let end = started + Duration::from_secs(60 * minutes);
    let mut children: Vec<Child> = Vec::new();
    let (mut spawned, mut next_spawn) = (0u64, started);
    let mut rows: Vec<(String, ProcessSample)> = Vec::new();
    println!(
        "{:>6} {:>10} {:>9} {:>6} {:>8}  agent's own report",
        "minute", "RSS (MiB)", "CPU", "fds", "programs"
    );
    let mut last_cpu = (started, sample_process(pid)?.cpu);
    // Until the agent's last minute is reported (it reports a little after each minute).
    while rows.len() < minutes as usize {
        if Instant::now() > end + Duration::from_secs(30) {
            bail!("the agent stopped reporting after {} minute(s)", rows.len());
        }
        if Instant::now() >= next_spawn && Instant::now() < end {
            children.push(
                Command::new(&churn)
                    .arg("0.02")
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting a short-lived process")?,
            );
            spawned += 1;
            next_spawn += SPAWN_EVERY;
        }
        children.retain_mut(|child| !matches!(child.try_wait(), Ok(Some(_))));
        if let Ok(line) = received.try_recv() {
            let sample = sample_process(pid)?;
            let cpu_percent = 100.0 * sample.cpu.saturating_sub(last_cpu.1).as_secs_f64()
                / last_cpu.0.elapsed().as_secs_f64();
            last_cpu = (Instant::now(), sample.cpu);
            println!(
                "{:>6} {:>10.1} {:>8.2}% {:>6} {:>8}  {line}",
                rows.len() + 1,
                sample.rss_kib as f64 / 1024.0,
                cpu_percent,
                sample.fds,
                sample.programs
            );
            rows.push((line, sample));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for mut child in children {
        let _ = child.wait();
    }
    // Closing stdin stops the agent's task; it then reports and exits.
    drop(agent.stdin.take());
    let status = agent.wait().context("waiting for the agent")?;
    while let Ok(line) = received.recv_timeout(Duration::from_secs(5)) {
        println!("{line}");
    }
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    let (Some((first_line, first)), Some((last_line, last))) = (rows.first(), rows.last()) else {
        bail!("the agent reported nothing in {minutes} min");
    };
    let field = |line: &str, name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    let growth = (last.rss_kib as f64 - first.rss_kib as f64) / 1024.0;
    println!("\nsoak: {spawned} short-lived processes in {minutes} min");
    println!(
        "RSS at minute 1 {:.1} MiB, at the end {:.1} MiB: growth {growth:+.1} MiB [goal <= 5 MiB \
         over 10 minutes]",
        first.rss_kib as f64 / 1024.0,
        last.rss_kib as f64 / 1024.0
    );
    for (name, at_first, at_last) in [
        ("open descriptors", first.fds as u64, last.fds as u64),
        (
            "programs attached",
            first.programs as u64,
            last.programs as u64,
        ),
        (
            "target map entries",
            field(first_line, "target_entries"),
            field(last_line, "target_entries"),
        ),
        (
            "aggregate map entries",
            field(first_line, "aggregate_entries"),
            field(last_line, "aggregate_entries"),
        ),
        (
            "processes remembered",
            field(first_line, "processes"),
            field(last_line, "processes"),
        ),
        (
            "open binaries",
            field(first_line, "open_files"),
            field(last_line, "open_files"),
        ),
    ] {
        println!("{name:<24} minute 1: {at_first:>6}   end: {at_last:>6}   [goal: no growth]");
    }
    let (churn, named) = (
        field(last_line, "churn_samples"),
        field(last_line, "churn_named"),
    );
    println!(
        "short-lived processes' samples in hot_a/hot_b: {named} of {churn} ({:.1}%)",
        100.0 * named as f64 / churn.max(1) as f64
    );
    Ok(())
}
