//! The off-CPU profiler: `sched_switch` on the `sched_switch` BTF tracepoint.

use std::time::Duration;

use aya::maps::{MapData, PerCpuArray};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Btf, Ebpf};
use rover_common::OffCpuValue;

use super::aggregates::Aggregates;
use super::loader::{Capacity, Loaded, load};
use super::target_filter::TargetFilter;
use super::{Counters, Error, RawStack, Targets, object};

const OBJECT: &str = "offcpu";
const PROGRAM: &str = "sched_switch";

/// How the off-CPU profiler runs.
#[derive(Clone, Debug, PartialEq)]
pub struct OffCpuConfig {
    pub targets: Targets,
    /// Leave out involuntary switches (preemption of a runnable thread).
    pub exclude_preempt: bool,
    /// Leave out episodes shorter than this.
    pub min_block: Duration,
    /// Probability (0 < p ≤ 1) that a switch-out is recorded; totals are scaled by 1/p.
    pub sample_probability: f64,
}

/// Off-CPU totals of one stack, scaled to estimate every episode when sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpu {
    pub switches: u64,
    pub off_cpu_ns: u64,
}

/// A loaded, attached off-CPU profiler; dropping it detaches the program.
pub struct OffCpuProbe {
    aggregates: Aggregates<OffCpuValue>,
    targets: TargetFilter,
    counters: PerCpuArray<MapData, u64>,
    sample_probability: f64,
    link: Option<BtfTracePointLinkId>,
    ebpf: Ebpf,
}

impl OffCpuProbe {
    pub fn start(config: &OffCpuConfig) -> Result<Self, Error> {
        let p = config.sample_probability;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "sample probability {p} is not in (0, 1]"
            )));
        }
        let exclude_preempt: u8 = config.exclude_preempt.into();
        let min_block_ns = u64::try_from(config.min_block.as_nanos()).unwrap_or(u64::MAX);
        let sample_all: u8 = (p >= 1.0).into();
        // Kept when a uniform u32 is below p × 2^32.
        let threshold = (p * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32;
        // Episodes are unbounded in number: size for a host-wide profile or a few processes.
        let capacity = match config.targets {
            Targets::All => Capacity {
                aggregates: 8192,
                stacks: 8192,
            },
            Targets::Pids(_) => Capacity {
                aggregates: 2048,
                stacks: 4096,
            },
        };
        let Loaded {
            mut ebpf,
            aggregates,
            targets,
            counters,
        } = load(
            OBJECT,
            object::offcpu()?,
            &config.targets,
            capacity,
            |loader| {
                loader
                    .override_global("EXCLUDE_PREEMPT", &exclude_preempt, true)
                    .override_global("MIN_BLOCK_NS", &min_block_ns, true)
                    .override_global("SAMPLE_ALL", &sample_all, true)
                    .override_global("SAMPLE_THRESHOLD", &threshold, true)
                    // THREADS is task-local storage, which aya creates but has no type for
                    // (the program alone uses it).
                    .allow_unsupported_maps();
            },
        )?;
        let link = attach(&mut ebpf)?;
        Ok(Self {
            aggregates,
            targets,
            counters,
            sample_probability: p,
            link: Some(link),
            ebpf,
        })
    }

    /// Starts profiling one more process.
    pub fn add_target(&mut self, pid: u32) -> Result<(), Error> {
        self.targets.add(pid)
    }

    /// Episodes closed since the previous drain, scaled by 1/p when sampling.
    pub fn drain(&mut self) -> Result<Vec<RawStack<OffCpu>>, Error> {
        let raw = self.aggregates.drain()?;
        let p = self.sample_probability;
        Ok(raw
            .into_iter()
            .map(|stack| RawStack {
                tgid: stack.tgid,
                preempted: stack.preempted,
                user: stack.user,
                kernel: stack.kernel,
                value: scale(stack.value, p),
            })
            .collect())
    }

    /// Detaches the program: nothing is recorded after this returns, so a following
    /// [`drain`](Self::drain) collects everything and the counters are final.
    pub fn stop(&mut self) -> Result<(), Error> {
        if let Some(link) = self.link.take() {
            program(&mut self.ebpf)?
                .detach(link)
                .map_err(|source| Error::Program {
                    program: PROGRAM,
                    source,
                })?;
        }
        Ok(())
    }

    /// Totals since the profiler started.
    pub fn counters(&self) -> Result<Counters, Error> {
        Counters::read(&self.counters)
    }
}

/// Estimates every episode from the kept ones: counts and post-capture time scale by 1/p, the
/// capture time (which only kept episodes spent) is added as measured.
fn scale(value: OffCpuValue, p: f64) -> OffCpu {
    if p >= 1.0 {
        return OffCpu {
            switches: value.switches,
            off_cpu_ns: value.off_cpu_ns + value.capture_ns,
        };
    }
    OffCpu {
        switches: (value.switches as f64 / p).round() as u64,
        off_cpu_ns: (value.off_cpu_ns as f64 / p).round() as u64 + value.capture_ns,
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut BtfTracePoint, Error> {
    super::loader::program(ebpf, OBJECT, PROGRAM)
}

fn attach(ebpf: &mut Ebpf) -> Result<BtfTracePointLinkId, Error> {
    // The program's BTF type is resolved against the kernel's: read it only now, and let it go.
    let btf = Btf::from_sys_fs().map_err(Error::KernelBtf)?;
    let program = program(ebpf)?;
    program
        .load("sched_switch", &btf)
        .map_err(|source| Error::Program {
            program: PROGRAM,
            source,
        })?;
    program.attach().map_err(|source| Error::AttachTracepoint {
        program: PROGRAM,
        tracepoint: "sched_switch (BTF)",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_totals_add_the_capture_time() {
        let value = OffCpuValue {
            switches: 3,
            off_cpu_ns: 3000,
            capture_ns: 30,
        };
        assert_eq!(
            scale(value, 1.0),
            OffCpu {
                switches: 3,
                off_cpu_ns: 3030
            }
        );
    }

    #[test]
    fn sampled_totals_scale_all_but_the_capture_time() {
        let value = OffCpuValue {
            switches: 10,
            off_cpu_ns: 10_000,
            capture_ns: 500,
        };
        assert_eq!(
            scale(value, 0.1),
            OffCpu {
                switches: 100,
                off_cpu_ns: 100_500
            }
        );
    }
}
