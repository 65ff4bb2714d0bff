//! Which container (and pod) a process runs in, read from `/proc/PID/cgroup`.
//!
//! Every container runtime puts a container's processes in a cgroup named after the container id,
//! the same id Kubernetes reports in `containerStatuses[].containerID` behind a runtime prefix.
//! The names differ by runtime and cgroup driver:
//!
//! | runtime, driver | container cgroup |
//! |---|---|
//! | docker / containerd, cgroupfs | `/kubepods/burstable/pod<uid>/<id>`, `/docker/<id>` |
//! | containerd, systemd | `…/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | CRI-O, systemd / cgroupfs | `…/crio-<id>.scope` / `…/pod<uid>/crio-<id>` |
//! | docker (cri-dockerd), systemd | `…/docker-<id>.scope` |
//! | podman | `libpod-<id>.scope`, `libpod-<id>`, `libpod-payload-<id>` (split cgroups) |
//! | containerd's systemd path taken literally by a cgroupfs runc | `…/kubepods-…-pod<uid_>.slice:cri-containerd:<id>` |
//!
//! CRI-O and podman put each container's monitor (conmon) beside it in `crio-conmon-<id>` /
//! `libpod-conmon-<id>.scope`: conmon runs on the host, it is no process of the container.
//!
//! The parser splits the text with `str`'s byte search, without regex and without allocating
//! (but for a file that is not UTF-8): a node agent reads this file for every new process.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

/// Docker, containerd, CRI-O and podman all name containers by 256-bit random ids in hex.
const CONTAINER_ID_LEN: usize = 64;

/// A container id as it appears in cgroup paths and, behind a runtime prefix, in a pod's
/// `containerID`: 64 lowercase hex digits, whatever the runtime.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId([u8; CONTAINER_ID_LEN]);

impl ContainerId {
    /// The id of a pod's `status.containerStatuses[].containerID` (also init and ephemeral
    /// containers): `containerd://<id>`, `docker://<id>`, `cri-o://<id>`, or any other
    /// `<runtime>://` prefix, stripped. `None` for an empty status (a container not created yet)
    /// or an id that is not 64 hex digits, which no cgroup path of ours would match either.
    pub fn from_status_id(status_id: &str) -> Option<Self> {
        let id = status_id
            .split_once("://")
            .map_or(status_id, |(_runtime, id)| id);
        Self::from_hex(id.as_bytes())
    }

    /// The id in lowercase hex.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever stored, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    fn from_hex(hex: &[u8]) -> Option<Self> {
        let digits: [u8; CONTAINER_ID_LEN] = hex.try_into().ok()?;
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        Some(Self(digits.map(|digit| digit.to_ascii_lowercase())))
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ContainerId({})", self.as_str())
    }
}

/// A UUID's text length (`8-4-4-4-12`).
const UUID_LEN: usize = 36;
/// Static pods are named by a 32-hex-digit hash instead of a UUID.
const STATIC_POD_UID_LEN: usize = 32;

/// A pod's UID as kubelet names the pod's cgroup, with the `_` the systemd driver writes for
/// `-` turned back: a UUID equal to the pod's `metadata.uid`, or, for a static pod, the 32-hex
/// hash that its mirror pod carries in the `kubernetes.io/config.hash` annotation (the mirror
/// pod's own `metadata.uid` is another one).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PodUid {
    text: [u8; UUID_LEN],
    len: u8,
}

impl PodUid {
    /// The UID in lowercase, with `-` separators.
    pub fn as_str(&self) -> &str {
        let text = self.text.get(..usize::from(self.len)).unwrap_or_default();
        // Only ASCII is ever stored, so this never falls back.
        std::str::from_utf8(text).unwrap_or_default()
    }

    fn parse(text: &[u8]) -> Option<Self> {
        let mut uid = Self {
            text: [0; UUID_LEN],
            len: 0,
        };
        match text.len() {
            UUID_LEN => {
                for (index, (&byte, slot)) in text.iter().zip(&mut uid.text).enumerate() {
                    *slot = match index {
                        8 | 13 | 18 | 23 if byte == b'-' || byte == b'_' => b'-',
                        8 | 13 | 18 | 23 => return None,
                        _ if byte.is_ascii_hexdigit() => byte.to_ascii_lowercase(),
                        _ => return None,
                    };
                }
            }
            STATIC_POD_UID_LEN => {
                for (&byte, slot) in text.iter().zip(&mut uid.text) {
                    if !byte.is_ascii_hexdigit() {
                        return None;
                    }
                    *slot = byte.to_ascii_lowercase();
                }
            }
            _ => return None,
        }
        uid.len = u8::try_from(text.len()).ok()?;
        Some(uid)
    }
}

impl fmt::Display for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for PodUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PodUid({})", self.as_str())
    }
}

/// What one `/proc/PID/cgroup` file says of its process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The container the process runs in, from the first line that names one.
    pub container_id: Option<ContainerId>,
    /// The pod whose cgroup holds the process: the one of the line that gave the container,
    /// else of the first line that names a pod (a process of a pod outside any container, e.g.
    /// CRI-O's conmon).
    pub pod_uid: Option<PodUid>,
    /// Lines ignored because their form is unknown: not `hierarchy-id:controllers:/path`, or a
    /// container-like cgroup name without a container id, or a pod cgroup's child that is no
    /// container we know of (another runtime's naming).
    pub unrecognized_lines: u32,
}

/// Parses the whole text of a `/proc/PID/cgroup` file: cgroup v1 lines (`4:memory:/path`),
/// the v2 line (`0::/path`), or both (hybrid). Never fails: lines in an unknown form are counted
/// in [`CgroupIdentity::unrecognized_lines`] and skipped.
pub fn parse_cgroup_file(text: &[u8]) -> CgroupIdentity {
    parse_lines(text, |_line| {})
}

fn parse_lines(text: &[u8], mut on_unrecognized: impl FnMut(&str)) -> CgroupIdentity {
    // As text, lines and components are found with `str`'s fast byte search. The kernel writes
    // the names runtimes chose, valid UTF-8 in practice; the rare other file is copied once with
    // its bad bytes replaced, which no id contains.
    let text = String::from_utf8_lossy(text);
    let mut identity = CgroupIdentity::default();
    // cgroup v1 repeats one path for every controller: parse it once.
    let mut previous: Option<(&str, PathIdentity)> = None;
    for line in text.split('\n') {
        if line.is_empty() {
            continue;
        }
        let Some(path) = cgroup_path(line) else {
            identity.unrecognized_lines = identity.unrecognized_lines.saturating_add(1);
            on_unrecognized(line);
            continue;
        };
        let found = match previous {
            Some((previous_path, found)) if previous_path == path => found,
            _ => parse_path(path),
        };
        previous = Some((path, found));
        if found.unrecognized {
            identity.unrecognized_lines = identity.unrecognized_lines.saturating_add(1);
            on_unrecognized(line);
        }
        if identity.container_id.is_none() && found.container_id.is_some() {
            identity.container_id = found.container_id;
            identity.pod_uid = found.pod_uid.or(identity.pod_uid);
        } else if identity.pod_uid.is_none() {
            identity.pod_uid = found.pod_uid;
        }
    }
    identity
}

/// The path of a `hierarchy-id:controllers:/path` line. Everything after the second colon is
/// the path: it may hold colons itself (the colon form).
fn cgroup_path(line: &str) -> Option<&str> {
    let (hierarchy_id, rest) = line.split_once(':')?;
    if hierarchy_id.is_empty() || !hierarchy_id.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let (_controllers, path) = rest.split_once(':')?;
    path.starts_with('/').then_some(path)
}

/// What one cgroup path names.
#[derive(Clone, Copy, Default)]
struct PathIdentity {
    container_id: Option<ContainerId>,
    pod_uid: Option<PodUid>,
    unrecognized: bool,
}

/// The container of a path is the component right below its (last) pod component: deeper
/// components are sub-cgroups made inside the container (systemd's `init.scope`, crun's
/// `container`, a nested runtime's containers that Kubernetes does not know), and components
/// above belong to whatever runs the node (kind's node container `/docker/<id>/kubepods/…`).
/// Without a pod component (docker or podman outside Kubernetes) the deepest container
/// component is taken.
fn parse_path(path: &str) -> PathIdentity {
    // cgroup v2 marks the path of a process whose cgroup was removed; the name is still valid.
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let mut identity = PathIdentity::default();
    let mut deepest_container = None;
    let mut pod_container = None;
    let mut below_pod = false;
    // Components `..` (the path seen from another cgroup namespace) and empty ones name
    // nothing and fall through as `Other`.
    for component in path.split('/').filter(|c| !c.is_empty()) {
        let just_below_pod = std::mem::take(&mut below_pod);
        match classify(component) {
            Component::Pod(uid) => {
                identity.pod_uid = Some(uid);
                pod_container = None;
                below_pod = true;
            }
            Component::PodContainer(uid, id) => {
                identity.pod_uid = Some(uid);
                pod_container = Some(id);
                deepest_container = Some(id);
            }
            Component::Container(id) => {
                deepest_container = Some(id);
                if just_below_pod {
                    pod_container = Some(id);
                }
            }
            Component::RuntimeHelper => {}
            Component::Unrecognized => identity.unrecognized = true,
            // A pod cgroup holds containers and runtime helpers only: anything else is a
            // runtime naming we do not know.
            Component::Other => identity.unrecognized |= just_below_pod,
        }
    }
    identity.container_id = if identity.pod_uid.is_some() {
        pod_container
    } else {
        deepest_container
    };
    identity
}

/// What one component (directory name) of a cgroup path names.
enum Component {
    /// A pod's cgroup: `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_>.slice` (systemd).
    Pod(PodUid),
    /// A container's cgroup.
    Container(ContainerId),
    /// The colon form `<pod slice>:<runtime>:<id>`: a pod and its container in one name.
    PodContainer(PodUid, ContainerId),
    /// A runtime's own process beside a container: CRI-O's and podman's conmon.
    RuntimeHelper,
    /// Looks like a container cgroup but carries no container id.
    Unrecognized,
    /// Anything else: slices, services, QoS classes, `..`.
    Other,
}

/// Container cgroup names: a prefix, the id, and an optional `.scope` (systemd driver).
const CONTAINER_PREFIXES: [&str; 5] = [
    "cri-containerd-",
    "crio-",
    "docker-",
    "libpod-payload-",
    "libpod-",
];
/// Conmon's cgroups are named by the id of the container it watches.
const RUNTIME_HELPER_PREFIXES: [&str; 2] = ["crio-conmon-", "libpod-conmon-"];

fn classify(component: &str) -> Component {
    if component.contains(':') {
        return classify_colon_form(component);
    }
    let (stem, is_scope) = match component.strip_suffix(".scope") {
        Some(stem) => (stem, true),
        None => (component, false),
    };
    if let Some(id) = ContainerId::from_hex(stem.as_bytes()) {
        return Component::Container(id);
    }
    if RUNTIME_HELPER_PREFIXES
        .iter()
        .any(|prefix| stem.starts_with(prefix))
    {
        return Component::RuntimeHelper;
    }
    let prefixed = CONTAINER_PREFIXES
        .iter()
        .filter_map(|prefix| stem.strip_prefix(prefix))
        .find_map(|id| ContainerId::from_hex(id.as_bytes()));
    if let Some(id) = prefixed {
        return Component::Container(id);
    }
    // `docker-<x>.scope` with no id is a runtime naming we miss; a unit such as
    // `docker-compose.service` or a slice is just not a container.
    if is_scope
        && CONTAINER_PREFIXES
            .iter()
            .any(|prefix| stem.starts_with(prefix))
    {
        return Component::Unrecognized;
    }
    match pod_uid_of(component) {
        Some(uid) => Component::Pod(uid),
        None => Component::Other,
    }
}

/// `<slice>:<runtime>:<id>` is runc's systemd cgroup path (containerd's `SystemdCgroup`
/// spelling of `kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>`). It becomes a cgroup
/// name when a runc using cgroupfs is handed the path of a kubelet using the systemd driver.
fn classify_colon_form(component: &str) -> Component {
    let mut parts = component.split(':');
    let (Some(slice), Some(runtime), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Component::Unrecognized;
    };
    let Some(id) = ContainerId::from_hex(id.as_bytes()).filter(|_| !runtime.is_empty()) else {
        return Component::Unrecognized;
    };
    match pod_uid_of(slice) {
        Some(uid) => Component::PodContainer(uid, id),
        None => Component::Container(id),
    }
}

/// The pod UID of a pod cgroup name: `pod<uid>` (cgroupfs) or `<parent>-pod<uid_>.slice`
/// (systemd, where `-` separates the parent slices, e.g. `kubepods-burstable-pod<uid_>.slice`
/// or kind's `kubelet-kubepods-pod<uid_>.slice`).
fn pod_uid_of(component: &str) -> Option<PodUid> {
    if let Some(uid) = component.strip_prefix("pod") {
        return PodUid::parse(uid.as_bytes());
    }
    let slice = component.strip_suffix(".slice")?;
    let (_parents, pod) = slice.rsplit_once('-')?;
    PodUid::parse(pod.strip_prefix("pod")?.as_bytes())
}

/// Why a process's cgroup file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Reads processes' cgroup files under a proc root (`/proc`, or a host's procfs mounted
/// elsewhere), with one buffer for all reads, and counts the lines it could not place.
pub struct CgroupReader {
    proc_root: PathBuf,
    buffer: Vec<u8>,
    unrecognized_lines: u64,
}

impl CgroupReader {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            buffer: Vec::with_capacity(4096),
            unrecognized_lines: 0,
        }
    }

    /// The cgroup identity of process `pid`: `Ok(None)` when the process is gone (no
    /// `<proc_root>/<pid>`, or it exited while being read), which callers skip quietly; `Err`
    /// for any other failure (e.g. no permission). Lines in an unknown form are logged at debug
    /// level and counted in [`Self::unrecognized_lines`].
    pub fn read(&mut self, pid: u32) -> Result<Option<CgroupIdentity>, Error> {
        let path = self.cgroup_file(pid);
        self.buffer.clear();
        match File::open(&path).and_then(|mut file| file.read_to_end(&mut self.buffer)) {
            Ok(_) => {}
            Err(error) if is_vanished_process(&error) => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        }
        let text = std::mem::take(&mut self.buffer);
        let identity = self.identify(pid, &text);
        self.buffer = text;
        Ok(Some(identity))
    }

    /// The cgroup identity of process `pid` from its cgroup file's text, got some other way
    /// (the kernel's task iterator); unknown lines are logged and counted as [`Self::read`] does.
    pub fn identify(&mut self, pid: u32, text: &[u8]) -> CgroupIdentity {
        let identity = parse_lines(text, |line| {
            tracing::debug!(pid, line, "ignoring a cgroup line in an unknown form");
        });
        self.unrecognized_lines = self
            .unrecognized_lines
            .saturating_add(u64::from(identity.unrecognized_lines));
        identity
    }

    /// Lines in an unknown form that all reads so far ignored (the self-metric).
    pub fn unrecognized_lines(&self) -> u64 {
        self.unrecognized_lines
    }

    /// Adds the lines `other` ignored (a reader of another thread) to this reader's count.
    pub fn count_unrecognized_of(&mut self, other: &Self) {
        self.unrecognized_lines = self
            .unrecognized_lines
            .saturating_add(other.unrecognized_lines);
    }

    fn cgroup_file(&self, pid: u32) -> PathBuf {
        let mut path = self.proc_root.join(pid.to_string());
        path.push("cgroup");
        path
    }
}

/// procfs answers `ENOENT` for a pid that is gone and `ESRCH` for one that exits between
/// `open` and `read`.
fn is_vanished_process(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Ids and UIDs in the shapes runtimes and the API server generate them.
    const ID: &str = "8a2d0164a0c5e611dfd5bd0c0fc17c0f56d94803543e3aac33d08acb0592bf3e";
    const OTHER_ID: &str = "8832da38f210e69727c470e3e0a0ab6741da2303941da7733b446dfb8a4c9ba7";
    const POD: &str = "f6a3aec8-7130-4bcd-b4fd-95c677ea5db3";
    /// `POD` as the systemd driver escapes it in slice names.
    const POD_: &str = "f6a3aec8_7130_4bcd_b4fd_95c677ea5db3";
    const STATIC_POD: &str = "4ff3fc39b309d7c5996221d4d074f2cf";

    fn expected(container: Option<&str>, pod: Option<&str>, unrecognized: u32) -> CgroupIdentity {
        CgroupIdentity {
            container_id: container.map(|id| ContainerId::from_hex(id.as_bytes()).unwrap()),
            pod_uid: pod.map(|uid| PodUid::parse(uid.as_bytes()).unwrap()),
            unrecognized_lines: unrecognized,
        }
    }

    fn parsed(text: &str) -> CgroupIdentity {
        parse_cgroup_file(text.as_bytes())
    }

    /// A cgroup v1 file as a systemd host (v1 "legacy" mode) writes it: every controller's
    /// hierarchy, `rdma` left at the root as container runtimes do not join it.
    fn v1(path: &str) -> String {
        format!(
            "12:hugetlb:{path}\n11:memory:{path}\n10:cpuset:{path}\n9:devices:{path}\n\
             8:pids:{path}\n7:perf_event:{path}\n6:net_cls,net_prio:{path}\n5:freezer:{path}\n\
             4:cpu,cpuacct:{path}\n3:blkio:{path}\n2:rdma:/\n1:name=systemd:{path}\n"
        )
    }

    /// A hybrid host: the v1 hierarchies plus the unified one (`0::`), where the container's
    /// runtime may or may not have placed the process.
    fn hybrid(path: &str, unified_path: &str) -> String {
        format!("{}0::{unified_path}\n", v1(path))
    }

    fn v2(path: &str) -> String {
        format!("0::{path}\n")
    }

    /// Every file a process at `path` can have: v1, v2, hybrid with and without the unified
    /// hierarchy joined.
    fn every_version(path: &str) -> [String; 4] {
        [v1(path), v2(path), hybrid(path, path), hybrid(path, "/")]
    }

    fn assert_every_version(path: &str, expected_identity: CgroupIdentity) {
        for file in every_version(path) {
            assert_eq!(parsed(&file), expected_identity, "{file}");
        }
    }

    #[test]
    fn docker_outside_kubernetes() {
        // cgroupfs driver, systemd driver, systemd inside the container (`--cgroupns=private`
        // with systemd as PID 1 makes sub-cgroups under the container's scope).
        for path in [
            format!("/docker/{ID}"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope/init.scope"),
            format!("/system.slice/docker-{ID}.scope/system.slice/nginx.service"),
        ] {
            assert_every_version(&path, expected(Some(ID), None, 0));
        }
    }

    #[test]
    fn docker_in_kubernetes() {
        // dockershim / cri-dockerd: cgroupfs names the container by its bare id, systemd by
        // `docker-<id>.scope` (which Rover misses).
        for path in [
            format!("/kubepods/burstable/pod{POD}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/\
                 docker-{ID}.scope"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
    }

    #[test]
    fn containerd_in_kubernetes() {
        for path in [
            format!("/kubepods/besteffort/pod{POD}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 cri-containerd-{ID}.scope"
            ),
            // Some containerd versions under systemd leave the `.scope` off.
            format!(
                "/system.slice/containerd.service/kubepods-burstable-pod{POD_}.slice/\
                 cri-containerd-{ID}"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
    }

    #[test]
    fn cri_o_in_kubernetes() {
        for path in [
            format!("/kubepods/burstable/pod{POD}/crio-{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 crio-{ID}.scope"
            ),
            // crun on cgroup v2 moves the container's processes to a `container` sub-cgroup.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 crio-{ID}.scope/container"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
    }

    #[test]
    fn cri_o_conmon_is_in_the_pod_but_no_container() {
        for path in [
            format!("/kubepods/burstable/pod{POD}/crio-conmon-{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 crio-conmon-{ID}.scope"
            ),
        ] {
            assert_every_version(&path, expected(None, Some(POD), 0));
        }
    }

    #[test]
    fn podman() {
        for path in [
            format!("/machine.slice/libpod-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope"),
            // A podman pod's slice is no Kubernetes pod.
            format!("/machine.slice/machine-libpod_pod_{OTHER_ID}.slice/libpod-{ID}.scope"),
            format!("/libpod_parent/libpod-{ID}"),
            // `--cgroups=split` (quadlet units): the payload beside conmon's `runtime`.
            format!("/system.slice/nginx.service/libpod-payload-{ID}"),
        ] {
            assert_every_version(&path, expected(Some(ID), None, 0));
        }
        for conmon in [
            format!("/machine.slice/libpod-conmon-{ID}.scope"),
            "/system.slice/nginx.service/runtime".to_owned(),
        ] {
            assert_every_version(&conmon, expected(None, None, 0));
        }
    }

    #[test]
    fn colon_form_of_containerd_systemd_paths() {
        // containerd with `SystemdCgroup = true` hands runc `<slice>:<prefix>:<id>`; a runc
        // using cgroupfs takes it as a directory name (Rover, splitting lines on every colon,
        // misses it). Shapes from real nodes, v1 controllers disagreeing on the parent.
        let colon = format!("kubepods-burstable-pod{POD_}.slice:cri-containerd:{ID}");
        let file = format!(
            "12:perf_event:/{colon}\n11:freezer:/{colon}\n\
             10:pids:/kuberuntime.slice/containerd.service/{colon}\n9:cpuset:/{colon}\n\
             8:memory:/kuberuntime.slice/containerd.service/{colon}\n\
             1:name=systemd:/kuberuntime.slice/containerd.service/{colon}\n"
        );
        assert_eq!(parsed(&file), expected(Some(ID), Some(POD), 0));
        for path in [
            format!("/system.slice/containerd.service/{colon}"),
            format!(
                "/system.slice/containerd.service/kubepods-pod{POD_}.slice:cri-containerd:{ID}"
            ),
            format!("/kubepods-besteffort-pod{POD_}.slice:crio:{ID}"),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
        // Outside Kubernetes the slice names no pod.
        assert_every_version(
            &format!("/system.slice:docker:{ID}"),
            expected(Some(ID), None, 0),
        );
    }

    #[test]
    fn qos_classes_static_pods_and_kind_nodes() {
        // Guaranteed pods have no QoS level.
        for path in [
            format!("/kubepods/pod{POD}/{ID}"),
            format!("/kubepods.slice/kubepods-pod{POD_}.slice/cri-containerd-{ID}.scope"),
            // kind's kubelet runs under its own slice.
            format!(
                "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{POD_}.slice/cri-containerd-{ID}.scope"
            ),
            // A kind or minikube node seen from the host: the node container is no pod's.
            format!("/docker/{OTHER_ID}/kubepods/besteffort/pod{POD}/{ID}"),
            format!(
                "/docker/{OTHER_ID}/kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod{POD_}.slice/crio-{ID}.scope"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
        // A static pod's cgroup carries its config hash.
        for path in [
            format!("/kubepods/burstable/pod{STATIC_POD}/{ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_POD}.slice/\
                 cri-containerd-{ID}.scope"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(STATIC_POD), 0));
        }
    }

    #[test]
    fn the_container_is_the_pod_cgroup_child_not_a_sub_cgroup() {
        for path in [
            // systemd or a nested runtime inside the container.
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 cri-containerd-{ID}.scope/init.scope"
            ),
            format!("/kubepods/burstable/pod{POD}/{ID}/docker/{OTHER_ID}"),
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
                 docker-{ID}.scope/system.slice/docker-{OTHER_ID}.scope"
            ),
        ] {
            assert_every_version(&path, expected(Some(ID), Some(POD), 0));
        }
    }

    #[test]
    fn paths_relative_to_another_cgroup_namespace() {
        // An agent in a private cgroup namespace sees other pods through `..`.
        assert_eq!(
            parsed(&v2(&format!(
                "/../../kubepods-besteffort-pod{POD_}.slice/cri-containerd-{ID}.scope"
            ))),
            expected(Some(ID), Some(POD), 0)
        );
        assert_eq!(
            parsed(&v2("/../../../../system.slice/sshd.service")),
            expected(None, None, 0)
        );
    }

    #[test]
    fn a_removed_cgroup_still_names_its_container() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/\
             cri-containerd-{ID}.scope (deleted)"
        );
        assert_eq!(parsed(&v2(&path)), expected(Some(ID), Some(POD), 0));
    }

    #[test]
    fn host_processes_and_pod_level_cgroups_have_no_container() {
        for path in [
            "/",
            "/init.scope",
            "/system.slice/sshd.service",
            "/system.slice/containerd.service",
            "/system.slice/docker.service",
            "/system.slice/docker-compose@app.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "/kubepods.slice/kubepods-burstable.slice",
            // A 32-hex component names no container.
            "/process_api/420ebbeeeb0dc561d344ecdcc91992dc",
        ] {
            assert_every_version(path, expected(None, None, 0));
        }
        // A process in the pod's cgroup itself.
        assert_every_version(
            &format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice"),
            expected(None, Some(POD), 0),
        );
    }

    #[test]
    fn the_first_line_naming_a_container_wins_with_its_pod() {
        let file = format!(
            "3:memory:/kubepods/burstable/pod{POD}\n\
             2:cpu:/kubepods/burstable/pod{STATIC_POD}/{OTHER_ID}\n\
             1:name=systemd:/kubepods/burstable/pod{POD}/{ID}\n"
        );
        assert_eq!(parsed(&file), expected(Some(OTHER_ID), Some(STATIC_POD), 0));
    }

    #[test]
    fn lines_in_unknown_forms_are_counted_and_skipped() {
        // Kata's sandbox cgroup: a pod child in a naming we do not know.
        assert_eq!(
            parsed(&v2(&format!("/kubepods/besteffort/pod{POD}/kata_{ID}"))),
            expected(None, Some(POD), 1)
        );
        for line in [
            "0::/system.slice/cri-containerd-notanid.scope",
            "0::/system.slice/docker-8a2d0164.scope",
            "0::/kubepods-burstable-podx.slice:cri-containerd:8a2d0164",
            "0::/a:b",
            "0::/a:b:c:d",
            "garbage",
            "x:cpu:/docker/8a2d0164a0c5e611dfd5bd0c0fc17c0f56d94803543e3aac33d08acb0592bf3e",
            "1:cpu:relative/path",
            "1:cpu",
            "0::",
            ":",
            "::/",
        ] {
            assert_eq!(parsed(line), expected(None, None, 1), "{line}");
        }
        // Good lines still give the container; each bad one is counted.
        let file = format!("bad line\n0::/kubepods/besteffort/pod{POD}/{ID}\n7:x\n");
        assert_eq!(parsed(&file), expected(Some(ID), Some(POD), 2));
    }

    #[test]
    fn garbage_never_panics() {
        for text in [
            &b""[..],
            b"\n\n\n",
            b"\xff\xfe\x00\x01",
            b"0::/\xff\xfe/pod\xff.slice/\xff.scope",
            b"0::/pod/pod-/-pod.slice/.scope/.slice/-.slice/::/:::",
            b"0::/crio-.scope/docker-/libpod-conmon-/cri-containerd-.scope",
            b"99999999999999999999999999:cpu:/",
        ] {
            let identity = parse_cgroup_file(text);
            assert_eq!(identity.container_id, None, "{text:?}");
            assert_eq!(identity.pod_uid, None, "{text:?}");
        }
        // Pseudo-random lines over the bytes the parser looks at, deterministic.
        let alphabet = b":/-_.\n0123456789abcdefpodscrilbkx \xff";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut text = Vec::new();
        for _ in 0..2_000 {
            text.clear();
            let len = next() % 400;
            for _ in 0..len {
                let pick = usize::try_from(next() % alphabet.len() as u64).unwrap();
                text.push(alphabet[pick]);
            }
            let identity = parse_cgroup_file(&text);
            let lines = text
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            assert!(identity.unrecognized_lines as usize <= lines, "{text:?}");
        }
    }

    #[test]
    fn status_ids_lose_their_runtime_prefix() {
        for status_id in [
            format!("containerd://{ID}"),
            format!("docker://{ID}"),
            format!("cri-o://{ID}"),
            format!("x://{ID}"),
            ID.to_owned(),
            format!("containerd://{}", ID.to_ascii_uppercase()),
        ] {
            assert_eq!(
                ContainerId::from_status_id(&status_id).map(|id| id.to_string()),
                Some(ID.to_owned()),
                "{status_id}"
            );
        }
        for status_id in [
            "",
            "containerd://",
            "containerd://8a2d0164",
            "docker://zz2d0164a0c5e611dfd5bd0c0fc17c0f56d94803543e3aac33d08acb0592bf3e",
        ] {
            assert_eq!(ContainerId::from_status_id(status_id), None, "{status_id}");
        }
    }

    #[test]
    fn status_ids_match_the_cgroups_of_their_runtime() {
        let pod_slice =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice");
        for (status_id, path) in [
            (
                format!("containerd://{ID}"),
                format!("{pod_slice}/cri-containerd-{ID}.scope"),
            ),
            (
                format!("cri-o://{ID}"),
                format!("{pod_slice}/crio-{ID}.scope"),
            ),
            (
                format!("docker://{ID}"),
                format!("{pod_slice}/docker-{ID}.scope"),
            ),
            (
                format!("containerd://{ID}"),
                format!("/kubepods/burstable/pod{POD}/{ID}"),
            ),
        ] {
            assert_eq!(
                ContainerId::from_status_id(&status_id),
                parsed(&v2(&path)).container_id,
                "{status_id} {path}"
            );
        }
    }

    #[test]
    fn reads_a_fake_proc_root() {
        let root = tempfile::tempdir().unwrap();
        let write = |pid: u32, text: &str| {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup"), text).unwrap();
        };
        write(
            100,
            &v2(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{POD_}.slice/\
                 cri-containerd-{ID}.scope"
            )),
        );
        write(
            200,
            &hybrid("/system.slice/sshd.service", "/system.slice/sshd.service"),
        );
        write(300, &format!("what\n{}", v2(&format!("/docker/{ID}"))));
        // A process that exited between listing and reading: its directory without the file.
        std::fs::create_dir_all(root.path().join("400")).unwrap();
        // No permission and the like are errors: here, a directory that cannot be read.
        std::fs::create_dir_all(root.path().join("500").join("cgroup")).unwrap();

        let mut reader = CgroupReader::new(root.path());
        assert_eq!(
            reader.read(100).unwrap(),
            Some(expected(Some(ID), Some(POD), 0))
        );
        assert_eq!(reader.read(200).unwrap(), Some(expected(None, None, 0)));
        assert_eq!(reader.read(300).unwrap(), Some(expected(Some(ID), None, 1)));
        assert_eq!(reader.read(400).unwrap(), None);
        assert_eq!(reader.read(600).unwrap(), None);
        let error = reader.read(500).unwrap_err();
        assert!(error.to_string().ends_with("/500/cgroup"), "{error}");
        // The count adds up over reads.
        assert_eq!(
            reader.read(300).unwrap().map(|i| i.unrecognized_lines),
            Some(1)
        );
        assert_eq!(reader.unrecognized_lines(), 2);
    }

    #[test]
    fn reads_this_process_from_the_real_proc() {
        let identity = CgroupReader::new("/proc")
            .read(std::process::id())
            .unwrap()
            .expect("this process is alive");
        // Whatever this machine runs, the kernel writes only forms we know.
        assert_eq!(identity.unrecognized_lines, 0, "{identity:?}");
    }
}
