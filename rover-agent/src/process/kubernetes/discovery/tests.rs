use std::collections::HashSet;
use std::fs;
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
    discovery_with_instance(proc, "{{.Pod.Name}}")
}

fn discovery_with_instance(proc: &FakeProc, instance_name: &str) -> KubernetesDiscovery {
    let analyzers = Analyzers::new(&[KubernetesAnalyzerSettings {
        active: true,
        filters: vec![".Pod.HasServiceName".to_owned()],
        layer: "K8S_SERVICE".to_owned(),
        service_name: "{{.Pod.ServiceName}}.{{.Pod.Namespace}}".to_owned(),
        instance_name: instance_name.to_owned(),
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
        .map(|(key, value)| (*key, value.as_str()))
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

const UID_1: &str = "11111111-2222-3333-4444-555555555555";
const UID_2: &str = "66666666-2222-3333-4444-555555555555";

#[test]
fn a_pod_change_looks_at_that_pod_only_and_reads_no_process() {
    let proc = FakeProc(tempfile::tempdir().unwrap());
    proc.add(
        100,
        "server",
        10,
        &["server"],
        &containerd(UID_1, CONTAINER_A),
    );
    proc.add(
        200,
        "worker",
        10,
        &["worker"],
        &containerd(UID_2, CONTAINER_B),
    );
    let cart = pod("cart-1", UID_1, "1", &[("app", CONTAINER_A)]);
    let other = pod("cart-2", UID_2, "1", &[("app", CONTAINER_B)]);
    let mut snapshot = ClusterSnapshot {
        pods: vec![cart, other.clone()],
        services: vec![service()],
    };
    let mut discovery = discovery(&proc);
    assert_eq!(discovery.scan(&snapshot, None).unwrap().added.len(), 2);

    // A new resource version of cart-1 with a new IP: its process is reported again, the
    // other pod's is not; no process file is read (they are gone from the fake procfs).
    proc.remove(100);
    proc.remove(200);
    let mut moved = (*pod("cart-1", UID_1, "2", &[("app", CONTAINER_A)])).clone();
    moved.status.as_mut().unwrap().pod_ip = Some("10.1.2.4".to_owned());
    snapshot.pods[0] = Arc::new(moved);
    let changes = discovery.pods_changed(&snapshot);
    assert_eq!(changes.removed, [100]);
    assert_eq!(changes.added.len(), 1);
    assert_eq!(
        changes.added[0].properties[1],
        ("container_ip", "10.1.2.4".to_owned())
    );

    // The same snapshot again: nothing.
    assert_eq!(discovery.pods_changed(&snapshot), ScanChanges::default());

    // A pod deleted: its process goes, without a scan.
    snapshot.pods.remove(0);
    let changes = discovery.pods_changed(&snapshot);
    assert_eq!(changes.removed, [100]);
    assert!(changes.added.is_empty());

    // A Service change renames the pods it selects.
    let mut renamed = (*service()).clone();
    renamed.metadata.name = Some("basket".to_owned());
    renamed.metadata.resource_version = Some("2".to_owned());
    snapshot.services = vec![Arc::new(renamed)];
    let changes = discovery.pods_changed(&snapshot);
    assert_eq!(changes.removed, [200]);
    assert_eq!(changes.added[0].service_name, "prod::basket.shop");
    assert_eq!(snapshot.pods, [other]);
}

#[test]
fn marked_processes_of_a_pod_are_read_without_a_scan() {
    let proc = FakeProc(tempfile::tempdir().unwrap());
    proc.add(
        100,
        "server",
        10,
        &["server"],
        &containerd(UID_1, CONTAINER_A),
    );
    let snapshot = ClusterSnapshot {
        pods: vec![pod("cart-1", UID_1, "1", &[("app", CONTAINER_A)])],
        services: vec![service()],
    };
    let mut discovery = discovery(&proc);
    assert_eq!(discovery.scan(&snapshot, None).unwrap().added.len(), 1);

    // 101 exec'd in the container, 100 exited: the kernel marked both.
    proc.add(
        101,
        "helper",
        20,
        &["helper", "-v"],
        &containerd(UID_1, CONTAINER_A),
    );
    proc.remove(100);
    discovery.read_marked(&HashSet::from([100, 101]));
    let changes = discovery.pods_changed(&snapshot);
    assert_eq!(changes.removed, [100]);
    let added: Vec<(u32, &str)> = changes
        .added
        .iter()
        .map(|entity| (entity.pid, entity.process_name.as_str()))
        .collect();
    assert_eq!(added, [(101, "helper")]);

    // The next scan, given the same marks, finds nothing new.
    assert_eq!(
        discovery
            .scan(&snapshot, Some(&HashSet::from([100, 101])))
            .unwrap(),
        ScanChanges::default()
    );
}

#[test]
fn names_stay_unique_across_pods_that_share_an_instance() {
    let proc = FakeProc(tempfile::tempdir().unwrap());
    proc.add(
        100,
        "server",
        10,
        &["server"],
        &containerd(UID_1, CONTAINER_A),
    );
    proc.add(
        200,
        "server",
        20,
        &["server"],
        &containerd(UID_2, CONTAINER_B),
    );
    let mut snapshot = ClusterSnapshot {
        pods: vec![
            pod("cart-1", UID_1, "1", &[("app", CONTAINER_A)]),
            pod("cart-2", UID_2, "1", &[("app", CONTAINER_B)]),
        ],
        services: vec![service()],
    };
    // Every pod is one instance: its processes' names must be unique across pods.
    let mut discovery = discovery_with_instance(&proc, "all-carts");
    let names = |changes: &ScanChanges| -> Vec<(u32, String)> {
        changes
            .added
            .iter()
            .map(|entity| (entity.pid, entity.process_name.clone()))
            .collect()
    };
    let changes = discovery.scan(&snapshot, None).unwrap();
    assert_eq!(
        names(&changes),
        [(100, "server".to_owned()), (200, "server-200".to_owned())]
    );

    // cart-1 goes: the younger process of cart-2, whose pod did not change, takes the name.
    snapshot.pods.remove(0);
    let changes = discovery.pods_changed(&snapshot);
    assert_eq!(changes.removed, [100, 200]);
    assert_eq!(names(&changes), [(200, "server".to_owned())]);
}

#[test]
fn many_processes_read_and_named_on_several_threads_are_all_found() {
    let proc = FakeProc(tempfile::tempdir().unwrap());
    let count = 3 * known_processes::PARALLEL_READS_MIN as u32;
    // Above any real pid (`pid_max` is at most 2^22): the test's own pid, whose cgroup names the
    // agent's own pod, must not be one of them.
    let first = 5_000_000;
    for pid in first..first + count {
        let container = if pid % 2 == 0 {
            CONTAINER_A
        } else {
            CONTAINER_B
        };
        proc.add(
            pid,
            "worker",
            u64::from(pid),
            &["worker"],
            &containerd(UID_1, container),
        );
    }
    let snapshot = ClusterSnapshot {
        pods: vec![pod(
            "cart-1",
            UID_1,
            "1",
            &[("app", CONTAINER_A), ("helper", CONTAINER_B)],
        )],
        services: vec![service()],
    };
    let mut discovery = discovery(&proc);
    let changes = discovery.scan(&snapshot, None).unwrap();
    let pids: Vec<u32> = changes.added.iter().map(|entity| entity.pid).collect();
    assert_eq!(pids, (first..first + count).collect::<Vec<_>>());
    // The oldest keeps the bare name; every name is unique.
    let names: HashSet<&str> = changes
        .added
        .iter()
        .map(|entity| entity.process_name.as_str())
        .collect();
    assert_eq!(names.len(), count as usize);
    assert!(names.contains("worker"));
    // Each in its own container (the two are named on two threads).
    for entity in &changes.added {
        let expected = if entity.pid % 2 == 0 { "app" } else { "helper" };
        assert!(
            entity
                .properties
                .contains(&("container_name", expected.to_owned())),
            "{entity:?}"
        );
    }
}

/// A list of processes as a test tells it; `None`: the list fails.
struct FakeList(Option<Vec<(u32, &'static str, u64, String)>>);

impl ProcessList for FakeList {
    fn list(&mut self) -> anyhow::Result<Vec<crate::process::ListedProcess>> {
        let processes = self
            .0
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the list broke"))?;
        Ok(processes
            .iter()
            .map(
                |(pid, comm, start_time, cgroup)| crate::process::ListedProcess {
                    pid: *pid,
                    stat: crate::process::proc_files::Stat {
                        comm: (*comm).to_owned(),
                        state: 'S',
                        flags: 0,
                        start_time: *start_time,
                    },
                    cgroup_file: Some(cgroup.clone()),
                    has_exe_file: true,
                    // Nowhere: the command line is read from `cmdline`.
                    arguments: 0..0,
                },
            )
            .collect())
    }
}

#[test]
fn a_list_s_processes_are_taken_as_listed_and_those_it_leaves_out_read_from_procfs() {
    let proc = FakeProc(tempfile::tempdir().unwrap());
    let uid = "11111111-2222-3333-4444-555555555555";
    // procfs puts 100 in no container; the list puts it in container A: the list is believed.
    proc.add(100, "server", 10, &["/app/server"], "0::/user.slice\n");
    // The list leaves 101 out (a kernel may hide tasks from iterators): procfs is read.
    proc.add(
        101,
        "helper",
        20,
        &["helper"],
        &containerd(uid, CONTAINER_A),
    );
    let snapshot = ClusterSnapshot {
        pods: vec![pod("cart-1", uid, "7", &[("app", CONTAINER_A)])],
        services: vec![service()],
    };
    let mut listing = discovery(&proc);
    listing.list_processes_with(Box::new(FakeList(Some(vec![(
        100,
        "server",
        10,
        containerd(uid, CONTAINER_A),
    )]))));
    let changes = listing.scan(&snapshot, None).unwrap();
    let pids: Vec<u32> = changes.added.iter().map(|entity| entity.pid).collect();
    assert_eq!(pids, [100, 101]);
    let command_line = changes.added[0]
        .properties
        .iter()
        .find(|(key, _)| *key == "command_line")
        .map(|(_, value)| value.as_str());
    assert_eq!(command_line, Some("/app/server"), "read from `cmdline`");

    // A list that breaks is dropped: procfs is read, and 100 is in no container there.
    let mut fallback = discovery(&proc);
    fallback.list_processes_with(Box::new(FakeList(None)));
    let changes = fallback.scan(&snapshot, None).unwrap();
    let pids: Vec<u32> = changes.added.iter().map(|entity| entity.pid).collect();
    assert_eq!(pids, [101]);
}
