//! The OAP's profiling tasks (`EBPFProfilingService.queryTasks` replies) parsed into typed
//! commands, the update-time watermark the next query sends, and when a task should run.
//!
//! Everything here is pure: the caller owns the clock, the process table and the runner. Every
//! argument arrives as a string; a bad one is an error naming the argument and its value, so the
//! caller can log one line and skip that command without losing the rest of the reply.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rover_proto::v3::{Command, Commands, EbpfProfilingTaskQuery};

use super::{Backend, Error};

/// The only command name `queryTasks` replies carry.
const TASK_QUERY: &str = "EBPFProfilingTaskQuery";

const TASK_ID: &str = "TaskId";
const PROCESS_ID: &str = "ProcessId";
const TASK_UPDATE_TIME: &str = "TaskUpdateTime";
const TASK_START_TIME: &str = "TaskStartTime";
const TRIGGER_TYPE: &str = "TriggerType";
const TARGET_TYPE: &str = "TargetType";
const EXTENSION_CONFIG: &str = "ExtensionConfigJSON";
const FIXED_TRIGGER_DURATION: &str = "FixedTriggerDuration";

/// What a task profiles (`TargetType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProfilingTarget {
    /// `ON_CPU`: stacks sampled while running.
    OnCpu,
    /// `OFF_CPU`: stacks that blocked, weighted by time off CPU.
    OffCpu,
    /// `NETWORK`: network sampling, configured by `ExtensionConfigJSON`.
    Network,
}

/// How a task is started (`TriggerType`). The OAP only sends `FIXED_TIME` to queried agents;
/// kept as a type because a new task with the same processes, target and trigger replaces the
/// running one, so the runner keys on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskTrigger {
    /// `FIXED_TIME`: run from `TaskStartTime` for `FixedTriggerDuration`.
    FixedTime,
}

/// One `EBPFProfilingTaskQuery` command, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfilingTaskCommand {
    /// `TaskId`; profiling data is uploaded under it. A re-sent id extends that task.
    pub task_id: String,
    /// `ProcessId`: backend process ids (not PIDs), at least one, without duplicates, in the
    /// OAP's order. ON_CPU/OFF_CPU tasks name one process each.
    pub process_ids: Vec<String>,
    /// `TaskUpdateTime`, epoch milliseconds (≥ 0): what [`TaskWatermark::observe`] advances to.
    /// Kept as the wire's `int64` because it goes back as `latestUpdateTime`.
    pub update_time_ms: i64,
    /// `TaskStartTime`: when profiling should begin.
    pub start_time: SystemTime,
    /// `FixedTriggerDuration` (≥ 1 s): how long a run lasts.
    pub duration: Duration,
    /// `TargetType`.
    pub target: ProfilingTarget,
    /// `TriggerType`.
    pub trigger: TaskTrigger,
    /// `ExtensionConfigJSON` when it is a JSON object; `None` when it is absent, empty or `null`
    /// (NETWORK then samples with its defaults), or was malformed on a CPU target (see `warning`).
    pub extension_config: Option<serde_json::Value>,
    /// A problem that did not stop the task, for the caller to log as a warning. Only
    /// [`TaskCommandError::IgnoredExtensionConfig`] today: the JSON is only read by NETWORK
    /// tasks, so a malformed one must not cost an ON_CPU/OFF_CPU task (for NETWORK it is an
    /// error).
    pub warning: Option<TaskCommandError>,
}

/// Why a command of a `queryTasks` reply was not turned into a [`ProfilingTaskCommand`]. The
/// message names the command, the task id when it was read, the argument and its value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TaskCommandError {
    /// Not an `EBPFProfilingTaskQuery`: log once and skip it.
    #[error("unknown command {name:?} in a task query reply (expected {TASK_QUERY})")]
    UnknownCommand { name: String },
    /// A required argument is absent.
    #[error("{}: missing argument {arg}", context(.task_id))]
    MissingArg {
        task_id: Option<String>,
        arg: &'static str,
    },
    /// An argument's value is malformed or not supported.
    #[error("{}: {arg} {value:?} {reason}", context(.task_id))]
    InvalidArg {
        task_id: Option<String>,
        arg: &'static str,
        value: String,
        reason: String,
    },
    /// Warning only, never returned as `Err`: see [`ProfilingTaskCommand::warning`].
    #[error(
        "{TASK_QUERY} task {task_id}: {EXTENSION_CONFIG} {value:?} {reason}; ignored, \
         only NETWORK tasks read it"
    )]
    IgnoredExtensionConfig {
        task_id: String,
        value: String,
        reason: String,
    },
}

/// `EBPFProfilingTaskQuery task <id>` once the id is known, the bare command name before.
fn context(task_id: &Option<String>) -> String {
    match task_id {
        Some(id) => format!("{TASK_QUERY} task {id}"),
        None => TASK_QUERY.to_owned(),
    }
}

/// Parses every command of a `queryTasks` reply, in order, one result each, so one bad command
/// costs only itself.
pub fn parse_task_commands(
    reply: &Commands,
) -> Vec<Result<ProfilingTaskCommand, TaskCommandError>> {
    reply.commands.iter().map(parse_task_command).collect()
}

fn parse_task_command(command: &Command) -> Result<ProfilingTaskCommand, TaskCommandError> {
    if command.command != TASK_QUERY {
        return Err(TaskCommandError::UnknownCommand {
            name: command.command.clone(),
        });
    }
    let args = Args {
        command,
        task_id: None,
    };
    let task_id = args.required(TASK_ID)?;
    if task_id.trim().is_empty() {
        return Err(args.invalid(TASK_ID, task_id, "is empty"));
    }
    // From here on every error names the task.
    let args = Args {
        command,
        task_id: Some(task_id.to_owned()),
    };
    let process_ids = args.process_ids()?;
    let update_time_ms = args.epoch_ms(TASK_UPDATE_TIME)?;
    let start_ms = args.epoch_ms(TASK_START_TIME)?;
    let trigger = args.trigger()?;
    let target = args.target()?;
    let duration = args.duration(start_ms)?;
    let start_time = epoch_ms_to_time(start_ms).ok_or_else(|| {
        args.invalid(
            TASK_START_TIME,
            &start_ms.to_string(),
            "is not a representable time",
        )
    })?;
    let (extension_config, warning) = args.extension_config(task_id, target)?;
    Ok(ProfilingTaskCommand {
        task_id: task_id.to_owned(),
        process_ids,
        update_time_ms,
        start_time,
        duration,
        target,
        trigger,
        extension_config,
        warning,
    })
}

fn epoch_ms_to_time(ms: i64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(u64::try_from(ms).ok()?))
}

/// A command's arguments, and the task id for error messages once it is known.
struct Args<'a> {
    command: &'a Command,
    task_id: Option<String>,
}

impl Args<'_> {
    /// The first value under `key` (as Rover reads them); unknown keys are never looked at.
    fn get(&self, key: &str) -> Option<&str> {
        self.command
            .args
            .iter()
            .find(|arg| arg.key == key)
            .map(|arg| arg.value.as_str())
    }

    fn required(&self, key: &'static str) -> Result<&str, TaskCommandError> {
        self.get(key).ok_or_else(|| TaskCommandError::MissingArg {
            task_id: self.task_id.clone(),
            arg: key,
        })
    }

    fn invalid(
        &self,
        arg: &'static str,
        value: &str,
        reason: impl Into<String>,
    ) -> TaskCommandError {
        TaskCommandError::InvalidArg {
            task_id: self.task_id.clone(),
            arg,
            value: value.to_owned(),
            reason: reason.into(),
        }
    }

    /// Comma-separated; spaces around ids and empty entries (`"a,,b,"`) are tolerated, a
    /// repeated id is kept once so a process is never profiled twice by one task.
    fn process_ids(&self) -> Result<Vec<String>, TaskCommandError> {
        let raw = self.required(PROCESS_ID)?;
        let mut seen = HashSet::new();
        let ids: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|id| !id.is_empty() && seen.insert(*id))
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return Err(self.invalid(PROCESS_ID, raw, "names no process"));
        }
        Ok(ids)
    }

    /// Decimal digits only (the OAP writes a Java `long`), non-negative and within `i64`, so the
    /// value can go back on the wire as `int64`.
    fn epoch_ms(&self, key: &'static str) -> Result<i64, TaskCommandError> {
        let raw = self.required(key)?;
        let digits = raw.strip_prefix('-').unwrap_or(raw);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(key, raw, "is not epoch milliseconds"));
        }
        if digits.len() != raw.len() {
            return Err(self.invalid(key, raw, "is negative, not epoch milliseconds"));
        }
        raw.parse::<i64>()
            .map_err(|_| self.invalid(key, raw, "is too large for epoch milliseconds"))
    }

    fn trigger(&self) -> Result<TaskTrigger, TaskCommandError> {
        match self.required(TRIGGER_TYPE)? {
            "FIXED_TIME" => Ok(TaskTrigger::FixedTime),
            other => Err(self.invalid(TRIGGER_TYPE, other, "is not supported (only FIXED_TIME)")),
        }
    }

    fn target(&self) -> Result<ProfilingTarget, TaskCommandError> {
        match self.required(TARGET_TYPE)? {
            "ON_CPU" => Ok(ProfilingTarget::OnCpu),
            "OFF_CPU" => Ok(ProfilingTarget::OffCpu),
            "NETWORK" => Ok(ProfilingTarget::Network),
            other => Err(self.invalid(
                TARGET_TYPE,
                other,
                "is not supported (ON_CPU, OFF_CPU or NETWORK)",
            )),
        }
    }

    /// Whole seconds, at least one; the window `start + duration` must stay within `i64`
    /// milliseconds, the `currentTime` the upload sends.
    fn duration(&self, start_ms: i64) -> Result<Duration, TaskCommandError> {
        let raw = self.required(FIXED_TRIGGER_DURATION)?;
        if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.invalid(
                FIXED_TRIGGER_DURATION,
                raw,
                "is not a whole number of seconds",
            ));
        }
        let secs = raw.parse::<u64>().ok().filter(|&secs| {
            i64::try_from(secs)
                .ok()
                .and_then(|secs| secs.checked_mul(1000))
                .and_then(|ms| ms.checked_add(start_ms))
                .is_some()
        });
        match secs {
            Some(0) => Err(self.invalid(FIXED_TRIGGER_DURATION, raw, "is not at least 1 second")),
            Some(secs) => Ok(Duration::from_secs(secs)),
            None => Err(self.invalid(
                FIXED_TRIGGER_DURATION,
                raw,
                "is too large: the task would end past the largest epoch millisecond",
            )),
        }
    }

    /// Absent, blank or `null` → `None`; a JSON object → kept. Anything else is an error for
    /// NETWORK (it would sample with settings nobody asked for) and a warning for the CPU
    /// targets, which never read it.
    fn extension_config(
        &self,
        task_id: &str,
        target: ProfilingTarget,
    ) -> Result<(Option<serde_json::Value>, Option<TaskCommandError>), TaskCommandError> {
        let Some(raw) = self.get(EXTENSION_CONFIG) else {
            return Ok((None, None));
        };
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed == "null" {
            return Ok((None, None));
        }
        let reason = match serde_json::from_str::<serde_json::Value>(trimmed) {
            Ok(value) if value.is_object() => return Ok((Some(value), None)),
            Ok(_) => "is not a JSON object".to_owned(),
            Err(error) => format!("is not JSON ({error})"),
        };
        match target {
            ProfilingTarget::Network => Err(self.invalid(EXTENSION_CONFIG, raw, reason)),
            ProfilingTarget::OnCpu | ProfilingTarget::OffCpu => Ok((
                None,
                Some(TaskCommandError::IgnoredExtensionConfig {
                    task_id: task_id.to_owned(),
                    value: raw.to_owned(),
                    reason,
                }),
            )),
        }
    }
}

/// What to do with a task at a given moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskSchedule {
    /// `TaskStartTime` is this far in the future: sleep, then ask again (Rover starts at once,
    /// which profiles before the window the user chose).
    Wait(Duration),
    /// The window is open: start now and profile for this long. Always the full
    /// `FixedTriggerDuration`, counted from when profiling actually starts (the OAP's run lasts
    /// that long from its real start, which the upload reports as `profilingStartTime`), not
    /// the remainder of the window.
    RunFor(Duration),
    /// `now ≥ TaskStartTime + FixedTriggerDuration`: too late, skip it.
    Expired,
}

impl ProfilingTaskCommand {
    /// Where `now` falls in the task's window `[start, start + duration)`.
    pub fn schedule(&self, now: SystemTime) -> TaskSchedule {
        if let Ok(wait) = self.start_time.duration_since(now)
            && !wait.is_zero()
        {
            return TaskSchedule::Wait(wait);
        }
        // Parsed commands always have a representable end; a window without one never closes.
        match self.start_time.checked_add(self.duration) {
            Some(end) if now >= end => TaskSchedule::Expired,
            _ => TaskSchedule::RunFor(self.duration),
        }
    }
}

/// The `latestUpdateTime` of the next `queryTasks`: the OAP returns only tasks updated after it.
///
/// Starts at 0 (everything). The caller [`observe`](Self::observe)s only the commands it
/// handled; a command it could not place yet (its processes are not known locally) or could not
/// parse leaves the watermark alone, so the OAP sends it again (a malformed one on every poll,
/// until a newer handled task passes it). A skipped command older than a handled one in the same
/// reply is still passed over, as the OAP only compares update times.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskWatermark {
    latest_ms: i64,
}

impl TaskWatermark {
    /// Advances to `command`'s `TaskUpdateTime` if it is newer; never goes back.
    pub fn observe(&mut self, command: &ProfilingTaskCommand) {
        self.latest_ms = self.latest_ms.max(command.update_time_ms);
    }

    /// The value for `EBPFProfilingTaskQuery.latestUpdateTime`.
    pub fn latest_ms(&self) -> i64 {
        self.latest_ms
    }
}

/// One `queryTasks`: the tasks updated after `watermark`, parsed (each may have failed).
pub async fn query_tasks(
    backend: &Backend,
    agent_id: &str,
    watermark: &TaskWatermark,
) -> Result<Vec<Result<ProfilingTaskCommand, TaskCommandError>>, Error> {
    let reply = backend
        .profiling()
        .query_tasks(EbpfProfilingTaskQuery {
            rover_instance_id: agent_id.to_owned(),
            latest_update_time: watermark.latest_ms(),
        })
        .await;
    let reply = backend.outcome("queryTasks", reply)?.into_inner();
    Ok(parse_task_commands(&reply))
}

#[cfg(test)]
pub(super) mod tests {
    use rover_proto::v3::KeyStringValuePair;

    use super::*;

    const START_MS: i64 = 1_700_000_000_000;

    /// A command as the OAP sends it (also the continuous-profiling replies' tests').
    pub(in crate::backend) fn command(name: &str, args: &[(&str, &str)]) -> Command {
        Command {
            command: name.to_owned(),
            args: args
                .iter()
                .map(|(key, value)| KeyStringValuePair {
                    key: (*key).to_owned(),
                    value: (*value).to_owned(),
                })
                .collect(),
        }
    }

    /// A complete, valid ON_CPU command as the OAP sends it.
    fn good_args() -> Vec<(&'static str, &'static str)> {
        vec![
            ("SerialNumber", "d1b1c0de-0000"),
            ("TaskId", "7f3c"),
            ("ProcessId", "p1"),
            ("TaskUpdateTime", "1700000000500"),
            ("TaskStartTime", "1700000000000"),
            ("TriggerType", "FIXED_TIME"),
            ("TargetType", "ON_CPU"),
            ("ExtensionConfigJSON", "null"),
            ("FixedTriggerDuration", "60"),
        ]
    }

    /// `good_args` with `key` set to `value`, or removed when `None`.
    fn with(key: &'static str, value: Option<&'static str>) -> Command {
        let mut args = good_args();
        args.retain(|(k, _)| *k != key);
        args.extend(value.map(|value| (key, value)));
        command(TASK_QUERY, &args)
    }

    fn parse(command: &Command) -> Result<ProfilingTaskCommand, TaskCommandError> {
        parse_task_command(command)
    }

    fn error(command: &Command) -> String {
        match parse(command) {
            Ok(parsed) => panic!("expected an error, parsed {parsed:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn at_ms(ms: i64) -> SystemTime {
        epoch_ms_to_time(ms).expect("test time")
    }

    #[test]
    fn full_command_parses_every_argument() {
        let parsed = parse(&command(TASK_QUERY, &good_args())).expect("valid");
        assert_eq!(
            parsed,
            ProfilingTaskCommand {
                task_id: "7f3c".into(),
                process_ids: vec!["p1".into()],
                update_time_ms: 1_700_000_000_500,
                start_time: at_ms(START_MS),
                duration: Duration::from_secs(60),
                target: ProfilingTarget::OnCpu,
                trigger: TaskTrigger::FixedTime,
                extension_config: None,
                warning: None,
            }
        );
    }

    #[test]
    fn unknown_args_and_serial_number_are_ignored() {
        let mut args = good_args();
        args.retain(|(k, _)| *k != "SerialNumber");
        args.push(("SomethingNew", "whatever"));
        assert!(parse(&command(TASK_QUERY, &args)).is_ok());
    }

    #[test]
    fn the_first_of_repeated_args_wins() {
        let mut args = good_args();
        args.push(("TaskId", "later"));
        assert_eq!(
            parse(&command(TASK_QUERY, &args)).expect("valid").task_id,
            "7f3c"
        );
    }

    #[test]
    fn targets() {
        for (raw, target) in [
            ("ON_CPU", ProfilingTarget::OnCpu),
            ("OFF_CPU", ProfilingTarget::OffCpu),
            ("NETWORK", ProfilingTarget::Network),
        ] {
            assert_eq!(
                parse(&with("TargetType", Some(raw))).expect(raw).target,
                target
            );
        }
    }

    #[test]
    fn each_missing_required_arg_is_named() {
        for arg in [
            PROCESS_ID,
            TASK_UPDATE_TIME,
            TASK_START_TIME,
            TRIGGER_TYPE,
            TARGET_TYPE,
            FIXED_TRIGGER_DURATION,
        ] {
            let without = with(arg, None);
            assert_eq!(
                parse(&without),
                Err(TaskCommandError::MissingArg {
                    task_id: Some("7f3c".into()),
                    arg,
                }),
            );
            assert_eq!(
                error(&without),
                format!("EBPFProfilingTaskQuery task 7f3c: missing argument {arg}")
            );
        }
    }

    #[test]
    fn missing_or_empty_task_id_has_no_task_in_the_message() {
        assert_eq!(
            error(&with("TaskId", None)),
            "EBPFProfilingTaskQuery: missing argument TaskId"
        );
        assert_eq!(
            error(&with("TaskId", Some(" "))),
            r#"EBPFProfilingTaskQuery: TaskId " " is empty"#
        );
    }

    #[test]
    fn process_ids_are_trimmed_deduplicated_and_never_empty() {
        assert_eq!(
            parse(&with("ProcessId", Some(" a , b,,a, c ,")))
                .expect("valid")
                .process_ids,
            ["a", "b", "c"]
        );
        for empty in ["", " ", ",", " , ,"] {
            assert_eq!(
                error(&with("ProcessId", Some(empty))),
                format!("EBPFProfilingTaskQuery task 7f3c: ProcessId {empty:?} names no process")
            );
        }
    }

    #[test]
    fn epoch_milliseconds_formats() {
        for arg in [TASK_UPDATE_TIME, TASK_START_TIME] {
            let set = |value| with(arg, Some(value));
            assert!(parse(&set("0")).is_ok(), "{arg} 0");
            for (value, reason) in [
                ("abc", "is not epoch milliseconds"),
                ("", "is not epoch milliseconds"),
                ("-", "is not epoch milliseconds"),
                ("12.5", "is not epoch milliseconds"),
                (" 12", "is not epoch milliseconds"),
                ("+12", "is not epoch milliseconds"),
                ("1e3", "is not epoch milliseconds"),
                ("-1", "is negative, not epoch milliseconds"),
                ("9223372036854775808", "is too large for epoch milliseconds"),
                (
                    "99999999999999999999999",
                    "is too large for epoch milliseconds",
                ),
            ] {
                assert_eq!(
                    error(&set(value)),
                    format!("EBPFProfilingTaskQuery task 7f3c: {arg} {value:?} {reason}")
                );
            }
        }
        // The largest int64 is accepted for the update time (it only goes back on the wire).
        assert_eq!(
            parse(&with("TaskUpdateTime", Some("9223372036854775807")))
                .expect("valid")
                .update_time_ms,
            i64::MAX
        );
    }

    #[test]
    fn the_brief_example_message() {
        assert_eq!(
            error(&with("TaskStartTime", Some("abc"))),
            r#"EBPFProfilingTaskQuery task 7f3c: TaskStartTime "abc" is not epoch milliseconds"#
        );
    }

    #[test]
    fn only_fixed_time_triggers() {
        for other in ["CONTINUOUS_PROFILING", "fixed_time", ""] {
            assert_eq!(
                error(&with("TriggerType", Some(other))),
                format!(
                    "EBPFProfilingTaskQuery task 7f3c: TriggerType {other:?} is not supported \
                     (only FIXED_TIME)"
                )
            );
        }
    }

    #[test]
    fn unknown_targets() {
        for other in ["on_cpu", "MEMORY", ""] {
            assert_eq!(
                error(&with("TargetType", Some(other))),
                format!(
                    "EBPFProfilingTaskQuery task 7f3c: TargetType {other:?} is not supported \
                     (ON_CPU, OFF_CPU or NETWORK)"
                )
            );
        }
    }

    #[test]
    fn duration_formats() {
        let set = |value: &'static str| with("FixedTriggerDuration", Some(value));
        assert_eq!(
            parse(&set("1")).expect("valid").duration,
            Duration::from_secs(1)
        );
        for (value, reason) in [
            ("0", "is not at least 1 second"),
            ("-5", "is not a whole number of seconds"),
            ("1.5", "is not a whole number of seconds"),
            ("60s", "is not a whole number of seconds"),
            ("", "is not a whole number of seconds"),
            (
                "18446744073709551616",
                "is too large: the task would end past the largest epoch millisecond",
            ),
            (
                "9223372036854775",
                "is too large: the task would end past the largest epoch millisecond",
            ),
        ] {
            assert_eq!(
                error(&set(value)),
                format!(
                    "EBPFProfilingTaskQuery task 7f3c: FixedTriggerDuration {value:?} {reason}"
                )
            );
        }
    }

    fn with_target_and_config(target: &'static str, config: Option<&'static str>) -> Command {
        let mut args = good_args();
        args.retain(|(k, _)| *k != "TargetType" && *k != "ExtensionConfigJSON");
        args.push(("TargetType", target));
        if let Some(config) = config {
            args.push(("ExtensionConfigJSON", config));
        }
        command(TASK_QUERY, &args)
    }

    #[test]
    fn extension_config_absent_null_or_empty_is_none() {
        for target in ["ON_CPU", "OFF_CPU", "NETWORK"] {
            for config in [None, Some("null"), Some(""), Some("  "), Some(" null ")] {
                let parsed = parse(&with_target_and_config(target, config)).expect("valid");
                assert_eq!(parsed.extension_config, None, "{target} {config:?}");
                assert_eq!(parsed.warning, None, "{target} {config:?}");
            }
        }
    }

    #[test]
    fn extension_config_object_is_kept() {
        let json = r#"{"NetworkSamplings":[{"URIRegex":"/api/.*","MinDuration":100}]}"#;
        for target in ["NETWORK", "ON_CPU"] {
            let parsed = parse(&with_target_and_config(target, Some(json))).expect("valid");
            assert_eq!(
                parsed.extension_config,
                Some(serde_json::json!({
                    "NetworkSamplings": [{"URIRegex": "/api/.*", "MinDuration": 100}]
                }))
            );
            assert_eq!(parsed.warning, None);
        }
    }

    #[test]
    fn malformed_extension_config_fails_a_network_task() {
        for bad in ["{", "[1, 2]", "\"text\"", "42", "{\"a\":1} trailing"] {
            let parsed = parse(&with_target_and_config("NETWORK", Some(bad)));
            let Err(TaskCommandError::InvalidArg {
                task_id,
                arg,
                value,
                reason,
            }) = parsed
            else {
                panic!("{bad}: expected InvalidArg, got {parsed:?}");
            };
            assert_eq!(task_id.as_deref(), Some("7f3c"));
            assert_eq!(arg, EXTENSION_CONFIG);
            assert_eq!(value, bad);
            assert!(
                reason == "is not a JSON object" || reason.starts_with("is not JSON ("),
                "{reason}"
            );
        }
        assert_eq!(
            error(&with_target_and_config("NETWORK", Some("[]"))),
            r#"EBPFProfilingTaskQuery task 7f3c: ExtensionConfigJSON "[]" is not a JSON object"#
        );
    }

    #[test]
    fn malformed_extension_config_is_a_warning_on_cpu_tasks() {
        for target in ["ON_CPU", "OFF_CPU"] {
            let parsed = parse(&with_target_and_config(target, Some("{oops"))).expect(target);
            assert_eq!(parsed.extension_config, None);
            let Some(TaskCommandError::IgnoredExtensionConfig {
                task_id,
                value,
                reason,
            }) = &parsed.warning
            else {
                panic!("{target}: expected a warning, got {:?}", parsed.warning);
            };
            assert_eq!((task_id.as_str(), value.as_str()), ("7f3c", "{oops"));
            assert!(reason.starts_with("is not JSON ("), "{reason}");
            let message = parsed
                .warning
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            assert!(
                message.starts_with(
                    r#"EBPFProfilingTaskQuery task 7f3c: ExtensionConfigJSON "{oops" is not JSON ("#
                ) && message.ends_with("); ignored, only NETWORK tasks read it"),
                "{message}"
            );
        }
    }

    #[test]
    fn unknown_command_names_it() {
        let parsed = parse(&command("ContinuousProfilingPolicyQuery", &good_args()));
        assert_eq!(
            parsed,
            Err(TaskCommandError::UnknownCommand {
                name: "ContinuousProfilingPolicyQuery".into()
            })
        );
        assert_eq!(
            error(&command("ContinuousProfilingPolicyQuery", &[])),
            r#"unknown command "ContinuousProfilingPolicyQuery" in a task query reply (expected EBPFProfilingTaskQuery)"#
        );
    }

    #[test]
    fn a_reply_keeps_one_result_per_command_in_order() {
        let mut second = good_args();
        second.retain(|(k, _)| *k != "TaskId" && *k != "TaskStartTime");
        second.push(("TaskId", "b2"));
        second.push(("TaskStartTime", "soon"));
        let mut third = good_args();
        third.retain(|(k, _)| *k != "TaskId" && *k != "TargetType");
        third.push(("TaskId", "c3"));
        third.push(("TargetType", "OFF_CPU"));
        let reply = Commands {
            commands: vec![
                command(TASK_QUERY, &good_args()),
                command(TASK_QUERY, &second),
                command("Unexpected", &[]),
                command(TASK_QUERY, &third),
            ],
        };
        let results = parse_task_commands(&reply);
        assert_eq!(results.len(), 4);
        assert_eq!(results[0].as_ref().map(|c| c.task_id.as_str()), Ok("7f3c"));
        assert_eq!(
            results[1]
                .as_ref()
                .map_err(ToString::to_string)
                .err()
                .as_deref(),
            Some(
                r#"EBPFProfilingTaskQuery task b2: TaskStartTime "soon" is not epoch milliseconds"#
            )
        );
        assert_eq!(
            results[2],
            Err(TaskCommandError::UnknownCommand {
                name: "Unexpected".into()
            })
        );
        assert_eq!(
            results[3].as_ref().map(|c| (c.task_id.as_str(), c.target)),
            Ok(("c3", ProfilingTarget::OffCpu))
        );
        assert!(parse_task_commands(&Commands::default()).is_empty());
    }

    fn task_updated_at(update_time_ms: i64) -> ProfilingTaskCommand {
        let mut parsed = parse(&command(TASK_QUERY, &good_args())).expect("valid");
        parsed.update_time_ms = update_time_ms;
        parsed
    }

    #[test]
    fn watermark_follows_only_observed_commands_and_never_goes_back() {
        let mut watermark = TaskWatermark::default();
        assert_eq!(watermark.latest_ms(), 0);

        // One reply: 300 handled, 500 could not be placed (not observed), 200 handled.
        watermark.observe(&task_updated_at(300));
        let _skipped = task_updated_at(500);
        watermark.observe(&task_updated_at(200));
        assert_eq!(watermark.latest_ms(), 300);

        // The next reply re-sends 500; once placed it advances the watermark.
        watermark.observe(&task_updated_at(500));
        assert_eq!(watermark.latest_ms(), 500);
        watermark.observe(&task_updated_at(400));
        assert_eq!(watermark.latest_ms(), 500);
    }

    fn task(start_ms: i64, duration_secs: u64) -> ProfilingTaskCommand {
        let mut parsed = parse(&command(TASK_QUERY, &good_args())).expect("valid");
        parsed.start_time = at_ms(start_ms);
        parsed.duration = Duration::from_secs(duration_secs);
        parsed
    }

    #[test]
    fn schedule_waits_for_a_future_start() {
        let task = task(START_MS, 60);
        assert_eq!(
            task.schedule(at_ms(START_MS - 1_500)),
            TaskSchedule::Wait(Duration::from_millis(1_500))
        );
        assert_eq!(
            task.schedule(at_ms(START_MS - 1)),
            TaskSchedule::Wait(Duration::from_millis(1))
        );
    }

    #[test]
    fn schedule_runs_the_full_duration_from_any_moment_in_the_window() {
        let task = task(START_MS, 60);
        let full = TaskSchedule::RunFor(Duration::from_secs(60));
        assert_eq!(task.schedule(at_ms(START_MS)), full, "exactly at the start");
        assert_eq!(
            task.schedule(at_ms(START_MS + 30_000)),
            full,
            "started late"
        );
        assert_eq!(
            task.schedule(at_ms(START_MS + 59_999)),
            full,
            "last millisecond"
        );
    }

    #[test]
    fn schedule_expires_at_the_end_of_the_window() {
        let task = task(START_MS, 60);
        assert_eq!(
            task.schedule(at_ms(START_MS + 60_000)),
            TaskSchedule::Expired
        );
        assert_eq!(
            task.schedule(at_ms(START_MS + 3_600_000)),
            TaskSchedule::Expired
        );
    }

    #[test]
    fn schedule_without_a_representable_end_never_expires() {
        let mut task = task(START_MS, 60);
        task.duration = Duration::MAX;
        assert_eq!(
            task.schedule(at_ms(START_MS + 1)),
            TaskSchedule::RunFor(Duration::MAX)
        );
    }
}
