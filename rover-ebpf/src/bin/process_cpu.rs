//! The process-CPU iterator: the CPU time, thread count and start time of the processes under
//! a continuous-profiling policy, for all of them in one read of an iterator file, where procfs
//! costs a `stat` file per process every second (open, read, close: ~10 µs on a VM, 1% of a
//! core for 500 processes).
//!
//! It visits every thread of the host and writes a record for those of the watched processes
//! (`WATCHED`, kept by the agent): a process's CPU time is its live threads' plus what its
//! exited threads left in `signal_struct`, the sum `/proc/PID/stat` gives too.
//!
//! Rust eBPF has no CO-RE relocations: every offset is set at load time from the kernel's BTF.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::{BPF_F_NO_PREALLOC, seq_file},
    cty::c_void,
    helpers::{bpf_probe_read_kernel, generated::bpf_seq_write},
    macros::map,
    maps::HashMap,
};
use rover_common::{PROCESS_CPU_WATCHED_MAX, ProcessCpuRecord};
// Its panic handler.
use rover_ebpf as _;

// `task_struct` members; `TASK_SUM_EXEC_RUNTIME` is `se.sum_exec_runtime`.
#[unsafe(no_mangle)]
static TASK_PID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_START_BOOTTIME: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_SUM_EXEC_RUNTIME: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_SIGNAL: Global<u32> = Global::new(0);
// `signal_struct` members.
#[unsafe(no_mangle)]
static SIGNAL_SUM_SCHED_RUNTIME: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SIGNAL_NR_THREADS: Global<u32> = Global::new(0);

/// The processes (TGIDs) listed; the value is unused. Entries are allocated as inserted: most
/// nodes watch a few hundred.
#[map]
static WATCHED: HashMap<u32, u8> =
    HashMap::with_max_entries(PROCESS_CPU_WATCHED_MAX, BPF_F_NO_PREALLOC);

/// `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__task`: `task` is NULL once, after the last task.
#[repr(C)]
struct IterTask {
    meta: *mut IterMeta,
    task: *const u8,
}

#[inline(always)]
fn read<T>(base: *const u8, offset: &Global<u32>) -> Option<T> {
    // SAFETY: a fault-tolerant read at the offset the kernel's BTF gives.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset.load() as usize).cast::<T>()).ok() }
}

/// Lists one thread when its process is watched.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn process_cpu(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel hands an iterator program its `bpf_iter__task`; both loads are checked
    // by the verifier against that type.
    let (seq, task) = unsafe {
        let ctx = &*ctx.cast::<IterTask>();
        ((*ctx.meta).seq, ctx.task)
    };
    if task.is_null() {
        return 0;
    }
    // Side by side in every kernel's `task_struct`: one read, made for every thread.
    let ids = if TASK_TGID.load() == TASK_PID.load() + 4 {
        read::<[u32; 2]>(task, &TASK_PID).map(|[pid, tgid]| (pid, tgid))
    } else {
        read::<u32>(task, &TASK_PID).zip(read::<u32>(task, &TASK_TGID))
    };
    let Some((pid, tgid)) = ids else {
        return 0;
    };
    // SAFETY: only whether the key is present is used.
    if unsafe { WATCHED.get(tgid) }.is_none() {
        return 0;
    }
    let mut record = ProcessCpuRecord {
        tgid,
        threads: 0,
        runtime_ns: read(task, &TASK_SUM_EXEC_RUNTIME).unwrap_or(0),
        start_boottime_ns: 0,
    };
    if pid == tgid {
        record.start_boottime_ns = read(task, &TASK_START_BOOTTIME).unwrap_or(0);
        if let Some(signal) = read::<*const u8>(task, &TASK_SIGNAL)
            && !signal.is_null()
        {
            let exited: u64 = read(signal, &SIGNAL_SUM_SCHED_RUNTIME).unwrap_or(0);
            record.runtime_ns = record.runtime_ns.wrapping_add(exited);
            record.threads = read::<i32>(signal, &SIGNAL_NR_THREADS)
                .and_then(|threads| u32::try_from(threads).ok())
                .unwrap_or(0);
        }
        // At least itself: a leader's record is told from the others' by a count of 1 or more.
        record.threads = record.threads.max(1);
    }
    // SAFETY: `seq` is the iterator's own seq_file; the record is ours, of its full size. Not
    // written (the read's buffer is full), the thread is shown again in the next read.
    unsafe {
        bpf_seq_write(
            seq,
            (&record as *const ProcessCpuRecord).cast(),
            core::mem::size_of::<ProcessCpuRecord>() as u32,
        )
    };
    0
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
