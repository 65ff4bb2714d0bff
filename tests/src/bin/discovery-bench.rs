//! Kubernetes discovery's costs, for `cargo xtask bench discovery`. Prints one `key=value`
//! result line per measurement on stdout for the bench to read (progress goes to stderr);
//! targets are the bench's business, never asserted here. Needs root (it makes cgroups) and,
//! for `agent`, what `rover-agent run` needs.
//!
//! The node: PODS pods `bench/bench-N` (one container `app`, containerd with the systemd cgroup
//! driver), PER_CONTAINER `sleep` processes in each container's real cgroup, and one Service per
//! ten pods, so every pod is behind a Service (the K8S_SERVICE analyzer, the one with a Service
//! lookup). Analyzers: those shipped in `configs/rover.yaml`.
//!
//! - `discovery-bench scan [--pods 200] [--per-container 10] [--iterations 20]`: the library's
//!   `KubernetesDiscovery::scan` with every process read (`changed: None`), listed through the
//!   task iterator as the agent does: a cold scan (a new discovery: every process new, its
//!   cgroup and command line read, names rendered), a warm one (nothing changed since the
//!   previous scan: every process listed, none read), the periodic scan
//!   when the kernel marks exec/exit and none happened (`changed: Some(empty)`), and the pass
//!   after one pod changed (`pods_changed`, as the agent runs it on a watch event). Checks that
//!   every process is found. Prints `scan ...` with medians and maxima.
//! - `discovery-bench agent --agent PATH [...]`: `rover-agent run` with Kubernetes discovery,
//!   the fake OAP here and the fake API server in a child process (`discovery-bench fake-kube`),
//!   so that serving the events costs the agent's side nothing. RSS once the agent is up with
//!   no pod, then once all processes of all pods are reported; the agent's CPU (its cgroup's
//!   `cpu.stat`) while one pod after another is modified, minus its CPU over as long without events:
//!   isolated events (each scanned on its own) and a burst (scans coalesce). Prints `agent ...`.
//! - `discovery-bench fake-kube --kubeconfig PATH [--pods 200]`: the fake API server with the
//!   node's Services and pods (applied on `apply`), driven by lines on stdin (see [`fake_kube`]).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use integration_tests::cgroups::{CgroupLayout, TestCgroups};
use integration_tests::cpu_time::own_cpu;
use integration_tests::fake_kube::{self, FakeKube, Kind, RecordedRequest, hex64};
use integration_tests::fake_oap::{FakeOap, Recorded};
use integration_tests::node_agent::{KubernetesConfig, NodeAgent, NodeConfig};
use k8s_openapi::api::core::v1::{Pod, Service};
use rover_agent::bpf::TaskList;
use rover_agent::config::Settings;
use rover_agent::process::HostFacts;
use rover_agent::process::kubernetes::analyzer::Analyzers;
use rover_agent::process::kubernetes::{ClusterSnapshot, KubernetesDiscovery};
use rover_proto::v3::ebpf_process_properties;

const NAMESPACE: &str = "bench";
const NODE: &str = "bench-node";
/// Pods per Service.
const PODS_PER_SERVICE: usize = 10;

#[derive(Parser)]
#[command(about = "Kubernetes discovery's costs (cargo xtask bench discovery)")]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Full scans through the library API.
    Scan {
        #[arg(long, default_value_t = 200)]
        pods: usize,
        #[arg(long, default_value_t = 10)]
        per_container: usize,
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// `rover-agent run`: RSS growth and CPU per watch event.
    Agent {
        /// The release `rover-agent` binary.
        #[arg(long)]
        agent: PathBuf,
        #[arg(long, default_value_t = 200)]
        pods: usize,
        #[arg(long, default_value_t = 10)]
        per_container: usize,
        /// Isolated events: one pod modified every 400 ms (the agent scans 300 ms after a
        /// change, so each is scanned on its own).
        #[arg(long, default_value_t = 100)]
        isolated_events: usize,
        /// Then a burst, one every 10 ms.
        #[arg(long, default_value_t = 1000)]
        burst_events: usize,
    },
    /// The fake API server, in a process of its own.
    FakeKube {
        #[arg(long)]
        kubeconfig: PathBuf,
        #[arg(long, default_value_t = 200)]
        pods: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Mode::Scan {
            pods,
            per_container,
            iterations,
        } => scan(pods, per_container, iterations),
        Mode::Agent {
            agent,
            pods,
            per_container,
            isolated_events,
            burst_events,
        } => agent_costs(&agent, pods, per_container, isolated_events, burst_events),
        Mode::FakeKube { kubeconfig, pods } => fake_kube(&kubeconfig, pods),
    }
}

// ---------------------------------------------------------------------------------------------
// The node.

fn pod_name(index: usize) -> String {
    format!("bench-{index}")
}

fn service_name(index: usize) -> String {
    format!("svc-{}", index / PODS_PER_SERVICE)
}

/// Pod `index`: its Service's label, its own IP; the fixture's one container `app`, whose id
/// is `hex64("bench/bench-N/app")`.
fn pod(index: usize) -> Pod {
    let service = service_name(index);
    let mut pod = fake_kube::pod(NAMESPACE, &pod_name(index), NODE, &[("app", &service)]);
    if let Some(status) = pod.status.as_mut() {
        let ip = format!("10.244.{}.{}", index / 250, index % 250 + 1);
        status.pod_ip = Some(ip.clone());
        if let Some(ips) = status.pod_ips.as_mut() {
            ips[0].ip = ip;
        }
    }
    pod
}

fn container_id(index: usize) -> String {
    hex64(&format!("{NAMESPACE}/{}/app", pod_name(index)))
}

fn services(pods: usize) -> Vec<Service> {
    (0..pods.div_ceil(PODS_PER_SERVICE))
        .map(|index| {
            let name = service_name(index * PODS_PER_SERVICE);
            fake_kube::service(NAMESPACE, &name, &[("app", &name)])
        })
        .collect()
}

/// `per_container` sleeping processes in the cgroup of each pod's container.
fn start_processes(
    cgroups: &mut TestCgroups,
    pods: usize,
    per_container: usize,
) -> anyhow::Result<HashSet<u32>> {
    let started = Instant::now();
    let mut pids = HashSet::with_capacity(pods * per_container);
    for index in 0..pods {
        let cgroup = cgroups.container(
            CgroupLayout::ContainerdSystemd,
            &fake_kube::pod_uid(NAMESPACE, &pod_name(index)),
            &container_id(index),
        )?;
        for _ in 0..per_container {
            pids.insert(cgroups.spawn(&cgroup, Command::new("sleep").arg("3600"))?);
        }
    }
    eprintln!(
        "discovery-bench: {} processes in {pods} containers' cgroups, started in {:.1} s",
        pids.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(pids)
}

// ---------------------------------------------------------------------------------------------
// Scans through the library.

/// The shipped analyzers, as the agent reads them from `configs/rover.yaml`.
fn shipped_analyzers() -> anyhow::Result<Analyzers> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/rover.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let settings = Settings::parse(&text, &|_| None)
        .with_context(|| format!("parsing {}", path.display()))?
        .settings;
    Ok(Analyzers::new(&settings.discovery.kubernetes.analyzers)?)
}

fn new_discovery() -> anyhow::Result<KubernetesDiscovery> {
    let facts = HostFacts::detect(None, None, "discovery-bench".to_owned())?;
    let mut discovery = KubernetesDiscovery::new(shipped_analyzers()?, facts, "/proc");
    // As the agent does: full scans list processes through the kernel's task iterator.
    discovery.list_processes_with(Box::new(
        TaskList::load().context("loading the task iterator")?,
    ));
    Ok(discovery)
}

fn snapshot(pods: &[Pod], services: &[Service]) -> ClusterSnapshot {
    let mut snapshot = ClusterSnapshot {
        pods: pods.iter().cloned().map(Arc::new).collect(),
        services: services.iter().cloned().map(Arc::new).collect(),
    };
    // As the watch hands it out: by namespace, then name.
    let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        (meta.namespace.clone(), meta.name.clone())
    };
    snapshot.pods.sort_by_key(|pod| key(&pod.metadata));
    snapshot
        .services
        .sort_by_key(|service| key(&service.metadata));
    snapshot
}

/// `pod` after one more change (an annotation), at resource version `1000 + generation`.
fn modified(pod: &Pod, generation: usize) -> Pod {
    let mut pod = pod.clone();
    pod.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert("bench/generation".to_owned(), generation.to_string());
    pod.metadata.resource_version = Some(format!("{}", 1000 + generation));
    pod
}

fn scan(pods: usize, per_container: usize, iterations: usize) -> anyhow::Result<()> {
    ensure!(iterations > 0, "--iterations must be at least 1");
    let mut cgroups = TestCgroups::create()?;
    let pids = start_processes(&mut cgroups, pods, per_container)?;
    // As the API server gives them: with a UID and a resource version.
    let mut pod_objects: Vec<Pod> = (0..pods).map(pod).collect();
    for (index, pod) in pod_objects.iter_mut().enumerate() {
        pod.metadata.uid = Some(fake_kube::pod_uid(NAMESPACE, &pod_name(index)));
        pod.metadata.resource_version = Some("1".to_owned());
    }
    let services = services(pods);
    let snapshot = snapshot(&pod_objects, &services);
    let processes_on_host = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .count();

    let check_found = |added: &[rover_agent::process::ProcessEntity]| -> anyhow::Result<()> {
        let found: HashSet<u32> = added.iter().map(|entity| entity.pid).collect();
        ensure!(
            found == pids,
            "a scan found {} processes of pods, {} of them ours; expected {}",
            found.len(),
            found.intersection(&pids).count(),
            pids.len()
        );
        Ok(())
    };

    // What a discovery keeps of the processes: its RSS, measured first, before scans freed
    // memory the allocator would reuse.
    let rss_before_kib = own_rss_kib()?;
    let mut discovery = new_discovery()?;
    check_found(&discovery.scan(&snapshot, None)?.added)?;
    let rss_growth_kib = own_rss_kib()?.saturating_sub(rss_before_kib);
    // Cold: a new discovery each time, every process new to it.
    let mut cold = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let mut discovery = new_discovery()?;
        let started = Instant::now();
        let changes = discovery.scan(&snapshot, None)?;
        cold.push(started.elapsed());
        check_found(&changes.added)?;
    }
    // Warm: the first discovery again, nothing changed.
    let mut warm = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let changes = discovery.scan(&snapshot, None)?;
        warm.push(started.elapsed());
        ensure!(
            changes.added.is_empty() && changes.removed.is_empty(),
            "a scan without changes changed {} / {}",
            changes.added.len(),
            changes.removed.len()
        );
    }
    // The periodic scan when the kernel marks execs and exits and none happened.
    let no_process_changed = HashSet::new();
    let mut marked = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let changes = discovery.scan(&snapshot, Some(&no_process_changed))?;
        marked.push(started.elapsed());
        ensure!(
            changes.added.is_empty() && changes.removed.is_empty(),
            "a scan without changes changed {} / {}",
            changes.added.len(),
            changes.removed.len()
        );
    }
    // One pod changed, as the agent handles a watch event: that pod's processes' names are
    // rendered again, no process is read.
    let mut event = Vec::with_capacity(iterations);
    let mut event_cpu = Duration::ZERO;
    let mut current = snapshot;
    for generation in 0..iterations {
        let index = generation % pods;
        current = snapshot_of(&current, &modified(&pod_objects[index], generation));
        let cpu_before = own_cpu();
        let started = Instant::now();
        let changes = discovery.pods_changed(&current);
        event.push(started.elapsed());
        event_cpu += own_cpu().saturating_sub(cpu_before);
        ensure!(
            changes.removed.is_empty(),
            "an annotation removed processes: {:?}",
            changes.removed
        );
    }
    drop(cgroups);

    let stats = |mut times: Vec<Duration>| {
        times.sort_unstable();
        (
            ms(times[times.len() / 2]),
            ms(times.last().copied().unwrap_or_default()),
        )
    };
    let (cold_median, cold_max) = stats(cold);
    let (warm_median, warm_max) = stats(warm);
    let (marked_median, marked_max) = stats(marked);
    let (event_median, event_max) = stats(event);
    println!(
        "scan processes={} pods={pods} services={} processes_on_host={processes_on_host} \
         iterations={iterations} cold_median_ms={cold_median:.2} cold_max_ms={cold_max:.2} \
         warm_median_ms={warm_median:.2} warm_max_ms={warm_max:.2} \
         marked_median_ms={marked_median:.3} marked_max_ms={marked_max:.3} \
         event_median_ms={event_median:.3} event_max_ms={event_max:.3} \
         event_cpu_mean_ms={:.3} library_rss_growth_kib={rss_growth_kib}",
        pids.len(),
        services.len(),
        ms(event_cpu) / iterations as f64,
    );
    Ok(())
}

/// `snapshot` with `pod` in place of the pod of the same name.
fn snapshot_of(snapshot: &ClusterSnapshot, pod: &Pod) -> ClusterSnapshot {
    let mut changed = snapshot.clone();
    for slot in &mut changed.pods {
        if slot.metadata.name == pod.metadata.name {
            *slot = Arc::new(pod.clone());
        }
    }
    changed
}

// ---------------------------------------------------------------------------------------------
// rover-agent run.

/// The fake API server in a child process, driven by lines.
struct FakeKubeProcess {
    child: std::process::Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl FakeKubeProcess {
    fn start(kubeconfig: &Path, pods: usize) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("fake-kube")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--pods", &pods.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting discovery-bench fake-kube")?;
        let stdin = child.stdin.take().context("fake-kube stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("fake-kube stdout")?);
        let mut fake = Self {
            child,
            stdin,
            stdout,
        };
        fake.answer("ready")?;
        Ok(fake)
    }

    /// Sends `command`, returns the answer's line (which starts with `ok`).
    fn ask(&mut self, command: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.answer("ok")
    }

    fn answer(&mut self, expected: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(
            line.starts_with(expected),
            "fake-kube answered {line:?}, not {expected}"
        );
        Ok(line.trim().to_owned())
    }
}

impl Drop for FakeKubeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child's side: `ready` once listening; then per line on stdin: `watched` (waits for the
/// agent's pod and Service watches), `apply` (the Services and pods), `modify N INTERVAL_MS`
/// (N modifications of one pod after another, paced); each answered `ok ...` when done.
fn fake_kube(kubeconfig: &Path, pods: usize) -> anyhow::Result<()> {
    let fake = FakeKube::start()?;
    std::fs::write(kubeconfig, fake.kubeconfig())
        .with_context(|| format!("writing {}", kubeconfig.display()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let pod_objects: Vec<Pod> = (0..pods).map(pod).collect();
    let mut generation = 0;
    println!("ready {}", fake.addr());
    std::io::stdout().flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["watched"] => {
                let watched = |requests: &[RecordedRequest], kind: Kind| {
                    requests
                        .iter()
                        .any(|request| request.watch && request.kind == kind)
                };
                runtime
                    .block_on(fake.wait_for_requests(
                        |requests| {
                            watched(requests, Kind::Pods) && watched(requests, Kind::Services)
                        },
                        Duration::from_secs(60),
                    ))
                    .map_err(anyhow::Error::msg)?;
                println!("ok");
            }
            ["apply"] => {
                for service in services(pods) {
                    fake.apply_service(service);
                }
                for pod in &pod_objects {
                    fake.apply_pod(pod.clone());
                }
                println!("ok");
            }
            ["modify", count, interval_ms] => {
                let count: usize = count.parse()?;
                let interval = Duration::from_millis(interval_ms.parse()?);
                let started = Instant::now();
                for event in 0..count {
                    // Paced from the start, so that slow applies do not stretch the run.
                    let due = started + interval * u32::try_from(event)?;
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    generation += 1;
                    let index = generation % pods;
                    fake.apply_pod(modified(&pod_objects[index], generation));
                }
                println!("ok elapsed_ms={}", started.elapsed().as_millis());
            }
            _ => bail!("fake-kube: unknown command {line:?}"),
        }
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// This process's resident memory (`VmRSS`).
fn own_rss_kib() -> anyhow::Result<u64> {
    Ok(sample(std::process::id())?.rss_kib)
}

/// What `/proc/PID` says of the agent.
#[derive(Clone, Copy, Debug)]
struct AgentSample {
    rss_kib: u64,
    peak_rss_kib: u64,
}

fn sample(pid: u32) -> anyhow::Result<AgentSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kib = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches(" kB").parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(AgentSample {
        rss_kib: kib("VmRSS:"),
        peak_rss_kib: kib("VmHWM:"),
    })
}

/// The pids reported as k8s processes so far.
fn k8s_pids(recorded: &Recorded) -> HashSet<u32> {
    recorded
        .process_reports
        .iter()
        .flat_map(|report| &report.processes)
        .filter_map(|process| match &process.metadata {
            Some(ebpf_process_properties::Metadata::K8sProcess(k8s)) => u32::try_from(k8s.pid).ok(),
            _ => None,
        })
        .collect()
}

/// The agent's cgroup (made below the test cgroups' root), for its CPU time to the
/// microsecond, threads that ended included (`/proc/PID/stat` counts 10 ms ticks, coarser than
/// one pod event's cost). Removed on drop, after the agent ended.
struct AgentCgroup(PathBuf);

impl AgentCgroup {
    fn create(cgroups: &TestCgroups) -> anyhow::Result<Self> {
        let dir = cgroups.root().join("agent");
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn enter(&self, pid: u32) -> anyhow::Result<()> {
        let procs = self.0.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving the agent into {}", self.0.display()))
    }

    /// CPU time of everything in the cgroup (`cpu.stat`'s `usage_usec`).
    fn cpu(&self) -> anyhow::Result<Duration> {
        let path = self.0.join("cpu.stat");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let usec = text
            .lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|value| value.trim().parse().ok())
            .with_context(|| format!("no usage_usec in {}", path.display()))?;
        Ok(Duration::from_micros(usec))
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        // The agent was killed just before: it leaves the cgroup as it exits.
        for _ in 0..200 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("discovery-bench: could not remove {}", self.0.display());
    }
}

/// The agent's heartbeat (set below) and its process scan period (3 s) both divide this.
const PERIODIC_CYCLE: Duration = Duration::from_secs(15);

/// The agent's CPU while `fake` makes `count` modifications `interval` apart, minus its CPU
/// over as long without any (the mean of such windows before and after); and the two figures.
fn event_cost(
    agent: &mut NodeAgent,
    cpu: &AgentCgroup,
    fake: &mut FakeKubeProcess,
    count: usize,
    interval: Duration,
) -> anyhow::Result<(Duration, Duration, Duration)> {
    // The last event's scan comes 300 ms after it: a second more for both windows; then up to
    // whole cycles of the periodic work, so that both windows hold as many heartbeats and scans.
    let needed = interval * u32::try_from(count)? + Duration::from_secs(1);
    let cycles = needed.as_secs_f64() / PERIODIC_CYCLE.as_secs_f64();
    let window = PERIODIC_CYCLE * (cycles.ceil() as u32);
    let idle_window = || -> anyhow::Result<Duration> {
        let before = cpu.cpu()?;
        std::thread::sleep(window);
        Ok(cpu.cpu()?.saturating_sub(before))
    };
    let idle_before = idle_window()?;
    let before = cpu.cpu()?;
    let started = Instant::now();
    fake.ask(&format!("modify {count} {}", interval.as_millis()))?;
    std::thread::sleep(window.saturating_sub(started.elapsed()));
    let busy = cpu.cpu()?.saturating_sub(before);
    // Idle before and after: what drifts over the run (caches, the allocator) cancels out.
    let idle = (idle_before + idle_window()?) / 2;
    ensure!(
        agent.exited().is_none(),
        "the agent exited during the events"
    );
    Ok((
        busy.saturating_sub(idle) / u32::try_from(count)?,
        busy,
        idle,
    ))
}

fn agent_costs(
    agent_binary: &Path,
    pods: usize,
    per_container: usize,
    isolated_events: usize,
    burst_events: usize,
) -> anyhow::Result<()> {
    ensure!(
        isolated_events > 0 && burst_events > 0,
        "the event counts must be at least 1"
    );
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    let mut fake_kube = FakeKubeProcess::start(&kubeconfig, pods)?;
    let oap = FakeOap::start()?;
    let mut config = NodeConfig::new(&oap, Vec::new());
    // Rover's default periods but the heartbeat, 5 s instead of 20 s for a shorter bench, and
    // the full re-report of every process (every 10th heartbeat in Rover's config): periodic
    // work of the node, not of pod events, which would land in one of the two windows
    // `event_cost` compares (45 s each) and not in the other.
    config.heartbeat_period = "5s".to_owned();
    config.properties_report_period = 1000;
    config.check_interval = "10s".to_owned();
    config.flush_interval = "5s".to_owned();
    config.dump_period = "9ms".to_owned();
    config.log_level = "warn".to_owned();
    config.kubernetes = Some(KubernetesConfig::new(NODE, &kubeconfig));
    let mut cgroups = TestCgroups::create()?;
    let agent_cgroup = AgentCgroup::create(&cgroups)?;
    let mut agent = NodeAgent::start_with(agent_binary, &config, &[]);
    agent_cgroup.enter(agent.pid())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let failed = |agent: &NodeAgent, what: &str| anyhow::anyhow!("{what}\n{}", agent.context(&oap));

    // Up, watching, no pod: the baseline.
    fake_kube
        .ask("watched")
        .map_err(|error| failed(&agent, &format!("{error:#}")))?;
    runtime
        .block_on(oap.wait_for(
            |recorded| !recorded.task_queries.is_empty(),
            Duration::from_secs(60),
        ))
        .map_err(|error| failed(&agent, &error.to_string()))?;
    std::thread::sleep(Duration::from_secs(5));
    let before = sample(agent.pid())?;
    eprintln!(
        "discovery-bench: agent {} up with no pod, RSS {} KiB",
        agent.pid(),
        before.rss_kib
    );

    // Every process of every pod reported.
    let pids = start_processes(&mut cgroups, pods, per_container)?;
    let applied = Instant::now();
    fake_kube.ask("apply")?;
    runtime
        .block_on(oap.wait_for(
            |recorded| k8s_pids(recorded).is_superset(&pids),
            Duration::from_secs(120),
        ))
        .map_err(|error| {
            failed(
                &agent,
                &format!(
                    "{error} ({} of {} processes reported)",
                    k8s_pids(&oap.recorded()).intersection(&pids).count(),
                    pids.len()
                ),
            )
        })?;
    let reported_after = applied.elapsed();
    // A keepAlive of them all, and time to settle.
    let keep_alives = oap.recorded().keep_alives.len();
    runtime
        .block_on(oap.wait_for(
            |recorded| recorded.keep_alives.len() > keep_alives,
            Duration::from_secs(30),
        ))
        .map_err(|error| failed(&agent, &error.to_string()))?;
    std::thread::sleep(Duration::from_secs(5));
    let after = sample(agent.pid())?;
    eprintln!(
        "discovery-bench: {} processes of {pods} pods reported {:.1} s after the pods were \
         applied; RSS {} KiB",
        pids.len(),
        reported_after.as_secs_f64(),
        after.rss_kib
    );

    eprintln!("discovery-bench: {isolated_events} isolated pod events, 400 ms apart");
    let (isolated, isolated_busy, isolated_idle) = event_cost(
        &mut agent,
        &agent_cgroup,
        &mut fake_kube,
        isolated_events,
        Duration::from_millis(400),
    )?;
    eprintln!("discovery-bench: {burst_events} pod events, 10 ms apart");
    let (burst, burst_busy, burst_idle) = event_cost(
        &mut agent,
        &agent_cgroup,
        &mut fake_kube,
        burst_events,
        Duration::from_millis(10),
    )?;
    ensure!(
        k8s_pids(&oap.recorded()).is_superset(&pids),
        "processes were lost"
    );
    drop(agent);
    drop(agent_cgroup);
    drop(cgroups);

    println!(
        "agent processes={} pods={pods} rss_before_kib={} rss_after_kib={} peak_rss_kib={} \
         reported_after_ms={} isolated_events={isolated_events} isolated_cpu_per_event_ms={:.3} \
         isolated_busy_ms={:.1} isolated_idle_ms={:.1} burst_events={burst_events} \
         burst_cpu_per_event_ms={:.3} burst_busy_ms={:.1} burst_idle_ms={:.1}",
        pids.len(),
        before.rss_kib,
        after.rss_kib,
        after.peak_rss_kib,
        reported_after.as_millis(),
        ms(isolated),
        ms(isolated_busy),
        ms(isolated_idle),
        ms(burst),
        ms(burst_busy),
        ms(burst_idle),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
