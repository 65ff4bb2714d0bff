//! The task iterator: lists every process (thread-group leader) with what process discovery
//! needs of it (`/proc/PID/stat`'s comm, state, flags and start time, its cgroup paths, and
//! where its arguments are) in one read of an iterator file, where procfs costs two files (six
//! system calls, ~30 µs on a VM) per process: discovery's full scans of a busy node.
//!
//! Rust eBPF has no CO-RE relocations: every offset is set at load time from the kernel's BTF.
#![no_std]
#![no_main]

use aya_ebpf::{
    Global,
    cty::c_void,
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes, generated::bpf_seq_write},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use rover_common::{
    TASK_CGROUP_CUT, TASK_CGROUP_DEPTH, TASK_CGROUP_LISTED_BEFORE, TASK_CGROUP_NAME_LEN,
    TASK_CGROUP_WHOLE, TaskCgroup, TaskRecord,
};
use rover_ebpf::task_iter::{IterTask, ids, read};

// `task_struct` members.
#[unsafe(no_mangle)]
static TASK_PID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_TGID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_FLAGS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_EXIT_STATE: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_START_BOOTTIME: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_COMM: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_CGROUPS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static TASK_MM: Global<u32> = Global::new(0);
// `mm_struct::arg_start`, `mm_struct::arg_end`.
#[unsafe(no_mangle)]
static MM_ARG_START: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static MM_ARG_END: Global<u32> = Global::new(0);
// `mm_struct::exe_file`.
#[unsafe(no_mangle)]
static MM_EXE_FILE: Global<u32> = Global::new(0);
// `css_set::dfl_cgrp` and `css_set::subsys`; `V1_SUBSYS`: the index in `subsys` of the v1
// controller whose hierarchy is listed too.
#[unsafe(no_mangle)]
static CSS_SET_DFL_CGRP: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CSS_SET_SUBSYS: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static V1_SUBSYS: Global<u32> = Global::new(0);
// `cgroup_subsys_state::cgroup`, `cgroup::kn`, `kernfs_node::id`, `name` and its parent.
#[unsafe(no_mangle)]
static CSS_CGROUP: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static CGROUP_KN: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KN_ID: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KN_NAME: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static KN_PARENT: Global<u32> = Global::new(0);

/// `PF_KTHREAD`: a kernel thread has no cgroup worth listing.
const PF_KTHREAD: u32 = 0x0020_0000;

/// The record being built: too big for the 512-byte stack.
#[map]
static SCRATCH: PerCpuArray<TaskRecord> = PerCpuArray::with_max_entries(1, 0);

/// The listing (iterator session) in which each cgroup's whole path was last written, by kernfs
/// node id: the processes of a pod share its cgroups, and walking a path costs about 20 kernel
/// reads. Marked only once a record holding the path is written; a cgroup evicted is walked
/// again.
#[map]
static LISTED_CGROUPS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// The path of the cgroup `cgroup` (a `struct cgroup *`), innermost name first, unless an
/// earlier record of listing `session` held it.
#[inline(always)]
fn cgroup_path(cgroup: *const u8, path: &mut TaskCgroup, session: u64) {
    path.id = 0;
    path.depth = 0;
    path.state = TASK_CGROUP_CUT;
    let Some(mut node) = read::<*const u8>(cgroup, &CGROUP_KN) else {
        return;
    };
    path.id = read(node, &KN_ID).unwrap_or(0);
    // SAFETY: a copy of the value is taken at once; a concurrent update only makes it stale,
    // which at worst walks the path again.
    if path.id != 0 && unsafe { LISTED_CGROUPS.get(path.id) }.copied() == Some(session) {
        path.state = TASK_CGROUP_LISTED_BEFORE;
        return;
    }
    for level in 0..=TASK_CGROUP_DEPTH {
        let Some(parent) = read::<*const u8>(node, &KN_PARENT) else {
            return;
        };
        if parent.is_null() {
            // `node` is the hierarchy's root, which has no name in paths.
            path.state = TASK_CGROUP_WHOLE;
            return;
        }
        let (Some(slot), Some(name)) =
            (path.names.get_mut(level), read::<*const u8>(node, &KN_NAME))
        else {
            return;
        };
        // SAFETY: a fault-tolerant string read into our own buffer.
        match unsafe { bpf_probe_read_kernel_str_bytes(name, slot) } {
            // A name that fills the slot may have been cut: the path is not whole.
            Ok(read) if read.len() + 1 < TASK_CGROUP_NAME_LEN => {}
            _ => return,
        }
        path.depth = level as u32 + 1;
        node = parent;
    }
}

/// Lists one task when it is a process (its thread-group leader).
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task")]
pub extern "C" fn list_tasks(ctx: *mut c_void) -> i32 {
    // SAFETY: the kernel hands an iterator program its `bpf_iter__task`; both loads are checked
    // by the verifier against that type.
    let (seq, session, task) = unsafe {
        let ctx = &*ctx.cast::<IterTask>();
        ((*ctx.meta).seq, (*ctx.meta).session_id, ctx.task)
    };
    if task.is_null() {
        return 0;
    }
    let ids = ids(task, &TASK_PID, &TASK_TGID);
    let Some((pid, tgid)) = ids else {
        return 0;
    };
    if pid != tgid {
        return 0;
    }
    let Some(record) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: this CPU's slot of our own map; an iterator program is not preempted by another.
    let record = unsafe { &mut *record };
    record.pid = tgid;
    record.flags = read(task, &TASK_FLAGS).unwrap_or(0);
    record.exit_state = read(task, &TASK_EXIT_STATE).unwrap_or(0);
    record.start_boottime_ns = read(task, &TASK_START_BOOTTIME).unwrap_or(0);
    record.comm = read(task, &TASK_COMM).unwrap_or([0; 16]);
    for path in &mut record.cgroups {
        path.id = 0;
        path.depth = 0;
        path.state = TASK_CGROUP_CUT;
    }
    record.arg_start = 0;
    record.arg_end = 0;
    record.has_exe_file = 0;
    if let Some(mm) = read::<*const u8>(task, &TASK_MM)
        && !mm.is_null()
    {
        record.arg_start = read(mm, &MM_ARG_START).unwrap_or(0);
        record.arg_end = read(mm, &MM_ARG_END).unwrap_or(0);
        record.has_exe_file =
            u32::from(read::<*const u8>(mm, &MM_EXE_FILE).is_some_and(|file| !file.is_null()));
    }

    if record.flags & PF_KTHREAD == 0
        && let Some(css_set) = read::<*const u8>(task, &TASK_CGROUPS)
    {
        if let Some(unified) = read::<*const u8>(css_set, &CSS_SET_DFL_CGRP) {
            cgroup_path(unified, &mut record.cgroups[0], session);
        }
        let subsys = css_set
            .wrapping_add(CSS_SET_SUBSYS.load() as usize)
            .wrapping_add(V1_SUBSYS.load() as usize * 8);
        // SAFETY: a fault-tolerant read of one `subsys` slot.
        let css = unsafe { bpf_probe_read_kernel(subsys.cast::<*const u8>()).ok() };
        if let Some(css) = css
            && let Some(v1) = read::<*const u8>(css, &CSS_CGROUP)
        {
            cgroup_path(v1, &mut record.cgroups[1], session);
        }
    }
    // SAFETY: `seq` is the iterator's own seq_file; the record is ours, of its full size.
    let written = unsafe {
        bpf_seq_write(
            seq,
            (record as *const TaskRecord).cast(),
            core::mem::size_of::<TaskRecord>() as u32,
        )
    };
    // Not written (the read's buffer is full): the task is shown again in the next read, with
    // its paths walked again.
    if written == 0 {
        for path in &record.cgroups {
            if path.state == TASK_CGROUP_WHOLE && path.id != 0 {
                let _ = LISTED_CGROUPS.insert(path.id, session, 0);
            }
        }
    }
    0
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
