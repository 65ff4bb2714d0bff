//! The agent: the engine, the collector and the process watcher, shared by every task.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use anyhow::Context as _;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tracing::error;

use super::collector::{self, ActiveTasks, CollectorNotice, FrameTotals, Message, TaskState};
use super::stacks::Values;
use super::{AgentConfig, TaskNotice, TaskSpec, TaskSummary, WindowSink, watcher};
use crate::bpf::{
    Engine, EngineStatus, EngineTotals, ProcessChanges, RecordingId, RecordingSpec, Targets,
};
use crate::metrics::FrameCounts;
use crate::symbolize::{ProcessTable, ProcessTableStats};

/// The long-lived profiling agent. Tasks start and stop on it at any time; each profiler is
/// loaded while a task needs it. Dropping the agent stops every task (their last windows are
/// handed to their sinks) and ends its threads.
pub struct Agent {
    config: AgentConfig,
    processes: ProcessTable,
    active: ActiveTasks,
    collector: mpsc::Sender<Message>,
    engine: Engine,
    threads: Vec<JoinHandle<()>>,
    frames: Arc<FrameTotals>,
}

/// A running task. Stop it with [`Task::stop`]; dropped, it keeps running until the agent ends.
pub struct Task {
    recording: RecordingId,
    engine: Engine,
    processes: ProcessTable,
    notices: UnboundedReceiver<CollectorNotice>,
    /// Target processes still running (for a task of pids).
    pids: Option<Arc<Mutex<HashSet<u32>>>>,
    ended: Option<TaskSummary>,
}

impl Agent {
    /// Starts the agent's threads; nothing is loaded into the kernel until a task starts.
    pub fn start(config: AgentConfig) -> anyhow::Result<Self> {
        let processes = ProcessTable::new(config.exited_process_grace);
        let active = ActiveTasks::default();
        let (collector, collected) = mpsc::channel();
        let (watched, to_watch) = mpsc::channel();
        let mut threads = Vec::new();
        let symbolizer = config.symbolizer.clone();
        let table = processes.clone();
        let tasks = active.clone();
        let frames = Arc::new(FrameTotals::default());
        let counted = Arc::clone(&frames);
        threads.push(
            std::thread::Builder::new()
                .name("rover-collector".to_owned())
                .spawn(move || collector::run(collected, symbolizer, table, tasks, counted))
                .context("starting the collector thread")?,
        );
        let table = processes.clone();
        threads.push(
            std::thread::Builder::new()
                .name("rover-watcher".to_owned())
                .spawn(move || watcher::run(to_watch, table))
                .context("starting the process watcher thread")?,
        );
        let deliveries = collector.clone();
        let engine = Engine::start(
            config.profilers.clone(),
            move |delivery| {
                let _ = deliveries.send(Message::Delivery(delivery));
            },
            move |event| {
                let _ = watched.send(event);
            },
        )
        .context("starting the profiling engine")?;
        Ok(Self {
            config,
            processes,
            active,
            collector,
            engine,
            threads,
            frames,
        })
    }

    /// Whether the programs load on this host (see [`crate::bpf::check_programs_load`]).
    /// Blocking: it loads and attaches a profiler for a moment.
    pub fn check_programs_load(&self) -> Result<(), String> {
        crate::bpf::check_programs_load(&self.config.profilers)
    }

    /// Starts recording `spec`; its windows go to `sink`.
    pub async fn start_task(
        &self,
        spec: TaskSpec,
        sink: Box<dyn WindowSink>,
    ) -> anyhow::Result<Task> {
        let pids = {
            let mut active = self
                .active
                .lock()
                .map_err(|_| anyhow::anyhow!("the collector thread panicked"))?;
            *active += 1;
            match &spec.targets {
                Targets::Pids(pids) => {
                    // Snapshotted now, while they surely live.
                    for &pid in pids {
                        self.processes.capture(pid);
                    }
                    Some(Arc::new(Mutex::new(pids.iter().copied().collect())))
                }
                Targets::All => None,
            }
        };
        match self.record(spec, sink, pids).await {
            Ok(task) => Ok(task),
            Err(error) => {
                if let Ok(mut active) = self.active.lock() {
                    *active = active.saturating_sub(1);
                }
                Err(error)
            }
        }
    }

    async fn record(
        &self,
        spec: TaskSpec,
        sink: Box<dyn WindowSink>,
        pids: Option<Arc<Mutex<HashSet<u32>>>>,
    ) -> anyhow::Result<Task> {
        let values = Values::new(
            spec.kind,
            self.config.profilers.frequency_hz,
            self.config.profilers.off_cpu_sample_probability,
        );
        let recording = self
            .engine
            .record(RecordingSpec {
                kind: spec.kind,
                targets: spec.targets,
                options: spec.options,
                window: spec.window,
            })
            .await
            .with_context(|| format!("starting the {} profiler", spec.kind.name()))?;
        let (notify, notices) = unbounded_channel();
        let task = Box::new(TaskState::new(values, sink, notify));
        if self
            .collector
            .send(Message::Register { recording, task })
            .is_err()
        {
            anyhow::bail!("the collector thread has ended");
        }
        Ok(Task {
            recording,
            engine: self.engine.clone(),
            processes: self.processes.clone(),
            notices,
            pids,
            ended: None,
        })
    }

    /// The kernel's marks of execs and exits, for process discovery (see
    /// `Engine::track_process_changes`).
    pub async fn track_process_changes(&self) -> anyhow::Result<ProcessChanges> {
        Ok(self.engine.track_process_changes().await?)
    }

    /// What the engine holds now.
    pub async fn status(&self) -> anyhow::Result<EngineStatus> {
        Ok(self.engine.status().await?)
    }

    /// What the engine counted since it started.
    pub async fn totals(&self) -> anyhow::Result<EngineTotals> {
        Ok(self.engine.totals().await?)
    }

    /// Frames symbolized since the agent started.
    pub fn frames(&self) -> FrameCounts {
        self.frames.get()
    }

    /// Whether the collector and process watcher threads still run (a panic ends them).
    pub fn threads_alive(&self) -> bool {
        self.threads.iter().all(|thread| !thread.is_finished())
    }

    /// What the process table holds now (snapshots of live and exited processes, open files).
    pub fn processes(&self) -> ProcessTableStats {
        self.processes.stats()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The engine delivers every task's last window as it ends; with its thread gone, the
        // collector (once this sender goes too) and the watcher have no sender left and end.
        self.engine.shut_down();
        drop(std::mem::replace(&mut self.collector, mpsc::channel().0));
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("an agent thread panicked");
            }
        }
    }
}

impl Task {
    /// Records `pid` too (snapshotting its memory map now).
    pub async fn add_process(&self, pid: u32) -> anyhow::Result<()> {
        self.processes.capture(pid);
        self.engine.add_process(self.recording, pid).await?;
        if let Some(pids) = &self.pids
            && let Ok(mut pids) = pids.lock()
        {
            pids.insert(pid);
        }
        Ok(())
    }

    /// Stops recording `pid`; what it recorded so far stays in the current window.
    pub async fn remove_process(&self, pid: u32) -> anyhow::Result<()> {
        self.engine.remove_process(self.recording, pid).await?;
        if let Some(pids) = &self.pids
            && let Ok(mut pids) = pids.lock()
        {
            pids.remove(&pid);
        }
        Ok(())
    }

    /// The next notice; `None` once the task has ended.
    pub async fn notice(&mut self) -> Option<TaskNotice> {
        match self.notices.recv().await? {
            CollectorNotice::Notice(TaskNotice::ProcessExited { pid }) => {
                let all_gone = self.pids.as_ref().is_some_and(|pids| {
                    pids.lock()
                        .is_ok_and(|mut pids| pids.remove(&pid) && pids.is_empty())
                });
                Some(if all_gone {
                    TaskNotice::AllProcessesExited
                } else {
                    TaskNotice::ProcessExited { pid }
                })
            }
            CollectorNotice::Notice(notice) => Some(notice),
            CollectorNotice::Ended(summary) => {
                self.ended = Some(*summary);
                None
            }
        }
    }

    /// Stops recording at once; returns once the last window went to the sink.
    pub async fn stop(mut self) -> anyhow::Result<TaskSummary> {
        self.halt().await?;
        self.finish().await
    }

    /// Stops recording at once: the kernel records nothing more for this task, and what it
    /// recorded is on its way to the collector. Returns without waiting for symbolization.
    pub async fn halt(&mut self) -> anyhow::Result<()> {
        self.engine
            .stop(self.recording)
            .await
            .context("stopping the task")
    }

    /// After [`halt`](Self::halt): returns once the last window went to the sink.
    pub async fn finish(mut self) -> anyhow::Result<TaskSummary> {
        while self.ended.is_none() {
            if self.notice().await.is_none() && self.ended.is_none() {
                anyhow::bail!("the collector ended before the task's last window");
            }
        }
        self.ended.context("the task's summary is missing")
    }
}
