//! `cargo xtask bench discovery`: Kubernetes discovery with 2,000 live processes in 200 pods'
//! containers (real cgroups, containerd's systemd layout) and the fake API server serving those
//! pods.
//!
//! - Scans through the library (`KubernetesDiscovery::scan`), listing processes through the task
//!   iterator as the agent does: cold (every process new, every file read) and warm (nothing
//!   changed, every process listed); target <= 50 ms wall.
//!   Also the periodic scan with the kernel's marks, and a pod event's pass (`pods_changed`).
//! - A watch event for one pod: `rover-agent run`'s CPU while the fake API server, in another
//!   process, modifies one pod after another, minus its CPU over as long without events, per
//!   event; isolated events (each handled on its own) and a burst; target <= 1 ms.
//! - `rover-agent run`'s RSS with no pod, then with every process of the 200 pods reported;
//!   target: grows <= 10 MiB.
//!
//! The work runs in `tests/src/bin/discovery-bench.rs` (it uses the test fakes and cgroups);
//! this prints the figures against the targets (it never fails on them). Needs root.

use std::collections::HashMap;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::{setup, workloads};

const SCAN_TARGET_MS: f64 = 50.0;
const EVENT_TARGET_MS: f64 = 1.0;
const RSS_GROWTH_TARGET_MIB: f64 = 10.0;

pub(super) fn run(
    pods: usize,
    per_container: usize,
    iterations: usize,
    isolated_events: usize,
    burst_events: usize,
) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let bench = workloads::build_tests_binary("discovery-bench")?;
    let processes = pods * per_container;
    let sizes = [
        "--pods".to_owned(),
        pods.to_string(),
        "--per-container".to_owned(),
        per_container.to_string(),
    ];

    eprintln!(
        "bench discovery: {iterations} scans of {processes} processes in {pods} pods through \
         the library"
    );
    let scan = result_line(
        Command::new(&bench)
            .arg("scan")
            .args(&sizes)
            .args(["--iterations", &iterations.to_string()]),
        "scan ",
    )?;
    eprintln!(
        "bench discovery: rover-agent run with {pods} pods and {processes} processes, \
         {isolated_events} isolated and {burst_events} burst pod events"
    );
    let agent_figures = result_line(
        Command::new(&bench)
            .arg("agent")
            .arg("--agent")
            .arg(&agent)
            .args(&sizes)
            .args(["--isolated-events", &isolated_events.to_string()])
            .args(["--burst-events", &burst_events.to_string()]),
        "agent ",
    )?;

    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let number = |fields: &HashMap<String, String>, name: &str| -> f64 {
        fields
            .get(name)
            .and_then(|value| value.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let field = |fields: &HashMap<String, String>, name: &str| {
        fields.get(name).cloned().unwrap_or_else(|| "?".to_owned())
    };
    println!(
        "\nscans through the library: {} processes of {} pods behind {} Services, {} \
         processes on the host, {} scans each",
        field(&scan, "processes"),
        field(&scan, "pods"),
        field(&scan, "services"),
        field(&scan, "processes_on_host"),
        field(&scan, "iterations"),
    );
    println!("{:<48} {:>10} {:>10}", "", "median", "max");
    println!(
        "{:<48} {:>8.2}ms {:>8.2}ms   [target <= {SCAN_TARGET_MS} ms: {}]",
        "cold: every process new, names rendered",
        number(&scan, "cold_median_ms"),
        number(&scan, "cold_max_ms"),
        met(number(&scan, "cold_max_ms") <= SCAN_TARGET_MS),
    );
    println!(
        "{:<48} {:>8.2}ms {:>8.2}ms   [target <= {SCAN_TARGET_MS} ms: {}]",
        "warm: nothing changed, every process listed",
        number(&scan, "warm_median_ms"),
        number(&scan, "warm_max_ms"),
        met(number(&scan, "warm_max_ms") <= SCAN_TARGET_MS),
    );
    println!(
        "{:<48} {:>8.3}ms {:>8.3}ms",
        "with the kernel's marks, nothing changed",
        number(&scan, "marked_median_ms"),
        number(&scan, "marked_max_ms"),
    );
    println!(
        "{:<48} {:>8.3}ms {:>8.3}ms   (CPU {:.3} ms mean)",
        "one pod changed (pods_changed, no /proc read)",
        number(&scan, "event_median_ms"),
        number(&scan, "event_max_ms"),
        number(&scan, "event_cpu_mean_ms"),
    );
    println!(
        "{:<48} {:>8.1}MiB  (RSS of this process before the discovery and after its first scan)",
        "memory a discovery keeps of them",
        number(&scan, "library_rss_growth_kib") / 1024.0,
    );

    let mib = |kib: f64| kib / 1024.0;
    let growth =
        mib(number(&agent_figures, "rss_after_kib") - number(&agent_figures, "rss_before_kib"));
    println!(
        "\nrover-agent run, Kubernetes discovery: {} processes of {} pods (all reported {:.1} s \
         after the pods were applied)",
        field(&agent_figures, "processes"),
        field(&agent_figures, "pods"),
        number(&agent_figures, "reported_after_ms") / 1000.0,
    );
    println!(
        "{:<48} {:>8.3}ms   [target <= {EVENT_TARGET_MS} ms: {}]   ({} events 400 ms apart: \
         CPU {} ms, {} ms over as long without, before and after)",
        "CPU per pod event, isolated",
        number(&agent_figures, "isolated_cpu_per_event_ms"),
        met(number(&agent_figures, "isolated_cpu_per_event_ms") <= EVENT_TARGET_MS),
        field(&agent_figures, "isolated_events"),
        field(&agent_figures, "isolated_busy_ms"),
        field(&agent_figures, "isolated_idle_ms"),
    );
    println!(
        "{:<48} {:>8.3}ms   [target <= {EVENT_TARGET_MS} ms: {}]   ({} events 10 ms apart: \
         CPU {} ms, {} ms over as long without, before and after)",
        "CPU per pod event, burst",
        number(&agent_figures, "burst_cpu_per_event_ms"),
        met(number(&agent_figures, "burst_cpu_per_event_ms") <= EVENT_TARGET_MS),
        field(&agent_figures, "burst_events"),
        field(&agent_figures, "burst_busy_ms"),
        field(&agent_figures, "burst_idle_ms"),
    );
    println!(
        "{:<48} {:>8.1}MiB  [target <= {RSS_GROWTH_TARGET_MIB} MiB: {}]   (RSS {:.1} → {:.1} \
         MiB, peak {:.1} MiB)",
        "RSS growth",
        growth,
        met(growth <= RSS_GROWTH_TARGET_MIB),
        mib(number(&agent_figures, "rss_before_kib")),
        mib(number(&agent_figures, "rss_after_kib")),
        mib(number(&agent_figures, "peak_rss_kib")),
    );
    println!("(agent CPU from its cgroup's cpu.stat, to the microsecond)");
    Ok(())
}

/// Runs `command` (progress on stderr) and returns the fields of its stdout line starting with
/// `prefix`.
fn result_line(command: &mut Command, prefix: &str) -> anyhow::Result<HashMap<String, String>> {
    let output = command
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    if !output.status.success() {
        bail!("{command:?} failed ({})", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with(prefix))
        .with_context(|| format!("no result line from {command:?}"))?;
    Ok(line
        .split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect())
}
