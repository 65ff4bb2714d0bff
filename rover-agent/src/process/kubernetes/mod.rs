//! Kubernetes: the processes of the pods on this node, named by Rover's analyzers
//! ([`analyzer`]), and the one place that talks to the API server. A client from a kubeconfig
//! (`KUBECONFIG`) or the pod's service account ([`ApiServer`]), and a watch of the pods scheduled
//! on this node and of the Services of their namespaces ([`PodWatch`]), kept in memory by
//! kube-rs's own watcher and reflector with its default backoff: re-listing after a `410 Gone`
//! and reconnecting after the API server went away come from kube-rs, not from this module.

pub mod analyzer;
mod api_server;
mod discovery;
mod reachability;
mod service_match;
mod watch;

use std::time::Duration;

pub use api_server::ApiServer;
pub use discovery::{DiscoveryError, KubernetesDiscovery};
pub use service_match::service_of_pod;
pub use watch::{ClusterSnapshot, PodWatch};

/// What setting up the Kubernetes watch can fail with. Once started, a watch does not fail:
/// it retries with backoff while the API server is unreachable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no Kubernetes API server to talk to: set KUBECONFIG to a kubeconfig file, or run the \
         agent in a pod with a service account (KUBERNETES_SERVICE_HOST set, token mounted in \
         /var/run/secrets/kubernetes.io/serviceaccount); {source}"
    )]
    NoConfig {
        #[source]
        source: Box<kube::config::InferConfigError>,
    },
    #[error("cannot build a client for the Kubernetes API server {server}")]
    Client {
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "process_discovery.kubernetes.node_name {node_name:?} is not a node name (lowercase \
         letters, digits, '-' and '.'; in a DaemonSet set it from spec.nodeName)"
    )]
    NodeName { node_name: String },
    #[error("the Kubernetes client and watch must be created inside a tokio runtime")]
    NoRuntime,
    #[error(
        "the pods and Services from the Kubernetes API server {server} were not listed within \
         {waited:?}"
    )]
    NotReady { server: String, waited: Duration },
}
