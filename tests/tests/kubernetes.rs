//! `rover-agent run` with Kubernetes discovery end to end, over real sockets: the fake
//! Kubernetes API server serves pods and Services, real processes run in real cgroups shaped
//! like a node's containers (containerd, CRI-O and docker with the systemd driver, cgroupfs),
//! and the fake OAP records what the agent reports: every process of every matched container as
//! a `k8sProcess`, named by the analyzers shipped in `configs/rover.yaml`, reported within a
//! heartbeat of appearing and no longer kept alive once its pod is gone.
//!
//! Every test starts the agent (which needs BPF) and makes cgroups (root), so it takes the
//! machine lock and skips (fails in CI) without them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::cgroups::{CgroupLayout, TestCgroups};
use integration_tests::fake_kube::{self, FakeKube, hex64};
use integration_tests::fake_oap::{FakeOap, Recorded};
use integration_tests::node_agent::{HostRule, KubernetesConfig, NodeAgent, NodeConfig};
use integration_tests::{MachineLock, bpf_available, cgroups, machine_lock, workload_path};
use k8s_openapi::api::core::v1::{Container, ContainerStatus, Pod, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use rover_proto::v3::{EbpfKubernetesProcessMetadata, ebpf_process_properties};

/// The node the agent runs on.
const NODE: &str = "e2e-node";
/// The configured heartbeat: processes are reported within one, and kept alive at each.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// What a bound of "within one heartbeat" allows on top of it: the watch event's way through
/// the agent, the process scan, the report's round trip, on a loaded two-core machine.
const HEARTBEAT_SLACK: Duration = Duration::from_millis(1500);
/// Upper bound of a wait that includes the agent's startup (loading its BPF programs).
const WAIT: Duration = Duration::from_secs(30);
/// The properties of a `k8sProcess`, in order.
const K8S_PROPERTIES: [&str; 7] = [
    "host_ip",
    "container_ip",
    "container_name",
    "pod_name",
    "pid",
    "command_line",
    "support_ebpf_profiling",
];

fn prerequisites(test: &str) -> Option<MachineLock> {
    if !bpf_available(test) || !cgroups::available(test) {
        return None;
    }
    let lock = machine_lock();
    // Built before any process starts: the first build takes minutes.
    integration_tests::agent_binary();
    Some(lock)
}

// --- Pods, their containers, their processes -------------------------------------------------

/// A container of a [`TestPod`]: its cgroup's layout says its runtime.
#[derive(Clone)]
struct TestContainer {
    name: String,
    layout: CgroupLayout,
    /// The container id, 64 hex digits.
    id: String,
    /// Whether the pod's status has the id yet (the kubelet reports a container before its
    /// runtime created it).
    id_known: bool,
}

/// A pod as a test describes it, turned into the API server's [`Pod`] by [`TestPod::pod`].
#[derive(Clone)]
struct TestPod {
    namespace: String,
    name: String,
    node: String,
    ip: String,
    labels: Vec<(String, String)>,
    owner: Option<(String, String)>,
    containers: Vec<TestContainer>,
}

impl TestPod {
    fn new(namespace: &str, name: &str, ip: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: NODE.to_owned(),
            ip: ip.to_owned(),
            labels: Vec::new(),
            owner: None,
            containers: Vec::new(),
        }
    }

    fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    fn owned_by(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.to_owned(), name.to_owned()));
        self
    }

    fn on_node(mut self, node: &str) -> Self {
        self.node = node.to_owned();
        self
    }

    /// Adds a container whose id derives from the pod's and the container's names.
    fn container(mut self, name: &str, layout: CgroupLayout) -> Self {
        let id = hex64(&format!("{}/{}/{name}", self.namespace, self.name));
        self.containers.push(TestContainer {
            name: name.to_owned(),
            layout,
            id,
            id_known: true,
        });
        self
    }

    /// The status has no id for `container` yet (created, not started), as the kubelet first
    /// reports a pod.
    fn id_unknown(mut self, container: &str) -> Self {
        self.find_mut(container).id_known = false;
        self
    }

    fn find(&self, container: &str) -> &TestContainer {
        self.containers
            .iter()
            .find(|c| c.name == container)
            .unwrap_or_else(|| panic!("pod {} has no container {container}", self.name))
    }

    fn find_mut(&mut self, container: &str) -> &mut TestContainer {
        let pod = self.name.clone();
        self.containers
            .iter_mut()
            .find(|c| c.name == container)
            .unwrap_or_else(|| panic!("pod {pod} has no container {container}"))
    }

    fn uid(&self) -> String {
        fake_kube::pod_uid(&self.namespace, &self.name)
    }

    fn pod(&self) -> Pod {
        let labels: Vec<(&str, &str)> = self
            .labels
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        let mut pod = fake_kube::pod(&self.namespace, &self.name, &self.node, &labels);
        pod.metadata.owner_references = self.owner.as_ref().map(|(kind, name)| {
            vec![OwnerReference {
                api_version: "batch/v1".to_owned(),
                kind: kind.clone(),
                name: name.clone(),
                uid: fake_kube::pod_uid(&self.namespace, name),
                controller: Some(true),
                ..OwnerReference::default()
            }]
        });
        let spec = pod.spec.as_mut().expect("the fixture has a spec");
        spec.containers = self
            .containers
            .iter()
            .map(|c| Container {
                name: c.name.clone(),
                image: Some(format!("registry.example/{}:1.0", c.name)),
                ..Container::default()
            })
            .collect();
        let status = pod.status.as_mut().expect("the fixture has a status");
        status.pod_ip = Some(self.ip.clone());
        status.pod_ips = Some(vec![PodIP {
            ip: self.ip.clone(),
        }]);
        status.container_statuses = Some(
            self.containers
                .iter()
                .map(|c| ContainerStatus {
                    name: c.name.clone(),
                    container_id: c.id_known.then(|| c.layout.status_container_id(&c.id)),
                    image: format!("registry.example/{}:1.0", c.name),
                    ready: c.id_known,
                    started: Some(c.id_known),
                    ..ContainerStatus::default()
                })
                .collect(),
        );
        pod
    }
}

/// `sleep SECONDS`: a quiet process whose exe name is `sleep`.
fn sleep(seconds: u32) -> Command {
    let mut command = Command::new("sleep");
    command.arg(seconds.to_string());
    command
}

/// The test workload `sleeper`, sleeping a minute: exe name `sleeper`.
fn sleeper() -> Command {
    let mut command = Command::new(workload_path("sleeper"));
    command.args(["1", "60000", "0"]);
    command
}

/// A token no other process has on its command line, for host rules to match.
fn token(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    format!("e2e-k8s-{tag}-{}-{nanos}", std::process::id())
}

/// The fakes, the node's cgroups and what the agent needs to find them.
struct Node {
    oap: FakeOap,
    kube: FakeKube,
    cgroups: TestCgroups,
    /// Host processes (not in any container), killed on drop.
    host_processes: Vec<std::process::Child>,
    kubeconfig_dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        let kube = FakeKube::start().expect("fake Kubernetes API server");
        let kubeconfig_dir = tempfile::tempdir().expect("temporary directory");
        kube.write_kubeconfig(kubeconfig_dir.path())
            .expect("kubeconfig");
        Self {
            oap: FakeOap::start().expect("fake OAP"),
            kube,
            cgroups: TestCgroups::create().expect("test cgroups"),
            host_processes: Vec::new(),
            kubeconfig_dir,
        }
    }

    /// The agent's configuration: Kubernetes discovery of `NODE` with the shipped analyzers, a
    /// short heartbeat, and `rules` for host processes.
    fn config(&self, rules: Vec<HostRule>) -> NodeConfig {
        let mut config = NodeConfig::new(&self.oap, rules);
        config.heartbeat_period = format!("{}s", HEARTBEAT.as_secs());
        config.kubernetes = Some(KubernetesConfig::new(
            NODE,
            &self.kubeconfig_dir.path().join("kubeconfig"),
        ));
        config
    }

    /// Starts `command` in container `container` of `pod` (its cgroup made as needed).
    fn run_in(&mut self, pod: &TestPod, container: &str, command: &mut Command) -> u32 {
        let container = pod.find(container);
        let cgroup = self
            .cgroups
            .container(container.layout, &pod.uid(), &container.id)
            .expect("container cgroup");
        self.cgroups.spawn(&cgroup, command).expect("process")
    }

    /// Starts `command` in the cgroup of a container no pod has.
    fn run_in_unknown_container(&mut self, command: &mut Command) -> u32 {
        let cgroup = self
            .cgroups
            .container(
                CgroupLayout::ContainerdSystemd,
                "0d9e8f7a-6b5c-4d3e-8f1a-2b3c4d5e6f70",
                &hex64("a container no pod has"),
            )
            .expect("container cgroup");
        self.cgroups.spawn(&cgroup, command).expect("process")
    }

    /// Starts `command` on the host, outside any container.
    fn run_on_host(&mut self, command: &mut Command) -> u32 {
        let child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("host process");
        let pid = child.id();
        self.host_processes.push(child);
        pid
    }

    /// Deletes pod `namespace/name` and waits for three heartbeats after; returns them, the
    /// first left out (it may come before the agent saw the deletion).
    async fn delete_pod_and_wait(
        &self,
        agent: &NodeAgent,
        namespace: &str,
        name: &str,
    ) -> Vec<Heartbeat> {
        let deleted = heartbeat_calls(&self.oap.recorded());
        self.kube
            .delete_pod(namespace, name)
            .expect("the pod existed");
        let recorded = self
            .wait(agent, "three heartbeats after the deletion", WAIT, |r| {
                heartbeats(r).len() >= deleted + 3
            })
            .await;
        let mut after = heartbeats(&recorded);
        after.drain(..=deleted);
        after
    }

    async fn wait(
        &self,
        agent: &NodeAgent,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        match self.oap.wait_for(condition, timeout).await {
            Ok(recorded) => recorded,
            Err(error) => panic!("waiting for {what}: {error}\n{}", self.context(agent)),
        }
    }

    fn context(&self, agent: &NodeAgent) -> String {
        let reported: Vec<String> = k8s_processes(&self.oap.recorded())
            .values()
            .map(describe)
            .collect();
        format!(
            "--- k8s processes reported (latest per pid):\n{}\n{}",
            reported.join("\n"),
            agent.context(&self.oap)
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.host_processes {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// --- What the OAP received -------------------------------------------------------------------

/// The latest `k8sProcess` reported for each pid.
fn k8s_processes(recorded: &Recorded) -> BTreeMap<i32, EbpfKubernetesProcessMetadata> {
    let mut latest = BTreeMap::new();
    for report in &recorded.process_reports {
        for process in &report.processes {
            if let Some(ebpf_process_properties::Metadata::K8sProcess(k8s)) = &process.metadata {
                latest.insert(k8s.pid, k8s.clone());
            }
        }
    }
    latest
}

/// The pids reported as host processes.
fn host_pids(recorded: &Recorded) -> BTreeSet<i32> {
    recorded
        .process_reports
        .iter()
        .flat_map(|report| &report.processes)
        .filter_map(|process| match &process.metadata {
            Some(ebpf_process_properties::Metadata::HostProcess(host)) => Some(host.pid),
            _ => None,
        })
        .collect()
}

fn pid_i32(pid: u32) -> i32 {
    i32::try_from(pid).expect("pids fit in i32")
}

fn reported(recorded: &Recorded, pids: &[u32]) -> bool {
    let processes = k8s_processes(recorded);
    pids.iter()
        .all(|&pid| processes.contains_key(&pid_i32(pid)))
}

fn describe(process: &EbpfKubernetesProcessMetadata) -> String {
    let entity = process.entity.clone().unwrap_or_default();
    let properties: Vec<String> = process
        .properties
        .iter()
        .map(|p| format!("{}={}", p.key, p.value))
        .collect();
    format!(
        "pid {}: {} / {} / {} / {} {:?} [{}]",
        process.pid,
        entity.layer,
        entity.service_name,
        entity.instance_name,
        entity.process_name,
        entity.labels,
        properties.join(", ")
    )
}

/// Service, instance and process names: what the OAP identifies a process by.
type Names = (String, String, String);

/// A heartbeat as the OAP saw it: a full report or a keepAlive, with the processes' names.
#[derive(Debug)]
struct Heartbeat {
    keep_alive: bool,
    names: BTreeSet<Names>,
}

/// Heartbeat calls so far, their messages recorded or not: the index in [`heartbeats`] of the
/// next one.
fn heartbeat_calls(recorded: &Recorded) -> usize {
    recorded
        .calls
        .iter()
        .filter(|call| matches!(call.method, "reportProcesses" | "keepAlive"))
        .count()
}

/// The heartbeats in the order they arrived (up to the first whose message is not recorded
/// yet).
fn heartbeats(recorded: &Recorded) -> Vec<Heartbeat> {
    let (mut reports, mut pings) = (0, 0);
    let mut heartbeats = Vec::new();
    for call in &recorded.calls {
        let heartbeat = match call.method {
            "reportProcesses" => {
                // A copy taken between a call and its message lacks the last message.
                let Some(report) = recorded.process_reports.get(reports) else {
                    break;
                };
                reports += 1;
                Heartbeat {
                    keep_alive: false,
                    names: report
                        .processes
                        .iter()
                        .filter_map(|p| match &p.metadata {
                            Some(ebpf_process_properties::Metadata::K8sProcess(k8s)) => {
                                k8s.entity.as_ref()
                            }
                            Some(ebpf_process_properties::Metadata::HostProcess(host)) => {
                                host.entity.as_ref()
                            }
                            None => None,
                        })
                        .map(|e| {
                            (
                                e.service_name.clone(),
                                e.instance_name.clone(),
                                e.process_name.clone(),
                            )
                        })
                        .collect(),
                }
            }
            "keepAlive" => {
                let Some(ping) = recorded.keep_alives.get(pings) else {
                    break;
                };
                pings += 1;
                Heartbeat {
                    keep_alive: true,
                    names: ping
                        .processes
                        .iter()
                        .filter_map(|p| p.entity_metadata.as_ref())
                        .map(|e| {
                            (
                                e.service_name.clone(),
                                e.instance_name.clone(),
                                e.process_name.clone(),
                            )
                        })
                        .collect(),
                }
            }
            _ => continue,
        };
        heartbeats.push(heartbeat);
    }
    heartbeats
}

fn names(service: &str, instance: &str, process: &str) -> Names {
    (service.to_owned(), instance.to_owned(), process.to_owned())
}

/// What a process must be reported as.
struct Expected<'a> {
    pid: u32,
    layer: &'a str,
    service: String,
    pod: &'a TestPod,
    container: &'a str,
    process: String,
    label: &'a str,
    command_line: String,
}

impl Expected<'_> {
    fn names(&self) -> Names {
        names(&self.service, &self.pod.name, &self.process)
    }

    /// Checks the latest report of the pid: names, labels, and every property in order.
    fn check(&self, recorded: &Recorded, host_ip: &str, context: &str) {
        let processes = k8s_processes(recorded);
        let process = processes
            .get(&pid_i32(self.pid))
            .unwrap_or_else(|| panic!("pid {} was not reported\n{context}", self.pid));
        let what = format!(
            "pid {} ({}/{}/{})\n{context}",
            self.pid, self.pod.name, self.container, self.process
        );
        let entity = process.entity.clone().unwrap_or_default();
        assert_eq!(entity.layer, self.layer, "{what}");
        assert_eq!(entity.service_name, self.service, "{what}");
        assert_eq!(entity.instance_name, self.pod.name, "{what}");
        assert_eq!(entity.process_name, self.process, "{what}");
        assert_eq!(entity.labels, [self.label], "{what}");
        let keys: Vec<&str> = process.properties.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, K8S_PROPERTIES, "{what}");
        let values: Vec<&str> = process
            .properties
            .iter()
            .map(|p| p.value.as_str())
            .collect();
        assert_eq!(
            values,
            [
                host_ip,
                self.pod.ip.as_str(),
                self.container,
                self.pod.name.as_str(),
                self.pid.to_string().as_str(),
                self.command_line.as_str(),
                "true",
            ],
            "{what}"
        );
    }
}

/// The node's IP as the agent finds it (Rover reports the agent's host IP as `host_ip`, not the
/// pod's `status.hostIP`, which the fixtures set to another address).
fn agent_host_ip() -> String {
    rover_agent::process::host_ip::host_ip(None)
        .expect("the host's IP")
        .to_string()
}

// --- Tests -----------------------------------------------------------------------------------

#[tokio::test]
async fn containerd_crio_docker_and_cgroupfs_pods_have_every_process_reported_with_the_shipped_names()
 {
    let Some(_lock) = prerequisites(
        "containerd_crio_docker_and_cgroupfs_pods_have_every_process_reported_with_the_shipped_names",
    ) else {
        return;
    };
    let mut node = Node::start();
    // Behind Services (Rover's K8S_SERVICE analyzer): containerd with two processes in one
    // container, CRI-O, cgroupfs. Behind none (our fourth analyzer): docker, owned by a Job.
    let orders = TestPod::new("shop", "orders-7d9f8c-x2kq4", "10.244.1.11")
        .label("app", "orders")
        .container("orders", CgroupLayout::ContainerdSystemd);
    let payments = TestPod::new("shop", "payments-5c8d6b-p9s7w", "10.244.1.12")
        .label("app", "payments")
        .container("payments", CgroupLayout::CrioSystemd);
    let cache = TestPod::new("shop", "cache-0", "10.244.1.13")
        .label("app", "cache")
        .container("redis", CgroupLayout::ContainerdCgroupfs);
    let batch = TestPod::new("shop", "nightly-report-28467-k5j2h", "10.244.1.14")
        .label("job-name", "nightly-report-28467")
        .owned_by("Job", "nightly-report-28467")
        .container("report", CgroupLayout::DockerSystemd);
    for (name, app) in [
        ("orders", "orders"),
        ("payments", "payments"),
        ("cache", "cache"),
    ] {
        node.kube
            .apply_service(fake_kube::service("shop", name, &[("app", app)]));
    }
    for pod in [&orders, &payments, &cache, &batch] {
        node.kube.apply_pod(pod.pod());
    }
    let orders_first = node.run_in(&orders, "orders", &mut sleep(600));
    // A later start time: the second keeps the name only with its pid.
    std::thread::sleep(Duration::from_millis(100));
    let orders_second = node.run_in(&orders, "orders", &mut sleep(601));
    let payments_pid = node.run_in(&payments, "payments", &mut sleeper());
    let cache_pid = node.run_in(&cache, "redis", &mut sleep(602));
    let batch_pid = node.run_in(&batch, "report", &mut sleep(603));

    let mut config = node.config(Vec::new());
    config.cluster_name = Some("e2e-cluster".to_owned());
    let mut agent = NodeAgent::start(&config, &[]);
    let pids = [
        orders_first,
        orders_second,
        payments_pid,
        cache_pid,
        batch_pid,
    ];
    let recorded = node
        .wait(&agent, "every process of the four pods", WAIT, |r| {
            reported(r, &pids)
        })
        .await;
    agent.assert_running(&node.oap);

    let sleeper_command_line = format!("{} 1 60000 0", workload_path("sleeper").display());
    let service = |layer_service: &str| format!("e2e-cluster::{layer_service}.shop");
    let expected = [
        Expected {
            pid: orders_first,
            layer: "K8S_SERVICE",
            service: service("orders"),
            pod: &orders,
            container: "orders",
            process: "sleep".to_owned(),
            label: "k8s-service",
            command_line: "sleep 600".to_owned(),
        },
        Expected {
            pid: orders_second,
            layer: "K8S_SERVICE",
            service: service("orders"),
            pod: &orders,
            container: "orders",
            process: format!("sleep-{orders_second}"),
            label: "k8s-service",
            command_line: "sleep 601".to_owned(),
        },
        Expected {
            pid: payments_pid,
            layer: "K8S_SERVICE",
            service: service("payments"),
            pod: &payments,
            container: "payments",
            process: "sleeper".to_owned(),
            label: "k8s-service",
            command_line: sleeper_command_line,
        },
        Expected {
            pid: cache_pid,
            layer: "K8S_SERVICE",
            service: service("cache"),
            pod: &cache,
            container: "redis",
            process: "sleep".to_owned(),
            label: "k8s-service",
            command_line: "sleep 602".to_owned(),
        },
        Expected {
            pid: batch_pid,
            layer: "K8S_SERVICE",
            service: service("nightly-report-28467"),
            pod: &batch,
            container: "report",
            process: "sleep".to_owned(),
            label: "k8s-workload",
            command_line: "sleep 603".to_owned(),
        },
    ];
    let host_ip = agent_host_ip();
    let context = node.context(&agent);
    for process in &expected {
        process.check(&recorded, &host_ip, &context);
    }
    let reported_pids: BTreeSet<i32> = k8s_processes(&recorded).keys().copied().collect();
    let expected_pids: BTreeSet<i32> = pids.iter().map(|&pid| pid_i32(pid)).collect();
    assert_eq!(
        reported_pids, expected_pids,
        "only the pods' processes are k8s processes\n{context}"
    );

    // Then kept alive, all of them, at every heartbeat.
    let all: BTreeSet<Names> = expected.iter().map(Expected::names).collect();
    let after = heartbeat_calls(&recorded);
    let recorded = node
        .wait(&agent, "two more heartbeats", WAIT, |r| {
            heartbeats(r).len() >= after + 2
        })
        .await;
    for heartbeat in &heartbeats(&recorded)[after..] {
        if heartbeat.keep_alive {
            assert!(
                heartbeat.names.is_superset(&all),
                "a keepAlive lacks processes: {heartbeat:?}\n{}",
                node.context(&agent)
            );
        }
    }
}

#[tokio::test]
async fn an_istio_pod_has_its_sidecar_in_mesh_dp_and_its_application_in_mesh() {
    let Some(_lock) =
        prerequisites("an_istio_pod_has_its_sidecar_in_mesh_dp_and_its_application_in_mesh")
    else {
        return;
    };
    let mut node = Node::start();
    let reviews = TestPod::new("bookinfo", "reviews-v1-6c5d7f-8bq2n", "10.244.2.21")
        .label("app", "reviews")
        .label("service.istio.io/canonical-name", "reviews-canonical")
        .container("reviews", CgroupLayout::ContainerdSystemd)
        .container("istio-proxy", CgroupLayout::ContainerdSystemd);
    // A Service selects it too: the mesh analyzers come first.
    node.kube.apply_service(fake_kube::service(
        "bookinfo",
        "reviews",
        &[("app", "reviews")],
    ));
    node.kube.apply_pod(reviews.pod());
    let app = node.run_in(&reviews, "reviews", &mut sleeper());
    let envoy = node.run_in(&reviews, "istio-proxy", &mut sleep(604));

    let mut agent = NodeAgent::start(&node.config(Vec::new()), &[]);
    let recorded = node
        .wait(&agent, "the sidecar and the application", WAIT, |r| {
            reported(r, &[app, envoy])
        })
        .await;
    agent.assert_running(&node.oap);
    let host_ip = agent_host_ip();
    let context = node.context(&agent);
    Expected {
        pid: envoy,
        layer: "MESH_DP",
        service: "reviews-canonical.bookinfo".to_owned(),
        pod: &reviews,
        container: "istio-proxy",
        process: "sleep".to_owned(),
        label: "mesh-envoy",
        command_line: "sleep 604".to_owned(),
    }
    .check(&recorded, &host_ip, &context);
    Expected {
        pid: app,
        layer: "MESH",
        service: "reviews-canonical.bookinfo".to_owned(),
        pod: &reviews,
        container: "reviews",
        process: "sleeper".to_owned(),
        label: "mesh-application",
        command_line: format!("{} 1 60000 0", workload_path("sleeper").display()),
    }
    .check(&recorded, &host_ip, &context);
}

#[tokio::test]
async fn a_pod_added_after_its_processes_is_reported_within_a_heartbeat() {
    let Some(_lock) =
        prerequisites("a_pod_added_after_its_processes_is_reported_within_a_heartbeat")
    else {
        return;
    };
    let mut node = Node::start();
    let early = TestPod::new("shop", "early-0", "10.244.3.31")
        .container("app", CgroupLayout::ContainerdSystemd);
    let late =
        TestPod::new("shop", "late-0", "10.244.3.32").container("app", CgroupLayout::CrioSystemd);
    node.kube.apply_pod(early.pod());
    let early_pid = node.run_in(&early, "app", &mut sleep(605));
    // The late pod's processes run before the API server has the pod.
    let late_pid = node.run_in(&late, "app", &mut sleep(606));

    let mut agent = NodeAgent::start(&node.config(Vec::new()), &[]);
    node.wait(&agent, "the early pod's process", WAIT, |r| {
        reported(r, &[early_pid])
    })
    .await;
    // Two heartbeats more: the late process, in no pod yet, is not reported.
    let after = heartbeat_calls(&node.oap.recorded());
    let recorded = node
        .wait(&agent, "two more heartbeats", WAIT, |r| {
            heartbeats(r).len() >= after + 2
        })
        .await;
    assert!(
        !k8s_processes(&recorded).contains_key(&pid_i32(late_pid)),
        "a process of no pod was reported\n{}",
        node.context(&agent)
    );

    let added = Instant::now();
    node.kube.apply_pod(late.pod());
    let recorded = node
        .wait(
            &agent,
            "the late pod's process within a heartbeat",
            HEARTBEAT + HEARTBEAT_SLACK,
            |r| reported(r, &[late_pid]),
        )
        .await;
    let latency = added.elapsed();
    agent.assert_running(&node.oap);
    Expected {
        pid: late_pid,
        layer: "K8S_SERVICE",
        service: "late-0.shop".to_owned(),
        pod: &late,
        container: "app",
        process: "sleep".to_owned(),
        label: "k8s-workload",
        command_line: "sleep 606".to_owned(),
    }
    .check(
        &recorded,
        &agent_host_ip(),
        &format!(
            "reported {latency:?} after the pod was added\n{}",
            node.context(&agent)
        ),
    );
}

#[tokio::test]
async fn a_deleted_pods_processes_are_no_longer_kept_alive() {
    let Some(_lock) = prerequisites("a_deleted_pods_processes_are_no_longer_kept_alive") else {
        return;
    };
    let mut node = Node::start();
    let stays = TestPod::new("shop", "stays-0", "10.244.4.41")
        .container("app", CgroupLayout::DockerSystemd);
    let goes = TestPod::new("shop", "goes-0", "10.244.4.42")
        .container("app", CgroupLayout::ContainerdSystemd)
        .container("helper", CgroupLayout::ContainerdSystemd);
    node.kube.apply_pod(stays.pod());
    node.kube.apply_pod(goes.pod());
    let stays_pid = node.run_in(&stays, "app", &mut sleep(607));
    let goes_app = node.run_in(&goes, "app", &mut sleep(608));
    let goes_helper = node.run_in(&goes, "helper", &mut sleeper());

    let mut agent = NodeAgent::start(&node.config(Vec::new()), &[]);
    let stays_names = names("stays-0.shop", "stays-0", "sleep");
    let goes_names = BTreeSet::from([
        names("goes-0.shop", "goes-0", "sleep"),
        names("goes-0.shop", "goes-0", "sleeper"),
    ]);
    // Reported, then kept alive.
    node.wait(&agent, "a keepAlive of all three", WAIT, |r| {
        reported(r, &[stays_pid, goes_app, goes_helper])
            && heartbeats(r).iter().any(|h| {
                h.keep_alive && h.names.contains(&stays_names) && h.names.is_superset(&goes_names)
            })
    })
    .await;

    // The processes stay; their pod goes.
    let after = node.delete_pod_and_wait(&agent, "shop", "goes-0").await;
    agent.assert_running(&node.oap);
    let context = node.context(&agent);
    for heartbeat in &after {
        assert!(
            heartbeat.names.is_disjoint(&goes_names),
            "a heartbeat after the deletion still has the deleted pod's processes: \
             {heartbeat:?}\n{context}"
        );
        if heartbeat.keep_alive {
            assert!(
                heartbeat.names.contains(&stays_names),
                "the remaining pod's process is no longer kept alive: {heartbeat:?}\n{context}"
            );
        }
    }
    for pid in [goes_app, goes_helper] {
        assert!(
            rover_agent::process::is_alive(pid),
            "the deleted pod's process {pid} exited: the test must show that the pod's \
             deletion, not an exit, ends the keepAlives"
        );
    }
}

#[tokio::test]
async fn host_processes_and_processes_of_no_pod_on_this_node_are_not_reported_as_k8s_processes() {
    let Some(_lock) = prerequisites(
        "host_processes_and_processes_of_no_pod_on_this_node_are_not_reported_as_k8s_processes",
    ) else {
        return;
    };
    let mut node = Node::start();
    let here = TestPod::new("shop", "here-0", "10.244.5.51")
        .container("app", CgroupLayout::ContainerdSystemd);
    let elsewhere = TestPod::new("shop", "elsewhere-0", "10.244.6.61")
        .on_node("another-node")
        .container("app", CgroupLayout::ContainerdSystemd);
    let starting = TestPod::new("shop", "starting-0", "10.244.5.52")
        .container("app", CgroupLayout::CrioSystemd)
        .id_unknown("app");
    for pod in [&here, &elsewhere, &starting] {
        node.kube.apply_pod(pod.pod());
    }
    let here_pid = node.run_in(&here, "app", &mut sleep(609));
    let elsewhere_pid = node.run_in(&elsewhere, "app", &mut sleep(610));
    let starting_pid = node.run_in(&starting, "app", &mut sleep(611));
    let unknown_container_pid = node.run_in_unknown_container(&mut sleep(612));
    let plain_host_pid = node.run_on_host(&mut sleep(613));
    // A host process a host rule matches: reported, but as a host process.
    let tag = token("host");
    let ruled_host_pid = node.run_on_host(sleep(614).arg0(&tag));

    let rule = HostRule::new(&format!("^{tag} "), "e2e-host");
    let mut agent = NodeAgent::start(&node.config(vec![rule]), &[]);
    node.wait(
        &agent,
        "the pod's and the host rule's processes",
        WAIT,
        |r| reported(r, &[here_pid]) && host_pids(r).contains(&pid_i32(ruled_host_pid)),
    )
    .await;
    let after = heartbeat_calls(&node.oap.recorded());
    let recorded = node
        .wait(&agent, "two more heartbeats", WAIT, |r| {
            heartbeats(r).len() >= after + 2
        })
        .await;
    let context = node.context(&agent);
    let k8s: BTreeSet<i32> = k8s_processes(&recorded).keys().copied().collect();
    assert_eq!(
        k8s,
        BTreeSet::from([pid_i32(here_pid)]),
        "only the process of a pod on this node with a known container is a k8s process \
         (elsewhere {elsewhere_pid}, container id unknown {starting_pid}, no pod's container \
         {unknown_container_pid}, host {plain_host_pid}, host by rule {ruled_host_pid})\n\
         {context}"
    );
    assert_eq!(
        host_pids(&recorded),
        BTreeSet::from([pid_i32(ruled_host_pid)]),
        "{context}"
    );

    // Once the kubelet reports the container's id, its process is picked up.
    let mut started = starting.clone();
    started.find_mut("app").id_known = true;
    node.kube.apply_pod(started.pod());
    let recorded = node
        .wait(
            &agent,
            "the process of the container whose id became known",
            HEARTBEAT + HEARTBEAT_SLACK,
            |r| reported(r, &[starting_pid]),
        )
        .await;
    agent.assert_running(&node.oap);
    Expected {
        pid: starting_pid,
        layer: "K8S_SERVICE",
        service: "starting-0.shop".to_owned(),
        pod: &started,
        container: "app",
        process: "sleep".to_owned(),
        label: "k8s-workload",
        command_line: "sleep 611".to_owned(),
    }
    .check(&recorded, &agent_host_ip(), &node.context(&agent));
}

/// A process of a pod that a host rule matches too is two entities, as in Rover: the pod's
/// and the host rule's. Each source keeps its own: when the pod goes, the host rule's entity
/// stays alive.
#[tokio::test]
async fn a_pods_process_a_host_rule_matches_is_reported_by_both_and_outlives_its_pod() {
    let Some(_lock) = prerequisites(
        "a_pods_process_a_host_rule_matches_is_reported_by_both_and_outlives_its_pod",
    ) else {
        return;
    };
    let mut node = Node::start();
    let pod = TestPod::new("shop", "both-0", "10.244.7.71")
        .container("app", CgroupLayout::ContainerdSystemd);
    node.kube.apply_pod(pod.pod());
    let tag = token("both");
    let pid = node.run_in(&pod, "app", sleep(616).arg0(&tag));
    let rule = HostRule::new(&format!("^{tag} "), "e2e-host");
    let mut agent = NodeAgent::start(&node.config(vec![rule]), &[]);
    let in_pod = |names: &Names| names.1 == "both-0";
    let by_rule = |names: &Names| names.0 == "e2e-host";
    node.wait(&agent, "a keepAlive of both entities", WAIT, |r| {
        reported(r, &[pid])
            && host_pids(r).contains(&pid_i32(pid))
            && heartbeats(r)
                .iter()
                .any(|h| h.keep_alive && h.names.iter().any(in_pod) && h.names.iter().any(by_rule))
    })
    .await;

    let after = node.delete_pod_and_wait(&agent, "shop", "both-0").await;
    agent.assert_running(&node.oap);
    let context = node.context(&agent);
    for heartbeat in &after {
        assert!(
            !heartbeat.names.iter().any(in_pod),
            "a heartbeat after the deletion still has the pod's entity: {heartbeat:?}\n{context}"
        );
    }
    assert!(
        after
            .iter()
            .filter(|h| h.keep_alive)
            .all(|h| h.names.iter().any(by_rule))
            && after.iter().any(|h| h.keep_alive),
        "the host rule's entity of pid {pid} is no longer kept alive once its pod went: \
         {after:?}\n{context}"
    );
    assert!(rover_agent::process::is_alive(pid), "pid {pid} exited");
}

#[tokio::test]
async fn an_api_server_down_at_start_leaves_host_rules_working_and_its_pods_are_found_once_it_is_up()
 {
    let Some(_lock) = prerequisites(
        "an_api_server_down_at_start_leaves_host_rules_working_and_its_pods_are_found_once_it_is_up",
    ) else {
        return;
    };
    let mut node = Node::start();
    // Down from the start; its pods are there when it comes up.
    node.kube.stop();
    let pod = TestPod::new("shop", "patient-0", "10.244.7.71")
        .container("app", CgroupLayout::ContainerdCgroupfs);
    node.kube.apply_pod(pod.pod());
    let pod_pid = node.run_in(&pod, "app", &mut sleep(615));
    let tag = token("down");
    let host_pid = node.run_on_host(sleep(616).arg0(&tag));

    let rule = HostRule::new(&format!("^{tag} "), "e2e-host");
    let mut agent = NodeAgent::start(&node.config(vec![rule]), &[]);
    node.wait(&agent, "the host rule's process", WAIT, |r| {
        host_pids(r).contains(&pid_i32(host_pid))
    })
    .await;
    // A few heartbeats with the API server down: the agent goes on, host processes kept alive.
    let after = heartbeat_calls(&node.oap.recorded());
    let recorded = node
        .wait(&agent, "two more heartbeats", WAIT, |r| {
            heartbeats(r).len() >= after + 2
        })
        .await;
    agent.assert_running(&node.oap);
    assert!(
        k8s_processes(&recorded).is_empty(),
        "k8s processes without an API server\n{}",
        node.context(&agent)
    );
    let host_names = names("e2e-host", &host_name(), "sleep");
    assert!(
        heartbeats(&recorded)[after..]
            .iter()
            .filter(|h| h.keep_alive)
            .all(|h| h.names.contains(&host_names)),
        "the host process is not kept alive while the API server is down\n{}",
        node.context(&agent)
    );
    // One clear line says so, however many attempts failed.
    let failing = |agent: &NodeAgent| {
        agent
            .stderr()
            .lines()
            .filter(|line| {
                line.contains("Kubernetes API server") && line.contains("retrying with backoff")
            })
            .count()
    };
    assert_eq!(
        failing(&agent),
        1,
        "one log line should say the API server is failing\n{}",
        node.context(&agent)
    );

    node.kube
        .start_again()
        .expect("restarting the fake API server");
    // kube-rs's backoff grows to 30 s at most between attempts.
    let recorded = node
        .wait(
            &agent,
            "the pod's process once the API server is up",
            Duration::from_secs(45),
            |r| reported(r, &[pod_pid]),
        )
        .await;
    agent.assert_running(&node.oap);
    Expected {
        pid: pod_pid,
        layer: "K8S_SERVICE",
        service: "patient-0.shop".to_owned(),
        pod: &pod,
        container: "app",
        process: "sleep".to_owned(),
        label: "k8s-workload",
        command_line: "sleep 615".to_owned(),
    }
    .check(&recorded, &agent_host_ip(), &node.context(&agent));
    assert!(
        agent
            .wait_for_log(&["Kubernetes API server", "answering again"], WAIT)
            .is_some(),
        "no log line says the API server answers again\n{}",
        node.context(&agent)
    );
    assert_eq!(failing(&agent), 1, "{}", node.context(&agent));
    assert!(
        node.kube
            .requests()
            .iter()
            .any(|request| request.field_selector() == Some(&format!("spec.nodeName={NODE}"))),
        "the pods were not asked for by node: {:?}",
        node.kube
            .requests()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    );
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("reading the host name")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn pods_are_named_only_once_their_services_are_listed() {
    let Some(_lock) = prerequisites("pods_are_named_only_once_their_services_are_listed") else {
        return;
    };
    let mut node = Node::start();
    let orders = TestPod::new("shop", "orders-6b7c9d-q4w8z", "10.244.4.41")
        .label("app", "orders")
        .container("orders", CgroupLayout::ContainerdSystemd);
    node.kube
        .apply_service(fake_kube::service("shop", "orders", &[("app", "orders")]));
    node.kube.apply_pod(orders.pod());
    let pid = node.run_in(&orders, "orders", &mut sleep(607));
    // Services cannot be listed yet: named now, the pod would go under the workload analyzer
    // (no Service), be reported so, and be renamed later.
    node.kube.forbid(fake_kube::Kind::Services, true);

    let mut agent = NodeAgent::start(&node.config(Vec::new()), &[]);
    // Services asked for and refused, then two heartbeats' time (with nothing to report, none
    // is sent).
    let asked = Instant::now();
    while !node
        .kube
        .requests()
        .iter()
        .any(|request| request.status == 403)
    {
        assert!(
            asked.elapsed() < WAIT,
            "Services were never asked for\n{}",
            node.context(&agent)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(2 * HEARTBEAT + HEARTBEAT_SLACK).await;
    let recorded = node.oap.recorded();
    assert!(
        !k8s_processes(&recorded).contains_key(&pid_i32(pid)),
        "the pod's process was named before its Service could be known\n{}",
        node.context(&agent)
    );

    node.kube.forbid(fake_kube::Kind::Services, false);
    let recorded = node
        .wait(&agent, "the pod's process", WAIT, |r| reported(r, &[pid]))
        .await;
    agent.assert_running(&node.oap);
    let expected = Expected {
        pid,
        layer: "K8S_SERVICE",
        service: "orders.shop".to_owned(),
        pod: &orders,
        container: "orders",
        process: "sleep".to_owned(),
        label: "k8s-service",
        command_line: "sleep 607".to_owned(),
    };
    expected.check(&recorded, &agent_host_ip(), &node.context(&agent));
    // Never reported under another name.
    for heartbeat in heartbeats(&recorded) {
        for names in &heartbeat.names {
            assert!(
                names.1 != orders.name || *names == expected.names(),
                "reported as {names:?}\n{}",
                node.context(&agent)
            );
        }
    }
}
