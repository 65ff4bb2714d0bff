//! `rover-agent run` as a child process for end-to-end tests against the fake OAP: a YAML
//! configuration written into a temporary directory ([`NodeConfig`]), the agent's stderr captured
//! in a file, and a guard ([`NodeAgent`]) that stops the agent with SIGTERM (then SIGKILL) when
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

/// The settings the tests vary; everything else is the agent's default. Periods are short so
/// that a test sees several heartbeats, polls and flushes within seconds.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `core.backend.addr` as written in the file (may be a `${ENV:default}` placeholder).
    pub addr: String,
    /// Further lines under `core.backend`, e.g. `authentication: token` (no indentation).
    pub backend_extra: Vec<String>,
    pub rules: Vec<HostRule>,
    pub heartbeat_period: String,
    pub properties_report_period: u32,
    pub scan_period: String,
    pub check_interval: String,
    pub flush_interval: String,
    pub dump_period: String,
    pub upload_buffer: Option<String>,
    pub shutdown_deadline: String,
    pub log_level: String,
}

impl NodeConfig {
    /// Talks to `fake` (plaintext), finds processes by `rules`.
    pub fn new(fake: &FakeOap, rules: Vec<HostRule>) -> Self {
        Self {
            addr: fake.addr().to_string(),
            backend_extra: Vec::new(),
            rules,
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
        }
    }

    pub fn yaml(&self) -> String {
        let mut yaml = String::new();
        let quoted = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let _ = writeln!(yaml, "logger:\n  level: {}", self.log_level);
        let _ = writeln!(yaml, "core:\n  backend:\n    addr: {}", self.addr);
        for line in &self.backend_extra {
            let _ = writeln!(yaml, "    {line}");
        }
        let _ = writeln!(
            yaml,
            "process_discovery:\n  heartbeat_period: {}\n  properties_report_period: {}\n  \
             scanner:\n    period: {}\n    regex:",
            self.heartbeat_period, self.properties_report_period, self.scan_period
        );
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
        let _ = writeln!(
            yaml,
            "profiling:\n  check_interval: {}\n  flush_interval: {}\n  task:\n    on_cpu:\n      \
             dump_period: {}",
            self.check_interval, self.flush_interval, self.dump_period
        );
        let _ = writeln!(
            yaml,
            "rover_rs:\n  shutdown_deadline: {}",
            self.shutdown_deadline
        );
        if let Some(bound) = &self.upload_buffer {
            let _ = writeln!(yaml, "  upload_buffer: {bound}");
        }
        yaml
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
    /// Writes `config` to a file and starts `rover-agent run --config FILE` with `env` added.
    pub fn start(config: &NodeConfig, env: &[(&str, &str)]) -> Self {
        Self::start_yaml(&config.yaml(), env)
    }

    /// Like [`start`](Self::start) with the configuration text as given.
    pub fn start_yaml(yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("rover.yaml");
        std::fs::write(&config_path, yaml).expect("writing the agent's configuration");
        let stderr_path = dir.path().join("agent.stderr");
        let stderr = File::create(&stderr_path).expect("agent stderr file");
        let mut command = crate::agent();
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        // The configured level, colourless logs for substring checks.
        command.env_remove("RUST_LOG").env("NO_COLOR", "1");
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
