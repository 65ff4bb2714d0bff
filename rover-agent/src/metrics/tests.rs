use std::collections::BTreeMap;

use super::*;
use crate::bpf::{ProfilerTotals, ProgramRuns};

fn snapshot(bpf_stats_enabled: bool) -> Snapshot {
    Snapshot {
        engine: EngineTotals {
            profilers: vec![ProfilerTotals {
                kind: ProfilerKind::OnCpu,
                counters: Counters {
                    recorded: 990,
                    user_stack_lost: 3,
                    aggregate_full: 7,
                    ..Counters::default()
                },
                distinct_stacks: 42,
            }],
            programs: vec![ProgramRuns {
                object: "oncpu",
                program: "on_cpu_sample".to_owned(),
                runs: 1000,
                run_time_ns: 2_500_000,
            }],
        },
        bpf_stats_enabled,
        frames: FrameCounts {
            symbolized: 500,
            unresolved: 12,
        },
        runs: vec![RunCount {
            profiler: ProfilerKind::OnCpu,
            source: "backend",
            active: 1,
            started: 2,
        }],
        calls: CallStats {
            answered: 9,
            failed: BTreeMap::from([("keepAlive", 1), ("queryTasks", 0)]),
        },
        upload: UploadStats {
            bytes_sent: 4096,
            batches_dropped: 5,
            bytes_buffered: 100,
            ..UploadStats::default()
        },
        processes: ProcessCounts {
            found: 3,
            reported: 2,
        },
    }
}

fn lines(text: &str) -> Vec<&str> {
    text.lines().collect()
}

#[test]
fn counters_and_gauges_carry_their_values_and_labels() {
    let text = encode(snapshot(false)).expect("encodes");
    let lines = lines(&text);
    for expected in [
        "# TYPE rover_oncpu_samples counter",
        "rover_oncpu_samples_total 990",
        "rover_samples_lost_total{profiler=\"ON_CPU\",reason=\"user_stack\"} 3",
        "rover_samples_lost_total{profiler=\"ON_CPU\",reason=\"aggregate_map_full\"} 7",
        // A profiler never loaded is reported with zeros.
        "rover_samples_lost_total{profiler=\"OFF_CPU\",reason=\"thread_state\"} 0",
        "rover_offcpu_switches_total 0",
        "rover_offcpu_switches_skipped_total{reason=\"not_sampled\"} 0",
        "rover_offcpu_episodes_missed_total 0",
        "rover_distinct_stacks_total{profiler=\"ON_CPU\"} 42",
        "rover_distinct_stacks_total{profiler=\"OFF_CPU\"} 0",
        "rover_frames_symbolized_total 500",
        "rover_frames_unresolved_total 12",
        "# TYPE rover_tasks_active gauge",
        "rover_tasks_active{profiler=\"ON_CPU\",source=\"backend\"} 1",
        "rover_tasks_started_total{profiler=\"ON_CPU\",source=\"backend\"} 2",
        "rover_backend_calls_answered_total 9",
        "rover_backend_call_errors_total{call=\"keepAlive\"} 1",
        "rover_backend_call_errors_total{call=\"queryTasks\"} 0",
        "rover_upload_windows_dropped_total 5",
        "# UNIT rover_upload_sent_bytes bytes",
        "rover_upload_sent_bytes_total 4096",
        "rover_upload_buffered_bytes 100",
        "rover_processes_found 3",
        "rover_processes_reported 2",
        "rover_bpf_stats_enabled 0",
    ] {
        assert!(lines.contains(&expected), "no `{expected}` in:\n{text}");
    }
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
}

#[test]
fn every_metric_is_named_rover_and_documented() {
    let text = encode(snapshot(true)).expect("encodes");
    let mut typed = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("name and type");
            assert!(name.starts_with("rover_"), "{line}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            typed.push((name, kind));
        } else if !line.starts_with('#') {
            let name = line
                .split(['{', ' '])
                .next()
                .expect("a sample starts with its name");
            let family = typed
                .iter()
                .find(|(family, kind)| {
                    name == *family
                        || (*kind == "counter" && name.strip_suffix("_total") == Some(family))
                })
                .unwrap_or_else(|| panic!("`{line}` follows no TYPE of its family"));
            assert!(
                family.1 != "counter" || name.ends_with("_total"),
                "a counter's sample ends in _total: {line}"
            );
        }
    }
}

#[test]
fn program_run_time_is_reported_only_while_the_kernel_counts_it() {
    let off = encode(snapshot(false)).expect("encodes");
    assert!(
        !off.lines().any(|line| line.starts_with("rover_bpf_program")
            || line.starts_with("# TYPE rover_bpf_program")),
        "{off}"
    );
    let on = encode(snapshot(true)).expect("encodes");
    let lines = lines(&on);
    for expected in [
        "rover_bpf_stats_enabled 1",
        "rover_bpf_program_runs_total{object=\"oncpu\",program=\"on_cpu_sample\"} 1000",
        "# UNIT rover_bpf_program_run_time_seconds seconds",
        "rover_bpf_program_run_time_seconds_total{object=\"oncpu\",program=\"on_cpu_sample\"} 0.0025",
    ] {
        assert!(lines.contains(&expected), "no `{expected}` in:\n{on}");
    }
}
