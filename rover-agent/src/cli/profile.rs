//! `rover-agent profile`: a local profile written to a file, no backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory as _, ValueEnum};

use super::output::{Format, Output};
use crate::bpf::Targets;
use crate::process;
use crate::profile::Weight;
use crate::symbolize::SymbolizerConfig;
use crate::task::{
    EndReason, OffCpuRequest, OnCpuRequest, ProfileRun, RunDetails, RunSettings, profile_off_cpu,
    profile_on_cpu,
};

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// What to profile: where threads run (on-cpu) or where they wait (off-cpu).
    #[arg(long = "type", value_enum, default_value_t = ProfileType::OnCpu)]
    pub profile_type: ProfileType,
    /// Process to profile, by host pid (repeatable).
    #[arg(
        long = "pid",
        value_name = "PID",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    pub pids: Vec<u32>,
    /// Profile every process on the host.
    #[arg(long)]
    pub all: bool,
    /// How long to profile: 10s, 1m30s, 500ms (a bare number is seconds).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// On-CPU: samples per second on each CPU [default: 99].
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..))]
    pub frequency: Option<u64>,
    /// Off-CPU: leave out involuntary switches (preemption of a runnable thread).
    #[arg(long)]
    pub exclude_preempt: bool,
    /// Off-CPU: leave out episodes shorter than this, e.g. 1ms [default: 0].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_block: Option<Duration>,
    /// Off-CPU: record each switch-out with probability P (0 < P <= 1), decided in the kernel
    /// before any stack walk, and scale counts and times by 1/P. For threads switching hundreds
    /// of thousands of times per second [default: 1, exact].
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub sample_probability: Option<f64>,
    /// Off-CPU: what folded stacks and flame graphs are weighted by [default: time, in µs].
    #[arg(long, value_enum)]
    pub weight: Option<OffCpuWeight>,
    /// Output format [default: from the --output extension (.svg, .pb.gz), else folded].
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Where to write the profile; `-` is stdout [default: stdout for folded, profile.svg or
    /// profile.pb.gz in the current directory otherwise].
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// How often kernel aggregates are drained and symbolized.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub drain_interval: Duration,
    /// Also read DWARF debug info: inlined functions as frames of their own, source files and
    /// lines (pprof). Costs memory in proportion to the debug info of the profiled binaries.
    #[arg(long)]
    pub debug_info: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProfileType {
    /// Where threads run: CPU samples (perf_event, cpu-clock).
    OnCpu,
    /// Where threads wait: context switches and blocked time (sched_switch).
    OffCpu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OffCpuWeight {
    /// Off-CPU time, in microseconds.
    Time,
    /// Number of switches (episodes).
    Switches,
}

/// A validated request for either profiler.
enum Request {
    OnCpu(OnCpuRequest),
    OffCpu(OffCpuRequest),
}

impl Request {
    /// What flame graphs and folded stacks are weighted by, and the flame graph's title.
    fn weight_and_title(&self, off_cpu_weight: OffCpuWeight) -> (Weight, String) {
        let weight = |value_index, divisor, unit_label: &str| Weight {
            value_index,
            divisor,
            unit_label: unit_label.to_owned(),
        };
        let (run, weight, kind) = match self {
            Request::OnCpu(request) => (&request.run, weight(0, 1, "samples"), "On-CPU"),
            // Nanoseconds shown as microseconds, the unit off-CPU flame graphs use.
            Request::OffCpu(request) => match off_cpu_weight {
                OffCpuWeight::Time => (&request.run, weight(1, 1000, "us"), "Off-CPU time"),
                OffCpuWeight::Switches => {
                    (&request.run, weight(0, 1, "switches"), "Off-CPU switches")
                }
            },
        };
        let targets = match &run.targets {
            Targets::All => "all processes".to_owned(),
            Targets::Pids(pids) => format!("pid {}", join(pids)),
        };
        (weight, format!("{kind}: {targets}"))
    }
}

pub(super) fn run(args: ProfileArgs) -> anyhow::Result<ExitCode> {
    reject_flags_of_the_other_type(&args);
    let request = validate(&args)?;
    let output = Output::prepare(args.format, args.output.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let run = runtime.block_on(async {
        match &request {
            Request::OnCpu(request) => profile_on_cpu(request, stop_signal()).await,
            Request::OffCpu(request) => profile_off_cpu(request, stop_signal()).await,
        }
    })?;

    report_end(&run);
    let (weight, title) = request.weight_and_title(args.weight.unwrap_or(OffCpuWeight::Time));
    let written = output.write(&run.profile, &weight, &title)?;
    eprintln!("rover-agent: {}; {written}", summary(&run));
    Ok(match run.end {
        EndReason::Failed(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Flags of one profile type given with the other are usage errors (exit status 2).
fn reject_flags_of_the_other_type(args: &ProfileArgs) {
    let (given, other): (Vec<&str>, &str) = match args.profile_type {
        ProfileType::OnCpu => (
            [
                (args.exclude_preempt, "--exclude-preempt"),
                (args.min_block.is_some(), "--min-block"),
                (args.sample_probability.is_some(), "--sample-probability"),
                (args.weight.is_some(), "--weight"),
            ]
            .into_iter()
            .filter_map(|(given, flag)| given.then_some(flag))
            .collect(),
            "off-cpu",
        ),
        ProfileType::OffCpu => (
            args.frequency.map(|_| "--frequency").into_iter().collect(),
            "on-cpu",
        ),
    };
    if let Some(flag) = given.first() {
        super::Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                format!("{flag} only applies to --type {other}"),
            )
            .exit();
    }
}

fn validate(args: &ProfileArgs) -> anyhow::Result<Request> {
    let targets = if args.all {
        Targets::All
    } else {
        for &pid in &args.pids {
            if pid == 0 || !process::is_alive(pid) {
                bail!(
                    "--pid {pid}: no such running process (pids are those of the host's pid \
                     namespace, as `ps` on the host shows them)"
                );
            }
        }
        Targets::Pids(args.pids.clone())
    };
    if args.duration.is_zero() {
        bail!("--duration must be longer than zero, e.g. --duration 10s");
    }
    // A year bounds every time computation (deadlines, grace periods) far from overflow.
    const YEAR: Duration = Duration::from_secs(366 * 24 * 3600);
    if args.duration > YEAR {
        bail!("--duration must be at most a year (366d); use a shorter profile");
    }
    if args.drain_interval < Duration::from_millis(10)
        || args.drain_interval > Duration::from_secs(60)
    {
        bail!("--drain-interval must be between 10ms and 60s");
    }
    let run = RunSettings {
        targets,
        duration: args.duration,
        drain_interval: args.drain_interval,
        symbolizer: SymbolizerConfig {
            debug_info: args.debug_info,
            // An exited process's last samples are drained within one interval.
            exited_process_grace: (args.drain_interval * 5).max(Duration::from_secs(10)),
        },
    };
    if args.profile_type == ProfileType::OffCpu {
        return Ok(Request::OffCpu(OffCpuRequest {
            run,
            exclude_preempt: args.exclude_preempt,
            min_block: args.min_block.unwrap_or_default(),
            sample_probability: args.sample_probability.unwrap_or(1.0),
        }));
    }
    let frequency = args.frequency.unwrap_or(99);
    if let Some(max_rate) = max_sample_rate()
        && frequency > max_rate
    {
        bail!(
            "--frequency {frequency} exceeds the kernel's limit of {max_rate} Hz \
             (sysctl kernel.perf_event_max_sample_rate): choose a lower frequency or raise the limit"
        );
    }
    if frequency > 1_000_000_000 {
        bail!("--frequency {frequency} is above 1 GHz");
    }
    Ok(Request::OnCpu(OnCpuRequest {
        run,
        frequency_hz: frequency,
    }))
}

fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!(
            "`{text}` is not a probability in (0, 1]: e.g. 0.1 keeps one switch in ten"
        )),
    }
}

fn max_sample_rate() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("`{text}` is not a duration: use e.g. 10s, 1m30s, 500ms"));
    }
    humantime::parse_duration(text).map_err(|error| {
        format!("`{text}` is not a duration ({error}): use e.g. 10s, 1m30s, 500ms")
    })
}

/// Resolves with the name of the first SIGINT or SIGTERM.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot listen for SIGINT/SIGTERM: the profile runs its full duration");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    }
}

fn report_end(run: &ProfileRun) {
    let after = format!("{:.1} s", run.elapsed.as_secs_f64());
    match &run.end {
        EndReason::Completed => {}
        EndReason::Stopped(signal) => eprintln!("rover-agent: stopped by {signal} after {after}"),
        EndReason::TargetsExited => {
            eprintln!("rover-agent: every target process exited; stopped after {after}")
        }
        EndReason::Failed(error) => {
            eprintln!("rover-agent: error: {error}; writing the {after} captured before it")
        }
    }
    if run.profile.samples().is_empty() {
        let why = match run.details {
            RunDetails::OnCpu { .. } => {
                "an on-CPU profile only sees threads that run on a CPU; the targets may have been idle"
            }
            RunDetails::OffCpu { .. } => {
                "an off-CPU profile only sees threads that were switched out and back in"
            }
        };
        eprintln!("rover-agent: warning: no samples recorded ({why})");
    }
}

fn summary(run: &ProfileRun) -> String {
    let counters = &run.counters;
    let mut losses = format!(
        "losses: {} (kernel stacks {}, user stacks {}, aggregate map full {}",
        counters.losses(),
        counters.kernel_stack_lost,
        counters.user_stack_lost,
        counters.aggregate_full
    );
    let seconds = run.elapsed.as_secs_f64();
    let head = match &run.details {
        RunDetails::OnCpu { frequency_hz } => format!(
            "{} samples, {} distinct stacks, {seconds:.2} s at {frequency_hz} Hz ({} idle, {} kernel-only)",
            run.profile.total(0),
            run.profile.samples().len(),
            counters.idle,
            counters.kernel_only,
        ),
        RunDetails::OffCpu { sample_probability } => {
            losses += &format!(", thread state unavailable {}", counters.thread_state_lost);
            let sampled = if *sample_probability < 1.0 {
                format!(" (sampled with p = {sample_probability}, totals scaled by 1/p)")
            } else {
                String::new()
            };
            format!(
                "{} switches, {:.3} s off-CPU, {} distinct stacks in {seconds:.2} s{sampled}; \
                 not counted: {} episodes still open at the end, {} whose end was not seen, \
                 {} shorter than --min-block, {} preemptions excluded",
                run.profile.total(0),
                run.profile.total(1) as f64 / 1e9,
                run.profile.samples().len(),
                counters.open_episodes(),
                counters.episode_ends_missed,
                counters.too_short,
                counters.preempt_excluded,
            )
        }
    };
    losses += ")";
    if counters.stack_truncated > 0 {
        losses += &format!(", {} stacks truncated", counters.stack_truncated);
    }
    format!(
        "{head}; {losses}; symbolization misses: {} of {} frames",
        run.symbolize.unknown_frames, run.symbolize.frames,
    )
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
    }

    #[test]
    fn probabilities_must_be_in_the_unit_interval() {
        assert_eq!(parse_probability("0.1"), Ok(0.1));
        assert_eq!(parse_probability("1"), Ok(1.0));
        for bad in ["0", "1.5", "-0.2", "abc", "NaN"] {
            let error = parse_probability(bad).expect_err(bad);
            assert!(error.contains("(0, 1]"), "{bad}: {error}");
        }
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for bad in ["ten", "-1", "5 parsecs", ""] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(error.contains("e.g. 10s"), "{bad}: {error}");
        }
    }
}
