//! What the agent knows about processes on this host, from procfs.

use crate::profile::ProcessLabel;

/// Name and pid of a live process; a process already gone is named `pid-N`.
pub fn label(pid: u32) -> ProcessLabel {
    let name = procfs_process(pid)
        .and_then(|process| process.stat().ok())
        .map_or_else(|| format!("pid-{pid}"), |stat| stat.comm);
    ProcessLabel { pid, name }
}

/// Whether `pid` is a running process (not gone, not a zombie waiting to be reaped).
pub fn is_alive(pid: u32) -> bool {
    procfs_process(pid)
        .and_then(|process| process.stat().ok())
        .is_some_and(|stat| !matches!(stat.state, 'Z' | 'X'))
}

fn procfs_process(pid: u32) -> Option<procfs::process::Process> {
    let pid = i32::try_from(pid).ok()?;
    procfs::process::Process::new(pid).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_this_process_by_its_comm() {
        let me = label(std::process::id());
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap_or_default();
        assert_eq!(me.name, comm.trim_end());
        assert!(is_alive(std::process::id()));
    }

    #[test]
    fn a_missing_pid_is_named_by_its_number() {
        // pid_max is at most 2^22: this pid cannot exist.
        let gone = label(u32::MAX / 2);
        assert_eq!(gone.name, format!("pid-{}", u32::MAX / 2));
        assert!(!is_alive(u32::MAX / 2));
    }
}
