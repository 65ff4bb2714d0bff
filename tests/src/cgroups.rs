//! Real cgroup v2 directories shaped like a Kubernetes node's container cgroups, with real
//! processes in them, so that the agent reads `/proc/PID/cgroup` lines exactly as it would on a
//! node: containerd, CRI-O and docker with the systemd driver, and cgroupfs ([`CgroupLayout`]).
//!
//! [`TestCgroups`] makes them under a directory of its own at the top of the cgroup v2 hierarchy
//! (`rover-e2e-<pid>-<n>`), so that parallel test runs never share one, and removes everything on
//! drop: its processes are killed and reaped, whatever else got into its cgroups is killed
//! through `cgroup.kill`, then the directories are removed deepest first, retrying while a
//! cgroup still has members. Directories left by a run that died are removed by the next one.
//! The kubelet's components sit below that directory, so the last components keep the exact
//! shapes of a node (`…/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`).
//!
//! Needs root and a writable cgroup v2 hierarchy (mounted alone or beside v1 hierarchies:
//! [`hierarchy`] finds it).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

/// What the directories of [`TestCgroups`] are named by: `rover-e2e-<pid>-<n>`.
const ROOT_PREFIX: &str = "rover-e2e-";
/// How long a drop retries removing a cgroup whose members are still leaving.
const REMOVE_PATIENCE: Duration = Duration::from_secs(3);

/// The cgroup layouts of a Kubernetes node, by container runtime and cgroup driver. Each puts a
/// container in the cgroup its runtime names it by, below its pod's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupLayout {
    /// containerd with the systemd driver, a best-effort pod:
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`.
    ContainerdSystemd,
    /// CRI-O (systemd driver, its default), a burstable pod:
    /// `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/crio-<id>.scope`.
    CrioSystemd,
    /// Docker through cri-dockerd with the systemd driver, a best-effort pod:
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/docker-<id>.scope`.
    DockerSystemd,
    /// containerd with the cgroupfs driver, a best-effort pod: `kubepods/besteffort/pod<uid>/<id>`.
    ContainerdCgroupfs,
}

impl CgroupLayout {
    pub const ALL: [Self; 4] = [
        Self::ContainerdSystemd,
        Self::CrioSystemd,
        Self::DockerSystemd,
        Self::ContainerdCgroupfs,
    ];

    /// The cgroup of container `container_id` (64 hex digits) of the pod with UID `pod_uid`,
    /// relative to the kubelet's root (`kubepods…`).
    pub fn container_path(self, pod_uid: &str, container_id: &str) -> PathBuf {
        // The systemd driver writes the UID's `-` as `_` (a `-` separates parent slices).
        let systemd_uid = pod_uid.replace('-', "_");
        let systemd = |qos: &str, scope: String| {
            PathBuf::from(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{systemd_uid}.slice/{scope}"
            ))
        };
        match self {
            Self::ContainerdSystemd => {
                systemd("besteffort", format!("cri-containerd-{container_id}.scope"))
            }
            Self::CrioSystemd => systemd("burstable", format!("crio-{container_id}.scope")),
            Self::DockerSystemd => systemd("besteffort", format!("docker-{container_id}.scope")),
            Self::ContainerdCgroupfs => {
                PathBuf::from(format!("kubepods/besteffort/pod{pod_uid}/{container_id}"))
            }
        }
    }

    /// The container's `status.containerStatuses[].containerID` as the kubelet reports it for
    /// this runtime: `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
    pub fn status_container_id(self, container_id: &str) -> String {
        let runtime = match self {
            Self::ContainerdSystemd | Self::ContainerdCgroupfs => "containerd",
            Self::CrioSystemd => "cri-o",
            Self::DockerSystemd => "docker",
        };
        format!("{runtime}://{container_id}")
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a v2-only host,
/// `/sys/fs/cgroup/unified` on a hybrid one), from `/proc/self/mountinfo`.
pub fn hierarchy() -> anyhow::Result<PathBuf> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // `id parent major:minor root mount-point options [optional...] - type source ...`
            let (mount, filesystem) = line.split_once(" - ")?;
            if filesystem.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            mount.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 filesystem is mounted")
}

/// The cgroup v2 path of process `pid` (the `0::` line of `/proc/PID/cgroup`), as the kernel
/// shows it: from the hierarchy's root, with a leading `/`.
pub fn cgroup_v2_path(pid: u32) -> anyhow::Result<String> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .with_context(|| format!("{path} has no cgroup v2 line:\n{text}"))
}

/// Whether cgroups can be made here. Outside CI a test that needs them returns early after a
/// loud message; with `CI=true` it fails instead.
pub fn available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let problem = if unsafe { libc::geteuid() } != 0 {
        Some("it must run as root".to_owned())
    } else {
        match hierarchy() {
            Ok(path) if is_writable(&path) => None,
            Ok(path) => Some(format!("{} is not writable", path.display())),
            Err(error) => Some(format!("{error:#}")),
        }
    };
    let Some(problem) = problem else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{test} needs cgroup v2, unavailable in CI: {problem}");
    }
    eprintln!("\n*** SKIPPING {test}: it needs to create cgroup v2 directories ({problem}) ***\n");
    false
}

fn is_writable(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path only.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

/// A container's cgroup made by [`TestCgroups::container`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// The directory.
    pub dir: PathBuf,
    /// The path as `/proc/PID/cgroup` shows it for a member (`/rover-e2e-…/kubepods…`).
    pub path: String,
}

/// Cgroups and the processes placed in them, all removed on drop (see the module's comment).
pub struct TestCgroups {
    /// Where cgroup v2 is mounted.
    hierarchy: PathBuf,
    /// This instance's directory, right below `hierarchy`.
    root: PathBuf,
    /// The directories made, in order of creation (parents before children).
    dirs: Vec<PathBuf>,
    processes: Vec<Child>,
}

impl TestCgroups {
    /// Makes a directory of its own in the cgroup v2 hierarchy, after removing those that runs
    /// which died left behind.
    pub fn create() -> anyhow::Result<Self> {
        static INSTANCES: AtomicU32 = AtomicU32::new(0);
        let hierarchy = hierarchy()?;
        remove_leftovers(&hierarchy);
        let name = format!(
            "{ROOT_PREFIX}{}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, Ordering::Relaxed)
        );
        let root = hierarchy.join(name);
        std::fs::create_dir(&root)
            .with_context(|| format!("creating the cgroup {}", root.display()))?;
        Ok(Self {
            hierarchy,
            dirs: vec![root.clone()],
            root,
            processes: Vec::new(),
        })
    }

    /// This instance's directory; every cgroup it makes is below.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Makes (with its parents) the cgroup of container `container_id` of pod `pod_uid` in
    /// `layout`. Making one that exists already is fine (another container of the same pod
    /// shares the parents; the same container gives the same cgroup).
    pub fn container(
        &mut self,
        layout: CgroupLayout,
        pod_uid: &str,
        container_id: &str,
    ) -> anyhow::Result<ContainerCgroup> {
        let relative = layout.container_path(pod_uid, container_id);
        let mut dir = self.root.clone();
        for component in relative.components() {
            dir.push(component);
            match std::fs::create_dir(&dir) {
                Ok(()) => self.dirs.push(dir.clone()),
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("creating the cgroup {}", dir.display()));
                }
            }
        }
        let path = Path::new("/").join(dir.strip_prefix(&self.hierarchy)?);
        Ok(ContainerCgroup {
            dir,
            path: path.display().to_string(),
        })
    }

    /// Starts `command` inside `cgroup`: the child joins the cgroup before it executes the
    /// program, so the process is in the container from its first instruction, as a container's
    /// processes are. Its stdin and stdout are null unless set; it is killed when this is
    /// dropped, or when the thread that started it ends. Returns its pid, checked in
    /// `/proc/PID/cgroup`.
    pub fn spawn(
        &mut self,
        cgroup: &ContainerCgroup,
        command: &mut Command,
    ) -> anyhow::Result<u32> {
        let procs = CString::new(cgroup.dir.join("cgroup.procs").as_os_str().as_bytes())
            .context("a cgroup path with a NUL byte")?;
        command.stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: the closure calls only async-signal-safe functions (prctl, open, write,
        // close) on memory prepared before the fork, and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                // A test killed before its drop must not leave processes behind.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Writing 0 to cgroup.procs moves the writer itself.
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {command:?} in the cgroup {}", cgroup.path))?;
        let pid = child.id();
        self.processes.push(child);
        let actual = cgroup_v2_path(pid)?;
        ensure!(
            actual == cgroup.path,
            "process {pid} is in the cgroup {actual}, not {}",
            cgroup.path
        );
        Ok(pid)
    }

    /// Moves the running process `pid` into `cgroup` (writes its pid to `cgroup.procs`).
    pub fn move_into(&self, cgroup: &ContainerCgroup, pid: u32) -> anyhow::Result<()> {
        let procs = cgroup.dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving process {pid} into {}", cgroup.path))?;
        let actual = cgroup_v2_path(pid)?;
        ensure!(
            actual == cgroup.path,
            "process {pid} is in the cgroup {actual} after the move, not {}",
            cgroup.path
        );
        Ok(())
    }

    /// The pids of the processes [`spawn`](Self::spawn) started, in order.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(Child::id).collect()
    }

    /// Kills and reaps the processes started here, kills whatever else is in the cgroups, and
    /// removes them deepest first; the first error is returned after trying everything.
    fn remove(&mut self) -> anyhow::Result<()> {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.processes.clear();
        // Grandchildren, or processes moved in: `cgroup.kill` kills a whole subtree.
        kill_members(&self.root);
        let mut first_error = None;
        while let Some(dir) = self.dirs.pop() {
            if let Err(error) = remove_cgroup(&dir)
                && first_error.is_none()
            {
                first_error = Some(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        if let Err(error) = self.remove() {
            eprintln!("test cgroups: {error:#}");
        }
    }
}

/// Kills every process of the cgroup `dir` and of the cgroups below it.
fn kill_members(dir: &Path) {
    // cgroup.kill (Linux 5.14) kills the subtree at once; without it, each member by pid.
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            kill_members(&entry.path());
        }
    }
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in members
        .lines()
        .filter_map(|pid| pid.parse::<libc::pid_t>().ok())
    {
        // SAFETY: kill(2) has no memory preconditions.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Removes the empty cgroup `dir`, retrying while it is busy: killed members leave it a moment
/// after the signal.
fn remove_cgroup(dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + REMOVE_PATIENCE;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(error) => {
                let members = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                bail!(
                    "removing the cgroup {}: {error} (members: {:?})",
                    dir.display(),
                    members.split_whitespace().collect::<Vec<_>>()
                );
            }
        }
    }
}

/// Removes the directories of [`TestCgroups`] whose process is gone (a run killed before its
/// drop); best effort.
fn remove_leftovers(hierarchy: &Path) {
    let Ok(entries) = std::fs::read_dir(hierarchy) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|name| name.strip_prefix(ROOT_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if Path::new("/proc").join(owner).exists() {
            continue;
        }
        let root = entry.path();
        kill_members(&root);
        for dir in dirs_deepest_first(&root) {
            let _ = remove_cgroup(&dir);
        }
    }
}

/// `dir` and the directories below it, children before their parents.
fn dirs_deepest_first(dir: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                dirs.extend(dirs_deepest_first(&entry.path()));
            }
        }
    }
    dirs.push(dir.to_path_buf());
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_kube::hex64;
    use rover_agent::process::cgroup::parse_cgroup_file;

    const POD_UID: &str = "3f2b9c1e-7a4d-4e8f-9b6a-1c2d3e4f5a6b";

    fn sleep() -> Command {
        let mut command = Command::new("sleep");
        command.arg("60");
        command
    }

    fn is_running(pid: u32) -> bool {
        rover_agent::process::is_alive(pid)
    }

    #[test]
    fn each_layout_gives_the_exact_path_of_a_node_and_the_agent_reads_the_container_back() {
        if !available("each_layout_gives_the_exact_path_of_a_node") {
            return;
        }
        let mut cgroups = TestCgroups::create().expect("test cgroups");
        let root = format!("/{}", cgroups.root().file_name().unwrap().to_string_lossy());
        let id = hex64("layout-test");
        let expected = [
            (
                CgroupLayout::ContainerdSystemd,
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/\
                     kubepods-besteffort-pod3f2b9c1e_7a4d_4e8f_9b6a_1c2d3e4f5a6b.slice/\
                     cri-containerd-{id}.scope"
                ),
                format!("containerd://{id}"),
            ),
            (
                CgroupLayout::CrioSystemd,
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/\
                     kubepods-burstable-pod3f2b9c1e_7a4d_4e8f_9b6a_1c2d3e4f5a6b.slice/\
                     crio-{id}.scope"
                ),
                format!("cri-o://{id}"),
            ),
            (
                CgroupLayout::DockerSystemd,
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/\
                     kubepods-besteffort-pod3f2b9c1e_7a4d_4e8f_9b6a_1c2d3e4f5a6b.slice/\
                     docker-{id}.scope"
                ),
                format!("docker://{id}"),
            ),
            (
                CgroupLayout::ContainerdCgroupfs,
                format!("/kubepods/besteffort/pod{POD_UID}/{id}"),
                format!("containerd://{id}"),
            ),
        ];
        for (layout, path, status_id) in expected {
            let cgroup = cgroups.container(layout, POD_UID, &id).expect("cgroup");
            assert_eq!(cgroup.path, format!("{root}{path}"), "{layout:?}");
            assert!(cgroup.dir.join("cgroup.procs").exists(), "{layout:?}");
            assert_eq!(layout.status_container_id(&id), status_id, "{layout:?}");

            let pid = cgroups.spawn(&cgroup, &mut sleep()).expect("spawn");
            assert_eq!(cgroup_v2_path(pid).expect("cgroup"), cgroup.path);
            // The agent's own parser finds the container and the pod in the process's file.
            let file = std::fs::read(format!("/proc/{pid}/cgroup")).expect("cgroup file");
            let identity = parse_cgroup_file(&file);
            assert_eq!(
                identity.container_id.map(|id| id.as_str().to_owned()),
                Some(id.clone()),
                "{layout:?}: {}",
                String::from_utf8_lossy(&file)
            );
            assert_eq!(
                identity.pod_uid.map(|uid| uid.as_str().to_owned()),
                Some(POD_UID.to_owned()),
                "{layout:?}"
            );
        }
    }

    #[test]
    fn drop_kills_the_processes_and_removes_every_directory() {
        if !available("drop_kills_the_processes_and_removes_every_directory") {
            return;
        }
        let mut cgroups = TestCgroups::create().expect("test cgroups");
        let root = cgroups.root().to_path_buf();
        let first = cgroups
            .container(CgroupLayout::ContainerdSystemd, POD_UID, &hex64("a"))
            .expect("cgroup");
        let second = cgroups
            .container(CgroupLayout::ContainerdSystemd, POD_UID, &hex64("b"))
            .expect("cgroup");
        let direct = cgroups.spawn(&first, &mut sleep()).expect("spawn");
        // A grandchild: the shell's background sleep is no child of ours.
        let shell = cgroups
            .spawn(
                &second,
                Command::new("sh").args(["-c", "sleep 60 & echo $!; wait"]),
            )
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        let grandchild = loop {
            let members: Vec<u32> = std::fs::read_to_string(second.dir.join("cgroup.procs"))
                .expect("members")
                .lines()
                .filter_map(|pid| pid.parse().ok())
                .filter(|&pid| pid != shell)
                .collect();
            if let [pid] = members[..] {
                break pid;
            }
            assert!(Instant::now() < deadline, "no grandchild in {members:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(cgroup_v2_path(grandchild).expect("cgroup"), second.path);
        assert_eq!(cgroups.pids(), [direct, shell]);

        drop(cgroups);
        assert!(!root.exists(), "{} is left", root.display());
        for pid in [direct, shell] {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{pid} is left"
            );
        }
        // Reaped by init once killed; alive no more either way.
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_running(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} still runs"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_running_process_is_moved_in_by_its_pid() {
        if !available("a_running_process_is_moved_in_by_its_pid") {
            return;
        }
        let mut cgroups = TestCgroups::create().expect("test cgroups");
        let cgroup = cgroups
            .container(CgroupLayout::CrioSystemd, POD_UID, &hex64("moved"))
            .expect("cgroup");
        let mut outside = sleep().spawn().expect("sleep");
        let before = cgroup_v2_path(outside.id()).expect("cgroup");
        assert_ne!(before, cgroup.path);
        cgroups.move_into(&cgroup, outside.id()).expect("move");
        assert_eq!(cgroup_v2_path(outside.id()).expect("cgroup"), cgroup.path);
        // Ours to reap: drop kills it through cgroup.kill; wait here so no zombie stays.
        drop(cgroups);
        let status = outside.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn instances_have_roots_of_their_own_and_the_same_container_twice_is_one_cgroup() {
        if !available("instances_have_roots_of_their_own") {
            return;
        }
        let mut one = TestCgroups::create().expect("test cgroups");
        let mut two = TestCgroups::create().expect("test cgroups");
        assert_ne!(one.root(), two.root());
        let id = hex64("shared");
        let a = one
            .container(CgroupLayout::DockerSystemd, POD_UID, &id)
            .expect("cgroup");
        let b = two
            .container(CgroupLayout::DockerSystemd, POD_UID, &id)
            .expect("cgroup");
        assert_ne!(a.dir, b.dir);
        assert_eq!(
            one.container(CgroupLayout::DockerSystemd, POD_UID, &id)
                .expect("again"),
            a
        );
        drop(two);
        assert!(
            a.dir.exists(),
            "dropping one instance removed another's cgroup"
        );
    }

    #[test]
    fn directories_of_a_run_that_died_are_removed_by_the_next() {
        if !available("directories_of_a_run_that_died_are_removed_by_the_next") {
            return;
        }
        let hierarchy = hierarchy().expect("hierarchy");
        // A pid that is surely gone: a child that exited and was reaped.
        let mut gone = Command::new("true").spawn().expect("true");
        let dead_pid = gone.id();
        gone.wait().expect("wait");
        let leftover = hierarchy.join(format!("{ROOT_PREFIX}{dead_pid}-0"));
        let deep = leftover.join("kubepods/besteffort/podx");
        std::fs::create_dir_all(&deep).expect("leftover");
        let mut stray = Command::new("sleep").arg("60").spawn().expect("sleep");
        std::fs::write(deep.join("cgroup.procs"), stray.id().to_string()).expect("move");

        let cgroups = TestCgroups::create().expect("test cgroups");
        assert!(!leftover.exists(), "{} is left", leftover.display());
        assert!(stray.wait().is_ok());
        drop(cgroups);
    }
}
