//! The agent's self-metrics, written in one place: each module counts where things happen (plain
//! atomics and totals, nothing of Prometheus), the endpoint reads them into a [`Snapshot`] at
//! scrape time, and this module writes it as Prometheus text exposition (OpenMetrics 1.0, as
//! `prometheus-client` writes it), so a scrape costs nothing between scrapes.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeMetric as _,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

use crate::backend::{CallStats, ProcessCounts, UploadStats};
use crate::bpf::{Counters, EngineTotals, ProfilerKind};

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything `/metrics` reports, read from the modules at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub engine: EngineTotals,
    /// `kernel.bpf_stats_enabled`: the programs' run time is reported only while it is 1.
    pub bpf_stats_enabled: bool,
    pub frames: FrameCounts,
    /// Every (profiler, source) pair, runs or none.
    pub runs: Vec<RunCount>,
    pub calls: CallStats,
    pub upload: UploadStats,
    pub processes: ProcessCounts,
}

/// Frames symbolized since the agent started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameCounts {
    pub symbolized: u64,
    /// Of which without a function name (`[unknown]`).
    pub unresolved: u64,
}

/// Profiling runs of one profiler started by one source (`backend`, `continuous`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunCount {
    pub profiler: ProfilerKind,
    pub source: &'static str,
    pub active: u64,
    pub started: u64,
}

/// The snapshot as OpenMetrics text, `# EOF` included.
pub fn encode(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

/// SkyWalking's name of a profiler's target type, the label value.
fn profiler_label(kind: ProfilerKind) -> &'static str {
    match kind {
        ProfilerKind::OnCpu => "ON_CPU",
        ProfilerKind::OffCpu => "OFF_CPU",
    }
}

type Labels = Vec<(&'static str, String)>;

/// A counter's or gauge's samples, one per label set (an empty set: the metric has no labels).
fn write<N: Copy>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    metric_type: MetricType,
    samples: &[(Labels, N)],
    write_one: impl Fn(N, prometheus_client::encoding::MetricEncoder) -> std::fmt::Result,
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, unit, metric_type)?;
    match samples {
        [(labels, value)] if labels.is_empty() => write_one(*value, metric),
        _ => {
            for (labels, value) in samples {
                write_one(*value, metric.encode_family(labels)?)?;
            }
            Ok(())
        }
    }
}

fn counter<N: EncodeCounterValue + Copy + std::fmt::Debug + Send + Sync>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: &[(Labels, N)],
) -> std::fmt::Result {
    write(
        encoder,
        name,
        help,
        unit,
        MetricType::Counter,
        samples,
        |value, metric| ConstCounter::new(value).encode(metric),
    )
}

fn gauge<N: EncodeGaugeValue + Copy + std::fmt::Debug + Send + Sync>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels, N)],
) -> std::fmt::Result {
    write(
        encoder,
        name,
        help,
        None,
        MetricType::Gauge,
        samples,
        |value, metric| ConstGauge::new(value).encode(metric),
    )
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = &self.0;
        let e = &mut encoder;
        encode_engine(e, &snapshot.engine, snapshot.bpf_stats_enabled)?;
        counter(
            e,
            "rover_frames_symbolized",
            "Stack frames symbolized (inlined frames included).",
            None,
            &[(Labels::new(), snapshot.frames.symbolized)],
        )?;
        counter(
            e,
            "rover_frames_unresolved",
            "Symbolization misses: frames left without a function name, shown as [unknown] \
             with their module and offset.",
            None,
            &[(Labels::new(), snapshot.frames.unresolved)],
        )?;
        let runs = |value: fn(&RunCount) -> u64| -> Vec<(Labels, u64)> {
            snapshot
                .runs
                .iter()
                .map(|run| {
                    (
                        vec![
                            ("profiler", profiler_label(run.profiler).to_owned()),
                            ("source", run.source.to_owned()),
                        ],
                        value(run),
                    )
                })
                .collect()
        };
        gauge(
            e,
            "rover_tasks_active",
            "Profiling runs recording now, by profiler and by what started them (backend: a task \
             of the OAP; continuous: a continuous profiling trigger).",
            &runs(|run| run.active),
        )?;
        counter(
            e,
            "rover_tasks_started",
            "Profiling runs started; source=\"continuous\" counts the triggered runs.",
            None,
            &runs(|run| run.started),
        )?;
        encode_backend(e, &snapshot.calls, &snapshot.upload)?;
        gauge(
            e,
            "rover_processes_found",
            "Processes found by discovery (host rules, pods) and reported to the OAP.",
            &[(Labels::new(), snapshot.processes.found as u64)],
        )?;
        gauge(
            e,
            "rover_processes_reported",
            "Of the processes found, those the OAP knows by an id: kept alive every heartbeat.",
            &[(Labels::new(), snapshot.processes.reported as u64)],
        )?;
        Ok(())
    }
}

fn encode_engine(
    e: &mut DescriptorEncoder,
    engine: &EngineTotals,
    bpf_stats_enabled: bool,
) -> std::fmt::Result {
    let mut on_cpu_samples = 0;
    let mut lost = Vec::new();
    let mut switches = 0;
    let mut skipped = Vec::new();
    let mut ends_missed = 0;
    let mut distinct = Vec::new();
    // Both profilers, loaded yet or not: a series that appears only later hides its first
    // increase from rate().
    for kind in [ProfilerKind::OnCpu, ProfilerKind::OffCpu] {
        let (counters, distinct_stacks) = engine
            .profilers
            .iter()
            .find(|profiler| profiler.kind == kind)
            .map_or((Counters::default(), 0), |profiler| {
                (profiler.counters, profiler.distinct_stacks)
            });
        let label = profiler_label(kind);
        let mut reasons = vec![
            ("kernel_stack", counters.kernel_stack_lost),
            ("user_stack", counters.user_stack_lost),
            ("aggregate_map_full", counters.aggregate_full),
        ];
        match kind {
            ProfilerKind::OnCpu => on_cpu_samples = counters.recorded,
            ProfilerKind::OffCpu => {
                reasons.push(("thread_state", counters.thread_state_lost));
                switches = counters.recorded;
                ends_missed = counters.episode_ends_missed;
                skipped = [
                    ("not_sampled", counters.not_sampled),
                    ("too_short", counters.too_short),
                    ("preempt_excluded", counters.preempt_excluded),
                ]
                .into_iter()
                .map(|(reason, value)| (vec![("reason", reason.to_owned())], value))
                .collect();
            }
        }
        lost.extend(reasons.into_iter().map(|(reason, value)| {
            (
                vec![
                    ("profiler", label.to_owned()),
                    ("reason", reason.to_owned()),
                ],
                value,
            )
        }));
        distinct.push((vec![("profiler", label.to_owned())], distinct_stacks));
    }
    counter(
        e,
        "rover_oncpu_samples",
        "On-CPU samples of target processes recorded.",
        None,
        &[(Labels::new(), on_cpu_samples)],
    )?;
    counter(
        e,
        "rover_samples_lost",
        "Samples (on-CPU) or switches (off-CPU) that lost their kernel or user stack (kept, \
         without it), or that were not recorded at all (aggregate_map_full: more distinct stacks \
         in a drain interval than the maps hold; thread_state: no per-thread state could be \
         allocated).",
        None,
        &lost,
    )?;
    counter(
        e,
        "rover_offcpu_switches",
        "Off-CPU switches recorded: a target thread switched out and back in.",
        None,
        &[(Labels::new(), switches)],
    )?;
    counter(
        e,
        "rover_offcpu_switches_skipped",
        "Off-CPU switches left out as configured (not_sampled: by the sample probability; \
         too_short: under the minimum block time; preempt_excluded: preemptions).",
        None,
        &skipped,
    )?;
    counter(
        e,
        "rover_offcpu_episodes_missed",
        "Off-CPU waits dropped because the switch-in that ended them was never seen.",
        None,
        &[(Labels::new(), ends_missed)],
    )?;
    counter(
        e,
        "rover_distinct_stacks",
        "Distinct (process, user stack, kernel stack) aggregates drained from the kernel, each \
         drain interval counting its own.",
        None,
        &distinct,
    )?;
    gauge(
        e,
        "rover_bpf_stats_enabled",
        "Whether kernel.bpf_stats_enabled is 1: the kernel counts the programs' runs and run \
         time (rover_bpf_program_*) only then, and the agent never turns it on.",
        &[(Labels::new(), i64::from(bpf_stats_enabled))],
    )?;
    if bpf_stats_enabled && !engine.programs.is_empty() {
        let labels = |object: &str, program: &str| {
            vec![
                ("object", object.to_owned()),
                ("program", program.to_owned()),
            ]
        };
        let runs: Vec<(Labels, u64)> = engine
            .programs
            .iter()
            .map(|p| (labels(p.object, &p.program), p.runs))
            .collect();
        let run_time: Vec<(Labels, f64)> = engine
            .programs
            .iter()
            .map(|p| (labels(p.object, &p.program), p.run_time_ns as f64 / 1e9))
            .collect();
        counter(
            e,
            "rover_bpf_program_runs",
            "Runs of the agent's eBPF programs counted by the kernel (while \
             kernel.bpf_stats_enabled is 1).",
            None,
            &runs,
        )?;
        counter(
            e,
            "rover_bpf_program_run_time",
            "Time the kernel spent in the agent's eBPF programs (while \
             kernel.bpf_stats_enabled is 1).",
            Some(&Unit::Seconds),
            &run_time,
        )?;
    }
    Ok(())
}

fn encode_backend(
    e: &mut DescriptorEncoder,
    calls: &CallStats,
    upload: &UploadStats,
) -> std::fmt::Result {
    counter(
        e,
        "rover_backend_calls_answered",
        "Calls the OAP answered.",
        None,
        &[(Labels::new(), calls.answered)],
    )?;
    let failed: Vec<(Labels, u64)> = calls
        .failed
        .iter()
        .map(|(call, count)| (vec![("call", (*call).to_owned())], *count))
        .collect();
    counter(
        e,
        "rover_backend_call_errors",
        "Calls to the OAP that failed (unreachable, refused, an error status), by gRPC method.",
        None,
        &failed,
    )?;
    counter(
        e,
        "rover_upload_windows_dropped",
        "Profiling windows (of one process) dropped from the upload buffer, oldest first, \
         because it was full while the OAP could not take them (rover_rs.upload_buffer).",
        None,
        &[(Labels::new(), upload.batches_dropped)],
    )?;
    counter(
        e,
        "rover_upload_sent",
        "Profiling data the OAP acknowledged (encoded size).",
        Some(&Unit::Bytes),
        &[(Labels::new(), upload.bytes_sent)],
    )?;
    gauge(
        e,
        "rover_upload_buffered_bytes",
        "Profiling data waiting in the upload buffer (encoded size).",
        &[(Labels::new(), upload.bytes_buffered as u64)],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests;
