//! The kernel's task iterator (`rover_agent::bpf::TaskList`, what process discovery's full scans
//! list processes with) held against procfs: the processes procfs shows are listed (but for the
//! few a kernel hides from iterators) with the same start time, comm and kind; threads are not; container processes in real cgroups of each
//! runtime's shape are placed in their containers; arguments read where the list says they are
//! equal `/proc/PID/cmdline`; and a cgroup path the list cannot carry whole (too deep, a name
//! too long) is left for procfs to read.
//!
//! Loads BPF and makes cgroups (root): takes the machine lock, skips (fails in CI) without them.

use std::collections::HashMap;
use std::process::Command;

use integration_tests::cgroups::{CgroupLayout, ContainerCgroup, TestCgroups};
use integration_tests::{bpf_available, cgroups, fake_kube::hex64, machine_lock};
use rover_agent::bpf::TaskList;
use rover_agent::process::{ContainerId, ListedProcess, ProcessList, cgroup::parse_cgroup_file};

/// `/proc/PID/stat`'s comm, kernel-thread flag and start time; `None` once the process is gone.
fn procfs_stat(pid: u32) -> Option<(String, bool, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let fields: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let flags: u64 = fields.get(6)?.parse().ok()?;
    let start_time: u64 = fields.get(19)?.parse().ok()?;
    Some((
        text[open + 1..close].to_owned(),
        flags & 0x0020_0000 != 0,
        start_time,
    ))
}

fn procfs_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("reading /proc")
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

fn procfs_command_line(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("reading cmdline");
    cmdline
        .strip_suffix(b"\0")
        .unwrap_or(&cmdline)
        .split(|byte| *byte == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A cgroup made by hand below `parent` (removed by [`Nested`]'s drop, before `TestCgroups`'s).
fn nested(parent: &ContainerCgroup, names: &[&str]) -> ContainerCgroup {
    let mut cgroup = parent.clone();
    for name in names {
        cgroup.dir.push(name);
        cgroup.path = format!("{}/{name}", cgroup.path);
        std::fs::create_dir(&cgroup.dir)
            .unwrap_or_else(|error| panic!("creating {}: {error}", cgroup.dir.display()));
    }
    cgroup
}

/// Hand-made cgroups and the processes in them: on drop, the processes are killed (their
/// parent, `TestCgroups`, reaps them later) and the cgroups removed, deepest first.
struct Nested {
    dirs: Vec<std::path::PathBuf>,
    pids: Vec<u32>,
}

impl Drop for Nested {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        for dir in self.dirs.iter().rev() {
            // A killed process leaves its cgroup as it exits: retry for a moment.
            for _ in 0..200 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn the_task_list_says_what_procfs_says() {
    let test = "the_task_list_says_what_procfs_says";
    if !bpf_available(test) || !cgroups::available(test) {
        return;
    }
    let _lock = machine_lock();
    let mut cgroups = TestCgroups::create().expect("test cgroups");

    // A container of each runtime's shape, with a process given known arguments.
    let mut expected: HashMap<u32, (ContainerId, String)> = HashMap::new();
    for (index, layout) in CgroupLayout::ALL.into_iter().enumerate() {
        let id = hex64(&format!("task-list-{index}"));
        let cgroup = cgroups
            .container(
                layout,
                &format!("0000000{index}-aaaa-bbbb-cccc-dddddddddddd"),
                &id,
            )
            .expect("container cgroup");
        let argument = format!("{}.5", 3600 + index);
        let pid = cgroups
            .spawn(&cgroup, Command::new("sleep").arg(&argument))
            .expect("spawn");
        let container = ContainerId::from_status_id(&id).expect("an id");
        expected.insert(pid, (container, format!("sleep {argument}")));
    }
    // Paths the list cannot carry: 9 levels below the hierarchy's root, and the colon form
    // (runc with cgroupfs handed a systemd path), whose name is 134 bytes long.
    let base = cgroups
        .container(
            CgroupLayout::ContainerdCgroupfs,
            "0000000f-aaaa-bbbb-cccc-dddddddddddd",
            &hex64("task-list-base"),
        )
        .expect("container cgroup");
    let deep = nested(&base, &["a", "b", "c", "d", "e"]);
    let colon_id = hex64("task-list-colon");
    let colon = nested(
        &base,
        &[&format!(
            "kubepods-besteffort-pod0000000f_aaaa_bbbb_cccc_dddddddddddd.slice:cri-containerd:\
             {colon_id}"
        )],
    );
    let mut nested_cgroups = Nested {
        dirs: [&deep, &colon]
            .iter()
            .flat_map(|cgroup| {
                cgroup
                    .dir
                    .ancestors()
                    .take_while(|dir| *dir != base.dir)
                    .map(std::path::Path::to_path_buf)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
            })
            .collect(),
        pids: Vec::new(),
    };
    let deep_pid = cgroups
        .spawn(&deep, Command::new("sleep").arg("3600.7"))
        .expect("spawn deep");
    let colon_pid = cgroups
        .spawn(&colon, Command::new("sleep").arg("3600.8"))
        .expect("spawn colon");
    nested_cgroups.pids = vec![deep_pid, colon_pid];
    // A thread of this process, which must not be listed.
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let _ = stopped.recv();
        tid
    });

    let before = procfs_pids();
    let mut list = TaskList::load().expect("loading the task iterator");
    let listed: HashMap<u32, ListedProcess> = list
        .list()
        .expect("listing")
        .into_iter()
        .map(|process| (process.pid(), process))
        .collect();
    stop.send(()).expect("thread");
    let tid = thread.join().expect("thread");
    assert!(
        !listed.contains_key(&tid),
        "thread {tid} listed as a process"
    );

    // Every process listed is as procfs tells it. A kernel may hide tasks from iterators (this
    // machine's hides its pid 1): discovery reads those from procfs, but none may be ours.
    let mut compared = 0;
    let mut hidden = Vec::new();
    for pid in before {
        let Some((comm, kernel_thread, start_time)) = procfs_stat(pid) else {
            continue;
        };
        let Some(listed) = listed.get(&pid) else {
            hidden.push(format!("{pid} ({comm})"));
            continue;
        };
        // procfs gives kernel threads their full names (`kworker/…`); `comm` holds 15 bytes.
        if kernel_thread {
            assert!(
                comm.starts_with(listed.comm()),
                "{comm} is listed as {}",
                listed.comm()
            );
        } else {
            assert_eq!(listed.comm(), comm, "comm of {pid}");
        }
        assert_eq!(listed.is_kernel_thread(), kernel_thread, "kind of {pid}");
        assert_eq!(
            listed.start_time(),
            start_time,
            "start time of {pid} ({comm})"
        );
        // What opening its `exe` tells, which discovery spares when the list says it.
        assert_eq!(
            listed.has_exe_file(),
            std::fs::File::open(format!("/proc/{pid}/exe")).is_ok(),
            "executable of {pid} ({comm})"
        );
        if !kernel_thread
            && let Some(identity) = listed.cgroup_identity()
            && let Ok(file) = std::fs::read(format!("/proc/{pid}/cgroup"))
        {
            assert_eq!(
                identity.container_id,
                parse_cgroup_file(&file).container_id,
                "container of {pid} ({comm})"
            );
        }
        compared += 1;
    }
    eprintln!("{compared} processes as procfs tells them; not listed: {hidden:?}");
    assert!(
        hidden.len() <= 2,
        "processes procfs shows but the list does not: {hidden:?}"
    );
    assert!(
        compared > expected.len(),
        "only {compared} processes compared"
    );
    assert!(
        listed.contains_key(&std::process::id()),
        "this process is not listed"
    );

    for (pid, (container, command_line)) in &expected {
        let listed = &listed[pid];
        let identity = listed.cgroup_identity().expect("a whole path");
        assert_eq!(
            identity.container_id,
            Some(*container),
            "container of {pid}"
        );
        assert_eq!(
            listed.command_line().as_deref(),
            Some(command_line.as_str())
        );
        assert_eq!(procfs_command_line(*pid), *command_line);
    }
    // A cgroup's path is walked once per listing: a second listing tells every path again.
    let again: HashMap<u32, ListedProcess> = list
        .list()
        .expect("listing again")
        .into_iter()
        .map(|process| (process.pid(), process))
        .collect();
    for (pid, (container, _)) in &expected {
        assert_eq!(
            again[pid]
                .cgroup_identity()
                .map(|identity| identity.container_id),
            Some(Some(*container)),
            "container of {pid}, listed again"
        );
    }
    for pid in [deep_pid, colon_pid] {
        assert_eq!(
            listed[&pid].cgroup_identity(),
            None,
            "process {pid}'s path cannot be listed whole: procfs must be read"
        );
    }
    // What procfs then says of the colon form.
    let file = std::fs::read(format!("/proc/{colon_pid}/cgroup")).expect("cgroup");
    assert_eq!(
        parse_cgroup_file(&file).container_id,
        ContainerId::from_status_id(&colon_id)
    );
}
