//! `cargo xtask bench ...`: overhead figures measured side by side with reference tools in one
//! run, printed as ratios. Benchmarks print; they never pass or fail on a threshold.

mod continuous;
mod discovery;
mod idle;
mod offcpu;
mod oncpu;
mod upload;

use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// Whole-host on-CPU sampling of a busy machine: rover-agent against `perf record -a -g`.
    Oncpu {
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 99)]
        frequency: u64,
    },
    /// The agent with no task: programs attached, CPU and memory, before any task and after
    /// tasks came and went.
    Idle {
        /// Length of each idle phase.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Off-CPU profiling of a pinned ping-pong (about a million switches per second):
    /// rover-agent exact, sampled and targeting another process, against bpftrace.
    Offcpu {
        /// Length of each measured run.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// Runs of each configuration, alternating; medians are reported.
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Measure only these configurations besides the unprofiled baseline (all by default).
        #[arg(long, value_delimiter = ',', value_enum)]
        only: Vec<offcpu::Config>,
    },
    /// The node agent's upload path (one flush of 10,000 stacks to a fake OAP) and its idle
    /// cost (`rover-agent run` with 500 reported processes and no task).
    Upload {
        /// How long the idle agent is measured.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Measured flushes (after a warm-up); median and max are reported.
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Processes the idle agent reports.
        #[arg(long, default_value_t = 500)]
        processes: usize,
    },
    /// Kubernetes discovery with live processes in pods' cgroups and the fake API server: a full
    /// scan through the library, `rover-agent run`'s CPU per pod event and its RSS growth.
    Discovery {
        #[arg(long, default_value_t = 200)]
        pods: usize,
        /// Processes in each pod's one container.
        #[arg(long, default_value_t = 10)]
        per_container: usize,
        /// Scans of each kind measured.
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        /// Pod events 400 ms apart (each scanned on its own).
        #[arg(long, default_value_t = 100)]
        isolated_events: usize,
        /// Pod events 10 ms apart.
        #[arg(long, default_value_t = 1000)]
        burst_events: usize,
    },
    /// Continuous profiling's checking: `rover-agent run` with 500 reported processes and no
    /// task, without a policy and with every process under one that never fires.
    Continuous {
        /// How long each measure lasts.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        #[arg(long, default_value_t = 500)]
        processes: usize,
        /// Measures of each kind, alternating; medians are printed.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
}

pub(crate) fn run(bench: Bench) -> anyhow::Result<()> {
    let _lock = machine_lock()?;
    match bench {
        Bench::Oncpu { seconds, frequency } => oncpu::run(seconds, frequency),
        Bench::Idle { seconds } => idle::run(seconds),
        Bench::Offcpu {
            seconds,
            repetitions,
            only,
        } => offcpu::run(seconds, repetitions, &only),
        Bench::Upload {
            seconds,
            iterations,
            processes,
        } => upload::run(seconds, iterations, processes),
        Bench::Discovery {
            pods,
            per_container,
            iterations,
            isolated_events,
            burst_events,
        } => discovery::run(
            pods,
            per_container,
            iterations,
            isolated_events,
            burst_events,
        ),
        Bench::Continuous {
            seconds,
            processes,
            rounds,
        } => continuous::run(seconds, processes, rounds),
    }
}

/// What a measured process cost.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Cost {
    pub cpu: Duration,
    pub peak_rss_kib: u64,
}

/// Time spent inside eBPF programs, from `kernel.bpf_stats_enabled`.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ProgramTime {
    pub run_time: Duration,
    pub runs: u64,
}

/// Runs `command` to completion; returns its CPU time and peak RSS (from wait4) and the run
/// time of the eBPF programs it held, polled from its fdinfo while it ran.
pub(super) fn measure_with_program_time(
    command: &mut Command,
) -> anyhow::Result<(Cost, ProgramTime)> {
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

pub(super) fn zeroed_rusage() -> libc::rusage {
    // SAFETY: rusage is plain integers; all-zero is valid.
    unsafe { std::mem::zeroed() }
}

pub(super) fn timeval(value: libc::timeval) -> Duration {
    Duration::from_secs(value.tv_sec as u64) + Duration::from_micros(value.tv_usec as u64)
}

/// Sums `run_time_ns`/`run_cnt` over the eBPF program descriptors process `pid` holds.
pub(super) fn program_time(pid: u32) -> Option<ProgramTime> {
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

/// What a running process holds and has spent, read from `/proc/PID`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcessSample {
    /// User + system CPU time so far.
    pub cpu: Duration,
    pub rss_kib: u64,
    /// Peak RSS so far.
    pub peak_rss_kib: u64,
    pub fds: usize,
    /// eBPF programs it holds (each once, however many descriptors refer to it).
    pub programs: usize,
}

pub(crate) fn sample_process(pid: u32) -> anyhow::Result<ProcessSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| {
        fields
            .get(index - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let cpu = Duration::from_millis((ticks(14) + ticks(15)) * 1000 / per_second);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    let mut programs = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|line| line.strip_prefix("prog_id:")) {
            programs.insert(id.trim().to_owned());
        }
    }
    Ok(ProcessSample {
        cpu,
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
        fds,
        programs: programs.len(),
    })
}

/// Sets `kernel.bpf_stats_enabled` for the benchmark and restores it afterwards.
pub(super) struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    /// Turns the statistics on.
    pub(super) fn enable() -> anyhow::Result<Self> {
        let stats = Self::save()?;
        stats.set(true)?;
        Ok(stats)
    }

    /// Remembers the current setting, to be restored on drop.
    pub(super) fn save() -> anyhow::Result<Self> {
        let previous =
            std::fs::read_to_string(BPF_STATS).with_context(|| format!("reading {BPF_STATS}"))?;
        Ok(Self { previous })
    }

    pub(super) fn set(&self, enabled: bool) -> anyhow::Result<()> {
        std::fs::write(BPF_STATS, if enabled { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS} (needs root)"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(BPF_STATS), self.previous.trim());
    }
}

pub(super) struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The lock the integration tests take around whatever loads BPF or measures the machine
/// (tests/src/lib.rs): a benchmark beside them would measure their load, and disturb them.
pub(crate) fn machine_lock() -> anyhow::Result<std::fs::File> {
    let path = std::env::temp_dir().join("rover-rs-integration-tests.lock");
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    if file.try_lock().is_err() {
        eprintln!(
            "bench: waiting for the integration tests to finish ({})",
            path.display()
        );
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
    }
    Ok(file)
}
