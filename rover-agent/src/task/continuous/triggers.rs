//! Whether a fired target may start a run: one run per process and target at a time, a silence
//! after each run's start, and a cap on the triggered runs at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::backend::ProfilingTarget;

/// A process (the OAP's id) and a target: at most one triggered run each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TriggerKey {
    pub process_id: String,
    pub target: ProfilingTarget,
}

/// Why a fired target starts no run now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A triggered run of this process and target is still running.
    Running,
    /// The previous run of this process and target started less than the silence ago.
    Silenced { left: Duration },
    /// `max_triggered_runs` runs are running.
    AtCap,
}

#[derive(Debug)]
pub(crate) struct Triggers {
    silence: Duration,
    max_runs: usize,
    /// When each key's latest run started.
    started: HashMap<TriggerKey, Instant>,
}

impl Triggers {
    pub fn new(silence: Duration, max_runs: u32) -> Self {
        Self {
            silence,
            max_runs: usize::try_from(max_runs.max(1)).unwrap_or(usize::MAX),
            started: HashMap::new(),
        }
    }

    /// Whether `key` may start a run at `now`, `running` being whether a run of it is running
    /// and `active` how many triggered runs are.
    pub fn admit(
        &self,
        key: &TriggerKey,
        running: bool,
        active: usize,
        now: Instant,
    ) -> Result<(), Refusal> {
        if running {
            return Err(Refusal::Running);
        }
        if let Some(&started) = self.started.get(key) {
            let since = now.saturating_duration_since(started);
            if since < self.silence {
                return Err(Refusal::Silenced {
                    left: self.silence - since,
                });
            }
        }
        if active >= self.max_runs {
            return Err(Refusal::AtCap);
        }
        Ok(())
    }

    /// A run of `key` started at `now`; starts whose silence is over are forgotten.
    pub fn started(&mut self, key: TriggerKey, now: Instant) {
        let silence = self.silence;
        self.started
            .retain(|_, started| now.saturating_duration_since(*started) < silence);
        self.started.insert(key, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(process_id: &str, target: ProfilingTarget) -> TriggerKey {
        TriggerKey {
            process_id: process_id.into(),
            target,
        }
    }

    #[test]
    fn one_run_per_key_then_silence_then_again() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut triggers = Triggers::new(s(60), 10);
        let cpu = key("p1", ProfilingTarget::OnCpu);
        assert_eq!(triggers.admit(&cpu, false, 0, t0), Ok(()));
        triggers.started(cpu.clone(), t0);
        assert_eq!(
            triggers.admit(&cpu, true, 1, t0 + s(5)),
            Err(Refusal::Running)
        );
        // The run ended (it lasted 10 s); the silence counts from its start.
        assert_eq!(
            triggers.admit(&cpu, false, 0, t0 + s(15)),
            Err(Refusal::Silenced { left: s(45) })
        );
        assert_eq!(triggers.admit(&cpu, false, 0, t0 + s(60)), Ok(()));
        // Another target of the process, or another process, is not silenced.
        let off = key("p1", ProfilingTarget::OffCpu);
        assert_eq!(triggers.admit(&off, false, 1, t0 + s(1)), Ok(()));
        assert_eq!(
            triggers.admit(&key("p2", ProfilingTarget::OnCpu), false, 1, t0 + s(1)),
            Ok(())
        );
    }

    #[test]
    fn the_cap_counts_every_triggered_run() {
        let t0 = Instant::now();
        let triggers = Triggers::new(Duration::from_secs(60), 2);
        let cpu = key("p3", ProfilingTarget::OnCpu);
        assert_eq!(triggers.admit(&cpu, false, 1, t0), Ok(()));
        assert_eq!(triggers.admit(&cpu, false, 2, t0), Err(Refusal::AtCap));
    }

    #[test]
    fn old_starts_are_forgotten() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut triggers = Triggers::new(s(10), 5);
        triggers.started(key("a", ProfilingTarget::OnCpu), t0);
        triggers.started(key("b", ProfilingTarget::OnCpu), t0 + s(5));
        triggers.started(key("c", ProfilingTarget::OnCpu), t0 + s(12));
        assert_eq!(triggers.started.len(), 2, "a's silence is over");
    }
}
