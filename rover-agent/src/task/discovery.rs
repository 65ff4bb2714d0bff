//! The node agent's process discovery: host rules and the pods on this node, scanned every
//! period (and at once when the pods change), their changes handed to the process reporter,
//! which reports and keeps alive every heartbeat.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Agent;
use crate::backend::{Backoff, ProcessReporter};
use crate::bpf::{ProcessChanges, TaskList};
use crate::heap::release_freed_memory;
use crate::process::kubernetes::{ApiServer, KubernetesDiscovery, PodWatch};
use crate::process::{HostRuleScanner, ProcessEntity, ProcessOrigin, ScanChanges};

/// How often processes are scanned when no host rules give a period.
pub const DEFAULT_SCAN_PERIOD: Duration = Duration::from_secs(3);
/// The pods' processes are looked at this long after a change of the pods (with the changes
/// meanwhile).
const POD_CHANGE_DELAY: Duration = Duration::from_millis(300);
/// Retries after a failed heartbeat start here and double up to the heartbeat period.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// This many processes added and reported make the heartbeat give freed heap back.
const MANY_ADDED: usize = 256;
/// The pods' processes are first named once both pods and Services were listed (a name may
/// come from a pod's Service): at most this long after the watch started, then without the
/// watchers not done (a ClusterRole without `services` would hold them forever).
const FIRST_LISTING_WAIT: Duration = Duration::from_secs(30);

/// What finds this node's processes, as configured (validated, not started).
pub struct NodeSources {
    pub host_rules: Option<HostRuleScanner>,
    pub kubernetes: Option<KubernetesSource>,
}

/// `process_discovery.kubernetes`, ready to start.
pub struct KubernetesSource {
    pub discovery: KubernetesDiscovery,
    pub node_name: String,
    pub namespaces: Vec<String>,
}

/// The sources running: the pods watched, and the kernel's marks of execs and exits when it can
/// give them, so that a scan reads only the processes that changed.
pub struct ProcessSources {
    host_rules: Option<HostRuleScanner>,
    kubernetes: Option<(KubernetesDiscovery, PodWatch)>,
    changes: Option<ProcessChanges>,
    /// The kernel's marks taken by pod passes since the last scan, for the scan to read too
    /// (the host rules have not seen them); `None` when one pass could not tell.
    marked_since_scan: Option<HashSet<u32>>,
    /// Whether the pods' processes were scanned once (see [`FIRST_LISTING_WAIT`]).
    kubernetes_scanned: bool,
    /// Whether a scan of every source ran.
    scanned: bool,
    kubernetes_started: std::time::Instant,
}

impl ProcessSources {
    /// Starts the pod watch (it retries by itself while the API server is unreachable). Fails
    /// only when there is no API server to talk to at all.
    pub async fn start(sources: NodeSources, agent: &Agent) -> anyhow::Result<Self> {
        let kubernetes = match sources.kubernetes {
            Some(mut source) => {
                // Loading parses the kernel's BTF: off the async threads.
                match tokio::task::spawn_blocking(TaskList::load).await {
                    Ok(Ok(list)) => {
                        source.discovery.list_processes_with(Box::new(list));
                        info!(
                            "full process scans list processes through the kernel's task iterator"
                        );
                    }
                    Ok(Err(error)) => info!(
                        "full process scans read each process's files: the kernel's task \
                         iterator is not available: {:#}",
                        anyhow::Error::from(error)
                    ),
                    Err(error) => warn!("loading the task iterator: {error}"),
                }
                let server = ApiServer::infer()
                    .await
                    .context("process_discovery.kubernetes.active")?;
                let watch = PodWatch::start(&server, &source.node_name, &source.namespaces)
                    .context("process_discovery.kubernetes")?;
                info!(
                    api_server = server.url(),
                    node = source.node_name,
                    "watching the pods of this node"
                );
                Some((source.discovery, watch))
            }
            None => None,
        };
        let changes = if sources.host_rules.is_some() || kubernetes.is_some() {
            agent
                .track_process_changes()
                .await
                .inspect_err(|error| {
                    info!(
                        "each process scan reads every process, as the kernel cannot tell \
                         which changed: {error:#}"
                    );
                })
                .ok()
        } else {
            None
        };
        Ok(Self {
            host_rules: sources.host_rules,
            kubernetes,
            changes,
            marked_since_scan: Some(HashSet::new()),
            kubernetes_scanned: false,
            scanned: false,
            kubernetes_started: std::time::Instant::now(),
        })
    }

    fn is_empty(&self) -> bool {
        self.host_rules.is_none() && self.kubernetes.is_none()
    }

    /// Whether discovery has found what there is: a scan ran, after the first listing of pods
    /// and Services when watching them (a ClusterRole without `services` keeps it false).
    fn synced(&self) -> bool {
        self.scanned
            && self
                .kubernetes
                .as_ref()
                .is_none_or(|(_, watch)| watch.is_ready())
    }

    /// Bumped when the watched pods or Services change.
    fn pod_changes(&self) -> Option<watch::Receiver<u64>> {
        self.kubernetes.as_ref().map(|(_, watch)| watch.changes())
    }

    /// One scan of every source. Blocking.
    fn scan(&mut self) -> SourceChanges {
        let marked_before = self.marked_since_scan.replace(HashSet::new());
        let changed = self
            .changed()
            .zip(marked_before)
            .map(|(mut changed, before)| {
                changed.extend(before);
                changed
            });
        let mut all = SourceChanges::default();
        if let Some(scanner) = &mut self.host_rules {
            match scanner.scan(changed.as_ref()) {
                Ok(changes) => all.merge(ProcessOrigin::Host, changes),
                Err(error) => warn!("scanning host processes: {error}"),
            }
        }
        if self.may_name_pods()
            && let Some((discovery, watch)) = &mut self.kubernetes
        {
            // The first scan reads every process: marks before it say nothing of them.
            let changed = changed.as_ref().filter(|_| self.kubernetes_scanned);
            match discovery.scan(&watch.snapshot(), changed) {
                Ok(changes) => all.merge(ProcessOrigin::Kubernetes, changes),
                Err(error) => warn!("scanning the processes of pods: {error}"),
            }
            self.kubernetes_scanned = true;
        }
        self.scanned = true;
        all
    }

    /// Whether the pods' processes may be named: after the first listing of pods and Services
    /// (names depend on both: named before the Services are known, a pod's processes would be
    /// reported under another service, then renamed), or once [`FIRST_LISTING_WAIT`] passed.
    fn may_name_pods(&mut self) -> bool {
        let Some((_, watch)) = &self.kubernetes else {
            return false;
        };
        if self.kubernetes_scanned || watch.is_ready() {
            return true;
        }
        if self.kubernetes_started.elapsed() < FIRST_LISTING_WAIT {
            debug!("the pods' processes wait for the first listing of pods and Services");
            return false;
        }
        warn!(
            "pods and Services are not both listed {}s after the watch started: the pods' \
             processes are named with what is known (the ClusterRole needs get, list and watch \
             on pods and services)",
            FIRST_LISTING_WAIT.as_secs()
        );
        true
    }

    /// After the pods or Services changed: the changes of the pods' processes, without a pass
    /// over `/proc`. Blocking. The processes the kernel marked meanwhile are read first (a new pod's processes exec'd
    /// just before its containers' ids came): the marks are kept for the next scan.
    fn pods_changed(&mut self) -> SourceChanges {
        if !self.kubernetes_scanned {
            // The first naming of the pods' processes is a scan (none is known yet).
            return if self.may_name_pods() {
                self.scan()
            } else {
                SourceChanges::default()
            };
        }
        let changed = self.changed();
        let Some((discovery, watch)) = &mut self.kubernetes else {
            return SourceChanges::default();
        };
        if let Some(changed) = &changed {
            discovery.read_marked(changed);
        }
        match (&mut self.marked_since_scan, changed) {
            (Some(marked), Some(changed)) => marked.extend(changed),
            (marked, _) => *marked = None,
        }
        let mut all = SourceChanges::default();
        all.merge(
            ProcessOrigin::Kubernetes,
            discovery.pods_changed(&watch.snapshot()),
        );
        all
    }

    /// The processes the kernel marked since the last scan; `None` when it cannot tell.
    fn changed(&mut self) -> Option<HashSet<u32>> {
        match self.changes.as_mut().map(ProcessChanges::take) {
            Some(Ok(changed)) if !changed.overflowed => Some(changed.pids),
            Some(Ok(_)) => {
                debug!("more processes changed than the kernel could mark: reading every one");
                None
            }
            Some(Err(error)) => {
                warn!("process changes unreadable, each scan reads every process now: {error}");
                self.changes = None;
                None
            }
            None => None,
        }
    }
}

/// Both sources' changes. A process matching a host rule and in a pod is found by each, and
/// reported by each as its own entity (as Rover does); each source removes only its own.
#[derive(Default)]
struct SourceChanges {
    added: Vec<ProcessEntity>,
    removed: Vec<(ProcessOrigin, u32)>,
}

impl SourceChanges {
    fn merge(&mut self, origin: ProcessOrigin, changes: ScanChanges) {
        self.removed
            .extend(changes.removed.into_iter().map(|pid| (origin, pid)));
        self.added.extend(changes.added);
    }
}

/// What the discovery loop asks of the sources.
#[derive(Clone, Copy)]
enum Pass {
    /// Every source, reading `/proc`.
    Scan,
    /// The pods' processes only, after the pods changed.
    PodsChanged,
}

/// Runs one pass and hands its changes to the reporter. Returns the sources (`None` once a pass
/// panicked) and how many processes were added.
async fn run_pass(
    sources: ProcessSources,
    pass: Pass,
    reporter: &mut ProcessReporter,
) -> (Option<ProcessSources>, usize) {
    let done = tokio::task::spawn_blocking(move || {
        let mut sources = sources;
        let changes = match pass {
            Pass::Scan => sources.scan(),
            Pass::PodsChanged => sources.pods_changed(),
        };
        (sources, changes)
    })
    .await;
    let (sources, changes) = match done {
        Ok(done) => done,
        Err(error) => {
            warn!("the process scan panicked: {error}; discovery is off");
            return (None, 0);
        }
    };
    if !changes.added.is_empty() || !changes.removed.is_empty() {
        debug!(
            added = changes.added.len(),
            removed = changes.removed.len(),
            "processes changed"
        );
    }
    // A pid in both lists was replaced (reused, exec, renamed).
    for (origin, pid) in changes.removed {
        reporter.removed(origin, pid);
    }
    let added = changes.added.len();
    for entity in changes.added {
        reporter.added(entity);
    }
    (Some(sources), added)
}

/// Scans processes every `scan_period` (and the pods' processes soon after the pods change) and
/// heartbeats every `heartbeat`; a failed heartbeat is retried sooner, with backoff. Sets
/// `synced` once discovery has found what there is (see `ProcessSources::synced`).
pub async fn discover_and_report(
    mut reporter: ProcessReporter,
    sources: ProcessSources,
    scan_period: Duration,
    heartbeat: Duration,
    synced: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pod_changes = sources.pod_changes();
    let mut sources = (!sources.is_empty()).then_some(sources);
    if sources.is_none() {
        // Nothing to find.
        synced.store(true, Ordering::Relaxed);
    }
    let mut next_scan = tokio::time::Instant::now();
    let mut pods_changed: Option<tokio::time::Instant> = None;
    let mut next_heartbeat = tokio::time::Instant::now();
    let mut backoff = Backoff::new(FIRST_RETRY, heartbeat);
    let mut failing = false;
    // Processes added since the last heartbeat: many (the first scan of a busy node) leave
    // megabytes of freed heap behind them once reported.
    let mut added_since_heartbeat = 0;
    loop {
        // The time first: taking the sources when no pass is due would drop them.
        let now = tokio::time::Instant::now();
        let pass = if now >= next_scan {
            Some(Pass::Scan)
        } else if pods_changed.is_some_and(|due| now >= due) {
            Some(Pass::PodsChanged)
        } else {
            None
        };
        if let Some(pass) = pass
            && let Some(owned) = sources.take()
        {
            let added;
            (sources, added) = run_pass(owned, pass, &mut reporter).await;
            added_since_heartbeat += added;
            if sources.as_ref().is_some_and(ProcessSources::synced) {
                synced.store(true, Ordering::Relaxed);
            }
            // A scan covers the pods' changes too.
            pods_changed = None;
            if matches!(pass, Pass::Scan) {
                next_scan = tokio::time::Instant::now() + scan_period;
            }
        }
        if tokio::time::Instant::now() >= next_heartbeat {
            match reporter.heartbeat().await {
                Ok(()) => {
                    if failing {
                        info!("the OAP answers again");
                    }
                    failing = false;
                    backoff.succeeded();
                    next_heartbeat = tokio::time::Instant::now() + heartbeat;
                    if added_since_heartbeat >= MANY_ADDED {
                        release_freed_memory();
                    }
                    added_since_heartbeat = 0;
                }
                Err(error) => {
                    if !failing {
                        warn!("{error}; retrying with backoff");
                    }
                    failing = true;
                    next_heartbeat = tokio::time::Instant::now() + backoff.failed();
                }
            }
        }
        let wake = if sources.is_some() {
            pods_changed
                .map_or(next_scan, |due| due.min(next_scan))
                .min(next_heartbeat)
        } else {
            next_heartbeat
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            changed = async {
                match &mut pod_changes {
                    Some(changes) => changes.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                match changed {
                    // Soon (a burst of pod events makes one pass): new pods' processes are
                    // reported at the next heartbeat.
                    Ok(()) => {
                        pods_changed.get_or_insert(tokio::time::Instant::now() + POD_CHANGE_DELAY);
                    }
                    Err(_) => pod_changes = None,
                }
            }
            _ = stop.changed() => return,
        }
    }
}
