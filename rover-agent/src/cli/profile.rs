//! `rover-agent profile`: a local profile written to a file, no backend.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Args, CommandFactory as _, ValueEnum};

use super::engine_args::{EngineArgs, parse_duration};
use super::output::{FileSink, Format, Output, Written};
use crate::bpf::{ProfilerKind, TargetOptions, Targets};
use crate::process;
use crate::profile::Weight;
use crate::task::{Agent, AgentConfig, TaskNotice, TaskSpec, TaskSummary};

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
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Off-CPU: leave out involuntary switches (preemption of a runnable thread).
    #[arg(long)]
    pub exclude_preempt: bool,
    /// Off-CPU: leave out episodes shorter than this, e.g. 1ms [default: 0].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_block: Option<Duration>,
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

/// Why a profile ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum EndReason {
    /// The requested duration elapsed.
    Completed,
    /// A signal (named) asked the agent to stop early.
    Stopped(&'static str),
    /// Every target process exited.
    TargetsExited,
    /// Recording failed; the profile holds what was captured before.
    Failed(String),
}

/// A validated request.
struct Request {
    config: AgentConfig,
    spec: TaskSpec,
    duration: Duration,
}

impl Request {
    /// What flame graphs and folded stacks are weighted by, and the flame graph's title.
    fn weight_and_title(&self, off_cpu_weight: OffCpuWeight) -> (Weight, String) {
        let weight = |value_index, divisor, unit_label: &str| Weight {
            value_index,
            divisor,
            unit_label: unit_label.to_owned(),
        };
        let (weight, kind) = match self.spec.kind {
            ProfilerKind::OnCpu => (weight(0, 1, "samples"), "On-CPU"),
            // Nanoseconds shown as microseconds, the unit off-CPU flame graphs use.
            ProfilerKind::OffCpu => match off_cpu_weight {
                OffCpuWeight::Time => (weight(1, 1000, "us"), "Off-CPU time"),
                OffCpuWeight::Switches => (weight(0, 1, "switches"), "Off-CPU switches"),
            },
        };
        let targets = match &self.spec.targets {
            Targets::All => "all processes".to_owned(),
            Targets::Pids(pids) => format!("pid {}", join(pids)),
        };
        (weight, format!("{kind}: {targets}"))
    }
}

/// What the summary line says.
struct Report {
    kind: ProfilerKind,
    frequency_hz: u64,
    sample_probability: f64,
    elapsed: Duration,
    end: EndReason,
    summary: TaskSummary,
    written: Written,
}

pub(super) fn run(args: ProfileArgs) -> anyhow::Result<ExitCode> {
    reject_flags_of_the_other_type(&args);
    let request = validate(&args)?;
    let output = Output::prepare(args.format, args.output.as_deref())?;
    let (weight, title) = request.weight_and_title(args.weight.unwrap_or(OffCpuWeight::Time));
    let written = Arc::new(Mutex::new(None));
    let sink = FileSink::new(output, weight, title, written.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let agent = Agent::start(request.config.clone())?;
    let (end, summary, elapsed) = runtime.block_on(record(&agent, &request, Box::new(sink)))?;
    // Ends the agent's threads; the profile is written already.
    drop(agent);
    let written = written
        .lock()
        .ok()
        .and_then(|mut written| written.take())
        .context("the profile was not handed to its writer")??;
    let report = Report {
        kind: request.spec.kind,
        frequency_hz: request.config.profilers.frequency_hz,
        sample_probability: request.config.profilers.off_cpu_sample_probability,
        elapsed,
        end,
        summary,
        written,
    };
    report_end(&report);
    eprintln!(
        "rover-agent: {}; {}",
        summary_line(&report),
        report.written.description
    );
    Ok(match report.end {
        EndReason::Failed(_) => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Records until the duration elapses, a signal arrives, every target exited or draining
/// fails; the profile's single window is written by the sink when the task stops.
async fn record(
    agent: &Agent,
    request: &Request,
    sink: Box<FileSink>,
) -> anyhow::Result<(EndReason, TaskSummary, Duration)> {
    let started = Instant::now();
    let mut task = agent.start_task(request.spec.clone(), sink).await?;
    tracing::info!(kind = request.spec.kind.name(), "profiling started");
    let deadline = tokio::time::sleep(request.duration);
    let stop = super::stop_signal();
    tokio::pin!(deadline, stop);
    let end = loop {
        tokio::select! {
            () = &mut deadline => break EndReason::Completed,
            signal = &mut stop => break EndReason::Stopped(signal),
            notice = task.notice() => match notice {
                Some(TaskNotice::AllProcessesExited) => break EndReason::TargetsExited,
                Some(TaskNotice::DrainFailed(error)) => break EndReason::Failed(error),
                Some(TaskNotice::ProcessExited { .. }) => {}
                None => break EndReason::Failed("the task ended unexpectedly".to_owned()),
            },
        }
    };
    let elapsed = started.elapsed();
    let summary = task.stop().await?;
    tracing::info!(end = ?end, elapsed = ?elapsed, "profiling ended");
    Ok((end, summary, elapsed))
}

/// Flags of one profile type given with the other are usage errors (exit status 2).
fn reject_flags_of_the_other_type(args: &ProfileArgs) {
    let (given, other): (Vec<&str>, &str) = match args.profile_type {
        ProfileType::OnCpu => (
            [
                (args.exclude_preempt, "--exclude-preempt"),
                (args.min_block.is_some(), "--min-block"),
                (
                    args.engine.sample_probability.is_some(),
                    "--sample-probability",
                ),
                (args.weight.is_some(), "--weight"),
            ]
            .into_iter()
            .filter_map(|(given, flag)| given.then_some(flag))
            .collect(),
            "off-cpu",
        ),
        ProfileType::OffCpu => (
            args.engine
                .frequency
                .map(|_| "--frequency")
                .into_iter()
                .collect(),
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
    let config = args.engine.agent_config()?;
    if let Targets::Pids(pids) = &targets
        && pids.len() > config.profilers.max_targets as usize
    {
        bail!(
            "{} --pid given, more than --max-targets {}: raise --max-targets",
            pids.len(),
            config.profilers.max_targets
        );
    }
    let (kind, options) = match args.profile_type {
        ProfileType::OnCpu => (ProfilerKind::OnCpu, TargetOptions::default()),
        ProfileType::OffCpu => (
            ProfilerKind::OffCpu,
            TargetOptions {
                exclude_preempt: args.exclude_preempt,
                min_block: args.min_block.unwrap_or_default(),
            },
        ),
    };
    Ok(Request {
        config,
        spec: TaskSpec {
            kind,
            targets,
            options,
            // One window: the profile of the whole run.
            window: None,
        },
        duration: args.duration,
    })
}

fn report_end(report: &Report) {
    let after = format!("{:.1} s", report.elapsed.as_secs_f64());
    match &report.end {
        EndReason::Completed => {}
        EndReason::Stopped(signal) => eprintln!("rover-agent: stopped by {signal} after {after}"),
        EndReason::TargetsExited => {
            eprintln!("rover-agent: every target process exited; stopped after {after}")
        }
        EndReason::Failed(error) => {
            eprintln!("rover-agent: error: {error}; writing the {after} captured before it")
        }
    }
    for error in &report.summary.sink_errors {
        eprintln!("rover-agent: error: {error}");
    }
    if report.written.distinct_stacks == 0 {
        let why = match report.kind {
            ProfilerKind::OnCpu => {
                "an on-CPU profile only sees threads that run on a CPU; the targets may have been idle"
            }
            ProfilerKind::OffCpu => {
                "an off-CPU profile only sees threads that were switched out and back in"
            }
        };
        eprintln!("rover-agent: warning: no samples recorded ({why})");
    }
}

fn summary_line(report: &Report) -> String {
    let counters = &report.summary.counters;
    let written = &report.written;
    let mut losses = format!(
        "losses: {} (kernel stacks {}, user stacks {}, aggregate map full {}",
        counters.losses(),
        counters.kernel_stack_lost,
        counters.user_stack_lost,
        counters.aggregate_full
    );
    let seconds = report.elapsed.as_secs_f64();
    let head = match report.kind {
        ProfilerKind::OnCpu => format!(
            "{} samples, {} distinct stacks, {seconds:.2} s at {} Hz ({} idle, {} kernel-only)",
            written.totals[0],
            written.distinct_stacks,
            report.frequency_hz,
            counters.idle,
            counters.kernel_only,
        ),
        ProfilerKind::OffCpu => {
            losses += &format!(", thread state unavailable {}", counters.thread_state_lost);
            let p = report.sample_probability;
            let sampled = if p < 1.0 {
                format!(" (sampled with p = {p}, totals scaled by 1/p)")
            } else {
                String::new()
            };
            format!(
                "{} switches, {:.3} s off-CPU, {} distinct stacks in {seconds:.2} s{sampled}; \
                 not counted: {} episodes still open at the end, {} whose end was not seen, \
                 {} shorter than --min-block, {} preemptions excluded",
                written.totals[0],
                written.totals[1] as f64 / 1e9,
                written.distinct_stacks,
                counters.open_episodes(),
                counters.episode_ends_missed,
                counters.too_short,
                counters.preempt_excluded,
            )
        }
    };
    losses += ")";
    let cut = report.summary.stacks_cut;
    if counters.stack_truncated + cut > 0 {
        losses += &format!(
            ", {} stacks truncated ({} deeper than recorded, {cut} ending outside any mapping)",
            counters.stack_truncated + cut,
            counters.stack_truncated
        );
    }
    let symbolize = &report.summary.symbolize;
    format!(
        "{head}; {losses}; symbolization misses: {} of {} frames",
        symbolize.unknown_frames, symbolize.frames,
    )
}

fn join(pids: &[u32]) -> String {
    pids.iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
