use std::io;

/// What can go wrong loading, attaching and draining the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "missing privilege: {missing}. Loading eBPF profilers needs CAP_BPF and CAP_PERFMON \
         (or CAP_SYS_ADMIN): run as root (symbolizing other users' processes also needs \
         CAP_SYS_PTRACE, and kernel frames CAP_SYSLOG)"
    )]
    MissingPrivilege { missing: String },
    #[error(
        "this rover-agent binary was built with AYA_BUILD_SKIP and carries no eBPF object \
         `{object}`: rebuild it without AYA_BUILD_SKIP (after `cargo xtask setup`)"
    )]
    ObjectNotEmbedded { object: &'static str },
    #[error("invalid profiler configuration: {0}")]
    InvalidConfig(String),
    #[error("loading the eBPF object `{object}` failed")]
    Load {
        object: &'static str,
        #[source]
        source: aya::EbpfError,
    },
    #[error("eBPF object `{object}` has no {kind} `{name}` (agent and object out of sync)")]
    Missing {
        object: &'static str,
        kind: &'static str,
        name: &'static str,
    },
    #[error("the kernel rejected eBPF program `{program}`")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("detaching eBPF program `{program}` failed")]
    Detach {
        program: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching `{program}` to the cpu-clock perf event of CPU {cpu} failed")]
    AttachPerfEvent {
        program: &'static str,
        cpu: u32,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{map}`: {operation} failed")]
    Map {
        map: &'static str,
        operation: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("listing online CPUs ({path}) failed")]
    OnlineCpus {
        path: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("waiting for running eBPF programs (membarrier) failed")]
    Barrier(#[source] io::Error),
    #[error(
        "the target map of the {profiler} profiler is full ({capacity} processes): pid {pid} is \
         not recorded; raise the agent's maximum number of targets"
    )]
    TargetMapFull {
        profiler: &'static str,
        pid: u32,
        capacity: u32,
    },
    #[error(
        "pid {pid} is already recorded off-CPU with other options ({existing}) by another task: \
         tasks recording one process off-CPU must use the same --min-block and --exclude-preempt"
    )]
    TargetOptionsConflict { pid: u32, existing: String },
    #[error("pid {pid}: no such running process")]
    NoSuchProcess { pid: u32 },
    #[error("the profiling engine has stopped (its thread ended)")]
    EngineStopped,
    #[error("no profiling task with id {0}")]
    UnknownRecording(u64),
    #[error("starting the profiling engine's thread failed")]
    Thread(#[source] io::Error),
    #[error("reading the process events ring buffer failed")]
    Events(#[source] io::Error),
    #[error(
        "reading the kernel's BTF (/sys/kernel/btf/vmlinux) failed: the off-CPU profiler needs \
         a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    KernelBtf(#[source] aya::BtfError),
    #[error("the kernel's BTF does not tell the task iterator where to read: {0}")]
    KernelLayout(String),
    #[error("reading the task iterator failed")]
    TaskList(#[source] io::Error),
    #[error("reading the process-CPU iterator failed")]
    ProcessCpuList(#[source] io::Error),
    #[error(
        "the task iterator's pids are not this agent's: it runs in a PID namespace of its own \
         (run it with the host's PID namespace, `hostPID: true`)"
    )]
    ForeignPidNamespace,
    #[error("attaching `{program}` to the tracepoint {tracepoint} failed")]
    AttachTracepoint {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// A map deletion's result, with "no such key" (`ENOENT`, which aya passes through as a
/// system call error) counted as done: the key is gone either way.
pub(super) fn deleted(result: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(error))
            if error.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}
