//! The profiling engine: one thread that owns every loaded eBPF object for the life of the
//! agent, and serves any number of recordings (tasks) at once.
//!
//! - Each profiler kind is loaded and attached when its first recording starts and unloaded
//!   when its last one stops: an idle engine holds no program and no map.
//! - Recordings add and remove processes while the programs run; a process is one target per
//!   kind, reference-counted across recordings (see `targets.rs`). A target whose process exits
//!   is removed by the kernel at once and then forgotten here.
//! - Aggregates are drained every drain interval, at every window end and before a process
//!   leaves a recording, and routed by process to the recordings that want it. Each recording
//!   receives, in order, its stacks, its window ends and its processes' exits, then its end:
//!   what a window holds is exactly what was recorded for its processes since the previous one.
//! - Process events (fork, exec, exit) go to a second channel, for whoever snapshots memory maps.
//!
//! Callers talk to the thread through commands; the thread sleeps in `poll` on a wake-up
//! descriptor, the process events ring buffer and the programs' log buffers, with a timeout
//! at the next drain or window end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use aya::EbpfLoader;

use super::events::{ProcessChanges, ProcessEvent, ProcessEvents};
use super::loader::{Globals, loader};
use super::memory::MapCapacity;
use super::profiler::{Profiler, ProfilerSettings};
use super::program_runs::{ProgramRuns, ProgramTotals};
use super::targets::TargetOptions;
use super::{Counters, Error, ProfilerKind, RawStack, Targets};
use crate::heap::release_freed_memory;

/// The shortest flush window: each window end drains the kernel.
const MIN_WINDOW: Duration = Duration::from_millis(10);

/// Identifies a recording for the life of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordingId(u64);

impl std::fmt::Display for RecordingId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a recording asks of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordingSpec {
    pub kind: ProfilerKind,
    pub targets: Targets,
    /// Applied by the kernel to each target (off-CPU only).
    pub options: TargetOptions,
    /// A window ends every this long; `None`: only when the recording stops.
    pub window: Option<Duration>,
}

/// What the engine hands a recording's consumer, in order.
#[derive(Debug)]
pub enum Delivery {
    /// Aggregates drained for the recording's processes.
    Stacks {
        recording: RecordingId,
        stacks: Vec<RawStack>,
    },
    /// A window ended: everything recorded in it was delivered before this. `counters` are
    /// those of the recording's profiler over the window (shared by every recording of its
    /// kind); the window ran from `start` to `end` (the drains that delimit it).
    WindowEnd {
        recording: RecordingId,
        counters: Counters,
        start: SystemTime,
        end: SystemTime,
    },
    /// One of the recording's processes exited; its stacks were delivered before this.
    ProcessExited { recording: RecordingId, pid: u32 },
    /// Draining failed; what was recorded is kept and delivered by a later drain.
    DrainFailed {
        recording: RecordingId,
        error: String,
    },
    /// The recording stopped; everything it recorded was delivered before this. `counters`
    /// cover its whole life; its last window ran from `start` to `end`.
    Ended {
        recording: RecordingId,
        counters: Counters,
        start: SystemTime,
        end: SystemTime,
    },
}

/// The engine's view of itself, for `check`, the tests and the benchmarks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStatus {
    pub recordings: usize,
    /// Profilers loaded now, with their maps' size.
    pub profilers: Vec<(ProfilerKind, MapCapacity)>,
    /// Whether the process events object is loaded.
    pub process_events: bool,
    /// Entries in the loaded profilers' target maps, and in their generation maps.
    pub target_entries: usize,
    pub aggregate_entries: usize,
    /// Events the kernel could not report (ring buffer full) since the events object loaded.
    pub process_events_lost: u64,
    /// Aggregates drained for no recording (recorded just before their process left it), and
    /// their samples or switches.
    pub unrouted_stacks: u64,
}

/// What the engine counted since it started, summed over every load of each object: totals that
/// never go back, for the agent's self-metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineTotals {
    /// Each profiler kind loaded at least once.
    pub profilers: Vec<ProfilerTotals>,
    /// Each program loaded at least once (its run time counts only while
    /// `kernel.bpf_stats_enabled` is 1).
    pub programs: Vec<ProgramRuns>,
}

/// One profiler kind's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfilerTotals {
    pub kind: ProfilerKind,
    pub counters: Counters,
    /// Aggregates drained: distinct (process, user stack, kernel stack) per drain interval.
    pub distinct_stacks: u64,
}

enum Command {
    Record(RecordingSpec, oneshot::Sender<Result<RecordingId, Error>>),
    AddProcess(RecordingId, u32, oneshot::Sender<Result<(), Error>>),
    RemoveProcess(RecordingId, u32, oneshot::Sender<Result<(), Error>>),
    Stop(RecordingId, oneshot::Sender<Result<(), Error>>),
    Status(oneshot::Sender<EngineStatus>),
    Totals(oneshot::Sender<EngineTotals>),
    TrackProcessChanges(oneshot::Sender<Result<ProcessChanges, Error>>),
}

/// A handle on the engine thread; clones share it, and the thread ends (unloading everything)
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Engine(Arc<Handle>);

struct Handle {
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    wake: OwnedFd,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the engine thread. Nothing is loaded until a recording starts.
    /// `deliver` receives every recording's deliveries, `process_event` the process events;
    /// both are called on the engine's thread and must not block for long.
    pub fn start(
        settings: ProfilerSettings,
        deliver: impl Fn(Delivery) + Send + 'static,
        process_event: impl Fn(ProcessEvent) + Send + 'static,
    ) -> Result<Self, Error> {
        settings.validate()?;
        // SAFETY: eventfd takes two integers; the result is checked.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(Error::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor just created and owned by nothing else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let (commands, received) = mpsc::channel();
        let wake_fd = wake.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("rover-engine".to_owned())
            .spawn(move || {
                let globals = Globals::new(&settings);
                // Made first, when the agent holds least: aya's loader parses the kernel's BTF
                // as it is made (~20 MB for a moment), which sets the agent's peak memory.
                let loader = loader(&globals);
                release_freed_memory();
                EngineThread {
                    globals: &globals,
                    loader,
                    settings,
                    deliver: Box::new(deliver),
                    process_event: Box::new(process_event),
                    commands: received,
                    wake: wake_fd,
                    recordings: BTreeMap::new(),
                    profilers: HashMap::new(),
                    events: None,
                    tracking_changes: false,
                    next_id: 1,
                    unrouted_stacks: 0,
                    retired_counters: HashMap::new(),
                    distinct_stacks: HashMap::new(),
                    programs: ProgramTotals::default(),
                }
                .run()
            })
            .map_err(Error::Thread)?;
        Ok(Self(Arc::new(Handle {
            commands: Mutex::new(Some(commands)),
            wake,
            thread: Mutex::new(Some(thread)),
        })))
    }

    /// Starts a recording: loads its profiler if none of its kind runs, and adds its targets.
    pub async fn record(&self, spec: RecordingSpec) -> Result<RecordingId, Error> {
        self.call(|reply| Command::Record(spec, reply)).await?
    }

    /// Records `pid` too.
    pub async fn add_process(&self, recording: RecordingId, pid: u32) -> Result<(), Error> {
        self.call(|reply| Command::AddProcess(recording, pid, reply))
            .await?
    }

    /// Stops recording `pid` (after delivering what was recorded of it).
    pub async fn remove_process(&self, recording: RecordingId, pid: u32) -> Result<(), Error> {
        self.call(|reply| Command::RemoveProcess(recording, pid, reply))
            .await?
    }

    /// Stops a recording; its `Ended` delivery follows everything it recorded.
    pub async fn stop(&self, recording: RecordingId) -> Result<(), Error> {
        self.call(|reply| Command::Stop(recording, reply)).await?
    }

    pub async fn status(&self) -> Result<EngineStatus, Error> {
        self.call(Command::Status).await
    }

    /// What the engine counted since it started (a few map reads, no iteration).
    pub async fn totals(&self) -> Result<EngineTotals, Error> {
        self.call(Command::Totals).await
    }

    /// Loads the process events object (if no recording has) and has it mark every exec and
    /// exit for process discovery from now on, for as long as the engine runs. Once per engine.
    pub async fn track_process_changes(&self) -> Result<ProcessChanges, Error> {
        self.call(Command::TrackProcessChanges).await?
    }

    /// Stops every recording (each gets its `Ended` delivery), unloads everything and ends the
    /// thread, even while clones of this handle remain (their calls then fail).
    pub fn shut_down(&self) {
        self.0.shut_down();
    }

    async fn call<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        let (reply, answer) = oneshot::channel();
        {
            let commands = self.0.commands.lock().map_err(|_| Error::EngineStopped)?;
            let sender = commands.as_ref().ok_or(Error::EngineStopped)?;
            sender
                .send(command(reply))
                .map_err(|_| Error::EngineStopped)?;
        }
        self.0.wake();
        answer.await.map_err(|_| Error::EngineStopped)
    }
}

impl Handle {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd. A full counter (impossible in
        // practice) would only mean the thread is awake already.
        unsafe { libc::write(self.wake.as_raw_fd(), (&raw const one).cast(), 8) };
    }
}

impl Handle {
    /// Closing the channel tells the thread to stop every recording (delivering what each
    /// recorded), unload everything and end.
    fn shut_down(&self) {
        if let Ok(mut commands) = self.commands.lock() {
            commands.take();
        }
        self.wake();
        if let Ok(mut thread) = self.thread.lock()
            && let Some(thread) = thread.take()
            && thread.join().is_err()
        {
            error!("the profiling engine's thread panicked");
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shut_down();
    }
}

struct Recording {
    kind: ProfilerKind,
    every_process: bool,
    /// Its target processes.
    pids: HashSet<u32>,
    /// Processes it no longer targets (removed, or exited: `true`) that the kernel stopped
    /// recording, still routed to it until its profiler's next drain has collected what they
    /// recorded; an exit is announced then.
    leaving: HashMap<u32, bool>,
    options: TargetOptions,
    window: Option<Duration>,
    next_window_end: Option<Instant>,
    /// The profiler's counters when the recording, and its window, started.
    counters_at_start: Counters,
    counters_at_window: Counters,
    window_start: SystemTime,
}

struct Loaded {
    profiler: Profiler,
    next_drain: Instant,
}

struct EngineThread<'g> {
    globals: &'g Globals,
    /// Loads every object (see `loader.rs`).
    loader: EbpfLoader<'g>,
    settings: ProfilerSettings,
    deliver: Box<dyn Fn(Delivery) + Send>,
    process_event: Box<dyn Fn(ProcessEvent) + Send>,
    commands: mpsc::Receiver<Command>,
    wake: RawFd,
    recordings: BTreeMap<RecordingId, Recording>,
    profilers: HashMap<ProfilerKind, Loaded>,
    events: Option<ProcessEvents>,
    /// Process discovery has the events object's change set: it stays loaded.
    tracking_changes: bool,
    next_id: u64,
    unrouted_stacks: u64,
    /// The final counters of unloaded profilers, per kind.
    retired_counters: HashMap<ProfilerKind, Counters>,
    /// Aggregates drained, per kind.
    distinct_stacks: HashMap<ProfilerKind, u64>,
    /// Run statistics of unloaded programs.
    programs: ProgramTotals,
}

impl<'g> EngineThread<'g> {
    fn run(mut self) {
        loop {
            self.wait();
            self.handle_process_events();
            for loaded in self.profilers.values_mut() {
                loaded.profiler.flush_logs();
            }
            loop {
                match self.commands.try_recv() {
                    Ok(command) => {
                        // Exits reported so far are handled before any command, so a command
                        // about a pid never meets a target of a process already gone.
                        self.handle_process_events();
                        self.handle(command);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        self.shut_down();
                        return;
                    }
                }
            }
            self.run_due(Instant::now());
        }
    }

    /// Sleeps until a command, a process event, a log record or the next deadline.
    fn wait(&mut self) {
        let mut fds = vec![pollfd(self.wake)];
        fds.extend(self.events.as_ref().map(|events| pollfd(events.fd())));
        fds.extend(
            self.profilers
                .values()
                .filter_map(|loaded| loaded.profiler.log_fd())
                .map(pollfd),
        );
        let timeout_ms = match self.next_deadline() {
            None => -1,
            Some(deadline) => {
                let wait = deadline.saturating_duration_since(Instant::now());
                // Rounded up: waking a little early would only loop.
                i32::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `fds` is a valid array of pollfd for the call's duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                warn!("engine: poll failed: {error}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut counter = 0u64;
        // SAFETY: reads 8 bytes into a local from our non-blocking eventfd (clears it).
        unsafe { libc::read(self.wake, (&raw mut counter).cast(), 8) };
    }

    fn next_deadline(&self) -> Option<Instant> {
        let drains = self.profilers.values().map(|loaded| loaded.next_drain);
        let windows = self
            .recordings
            .values()
            .filter_map(|recording| recording.next_window_end);
        drains.chain(windows).min()
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Record(spec, reply) => {
                let _ = reply.send(self.record(spec));
            }
            Command::AddProcess(id, pid, reply) => {
                let _ = reply.send(self.add_process(id, pid));
            }
            Command::RemoveProcess(id, pid, reply) => {
                let _ = reply.send(self.remove_process(id, pid));
            }
            Command::Stop(id, reply) => {
                let _ = reply.send(self.stop(id));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::Totals(reply) => {
                let _ = reply.send(self.totals());
            }
            Command::TrackProcessChanges(reply) => {
                let _ = reply.send(self.track_process_changes());
            }
        }
    }

    fn record(&mut self, spec: RecordingSpec) -> Result<RecordingId, Error> {
        if let Some(window) = spec.window
            && window < MIN_WINDOW
        {
            return Err(Error::InvalidConfig(format!(
                "a window of {window:?} is shorter than the {MIN_WINDOW:?} windows can be"
            )));
        }
        let kind = spec.kind;
        let counters = self
            .load(kind)
            .and_then(|()| self.profiler(kind)?.counters());
        let counters = match counters {
            Ok(counters) => counters,
            Err(error) => {
                // Nothing to keep loaded for a recording that could not start.
                if self.recordings_of(kind).next().is_none() {
                    self.unload(kind);
                }
                self.drop_unused_events();
                return Err(error);
            }
        };
        let id = RecordingId(self.next_id);
        self.next_id += 1;
        let now = Instant::now();
        self.recordings.insert(
            id,
            Recording {
                kind,
                every_process: false,
                pids: HashSet::new(),
                leaving: HashMap::new(),
                options: spec.options,
                window: spec.window,
                next_window_end: spec.window.map(|window| now + window),
                counters_at_start: counters,
                counters_at_window: counters,
                window_start: SystemTime::now(),
            },
        );
        let targets = match spec.targets {
            Targets::All => self.record_every_process(id),
            Targets::Pids(pids) => pids
                .into_iter()
                .try_for_each(|pid| self.add_process(id, pid)),
        };
        if let Err(error) = targets {
            // Undo what was set up; nothing was recorded for it yet worth delivering.
            if let Err(undo) = self.untarget(id) {
                warn!("engine: undoing recording {id}: {undo}");
            }
            self.forget(id);
            return Err(error);
        }
        info!(recording = %id, profiler = kind.name(), "recording started");
        Ok(id)
    }

    fn record_every_process(&mut self, id: RecordingId) -> Result<(), Error> {
        let recording = self.recording(id)?;
        let (kind, options) = (recording.kind, recording.options);
        self.profiler(kind)?.add_all(options)?;
        if let Some(recording) = self.recordings.get_mut(&id) {
            recording.every_process = true;
        }
        if let Some(events) = &mut self.events {
            events.set_every_process(true)?;
        }
        Ok(())
    }

    fn add_process(&mut self, id: RecordingId, pid: u32) -> Result<(), Error> {
        let recording = self.recording(id)?;
        let (kind, options) = (recording.kind, recording.options);
        if recording.every_process || recording.pids.contains(&pid) {
            return Ok(());
        }
        if pid == 0 || !crate::process::is_alive(pid) {
            return Err(Error::NoSuchProcess { pid });
        }
        self.profiler(kind)?.add_target(pid, options)?;
        if let Some(recording) = self.recordings.get_mut(&id) {
            recording.pids.insert(pid);
            recording.leaving.remove(&pid);
        }
        if let Some(events) = &mut self.events
            && let Err(error) = events.watch(pid)
        {
            warn!(
                pid,
                "exec and exit of this process will not be reported: {error}"
            );
        }
        // An exit between the liveness check and the insert was reported before the insert
        // (the kernel reports it before the process can be reaped): handle it now. One after
        // the insert removes the target in the kernel.
        self.handle_process_events();
        if !crate::process::is_alive(pid) {
            self.forget_exited(&[pid]);
            if let Some(recording) = self.recordings.get_mut(&id) {
                // Its exit concerns the recordings that had it, not this failed addition.
                recording.leaving.remove(&pid);
            }
            return Err(Error::NoSuchProcess { pid });
        }
        Ok(())
    }

    fn remove_process(&mut self, id: RecordingId, pid: u32) -> Result<(), Error> {
        let recording = self.recording(id)?;
        let kind = recording.kind;
        if !recording.pids.contains(&pid) {
            return Ok(());
        }
        let profiler = self.profiler(kind)?;
        profiler.remove_target(pid)?;
        let still_recorded = profiler.holds(pid);
        if still_recorded {
            // Another recording keeps it recorded: what this one gets ends now.
            self.drain(kind);
        }
        if let Some(recording) = self.recordings.get_mut(&id) {
            recording.pids.remove(&pid);
            if !still_recorded {
                // Not recorded any more: what it recorded so far still comes to this recording
                // with the next drain.
                recording.leaving.insert(pid, false);
            }
        }
        self.unwatch_if_unheld(pid);
        Ok(())
    }

    fn stop(&mut self, id: RecordingId) -> Result<(), Error> {
        let kind = self.recording(id)?.kind;
        let last_of_kind = self.recordings_of(kind).count() == 1;
        // Nothing more is recorded for it, so the drain below collects everything it gets.
        let untargeted = if last_of_kind {
            // The counters are final then too; the programs' run statistics go with them.
            if let Some(loaded) = self.profilers.get(&kind) {
                let (object, ebpf) = loaded.profiler.object();
                self.programs.retire(object, ebpf);
            }
            self.profiler(kind)?.detach()
        } else {
            self.untarget(id)
        };
        if let Err(error) = untargeted {
            error!(recording = %id, "stopping the recording: {error}");
        }
        self.drain(kind);
        let counters = self.profiler(kind)?.counters().unwrap_or_else(|error| {
            warn!("reading the {} profiler's counters: {error}", kind.name());
            Counters::default()
        });
        if let Some(recording) = self.recordings.get(&id) {
            self.deliver(Delivery::Ended {
                recording: id,
                counters: counters - recording.counters_at_start,
                start: recording.window_start,
                end: SystemTime::now(),
            });
        }
        self.forget(id);
        info!(recording = %id, profiler = kind.name(), "recording stopped");
        Ok(())
    }

    /// Removes a recording's targets from the kernel; its routing stays until [`Self::forget`].
    fn untarget(&mut self, id: RecordingId) -> Result<(), Error> {
        let Some(recording) = self.recordings.get(&id) else {
            return Ok(());
        };
        let (every_process, pids) = (recording.every_process, recording.pids.clone());
        let profiler = self.profiler(recording.kind)?;
        if every_process {
            profiler.remove_all()?;
        }
        for &pid in &pids {
            profiler.remove_target(pid)?;
        }
        Ok(())
    }

    /// Removes a recording; unloads what no recording needs any more.
    fn forget(&mut self, id: RecordingId) {
        let Some(recording) = self.recordings.remove(&id) else {
            return;
        };
        let kind = recording.kind;
        if self.recordings_of(kind).next().is_none() {
            self.unload(kind);
            info!(profiler = kind.name(), "profiler unloaded");
            // Loading it (and the off-CPU profiler's kernel BTF) used memory for a moment.
            release_freed_memory();
        }
        for &pid in recording.pids.iter().chain(recording.leaving.keys()) {
            self.unwatch_if_unheld(pid);
        }
        if self.recordings.is_empty() {
            self.drop_unused_events();
        } else if !self.recordings.values().any(|r| r.every_process)
            && let Some(events) = &mut self.events
            && let Err(error) = events.set_every_process(false)
        {
            warn!("{error}");
        }
    }

    /// Drops a profiler (its object detaches its programs and frees its maps), keeping what it
    /// counted in the totals.
    fn unload(&mut self, kind: ProfilerKind) {
        let Some(loaded) = self.profilers.remove(&kind) else {
            return;
        };
        match loaded.profiler.counters() {
            Ok(counters) => *self.retired_counters.entry(kind).or_default() += counters,
            Err(error) => warn!(
                "reading the {} profiler's final counters: {error}",
                kind.name()
            ),
        }
        let (object, ebpf) = loaded.profiler.object();
        self.programs.retire(object, ebpf);
    }

    fn totals(&self) -> EngineTotals {
        let mut kinds: Vec<ProfilerKind> = self
            .retired_counters
            .keys()
            .chain(self.profilers.keys())
            .copied()
            .collect();
        kinds.sort();
        kinds.dedup();
        let profilers = kinds
            .into_iter()
            .map(|kind| {
                let mut counters = self
                    .retired_counters
                    .get(&kind)
                    .copied()
                    .unwrap_or_default();
                if let Some(loaded) = self.profilers.get(&kind) {
                    match loaded.profiler.counters() {
                        Ok(now) => counters += now,
                        Err(error) => {
                            warn!("reading the {} profiler's counters: {error}", kind.name());
                        }
                    }
                }
                ProfilerTotals {
                    kind,
                    counters,
                    distinct_stacks: self.distinct_stacks.get(&kind).copied().unwrap_or(0),
                }
            })
            .collect();
        let loaded = self
            .profilers
            .values()
            .map(|loaded| loaded.profiler.object())
            .chain(self.events.as_ref().map(ProcessEvents::object));
        EngineTotals {
            profilers,
            programs: self.programs.with_loaded(loaded),
        }
    }

    fn status(&self) -> EngineStatus {
        let mut status = EngineStatus {
            recordings: self.recordings.len(),
            process_events: self.events.is_some(),
            process_events_lost: self.events.as_ref().map_or(0, ProcessEvents::lost),
            unrouted_stacks: self.unrouted_stacks,
            ..EngineStatus::default()
        };
        for loaded in self.profilers.values() {
            let profiler = &loaded.profiler;
            status
                .profilers
                .push((profiler.kind(), profiler.capacity()));
            let (targets, aggregates) = profiler.map_entries();
            status.target_entries += targets;
            status.aggregate_entries += aggregates;
        }
        status.profilers.sort_by_key(|(kind, _)| *kind);
        status
    }

    /// Loads the process events object unless it is loaded.
    fn load_events(&mut self) -> Result<&mut ProcessEvents, Error> {
        let events = match self.events.take() {
            Some(events) => events,
            None => {
                let mut events = ProcessEvents::load(
                    &mut self.loader,
                    self.settings.max_targets.saturating_mul(2),
                    &self.globals.task_tgid_offset,
                )?;
                if self.recordings.values().any(|r| r.every_process)
                    && let Err(error) = events.set_every_process(true)
                {
                    warn!("{error}");
                }
                events
            }
        };
        Ok(self.events.insert(events))
    }

    /// Unloads the process events object when nothing needs it.
    fn drop_unused_events(&mut self) {
        if self.recordings.is_empty()
            && !self.tracking_changes
            && let Some(events) = self.events.take()
        {
            let (object, ebpf) = events.object();
            self.programs.retire(object, ebpf);
        }
    }

    fn track_process_changes(&mut self) -> Result<ProcessChanges, Error> {
        let changes = self.load_events()?.track_changes()?.ok_or_else(|| {
            Error::InvalidConfig("process changes are handed to one tracker only".to_owned())
        })?;
        self.tracking_changes = true;
        info!("process discovery follows execs and exits through the kernel");
        Ok(changes)
    }

    fn load(&mut self, kind: ProfilerKind) -> Result<(), Error> {
        if let Err(error) = self.load_events() {
            warn!(
                "process events unavailable: targets that exit are still removed, but \
                 processes that live less than a drain interval may stay unsymbolized: {error}"
            );
        }
        if !self.profilers.contains_key(&kind) {
            let profiler = Profiler::load(kind, &self.settings, &mut self.loader)?;
            let capacity = profiler.capacity();
            info!(
                profiler = kind.name(),
                aggregates = capacity.aggregates,
                map_bytes = capacity.bytes,
                "profiler loaded"
            );
            if capacity.limited_by_budget {
                warn!(
                    "the {} profiler's maps are limited by the memory budget to {} aggregates \
                     per drain interval; more are counted as losses (raise the budget or drain \
                     more often)",
                    kind.name(),
                    capacity.aggregates
                );
            }
            self.profilers.insert(
                kind,
                Loaded {
                    profiler,
                    next_drain: Instant::now() + self.settings.drain_interval,
                },
            );
        }
        Ok(())
    }

    fn profiler(&mut self, kind: ProfilerKind) -> Result<&mut Profiler, Error> {
        self.profilers
            .get_mut(&kind)
            .map(|loaded| &mut loaded.profiler)
            .ok_or(Error::EngineStopped)
    }

    fn recording(&self, id: RecordingId) -> Result<&Recording, Error> {
        self.recordings
            .get(&id)
            .ok_or(Error::UnknownRecording(id.0))
    }

    fn recordings_of(
        &self,
        kind: ProfilerKind,
    ) -> impl Iterator<Item = (&RecordingId, &Recording)> {
        self.recordings.iter().filter(move |(_, r)| r.kind == kind)
    }

    fn unwatch_if_unheld(&mut self, pid: u32) {
        let held = self
            .profilers
            .values()
            .any(|loaded| loaded.profiler.holds(pid));
        if !held
            && let Some(events) = &mut self.events
            && let Err(error) = events.unwatch(pid)
        {
            warn!(pid, "{error}");
        }
    }

    /// Drains what is due and ends the windows that are.
    fn run_due(&mut self, now: Instant) {
        let mut due: Vec<ProfilerKind> = self
            .profilers
            .iter()
            .filter(|(_, loaded)| loaded.next_drain <= now)
            .map(|(&kind, _)| kind)
            .collect();
        let windows: Vec<RecordingId> = self
            .recordings
            .iter()
            .filter(|(_, r)| r.next_window_end.is_some_and(|end| end <= now))
            .map(|(&id, _)| id)
            .collect();
        for id in &windows {
            if let Some(recording) = self.recordings.get(id)
                && !due.contains(&recording.kind)
            {
                due.push(recording.kind);
            }
        }
        for kind in due {
            self.drain(kind);
        }
        for id in windows {
            self.end_window(id, now);
        }
    }

    fn end_window(&mut self, id: RecordingId, now: Instant) {
        let Some(kind) = self.recordings.get(&id).map(|r| r.kind) else {
            return;
        };
        let counters = match self.profiler(kind).and_then(|profiler| profiler.counters()) {
            Ok(counters) => counters,
            Err(error) => {
                warn!("reading the {} profiler's counters: {error}", kind.name());
                return;
            }
        };
        let Some(recording) = self.recordings.get_mut(&id) else {
            return;
        };
        let window_counters = counters - recording.counters_at_window;
        recording.counters_at_window = counters;
        let (start, end) = (recording.window_start, SystemTime::now());
        recording.window_start = end;
        if let (Some(window), Some(end)) = (recording.window, &mut recording.next_window_end) {
            // Late windows are not made up for: the next ends one window from now.
            *end = (*end + window).max(now);
        }
        self.deliver(Delivery::WindowEnd {
            recording: id,
            counters: window_counters,
            start,
            end,
        });
    }

    /// Drains one profiler and routes what it recorded.
    fn drain(&mut self, kind: ProfilerKind) {
        let Some(loaded) = self.profilers.get_mut(&kind) else {
            return;
        };
        loaded.next_drain = Instant::now() + self.settings.drain_interval;
        match loaded.profiler.drain() {
            Ok(stacks) => {
                debug!(profiler = kind.name(), stacks = stacks.len(), "drained");
                *self.distinct_stacks.entry(kind).or_default() += stacks.len() as u64;
                self.route(kind, stacks);
            }
            Err(error) => {
                error!(
                    profiler = kind.name(),
                    "draining the kernel aggregates failed: {error}"
                );
                let message = format!("{:#}", anyhow::Error::new(error));
                let ids: Vec<RecordingId> = self.recordings_of(kind).map(|(&id, _)| id).collect();
                for recording in ids {
                    self.deliver(Delivery::DrainFailed {
                        recording,
                        error: message.clone(),
                    });
                }
            }
        }
    }

    /// Hands each stack to every recording of `kind` that wants its process.
    fn route(&mut self, kind: ProfilerKind, stacks: Vec<RawStack>) {
        let mut every: Vec<RecordingId> = Vec::new();
        let mut by_pid: HashMap<u32, Vec<RecordingId>> = HashMap::new();
        for (&id, recording) in self.recordings_of(kind) {
            if recording.every_process {
                every.push(id);
            } else {
                for &pid in recording.pids.iter().chain(recording.leaving.keys()) {
                    by_pid.entry(pid).or_default().push(id);
                }
            }
        }
        let mut batches: BTreeMap<RecordingId, Vec<RawStack>> = BTreeMap::new();
        for stack in stacks {
            let mut recipients = every.clone();
            if let Some(ids) = by_pid.get(&stack.tgid) {
                recipients.extend(ids.iter().filter(|id| !every.contains(id)));
            }
            match recipients.split_last() {
                None => self.unrouted_stacks += 1,
                Some((last, others)) => {
                    for id in others {
                        batches.entry(*id).or_default().push(stack.clone());
                    }
                    batches.entry(*last).or_default().push(stack);
                }
            }
        }
        for (recording, stacks) in batches {
            self.deliver(Delivery::Stacks { recording, stacks });
        }
        // What the leaving processes recorded is delivered: they leave now.
        let mut exits = Vec::new();
        for (&id, recording) in self.recordings.iter_mut().filter(|(_, r)| r.kind == kind) {
            for (pid, exited) in recording.leaving.drain() {
                if exited {
                    exits.push(Delivery::ProcessExited { recording: id, pid });
                }
            }
        }
        for exit in exits {
            self.deliver(exit);
        }
    }

    /// Reads the process events reported so far: forwards them, and forgets exited targets
    /// after delivering what they recorded.
    fn handle_process_events(&mut self) {
        let Some(events) = &mut self.events else {
            return;
        };
        let mut read = Vec::new();
        events.read(&mut read);
        let exited: Vec<u32> = read
            .iter()
            .filter_map(|event| match event {
                ProcessEvent::Exited { pid } => Some(*pid),
                _ => None,
            })
            .collect();
        if !exited.is_empty() {
            self.forget_exited(&exited);
        }
        for event in read {
            (self.process_event)(event);
        }
    }

    /// The kernel removed the targets of exited processes (or will find none): forget them. Their
    /// recordings still get what they recorded, with the next drain, then hear of the exit.
    fn forget_exited(&mut self, exited: &[u32]) {
        for loaded in self.profilers.values_mut() {
            for &pid in exited {
                if let Err(error) = loaded.profiler.target_exited(pid) {
                    warn!(pid, "forgetting an exited target: {error}");
                }
            }
        }
        for recording in self.recordings.values_mut() {
            for &pid in exited {
                if recording.pids.remove(&pid) || recording.leaving.contains_key(&pid) {
                    recording.leaving.insert(pid, true);
                }
            }
        }
    }

    fn deliver(&self, delivery: Delivery) {
        (self.deliver)(delivery);
    }

    /// The agent is ending: stop every recording, delivering what it recorded.
    fn shut_down(&mut self) {
        let ids: Vec<RecordingId> = self.recordings.keys().copied().collect();
        for id in ids {
            if let Err(error) = self.stop(id) {
                warn!(recording = %id, "stopping at shutdown: {error}");
            }
        }
        self.profilers.clear();
        self.events = None;
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
