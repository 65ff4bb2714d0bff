//! `cargo xtask bench offcpu`: the cost per context switch of off-CPU profiling, on the
//! workload that makes it matter: two threads pinned to one CPU bouncing a byte over pipes
//! (tests/workloads/pingpong.c), each round trip being two context switches.
//!
//! Each configuration runs `repetitions` times, interleaved with the others so that drift of the
//! machine hits all of them alike; medians are reported. Each profiled repetition is two runs:
//! throughput with `kernel.bpf_stats_enabled` off, as a node runs (the statistics add two clock
//! reads per program run, about 30 ns per switch here, which would be charged to the profiler),
//! then a run with it on for the in-kernel time per program run; that run's throughput is
//! printed too.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::{BpfStats, KillOnDrop, ProgramTime, program_time, timeval, zeroed_rusage};
use crate::{setup, workloads, workspace_root};

/// Context switches per ping-pong round trip on one CPU: ping → pong, pong → ping.
const SWITCHES_PER_ROUND_TRIP: f64 = 2.0;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Config {
    #[value(skip)]
    Unprofiled,
    Exact,
    Sampled,
    OtherTarget,
    Bpftrace,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::Unprofiled => "unprofiled",
            Self::Exact => "rover-agent exact (user+kernel stacks)",
            Self::Sampled => "rover-agent p = 0.1",
            Self::OtherTarget => "rover-agent targeting another process",
            Self::Bpftrace => "bpftrace one-liner (user stacks only)",
        }
    }

    fn target_us_per_switch(self) -> &'static str {
        match self {
            Self::Exact => "<= 0.8, below bpftrace",
            Self::Sampled => "<= 0.25",
            Self::OtherTarget => "<= 0.15",
            Self::Unprofiled | Self::Bpftrace => "",
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Default)]
struct Run {
    round_trips_per_second: f64,
    program: ProgramTime,
    profiler_cpu: Duration,
}

/// One repetition of a configuration.
#[derive(Clone, Copy)]
struct Measurement {
    /// With `kernel.bpf_stats_enabled` off.
    plain: Run,
    /// With it on (profiled configurations only).
    stats: Option<Run>,
}

pub(super) fn run(seconds: u64, repetitions: usize, only: &[Config]) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let pingpong = workloads::build("pingpong", &workspace_root().join("target/bench"))?;
    let stats = BpfStats::save()?;
    // The process the "other target" run profiles: alive, idle, not the ping-pong.
    let mut bystander = KillOnDrop(Command::new("sleep").arg("100000").spawn()?);
    let bystander_pid = bystander.0.id();

    let wanted = |config| only.is_empty() || only.contains(&config);
    let mut configs = vec![Config::Unprofiled];
    configs.extend(
        [Config::Exact, Config::Sampled, Config::OtherTarget]
            .into_iter()
            .filter(|&config| wanted(config)),
    );
    if wanted(Config::Bpftrace) {
        match ensure_bpftrace() {
            Ok(()) => configs.push(Config::Bpftrace),
            Err(reason) => eprintln!("bench offcpu: no bpftrace comparison: {reason:#}"),
        }
    }
    let mut results: Vec<Vec<Measurement>> = vec![Vec::new(); configs.len()];
    for repetition in 1..=repetitions {
        for (index, &config) in configs.iter().enumerate() {
            eprintln!("bench offcpu: {repetition}/{repetitions} {}", config.name());
            let run = |stats_enabled| {
                stats.set(stats_enabled)?;
                measure(
                    config,
                    &agent,
                    &pingpong,
                    seconds,
                    bystander_pid,
                    stats_enabled,
                )
                .with_context(|| format!("measuring {}", config.name()))
            };
            let plain = run(false)?;
            let stats = match config {
                Config::Unprofiled => None,
                _ => Some(run(true)?),
            };
            results[index].push(Measurement { plain, stats });
        }
    }
    let _ = bystander.0.kill();

    let baseline = median_by(&results[0], |m| m.plain.round_trips_per_second);
    let added_us = |rate: f64| (1.0 / rate - 1.0 / baseline) / SWITCHES_PER_ROUND_TRIP * 1e6;
    println!(
        "\noff-CPU: ping-pong pinned to CPU 0, {seconds} s runs, {repetitions} repetitions, medians"
    );
    println!(
        "{:<42} {:>13} {:>7} {:>10} {:>14} {:>8} {:>13}  target µs/switch",
        "", "round trips/s", "ratio", "µs/switch", "(with stats)", "ns/run", "profiler CPU"
    );
    for (config, runs) in configs.iter().zip(&results) {
        let rate = median_by(runs, |m| m.plain.round_trips_per_second);
        let stats: Vec<Run> = runs.iter().filter_map(|m| m.stats).collect();
        let columns = if stats.is_empty() {
            ["-", "-", "-", "-"].map(str::to_owned)
        } else {
            let stats_rate = median_by(&stats, |r| r.round_trips_per_second);
            let ns_per_run = median_by(&stats, |r| {
                r.program.run_time.as_nanos() as f64 / r.program.runs.max(1) as f64
            });
            let cpu_ms = median_by(runs, |m| m.plain.profiler_cpu.as_secs_f64() * 1000.0);
            [
                format!("{:.3}", added_us(rate)),
                format!("({:.3})", added_us(stats_rate)),
                format!("{ns_per_run:.0}"),
                format!("{cpu_ms:.0} ms"),
            ]
        };
        let [added, with_stats, ns_per_run, cpu] = columns;
        println!(
            "{:<42} {:>13.0} {:>7.3} {added:>10} {with_stats:>14} {ns_per_run:>8} {cpu:>13}  {}",
            config.name(),
            rate,
            rate / baseline,
            config.target_us_per_switch(),
        );
    }
    println!(
        "(µs/switch = (1/profiled − 1/unprofiled round trips per second) / {SWITCHES_PER_ROUND_TRIP}, \
         kernel.bpf_stats_enabled off; (with stats) = the same from runs with it on, which give \
         ns/run = in-kernel time per program run; profiler CPU = user+sys of the profiler process)"
    );
    Ok(())
}

/// The median of `value` over `items` (not empty).
fn median_by<T>(items: &[T], value: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = items.iter().map(value).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// bpftrace from Debian's package, installed if missing, with the tracefs it attaches through
/// (rover-agent itself needs none).
fn ensure_bpftrace() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/tracing/events").is_dir() {
        let mounted = Command::new("mount")
            .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
            .status();
        if !mounted.is_ok_and(|status| status.success()) {
            bail!("tracefs is not mounted at /sys/kernel/tracing and mounting it failed");
        }
    }
    let works = || {
        Command::new("bpftrace")
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if works() {
        return Ok(());
    }
    eprintln!("bench offcpu: installing bpftrace (apt-get install bpftrace)");
    let installed = Command::new("apt-get")
        .args(["install", "-y", "bpftrace"])
        .stdout(Stdio::null())
        .status();
    if works() {
        return Ok(());
    }
    bail!(
        "bpftrace is not installed and `apt-get install -y bpftrace` did not install it ({installed:?})"
    )
}

fn measure(
    config: Config,
    agent: &Path,
    pingpong: &Path,
    seconds: u64,
    bystander: u32,
    with_program_time: bool,
) -> anyhow::Result<Run> {
    // The workload waits for a byte on stdin, sent once the profiler is attached, so every
    // configuration measures the same steady state.
    let mut workload = KillOnDrop(
        Command::new(pingpong)
            .args([&seconds.to_string(), "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting pingpong")?,
    );
    let pid = workload.0.id();
    let mut profiler = match config {
        Config::Unprofiled => None,
        Config::Exact | Config::Sampled | Config::OtherTarget => {
            let target = if config == Config::OtherTarget {
                bystander
            } else {
                pid
            };
            let mut command = Command::new(agent);
            command
                .args(["-v", "profile", "--type", "off-cpu", "--pid"])
                .arg(target.to_string())
                .args(["--duration", "1h", "--output", "/dev/null"]);
            if config == Config::Sampled {
                command.args(["--sample-probability", "0.1"]);
            }
            Some(start_profiler(
                command,
                Stream::Stderr,
                "profiling started",
            )?)
        }
        Config::Bpftrace => {
            let script = format!(
                "tracepoint:sched:sched_switch /pid == {pid}/ {{ @start[tid] = nsecs; @stack[tid] = ustack; }} \
                 tracepoint:sched:sched_switch /@start[args->next_pid]/ {{ \
                 @off[@stack[args->next_pid]] = sum(nsecs - @start[args->next_pid]); \
                 delete(@start[args->next_pid]); delete(@stack[args->next_pid]); }}"
            );
            let mut command = Command::new("bpftrace");
            command.args(["-e", &script]);
            Some(start_profiler(command, Stream::Stdout, "Attaching")?)
        }
    };

    let stdin = workload.0.stdin.as_mut().context("pingpong stdin")?;
    stdin.write_all(b"g").context("starting pingpong")?;
    let mut output = String::new();
    let mut program = ProgramTime::default();
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    loop {
        // Polled only when statistics are on: otherwise there is nothing to read, and the
        // polling would only disturb the throughput being measured.
        if with_program_time
            && let Some(profiler) = &profiler
            && let Some(now) = program_time(profiler.child.id())
        {
            program = now;
        }
        if let Some(status) = workload.0.try_wait()? {
            if !status.success() {
                bail!("pingpong failed: {status}");
            }
            break;
        }
        if Instant::now() > deadline {
            bail!("pingpong did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    workload
        .0
        .stdout
        .take()
        .context("pingpong stdout")?
        .read_to_string(&mut output)?;
    let profiler_cpu = match profiler.take() {
        Some(profiler) => profiler.stop()?,
        None => Duration::ZERO,
    };
    Ok(Run {
        round_trips_per_second: round_trip_rate(&output)?,
        program,
        profiler_cpu,
    })
}

/// Round trips per second from pingpong's first output line `round_trips N seconds S`.
fn round_trip_rate(output: &str) -> anyhow::Result<f64> {
    let fields: Vec<&str> = output
        .lines()
        .next()
        .unwrap_or_default()
        .split(' ')
        .collect();
    match fields.as_slice() {
        ["round_trips", round_trips, "seconds", seconds, ..] => {
            let round_trips: f64 = round_trips.parse()?;
            let seconds: f64 = seconds.parse()?;
            Ok(round_trips / seconds)
        }
        _ => bail!("unexpected pingpong output: {output:?}"),
    }
}

enum Stream {
    Stdout,
    Stderr,
}

struct Profiler {
    child: Child,
    /// Kept open (and drained) so the profiler never blocks on a full pipe.
    _drain: std::thread::JoinHandle<()>,
}

/// Starts a profiler and returns once it printed `ready` on `stream` (it is attached).
fn start_profiler(mut command: Command, stream: Stream, ready: &str) -> anyhow::Result<Profiler> {
    match stream {
        Stream::Stdout => command.stdout(Stdio::piped()).stderr(Stdio::null()),
        Stream::Stderr => command.stderr(Stdio::piped()).stdout(Stdio::null()),
    };
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let pipe: Box<dyn std::io::Read + Send> = match stream {
        Stream::Stdout => Box::new(child.stdout.take().context("stdout")?),
        Stream::Stderr => Box::new(child.stderr.take().context("stderr")?),
    };
    let mut lines = BufReader::new(pipe).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(ready) => break,
            Some(Ok(_)) => {}
            _ => {
                let _ = child.kill();
                bail!("{command:?} exited before it was ready");
            }
        }
    }
    let drain = std::thread::spawn(move || for _ in lines {});
    Ok(Profiler {
        child,
        _drain: drain,
    })
}

impl Profiler {
    /// Stops the profiler (SIGINT, as a user would, unless it already ended because its target
    /// did) and returns its CPU time.
    fn stop(self) -> anyhow::Result<Duration> {
        let pid = self.child.id() as libc::pid_t;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let mut status = 0;
            let mut usage = zeroed_rusage();
            // SAFETY: wait4 writes into the two locals.
            let reaped = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
            if reaped == pid {
                return Ok(timeval(usage.ru_utime) + timeval(usage.ru_stime));
            }
            if reaped < 0 {
                bail!("wait4: {}", std::io::Error::last_os_error());
            }
            if Instant::now() > deadline {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(pid, libc::SIGINT) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_round_trip_rate() {
        let output = "round_trips 1000000 seconds 2.000000\nthread ping off_cpu_ns 1 switches 2\n";
        assert_eq!(round_trip_rate(output).ok(), Some(500_000.0));
        assert!(round_trip_rate("garbage").is_err());
    }
}
