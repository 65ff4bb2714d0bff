//! The process events object: fork, exec and exit of processes, reported as they happen so that
//! the agent snapshots memory maps while processes live and learns at once of those that end.

use std::os::fd::{AsRawFd, RawFd};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf};
use aya::{Ebpf, EbpfLoader};
use rover_common::{event_counter, process_event};
use tracing::warn;

use super::profiler::{attach_raw_tracepoint, take};
use super::{Error, object};

const OBJECT: &str = "events";
/// Room for bursts of events between two reads (12 bytes each plus an 8-byte header).
const RING_BYTES: u32 = 256 * 1024;

/// A process-level event (threads are not reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcessEvent {
    /// `child` was forked from `parent` (not a thread): it runs its parent's image.
    Forked { parent: u32, child: u32 },
    /// `pid` replaced its image.
    Exec { pid: u32 },
    /// The last thread of `pid` exited.
    Exited { pid: u32 },
}

pub(super) struct ProcessEvents {
    ring: RingBuf<MapData>,
    filter: Array<MapData, u64>,
    watched: HashMap<MapData, u32, u8>,
    /// Until handed to process discovery (`track_changes`).
    changes: Option<ProcessChanges>,
    counters: PerCpuArray<MapData, u64>,
    every_process: bool,
    /// False when the kernel's BTF did not give `task_struct::tgid`: no fork events then.
    forks: bool,
    ebpf: Ebpf,
}

impl ProcessEvents {
    /// Loads (with `loader`, see `loader.rs`) and attaches the programs; they report nothing
    /// until told what to watch. `tgid_offset` says where `task_struct::tgid` is, for forks.
    pub fn load(
        loader: &mut EbpfLoader<'_>,
        max_watched: u32,
        tgid_offset: &Result<u32, String>,
    ) -> Result<Self, Error> {
        super::privilege::require_privilege()?;
        let forks = match tgid_offset {
            Ok(_) => true,
            Err(problem) => {
                warn!(
                    "new processes (forks) are not reported, so with --all a process that lives \
                     less than a drain interval may stay unsymbolized: {problem}"
                );
                false
            }
        };
        let mut ebpf = loader
            .map_max_entries("WATCHED", max_watched)
            .map_max_entries("PROCESS_EVENTS", RING_BYTES)
            .load(object::events()?)
            .map_err(|source| Error::Load {
                object: OBJECT,
                source,
            })?;
        let ring = take(&mut ebpf, OBJECT, "PROCESS_EVENTS", RingBuf::try_from)?;
        let filter = take(&mut ebpf, OBJECT, "FILTER", Array::try_from)?;
        let watched = take(&mut ebpf, OBJECT, "WATCHED", HashMap::try_from)?;
        let changed = take(&mut ebpf, OBJECT, "CHANGED", HashMap::try_from)?;
        let marked = take(&mut ebpf, OBJECT, "MARKED", Array::try_from)?;
        let counters = take(&mut ebpf, OBJECT, "EVENT_COUNTERS", PerCpuArray::try_from)?;
        for (name, tracepoint) in [
            ("process_exec", "sched_process_exec"),
            ("process_exit", "sched_process_exit"),
        ] {
            attach_raw_tracepoint(&mut ebpf, OBJECT, name, tracepoint)?;
        }
        if forks {
            attach_raw_tracepoint(&mut ebpf, OBJECT, "process_fork", "sched_process_fork")?;
        }
        Ok(Self {
            ring,
            filter,
            watched,
            changes: Some(ProcessChanges { changed, marked }),
            counters,
            every_process: false,
            forks,
            ebpf,
        })
    }

    /// The object's name and its programs, for their run statistics.
    pub fn object(&self) -> (&'static str, &Ebpf) {
        (OBJECT, &self.ebpf)
    }

    /// Reports every process (forks included), or only the watched ones.
    pub fn set_every_process(&mut self, every_process: bool) -> Result<(), Error> {
        if every_process == self.every_process {
            return Ok(());
        }
        self.filter
            .set(0, u64::from(every_process), 0)
            .map_err(map_error("FILTER", "update"))?;
        self.every_process = every_process;
        Ok(())
    }

    /// Starts marking execs and exits for process discovery, and hands it the set they are marked
    /// in. Once only: `None` when the set was handed out already.
    pub fn track_changes(&mut self) -> Result<Option<ProcessChanges>, Error> {
        let Some(mut changes) = self.changes.take() else {
            return Ok(None);
        };
        changes
            .changed
            .insert(OVERFLOW_KEY, 0, 0)
            .map_err(map_error("CHANGED", "update"))?;
        self.filter
            .set(1, 1, 0)
            .map_err(map_error("FILTER", "update"))?;
        Ok(Some(changes))
    }

    /// Reports exec and exit of `pid`. The watch ends by itself when the process exits.
    pub fn watch(&mut self, pid: u32) -> Result<(), Error> {
        self.watched
            .insert(pid, 1, 0)
            .map_err(map_error("WATCHED", "update"))
    }

    pub fn unwatch(&mut self, pid: u32) -> Result<(), Error> {
        super::error::deleted(self.watched.remove(&pid)).map_err(map_error("WATCHED", "delete"))
    }

    /// The events reported since the previous call, in order.
    pub fn read(&mut self, events: &mut Vec<ProcessEvent>) {
        while let Some(item) = self.ring.next() {
            // Records are written whole by the program: 3 native-endian u32s.
            let word = |index: usize| {
                item.get(index * 4..index * 4 + 4)
                    .and_then(|bytes| bytes.try_into().ok())
                    .map(u32::from_ne_bytes)
            };
            let (Some(kind), Some(pid), Some(parent)) = (word(0), word(1), word(2)) else {
                continue;
            };
            events.push(match kind {
                process_event::FORK => ProcessEvent::Forked { parent, child: pid },
                process_event::EXEC => ProcessEvent::Exec { pid },
                process_event::EXIT => ProcessEvent::Exited { pid },
                _ => continue,
            });
        }
    }

    /// Events dropped because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.counters
            .get(&event_counter::LOST, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    pub fn fork_events(&self) -> bool {
        self.forks
    }

    /// Turns readable when events are waiting.
    pub fn fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// The key of `CHANGED` whose value says the set overflowed (no process has TGID 0).
const OVERFLOW_KEY: u32 = 0;

/// The processes that replaced their image or ended since the last look, as the kernel marks
/// them (for process discovery: it re-reads those instead of every process).
pub struct ProcessChanges {
    changed: HashMap<MapData, u32, u8>,
    /// Non-zero: `changed` got a mark since the flag was cleared.
    marked: Array<MapData, u32>,
}

/// What `ProcessChanges::take` found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChangedProcesses {
    /// TGIDs that exec'd or exited.
    pub pids: std::collections::HashSet<u32>,
    /// Some changes could not be marked (more than the set holds between two looks): every
    /// process must be read again.
    pub overflowed: bool,
}

impl ProcessChanges {
    /// The changes since the previous call, cleared as they are read. A change marked while this
    /// runs is either returned now or kept for the next call; so whoever reads a process after
    /// this returns sees its state after every change returned.
    pub fn take(&mut self) -> Result<ChangedProcesses, Error> {
        let mut changes = ChangedProcesses::default();
        // Cleared before the walk: a mark made during it sets the flag again for the next call.
        let marked = self
            .marked
            .get(&0, 0)
            .map_err(map_error("MARKED", "lookup"))?;
        if marked == 0 {
            return Ok(changes);
        }
        self.marked
            .set(0, 0, 0)
            .map_err(map_error("MARKED", "update"))?;
        // Keys first: deleting while iterating would restart the walk.
        let keys: Vec<u32> = self
            .changed
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_error("CHANGED", "iterate"))?;
        for pid in keys {
            if pid == OVERFLOW_KEY {
                continue;
            }
            super::error::deleted(self.changed.remove(&pid))
                .map_err(map_error("CHANGED", "delete"))?;
            changes.pids.insert(pid);
        }
        let overflowed = self
            .changed
            .get(&OVERFLOW_KEY, 0)
            .map_err(map_error("CHANGED", "lookup"))?;
        if overflowed != 0 {
            // Reset after the deletions above made room.
            self.changed
                .insert(OVERFLOW_KEY, 0, 0)
                .map_err(map_error("CHANGED", "update"))?;
            changes.overflowed = true;
        }
        Ok(changes)
    }
}

fn map_error(map: &'static str, operation: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        map,
        operation,
        source,
    }
}
