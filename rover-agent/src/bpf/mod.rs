//! The only place that talks to aya: loads the embedded eBPF objects, attaches them, manages
//! the target filter, drains the kernel aggregates and reads the loss counters. It hands out
//! owned [`RawStack`]s; nothing outside sees a map or a stack reference.

mod aggregates;
mod counters;
mod error;
mod loader;
mod object;
mod offcpu;
mod oncpu;
mod privilege;
mod target_filter;

pub use counters::Counters;
pub use error::Error;
pub use offcpu::{OffCpu, OffCpuConfig, OffCpuProbe};
pub use oncpu::{OnCpuConfig, OnCpuProbe};
pub use privilege::{Privilege, check_privilege};

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

/// One aggregate drained from the kernel: a process, its stacks and the value they accumulated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawStack<V> {
    pub tgid: u32,
    /// Off-CPU: the thread was preempted (still runnable), not blocked.
    pub preempted: bool,
    pub user: RawFrames,
    pub kernel: RawFrames,
    pub value: V,
}

/// Which processes a probe records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every process on the host.
    All,
    /// Only these processes (TGIDs); more can be added while running.
    Pids(Vec<u32>),
}
