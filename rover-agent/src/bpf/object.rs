//! The eBPF objects built by `build.rs` and embedded in the agent binary.

use super::Error;

/// The on-CPU sampler (`rover-ebpf/src/bin/oncpu.rs`).
pub(super) fn oncpu() -> Result<&'static [u8], Error> {
    embedded(
        "oncpu",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oncpu")),
    )
}

/// The off-CPU profiler (`rover-ebpf/src/bin/offcpu.rs`).
pub(super) fn offcpu() -> Result<&'static [u8], Error> {
    embedded(
        "offcpu",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/offcpu")),
    )
}

/// The process events reporter (`rover-ebpf/src/bin/events.rs`).
pub(super) fn events() -> Result<&'static [u8], Error> {
    embedded(
        "events",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/events")),
    )
}

/// The task iterator (`rover-ebpf/src/bin/tasks.rs`).
pub(super) fn tasks() -> Result<&'static [u8], Error> {
    embedded(
        "tasks",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tasks")),
    )
}

/// The process-CPU iterator (`rover-ebpf/src/bin/process_cpu.rs`).
pub(super) fn process_cpu() -> Result<&'static [u8], Error> {
    embedded(
        "process_cpu",
        aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/process_cpu")),
    )
}

fn embedded(object: &'static str, bytes: &'static [u8]) -> Result<&'static [u8], Error> {
    if bytes.is_empty() {
        return Err(Error::ObjectNotEmbedded { object });
    }
    Ok(bytes)
}
