//! Tasks the OAP hands out: polled every `check_interval`, each run on the shared agent for its
//! processes that live on this node, its windows uploaded through the upload buffer.
//!
//! A run is keyed by (target, processes): the same task id again extends it; another task for
//! the same key replaces it (the OAP has no cancel). Each run is its own async task, which
//! waits for the start time, records, and ends at its deadline, when its processes are all
//! gone, or when told to stop.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::run_counts::{RunCounts, RunSource};
use super::upload_sink::UploadSink;
use super::{Agent, TaskNotice, TaskSpec};
use crate::backend::{
    self, Backend, ProcessDirectory, ProfilingTarget, ProfilingTaskCommand, TaskSchedule,
    TaskWatermark, UploadBuffer, UploadTask, query_tasks,
};
use crate::bpf::{ProfilerKind, TargetOptions, Targets};

/// What a run is for: a different task with the same key replaces it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RunKey {
    kind: ProfilerKind,
    /// The OAP's process ids, sorted.
    process_ids: Vec<String>,
}

pub(super) enum RunControl {
    /// Run at least this long from now.
    Extend(Duration),
    Stop,
}

struct RunHandle {
    task_id: String,
    control: mpsc::UnboundedSender<RunControl>,
    join: JoinHandle<()>,
}

/// Polls the OAP for tasks and runs them.
pub(super) struct BackendTasks {
    agent: Arc<Agent>,
    backend: Backend,
    agent_id: String,
    directory: ProcessDirectory,
    buffer: Arc<UploadBuffer>,
    flush_interval: Duration,
    counts: Arc<RunCounts>,
    watermark: TaskWatermark,
    runs: HashMap<RunKey, RunHandle>,
    /// What was already logged, so a command re-sent every poll is logged once.
    logged: HashSet<String>,
}

impl BackendTasks {
    pub fn new(
        agent: Arc<Agent>,
        backend: Backend,
        agent_id: String,
        directory: ProcessDirectory,
        buffer: Arc<UploadBuffer>,
        flush_interval: Duration,
        counts: Arc<RunCounts>,
    ) -> Self {
        Self {
            agent,
            backend,
            agent_id,
            directory,
            buffer,
            flush_interval,
            counts,
            watermark: TaskWatermark::default(),
            runs: HashMap::new(),
            logged: HashSet::new(),
        }
    }

    /// One `queryTasks`, and what its reply asks for.
    pub async fn poll(&mut self) -> Result<(), backend::Error> {
        self.runs.retain(|_, run| !run.join.is_finished());
        let commands = query_tasks(&self.backend, &self.agent_id, &self.watermark).await?;
        for command in commands {
            match command {
                Ok(command) => self.handle(command).await,
                Err(error) => {
                    let error = error.to_string();
                    if self.logged.insert(error.clone()) {
                        warn!("skipping a command from the OAP: {error}");
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle(&mut self, command: ProfilingTaskCommand) {
        let task_id = command.task_id.clone();
        if let Some(warning) = &command.warning
            && self.logged.insert(warning.to_string())
        {
            warn!(task_id, "{warning}");
        }
        let kind = match command.target {
            ProfilingTarget::OnCpu => ProfilerKind::OnCpu,
            ProfilingTarget::OffCpu => ProfilerKind::OffCpu,
            ProfilingTarget::Network => {
                if self.logged.insert(format!("network {task_id}")) {
                    warn!(
                        task_id,
                        "NETWORK profiling tasks are not supported by rover-rs: task skipped"
                    );
                }
                self.watermark.observe(&command);
                return;
            }
        };
        let process_ids: HashMap<u32, String> = command
            .process_ids
            .iter()
            .filter_map(|id| Some((self.directory.pid(id)?, id.clone())))
            .collect();
        if process_ids.is_empty() {
            // Another node's, or one of ours not reported yet: the watermark stays, so the
            // OAP sends it again.
            if self.logged.insert(format!("elsewhere {task_id}")) {
                debug!(task_id, processes = ?command.process_ids, "task for no process of this node");
            }
            return;
        }
        self.watermark.observe(&command);
        let mut sorted_ids: Vec<String> = process_ids.values().cloned().collect();
        sorted_ids.sort();
        let key = RunKey {
            kind,
            process_ids: sorted_ids,
        };
        // Before the schedule: a run that started late may outlive the window the command
        // gives, and its task sent again still extends it.
        if let Some(run) = self.runs.get(&key)
            && !run.join.is_finished()
            && run.task_id == task_id
        {
            info!(task_id, duration = ?command.duration, "task sent again: run extended");
            let _ = run.control.send(RunControl::Extend(command.duration));
            return;
        }
        let wait = match command.schedule(SystemTime::now()) {
            TaskSchedule::Expired => {
                info!(task_id, "task already ended: skipped");
                return;
            }
            TaskSchedule::Wait(wait) => wait,
            TaskSchedule::RunFor(_) => Duration::ZERO,
        };
        if let Some(run) = self.runs.get(&key)
            && !run.join.is_finished()
        {
            info!(
                task_id,
                replaced = run.task_id,
                "task replaces the running one"
            );
        }
        if let Some(old) = self.runs.remove(&key) {
            let _ = old.control.send(RunControl::Stop);
            // Its last window is queued before the new run's first.
            let _ = old.join.await;
        }
        let (control, controlled) = mpsc::unbounded_channel();
        let run = Run {
            agent: Arc::clone(&self.agent),
            buffer: Arc::clone(&self.buffer),
            flush_interval: self.flush_interval,
            task_id: task_id.clone(),
            kind,
            process_ids,
            duration: command.duration,
            source: RunSource::Backend,
            counts: Arc::clone(&self.counts),
        };
        let join = tokio::spawn(run.drive(wait, controlled));
        self.runs.insert(
            key,
            RunHandle {
                task_id,
                control,
                join,
            },
        );
    }

    /// Stops every run; returns once their last windows are in the upload buffer.
    pub async fn stop_all(&mut self) {
        for run in self.runs.values() {
            let _ = run.control.send(RunControl::Stop);
        }
        for (_, run) in self.runs.drain() {
            let _ = run.join.await;
        }
    }
}

/// One run of a backend task on this node (or of a continuous trigger, which the OAP gave a
/// task id).
pub(super) struct Run {
    pub agent: Arc<Agent>,
    pub buffer: Arc<UploadBuffer>,
    pub flush_interval: Duration,
    pub task_id: String,
    pub kind: ProfilerKind,
    /// Local pid → the OAP's process id.
    pub process_ids: HashMap<u32, String>,
    pub duration: Duration,
    pub source: RunSource,
    pub counts: Arc<RunCounts>,
}

impl Run {
    /// Waits `wait`, records for `duration` (or longer when extended), uploads every window.
    pub async fn drive(self, wait: Duration, mut control: mpsc::UnboundedReceiver<RunControl>) {
        let task_id = self.task_id.as_str();
        let mut extra = Duration::ZERO;
        if !wait.is_zero() {
            info!(task_id, wait = ?wait, "task starts later");
            let start = Instant::now() + wait;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(start) => break,
                    message = control.recv() => match message {
                        Some(RunControl::Extend(duration)) => extra = extra.max(duration),
                        Some(RunControl::Stop) | None => return,
                    },
                }
            }
        }
        let started = SystemTime::now();
        let upload = Arc::new(Mutex::new(UploadTask {
            task_id: self.task_id.clone(),
            profiling_start: started,
            end: started + self.duration.max(extra),
            off_cpu: self.kind == ProfilerKind::OffCpu,
        }));
        let sink = UploadSink {
            task: Arc::clone(&upload),
            process_ids: self.process_ids.clone(),
            buffer: Arc::clone(&self.buffer),
        };
        let spec = TaskSpec {
            kind: self.kind,
            targets: Targets::Pids(self.process_ids.keys().copied().collect()),
            options: TargetOptions::default(),
            window: Some(self.flush_interval),
        };
        let mut task = match self.agent.start_task(spec, Box::new(sink)).await {
            Ok(task) => task,
            Err(error) => {
                warn!(task_id, "could not start the task: {error:#}");
                return;
            }
        };
        let _active = self.counts.started(self.kind, self.source);
        info!(task_id, kind = self.kind.name(), pids = ?self.process_ids.keys(), duration = ?self.duration, "task started");
        let mut deadline = Instant::now() + self.duration.max(extra);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                message = control.recv() => match message {
                    Some(RunControl::Extend(duration)) => {
                        deadline = deadline.max(Instant::now() + duration);
                        if let Ok(mut upload) = upload.lock() {
                            upload.end = upload.end.max(SystemTime::now() + duration);
                        }
                    }
                    Some(RunControl::Stop) | None => break,
                },
                notice = task.notice() => match notice {
                    Some(TaskNotice::AllProcessesExited) => {
                        info!(task_id, "every process of the task exited");
                        break;
                    }
                    Some(TaskNotice::DrainFailed(error)) => warn!(task_id, "{error}"),
                    Some(TaskNotice::ProcessExited { pid }) => debug!(task_id, pid, "process exited"),
                    None => break,
                },
            }
        }
        match task.stop().await {
            Ok(summary) => info!(
                task_id,
                windows = summary.windows,
                sink_errors = summary.sink_errors.len(),
                "task ended"
            ),
            Err(error) => warn!(task_id, "stopping the task: {error:#}"),
        }
    }
}
