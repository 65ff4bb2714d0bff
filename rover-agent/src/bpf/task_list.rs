//! The task iterator object: every process of the host with its `stat` fields, cgroup paths and
//! where its arguments are, in one read, for process discovery's full scans (procfs costs two
//! files per process, and one more for the arguments).

use std::collections::HashMap;
use std::fmt::Write as _;

use aya::Ebpf;

use rover_common::{
    TASK_CGROUP_LISTED_BEFORE, TASK_CGROUP_NAME_LEN, TASK_CGROUP_WHOLE, TaskCgroup, TaskRecord,
};

use super::{Error, kernel_btf, object, task_iter};
use crate::process::proc_files::{Stat, ns_per_tick};
use crate::process::{ListedProcess, ProcessList};

const OBJECT: &str = "tasks";
const PROGRAM: &str = "list_tasks";

/// The loaded iterator; each [`ProcessList::list`] runs it once.
pub struct TaskList {
    ebpf: Ebpf,
    /// Nanoseconds per clock tick, the unit of `stat`'s start time.
    ns_per_tick: u64,
    /// Which hierarchy `cgroups[1]` is, for the lines it becomes (`<id>:<name>:<path>`).
    v1_controller: &'static str,
    chunk: Vec<u8>,
}

/// The v1 controllers whose hierarchy is listed, the first the kernel has: a container runtime
/// puts a container in each controller's hierarchy under the same path.
const V1_CONTROLLERS: [(&str, &str); 3] = [
    ("memory_cgrp_id", "memory"),
    ("cpu_cgrp_id", "cpu"),
    ("pids_cgrp_id", "pids"),
];

impl TaskList {
    /// Loads the iterator. Needs the agent's eBPF privileges and the kernel's BTF; parsing the
    /// BTF costs ~20 MB of heap for a moment, given back after.
    pub fn load() -> Result<Self, Error> {
        super::privilege::require_privilege()?;
        let [
            pid,
            tgid,
            flags,
            exit_state,
            start_boottime,
            comm,
            cgroups,
            mm,
            arg_start,
            arg_end,
            exe_file,
            dfl_cgrp,
            subsys,
            css_cgroup,
            cgroup_kn,
            kn_id,
            kn_name,
            kn_parent,
            kn_old_parent,
        ] = kernel_btf::member_offsets(&[
            ("task_struct", "pid"),
            ("task_struct", "tgid"),
            ("task_struct", "flags"),
            ("task_struct", "exit_state"),
            ("task_struct", "start_boottime"),
            ("task_struct", "comm"),
            ("task_struct", "cgroups"),
            ("task_struct", "mm"),
            // In anonymous structs.
            ("mm_struct", "arg_start"),
            ("mm_struct", "arg_end"),
            ("mm_struct", "exe_file"),
            ("css_set", "dfl_cgrp"),
            ("css_set", "subsys"),
            ("cgroup_subsys_state", "cgroup"),
            ("cgroup", "kn"),
            ("kernfs_node", "id"),
            ("kernfs_node", "name"),
            // Renamed in Linux 6.15.
            ("kernfs_node", "__parent"),
            ("kernfs_node", "parent"),
        ])
        .map_err(Error::KernelLayout)?;
        let mut v1 = None;
        for (enumerator, controller) in V1_CONTROLLERS {
            if let Some(index) = kernel_btf::enumerator(enumerator).map_err(Error::KernelLayout)? {
                v1 = Some((index, controller));
                break;
            }
        }
        let Some((v1_index, v1_controller)) = v1 else {
            return Err(Error::KernelLayout(
                "no memory, cpu or pids cgroup controller".to_owned(),
            ));
        };
        let v1_index = u32::try_from(v1_index)
            .map_err(|_| Error::KernelLayout(format!("controller index {v1_index}")))?;
        let ebpf = task_iter::load(
            OBJECT,
            object::tasks()?,
            PROGRAM,
            &[
                ("TASK_PID", pid),
                ("TASK_TGID", tgid),
                ("TASK_FLAGS", flags),
                ("TASK_EXIT_STATE", exit_state),
                ("TASK_START_BOOTTIME", start_boottime),
                ("TASK_COMM", comm),
                ("TASK_CGROUPS", cgroups),
                ("TASK_MM", mm),
                ("MM_ARG_START", arg_start),
                ("MM_ARG_END", arg_end),
                ("MM_EXE_FILE", exe_file),
                ("CSS_SET_DFL_CGRP", dfl_cgrp),
                ("CSS_SET_SUBSYS", subsys),
                ("CSS_CGROUP", css_cgroup),
                ("CGROUP_KN", cgroup_kn),
                ("KN_ID", kn_id),
                ("KN_NAME", kn_name),
                ("KN_PARENT", kn_parent.or(kn_old_parent)),
                ("V1_SUBSYS", Some(v1_index)),
            ],
        )?;
        let mut list = Self {
            ebpf,
            ns_per_tick: ns_per_tick(),
            v1_controller,
            chunk: Vec::new(),
        };
        // The pids are the initial namespace's: this procfs must show the same ones.
        let own = std::process::id();
        if !list.records()?.iter().any(|listed| listed.pid == own) {
            return Err(Error::ForeignPidNamespace);
        }
        Ok(list)
    }

    /// Every process, as the kernel lists it now.
    fn records(&mut self) -> Result<Vec<ListedProcess>, Error> {
        let (ns_per_tick, v1_controller) = (self.ns_per_tick, self.v1_controller);
        let mut processes = Vec::new();
        // The paths of this listing's cgroups, by id: a cgroup's is in its first record only.
        let mut paths = HashMap::new();
        // SAFETY: `TaskRecord` is what the program writes, integers only.
        unsafe {
            task_iter::run(
                &mut self.ebpf,
                OBJECT,
                PROGRAM,
                &mut self.chunk,
                Error::TaskList,
                |record: TaskRecord| {
                    processes.push(listed(&record, ns_per_tick, v1_controller, &mut paths));
                },
            )?;
        }
        Ok(processes)
    }
}

/// A record as discovery takes it.
fn listed(
    record: &TaskRecord,
    ns_per_tick: u64,
    v1_controller: &str,
    paths: &mut HashMap<u64, String>,
) -> ListedProcess {
    let comm_len = record
        .comm
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(record.comm.len());
    let stat = Stat {
        comm: String::from_utf8_lossy(&record.comm[..comm_len]).into_owned(),
        // Only "gone or not" matters to a scan.
        state: if record.exit_state != 0 { 'Z' } else { 'S' },
        flags: u64::from(record.flags),
        start_time: record.start_boottime_ns / ns_per_tick,
    };
    ListedProcess {
        pid: record.pid,
        stat,
        cgroup_file: cgroup_file(&record.cgroups, v1_controller, paths),
        arguments: record.arg_start..record.arg_end,
        has_exe_file: record.has_exe_file != 0,
    }
}

impl ProcessList for TaskList {
    fn list(&mut self) -> anyhow::Result<Vec<ListedProcess>> {
        Ok(self.records()?)
    }
}

/// The text `/proc/PID/cgroup` would hold for these paths: the v1 line then the v2 one
/// (hierarchy ids are not needed and written as 1); `None` when a path is not whole. `paths`:
/// the paths of the cgroups listed before, by id, which this adds to.
fn cgroup_file(
    cgroups: &[TaskCgroup; 2],
    v1_controller: &str,
    paths: &mut HashMap<u64, String>,
) -> Option<String> {
    let [unified, v1] = cgroups;
    let v1 = path_of(v1, paths)?;
    let unified = path_of(unified, paths)?;
    Some(format!("1:{v1_controller}:{v1}\n0::{unified}\n"))
}

/// The path of `cgroup` (`/a/b`), from its names (then kept in `paths`) or from `paths`; `None`
/// when not whole.
fn path_of(cgroup: &TaskCgroup, paths: &mut HashMap<u64, String>) -> Option<String> {
    match cgroup.state {
        TASK_CGROUP_WHOLE => {
            let depth = usize::try_from(cgroup.depth).ok()?;
            let names = cgroup.names.get(..depth)?;
            let mut path = String::new();
            if names.is_empty() {
                path.push('/');
            }
            for name in names.iter().rev() {
                let len = name
                    .iter()
                    .position(|&byte| byte == 0)
                    .unwrap_or(TASK_CGROUP_NAME_LEN);
                let _ = write!(path, "/{}", String::from_utf8_lossy(&name[..len]));
            }
            if cgroup.id != 0 {
                paths.insert(cgroup.id, path.clone());
            }
            Some(path)
        }
        TASK_CGROUP_LISTED_BEFORE => paths.get(&cgroup.id).cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use rover_common::TASK_CGROUP_DEPTH;

    use super::*;

    fn path(names: &[&str], complete: bool) -> TaskCgroup {
        let mut path = TaskCgroup {
            id: 0,
            depth: names.len() as u32,
            state: if complete {
                TASK_CGROUP_WHOLE
            } else {
                rover_common::TASK_CGROUP_CUT
            },
            names: [[0; TASK_CGROUP_NAME_LEN]; TASK_CGROUP_DEPTH],
        };
        // Innermost first, as the program writes them.
        for (slot, name) in path.names.iter_mut().zip(names.iter().rev()) {
            slot[..name.len()].copy_from_slice(name.as_bytes());
        }
        path
    }

    #[test]
    fn paths_become_the_cgroup_file_text() {
        let container =
            "cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope";
        let unified = path(&["kubepods.slice", "kubepods-pod1.slice", container], true);
        let text =
            cgroup_file(&[unified, path(&[], true)], "memory", &mut HashMap::new()).expect("whole");
        assert_eq!(
            text,
            format!("1:memory:/\n0::/kubepods.slice/kubepods-pod1.slice/{container}\n")
        );
        let identity = crate::process::cgroup::parse_cgroup_file(text.as_bytes());
        assert_eq!(
            identity.container_id.map(|id| id.to_string()),
            Some("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_owned())
        );
    }

    #[test]
    fn a_path_not_whole_is_read_from_procfs() {
        let cut = path(&["a", "b"], false);
        let mut paths = HashMap::new();
        assert_eq!(
            cgroup_file(&[path(&[], true), cut], "cpu", &mut paths),
            None
        );
        assert_eq!(
            cgroup_file(&[cut, path(&["a"], true)], "cpu", &mut paths),
            None
        );
    }

    #[test]
    fn a_cgroup_listed_before_has_the_path_its_first_record_gave() {
        let mut paths = HashMap::new();
        let with_id = |mut path: TaskCgroup, id| {
            path.id = id;
            path
        };
        let before = |id| TaskCgroup {
            id,
            depth: 0,
            state: TASK_CGROUP_LISTED_BEFORE,
            names: [[0; TASK_CGROUP_NAME_LEN]; TASK_CGROUP_DEPTH],
        };
        let first = [
            with_id(path(&["kubepods", "pod1", "c1"], true), 7),
            with_id(path(&[], true), 1),
        ];
        let text = cgroup_file(&first, "memory", &mut paths).expect("whole");
        assert_eq!(text, "1:memory:/\n0::/kubepods/pod1/c1\n");
        assert_eq!(
            cgroup_file(&[before(7), before(1)], "memory", &mut paths),
            Some(text)
        );
        // An id no earlier record gave: the cgroup file is read instead.
        assert_eq!(
            cgroup_file(&[before(8), before(1)], "memory", &mut paths),
            None
        );
    }
}
