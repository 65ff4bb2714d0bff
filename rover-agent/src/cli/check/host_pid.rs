//! Whether the agent sees the host's processes: it must live in the host's (the initial) PID
//! namespace, as a DaemonSet pod does with `hostPID: true`, and its `/proc` must be that
//! namespace's. In a pod's own PID namespace it would see, and profile, only its container.

use std::path::Path;

/// The inode of the initial PID namespace, the same on every kernel (`PROC_PID_INIT_INO`,
/// include/linux/proc_ns.h): a process whose `/proc/self/ns/pid` has it shares the host's.
const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// `[ok]` with the namespace, or the problem and the fix.
pub(super) fn check_host_pid(proc_root: &Path, own_pid: u32) -> Result<String, String> {
    let link = proc_root.join("self/ns/pid");
    let target = std::fs::read_link(&link)
        .map_err(|error| format!("cannot read {}: {error}", link.display()))?;
    let namespace = parse_namespace_inode(&target.to_string_lossy()).ok_or_else(|| {
        format!(
            "{} is `{}`, not pid:[INODE]",
            link.display(),
            target.display()
        )
    })?;
    let proc_self = std::fs::read_link(proc_root.join("self"))
        .ok()
        .and_then(|pid| pid.to_string_lossy().parse::<u32>().ok());
    verdict(namespace, proc_self, own_pid)
}

fn verdict(namespace: u64, proc_self: Option<u32>, own_pid: u32) -> Result<String, String> {
    if namespace != INITIAL_PID_NAMESPACE {
        return Err(format!(
            "this process is in PID namespace {namespace}, not the host's ({INITIAL_PID_NAMESPACE}): \
             it sees only its container's processes; run it in the host's PID namespace \
             (DaemonSet: hostPID: true)"
        ));
    }
    if proc_self != Some(own_pid) {
        return Err(format!(
            "/proc is not this PID namespace's (/proc/self is {proc_self:?}, this process is \
             {own_pid}): mount a procfs of the host's PID namespace on /proc"
        ));
    }
    Ok(format!(
        "the host's PID namespace ({INITIAL_PID_NAMESPACE}): every process on this host is visible"
    ))
}

/// The inode of a namespace link's target, `pid:[4026531836]`.
fn parse_namespace_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("pid:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_links_parse() {
        assert_eq!(parse_namespace_inode("pid:[4026531836]"), Some(4026531836));
        assert_eq!(parse_namespace_inode("pid:[x]"), None);
        assert_eq!(parse_namespace_inode("net:[4026531840]"), None);
        assert_eq!(parse_namespace_inode("pid:[4026531836"), None);
    }

    #[test]
    fn only_the_initial_namespace_with_its_own_proc_passes() {
        assert!(verdict(INITIAL_PID_NAMESPACE, Some(42), 42).is_ok());
        let pod = verdict(4026532300, Some(1), 1).expect_err("a pod's namespace");
        assert!(pod.contains("hostPID: true"), "{pod}");
        let stale_proc = verdict(INITIAL_PID_NAMESPACE, Some(7), 42).expect_err("another /proc");
        assert!(stale_proc.contains("/proc is not"), "{stale_proc}");
        assert!(verdict(INITIAL_PID_NAMESPACE, None, 42).is_err());
    }

    #[test]
    fn this_process_is_checked_through_proc() {
        // The test may itself run in a container's namespace: only the namespace may differ.
        match check_host_pid(Path::new("/proc"), std::process::id()) {
            Ok(_) => {}
            Err(problem) => assert!(problem.contains("hostPID"), "{problem}"),
        }
    }
}
