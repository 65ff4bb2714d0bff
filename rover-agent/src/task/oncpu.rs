//! An on-CPU profile of some processes or the whole host over a fixed duration.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use tokio::time::{MissedTickBehavior, interval_at, sleep_until};
use tracing::{debug, info, warn};

use super::stacks::StackFolder;
use super::{EndReason, ProfileRun};
use crate::bpf::{OnCpuConfig, OnCpuProbe, Targets};
use crate::process;
use crate::profile::{Profile, ValueType};
use crate::symbolize::{Symbolizer, SymbolizerConfig};

/// What to profile and how.
#[derive(Clone, Debug)]
pub struct OnCpuRequest {
    pub targets: Targets,
    pub duration: Duration,
    pub frequency_hz: u64,
    /// How often the kernel aggregates are drained and symbolized.
    pub drain_interval: Duration,
    pub symbolizer: SymbolizerConfig,
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
        targets: request.targets.clone(),
        drain_interval: request.drain_interval,
    })
    .context("starting the on-CPU sampler")?;
    let started = Instant::now();
    let start_time = SystemTime::now();
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
        start_time,
    );
    profile.period = Some((ValueType::new("cpu", "nanoseconds"), period_ns));
    let mut folder = StackFolder::new(Symbolizer::new(request.symbolizer.clone()));
    if let Targets::Pids(pids) = &request.targets {
        for &pid in pids {
            folder.observe(pid);
        }
    }

    let deadline = tokio::time::Instant::from_std(started + request.duration);
    let mut drains = interval_at(
        tokio::time::Instant::from_std(started + request.drain_interval),
        request.drain_interval,
    );
    drains.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut end = loop {
        tokio::select! {
            () = sleep_until(deadline) => break EndReason::Completed,
            signal = &mut stop => break EndReason::Stopped(signal),
            _ = drains.tick() => {
                if let Err(error) = drain(&mut probe, &mut folder, &mut profile, period_ns) {
                    break EndReason::Failed(format!("{error:#}"));
                }
                if let Targets::Pids(pids) = &request.targets
                    && !pids.iter().any(|&pid| process::is_alive(pid))
                {
                    break EndReason::TargetsExited;
                }
            }
        }
    };
    // Whatever ended the run, stop sampling and collect what the kernel holds since the last
    // drain: then the profile holds exactly what the counters say was recorded.
    if let Err(error) = probe.stop_sampling() {
        warn!("detaching the sampler failed: {error:#}");
    }
    if let Err(error) = drain(&mut probe, &mut folder, &mut profile, period_ns) {
        warn!("final drain failed: {error:#}");
        if !matches!(end, EndReason::Failed(_)) {
            end = EndReason::Failed(format!("{error:#}"));
        }
    }
    let counters = probe.counters().unwrap_or_else(|error| {
        warn!("reading loss counters failed: {error:#}");
        Default::default()
    });
    drop(probe);
    let elapsed = started.elapsed();
    profile.duration = elapsed;
    info!(?end, ?elapsed, "on-CPU sampling ended");
    Ok(ProfileRun {
        profile,
        counters,
        symbolize: folder.symbolizer().stats(),
        elapsed,
        end,
    })
}

fn drain(
    probe: &mut OnCpuProbe,
    folder: &mut StackFolder,
    profile: &mut Profile,
    period_ns: u64,
) -> anyhow::Result<()> {
    let stacks = probe.drain().context("draining on-CPU samples")?;
    debug!(stacks = stacks.len(), "drained");
    for stack in &stacks {
        folder.add(profile, stack, &[stack.value, stack.value * period_ns]);
    }
    Ok(())
}
