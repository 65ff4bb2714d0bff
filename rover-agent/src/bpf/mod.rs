//! The only place that talks to aya: the embedded eBPF objects, loaded once per agent while a
//! recording needs them (the [`Engine`]), their targets, the drain of the kernel aggregates,
//! the loss counters, process events and the programs' debug logs. It hands out owned
//! [`RawStack`]s; nothing outside sees a map, a stack reference, or that two recordings share a
//! profiler.

mod counters;
mod drain;
mod engine;
mod error;
mod events;
mod host;
mod kernel_btf;
mod loader;
mod log;
mod memory;
mod object;
mod privilege;
mod process_cpu;
mod profiler;
mod program_runs;
mod targets;
mod task_iter;
mod task_list;

pub use counters::Counters;
pub use engine::{
    Delivery, Engine, EngineStatus, EngineTotals, ProfilerTotals, RecordingId, RecordingSpec,
};
pub use error::Error;
pub use events::{ChangedProcesses, ProcessChanges, ProcessEvent};
pub use host::{HostCheck, check_host, check_programs_load};
pub use memory::{DEFAULT_MAP_MEMORY_BYTES, MIN_MAP_MEMORY_BYTES, MapCapacity};
pub use privilege::{Privilege, check_privilege, effective_capabilities, require_privilege};
pub use process_cpu::{ProcessCpu, ProcessCpuList};
pub use profiler::ProfilerSettings;
pub use program_runs::{ProgramRuns, bpf_stats_enabled};
pub use targets::TargetOptions;
pub use task_list::TaskList;

/// The two profilers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProfilerKind {
    /// CPU samples: a `perf_event` program on the cpu-clock event of every CPU.
    OnCpu,
    /// Context switches and blocked time: a `sched_switch` BTF tracepoint.
    OffCpu,
}

impl ProfilerKind {
    /// For messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::OnCpu => "on-CPU",
            Self::OffCpu => "off-CPU",
        }
    }

    /// The embedded object.
    fn object(self) -> &'static str {
        match self {
            Self::OnCpu => "oncpu",
            Self::OffCpu => "offcpu",
        }
    }
}

/// A stack as the kernel recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawFrames {
    /// The sample has no such stack: no user stack in a kernel thread, no kernel stack when
    /// user mode was interrupted.
    Absent,
    /// A stack was there but could not be stored (counted in [`Counters`]).
    Lost,
    /// Addresses, innermost first: the sampled instruction (on-CPU) then return addresses.
    Captured(Vec<u64>),
}

/// What the kernel accumulated for one stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackValue {
    /// On-CPU samples.
    Samples(u64),
    OffCpu(OffCpu),
}

/// Off-CPU totals of one stack, as recorded: when sampling with probability p, `switches` and
/// `off_cpu_ns` cover the kept episodes only (estimate: divide by p), and `capture_ns`, the time
/// their stack captures took, is off-CPU time only kept episodes had (estimate: add unscaled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpu {
    pub switches: u64,
    pub off_cpu_ns: u64,
    pub capture_ns: u64,
}

/// One aggregate drained from the kernel: a process, its stacks and the value they accumulated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack {
    pub tgid: u32,
    /// Off-CPU: the thread was preempted (still runnable), not blocked.
    pub preempted: bool,
    /// The user stack was deeper than the agent records: its root end is cut.
    pub user_truncated: bool,
    /// The kernel stack was deeper than the agent records.
    pub kernel_truncated: bool,
    pub user: RawFrames,
    pub kernel: RawFrames,
    pub value: StackValue,
}

/// Which processes a recording records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every process on the host.
    All,
    /// Only these processes (TGIDs); more can be added while running.
    Pids(Vec<u32>),
}
