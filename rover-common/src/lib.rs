//! Types shared between the eBPF programs (`rover-ebpf`) and the agent's `bpf/` module.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel and user space read the same
//! bytes. No `bool` (its bit patterns are not all valid), sizes asserted at compile time.
#![no_std]

/// Deepest stack (user or kernel) recorded; deeper stacks are truncated (and counted).
pub const MAX_STACK_FRAMES: usize = 127;

/// Stack reference of a sample that has no such stack: no user stack for kernel threads, no
/// kernel stack for samples that interrupted user mode.
pub const NO_STACK: u64 = 0;
/// Stack reference of a stack that was captured but could not be stored (stack map full).
pub const LOST_STACK: u64 = 1;
/// Real stack references (hashes) are never below this.
pub const FIRST_STACK_HASH: u64 = 2;

/// Aggregation key: one process, one user stack, one kernel stack. The stacks are referenced by
/// the hash of their frames, the key of the generation's stack map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    pub _pad: u32,
    pub user_stack: u64,
    pub kernel_stack: u64,
}

/// A captured stack, innermost frame first: `frames[0]` is the interrupted instruction (on-CPU)
/// or the innermost return address; `len` of the frames are valid, the rest is stale.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackFrames {
    pub len: u64,
    pub frames: [u64; MAX_STACK_FRAMES],
}

/// Per-stack off-CPU aggregate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub switches: u64,
    pub off_cpu_ns: u64,
}

/// Slot of the `CONTROL` array map holding the generation (0 or 1) programs write to.
pub const CONTROL_GENERATION: u32 = 0;
pub const CONTROL_SLOTS: u32 = 1;

/// Indices into the per-CPU `COUNTERS` array: every sample or episode that is not fully recorded
/// lands in one of these, so losses are never silent.
pub mod counter {
    /// Program runs (on-CPU: samples taken on any CPU).
    pub const SAMPLES_SEEN: u32 = 0;
    /// Samples that hit the idle task.
    pub const SAMPLES_IDLE: u32 = 1;
    /// Samples (or episodes) added to the aggregate map: the drained counts must sum to this.
    pub const RECORDED: u32 = 2;
    /// A kernel stack could not be captured or stored (stack map full).
    pub const KERNEL_STACK_LOST: u32 = 3;
    /// A user stack could not be stored (stack map full).
    pub const USER_STACK_LOST: u32 = 4;
    /// The aggregate map was full: the sample is lost entirely.
    pub const AGGREGATE_FULL: u32 = 5;
    /// Samples of threads without user space (kernel threads).
    pub const KERNEL_ONLY: u32 = 6;
    /// User stacks deeper than `MAX_STACK_FRAMES` (kept, truncated).
    pub const USER_STACK_TRUNCATED: u32 = 7;
    /// Number of slots in the map.
    pub const SLOTS: u32 = 16;
}

const _: () = assert!(core::mem::size_of::<StackKey>() == 24);
const _: () = assert!(core::mem::size_of::<StackFrames>() == 8 * (MAX_STACK_FRAMES + 1));
const _: () = assert!(core::mem::size_of::<OffCpuValue>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::StackFrames {}
    unsafe impl aya::Pod for super::OffCpuValue {}
}
