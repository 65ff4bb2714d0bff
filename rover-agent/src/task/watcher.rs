//! The process watcher thread: snapshots memory maps as processes fork and exec, while they
//! live, and starts the grace period of those that exit. It never waits for symbolization.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bpf::ProcessEvent;
use crate::symbolize::ProcessTable;

/// An exec is reported once the new image is mapped, before the dynamic loader maps its
/// libraries (which takes about a millisecond): the process is snapshotted again this much
/// later, if it still runs.
const AFTER_LOADER: Duration = Duration::from_millis(5);

pub(super) fn run(events: mpsc::Receiver<ProcessEvent>, processes: ProcessTable) {
    let mut recaptures: VecDeque<(Instant, u32)> = VecDeque::new();
    loop {
        let timeout = recaptures
            .front()
            .map_or(Duration::from_secs(3600), |(at, _)| {
                at.saturating_duration_since(Instant::now())
            });
        match events.recv_timeout(timeout) {
            Ok(ProcessEvent::Forked { parent, child }) => processes.forked(parent, child),
            Ok(ProcessEvent::Exec { pid }) => {
                processes.capture(pid);
                recaptures.push_back((Instant::now() + AFTER_LOADER, pid));
            }
            Ok(ProcessEvent::Exited { pid }) => processes.exited(pid, Instant::now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        let now = Instant::now();
        while let Some(&(at, pid)) = recaptures.front()
            && at <= now
        {
            recaptures.pop_front();
            // Gone by now: the snapshot taken at exec stays.
            if processes.knows(pid) {
                processes.capture(pid);
            }
        }
    }
}
