//! The agent's configuration file (Rover's key layout), validated once at start into typed
//! settings; each module gets only its own part.

use std::time::Duration;

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
