//! Off-CPU profiling: a BTF tracepoint on `sched_switch` records, per (process, user stack,
//! kernel stack), how many times target threads were switched out and for how long.
//!
//! At switch-out of a target thread its user stack is captured and an episode opened in its
//! task-local `THREADS` state. At its switch-in the episode is closed into the aggregate, and
//! its kernel stack read then: it is frozen while the thread is switched out, and unwinding a
//! stopped task starts right at the scheduler, whereas unwinding the running one at switch-out
//! first walks (and discards) the tracing frames above it, which cost more than the stack
//! itself. Both stacks are stored when the episode closes, in the generation its aggregate
//! goes to, so a drain finds every stack its aggregates reference. Non-target threads cost a
//! task-storage lookup at switch-in and the target filter at switch-out. A thread's last
//! switch-out (it is dead) deletes its state; episodes still open when profiling stops, or
//! whose end was never seen, are left out and counted.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    bindings::task_struct,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_get_prandom_u32,
        bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::{btf_map, btf_tracepoint},
    programs::BtfTracePointContext,
};
use rover_common::{
    FIRST_STACK_HASH, OffCpuThread, OffCpuValue, STACK_FLAG_PREEMPTED, StackKey,
    TARGET_EXCLUDE_PREEMPT, counter,
};
use rover_ebpf::{
    Captured, TaskStorage, atomic_add, capture_user_into, count, epoch, get_or_insert, rare_debug,
};

rover_ebpf::profiler_maps!(OffCpuValue);

// Set at load time (`bpf/offcpu.rs`); what is per target lives in `TARGETS`.
/// A switch-out is kept when `bpf_get_prandom_u32() < SAMPLE_THRESHOLD`, unless `SAMPLE_ALL`.
#[unsafe(no_mangle)]
static SAMPLE_THRESHOLD: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SAMPLE_ALL: Global<u8> = Global::new(1);

/// A new aggregate's value before the episode is added.
static ZERO: OffCpuValue = OffCpuValue {
    switches: 0,
    off_cpu_ns: 0,
    capture_ns: 0,
};

/// `task_struct::__state` of a task switched out for the last time.
const TASK_DEAD: u64 = 0x80;

/// Task-local rather than a hash map keyed by task: found without hashing on every switch,
/// and freed with the task even if its last switch-out is missed.
#[btf_map]
static THREADS: TaskStorage<OffCpuThread> = TaskStorage::new();

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
    let now = switch_in(&ctx, next);
    switch_out(&ctx, preempt & 1 != 0, prev_state & 0xffff_ffff, now);
    0
}

/// Stores a stack with `store` unless the thread's previous episode stored the same one in the
/// same epoch (a thread blocking at one place again and again, the costly case, needs no map
/// lookup then).
#[inline(always)]
fn store_once(
    captured: Captured,
    epoch: u32,
    last: &mut u64,
    last_epoch: &mut u32,
    store: impl FnOnce(Captured) -> u64,
) -> u64 {
    if let Captured::Stack(reference) = captured
        && reference == *last
        && epoch == *last_epoch
    {
        return reference;
    }
    let reference = store(captured);
    if reference >= FIRST_STACK_HASH {
        *last = reference;
        *last_epoch = epoch;
    }
    reference
}

/// Closes the open episode of the task being switched in, if it has one; returns the time it
/// read then.
#[inline(always)]
fn switch_in(ctx: &BtfTracePointContext, next: *mut task_struct) -> Option<u64> {
    // SAFETY: `next` is the tracepoint's trusted task pointer.
    let thread = unsafe { THREADS.get(next) }?;
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
    if episode_ns < thread.min_block_ns {
        count(&COUNTERS, counter::TOO_SHORT, 1);
        return Some(now);
    }
    let epoch = epoch(&CONTROL);
    let user = Captured::from_reference(thread.user_stack);
    rover_ebpf::with_generation!(epoch, |counts, store| {
        let user_stack = store_once(
            user,
            epoch as u32,
            &mut thread.last_user_stack,
            &mut thread.last_user_epoch,
            |captured| store.store_user_from(captured, &thread.user_frames),
        );
        // SAFETY: `next` is the tracepoint's trusted task pointer, and not running yet.
        let kernel = unsafe { store.capture_kernel_of(next) };
        let kernel_stack = store_once(
            kernel,
            epoch as u32,
            &mut thread.last_kernel_stack,
            &mut thread.last_kernel_epoch,
            |captured| store.store_kernel(captured),
        );
        let key = StackKey {
            tgid: thread.tgid,
            flags: thread.flags,
            user_stack,
            kernel_stack,
        };
        match get_or_insert(counts, &key, &ZERO) {
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
    });
    log_lost_stacks(ctx, epoch, thread.tgid);
    Some(now)
}

/// Opens an episode for the thread being switched out, if it is a target (and kept).
#[inline(always)]
fn switch_out(ctx: &BtfTracePointContext, preempt: bool, state: u64, now: Option<u64>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 {
        return;
    }
    // SAFETY: plain helper.
    let task = unsafe { bpf_get_current_task_btf() };
    if state & TASK_DEAD != 0 {
        // Its last switch-out: the thread's state goes with it. Checked before the target
        // filter: the process's target may be gone already (removed when its last thread
        // exited), and the state is there if the thread ever was one.
        // SAFETY: a trusted task pointer.
        if let Some(thread) = unsafe { THREADS.get(task) }
            // SAFETY: as in `switch_in`.
            && unsafe { (*thread).start_ns } != 0
        {
            episode_end_missed(ctx, tid);
        }
        // SAFETY: a trusted task pointer.
        if unsafe { THREADS.delete(task) } {
            count(&COUNTERS, counter::THREADS_DELETED, 1);
        }
        return;
    }
    let Some(options) = targets().lookup(tgid) else {
        return;
    };
    // SAFETY: plain helper.
    let now = now.unwrap_or_else(|| unsafe { bpf_ktime_get_ns() });
    let (sample_all, threshold) = (SAMPLE_ALL.load() != 0, SAMPLE_THRESHOLD.load());
    // Preempted, or gave up the CPU while still runnable (sched_yield): not blocked.
    let preempted = preempt || state == 0;
    if preempted && options.flags & TARGET_EXCLUDE_PREEMPT != 0 {
        count(&COUNTERS, counter::PREEMPT_EXCLUDED, 1);
        return;
    }
    // Decided before any stack walk, so that left-out switches cost next to nothing.
    // SAFETY: plain helper.
    if !sample_all && unsafe { bpf_get_prandom_u32() } >= threshold {
        count(&COUNTERS, counter::NOT_SAMPLED, 1);
        return;
    }
    // SAFETY: a trusted task pointer.
    let Some(thread) = (unsafe { THREADS.get_or_create(task) }) else {
        count(&COUNTERS, counter::THREAD_STATE_LOST, 1);
        return;
    };
    // SAFETY: as in `switch_in`.
    let thread = unsafe { &mut *thread };
    if thread.tgid == 0 {
        // Created zeroed just now.
        thread.tgid = tgid;
        count(&COUNTERS, counter::THREADS_CREATED, 1);
    }
    // Sampled: the stack capture is timed, because only kept episodes spend it. User space
    // scales the rest of each episode by 1/p and adds this unscaled.
    let capture_start = if sample_all {
        0
    } else {
        // SAFETY: plain helper.
        unsafe { bpf_ktime_get_ns() }
    };
    thread.user_stack = capture_user_into(&mut thread.user_frames, None, &COUNTERS).reference();
    thread.capture_ns = if sample_all {
        0
    } else {
        // SAFETY: plain helper.
        let capture_end = unsafe { bpf_ktime_get_ns() };
        capture_end - capture_start
    };
    thread.flags = if preempted { STACK_FLAG_PREEMPTED } else { 0 };
    thread.min_block_ns = options.min_block_ns;
    if thread.start_ns != 0 {
        // Still open: the switch-in that ended it was never seen (rare, see
        // `counter::EPISODE_ENDS_MISSED`). When it ended is unknown: dropped, counted.
        episode_end_missed(ctx, tid);
    }
    thread.start_ns = now;
    count(&COUNTERS, counter::EPISODES_OPENED, 1);
}

/// Counts (and logs, rate-limited) an episode of thread `tid` whose end was never seen.
#[inline(always)]
fn episode_end_missed(ctx: &BtfTracePointContext, tid: u32) {
    count(&COUNTERS, counter::EPISODE_ENDS_MISSED, 1);
    let log = rare_log(epoch(&CONTROL));
    rare_debug!(
        log,
        ctx,
        "off-CPU episode of thread {} ended unseen (switched out again on CPU {}): dropped",
        tid,
        // SAFETY: plain helper.
        unsafe { bpf_get_smp_processor_id() }
    );
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
