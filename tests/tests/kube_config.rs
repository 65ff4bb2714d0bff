//! Where the agent finds its Kubernetes API server: `KUBECONFIG`, and a clear error naming the
//! fix when there is neither a kubeconfig nor a service account. One test in its own binary:
//! it sets environment variables, which no other thread may read meanwhile.

use std::time::Duration;

use integration_tests::fake_kube::{self, FakeKube};
use rover_agent::process::kubernetes::{ApiServer, Error, PodWatch};

#[tokio::test]
async fn the_api_server_comes_from_kubeconfig_or_a_clear_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let fake = FakeKube::start().expect("fake API server");
    fake.apply_pod(fake_kube::pod("shop", "web-1", "node-a", &[("app", "web")]));
    let kubeconfig = fake.write_kubeconfig(dir.path()).expect("kubeconfig");

    // SAFETY: the only test of this binary, and nothing else runs yet: no other thread reads
    // the environment meanwhile.
    unsafe {
        std::env::remove_var("KUBERNETES_SERVICE_HOST");
        std::env::remove_var("KUBERNETES_SERVICE_PORT");
        std::env::set_var("KUBECONFIG", &kubeconfig);
    }
    let api_server = ApiServer::infer().await.expect("the kubeconfig's server");
    assert_eq!(api_server.url(), format!("{}/", fake.url()));
    let watch = PodWatch::start(&api_server, "node-a", &[]).expect("watch");
    watch
        .wait_until_ready(Duration::from_secs(10))
        .await
        .expect("listed");
    assert_eq!(watch.snapshot().pods.len(), 1);
    drop(watch);

    let missing = dir.path().join("no-such-kubeconfig");
    // SAFETY: as above.
    unsafe {
        std::env::set_var("KUBECONFIG", &missing);
    }
    let Err(error) = ApiServer::infer().await else {
        panic!("a server was found without a kubeconfig or a service account");
    };
    assert!(matches!(error, Error::NoConfig { .. }), "{error}");
    let message = error.to_string();
    for fix in [
        "set KUBECONFIG",
        "service account",
        "KUBERNETES_SERVICE_HOST",
    ] {
        assert!(message.contains(fix), "{fix:?} missing from: {message}");
    }
}
