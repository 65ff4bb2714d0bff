//! Profiling tasks: a [`TaskSpec`] started on the [`Agent`] records its processes on the shared
//! engine and hands a [`Profile`] per flush window to its [`WindowSink`].
//!
//! Three threads do the work, so that the async side (signals, deadlines, the backend) never
//! waits for any of it: the engine (`bpf/`) drains the kernel and routes stacks by process; the
//! collector symbolizes them and folds each task's window; the process watcher snapshots the
//! memory maps of processes as they fork and exec (and notes their exit), so that a process
//! that lives less than a drain interval still symbolizes.

mod agent;
mod backend_tasks;
mod collector;
pub mod continuous;
mod discovery;
mod http;
mod node;
mod run_counts;
mod stacks;
mod upload_sink;
mod watcher;

pub use agent::{Agent, Task};
pub use discovery::{KubernetesSource, NodeSources};
pub use http::bind_endpoint;
pub use node::run_node;

use std::time::Duration;

use crate::bpf::{Counters, ProfilerKind, ProfilerSettings, TargetOptions, Targets};
use crate::profile::Profile;
use crate::symbolize::{SymbolizeStats, SymbolizerConfig};

/// How the agent runs: what its profilers are loaded with, and how it symbolizes.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub profilers: ProfilerSettings,
    pub symbolizer: SymbolizerConfig,
    /// How long an exited process's memory map is kept, for its stacks drained after it exited.
    pub exited_process_grace: Duration,
}

/// What a task records.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskSpec {
    pub kind: ProfilerKind,
    pub targets: Targets,
    /// Off-CPU: applied by the kernel to each target.
    pub options: TargetOptions,
    /// A window is handed to the sink every this long; `None`: one window for the whole task.
    pub window: Option<Duration>,
}

/// One flush window of a task.
#[derive(Debug)]
pub struct ProfileWindow {
    /// What was recorded for the task's processes in the window (its start and duration set).
    pub profile: Profile,
    /// The profiler's counters over the window (shared by the tasks of its kind).
    pub counters: Counters,
    /// Stacks of the window that ended at an address outside every mapping (marked
    /// `[truncated]`, like those cut at the depth limit, which `counters` counts).
    pub stacks_cut: u64,
    /// The task's last window.
    pub last: bool,
}

/// Where a task's windows go: the file exporters (the CLI), the SkyWalking uploader. Called on
/// the collector thread, in window order; a sink that does slow I/O should hand off.
pub trait WindowSink: Send {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()>;
}

/// What a running task learns besides its windows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskNotice {
    /// A target process exited (what it recorded is in the current window).
    ProcessExited { pid: u32 },
    /// Every target process (of a task of pids) has exited.
    AllProcessesExited,
    /// Draining the kernel failed; what was recorded is kept for a later drain.
    DrainFailed(String),
}

/// How a task went, once it stopped.
#[derive(Clone, Debug)]
pub struct TaskSummary {
    /// The profiler's counters over the task's life (shared by the tasks of its kind).
    pub counters: Counters,
    /// The agent's symbolizer, at the end (shared by all tasks).
    pub symbolize: SymbolizeStats,
    /// Stacks marked `[truncated]` because they ended at an unmapped address.
    pub stacks_cut: u64,
    pub windows: u64,
    /// Windows the sink failed on, with why.
    pub sink_errors: Vec<String>,
}
