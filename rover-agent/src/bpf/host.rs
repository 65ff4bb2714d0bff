//! Whether this host can run the programs, item by item, by loading and attaching them for
//! real (with no target) and unloading them again: what `rover-agent check` reports.

use aya::util::online_cpus;

use super::events::ProcessEvents;
use super::loader::{Globals, loader};
use super::profiler::{Profiler, ProfilerSettings};
use super::{Error, ProfilerKind};

/// One verdict: what works (`Ok`), or the problem and its fix.
pub struct HostCheck {
    pub name: &'static str,
    pub result: Result<String, String>,
}

/// Checks what the profilers need, with the settings the agent would run with.
pub fn check_host(settings: &ProfilerSettings) -> Vec<HostCheck> {
    let cpus = online_cpus().map_or(1, |cpus| cpus.len() as u32);
    let globals = Globals::new(settings);
    let mut loader = loader(&globals);
    vec![
        HostCheck {
            name: "on-CPU sampler",
            result: Profiler::load(ProfilerKind::OnCpu, settings, &mut loader)
                .map(|_| {
                    format!(
                        "perf_event program on the cpu-clock event of {cpus} CPUs at {} Hz: \
                         loads and attaches",
                        settings.frequency_hz
                    )
                })
                .map_err(describe),
        },
        HostCheck {
            name: "off-CPU tracer",
            result: Profiler::load(ProfilerKind::OffCpu, settings, &mut loader)
                .map(|_| "sched_switch (BTF tracepoint): loads and attaches".to_owned())
                .map_err(describe),
        },
        HostCheck {
            name: "process events",
            result: ProcessEvents::load(
                &mut loader,
                settings.max_targets,
                &globals.task_tgid_offset,
            )
            .map_or_else(
                |error| Err(describe(error)),
                |events| {
                    Ok(if events.fork_events() {
                        "fork, exec and exit (raw tracepoints): attach".to_owned()
                    } else {
                        "exec and exit attach; forks are not reported (kernel BTF lacks \
                         task_struct::tgid)"
                            .to_owned()
                    })
                },
            ),
        },
        HostCheck {
            name: "kernel memory",
            result: Ok(memory(settings, cpus)),
        },
    ]
}

/// Whether the programs load on this host, tried with the on-CPU sampler: it loads and attaches
/// to every CPU's cpu-clock event, then is dropped (the node agent's readiness). The off-CPU
/// tracer is left out: loading it parses the kernel's BTF (~20 MB of heap for a moment), which
/// `rover-agent check` does.
pub fn check_programs_load(settings: &ProfilerSettings) -> Result<(), String> {
    let globals = Globals::new(settings);
    let mut loader = loader(&globals);
    Profiler::load(ProfilerKind::OnCpu, settings, &mut loader)
        .map(drop)
        .map_err(describe)
}

/// What each profiler's maps take with these settings, against the budget.
fn memory(settings: &ProfilerSettings, cpus: u32) -> String {
    let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
    let describe = |kind: ProfilerKind| {
        let capacity = settings.capacity(kind, cpus);
        format!(
            "{} {:.1} MiB ({} aggregates per drain{})",
            kind.name(),
            mib(capacity.bytes),
            capacity.aggregates,
            if capacity.limited_by_budget {
                ", limited by the budget"
            } else {
                ""
            }
        )
    };
    format!(
        "maps of each loaded profiler: {}, {}; budget {:.0} MiB each (drain every {:?})",
        describe(ProfilerKind::OnCpu),
        describe(ProfilerKind::OffCpu),
        mib(settings.map_memory_bytes),
        settings.drain_interval,
    )
}

fn describe(error: Error) -> String {
    let perf_hint = matches!(error, Error::AttachPerfEvent { .. }).then(|| {
        let paranoid = std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
            .map_or_else(|_| "unreadable".to_owned(), |value| value.trim().to_owned());
        format!(
            " (kernel.perf_event_paranoid = {paranoid}; system-wide sampling needs \
             CAP_PERFMON and CONFIG_PERF_EVENTS)"
        )
    });
    format!(
        "{:#}{}",
        anyhow::Error::new(error),
        perf_hint.unwrap_or_default()
    )
}
