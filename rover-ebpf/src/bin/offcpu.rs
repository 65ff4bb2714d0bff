//! Off-CPU profiling: a BTF tracepoint on `sched_switch` records, per (process, user stack,
//! kernel stack), how many times target threads were switched out and for how long.
//!
//! At switch-out of a target thread its user stack is captured and an episode opened in its
//! `THREADS` entry (keyed by the task's address, kept until the thread dies). At its switch-in the episode is closed into the
//! aggregate, and its kernel stack read then: it is frozen while the thread is switched out,
//! and unwinding a stopped task starts right at the scheduler, whereas unwinding the running
//! one at switch-out first walks (and discards) the tracing frames above it, which cost more
//! than the stack itself. Non-target threads cost one map lookup on each side. A thread's last
//! switch-out (it is dead) removes its entry; episodes still open when profiling stops are
//! dropped by user space.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_get_prandom_u32, bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, map},
    maps::HashMap,
    programs::BtfTracePointContext,
};
use rover_common::{
    FIRST_STACK_HASH, OffCpuThread, OffCpuValue, STACK_FLAG_PREEMPTED, StackKey, counter,
};
use rover_ebpf::{Captured, StackStore, atomic_add, count, epoch, get_or_insert};

rover_ebpf::profiler_maps!(OffCpuValue);

// Set at load time (`bpf/offcpu.rs`).
/// Non-zero: involuntary switch-outs (preemption) open no episode.
#[unsafe(no_mangle)]
static EXCLUDE_PREEMPT: u8 = 0;
/// Episodes shorter than this are not aggregated.
#[unsafe(no_mangle)]
static MIN_BLOCK_NS: u64 = 0;
/// A switch-out is kept when `bpf_get_prandom_u32() < SAMPLE_THRESHOLD`, unless `SAMPLE_ALL`.
#[unsafe(no_mangle)]
static SAMPLE_THRESHOLD: u32 = 0;
#[unsafe(no_mangle)]
static SAMPLE_ALL: u8 = 1;

/// `task_struct::__state` of a task switched out for the last time.
const TASK_DEAD: u64 = 0x80;

#[map]
static THREADS: HashMap<u64, OffCpuThread> = HashMap::with_max_entries(65536, 0);

/// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
/// unsigned int prev_state)`; `prev` is the current task.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> u32 {
    let preempt: u64 = ctx.arg(0);
    let next: *mut task_struct = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    // One instant for both threads: this program's own run time is off-CPU time of the thread
    // switched out (its CPU time stopped before the tracepoint) and not of the one switched in
    // (its CPU time starts after it), so `next`'s episode ends and `prev`'s starts when the
    // first of them needs the clock (read lazily: most switches involve no target at all).
    let now = switch_in(next);
    switch_out(preempt & 1 != 0, prev_state & 0xffff_ffff, now);
    0
}

/// Stores a captured stack unless the thread's previous episode stored the same one in the
/// same epoch (a thread blocking at one place again and again, the costly case, needs no map
/// lookup then).
#[inline(always)]
fn store_once(
    store: &StackStore<'_>,
    captured: Captured,
    lost_counter: u32,
    epoch: u32,
    last: &mut u64,
    last_epoch: &mut u32,
) -> u64 {
    if let Captured::Stack(reference) = captured
        && reference == *last
        && epoch == *last_epoch
    {
        return reference;
    }
    let reference = store.store(captured, lost_counter);
    if reference >= FIRST_STACK_HASH {
        *last = reference;
        *last_epoch = epoch;
    }
    reference
}

/// Closes the open episode of the task being switched in, if it has one; returns the time it
/// read then.
#[inline(always)]
fn switch_in(next: *mut task_struct) -> Option<u64> {
    let thread = THREADS.get_ptr_mut(next as u64)?;
    // SAFETY: a valid map value; only this task's own switches write it, and the scheduler
    // serializes those.
    let thread = unsafe { &mut *thread };
    if thread.start_ns == 0 {
        return None;
    }
    // SAFETY: plain helper.
    let now = unsafe { bpf_ktime_get_ns() };
    let episode_ns = now.saturating_sub(thread.start_ns);
    thread.start_ns = 0;
    // SAFETY: a global written only at load time.
    let min_block_ns = unsafe { core::ptr::read_volatile(&MIN_BLOCK_NS) };
    if episode_ns < min_block_ns {
        count(&COUNTERS, counter::TOO_SHORT, 1);
        return Some(now);
    }
    let epoch = epoch(&CONTROL);
    let (counts, store) = generation(epoch);
    // SAFETY: `next` is the tracepoint's trusted task pointer, and not running yet.
    let kernel = unsafe { store.capture_kernel_of(next) };
    let kernel_stack = store_once(
        &store,
        kernel,
        counter::KERNEL_STACK_LOST,
        epoch,
        &mut thread.last_kernel_stack,
        &mut thread.last_kernel_epoch,
    );
    let key = StackKey {
        tgid: thread.tgid,
        flags: thread.flags,
        user_stack: thread.user_stack,
        kernel_stack,
    };
    match get_or_insert(counts, &key, &OffCpuValue::default()) {
        Some(value) => {
            // SAFETY: the fields of an aggregate map value.
            unsafe {
                atomic_add(&raw mut (*value).switches, 1);
                atomic_add(
                    &raw mut (*value).off_cpu_ns,
                    episode_ns.saturating_sub(thread.capture_ns),
                );
                // Zero in exact mode: spare the locked add.
                if thread.capture_ns != 0 {
                    atomic_add(&raw mut (*value).capture_ns, thread.capture_ns);
                }
            }
            count(&COUNTERS, counter::RECORDED, 1);
        }
        None => count(&COUNTERS, counter::AGGREGATE_FULL, 1),
    }
    Some(now)
}

/// Opens an episode for the thread being switched out, if it is a target (and kept).
#[inline(always)]
fn switch_out(preempt: bool, state: u64, now: Option<u64>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 {
        return;
    }
    if !targets().contains(tgid) {
        return;
    }
    // SAFETY: plain helper.
    let now = now.unwrap_or_else(|| unsafe { bpf_ktime_get_ns() });
    // SAFETY: globals written only at load time.
    let (exclude_preempt, sample_all, threshold) = unsafe {
        (
            core::ptr::read_volatile(&EXCLUDE_PREEMPT) != 0,
            core::ptr::read_volatile(&SAMPLE_ALL) != 0,
            core::ptr::read_volatile(&SAMPLE_THRESHOLD),
        )
    };
    // SAFETY: plain helper; the address only serves as a key.
    let task = unsafe { bpf_get_current_task() };
    if state & TASK_DEAD != 0 {
        // Its last switch-out: the thread's state goes with it.
        let _ = THREADS.remove(task);
        return;
    }
    // Preempted, or gave up the CPU while still runnable (sched_yield): not blocked.
    let preempted = preempt || state == 0;
    if preempted && exclude_preempt {
        count(&COUNTERS, counter::PREEMPT_EXCLUDED, 1);
        return;
    }
    // Decided before any stack walk, so that left-out switches cost next to nothing.
    // SAFETY: plain helper.
    if !sample_all && unsafe { bpf_get_prandom_u32() } >= threshold {
        count(&COUNTERS, counter::NOT_SAMPLED, 1);
        return;
    }
    let Some(thread) = get_or_insert(&THREADS, &task, &OffCpuThread::default()) else {
        count(&COUNTERS, counter::THREAD_MAP_FULL, 1);
        return;
    };
    // SAFETY: as in `switch_in`.
    let thread = unsafe { &mut *thread };
    let epoch = epoch(&CONTROL);
    let (_, store) = generation(epoch);
    // Sampled: the stack capture is timed, because only kept episodes spend it. User space
    // scales the rest of each episode by 1/p and adds this unscaled.
    let capture_start = if sample_all {
        0
    } else {
        // SAFETY: plain helper.
        unsafe { bpf_ktime_get_ns() }
    };
    let user = store.capture_user(None);
    thread.user_stack = store_once(
        &store,
        user,
        counter::USER_STACK_LOST,
        epoch,
        &mut thread.last_user_stack,
        &mut thread.last_user_epoch,
    );
    thread.capture_ns = if sample_all {
        0
    } else {
        // SAFETY: plain helper.
        let capture_end = unsafe { bpf_ktime_get_ns() };
        capture_end - capture_start
    };
    // Refreshed every time: a task's address outlives it only if its last switch-out was
    // missed, and may then come back as another thread.
    thread.tgid = tgid;
    thread.tid = tid;
    thread.flags = if preempted { STACK_FLAG_PREEMPTED } else { 0 };
    thread.start_ns = now;
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
