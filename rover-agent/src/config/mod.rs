//! The agent's configuration file (Rover's key layout), validated once at start into typed
//! settings; each module gets only its own part.
//!
//! The file has the keys of Apache SkyWalking Rover 0.7.0's `configs/rover_configs.yaml` (plus
//! Rover 0.5.0's `process_discovery.scanner`), so a Rover user brings their file and environment
//! unchanged; our own settings live under `rover_rs:`, a name Rover never uses.
//! - `${ENV_NAME:default}` in any string value is substituted exactly as Rover does it (see
//!   `env.rs`): an unset or empty variable gives the default.
//! - Every key is optional; a missing, null or empty value takes Rover's default (the default in
//!   Rover's shipped file, unless the key's doc says otherwise).
//! - Keys match ignoring ASCII case, as in Rover (Viper lowercases them).
//! - An unknown key is an error naming its full path; Rover sections rover-rs does not implement
//!   (`profiling.task.network`, `access_log`, `pprof`) are accepted whatever their content, with
//!   one warning each whenever present, `active: false` or not, so users know they are ignored.
//! - Warnings are returned in [`Loaded`], not logged: logging is not set up yet when the file is
//!   read (the file chooses the log level).

mod env;
mod read;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_yaml::Value;
use tracing::level_filters::LevelFilter;

use read::{
    Cx, Map, Node, comma_list, parse_bytes, parse_count, parse_duration, parse_u64, valid_host,
};

/// Why the configuration cannot be used. Each message names the file, the YAML position or the
/// full key path, so it alone tells the user what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is missing, unreadable or not UTF-8.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax (the message has the line and column), duplicate keys, bad aliases.
    #[error("the configuration is not valid YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// A key neither Rover nor rover-rs has, most often a typo.
    #[error("unknown key `{key}`{}", suggestion.as_ref().map(|s| format!(" (did you mean `{s}`?)")).unwrap_or_default())]
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },
    /// A value of the wrong type or out of range; `value` is after `${ENV:default}`
    /// substitution, so a bad environment variable shows as itself.
    #[error("`{key}`: `{value}` is not valid: expected {expected}")]
    Invalid {
        key: String,
        value: String,
        expected: String,
    },
    /// Half of a TLS client certificate.
    #[error("`{set}` is set but `{missing}` is empty: a TLS client certificate needs both")]
    Incomplete { set: String, missing: String },
}

/// A validated configuration and the warnings to show once logging is set up.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub settings: Settings,
    /// One line each, e.g. `access_log: not supported by rover-rs, ignored`.
    pub warnings: Vec<String>,
}

/// The whole configuration; `run` hands each module its own part.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `logger.level`: logrus's levels (`trace` … `panic`, any case; `fatal` and `panic` mean
    /// `error`). Default `info`. Its `Display` is the `tracing` filter string.
    pub log_level: LevelFilter,
    /// `core.cluster_name`; empty means none.
    pub cluster_name: Option<String>,
    /// `core.backend`.
    pub backend: BackendSettings,
    /// `process_discovery`.
    pub discovery: DiscoverySettings,
    /// `profiling`.
    pub profiling: ProfilingSettings,
    /// `rover_rs`: settings Rover does not have.
    pub rover_rs: RoverRsSettings,
}

/// `core.backend`: the SkyWalking OAP connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSettings {
    /// `addr` (default `localhost:11800`).
    pub addr: BackendAddr,
    /// Present when `enable_TLS` is true.
    pub tls: Option<TlsSettings>,
    /// `check_period`: how often the connection is checked; Rover's integer seconds or a
    /// duration (default 5s).
    pub check_period: Duration,
    /// `authentication`: sent as the `Authentication` metadata of every call; empty means none.
    pub authentication: Option<String>,
}

/// `host:port` of the backend: a host name, an IPv4 address or a bracketed IPv6 address, and a
/// port (required, not 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendAddr {
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
}

impl BackendAddr {
    fn parse(s: &str) -> Option<Self> {
        let (host, port) = match s.strip_prefix('[') {
            Some(rest) => {
                let (host, port) = rest.split_once("]:")?;
                host.parse::<std::net::Ipv6Addr>().ok()?;
                (host, port)
            }
            None => {
                let (host, port) = s.rsplit_once(':')?;
                if !valid_host(host) {
                    return None;
                }
                (host, port)
            }
        };
        let port = u16::try_from(parse_u64(port)?).ok().filter(|p| *p != 0)?;
        Some(BackendAddr {
            host: host.to_owned(),
            port,
        })
    }
}

/// `host:port`, brackets around an IPv6 host: what a gRPC endpoint URI takes after the scheme.
impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// TLS to the backend (`core.backend.enable_TLS: true`). Paths are not opened here: `run`
/// reads them, so a missing file is reported with the I/O error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `ca_pem_path`; empty means the system's roots. A missing key is empty (Rover's shipped
    /// default, `ca.pem` in the working directory, is not assumed).
    pub ca_pem_path: Option<PathBuf>,
    /// `client_pem_path` with `client_key_path`: both or neither (an error otherwise).
    pub client: Option<ClientCertSettings>,
    /// `insecure_skip_verify` (default false).
    pub insecure_skip_verify: bool,
}

/// A TLS client certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertSettings {
    pub pem_path: PathBuf,
    pub key_path: PathBuf,
}

/// `process_discovery`: where processes to profile come from, and how they are reported.
#[derive(Clone, Debug)]
pub struct DiscoverySettings {
    /// `heartbeat_period`: report / keep-alive period of processes (default 20s).
    pub heartbeat_period: Duration,
    /// `properties_report_period`: properties are re-sent every this many heartbeats
    /// (default 10, at least 1).
    pub properties_report_period: u32,
    /// `scanner` (Rover 0.5.0): `None` when the section is missing or its mode is
    /// `AGENT_SENSOR`, which rover-rs does not support.
    pub scanner: Option<ScannerSettings>,
    /// `kubernetes`.
    pub kubernetes: KubernetesSettings,
}

/// `process_discovery.kubernetes`, kept as written: templates are evaluated by `process/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// `active`; a missing key is false (Rover's zero value; its shipped file says true).
    pub active: bool,
    /// `node_name`; empty means none.
    pub node_name: Option<String>,
    /// `namespaces`, comma-separated; empty means every namespace.
    pub namespaces: Vec<String>,
    /// `analyzers[]`, in file order; missing means none.
    pub analyzers: Vec<KubernetesAnalyzerSettings>,
}

/// One `process_discovery.kubernetes.analyzers[]` entry (Go-template sources, unevaluated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesAnalyzerSettings {
    /// `active`; a missing key is false, as in Rover.
    pub active: bool,
    /// `filters[]`: template conditions, all of which must hold.
    pub filters: Vec<String>,
    pub layer: String,
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    /// `labels`: comma-separated in the file.
    pub labels: Vec<String>,
}

/// `process_discovery.scanner`: host processes found by rules over their command line.
#[derive(Clone, Debug)]
pub struct ScannerSettings {
    /// `scanner.period`: how often `/proc` is rescanned.
    pub period: Duration,
    /// `scanner.regex[]`, in file order: the first rule that matches a process names it.
    pub rules: Vec<HostRuleSettings>,
}

/// One `process_discovery.scanner.regex[]` entry. The name fields are Go-template sources
/// (`{{.Process.ExeName}}`), rendered per process by `process/`.
#[derive(Clone, Debug)]
pub struct HostRuleSettings {
    /// `match_cmd`: matched against the command line (argv joined by spaces).
    pub match_cmd: regex::Regex,
    /// `layer` (default `OS_LINUX`).
    pub layer: String,
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    /// `labels`: comma-separated in the file.
    pub labels: Vec<String>,
}

/// `profiling`: backend-issued and continuous profiling tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfilingSettings {
    /// `active` (default true).
    pub active: bool,
    /// `check_interval`: how often the backend is asked for tasks (default 10s).
    pub check_interval: Duration,
    /// `flush_interval`: how often profiling data is sent (default 5s).
    pub flush_interval: Duration,
    /// `task.on_cpu.dump_period`: the on-CPU sampling period, between 1ms and 1s (default 9ms);
    /// the agent turns it into a sampling frequency.
    pub on_cpu_dump_period: Duration,
    /// `continuous`.
    pub continuous: ContinuousSettings,
}

/// `profiling.continuous`: profiling triggered by thresholds on process metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContinuousSettings {
    /// `meter_prefix` (default `rover_con_p`).
    pub meter_prefix: String,
    /// `fetch_interval`: metrics are read this often (default 1s).
    pub fetch_interval: Duration,
    /// `check_interval`: thresholds are checked this often (default 5s).
    pub check_interval: Duration,
    /// `trigger.execute_duration`: how long a triggered task runs (default 10m).
    pub execute_duration: Duration,
    /// `trigger.silence_duration`: least time between two triggers of one policy (default 20m).
    pub silence_duration: Duration,
}

/// `rover_rs`: settings of rover-rs that Rover does not have.
#[derive(Clone, Debug, PartialEq)]
pub struct RoverRsSettings {
    /// `off_cpu_sample_probability`: share of context switches recorded, 0 < p ≤ 1 (default 1).
    pub off_cpu_sample_probability: f64,
    /// `map_memory`: bound of the kernel aggregation maps, in bytes (default 32 MiB).
    pub map_memory: u64,
    /// `max_targets`: most processes profiled at once (default 1024, at least 1).
    pub max_targets: u32,
    /// `upload_buffer`: bound of profiling windows not yet sent, in bytes (default 16 MiB).
    pub upload_buffer: u64,
    /// `shutdown_deadline`: how long pending data may still be sent on shutdown (default 5s;
    /// 0 sends nothing more).
    pub shutdown_deadline: Duration,
    /// `max_triggered_runs`: most continuous-profiling runs at once, over all processes and
    /// targets (default 10, at least 1); a trigger beyond it waits for the next check. Rover has
    /// no such bound, so a policy matching many hot processes profiles them all at once.
    pub max_triggered_runs: u32,
    /// `http_listen`: address of the agent's HTTP endpoint (`/healthz`, `/readyz`, `/metrics`),
    /// default `127.0.0.1:9470`; the DaemonSet sets the pod's IP so kubelet probes reach it.
    pub http_listen: SocketAddr,
    /// `host_ip`: the node's IP, reported as each process's `host_ip`; empty means found from
    /// the interfaces. Needed in a pod without the host's network (the DaemonSet sets the
    /// downward API's `status.hostIP`): the pod's own interfaces hold the pod's IP.
    pub host_ip: Option<IpAddr>,
}

const MIB: u64 = 1024 * 1024;

/// `rover_rs.http_listen`'s default: loopback only, so nothing is exposed unless asked for.
pub const DEFAULT_HTTP_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9470);

impl Settings {
    /// Reads and validates the file at `path`, substituting from the process environment.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let yaml = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&yaml, &|name| std::env::var(name).ok())
    }

    /// Validates a configuration text; `env` looks up the variables of `${ENV:default}`.
    pub fn parse(yaml: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Loaded, ConfigError> {
        let mut doc: Value = serde_yaml::from_str(yaml).map_err(ConfigError::Yaml)?;
        doc.apply_merge().map_err(ConfigError::Yaml)?;
        let mut cx = Cx {
            env,
            warnings: Vec::new(),
        };
        let mut top = Node::root(&doc).map()?;

        let mut logger = top.section("logger")?;
        let log_level = logger
            .scalar(
                &mut cx,
                "level",
                "one of trace, debug, info, warn, error, fatal, panic",
                parse_level,
            )?
            .unwrap_or(LevelFilter::INFO);
        logger.finish()?;

        let mut core = top.section("core")?;
        let cluster_name = core
            .string(&mut cx, "cluster_name")?
            .filter(|s| !s.trim().is_empty());
        let backend = backend(&mut cx, core.section("backend")?)?;
        core.finish()?;

        let discovery = discovery(&mut cx, top.section("process_discovery")?)?;
        let profiling = profiling(&mut cx, top.section("profiling")?)?;
        for section in ["access_log", "pprof"] {
            if top.get(section)?.is_some() {
                cx.warnings
                    .push(format!("{section}: not supported by rover-rs, ignored"));
            }
        }
        let rover_rs = rover_rs(&mut cx, top.section("rover_rs")?)?;
        top.finish()?;

        Ok(Loaded {
            settings: Settings {
                log_level,
                cluster_name,
                backend,
                discovery,
                profiling,
                rover_rs,
            },
            warnings: cx.warnings,
        })
    }
}

/// logrus's `ParseLevel`: case-insensitive, `warning` is `warn`.
fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::TRACE,
        "debug" => LevelFilter::DEBUG,
        "info" => LevelFilter::INFO,
        "warn" | "warning" => LevelFilter::WARN,
        "error" | "fatal" | "panic" => LevelFilter::ERROR,
        _ => return None,
    })
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

fn backend(cx: &mut Cx, mut b: Map) -> Result<BackendSettings, ConfigError> {
    let addr = b
        .scalar(
            cx,
            "addr",
            "host:port (a host name, an IPv4 address or a [bracketed] IPv6 address, and a port)",
            BackendAddr::parse,
        )?
        .unwrap_or_else(|| BackendAddr {
            host: "localhost".into(),
            port: 11800,
        });
    let enable_tls = b.bool(cx, "enable_TLS")?.unwrap_or(false);
    let pem = non_empty(b.string(cx, "client_pem_path")?);
    let key = non_empty(b.string(cx, "client_key_path")?);
    let ca = non_empty(b.string(cx, "ca_pem_path")?);
    let insecure_skip_verify = b.bool(cx, "insecure_skip_verify")?.unwrap_or(false);
    let check_period = b
        .scalar(
            cx,
            "check_period",
            "whole seconds or a duration, greater than zero",
            |s| {
                parse_u64(s)
                    .map(Duration::from_secs)
                    .or_else(|| parse_duration(s))
                    .filter(|d| !d.is_zero())
            },
        )?
        .unwrap_or(Duration::from_secs(5));
    let authentication = non_empty(b.string(cx, "authentication")?);
    b.finish()?;

    let tls = if enable_tls {
        let client = match (pem, key) {
            (Some(pem), Some(key)) => Some(ClientCertSettings {
                pem_path: pem.into(),
                key_path: key.into(),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ConfigError::Incomplete {
                    set: "core.backend.client_pem_path".into(),
                    missing: "core.backend.client_key_path".into(),
                });
            }
            (None, Some(_)) => {
                return Err(ConfigError::Incomplete {
                    set: "core.backend.client_key_path".into(),
                    missing: "core.backend.client_pem_path".into(),
                });
            }
        };
        Some(TlsSettings {
            ca_pem_path: ca.map(PathBuf::from),
            client,
            insecure_skip_verify,
        })
    } else {
        None
    };
    Ok(BackendSettings {
        addr,
        tls,
        check_period,
        authentication,
    })
}

fn discovery(cx: &mut Cx, mut d: Map) -> Result<DiscoverySettings, ConfigError> {
    let heartbeat_period = d
        .duration(cx, "heartbeat_period")?
        .unwrap_or(Duration::from_secs(20));
    let properties_report_period = d
        .scalar(
            cx,
            "properties_report_period",
            "a whole number, at least 1",
            parse_count,
        )?
        .unwrap_or(10);
    let scanner = match d.get("scanner")? {
        Some(node) => scanner(cx, node.map()?)?,
        None => None,
    };
    let kubernetes = kubernetes(cx, d.section("kubernetes")?)?;
    d.finish()?;
    Ok(DiscoverySettings {
        heartbeat_period,
        properties_report_period,
        scanner,
        kubernetes,
    })
}

/// Rover 0.5.0's scanner modes.
enum ScanMode {
    Regex,
    AgentSensor,
}

fn scanner(cx: &mut Cx, mut s: Map) -> Result<Option<ScannerSettings>, ConfigError> {
    let period = s.duration(cx, "period")?.unwrap_or(Duration::from_secs(3));
    // A missing mode is REGEX, the one mode rover-rs runs (Rover requires the key).
    let mode = s
        .scalar(cx, "mode", "REGEX or AGENT_SENSOR", |m| {
            if m.eq_ignore_ascii_case("REGEX") {
                Some(ScanMode::Regex)
            } else if m.eq_ignore_ascii_case("AGENT_SENSOR") {
                Some(ScanMode::AgentSensor)
            } else {
                None
            }
        })?
        .unwrap_or(ScanMode::Regex);
    let agent = s.get("agent")?;
    let regex = s.get("regex")?;
    s.finish()?;
    match mode {
        ScanMode::AgentSensor => {
            cx.warnings.push(
                "process_discovery.scanner.mode: AGENT_SENSOR is not supported by rover-rs, \
                 the scanner is off"
                    .into(),
            );
            Ok(None)
        }
        ScanMode::Regex => {
            if agent.is_some() {
                cx.warnings.push(
                    "process_discovery.scanner.agent: not supported by rover-rs, ignored".into(),
                );
            }
            let items = match &regex {
                Some(node) => node.list()?,
                None => Vec::new(),
            };
            if items.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "process_discovery.scanner.regex".into(),
                    value: "no rules".into(),
                    expected: "at least one rule when the scanner's mode is REGEX".into(),
                });
            }
            let rules = items
                .iter()
                .map(|node| host_rule(cx, node))
                .collect::<Result<_, _>>()?;
            Ok(Some(ScannerSettings { period, rules }))
        }
    }
}

fn host_rule(cx: &mut Cx, node: &Node) -> Result<HostRuleSettings, ConfigError> {
    let mut r = node.map()?;
    let match_cmd = r.string(cx, "match_cmd")?.unwrap_or_default();
    let match_key = format!("{}.match_cmd", node.path);
    if match_cmd.is_empty() {
        return Err(ConfigError::Invalid {
            key: match_key,
            value: match_cmd,
            expected: "a regular expression matched against the command line".into(),
        });
    }
    let match_cmd = regex::Regex::new(&match_cmd).map_err(|e| ConfigError::Invalid {
        key: match_key,
        value: match_cmd.clone(),
        expected: format!("a valid regular expression ({e})"),
    })?;
    let layer = non_empty(r.string(cx, "layer")?).unwrap_or_else(|| "OS_LINUX".into());
    let service_name =
        non_empty(r.string(cx, "service_name")?).ok_or_else(|| ConfigError::Invalid {
            key: format!("{}.service_name", node.path),
            value: String::new(),
            expected: "a service name template, such as {{.Process.ExeName}} (Rover requires one)"
                .into(),
        })?;
    let instance_name = non_empty(r.string(cx, "instance_name")?)
        .unwrap_or_else(|| r#"{{.Rover.HostIPV4 "en0"}}"#.into());
    let process_name =
        non_empty(r.string(cx, "process_name")?).unwrap_or_else(|| "{{.Process.ExeName}}".into());
    let labels = comma_list(&r.string(cx, "labels")?.unwrap_or_default());
    r.finish()?;
    Ok(HostRuleSettings {
        match_cmd,
        layer,
        service_name,
        instance_name,
        process_name,
        labels,
    })
}

fn kubernetes(cx: &mut Cx, mut k: Map) -> Result<KubernetesSettings, ConfigError> {
    let active = k.bool(cx, "active")?.unwrap_or(false);
    let node_name = non_empty(k.string(cx, "node_name")?);
    let namespaces = comma_list(&k.string(cx, "namespaces")?.unwrap_or_default());
    let mut analyzers = Vec::new();
    if let Some(node) = k.get("analyzers")? {
        for item in node.list()? {
            let mut a = item.map()?;
            let active = a.bool(cx, "active")?.unwrap_or(false);
            let mut filters = Vec::new();
            if let Some(f) = a.get("filters")? {
                for filter in f.list()? {
                    filters.push(filter.text(cx)?.unwrap_or_default());
                }
            }
            let analyzer = KubernetesAnalyzerSettings {
                active,
                filters,
                layer: a.string(cx, "layer")?.unwrap_or_default(),
                service_name: a.string(cx, "service_name")?.unwrap_or_default(),
                instance_name: a.string(cx, "instance_name")?.unwrap_or_default(),
                process_name: a.string(cx, "process_name")?.unwrap_or_default(),
                labels: comma_list(&a.string(cx, "labels")?.unwrap_or_default()),
            };
            a.finish()?;
            analyzers.push(analyzer);
        }
    }
    k.finish()?;
    Ok(KubernetesSettings {
        active,
        node_name,
        namespaces,
        analyzers,
    })
}

fn profiling(cx: &mut Cx, mut p: Map) -> Result<ProfilingSettings, ConfigError> {
    let active = p.bool(cx, "active")?.unwrap_or(true);
    let check_interval = p
        .duration(cx, "check_interval")?
        .unwrap_or(Duration::from_secs(10));
    let flush_interval = p
        .duration(cx, "flush_interval")?
        .unwrap_or(Duration::from_secs(5));

    let mut task = p.section("task")?;
    let mut on_cpu = task.section("on_cpu")?;
    let range = Duration::from_millis(1)..=Duration::from_secs(1);
    let on_cpu_dump_period = on_cpu
        .scalar(cx, "dump_period", "a duration between 1ms and 1s", |s| {
            parse_duration(s).filter(|d| range.contains(d))
        })?
        .unwrap_or(Duration::from_millis(9));
    on_cpu.finish()?;
    if task.get("network")?.is_some() {
        cx.warnings
            .push("profiling.task.network: not supported by rover-rs, ignored".into());
    }
    task.finish()?;

    let mut c = p.section("continuous")?;
    let meter_prefix =
        non_empty(c.string(cx, "meter_prefix")?).unwrap_or_else(|| "rover_con_p".into());
    let fetch_interval = c
        .duration(cx, "fetch_interval")?
        .unwrap_or(Duration::from_secs(1));
    let continuous_check = c
        .duration(cx, "check_interval")?
        .unwrap_or(Duration::from_secs(5));
    let mut trigger = c.section("trigger")?;
    let execute_duration = trigger
        .duration(cx, "execute_duration")?
        .unwrap_or(Duration::from_secs(600));
    let silence_duration = trigger
        .duration(cx, "silence_duration")?
        .unwrap_or(Duration::from_secs(1200));
    trigger.finish()?;
    c.finish()?;
    p.finish()?;

    Ok(ProfilingSettings {
        active,
        check_interval,
        flush_interval,
        on_cpu_dump_period,
        continuous: ContinuousSettings {
            meter_prefix,
            fetch_interval,
            check_interval: continuous_check,
            execute_duration,
            silence_duration,
        },
    })
}

fn rover_rs(cx: &mut Cx, mut r: Map) -> Result<RoverRsSettings, ConfigError> {
    let off_cpu_sample_probability = r
        .scalar(
            cx,
            "off_cpu_sample_probability",
            "a probability p with 0 < p <= 1",
            |s| s.parse::<f64>().ok().filter(|p| *p > 0.0 && *p <= 1.0),
        )?
        .unwrap_or(1.0);
    let bytes = "a byte size greater than zero, such as 32MiB";
    let map_memory = r
        .scalar(cx, "map_memory", bytes, |s| {
            parse_bytes(s).filter(|b| *b > 0)
        })?
        .unwrap_or(32 * MIB);
    let max_targets = r
        .scalar(cx, "max_targets", "a whole number, at least 1", parse_count)?
        .unwrap_or(1024);
    let upload_buffer = r
        .scalar(cx, "upload_buffer", bytes, |s| {
            parse_bytes(s).filter(|b| *b > 0)
        })?
        .unwrap_or(16 * MIB);
    let shutdown_deadline = r
        .scalar(
            cx,
            "shutdown_deadline",
            "a duration such as 5s (0 for none)",
            parse_duration,
        )?
        .unwrap_or(Duration::from_secs(5));
    let max_triggered_runs = r
        .scalar(
            cx,
            "max_triggered_runs",
            "a whole number, at least 1",
            parse_count,
        )?
        .unwrap_or(10);
    let http_listen = r
        .scalar(
            cx,
            "http_listen",
            "an IP address and a port, such as 127.0.0.1:9470 or [::1]:9470",
            |s| s.parse::<SocketAddr>().ok(),
        )?
        .unwrap_or(DEFAULT_HTTP_LISTEN);
    let host_ip = r.scalar(
        cx,
        "host_ip",
        "an IPv4 or IPv6 address (empty: found from the interfaces)",
        |s| s.parse::<IpAddr>().ok(),
    )?;
    r.finish()?;
    Ok(RoverRsSettings {
        off_cpu_sample_probability,
        map_memory,
        max_targets,
        upload_buffer,
        shutdown_deadline,
        max_triggered_runs,
        http_listen,
        host_ip,
    })
}

#[cfg(test)]
mod tests;
