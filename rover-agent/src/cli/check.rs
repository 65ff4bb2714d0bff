//! `rover-agent check`: can this host run the agent? One verdict per requirement, with the fix.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::bpf::{OffCpuConfig, OffCpuProbe, OnCpuConfig, OnCpuProbe, Targets, check_privilege};

/// Oldest kernel with everything the programs use (`bpf_task_pt_regs`, the `prev_state`
/// argument of the `sched_switch` BTF tracepoint (5.18), BTF-typed pointer loads).
const MIN_KERNEL: (u32, u32) = (6, 1);

struct Item {
    name: &'static str,
    result: Result<String, String>,
}

pub(super) fn run() -> anyhow::Result<ExitCode> {
    let items = [
        Item {
            name: "kernel version",
            result: kernel_version(),
        },
        Item {
            name: "BTF",
            result: btf(),
        },
        Item {
            name: "privileges",
            result: privileges(),
        },
        Item {
            name: "perf events",
            result: perf_events(),
        },
        Item {
            name: "tracepoints",
            result: tracepoints(),
        },
        Item {
            name: "on-CPU sampler",
            result: on_cpu_sampler(),
        },
    ];
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

fn privileges() -> Result<String, String> {
    let privilege =
        check_privilege().map_err(|error| format!("cannot read capabilities: {error}"))?;
    match privilege.missing() {
        None => Ok(if privilege.cap_sys_admin {
            "CAP_SYS_ADMIN".to_owned()
        } else {
            "CAP_BPF, CAP_PERFMON".to_owned()
        }),
        Some(missing) => Err(format!(
            "{missing}: run as root or grant CAP_BPF and CAP_PERFMON \
             (DaemonSet: securityContext.capabilities.add)"
        )),
    }
}

/// Opens (and closes) a system-wide cpu-clock event on CPU 0, as the sampler does.
fn perf_events() -> Result<String, String> {
    // The leading fields of `struct perf_event_attr`; `size` tells the kernel how much we pass.
    #[repr(C)]
    #[derive(Default)]
    struct PerfEventAttr {
        kind: u32,
        size: u32,
        config: u64,
        sample_period: u64,
        sample_type: u64,
        read_format: u64,
        flags: u64,
    }
    const PERF_TYPE_SOFTWARE: u32 = 1;
    const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
    const DISABLED: u64 = 1;
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: 64, // PERF_ATTR_SIZE_VER0
        config: PERF_COUNT_SW_CPU_CLOCK,
        flags: DISABLED,
        ..Default::default()
    };
    // The kernel reads PERF_ATTR_SIZE_VER0 bytes; pass a buffer at least that long.
    let mut buffer = [0u8; 64];
    // SAFETY: `PerfEventAttr` is 48 plain bytes copied into a larger zeroed buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&raw const attr).cast::<u8>(),
            buffer.as_mut_ptr(),
            size_of::<PerfEventAttr>(),
        );
    }
    // SAFETY: perf_event_open(attr, pid = -1 (all), cpu = 0, group = -1, flags = 0).
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, buffer.as_ptr(), -1, 0, -1, 0) };
    if fd < 0 {
        let error = std::io::Error::last_os_error();
        let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
            .map(|value| value.trim().to_owned())
            .unwrap_or_else(|_| "unreadable".to_owned());
        return Err(format!(
            "system-wide cpu-clock event refused ({error}; kernel.perf_event_paranoid = {paranoid}): \
             needs CAP_PERFMON and CONFIG_PERF_EVENTS"
        ));
    }
    // SAFETY: closing the descriptor just opened.
    unsafe { libc::close(fd as libc::c_int) };
    Ok("system-wide cpu-clock sampling available".to_owned())
}

/// Loads the off-CPU profiler and attaches it to the `sched_switch` BTF tracepoint (with no
/// targets), then detaches it.
fn tracepoints() -> Result<String, String> {
    let config = OffCpuConfig {
        targets: Targets::Pids(Vec::new()),
        exclude_preempt: false,
        min_block: Duration::ZERO,
        sample_probability: 1.0,
    };
    match OffCpuProbe::start(&config) {
        Ok(_probe) => {
            Ok("sched_switch (BTF tracepoint) attaches: off-CPU profiling works".to_owned())
        }
        Err(error) => Err(format!("{:#}", anyhow::Error::new(error))),
    }
}

/// Loads and attaches the real sampler (with no targets), then detaches it.
fn on_cpu_sampler() -> Result<String, String> {
    let config = OnCpuConfig {
        frequency_hz: 99,
        targets: Targets::Pids(Vec::new()),
        drain_interval: Duration::from_secs(1),
    };
    match OnCpuProbe::start(&config) {
        Ok(_probe) => Ok("loads and attaches on every CPU".to_owned()),
        Err(error) => Err(format!("{:#}", anyhow::Error::new(error))),
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
