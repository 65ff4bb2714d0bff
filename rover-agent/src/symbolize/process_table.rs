//! The processes whose stacks may be symbolized: a snapshot of each one's executable mappings
//! and name, taken while it lives, and the mapped files, held open once each however many
//! processes map them. Shared between threads (`Clone` + `Send` + `Sync`).
//!
//! The lock guards short map operations only: `/proc` is read, and files opened, outside it. A
//! capture first takes (under the lock) the files already held, opens the missing ones without
//! it, then inserts them and the snapshot (under the lock again); a file another capture inserted
//! meanwhile wins, and the duplicate is closed once the lock is released. Nothing here calls
//! blazesym.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use procfs::ProcError;
use tracing::{debug, warn};

use super::mapped_files::{FileId, MappedFile};
use super::process_maps::{
    Mapping, ProcessSnapshot, ReadMapping, StartTime, Target, is_running, read_mappings, read_stat,
};

/// Counters and sizes of the [`ProcessTable`], for the run summary and self-metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessTableStats {
    /// Processes remembered now.
    pub processes: u64,
    /// Of which exited, kept for their grace period.
    pub exited: u64,
    /// Mapped files held open now.
    pub open_files: u64,
    /// Snapshots read from `/proc`.
    pub captures: u64,
    /// Captures that found the process gone or could not read it.
    pub failed_captures: u64,
    /// Snapshots of forked children cloned from their parent's.
    pub forks: u64,
}

/// Per-process snapshots and the files they map. Cheap to clone: clones share one table.
#[derive(Clone)]
pub struct ProcessTable {
    shared: Arc<Mutex<TableState>>,
    /// How long an exited process is remembered.
    grace: Duration,
}

#[derive(Default)]
struct TableState {
    processes: HashMap<u32, ProcessSnapshot>,
    files: HashMap<FileId, Arc<MappedFile>>,
    /// Files that could not be opened or are no ELF: warned about once, not retried while a
    /// snapshot maps them.
    unusable: HashSet<FileId>,
    next_serial: u64,
    /// When `retire` last checked that processes not reported exited still run.
    last_check: Option<Instant>,
    /// A snapshot was replaced or forgotten since the files were last swept: some may no longer
    /// be mapped.
    unswept: bool,
    captures: u64,
    failed_captures: u64,
    forks: u64,
}

/// What a capture may replace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Capture {
    /// Any earlier snapshot of the PID.
    Always,
    /// Only a snapshot of an earlier process with the PID, or none.
    IfUnknown,
    /// Only the snapshot of the same process, still running.
    Refresh,
}

/// Where one address lies in a process's snapshot.
#[derive(Clone)]
pub(super) struct Located {
    pub mapping: Mapping,
    /// The open file of a file mapping; `None` for other mappings and unusable files.
    pub file: Option<Arc<MappedFile>>,
}

/// The mappings of a snapshot covering some addresses.
#[derive(Default)]
pub(super) struct Locations {
    /// Whether the snapshot has any mapping: a process never seen alive has none, and then an
    /// address in no mapping says nothing.
    pub mapped: bool,
    /// Per address: its mapping, `None` when no mapping covers it.
    pub found: Vec<Option<Located>>,
}

impl ProcessTable {
    pub fn new(exited_process_grace: Duration) -> Self {
        Self {
            shared: Arc::default(),
            grace: exited_process_grace,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        // A panic elsewhere leaves consistent maps behind: every update is a single insert or
        // retain.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Snapshot `pid` now (it appeared, exec'd, or became a target); replaces an earlier
    /// snapshot of it. If the process is already gone, keeps what was known (remembered even
    /// empty so it retires in time).
    pub fn capture(&self, pid: u32) {
        self.capture_as(pid, Capture::Always);
    }

    /// Like [`Self::capture`], but only if `pid` has no snapshot yet (or its snapshot is of an
    /// earlier process with that PID).
    pub fn capture_if_unknown(&self, pid: u32) {
        self.capture_as(pid, Capture::IfUnknown);
    }

    /// Re-reads the snapshot of `pid` if it is of a process still running and not reported
    /// exited (e.g. it mapped code since: `dlopen`). Returns whether it was re-read.
    pub(super) fn refresh(&self, pid: u32) -> bool {
        let refreshable = self.lock().processes.get(&pid).is_some_and(|snapshot| {
            snapshot.exited_at.is_none() && snapshot.start_time != StartTime::Never
        });
        refreshable && self.capture_as(pid, Capture::Refresh)
    }

    /// A new process `child` forked from `parent` just now: its memory map is the parent's at
    /// this instant. Clones the parent's snapshot when known (no `/proc` read: the child's start
    /// time is read at the next liveness check); else captures the child from `/proc`.
    pub fn forked(&self, parent: u32, child: u32) {
        let mut state = self.lock();
        let cloned = state
            .processes
            .get(&parent)
            .filter(|snapshot| !snapshot.mappings.is_empty())
            .map(|snapshot| ProcessSnapshot {
                start_time: StartTime::Unread,
                name: snapshot.name.clone(),
                mappings: snapshot.mappings.clone(),
                exited_at: None,
                serial: 0,
            });
        match cloned {
            Some(snapshot) => {
                state.forks += 1;
                state.insert(child, snapshot);
            }
            None => {
                drop(state);
                self.capture(child);
            }
        }
    }

    /// The process exited (kernel event) at `at`: its snapshot is kept for the grace period
    /// from then.
    pub fn exited(&self, pid: u32, at: Instant) {
        if let Some(snapshot) = self.lock().processes.get_mut(&pid) {
            snapshot.exited_at = Some(snapshot.exited_at.map_or(at, |known| known.min(at)));
        }
    }

    /// Forgets processes that exited at least the grace period before `now`, and closes files no
    /// remaining snapshot maps. Exit events can be lost (a full ring buffer), so it also checks,
    /// at most once per grace period, whether processes never reported exited still run (PID and
    /// start time) and starts their grace period if not. Returns how many processes were
    /// forgotten.
    pub fn retire(&self, now: Instant) -> usize {
        let unchecked = {
            let mut state = self.lock();
            let due = state
                .last_check
                .is_none_or(|last| now.saturating_duration_since(last) >= self.grace);
            if due {
                state.last_check = Some(now);
                state
                    .processes
                    .iter()
                    .filter(|(_, snapshot)| snapshot.exited_at.is_none())
                    .map(|(&pid, snapshot)| (pid, snapshot.start_time, snapshot.serial))
                    .collect()
            } else {
                Vec::new()
            }
        };
        // Read without the lock: one `/proc/PID/stat` per process.
        let checked: Vec<(u32, u64, Checked)> = unchecked
            .into_iter()
            .filter_map(|(pid, start_time, serial)| {
                let checked = match start_time {
                    StartTime::Never => Some(Checked::Exited),
                    // A forked child's own start time, read now.
                    StartTime::Unread => Some(
                        read_stat(pid)
                            .map_or(Checked::Exited, |stat| Checked::Runs(stat.start_time)),
                    ),
                    StartTime::At(start) => (!is_running(pid, start)).then_some(Checked::Exited),
                };
                checked.map(|checked| (pid, serial, checked))
            })
            .collect();

        let mut state = self.lock();
        for (pid, serial, checked) in checked {
            // Skip snapshots replaced meanwhile (a new capture of the PID).
            let Some(snapshot) = state
                .processes
                .get_mut(&pid)
                .filter(|snapshot| snapshot.serial == serial)
            else {
                continue;
            };
            match checked {
                Checked::Runs(start) => snapshot.start_time = StartTime::At(start),
                Checked::Exited => {
                    snapshot.exited_at.get_or_insert(now);
                }
            }
        }
        let before = state.processes.len();
        let grace = self.grace;
        state.processes.retain(|_, snapshot| {
            snapshot
                .exited_at
                .is_none_or(|exited_at| now.saturating_duration_since(exited_at) < grace)
        });
        let forgotten = before - state.processes.len();
        let closed = if forgotten > 0 || state.unswept {
            state.sweep_files()
        } else {
            Vec::new()
        };
        drop(state);
        // Closed without the lock.
        drop(closed);
        forgotten
    }

    /// The process name captured while it lived.
    pub fn name(&self, pid: u32) -> Option<String> {
        self.lock()
            .processes
            .get(&pid)
            .and_then(|snapshot| snapshot.name.clone())
    }

    /// Whether `pid` is remembered (captured, and not retired).
    pub fn knows(&self, pid: u32) -> bool {
        self.lock().processes.contains_key(&pid)
    }

    /// Forgets every process and closes every file: nothing is profiled any more. Returns
    /// whether there was anything to forget.
    pub fn clear(&self) -> bool {
        let mut state = self.lock();
        let had = !state.processes.is_empty() || !state.files.is_empty();
        state.processes = HashMap::new();
        state.files = HashMap::new();
        state.unusable = HashSet::new();
        state.unswept = false;
        had
    }

    pub fn stats(&self) -> ProcessTableStats {
        let state = self.lock();
        ProcessTableStats {
            processes: state.processes.len() as u64,
            exited: state
                .processes
                .values()
                .filter(|snapshot| snapshot.exited_at.is_some())
                .count() as u64,
            open_files: state.files.len() as u64,
            captures: state.captures,
            failed_captures: state.failed_captures,
            forks: state.forks,
        }
    }

    /// Where each of `lookups` lies in the snapshot of `pid`; `None` if `pid` is unknown.
    pub(super) fn locate(&self, pid: u32, lookups: &[u64]) -> Option<Locations> {
        let state = self.lock();
        let snapshot = state.processes.get(&pid)?;
        let found = lookups
            .iter()
            .map(|&lookup| {
                let mapping = snapshot.find(lookup)?;
                let file = match mapping.target {
                    Target::File(file) => state.files.get(&file).cloned(),
                    Target::Vdso | Target::Anonymous => None,
                };
                Some(Located {
                    mapping: mapping.clone(),
                    file,
                })
            })
            .collect();
        Some(Locations {
            mapped: !snapshot.mappings.is_empty(),
            found,
        })
    }

    /// Keeps the entries of `files` whose file the table still holds open.
    pub(super) fn retain_held<V>(&self, files: &mut HashMap<FileId, V>) {
        let state = self.lock();
        files.retain(|file, _| state.files.contains_key(file));
    }

    /// Returns whether a snapshot was taken.
    fn capture_as(&self, pid: u32, mode: Capture) -> bool {
        let stat = match read_stat(pid) {
            Ok(stat) => stat,
            Err(error) => {
                self.capture_failed(pid, mode, &error);
                return false;
            }
        };
        if mode != Capture::Always {
            let state = self.lock();
            let same = state
                .processes
                .get(&pid)
                .map(|snapshot| match snapshot.start_time {
                    StartTime::At(start) => start == stat.start_time,
                    // A forked child, not checked yet: the PID did not change hands since.
                    StartTime::Unread => true,
                    StartTime::Never => false,
                });
            let wanted = match mode {
                Capture::Always => true,
                Capture::IfUnknown => same != Some(true),
                Capture::Refresh => same == Some(true),
            };
            if !wanted {
                return false;
            }
        }
        let read = match read_mappings(pid) {
            Ok(read) => read,
            Err(error) => {
                self.capture_failed(pid, mode, &error);
                return false;
            }
        };
        let files = self.open_files(pid, &read);

        let mut state = self.lock();
        for (&id, file) in &files {
            match file {
                Some(file) => {
                    state.files.entry(id).or_insert_with(|| Arc::clone(file));
                }
                None if !state.files.contains_key(&id) => {
                    state.unusable.insert(id);
                }
                None => {}
            }
        }
        state.captures += 1;
        state.insert(
            pid,
            ProcessSnapshot {
                start_time: StartTime::At(stat.start_time),
                name: Some(stat.name),
                mappings: read.into_iter().map(|read| read.mapping).collect(),
                exited_at: None,
                serial: 0,
            },
        );
        drop(state);
        // Duplicates of files another capture inserted meanwhile close here, without the lock.
        drop(files);
        true
    }

    fn capture_failed(&self, pid: u32, mode: Capture, error: &ProcError) {
        debug!(pid, %error, "cannot snapshot process; keeping what is known");
        let mut state = self.lock();
        state.failed_captures += 1;
        if mode != Capture::Refresh && !state.processes.contains_key(&pid) {
            // Remembered even empty, so that a later stack neither captures it again nor
            // another process with its PID, and `retire` forgets it in time.
            state.insert(pid, ProcessSnapshot::default());
        }
    }

    /// The files `read` maps: those the table holds, else opened now (without the lock);
    /// `None` for unusable ones.
    fn open_files(
        &self,
        pid: u32,
        read: &[ReadMapping],
    ) -> HashMap<FileId, Option<Arc<MappedFile>>> {
        let mut files = HashMap::new();
        let mut missing = Vec::new();
        {
            let state = self.lock();
            for read in read {
                let Target::File(id) = read.mapping.target else {
                    continue;
                };
                if files.contains_key(&id) {
                    continue;
                }
                match state.files.get(&id) {
                    Some(file) => {
                        files.insert(id, Some(Arc::clone(file)));
                    }
                    None if state.unusable.contains(&id) => {
                        files.insert(id, None);
                    }
                    None => {
                        files.insert(id, None);
                        missing.push(read);
                    }
                }
            }
        }
        for read in missing {
            let (Target::File(id), Some((path, deleted))) = (read.mapping.target, &read.path)
            else {
                continue;
            };
            let range = (read.mapping.range.start, read.mapping.range.end);
            let name = &*read.mapping.module;
            match MappedFile::open(pid, range, path, *deleted, name) {
                Ok(file) => {
                    files.insert(id, Some(Arc::new(file)));
                }
                Err(error) => {
                    warn!(binary = name, %error, "cannot open binary; its frames stay unknown");
                }
            }
        }
        files
    }
}

impl TableState {
    /// Inserts `snapshot` of `pid` with a new serial, replacing any earlier one.
    fn insert(&mut self, pid: u32, mut snapshot: ProcessSnapshot) {
        self.next_serial += 1;
        snapshot.serial = self.next_serial;
        if self.processes.insert(pid, snapshot).is_some() {
            self.unswept = true;
        }
    }

    /// Stops holding the files no snapshot maps; returns them, to be closed without the lock.
    fn sweep_files(&mut self) -> Vec<Arc<MappedFile>> {
        let used: HashSet<FileId> = self
            .processes
            .values()
            .flat_map(ProcessSnapshot::files)
            .collect();
        self.unusable.retain(|file| used.contains(file));
        self.unswept = false;
        self.files
            .extract_if(|file, _| !used.contains(file))
            .map(|(_, mapped)| mapped)
            .collect()
    }
}

/// What a liveness check found out about a process not reported exited.
#[derive(Clone, Copy, Debug)]
enum Checked {
    Exited,
    /// A forked child runs, started at this time.
    Runs(u64),
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);
    /// PIDs above pid_max (at most 2^22) never exist.
    const NEVER: u32 = 1 << 23;

    #[test]
    fn capture_if_unknown_reads_a_known_process_once() {
        let pid = std::process::id();
        let table = ProcessTable::new(GRACE);
        table.capture_if_unknown(pid);
        table.capture_if_unknown(pid);
        assert_eq!(table.stats().captures, 1);
        // A capture replaces the snapshot, and finds every file already open.
        let open_files = table.stats().open_files;
        assert!(open_files > 0);
        table.capture(pid);
        assert_eq!(table.stats().captures, 2);
        assert_eq!(table.stats().open_files, open_files);
        // Its snapshot is of this very process: a refresh re-reads it.
        assert!(table.refresh(pid));
        assert_eq!(table.stats().captures, 3);
    }

    #[test]
    fn gone_process_is_remembered_empty_and_never_refreshed() {
        let table = ProcessTable::new(GRACE);
        table.capture(NEVER);
        assert!(table.knows(NEVER));
        assert_eq!(table.name(NEVER), None);
        assert!(!table.refresh(NEVER));
        let located = table.locate(NEVER, &[0x1000]).expect("remembered");
        assert!(!located.mapped);
        assert!(located.found.iter().all(Option::is_none));
        assert_eq!(table.stats().failed_captures, 1);
        assert!(table.locate(NEVER + 1, &[0x1000]).is_none());
    }

    #[test]
    fn exit_events_start_the_grace_period_and_the_earliest_wins() {
        let table = ProcessTable::new(GRACE);
        table.capture(NEVER);
        let exited = Instant::now();
        table.exited(NEVER, exited + GRACE);
        table.exited(NEVER, exited);
        // Unknown PIDs are ignored.
        table.exited(NEVER + 1, exited);
        assert_eq!(table.stats().exited, 1);
        assert_eq!(table.retire(exited + GRACE / 2), 0);
        assert_eq!(table.retire(exited + GRACE), 1);
        assert_eq!(
            table.stats(),
            ProcessTableStats {
                failed_captures: 1,
                ..ProcessTableStats::default()
            }
        );
    }

    #[test]
    fn exec_replacing_a_snapshot_closes_the_files_only_it_mapped() {
        let pid = std::process::id();
        let table = ProcessTable::new(GRACE);
        table.capture(pid);
        let open_files = table.stats().open_files;
        // As if the process had exec'd a binary mapping nothing: an empty snapshot replaces it.
        table.lock().insert(pid, ProcessSnapshot::default());
        assert_eq!(table.stats().open_files, open_files, "closed by retire");
        assert_eq!(table.retire(Instant::now()), 0);
        assert_eq!(table.stats().open_files, 0);
    }
}
