//! The on-CPU sampler: `on_cpu_sample` on the cpu-clock software event of every online CPU.

use std::time::Duration;

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::PerfEvent;
use aya::programs::perf_event::PerfEventLinkId;
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::util::online_cpus;
use rover_common::{StackKey, counter};

use super::aggregates::Aggregates;
use super::loader::{Capacity, Loaded, load};
use super::target_filter::TargetFilter;
use super::{Counters, Error, RawStack, Targets, object};

const OBJECT: &str = "oncpu";
const PROGRAM: &str = "on_cpu_sample";

/// How the sampler runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnCpuConfig {
    pub frequency_hz: u64,
    pub targets: Targets,
    /// How often the caller drains: the maps are sized to hold this long's samples.
    pub drain_interval: Duration,
}

impl OnCpuConfig {
    /// Entries of each generation's aggregate map. A drain interval holds at most
    /// `frequency × CPUs × interval` samples, each one aggregate and at most two stacks; four
    /// times that leaves room for a drain that runs late. The maps are preallocated (allocating
    /// in the sampling context can fail), so they are not made larger than needed.
    fn aggregate_capacity(&self, cpus: usize) -> u32 {
        let samples = self.frequency_hz as f64 * cpus as f64 * self.drain_interval.as_secs_f64();
        (4.0 * samples).clamp(1024.0, 1_048_576.0) as u32
    }
}

/// A loaded, attached on-CPU sampler. Dropping it detaches the programs (aya's links are RAII).
pub struct OnCpuProbe {
    aggregates: Aggregates<u64>,
    targets: TargetFilter,
    counters: PerCpuArray<MapData, u64>,
    /// One per CPU; empty once sampling stopped.
    links: Vec<PerfEventLinkId>,
    /// Owns the program (and the links until they are detached).
    ebpf: Ebpf,
}

impl OnCpuProbe {
    pub fn start(config: &OnCpuConfig) -> Result<Self, Error> {
        let cpus = online_cpus().map_err(|(path, source)| Error::OnlineCpus { path, source })?;
        let aggregates = config.aggregate_capacity(cpus.len());
        let capacity = Capacity {
            aggregates,
            stacks: aggregates.saturating_mul(2),
        };
        let Loaded {
            mut ebpf,
            aggregates,
            targets,
            counters,
        } = load(OBJECT, object::oncpu()?, &config.targets, capacity, |_| {})?;
        let links = attach(&mut ebpf, config.frequency_hz, &cpus)?;
        Ok(Self {
            aggregates,
            targets,
            counters,
            links,
            ebpf,
        })
    }

    /// Detaches from every CPU: no sample is recorded after this returns, so a following
    /// [`drain`](Self::drain) collects everything and the counters are final.
    pub fn stop(&mut self) -> Result<(), Error> {
        let program = program(&mut self.ebpf)?;
        for link in self.links.drain(..) {
            program.detach(link).map_err(|source| Error::Program {
                program: PROGRAM,
                source,
            })?;
        }
        Ok(())
    }

    /// Starts sampling one more process.
    pub fn add_target(&mut self, pid: u32) -> Result<(), Error> {
        self.targets.add(pid)
    }

    /// Samples recorded since the previous drain (`value` = number of samples).
    pub fn drain(&mut self) -> Result<Vec<RawStack<u64>>, Error> {
        self.aggregates.drain()
    }

    /// Totals since the sampler started.
    pub fn counters(&self) -> Result<Counters, Error> {
        Counters::read(&self.counters)
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut PerfEvent, Error> {
    super::loader::program(ebpf, OBJECT, PROGRAM)
}

fn attach(ebpf: &mut Ebpf, frequency_hz: u64, cpus: &[u32]) -> Result<Vec<PerfEventLinkId>, Error> {
    let program = program(ebpf)?;
    program.load().map_err(|source| Error::Program {
        program: PROGRAM,
        source,
    })?;
    cpus.iter()
        .map(|&cpu| {
            program
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(frequency_hz),
                    false,
                )
                .map_err(|source| Error::AttachPerfEvent {
                    program: PROGRAM,
                    cpu,
                    source,
                })
        })
        .collect()
}

// The key layout user space decodes must be the one the program writes.
const _: () = assert!(size_of::<StackKey>() == 24 && counter::SLOTS >= 8);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(frequency_hz: u64, drain_interval: Duration) -> OnCpuConfig {
        OnCpuConfig {
            frequency_hz,
            targets: Targets::All,
            drain_interval,
        }
    }

    #[test]
    fn maps_hold_four_drain_intervals_of_samples() {
        let big = config(999, Duration::from_secs(2));
        assert_eq!(big.aggregate_capacity(64), 4 * 999 * 64 * 2);
    }

    #[test]
    fn map_capacity_has_a_floor_and_a_ceiling() {
        assert_eq!(
            config(99, Duration::from_secs(1)).aggregate_capacity(2),
            1024
        );
        assert_eq!(
            config(10_000, Duration::from_secs(10)).aggregate_capacity(512),
            1_048_576
        );
    }
}
