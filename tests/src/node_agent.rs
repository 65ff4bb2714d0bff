//! `rover-agent run` as a child process for end-to-end tests against the fake OAP: a YAML
//! configuration written into a temporary directory ([`NodeConfig`], with host rules and,
//! optionally, Kubernetes discovery: [`KubernetesConfig`]), the agent's stderr captured in a
//! file, and a guard ([`NodeAgent`]) that stops the agent with SIGTERM (then SIGKILL) when
//! dropped.

use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::fake_oap::FakeOap;

/// A `process_discovery.scanner.regex[]` entry.
#[derive(Clone, Debug)]
pub struct HostRule {
    pub match_cmd: String,
    pub layer: String,
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    /// Comma-separated.
    pub labels: String,
}

impl HostRule {
    /// A rule matching `match_cmd`, layer `OS_LINUX`, instance `{{.Rover.HostName}}`, process
    /// `{{.Process.ExeName}}`, label `e2e`.
    pub fn new(match_cmd: &str, service_name: &str) -> Self {
        Self {
            match_cmd: match_cmd.to_owned(),
            layer: "OS_LINUX".to_owned(),
            service_name: service_name.to_owned(),
            instance_name: "{{.Rover.HostName}}".to_owned(),
            process_name: "{{.Process.ExeName}}".to_owned(),
            labels: "e2e".to_owned(),
        }
    }
}

/// `process_discovery.kubernetes`: the pods of one node, from the API server a kubeconfig
/// names (passed to the agent as `KUBECONFIG`).
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    pub node_name: String,
    /// Empty for every namespace.
    pub namespaces: Vec<String>,
    /// The `analyzers` list as YAML, each line indented by six spaces (as in
    /// `configs/rover.yaml`).
    pub analyzers: String,
    pub kubeconfig: PathBuf,
}

impl KubernetesConfig {
    /// The pods of `node_name` in every namespace, named by the analyzers shipped in
    /// `configs/rover.yaml` ([`shipped_analyzers`](Self::shipped_analyzers)).
    pub fn new(node_name: &str, kubeconfig: &Path) -> Self {
        Self {
            node_name: node_name.to_owned(),
            namespaces: Vec::new(),
            analyzers: Self::shipped_analyzers(),
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// The `process_discovery.kubernetes.analyzers` list of `configs/rover.yaml`, verbatim (its
    /// `${ENV:default}` placeholders take their defaults in the agent), so that tests check the
    /// analyzers users get.
    pub fn shipped_analyzers() -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/rover.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        let mut lines = text.lines();
        lines
            .by_ref()
            .find(|line| *line == "  kubernetes:")
            .unwrap_or_else(|| panic!("no process_discovery.kubernetes in {}", path.display()));
        lines
            .by_ref()
            .find(|line| *line == "    analyzers:")
            .unwrap_or_else(|| panic!("no kubernetes.analyzers in {}", path.display()));
        // The list runs until the next line indented less than its items (six spaces).
        let mut analyzers = String::new();
        for line in lines.take_while(|line| line.trim().is_empty() || line.starts_with("      ")) {
            analyzers.push_str(line);
            analyzers.push('\n');
        }
        assert!(
            analyzers.contains("- active:"),
            "no analyzers found in {}",
            path.display()
        );
        analyzers
    }
}

/// `profiling.continuous` and `rover_rs.max_triggered_runs`, as written in the file.
#[derive(Clone, Debug)]
pub struct ContinuousConfig {
    pub fetch_interval: String,
    pub check_interval: String,
    pub execute_duration: String,
    pub silence_duration: String,
    pub meter_prefix: String,
    pub max_triggered_runs: u32,
}

impl Default for ContinuousConfig {
    /// Checks every second, runs of 5 s, a silence of a minute (no second trigger within a
    /// test).
    fn default() -> Self {
        Self {
            fetch_interval: "1s".to_owned(),
            check_interval: "1s".to_owned(),
            execute_duration: "5s".to_owned(),
            silence_duration: "60s".to_owned(),
            meter_prefix: "rover_con_p".to_owned(),
            max_triggered_runs: 10,
        }
    }
}

/// The settings the tests vary; everything else is the agent's default. Periods are short so
/// that a test sees several heartbeats, polls and flushes within seconds.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `core.backend.addr` as written in the file (may be a `${ENV:default}` placeholder).
    pub addr: String,
    /// `core.cluster_name`.
    pub cluster_name: Option<String>,
    /// Further lines under `core.backend`, e.g. `authentication: token` (no indentation).
    pub backend_extra: Vec<String>,
    /// Host rules; without any, the scanner section is left out.
    pub rules: Vec<HostRule>,
    pub kubernetes: Option<KubernetesConfig>,
    pub heartbeat_period: String,
    pub properties_report_period: u32,
    pub scan_period: String,
    pub check_interval: String,
    pub flush_interval: String,
    pub dump_period: String,
    pub upload_buffer: Option<String>,
    pub shutdown_deadline: String,
    pub log_level: String,
    /// `profiling.continuous`; the agent's defaults when `None`.
    pub continuous: Option<ContinuousConfig>,
    /// `rover_rs.http_listen`: by default a port the system picks, so that agents of several
    /// tests (or a developer's agent on the default port) never collide; the agent logs it
    /// ([`NodeAgent::http_address`]).
    pub http_listen: String,
}

impl NodeConfig {
    /// Talks to `fake` (plaintext), finds processes by `rules`.
    pub fn new(fake: &FakeOap, rules: Vec<HostRule>) -> Self {
        Self {
            addr: fake.addr().to_string(),
            cluster_name: None,
            backend_extra: Vec::new(),
            rules,
            kubernetes: None,
            heartbeat_period: "1s".to_owned(),
            properties_report_period: 10,
            scan_period: "500ms".to_owned(),
            check_interval: "1s".to_owned(),
            flush_interval: "1s".to_owned(),
            // 99 Hz: see FREQUENCY_HZ in tests/node_agent.rs.
            dump_period: "10.1ms".to_owned(),
            upload_buffer: None,
            shutdown_deadline: "5s".to_owned(),
            log_level: "info".to_owned(),
            continuous: None,
            http_listen: "127.0.0.1:0".to_owned(),
        }
    }

    pub fn yaml(&self) -> String {
        let mut yaml = String::new();
        let quoted = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let _ = writeln!(yaml, "logger:\n  level: {}", self.log_level);
        let _ = writeln!(yaml, "core:");
        if let Some(cluster_name) = &self.cluster_name {
            let _ = writeln!(yaml, "  cluster_name: {}", quoted(cluster_name));
        }
        let _ = writeln!(yaml, "  backend:\n    addr: {}", self.addr);
        for line in &self.backend_extra {
            let _ = writeln!(yaml, "    {line}");
        }
        let _ = writeln!(
            yaml,
            "process_discovery:\n  heartbeat_period: {}\n  properties_report_period: {}",
            self.heartbeat_period, self.properties_report_period
        );
        if !self.rules.is_empty() {
            let _ = writeln!(
                yaml,
                "  scanner:\n    period: {}\n    regex:",
                self.scan_period
            );
        }
        for rule in &self.rules {
            let _ = writeln!(
                yaml,
                "      - match_cmd: {}\n        layer: {}\n        service_name: {}\n        \
                 instance_name: {}\n        process_name: {}\n        labels: {}",
                quoted(&rule.match_cmd),
                rule.layer,
                quoted(&rule.service_name),
                quoted(&rule.instance_name),
                quoted(&rule.process_name),
                quoted(&rule.labels),
            );
        }
        if let Some(kubernetes) = &self.kubernetes {
            let _ = writeln!(
                yaml,
                "  kubernetes:\n    active: true\n    node_name: {}\n    namespaces: {}\n    \
                 analyzers:\n{}",
                quoted(&kubernetes.node_name),
                quoted(&kubernetes.namespaces.join(",")),
                kubernetes.analyzers.trim_end()
            );
        }
        let _ = writeln!(
            yaml,
            "profiling:\n  check_interval: {}\n  flush_interval: {}\n  task:\n    on_cpu:\n      \
             dump_period: {}",
            self.check_interval, self.flush_interval, self.dump_period
        );
        if let Some(continuous) = &self.continuous {
            let _ = writeln!(
                yaml,
                "  continuous:\n    meter_prefix: {}\n    fetch_interval: {}\n    \
                 check_interval: {}\n    trigger:\n      execute_duration: {}\n      \
                 silence_duration: {}",
                quoted(&continuous.meter_prefix),
                continuous.fetch_interval,
                continuous.check_interval,
                continuous.execute_duration,
                continuous.silence_duration
            );
        }
        let _ = writeln!(
            yaml,
            "rover_rs:\n  shutdown_deadline: {}\n  http_listen: '{}'",
            self.shutdown_deadline, self.http_listen
        );
        if let Some(continuous) = &self.continuous {
            let _ = writeln!(
                yaml,
                "  max_triggered_runs: {}",
                continuous.max_triggered_runs
            );
        }
        if let Some(bound) = &self.upload_buffer {
            let _ = writeln!(yaml, "  upload_buffer: {bound}");
        }
        yaml
    }

    /// The environment the configuration needs: `KUBECONFIG` with Kubernetes discovery.
    pub fn env(&self) -> Vec<(String, String)> {
        self.kubernetes
            .iter()
            .map(|kubernetes| {
                (
                    "KUBECONFIG".to_owned(),
                    kubernetes.kubeconfig.display().to_string(),
                )
            })
            .collect()
    }
}

/// A running `rover-agent run`; SIGTERM then SIGKILL when dropped.
pub struct NodeAgent {
    child: Child,
    status: Option<ExitStatus>,
    stderr_path: PathBuf,
    config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeAgent {
    /// Writes `config` to a file and starts `rover-agent run --config FILE` with the
    /// configuration's environment ([`NodeConfig::env`]) and `env` added.
    pub fn start(config: &NodeConfig, env: &[(&str, &str)]) -> Self {
        Self::start_with(crate::agent_binary(), config, env)
    }

    /// Like [`start`](Self::start) with the agent binary at `binary` (a benchmark's release
    /// build).
    pub fn start_with(binary: &Path, config: &NodeConfig, env: &[(&str, &str)]) -> Self {
        let config_env = config.env();
        let mut all: Vec<(&str, &str)> = config_env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        all.extend_from_slice(env);
        Self::start_binary_yaml(binary, &config.yaml(), &all)
    }

    /// Like [`start`](Self::start) with the configuration text as given.
    pub fn start_yaml(yaml: &str, env: &[(&str, &str)]) -> Self {
        Self::start_binary_yaml(crate::agent_binary(), yaml, env)
    }

    fn start_binary_yaml(binary: &Path, yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("rover.yaml");
        std::fs::write(&config_path, yaml).expect("writing the agent's configuration");
        let stderr_path = dir.path().join("agent.stderr");
        let stderr = File::create(&stderr_path).expect("agent stderr file");
        let mut command = std::process::Command::new(binary);
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // The configured level, colourless logs for substring checks; no Kubernetes API server
        // but the one a test names.
        command
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env("NO_COLOR", "1");
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|error| panic!("starting rover-agent run: {error}"));
        Self {
            child,
            status: None,
            stderr_path,
            config_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// What the agent printed to stderr so far, without terminal colour codes.
    pub fn stderr(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.stderr_path).unwrap_or_default())
    }

    /// The exit status, if the agent has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("waiting for the agent");
        }
        self.status
    }

    /// Panics (with the agent's log and what the fake recorded) if the agent has exited.
    pub fn assert_running(&mut self, fake: &FakeOap) {
        if let Some(status) = self.exited() {
            panic!("rover-agent exited ({status})\n{}", self.context(fake));
        }
    }

    /// Waits at most `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (no status yet).
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// Waits at most `timeout` for a line of the agent's log containing every one of `parts`.
    pub fn wait_for_log(&mut self, parts: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self
                .stderr()
                .lines()
                .find(|line| parts.iter().all(|part| line.contains(part)))
                .map(str::to_owned);
            if found.is_some() {
                return found;
            }
            if Instant::now() >= deadline || self.exited().is_some() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The address of the agent's HTTP endpoint, from its log (waiting at most `timeout`).
    pub fn http_address(&mut self, timeout: Duration) -> Option<std::net::SocketAddr> {
        let line = self.wait_for_log(&["HTTP endpoint listening"], timeout)?;
        let (_, after) = line.split_once("address=")?;
        after.split_whitespace().next()?.parse().ok()
    }

    /// The agent's log and what `fake` recorded, for failure messages.
    pub fn context(&self, fake: &FakeOap) -> String {
        format!(
            "--- fake OAP recorded: {}\n--- rover-agent stderr:\n{}",
            fake.recorded(),
            self.stderr()
        )
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        self.terminate();
        if self.wait_exit(Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Takes the machine lock and builds the agent before any workload starts (the first build
/// takes minutes, longer than a workload runs).
pub fn prepare() -> crate::MachineLock {
    let lock = crate::machine_lock();
    crate::agent_binary();
    lock
}

/// A token no other process has on its command line, for host rules to match.
pub fn token(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!("e2e-{tag}-{}-{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rover_agent::config::Settings;

    #[test]
    fn a_kubernetes_configuration_is_what_the_agent_reads_with_the_shipped_analyzers() {
        let fake = FakeOap::start().expect("fake OAP");
        let mut config = NodeConfig::new(&fake, Vec::new());
        config.cluster_name = Some("e2e-cluster".to_owned());
        config.kubernetes = Some(KubernetesConfig {
            namespaces: vec!["shop".to_owned(), "mesh".to_owned()],
            ..KubernetesConfig::new("e2e-node", Path::new("/tmp/kubeconfig"))
        });
        let settings = Settings::parse(&config.yaml(), &|_| None)
            .unwrap_or_else(|error| panic!("{error}\n{}", config.yaml()))
            .settings;
        assert_eq!(settings.cluster_name.as_deref(), Some("e2e-cluster"));
        assert!(settings.discovery.scanner.is_none(), "no rules, no scanner");
        let kubernetes = &settings.discovery.kubernetes;
        assert!(kubernetes.active);
        assert_eq!(kubernetes.node_name.as_deref(), Some("e2e-node"));
        assert_eq!(kubernetes.namespaces, ["shop", "mesh"]);

        // The same analyzers as the shipped file gives the agent.
        let shipped_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/rover.yaml");
        let shipped = std::fs::read_to_string(shipped_path).expect("configs/rover.yaml");
        let shipped = Settings::parse(&shipped, &|_| None).expect("shipped configuration");
        let shipped = &shipped.settings.discovery.kubernetes.analyzers;
        assert_eq!(shipped.len(), 4);
        assert_eq!(&kubernetes.analyzers, shipped);
        let layers: Vec<&str> = shipped.iter().map(|a| a.layer.as_str()).collect();
        assert_eq!(layers, ["MESH_DP", "MESH", "K8S_SERVICE", "K8S_SERVICE"]);

        assert_eq!(
            config.env(),
            [("KUBECONFIG".to_owned(), "/tmp/kubeconfig".to_owned())]
        );
    }

    #[test]
    fn a_continuous_configuration_is_what_the_agent_reads() {
        let fake = FakeOap::start().expect("fake OAP");
        let mut config = NodeConfig::new(&fake, Vec::new());
        config.continuous = Some(ContinuousConfig {
            meter_prefix: "e2e_p".to_owned(),
            max_triggered_runs: 3,
            ..ContinuousConfig::default()
        });
        let settings = Settings::parse(&config.yaml(), &|_| None)
            .unwrap_or_else(|error| panic!("{error}\n{}", config.yaml()))
            .settings;
        let continuous = &settings.profiling.continuous;
        assert_eq!(continuous.meter_prefix, "e2e_p");
        assert_eq!(continuous.fetch_interval, Duration::from_secs(1));
        assert_eq!(continuous.check_interval, Duration::from_secs(1));
        assert_eq!(continuous.execute_duration, Duration::from_secs(5));
        assert_eq!(continuous.silence_duration, Duration::from_secs(60));
        assert_eq!(settings.rover_rs.max_triggered_runs, 3);
    }
}
