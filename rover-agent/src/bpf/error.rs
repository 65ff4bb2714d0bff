use std::io;

/// What can go wrong loading, attaching and draining the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "missing privilege: {missing}. Loading eBPF profilers needs CAP_BPF and CAP_PERFMON \
         (or CAP_SYS_ADMIN): run as root (symbolizing other processes also needs CAP_SYS_ADMIN, \
         CAP_SYS_PTRACE and CAP_SYSLOG)"
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
        "reading the kernel's BTF (/sys/kernel/btf/vmlinux) failed: the off-CPU profiler needs \
         a kernel built with CONFIG_DEBUG_INFO_BTF=y"
    )]
    KernelBtf(#[source] aya::BtfError),
    #[error("attaching `{program}` to the tracepoint {tracepoint} failed")]
    AttachTracepoint {
        program: &'static str,
        tracepoint: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
}
