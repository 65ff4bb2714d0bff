//! The on-CPU sampler: `on_cpu_sample` on the cpu-clock software event of every online CPU.

use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::PerfEvent;
use aya::programs::perf_event::PerfEventLinkId;
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::util::online_cpus;
use aya::{Ebpf, EbpfLoader};
use rover_common::{StackKey, counter};

use super::aggregates::Aggregates;
use super::{Counters, Error, RawStack, Targets, check_privilege, object};

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
    targets: HashMap<MapData, u32, u8>,
    counters: PerCpuArray<MapData, u64>,
    /// One per CPU; empty once sampling stopped.
    links: Vec<PerfEventLinkId>,
    /// Owns the program (and the links until they are detached).
    ebpf: Ebpf,
}

impl OnCpuProbe {
    pub fn start(config: &OnCpuConfig) -> Result<Self, Error> {
        require_privilege()?;
        let all: u8 = matches!(config.targets, Targets::All).into();
        let cpus = online_cpus().map_err(|(path, source)| Error::OnlineCpus { path, source })?;
        let aggregates = config.aggregate_capacity(cpus.len());
        let stacks = aggregates.saturating_mul(2);
        let mut ebpf = EbpfLoader::new()
            .override_global("TARGET_ALL", &all, true)
            .map_max_entries("COUNTS_0", aggregates)
            .map_max_entries("COUNTS_1", aggregates)
            .map_max_entries("STACKS_0", stacks)
            .map_max_entries("STACKS_1", stacks)
            .load(object::oncpu()?)
            .map_err(|source| Error::Load {
                object: OBJECT,
                source,
            })?;
        let aggregates = Aggregates::take(&mut ebpf, OBJECT)?;
        let mut targets = open_map(&mut ebpf, "TARGETS", HashMap::try_from)?;
        let counters = open_map(&mut ebpf, "COUNTERS", PerCpuArray::try_from)?;
        if let Targets::Pids(pids) = &config.targets {
            for &pid in pids {
                add_target(&mut targets, pid)?;
            }
        }
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
    pub fn stop_sampling(&mut self) -> Result<(), Error> {
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
        add_target(&mut self.targets, pid)
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

fn require_privilege() -> Result<(), Error> {
    match check_privilege() {
        Ok(privilege) => match privilege.missing() {
            Some(missing) => Err(Error::MissingPrivilege { missing }),
            None => Ok(()),
        },
        // Without /proc/self/status, let the kernel decide.
        Err(_) => Ok(()),
    }
}

fn open_map<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    open: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Missing {
        object: OBJECT,
        kind: "map",
        name,
    })?;
    open(map).map_err(|source| Error::Map {
        map: name,
        operation: "open",
        source,
    })
}

fn add_target(targets: &mut HashMap<MapData, u32, u8>, pid: u32) -> Result<(), Error> {
    targets.insert(pid, 1, 0).map_err(|source| Error::Map {
        map: "TARGETS",
        operation: "update",
        source,
    })
}

fn program(ebpf: &mut Ebpf) -> Result<&mut PerfEvent, Error> {
    ebpf.program_mut(PROGRAM)
        .ok_or(Error::Missing {
            object: OBJECT,
            kind: "program",
            name: PROGRAM,
        })?
        .try_into()
        .map_err(|source| Error::Program {
            program: PROGRAM,
            source,
        })
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
