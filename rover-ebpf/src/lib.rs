//! Code shared by the profiling programs: stack capture and storage, counting, target filter,
//! rate-limited debug logging.
//!
//! Each profiler is its own object (`src/bin/*.rs`) with its own maps, loaded while a task needs
//! it and unloaded after (its maps are sized at load time), so an on-CPU and an off-CPU profile
//! run side by side without sharing state; the maps are passed in here. The process events
//! object (`src/bin/events.rs`) is the third.
#![no_std]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic_xadd: BPF has no atomic RMW in core::sync"
)]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_LOCAL_STORAGE_GET_F_CREATE, BPF_NOEXIST, pt_regs, task_struct},
    cty::c_void,
    helpers::{
        bpf_get_current_task_btf, bpf_get_stack, bpf_get_task_stack, bpf_probe_read_user,
        bpf_task_pt_regs, bpf_task_storage_delete, bpf_task_storage_get,
    },
    maps::{Array, HashMap, PerCpuArray},
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};
use rover_common::{
    FIRST_STACK_HASH, KernelStack, LOST_STACK, MAX_KERNEL_FRAMES, MAX_USER_FRAMES, NO_STACK,
    RecentTarget, TargetOptions, UserStack, control, counter,
};

const EEXIST: i32 = 17;

// Shared by the program objects. The verifier rejects any program that could reach it.
#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Declares what every profiling program has, the names user space (`bpf/`) looks up: the
/// target filter (`TARGETS`, its per-CPU cache and the `CONTROL` slots), the counters, the stack
/// scratch buffers, two generations of aggregates (with values `$value`) and of user and kernel
/// stacks (see `rover-agent/src/bpf/drain.rs`), the debug-log rate limit, and the
/// `target_exit` program, which removes a target when its process ends so that a later process
/// given its pid is not recorded. The maps are preallocated (allocating in tracing contexts
/// can fail) and sized by user space at load time.
#[macro_export]
macro_rules! profiler_maps {
    ($value:ty) => {
        /// Set at load time: non-zero when debug logging is on (aya-log); zero compiles every
        /// rare-event log statement out (the verifier prunes the branch).
        #[unsafe(no_mangle)]
        static LOG_DEBUG: aya_ebpf::Global<u8> = aya_ebpf::Global::new(0);
        #[aya_ebpf::macros::map]
        static TARGETS: aya_ebpf::maps::HashMap<u32, rover_common::TargetOptions> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static RECENT_TARGET: aya_ebpf::maps::PerCpuArray<rover_common::RecentTarget> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
        #[aya_ebpf::macros::map]
        static CONTROL: aya_ebpf::maps::Array<u64> =
            aya_ebpf::maps::Array::with_max_entries(rover_common::control::SLOTS, 0);
        #[aya_ebpf::macros::map]
        static COUNTERS: aya_ebpf::maps::PerCpuArray<u64> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(rover_common::counter::SLOTS, 0);
        #[aya_ebpf::macros::map]
        static LOG_STATE: aya_ebpf::maps::PerCpuArray<u64> =
            aya_ebpf::maps::PerCpuArray::with_max_entries($crate::LOG_SLOTS, 0);
        #[aya_ebpf::macros::map]
        static SCRATCH: aya_ebpf::maps::PerCpuArray<rover_common::UserStack> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
        #[aya_ebpf::macros::map]
        static KERNEL_SCRATCH: aya_ebpf::maps::PerCpuArray<rover_common::KernelStack> =
            aya_ebpf::maps::PerCpuArray::with_max_entries(1, 0);
        #[aya_ebpf::macros::map]
        static COUNTS_0: aya_ebpf::maps::HashMap<rover_common::StackKey, $value> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static COUNTS_1: aya_ebpf::maps::HashMap<rover_common::StackKey, $value> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static USER_STACKS_0: aya_ebpf::maps::HashMap<u64, rover_common::UserStack> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static USER_STACKS_1: aya_ebpf::maps::HashMap<u64, rover_common::UserStack> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static KERNEL_STACKS_0: aya_ebpf::maps::HashMap<u64, rover_common::KernelStack> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);
        #[aya_ebpf::macros::map]
        static KERNEL_STACKS_1: aya_ebpf::maps::HashMap<u64, rover_common::KernelStack> =
            aya_ebpf::maps::HashMap::with_max_entries(1024, 0);

        /// The target filter of this program.
        #[inline(always)]
        fn targets() -> $crate::TargetFilter<'static> {
            $crate::TargetFilter {
                targets: &TARGETS,
                recent: &RECENT_TARGET,
                control: &CONTROL,
            }
        }

        /// The rare-event logger of this program, for records of epoch `epoch`.
        #[inline(always)]
        fn rare_log(epoch: u64) -> $crate::RareLog<'static> {
            $crate::RareLog {
                enabled: LOG_DEBUG.load() != 0,
                state: &LOG_STATE,
                counters: &COUNTERS,
                epoch,
            }
        }

        /// Logs the stacks this program run could not store (noted by the stack stores in
        /// `LOG_STATE`), if debug logging is on.
        #[inline(always)]
        fn log_lost_stacks<C: aya_ebpf::EbpfContext>(ctx: &C, epoch: u64, tgid: u32) {
            let log = rare_log(epoch);
            if !log.enabled {
                return;
            }
            let Some(lost) = $crate::take_lost_stacks(&LOG_STATE) else {
                return;
            };
            $crate::rare_debug!(
                log,
                ctx,
                "stack map full: process {} lost a stack ({})",
                tgid,
                if lost & $crate::LOST_USER_STACK != 0 {
                    "user"
                } else {
                    "kernel"
                }
            );
        }

        /// `TP_PROTO(struct task_struct *p, bool group_dead)`: the last thread of a process
        /// exits. Its pid can be reused once the process is reaped: the target goes now. A raw
        /// tracepoint: attaching it needs no kernel BTF, which costs the agent ~18 MB to parse.
        #[aya_ebpf::macros::raw_tracepoint(tracepoint = "sched_process_exit")]
        pub fn target_exit(ctx: aya_ebpf::programs::RawTracePointContext) -> i32 {
            let group_dead: u64 = ctx.arg(1);
            if group_dead & 0xff == 0 {
                return 0;
            }
            let tgid = (aya_ebpf::helpers::bpf_get_current_pid_tgid() >> 32) as u32;
            if TARGETS.remove(tgid).is_ok() {
                $crate::count(&COUNTERS, rover_common::counter::TARGETS_EXITED, 1);
                if let Some(exited) = CONTROL.get_ptr_mut(rover_common::control::TARGETS_EXITED) {
                    // SAFETY: a u64 slot of an array map, which other CPUs may update too.
                    unsafe { $crate::atomic_add(exited, 1) };
                }
            }
            0
        }
    };
}

/// Runs `$body` with `$counts` and `$store` bound to the aggregate map and stack stores of
/// generation `$epoch & 1` (the maps of [`profiler_maps!`]). The body is expanded once per
/// generation, so every map it uses is a constant the verifier knows: it then calls the map's
/// functions directly (or inlines hash lookups) instead of through the map's operations table,
/// an indirect call that is costly with retpolines. (A function taking a closure does not
/// guarantee this: LLVM may outline the closure and pass the maps in as variables.)
#[macro_export]
macro_rules! with_generation {
    ($epoch:expr, |$counts:ident, $store:ident| $body:block) => {
        if $epoch & 1 == 0 {
            let $counts = &COUNTS_0;
            let $store = $crate::StackStore {
                scratch: &SCRATCH,
                kernel_scratch: &KERNEL_SCRATCH,
                user_stacks: &USER_STACKS_0,
                kernel_stacks: &KERNEL_STACKS_0,
                counters: &COUNTERS,
                log_state: &LOG_STATE,
            };
            $body
        } else {
            let $counts = &COUNTS_1;
            let $store = $crate::StackStore {
                scratch: &SCRATCH,
                kernel_scratch: &KERNEL_SCRATCH,
                user_stacks: &USER_STACKS_1,
                kernel_stacks: &KERNEL_STACKS_1,
                counters: &COUNTERS,
                log_state: &LOG_STATE,
            };
            $body
        }
    };
}

/// Logs a rare kernel-side event at debug level (aya-log, bridged into the agent's tracing),
/// if debug logging was on at load time and this CPU's budget for the epoch is not spent.
#[macro_export]
macro_rules! rare_debug {
    ($log:expr, $ctx:expr, $($arg:tt)+) => {
        if $log.allowed() {
            aya_log_ebpf::debug!($ctx, $($arg)+);
        }
    };
}

/// Debug log records each CPU may send per epoch (one drain interval); more are counted in
/// `counter::LOGS_SUPPRESSED`.
const LOG_RECORDS_PER_EPOCH: u64 = 4;

/// Slots of the per-CPU `LOG_STATE`: the rate limit (the epoch in the high 32 bits, the records
/// sent in it in the low 32), and the stacks this program run could not store
/// (`LOST_*_STACK` bits). The stores note losses in memory rather than return them: a value
/// the code branches on later would make the verifier check everything in between once per
/// value, logging off or not.
pub const LOG_SLOTS: u32 = 2;
const LOG_RATE: u32 = 0;
const LOG_LOST_STACKS: u32 = 1;
pub const LOST_USER_STACK: u64 = 1;
pub const LOST_KERNEL_STACK: u64 = 2;

/// The rate limit of [`rare_debug!`].
pub struct RareLog<'a> {
    /// Set at load time: false makes [`allowed`](Self::allowed) a constant the verifier prunes.
    pub enabled: bool,
    pub state: &'a PerCpuArray<u64>,
    pub counters: &'a PerCpuArray<u64>,
    pub epoch: u64,
}

impl RareLog<'_> {
    #[inline(always)]
    pub fn allowed(&self) -> bool {
        if !self.enabled {
            return false;
        }
        let Some(slot) = self.state.get_ptr_mut(LOG_RATE) else {
            return false;
        };
        // SAFETY: a per-CPU slot only this CPU touches.
        let state = unsafe { &mut *slot };
        let epoch = self.epoch & 0xffff_ffff;
        if *state >> 32 != epoch {
            *state = epoch << 32;
        }
        if *state & 0xffff_ffff >= LOG_RECORDS_PER_EPOCH {
            count(self.counters, counter::LOGS_SUPPRESSED, 1);
            return false;
        }
        *state += 1;
        true
    }
}

/// The `LOST_*_STACK` bits noted in this program run, cleared; `None` if there are none.
#[inline(always)]
pub fn take_lost_stacks(state: &PerCpuArray<u64>) -> Option<u64> {
    let slot = state.get_ptr_mut(LOG_LOST_STACKS)?;
    // SAFETY: a per-CPU slot only this CPU touches.
    let lost = unsafe { core::mem::replace(&mut *slot, 0) };
    (lost != 0).then_some(lost)
}

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

/// The current epoch: its low bit selects the generation of maps programs write to.
#[inline(always)]
pub fn epoch(control: &Array<u64>) -> u64 {
    control_slot(control, control::EPOCH)
}

#[inline(always)]
fn control_slot(control: &Array<u64>, slot: u32) -> u64 {
    control.get(slot).copied().unwrap_or(0)
}

/// The target filter: every process when `CONTROL` says so, else the TGIDs in `targets`, each
/// with its options. The last target found on each CPU is remembered in `recent`, valid while
/// the targets' version is unchanged (user space bumps it after removing or changing targets,
/// `target_exit` when it removes one): a thread switching many times in a row skips the hash
/// lookup, and a removed target is never found in a stale cache.
pub struct TargetFilter<'a> {
    pub targets: &'a HashMap<u32, TargetOptions>,
    pub recent: &'a PerCpuArray<RecentTarget>,
    pub control: &'a Array<u64>,
}

impl TargetFilter<'_> {
    /// The options of `tgid` if it is a target.
    #[inline(always)]
    pub fn lookup(&self, tgid: u32) -> Option<TargetOptions> {
        if control_slot(self.control, control::ALL_TARGETS) != 0 {
            return Some(TargetOptions {
                min_block_ns: control_slot(self.control, control::ALL_MIN_BLOCK_NS),
                flags: control_slot(self.control, control::ALL_FLAGS) as u32,
                _padding: 0,
            });
        }
        // Read before the lookup: a target removed after this read changes the version, so
        // whatever the lookup finds is not trusted from the cache afterwards.
        let version = control_slot(self.control, control::TARGETS_VERSION)
            .wrapping_add(control_slot(self.control, control::TARGETS_EXITED));
        let recent = self.recent.get_ptr_mut(0);
        if let Some(recent) = recent {
            // SAFETY: a per-CPU slot only this CPU touches.
            let recent = unsafe { &*recent };
            if recent.tgid == tgid && recent.version == version {
                return Some(recent.options);
            }
        }
        // SAFETY: copied out at once; a concurrent removal can at worst make this one run use
        // the options of a target being removed.
        let options = unsafe { *self.targets.get(tgid)? };
        if let Some(recent) = recent {
            // SAFETY: as above.
            unsafe {
                *recent = RecentTarget {
                    tgid,
                    _padding: 0,
                    version,
                    options,
                }
            };
        }
        Some(options)
    }
}

/// Finds the value of `key` in `map`, inserting `init` first if it is absent (a static, so that
/// nothing is built on the stack when the key exists). `None` means the map is full.
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

/// Hashes the frames of a kernel stack whose buffer is zero past `len` (as the stack helpers
/// leave it), eight frames at a time: the loop ends soon after the stack does, and has few enough
/// exits for the verifier to check what follows once per exit.
#[inline(always)]
fn hash_filled_frames(trace: &KernelStack, seed: u64) -> u64 {
    const BLOCK: usize = 8;
    let len = trace.len as usize;
    let mut hash = seed;
    for block in 0..MAX_KERNEL_FRAMES.div_ceil(BLOCK) {
        if block * BLOCK >= len {
            break;
        }
        for i in block * BLOCK..block * BLOCK + BLOCK {
            if let Some(&frame) = trace.frames.get(i) {
                hash = mix(hash, frame);
            }
        }
    }
    hash
}

/// A stack hash kept clear of the sentinels.
#[inline(always)]
fn stack_reference(hash: u64) -> u64 {
    if hash < FIRST_STACK_HASH {
        hash + FIRST_STACK_HASH
    } else {
        hash
    }
}

const KERNEL_SEED: u64 = 0x6b65_726e_656c;
const USER_SEED: u64 = 0x7573_6572;

/// What a capture left in its buffer. A stack cut at the maximum depth is not marked here: its
/// length tells user space (a flag would double the verifier's work on everything after it).
#[derive(Clone, Copy)]
pub enum Captured {
    /// A stack, and the reference it will be stored under.
    Stack(u64),
    /// The task has no such stack (no user space in a kernel thread).
    Absent,
    /// Capturing failed (counted).
    Lost,
}

impl Captured {
    /// The reference the stack will have once stored: its hash, [`NO_STACK`] or [`LOST_STACK`].
    #[inline(always)]
    pub fn reference(self) -> u64 {
        match self {
            Self::Stack(reference) => reference,
            Self::Absent => NO_STACK,
            Self::Lost => LOST_STACK,
        }
    }

    /// What a stack [`reference`](Self::reference) says was captured.
    #[inline(always)]
    pub fn from_reference(reference: u64) -> Self {
        match reference {
            NO_STACK => Self::Absent,
            LOST_STACK => Self::Lost,
            reference => Self::Stack(reference),
        }
    }
}

/// Where stacks are captured (the per-CPU scratch buffers, or the caller's) and stored (the
/// generation's stack maps, user and kernel apart, deduplicated by hash), with the counters for
/// losses. A capture is followed by a store unless the caller knows the stack is stored already.
pub struct StackStore<'a> {
    pub scratch: &'a PerCpuArray<UserStack>,
    pub kernel_scratch: &'a PerCpuArray<KernelStack>,
    pub user_stacks: &'a HashMap<u64, UserStack>,
    pub kernel_stacks: &'a HashMap<u64, KernelStack>,
    pub counters: &'a PerCpuArray<u64>,
    /// Where losses are noted for the run's debug log (see [`LOG_SLOTS`]).
    pub log_state: &'a PerCpuArray<u64>,
}

impl StackStore<'_> {
    /// Captures the current kernel stack into the kernel scratch buffer.
    #[inline(always)]
    pub fn capture_kernel<C: EbpfContext>(&self, ctx: &C) -> Captured {
        // SAFETY: the helper writes at most `size` bytes into `buffer`.
        self.capture_kernel_with(|buffer, size| unsafe {
            bpf_get_stack(ctx.as_ptr(), buffer, size, 0)
        })
    }

    /// Captures the kernel stack of `task`, which must not be running: it is read from where
    /// the task was switched out (scheduler functions left out).
    ///
    /// # Safety
    /// `task` must be a task pointer the verifier trusts (a BTF tracepoint argument).
    #[inline(always)]
    pub unsafe fn capture_kernel_of(&self, task: *mut task_struct) -> Captured {
        // SAFETY: the helper writes at most `size` bytes into `buffer`; `task` is trusted.
        self.capture_kernel_with(|buffer, size| unsafe {
            bpf_get_task_stack(task, buffer, size, 0)
        })
    }

    #[inline(always)]
    fn capture_kernel_with(&self, capture: impl FnOnce(*mut c_void, u32) -> i64) -> Captured {
        let Some(trace) = self.kernel_scratch.get_ptr_mut(0) else {
            return Captured::Lost;
        };
        // SAFETY: a valid per-CPU scratch value; programs do not nest on one CPU.
        let trace = unsafe { &mut *trace };
        let written = capture(
            trace.frames.as_mut_ptr().cast(),
            (MAX_KERNEL_FRAMES * 8) as u32,
        );
        if written <= 0 {
            count(self.counters, counter::KERNEL_STACK_LOST, 1);
            return Captured::Lost;
        }
        trace.len = written as u64 / 8;
        if trace.len as usize == MAX_KERNEL_FRAMES {
            count(self.counters, counter::STACK_TRUNCATED, 1);
        }
        Captured::Stack(stack_reference(hash_filled_frames(trace, KERNEL_SEED)))
    }

    /// Captures the user stack of the current task into the scratch buffer (see
    /// [`capture_user_into`]).
    #[inline(always)]
    pub fn capture_user(&self, interrupted: Option<&pt_regs>) -> Captured {
        let Some(trace) = self.scratch.get_ptr_mut(0) else {
            return Captured::Lost;
        };
        // SAFETY: a valid per-CPU scratch value; programs do not nest on one CPU.
        capture_user_into(unsafe { &mut *trace }, interrupted, self.counters)
    }

    /// Stores the kernel stack just captured in the kernel scratch buffer and returns its
    /// reference: [`NO_STACK`], or [`LOST_STACK`] (counted, and noted for the run's debug log)
    /// if it cannot be stored.
    #[inline(always)]
    pub fn store_kernel(&self, captured: Captured) -> u64 {
        self.store(
            self.kernel_stacks,
            captured,
            (counter::KERNEL_STACK_LOST, LOST_KERNEL_STACK),
            || self.kernel_scratch.get(0),
        )
    }

    /// Stores the user stack just captured in the scratch buffer (see
    /// [`store_kernel`](Self::store_kernel)).
    #[inline(always)]
    pub fn store_user(&self, captured: Captured) -> u64 {
        self.store(
            self.user_stacks,
            captured,
            (counter::USER_STACK_LOST, LOST_USER_STACK),
            || self.scratch.get(0),
        )
    }

    /// [`store_user`](Self::store_user) for a user stack captured into `trace`.
    #[inline(always)]
    pub fn store_user_from(&self, captured: Captured, trace: &UserStack) -> u64 {
        self.store(
            self.user_stacks,
            captured,
            (counter::USER_STACK_LOST, LOST_USER_STACK),
            || Some(trace),
        )
    }

    /// Stores a captured stack in `stacks` under its reference (deduplicated: an equal stack
    /// is stored already) and returns the reference, or [`LOST_STACK`]: counted in the
    /// counter, and noted with the bit for the run's debug log, of `lost`.
    #[inline(always)]
    fn store<'t, T: 't>(
        &self,
        stacks: &HashMap<u64, T>,
        captured: Captured,
        (lost_counter, lost_bit): (u32, u64),
        trace: impl FnOnce() -> Option<&'t T>,
    ) -> u64 {
        let reference = match captured {
            Captured::Stack(reference) => reference,
            Captured::Absent => return NO_STACK,
            Captured::Lost => return LOST_STACK,
        };
        if stacks.get_ptr(reference).is_some() {
            return reference;
        }
        let Some(trace) = trace() else {
            return LOST_STACK;
        };
        // By reference: the map copies the value (1 KiB does not fit on the BPF stack).
        match stacks.insert(reference, trace, BPF_NOEXIST.into()) {
            Ok(()) => reference,
            Err(error) if error == -EEXIST => reference,
            Err(_) => {
                count(self.counters, lost_counter, 1);
                if let Some(lost) = self.log_state.get_ptr_mut(LOG_LOST_STACKS) {
                    // SAFETY: a per-CPU slot only this CPU touches.
                    unsafe { *lost |= lost_bit };
                }
                LOST_STACK
            }
        }
    }
}

/// Captures the user stack of the current task into `trace` by walking frame pointers from its
/// user registers: the interrupted registers when they are user mode, else the registers saved
/// at kernel entry. Kernel threads have none.
#[inline(always)]
pub fn capture_user_into(
    trace: &mut UserStack,
    interrupted: Option<&pt_regs>,
    counters: &PerCpuArray<u64>,
) -> Captured {
    let Some(regs) = user_registers(interrupted) else {
        count(counters, counter::KERNEL_ONLY, 1);
        return Captured::Absent;
    };
    trace.frames[0] = regs.ip;
    // The hash is computed during the walk: after the loop nothing depends on where it
    // ended, which lets the verifier merge the exits instead of checking the rest once each.
    let mut hash = mix(USER_SEED, regs.ip);
    let mut len = 1;
    let mut frame_pointer = regs.frame_pointer;
    for i in 1..MAX_USER_FRAMES {
        // A frame record is [saved frame pointer, return address], 8-byte aligned.
        if frame_pointer == 0 || frame_pointer & 7 != 0 {
            break;
        }
        // SAFETY: reading user memory through the fault-tolerant helper.
        let Ok([next_frame_pointer, return_address]) =
            (unsafe { bpf_probe_read_user(frame_pointer as *const [u64; 2]) })
        else {
            break;
        };
        if return_address == 0 {
            break;
        }
        if let Some(slot) = trace.frames.get_mut(i) {
            *slot = return_address;
        }
        hash = mix(hash, return_address);
        len = i + 1;
        // Callers' frames lie above: anything else is a corrupt chain.
        if next_frame_pointer <= frame_pointer {
            break;
        }
        frame_pointer = next_frame_pointer;
    }
    if len == MAX_USER_FRAMES {
        count(counters, counter::STACK_TRUNCATED, 1);
    }
    trace.len = len as u64;
    Captured::Stack(stack_reference(hash))
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
    // SAFETY: helpers available to tracing programs. The pointer is BTF-typed, so the verifier
    // turns these field loads into fault-tolerant ones, cheaper than copying the whole struct.
    // Volatile: LLVM must not merge them with the loads from `interrupted` above, which the
    // verifier refuses (one instruction may not load through two kinds of pointer).
    let (cs, ip, frame_pointer) = unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        (
            core::ptr::read_volatile(&raw const (*regs).cs),
            core::ptr::read_volatile(&raw const (*regs).rip),
            core::ptr::read_volatile(&raw const (*regs).rbp),
        )
    };
    // Kernel threads have no user registers saved: their `cs` is not a user segment.
    if cs & 3 != 3 || ip == 0 {
        return None;
    }
    Some(UserRegisters { ip, frame_pointer })
}

#[inline(always)]
fn is_user_mode(regs: &pt_regs) -> bool {
    regs.cs & 3 == 3
}

/// A task-local storage map (`BPF_MAP_TYPE_TASK_STORAGE`), which aya-ebpf 0.2.1 lacks: a value
/// hangs off each task that has one, found through the task itself (no hashing), and the
/// kernel frees it with the task. Declared as a BTF map (`#[btf_map]`): the kernel requires
/// the key and value types of local storage maps.
#[repr(C)]
pub struct TaskStorage<T> {
    // The BTF map definition encodes its attributes in the types of these fields.
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; aya_ebpf::bindings::BPF_F_NO_PREALLOC as usize],
}

// SAFETY: the fields only describe the map to the loader, through their types; nothing
// dereferences them.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> Default for TaskStorage<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    /// The value of `task`, if it has one.
    ///
    /// # Safety
    /// `task` must be a task pointer the verifier trusts.
    #[inline(always)]
    pub unsafe fn get(&self, task: *mut task_struct) -> Option<*mut T> {
        // SAFETY: guaranteed by the caller.
        let value = unsafe { bpf_task_storage_get(self.as_ptr(), task, core::ptr::null_mut(), 0) };
        (!value.is_null()).then_some(value.cast())
    }

    /// The value of `task`, created zeroed if it has none; `None` if it cannot be allocated.
    ///
    /// # Safety
    /// As [`get`](Self::get).
    #[inline(always)]
    pub unsafe fn get_or_create(&self, task: *mut task_struct) -> Option<*mut T> {
        // SAFETY: guaranteed by the caller.
        let value = unsafe {
            bpf_task_storage_get(
                self.as_ptr(),
                task,
                core::ptr::null_mut(),
                BPF_LOCAL_STORAGE_GET_F_CREATE.into(),
            )
        };
        (!value.is_null()).then_some(value.cast())
    }

    /// Deletes the value of `task`; true if it had one.
    ///
    /// # Safety
    /// As [`get`](Self::get).
    #[inline(always)]
    pub unsafe fn delete(&self, task: *mut task_struct) -> bool {
        // SAFETY: guaranteed by the caller.
        unsafe { bpf_task_storage_delete(self.as_ptr(), task) == 0 }
    }
}

/// What the task iterators (`bin/tasks.rs`, `bin/process_cpu.rs`) share. Rust eBPF has no CO-RE
/// relocations: offsets are globals set at load time from the kernel's BTF.
pub mod task_iter {
    use aya_ebpf::{Global, bindings::seq_file, helpers::bpf_probe_read_kernel};

    /// `struct bpf_iter_meta`.
    #[repr(C)]
    pub struct IterMeta {
        pub seq: *mut seq_file,
        pub session_id: u64,
        pub seq_num: u64,
    }

    /// `struct bpf_iter__task`: `task` is NULL once, after the last task.
    #[repr(C)]
    pub struct IterTask {
        pub meta: *mut IterMeta,
        pub task: *const u8,
    }

    /// A `T` at `offset` from `base`, read fault-tolerantly.
    #[inline(always)]
    pub fn read<T>(base: *const u8, offset: &Global<u32>) -> Option<T> {
        // SAFETY: a fault-tolerant read at the offset the kernel's BTF gives.
        unsafe { bpf_probe_read_kernel(base.wrapping_add(offset.load() as usize).cast::<T>()).ok() }
    }

    /// A task's pid and tgid: side by side in every kernel's `task_struct`, so one read.
    #[inline(always)]
    pub fn ids(task: *const u8, pid: &Global<u32>, tgid: &Global<u32>) -> Option<(u32, u32)> {
        if tgid.load() == pid.load() + 4 {
            read::<[u32; 2]>(task, pid).map(|[pid, tgid]| (pid, tgid))
        } else {
            read::<u32>(task, pid).zip(read::<u32>(task, tgid))
        }
    }
}
