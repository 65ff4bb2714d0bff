//! The SkyWalking backend (OAP): the gRPC channel, process reporting, the task poll, the
//! upload of profiling windows, encoded for SkyWalking, and continuous profiling's policies,
//! triggers and meters. It never sees aya or `rover-common`.

mod backoff;
mod connection;
mod continuous_calls;
mod continuous_policy;
mod continuous_report;
mod profiling_data;
mod reporter;
mod task_command;
mod upload;

use std::path::PathBuf;

pub use backoff::Backoff;
pub use connection::{Backend, CallStats};
pub use continuous_calls::{
    ContinuousCallError, query_policies, report_meters, report_profiling_task,
};
pub use continuous_policy::{
    DroppedPolicy, MAX_PERIOD_SECS, Monitor, NotSupported, Policy, PolicyItem, PolicyReplyError,
    ServicePolicy, TargetPolicy, parse_policy_reply,
};
pub use continuous_report::{
    MeterValue, ReportReplyError, TriggerCause, encode_meters, encode_report, meter_name,
    parse_report_reply,
};
pub use profiling_data::{UploadTask, WindowBatch, encode_window};
pub use reporter::{ProcessCounts, ProcessDirectory, ProcessReporter};
pub use task_command::{
    ProfilingTarget, ProfilingTaskCommand, TaskCommandError, TaskSchedule, TaskWatermark,
    query_tasks,
};
pub use upload::{UploadBuffer, UploadStats, Uploader};

/// What talking to the OAP can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("core.backend.addr {addr:?} is not a valid address: {source}")]
    Address {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("core.backend.authentication is not a valid gRPC header value (printable ASCII only)")]
    Authentication,
    #[error("TLS: {0}")]
    Tls(String),
    #[error("TLS: {}: {problem}", path.display())]
    TlsFile { path: PathBuf, problem: String },
    /// A call the OAP did not answer (unreachable, TLS refused, an error status).
    #[error("{call} to the OAP at {addr} failed: {}", describe(status))]
    Call {
        call: &'static str,
        addr: String,
        status: Box<tonic::Status>,
    },
}

impl Error {
    fn call(call: &'static str, backend: &Backend, status: tonic::Status) -> Self {
        backend.lost_contact();
        Self::Call {
            call,
            addr: backend.addr().to_owned(),
            status: Box::new(status),
        }
    }
}

/// A status with what caused it (tonic says "transport error"; the cause says which: refused
/// connection, an unknown certificate issuer, ...).
fn describe(status: &tonic::Status) -> String {
    crate::error_chain::with_causes(
        format!("{} ({:?})", status.message(), status.code()),
        std::error::Error::source(status),
    )
}
