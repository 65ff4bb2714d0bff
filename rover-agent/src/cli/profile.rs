//! `rover-agent profile`: a local profile written to a file, no backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;

use super::output::{Format, Output};
use crate::bpf::Targets;
use crate::process;
use crate::profile::Weight;
use crate::symbolize::SymbolizerConfig;
use crate::task::{EndReason, OnCpuRequest, ProfileRun, profile_on_cpu};

#[derive(Debug, Args)]
pub struct ProfileArgs {
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
    /// Samples per second on each CPU.
    #[arg(long, value_name = "HZ", default_value_t = 99, value_parser = clap::value_parser!(u64).range(1..))]
    pub frequency: u64,
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
    /// Do not read DWARF debug info (no inlined frames or source lines; faster on huge binaries).
    #[arg(long)]
    pub no_debug_info: bool,
}

pub(super) fn run(args: ProfileArgs) -> anyhow::Result<ExitCode> {
    let request = validate(&args)?;
    let output = Output::prepare(args.format, args.output.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let run = runtime.block_on(profile_on_cpu(&request, stop_signal()))?;

    report_end(&run);
    let weight = Weight {
        value_index: 0,
        divisor: 1,
        unit_label: "samples".to_owned(),
    };
    let title = match &request.targets {
        Targets::All => "On-CPU: all processes".to_owned(),
        Targets::Pids(pids) => format!("On-CPU: pid {}", join(pids)),
    };
    let written = output.write(&run.profile, &weight, &title)?;
    eprintln!(
        "rover-agent: {}; {written}",
        summary(&run, request.frequency_hz)
    );
    Ok(match run.end {
        EndReason::Failed(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

fn validate(args: &ProfileArgs) -> anyhow::Result<OnCpuRequest> {
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
    if args.drain_interval < Duration::from_millis(10) {
        bail!("--drain-interval must be at least 10ms");
    }
    let max_rate = max_sample_rate();
    if let Some(max_rate) = max_rate
        && args.frequency > max_rate
    {
        bail!(
            "--frequency {} exceeds the kernel's limit of {max_rate} Hz \
             (sysctl kernel.perf_event_max_sample_rate): choose a lower frequency or raise the limit",
            args.frequency
        );
    }
    if args.frequency > 1_000_000_000 {
        bail!("--frequency {} is above 1 GHz", args.frequency);
    }
    Ok(OnCpuRequest {
        targets,
        duration: args.duration,
        frequency_hz: args.frequency,
        drain_interval: args.drain_interval,
        symbolizer: SymbolizerConfig {
            debug_info: !args.no_debug_info,
            // A CLI run keeps every exited process until it writes the profile.
            exited_process_grace: args.duration + Duration::from_secs(60),
        },
    })
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
        eprintln!(
            "rover-agent: warning: no samples recorded (an on-CPU profile only sees threads \
             that run on a CPU; the targets may have been idle)"
        );
    }
}

fn summary(run: &ProfileRun, frequency_hz: u64) -> String {
    let counters = &run.counters;
    let mut losses = format!(
        "losses: {} (kernel stacks {}, user stacks {}, aggregate map full {})",
        counters.losses(),
        counters.kernel_stack_lost,
        counters.user_stack_lost,
        counters.aggregate_full
    );
    if counters.user_stack_truncated > 0 {
        losses += &format!(", {} user stacks truncated", counters.user_stack_truncated);
    }
    format!(
        "{} samples, {} distinct stacks, {:.2} s at {frequency_hz} Hz ({} idle, {} kernel-only); \
         {losses}; symbolization misses: {} of {} frames",
        run.profile.total(0),
        run.profile.samples().len(),
        run.elapsed.as_secs_f64(),
        counters.idle,
        counters.kernel_only,
        run.symbolize.unknown_frames,
        run.symbolize.frames,
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
    fn bad_durations_say_what_is_expected() {
        for bad in ["ten", "-1", "5 parsecs", ""] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(error.contains("e.g. 10s"), "{bad}: {error}");
        }
    }
}
