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
    Global, bindings::BPF_F_NO_PREALLOC, cty::c_void, helpers::generated::bpf_seq_write,
    macros::map, maps::HashMap,
};
use rover_common::{PROCESS_CPU_WATCHED_MAX, ProcessCpuRecord};
use rover_ebpf::task_iter::{IterTask, ids, read};

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
    let ids = ids(task, &TASK_PID, &TASK_TGID);
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
