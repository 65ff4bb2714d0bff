//! The pods scheduled on this node and the Services of their namespaces, kept in memory by
//! kube-rs's watcher and reflector: one watcher per kind and namespace (or one per kind for all
//! namespaces), each a task feeding its store.

use std::fmt::Debug;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt as _, StreamExt as _};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::serde::de::DeserializeOwned;
use kube::runtime::reflector::{Store, store::Writer};
use kube::runtime::utils::Backoff as _;
use kube::runtime::watcher::{self, DefaultBackoff};
use kube::runtime::{WatchStreamExt as _, watcher::watcher};
use kube::{Api, Resource, ResourceExt as _};
use tokio::sync::watch as signal;
use tokio::task::JoinHandle;
use tracing::debug;

use super::Error;
use super::api_server::ApiServer;
use super::reachability::Reachability;
use super::service_match::service_of_pod;

/// What the watch holds at one moment, in no particular order (sorting it cost more than a pod
/// event's whole pass: nothing that reads it depends on the order).
#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
}

impl ClusterSnapshot {
    /// The Service `pod` belongs to ([`service_of_pod`]).
    pub fn service_of(&self, pod: &Pod) -> Option<&Service> {
        service_of_pod(pod, &self.services)
    }
}

/// Watches the pods on one node and the Services of the watched namespaces. Dropping it stops
/// the watchers.
pub struct PodWatch {
    server: String,
    pods: Vec<Store<Pod>>,
    services: Vec<Store<Service>>,
    changes: signal::Receiver<u64>,
    watchers: Watchers,
}

impl PodWatch {
    /// Starts watching the pods whose `spec.nodeName` is `node_name` and the Services, in
    /// `namespaces` (all when empty). Returns at once; [`wait_until_ready`](Self::wait_until_ready)
    /// waits for the first listing. Must be called inside a tokio runtime.
    pub fn start(
        api_server: &ApiServer,
        node_name: &str,
        namespaces: &[String],
    ) -> Result<Self, Error> {
        if !is_node_name(node_name) {
            return Err(Error::NodeName {
                node_name: node_name.to_owned(),
            });
        }
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let mut scopes: Vec<Option<&str>> = namespaces
            .iter()
            .map(|namespace| namespace.trim())
            .filter(|namespace| !namespace.is_empty())
            .map(Some)
            .collect();
        scopes.sort_unstable();
        scopes.dedup();
        if scopes.is_empty() {
            scopes.push(None);
        }

        let (changed, changes) = signal::channel(0);
        let changed = Arc::new(changed);
        let pods_on_node = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
        let mut watch = Self {
            server: api_server.url().to_owned(),
            pods: Vec::new(),
            services: Vec::new(),
            changes,
            watchers: Watchers(Vec::new()),
        };
        for scope in scopes {
            let context = Context {
                reachability: api_server.reachability(),
                changed: Arc::clone(&changed),
            };
            let in_scope = scope.map_or_else(
                || "all namespaces".to_owned(),
                |namespace| format!("namespace {namespace}"),
            );
            let (store, task) = spawn_watcher(
                &runtime,
                api(api_server, scope),
                pods_on_node.clone(),
                format!("pods on node {node_name} in {in_scope}"),
                context.clone(),
            );
            watch.pods.push(store);
            watch.watchers.0.push(task);
            let (store, task) = spawn_watcher(
                &runtime,
                api(api_server, scope),
                watcher::Config::default(),
                format!("Services in {in_scope}"),
                context,
            );
            watch.services.push(store);
            watch.watchers.0.push(task);
        }
        Ok(watch)
    }

    /// The pods and Services as last seen.
    pub fn snapshot(&self) -> ClusterSnapshot {
        ClusterSnapshot {
            pods: self.pods.iter().flat_map(Store::state).collect(),
            services: self.services.iter().flat_map(Store::state).collect(),
        }
    }

    /// A counter bumped whenever a pod or Service is added, changed or removed (or a listing
    /// replaced them all): `changed().await` on it, then take a [`snapshot`](Self::snapshot).
    pub fn changes(&self) -> signal::Receiver<u64> {
        self.changes.clone()
    }

    /// Whether every watcher has completed its first listing.
    pub fn is_ready(&self) -> bool {
        self.pods
            .iter()
            .all(|store| store.wait_until_ready().now_or_never().is_some())
            && self
                .services
                .iter()
                .all(|store| store.wait_until_ready().now_or_never().is_some())
    }

    /// Waits at most `timeout` for every watcher's first listing.
    pub async fn wait_until_ready(&self, timeout: Duration) -> Result<(), Error> {
        let all_listed = async {
            // Err only when a store's writer is gone: its watcher task ended.
            let mut listed = true;
            for store in &self.pods {
                listed &= store.wait_until_ready().await.is_ok();
            }
            for store in &self.services {
                listed &= store.wait_until_ready().await.is_ok();
            }
            listed
        };
        match tokio::time::timeout(timeout, all_listed).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(Error::NotReady {
                server: self.server.clone(),
                waited: timeout,
            }),
        }
    }
}

/// What every watcher task shares.
#[derive(Clone)]
struct Context {
    reachability: Arc<Reachability>,
    changed: Arc<signal::Sender<u64>>,
}

/// The watcher tasks, aborted on drop.
struct Watchers(Vec<JoinHandle<()>>);

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn api<K>(api_server: &ApiServer, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(namespace) => Api::namespaced(api_server.client(), namespace),
        None => Api::all(api_server.client()),
    }
}

/// A task running kube-rs's watcher of `api` with its default backoff into a store.
///
/// kube-rs re-lists by itself when a watch answers `410 Gone` with an `ERROR` event (what API
/// servers send for a too old resource version), but not when the watch request itself is
/// answered `410` (it would retry the same resource version forever): then the watcher is
/// started afresh, which lists again, after kube-rs's default backoff.
fn spawn_watcher<K>(
    runtime: &tokio::runtime::Handle,
    api: Api<K>,
    config: watcher::Config,
    what: String,
    context: Context,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut writer: Writer<K> = Writer::default();
    let store = writer.as_reader();
    let task = runtime.spawn(async move {
        let mut restarts = DefaultBackoff::default();
        loop {
            let mut events = pin!(watcher(api.clone(), config.clone()).default_backoff());
            while let Some(event) = events.next().await {
                match event {
                    Ok(event) => {
                        restarts.reset();
                        // Managed fields are the largest part of a pod and of no use here.
                        let event = event.modify(|object| object.managed_fields_mut().clear());
                        writer.apply_watcher_event(&event);
                        if changes_the_store(&event) {
                            context.changed.send_modify(|count| *count += 1);
                        }
                    }
                    Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                        debug!("{what}: resource version expired, listing again");
                    }
                    Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                        if status.code == 410 =>
                    {
                        debug!("{what}: watch refused with 410 Gone, starting over");
                        break;
                    }
                    Err(error) => {
                        context.reachability.failed(&what, &error);
                    }
                }
            }
            // The watcher stream never ends by itself: this is a restart after a 410.
            let delay = restarts.next().unwrap_or(Duration::from_secs(30));
            tokio::time::sleep(delay).await;
        }
    });
    (store, task)
}

/// Whether the store differs after `event`: a listing fills a buffer swapped in at `InitDone`.
fn changes_the_store<K>(event: &watcher::Event<K>) -> bool {
    matches!(
        event,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
    )
}

/// A DNS subdomain (RFC 1123), as node names are: also what keeps the field selector intact
/// (no `,` or `=` to escape).
fn is_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for good in [
            "node-a",
            "ip-10-0-1-17.eu-west-1.compute.internal",
            "n1",
            "7",
        ] {
            assert!(is_node_name(good), "{good}");
        }
        for bad in [
            "",
            "Node-A",
            "node a",
            "node,spec.nodeName=other",
            "a=b",
            "-node",
            "node-",
            "a..b",
            &"x".repeat(254),
        ] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_bad_node_name_is_refused_naming_the_config_key() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let api_server = ApiServer::from_config(config).expect("client");
        let Err(error) = PodWatch::start(&api_server, "", &[]) else {
            panic!("an empty node name was accepted");
        };
        assert!(
            error
                .to_string()
                .contains("process_discovery.kubernetes.node_name \"\""),
            "{error}"
        );
    }

    #[test]
    fn creating_a_client_or_watch_outside_a_runtime_is_an_error_not_a_panic() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        assert!(matches!(
            ApiServer::from_config(config.clone()),
            Err(Error::NoRuntime)
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let api_server = {
            let _guard = runtime.enter();
            ApiServer::from_config(config).expect("client")
        };
        drop(runtime);
        assert!(matches!(
            PodWatch::start(&api_server, "node-a", &[]),
            Err(Error::NoRuntime)
        ));
    }
}
