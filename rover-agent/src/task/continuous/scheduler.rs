//! Continuous profiling in the node agent: polls the policies of the services this node reports
//! processes of, samples the processes under a policy, and on a fired target reports the
//! trigger and runs the task the OAP names on the shared agent, its windows uploaded like a
//! backend task's. The checkers' values go to the OAP as meters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::checker::Checker;
use super::policies::Policies;
use super::sampler::HostReadings;
use super::triggers::{Refusal, TriggerKey, Triggers};
use crate::backend::{
    Backend, MeterValue, ProcessDirectory, ProfilingTarget, UploadBuffer, encode_meters,
    encode_report, query_policies, report_meters, report_profiling_task,
};
use crate::bpf::ProfilerKind;
use crate::config::Settings;
use crate::process::ProcessEntity;
use crate::task::Agent;
use crate::task::backend_tasks::{Run, RunControl};
use crate::task::run_counts::{RunCounts, RunSource};

/// What the scheduler is configured with.
#[derive(Clone, Debug)]
pub(crate) struct ContinuousConfig {
    /// `profiling.check_interval`: the policies are polled this often.
    pub policy_interval: Duration,
    pub flush_interval: Duration,
    pub fetch_interval: Duration,
    pub check_interval: Duration,
    pub execute_duration: Duration,
    pub silence_duration: Duration,
    pub max_triggered_runs: u32,
    pub meter_prefix: String,
}

impl ContinuousConfig {
    pub fn new(settings: &Settings) -> Self {
        let continuous = &settings.profiling.continuous;
        Self {
            policy_interval: settings.profiling.check_interval,
            flush_interval: settings.profiling.flush_interval,
            fetch_interval: continuous.fetch_interval,
            check_interval: continuous.check_interval,
            execute_duration: continuous.execute_duration,
            silence_duration: continuous.silence_duration,
            max_triggered_runs: settings.rover_rs.max_triggered_runs,
            meter_prefix: continuous.meter_prefix.clone(),
        }
    }
}

struct TriggeredRun {
    task_id: String,
    control: mpsc::UnboundedSender<RunControl>,
    join: JoinHandle<()>,
}

/// A process under a policy: its OAP id and entity.
struct Checked {
    process_id: String,
    entity: Arc<ProcessEntity>,
}

pub(crate) struct Scheduler {
    agent: Arc<Agent>,
    backend: Backend,
    directory: ProcessDirectory,
    buffer: Arc<UploadBuffer>,
    config: ContinuousConfig,
    counts: Arc<RunCounts>,
    policies: Policies,
    checker: Checker<HostReadings>,
    /// The pids the checker watches.
    checked: HashMap<u32, Checked>,
    triggers: Triggers,
    runs: HashMap<TriggerKey, TriggeredRun>,
    calls: OapCalls,
    /// Triggers waiting for a run to end under `max_triggered_runs`, logged once each.
    waiting_at_cap: HashSet<TriggerKey>,
}

impl Scheduler {
    pub fn new(
        agent: Arc<Agent>,
        backend: Backend,
        directory: ProcessDirectory,
        buffer: Arc<UploadBuffer>,
        config: ContinuousConfig,
        counts: Arc<RunCounts>,
    ) -> Self {
        let triggers = Triggers::new(config.silence_duration, config.max_triggered_runs);
        Self {
            agent,
            backend,
            directory,
            buffer,
            checker: Checker::new(HostReadings::new(), std::time::Instant::now()),
            config,
            counts,
            policies: Policies::default(),
            checked: HashMap::new(),
            triggers,
            runs: HashMap::new(),
            calls: OapCalls::default(),
            waiting_at_cap: HashSet::new(),
        }
    }

    /// Samples every `fetch_interval`, polls the policies every `policy_interval`, checks every
    /// `check_interval`, until `stop`; then stops the triggered runs (their last windows
    /// queued).
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut fetch = tokio::time::interval(self.config.fetch_interval);
        fetch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let start = Instant::now();
        let mut next_poll = start;
        let mut next_check = start + self.config.check_interval;
        loop {
            tokio::select! {
                _ = fetch.tick() => {}
                _ = stop.changed() => break,
            }
            let now = Instant::now();
            if now >= next_poll {
                next_poll = next_due(next_poll, self.config.policy_interval, now);
                tokio::select! {
                    () = self.poll_policies() => {}
                    _ = stop.changed() => break,
                }
            }
            // Read after the poll, which may have waited for the OAP: the CPU use divides by
            // the time between readings.
            let now = Instant::now();
            for pid in self.checker.sample(now.into_std()) {
                debug!(pid, "process under a continuous profiling policy is gone");
                self.checker.unwatch(pid);
                self.checked.remove(&pid);
            }
            if now >= next_check {
                next_check = next_due(next_check, self.config.check_interval, now);
                self.sync_processes();
                tokio::select! {
                    () = self.check(now) => {}
                    _ = stop.changed() => break,
                }
            }
        }
        for run in self.runs.values() {
            let _ = run.control.send(RunControl::Stop);
        }
        for (_, run) in self.runs.drain() {
            let _ = run.join.await;
        }
    }

    async fn poll_policies(&mut self) {
        let services: HashSet<String> = self
            .directory
            .reported()
            .into_iter()
            .map(|(_, entity)| entity.service_name.clone())
            .collect();
        let query = self.policies.query(&services);
        if query.is_empty() {
            return;
        }
        let reply = self
            .calls
            .call(
                "queryPolicies",
                self.config.policy_interval,
                query_policies(&self.backend, query),
            )
            .await;
        if let Ok(Some(reply)) = reply
            && self.policies.apply(reply)
        {
            self.sync_processes();
        }
    }

    /// Puts every reported process of a service with a policy under it (those that appeared
    /// since the policy came too) and stops checking the rest. A process reported under
    /// several entities is checked under the first with a policy.
    fn sync_processes(&mut self) {
        let mut reported = self.directory.reported();
        reported.sort_by(|a, b| a.0.cmp(&b.0));
        let mut checked = HashMap::new();
        for (process_id, entity) in reported {
            let Some(policy) = self.policies.policy(&entity.service_name) else {
                continue;
            };
            if checked.contains_key(&entity.pid) {
                continue;
            }
            self.checker.watch(entity.pid, policy);
            if !self.checked.contains_key(&entity.pid) {
                debug!(
                    pid = entity.pid,
                    service = entity.service_name,
                    "process under a continuous profiling policy"
                );
            }
            checked.insert(entity.pid, Checked { process_id, entity });
        }
        for pid in self.checked.keys() {
            if !checked.contains_key(pid) {
                self.checker.unwatch(*pid);
            }
        }
        self.waiting_at_cap.retain(|key| {
            checked
                .values()
                .any(|checked| checked.process_id == key.process_id)
        });
        self.checked = checked;
    }

    async fn check(&mut self, now: Instant) {
        self.runs.retain(|_, run| !run.join.is_finished());
        for fired in self.checker.check(now.into_std()) {
            let Some(checked) = self.checked.get(&fired.pid) else {
                continue;
            };
            let key = TriggerKey {
                process_id: checked.process_id.clone(),
                target: fired.target,
            };
            let running = self.runs.contains_key(&key);
            if let Err(refusal) =
                self.triggers
                    .admit(&key, running, self.runs.len(), now.into_std())
            {
                match refusal {
                    // Once per wait, not at every check.
                    Refusal::AtCap if self.waiting_at_cap.insert(key.clone()) => warn!(
                        pid = fired.pid,
                        max = self.config.max_triggered_runs,
                        "continuous profiling trigger waits: rover_rs.max_triggered_runs runs \
                         are running"
                    ),
                    Refusal::AtCap | Refusal::Running | Refusal::Silenced { .. } => {
                        debug!(
                            pid = fired.pid,
                            ?refusal,
                            "continuous profiling trigger held"
                        );
                    }
                }
                continue;
            }
            let kind = match fired.target {
                ProfilingTarget::OnCpu => ProfilerKind::OnCpu,
                ProfilingTarget::OffCpu => ProfilerKind::OffCpu,
                // The checker never fires NETWORK (logged when the policy came).
                ProfilingTarget::Network => continue,
            };
            let report = encode_report(
                &checked.entity,
                &fired.causes,
                self.config.execute_duration,
                fired.target,
            );
            let (pid, process_id) = (fired.pid, checked.process_id.clone());
            let task_id = self
                .calls
                .call(
                    "reportProfilingTask",
                    self.config.check_interval,
                    report_profiling_task(&self.backend, report),
                )
                .await;
            let Ok(task_id) = task_id else {
                continue;
            };
            info!(
                task_id,
                pid,
                target = ?fired.target,
                causes = ?fired.causes,
                duration = ?self.config.execute_duration,
                "continuous profiling triggered"
            );
            let (control, controlled) = mpsc::unbounded_channel();
            let run = Run {
                agent: Arc::clone(&self.agent),
                buffer: Arc::clone(&self.buffer),
                flush_interval: self.config.flush_interval,
                task_id: task_id.clone(),
                kind,
                process_ids: HashMap::from([(pid, process_id)]),
                duration: self.config.execute_duration,
                source: RunSource::Continuous,
                counts: Arc::clone(&self.counts),
            };
            let join = tokio::spawn(run.drive(Duration::ZERO, controlled));
            self.waiting_at_cap.remove(&key);
            self.triggers.started(key.clone(), now.into_std());
            self.runs.insert(
                key,
                TriggeredRun {
                    task_id,
                    control,
                    join,
                },
            );
        }
        if !self.runs.is_empty() {
            debug!(runs = ?self.runs.values().map(|run| &run.task_id).collect::<Vec<_>>(), "triggered runs");
        }
        self.send_meters().await;
    }

    async fn send_meters(&mut self) {
        let current = self.checker.current();
        if current.is_empty() {
            return;
        }
        let values: Vec<MeterValue<'_>> = current
            .iter()
            .filter_map(|&(pid, monitor, value)| {
                let checked = self.checked.get(&pid)?;
                debug!(
                    pid,
                    process = checked.entity.process_name,
                    monitor = monitor.wire_name(),
                    value,
                    "continuous profiling value"
                );
                Some(MeterValue {
                    entity: &checked.entity,
                    monitor,
                    value,
                })
            })
            .collect();
        let timestamp_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| {
                i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
            });
        let meters = encode_meters(&self.config.meter_prefix, timestamp_ms, values);
        self.calls
            .call(
                "collectBatch",
                self.config.check_interval,
                report_meters(&self.backend, meters),
            )
            .await
            .ok();
    }
}

/// The first time after `now` on the schedule `due + k × interval`: due times stay on the
/// fetch ticks' grid (a time counted from when the work was done would fall just after a tick
/// and wait for the next one, doubling the interval).
fn next_due(due: Instant, interval: Duration, now: Instant) -> Instant {
    let interval = interval.max(Duration::from_millis(1));
    let behind = now.saturating_duration_since(due).as_nanos() / interval.as_nanos();
    let steps = u32::try_from(behind.saturating_add(1)).unwrap_or(u32::MAX);
    due + interval.saturating_mul(steps)
}

/// The scheduler's calls to the OAP: each bounded in time (one that does not answer fails, and
/// is retried at the next poll or check), a failing streak of each logged once.
#[derive(Default)]
struct OapCalls {
    /// The calls whose last attempt failed.
    failing: HashSet<&'static str>,
}

impl OapCalls {
    async fn call<T, E: std::fmt::Display>(
        &mut self,
        call: &'static str,
        limit: Duration,
        future: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        let result = match tokio::time::timeout(limit, future).await {
            Ok(result) => result.map_err(|error| error.to_string()),
            Err(_) => Err(format!("{call} got no answer within {limit:?}")),
        };
        match &result {
            Ok(_) => {
                self.failing.remove(call);
            }
            // Later failures of a streak at debug level.
            Err(error) if self.failing.insert(call) => {
                warn!("continuous profiling: {error}; retried at the next check");
            }
            Err(error) => debug!("continuous profiling: {error}"),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_stay_on_their_grid() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let second = Duration::from_secs(1);
        // Worked on 30 ms after it was due: due again a second after it was due.
        assert_eq!(next_due(t0, second, t0 + ms(30)), t0 + second);
        // Fell 2.5 intervals behind: the next time on the grid after now, none made up.
        assert_eq!(next_due(t0, second, t0 + ms(2500)), t0 + 3 * second);
        assert_eq!(next_due(t0, second, t0 + second), t0 + 2 * second);
    }
}
