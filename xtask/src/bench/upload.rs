//! `cargo xtask bench upload`: the node agent's upload path and its idle cost.
//!
//! - One flush of a large window (10,000 distinct stacks of depth 30 over 50 processes, already
//!   symbolized): `encode_window` + `UploadBuffer::push` + `Uploader::flush` on loopback to a
//!   gRPC sink in another process until it replied, repeated; target <= 50 ms. The sink keeps
//!   the messages undecoded while timed and decodes and checks them all afterwards: a real OAP
//!   decodes on a machine of its own, not on the agent's two cores.
//! - `rover-agent run` with 500 processes reported by a host rule and no task, Rover's default
//!   periods: CPU and memory measured from `/proc/PID`; targets <= 0.1% of a core, 30 MiB.
//!
//! The work runs in `tests/src/bin/upload-bench/` (it uses the fake OAP); this prints the
//! figures against the targets (it never fails on them).

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{KillOnDrop, ProcessSample, sample_process};
use crate::{setup, workloads};

const FLUSH_TARGET_MS: f64 = 50.0;
const IDLE_CPU_TARGET_PERCENT: f64 = 0.1;
const IDLE_RSS_TARGET_MIB: f64 = 30.0;

pub(super) fn run(seconds: u64, iterations: usize, processes: usize) -> anyhow::Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    setup::run()?;
    let agent = workloads::build_agent()?;
    let bench = workloads::build_tests_binary("upload-bench")?;

    eprintln!("bench upload: {iterations} flushes of one 10,000-stack window to a gRPC sink");
    let flush = flush(&bench, iterations)?;
    eprintln!(
        "bench upload: rover-agent run with {processes} reported processes and no task, {seconds} s"
    );
    let idle = idle(&bench, &agent, processes, seconds, false)?;

    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    let number = |name: &str| -> f64 {
        flush
            .get(name)
            .and_then(|value| value.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let field = |name: &str| flush.get(name).map_or("?", String::as_str);
    println!(
        "\none flush: {} stacks of depth {} over {} processes, symbolized (function names {} \
         bytes on average), {} flushes after a warm-up",
        field("stacks"),
        field("depth"),
        field("processes"),
        field("mean_name_bytes"),
        field("iterations"),
    );
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    println!("{:<44} {:>10} {:>10}", "", "median", "max");
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms   [target <= {FLUSH_TARGET_MS} ms (median): {}]",
        "encode + push + send until the OAP replied",
        number("median_ms"),
        number("max_ms"),
        met(number("median_ms") <= FLUSH_TARGET_MS),
    );
    println!(
        "{:<44} {:>8.1}ms",
        "  encode_window",
        number("encode_median_ms")
    );
    println!(
        "{:<44} {:>8.2}ms",
        "  UploadBuffer::push",
        number("push_median_ms")
    );
    println!(
        "{:<44} {:>8.1}ms {:>8.1}ms",
        "  Uploader::flush (gRPC stream until replied)",
        number("send_median_ms"),
        number("send_max_ms")
    );
    println!(
        "{:<44} {:>8.1}ms",
        "CPU of the agent's side per flush (all threads)",
        number("agent_cpu_median_ms")
    );
    println!(
        "{:<44} {:>8.1}ms   (another process: receiving; decoding is untimed)",
        "CPU of the sink per flush (mean)",
        number("oap_cpu_mean_ms")
    );
    println!(
        "messages {} (all received and decoded by the sink), encoded {:.2} MiB ({:.0} bytes/message), \
         received with task metadata {:.2} MiB",
        field("messages"),
        mib(number("bytes")),
        number("bytes") / number("messages"),
        mib(number("received_bytes")),
    );

    let IdleFigures {
        cpu_percent,
        sched_ms,
        wall,
        ready,
        end,
        ready_line,
        done_line,
    } = idle;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\nidle node agent: rover-agent run, {processes} processes reported, no task, {:.0} s \
         (heartbeat 20s, scan 3s, task check 10s, flush 5s)",
        wall.as_secs_f64()
    );
    println!(
        "{:<44} {:>10}   [target <= {IDLE_CPU_TARGET_PERCENT}% of a core: {}]",
        "CPU (user+sys, % of a core)",
        format!("{cpu_percent:.3}%"),
        met(cpu_percent <= IDLE_CPU_TARGET_PERCENT)
    );
    println!(
        "{:<44} {:>10.1}   [target <= {IDLE_RSS_TARGET_MIB} MiB: {}]",
        "RSS at the end (MiB)",
        mib(end.rss_kib),
        met(mib(end.rss_kib) <= IDLE_RSS_TARGET_MIB)
    );
    println!(
        "{:<44} {:>10.1}   [target <= {IDLE_RSS_TARGET_MIB} MiB: {}]",
        "peak RSS, startup and first report included",
        mib(end.peak_rss_kib),
        met(mib(end.peak_rss_kib) <= IDLE_RSS_TARGET_MIB)
    );
    println!(
        "{:<44} {:>10.1}",
        "RSS once all were reported (MiB)",
        mib(ready.rss_kib)
    );
    println!(
        "{:<44} {:>10}",
        "CPU time while idle (ms, clock ticks)",
        end.cpu.saturating_sub(ready.cpu).as_millis()
    );
    println!(
        "{:<44} {:>10.3}   (scheduler's ns count of the threads alive at both ends)",
        "CPU time while idle (ms, scheduler)", sched_ms
    );
    println!("agent: {ready_line}; {done_line}");
    println!(
        "(CPU from /proc/PID/stat in clock ticks: {:.3}% resolution over this run)",
        100.0 * 0.01 / wall.as_secs_f64()
    );
    Ok(())
}

/// Runs `upload-bench flush` and returns the fields of its result line.
fn flush(bench: &Path, iterations: usize) -> anyhow::Result<HashMap<String, String>> {
    let output = Command::new(bench)
        .args(["flush", "--iterations", &iterations.to_string()])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", bench.display()))?;
    if !output.status.success() {
        bail!("{} flush failed ({})", bench.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|line| line.starts_with("flush "))
        .with_context(|| format!("no result line from {} flush", bench.display()))?;
    Ok(fields(line))
}

pub(super) fn fields(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

pub(super) struct IdleFigures {
    pub cpu_percent: f64,
    /// On-CPU time of the agent's threads alive at both samples, from `schedstat` (ns).
    pub sched_ms: f64,
    pub wall: Duration,
    pub ready: ProcessSample,
    pub end: ProcessSample,
    pub ready_line: String,
    pub done_line: String,
}

/// Runs `upload-bench idle` (with `--policy`: every process under a continuous-profiling policy)
/// and samples the agent it starts when it says `ready` (every process reported, and sampled
/// under the policy) and `done` (SECONDS later).
pub(super) fn idle(
    bench: &Path,
    agent: &Path,
    processes: usize,
    seconds: u64,
    policy: bool,
) -> anyhow::Result<IdleFigures> {
    let mut command = Command::new(bench);
    command.arg("idle");
    if policy {
        command.arg("--policy");
    }
    let mut child = KillOnDrop(
        command
            .arg("--agent")
            .arg(agent)
            .args(["--processes", &processes.to_string()])
            .args(["--seconds", &seconds.to_string()])
            // Closed once the agent is sampled at `done`: it then stops everything.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bench.display()))?,
    );
    let stdout = child.0.stdout.take().context("upload-bench stdout")?;
    let mut ready: Option<(u32, Instant, ProcessSample, String)> = None;
    let mut done: Option<(Instant, ProcessSample, String)> = None;
    let (mut sched_ready, mut sched_done) = (HashMap::new(), HashMap::new());
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading upload-bench")?;
        eprintln!("upload-bench idle: {line}");
        if line.starts_with("ready ") {
            let pid: u32 = fields(&line)
                .get("agent_pid")
                .and_then(|pid| pid.parse().ok())
                .context("no agent_pid on the ready line")?;
            sched_ready = thread_run_ns(pid);
            ready = Some((pid, Instant::now(), sample_process(pid)?, line));
        } else if line.starts_with("done ") {
            let (pid, ..) = ready.as_ref().context("done before ready")?;
            done = Some((Instant::now(), sample_process(*pid)?, line));
            sched_done = thread_run_ns(*pid);
            drop(child.0.stdin.take());
        }
    }
    let status = child.0.wait().context("waiting for upload-bench")?;
    if !status.success() {
        bail!("upload-bench idle failed ({status})");
    }
    let (Some((_, ready_at, ready, ready_line)), Some((done_at, end, done_line))) = (ready, done)
    else {
        bail!("upload-bench idle never said ready and done");
    };
    let wall = done_at - ready_at;
    let cpu_percent = 100.0 * end.cpu.saturating_sub(ready.cpu).as_secs_f64() / wall.as_secs_f64();
    let sched_ns: u64 = sched_done
        .iter()
        .filter_map(|(tid, ns)| Some(ns.saturating_sub(*sched_ready.get(tid)?)))
        .sum();
    Ok(IdleFigures {
        cpu_percent,
        sched_ms: sched_ns as f64 / 1e6,
        wall,
        ready,
        end,
        ready_line,
        done_line,
    })
}

/// Each thread's time on a CPU so far (ns), from `/proc/PID/task/TID/schedstat`.
fn thread_run_ns(pid: u32) -> HashMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let text = std::fs::read_to_string(entry.path().join("schedstat")).ok()?;
            let ns = text.split_whitespace().next()?.parse().ok()?;
            Some((entry.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}
