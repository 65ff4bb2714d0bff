//! What discovery knows of every process on the host, read from procfs once and again only
//! when the kernel marks it (exec, exit) or, without the kernel's word, when its `stat` changed;
//! indexed by container, so that a pod's processes are found without a pass over all of them.
//!
//! Many reads at once (the first scan, a scan without the kernel's word) are spread over a few
//! threads: procfs reads are system-call bound and scale with cores.

// foldhash: the maps of thousands of processes hashed at every first scan, where SipHash
// cost a fifth of naming them.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::fs;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::{DiscoveryError, threads};
use crate::process::cgroup::{CgroupReader, ContainerId};
use crate::process::kubernetes::analyzer::ProcessRenders;
use crate::process::proc_files::{
    CommandLine, ListedProcess, ProcessList, can_open_exe, exe_name, read_arguments,
    read_command_line, read_stat,
};

/// Below this many reads one thread does them: a thread costs more than it saves.
pub(super) const PARALLEL_READS_MIN: usize = 256;

/// A process as the last read left it: the same while its start time and `comm` stay.
pub(super) struct KnownProcess {
    pub(super) start_time: u64,
    comm: String,
    kernel_thread: bool,
    /// `None`: not in a container (a host process or a kernel thread). Boxed: most of a
    /// node's processes are not in a pod's container, and the map of all of them holds a slot
    /// per process (and as many empty ones).
    pub(super) container: Option<Box<ContainerProcess>>,
}

pub(super) struct ContainerProcess {
    pub(super) id: ContainerId,
    pub(super) command_line: CommandLine,
    pub(super) exe_name: String,
    pub(super) profilable: bool,
    /// The names last rendered, and for which generation of the pod's naming (see
    /// `PodState::generation`); `None` inside: no analyzer named it.
    pub(super) named: Option<(u64, Option<crate::process::entity::EntityNames>)>,
    /// What the templates that read only `.Process` gave it, for any generation.
    pub(super) renders: ProcessRenders,
}

/// Every process of the host, by pid and by container.
pub(super) struct KnownProcesses {
    proc_root: PathBuf,
    cgroups: CgroupReader,
    self_pid: u32,
    processes: HashMap<u32, KnownProcess>,
    by_container: HashMap<ContainerId, Vec<u32>>,
    /// The most threads a scan spreads over ([`threads::available`]).
    threads: usize,
    /// Lists every process at once for the scans that read every one; `None`: each process's
    /// files are read.
    list: Option<Box<dyn ProcessList>>,
}

/// One process to read, with what was known of it.
struct Job {
    pid: u32,
    listed: Option<ListedProcess>,
    before: Option<KnownProcess>,
    /// Without the kernel's word: kept as it was when its `stat` did not change.
    keep_if_unchanged: bool,
}

/// What reading a process found.
struct Outcome {
    pid: u32,
    /// What was known of it, when it changed.
    before: Option<KnownProcess>,
    /// What is known of it now; `None`: gone, a zombie, or not exec'd yet (read again next
    /// scan).
    now: Option<KnownProcess>,
    /// `now` is as it was (and indexed as it was).
    unchanged: bool,
}

impl Outcome {
    /// As it was.
    fn kept(pid: u32, known: KnownProcess) -> Self {
        Self {
            pid,
            before: None,
            now: Some(known),
            unchanged: true,
        }
    }

    fn skipped(pid: u32, before: Option<KnownProcess>) -> Self {
        Self {
            pid,
            before,
            now: None,
            unchanged: false,
        }
    }
}

impl KnownProcesses {
    pub(super) fn new(proc_root: PathBuf) -> Self {
        Self {
            cgroups: CgroupReader::new(&proc_root),
            proc_root,
            self_pid: std::process::id(),
            processes: HashMap::new(),
            by_container: HashMap::new(),
            threads: threads::available(),
            list: None,
        }
    }

    /// Lists processes with `list` in the scans that read every process (until it fails).
    pub(super) fn list_with(&mut self, list: Box<dyn ProcessList>) {
        self.list = Some(list);
    }

    /// The container of process `pid`, read now (the agent's own, to leave its pod out).
    pub(super) fn container_of(&mut self, pid: u32) -> Option<ContainerId> {
        self.cgroups.read(pid).ok().flatten()?.container_id
    }

    /// The most threads a scan spreads over.
    pub(super) fn threads(&self) -> usize {
        self.threads
    }

    pub(super) fn get(&self, pid: u32) -> Option<&KnownProcess> {
        self.processes.get(&pid)
    }

    pub(super) fn get_mut(&mut self, pid: u32) -> Option<&mut KnownProcess> {
        self.processes.get_mut(&pid)
    }

    /// The processes of container `id`.
    pub(super) fn in_container(&self, id: &ContainerId) -> &[u32] {
        self.by_container.get(id).map_or(&[], Vec::as_slice)
    }

    /// Reads what is new or changed in the procfs tree: the processes the kernel marked
    /// (`changed`), else those whose `stat` changed; and with `recheck_cgroups`, those seen
    /// outside containers. Returns the containers whose processes changed.
    pub(super) fn read(
        &mut self,
        changed: Option<&std::collections::HashSet<u32>>,
        recheck_cgroups: bool,
    ) -> Result<HashSet<ContainerId>, DiscoveryError> {
        let mut listed = HashSet::with_capacity(self.processes.len() + 64);
        let mut jobs = Vec::new();
        for (pid, what_listed) in self.list_processes(changed.is_none())? {
            if pid == self.self_pid {
                continue;
            }
            listed.insert(pid);
            let recheck = self.processes.get(&pid).is_some_and(|known| {
                recheck_cgroups && known.container.is_none() && !known.kernel_thread
            });
            let unmarked = changed.is_some_and(|changed| !changed.contains(&pid));
            if unmarked && !recheck && self.processes.contains_key(&pid) {
                continue;
            }
            jobs.push(Job {
                pid,
                listed: what_listed,
                before: self.processes.remove(&pid),
                keep_if_unchanged: changed.is_none() && !recheck,
            });
        }
        let gone: Vec<u32> = self
            .processes
            .keys()
            .filter(|pid| !listed.contains(pid))
            .copied()
            .collect();
        let mut dirty = HashSet::new();
        for pid in gone {
            if let Some(known) = self.processes.remove(&pid) {
                self.unindex(pid, &known, &mut dirty);
            }
        }
        self.apply(jobs, &mut dirty);
        Ok(dirty)
    }

    /// The pids of every process in the proc root, with what the list told of each when
    /// `use_list` and a list works. The proc root says which processes there are: a list may
    /// leave some out (a kernel may hide tasks from BPF iterators, as this project's CI
    /// machine hides its pid 1), which are read from procfs.
    fn list_processes(
        &mut self,
        use_list: bool,
    ) -> Result<Vec<(u32, Option<ListedProcess>)>, DiscoveryError> {
        let proc_root = &self.proc_root;
        // The kernel's list and the proc root's entries side by side: each is milliseconds of
        // system calls for thousands of processes.
        let (listing, pids) = std::thread::scope(|scope| {
            let listing = self
                .list
                .as_mut()
                .filter(|_| use_list)
                .map(|list| scope.spawn(move || list.list()));
            let pids = proc_pids(proc_root);
            let listing = listing.map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("the listing thread panicked")))
            });
            (listing, pids)
        });
        let mut listed: HashMap<u32, ListedProcess> = HashMap::new();
        match listing {
            Some(Ok(processes)) => {
                listed.extend(processes.into_iter().map(|process| (process.pid, process)));
            }
            Some(Err(error)) => {
                warn!("listing processes through the kernel failed, procfs is read: {error:#}");
                self.list = None;
            }
            None => {}
        }
        Ok(pids
            .map_err(|source| DiscoveryError::ListProcesses {
                path: self.proc_root.clone(),
                source,
            })?
            .into_iter()
            .map(|pid| (pid, listed.remove(&pid)))
            .collect())
    }

    /// Reads the processes in `marked` (exec'd or exited) and no other. Returns the containers
    /// whose processes changed.
    pub(super) fn read_only(
        &mut self,
        marked: &std::collections::HashSet<u32>,
    ) -> HashSet<ContainerId> {
        let jobs = marked
            .iter()
            .filter(|&&pid| pid != self.self_pid)
            .map(|&pid| Job {
                pid,
                listed: None,
                before: self.processes.remove(&pid),
                keep_if_unchanged: false,
            })
            .collect();
        let mut dirty = HashSet::new();
        self.apply(jobs, &mut dirty);
        dirty
    }

    /// Does `jobs` and keeps what they found, adding the containers whose processes changed to
    /// `dirty`.
    fn apply(&mut self, jobs: Vec<Job>, dirty: &mut HashSet<ContainerId>) {
        for Outcome {
            pid,
            before,
            now,
            unchanged,
        } in self.read_all(jobs)
        {
            if let Some(before) = before {
                self.unindex(pid, &before, dirty);
            }
            if let Some(now) = now {
                if !unchanged && let Some(container) = &now.container {
                    self.by_container.entry(container.id).or_default().push(pid);
                    dirty.insert(container.id);
                }
                self.processes.insert(pid, now);
            }
        }
    }

    fn unindex(&mut self, pid: u32, known: &KnownProcess, dirty: &mut HashSet<ContainerId>) {
        let Some(container) = &known.container else {
            return;
        };
        if let Some(pids) = self.by_container.get_mut(&container.id) {
            pids.retain(|&other| other != pid);
            if pids.is_empty() {
                self.by_container.remove(&container.id);
            }
        }
        dirty.insert(container.id);
    }

    /// Does `jobs`, on a few threads when there are many.
    fn read_all(&mut self, jobs: Vec<Job>) -> Vec<Outcome> {
        let threads = self.threads.min(jobs.len() / PARALLEL_READS_MIN).max(1);
        if threads == 1 {
            return jobs
                .into_iter()
                .map(|job| read_process(&self.proc_root, &mut self.cgroups, job))
                .collect();
        }
        let proc_root = &self.proc_root;
        let done = threads::split(
            jobs,
            threads,
            || CgroupReader::new(proc_root),
            |cgroups, job| read_process(proc_root, cgroups, job),
        );
        let mut outcomes = Vec::new();
        for (done, cgroups) in done {
            self.cgroups.count_unrecognized_of(&cgroups);
            outcomes.extend(done);
        }
        outcomes
    }
}

/// The pids in `proc_root`.
fn proc_pids(proc_root: &Path) -> std::io::Result<Vec<u32>> {
    Ok(fs::read_dir(proc_root)?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .collect())
}

/// Reads one process: its `stat`, and unless it is a kernel thread its cgroup; and for a process
/// in a container, its command line and whether its executable opens.
fn read_process(proc_root: &Path, cgroups: &mut CgroupReader, job: Job) -> Outcome {
    let Job {
        pid,
        listed,
        before,
        keep_if_unchanged,
    } = job;
    let proc_dir = proc_root.join(pid.to_string());
    let (stat, cgroup_file, arguments, has_exe_file) = match listed {
        Some(ListedProcess {
            stat,
            cgroup_file,
            arguments,
            has_exe_file,
            ..
        }) => (Some(stat), cgroup_file, Some(arguments), has_exe_file),
        None => (read_stat(&proc_dir), None, None, false),
    };
    let Some(stat) = stat.filter(|stat| !stat.is_gone()) else {
        return Outcome::skipped(pid, before);
    };
    let same = before
        .as_ref()
        .is_some_and(|known| known.start_time == stat.start_time && known.comm == stat.comm);
    if keep_if_unchanged
        && same
        && let Some(known) = before
    {
        return Outcome::kept(pid, known);
    }
    let container_id = if stat.is_kernel_thread() {
        None
    } else if let Some(text) = cgroup_file {
        cgroups.identify(pid, text.as_bytes()).container_id
    } else {
        match cgroups.read(pid) {
            Ok(Some(identity)) => identity.container_id,
            Ok(None) => return Outcome::skipped(pid, before),
            Err(error) => {
                debug!("{error}");
                None
            }
        }
    };
    let container = match container_id {
        Some(id) => {
            let from_memory = arguments.and_then(|arguments| read_arguments(pid, arguments));
            // Reading its memory took the right to trace it, more than opening its `exe` asks
            // (PTRACE_MODE_ATTACH against READ): with an executable mapped, that opens, and the
            // open (two system calls and a path walk, a third of a first scan's reads) is spared.
            let exe_opens = from_memory.is_some() && has_exe_file;
            let Some(command_line) = from_memory
                .or_else(|| read_command_line(&proc_dir))
                .filter(|line| !line.is_empty())
            else {
                return Outcome::skipped(pid, before);
            };
            // Read again, the same: the names given stay valid.
            let (named, renders) = before
                .as_ref()
                .filter(|_| same)
                .and_then(|known| known.container.as_ref())
                .filter(|old| old.id == id && old.command_line == command_line)
                .map(|old| (old.named.clone(), old.renders.clone()))
                .unwrap_or_default();
            Some(Box::new(ContainerProcess {
                exe_name: exe_name(&stat.comm, command_line.argv0()),
                id,
                command_line,
                profilable: exe_opens || can_open_exe(&proc_dir),
                named,
                renders,
            }))
        }
        None => None,
    };
    Outcome {
        pid,
        before,
        now: Some(KnownProcess {
            start_time: stat.start_time,
            kernel_thread: stat.is_kernel_thread(),
            comm: stat.comm,
            container,
        }),
        unchanged: false,
    }
}
