//! The client of the Kubernetes API server, from a kubeconfig or the pod's service account, with
//! a layer that notices the server answering again after a failure (see [`Reachability`]).

use std::sync::Arc;

use kube::client::{ClientBuilder, DynBody};
use tokio_rustls::rustls;
use tower::util::MapResultLayer;

use super::Error;
use super::reachability::Reachability;

/// A client of one Kubernetes API server, cheap to clone.
#[derive(Clone)]
pub struct ApiServer {
    client: kube::Client,
    url: String,
    reachability: Arc<Reachability>,
}

impl ApiServer {
    /// The API server of `KUBECONFIG` (else `~/.kube/config`), else of the service account the
    /// agent's pod runs as.
    pub async fn infer() -> Result<Self, Error> {
        install_crypto_provider();
        let config = kube::Config::infer()
            .await
            .map_err(|source| Error::NoConfig {
                source: Box::new(source),
            })?;
        Self::from_config(config)
    }

    /// Must be called inside a tokio runtime (the client spawns a task).
    pub fn from_config(config: kube::Config) -> Result<Self, Error> {
        tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        install_crypto_provider();
        let url = config.cluster_url.to_string();
        let reachability = Arc::new(Reachability::new(url.clone()));
        let observer = Arc::clone(&reachability);
        // Every successful answer, including a watch that resumed without any event, tells
        // that the server is back; the watch streams only tell of failures.
        let observe = MapResultLayer::new(
            move |result: Result<http::Response<Box<DynBody>>, tower::BoxError>| {
                if result
                    .as_ref()
                    .is_ok_and(|response| response.status().is_success())
                {
                    observer.answered();
                }
                result
            },
        );
        let client = ClientBuilder::try_from(config)
            .map_err(|source| Error::Client {
                server: url.clone(),
                source,
            })?
            .with_layer(&observe)
            .build();
        Ok(Self {
            client,
            url,
            reachability,
        })
    }

    /// The server's URL, as logs name it.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// False from a failed request or watch until the server answers again.
    pub fn reachable(&self) -> bool {
        !self.reachability.failing()
    }

    pub(super) fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub(super) fn reachability(&self) -> Arc<Reachability> {
        Arc::clone(&self.reachability)
    }
}

/// kube-rs builds its rustls configuration from the process-wide provider; installing ring (the
/// agent's choice, as for the OAP connection) keeps that from panicking should another
/// dependency ever enable a second provider.
fn install_crypto_provider() {
    // Err means one is installed already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
