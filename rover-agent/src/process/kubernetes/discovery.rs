//! The processes of the pods on this node: every process of every container of a watched pod
//! (found through `/proc/PID/cgroup`), named by the analyzers, as `ProcessEntity` changes.
//!
//! What a scan learnt of a process is kept (pid, start time, container, command line) and read
//! again only when the kernel says the process exec'd or exited, or when it cannot say. A
//! process's names are kept too, and rendered again only when its pod, its pod's Service or its
//! container changed: rendering the analyzers' templates costs more than reading `/proc`.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Service};
use tracing::{debug, warn};

use super::analyzer::{AnalyzerInput, Analyzers, NamedProcess, make_process_names_unique};
use super::watch::ClusterSnapshot;
use crate::process::cgroup::{CgroupReader, ContainerId};
use crate::process::entity::{EntityNames, PodPlacement, ProcessEntity};
use crate::process::host_rules::{HostFacts, ScanChanges, interfaces};
use crate::process::proc_files::{can_open_exe, exe_name, read_argv, read_stat};
use crate::process::rule_template::{ProcessValues, RoverValues};

/// A process can move to another cgroup without exec or exit (rare: runtimes place a
/// container's first process before it execs its image): every this many scans, the cgroup of
/// every process seen outside containers is read again.
const CGROUP_RECHECK_EVERY: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list the processes in {path}: {source}")]
    ListProcesses {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Finds the processes of the pods of a [`ClusterSnapshot`] and names them.
pub struct KubernetesDiscovery {
    analyzers: Analyzers,
    facts: HostFacts,
    proc_root: PathBuf,
    cgroups: CgroupReader,
    self_pid: u32,
    /// The agent's own container: its pod is never reported.
    own_container: Option<ContainerId>,
    known: HashMap<u32, KnownProcess>,
    /// The entities of the previous scan, by pid.
    reported: HashMap<u32, ProcessEntity>,
    scans: u32,
    /// Template failures are warned about once per config key.
    warned: HashSet<String>,
}

/// A process as the previous scan left it: the same while its start time and `comm` stay.
struct KnownProcess {
    start_time: u64,
    comm: String,
    kernel_thread: bool,
    /// `None`: not in a container (a host process or a kernel thread).
    container: Option<ContainerProcess>,
}

struct ContainerProcess {
    id: ContainerId,
    argv: Vec<String>,
    command_line: String,
    exe_name: String,
    profilable: bool,
    /// The names last rendered, and for which pod, Service and container.
    named: Option<(NamingKey, Option<EntityNames>)>,
}

/// What a process's names depend on besides the process: the pod and Service versions.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NamingKey {
    pod_uid: String,
    pod_version: String,
    service: Option<(String, String)>,
    container: String,
}

/// A process of a watched pod, before its name is made unique within its instance.
struct PodProcess<'a> {
    pod: &'a Pod,
    container: &'a str,
}

impl KubernetesDiscovery {
    /// `proc_root` is the host's procfs (`/proc` in a DaemonSet with `hostPID`).
    pub fn new(analyzers: Analyzers, facts: HostFacts, proc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let mut cgroups = CgroupReader::new(&proc_root);
        let self_pid = std::process::id();
        let own_container = cgroups
            .read(self_pid)
            .ok()
            .flatten()
            .and_then(|identity| identity.container_id);
        Self {
            analyzers,
            facts,
            proc_root,
            cgroups,
            self_pid,
            own_container,
            known: HashMap::new(),
            reported: HashMap::new(),
            scans: 0,
            warned: HashSet::new(),
        }
    }

    /// One pass over the processes against the pods of `snapshot`: the entities added (new or
    /// changed) and removed (gone or changed) since the previous scan. Blocking.
    ///
    /// `changed`: the processes that exec'd or exited since the previous scan, when the kernel
    /// tells; `None` reads every process again.
    pub fn scan(
        &mut self,
        snapshot: &ClusterSnapshot,
        changed: Option<&HashSet<u32>>,
    ) -> Result<ScanChanges, DiscoveryError> {
        self.scans = self.scans.wrapping_add(1);
        let recheck_cgroups = self.scans.is_multiple_of(CGROUP_RECHECK_EVERY);
        self.read_processes(changed, recheck_cgroups)?;
        let containers = container_index(snapshot, self.own_container.as_ref());
        let interfaces = self.analyzers.uses_interfaces().then(interfaces).flatten();
        let rover = RoverValues {
            instance_id: &self.facts.agent_instance_id,
            host_name: &self.facts.host_name,
            host_ip: self.facts.host_ip,
            interfaces: interfaces.as_ref(),
        };
        let mut named: Vec<NamedProcess> = Vec::new();
        let mut placements: HashMap<u32, PodProcess<'_>> = HashMap::new();
        for (&pid, known) in &mut self.known {
            let Some(process) = known.container.as_mut() else {
                continue;
            };
            let Some(&(pod, container)) = containers.get(&process.id) else {
                continue;
            };
            let service = snapshot.service_of(pod);
            let key = naming_key(pod, service, container);
            let names = match &process.named {
                Some((named_for, names)) if *named_for == key => names.clone(),
                _ => {
                    let proc_dir = self.proc_root.join(pid.to_string());
                    let input = AnalyzerInput {
                        pod,
                        service,
                        container_name: container,
                        process: ProcessValues {
                            pid,
                            exe_name: &process.exe_name,
                            argv: &process.argv,
                            command_line: &process.command_line,
                            proc_dir: &proc_dir,
                        },
                        rover: RoverValues { ..rover },
                    };
                    let names = match self.analyzers.analyze(&input) {
                        Ok(names) => names,
                        Err(error) => {
                            if self.warned.insert(error.key().to_owned()) {
                                warn!("process {pid} of pod {}: {error}", pod_name(pod));
                            }
                            None
                        }
                    };
                    process.named = Some((key, names.clone()));
                    names
                }
            };
            if let Some(names) = names {
                named.push(NamedProcess {
                    pid,
                    start_time: known.start_time,
                    names,
                });
                placements.insert(pid, PodProcess { pod, container });
            }
        }
        make_process_names_unique(&mut named);
        let mut entities: HashMap<u32, ProcessEntity> = HashMap::with_capacity(named.len());
        for process in named {
            let (Some(placement), Some(known)) = (
                placements.get(&process.pid),
                self.known
                    .get(&process.pid)
                    .and_then(|known| known.container.as_ref()),
            ) else {
                continue;
            };
            let pod = placement.pod;
            let entity = ProcessEntity::kubernetes(
                process.pid,
                process.names,
                self.facts.cluster_name.as_deref(),
                self.facts.host_ip,
                PodPlacement {
                    pod_ip: pod
                        .status
                        .as_ref()
                        .and_then(|status| status.pod_ip.as_deref())
                        .unwrap_or_default(),
                    pod_name: pod_name(pod),
                    container_name: placement.container,
                },
                &known.command_line,
                known.profilable,
            );
            entities.insert(process.pid, entity);
        }
        Ok(self.changes_to(entities))
    }

    /// Reads what is new or changed in the procfs tree into `known`: processes the kernel
    /// marked (`changed`), else those whose `stat` changed; and with `recheck_cgroups`, those
    /// seen outside containers.
    fn read_processes(
        &mut self,
        changed: Option<&HashSet<u32>>,
        recheck_cgroups: bool,
    ) -> Result<(), DiscoveryError> {
        let entries =
            fs::read_dir(&self.proc_root).map_err(|source| DiscoveryError::ListProcesses {
                path: self.proc_root.clone(),
                source,
            })?;
        let mut previous = std::mem::take(&mut self.known);
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            if pid == self.self_pid {
                continue;
            }
            let recheck = |known: &KnownProcess| {
                recheck_cgroups && known.container.is_none() && !known.kernel_thread
            };
            if let Some(changed) = changed
                && !changed.contains(&pid)
                && let Some(known) = previous.remove(&pid)
            {
                if !recheck(&known) {
                    self.known.insert(pid, known);
                    continue;
                }
                previous.insert(pid, known);
            }
            let proc_dir = entry.path();
            let Some(stat) = read_stat(&proc_dir) else {
                continue;
            };
            if stat.is_gone() {
                continue;
            }
            let mut before = previous
                .remove(&pid)
                .filter(|known| known.start_time == stat.start_time && known.comm == stat.comm);
            if changed.is_none()
                && let Some(known) = before
            {
                if !recheck(&known) {
                    self.known.insert(pid, known);
                    continue;
                }
                before = Some(known);
            }
            let container = if stat.is_kernel_thread() {
                None
            } else {
                match self.cgroups.read(pid) {
                    Ok(Some(identity)) => identity.container_id,
                    // Vanished while being read.
                    Ok(None) => continue,
                    Err(error) => {
                        debug!("{error}");
                        None
                    }
                }
            };
            let container = match container {
                Some(id) => {
                    let Some(argv) = read_argv(&proc_dir) else {
                        continue;
                    };
                    let command_line = argv.join(" ");
                    if command_line.is_empty() {
                        // Not exec'd yet: read again next scan.
                        continue;
                    }
                    // Read again, the same: the names given stay valid.
                    let named = before
                        .and_then(|known| known.container)
                        .filter(|old| old.id == id && old.command_line == command_line)
                        .and_then(|old| old.named);
                    Some(ContainerProcess {
                        id,
                        exe_name: exe_name(&stat.comm, &argv),
                        command_line,
                        argv,
                        profilable: can_open_exe(&proc_dir),
                        named,
                    })
                }
                None => None,
            };
            self.known.insert(
                pid,
                KnownProcess {
                    start_time: stat.start_time,
                    kernel_thread: stat.is_kernel_thread(),
                    comm: stat.comm,
                    container,
                },
            );
        }
        Ok(())
    }

    /// The differences between the previous scan's entities and `entities`, which replace them.
    fn changes_to(&mut self, entities: HashMap<u32, ProcessEntity>) -> ScanChanges {
        let mut changes = ScanChanges::default();
        for (pid, old) in &self.reported {
            if entities.get(pid) != Some(old) {
                changes.removed.push(*pid);
            }
        }
        for (pid, new) in &entities {
            if self.reported.get(pid) != Some(new) {
                changes.added.push(new.clone());
            }
        }
        changes.removed.sort_unstable();
        changes.added.sort_by_key(|entity| entity.pid);
        self.reported = entities;
        changes
    }
}

/// Each container of the snapshot's pods (regular, init and ephemeral) by id, with its pod and
/// name; the pod holding `own_container` is left out.
fn container_index<'a>(
    snapshot: &'a ClusterSnapshot,
    own_container: Option<&ContainerId>,
) -> HashMap<ContainerId, (&'a Pod, &'a str)> {
    let mut index = HashMap::new();
    for pod in &snapshot.pods {
        let Some(status) = &pod.status else {
            continue;
        };
        let statuses = [
            &status.container_statuses,
            &status.init_container_statuses,
            &status.ephemeral_container_statuses,
        ];
        let ids: Vec<(ContainerId, &str)> = statuses
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|status: &ContainerStatus| {
                let id = ContainerId::from_status_id(status.container_id.as_deref()?)?;
                Some((id, status.name.as_str()))
            })
            .collect();
        if own_container.is_some_and(|own| ids.iter().any(|(id, _)| id == own)) {
            continue;
        }
        for (id, name) in ids {
            index.insert(id, (pod.as_ref(), name));
        }
    }
    index
}

fn naming_key(pod: &Pod, service: Option<&Service>, container: &str) -> NamingKey {
    let version = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (
            meta.uid.clone().unwrap_or_default(),
            meta.resource_version.clone().unwrap_or_default(),
        )
    };
    let (pod_uid, pod_version) = version(&pod.metadata);
    NamingKey {
        pod_uid,
        pod_version,
        service: service.map(|service| version(&service.metadata)),
        container: container.to_owned(),
    }
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use super::*;
    use crate::config::KubernetesAnalyzerSettings;

    const CONTAINER_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const CONTAINER_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    /// A procfs tree in a temporary directory: `PID/{stat,cmdline,cgroup,exe}`.
    struct FakeProc(tempfile::TempDir);

    impl FakeProc {
        fn add(&self, pid: u32, comm: &str, start_time: u64, argv: &[&str], cgroup: &str) {
            let dir = self.0.path().join(pid.to_string());
            fs::create_dir_all(&dir).unwrap();
            let stat = format!(
                "{pid} ({comm}) S 1 1 1 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 {start_time} 0 0\n"
            );
            fs::write(dir.join("stat"), stat).unwrap();
            let mut cmdline = argv.join("\0");
            cmdline.push('\0');
            fs::write(dir.join("cmdline"), cmdline).unwrap();
            fs::write(dir.join("cgroup"), cgroup).unwrap();
            let _ = std::os::unix::fs::symlink("/proc/self/exe", dir.join("exe"));
        }

        fn remove(&self, pid: u32) {
            fs::remove_dir_all(self.0.path().join(pid.to_string())).unwrap();
        }
    }

    fn containerd(pod_uid: &str, id: &str) -> String {
        format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/\
             cri-containerd-{id}.scope\n",
            pod_uid.replace('-', "_")
        )
    }

    fn pod(name: &str, uid: &str, version: &str, containers: &[(&str, &str)]) -> Arc<Pod> {
        let statuses: Vec<serde_json::Value> = containers
            .iter()
            .map(|(name, id)| {
                serde_json::json!({
                    "name": name, "containerID": format!("containerd://{id}"), "image": "i",
                    "imageID": "", "ready": true, "restartCount": 0,
                })
            })
            .collect();
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "shop", "uid": uid,
                             "resourceVersion": version, "labels": {"app": "cart"}},
                "spec": {"nodeName": "node-1", "containers": containers.iter()
                    .map(|(name, _)| serde_json::json!({"name": name})).collect::<Vec<_>>()},
                "status": {"podIP": "10.1.2.3", "containerStatuses": statuses},
            }))
            .unwrap(),
        )
    }

    fn service() -> Arc<Service> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "cart", "namespace": "shop", "uid": "s1",
                             "resourceVersion": "1"},
                "spec": {"selector": {"app": "cart"}},
            }))
            .unwrap(),
        )
    }

    fn discovery(proc: &FakeProc) -> KubernetesDiscovery {
        let analyzers = Analyzers::new(&[KubernetesAnalyzerSettings {
            active: true,
            filters: vec![".Pod.HasServiceName".to_owned()],
            layer: "K8S_SERVICE".to_owned(),
            service_name: "{{.Pod.ServiceName}}.{{.Pod.Namespace}}".to_owned(),
            instance_name: "{{.Pod.Name}}".to_owned(),
            process_name: "{{.Process.ExeName}}".to_owned(),
            labels: vec!["k8s-service".to_owned()],
        }])
        .unwrap();
        let facts = HostFacts {
            cluster_name: Some("prod".to_owned()),
            host_ip: IpAddr::V4(Ipv4Addr::new(192, 168, 0, 7)),
            host_name: "node-1".to_owned(),
            agent_instance_id: "agent".to_owned(),
        };
        KubernetesDiscovery::new(analyzers, facts, proc.0.path())
    }

    #[test]
    fn every_process_of_a_pod_s_container_is_reported_with_its_pod_and_unique_names() {
        let proc = FakeProc(tempfile::tempdir().unwrap());
        let uid = "11111111-2222-3333-4444-555555555555";
        proc.add(
            100,
            "server",
            10,
            &["/app/server", "--port=80"],
            &containerd(uid, CONTAINER_A),
        );
        proc.add(
            101,
            "server",
            20,
            &["/app/server", "--worker"],
            &containerd(uid, CONTAINER_A),
        );
        proc.add(
            102,
            "helper",
            30,
            &["helper"],
            &containerd(uid, CONTAINER_B),
        );
        proc.add(
            200,
            "bash",
            5,
            &["bash"],
            "0::/user.slice/session-1.scope\n",
        );
        let mut snapshot = ClusterSnapshot {
            pods: vec![pod(
                "cart-1",
                uid,
                "7",
                &[("app", CONTAINER_A), ("helper", CONTAINER_B)],
            )],
            services: vec![service()],
        };
        let mut discovery = discovery(&proc);

        let changes = discovery.scan(&snapshot, None).unwrap();
        let names: Vec<(u32, &str)> = changes
            .added
            .iter()
            .map(|entity| (entity.pid, entity.process_name.as_str()))
            .collect();
        // The oldest `server` keeps the name; the host process is not a pod's.
        assert_eq!(
            names,
            [(100, "server"), (101, "server-101"), (102, "helper")]
        );
        let first = &changes.added[0];
        assert_eq!(first.origin, crate::process::ProcessOrigin::Kubernetes);
        assert_eq!(first.layer, "K8S_SERVICE");
        assert_eq!(first.service_name, "prod::cart.shop");
        assert_eq!(first.instance_name, "cart-1");
        assert_eq!(first.labels, ["k8s-service"]);
        let properties: Vec<(&str, &str)> = first
            .properties
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("host_ip", "192.168.0.7"),
                ("container_ip", "10.1.2.3"),
                ("container_name", "app"),
                ("pod_name", "cart-1"),
                ("pid", "100"),
                ("command_line", "/app/server --port=80"),
                ("support_ebpf_profiling", "true"),
            ]
        );

        // Nothing changed: nothing to say, whether the kernel tells or not.
        assert_eq!(
            discovery.scan(&snapshot, None).unwrap(),
            ScanChanges::default()
        );
        assert_eq!(
            discovery.scan(&snapshot, Some(&HashSet::new())).unwrap(),
            ScanChanges::default()
        );

        // 100 exits: 101 takes the bare name (re-reported), 100 is removed.
        proc.remove(100);
        let changes = discovery
            .scan(&snapshot, Some(&HashSet::from([100])))
            .unwrap();
        assert_eq!(changes.removed, [100, 101]);
        assert_eq!(changes.added.len(), 1);
        assert_eq!(changes.added[0].process_name, "server");

        // The pod is deleted: its processes are removed.
        snapshot.pods.clear();
        let changes = discovery.scan(&snapshot, Some(&HashSet::new())).unwrap();
        assert_eq!(changes.removed, [101, 102]);
        assert!(changes.added.is_empty());
    }

    #[test]
    fn a_pod_known_after_its_processes_and_a_process_moved_into_a_container_are_found() {
        let proc = FakeProc(tempfile::tempdir().unwrap());
        let uid = "11111111-2222-3333-4444-555555555555";
        proc.add(
            100,
            "server",
            10,
            &["server"],
            &containerd(uid, CONTAINER_A),
        );
        proc.add(300, "late", 10, &["late"], "0::/user.slice\n");
        let mut snapshot = ClusterSnapshot {
            pods: Vec::new(),
            services: vec![service()],
        };
        let mut discovery = discovery(&proc);
        assert_eq!(
            discovery.scan(&snapshot, None).unwrap(),
            ScanChanges::default()
        );
        snapshot.pods = vec![pod(
            "cart-1",
            uid,
            "1",
            &[("app", CONTAINER_A), ("helper", CONTAINER_B)],
        )];
        let added = discovery
            .scan(&snapshot, Some(&HashSet::new()))
            .unwrap()
            .added;
        assert_eq!(added.iter().map(|e| e.pid).collect::<Vec<_>>(), [100]);

        // 300 moves into container B without exec or exit: found by the periodic re-read.
        fs::write(
            proc.0.path().join("300/cgroup"),
            containerd(uid, CONTAINER_B),
        )
        .unwrap();
        let mut found = Vec::new();
        for _ in 0..CGROUP_RECHECK_EVERY {
            found.extend(
                discovery
                    .scan(&snapshot, Some(&HashSet::new()))
                    .unwrap()
                    .added,
            );
        }
        assert_eq!(found.iter().map(|e| e.pid).collect::<Vec<_>>(), [300]);
        assert_eq!(found[0].properties[2].1, "helper");
    }
}
