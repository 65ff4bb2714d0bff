//! The gRPC channel to the OAP: plain or TLS (CA, client certificate, skip-verify), with the
//! `authentication` metadata on every call.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rover_proto::v3::continuous_profiling_service_client::ContinuousProfilingServiceClient;
use rover_proto::v3::ebpf_process_service_client::EbpfProcessServiceClient;
use rover_proto::v3::ebpf_profiling_service_client::EbpfProfilingServiceClient;
use rover_proto::v3::meter_report_service_client::MeterReportServiceClient;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::Error;
use crate::config::{BackendSettings, TlsSettings};

/// Every call made to the OAP, by gRPC method name: their failures are counted from zero.
const CALLS: [&str; 7] = [
    "reportProcesses",
    "keepAlive",
    "queryTasks",
    "collectProfilingData",
    "queryPolicies",
    "reportProfilingTask",
    "collectBatch",
];
/// How long establishing a connection may take before a call fails (and is retried later).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A call the OAP accepted but does not answer fails after this (uploads included).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The channel to the OAP, cheap to clone. It connects lazily and reconnects by itself: a call
/// made while the OAP is unreachable fails and the caller retries.
#[derive(Clone)]
pub struct Backend {
    channel: InterceptedService<Channel, Authentication>,
    addr: String,
    /// Set by any failed call (an upload, a task poll, ...): the OAP may have restarted
    /// meanwhile and forgotten this agent's processes.
    contact_lost: Arc<AtomicBool>,
    calls: Arc<CallCounts>,
}

/// What the calls to the OAP did, for the agent's self-metrics and readiness.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Calls the OAP answered.
    pub answered: u64,
    /// Failed calls, by the call's gRPC method name.
    pub failed: BTreeMap<&'static str, u64>,
}

#[derive(Debug)]
struct CallCounts {
    answered: AtomicU64,
    /// Failures are rare: a lock costs nothing on the path of answered calls.
    failed: Mutex<BTreeMap<&'static str, u64>>,
}

pub type ProcessClient = EbpfProcessServiceClient<InterceptedService<Channel, Authentication>>;
pub type ProfilingClient = EbpfProfilingServiceClient<InterceptedService<Channel, Authentication>>;
pub type ContinuousClient =
    ContinuousProfilingServiceClient<InterceptedService<Channel, Authentication>>;
pub type MeterClient = MeterReportServiceClient<InterceptedService<Channel, Authentication>>;

impl Backend {
    /// Sets up the channel; fails only on local problems (unreadable certificate files, a bad
    /// address), never because the OAP is down.
    pub fn new(settings: &BackendSettings) -> Result<Self, Error> {
        let addr = settings.addr.to_string();
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|source| Error::Address {
                addr: addr.clone(),
                source,
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            // Rover's connection check: HTTP/2 pings find a dead OAP (a crashed node, a dropped
            // route) that TCP would not report.
            .http2_keep_alive_interval(settings.check_period)
            .keep_alive_while_idle(true);
        let channel = match &settings.tls {
            None => endpoint.connect_lazy(),
            Some(tls) => {
                let connector = TlsConnector::new(tls, &settings.addr.host)?;
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri| {
                    connector.clone().connect(uri)
                }))
            }
        };
        let authentication = match settings.authentication.as_deref() {
            None => None,
            Some(token) => Some(MetadataValue::try_from(token).map_err(|_| Error::Authentication)?),
        };
        Ok(Self {
            channel: InterceptedService::new(channel, Authentication(authentication)),
            addr,
            contact_lost: Arc::new(AtomicBool::new(false)),
            calls: Arc::new(CallCounts {
                answered: AtomicU64::new(0),
                failed: Mutex::new(CALLS.into_iter().map(|call| (call, 0)).collect()),
            }),
        })
    }

    /// `host:port` of the OAP, for messages.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Counts a call's outcome; a failure becomes an [`Error`] naming the call, and marks the
    /// contact lost.
    pub(super) fn outcome<T>(
        &self,
        call: &'static str,
        result: Result<T, tonic::Status>,
    ) -> Result<T, Error> {
        match result {
            Ok(answer) => {
                self.calls.answered.fetch_add(1, Ordering::Relaxed);
                Ok(answer)
            }
            Err(status) => {
                if let Ok(mut failed) = self.calls.failed.lock() {
                    *failed.entry(call).or_default() += 1;
                }
                Err(Error::call(call, self, status))
            }
        }
    }

    /// What the calls made through this channel (and its clones) did so far.
    pub fn call_stats(&self) -> CallStats {
        CallStats {
            answered: self.calls.answered.load(Ordering::Relaxed),
            failed: self
                .calls
                .failed
                .lock()
                .map(|failed| failed.clone())
                .unwrap_or_default(),
        }
    }

    pub(super) fn lost_contact(&self) {
        self.contact_lost.store(true, Ordering::Relaxed);
    }

    /// Whether a call failed since the last time this was asked.
    pub(super) fn take_lost_contact(&self) -> bool {
        self.contact_lost.swap(false, Ordering::Relaxed)
    }

    pub fn processes(&self) -> ProcessClient {
        EbpfProcessServiceClient::new(self.channel.clone())
    }

    pub fn profiling(&self) -> ProfilingClient {
        EbpfProfilingServiceClient::new(self.channel.clone())
    }

    pub fn continuous(&self) -> ContinuousClient {
        ContinuousProfilingServiceClient::new(self.channel.clone())
    }

    pub fn meters(&self) -> MeterClient {
        MeterReportServiceClient::new(self.channel.clone())
    }

    /// The channel itself, for a call the generated clients cannot make (an upload of messages
    /// encoded already).
    pub(crate) fn channel(&self) -> InterceptedService<Channel, Authentication> {
        self.channel.clone()
    }
}

/// Adds `authentication: <token>` to every call, as SkyWalking's agents (and Rover) do.
#[derive(Clone)]
pub struct Authentication(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Authentication {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authentication", token.clone());
        }
        Ok(request)
    }
}

/// TCP then TLS to the OAP, with a rustls configuration built from the settings: tonic's own
/// TLS cannot skip verification, which Rover's `insecure_skip_verify` asks for.
#[derive(Clone)]
struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    fn new(settings: &TlsSettings, host: &str) -> Result<Self, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::Tls(error.to_string()))?;
        let builder = if settings.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider)))
        } else {
            builder.with_root_certificates(root_store(settings)?)
        };
        let mut config = match &settings.client {
            Some(client) => {
                let chain = read_certificates(&client.pem_path)?;
                let key = PrivateKeyDer::from_pem_file(&client.key_path).map_err(|error| {
                    Error::TlsFile {
                        path: client.key_path.clone(),
                        problem: error.to_string(),
                    }
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|error| Error::Tls(format!("client certificate: {error}")))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|_| Error::Tls(format!("{host:?} is not a valid TLS server name")))?;
        Ok(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    async fn connect(
        self,
        uri: http::Uri,
    ) -> std::io::Result<
        hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    > {
        let host = uri
            .host()
            .map(|host| host.trim_start_matches('[').trim_end_matches(']'));
        let (Some(host), Some(port)) = (host, uri.port_u16()) else {
            return Err(std::io::Error::other(format!("no host and port in {uri}")));
        };
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let tls = self.connector.connect(self.server_name, tcp).await?;
        Ok(hyper_util::rt::TokioIo::new(tls))
    }
}

/// The CA file's certificates, or the system's roots when none is configured.
fn root_store(settings: &TlsSettings) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    match &settings.ca_pem_path {
        Some(path) => {
            for certificate in read_certificates(path)? {
                roots.add(certificate).map_err(|error| Error::TlsFile {
                    path: path.clone(),
                    problem: error.to_string(),
                })?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(Error::Tls(
                    "no system CA certificates found: set core.backend.ca_pem_path".to_owned(),
                ));
            }
        }
    }
    Ok(roots)
}

fn read_certificates(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let file_error = |problem: String| Error::TlsFile {
        path: path.to_owned(),
        problem,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(error.to_string()))?;
    if certificates.is_empty() {
        return Err(file_error("no PEM certificate in it".to_owned()));
    }
    Ok(certificates)
}

/// `insecure_skip_verify`: any server certificate is accepted (the handshake's signatures are
/// still checked, so the session is at least with the holder of that certificate's key).
#[derive(Debug)]
struct SkipServerVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        certificate: &CertificateDer<'_>,
        signature: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            certificate,
            signature,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
