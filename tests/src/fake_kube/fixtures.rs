//! Pods and Services as a test writes them: the fields discovery reads, with values in the
//! shapes the API server gives them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerStatus, Pod, PodIP, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest as _, Sha256};

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

/// A running pod `namespace/name` on `node_name` with `labels` and one container `app` whose
/// id is `containerd://` and 64 hex digits derived from the pod's name.
pub fn pod(namespace: &str, name: &str, node_name: &str, labels: &[(&str, &str)]) -> Pod {
    let container_id = format!("containerd://{}", hex64(&format!("{namespace}/{name}/app")));
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: (!labels.is_empty()).then(|| map(labels)),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: (!node_name.is_empty()).then(|| node_name.to_owned()),
            containers: vec![Container {
                name: "app".to_owned(),
                image: Some("registry.example/app:1.0".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_owned()),
            pod_ip: Some("10.244.1.7".to_owned()),
            pod_ips: Some(vec![PodIP {
                ip: "10.244.1.7".to_owned(),
            }]),
            host_ip: Some("192.168.49.2".to_owned()),
            container_statuses: Some(vec![ContainerStatus {
                name: "app".to_owned(),
                container_id: Some(container_id),
                image: "registry.example/app:1.0".to_owned(),
                image_id: String::new(),
                ready: true,
                restart_count: 0,
                started: Some(true),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        }),
    }
}

/// A ClusterIP Service `namespace/name` selecting `selector` (none when empty), port 80.
pub fn service(namespace: &str, name: &str, selector: &[(&str, &str)]) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            selector: (!selector.is_empty()).then(|| map(selector)),
            type_: Some("ClusterIP".to_owned()),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// 64 hex digits that depend on `seed`: the shape of a container id.
pub fn hex64(seed: &str) -> String {
    Sha256::digest(seed.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
