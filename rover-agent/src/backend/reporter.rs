//! Process reporting: report new processes with full properties, keep reported ones alive every
//! heartbeat, re-report everything every `properties_report_period` heartbeats and after the OAP
//! was unreachable (it may have restarted and forgotten them).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use rover_proto::v3::{
    EbpfHostProcessMetadata, EbpfKubernetesProcessMetadata, EbpfProcessEntityMetadata,
    EbpfProcessPingPkg, EbpfProcessPingPkgList, EbpfProcessProperties, EbpfProcessReportList,
    EbpfReportProcessDownstream, KeyStringValuePair, ebpf_process_downstream,
    ebpf_process_properties,
};
use tracing::{debug, info};

use super::{Backend, Error};
use crate::process::{EntityIdentity, ProcessEntity, ProcessOrigin};

/// Processes per report call: keeps a message far below gRPC's 4 MiB default limit.
const REPORT_CHUNK: usize = 500;
const SUPPORT_EBPF_PROFILING: &str = "support_ebpf_profiling";

/// The OAP's process ids of the processes this agent reported, to their entities (pid
/// included): what tasks name, and what continuous profiling checks.
#[derive(Clone, Debug, Default)]
pub struct ProcessDirectory {
    ids: Arc<RwLock<HashMap<Arc<str>, Arc<ProcessEntity>>>>,
    /// Processes the reporter holds (found by discovery), reported or not yet.
    found: Arc<AtomicUsize>,
}

/// How many processes the agent reports, for its self-metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCounts {
    /// Found by discovery, to report.
    pub found: usize,
    /// Known to the OAP by an id, kept alive every heartbeat.
    pub reported: usize,
}

impl ProcessDirectory {
    /// The local pid of the OAP's process `id`, if this agent reported it.
    pub fn pid(&self, id: &str) -> Option<u32> {
        Some(self.ids.read().ok()?.get(id)?.pid)
    }

    pub fn counts(&self) -> ProcessCounts {
        ProcessCounts {
            found: self.found.load(Ordering::Relaxed),
            reported: self.ids.read().map_or(0, |ids| ids.len()),
        }
    }

    /// Every process the OAP knows by an id, with that id.
    pub fn reported(&self) -> Vec<(String, Arc<ProcessEntity>)> {
        self.ids.read().map_or_else(
            |_| Vec::new(),
            |ids| {
                ids.iter()
                    .map(|(id, entity)| (id.to_string(), Arc::clone(entity)))
                    .collect()
            },
        )
    }

    fn set(&self, id: Arc<str>, entity: Arc<ProcessEntity>) {
        if let Ok(mut ids) = self.ids.write() {
            ids.insert(id, entity);
        }
    }

    fn remove(&self, id: &str) {
        if let Ok(mut ids) = self.ids.write() {
            ids.remove(id);
        }
    }
}

/// One local process and what the OAP knows of it; the entity and id are shared with the
/// directory (one copy of each for thousands of processes).
#[derive(Debug)]
struct Reported {
    entity: Arc<ProcessEntity>,
    /// The OAP's id, once a report reply named it.
    id: Option<Arc<str>>,
    /// Not (or not certainly) known to the OAP: reported at the next heartbeat.
    to_report: bool,
}

/// A process as one source found it: a process matched by a host rule and in a pod is two
/// entities to the OAP (as in Rover), each kept and removed by its own source.
type ProcessKey = (u32, ProcessOrigin);

pub struct ProcessReporter {
    backend: Backend,
    agent_id: String,
    /// Every this many heartbeats, all processes are reported with full properties.
    full_report_every: u64,
    processes: BTreeMap<ProcessKey, Reported>,
    heartbeats: u64,
    directory: ProcessDirectory,
}

impl ProcessReporter {
    pub fn new(
        backend: Backend,
        agent_id: String,
        full_report_every: u32,
        directory: ProcessDirectory,
    ) -> Self {
        Self {
            backend,
            agent_id,
            full_report_every: u64::from(full_report_every.max(1)),
            processes: BTreeMap::new(),
            heartbeats: 0,
            directory,
        }
    }

    /// A process to report from the next heartbeat on (replacing what its source found at
    /// `pid` before).
    pub fn added(&mut self, entity: ProcessEntity) {
        self.removed(entity.origin, entity.pid);
        self.processes.insert(
            (entity.pid, entity.origin),
            Reported {
                entity: Arc::new(entity),
                id: None,
                to_report: true,
            },
        );
        self.directory
            .found
            .store(self.processes.len(), Ordering::Relaxed);
    }

    /// A process `origin` found that exited (or no longer matches): no longer kept alive.
    pub fn removed(&mut self, origin: ProcessOrigin, pid: u32) {
        if let Some(Reported { id: Some(id), .. }) = self.processes.remove(&(pid, origin)) {
            self.directory.remove(&id);
        }
        self.directory
            .found
            .store(self.processes.len(), Ordering::Relaxed);
    }

    /// One heartbeat: reports what the OAP does not know (everything, every
    /// `properties_report_period` heartbeats and after lost contact), keeps the rest alive.
    pub async fn heartbeat(&mut self) -> Result<(), Error> {
        self.heartbeats += 1;
        // After any failed call (this one's or another module's) the OAP may have restarted.
        let full = self.backend.take_lost_contact()
            || (self.heartbeats - 1).is_multiple_of(self.full_report_every);
        self.exchange(full).await
    }

    async fn exchange(&mut self, full: bool) -> Result<(), Error> {
        let to_report: Vec<ProcessKey> = self
            .processes
            .iter()
            .filter(|(_, process)| full || process.to_report)
            .map(|(&key, _)| key)
            .collect();
        for chunk in to_report.chunks(REPORT_CHUNK) {
            self.report(chunk).await?;
        }
        let reported_now: BTreeSet<ProcessKey> = to_report.into_iter().collect();
        let alive: Vec<EbpfProcessPingPkg> = self
            .processes
            .iter()
            .filter(|(key, process)| process.id.is_some() && !reported_now.contains(key))
            .map(|(_, process)| EbpfProcessPingPkg {
                entity_metadata: Some(entity_metadata(&process.entity)),
                // The OAP merges properties: the one that gates profiling is enough here.
                properties: process
                    .entity
                    .properties
                    .iter()
                    .filter(|(key, _)| *key == SUPPORT_EBPF_PROFILING)
                    .map(|(key, value)| pair(key, value))
                    .collect(),
            })
            .collect();
        if !alive.is_empty() {
            let count = alive.len();
            let reply = self
                .backend
                .processes()
                .keep_alive(EbpfProcessPingPkgList {
                    processes: alive,
                    ebpf_agent_id: self.agent_id.clone(),
                })
                .await;
            self.backend.outcome("keepAlive", reply)?;
            debug!(processes = count, "kept processes alive");
        }
        Ok(())
    }

    async fn report(&mut self, keys: &[ProcessKey]) -> Result<(), Error> {
        let processes = keys
            .iter()
            .filter_map(|key| self.processes.get(key))
            .map(|process| {
                let entity = &process.entity;
                let (entity_meta, pid, properties) = (
                    Some(entity_metadata(entity)),
                    i32::try_from(entity.pid).unwrap_or(i32::MAX),
                    entity
                        .properties
                        .iter()
                        .map(|(key, value)| pair(key, value))
                        .collect(),
                );
                let metadata = match entity.origin {
                    ProcessOrigin::Host => {
                        ebpf_process_properties::Metadata::HostProcess(EbpfHostProcessMetadata {
                            entity: entity_meta,
                            pid,
                            properties,
                        })
                    }
                    ProcessOrigin::Kubernetes => ebpf_process_properties::Metadata::K8sProcess(
                        EbpfKubernetesProcessMetadata {
                            entity: entity_meta,
                            pid,
                            properties,
                        },
                    ),
                };
                EbpfProcessProperties {
                    metadata: Some(metadata),
                }
            })
            .collect();
        let reply = self
            .backend
            .processes()
            .report_processes(EbpfProcessReportList {
                processes,
                ebpf_agent_id: self.agent_id.clone(),
            })
            .await;
        let reply = self.backend.outcome("reportProcesses", reply)?.into_inner();
        let matched = self.match_reply(&reply);
        for key in keys {
            if let Some(process) = self.processes.get_mut(key) {
                process.to_report = !matched.contains(key);
            }
        }
        info!(
            reported = keys.len(),
            matched = matched.len(),
            "reported processes to the OAP"
        );
        Ok(())
    }

    /// Gives each local process the OAP id its reply names (matched by pid and entity); returns
    /// the processes matched.
    fn match_reply(&mut self, reply: &EbpfReportProcessDownstream) -> HashSet<ProcessKey> {
        let mut matched = HashSet::new();
        for downstream in &reply.processes {
            let (pid, entity) = match &downstream.process {
                Some(ebpf_process_downstream::Process::HostProcess(host)) => {
                    (host.pid, host.entity_metadata.as_ref())
                }
                Some(ebpf_process_downstream::Process::K8sProcess(k8s)) => {
                    (k8s.pid, k8s.entity_metadata.as_ref())
                }
                None => continue,
            };
            let (Ok(pid), Some(entity)) = (u32::try_from(pid), entity) else {
                continue;
            };
            if downstream.process_id.is_empty() {
                continue;
            }
            // By pid and entity, whichever source found it (the reply's kind is not trusted).
            let identity = identity(entity);
            let Some((&key, process)) = self
                .processes
                .range_mut((pid, ProcessOrigin::Host)..=(pid, ProcessOrigin::Kubernetes))
                .find(|(_, process)| process.entity.identity() == identity)
            else {
                continue;
            };
            let id: Arc<str> = Arc::from(downstream.process_id.as_str());
            if let Some(old) = process.id.replace(Arc::clone(&id)) {
                self.directory.remove(&old);
            }
            self.directory.set(id, Arc::clone(&process.entity));
            matched.insert(key);
        }
        matched
    }
}

fn entity_metadata(entity: &ProcessEntity) -> EbpfProcessEntityMetadata {
    EbpfProcessEntityMetadata {
        layer: entity.layer.clone(),
        service_name: entity.service_name.clone(),
        instance_name: entity.instance_name.clone(),
        process_name: entity.process_name.clone(),
        labels: entity.labels.clone(),
    }
}

fn identity(entity: &EbpfProcessEntityMetadata) -> EntityIdentity {
    EntityIdentity::new(
        &entity.layer,
        &entity.service_name,
        &entity.instance_name,
        &entity.process_name,
        &entity.labels,
    )
}

fn pair(key: &str, value: &str) -> KeyStringValuePair {
    KeyStringValuePair {
        key: key.to_owned(),
        value: value.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rover_proto::v3::{EbpfHostProcessDownstream, EbpfProcessDownstream};

    use super::*;
    use crate::config::{BackendAddr, BackendSettings};
    use crate::process::EntityNames;

    fn reporter(directory: ProcessDirectory) -> ProcessReporter {
        let settings = BackendSettings {
            addr: BackendAddr {
                host: "127.0.0.1".to_owned(),
                port: 1,
            },
            tls: None,
            check_period: Duration::from_secs(5),
            authentication: None,
        };
        let backend = Backend::new(&settings).expect("a lazy channel");
        ProcessReporter::new(backend, "agent".to_owned(), 10, directory)
    }

    fn entity(pid: u32, process_name: &str) -> ProcessEntity {
        ProcessEntity::host(
            pid,
            EntityNames {
                layer: "OS_LINUX".to_owned(),
                service_name: "svc".to_owned(),
                instance_name: "node".to_owned(),
                process_name: process_name.to_owned(),
                labels: vec!["b".to_owned(), "a".to_owned()],
            },
            None,
            "10.0.0.1".parse().expect("an address"),
            "app --serve",
            true,
        )
    }

    fn downstream(
        id: &str,
        pid: i32,
        process_name: &str,
        labels: &[&str],
    ) -> EbpfProcessDownstream {
        EbpfProcessDownstream {
            process_id: id.to_owned(),
            process: Some(ebpf_process_downstream::Process::HostProcess(
                EbpfHostProcessDownstream {
                    pid,
                    entity_metadata: Some(EbpfProcessEntityMetadata {
                        layer: "OS_LINUX".to_owned(),
                        service_name: "svc".to_owned(),
                        instance_name: "node".to_owned(),
                        process_name: process_name.to_owned(),
                        labels: labels.iter().map(|label| (*label).to_owned()).collect(),
                    }),
                },
            )),
        }
    }

    // A tokio runtime: the lazy channel's connector is spawned on it.
    #[tokio::test]
    async fn replies_match_by_pid_and_entity_whatever_the_label_order() {
        let directory = ProcessDirectory::default();
        let mut reporter = reporter(directory.clone());
        reporter.added(entity(10, "app"));
        reporter.added(entity(11, "worker"));
        let reply = EbpfReportProcessDownstream {
            processes: vec![
                downstream("id-10", 10, "app", &["a", "b"]),
                // Same pid, another entity: not ours.
                downstream("id-11", 11, "someone-else", &["a", "b"]),
                // A pid we never reported.
                downstream("id-12", 12, "app", &["a", "b"]),
            ],
        };
        let matched = reporter.match_reply(&reply);
        assert_eq!(matched, HashSet::from([(10, ProcessOrigin::Host)]));
        assert_eq!(directory.pid("id-10"), Some(10));
        assert_eq!(directory.pid("id-11"), None);
        assert_eq!(directory.pid("id-12"), None);
        let reported = directory.reported();
        assert_eq!(reported.len(), 1);
        assert_eq!(reported[0].0, "id-10");
        assert_eq!(*reported[0].1, entity(10, "app"));
        // An exited process leaves the directory: tasks can no longer name it.
        reporter.removed(ProcessOrigin::Host, 10);
        assert_eq!(directory.pid("id-10"), None);
        assert!(directory.reported().is_empty());
    }

    /// A pid a host rule and a pod both found: two entities, each matched to its own id and
    /// removed only by its own source.
    #[tokio::test]
    async fn a_process_found_by_both_sources_is_two_entities() {
        let directory = ProcessDirectory::default();
        let mut reporter = reporter(directory.clone());
        let host = entity(10, "app");
        let pod = ProcessEntity::kubernetes(
            10,
            EntityNames {
                layer: "K8S_SERVICE".to_owned(),
                service_name: "shop".to_owned(),
                instance_name: "shop-0".to_owned(),
                process_name: "app".to_owned(),
                labels: Vec::new(),
            },
            None,
            "10.0.0.1".parse().expect("an address"),
            crate::process::PodPlacement {
                pod_ip: "10.1.0.9",
                pod_name: "shop-0",
                container_name: "app",
            },
            "app --serve",
            true,
        );
        reporter.added(host.clone());
        reporter.added(pod.clone());
        assert_eq!(directory.counts().found, 2);
        let mut pod_reply = downstream("id-pod", 10, "app", &[]);
        if let Some(ebpf_process_downstream::Process::HostProcess(found)) = &mut pod_reply.process
            && let Some(meta) = &mut found.entity_metadata
        {
            meta.layer = "K8S_SERVICE".to_owned();
            meta.service_name = "shop".to_owned();
            meta.instance_name = "shop-0".to_owned();
        }
        let reply = EbpfReportProcessDownstream {
            processes: vec![downstream("id-host", 10, "app", &["a", "b"]), pod_reply],
        };
        assert_eq!(
            reporter.match_reply(&reply),
            HashSet::from([(10, ProcessOrigin::Host), (10, ProcessOrigin::Kubernetes)])
        );
        let mut reported = directory.reported();
        reported.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(reported.len(), 2);
        assert_eq!(
            (reported[0].0.as_str(), &*reported[0].1),
            ("id-host", &host)
        );
        assert_eq!((reported[1].0.as_str(), &*reported[1].1), ("id-pod", &pod));
        // The pod went away; the host rule still matches.
        reporter.removed(ProcessOrigin::Kubernetes, 10);
        assert_eq!(directory.pid("id-pod"), None);
        assert_eq!(directory.pid("id-host"), Some(10));
        assert_eq!(directory.counts().found, 1);
    }
}
