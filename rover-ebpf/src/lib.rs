//! Code shared by the profiling programs: stack capture and storage, counting, target filter.
//!
//! Each program is its own object (`src/bin/*.rs`) with its own maps, so an on-CPU and an
//! off-CPU profile can run side by side without sharing state; the maps are passed in here.
#![no_std]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: BPF has no atomic RMW in core::sync"
)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{
        bpf_get_current_task_btf, bpf_get_stack, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_task_pt_regs,
    },
    maps::{Array, HashMap, PerCpuArray},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use rover_common::{
    CONTROL_GENERATION, FIRST_STACK_HASH, LOST_STACK, MAX_STACK_FRAMES, NO_STACK, StackFrames,
    counter,
};

const EEXIST: i32 = 17;

/// Adds `n` to the per-CPU counter `index`. Per-CPU slots need no atomics: a program never
/// runs twice at once on one CPU.
#[inline(always)]
pub fn count(counters: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(slot) = counters.get_ptr_mut(index) {
        // SAFETY: a valid per-CPU map value, only this CPU writes it.
        unsafe { *slot += n };
    }
}

/// Atomically adds `n` to a map value that other CPUs may update at the same time.
///
/// # Safety
/// `dst` must point to an aligned `u64` inside a map value.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, n: u64) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, n) };
}

/// The generation (0 or 1) whose maps programs write to; user space flips it to drain.
#[inline(always)]
pub fn generation(control: &Array<u32>) -> u32 {
    match control.get(CONTROL_GENERATION) {
        Some(&generation) => generation & 1,
        None => 0,
    }
}

/// Whether samples of `tgid` are wanted: every process when `all` is set, else those in `targets`.
#[inline(always)]
pub fn is_target(all: bool, targets: &HashMap<u32, u8>, tgid: u32) -> bool {
    all || targets.get_ptr(tgid).is_some()
}

/// Finds the value of `key` in `map`, inserting `init` first if it is absent. `None` means the
/// map is full.
#[inline(always)]
pub fn get_or_insert<K, V>(map: &HashMap<K, V>, key: &K, init: &V) -> Option<*mut V> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    match map.insert(key, init, BPF_NOEXIST.into()) {
        // Another CPU may have inserted the key between lookup and insert: both end up here.
        Ok(()) => map.get_ptr_mut(key),
        Err(error) if error == -EEXIST => map.get_ptr_mut(key),
        Err(_) => None,
    }
}

/// One step of the stack hash (a multiply-xorshift mix over 64-bit words).
#[inline(always)]
fn mix(hash: u64, word: u64) -> u64 {
    let hash = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    hash ^ (hash >> 29)
}

/// Stores `trace` in `stacks` under the hash of its frames and returns that hash, or
/// [`LOST_STACK`] (counted in `lost_counter`) if the map is full.
#[inline(always)]
fn store(
    stacks: &HashMap<u64, StackFrames>,
    counters: &PerCpuArray<u64>,
    lost_counter: u32,
    trace: &StackFrames,
    seed: u64,
) -> u64 {
    let mut hash = seed;
    let len = trace.len as usize;
    for i in 0..MAX_STACK_FRAMES {
        if i >= len {
            break;
        }
        if let Some(&frame) = trace.frames.get(i) {
            hash = mix(hash, frame);
        }
    }
    // Keep clear of the sentinels.
    let hash = if hash < FIRST_STACK_HASH {
        hash + FIRST_STACK_HASH
    } else {
        hash
    };
    if stacks.get_ptr(hash).is_some() {
        return hash;
    }
    match stacks.insert(hash, trace, BPF_NOEXIST.into()) {
        Ok(()) => hash,
        Err(error) if error == -EEXIST => hash,
        Err(_) => {
            count(counters, lost_counter, 1);
            LOST_STACK
        }
    }
}

const KERNEL_SEED: u64 = 0x6b65_726e_656c;
const USER_SEED: u64 = 0x7573_6572;

/// Where a stack is captured: the per-CPU scratch buffer, the generation's stack map and the
/// counters for losses.
pub struct StackStore<'a> {
    pub scratch: &'a PerCpuArray<StackFrames>,
    pub stacks: &'a HashMap<u64, StackFrames>,
    pub counters: &'a PerCpuArray<u64>,
}

impl StackStore<'_> {
    /// Captures and stores the current kernel stack.
    #[inline(always)]
    pub fn kernel_stack<C: EbpfContext>(&self, ctx: &C) -> u64 {
        let Some(trace) = self.scratch.get_ptr_mut(0) else {
            return LOST_STACK;
        };
        // SAFETY: a valid per-CPU scratch value; programs do not nest on one CPU.
        let trace = unsafe { &mut *trace };
        let size = core::mem::size_of_val(&trace.frames) as u32;
        // SAFETY: the helper writes at most `size` bytes into `frames`.
        let written =
            unsafe { bpf_get_stack(ctx.as_ptr(), trace.frames.as_mut_ptr().cast(), size, 0) };
        if written <= 0 {
            count(self.counters, counter::KERNEL_STACK_LOST, 1);
            return LOST_STACK;
        }
        trace.len = written as u64 / 8;
        store(
            self.stacks,
            self.counters,
            counter::KERNEL_STACK_LOST,
            trace,
            KERNEL_SEED,
        )
    }

    /// Captures and stores the user stack of the current task by walking frame pointers from
    /// its user registers: the interrupted registers when they are user mode, else the
    /// registers saved at kernel entry. Returns [`NO_STACK`] for kernel threads.
    #[inline(always)]
    pub fn user_stack(&self, interrupted: Option<&pt_regs>) -> u64 {
        let Some(regs) = user_registers(interrupted) else {
            count(self.counters, counter::KERNEL_ONLY, 1);
            return NO_STACK;
        };
        let Some(trace) = self.scratch.get_ptr_mut(0) else {
            return LOST_STACK;
        };
        // SAFETY: as in `kernel_stack`.
        let trace = unsafe { &mut *trace };
        trace.frames[0] = regs.ip;
        let mut len = 1;
        let mut frame_pointer = regs.frame_pointer;
        let mut truncated = true;
        for i in 1..MAX_STACK_FRAMES {
            // A frame record is [saved frame pointer, return address], 8-byte aligned.
            if frame_pointer == 0 || frame_pointer & 7 != 0 {
                truncated = false;
                break;
            }
            // SAFETY: reading user memory through the fault-tolerant helper.
            let Ok(record) = (unsafe { bpf_probe_read_user(frame_pointer as *const [u64; 2]) })
            else {
                truncated = false;
                break;
            };
            let [next_frame_pointer, return_address] = record;
            if return_address == 0 {
                truncated = false;
                break;
            }
            if let Some(slot) = trace.frames.get_mut(i) {
                *slot = return_address;
            }
            len = i + 1;
            // Callers' frames lie above: anything else is a corrupt chain.
            if next_frame_pointer <= frame_pointer {
                truncated = false;
                break;
            }
            frame_pointer = next_frame_pointer;
        }
        if truncated {
            count(self.counters, counter::USER_STACK_TRUNCATED, 1);
        }
        trace.len = len as u64;
        store(
            self.stacks,
            self.counters,
            counter::USER_STACK_LOST,
            trace,
            USER_SEED,
        )
    }
}

struct UserRegisters {
    ip: u64,
    frame_pointer: u64,
}

/// User-mode instruction and frame pointer of the current task, if it has a user mode.
#[inline(always)]
fn user_registers(interrupted: Option<&pt_regs>) -> Option<UserRegisters> {
    if let Some(regs) = interrupted
        && is_user_mode(regs)
    {
        return Some(UserRegisters {
            ip: regs.rip,
            frame_pointer: regs.rbp,
        });
    }
    // SAFETY: helpers available to tracing programs; the result is read fault-tolerantly.
    let saved = unsafe {
        let task = bpf_get_current_task_btf();
        let regs = bpf_task_pt_regs(task) as *const pt_regs;
        bpf_probe_read_kernel(regs).ok()?
    };
    // Kernel threads have no user registers saved: their `cs` is not a user segment.
    if !is_user_mode(&saved) || saved.rip == 0 {
        return None;
    }
    Some(UserRegisters {
        ip: saved.rip,
        frame_pointer: saved.rbp,
    })
}

#[inline(always)]
fn is_user_mode(regs: &pt_regs) -> bool {
    regs.cs & 3 == 3
}
