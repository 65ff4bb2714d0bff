//! A fake Kubernetes API server for tests: plain HTTP on 127.0.0.1, serving pods and Services
//! the way the real API server does, so the agent's real kube-rs client can be driven by it.
//!
//! - `GET /api/v1/{pods,services}` and `/api/v1/namespaces/{ns}/{pods,services}` list (a
//!   `PodList`/`ServiceList` with `metadata.resourceVersion`, every item in one page: `limit` is
//!   ignored, as the API server does when it serves a list from its watch cache).
//! - The same with `?watch=true` (or `1`) stream newline-delimited events
//!   `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":...}`: from `resourceVersion=N`,
//!   every change after N, then live changes; without one (or `0`), an `ADDED` per current
//!   object first. As a field-selected watch of the API server does, a change that makes an
//!   object match is `ADDED` and one that makes it stop matching is `DELETED`. `BOOKMARK`s go
//!   only to watches that asked for them (`allowWatchBookmarks=true`), when the test calls
//!   [`FakeKube::send_bookmarks`].
//! - `fieldSelector` with `=`, `==`, `!=` on the fields the API server supports
//!   (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`, ...); others are
//!   refused with `400` as the API server does. `labelSelector` is not supported (`400`).
//! - One resource version counter for all objects, as etcd's. [`FakeKube::expire_history`]
//!   moves it on and forgets the changes so far, like a compaction: a watch resuming from any
//!   version seen before is answered `410 Gone` — a `200` whose only event is an `ERROR` with a `Status` of code 410
//!   ("too old resource version"), as the API server answers, or, with
//!   [`FakeKube::set_gone_as_http_status`], an HTTP `410`. [`FakeKube::end_watches`] closes the
//!   open watches (their clients reconnect); [`FakeKube::force_gone`] does both.
//! - A watch ends after its `timeoutSeconds` (60 s when missing, at most 30 min), when the test
//!   ends watches, or when the server stops.
//!
//! Every request is recorded ([`RecordedRequest`]: resource, namespace, query, the answer).
//! The server runs on a runtime of its own, so [`FakeKube::stop`] kills it like a crashed API
//! server and [`FakeKube::start_again`] listens on the same port; objects, history and
//! recorded requests are kept. [`FakeKube::write_kubeconfig`] writes a kubeconfig for it.

mod filter;
mod fixtures;

pub use fixtures::{hex64, pod, service};

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use axum::routing::get;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, WatchEvent};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use filter::Filter;

/// Changes kept for watches to resume from; older ones are forgotten as by a compaction.
const HISTORY: usize = 4096;
/// Live changes a watch may fall behind by before it is closed (its client resumes).
const LIVE_BUFFER: usize = 1024;
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(60);
const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// The resources the fake serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Services,
}

impl Kind {
    /// The resource name in URLs.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Services => "services",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Services => "Service",
        }
    }

    /// The fields the API server accepts in a field selector for this resource.
    fn selectable_fields(self) -> &'static [&'static str] {
        match self {
            Self::Pods => &[
                "metadata.name",
                "metadata.namespace",
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ],
            Self::Services => &["metadata.name", "metadata.namespace"],
        }
    }

    /// A `BOOKMARK` event's object: the kind with only `metadata.resourceVersion`.
    fn bookmark(self, resource_version: u64) -> Value {
        let metadata = ObjectMeta {
            resource_version: Some(resource_version.to_string()),
            ..ObjectMeta::default()
        };
        let object = match self {
            Self::Pods => serde_json::to_value(Pod {
                metadata,
                ..Pod::default()
            }),
            Self::Services => serde_json::to_value(Service {
                metadata,
                ..Service::default()
            }),
        };
        object.unwrap_or(Value::Null)
    }
}

/// One request the fake answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub kind: Kind,
    /// From the path: `None` for the cluster-wide `/api/v1/pods`.
    pub namespace: Option<String>,
    /// The query parameters as decoded.
    pub query: BTreeMap<String, String>,
    pub watch: bool,
    /// The HTTP status answered.
    pub status: u16,
    /// Whether the answer was `410 Gone` (an `ERROR` event or the HTTP status).
    pub gone: bool,
}

impl RecordedRequest {
    pub fn field_selector(&self) -> Option<&str> {
        self.query.get("fieldSelector").map(String::as_str)
    }

    pub fn resource_version(&self) -> Option<&str> {
        self.query.get("resourceVersion").map(String::as_str)
    }

    pub fn is_list(&self) -> bool {
        !self.watch
    }
}

impl fmt::Display for RecordedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = match &self.namespace {
            Some(namespace) => format!("/api/v1/namespaces/{namespace}/{}", self.kind.plural()),
            None => format!("/api/v1/{}", self.kind.plural()),
        };
        let query: Vec<String> = self
            .query
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        write!(f, "GET {path}?{} → {}", query.join("&"), self.status)?;
        if self.gone {
            write!(f, " (410 Gone)")?;
        }
        Ok(())
    }
}

/// A change of one object, kept for watches resuming from an older resource version.
struct Change {
    resource_version: u64,
    kind: Kind,
    /// Before the change; `None` for a creation.
    old: Option<Value>,
    /// After the change; `None` for a deletion.
    new: Option<Value>,
}

impl Change {
    /// The event a watch with `filter` gets for this change, if any.
    fn event(&self, kind: Kind, filter: &Filter) -> Option<Bytes> {
        if self.kind != kind {
            return None;
        }
        let was = self.old.as_ref().is_some_and(|old| filter.matches(old));
        let is = self.new.as_ref().is_some_and(|new| filter.matches(new));
        let event = match (was, is, &self.old, &self.new) {
            (false, true, _, Some(new)) => WatchEvent::Added(new.clone()),
            (true, true, _, Some(new)) => WatchEvent::Modified(new.clone()),
            // Deleted, or no longer matching: the last state, at this change's version.
            (true, false, Some(old), _) => {
                let mut last = old.clone();
                last["metadata"]["resourceVersion"] = self.resource_version.to_string().into();
                WatchEvent::Deleted(last)
            }
            _ => return None,
        };
        Some(line(&event))
    }
}

/// What live watches are sent.
enum Live {
    Change(Arc<Change>),
    Bookmark(u64),
}

struct Objects {
    resource_version: u64,
    /// Watches from an older resource version are answered `410 Gone`.
    oldest_watchable: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: VecDeque<Arc<Change>>,
    requests: Vec<RecordedRequest>,
    gone_as_http_status: bool,
    /// Kinds whose lists and watches are answered `403 Forbidden` (a ClusterRole without them).
    forbidden: BTreeSet<Kind>,
}

/// The state shared by the server and the test.
struct Shared {
    objects: Mutex<Objects>,
    live: broadcast::Sender<Arc<Live>>,
    /// Bumped to close every open watch.
    end_watches: watch::Sender<u64>,
    /// Bumped on every recorded request, for [`FakeKube::wait_for_requests`].
    recorded: watch::Sender<u64>,
}

impl Shared {
    fn objects(&self) -> MutexGuard<'_, Objects> {
        // A test thread that panicked while holding the lock leaves the data usable.
        self.objects
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, objects: &mut Objects, request: RecordedRequest) {
        objects.requests.push(request);
        self.recorded.send_modify(|count| *count += 1);
    }

    /// Stores `change`, sends it to live watches and forgets the oldest kept change when there
    /// are too many. Called with the lock held, so watches see changes in order.
    fn publish(&self, objects: &mut Objects, change: Change) {
        let change = Arc::new(change);
        objects.history.push_back(Arc::clone(&change));
        if objects.history.len() > HISTORY
            && let Some(forgotten) = objects.history.pop_front()
        {
            objects.oldest_watchable = forgotten.resource_version;
        }
        // Err: no watch is open.
        let _ = self.live.send(Arc::new(Live::Change(change)));
    }
}

/// A running (or stopped) fake API server. Dropping it kills the server.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The runtime serving HTTP; `None` while stopped.
    server: Option<tokio::runtime::Runtime>,
}

impl FakeKube {
    /// Starts a fake with no objects on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let (end_watches, _) = watch::channel(0);
        let (recorded, _) = watch::channel(0);
        let mut fake = Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            shared: Arc::new(Shared {
                objects: Mutex::new(Objects {
                    // Not 0: "0" means "any version" to the API.
                    resource_version: 100,
                    oldest_watchable: 100,
                    objects: BTreeMap::new(),
                    history: VecDeque::new(),
                    requests: Vec::new(),
                    gone_as_http_status: false,
                    forbidden: BTreeSet::new(),
                }),
                live,
                end_watches,
                recorded,
            }),
            server: None,
        };
        fake.serve()?;
        Ok(fake)
    }

    /// Binds `self.addr` (remembering the port picked for port 0) and serves on a new runtime.
    fn serve(&mut self) -> anyhow::Result<()> {
        let listener = bind(self.addr)
            .with_context(|| format!("fake Kubernetes API: binding {}", self.addr))?;
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-kube")
            .enable_all()
            .build()
            .context("fake Kubernetes API: runtime")?;
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let router = Router::new()
            .route("/api/v1/pods", get(cluster_pods))
            .route("/api/v1/services", get(cluster_services))
            .route("/api/v1/namespaces/{namespace}/pods", get(namespace_pods))
            .route(
                "/api/v1/namespaces/{namespace}/services",
                get(namespace_services),
            )
            .fallback(not_found)
            .with_state(Arc::clone(&self.shared));
        let addr = self.addr;
        runtime.spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                eprintln!("fake Kubernetes API on {addr}: server error: {error}");
            }
        });
        self.server = Some(runtime);
        Ok(())
    }

    /// The address it listens on (the same after [`start_again`](Self::start_again)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the server like a crash: the listener and all connections close at once, open
    /// watches are cut. Objects, history and recorded requests are kept.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.server.take() {
            runtime.shutdown_background();
        }
    }

    /// Listens again on the same address after [`stop`](Self::stop).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.server.is_none(),
            "fake Kubernetes API is already running"
        );
        self.serve()
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Creates or replaces the pod (its namespace defaults to `default`); returns its new
    /// resource version. Open watches get the change.
    pub fn apply_pod(&self, pod: Pod) -> u64 {
        self.apply(Kind::Pods, serde_json::to_value(pod))
    }

    /// Deletes the pod; returns the deletion's resource version, `None` when there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Pods, namespace, name)
    }

    /// Creates or replaces the Service, as [`apply_pod`](Self::apply_pod).
    pub fn apply_service(&self, service: Service) -> u64 {
        self.apply(Kind::Services, serde_json::to_value(service))
    }

    pub fn delete_service(&self, namespace: &str, name: &str) -> Option<u64> {
        self.delete(Kind::Services, namespace, name)
    }

    fn apply(&self, kind: Kind, object: serde_json::Result<Value>) -> u64 {
        let mut object = object.expect("k8s-openapi objects serialize");
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("a {} needs metadata.name", kind.kind()))
            .to_owned();
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let mut objects = self.shared.objects();
        objects.resource_version += 1;
        let resource_version = objects.resource_version;
        let key = (kind, namespace.clone(), name.clone());
        let old = objects.objects.get(&key).cloned();
        let metadata = &mut object["metadata"];
        metadata["namespace"] = namespace.clone().into();
        metadata["resourceVersion"] = resource_version.to_string().into();
        metadata["uid"] = old.as_ref().map_or_else(
            || uid(kind, &namespace, &name).into(),
            |old| old["metadata"]["uid"].clone(),
        );
        objects.objects.insert(key, object.clone());
        self.shared.publish(
            &mut objects,
            Change {
                resource_version,
                kind,
                old,
                new: Some(object),
            },
        );
        resource_version
    }

    fn delete(&self, kind: Kind, namespace: &str, name: &str) -> Option<u64> {
        let mut objects = self.shared.objects();
        let old = objects
            .objects
            .remove(&(kind, namespace.to_owned(), name.to_owned()))?;
        objects.resource_version += 1;
        let resource_version = objects.resource_version;
        self.shared.publish(
            &mut objects,
            Change {
                resource_version,
                kind,
                old: Some(old),
                new: None,
            },
        );
        Some(resource_version)
    }

    /// The current resource version (of the last change).
    pub fn resource_version(&self) -> u64 {
        self.shared.objects().resource_version
    }

    /// Moves the resource version on (as changes of other resources in a cluster do) and
    /// forgets the changes so far, like a compaction: a watch resuming from any version seen
    /// until now is answered `410 Gone`. Open watches go on.
    pub fn expire_history(&self) {
        let mut objects = self.shared.objects();
        objects.resource_version += 1;
        objects.history.clear();
        objects.oldest_watchable = objects.resource_version;
    }

    /// Closes every open watch cleanly, as the API server does at a watch's timeout; clients
    /// watch again from the last version they saw.
    pub fn end_watches(&self) {
        self.shared.end_watches.send_modify(|count| *count += 1);
    }

    /// [`expire_history`](Self::expire_history) then [`end_watches`](Self::end_watches): every
    /// client's next watch is answered `410 Gone`, so it must list again.
    pub fn force_gone(&self) {
        self.expire_history();
        self.end_watches();
    }

    /// Answers watches from an expired version with an HTTP `410` instead of a `200` with an
    /// `ERROR` event (what the API server sends).
    pub fn set_gone_as_http_status(&self, http_status: bool) {
        self.shared.objects().gone_as_http_status = http_status;
    }

    /// Answers lists and watches of `kind` with `403 Forbidden` while `forbidden`, as the API
    /// server does for a service account whose role lacks them.
    pub fn forbid(&self, kind: Kind, forbidden: bool) {
        let mut objects = self.shared.objects();
        if forbidden {
            objects.forbidden.insert(kind);
        } else {
            objects.forbidden.remove(&kind);
        }
    }

    /// Sends a `BOOKMARK` at the current resource version to every open watch that asked for
    /// bookmarks.
    pub fn send_bookmarks(&self) {
        let objects = self.shared.objects();
        let _ = self
            .shared
            .live
            .send(Arc::new(Live::Bookmark(objects.resource_version)));
    }

    /// Every request answered so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.objects().requests.clone()
    }

    pub fn clear_requests(&self) {
        self.shared.objects().requests.clear();
    }

    /// Waits until `condition` holds for the requests answered so far, at most `timeout`;
    /// returns them. The error lists them.
    pub async fn wait_for_requests(
        &self,
        condition: impl Fn(&[RecordedRequest]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<RecordedRequest>, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut recorded = self.shared.recorded.subscribe();
        loop {
            recorded.borrow_and_update();
            let requests = self.requests();
            if condition(&requests) {
                return Ok(requests);
            }
            // The sender lives in `self.shared`, so `changed` only returns on a change.
            if tokio::time::timeout_at(deadline, recorded.changed())
                .await
                .is_err()
            {
                let listed: Vec<String> = requests.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "fake Kubernetes API: condition not met after {timeout:?}; requests:\n{}",
                    listed.join("\n")
                ));
            }
        }
    }

    /// A kubeconfig whose current context is this server, over plain HTTP.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: fake\n  user:\n    token: fake-token\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            url = self.url()
        )
    }

    /// Writes [`kubeconfig`](Self::kubeconfig) to `dir/kubeconfig`, for `KUBECONFIG`.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(&path, self.kubeconfig())
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds `addr`, waiting a little while a stopped server's listener, closed by its runtime in
/// the background, still holds the port.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let mut attempts = 0;
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(error) if error.kind() == std::io::ErrorKind::AddrInUse && attempts < 200 => {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// The `metadata.uid` the fake gives the pod `namespace/name` (the same for every creation), which
/// names its cgroup on a node.
pub fn pod_uid(namespace: &str, name: &str) -> String {
    uid(Kind::Pods, namespace, name)
}

fn uid(kind: Kind, namespace: &str, name: &str) -> String {
    let hex = hex64(&format!("{}/{namespace}/{name}", kind.plural()));
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// One newline-terminated event.
fn line(event: &WatchEvent<Value>) -> Bytes {
    let mut bytes = serde_json::to_vec(event).expect("watch events serialize");
    bytes.push(b'\n');
    Bytes::from(bytes)
}

fn json_response(status: StatusCode, body: &impl k8s_openapi::serde::Serialize) -> Response {
    let body = serde_json::to_vec(body).expect("responses serialize");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a valid response")
}

/// A `Status` as the API server describes failures.
fn status(code: u16, reason: &str, message: String) -> Status {
    Status {
        code: Some(i32::from(code)),
        message: Some(message),
        metadata: ListMeta::default(),
        reason: Some(reason.to_owned()),
        status: Some("Failure".to_owned()),
        ..Status::default()
    }
}

fn failure(code: u16, reason: &str, message: String) -> Response {
    let http_status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(http_status, &status(code, reason, message))
}

type QueryMap = Query<HashMap<String, String>>;

async fn cluster_pods(State(shared): State<Arc<Shared>>, Query(query): QueryMap) -> Response {
    answer(&shared, Kind::Pods, None, query)
}

async fn cluster_services(State(shared): State<Arc<Shared>>, Query(query): QueryMap) -> Response {
    answer(&shared, Kind::Services, None, query)
}

async fn namespace_pods(
    State(shared): State<Arc<Shared>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): QueryMap,
) -> Response {
    answer(&shared, Kind::Pods, Some(namespace), query)
}

async fn namespace_services(
    State(shared): State<Arc<Shared>>,
    UrlPath(namespace): UrlPath<String>,
    Query(query): QueryMap,
) -> Response {
    answer(&shared, Kind::Services, Some(namespace), query)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    failure(
        404,
        "NotFound",
        format!("the server could not find the requested resource ({uri})"),
    )
}

/// A list or a watch of `kind`.
fn answer(
    shared: &Arc<Shared>,
    kind: Kind,
    namespace: Option<String>,
    query: HashMap<String, String>,
) -> Response {
    let query: BTreeMap<String, String> = query.into_iter().collect();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let mut objects = shared.objects();
    let mut request = RecordedRequest {
        kind,
        namespace: namespace.clone(),
        query: query.clone(),
        watch,
        status: 200,
        gone: false,
    };
    if objects.forbidden.contains(&kind) {
        request.status = 403;
        shared.record(&mut objects, request);
        return failure(
            403,
            "Forbidden",
            format!(
                "{} is forbidden: the service account cannot list or watch it",
                kind.plural()
            ),
        );
    }
    let refused = |objects: &mut Objects, mut request: RecordedRequest, message: String| {
        request.status = 400;
        shared.record(objects, request);
        failure(400, "BadRequest", message)
    };
    if query
        .get("labelSelector")
        .is_some_and(|selector| !selector.is_empty())
    {
        return refused(
            &mut objects,
            request,
            "the fake Kubernetes API supports no labelSelector".to_owned(),
        );
    }
    let filter = match Filter::new(
        kind,
        namespace,
        query.get("fieldSelector").map(String::as_str),
    ) {
        Ok(filter) => filter,
        Err(message) => return refused(&mut objects, request, message),
    };
    if !watch {
        let response = list(&objects, kind, &filter);
        shared.record(&mut objects, request);
        return response;
    }
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(text) => match text.parse::<u64>() {
            Ok(version) => Some(version),
            Err(_) => {
                return refused(
                    &mut objects,
                    request,
                    format!("invalid resource version: {text:?}"),
                );
            }
        },
    };
    if let Some(from) = from
        && from < objects.oldest_watchable
    {
        request.gone = true;
        let message = format!(
            "too old resource version: {from} ({})",
            objects.oldest_watchable
        );
        if objects.gone_as_http_status {
            request.status = 410;
            shared.record(&mut objects, request);
            return failure(410, "Expired", message);
        }
        shared.record(&mut objects, request);
        let event = WatchEvent::<Value>::ErrorStatus(status(410, "Expired", message));
        return stream(vec![line(&event)]);
    }
    // Under the lock: nothing happens between the events sent first and the live ones.
    let first: Vec<Bytes> = match from {
        Some(from) => objects
            .history
            .iter()
            .filter(|change| change.resource_version > from)
            .filter_map(|change| change.event(kind, &filter))
            .collect(),
        None => objects
            .objects
            .iter()
            .filter(|((of, _, _), object)| *of == kind && filter.matches(object))
            .map(|(_, object)| line(&WatchEvent::Added(object.clone())))
            .collect(),
    };
    let live = shared.live.subscribe();
    let end = shared.end_watches.subscribe();
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|seconds| seconds.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs)
        .min(MAX_WATCH_TIMEOUT);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|allow| allow == "true");
    shared.record(&mut objects, request);
    drop(objects);

    let (sender, receiver) = mpsc::channel(64);
    let watch = Watch {
        kind,
        filter,
        after: from.unwrap_or(0),
        bookmarks,
    };
    tokio::spawn(watch.run(first, live, end, timeout, sender));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(receiver)))
        .expect("a valid response")
}

fn list(objects: &Objects, kind: Kind, filter: &Filter) -> Response {
    let items: Vec<Value> = objects
        .objects
        .iter()
        .filter(|((of, _, _), object)| *of == kind && filter.matches(object))
        .map(|(_, object)| {
            // List items carry no apiVersion/kind; the list does.
            let mut item = object.clone();
            if let Some(fields) = item.as_object_mut() {
                fields.remove("apiVersion");
                fields.remove("kind");
            }
            item
        })
        .collect();
    let metadata = ListMeta {
        resource_version: Some(objects.resource_version.to_string()),
        ..ListMeta::default()
    };
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "apiVersion": "v1",
            "kind": format!("{}List", kind.kind()),
            "metadata": metadata,
            "items": items,
        }),
    )
}

/// A body of `lines`, then the end.
fn stream(lines: Vec<Bytes>) -> Response {
    let (sender, receiver) = mpsc::channel(lines.len().max(1));
    for line in lines {
        // The channel has room for every line.
        let _ = sender.try_send(Ok::<_, Infallible>(line));
    }
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(ReceiverStream::new(receiver)))
        .expect("a valid response")
}

/// One open watch.
struct Watch {
    kind: Kind,
    filter: Filter,
    /// Changes at or before this version were sent already (or predate the watch).
    after: u64,
    bookmarks: bool,
}

impl Watch {
    /// Sends `first`, then live changes, until the timeout, the test ends watches, the client
    /// goes away or the server stops.
    async fn run(
        self,
        first: Vec<Bytes>,
        mut live: broadcast::Receiver<Arc<Live>>,
        mut end: watch::Receiver<u64>,
        timeout: Duration,
        sender: mpsc::Sender<Result<Bytes, Infallible>>,
    ) {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        for line in first {
            if sender.send(Ok(line)).await.is_err() {
                return;
            }
        }
        loop {
            let line = tokio::select! {
                () = &mut deadline => return,
                _ = end.changed() => return,
                () = sender.closed() => return,
                message = live.recv() => match message {
                    Ok(message) => self.line(&message),
                    // Lagged: the client resumes from the last version it saw.
                    Err(_) => return,
                },
            };
            if let Some(line) = line
                && sender.send(Ok(line)).await.is_err()
            {
                return;
            }
        }
    }

    fn line(&self, message: &Live) -> Option<Bytes> {
        match message {
            Live::Change(change) if change.resource_version > self.after => {
                change.event(self.kind, &self.filter)
            }
            Live::Change(_) => None,
            Live::Bookmark(resource_version) => self.bookmarks.then(|| {
                let mut bytes = serde_json::to_vec(&serde_json::json!({
                    "type": "BOOKMARK",
                    "object": self.kind.bookmark(*resource_version),
                }))
                .expect("bookmarks serialize");
                bytes.push(b'\n');
                Bytes::from(bytes)
            }),
        }
    }
}
