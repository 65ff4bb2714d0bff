//! `cargo xtask bench ...`: overhead figures measured side by side with reference tools in one
//! run, printed as ratios. Benchmarks print; they never pass or fail on a threshold.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;

use crate::{setup, workloads, workspace_root};

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// Whole-host on-CPU sampling of a busy machine: rover-agent against `perf record -a -g`.
    Oncpu {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 99)]
        frequency: u64,
    },
}

pub(crate) fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Oncpu { seconds, frequency } => oncpu(seconds, frequency),
    }
}

/// What a measured process cost.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    cpu: Duration,
    peak_rss_kib: u64,
}

/// Time spent inside eBPF programs, from `kernel.bpf_stats_enabled`.
#[derive(Clone, Copy, Debug, Default)]
struct ProgramTime {
    run_time: Duration,
    runs: u64,
}

fn oncpu(seconds: u64, frequency: u64) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let out_dir = workspace_root().join("target/bench");
    let busy = workloads::build("busy_threads", &out_dir)?;
    let demo = workloads::build("demo", &out_dir)?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let _stats = BpfStats::enable()?;

    // A busy machine: every CPU spinning, plus a process making system calls.
    let load_seconds = (seconds * 2 + 30).to_string();
    let _load = [
        KillOnDrop(
            Command::new(&busy)
                .args([&cpus.to_string(), &load_seconds])
                .spawn()?,
        ),
        KillOnDrop(
            Command::new(&demo)
                .arg(&load_seconds)
                .stdout(Stdio::null())
                .spawn()?,
        ),
    ];
    std::thread::sleep(Duration::from_secs(1));

    let duration = format!("{seconds}s");
    let agent_output = out_dir.join("agent.folded");
    eprintln!("bench oncpu: rover-agent profile --all for {seconds} s");
    let (agent_cost, program) = measure_with_program_time(
        Command::new(&agent)
            .args(["profile", "--all", "--duration", &duration, "--frequency"])
            .arg(frequency.to_string())
            .arg("--output")
            .arg(&agent_output)
            .stderr(Stdio::null()),
    )?;
    let perf_data = out_dir.join("perf.data");
    eprintln!("bench oncpu: perf record -F {frequency} -a -g for {seconds} s");
    let (perf_cost, _) = measure_with_program_time(
        Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                &frequency.to_string(),
                "-a",
                "-g",
                "-o",
            ])
            .arg(&perf_data)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .context("running perf (Debian package linux-perf)")?;
    eprintln!("bench oncpu: perf script (perf's symbolization, which rover-agent does in-process)");
    let (script_cost, _) = measure_with_program_time(
        Command::new("perf")
            .args(["script", "-i"])
            .arg(&perf_data)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;

    let wall = Duration::from_secs(seconds);
    let agent_total = agent_cost.cpu + program.run_time;
    let percent = |cpu: Duration| 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\non-CPU, whole host, {frequency} Hz, {seconds} s, {cpus} CPUs busy");
    println!(
        "{:<44} {:>10} {:>12} {:>14}",
        "", "CPU (ms)", "% of a core", "peak RSS (MiB)"
    );
    let row = |name: &str, cpu: Duration, rss: Option<u64>| {
        println!(
            "{name:<44} {:>10.1} {:>11.3}% {:>14}",
            cpu.as_secs_f64() * 1000.0,
            percent(cpu),
            rss.map_or_else(String::new, |kib| format!("{:.1}", mib(kib)))
        )
    };
    row(
        "rover-agent process (user+sys)",
        agent_cost.cpu,
        Some(agent_cost.peak_rss_kib),
    );
    row(
        &format!(
            "rover-agent eBPF program ({} runs, {} ns/run)",
            program.runs,
            program.run_time.as_nanos() / u128::from(program.runs.max(1))
        ),
        program.run_time,
        None,
    );
    row(
        "rover-agent total   [target <= 0.5%, 30 MiB]",
        agent_total,
        Some(agent_cost.peak_rss_kib),
    );
    row(
        "perf record -a -g (process only)",
        perf_cost.cpu,
        Some(perf_cost.peak_rss_kib),
    );
    row(
        "perf script (post-processing)",
        script_cost.cpu,
        Some(script_cost.peak_rss_kib),
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "ratio rover-agent total / perf record: CPU {:.2}, peak RSS {:.2}",
        ratio(agent_total, perf_cost.cpu),
        agent_cost.peak_rss_kib as f64 / perf_cost.peak_rss_kib.max(1) as f64
    );
    println!(
        "ratio rover-agent total / (perf record + perf script): CPU {:.2}",
        ratio(agent_total, perf_cost.cpu + script_cost.cpu)
    );
    println!(
        "(perf's in-kernel sampling and unwinding is not attributable to a process and is not \
         counted; rover-agent's in-kernel time is)"
    );
    Ok(())
}

/// Runs `command` to completion; returns its CPU time and peak RSS (from wait4) and the run
/// time of the eBPF programs it held, polled from its fdinfo while it ran.
fn measure_with_program_time(command: &mut Command) -> anyhow::Result<(Cost, ProgramTime)> {
    let child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut program = ProgramTime::default();
    loop {
        let mut status = 0;
        let mut usage = zeroed_rusage();
        // SAFETY: wait4 writes into the two locals.
        let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if reaped == pid {
            if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
                bail!("{command:?} failed (wait status {status})");
            }
            let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
            let cost = Cost {
                cpu,
                peak_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            };
            return Ok((cost, program));
        }
        if reaped < 0 {
            bail!("wait4 on {command:?}: {}", std::io::Error::last_os_error());
        }
        if let Some(now) = program_time(child.id()) {
            program = now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn timeval(value: libc::timeval) -> Duration {
    Duration::from_secs(value.tv_sec as u64) + Duration::from_micros(value.tv_usec as u64)
}

/// Sums `run_time_ns`/`run_cnt` over the eBPF program descriptors process `pid` holds.
fn program_time(pid: u32) -> Option<ProgramTime> {
    let mut total = ProgramTime::default();
    let mut found = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()? {
        let Ok(text) = std::fs::read_to_string(entry.ok()?.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(run_time_ns), Some(runs)) = (field("run_time_ns:"), field("run_cnt:")) {
            total.run_time += Duration::from_nanos(run_time_ns);
            total.runs += runs;
            found = true;
        }
    }
    found.then_some(total)
}

/// Turns on `kernel.bpf_stats_enabled` for the benchmark and restores it afterwards.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let previous =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        std::fs::write(BPF_STATS, "1")
            .with_context(|| format!("enabling {BPF_STATS} (needs root)"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(BPF_STATS), self.previous.trim());
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
