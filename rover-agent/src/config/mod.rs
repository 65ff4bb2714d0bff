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

// TEMP(merge): the config branch defines these; copied so the backend compiles meanwhile.
#[derive(Clone, Debug)]
pub struct BackendSettings {
    pub addr: BackendAddr,
    pub tls: Option<TlsSettings>,
    pub check_period: Duration,
    pub authentication: Option<String>,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendAddr {
    pub host: String,
    pub port: u16,
}
impl std::fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_pem_path: Option<std::path::PathBuf>,
    pub client: Option<ClientCertSettings>,
    pub insecure_skip_verify: bool,
}
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCertSettings {
    pub pem_path: std::path::PathBuf,
    pub key_path: std::path::PathBuf,
}
