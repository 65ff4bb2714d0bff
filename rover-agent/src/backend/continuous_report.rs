//! What continuous profiling sends the OAP: the `ContinuousProfilingReport` of a fired trigger,
//! the task id its reply carries, and the checkers' current values as meters (Rover's names,
//! so the OAP's `continuous_profiling_*` rules pick them up).
//!
//! Pure functions: the caller owns the clock, the processes and the gRPC calls.

use std::collections::BTreeMap;
use std::time::Duration;

use rover_proto::v3::{
    Commands, ContinuousNetworkProfilingTask, ContinuousOffCpuProfilingTask,
    ContinuousOnCpuProfilingTask, ContinuousProfilingCause, ContinuousProfilingReport,
    ContinuousProfilingSingleValueCause, ContinuousProfilingTriggeredMonitorType, Label, MeterData,
    MeterDataCollection, MeterSingleValue, continuous_profiling_cause, continuous_profiling_report,
    meter_data,
};

use super::{Monitor, ProfilingTarget};
use crate::process::ProcessEntity;

/// The only command a `reportProfilingTask` reply carries.
const REPORT_TASK: &str = "ContinuousProfilingReportTask";
const TASK_ID: &str = "TaskId";

/// Why a policy item fired: its threshold and the value that reached it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TriggerCause {
    pub monitor: Monitor,
    pub threshold: f64,
    pub current: f64,
}

fn monitor_type(monitor: Monitor) -> ContinuousProfilingTriggeredMonitorType {
    match monitor {
        Monitor::ProcessCpu => ContinuousProfilingTriggeredMonitorType::ProcessCpu,
        Monitor::ProcessThreadCount => ContinuousProfilingTriggeredMonitorType::ProcessThreadCount,
        Monitor::SystemLoad => ContinuousProfilingTriggeredMonitorType::SystemLoad,
        Monitor::HttpErrorRate => ContinuousProfilingTriggeredMonitorType::HttpErrorRate,
        Monitor::HttpAvgResponseTime => {
            ContinuousProfilingTriggeredMonitorType::HttpAvgResponseTime
        }
    }
}

/// The report of a fired trigger: the process's entity, the causes, how long the run lasts
/// (whole seconds, rounded up, at most `i32::MAX`) and what it profiles. NETWORK gets an empty
/// URI list (the checks that would fill it are not supported).
pub fn encode_report(
    entity: &ProcessEntity,
    causes: &[TriggerCause],
    duration: Duration,
    target: ProfilingTarget,
) -> ContinuousProfilingReport {
    let secs = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    let target_task = match target {
        ProfilingTarget::OnCpu => {
            continuous_profiling_report::TargetTask::OnCpu(ContinuousOnCpuProfilingTask {})
        }
        ProfilingTarget::OffCpu => {
            continuous_profiling_report::TargetTask::OffCpu(ContinuousOffCpuProfilingTask {})
        }
        ProfilingTarget::Network => {
            continuous_profiling_report::TargetTask::Network(ContinuousNetworkProfilingTask {
                sampling_uri_regexes: Vec::new(),
            })
        }
    };
    ContinuousProfilingReport {
        layer: entity.layer.clone(),
        service_name: entity.service_name.clone(),
        instance_name: entity.instance_name.clone(),
        process_name: entity.process_name.clone(),
        causes: causes
            .iter()
            .map(|cause| ContinuousProfilingCause {
                r#type: monitor_type(cause.monitor).into(),
                cause: Some(continuous_profiling_cause::Cause::SingleValue(
                    ContinuousProfilingSingleValueCause {
                        threshold: cause.threshold,
                        current: cause.current,
                    },
                )),
            })
            .collect(),
        duration: i32::try_from(secs).unwrap_or(i32::MAX),
        target_task: Some(target_task),
    }
}

/// Why a `reportProfilingTask` reply gave no task id: logged, and the trigger is tried again at
/// the next check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReportReplyError {
    #[error("the reply to reportProfilingTask is empty (expected one {REPORT_TASK} command)")]
    Empty,
    #[error("the reply to reportProfilingTask has {count} commands (expected one {REPORT_TASK})")]
    SeveralCommands { count: usize },
    #[error(
        "unexpected command {name:?} in the reply to reportProfilingTask (expected {REPORT_TASK})"
    )]
    UnknownCommand { name: String },
    #[error("{REPORT_TASK}: missing argument {TASK_ID}")]
    MissingTaskId,
    #[error("{REPORT_TASK}: {TASK_ID} {value:?} is empty")]
    EmptyTaskId { value: String },
}

/// The task id of a `reportProfilingTask` reply: exactly one `ContinuousProfilingReportTask`
/// command with a non-blank `TaskId` (the first one, as Rover reads it).
pub fn parse_report_reply(reply: &Commands) -> Result<String, ReportReplyError> {
    let command = match reply.commands.as_slice() {
        [] => return Err(ReportReplyError::Empty),
        [command] => command,
        more => return Err(ReportReplyError::SeveralCommands { count: more.len() }),
    };
    if command.command != REPORT_TASK {
        return Err(ReportReplyError::UnknownCommand {
            name: command.command.clone(),
        });
    }
    let task_id = command
        .args
        .iter()
        .find(|arg| arg.key == TASK_ID)
        .ok_or(ReportReplyError::MissingTaskId)?;
    if task_id.value.trim().is_empty() {
        return Err(ReportReplyError::EmptyTaskId {
            value: task_id.value.clone(),
        });
    }
    Ok(task_id.value.clone())
}

/// One checker value of one process, for the meters.
#[derive(Clone, Copy, Debug)]
pub struct MeterValue<'a> {
    pub entity: &'a ProcessEntity,
    pub monitor: Monitor,
    pub value: f64,
}

/// `<prefix>_<monitor in lower case>`: `rover_con_p_process_cpu`, as Rover names them.
pub fn meter_name(prefix: &str, monitor: Monitor) -> String {
    format!("{prefix}_{}", monitor.wire_name().to_ascii_lowercase())
}

/// The values as `MeterReportService.collectBatch` takes them: one collection per (service,
/// instance), sorted by them, values in the given order, each a single value labelled
/// `process_name` and `layer` and stamped with `timestamp_ms` (epoch milliseconds).
pub fn encode_meters<'a>(
    prefix: &str,
    timestamp_ms: i64,
    values: impl IntoIterator<Item = MeterValue<'a>>,
) -> Vec<MeterDataCollection> {
    let mut by_instance: BTreeMap<(&str, &str), Vec<MeterData>> = BTreeMap::new();
    for MeterValue {
        entity,
        monitor,
        value,
    } in values
    {
        by_instance
            .entry((&entity.service_name, &entity.instance_name))
            .or_default()
            .push(MeterData {
                metric: Some(meter_data::Metric::SingleValue(MeterSingleValue {
                    name: meter_name(prefix, monitor),
                    labels: vec![
                        Label {
                            name: "process_name".into(),
                            value: entity.process_name.clone(),
                        },
                        Label {
                            name: "layer".into(),
                            value: entity.layer.clone(),
                        },
                    ],
                    value,
                })),
                service: entity.service_name.clone(),
                service_instance: entity.instance_name.clone(),
                timestamp: timestamp_ms,
            });
    }
    by_instance
        .into_values()
        .map(|meter_data| MeterDataCollection { meter_data })
        .collect()
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use rover_proto::v3::{Command, KeyStringValuePair};

    use super::*;
    use crate::process::ProcessOrigin;

    fn entity(service: &str, instance: &str, process: &str) -> ProcessEntity {
        ProcessEntity {
            pid: 42,
            origin: ProcessOrigin::Kubernetes,
            layer: "K8S_SERVICE".into(),
            service_name: service.into(),
            instance_name: instance.into(),
            process_name: process.into(),
            labels: vec!["k8s-service".into()],
            properties: Vec::new(),
        }
    }

    #[test]
    fn a_report_carries_the_entity_causes_duration_and_target() {
        let orders = entity("shop::orders.default", "orders-7d9f", "java");
        let report = encode_report(
            &orders,
            &[
                TriggerCause {
                    monitor: Monitor::ProcessCpu,
                    threshold: 50.0,
                    current: 97.5,
                },
                TriggerCause {
                    monitor: Monitor::SystemLoad,
                    threshold: 2.0,
                    current: 3.25,
                },
            ],
            Duration::from_secs(600),
            ProfilingTarget::OnCpu,
        );
        assert_eq!(
            report,
            ContinuousProfilingReport {
                layer: "K8S_SERVICE".into(),
                service_name: "shop::orders.default".into(),
                instance_name: "orders-7d9f".into(),
                process_name: "java".into(),
                causes: vec![
                    ContinuousProfilingCause {
                        r#type: 0,
                        cause: Some(continuous_profiling_cause::Cause::SingleValue(
                            ContinuousProfilingSingleValueCause {
                                threshold: 50.0,
                                current: 97.5,
                            }
                        )),
                    },
                    ContinuousProfilingCause {
                        r#type: 2,
                        cause: Some(continuous_profiling_cause::Cause::SingleValue(
                            ContinuousProfilingSingleValueCause {
                                threshold: 2.0,
                                current: 3.25,
                            }
                        )),
                    },
                ],
                duration: 600,
                target_task: Some(continuous_profiling_report::TargetTask::OnCpu(
                    ContinuousOnCpuProfilingTask {}
                )),
            }
        );
    }

    /// The wire numbers of upstream's enum (ProcessCPU=0 … HTTPAvgResponseTime=4), and the
    /// one-of field numbers of the targets (onCPU=7, offCPU=8, network=9), on encoded bytes.
    #[test]
    fn wire_numbers_are_upstreams() {
        for (monitor, number) in [
            (Monitor::ProcessCpu, 0),
            (Monitor::ProcessThreadCount, 1),
            (Monitor::SystemLoad, 2),
            (Monitor::HttpErrorRate, 3),
            (Monitor::HttpAvgResponseTime, 4),
        ] {
            assert_eq!(i32::from(monitor_type(monitor)), number, "{monitor:?}");
        }
        let process = entity("s", "i", "p");
        for (target, tag) in [
            (ProfilingTarget::OnCpu, 7u8),
            (ProfilingTarget::OffCpu, 8),
            (ProfilingTarget::Network, 9),
        ] {
            let bytes =
                encode_report(&process, &[], Duration::from_secs(1), target).encode_to_vec();
            // duration (field 6, varint 1) then the empty target message (field N, length 0).
            assert!(
                bytes.ends_with(&[6 << 3, 1, tag << 3 | 2, 0]),
                "{target:?}: {bytes:?}"
            );
        }
    }

    #[test]
    fn the_thread_count_cause_and_the_off_cpu_target() {
        let report = encode_report(
            &entity("s", "i", "p"),
            &[TriggerCause {
                monitor: Monitor::ProcessThreadCount,
                threshold: 100.0,
                current: 128.0,
            }],
            Duration::from_secs(60),
            ProfilingTarget::OffCpu,
        );
        assert_eq!(report.causes[0].r#type, 1);
        assert_eq!(
            report.target_task,
            Some(continuous_profiling_report::TargetTask::OffCpu(
                ContinuousOffCpuProfilingTask {}
            ))
        );
    }

    #[test]
    fn the_duration_is_whole_seconds_rounded_up_and_bounded() {
        let duration =
            |d| encode_report(&entity("s", "i", "p"), &[], d, ProfilingTarget::OnCpu).duration;
        assert_eq!(duration(Duration::from_secs(600)), 600);
        assert_eq!(duration(Duration::from_millis(1500)), 2);
        assert_eq!(duration(Duration::from_millis(1)), 1);
        assert_eq!(duration(Duration::from_secs(u64::from(u32::MAX))), i32::MAX);
        assert_eq!(duration(Duration::MAX), i32::MAX);
    }

    fn reply(commands: &[(&str, &[(&str, &str)])]) -> Commands {
        Commands {
            commands: commands
                .iter()
                .map(|(name, args)| Command {
                    command: (*name).into(),
                    args: args
                        .iter()
                        .map(|(key, value)| KeyStringValuePair {
                            key: (*key).into(),
                            value: (*value).into(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_reply_gives_the_task_id() {
        assert_eq!(
            parse_report_reply(&reply(&[(
                REPORT_TASK,
                &[
                    ("SerialNumber", "1"),
                    ("TaskId", "c0ffee"),
                    ("TaskId", "later")
                ]
            )])),
            Ok("c0ffee".into())
        );
    }

    #[test]
    fn an_empty_or_malformed_reply_is_a_typed_error() {
        let cases: [(Commands, ReportReplyError, &str); 6] = [
            (
                Commands::default(),
                ReportReplyError::Empty,
                "the reply to reportProfilingTask is empty (expected one \
                 ContinuousProfilingReportTask command)",
            ),
            (
                reply(&[
                    (REPORT_TASK, &[("TaskId", "a")]),
                    (REPORT_TASK, &[("TaskId", "b")]),
                ]),
                ReportReplyError::SeveralCommands { count: 2 },
                "the reply to reportProfilingTask has 2 commands (expected one \
                 ContinuousProfilingReportTask)",
            ),
            (
                reply(&[("EBPFProfilingTaskQuery", &[("TaskId", "a")])]),
                ReportReplyError::UnknownCommand {
                    name: "EBPFProfilingTaskQuery".into(),
                },
                "unexpected command \"EBPFProfilingTaskQuery\" in the reply to \
                 reportProfilingTask (expected ContinuousProfilingReportTask)",
            ),
            (
                reply(&[(REPORT_TASK, &[])]),
                ReportReplyError::MissingTaskId,
                "ContinuousProfilingReportTask: missing argument TaskId",
            ),
            (
                reply(&[(REPORT_TASK, &[("TaskId", "")])]),
                ReportReplyError::EmptyTaskId { value: "".into() },
                "ContinuousProfilingReportTask: TaskId \"\" is empty",
            ),
            (
                reply(&[(REPORT_TASK, &[("TaskId", "  ")])]),
                ReportReplyError::EmptyTaskId { value: "  ".into() },
                "ContinuousProfilingReportTask: TaskId \"  \" is empty",
            ),
        ];
        for (reply, error, message) in cases {
            let parsed = parse_report_reply(&reply);
            assert_eq!(parsed, Err(error));
            assert_eq!(parsed.expect_err("error").to_string(), message);
        }
    }

    fn single(data: &MeterData) -> (&str, Vec<(&str, &str)>, f64) {
        let Some(meter_data::Metric::SingleValue(value)) = &data.metric else {
            panic!("not a single value: {data:?}");
        };
        (
            value.name.as_str(),
            value
                .labels
                .iter()
                .map(|l| (l.name.as_str(), l.value.as_str()))
                .collect(),
            value.value,
        )
    }

    #[test]
    fn meters_have_rovers_names_and_labels_grouped_by_instance() {
        let a1 = entity("shop::orders", "orders-1", "java");
        let a2 = entity("shop::orders", "orders-1", "envoy");
        let b = entity("shop::cart", "cart-1", "node");
        let values = [
            MeterValue {
                entity: &a1,
                monitor: Monitor::ProcessCpu,
                value: 97.5,
            },
            MeterValue {
                entity: &b,
                monitor: Monitor::ProcessThreadCount,
                value: 12.0,
            },
            MeterValue {
                entity: &a2,
                monitor: Monitor::SystemLoad,
                value: 1.25,
            },
        ];
        let batch = encode_meters("rover_con_p", 1_700_000_000_123, values);
        assert_eq!(batch.len(), 2);
        // Sorted by (service, instance): cart before orders.
        let [cart, orders] = &batch[..] else {
            unreachable!()
        };
        assert_eq!(cart.meter_data.len(), 1);
        assert_eq!(
            single(&cart.meter_data[0]),
            (
                "rover_con_p_process_thread_count",
                vec![("process_name", "node"), ("layer", "K8S_SERVICE")],
                12.0
            )
        );
        assert_eq!(
            orders
                .meter_data
                .iter()
                .map(|d| single(d))
                .collect::<Vec<_>>(),
            [
                (
                    "rover_con_p_process_cpu",
                    vec![("process_name", "java"), ("layer", "K8S_SERVICE")],
                    97.5
                ),
                (
                    "rover_con_p_system_load",
                    vec![("process_name", "envoy"), ("layer", "K8S_SERVICE")],
                    1.25
                ),
            ]
        );
        for data in batch.iter().flat_map(|c| &c.meter_data) {
            assert_eq!(data.timestamp, 1_700_000_000_123);
        }
        assert_eq!(
            (
                orders.meter_data[0].service.as_str(),
                orders.meter_data[0].service_instance.as_str()
            ),
            ("shop::orders", "orders-1")
        );
        assert!(encode_meters("p", 0, []).is_empty());
    }

    #[test]
    fn meter_names_follow_the_prefix() {
        assert_eq!(
            meter_name("custom", Monitor::ProcessCpu),
            "custom_process_cpu"
        );
        assert_eq!(
            meter_name("rover_con_p", Monitor::ProcessThreadCount),
            "rover_con_p_process_thread_count"
        );
        assert_eq!(
            meter_name("rover_con_p", Monitor::SystemLoad),
            "rover_con_p_system_load"
        );
    }
}
