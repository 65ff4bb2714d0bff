//! Shared by the integration tests: BPF availability, serialization of tests that measure the
//! machine, the workloads with known ground truth, the agent binary, folded-output parsing,
//! a fake SkyWalking OAP ([`fake_oap`]) for end-to-end tests and the demo, a fake Kubernetes API
//! server ([`fake_kube`]) and real cgroups shaped like a Kubernetes node's ([`cgroups`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use rover_agent::bpf::{DEFAULT_MAP_MEMORY_BYTES, ProfilerSettings, check_privilege};
use rover_agent::symbolize::{DEFAULT_SYMBOL_CACHE_BYTES, SymbolizerConfig};
use rover_agent::task::{AgentConfig, ProfileWindow, WindowSink};

pub mod cgroups;
pub mod cpu_time;
pub mod dockerfile;
pub mod fake_kube;
pub mod fake_oap;
pub mod manifests;
pub mod node_agent;
pub mod pprof;

/// An agent configuration for library-API tests: `frequency_hz`, exact off-CPU, drains every
/// `drain_interval`.
pub fn agent_config(frequency_hz: u64, drain_interval: Duration) -> AgentConfig {
    AgentConfig {
        profilers: ProfilerSettings {
            frequency_hz,
            off_cpu_sample_probability: 1.0,
            drain_interval,
            map_memory_bytes: DEFAULT_MAP_MEMORY_BYTES,
            max_targets: 1024,
        },
        symbolizer: SymbolizerConfig {
            debug_info: false,
            symbol_cache_bytes: DEFAULT_SYMBOL_CACHE_BYTES,
        },
        exited_process_grace: Duration::from_secs(60),
    }
}

/// A task of `kind` on `targets` with default options, handing a window every `window`.
pub fn task_spec(
    kind: rover_agent::bpf::ProfilerKind,
    targets: rover_agent::bpf::Targets,
    window: Option<Duration>,
) -> rover_agent::task::TaskSpec {
    rover_agent::task::TaskSpec {
        kind,
        targets,
        options: rover_agent::bpf::TargetOptions::default(),
        window,
    }
}

/// A sink that keeps every window it is handed, for the test to read.
#[derive(Clone, Default)]
pub struct Windows(pub std::sync::Arc<std::sync::Mutex<Vec<ProfileWindow>>>);

impl WindowSink for Windows {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()> {
        self.0
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(window);
        Ok(())
    }
}

impl Windows {
    pub fn take(&self) -> Vec<ProfileWindow> {
        std::mem::take(&mut *self.0.lock().expect("windows"))
    }
}

/// A current-thread tokio runtime for tests that drive the library API.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Whether BPF can be used here. Outside CI a test that needs it returns early after a loud
/// message; with `CI=true` it fails instead, so a broken CI machine cannot pass silently.
pub fn bpf_available(test: &str) -> bool {
    let problem = match check_privilege() {
        Ok(privilege) => privilege.missing(),
        Err(error) => Some(format!("cannot read capabilities: {error}")),
    };
    let Some(problem) = problem else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} needs BPF, which is unavailable in CI: {problem}");
    }
    eprintln!("\n*** SKIPPING {test}: it needs BPF ({problem}); run as root ***\n");
    false
}

/// Holds an exclusive lock for tests that load BPF programs or measure the machine, so they
/// never run beside each other (in this binary or another one).
pub struct MachineLock(#[expect(dead_code, reason = "held for its lock")] File);

pub fn machine_lock() -> MachineLock {
    let path = std::env::temp_dir().join("rover-rs-integration-tests.lock");
    let file =
        File::create(&path).unwrap_or_else(|error| panic!("creating {}: {error}", path.display()));
    file.lock()
        .unwrap_or_else(|error| panic!("locking {}: {error}", path.display()));
    MachineLock(file)
}

/// Path of a workload built by build.rs.
pub fn workload_path(name: &str) -> PathBuf {
    Path::new(env!("WORKLOAD_DIR")).join(name)
}

/// A running workload, killed when dropped.
pub struct Workload {
    child: Child,
}

impl Workload {
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        let child = Command::new(workload_path(name))
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting workload {name}: {error}"));
        // Let it get past exec and the dynamic loader before profiling starts.
        std::thread::sleep(Duration::from_millis(200));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the workload to exit by itself.
    pub fn wait(mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rover-agent binary, built (once per test binary) with the profile of these tests.
pub fn agent_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| workspace_binary("rover-agent", "rover-agent"))
}

/// Builds binary `bin` of workspace package `package` with the profile of these tests.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let mut build = escargot::CargoBuild::new()
        .package(package)
        .bin(bin)
        .manifest_path(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    if !cfg!(debug_assertions) {
        build = build.release();
    }
    // `cargo test` sets these for the test binary (they describe the tests crate). Passed on
    // to this build, they differ from what `cargo test` itself ran with, and build scripts
    // that watch them (ring's watches OUT_DIR and CARGO_PKG_NAME) rerun: every later
    // `cargo test` and this build would then rebuild ring and all above it, for minutes.
    // `cargo xtask test` strips the same ones from its `cargo test`.
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(describes_running_package) {
            build = build.env_remove(key);
        }
    }
    build
        .run()
        .unwrap_or_else(|error| panic!("building {package}: {error}"))
        .path()
        .to_path_buf()
}

/// A variable cargo sets for the package it runs (`cargo run`, `cargo test`).
fn describes_running_package(key: &str) -> bool {
    key == "OUT_DIR"
        || [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

pub fn agent() -> Command {
    Command::new(agent_binary())
}

/// What an agent run printed and returned.
pub struct AgentRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn run_agent(command: &mut Command) -> AgentRun {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    AgentRun {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Folded stacks: `process;frame;...;leaf count` per line.
pub struct Folded {
    pub stacks: Vec<(Vec<String>, u64)>,
}

impl Folded {
    pub fn parse(text: &str) -> Self {
        let stacks = text
            .lines()
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (stack, count) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("folded line without a count: {line}"));
                let count = count
                    .parse()
                    .unwrap_or_else(|_| panic!("folded line with a bad count: {line}"));
                (stack.split(';').map(str::to_owned).collect(), count)
            })
            .collect();
        Self { stacks }
    }

    pub fn read(path: &Path) -> Self {
        let text = std::fs::read_to_string(path)
            .unwrap_or_else(|error| panic!("reading {}: {error}", path.display()));
        Self::parse(&text)
    }

    /// Total of the stacks of process `name` (the root frame).
    pub fn process_total(&self, name: &str) -> u64 {
        self.matching(|stack| stack.first().is_some_and(|root| root == name))
    }

    /// Total of the stacks of which some frame satisfies `frame`.
    pub fn with_frame(&self, frame: impl Fn(&str) -> bool) -> u64 {
        self.matching(|stack| stack.iter().any(|f| frame(f)))
    }

    pub fn matching(&self, stack: impl Fn(&[String]) -> bool) -> u64 {
        self.stacks
            .iter()
            .filter(|(frames, _)| stack(frames))
            .map(|(_, count)| count)
            .sum()
    }

    pub fn total(&self) -> u64 {
        self.stacks.iter().map(|(_, count)| count).sum()
    }
}

impl std::fmt::Display for Folded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (stack, count) in &self.stacks {
            writeln!(f, "{} {count}", stack.join(";"))?;
        }
        Ok(())
    }
}

/// Asserts `actual` is within `tolerance` (a fraction) of `expected`, with context.
pub fn assert_near(
    actual: f64,
    expected: f64,
    tolerance: f64,
    what: &str,
    context: &dyn std::fmt::Display,
) {
    let low = expected * (1.0 - tolerance);
    let high = expected * (1.0 + tolerance);
    assert!(
        (low..=high).contains(&actual),
        "{what}: {actual} is not within ±{:.0}% of {expected} ([{low:.1}, {high:.1}])\n{context}",
        tolerance * 100.0
    );
}

/// `prog_type` values of `/proc/PID/fdinfo` (`enum bpf_prog_type`).
pub mod prog_type {
    pub const PERF_EVENT: u32 = 7;
    pub const RAW_TRACEPOINT: u32 = 17;
    /// BTF tracepoints (`tp_btf`).
    pub const TRACING: u32 = 26;
}

/// The eBPF programs this process holds, counted by `prog_type` (each program once, however
/// many descriptors or links refer to it).
pub fn programs_held() -> std::collections::BTreeMap<u32, usize> {
    let mut programs = std::collections::BTreeMap::<u32, std::collections::BTreeSet<u64>>::new();
    let entries = std::fs::read_dir("/proc/self/fdinfo").expect("reading /proc/self/fdinfo");
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().parse::<u64>().ok())
        };
        if let (Some(kind), Some(id)) = (field("prog_type:"), field("prog_id:")) {
            programs.entry(kind as u32).or_default().insert(id);
        }
    }
    programs
        .into_iter()
        .map(|(kind, ids)| (kind, ids.len()))
        .collect()
}

/// The names of the functions in the stack of `sample` (root first).
pub fn function_names(
    profile: &rover_agent::profile::Profile,
    sample: &rover_agent::profile::Sample,
) -> Vec<String> {
    sample
        .frames
        .iter()
        .map(|&id| profile.frame(id).display_name())
        .collect()
}
