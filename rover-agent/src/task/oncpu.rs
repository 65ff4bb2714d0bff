//! An on-CPU profile of some processes or the whole host over a fixed duration.

use std::future::Future;
use std::time::SystemTime;

use anyhow::Context as _;
use tracing::info;

use super::run::record;
use super::{ProfileRun, RunDetails, RunSettings};
use crate::bpf::{OnCpuConfig, OnCpuProbe};
use crate::profile::{Profile, ValueType};

/// What to profile and how.
#[derive(Clone, Debug)]
pub struct OnCpuRequest {
    pub run: RunSettings,
    pub frequency_hz: u64,
}

/// Samples the targets until the duration elapses, `stop` resolves (with the signal's name) or
/// every target process has exited. Errors while starting are returned; errors after the start
/// end the run early and keep what was captured (`EndReason::Failed`).
pub async fn profile_on_cpu(
    request: &OnCpuRequest,
    stop: impl Future<Output = &'static str>,
) -> anyhow::Result<ProfileRun> {
    let mut probe = OnCpuProbe::start(&OnCpuConfig {
        frequency_hz: request.frequency_hz,
        targets: request.run.targets.clone(),
        drain_interval: request.run.drain_interval,
    })
    .context("starting the on-CPU sampler")?;
    info!(
        frequency_hz = request.frequency_hz,
        "on-CPU sampling started"
    );

    let period_ns = 1_000_000_000 / request.frequency_hz;
    let mut profile = Profile::new(
        vec![
            ValueType::new("samples", "count"),
            ValueType::new("cpu", "nanoseconds"),
        ],
        SystemTime::now(),
    );
    profile.period = Some((ValueType::new("cpu", "nanoseconds"), period_ns));
    let outcome = record(
        &mut probe,
        &mut profile,
        &request.run,
        |&samples| vec![samples, samples * period_ns],
        stop,
    )
    .await;
    info!(end = ?outcome.end, elapsed = ?outcome.elapsed, "on-CPU sampling ended");
    Ok(outcome.into_run(
        profile,
        RunDetails::OnCpu {
            frequency_hz: request.frequency_hz,
        },
    ))
}
