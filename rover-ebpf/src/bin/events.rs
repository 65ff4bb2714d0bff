//! Process events: raw tracepoints (no kernel BTF needed to attach) on fork, exec and exit report processes (not threads) to user
//! space through a ring buffer, so that the agent snapshots a new or changed process's memory
//! map while it lives, and learns at once of processes that ended. Exec and exit are reported
//! for the processes in `WATCHED`, or for every process (and forks too) when `FILTER` says so.
//!
//! For process discovery, exec and exit also mark the process in `CHANGED` (when `FILTER` says
//! so), without waking anyone: discovery reads and clears the set at each scan, and re-reads
//! only those processes instead of every one.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel},
    macros::{map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::RawTracePointContext,
};
use rover_common::{ProcessEvent, event_counter, process_event};
use rover_ebpf::count;

/// Set at load time from the kernel's BTF: the byte offset of `tgid` in `struct task_struct`
/// (Rust eBPF has no CO-RE relocations).
#[unsafe(no_mangle)]
static TASK_TGID_OFFSET: Global<u32> = Global::new(0);

/// Slot 0 non-zero: report every process (and forks); else exec and exit of `WATCHED` only.
/// Slot 1 non-zero: mark execs and exits in `CHANGED`.
#[map]
static FILTER: Array<u64> = Array::with_max_entries(2, 0);
/// Processes that replaced their image or ended since discovery last cleared the set. Key 0 (no
/// process has TGID 0) is put there by user space: its value turns 1 when a process could not be
/// marked because the map was full, and discovery then re-reads everything.
#[map]
static CHANGED: HashMap<u32, u8> = HashMap::with_max_entries(16384, 0);
/// Slot 0 turns non-zero when `CHANGED` got a mark (or overflowed): discovery clears it and
/// walks `CHANGED` only then (a walk visits every bucket, full or not).
#[map]
static MARKED: Array<u32> = Array::with_max_entries(1, 0);
#[map]
static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
#[map]
static EVENT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(event_counter::SLOTS, 0);

#[inline(always)]
fn every_process() -> bool {
    FILTER.get(0).is_some_and(|all| *all != 0)
}

#[inline(always)]
fn tracking_changes() -> bool {
    FILTER.get(1).is_some_and(|on| *on != 0)
}

#[inline(always)]
fn mark_changed(tgid: u32) {
    if CHANGED.get_ptr(tgid).is_some() {
        return;
    }
    if CHANGED.insert(tgid, 0u8, 0).is_err()
        && let Some(overflowed) = CHANGED.get_ptr_mut(0u32)
    {
        // SAFETY: a value slot of our own map; one byte, written whole.
        unsafe { *overflowed = 1 };
    }
    // After the mark: whoever clears this flag and then walks `CHANGED` sees the mark.
    if let Some(marked) = MARKED.get_ptr_mut(0) {
        // SAFETY: a value slot of our own map; written whole.
        unsafe { *marked = 1 };
    }
}

#[inline(always)]
fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn send(kind: u32, pid: u32, parent: u32) {
    match PROCESS_EVENTS.reserve::<ProcessEvent>(0) {
        Some(mut entry) => {
            entry.write(ProcessEvent { kind, pid, parent });
            entry.submit(0);
            count(&EVENT_COUNTERS, event_counter::SENT, 1);
        }
        None => count(&EVENT_COUNTERS, event_counter::LOST, 1),
    }
}

/// `TP_PROTO(struct task_struct *parent, struct task_struct *child)`, in the parent's context.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn process_fork(ctx: RawTracePointContext) -> i32 {
    if !every_process() {
        return 0;
    }
    let child: *const u8 = ctx.arg(1);
    let parent = current_tgid();
    // SAFETY: a fault-tolerant read of the child's `tgid`, at the offset the kernel's BTF gives.
    let child_tgid = unsafe {
        bpf_probe_read_kernel(
            child
                .wrapping_add(TASK_TGID_OFFSET.load() as usize)
                .cast::<u32>(),
        )
    };
    // A new thread shares its parent's TGID: only new processes are reported.
    if let Ok(child_tgid) = child_tgid
        && child_tgid != parent
    {
        send(process_event::FORK, child_tgid, parent);
    }
    0
}

/// `TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`: the new image
/// is mapped (the dynamic loader has not run yet).
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(_ctx: RawTracePointContext) -> i32 {
    let tgid = current_tgid();
    if every_process() || WATCHED.get_ptr(tgid).is_some() {
        send(process_event::EXEC, tgid, 0);
    }
    if tracking_changes() {
        mark_changed(tgid);
    }
    0
}

/// `TP_PROTO(struct task_struct *p, bool group_dead)`: reported once, for the last thread.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit(ctx: RawTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    if group_dead & 0xff == 0 {
        return 0;
    }
    let tgid = current_tgid();
    let watched = WATCHED.remove(tgid).is_ok();
    if watched || every_process() {
        send(process_event::EXIT, tgid, 0);
    }
    if tracking_changes() {
        mark_changed(tgid);
    }
    0
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
