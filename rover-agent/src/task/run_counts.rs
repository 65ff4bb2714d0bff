//! Profiling runs by profiler and by what started them, counted as they start and end (for
//! the self-metrics).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::bpf::ProfilerKind;
use crate::metrics::RunCount;

/// What started a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum RunSource {
    /// A task the OAP handed out.
    Backend,
    /// A continuous profiling trigger.
    Continuous,
}

impl RunSource {
    const ALL: [RunSource; 2] = [RunSource::Backend, RunSource::Continuous];

    fn name(self) -> &'static str {
        match self {
            RunSource::Backend => "backend",
            RunSource::Continuous => "continuous",
        }
    }
}

const KINDS: [ProfilerKind; 2] = [ProfilerKind::OnCpu, ProfilerKind::OffCpu];

/// Runs active and started, per (profiler, source). Shared by every run.
#[derive(Debug, Default)]
pub struct RunCounts {
    active: [[AtomicU64; 2]; 2],
    started: [[AtomicU64; 2]; 2],
}

/// A run recording now: counted active until dropped.
pub(super) struct ActiveRun {
    counts: Arc<RunCounts>,
    slot: (usize, usize),
}

impl RunCounts {
    /// Counts a run that started recording.
    pub(super) fn started(self: &Arc<Self>, kind: ProfilerKind, source: RunSource) -> ActiveRun {
        let slot = slot(kind, source);
        self.started[slot.0][slot.1].fetch_add(1, Ordering::Relaxed);
        self.active[slot.0][slot.1].fetch_add(1, Ordering::Relaxed);
        ActiveRun {
            counts: Arc::clone(self),
            slot,
        }
    }

    /// Every (profiler, source) pair, with or without runs.
    pub fn snapshot(&self) -> Vec<RunCount> {
        KINDS
            .into_iter()
            .flat_map(|profiler| {
                RunSource::ALL.into_iter().map(move |source| {
                    let (kind, from) = slot(profiler, source);
                    RunCount {
                        profiler,
                        source: source.name(),
                        active: self.active[kind][from].load(Ordering::Relaxed),
                        started: self.started[kind][from].load(Ordering::Relaxed),
                    }
                })
            })
            .collect()
    }
}

impl Drop for ActiveRun {
    fn drop(&mut self) {
        self.counts.active[self.slot.0][self.slot.1].fetch_sub(1, Ordering::Relaxed);
    }
}

fn slot(kind: ProfilerKind, source: RunSource) -> (usize, usize) {
    let kind = match kind {
        ProfilerKind::OnCpu => 0,
        ProfilerKind::OffCpu => 1,
    };
    let source = match source {
        RunSource::Backend => 0,
        RunSource::Continuous => 1,
    };
    (kind, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_active_until_dropped_and_started_for_ever() {
        let counts = Arc::new(RunCounts::default());
        let run = counts.started(ProfilerKind::OffCpu, RunSource::Continuous);
        let find = |counts: &RunCounts| {
            counts
                .snapshot()
                .into_iter()
                .find(|c| c.profiler == ProfilerKind::OffCpu && c.source == "continuous")
                .expect("every pair is reported")
        };
        assert_eq!((find(&counts).active, find(&counts).started), (1, 1));
        drop(run);
        assert_eq!((find(&counts).active, find(&counts).started), (0, 1));
        assert_eq!(counts.snapshot().len(), 4);
        assert!(
            counts
                .snapshot()
                .iter()
                .filter(|c| c.source == "backend")
                .all(|c| c.active == 0 && c.started == 0)
        );
    }
}
