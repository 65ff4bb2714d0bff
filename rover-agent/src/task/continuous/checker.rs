//! The checks of the processes under a policy: each sample (every `fetch_interval`) reads every
//! watched process once and the host's load once, into one-second windows per monitor; each
//! check (every `check_interval`) says which targets of which processes fire.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tracing::debug;

use super::sampler::{CpuUsage, HostReadings, ProcessStat, SampleError};
use super::window::CheckWindow;
use crate::backend::{Monitor, Policy, PolicyItem, ProfilingTarget, TriggerCause};

/// What the checker reads: [`HostReadings`] in the agent, fixed values in tests.
pub trait Readings {
    /// Every process of `pids`, once each, in their order (one read of the kernel's list).
    fn process_stats(&mut self, pids: &[u32]) -> Vec<Result<ProcessStat, SampleError>>;
    /// The host's 1-minute load average.
    fn load_average(&mut self) -> Result<f64, SampleError>;
}

impl Readings for HostReadings {
    fn process_stats(&mut self, pids: &[u32]) -> Vec<Result<ProcessStat, SampleError>> {
        HostReadings::process_stats(self, pids)
    }

    fn load_average(&mut self) -> Result<f64, SampleError> {
        HostReadings::load_average(self)
    }
}

/// A target of a process whose policy items fired, with every item that did.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    pub pid: u32,
    pub target: ProfilingTarget,
    pub causes: Vec<TriggerCause>,
}

/// One watched process.
#[derive(Debug)]
struct Watched {
    policy: Arc<Policy>,
    cpu: CpuUsage,
    /// `starttime` of the process last read: another one means the pid was reused.
    start_time: Option<u64>,
    /// PROCESS_CPU and PROCESS_THREAD_COUNT, when the policy checks them.
    cpu_window: Option<CheckWindow>,
    threads_window: Option<CheckWindow>,
}

/// The supported items of a policy that `Checker` runs: ON_CPU and OFF_CPU targets, the
/// process and load monitors (NETWORK and the HTTP monitors are logged by the caller).
fn checked_items(policy: &Policy) -> impl Iterator<Item = (ProfilingTarget, &PolicyItem)> {
    policy
        .targets
        .iter()
        .filter(|target| target.target != ProfilingTarget::Network)
        .flat_map(|target| target.items.iter().map(|item| (target.target, item)))
        .filter(|(_, item)| item.monitor.is_supported())
}

/// The longest period of the policy's items on `monitor`, if it has any.
fn window_len(policy: &Policy, monitor: Monitor) -> Option<u32> {
    checked_items(policy)
        .filter(|(_, item)| item.monitor == monitor)
        .map(|(_, item)| item.period_secs)
        .max()
}

fn fit(window: &mut Option<CheckWindow>, len: Option<u32>) {
    match (window.as_mut(), len) {
        (_, None) => *window = None,
        (Some(window), Some(len)) if window.len_secs() == len => {}
        (Some(window), Some(len)) => window.resize(len),
        (None, Some(len)) => *window = Some(CheckWindow::new(len)),
    }
}

impl Watched {
    fn new(policy: Arc<Policy>) -> Self {
        let mut watched = Self {
            policy: Arc::clone(&policy),
            cpu: CpuUsage::default(),
            start_time: None,
            cpu_window: None,
            threads_window: None,
        };
        watched.set_policy(policy);
        watched
    }

    fn set_policy(&mut self, policy: Arc<Policy>) {
        fit(
            &mut self.cpu_window,
            window_len(&policy, Monitor::ProcessCpu),
        );
        fit(
            &mut self.threads_window,
            window_len(&policy, Monitor::ProcessThreadCount),
        );
        self.policy = policy;
    }

    fn record(&mut self, second: u64, stat: ProcessStat, at: Instant) {
        if self.start_time.replace(stat.start_time) != Some(stat.start_time) {
            // Another process now has the pid (or the first reading): nothing of the old one
            // counts for it.
            for window in [&mut self.cpu_window, &mut self.threads_window]
                .into_iter()
                .flatten()
            {
                *window = CheckWindow::new(window.len_secs());
            }
        }
        let cpu = self.cpu.update(stat, at);
        if let (Some(window), Some(cpu)) = (self.cpu_window.as_mut(), cpu) {
            window.record(second, cpu);
        }
        if let Some(window) = self.threads_window.as_mut() {
            window.record(second, stat.threads as f64);
        }
    }
}

/// The processes under a policy and the host's load, sampled and checked.
#[derive(Debug)]
pub struct Checker<R> {
    readings: R,
    /// Seconds of the windows count from here.
    epoch: Instant,
    processes: HashMap<u32, Watched>,
    /// SYSTEM_LOAD, when some watched process's policy checks it.
    load_window: Option<CheckWindow>,
}

impl<R: Readings> Checker<R> {
    /// `epoch` starts the checker's clock (seconds of the windows are whole seconds after it).
    pub fn new(readings: R, epoch: Instant) -> Self {
        Self {
            readings,
            epoch,
            processes: HashMap::new(),
            load_window: None,
        }
    }

    /// Puts `pid` under `policy`, or moves it to a new one (the values still inside its new
    /// windows are kept).
    pub fn watch(&mut self, pid: u32, policy: &Arc<Policy>) {
        match self.processes.get_mut(&pid) {
            // Called for every process at every check: no work when nothing changed.
            Some(watched) if Arc::ptr_eq(&watched.policy, policy) => return,
            Some(watched) => watched.set_policy(Arc::clone(policy)),
            None => {
                self.processes.insert(pid, Watched::new(Arc::clone(policy)));
            }
        }
        self.fit_load_window();
    }

    /// No longer checks `pid` (it exited, or its policy was removed).
    pub fn unwatch(&mut self, pid: u32) {
        if self.processes.remove(&pid).is_some() {
            self.fit_load_window();
        }
    }

    fn fit_load_window(&mut self) {
        let len = self
            .processes
            .values()
            .filter_map(|watched| window_len(&watched.policy, Monitor::SystemLoad))
            .max();
        fit(&mut self.load_window, len);
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs()
    }

    /// Reads every watched process (once each) and the load (once, when checked), at `at`.
    /// Returns the pids whose process is gone, for the caller to unwatch.
    pub fn sample(&mut self, at: Instant) -> Vec<u32> {
        let second = self.second(at);
        if let Some(window) = self.load_window.as_mut() {
            match self.readings.load_average() {
                Ok(load) => window.record(second, load),
                Err(error) => debug!("SYSTEM_LOAD not read: {error}"),
            }
        }
        let pids: Vec<u32> = self.processes.keys().copied().collect();
        let stats = self.readings.process_stats(&pids);
        let mut gone = Vec::new();
        for (pid, stat) in pids.into_iter().zip(stats) {
            let Some(watched) = self.processes.get_mut(&pid) else {
                continue;
            };
            match stat {
                Ok(stat) => watched.record(second, stat, at),
                Err(error) if error.process_gone() => gone.push(pid),
                Err(error) => debug!(pid, "process not read: {error}"),
            }
        }
        gone
    }

    /// The targets that fire at `at`: per process and target, every item whose window has at
    /// least `count` of its last `period` seconds ≥ the threshold.
    pub fn check(&self, at: Instant) -> Vec<Fired> {
        let now = self.second(at);
        let mut fired: Vec<Fired> = Vec::new();
        for (&pid, watched) in &self.processes {
            for (target, item) in checked_items(&watched.policy) {
                let window = match item.monitor {
                    Monitor::ProcessCpu => watched.cpu_window.as_ref(),
                    Monitor::ProcessThreadCount => watched.threads_window.as_ref(),
                    Monitor::SystemLoad => self.load_window.as_ref(),
                    Monitor::HttpErrorRate | Monitor::HttpAvgResponseTime => None,
                };
                let Some(current) = window.and_then(|window| {
                    window.fires(now, item.period_secs, item.count, item.threshold)
                }) else {
                    continue;
                };
                let cause = TriggerCause {
                    monitor: item.monitor,
                    threshold: item.threshold,
                    current,
                };
                match fired
                    .iter_mut()
                    .find(|fired| fired.pid == pid && fired.target == target)
                {
                    Some(fired) => fired.causes.push(cause),
                    None => fired.push(Fired {
                        pid,
                        target,
                        causes: vec![cause],
                    }),
                }
            }
        }
        fired.sort_by_key(|fired| (fired.pid, fired.target == ProfilingTarget::OffCpu));
        fired
    }

    /// The newest value of each monitor each watched process's policy checks (its meters).
    pub fn current(&self) -> Vec<(u32, Monitor, f64)> {
        let load = self.load_window.as_ref().and_then(CheckWindow::latest);
        let mut values = Vec::new();
        for (&pid, watched) in &self.processes {
            let mut monitors: Vec<Monitor> = checked_items(&watched.policy)
                .map(|(_, item)| item.monitor)
                .collect();
            monitors.sort();
            monitors.dedup();
            for monitor in monitors {
                let value = match monitor {
                    Monitor::ProcessCpu => {
                        watched.cpu_window.as_ref().and_then(CheckWindow::latest)
                    }
                    Monitor::ProcessThreadCount => watched
                        .threads_window
                        .as_ref()
                        .and_then(CheckWindow::latest),
                    Monitor::SystemLoad => load,
                    Monitor::HttpErrorRate | Monitor::HttpAvgResponseTime => None,
                };
                values.extend(value.map(|value| (pid, monitor, value)));
            }
        }
        values.sort_by_key(|&(pid, monitor, _)| (pid, monitor));
        values
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backend::TargetPolicy;

    /// Readings set by the test: per pid (CPU time so far, threads, start time), the load.
    #[derive(Default)]
    struct Fake {
        processes: HashMap<u32, ProcessStat>,
        load: f64,
    }

    impl Readings for Fake {
        fn process_stats(&mut self, pids: &[u32]) -> Vec<Result<ProcessStat, SampleError>> {
            pids.iter()
                .map(|&pid| {
                    self.processes
                        .get(&pid)
                        .copied()
                        .ok_or(SampleError::NotListed { pid })
                })
                .collect()
        }

        fn load_average(&mut self) -> Result<f64, SampleError> {
            Ok(self.load)
        }
    }

    fn policy(targets: Vec<(ProfilingTarget, Vec<PolicyItem>)>) -> Arc<Policy> {
        Arc::new(Policy {
            uuid: "uuid-1".into(),
            targets: targets
                .into_iter()
                .map(|(target, items)| TargetPolicy { target, items })
                .collect(),
        })
    }

    /// A checker, and its clock's `second`.
    fn checker() -> (Checker<Fake>, impl Fn(u64) -> Instant) {
        let epoch = Instant::now();
        (Checker::new(Fake::default(), epoch), move |second| {
            epoch + Duration::from_secs(second)
        })
    }

    /// CPU time in 10 ms ticks.
    fn stat(cpu_ticks: u64, threads: u64) -> ProcessStat {
        ProcessStat {
            cpu_ns: cpu_ticks * 10_000_000,
            threads,
            start_time: 7,
        }
    }

    /// PROCESS_CPU ≥ 50, 3 of 5: a process using 60 % fires once 3 one-second readings are
    /// in, with its current use; one at 40 % never does.
    #[test]
    fn process_cpu_fires_at_count_of_period_readings_over_the_threshold() {
        let (mut checker, at) = checker();
        let policy = policy(vec![(
            ProfilingTarget::OnCpu,
            vec![PolicyItem::without_uris(Monitor::ProcessCpu, 50.0, 5, 3)],
        )]);
        checker.watch(1, &policy);
        checker.watch(2, &policy);
        for second in 0..=5 {
            checker.readings.processes.insert(1, stat(60 * second, 1));
            checker.readings.processes.insert(2, stat(40 * second, 1));
            assert!(checker.sample(at(second)).is_empty());
            let fired = checker.check(at(second));
            if second < 3 {
                assert_eq!(fired, vec![], "second {second}: only {second} readings");
            } else {
                assert_eq!(
                    fired,
                    vec![Fired {
                        pid: 1,
                        target: ProfilingTarget::OnCpu,
                        causes: vec![TriggerCause {
                            monitor: Monitor::ProcessCpu,
                            threshold: 50.0,
                            current: 60.0,
                        }],
                    }],
                    "second {second}"
                );
            }
        }
        assert_eq!(
            checker.current(),
            vec![
                (1, Monitor::ProcessCpu, 60.0),
                (2, Monitor::ProcessCpu, 40.0)
            ]
        );
    }

    /// A process that got hot lately fires, whatever its past: the value is the use over the
    /// last interval, and a burst shorter than Count does not fire.
    #[test]
    fn recent_use_counts_and_short_bursts_do_not_fire() {
        let (mut checker, at) = checker();
        let policy = policy(vec![(
            ProfilingTarget::OnCpu,
            vec![PolicyItem::without_uris(Monitor::ProcessCpu, 50.0, 5, 3)],
        )]);
        checker.watch(1, &policy);
        // Idle for 100 s, then 2 s at 100 %, then idle: never fires.
        let mut ticks = 0;
        let per_second = [0; 100].into_iter().chain([100, 100]).chain([0; 5]);
        for (second, used) in per_second.enumerate() {
            ticks += used;
            checker.readings.processes.insert(1, stat(ticks, 1));
            checker.sample(at(second as u64));
            assert_eq!(checker.check(at(second as u64)), vec![], "second {second}");
        }
        // Then 3 s at 90 %: fires with 90.
        for second in 107..110 {
            ticks += 90;
            checker.readings.processes.insert(1, stat(ticks, 1));
            checker.sample(at(second));
        }
        let fired = checker.check(at(109));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].causes[0].current, 90.0);
    }

    #[test]
    fn thread_count_fires_per_target_with_every_cause() {
        let (mut checker, at) = checker();
        let policy = policy(vec![
            (
                ProfilingTarget::OnCpu,
                vec![
                    PolicyItem::without_uris(Monitor::ProcessThreadCount, 10.0, 2, 2),
                    PolicyItem::without_uris(Monitor::ProcessCpu, 50.0, 2, 2),
                ],
            ),
            (
                ProfilingTarget::OffCpu,
                vec![PolicyItem::without_uris(
                    Monitor::ProcessThreadCount,
                    20.0,
                    3,
                    1,
                )],
            ),
        ]);
        checker.watch(5, &policy);
        for second in 0..3 {
            checker
                .readings
                .processes
                .insert(5, stat(80 * second, 12 + second));
            checker.sample(at(second));
        }
        // Threads 12, 13, 14 ≥ 10 and CPU 80, 80 ≥ 50 for ON_CPU; 14 < 20 for OFF_CPU.
        assert_eq!(
            checker.check(at(2)),
            vec![Fired {
                pid: 5,
                target: ProfilingTarget::OnCpu,
                causes: vec![
                    TriggerCause {
                        monitor: Monitor::ProcessThreadCount,
                        threshold: 10.0,
                        current: 14.0,
                    },
                    TriggerCause {
                        monitor: Monitor::ProcessCpu,
                        threshold: 50.0,
                        current: 80.0,
                    },
                ],
            }]
        );
        checker.readings.processes.insert(5, stat(240, 25));
        checker.sample(at(3));
        let fired = checker.check(at(3));
        assert_eq!(fired.len(), 2, "{fired:?}");
        assert_eq!(fired[1].target, ProfilingTarget::OffCpu);
        assert_eq!(fired[1].causes[0].current, 25.0);
        assert_eq!(
            checker.current(),
            vec![
                (5, Monitor::ProcessCpu, 80.0),
                (5, Monitor::ProcessThreadCount, 25.0)
            ]
        );
    }

    /// SYSTEM_LOAD through an injected reading: read once per sample, whatever the number of
    /// processes, and fires for every process whose policy checks it.
    #[test]
    fn system_load_from_an_injected_reading() {
        let (mut checker, at) = checker();
        let load_policy = policy(vec![(
            ProfilingTarget::OffCpu,
            vec![PolicyItem::without_uris(Monitor::SystemLoad, 2.5, 4, 2)],
        )]);
        let cpu_policy = policy(vec![(
            ProfilingTarget::OnCpu,
            vec![PolicyItem::without_uris(Monitor::ProcessCpu, 50.0, 4, 2)],
        )]);
        checker.watch(1, &load_policy);
        checker.watch(2, &load_policy);
        checker.watch(3, &cpu_policy);
        for (second, load) in [(0, 3.0), (1, 1.0), (2, 2.0), (3, 2.5)] {
            checker.readings.load = load;
            for pid in 1..=3 {
                checker.readings.processes.insert(pid, stat(0, 1));
            }
            checker.sample(at(second));
        }
        let fired = checker.check(at(3));
        let cause = TriggerCause {
            monitor: Monitor::SystemLoad,
            threshold: 2.5,
            current: 2.5,
        };
        assert_eq!(
            fired,
            [1, 2]
                .map(|pid| Fired {
                    pid,
                    target: ProfilingTarget::OffCpu,
                    causes: vec![cause],
                })
                .to_vec()
        );
        assert!(checker.current().contains(&(2, Monitor::SystemLoad, 2.5)));
        // Once no policy checks the load, it is no longer kept.
        checker.unwatch(1);
        checker.unwatch(2);
        assert!(checker.load_window.is_none());
        assert_eq!(checker.check(at(3)), vec![]);
    }

    /// HTTP monitors and the NETWORK target are not checked (the caller logs them once).
    #[test]
    fn unsupported_items_never_fire() {
        let (mut checker, at) = checker();
        let policy = policy(vec![
            (
                ProfilingTarget::OnCpu,
                vec![PolicyItem::without_uris(Monitor::HttpErrorRate, 1.0, 1, 1)],
            ),
            (
                ProfilingTarget::Network,
                vec![PolicyItem::without_uris(
                    Monitor::ProcessThreadCount,
                    0.0,
                    1,
                    1,
                )],
            ),
        ]);
        checker.watch(1, &policy);
        checker.readings.processes.insert(1, stat(0, 3));
        checker.sample(at(0));
        checker.sample(at(1));
        assert_eq!(checker.check(at(1)), vec![]);
        assert_eq!(checker.current(), vec![]);
    }

    /// A gone process is returned for unwatching; a reused pid starts from empty windows.
    #[test]
    fn gone_processes_and_reused_pids() {
        let (mut checker, at) = checker();
        let policy = policy(vec![(
            ProfilingTarget::OnCpu,
            vec![PolicyItem::without_uris(
                Monitor::ProcessThreadCount,
                10.0,
                3,
                2,
            )],
        )]);
        checker.watch(1, &policy);
        checker.watch(2, &policy);
        checker.readings.processes.insert(1, stat(0, 50));
        assert_eq!(checker.sample(at(0)), vec![2]);
        checker.unwatch(2);
        assert_eq!(checker.processes.keys().collect::<Vec<_>>(), [&1]);
        // Another process with pid 1, also with 50 threads: one reading only, no fire.
        checker.readings.processes.insert(
            1,
            ProcessStat {
                cpu_ns: 0,
                threads: 50,
                start_time: 99,
            },
        );
        checker.sample(at(1));
        assert_eq!(checker.check(at(1)), vec![]);
        checker.sample(at(2));
        assert_eq!(checker.check(at(2)).len(), 1);
    }

    /// A policy update resizes the windows and keeps what is still inside.
    #[test]
    fn a_new_policy_keeps_the_readings() {
        let (mut checker, at) = checker();
        checker.watch(
            1,
            &policy(vec![(
                ProfilingTarget::OnCpu,
                vec![PolicyItem::without_uris(
                    Monitor::ProcessThreadCount,
                    100.0,
                    5,
                    3,
                )],
            )]),
        );
        for second in 0..3 {
            checker.readings.processes.insert(1, stat(0, 20));
            checker.sample(at(second));
        }
        assert_eq!(checker.check(at(2)), vec![]);
        checker.watch(
            1,
            &policy(vec![(
                ProfilingTarget::OnCpu,
                vec![PolicyItem::without_uris(
                    Monitor::ProcessThreadCount,
                    10.0,
                    10,
                    3,
                )],
            )]),
        );
        assert_eq!(checker.check(at(2)).len(), 1);
    }
}
