//! An off-CPU profile: where target threads wait, and for how long.

use std::future::Future;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tracing::info;

use super::run::record;
use super::{ProfileRun, RunDetails, RunSettings};
use crate::bpf::{OffCpuConfig, OffCpuProbe};
use crate::profile::{Profile, ValueType};

/// What to profile and how.
#[derive(Clone, Debug)]
pub struct OffCpuRequest {
    pub run: RunSettings,
    pub exclude_preempt: bool,
    pub min_block: Duration,
    /// Probability (0 < p ≤ 1) a switch-out is recorded; totals are scaled by 1/p.
    pub sample_probability: f64,
}

/// Records off-CPU episodes of the targets until the duration elapses, `stop` resolves or every
/// target exited. Episodes still open at the end are not counted (`Counters::open_episodes`).
pub async fn profile_off_cpu(
    request: &OffCpuRequest,
    stop: impl Future<Output = &'static str>,
) -> anyhow::Result<ProfileRun> {
    let mut probe = OffCpuProbe::start(&OffCpuConfig {
        targets: request.run.targets.clone(),
        exclude_preempt: request.exclude_preempt,
        min_block: request.min_block,
        sample_probability: request.sample_probability,
    })
    .context("starting the off-CPU profiler")?;
    info!(p = request.sample_probability, "off-CPU profiling started");

    let mut profile = Profile::new(
        vec![
            ValueType::new("switches", "count"),
            ValueType::new("off_cpu", "nanoseconds"),
        ],
        SystemTime::now(),
    );
    if request.sample_probability < 1.0 {
        profile.notes.push(format!(
            "sampled: each switch-out kept with probability {}, totals scaled by 1/p",
            request.sample_probability
        ));
    }
    let outcome = record(
        &mut probe,
        &mut profile,
        &request.run,
        |value| vec![value.switches, value.off_cpu_ns],
        stop,
    )
    .await;
    info!(end = ?outcome.end, elapsed = ?outcome.elapsed, "off-CPU profiling ended");
    Ok(outcome.into_run(
        profile,
        RunDetails::OffCpu {
            sample_probability: request.sample_probability,
        },
    ))
}
