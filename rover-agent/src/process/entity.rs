//! What the backend is told about one process: its entity names and properties
//! (`EBPFProcessProperties` in SkyWalking's process protocol).

use std::net::IpAddr;

/// Where a process was found; the backend reports each kind in its own protocol one-of
/// (`hostProcess` or `k8sProcess`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProcessOrigin {
    /// Matched by a host rule (`process_discovery.scanner.regex[]`).
    Host,
    /// A process of a container of a pod on this node, named by the analyzers
    /// (`process_discovery.kubernetes.analyzers[]`).
    Kubernetes,
}

/// Where a Kubernetes process runs: its pod and container.
#[derive(Clone, Copy, Debug)]
pub struct PodPlacement<'a> {
    /// The pod's IP (`status.podIP`), reported as `container_ip`; empty while it has none.
    pub pod_ip: &'a str,
    pub pod_name: &'a str,
    pub container_name: &'a str,
}

/// The names a source gives a process, before they become a [`ProcessEntity`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntityNames {
    /// An OAP layer name (`OS_LINUX`, `GENERAL`, ...); keepAlive fails on an unknown one.
    pub layer: String,
    /// Without the cluster prefix: [`ProcessEntity::host`] adds it.
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    pub labels: Vec<String>,
}

/// One process as the backend sees it. Two entities are the same report exactly when they are
/// equal: any change (names, properties) has to be re-reported.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessEntity {
    /// Host pid (the thread-group id).
    pub pid: u32,
    pub origin: ProcessOrigin,
    pub layer: String,
    /// With the `<cluster_name>::` prefix when a cluster name is configured.
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    pub labels: Vec<String>,
    /// Key/value properties in the order the protocol lists them.
    pub properties: Vec<(&'static str, String)>,
}

/// What a backend reply names a process by: matched, together with the pid, against the
/// `entityMetadata` of `EBPFReportProcessDownstream` entries. Labels are sorted, since the
/// backend may return them in another order.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EntityIdentity {
    pub layer: String,
    pub service_name: String,
    pub instance_name: String,
    pub process_name: String,
    pub labels: Vec<String>,
}

impl ProcessEntity {
    /// A process found by a host rule, with the properties the protocol asks of host processes:
    /// `host_ip`, `pid`, `command_line`, `support_ebpf_profiling`.
    ///
    /// `profilable` is whether the agent can profile the process: the OAP only starts profiling
    /// tasks for a process whose `support_ebpf_profiling` is the string `"true"`.
    pub fn host(
        pid: u32,
        names: EntityNames,
        cluster_name: Option<&str>,
        host_ip: IpAddr,
        command_line: &str,
        profilable: bool,
    ) -> Self {
        let properties = vec![
            ("host_ip", host_ip.to_string()),
            ("pid", pid.to_string()),
            ("command_line", command_line.to_owned()),
            ("support_ebpf_profiling", profilable.to_string()),
        ];
        Self {
            pid,
            origin: ProcessOrigin::Host,
            layer: names.layer,
            service_name: service_name_in_cluster(cluster_name, names.service_name),
            instance_name: names.instance_name,
            process_name: names.process_name,
            labels: names.labels,
            properties,
        }
    }

    /// A process of a pod's container, with the properties the protocol asks of Kubernetes
    /// processes, in its order: `host_ip`, `container_ip`, `container_name`, `pod_name`, `pid`,
    /// `command_line`, `support_ebpf_profiling`.
    pub fn kubernetes(
        pid: u32,
        names: EntityNames,
        cluster_name: Option<&str>,
        host_ip: IpAddr,
        placement: PodPlacement<'_>,
        command_line: &str,
        profilable: bool,
    ) -> Self {
        let properties = vec![
            ("host_ip", host_ip.to_string()),
            ("container_ip", placement.pod_ip.to_owned()),
            ("container_name", placement.container_name.to_owned()),
            ("pod_name", placement.pod_name.to_owned()),
            ("pid", pid.to_string()),
            ("command_line", command_line.to_owned()),
            ("support_ebpf_profiling", profilable.to_string()),
        ];
        Self {
            pid,
            origin: ProcessOrigin::Kubernetes,
            layer: names.layer,
            service_name: service_name_in_cluster(cluster_name, names.service_name),
            instance_name: names.instance_name,
            process_name: names.process_name,
            labels: names.labels,
            properties,
        }
    }

    /// The identity a backend reply is matched by (with the pid).
    pub fn identity(&self) -> EntityIdentity {
        EntityIdentity::new(
            &self.layer,
            &self.service_name,
            &self.instance_name,
            &self.process_name,
            &self.labels,
        )
    }
}

impl EntityIdentity {
    pub fn new(
        layer: &str,
        service_name: &str,
        instance_name: &str,
        process_name: &str,
        labels: &[String],
    ) -> Self {
        let mut labels = labels.to_vec();
        labels.sort_unstable();
        Self {
            layer: layer.to_owned(),
            service_name: service_name.to_owned(),
            instance_name: instance_name.to_owned(),
            process_name: process_name.to_owned(),
            labels,
        }
    }
}

/// `<cluster_name>::<service_name>` when a (non-empty) cluster name is configured, as Rover does,
/// so that services of different clusters do not merge in the backend; a name that already has a
/// `::` is taken as qualified and kept.
pub fn service_name_in_cluster(cluster_name: Option<&str>, service_name: String) -> String {
    match cluster_name {
        Some(cluster) if !cluster.is_empty() && !service_name.contains("::") => {
            format!("{cluster}::{service_name}")
        }
        _ => service_name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn names(service: &str, labels: &[&str]) -> EntityNames {
        EntityNames {
            layer: "OS_LINUX".to_owned(),
            service_name: service.to_owned(),
            instance_name: "10.0.0.7".to_owned(),
            process_name: "java".to_owned(),
            labels: labels.iter().map(|label| (*label).to_owned()).collect(),
        }
    }

    #[test]
    fn host_entity_has_the_protocol_properties_in_order() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        let entity =
            ProcessEntity::host(42, names("shop", &[]), None, ip, "java -jar shop.jar", true);
        let properties: Vec<(&str, &str)> = entity
            .properties
            .iter()
            .map(|(key, value)| (*key, value.as_str()))
            .collect();
        assert_eq!(
            properties,
            [
                ("host_ip", "10.0.0.7"),
                ("pid", "42"),
                ("command_line", "java -jar shop.jar"),
                ("support_ebpf_profiling", "true"),
            ]
        );
        assert_eq!(entity.origin, ProcessOrigin::Host);
        let unprofilable = ProcessEntity::host(42, names("shop", &[]), None, ip, "x", false);
        assert_eq!(unprofilable.properties[3].1, "false");
    }

    #[test]
    fn cluster_prefix_unless_already_qualified() {
        assert_eq!(
            service_name_in_cluster(Some("prod"), "shop".into()),
            "prod::shop"
        );
        assert_eq!(
            service_name_in_cluster(Some("prod"), "eu::shop".into()),
            "eu::shop"
        );
        assert_eq!(service_name_in_cluster(None, "shop".into()), "shop");
        assert_eq!(service_name_in_cluster(Some(""), "shop".into()), "shop");
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let entity = ProcessEntity::host(1, names("shop", &[]), Some("prod"), ip, "x", true);
        assert_eq!(entity.service_name, "prod::shop");
    }

    #[test]
    fn identity_sorts_labels_and_keeps_the_entity_order() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let entity = ProcessEntity::host(1, names("shop", &["b", "a"]), None, ip, "x", true);
        assert_eq!(entity.labels, ["b", "a"]);
        let identity = entity.identity();
        assert_eq!(identity.labels, ["a", "b"]);
        assert_eq!(identity.service_name, "shop");
        assert_eq!(identity.process_name, "java");
    }
}
