//! `rover-agent check`: can this host run the agent? One verdict per requirement, with the fix.
//! It covers what the DaemonSet (deploy/kubernetes) grants: the host's PID namespace, each
//! capability, readable kernel symbols.

mod capabilities;
mod host_pid;

use std::path::Path;
use std::process::ExitCode;

use super::engine_args::EngineArgs;
use crate::bpf::{HostCheck, check_host, effective_capabilities};
use capabilities::check_capabilities;
use host_pid::check_host_pid;

/// Oldest kernel with everything the programs use (`bpf_task_pt_regs`, the `prev_state`
/// argument of the `sched_switch` BTF tracepoint (5.18), BTF-typed pointer loads).
const MIN_KERNEL: (u32, u32) = (6, 1);

pub(super) fn run(args: &EngineArgs) -> anyhow::Result<ExitCode> {
    let config = args.agent_config()?;
    let mut items = vec![
        HostCheck {
            name: "kernel version",
            result: kernel_version(),
        },
        HostCheck {
            name: "BTF",
            result: btf(),
        },
        HostCheck {
            name: "host PID ns",
            result: check_host_pid(Path::new("/proc"), std::process::id()),
        },
    ];
    match effective_capabilities() {
        Ok(mask) => items.extend(check_capabilities(mask)),
        Err(error) => items.push(HostCheck {
            name: "capabilities",
            result: Err(format!("cannot read them from /proc/self/status: {error}")),
        }),
    }
    items.push(HostCheck {
        name: "kernel symbols",
        result: kernel_symbols(),
    });
    items.extend(check_host(&config.profilers));
    let mut problems = 0;
    for item in &items {
        match &item.result {
            Ok(detail) => println!("[ok]   {:<15} {detail}", item.name),
            Err(problem) => {
                problems += 1;
                println!("[FAIL] {:<15} {problem}", item.name);
            }
        }
    }
    if problems == 0 {
        println!("verdict: this host can run rover-agent");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("verdict: this host cannot run rover-agent ({problems} problem(s) above)");
        Ok(ExitCode::FAILURE)
    }
}

fn kernel_version() -> Result<String, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|error| format!("cannot read /proc/sys/kernel/osrelease: {error}"))?;
    let release = release.trim();
    let version = parse_kernel_version(release)
        .ok_or_else(|| format!("cannot parse kernel release `{release}`"))?;
    if version >= MIN_KERNEL {
        Ok(format!("{release} (>= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1))
    } else {
        Err(format!(
            "{release} is older than {}.{}: the eBPF programs need a newer kernel",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))
    }
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn btf() -> Result<String, String> {
    let path = "/sys/kernel/btf/vmlinux";
    if Path::new(path).exists() {
        Ok(path.to_owned())
    } else {
        Err(format!(
            "{path} is missing: the kernel must be built with CONFIG_DEBUG_INFO_BTF=y"
        ))
    }
}

fn kernel_symbols() -> Result<String, String> {
    match crate::symbolize::kernel_symbol_count() {
        Ok(0) => Err("/proc/kallsyms lists no kernel functions: kernel frames stay unknown".into()),
        Ok(count) => Ok(format!("/proc/kallsyms: {count} functions with addresses")),
        Err(error) => Err(format!(
            "{error}: kernel frames stay unknown; grant CAP_SYSLOG (DaemonSet: \
             securityContext.capabilities.add: [SYSLOG])"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }
}
