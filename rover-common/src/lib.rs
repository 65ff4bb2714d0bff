//! Types shared between the eBPF programs (`rover-ebpf`) and the agent's `bpf/` module.
//!
//! Everything here is `#[repr(C)]` with explicit padding: the kernel and user space read the same
//! bytes. No `bool` (its bit patterns are not all valid), sizes asserted at compile time.
#![no_std]

/// Deepest user stack recorded; deeper stacks are truncated (counted, and marked by the agent).
pub const MAX_USER_FRAMES: usize = 127;

/// Deepest kernel stack recorded (kernel stacks are far shallower than user ones; capturing
/// fewer frames saves zero-filling the rest of the buffer on every capture, and map memory).
pub const MAX_KERNEL_FRAMES: usize = 64;

/// Stack reference of a sample that has no such stack: no user stack for kernel threads, no
/// kernel stack for samples that interrupted user mode.
pub const NO_STACK: u64 = 0;
/// Stack reference of a stack that was captured but could not be stored (stack map full).
pub const LOST_STACK: u64 = 1;
/// Real stack references (hashes) are never below this.
pub const FIRST_STACK_HASH: u64 = 2;

/// Aggregation key: one process, one user stack, one kernel stack. The stacks are referenced by
/// the hash of their frames, the key of the generation's stack maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub tgid: u32,
    /// `STACK_FLAG_*` bits.
    pub flags: u32,
    pub user_stack: u64,
    pub kernel_stack: u64,
}

/// `StackKey::flags`: the off-CPU episode was involuntary (preempted while runnable).
pub const STACK_FLAG_PREEMPTED: u32 = 1;

/// A captured user stack, innermost frame first: `frames[0]` is the interrupted instruction
/// (on-CPU) or the innermost return address; `len` of the frames are valid, the rest is stale.
/// A stack of [`MAX_USER_FRAMES`] was cut there (deeper ones are not told apart).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UserStack {
    pub len: u64,
    pub frames: [u64; MAX_USER_FRAMES],
}

/// A captured kernel stack, as [`UserStack`] at kernel depth: stored in maps of their own, so
/// kernel stacks do not take user-sized slots.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KernelStack {
    pub len: u64,
    pub frames: [u64; MAX_KERNEL_FRAMES],
}

/// Per-stack off-CPU aggregate. With sampling, `switches` and `off_cpu_ns` cover the kept
/// episodes and are scaled by 1/p when the profile is exported; `capture_ns` is not scaled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpuValue {
    pub switches: u64,
    /// Off-CPU time, without the stack capture time below.
    pub off_cpu_ns: u64,
    /// Time the switch-out program spent capturing stacks (sampled mode only): off-CPU time
    /// that only kept episodes have, so it is added back unscaled.
    pub capture_ns: u64,
}

/// What the kernel applies to one target (the value of `TARGETS`, and of the "every process"
/// slots of `CONTROL`): off-CPU options, per process so that tasks on different processes can
/// differ. The on-CPU sampler ignores them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetOptions {
    /// Off-CPU episodes shorter than this are not aggregated.
    pub min_block_ns: u64,
    /// `TARGET_*` bits.
    pub flags: u32,
    pub _padding: u32,
}

/// `TargetOptions::flags`: involuntary switch-outs (preemption) open no off-CPU episode.
pub const TARGET_EXCLUDE_PREEMPT: u32 = 1;

/// The per-CPU cache of the target filter: the last target seen on this CPU, valid while the
/// targets' version (`control::TARGETS_VERSION` + `control::TARGETS_EXITED`) is `version`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RecentTarget {
    pub tgid: u32,
    pub _padding: u32,
    pub version: u64,
    pub options: TargetOptions,
}

/// Off-CPU state of one target thread, in task-local storage (it ends with the task): the
/// episode opened at its last switch-out, with the user stack captured then, and the stacks
/// its previous episode stored. The episode is closed at the thread's switch-in, when its
/// kernel stack is read (it does not change while the thread is switched out) and both stacks
/// are stored in the generation the aggregate goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OffCpuThread {
    /// When the thread was switched out; 0 when no episode is open.
    pub start_ns: u64,
    /// How long the user stack capture took (sampled mode only).
    pub capture_ns: u64,
    /// The open episode's target's `TargetOptions::min_block_ns`.
    pub min_block_ns: u64,
    /// Reference of the open episode's user stack; its frames are in `user_frames`.
    pub user_stack: u64,
    /// The stacks of the previous episode and the epoch they were stored in: an equal stack in
    /// the same epoch need not be looked up in the stack map again.
    pub last_user_stack: u64,
    pub last_kernel_stack: u64,
    pub last_user_epoch: u32,
    pub last_kernel_epoch: u32,
    /// The thread's process; 0 until the state is first used.
    pub tgid: u32,
    /// `STACK_FLAG_*` bits of the open episode.
    pub flags: u32,
    pub user_frames: UserStack,
}

/// Slots of the `CONTROL` array (`u64` values) every profiler has.
pub mod control {
    /// The drain epoch: user space increments it at every drain; programs write to the maps of
    /// generation `epoch & 1`.
    pub const EPOCH: u32 = 0;
    /// Non-zero: every process is a target, with the options in the two slots below (per-pid
    /// entries of `TARGETS` are then not consulted).
    pub const ALL_TARGETS: u32 = 1;
    pub const ALL_MIN_BLOCK_NS: u32 = 2;
    pub const ALL_FLAGS: u32 = 3;
    /// Incremented by user space after it removed or changed targets, and by the programs when
    /// they remove a target whose process exited: the per-CPU [`RecentTarget`](super::RecentTarget)
    /// caches are valid only while the sum of the two is unchanged. Two slots, so that neither
    /// side overwrites the other's increments.
    pub const TARGETS_VERSION: u32 = 4;
    pub const TARGETS_EXITED: u32 = 5;
    pub const SLOTS: u32 = 6;
}

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
    /// Stacks deeper than `MAX_USER_FRAMES` (user) or `MAX_KERNEL_FRAMES` (kernel), kept
    /// truncated (user space tells them by their length).
    pub const STACK_TRUNCATED: u32 = 7;
    /// Off-CPU: a switch-out could not be recorded because per-thread state could not be
    /// allocated.
    pub const THREAD_STATE_LOST: u32 = 8;
    /// Off-CPU: switch-outs of targets not kept by sampling (not losses).
    pub const NOT_SAMPLED: u32 = 9;
    /// Off-CPU: episodes shorter than the minimum block time (not losses).
    pub const TOO_SHORT: u32 = 10;
    /// Off-CPU: involuntary switch-outs left out on request (not losses).
    pub const PREEMPT_EXCLUDED: u32 = 11;
    /// Off-CPU: episodes opened. Those not closed by the end (recorded, too short, aggregate
    /// map full or end missed) were still open when profiling stopped.
    pub const EPISODES_OPENED: u32 = 12;
    /// Off-CPU: per-thread states created, and deleted at their thread's exit.
    pub const THREADS_CREATED: u32 = 13;
    pub const THREADS_DELETED: u32 = 14;
    /// Off-CPU: episodes whose end the program never saw: their thread was switched out again,
    /// or for the last time, with the episode still open. Measured here: now and then a CPU's
    /// switches do not chain (a switch's `prev` is not the previous switch's `next`), so a
    /// switch-in reached no program run.
    pub const EPISODE_ENDS_MISSED: u32 = 15;
    /// Targets removed by the kernel because their process exited.
    pub const TARGETS_EXITED: u32 = 16;
    /// Debug log records not sent because of the per-CPU rate limit.
    pub const LOGS_SUPPRESSED: u32 = 17;
    /// Number of slots in the map.
    pub const SLOTS: u32 = 18;
}

/// What the process events object reports (the `PROCESS_EVENTS` ring buffer): processes, not
/// threads, appearing, replacing their image and ending.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    /// `process_event::*`.
    pub kind: u32,
    /// The process (TGID) the event is about.
    pub pid: u32,
    /// Fork: the parent process; 0 otherwise.
    pub parent: u32,
}

/// `ProcessEvent::kind` values.
pub mod process_event {
    /// A new process (not a thread) was forked; it runs its parent's image.
    pub const FORK: u32 = 1;
    /// The process replaced its image (`execve`).
    pub const EXEC: u32 = 2;
    /// The last thread of the process exited: its memory map is gone, its pid about to be free.
    pub const EXIT: u32 = 3;
}

/// Indices into the events object's per-CPU `EVENT_COUNTERS`.
pub mod event_counter {
    /// Events written to the ring buffer.
    pub const SENT: u32 = 0;
    /// Events dropped because the ring buffer was full.
    pub const LOST: u32 = 1;
    pub const SLOTS: u32 = 2;
}

const _: () = assert!(core::mem::size_of::<StackKey>() == 24);
/// Deepest cgroup path a [`TaskRecord`] carries, counted from the process's own cgroup up.
pub const TASK_CGROUP_DEPTH: usize = 8;
/// Longest cgroup name a [`TaskRecord`] carries, its NUL included (a container's
/// `cri-containerd-<64 hex>.scope` is 86 bytes).
pub const TASK_CGROUP_NAME_LEN: usize = 128;

/// One process as the task iterator (`rover-ebpf/src/bin/tasks.rs`) lists it: what process
/// discovery would otherwise read from `/proc/PID/stat` and `/proc/PID/cgroup`, for every
/// process in one read, and where its arguments are.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskRecord {
    /// The process (TGID) in the initial PID namespace.
    pub pid: u32,
    /// `task_struct::flags` (`PF_*`).
    pub flags: u32,
    /// `task_struct::exit_state`: non-zero for a zombie or dead process.
    pub exit_state: u32,
    /// Non-zero: its memory maps an executable (`mm_struct::exe_file`, what `/proc/PID/exe`
    /// links to).
    pub has_exe_file: u32,
    /// `task_struct::start_boottime`: nanoseconds after boot, suspend included.
    pub start_boottime_ns: u64,
    /// `task_struct::comm`, NUL-padded.
    pub comm: [u8; 16],
    /// Where the process's arguments are in its memory (`mm_struct::arg_start`, `arg_end`);
    /// zero without memory (a kernel thread, an exiting process).
    pub arg_start: u64,
    pub arg_end: u64,
    /// The cgroup on the unified (v2) hierarchy, then on one v1 controller's hierarchy.
    pub cgroups: [TaskCgroup; 2],
}

/// A cgroup's path, as the names of its directories from its own up to the hierarchy's root
/// (whose name is left out).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskCgroup {
    /// The cgroup's kernfs node id (never reused); 0 when it could not be read.
    pub id: u64,
    /// How many of `names` hold a name, innermost first.
    pub depth: u32,
    /// What `names` holds: one of `TASK_CGROUP_*`.
    pub state: u32,
    /// NUL-terminated.
    pub names: [[u8; TASK_CGROUP_NAME_LEN]; TASK_CGROUP_DEPTH],
}

/// [`TaskCgroup::state`]: the path could not be read whole (deeper than [`TASK_CGROUP_DEPTH`],
/// a name cut, a failed read).
pub const TASK_CGROUP_CUT: u32 = 0;
/// [`TaskCgroup::state`]: `names` holds the whole path.
pub const TASK_CGROUP_WHOLE: u32 = 1;
/// [`TaskCgroup::state`]: an earlier record of the same listing held this cgroup's whole path
/// (a cgroup's path is walked once per listing, not once per process in it).
pub const TASK_CGROUP_LISTED_BEFORE: u32 = 2;

/// One thread of a watched process as the process-CPU iterator
/// (`rover-ebpf/src/bin/process_cpu.rs`) lists it; the thread-group leader's record also carries
/// the process's own fields. A process's CPU time is the sum of its records' `runtime_ns`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessCpuRecord {
    /// The process (TGID) in the initial PID namespace.
    pub tgid: u32,
    /// The leader's record: `signal_struct::nr_threads`, at least 1; 0 in other threads'
    /// records (which is how the leader's is told from them).
    pub threads: u32,
    /// `sched_entity::sum_exec_runtime` of the thread; the leader's also adds
    /// `signal_struct::sum_sched_runtime` (the threads that exited).
    pub runtime_ns: u64,
    /// The leader's record: `task_struct::start_boottime` (a reused pid has another); 0 in
    /// other threads' records.
    pub start_boottime_ns: u64,
}

/// Most processes the process-CPU iterator watches at once.
pub const PROCESS_CPU_WATCHED_MAX: u32 = 65_536;

const _: () = assert!(core::mem::size_of::<UserStack>() == 8 * (MAX_USER_FRAMES + 1));
const _: () = assert!(core::mem::size_of::<ProcessCpuRecord>() == 24);
const _: () = assert!(core::mem::size_of::<KernelStack>() == 8 * (MAX_KERNEL_FRAMES + 1));
const _: () = assert!(core::mem::size_of::<OffCpuValue>() == 24);
const _: () = assert!(core::mem::size_of::<TargetOptions>() == 16);
const _: () = assert!(core::mem::size_of::<RecentTarget>() == 32);
const _: () = assert!(core::mem::size_of::<OffCpuThread>() == 64 + 8 * (MAX_USER_FRAMES + 1));
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 12);
const _: () = assert!(
    core::mem::size_of::<TaskRecord>() == 56 + 2 * (16 + TASK_CGROUP_DEPTH * TASK_CGROUP_NAME_LEN)
);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::StackKey {}
    unsafe impl aya::Pod for super::UserStack {}
    unsafe impl aya::Pod for super::KernelStack {}
    unsafe impl aya::Pod for super::OffCpuValue {}
    unsafe impl aya::Pod for super::TargetOptions {}
    unsafe impl aya::Pod for super::ProcessEvent {}
}
