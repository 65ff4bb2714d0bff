//! The processes of the pods on this node: every process of every container of a watched pod
//! (found through `/proc/PID/cgroup`), named by the analyzers, as `ProcessEntity` changes.
//!
//! Work is done per pod, and only for pods that changed: a pod whose object, Service and
//! processes are as when its processes were last named keeps its entities without a look at
//! them. A process's names are kept too, and rendered again only when its pod or its pod's
//! Service changed (rendering the analyzers' templates costs more than reading `/proc`); what is
//! known of each process is read again only when the kernel says it exec'd or exited, or when it
//! cannot say ([`known_processes`]).

mod known_processes;
mod pod_states;
mod threads;

// foldhash: the maps of thousands of processes hashed at every first scan, where SipHash
// cost a fifth of naming them.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tracing::warn;

use super::analyzer::{
    AnalyzeError, AnalyzerInput, Analyzers, NamedProcess, ProcessRenders, make_process_names_unique,
};
use super::watch::ClusterSnapshot;
use crate::process::cgroup::ContainerId;
use crate::process::entity::{EntityNames, PodPlacement, ProcessEntity};
use crate::process::host_ip::InterfaceIps;
use crate::process::host_rules::{HostFacts, ScanChanges, interfaces};
use crate::process::proc_files::ProcessList;
use crate::process::rule_template::{ProcessValues, RoverValues};
use known_processes::{ContainerProcess, KnownProcesses};
use pod_states::PodStates;

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
    processes: KnownProcesses,
    /// The agent's own container: its pod is never reported.
    own_container: Option<ContainerId>,
    /// What each pod's processes were last named for, by pod key ([`pod_key`]).
    pods: PodStates,
    /// Containers whose processes changed since their pod's processes were last collected.
    dirty: HashSet<ContainerId>,
    /// The UID and resource version of each Service at the last update.
    services: Vec<(String, String)>,
    /// A hash of each entity reported, by pid: enough to tell whether it changed (the
    /// reporter keeps the entities themselves; a second copy here would cost more memory than
    /// everything else known of the processes).
    reported: HashMap<u32, u64>,
    /// The last naming generation given to a pod.
    generation: u64,
    scans: u32,
    /// Template failures are warned about once per config key.
    warned: HashSet<String>,
}

/// A pod as its processes were last named.
struct PodState {
    version: PodVersion,
    /// Changes with the version: a process's names rendered under another generation are stale.
    generation: u64,
    containers: Vec<ContainerId>,
    /// Its processes that are reported.
    pids: Vec<u32>,
    /// Their service and instance names: process names are unique within each.
    instances: Vec<Instance>,
}

/// What a pod's names depend on besides its processes: the pod object and its Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodVersion {
    resource_version: String,
    service: Option<(String, String)>,
}

/// Service and instance names.
type Instance = (String, String);

/// A pod whose processes are collected again in this update.
struct PodWork<'a> {
    key: String,
    pod: &'a Pod,
    version: PodVersion,
    generation: u64,
    containers: Vec<(ContainerId, &'a str)>,
}

/// A collected process, before its name is made unique within its instance.
struct Placed<'a> {
    pod: &'a Pod,
    container: &'a str,
}

impl KubernetesDiscovery {
    /// `proc_root` is the host's procfs (`/proc` in a DaemonSet with `hostPID`).
    pub fn new(analyzers: Analyzers, facts: HostFacts, proc_root: impl Into<PathBuf>) -> Self {
        let proc_root = proc_root.into();
        let mut processes = KnownProcesses::new(proc_root.clone());
        let own_container = processes.container_of(std::process::id());
        Self {
            analyzers,
            facts,
            proc_root,
            processes,
            own_container,
            pods: PodStates::default(),
            dirty: HashSet::new(),
            services: Vec::new(),
            reported: HashMap::new(),
            generation: 0,
            scans: 0,
            warned: HashSet::new(),
        }
    }

    /// Scans that read every process list them with `list` (the kernel's task iterator), whose
    /// pids must be the proc root's, instead of reading each one's `stat` and `cgroup`; procfs
    /// again if it fails.
    pub fn list_processes_with(&mut self, list: Box<dyn ProcessList>) {
        self.processes.list_with(list);
    }

    /// One pass over the processes against the pods of `snapshot`: the entities added (new or
    /// changed) and removed (gone or changed) since the previous scan. Blocking.
    ///
    /// `changed`: the processes that exec'd or exited since the previous scan, when the kernel
    /// tells; `None` reads every process again.
    pub fn scan(
        &mut self,
        snapshot: &ClusterSnapshot,
        changed: Option<&std::collections::HashSet<u32>>,
    ) -> Result<ScanChanges, DiscoveryError> {
        self.scans = self.scans.wrapping_add(1);
        let recheck_cgroups = self.scans.is_multiple_of(CGROUP_RECHECK_EVERY);
        let dirty = self.processes.read(changed, recheck_cgroups)?;
        self.dirty.extend(dirty);
        Ok(self.pods_changed(snapshot))
    }

    /// Reads the processes the kernel marked (exec'd or exited) since the last scan, and no
    /// other, so that [`Self::pods_changed`] sees them (the host rules have not: the caller
    /// hands the marks to the next scan too).
    pub fn read_marked(&mut self, marked: &std::collections::HashSet<u32>) {
        let dirty = self.processes.read_only(marked);
        self.dirty.extend(dirty);
    }

    /// The changes after the pods or Services changed, without reading `/proc`: only the
    /// processes of pods that changed (and of pods whose processes changed at the last scan) are
    /// looked at. Blocking.
    pub fn pods_changed(&mut self, snapshot: &ClusterSnapshot) -> ScanChanges {
        let (mut work, known_live) = self.stale_pods(snapshot);
        let mut changes = ScanChanges::default();
        // Pods gone: their processes go. Every pod known is live unless fewer were seen.
        let gone: Vec<String> = if known_live == self.pods.len() {
            Vec::new()
        } else {
            let live: HashSet<&str> = snapshot.pods.iter().map(|pod| pod_key(pod)).collect();
            self.pods
                .keys()
                .filter(|key| !live.contains(key.as_str()))
                .cloned()
                .collect()
        };
        let mut instances: HashSet<Instance> = HashSet::new();
        let mut old_pids: Vec<u32> = Vec::new();
        for key in gone {
            if let Some(state) = self.pods.remove(&key) {
                instances.extend(state.instances);
                old_pids.extend(state.pids);
            }
        }
        if work.is_empty() && old_pids.is_empty() {
            self.dirty.clear();
            return changes;
        }
        let mut named: Vec<NamedProcess> = Vec::new();
        let mut placed: HashMap<u32, Placed<'_>> = HashMap::new();
        let mut host_interfaces = None;
        // Live pods by key, made only when pods sharing an instance must be collected.
        let mut live: Option<HashMap<&str, &Pod>> = None;
        let mut done = 0;
        // Names are unique within an instance: pods sharing one with a changed pod (not with
        // Rover's shipped analyzers, whose instance is the pod) are collected again with it.
        loop {
            self.name(&work[done..], snapshot, &mut host_interfaces);
            for pod in &work[done..] {
                if let Some(state) = self.pods.get(&pod.key) {
                    instances.extend(state.instances.iter().cloned());
                    old_pids.extend(&state.pids);
                }
                let first = named.len();
                self.collect(pod, &mut named, &mut placed);
                instances.extend(
                    named[first..]
                        .iter()
                        .map(|process| instance_of(&process.names)),
                );
            }
            done = work.len();
            let sharing: HashSet<String> = self
                .pods
                .in_instances(&instances)
                .filter(|key| !work.iter().any(|pod| pod.key == **key))
                .cloned()
                .collect();
            if sharing.is_empty() {
                break;
            }
            let live = live.get_or_insert_with(|| {
                snapshot
                    .pods
                    .iter()
                    .map(|pod| (pod_key(pod), pod.as_ref()))
                    .collect()
            });
            for key in sharing {
                let (Some(&pod), Some(state)) = (live.get(key.as_str()), self.pods.get(&key))
                else {
                    continue;
                };
                work.push(PodWork {
                    version: state.version.clone(),
                    generation: state.generation,
                    containers: containers_of(pod),
                    key,
                    pod,
                });
            }
        }
        make_process_names_unique(&mut named);

        let mut pod_pids: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut pod_instances: HashMap<&str, HashSet<Instance>> = HashMap::new();
        let mut entities: HashMap<u32, ProcessEntity> = HashMap::with_capacity(named.len());
        for process in named {
            let (Some(placement), Some(known)) = (
                placed.get(&process.pid),
                self.processes
                    .get(process.pid)
                    .and_then(|known| known.container.as_ref()),
            ) else {
                continue;
            };
            let pod = placement.pod;
            let key = pod_key(pod);
            pod_pids.entry(key).or_default().push(process.pid);
            pod_instances
                .entry(key)
                .or_default()
                .insert(instance_of(&process.names));
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
                known.command_line.as_str(),
                known.profilable,
            );
            entities.insert(process.pid, entity);
        }
        for pod in work {
            let key = pod_key(pod.pod);
            self.pods.insert(
                pod.key,
                PodState {
                    version: pod.version,
                    generation: pod.generation,
                    containers: pod.containers.into_iter().map(|(id, _)| id).collect(),
                    pids: pod_pids.remove(key).unwrap_or_default(),
                    instances: pod_instances
                        .remove(key)
                        .map(|set| set.into_iter().collect())
                        .unwrap_or_default(),
                },
            );
        }
        self.dirty.clear();

        old_pids.sort_unstable();
        old_pids.dedup();
        for pid in old_pids {
            if !entities.contains_key(&pid) && self.reported.remove(&pid).is_some() {
                changes.removed.push(pid);
            }
        }
        for (pid, entity) in entities {
            let hash = entity_hash(&entity);
            match self.reported.insert(pid, hash) {
                Some(old) if old == hash => {}
                Some(_) => {
                    changes.removed.push(pid);
                    changes.added.push(entity);
                }
                None => changes.added.push(entity),
            }
        }
        changes.removed.sort_unstable();
        changes.added.sort_by_key(|entity| entity.pid);
        changes
    }

    /// The pods whose processes must be collected again (new, changed, or with a container
    /// whose processes changed), and how many live pods are known. The agent's own pod is left
    /// out. Costs one lookup per unchanged pod: a pod event changes one pod of many.
    fn stale_pods<'a>(&mut self, snapshot: &'a ClusterSnapshot) -> (Vec<PodWork<'a>>, usize) {
        let mut work = Vec::new();
        let mut known_live = 0;
        // Finding a pod's Service matches selectors against labels: skipped for a pod whose
        // object did not change while no Service did.
        let mut services: Vec<(&str, &str)> = snapshot
            .services
            .iter()
            .map(|service| {
                let meta = &service.metadata;
                (
                    meta.uid.as_deref().unwrap_or_default(),
                    meta.resource_version.as_deref().unwrap_or_default(),
                )
            })
            .collect();
        // The snapshot has no order.
        services.sort_unstable();
        let services_unchanged = self.services.len() == services.len()
            && self.services.iter().zip(&services).all(
                |((uid, version), (now_uid, now_version))| uid == now_uid && version == now_version,
            );
        if !services_unchanged {
            self.services = services
                .iter()
                .map(|&(uid, version)| (uid.to_owned(), version.to_owned()))
                .collect();
        }
        for pod in &snapshot.pods {
            let key = pod_key(pod);
            let state = self.pods.get(key);
            known_live += usize::from(state.is_some());
            // `None`: the version its processes were named for (same object, no Service changed).
            let new_version = match state {
                Some(state)
                    if services_unchanged
                        && pod.metadata.resource_version.as_deref().unwrap_or_default()
                            == state.version.resource_version =>
                {
                    None
                }
                _ => Some(PodVersion::of(pod, snapshot.service_of(pod))),
            };
            let unchanged = state.is_some_and(|state| {
                new_version
                    .as_ref()
                    .is_none_or(|version| *version == state.version)
                    && !state.containers.iter().any(|id| self.dirty.contains(id))
            });
            if unchanged {
                continue;
            }
            let containers = containers_of(pod);
            if self
                .own_container
                .as_ref()
                .is_some_and(|own| containers.iter().any(|(id, _)| id == own))
            {
                continue;
            }
            let version = match (new_version, state) {
                (Some(version), _) => version,
                (None, Some(state)) => state.version.clone(),
                (None, None) => PodVersion::of(pod, snapshot.service_of(pod)),
            };
            let generation = match state {
                Some(state) if state.version == version => state.generation,
                _ => {
                    self.generation += 1;
                    self.generation
                }
            };
            work.push(PodWork {
                key: key.to_owned(),
                pod,
                version,
                generation,
                containers,
            });
        }
        (work, known_live)
    }

    /// Renders the names of the processes of `pods` not named under their pod's generation: on
    /// a few threads when there are many (the first scan names every process of the node).
    fn name(
        &mut self,
        pods: &[PodWork<'_>],
        snapshot: &ClusterSnapshot,
        host_interfaces: &mut Option<Option<std::collections::HashMap<String, InterfaceIps>>>,
    ) {
        let mut jobs: Vec<NameJob<'_, '_>> = Vec::new();
        let mut count = 0;
        for pod in pods {
            let service = snapshot.service_of(pod.pod);
            for (id, container) in &pod.containers {
                let processes: Vec<(u32, &ContainerProcess)> = self
                    .processes
                    .in_container(id)
                    .iter()
                    .filter_map(|&pid| {
                        let process = self.processes.get(pid)?.container.as_deref()?;
                        let named = process
                            .named
                            .as_ref()
                            .is_some_and(|(generation, _)| *generation == pod.generation);
                        (!named).then_some((pid, process))
                    })
                    .collect();
                if processes.is_empty() {
                    continue;
                }
                count += processes.len();
                jobs.push(NameJob {
                    pod: pod.pod,
                    service,
                    container,
                    generation: pod.generation,
                    processes,
                });
            }
        }
        if jobs.is_empty() {
            return;
        }
        // Read once per update, and only when a template asks.
        let interfaces = host_interfaces
            .get_or_insert_with(|| self.analyzers.uses_interfaces().then(interfaces).flatten())
            .as_ref();
        let namer = Namer {
            analyzers: &self.analyzers,
            facts: &self.facts,
            proc_root: &self.proc_root,
            interfaces,
        };
        let threads = self
            .processes
            .threads()
            .min(count / PARALLEL_NAMES_MIN)
            .max(1);
        let named: Vec<Vec<Named>> = if threads == 1 {
            jobs.into_iter().map(|job| namer.name(job)).collect()
        } else {
            threads::split(jobs, threads, || (), |(), job| namer.name(job))
                .into_iter()
                .flat_map(|(named, ())| named)
                .collect()
        };
        for named in named.into_iter().flatten() {
            let names = match named.names {
                Ok(names) => names,
                Err(error) => {
                    if self.warned.insert(error.key().to_owned()) {
                        warn!("process {} of pod {}: {error}", named.pid, named.pod);
                    }
                    None
                }
            };
            if let Some(process) = self
                .processes
                .get_mut(named.pid)
                .and_then(|known| known.container.as_mut())
            {
                process.named = Some((named.generation, names));
                process.renders = named.renders;
            }
        }
    }

    /// The named processes of `pod` into `named` and `placed`.
    fn collect<'a>(
        &self,
        pod: &PodWork<'a>,
        named: &mut Vec<NamedProcess>,
        placed: &mut HashMap<u32, Placed<'a>>,
    ) {
        for (id, container) in &pod.containers {
            for &pid in self.processes.in_container(id) {
                let Some(known) = self.processes.get(pid) else {
                    continue;
                };
                let Some(ContainerProcess {
                    named: Some((generation, Some(names))),
                    ..
                }) = known.container.as_deref()
                else {
                    continue;
                };
                // Named for another pod: two pods claim the container (never with real ids).
                if *generation != pod.generation {
                    continue;
                }
                named.push(NamedProcess {
                    pid,
                    start_time: known.start_time,
                    names: names.clone(),
                });
                placed.insert(
                    pid,
                    Placed {
                        pod: pod.pod,
                        container,
                    },
                );
            }
        }
    }
}

/// Below this many processes to name one thread names them: a thread costs more than it saves.
const PARALLEL_NAMES_MIN: usize = 256;

/// The processes (`'k`: borrowed from those known) of one container of a pod (`'p`) to name.
struct NameJob<'p, 'k> {
    pod: &'p Pod,
    service: Option<&'p Service>,
    container: &'p str,
    generation: u64,
    processes: Vec<(u32, &'k ContainerProcess)>,
}

/// What naming gave one process.
struct Named<'a> {
    pid: u32,
    pod: &'a str,
    generation: u64,
    names: Result<Option<EntityNames>, AnalyzeError>,
    renders: ProcessRenders,
}

/// What every process's naming reads, shared by the threads naming them.
struct Namer<'a> {
    analyzers: &'a Analyzers,
    facts: &'a HostFacts,
    proc_root: &'a Path,
    interfaces: Option<&'a std::collections::HashMap<String, InterfaceIps>>,
}

impl Namer<'_> {
    fn name<'p>(&self, job: NameJob<'p, '_>) -> Vec<Named<'p>> {
        let mut renders = self.analyzers.container_renders();
        job.processes
            .into_iter()
            .map(|(pid, process)| {
                let proc_dir = self.proc_root.join(pid.to_string());
                let input = AnalyzerInput {
                    pod: job.pod,
                    service: job.service,
                    container_name: job.container,
                    process: ProcessValues {
                        pid,
                        exe_name: &process.exe_name,
                        argv0: process.command_line.argv0(),
                        command_line: process.command_line.as_str(),
                        proc_dir: &proc_dir,
                    },
                    rover: RoverValues {
                        instance_id: &self.facts.agent_instance_id,
                        host_name: &self.facts.host_name,
                        host_ip: self.facts.host_ip,
                        interfaces: self.interfaces,
                    },
                };
                let mut process_renders = process.renders.clone();
                let names = self
                    .analyzers
                    .analyze(&input, &mut renders, &mut process_renders);
                Named {
                    pid,
                    pod: pod_name(job.pod),
                    generation: job.generation,
                    names,
                    renders: process_renders,
                }
            })
            .collect()
    }
}

impl PodVersion {
    fn of(pod: &Pod, service: Option<&Service>) -> Self {
        let version = |meta: &ObjectMeta| meta.resource_version.clone().unwrap_or_default();
        Self {
            resource_version: version(&pod.metadata),
            service: service.map(|service| {
                (
                    service.metadata.uid.clone().unwrap_or_default(),
                    version(&service.metadata),
                )
            }),
        }
    }
}

/// Each container of `pod` (regular, init and ephemeral) with a known id, and its name.
fn containers_of(pod: &Pod) -> Vec<(ContainerId, &str)> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|status: &ContainerStatus| {
        let id = ContainerId::from_status_id(status.container_id.as_deref()?)?;
        Some((id, status.name.as_str()))
    })
    .collect()
}

/// A pod's UID (its name for an object without one).
fn pod_key(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_else(|| pod_name(pod))
}

/// A hash of every field of `entity` (the same in every run: a fixed seed).
fn entity_hash(entity: &ProcessEntity) -> u64 {
    use std::hash::BuildHasher as _;
    foldhash::fast::FixedState::with_seed(0).hash_one(entity)
}

fn instance_of(names: &EntityNames) -> Instance {
    (names.service_name.clone(), names.instance_name.clone())
}

fn pod_name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or_default()
}

#[cfg(test)]
mod tests;
