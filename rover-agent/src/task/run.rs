//! The loop every profile runs: drain on a timer until the duration elapses, a stop signal
//! arrives or every target exited; then stop recording and drain what is left.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::time::{MissedTickBehavior, interval_at, sleep_until};
use tracing::{debug, warn};

use super::stacks::StackFolder;
use super::{EndReason, ProfileRun, RunDetails, RunSettings};
use crate::bpf::{self, Counters, OffCpu, OffCpuProbe, OnCpuProbe, RawStack, Targets};
use crate::process;
use crate::profile::Profile;
use crate::symbolize::{SymbolizeStats, Symbolizer};

/// A loaded profiler, as the loop drives it.
pub(super) trait Recorder {
    type Value;
    fn drain(&mut self) -> Result<Vec<RawStack<Self::Value>>, bpf::Error>;
    /// Stops recording; later drains collect the rest.
    fn stop(&mut self) -> Result<(), bpf::Error>;
    fn counters(&self) -> Result<Counters, bpf::Error>;
}

impl Recorder for OnCpuProbe {
    type Value = u64;
    fn drain(&mut self) -> Result<Vec<RawStack<u64>>, bpf::Error> {
        OnCpuProbe::drain(self)
    }
    fn stop(&mut self) -> Result<(), bpf::Error> {
        OnCpuProbe::stop(self)
    }
    fn counters(&self) -> Result<Counters, bpf::Error> {
        OnCpuProbe::counters(self)
    }
}

impl Recorder for OffCpuProbe {
    type Value = OffCpu;
    fn drain(&mut self) -> Result<Vec<RawStack<OffCpu>>, bpf::Error> {
        OffCpuProbe::drain(self)
    }
    fn stop(&mut self) -> Result<(), bpf::Error> {
        OffCpuProbe::stop(self)
    }
    fn counters(&self) -> Result<Counters, bpf::Error> {
        OffCpuProbe::counters(self)
    }
}

/// How a run went.
pub(super) struct Outcome {
    pub end: EndReason,
    pub counters: Counters,
    pub symbolize: SymbolizeStats,
    pub elapsed: Duration,
}

impl Outcome {
    pub(super) fn into_run(self, profile: Profile, details: RunDetails) -> ProfileRun {
        ProfileRun {
            profile,
            counters: self.counters,
            symbolize: self.symbolize,
            elapsed: self.elapsed,
            end: self.end,
            details,
        }
    }
}

/// Runs `recorder` into `profile`; `values` gives the profile values (in the profile's order)
/// of a drained stack. Returns the outcome and the symbolizer's statistics.
pub(super) async fn record<R: Recorder>(
    recorder: &mut R,
    profile: &mut Profile,
    settings: &RunSettings,
    values: impl Fn(&R::Value) -> Vec<u64>,
    stop: impl Future<Output = &'static str>,
) -> Outcome {
    let RunSettings {
        targets,
        duration,
        drain_interval,
        symbolizer,
    } = settings;
    let (duration, drain_interval) = (*duration, *drain_interval);
    let mut folder = StackFolder::new(Symbolizer::new(symbolizer.clone()));
    let started = Instant::now();
    if let Targets::Pids(pids) = targets {
        for &pid in pids {
            folder.observe(pid);
        }
    }
    let mut drain = |recorder: &mut R, profile: &mut Profile| -> anyhow::Result<()> {
        let stacks = recorder.drain().context("draining the kernel aggregates")?;
        debug!(stacks = stacks.len(), "drained");
        for stack in &stacks {
            folder.add(profile, stack, &values(&stack.value));
        }
        folder.retire_exited();
        Ok(())
    };

    let deadline = tokio::time::Instant::from_std(started + duration);
    let mut drains = interval_at(
        tokio::time::Instant::from_std(started + drain_interval),
        drain_interval,
    );
    drains.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(stop);
    let mut end = loop {
        tokio::select! {
            () = sleep_until(deadline) => break EndReason::Completed,
            signal = &mut stop => break EndReason::Stopped(signal),
            _ = drains.tick() => {
                if let Err(error) = drain(recorder, profile) {
                    break EndReason::Failed(format!("{error:#}"));
                }
                if let Targets::Pids(pids) = targets
                    && !pids.iter().any(|&pid| process::is_alive(pid))
                {
                    break EndReason::TargetsExited;
                }
            }
        }
    };
    // Whatever ended the run, stop recording and collect what the kernel holds since the last
    // drain: then the profile holds exactly what the counters say was recorded.
    if let Err(error) = recorder.stop() {
        warn!("detaching the profiler failed: {error:#}");
    }
    if let Err(error) = drain(recorder, profile) {
        warn!("final drain failed: {error:#}");
        if !matches!(end, EndReason::Failed(_)) {
            end = EndReason::Failed(format!("{error:#}"));
        }
    }
    let counters = recorder.counters().unwrap_or_else(|error| {
        warn!("reading loss counters failed: {error:#}");
        Counters::default()
    });
    let elapsed = started.elapsed();
    profile.duration = elapsed;
    Outcome {
        end,
        counters,
        symbolize: folder.symbolizer().stats(),
        elapsed,
    }
}
