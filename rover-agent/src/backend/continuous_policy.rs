//! Continuous profiling policies: the `ContinuousProfilingPolicyQuery` command of a
//! `ContinuousProfilingService.queryPolicies` reply, its `ServiceWithPolicyJSON` parsed into
//! typed per-service policies.
//!
//! The JSON is a list of `{ServiceName, UUID, Profiling: {TARGET: {MONITOR: {Threshold, Period,
//! Count, URIList?, URIRegex?}}}}`. A reply that is not that shape at all is an error; inside it,
//! one bad service, target or monitor item costs only itself (one warning each), as in Rover.

use rover_proto::v3::Commands;
use serde_json::{Map, Value};
use tracing::warn;

use super::ProfilingTarget;

/// The only command name `queryPolicies` replies carry.
const POLICY_QUERY: &str = "ContinuousProfilingPolicyQuery";
const SERVICE_WITH_POLICY_JSON: &str = "ServiceWithPolicyJSON";

/// Longest `Period` accepted: a checker window holds one slot per second of it, so this bounds
/// the memory one policy item can make the agent spend (the OAP sets no limit).
pub const MAX_PERIOD_SECS: u32 = 3600;

/// What a policy item watches (the `MONITOR` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Monitor {
    /// `PROCESS_CPU`: % of one core, 1–100.
    ProcessCpu,
    /// `PROCESS_THREAD_COUNT`.
    ProcessThreadCount,
    /// `SYSTEM_LOAD`: the host's 1-minute load average.
    SystemLoad,
    /// `HTTP_ERROR_RATE`: %, 1–100; needs network profiling (not supported).
    HttpErrorRate,
    /// `HTTP_AVG_RESPONSE_TIME`: needs network profiling (not supported).
    HttpAvgResponseTime,
}

impl Monitor {
    /// The name in the policy JSON.
    pub fn wire_name(self) -> &'static str {
        match self {
            Self::ProcessCpu => "PROCESS_CPU",
            Self::ProcessThreadCount => "PROCESS_THREAD_COUNT",
            Self::SystemLoad => "SYSTEM_LOAD",
            Self::HttpErrorRate => "HTTP_ERROR_RATE",
            Self::HttpAvgResponseTime => "HTTP_AVG_RESPONSE_TIME",
        }
    }

    fn from_wire(name: &str) -> Option<Self> {
        [
            Self::ProcessCpu,
            Self::ProcessThreadCount,
            Self::SystemLoad,
            Self::HttpErrorRate,
            Self::HttpAvgResponseTime,
        ]
        .into_iter()
        .find(|monitor| monitor.wire_name() == name)
    }

    /// Whether rover-rs checks it: the HTTP monitors need network profiling.
    pub fn is_supported(self) -> bool {
        !matches!(self, Self::HttpErrorRate | Self::HttpAvgResponseTime)
    }

    /// The thresholds the OAP accepts: percentages are 1–100, the rest not negative.
    fn threshold_range(self) -> (f64, f64) {
        match self {
            Self::ProcessCpu | Self::HttpErrorRate => (1.0, 100.0),
            Self::ProcessThreadCount | Self::SystemLoad | Self::HttpAvgResponseTime => {
                (0.0, f64::MAX)
            }
        }
    }
}

/// One `MONITOR` entry of a target, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyItem {
    pub monitor: Monitor,
    /// `Threshold` (a string on the wire): fire on values ≥ it.
    pub threshold: f64,
    /// `Period`: the window, in one-second slots (1 ..= [`MAX_PERIOD_SECS`]).
    pub period_secs: u32,
    /// `Count`: fire when at least this many slots of the window reach the threshold
    /// (1 ..= `period_secs`).
    pub count: u32,
    /// `URIList` (HTTP monitors); empty when absent.
    pub uri_list: Vec<String>,
    /// `URIRegex` (HTTP monitors); `None` when absent or empty.
    pub uri_regex: Option<String>,
}

#[cfg(test)]
impl PolicyItem {
    /// An item with no URI list or regex.
    pub(crate) fn without_uris(
        monitor: Monitor,
        threshold: f64,
        period_secs: u32,
        count: u32,
    ) -> Self {
        Self {
            monitor,
            threshold,
            period_secs,
            count,
            uri_list: Vec::new(),
            uri_regex: None,
        }
    }
}

/// What one target (`ON_CPU`, `OFF_CPU`, `NETWORK`) of a policy is triggered by.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetPolicy {
    pub target: ProfilingTarget,
    /// The valid items, by monitor name; never two of one monitor.
    pub items: Vec<PolicyItem>,
}

/// A service's current policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// `UUID`: sent back in the next query; the OAP replies only when it changed.
    pub uuid: String,
    /// By target name; a target whose items were all invalid is kept with none.
    pub targets: Vec<TargetPolicy>,
}

/// One entry of the reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ServicePolicy {
    /// `ServiceName`, as the query sent it.
    pub service: String,
    /// `None`: `UUID` was `""`, the policy was deleted and its checks stop.
    pub policy: Option<Policy>,
}

/// A part of a policy rover-rs accepts but does not run, for the caller to log once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotSupported {
    /// The `NETWORK` target (network profiling).
    NetworkTarget,
    /// An HTTP monitor (needs network profiling).
    Monitor(Monitor),
}

impl std::fmt::Display for NotSupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NetworkTarget => {
                f.write_str("continuous profiling target NETWORK is not supported, ignored")
            }
            Self::Monitor(monitor) => write!(
                f,
                "continuous profiling monitor {} is not supported (it needs network \
                 profiling), ignored",
                monitor.wire_name()
            ),
        }
    }
}

impl ServicePolicy {
    /// The unsupported targets and monitors this policy names, each once.
    pub fn not_supported(&self) -> Vec<NotSupported> {
        let mut found = Vec::new();
        for target in self.policy.iter().flat_map(|policy| &policy.targets) {
            let mut add = |item| {
                if !found.contains(&item) {
                    found.push(item);
                }
            };
            if target.target == ProfilingTarget::Network {
                add(NotSupported::NetworkTarget);
            }
            for item in &target.items {
                if !item.monitor.is_supported() {
                    add(NotSupported::Monitor(item.monitor));
                }
            }
        }
        found
    }
}

/// Why a `queryPolicies` reply as a whole could not be read: logged, and the same UUIDs are
/// sent again at the next poll.
#[derive(Debug, thiserror::Error)]
pub enum PolicyReplyError {
    #[error("unexpected command {name:?} in a policy query reply (expected {POLICY_QUERY})")]
    UnknownCommand { name: String },
    #[error("{POLICY_QUERY}: missing argument {SERVICE_WITH_POLICY_JSON}")]
    MissingArg,
    #[error("{POLICY_QUERY}: {SERVICE_WITH_POLICY_JSON} is not JSON: {source}")]
    NotJson {
        #[source]
        source: serde_json::Error,
    },
    #[error("{POLICY_QUERY}: {SERVICE_WITH_POLICY_JSON} is not a JSON list but {found}")]
    NotAList { found: &'static str },
}

/// A part of the policy JSON that was dropped, and why: one warning each. The service, target
/// and monitor are named as far as they were read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedPolicy {
    pub service: Option<String>,
    pub target: Option<String>,
    pub monitor: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for DroppedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("continuous profiling policy")?;
        if let Some(service) = &self.service {
            write!(f, " of service {service:?}")?;
        }
        if let Some(target) = &self.target {
            write!(f, ", target {target:?}")?;
        }
        if let Some(monitor) = &self.monitor {
            write!(f, ", monitor {monitor:?}")?;
        }
        write!(f, " dropped: {}", self.reason)
    }
}

/// Parses a `queryPolicies` reply. `Ok(None)`: no command, nothing changed. Each dropped item
/// is logged as a warning here; the kept ones are returned in the reply's order (a service
/// named twice appears twice, the later entry being the newer).
pub fn parse_policy_reply(
    reply: &Commands,
) -> Result<Option<Vec<ServicePolicy>>, PolicyReplyError> {
    let Some((policies, dropped)) = parse_reply(reply)? else {
        return Ok(None);
    };
    for dropped in &dropped {
        warn!(
            service = dropped.service.as_deref().unwrap_or_default(),
            target = dropped.target.as_deref().unwrap_or_default(),
            monitor = dropped.monitor.as_deref().unwrap_or_default(),
            "{dropped}"
        );
    }
    Ok(Some(policies))
}

type Parsed = (Vec<ServicePolicy>, Vec<DroppedPolicy>);

fn parse_reply(reply: &Commands) -> Result<Option<Parsed>, PolicyReplyError> {
    if reply.commands.is_empty() {
        return Ok(None);
    }
    let mut policies = Vec::new();
    let mut dropped = Vec::new();
    for command in &reply.commands {
        if command.command != POLICY_QUERY {
            return Err(PolicyReplyError::UnknownCommand {
                name: command.command.clone(),
            });
        }
        let json = command
            .args
            .iter()
            .find(|arg| arg.key == SERVICE_WITH_POLICY_JSON)
            .ok_or(PolicyReplyError::MissingArg)?;
        let (more, more_dropped) = parse_policy_json(&json.value)?;
        policies.extend(more);
        dropped.extend(more_dropped);
    }
    Ok(Some((policies, dropped)))
}

/// Parses the `ServiceWithPolicyJSON` text.
fn parse_policy_json(json: &str) -> Result<Parsed, PolicyReplyError> {
    let value: Value =
        serde_json::from_str(json).map_err(|source| PolicyReplyError::NotJson { source })?;
    let Value::Array(entries) = value else {
        return Err(PolicyReplyError::NotAList {
            found: json_kind(&value),
        });
    };
    let mut policies = Vec::new();
    let mut dropped = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        match service_policy(entry, &mut dropped) {
            Ok(policy) => policies.push(policy),
            Err((service, reason)) => dropped.push(DroppedPolicy {
                service,
                target: None,
                monitor: None,
                reason: format!("entry {index}: {reason}"),
            }),
        }
    }
    Ok((policies, dropped))
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One `{ServiceName, UUID, Profiling}` entry; an error names the service when it was read.
fn service_policy(
    entry: &Value,
    dropped: &mut Vec<DroppedPolicy>,
) -> Result<ServicePolicy, (Option<String>, String)> {
    let Value::Object(entry) = entry else {
        return Err((None, format!("is {}, not an object", json_kind(entry))));
    };
    let service = match entry.get("ServiceName") {
        Some(Value::String(name)) if !name.trim().is_empty() => name.clone(),
        Some(Value::String(_)) => return Err((None, "ServiceName is empty".into())),
        Some(other) => {
            return Err((
                None,
                format!("ServiceName is {}, not a string", json_kind(other)),
            ));
        }
        None => return Err((None, "ServiceName is missing".into())),
    };
    let uuid = match entry.get("UUID") {
        Some(Value::String(uuid)) => uuid.clone(),
        // Go's zero value: an absent UUID reads as "", a deleted policy.
        None | Some(Value::Null) => String::new(),
        Some(other) => {
            return Err((
                Some(service),
                format!("UUID is {}, not a string", json_kind(other)),
            ));
        }
    };
    if uuid.is_empty() {
        return Ok(ServicePolicy {
            service,
            policy: None,
        });
    }
    let targets = match entry.get("Profiling") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Object(targets)) => targets
            .iter()
            .filter_map(|(target, items)| target_policy(&service, target, items, dropped))
            .collect(),
        Some(other) => {
            return Err((
                Some(service),
                format!("Profiling is {}, not an object", json_kind(other)),
            ));
        }
    };
    Ok(ServicePolicy {
        service,
        policy: Some(Policy { uuid, targets }),
    })
}

fn target_policy(
    service: &str,
    target_name: &str,
    items: &Value,
    dropped: &mut Vec<DroppedPolicy>,
) -> Option<TargetPolicy> {
    let drop = |reason: String| DroppedPolicy {
        service: Some(service.to_owned()),
        target: Some(target_name.to_owned()),
        monitor: None,
        reason,
    };
    let target = match target_name {
        "ON_CPU" => ProfilingTarget::OnCpu,
        "OFF_CPU" => ProfilingTarget::OffCpu,
        "NETWORK" => ProfilingTarget::Network,
        _ => {
            dropped.push(drop(
                "unknown target (expected ON_CPU, OFF_CPU or NETWORK)".into(),
            ));
            return None;
        }
    };
    let items = match items {
        Value::Object(items) => items,
        Value::Null => &Map::new(),
        other => {
            dropped.push(drop(format!("is {}, not an object", json_kind(other))));
            return None;
        }
    };
    let mut kept = Vec::new();
    for (monitor_name, item) in items {
        match policy_item(monitor_name, item) {
            Ok(item) => kept.push(item),
            Err(reason) => dropped.push(DroppedPolicy {
                monitor: Some(monitor_name.clone()),
                ..drop(reason)
            }),
        }
    }
    Some(TargetPolicy {
        target,
        items: kept,
    })
}

fn policy_item(monitor_name: &str, item: &Value) -> Result<PolicyItem, String> {
    let monitor = Monitor::from_wire(monitor_name).ok_or(
        "unknown monitor (expected PROCESS_CPU, PROCESS_THREAD_COUNT, SYSTEM_LOAD, \
         HTTP_ERROR_RATE or HTTP_AVG_RESPONSE_TIME)",
    )?;
    let Value::Object(item) = item else {
        return Err(format!("is {}, not an object", json_kind(item)));
    };
    let threshold = threshold(monitor, item.get("Threshold"))?;
    let period_secs = whole_number("Period", item.get("Period"))?;
    if period_secs > MAX_PERIOD_SECS {
        return Err(format!(
            "Period {period_secs} is longer than {MAX_PERIOD_SECS} seconds"
        ));
    }
    let count = whole_number("Count", item.get("Count"))?;
    if count > period_secs {
        return Err(format!(
            "Count {count} is greater than Period {period_secs}"
        ));
    }
    let uri_list = match item.get("URIList") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(uris)) => uris
            .iter()
            .map(|uri| uri.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or("URIList is not a list of strings")?,
        Some(other) => return Err(format!("URIList is {}, not a list", json_kind(other))),
    };
    let uri_regex = match item.get("URIRegex") {
        None | Some(Value::Null) => None,
        Some(Value::String(regex)) => Some(regex.clone()).filter(|regex| !regex.is_empty()),
        Some(other) => return Err(format!("URIRegex is {}, not a string", json_kind(other))),
    };
    Ok(PolicyItem {
        monitor,
        threshold,
        period_secs,
        count,
        uri_list,
        uri_regex,
    })
}

/// `Threshold`: a string holding a finite number within the monitor's range.
fn threshold(monitor: Monitor, value: Option<&Value>) -> Result<f64, String> {
    let raw = match value {
        Some(Value::String(raw)) => raw,
        Some(other) => return Err(format!("Threshold is {}, not a string", json_kind(other))),
        None => return Err("Threshold is missing".into()),
    };
    let threshold = raw
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|t| t.is_finite())
        .ok_or_else(|| format!("Threshold {raw:?} is not a number"))?;
    let (low, high) = monitor.threshold_range();
    if threshold < low || threshold > high {
        return Err(if high == f64::MAX {
            format!("Threshold {raw:?} is negative")
        } else {
            format!("Threshold {raw:?} is not between {low} and {high}")
        });
    }
    Ok(threshold)
}

/// `Period` / `Count`: a JSON integer greater than zero.
fn whole_number(key: &str, value: Option<&Value>) -> Result<u32, String> {
    let Some(value) = value else {
        return Err(format!("{key} is missing"));
    };
    let Some(number) = value.as_i64() else {
        return Err(format!("{key} {value} is not a whole number"));
    };
    if number <= 0 {
        return Err(format!("{key} {number} is not greater than 0"));
    }
    u32::try_from(number).map_err(|_| format!("{key} {number} is too large"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::backend::task_command::tests::command;

    fn reply(name: &str, args: &[(&str, &str)]) -> Commands {
        Commands {
            commands: vec![command(name, args)],
        }
    }

    fn parse(json: &Value) -> Parsed {
        parse_reply(&reply(
            POLICY_QUERY,
            &[("ServiceWithPolicyJSON", &json.to_string())],
        ))
        .expect("a valid reply")
        .expect("a command")
    }

    /// The policy of the issue's proof, as the OAP sends it.
    #[test]
    fn a_policy_as_the_oap_sends_it() {
        let (policies, dropped) = parse(&json!([{
            "ServiceName": "shop::orders.default",
            "UUID": "5a8e",
            "Profiling": {
                "ON_CPU": {
                    "PROCESS_CPU": {"Threshold": "50", "Period": 5, "Count": 3},
                    "PROCESS_THREAD_COUNT": {"Threshold": "200", "Period": 10, "Count": 10},
                },
                "OFF_CPU": {
                    "SYSTEM_LOAD": {"Threshold": "2.5", "Period": 1, "Count": 1,
                                    "URIList": null, "URIRegex": null},
                },
            },
        }]));
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(
            policies,
            [ServicePolicy {
                service: "shop::orders.default".into(),
                policy: Some(Policy {
                    uuid: "5a8e".into(),
                    targets: vec![
                        TargetPolicy {
                            target: ProfilingTarget::OffCpu,
                            items: vec![PolicyItem::without_uris(Monitor::SystemLoad, 2.5, 1, 1)],
                        },
                        TargetPolicy {
                            target: ProfilingTarget::OnCpu,
                            items: vec![
                                PolicyItem::without_uris(Monitor::ProcessCpu, 50.0, 5, 3),
                                PolicyItem::without_uris(
                                    Monitor::ProcessThreadCount,
                                    200.0,
                                    10,
                                    10
                                ),
                            ],
                        },
                    ],
                }),
            }]
        );
        assert!(policies[0].not_supported().is_empty());
    }

    #[test]
    fn an_empty_reply_means_nothing_changed() {
        assert!(matches!(parse_policy_reply(&Commands::default()), Ok(None)));
    }

    #[test]
    fn an_empty_uuid_deletes_the_policy_whatever_else_is_there() {
        let (policies, dropped) = parse(&json!([
            {"ServiceName": "a", "UUID": ""},
            {"ServiceName": "b", "UUID": "", "Profiling": {"ON_CPU": {"PROCESS_CPU": {}}}},
            {"ServiceName": "c"},
        ]));
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(
            policies,
            ["a", "b", "c"].map(|service| ServicePolicy {
                service: service.into(),
                policy: None,
            })
        );
    }

    #[test]
    fn a_policy_without_targets_checks_nothing() {
        for profiling in [json!(null), json!({})] {
            let (policies, _) = parse(&json!([
                {"ServiceName": "a", "UUID": "u1", "Profiling": profiling}
            ]));
            assert_eq!(
                policies[0].policy,
                Some(Policy {
                    uuid: "u1".into(),
                    targets: Vec::new(),
                })
            );
        }
        let (policies, _) = parse(&json!([{"ServiceName": "a", "UUID": "u1"}]));
        assert_eq!(
            policies[0].policy.as_ref().map(|p| p.targets.len()),
            Some(0)
        );
    }

    /// One item per invalid value: each is dropped with a warning naming the service, target
    /// and monitor, and its valid siblings are kept.
    #[test]
    fn invalid_items_are_dropped_one_warning_each_and_the_rest_kept() {
        let cases: &[(&str, Value, &str)] = &[
            (
                "PROCESS_CPU",
                json!({"Period": 5, "Count": 3}),
                "Threshold is missing",
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": 50, "Period": 5, "Count": 3}),
                "Threshold is a number, not a string",
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "abc", "Period": 5, "Count": 3}),
                r#"Threshold "abc" is not a number"#,
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "", "Period": 5, "Count": 3}),
                r#"Threshold "" is not a number"#,
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "NaN", "Period": 5, "Count": 3}),
                r#"Threshold "NaN" is not a number"#,
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "inf", "Period": 5, "Count": 3}),
                r#"Threshold "inf" is not a number"#,
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "0", "Period": 5, "Count": 3}),
                r#"Threshold "0" is not between 1 and 100"#,
            ),
            (
                "PROCESS_CPU",
                json!({"Threshold": "100.5", "Period": 5, "Count": 3}),
                r#"Threshold "100.5" is not between 1 and 100"#,
            ),
            (
                "HTTP_ERROR_RATE",
                json!({"Threshold": "101", "Period": 5, "Count": 3}),
                r#"Threshold "101" is not between 1 and 100"#,
            ),
            (
                "PROCESS_THREAD_COUNT",
                json!({"Threshold": "-1", "Period": 5, "Count": 3}),
                r#"Threshold "-1" is negative"#,
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Count": 3}),
                "Period is missing",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 0, "Count": 1}),
                "Period 0 is not greater than 0",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": -5, "Count": 1}),
                "Period -5 is not greater than 0",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 2.5, "Count": 1}),
                "Period 2.5 is not a whole number",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": "5", "Count": 1}),
                r#"Period "5" is not a whole number"#,
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 3601, "Count": 1}),
                "Period 3601 is longer than 3600 seconds",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 5}),
                "Count is missing",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 5, "Count": 0}),
                "Count 0 is not greater than 0",
            ),
            (
                "SYSTEM_LOAD",
                json!({"Threshold": "2", "Period": 5, "Count": 6}),
                "Count 6 is greater than Period 5",
            ),
            (
                "HTTP_AVG_RESPONSE_TIME",
                json!({"Threshold": "2", "Period": 5, "Count": 1, "URIList": "/a"}),
                "URIList is a string, not a list",
            ),
            (
                "HTTP_AVG_RESPONSE_TIME",
                json!({"Threshold": "2", "Period": 5, "Count": 1, "URIList": ["/a", 1]}),
                "URIList is not a list of strings",
            ),
            (
                "HTTP_AVG_RESPONSE_TIME",
                json!({"Threshold": "2", "Period": 5, "Count": 1, "URIRegex": []}),
                "URIRegex is a list, not a string",
            ),
            ("PROCESS_CPU", json!("50"), "is a string, not an object"),
            (
                "PROCESS_MEMORY",
                json!({"Threshold": "2", "Period": 5, "Count": 1}),
                "unknown monitor (expected PROCESS_CPU, PROCESS_THREAD_COUNT, SYSTEM_LOAD, HTTP_ERROR_RATE or HTTP_AVG_RESPONSE_TIME)",
            ),
        ];
        for (monitor, bad, reason) in cases {
            // The invalid item beside a valid one of another monitor.
            let valid = if *monitor == "PROCESS_THREAD_COUNT" {
                "PROCESS_CPU"
            } else {
                "PROCESS_THREAD_COUNT"
            };
            let (policies, dropped) = parse(&json!([{
                "ServiceName": "svc",
                "UUID": "u1",
                "Profiling": {"OFF_CPU": {
                    *monitor: bad,
                    valid: {"Threshold": "10", "Period": 5, "Count": 1},
                }},
            }]));
            assert_eq!(
                dropped,
                [DroppedPolicy {
                    service: Some("svc".into()),
                    target: Some("OFF_CPU".into()),
                    monitor: Some((*monitor).into()),
                    reason: (*reason).into(),
                }],
                "{monitor}: {bad}"
            );
            assert_eq!(
                dropped[0].to_string(),
                format!(
                    "continuous profiling policy of service \"svc\", target \"OFF_CPU\", \
                     monitor \"{monitor}\" dropped: {reason}"
                )
            );
            let targets = &policies[0].policy.as_ref().expect("kept").targets;
            assert_eq!(targets.len(), 1);
            assert_eq!(
                targets[0].items.len(),
                1,
                "{monitor}: the valid item is kept"
            );
            assert_eq!(targets[0].items[0].monitor.wire_name(), valid);
        }
    }

    #[test]
    fn boundaries_that_are_valid() {
        let (policies, dropped) = parse(&json!([{
            "ServiceName": "svc",
            "UUID": "u1",
            "Profiling": {"ON_CPU": {
                "PROCESS_CPU": {"Threshold": " 1 ", "Period": 1, "Count": 1},
                "HTTP_ERROR_RATE": {"Threshold": "100", "Period": 3600, "Count": 3600},
                "PROCESS_THREAD_COUNT": {"Threshold": "0", "Period": 2, "Count": 2},
                "SYSTEM_LOAD": {"Threshold": "1e1", "Period": 60, "Count": 1},
                "HTTP_AVG_RESPONSE_TIME": {"Threshold": "300", "Period": 5, "Count": 1,
                                           "URIList": ["/a", "/b"], "URIRegex": "/api/.*"},
            }},
        }]));
        assert!(dropped.is_empty(), "{dropped:?}");
        let items = &policies[0].policy.as_ref().expect("kept").targets[0].items;
        let summary: Vec<_> = items
            .iter()
            .map(|i| (i.monitor, i.threshold, i.period_secs, i.count))
            .collect();
        assert_eq!(
            summary,
            [
                (Monitor::HttpAvgResponseTime, 300.0, 5, 1),
                (Monitor::HttpErrorRate, 100.0, 3600, 3600),
                (Monitor::ProcessCpu, 1.0, 1, 1),
                (Monitor::ProcessThreadCount, 0.0, 2, 2),
                (Monitor::SystemLoad, 10.0, 60, 1),
            ]
        );
        assert_eq!(items[0].uri_list, ["/a", "/b"]);
        assert_eq!(items[0].uri_regex.as_deref(), Some("/api/.*"));
    }

    #[test]
    fn unsupported_targets_and_monitors_are_kept_and_flagged_once() {
        let (policies, dropped) = parse(&json!([{
            "ServiceName": "svc",
            "UUID": "u1",
            "Profiling": {
                "NETWORK": {
                    "HTTP_ERROR_RATE": {"Threshold": "10", "Period": 5, "Count": 1},
                    "HTTP_AVG_RESPONSE_TIME": {"Threshold": "300", "Period": 5, "Count": 1},
                },
                "ON_CPU": {
                    "HTTP_ERROR_RATE": {"Threshold": "20", "Period": 5, "Count": 1},
                    "PROCESS_CPU": {"Threshold": "20", "Period": 5, "Count": 1},
                },
            },
        }]));
        assert!(dropped.is_empty(), "{dropped:?}");
        let targets = &policies[0].policy.as_ref().expect("kept").targets;
        assert_eq!(targets[0].target, ProfilingTarget::Network);
        assert_eq!(targets[0].items.len(), 2);
        assert_eq!(targets[1].items.len(), 2);
        let flagged = policies[0].not_supported();
        assert_eq!(
            flagged,
            [
                NotSupported::NetworkTarget,
                NotSupported::Monitor(Monitor::HttpAvgResponseTime),
                NotSupported::Monitor(Monitor::HttpErrorRate),
            ]
        );
        assert_eq!(
            flagged[0].to_string(),
            "continuous profiling target NETWORK is not supported, ignored"
        );
        assert_eq!(
            flagged[2].to_string(),
            "continuous profiling monitor HTTP_ERROR_RATE is not supported (it needs network \
             profiling), ignored"
        );
        assert!(Monitor::ProcessCpu.is_supported());
        assert!(Monitor::SystemLoad.is_supported());
        assert!(Monitor::ProcessThreadCount.is_supported());
    }

    #[test]
    fn unknown_or_malformed_targets_are_dropped() {
        let (policies, dropped) = parse(&json!([{
            "ServiceName": "svc",
            "UUID": "u1",
            "Profiling": {
                "MEMORY": {"PROCESS_CPU": {"Threshold": "10", "Period": 5, "Count": 1}},
                "OFF_CPU": [1],
                "ON_CPU": {"PROCESS_CPU": {"Threshold": "10", "Period": 5, "Count": 1}},
            },
        }]));
        assert_eq!(
            dropped.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "continuous profiling policy of service \"svc\", target \"MEMORY\" dropped: \
                 unknown target (expected ON_CPU, OFF_CPU or NETWORK)",
                "continuous profiling policy of service \"svc\", target \"OFF_CPU\" dropped: \
                 is a list, not an object",
            ]
        );
        let targets = &policies[0].policy.as_ref().expect("kept").targets;
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].target, ProfilingTarget::OnCpu);
    }

    #[test]
    fn malformed_services_are_dropped_and_the_others_kept() {
        let (policies, dropped) = parse(&json!([
            42,
            {"UUID": "u"},
            {"ServiceName": " ", "UUID": "u"},
            {"ServiceName": 7, "UUID": "u"},
            {"ServiceName": "x", "UUID": 5},
            {"ServiceName": "y", "UUID": "u", "Profiling": "ON_CPU"},
            {"ServiceName": "ok", "UUID": "u"},
        ]));
        assert_eq!(
            dropped.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "continuous profiling policy dropped: entry 0: is a number, not an object",
                "continuous profiling policy dropped: entry 1: ServiceName is missing",
                "continuous profiling policy dropped: entry 2: ServiceName is empty",
                "continuous profiling policy dropped: entry 3: ServiceName is a number, not a string",
                "continuous profiling policy of service \"x\" dropped: entry 4: UUID is a number, not a string",
                "continuous profiling policy of service \"y\" dropped: entry 5: Profiling is a string, not an object",
            ]
        );
        assert_eq!(policies.len(), 1);
        assert_eq!(policies[0].service, "ok");
    }

    #[test]
    fn a_reply_that_is_not_a_policy_list_is_an_error() {
        let err = |reply: &Commands| parse_policy_reply(reply).expect_err("refused").to_string();
        assert_eq!(
            err(&reply("EBPFProfilingTaskQuery", &[])),
            "unexpected command \"EBPFProfilingTaskQuery\" in a policy query reply \
             (expected ContinuousProfilingPolicyQuery)"
        );
        assert_eq!(
            err(&reply(POLICY_QUERY, &[("Other", "[]")])),
            "ContinuousProfilingPolicyQuery: missing argument ServiceWithPolicyJSON"
        );
        for (json, found) in [("{}", "an object"), ("null", "null"), ("\"x\"", "a string")] {
            assert_eq!(
                err(&reply(POLICY_QUERY, &[("ServiceWithPolicyJSON", json)])),
                format!(
                    "ContinuousProfilingPolicyQuery: ServiceWithPolicyJSON is not a JSON list \
                     but {found}"
                )
            );
        }
        for bad in ["", "[", "[{]", "[] x"] {
            assert!(
                err(&reply(POLICY_QUERY, &[("ServiceWithPolicyJSON", bad)])).starts_with(
                    "ContinuousProfilingPolicyQuery: ServiceWithPolicyJSON is not JSON: "
                ),
                "{bad}"
            );
        }
        // An empty list is a valid reply that names no service.
        assert!(matches!(
            parse_policy_reply(&reply(POLICY_QUERY, &[("ServiceWithPolicyJSON", "[]")])),
            Ok(Some(policies)) if policies.is_empty()
        ));
    }

    #[test]
    fn odd_json_never_panics() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        for json in [
            deep.as_str(),
            r#"[{"ServiceName":"s","UUID":"u","Profiling":{"ON_CPU":{"PROCESS_CPU":{"Threshold":"1e400","Period":18446744073709551615,"Count":-9223372036854775808}}}}]"#,
            r#"[{"ServiceName":"s","UUID":"u","Profiling":{"ON_CPU":{"PROCESS_CPU":null}}}]"#,
            r#"[{"ServiceName":"s","UUID":"u","Profiling":{"ON_CPU":null}}]"#,
            r#"[{"ServiceName":"s","UUID":"u","Profiling":{"ON_CPU":{"SYSTEM_LOAD":{"Threshold":"1","Period":4294967296,"Count":1}}}}]"#,
        ] {
            let _ = parse_policy_reply(&reply(POLICY_QUERY, &[("ServiceWithPolicyJSON", json)]));
        }
    }
}
