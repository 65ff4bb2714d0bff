//! A fake SkyWalking OAP for end-to-end tests and the demo: a tonic server on 127.0.0.1 that
//! answers the eBPF services the way the real OAP does (process ids, task commands) and records
//! every call, so a test can assert what an agent sent.
//!
//! - `EBPFProcessService`: `reportProcesses` is recorded and answered with one
//!   `EBPFProcessDownstream` per process, whose id is the OAP's ([`process_id`]); `keepAlive` is
//!   recorded and answered with empty `Commands`.
//! - `EBPFProfilingService`: `queryTasks` is recorded and answered with the queued tasks
//!   ([`FakeOap::add_task`]) whose update time is strictly greater than the query's
//!   `latestUpdateTime`; every `collectProfilingData` stream is recorded message by message
//!   ([`ProfilingStream`]), with whether it ended cleanly.
//! - `ContinuousProfilingService`: `queryPolicies` is recorded and answered, as the OAP does, with
//!   one `ContinuousProfilingPolicyQuery` command listing every queried service whose policy
//!   ([`FakeOap::set_policy`], [`FakeOap::remove_policy`]) has another UUID than the query sent
//!   (`UUID` `""` for a removed one), or empty when none changed. `reportProfilingTask` is
//!   recorded and answered with a `ContinuousProfilingReportTask` command carrying a new task id
//!   (`continuous-N`, recorded in [`Recorded::continuous_task_ids`]), unless a reply was queued
//!   with [`FakeOap::queue_report_reply`] (an empty or malformed one). A reply queued with
//!   [`FakeOap::queue_policy_reply`] goes to the next `queryPolicies` instead of the policies.
//! - `MeterReportService`: every meter recorded, answered empty.
//!
//! Every call's `authentication` metadata (what SkyWalking agents send as `Authentication`) is
//! recorded; with [`FakeOapConfig::required_authentication`] a call without the right value is
//! refused with `UNAUTHENTICATED`. With [`FakeOapConfig::tls`] the server speaks TLS
//! ([`TestCertificates`] makes a CA and a certificate for `localhost`/127.0.0.1).
//!
//! The server runs on a runtime of its own, so [`FakeOap::stop`] can kill it like a crashed OAP:
//! the listener and every open connection close at once. [`FakeOap::start_again`] listens on
//! the same address again; what was recorded and queued is kept.
//!
//! [`fold_received`] turns what the OAP received for a task into folded stacks the way the OAP
//! does, without any of the agent's code, so tests check the agent's encoding.

mod certs;
mod fold;

pub use certs::{TestCertificates, install_crypto_provider};
pub use fold::{FoldValue, ReceivedStacks, StackValue, fold_received};

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rover_proto::v3::continuous_profiling_service_server::{
    ContinuousProfilingService, ContinuousProfilingServiceServer,
};
use rover_proto::v3::ebpf_process_service_server::{EbpfProcessService, EbpfProcessServiceServer};
use rover_proto::v3::ebpf_profiling_service_server::{
    EbpfProfilingService, EbpfProfilingServiceServer,
};
use rover_proto::v3::meter_report_service_server::{MeterReportService, MeterReportServiceServer};
use rover_proto::v3::{
    Command, Commands, ContinuousProfilingPolicyQuery, ContinuousProfilingReport,
    EbpfHostProcessDownstream, EbpfKubernetesProcessDownstream, EbpfProcessDownstream,
    EbpfProcessEntityMetadata, EbpfProcessPingPkgList, EbpfProcessReportList, EbpfProfilingData,
    EbpfProfilingTaskQuery, EbpfReportProcessDownstream, KeyStringValuePair, MeterData,
    MeterDataCollection, ebpf_process_downstream, ebpf_process_properties,
};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

/// How to start a [`FakeOap`].
#[derive(Clone, Debug)]
pub struct FakeOapConfig {
    /// Where to listen; port 0 picks a free port. Must be a loopback address.
    pub addr: SocketAddr,
    /// Certificate chain and key (PEM) to serve TLS with; plaintext when `None`.
    pub tls: Option<ServerTls>,
    /// When set, calls whose `authentication` metadata differs are refused (`UNAUTHENTICATED`).
    pub required_authentication: Option<String>,
}

impl Default for FakeOapConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            tls: None,
            required_authentication: None,
        }
    }
}

/// The server's certificate chain and private key, PEM.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A profiling task for the fake to hand out through `queryTasks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskCommand {
    pub task_id: String,
    /// The OAP's process ids ([`process_id`]).
    pub process_ids: Vec<String>,
    /// `ON_CPU`, `OFF_CPU` or `NETWORK`.
    pub target: String,
    /// `TaskStartTime`, epoch milliseconds.
    pub start_ms: i64,
    /// `FixedTriggerDuration`, seconds.
    pub duration_s: i64,
    /// `TaskUpdateTime`, epoch milliseconds: the task is returned to queries whose
    /// `latestUpdateTime` is smaller.
    pub update_ms: i64,
}

impl TaskCommand {
    /// An `ON_CPU` task for `process_ids`, starting and updated at `now_ms`.
    pub fn on_cpu(task_id: &str, process_ids: &[String], now_ms: i64, duration_s: i64) -> Self {
        Self {
            task_id: task_id.to_owned(),
            process_ids: process_ids.to_vec(),
            target: "ON_CPU".to_owned(),
            start_ms: now_ms,
            duration_s,
            update_ms: now_ms,
        }
    }

    /// The `EBPFProfilingTaskQuery` commands the OAP sends for this task: one per process for
    /// `ON_CPU`/`OFF_CPU`, one with comma-separated process ids otherwise (`NETWORK`).
    pub fn commands(&self, serial_number: &str) -> Vec<Command> {
        let groups: Vec<String> = if self.target == "NETWORK" {
            vec![self.process_ids.join(",")]
        } else {
            self.process_ids.clone()
        };
        groups
            .into_iter()
            .enumerate()
            .map(|(index, process_ids)| {
                let args = [
                    ("SerialNumber", format!("{serial_number}-{index}")),
                    ("TaskId", self.task_id.clone()),
                    ("ProcessId", process_ids),
                    ("TaskUpdateTime", self.update_ms.to_string()),
                    ("TaskStartTime", self.start_ms.to_string()),
                    ("TriggerType", "FIXED_TIME".to_owned()),
                    ("TargetType", self.target.clone()),
                    ("ExtensionConfigJSON", "null".to_owned()),
                    ("FixedTriggerDuration", self.duration_s.to_string()),
                ];
                Command {
                    command: "EBPFProfilingTaskQuery".to_owned(),
                    args: args
                        .into_iter()
                        .map(|(key, value)| KeyStringValuePair {
                            key: key.to_owned(),
                            value,
                        })
                        .collect(),
                }
            })
            .collect()
    }
}

/// One `collectProfilingData` stream, as far as it got.
#[derive(Clone, Debug)]
pub struct ProfilingStream {
    /// The messages in the order received.
    pub messages: Vec<EbpfProfilingData>,
    /// The client closed the stream cleanly (a killed server or a broken stream leaves `false`).
    pub completed: bool,
    /// The error that ended the stream, if any.
    pub error: Option<String>,
    pub authentication: Option<String>,
    pub opened: Instant,
    /// When the last message (or the stream's start) arrived.
    pub last_message: Instant,
}

/// One call: its method (`reportProcesses`, `keepAlive`, `queryTasks`, `collectProfilingData`,
/// `queryPolicies`, `reportProfilingTask`, `collect`, `collectBatch`) and its `authentication`
/// metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub authentication: Option<String>,
}

/// Everything the fake received, in order.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub calls: Vec<Call>,
    pub process_reports: Vec<EbpfProcessReportList>,
    pub keep_alives: Vec<EbpfProcessPingPkgList>,
    pub task_queries: Vec<EbpfProfilingTaskQuery>,
    pub profiling_streams: Vec<ProfilingStream>,
    pub policy_queries: Vec<ContinuousProfilingPolicyQuery>,
    pub continuous_reports: Vec<ContinuousProfilingReport>,
    /// The task id each continuous report got (`None`: a queued reply without one was sent).
    pub continuous_task_ids: Vec<Option<String>>,
    pub meters: Vec<MeterData>,
}

impl Recorded {
    /// Every process reported so far with the id the fake gave it, latest report last.
    pub fn reported_processes(&self) -> Vec<(String, EbpfProcessEntityMetadata, i32)> {
        self.process_reports
            .iter()
            .flat_map(|report| &report.processes)
            .filter_map(|process| {
                let (entity, pid) = host_or_k8s(process.metadata.as_ref()?)?;
                Some((process_id_of(entity), entity.clone(), pid))
            })
            .collect()
    }

    /// The OAP id of the latest reported process named `process_name`.
    pub fn process_id_named(&self, process_name: &str) -> Option<String> {
        self.reported_processes()
            .into_iter()
            .rev()
            .find(|(_, entity, _)| entity.process_name == process_name)
            .map(|(id, _, _)| id)
    }

    /// Streams that carried at least one message for `task_id` (a message without `task`
    /// counting for the task of the message before it).
    pub fn streams_for_task(&self, task_id: &str) -> usize {
        self.profiling_streams
            .iter()
            .filter(|stream| fold::stream_has_task(stream, task_id))
            .count()
    }

    /// The `authentication` values seen, one per call.
    pub fn authentications(&self) -> Vec<Option<String>> {
        self.calls
            .iter()
            .map(|call| call.authentication.clone())
            .collect()
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls: {} process reports ({} processes), {} keepAlives, {} task queries, \
             {} profiling streams ({} messages), {} policy queries, {} continuous reports, \
             {} meters",
            self.calls.len(),
            self.process_reports.len(),
            self.reported_processes().len(),
            self.keep_alives.len(),
            self.task_queries.len(),
            self.profiling_streams.len(),
            self.profiling_streams
                .iter()
                .map(|stream| stream.messages.len())
                .sum::<usize>(),
            self.policy_queries.len(),
            self.continuous_reports.len(),
            self.meters.len(),
        )
    }
}

/// [`FakeOap::wait_for`] gave up; holds what had been recorded by then.
#[derive(Debug)]
pub struct WaitTimedOut {
    pub waited: Duration,
    pub recorded: Recorded,
}

impl fmt::Display for WaitTimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fake OAP: condition not met after {:?}; recorded {}",
            self.waited, self.recorded
        )
    }
}

impl std::error::Error for WaitTimedOut {}

/// The OAP's service id of a normal service: base64 of the name, then `.1`.
pub fn service_id(service_name: &str) -> String {
    format!("{}.1", BASE64.encode(service_name))
}

/// The OAP's instance id: the service id, `_`, base64 of the instance name.
pub fn instance_id(service_name: &str, instance_name: &str) -> String {
    format!(
        "{}_{}",
        service_id(service_name),
        BASE64.encode(instance_name)
    )
}

/// The OAP's process id: SHA-256 hex of `"<processName>_<instanceId>"` (pid, layer and labels are
/// not part of it).
pub fn process_id(service_name: &str, instance_name: &str, process_name: &str) -> String {
    let instance = instance_id(service_name, instance_name);
    let digest = Sha256::digest(format!("{process_name}_{instance}").as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn process_id_of(entity: &EbpfProcessEntityMetadata) -> String {
    process_id(
        &entity.service_name,
        &entity.instance_name,
        &entity.process_name,
    )
}

fn host_or_k8s(
    metadata: &ebpf_process_properties::Metadata,
) -> Option<(&EbpfProcessEntityMetadata, i32)> {
    match metadata {
        ebpf_process_properties::Metadata::HostProcess(host) => {
            Some((host.entity.as_ref()?, host.pid))
        }
        ebpf_process_properties::Metadata::K8sProcess(k8s) => Some((k8s.entity.as_ref()?, k8s.pid)),
    }
}

/// The state shared by the services and the test: what was recorded, the queued tasks, and a
/// counter bumped on every change (for [`FakeOap::wait_for`]).
struct Shared {
    recorded: Mutex<Recorded>,
    tasks: Mutex<Vec<TaskCommand>>,
    /// Service → (UUID, the `Profiling` object of its policy).
    policies: Mutex<BTreeMap<String, (String, serde_json::Value)>>,
    /// Replies to send to the next `reportProfilingTask` calls, before giving task ids again.
    report_replies: Mutex<VecDeque<Commands>>,
    /// Replies to send to the next `queryPolicies` calls, before answering from the policies.
    policy_replies: Mutex<VecDeque<Commands>>,
    serial: Mutex<u64>,
    changes: watch::Sender<u64>,
    required_authentication: Option<String>,
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    fn recorded(&self) -> MutexGuard<'_, Recorded> {
        // A test thread that panicked while holding the lock leaves the data usable.
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record(&self, change: impl FnOnce(&mut Recorded)) {
        change(&mut self.recorded());
        self.changes.send_modify(|count| *count += 1);
    }

    /// Records the call and its `authentication` metadata; refuses it when required and wrong.
    fn check_call<T>(&self, method: &'static str, request: &Request<T>) -> Result<(), Status> {
        let authentication = request
            .metadata()
            .get("authentication")
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let allowed = self
            .required_authentication
            .as_ref()
            .is_none_or(|required| authentication.as_ref() == Some(required));
        self.record(|recorded| {
            recorded.calls.push(Call {
                method,
                authentication,
            });
        });
        if allowed {
            Ok(())
        } else {
            Err(Status::unauthenticated("bad or missing authentication"))
        }
    }
}

#[derive(Clone)]
struct Services(Arc<Shared>);

#[tonic::async_trait]
impl EbpfProcessService for Services {
    async fn report_processes(
        &self,
        request: Request<EbpfProcessReportList>,
    ) -> Result<Response<EbpfReportProcessDownstream>, Status> {
        self.0.check_call("reportProcesses", &request)?;
        let report = request.into_inner();
        self.0
            .record(|recorded| recorded.process_reports.push(report.clone()));
        let mut processes = Vec::with_capacity(report.processes.len());
        for (index, process) in report.processes.iter().enumerate() {
            let metadata = process.metadata.as_ref().ok_or_else(|| {
                Status::invalid_argument(format!("process {index} has no metadata"))
            })?;
            let (entity, pid) = host_or_k8s(metadata).ok_or_else(|| {
                Status::invalid_argument(format!("process {index} has no entity"))
            })?;
            let process = match metadata {
                ebpf_process_properties::Metadata::HostProcess(_) => {
                    ebpf_process_downstream::Process::HostProcess(EbpfHostProcessDownstream {
                        pid,
                        entity_metadata: Some(entity.clone()),
                    })
                }
                ebpf_process_properties::Metadata::K8sProcess(_) => {
                    ebpf_process_downstream::Process::K8sProcess(EbpfKubernetesProcessDownstream {
                        pid,
                        entity_metadata: Some(entity.clone()),
                    })
                }
            };
            processes.push(EbpfProcessDownstream {
                process_id: process_id_of(entity),
                process: Some(process),
            });
        }
        Ok(Response::new(EbpfReportProcessDownstream { processes }))
    }

    async fn keep_alive(
        &self,
        request: Request<EbpfProcessPingPkgList>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("keepAlive", &request)?;
        let ping = request.into_inner();
        self.0.record(|recorded| recorded.keep_alives.push(ping));
        Ok(Response::new(Commands::default()))
    }
}

#[tonic::async_trait]
impl EbpfProfilingService for Services {
    async fn query_tasks(
        &self,
        request: Request<EbpfProfilingTaskQuery>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("queryTasks", &request)?;
        let query = request.into_inner();
        let latest = query.latest_update_time;
        self.0.record(|recorded| recorded.task_queries.push(query));
        let serial = {
            let mut serial = self
                .0
                .serial
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *serial += 1;
            *serial
        };
        let tasks = self
            .0
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let commands = tasks
            .iter()
            .filter(|task| task.update_ms > latest)
            .flat_map(|task| task.commands(&format!("fake-oap-{serial}")))
            .collect();
        Ok(Response::new(Commands { commands }))
    }

    async fn collect_profiling_data(
        &self,
        request: Request<Streaming<EbpfProfilingData>>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("collectProfilingData", &request)?;
        let authentication = request
            .metadata()
            .get("authentication")
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned());
        let mut stream = request.into_inner();
        // Recorded as it arrives, so a stream cut by a kill keeps what got through.
        let mut index = 0;
        self.0.record(|recorded| {
            index = recorded.profiling_streams.len();
            recorded.profiling_streams.push(ProfilingStream {
                messages: Vec::new(),
                completed: false,
                error: None,
                authentication,
                opened: Instant::now(),
                last_message: Instant::now(),
            });
        });
        loop {
            match stream.message().await {
                Ok(Some(message)) => self.0.record(|recorded| {
                    let stream = &mut recorded.profiling_streams[index];
                    stream.messages.push(message);
                    stream.last_message = Instant::now();
                }),
                Ok(None) => {
                    self.0.record(|recorded| {
                        recorded.profiling_streams[index].completed = true;
                    });
                    return Ok(Response::new(Commands::default()));
                }
                Err(status) => {
                    self.0.record(|recorded| {
                        recorded.profiling_streams[index].error = Some(status.to_string());
                    });
                    return Err(status);
                }
            }
        }
    }
}

#[tonic::async_trait]
impl ContinuousProfilingService for Services {
    async fn query_policies(
        &self,
        request: Request<ContinuousProfilingPolicyQuery>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("queryPolicies", &request)?;
        let query = request.into_inner();
        if let Some(queued) = locked(&self.0.policy_replies).pop_front() {
            self.0
                .record(|recorded| recorded.policy_queries.push(query));
            return Ok(Response::new(queued));
        }
        let changed: Vec<serde_json::Value> = {
            let policies = locked(&self.0.policies);
            query
                .policies
                .iter()
                .filter_map(|queried| {
                    match policies.get(&queried.service_name) {
                        Some((uuid, profiling)) if *uuid != queried.uuid => {
                            Some(serde_json::json!({
                                "ServiceName": queried.service_name,
                                "UUID": uuid,
                                "Profiling": profiling,
                            }))
                        }
                        Some(_) => None,
                        None if queried.uuid.is_empty() => None,
                        // Removed since the agent got it.
                        None => Some(serde_json::json!({
                            "ServiceName": queried.service_name,
                            "UUID": "",
                            "Profiling": {},
                        })),
                    }
                })
                .collect()
        };
        self.0
            .record(|recorded| recorded.policy_queries.push(query));
        if changed.is_empty() {
            return Ok(Response::new(Commands::default()));
        }
        Ok(Response::new(Commands {
            commands: vec![Command {
                command: "ContinuousProfilingPolicyQuery".to_owned(),
                args: vec![KeyStringValuePair {
                    key: "ServiceWithPolicyJSON".to_owned(),
                    value: serde_json::Value::Array(changed).to_string(),
                }],
            }],
        }))
    }

    async fn report_profiling_task(
        &self,
        request: Request<ContinuousProfilingReport>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("reportProfilingTask", &request)?;
        let report = request.into_inner();
        let queued = locked(&self.0.report_replies).pop_front();
        let mut task_id = None;
        self.0.record(|recorded| {
            if queued.is_none() {
                task_id = Some(format!(
                    "continuous-{}",
                    recorded.continuous_reports.len() + 1
                ));
            }
            recorded.continuous_reports.push(report);
            recorded.continuous_task_ids.push(task_id.clone());
        });
        let reply = match (queued, task_id) {
            (Some(queued), _) => queued,
            (None, Some(task_id)) => Commands {
                commands: vec![Command {
                    command: "ContinuousProfilingReportTask".to_owned(),
                    args: vec![KeyStringValuePair {
                        key: "TaskId".to_owned(),
                        value: task_id,
                    }],
                }],
            },
            (None, None) => Commands::default(),
        };
        Ok(Response::new(reply))
    }
}

#[tonic::async_trait]
impl MeterReportService for Services {
    async fn collect(
        &self,
        request: Request<Streaming<MeterData>>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("collect", &request)?;
        let mut stream = request.into_inner();
        while let Some(meter) = stream.message().await? {
            self.0.record(|recorded| recorded.meters.push(meter));
        }
        Ok(Response::new(Commands::default()))
    }

    async fn collect_batch(
        &self,
        request: Request<Streaming<MeterDataCollection>>,
    ) -> Result<Response<Commands>, Status> {
        self.0.check_call("collectBatch", &request)?;
        let mut stream = request.into_inner();
        while let Some(batch) = stream.message().await? {
            self.0
                .record(|recorded| recorded.meters.extend(batch.meter_data));
        }
        Ok(Response::new(Commands::default()))
    }
}

/// A running (or stopped) fake OAP. Dropping it kills the server.
pub struct FakeOap {
    addr: SocketAddr,
    tls: Option<ServerTls>,
    shared: Arc<Shared>,
    /// The runtime serving the gRPC services; `None` while stopped.
    server: Option<tokio::runtime::Runtime>,
}

impl FakeOap {
    /// Starts a plaintext fake on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(FakeOapConfig::default())
    }

    pub fn start_with(config: FakeOapConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.addr.ip().is_loopback(),
            "the fake OAP listens on loopback only, not {}",
            config.addr
        );
        let (changes, _) = watch::channel(0);
        let mut fake = Self {
            addr: config.addr,
            tls: config.tls,
            shared: Arc::new(Shared {
                recorded: Mutex::default(),
                tasks: Mutex::default(),
                policies: Mutex::default(),
                report_replies: Mutex::default(),
                policy_replies: Mutex::default(),
                serial: Mutex::default(),
                changes,
                required_authentication: config.required_authentication,
            }),
            server: None,
        };
        fake.serve()?;
        Ok(fake)
    }

    /// Binds `self.addr` (remembering the port picked for port 0) and serves on a new runtime.
    fn serve(&mut self) -> anyhow::Result<()> {
        let listener = std::net::TcpListener::bind(self.addr)
            .with_context(|| format!("fake OAP: binding {}", self.addr))?;
        listener.set_nonblocking(true)?;
        self.addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fake-oap")
            .enable_all()
            .build()
            .context("fake OAP: runtime")?;
        let incoming = {
            let _guard = runtime.enter();
            // As the OAP's gRPC server (grpc-java on Netty) does: TCP_NODELAY, so that window
            // updates are not held back by Nagle's algorithm behind the client's delayed ACKs...
            TcpIncoming::from(tokio::net::TcpListener::from_std(listener)?).with_nodelay(Some(true))
        };
        // ...and a 1 MiB flow-control window (Netty's default for gRPC) instead of HTTP/2's
        // 64 KiB, which would throttle a large upload to the fake far more than to an OAP.
        let mut builder = Server::builder()
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(1 << 20);
        if let Some(tls) = &self.tls {
            install_crypto_provider();
            builder = builder
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
                )
                .context("fake OAP: TLS configuration")?;
        }
        let services = Services(Arc::clone(&self.shared));
        let router = builder
            .add_service(EbpfProcessServiceServer::new(services.clone()))
            .add_service(EbpfProfilingServiceServer::new(services.clone()))
            .add_service(ContinuousProfilingServiceServer::new(services.clone()))
            .add_service(MeterReportServiceServer::new(services));
        let addr = self.addr;
        runtime.spawn(async move {
            if let Err(error) = router.serve_with_incoming(incoming).await {
                eprintln!("fake OAP on {addr}: server error: {error}");
            }
        });
        self.server = Some(runtime);
        Ok(())
    }

    /// The address it listens on (the same after [`start_again`](Self::start_again)).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (the certificate's name).
    pub fn endpoint(&self) -> String {
        match self.tls {
            None => format!("http://{}", self.addr),
            Some(_) => format!("https://localhost:{}", self.addr.port()),
        }
    }

    /// Kills the server like a crash: the listener and all connections close at once, open
    /// streams are cut. What was recorded and queued is kept.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.server.take() {
            runtime.shutdown_background();
        }
    }

    /// Listens again on the same address after [`stop`](Self::stop).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.server.is_none(), "fake OAP is already running");
        self.serve()
    }

    pub fn is_running(&self) -> bool {
        self.server.is_some()
    }

    /// Queues a task; `queryTasks` returns it while the query's watermark is below
    /// `task.update_ms`. Queuing the same task id again with a later update time re-sends it.
    pub fn add_task(&self, task: TaskCommand) {
        self.shared
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
        self.shared.changes.send_modify(|count| *count += 1);
    }

    /// Gives `service` the policy `uuid` with `profiling` as its `Profiling` object
    /// (`{TARGET: {MONITOR: {Threshold, Period, Count}}}`); queries with another UUID get it.
    pub fn set_policy(&self, service: &str, uuid: &str, profiling: serde_json::Value) {
        locked(&self.shared.policies).insert(service.to_owned(), (uuid.to_owned(), profiling));
        self.shared.changes.send_modify(|count| *count += 1);
    }

    /// Removes `service`'s policy: a query that names its old UUID gets UUID `""`.
    pub fn remove_policy(&self, service: &str) {
        locked(&self.shared.policies).remove(service);
        self.shared.changes.send_modify(|count| *count += 1);
    }

    /// The next `reportProfilingTask` call gets `reply` (e.g. an empty or malformed one)
    /// instead of a task id.
    pub fn queue_report_reply(&self, reply: Commands) {
        locked(&self.shared.report_replies).push_back(reply);
    }

    /// The next `queryPolicies` call gets `reply` (e.g. a malformed one) instead of the
    /// policies.
    pub fn queue_policy_reply(&self, reply: Commands) {
        locked(&self.shared.policy_replies).push_back(reply);
    }

    /// A copy of everything recorded so far.
    pub fn recorded(&self) -> Recorded {
        self.shared.recorded().clone()
    }

    /// Forgets everything recorded (the queued tasks stay).
    pub fn clear_recorded(&self) {
        self.shared
            .record(|recorded| *recorded = Recorded::default());
    }

    /// Waits until `condition` holds for what was recorded, at most `timeout`; returns a copy of
    /// the recorded state that satisfied it.
    pub async fn wait_for(
        &self,
        condition: impl Fn(&Recorded) -> bool,
        timeout: Duration,
    ) -> Result<Recorded, WaitTimedOut> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.changes.subscribe();
        loop {
            changes.borrow_and_update();
            {
                let recorded = self.shared.recorded();
                if condition(&recorded) {
                    return Ok(recorded.clone());
                }
            }
            // The sender lives in `self.shared`, so `changed` only returns on a change.
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Err(WaitTimedOut {
                    waited: started.elapsed(),
                    recorded: self.recorded(),
                });
            }
        }
    }

    /// What the processes reported so far were given as ids, by process name.
    pub fn process_ids_by_name(&self) -> HashMap<String, String> {
        self.recorded()
            .reported_processes()
            .into_iter()
            .map(|(id, entity, _)| (entity.process_name, id))
            .collect()
    }
}

impl Drop for FakeOap {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}
