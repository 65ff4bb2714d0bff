//! The collector thread: symbolizes what the engine delivers and folds it into each task's
//! current window; hands finished windows to the tasks' sinks. It owns the symbolizer (which
//! must stay on one thread) and retires exited processes from it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use super::stacks::{Values, fold};
use super::{ProfileWindow, TaskNotice, TaskSummary, WindowSink};
use crate::bpf::{Counters, Delivery, RecordingId};
use crate::heap::release_freed_memory;
use crate::metrics::FrameCounts;
use crate::profile::Profile;
use crate::symbolize::{ProcessTable, Symbolizer, SymbolizerConfig};

/// How often exited processes are retired from the process table and the symbolizer.
const RETIRE_EVERY: Duration = Duration::from_secs(1);

pub(super) enum Message {
    Delivery(Delivery),
    /// A task started: its deliveries go to this state (any that came first are replayed).
    Register {
        recording: RecordingId,
        task: Box<TaskState>,
    },
}

/// What the async side of a task hears from the collector.
#[derive(Debug)]
pub(super) enum CollectorNotice {
    Notice(TaskNotice),
    Ended(Box<TaskSummary>),
}

pub(super) struct TaskState {
    pub values: Values,
    pub sink: Box<dyn WindowSink>,
    pub notices: UnboundedSender<CollectorNotice>,
    pub profile: Profile,
    pub windows: u64,
    /// Counters of the windows handed on so far: the last window gets the rest.
    pub counters_so_far: Counters,
    pub stacks_cut: u64,
    pub window_stacks_cut: u64,
    pub sink_errors: Vec<String>,
}

impl TaskState {
    pub fn new(
        values: Values,
        sink: Box<dyn WindowSink>,
        notices: UnboundedSender<CollectorNotice>,
    ) -> Self {
        Self {
            values,
            sink,
            notices,
            profile: values.profile(SystemTime::now()),
            windows: 0,
            counters_so_far: Counters::default(),
            stacks_cut: 0,
            window_stacks_cut: 0,
            sink_errors: Vec::new(),
        }
    }

    /// Hands the current window (from `start` to `end`) to the sink and starts the next.
    fn end_window(&mut self, counters: Counters, start: SystemTime, end: SystemTime, last: bool) {
        let next = self.values.profile(end);
        let mut profile = std::mem::replace(&mut self.profile, next);
        profile.start = start;
        profile.duration = end.duration_since(start).unwrap_or_default();
        self.counters_so_far += counters;
        let window = ProfileWindow {
            profile,
            counters,
            stacks_cut: std::mem::take(&mut self.window_stacks_cut),
            last,
        };
        self.windows += 1;
        if let Err(error) = self.sink.window(window) {
            let error = format!("{error:#}");
            warn!("a profile window could not be handed on: {error}");
            self.sink_errors.push(error);
        }
    }
}

/// The number of tasks started and not ended; under its lock, a task starting snapshots its
/// processes, and the collector, finding none running, forgets every process.
pub(super) type ActiveTasks = Arc<Mutex<usize>>;

/// Frames symbolized over the agent's life: the symbolizer's own counts go with it when no
/// task runs.
#[derive(Debug, Default)]
pub(super) struct FrameTotals {
    symbolized: AtomicU64,
    unresolved: AtomicU64,
}

impl FrameTotals {
    pub fn get(&self) -> FrameCounts {
        FrameCounts {
            symbolized: self.symbolized.load(Ordering::Relaxed),
            unresolved: self.unresolved.load(Ordering::Relaxed),
        }
    }
}

pub(super) fn run(
    messages: mpsc::Receiver<Message>,
    config: SymbolizerConfig,
    processes: ProcessTable,
    active: ActiveTasks,
    frames: Arc<FrameTotals>,
) {
    // Made for the first stack, dropped (with its caches) when no task runs.
    let mut symbolizer: Option<Symbolizer> = None;
    let mut tasks: HashMap<RecordingId, Box<TaskState>> = HashMap::new();
    let mut early: HashMap<RecordingId, Vec<Delivery>> = HashMap::new();
    let mut last_retire = Instant::now();
    loop {
        // Idle (no task, nothing held), it sleeps until a task starts.
        let idle = tasks.is_empty() && early.is_empty() && symbolizer.is_none();
        let message = if idle {
            match messages.recv() {
                Ok(message) => Some(message),
                Err(mpsc::RecvError) => return,
            }
        } else {
            match messages.recv_timeout(RETIRE_EVERY) {
                Ok(message) => Some(message),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        match message {
            Some(Message::Register { recording, task }) => {
                tasks.insert(recording, task);
                for delivery in early.remove(&recording).unwrap_or_default() {
                    let symbolizer = symbolizer
                        .get_or_insert_with(|| Symbolizer::new(config.clone(), processes.clone()));
                    handle(
                        symbolizer, &processes, &mut tasks, &active, &frames, delivery,
                    );
                }
            }
            Some(Message::Delivery(delivery)) => {
                let recording = recording_of(&delivery);
                if tasks.contains_key(&recording) {
                    let symbolizer = symbolizer
                        .get_or_insert_with(|| Symbolizer::new(config.clone(), processes.clone()));
                    handle(
                        symbolizer, &processes, &mut tasks, &active, &frames, delivery,
                    );
                } else {
                    // Delivered before the task registered (it registers once the engine has
                    // given its id).
                    early.entry(recording).or_default().push(delivery);
                }
            }
            None => {}
        }
        if last_retire.elapsed() >= RETIRE_EVERY {
            let now = Instant::now();
            let retired = processes.retire(now);
            if let Some(symbolizer) = &mut symbolizer
                && symbolizer.retire(now)
            {
                debug!(retired, "retired exited processes and unused binaries");
                release_freed_memory();
            }
            last_retire = now;
        }
        if tasks.is_empty() && early.is_empty() {
            forget_everything_if_idle(&active, &processes, &mut symbolizer);
        }
    }
}

/// With no task running, nothing symbolized now will be needed: an idle agent holds no
/// snapshot, open file or symbol cache, and gives the memory back.
fn forget_everything_if_idle(
    active: &ActiveTasks,
    processes: &ProcessTable,
    symbolizer: &mut Option<Symbolizer>,
) {
    let Ok(active) = active.lock() else {
        return;
    };
    if *active > 0 {
        return;
    }
    let had_symbolizer = symbolizer.take().is_some();
    if processes.clear() || had_symbolizer {
        debug!("no task runs: process snapshots and symbol caches dropped");
        release_freed_memory();
    }
}

fn recording_of(delivery: &Delivery) -> RecordingId {
    match delivery {
        Delivery::Stacks { recording, .. }
        | Delivery::WindowEnd { recording, .. }
        | Delivery::ProcessExited { recording, .. }
        | Delivery::DrainFailed { recording, .. }
        | Delivery::Ended { recording, .. } => *recording,
    }
}

fn handle(
    symbolizer: &mut Symbolizer,
    processes: &ProcessTable,
    tasks: &mut HashMap<RecordingId, Box<TaskState>>,
    active: &ActiveTasks,
    frames: &FrameTotals,
    delivery: Delivery,
) {
    let recording = recording_of(&delivery);
    let Some(task) = tasks.get_mut(&recording) else {
        return;
    };
    match delivery {
        Delivery::Stacks { stacks, .. } => {
            let before = symbolizer.stats();
            for stack in &stacks {
                if fold(symbolizer, processes, &mut task.profile, task.values, stack) {
                    task.stacks_cut += 1;
                    task.window_stacks_cut += 1;
                }
            }
            let after = symbolizer.stats();
            frames
                .symbolized
                .fetch_add(after.frames - before.frames, Ordering::Relaxed);
            frames.unresolved.fetch_add(
                after.unknown_frames - before.unknown_frames,
                Ordering::Relaxed,
            );
        }
        Delivery::WindowEnd {
            counters,
            start,
            end,
            ..
        } => task.end_window(counters, start, end, false),
        Delivery::ProcessExited { pid, .. } => {
            let _ = task
                .notices
                .send(CollectorNotice::Notice(TaskNotice::ProcessExited { pid }));
        }
        Delivery::DrainFailed { error, .. } => {
            let _ = task
                .notices
                .send(CollectorNotice::Notice(TaskNotice::DrainFailed(error)));
        }
        Delivery::Ended {
            counters,
            start,
            end,
            ..
        } => {
            let Some(mut task) = tasks.remove(&recording) else {
                return;
            };
            task.end_window(counters - task.counters_so_far, start, end, true);
            let summary = TaskSummary {
                counters,
                symbolize: symbolizer.stats(),
                stacks_cut: task.stacks_cut,
                windows: task.windows,
                sink_errors: task.sink_errors,
            };
            let _ = task.notices.send(CollectorNotice::Ended(Box::new(summary)));
            if let Ok(mut active) = active.lock() {
                *active = active.saturating_sub(1);
            }
        }
    }
}
