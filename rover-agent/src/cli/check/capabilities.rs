//! The capabilities the agent uses, each checked by name with what it is for and how to grant
//! it: the same list as the DaemonSet's `capabilities.add` (deploy/kubernetes).

use crate::bpf::HostCheck;

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// One capability the agent uses.
struct Needed {
    /// The check's name: `CAP_` and the name `capabilities.add` takes.
    check: &'static str,
    name: &'static str,
    bit: u32,
    /// What the agent does with it.
    reason: &'static str,
    /// CAP_SYS_ADMIN grants it too (the kernel accepts either for BPF and perf events).
    covered_by_sys_admin: bool,
}

const NEEDED: [Needed; 4] = [
    Needed {
        check: "CAP_BPF",
        name: "BPF",
        bit: CAP_BPF,
        reason: "load the eBPF programs and create their maps",
        covered_by_sys_admin: true,
    },
    Needed {
        check: "CAP_PERFMON",
        name: "PERFMON",
        bit: CAP_PERFMON,
        reason: "open perf events on every CPU and attach BPF tracing programs",
        covered_by_sys_admin: true,
    },
    Needed {
        check: "CAP_SYS_PTRACE",
        name: "SYS_PTRACE",
        bit: CAP_SYS_PTRACE,
        reason: "read other users' processes (memory maps, binaries through /proc/PID/root and \
                 /proc/PID/exe, command lines in their memory) to symbolize and name them",
        covered_by_sys_admin: false,
    },
    Needed {
        check: "CAP_SYSLOG",
        name: "SYSLOG",
        bit: CAP_SYSLOG,
        reason: "read kernel addresses in /proc/kallsyms to name kernel frames",
        covered_by_sys_admin: false,
    },
];

/// One check per capability the agent uses, from the effective capability mask (`CapEff`).
pub(super) fn check_capabilities(effective_mask: u64) -> Vec<HostCheck> {
    let has = |bit: u32| effective_mask & (1 << bit) != 0;
    NEEDED
        .iter()
        .map(|needed| {
            let result = if has(needed.bit) {
                Ok(format!("held: {}", needed.reason))
            } else if needed.covered_by_sys_admin && has(CAP_SYS_ADMIN) {
                Ok(format!("CAP_SYS_ADMIN covers it: {}", needed.reason))
            } else {
                Err(format!(
                    "missing: needed to {}; run as root or grant {} (DaemonSet: \
                     securityContext.capabilities.add: [{}])",
                    needed.reason, needed.check, needed.name
                ))
            };
            HostCheck {
                name: needed.check,
                result,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts(mask: u64) -> Vec<(&'static str, bool)> {
        check_capabilities(mask)
            .into_iter()
            .map(|check| (check.name, check.result.is_ok()))
            .collect()
    }

    #[test]
    fn the_daemon_sets_four_capabilities_pass() {
        let mask = (1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_SYS_PTRACE) | (1 << CAP_SYSLOG);
        assert!(
            verdicts(mask).iter().all(|(_, ok)| *ok),
            "{:?}",
            verdicts(mask)
        );
        assert!(verdicts(u64::MAX >> 23).iter().all(|(_, ok)| *ok));
    }

    #[test]
    fn each_missing_capability_is_named_with_its_reason_and_fix() {
        let checks = check_capabilities((1 << CAP_BPF) | (1 << CAP_PERFMON));
        let ptrace = checks
            .iter()
            .find(|check| check.name == "CAP_SYS_PTRACE")
            .expect("a SYS_PTRACE check");
        let message = ptrace.result.clone().expect_err("missing");
        assert!(message.contains("other users' processes"), "{message}");
        assert!(
            message.contains("capabilities.add: [SYS_PTRACE]"),
            "{message}"
        );
        assert_eq!(
            verdicts(0),
            [
                ("CAP_BPF", false),
                ("CAP_PERFMON", false),
                ("CAP_SYS_PTRACE", false),
                ("CAP_SYSLOG", false)
            ]
        );
    }

    #[test]
    fn sys_admin_covers_bpf_and_perf_events_only() {
        assert_eq!(
            verdicts(1 << CAP_SYS_ADMIN),
            [
                ("CAP_BPF", true),
                ("CAP_PERFMON", true),
                ("CAP_SYS_PTRACE", false),
                ("CAP_SYSLOG", false)
            ]
        );
    }
}
