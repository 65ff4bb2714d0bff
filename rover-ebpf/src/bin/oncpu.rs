//! On-CPU sampling: a `perf_event` program on the cpu-clock software event of every CPU counts
//! samples per (process, user stack, kernel stack).
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray},
    programs::PerfEventContext,
};
use rover_common::{CONTROL_SLOTS, StackFrames, StackKey, counter};
use rover_ebpf::{StackStore, atomic_add, count, generation, get_or_insert, is_target};

/// Set at load time: non-zero to sample every process, zero to sample only `TARGETS`.
#[unsafe(no_mangle)]
static TARGET_ALL: u8 = 0;

#[map]
static TARGETS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);
#[map]
static CONTROL: Array<u32> = Array::with_max_entries(CONTROL_SLOTS, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::SLOTS, 0);
#[map]
static SCRATCH: PerCpuArray<StackFrames> = PerCpuArray::with_max_entries(1, 0);

// Two generations of aggregates and stacks: programs write one while user space drains the other.
// Preallocated (run-time allocation can fail in this context); user space sizes them at load time
// from the sample rate so that one drain interval's samples always fit.
#[map]
static COUNTS_0: HashMap<StackKey, u64> = HashMap::with_max_entries(1024, 0);
#[map]
static COUNTS_1: HashMap<StackKey, u64> = HashMap::with_max_entries(1024, 0);
#[map]
static STACKS_0: HashMap<u64, StackFrames> = HashMap::with_max_entries(2048, 0);
#[map]
static STACKS_1: HashMap<u64, StackFrames> = HashMap::with_max_entries(2048, 0);

#[perf_event]
pub fn on_cpu_sample(ctx: PerfEventContext) -> u32 {
    sample(&ctx);
    0
}

#[inline(always)]
fn sample(ctx: &PerfEventContext) {
    count(&COUNTERS, counter::SAMPLES_SEEN, 1);
    let pid_tgid = bpf_get_current_pid_tgid();
    let (tgid, tid) = ((pid_tgid >> 32) as u32, pid_tgid as u32);
    if tid == 0 {
        count(&COUNTERS, counter::SAMPLES_IDLE, 1);
        return;
    }
    // SAFETY: a global written only at load time.
    let all = unsafe { core::ptr::read_volatile(&TARGET_ALL) } != 0;
    if !is_target(all, &TARGETS, tgid) {
        return;
    }
    let (counts, stacks) = match generation(&CONTROL) {
        0 => (&COUNTS_0, &STACKS_0),
        _ => (&COUNTS_1, &STACKS_1),
    };
    let store = StackStore {
        scratch: &SCRATCH,
        stacks,
        counters: &COUNTERS,
    };
    // SAFETY: the context points at the kernel's `bpf_perf_event_data`.
    let regs = unsafe { &(*ctx.ctx).regs };
    let kernel_stack = if regs.cs & 3 == 0 {
        store.kernel_stack(ctx)
    } else {
        rover_common::NO_STACK
    };
    let user_stack = store.user_stack(Some(regs));
    let key = StackKey {
        tgid,
        _pad: 0,
        user_stack,
        kernel_stack,
    };
    match get_or_insert(counts, &key, &0) {
        Some(value) => {
            // SAFETY: `value` is the u64 value of an aggregate map entry.
            unsafe { atomic_add(value, 1) };
            count(&COUNTERS, counter::RECORDED, 1);
        }
        None => count(&COUNTERS, counter::AGGREGATE_FULL, 1),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
