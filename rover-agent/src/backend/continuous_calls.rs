//! The continuous-profiling calls: `ContinuousProfilingService.queryPolicies` and
//! `reportProfilingTask`, and the meters through `MeterReportService.collectBatch`. Thin: the
//! replies are read by [`parse_policy_reply`] and [`parse_report_reply`].

use rover_proto::v3::{
    ContinuousProfilingPolicyQuery, ContinuousProfilingReport,
    ContinuousProfilingServicePolicyQuery, MeterDataCollection,
};

use super::{
    Backend, Error, PolicyReplyError, ReportReplyError, ServicePolicy, parse_policy_reply,
    parse_report_reply,
};

/// Why a continuous-profiling call brought nothing usable; either way the caller retries at its
/// next poll or check.
#[derive(Debug, thiserror::Error)]
pub enum ContinuousCallError {
    #[error(transparent)]
    Call(#[from] Error),
    #[error(transparent)]
    PolicyReply(#[from] PolicyReplyError),
    #[error(transparent)]
    ReportReply(#[from] ReportReplyError),
}

/// `queryPolicies` for `services` (name, the UUID of its last policy, `""` at first).
/// `Ok(None)`: nothing changed.
pub async fn query_policies(
    backend: &Backend,
    services: impl IntoIterator<Item = (String, String)>,
) -> Result<Option<Vec<ServicePolicy>>, ContinuousCallError> {
    let query = ContinuousProfilingPolicyQuery {
        policies: services
            .into_iter()
            .map(
                |(service_name, uuid)| ContinuousProfilingServicePolicyQuery { service_name, uuid },
            )
            .collect(),
    };
    let reply = backend.continuous().query_policies(query).await;
    let reply = backend.outcome("queryPolicies", reply)?.into_inner();
    Ok(parse_policy_reply(&reply)?)
}

/// `reportProfilingTask`: the task id the OAP gives the triggered run.
pub async fn report_profiling_task(
    backend: &Backend,
    report: ContinuousProfilingReport,
) -> Result<String, ContinuousCallError> {
    let reply = backend.continuous().report_profiling_task(report).await;
    let reply = backend.outcome("reportProfilingTask", reply)?.into_inner();
    Ok(parse_report_reply(&reply)?)
}

/// `collectBatch` with the collections on one stream (nothing is sent for none).
pub async fn report_meters(
    backend: &Backend,
    collections: Vec<MeterDataCollection>,
) -> Result<(), Error> {
    if collections.is_empty() {
        return Ok(());
    }
    let reply = backend
        .meters()
        .collect_batch(futures_util::stream::iter(collections))
        .await;
    backend.outcome("collectBatch", reply)?;
    Ok(())
}
