//! Raw kernel stacks → profile samples: symbolized, folded root first, with the markers that say
//! what the addresses alone do not (a cut stack, a lost stack, a preemption).

use std::time::SystemTime;

use crate::bpf::{OffCpu, ProfilerKind, RawFrames, RawStack, StackValue};
use crate::profile::{Frame, FrameKind, ProcessLabel, Profile, ValueType};
use crate::symbolize::{ProcessTable, Symbolizer};

/// The frame marking where a stack was cut: at the root end of the user stack (deeper than the
/// agent records, or ending at an address outside every mapping, where a frame-pointer walk
/// left the stack), or before the kernel frames when the kernel stack was too deep.
const TRUNCATED: &str = "[truncated]";

/// How one task's stacks become profile values.
#[derive(Clone, Copy, Debug)]
pub(super) enum Values {
    /// `samples/count` and `cpu/nanoseconds`, one sample being `period_ns` of CPU.
    OnCpu { period_ns: u64 },
    /// `switches/count` and `off_cpu/nanoseconds`, each switch-out recorded with probability
    /// `p` (1: exactly).
    OffCpu { p: f64 },
}

impl Values {
    pub fn new(kind: ProfilerKind, frequency_hz: u64, sample_probability: f64) -> Self {
        match kind {
            ProfilerKind::OnCpu => Self::OnCpu {
                period_ns: 1_000_000_000 / frequency_hz.max(1),
            },
            ProfilerKind::OffCpu => Self::OffCpu {
                p: sample_probability,
            },
        }
    }

    /// An empty profile with this task's value types, period, scale and notes.
    pub fn profile(self, start: SystemTime) -> Profile {
        match self {
            Self::OnCpu { period_ns } => {
                let mut profile = Profile::new(
                    vec![
                        ValueType::new("samples", "count"),
                        ValueType::new("cpu", "nanoseconds"),
                    ],
                    start,
                );
                profile.period = Some((ValueType::new("cpu", "nanoseconds"), period_ns));
                profile
            }
            Self::OffCpu { p } => {
                let mut profile = Profile::new(
                    vec![
                        ValueType::new("switches", "count"),
                        ValueType::new("off_cpu", "nanoseconds"),
                    ],
                    start,
                );
                if p < 1.0 {
                    profile.set_scale(0, 1.0 / p);
                    profile.set_scale(1, 1.0 / p);
                    profile.notes.push(format!(
                        "sampled: each switch-out kept with probability {p}, totals scaled by 1/p"
                    ));
                }
                profile
            }
        }
    }

    /// The recorded values of a stack, in the profile's order (scaled at export).
    fn of(self, value: StackValue) -> [u64; 2] {
        match (self, value) {
            (Self::OnCpu { period_ns }, StackValue::Samples(samples)) => {
                [samples, samples.saturating_mul(period_ns)]
            }
            (Self::OffCpu { p }, StackValue::OffCpu(off_cpu)) => off_cpu_values(off_cpu, p),
            // A recording only receives stacks of its own profiler.
            (Self::OnCpu { .. }, StackValue::OffCpu(_))
            | (Self::OffCpu { .. }, StackValue::Samples(_)) => [0, 0],
        }
    }
}

/// The capture time of kept episodes is off-CPU time only they had: it belongs in the estimate
/// unscaled, so it is recorded as `capture_ns × p`, which the export's 1/p scale restores.
fn off_cpu_values(value: OffCpu, p: f64) -> [u64; 2] {
    let capture = if p >= 1.0 {
        value.capture_ns
    } else {
        (value.capture_ns as f64 * p).round() as u64
    };
    [value.switches, value.off_cpu_ns.saturating_add(capture)]
}

/// Adds `raw` to `profile`: process, user frames root first, then kernel frames root first.
/// Returns whether the user stack was cut at an unmapped address.
pub(super) fn fold(
    symbolizer: &mut Symbolizer,
    processes: &ProcessTable,
    profile: &mut Profile,
    values: Values,
    raw: &RawStack,
) -> bool {
    // The first stack of a process no event announced (an exec the agent had not seen yet, a
    // kernel thread) snapshots it before its name is looked up, not after the user frames.
    if !processes.knows(raw.tgid) {
        processes.capture_if_unknown(raw.tgid);
    }
    let label = ProcessLabel {
        pid: raw.tgid,
        name: processes
            .name(raw.tgid)
            .unwrap_or_else(|| format!("pid-{}", raw.tgid)),
    };
    let mut frames = Vec::new();
    let mut cut = false;
    match &raw.user {
        RawFrames::Captured(addresses) => {
            let user = symbolizer.user_frames(raw.tgid, addresses);
            cut = user.cut;
            if cut || raw.user_truncated {
                frames.push(synthetic(FrameKind::User, TRUNCATED));
            }
            frames.extend(user.frames.into_iter().rev());
        }
        RawFrames::Lost => frames.push(lost(FrameKind::User)),
        RawFrames::Absent => {}
    }
    match &raw.kernel {
        RawFrames::Captured(addresses) => {
            if raw.kernel_truncated {
                frames.push(synthetic(FrameKind::Kernel, TRUNCATED));
            }
            frames.extend(symbolizer.kernel_frames(addresses).into_iter().rev());
        }
        RawFrames::Lost => frames.push(lost(FrameKind::Kernel)),
        RawFrames::Absent => {}
    }
    if raw.preempted {
        // Not kernel code: no kernel marking.
        frames.push(synthetic(FrameKind::User, "[preempted]"));
    }
    profile.add(&label, &frames, &values.of(raw.value));
    cut
}

/// Stands for a stack the kernel could not store, so its samples still count where they belong.
fn lost(kind: FrameKind) -> Frame {
    let name = match kind {
        FrameKind::User => "[lost user stack]",
        FrameKind::Kernel => "[lost kernel stack]",
    };
    synthetic(kind, name)
}

/// A frame the agent adds to say something about the stack (not code at an address).
fn synthetic(kind: FrameKind, name: &str) -> Frame {
    Frame {
        kind,
        function: Some(name.to_owned()),
        module: None,
        address: 0,
        file: None,
        line: None,
        inlined: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampled_capture_time_survives_the_scale_unscaled() {
        let p = 0.1;
        let value = OffCpu {
            switches: 10,
            off_cpu_ns: 10_000,
            capture_ns: 500,
        };
        let recorded = off_cpu_values(value, p);
        assert_eq!(recorded, [10, 10_050]);
        let profile = Values::OffCpu { p }.profile(SystemTime::now());
        assert_eq!(profile.estimate(0, recorded[0], 1), 100);
        assert_eq!(profile.estimate(1, recorded[1], 1), 100_500);
    }

    #[test]
    fn the_first_stack_of_an_unannounced_process_carries_its_name() {
        let processes = ProcessTable::new(std::time::Duration::from_secs(10));
        let mut symbolizer = Symbolizer::new(
            crate::symbolize::SymbolizerConfig {
                debug_info: false,
                symbol_cache_bytes: 1 << 20,
            },
            processes.clone(),
        );
        let values = Values::OnCpu { period_ns: 1 };
        let mut profile = values.profile(SystemTime::now());
        let pid = std::process::id();
        let here = Values::profile as *const () as u64;
        let raw = RawStack {
            tgid: pid,
            preempted: false,
            user_truncated: false,
            kernel_truncated: false,
            user: RawFrames::Captured(vec![here]),
            kernel: RawFrames::Absent,
            value: StackValue::Samples(1),
        };
        fold(&mut symbolizer, &processes, &mut profile, values, &raw);
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("own comm");
        let label = &profile.samples()[0].process;
        assert_eq!(label.name, comm.trim_end());
    }

    #[test]
    fn exact_totals_add_the_capture_time() {
        let value = OffCpu {
            switches: 3,
            off_cpu_ns: 3000,
            capture_ns: 30,
        };
        assert_eq!(off_cpu_values(value, 1.0), [3, 3030]);
    }
}
