//! What the agent knows about processes on this host, from procfs, and of the pods scheduled on
//! this node, from the Kubernetes API server.

pub mod cgroup;
pub mod entity;
pub mod host_ip;
pub mod host_rules;
pub mod kubernetes;
pub(crate) mod proc_files;
mod rule_template;

pub use cgroup::{CgroupIdentity, CgroupReader, ContainerId, PodUid};
pub use entity::{EntityIdentity, EntityNames, PodPlacement, ProcessEntity, ProcessOrigin};
pub use host_rules::{HostFacts, HostRuleScanner, ScanChanges};
pub use proc_files::{ListedProcess, ProcessList};
pub use rule_template::{ProcessValues, RoverValues};

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
    fn this_process_is_alive_and_a_missing_pid_is_not() {
        assert!(is_alive(std::process::id()));
        // pid_max is at most 2^22: this pid cannot exist.
        assert!(!is_alive(u32::MAX / 2));
    }
}
