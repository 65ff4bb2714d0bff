//! The agent's Kubernetes watch (kube-rs's watcher and reflector) against the fake API server:
//! the first listing, ADDED / MODIFIED / DELETED, the node's field selector, the namespace
//! limit, `410 Gone` answered by a new listing, and an API server that went away and came back.
//! No root needed.

use std::time::Duration;

use integration_tests::fake_kube::{self, FakeKube, Kind, RecordedRequest};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rover_agent::process::kubernetes::{ApiServer, ClusterSnapshot, Error, PodWatch};

const WAIT: Duration = Duration::from_secs(10);
const NODE: &str = "node-a";

/// A client of `fake` built from the kubeconfig it writes.
async fn connect(fake: &FakeKube) -> (ApiServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = fake.write_kubeconfig(dir.path()).expect("kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("reading the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config from the kubeconfig");
    let api_server = ApiServer::from_config(config).expect("a client");
    assert_eq!(api_server.url(), format!("{}/", fake.url()));
    (api_server, dir)
}

/// Starts a watch of `NODE` in `namespaces` and waits for its first listing.
async fn watch(api_server: &ApiServer, namespaces: &[&str]) -> PodWatch {
    let namespaces: Vec<String> = namespaces.iter().map(|&n| n.to_owned()).collect();
    let watch = PodWatch::start(api_server, NODE, &namespaces).expect("watch started");
    watch
        .wait_until_ready(WAIT)
        .await
        .expect("first listing within the wait");
    assert!(watch.is_ready());
    watch
}

fn names<K: kube::Resource>(objects: &[std::sync::Arc<K>]) -> Vec<String> {
    objects
        .iter()
        .map(|object| {
            let meta = object.meta();
            format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            )
        })
        .collect()
}

/// The watch's snapshot sorted by namespace then name (the watch keeps no order), so that the
/// tests can name pods by position.
fn sorted_snapshot(watch: &PodWatch) -> ClusterSnapshot {
    let mut snapshot = watch.snapshot();
    let key = |meta: &kube::api::ObjectMeta| (meta.namespace.clone(), meta.name.clone());
    snapshot.pods.sort_by_key(|pod| key(&pod.metadata));
    snapshot
        .services
        .sort_by_key(|service| key(&service.metadata));
    snapshot
}

fn describe(snapshot: &ClusterSnapshot) -> String {
    format!(
        "pods {:?}, services {:?}",
        names(&snapshot.pods),
        names(&snapshot.services)
    )
}

/// Waits (at most `WAIT`) for a snapshot satisfying `condition`.
async fn wait_until(
    watch: &PodWatch,
    what: &str,
    condition: impl Fn(&ClusterSnapshot) -> bool,
) -> ClusterSnapshot {
    let mut changes = watch.changes();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        changes.borrow_and_update();
        let snapshot = sorted_snapshot(watch);
        if condition(&snapshot) {
            return snapshot;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("{what}: the watch ended; {}", describe(&snapshot)),
            Err(_) => panic!("{what}: not seen within {WAIT:?}; {}", describe(&snapshot)),
        }
    }
}

async fn wait_for_requests(
    fake: &FakeKube,
    what: &str,
    condition: impl Fn(&[RecordedRequest]) -> bool,
) -> Vec<RecordedRequest> {
    fake.wait_for_requests(condition, WAIT)
        .await
        .unwrap_or_else(|error| panic!("{what}: {error}"))
}

fn pod_names(snapshot: &ClusterSnapshot) -> Vec<String> {
    names(&snapshot.pods)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

fn service_name(service: Option<&Service>) -> Option<&str> {
    service.and_then(|service| service.metadata.name.as_deref())
}

fn is_watch_of(request: &RecordedRequest, kind: Kind) -> bool {
    request.kind == kind && request.watch
}

fn is_list_of(request: &RecordedRequest, kind: Kind) -> bool {
    request.kind == kind && request.is_list()
}

#[tokio::test]
async fn the_first_listing_holds_the_pods_of_this_node_and_the_services() {
    let fake = FakeKube::start().expect("fake API server");
    let mut web = fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]);
    web.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some("kubelet".to_owned()),
        operation: Some("Update".to_owned()),
        ..ManagedFieldsEntry::default()
    }]);
    fake.apply_pod(web);
    fake.apply_pod(fake_kube::pod(
        "pay",
        "ledger-0",
        NODE,
        &[("app", "ledger")],
    ));
    fake.apply_pod(fake_kube::pod("shop", "web-2", "node-b", &[("app", "web")]));
    fake.apply_pod(fake_kube::pod("shop", "pending", "", &[("app", "web")]));
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    fake.apply_service(fake_kube::service("pay", "ledger", &[("app", "ledger")]));
    let listed_at = fake.resource_version();

    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    let snapshot = sorted_snapshot(&watch);
    assert_eq!(pod_names(&snapshot), ["pay/ledger-0", "shop/web-1"]);
    assert_eq!(names(&snapshot.services), ["pay/ledger", "shop/web"]);

    // The pod arrived whole (status, container ids), without its managed fields.
    let web = &snapshot.pods[1];
    let statuses = web
        .status
        .as_ref()
        .and_then(|status| status.container_statuses.as_ref())
        .expect("container statuses");
    assert_eq!(
        statuses[0].container_id.as_deref(),
        Some(format!("containerd://{}", fake_kube::hex64("shop/web-1/app")).as_str())
    );
    assert_eq!(
        web.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("10.244.1.7")
    );
    assert!(
        web.metadata
            .managed_fields
            .as_ref()
            .is_none_or(Vec::is_empty)
    );
    assert_eq!(service_name(snapshot.service_of(web)), Some("web"));
    assert_eq!(
        service_name(snapshot.service_of(&snapshot.pods[0])),
        Some("ledger")
    );

    // Pods: listed cluster-wide with the node's field selector, then watched from the list's
    // version with the same selector. Services: every one of them.
    let selector = format!("spec.nodeName={NODE}");
    let requests = wait_for_requests(&fake, "both watches open", |requests| {
        requests.iter().any(|r| is_watch_of(r, Kind::Pods))
            && requests.iter().any(|r| is_watch_of(r, Kind::Services))
    })
    .await;
    let pods: Vec<&RecordedRequest> = requests.iter().filter(|r| r.kind == Kind::Pods).collect();
    assert!(pods.len() >= 2, "{requests:#?}");
    assert!(pods[0].is_list() && pods[1].watch, "{requests:#?}");
    for request in &pods {
        assert_eq!(request.namespace, None, "{request}");
        assert_eq!(
            request.field_selector(),
            Some(selector.as_str()),
            "{request}"
        );
        assert_eq!(request.status, 200, "{request}");
    }
    assert_eq!(
        pods[1].resource_version(),
        Some(listed_at.to_string().as_str())
    );
    assert_eq!(
        pods[1].query.get("allowWatchBookmarks").map(String::as_str),
        Some("true")
    );
    let services: Vec<&RecordedRequest> = requests
        .iter()
        .filter(|r| r.kind == Kind::Services)
        .collect();
    assert!(services[0].is_list() && services[1].watch, "{requests:#?}");
    assert!(services.iter().all(|r| r.field_selector().is_none()));
    assert!(
        requests
            .iter()
            .all(|r| !r.query.contains_key("labelSelector"))
    );
}

#[tokio::test]
async fn added_modified_and_deleted_objects_are_reflected() {
    let fake = FakeKube::start().expect("fake API server");
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    assert!(sorted_snapshot(&watch).pods.is_empty());
    assert!(sorted_snapshot(&watch).services.is_empty());
    let mut changes = watch.changes();
    changes.borrow_and_update();

    // ADDED: a pod of this node; one of another node never shows.
    fake.apply_pod(fake_kube::pod("shop", "web-1", "node-b", &[("app", "web")]));
    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web")]));
    wait_until(&watch, "pod web-2 added", |s| {
        pod_names(s) == ["shop/web-2"]
    })
    .await;
    assert!(changes.has_changed().expect("sender alive"));

    // MODIFIED: new labels.
    let mut relabelled = fake_kube::pod("shop", "web-2", NODE, &[("app", "web-v2")]);
    relabelled.metadata.annotations = Some([("note".to_owned(), "v2".to_owned())].into());
    fake.apply_pod(relabelled);
    wait_until(&watch, "pod web-2 relabelled", |s| {
        s.pods.len() == 1 && label(&s.pods[0], "app") == Some("web-v2")
    })
    .await;

    // A pod scheduled onto this node later: its watch sees it ADDED when it starts matching.
    fake.apply_pod(fake_kube::pod("shop", "late", "", &[("app", "web")]));
    fake.apply_pod(fake_kube::pod("shop", "late", NODE, &[("app", "web")]));
    wait_until(&watch, "pod late scheduled here", |s| {
        pod_names(s) == ["shop/late", "shop/web-2"]
    })
    .await;

    // Services: added, their selector changed, deleted; the pod's service follows.
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    let snapshot = wait_until(&watch, "service web added", |s| s.services.len() == 1).await;
    let late = &snapshot.pods[0];
    assert_eq!(service_name(snapshot.service_of(late)), Some("web"));
    assert_eq!(service_name(snapshot.service_of(&snapshot.pods[1])), None);
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web-v2")]));
    let snapshot = wait_until(&watch, "service web reselected", |s| {
        s.service_of(&s.pods[1]).is_some()
    })
    .await;
    assert_eq!(service_name(snapshot.service_of(&snapshot.pods[0])), None);
    fake.apply_service(fake_kube::service("shop", "w", &[("app", "web-v2")]));
    let snapshot = wait_until(&watch, "service w added", |s| s.services.len() == 2).await;
    assert_eq!(
        service_name(snapshot.service_of(&snapshot.pods[1])),
        Some("w"),
        "the shortest name wins"
    );
    fake.delete_service("shop", "w").expect("service w existed");
    wait_until(&watch, "service w deleted", |s| {
        names(&s.services) == ["shop/web"]
    })
    .await;

    // DELETED.
    fake.delete_pod("shop", "web-2").expect("pod web-2 existed");
    wait_until(&watch, "pod web-2 deleted", |s| {
        pod_names(s) == ["shop/late"]
    })
    .await;
    // Moved away from this node (the API server tells a field-selected watch DELETED).
    fake.apply_pod(fake_kube::pod("shop", "late", "node-b", &[("app", "web")]));
    wait_until(&watch, "pod late gone elsewhere", |s| s.pods.is_empty()).await;
}

#[tokio::test]
async fn only_the_configured_namespaces_are_watched() {
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    fake.apply_pod(fake_kube::pod(
        "pay",
        "ledger-0",
        NODE,
        &[("app", "ledger")],
    ));
    fake.apply_pod(fake_kube::pod(
        "kube-system",
        "coredns",
        NODE,
        &[("k8s-app", "dns")],
    ));
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    fake.apply_service(fake_kube::service(
        "kube-system",
        "kube-dns",
        &[("k8s-app", "dns")],
    ));

    let (api_server, _dir) = connect(&fake).await;
    // Duplicates and blanks are ignored.
    let watch = watch(&api_server, &["shop", "pay", " ", "shop"]).await;
    let snapshot = sorted_snapshot(&watch);
    assert_eq!(pod_names(&snapshot), ["pay/ledger-0", "shop/web-1"]);
    assert_eq!(names(&snapshot.services), ["shop/web"]);

    fake.apply_pod(fake_kube::pod("kube-system", "proxy", NODE, &[]));
    fake.apply_pod(fake_kube::pod(
        "pay",
        "ledger-1",
        NODE,
        &[("app", "ledger")],
    ));
    wait_until(&watch, "pod ledger-1 added", |s| {
        pod_names(s) == ["pay/ledger-0", "pay/ledger-1", "shop/web-1"]
    })
    .await;

    let requests = wait_for_requests(&fake, "four watches open", |requests| {
        requests.iter().filter(|r| r.watch).count() >= 4
    })
    .await;
    for request in &requests {
        let namespace = request.namespace.as_deref();
        assert!(
            matches!(namespace, Some("shop" | "pay")),
            "a request outside the namespaces: {request}"
        );
    }
    for (kind, namespace) in [
        (Kind::Pods, "shop"),
        (Kind::Pods, "pay"),
        (Kind::Services, "shop"),
        (Kind::Services, "pay"),
    ] {
        assert!(
            requests
                .iter()
                .any(|r| is_watch_of(r, kind) && r.namespace.as_deref() == Some(namespace)),
            "no watch of {kind:?} in {namespace}: {requests:#?}"
        );
    }
    assert!(
        requests
            .iter()
            .filter(|r| r.kind == Kind::Pods)
            .all(|r| r.field_selector() == Some("spec.nodeName=node-a"))
    );
}

/// The request index of the first request after `start` satisfying `what`.
fn position_after(
    requests: &[RecordedRequest],
    start: usize,
    what: impl Fn(&RecordedRequest) -> bool,
) -> Option<usize> {
    requests
        .iter()
        .enumerate()
        .skip(start)
        .find(|(_, request)| what(request))
        .map(|(index, _)| index)
}

/// Whether the pods watcher was told `410 Gone`, then listed, then watched from the list's
/// version again.
fn listed_again_after_gone(requests: &[RecordedRequest]) -> bool {
    let Some(gone) = position_after(requests, 0, |r| r.kind == Kind::Pods && r.gone) else {
        return false;
    };
    let Some(list) = position_after(requests, gone, |r| is_list_of(r, Kind::Pods)) else {
        return false;
    };
    position_after(requests, list, |r| {
        is_watch_of(r, Kind::Pods) && !r.gone && r.status == 200
    })
    .is_some()
}

#[tokio::test]
async fn a_watch_answered_410_gone_lists_again() {
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    wait_for_requests(&fake, "pods watched", |requests| {
        requests.iter().any(|r| is_watch_of(r, Kind::Pods))
    })
    .await;
    fake.clear_requests();

    // Watches end and their versions are compacted away: the API server answers the next
    // watch with an ERROR event of code 410; kube-rs lists again.
    fake.force_gone();
    let requests = wait_for_requests(&fake, "410, list, watch", listed_again_after_gone).await;
    let gone = requests
        .iter()
        .find(|r| r.kind == Kind::Pods && r.gone)
        .expect("a 410");
    assert_eq!(gone.status, 200, "the 410 comes as an ERROR event: {gone}");
    let relist = requests
        .iter()
        .find(|r| is_list_of(r, Kind::Pods))
        .expect("a list");
    assert_eq!(relist.resource_version(), None, "a fresh list: {relist}");
    assert_eq!(relist.field_selector(), Some("spec.nodeName=node-a"));
    let rewatch = requests
        .iter()
        .rfind(|r| is_watch_of(r, Kind::Pods))
        .expect("a watch");
    assert_eq!(
        rewatch.resource_version(),
        Some(fake.resource_version().to_string().as_str())
    );

    // The new watch delivers.
    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web")]));
    wait_until(&watch, "pod web-2 after the new listing", |s| {
        pod_names(s) == ["shop/web-1", "shop/web-2"]
    })
    .await;
    assert!(api_server.reachable(), "a 410 is no outage");
}

#[tokio::test]
async fn changes_missed_while_the_history_was_compacted_come_from_the_new_listing() {
    let mut fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web")]));
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    assert_eq!(
        pod_names(&sorted_snapshot(&watch)),
        ["shop/web-1", "shop/web-2"]
    );

    // Down; meanwhile a pod is deleted, one added and one relabelled, and the history is
    // compacted: only a new listing can tell the watch, and it must replace, not merge.
    fake.stop();
    fake.delete_pod("shop", "web-1").expect("pod web-1 existed");
    fake.apply_pod(fake_kube::pod("shop", "web-3", NODE, &[("app", "web")]));
    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web-v2")]));
    fake.delete_service("shop", "web")
        .expect("service web existed");
    fake.expire_history();
    fake.clear_requests();
    fake.start_again().expect("restarted");

    let snapshot = wait_until(&watch, "the state after the new listing", |s| {
        pod_names(s) == ["shop/web-2", "shop/web-3"] && s.services.is_empty()
    })
    .await;
    assert_eq!(label(&snapshot.pods[0], "app"), Some("web-v2"));
    let requests = wait_for_requests(&fake, "410, list, watch", listed_again_after_gone).await;
    assert!(
        requests.iter().any(|r| is_list_of(r, Kind::Services)),
        "services listed again too: {requests:#?}"
    );
}

#[tokio::test]
async fn an_http_410_on_the_watch_request_also_lists_again() {
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    wait_for_requests(&fake, "pods watched", |requests| {
        requests.iter().any(|r| is_watch_of(r, Kind::Pods))
    })
    .await;
    fake.clear_requests();

    // kube-rs retries a watch refused with HTTP 410 with the same version; the agent starts
    // its watcher afresh instead, which lists.
    fake.set_gone_as_http_status(true);
    fake.force_gone();
    let requests = wait_for_requests(&fake, "410, list, watch", listed_again_after_gone).await;
    let gone = requests
        .iter()
        .find(|r| r.kind == Kind::Pods && r.gone)
        .expect("a 410");
    assert_eq!(gone.status, 410, "{gone}");
    let refused = requests
        .iter()
        .filter(|r| r.kind == Kind::Pods && r.gone)
        .count();
    assert_eq!(refused, 1, "one refusal, then a listing: {requests:#?}");

    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web")]));
    wait_until(&watch, "pod web-2 after the new listing", |s| {
        pod_names(s) == ["shop/web-1", "shop/web-2"]
    })
    .await;
}

#[tokio::test]
async fn a_restarted_api_server_is_watched_again_from_where_the_watch_was() {
    let mut fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    fake.apply_pod(fake_kube::pod("shop", "web-2", NODE, &[("app", "web")]));
    wait_until(&watch, "pod web-2 added", |s| s.pods.len() == 2).await;
    let seen = fake.resource_version();

    fake.stop();
    // The watch notices (its reconnections are refused) without ending or panicking.
    let deadline = tokio::time::Instant::now() + WAIT;
    while api_server.reachable() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outage was not noticed within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sorted_snapshot(&watch).pods.len(),
        2,
        "the last state is kept"
    );

    // Changes made while it was down.
    fake.delete_pod("shop", "web-1").expect("pod web-1 existed");
    fake.apply_pod(fake_kube::pod("shop", "web-3", NODE, &[("app", "web")]));
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    fake.clear_requests();
    fake.start_again().expect("restarted");

    wait_until(&watch, "the changes made while down", |s| {
        pod_names(s) == ["shop/web-2", "shop/web-3"] && s.services.len() == 1
    })
    .await;
    assert!(api_server.reachable());
    // Resumed from the last version seen, without listing again (the history was kept).
    let requests = fake.requests();
    let resumed = requests
        .iter()
        .find(|r| is_watch_of(r, Kind::Pods))
        .expect("pods watched again");
    assert_eq!(
        resumed.resource_version(),
        Some(seen.to_string().as_str()),
        "{requests:#?}"
    );
    assert!(
        !requests.iter().any(|r| is_list_of(r, Kind::Pods)),
        "{requests:#?}"
    );
}

#[tokio::test]
async fn a_bookmark_moves_where_the_watch_resumes() {
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    let listed_at = fake.resource_version();
    // Changes the pods watch does not see (another node) move the version on.
    for index in 0..3 {
        fake.apply_pod(fake_kube::pod(
            "shop",
            &format!("other-{index}"),
            "node-b",
            &[],
        ));
    }
    fake.apply_service(fake_kube::service("shop", "web", &[("app", "web")]));
    wait_until(&watch, "service web added", |s| s.services.len() == 1).await;
    let bookmarked = fake.resource_version();
    assert!(bookmarked > listed_at + 3);

    fake.send_bookmarks();
    // Nothing observable happens on a bookmark: end the watches after the bookmark has had
    // time to arrive, and see where the pods watch resumes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.clear_requests();
    fake.end_watches();
    let requests = wait_for_requests(&fake, "pods watched again", |requests| {
        requests.iter().any(|r| is_watch_of(r, Kind::Pods))
    })
    .await;
    let resumed = requests
        .iter()
        .find(|r| is_watch_of(r, Kind::Pods))
        .expect("a pods watch");
    assert_eq!(
        resumed.resource_version(),
        Some(bookmarked.to_string().as_str()),
        "{resumed}"
    );
    assert_eq!(pod_names(&sorted_snapshot(&watch)), ["shop/web-1"]);
}

#[tokio::test]
async fn an_api_server_down_at_start_is_retried_until_it_answers() {
    let mut fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let (api_server, _dir) = connect(&fake).await;
    fake.stop();

    let watch = PodWatch::start(&api_server, NODE, &[]).expect("started while down");
    let error = watch
        .wait_until_ready(Duration::from_millis(500))
        .await
        .expect_err("nothing to list");
    assert!(matches!(error, Error::NotReady { .. }), "{error}");
    assert!(
        error.to_string().contains(&fake.url()),
        "names the server: {error}"
    );
    assert!(!watch.is_ready());
    assert!(!api_server.reachable());
    assert!(sorted_snapshot(&watch).pods.is_empty());

    fake.start_again().expect("restarted");
    watch
        .wait_until_ready(WAIT)
        .await
        .expect("listed once the server answers");
    assert_eq!(pod_names(&sorted_snapshot(&watch)), ["shop/web-1"]);
    assert!(api_server.reachable());
}

#[tokio::test]
async fn dropping_the_watch_stops_its_watchers() {
    let fake = FakeKube::start().expect("fake API server");
    let (api_server, _dir) = connect(&fake).await;
    let watch = watch(&api_server, &[]).await;
    let changes = watch.changes();
    drop(watch);
    // Every watcher task held a sender: all gone once the tasks were aborted.
    let deadline = tokio::time::Instant::now() + WAIT;
    while changes.has_changed().is_ok() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watchers still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_fake_refuses_selectors_the_api_server_refuses() {
    use kube::api::{Api, ListParams};
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", NODE, &[("app", "web")]));
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = fake.write_kubeconfig(dir.path()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).expect("kubeconfig"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let pods: Api<Pod> = Api::all(client.clone());

    let listed = pods
        .list(&ListParams::default().fields("spec.nodeName=node-a,status.phase!=Failed"))
        .await
        .expect("a supported selector");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.metadata.resource_version,
        Some(fake.resource_version().to_string())
    );
    let Err(kube::Error::Api(status)) = pods
        .list(&ListParams::default().fields("spec.containers=app"))
        .await
    else {
        panic!("an unsupported field was accepted");
    };
    assert_eq!(status.code, 400);
    assert!(status.message.contains("field label not supported"));
    let services: Api<Service> = Api::namespaced(client, "shop");
    let Err(kube::Error::Api(status)) = services
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
    else {
        panic!("spec.nodeName was accepted for services");
    };
    assert_eq!(status.code, 400);
}
