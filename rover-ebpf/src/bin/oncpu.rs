//! On-CPU sampling: a `perf_event` program on the cpu-clock software event of every CPU counts
//! samples per (process, user stack, kernel stack).
#![no_std]
#![no_main]

use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::perf_event, programs::PerfEventContext};
use rover_common::{NO_STACK, StackKey, counter};
use rover_ebpf::{atomic_add, count, epoch, get_or_insert};

rover_ebpf::profiler_maps!(u64);

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
    if targets().lookup(tgid).is_none() {
        return;
    }
    // Copied out of the context first: the body below is expanded once per generation, and
    // LLVM would otherwise share a pointer into the context between the copies, which the
    // verifier refuses (it only allows fixed offsets from the context pointer).
    // SAFETY: the context points at the kernel's `bpf_perf_event_data`.
    let regs = unsafe { core::ptr::read_volatile(&raw const (*ctx.ctx).regs) };
    let regs = &regs;
    let epoch = epoch(&CONTROL);
    rover_ebpf::with_generation!(epoch, |counts, store| {
        // The user stack walk (the long loop) first: little is live across it then, which
        // keeps the verifier's work (and the load time) down.
        let user = store.capture_user(Some(regs));
        let kernel_stack = if regs.cs & 3 == 0 {
            let captured = store.capture_kernel(ctx);
            store.store_kernel(captured)
        } else {
            NO_STACK
        };
        let user_stack = store.store_user(user);
        let key = StackKey {
            tgid,
            flags: 0,
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
    });
    log_lost_stacks(ctx, epoch, tgid);
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
