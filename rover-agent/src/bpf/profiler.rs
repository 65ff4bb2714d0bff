//! One loaded profiler: its object, maps, attached programs and targets. What every profiler
//! has (`rover_ebpf::profiler_maps!`) is handled once here; the kinds differ only in their
//! load-time globals, aggregate value and attach step.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
use aya::programs::{BtfTracePoint, PerfEvent, Program, RawTracePoint};
use aya::util::online_cpus;
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use rover_common::{OffCpuValue, StackKey};

use super::drain::{Drain, Drained, GENERATION_NAMES, KernelGeneration};
use super::log::KernelLogger;
use super::memory::{self, MapCapacity};
use super::targets::{TargetOptions, TargetTable};
use super::{Counters, Error, OffCpu, ProfilerKind, RawStack, StackValue, object};

/// What a profiler is loaded with: settings tasks cannot change once it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfilerSettings {
    /// On-CPU: samples per second on each CPU.
    pub frequency_hz: u64,
    /// Off-CPU: probability (0 < p ≤ 1) that a switch-out is recorded.
    pub off_cpu_sample_probability: f64,
    /// How often the aggregates are drained: the on-CPU maps hold this long's samples.
    pub drain_interval: Duration,
    /// Kernel memory for the maps of each loaded profiler.
    pub map_memory_bytes: u64,
    /// Processes each profiler can target at once.
    pub max_targets: u32,
}

impl ProfilerSettings {
    /// Refuses settings no profiler can run with, naming the setting.
    pub fn validate(&self) -> Result<(), Error> {
        let p = self.off_cpu_sample_probability;
        let problem = if self.frequency_hz == 0 || self.frequency_hz > 1_000_000_000 {
            format!(
                "sampling frequency {} Hz is not in 1 Hz..1 GHz",
                self.frequency_hz
            )
        } else if !(p > 0.0 && p <= 1.0) {
            format!("off-CPU sample probability {p} is not in (0, 1]")
        } else if self.drain_interval < Duration::from_millis(10)
            || self.drain_interval > Duration::from_secs(60)
        {
            format!(
                "drain interval {:?} is not between 10ms and 60s",
                self.drain_interval
            )
        } else if self.map_memory_bytes < memory::MIN_MAP_MEMORY_BYTES {
            format!(
                "map memory budget of {} bytes is below the {} bytes the smallest maps need",
                self.map_memory_bytes,
                memory::MIN_MAP_MEMORY_BYTES
            )
        } else if self.max_targets == 0 {
            "a maximum of 0 targets records nothing".to_owned()
        } else {
            return Ok(());
        };
        Err(Error::InvalidConfig(problem))
    }

    /// The map sizes a profiler of `kind` gets on a machine with `cpus` CPUs.
    pub fn capacity(&self, kind: ProfilerKind, cpus: u32) -> MapCapacity {
        let (wanted, value) = match kind {
            // Each sample is one aggregate and at most two stacks; four drain intervals' worth
            // leaves room for a drain that runs late.
            ProfilerKind::OnCpu => {
                let samples =
                    self.frequency_hz as f64 * f64::from(cpus) * self.drain_interval.as_secs_f64();
                (
                    (4.0 * samples).min(f64::from(u32::MAX)) as u32,
                    size_of::<u64>(),
                )
            }
            // Episodes are unbounded in number: room for a busy host's distinct waits.
            ProfilerKind::OffCpu => (4096, size_of::<OffCpuValue>()),
        };
        memory::capacity(wanted, value, self.map_memory_bytes, self.max_targets, cpus)
    }
}

enum Aggregates {
    OnCpu(Drain<u64, KernelGeneration<u64>>),
    OffCpu(Drain<OffCpuValue, KernelGeneration<OffCpuValue>>),
}

pub(super) struct Profiler {
    kind: ProfilerKind,
    control: Array<MapData, u64>,
    targets: TargetTable,
    aggregates: Aggregates,
    counters: PerCpuArray<MapData, u64>,
    logger: Option<KernelLogger>,
    capacity: MapCapacity,
    /// Owns the programs (and their links until [`detach`](Self::detach)).
    ebpf: Ebpf,
}

impl Profiler {
    /// Loads the profiler with `loader` (see `loader.rs`) and attaches its programs; it records
    /// nothing until given targets.
    pub fn load(
        kind: ProfilerKind,
        settings: &ProfilerSettings,
        loader: &mut EbpfLoader<'_>,
    ) -> Result<Self, Error> {
        super::privilege::require_privilege()?;
        let cpus = online_cpus().map_err(|(path, source)| Error::OnlineCpus { path, source })?;
        let capacity = settings.capacity(kind, cpus.len() as u32);
        let object = kind.object();
        let bytes = match kind {
            ProfilerKind::OnCpu => object::oncpu()?,
            ProfilerKind::OffCpu => object::offcpu()?,
        };
        loader.map_max_entries("TARGETS", settings.max_targets);
        for names in GENERATION_NAMES {
            loader
                .map_max_entries(names.counts, capacity.aggregates)
                .map_max_entries(names.user_stacks, capacity.user_stacks)
                .map_max_entries(names.kernel_stacks, capacity.kernel_stacks);
        }
        let mut ebpf = loader
            .load(bytes)
            .map_err(|source| Error::Load { object, source })?;
        let mut control = take(&mut ebpf, object, "CONTROL", Array::try_from)?;
        let aggregates = match kind {
            ProfilerKind::OnCpu => {
                Aggregates::OnCpu(Drain::new(&mut control, generations(&mut ebpf, object)?)?)
            }
            ProfilerKind::OffCpu => {
                Aggregates::OffCpu(Drain::new(&mut control, generations(&mut ebpf, object)?)?)
            }
        };
        let targets = TargetTable::new(
            kind.name(),
            take(&mut ebpf, object, "TARGETS", HashMap::try_from)?,
            settings.max_targets,
        );
        let counters = take(&mut ebpf, object, "COUNTERS", PerCpuArray::try_from)?;
        let logger = super::log::start(&mut ebpf);
        match kind {
            ProfilerKind::OnCpu => attach_sampler(&mut ebpf, settings.frequency_hz, &cpus)?,
            ProfilerKind::OffCpu => attach_switch_tracer(&mut ebpf)?,
        }
        attach_raw_tracepoint(&mut ebpf, object, "target_exit", "sched_process_exit")?;
        Ok(Self {
            kind,
            control,
            targets,
            aggregates,
            counters,
            logger,
            capacity,
            ebpf,
        })
    }

    /// Detaches and unloads every program: nothing is recorded after this returns, so a
    /// following [`drain`](Self::drain) collects everything and the counters are final. The
    /// maps stay until the profiler is dropped.
    pub fn detach(&mut self) -> Result<(), Error> {
        for (name, program) in self.ebpf.programs_mut() {
            let unloaded = match program {
                Program::PerfEvent(program) => program.unload(),
                Program::BtfTracePoint(program) => program.unload(),
                Program::RawTracePoint(program) => program.unload(),
                _ => Ok(()),
            };
            unloaded.map_err(|source| Error::Detach {
                program: name.to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Everything recorded since the previous drain.
    pub fn drain(&mut self) -> Result<Vec<RawStack>, Error> {
        Ok(match &mut self.aggregates {
            Aggregates::OnCpu(drain) => convert(drain.drain(&mut self.control)?, |samples| {
                StackValue::Samples(samples)
            }),
            Aggregates::OffCpu(drain) => convert(drain.drain(&mut self.control)?, |value| {
                StackValue::OffCpu(OffCpu {
                    switches: value.switches,
                    off_cpu_ns: value.off_cpu_ns,
                    capture_ns: value.capture_ns,
                })
            }),
        })
    }

    /// Totals since the profiler was loaded.
    pub fn counters(&self) -> Result<Counters, Error> {
        Counters::read(&self.counters)
    }

    pub fn add_target(&mut self, pid: u32, options: TargetOptions) -> Result<(), Error> {
        self.targets.add(&mut self.control, pid, options)
    }

    /// Returns whether the target went (no other recording holds it).
    pub fn remove_target(&mut self, pid: u32) -> Result<bool, Error> {
        self.targets.remove(&mut self.control, pid)
    }

    pub fn target_exited(&mut self, pid: u32) -> Result<(), Error> {
        self.targets.exited(&mut self.control, pid)
    }

    pub fn add_all(&mut self, options: TargetOptions) -> Result<(), Error> {
        self.targets.add_all(&mut self.control, options)
    }

    pub fn remove_all(&mut self) -> Result<(), Error> {
        self.targets.remove_all(&mut self.control)
    }

    pub fn holds(&self, pid: u32) -> bool {
        self.targets.holds(pid)
    }

    pub fn kind(&self) -> ProfilerKind {
        self.kind
    }

    /// The object's name and its programs, for their run statistics.
    pub fn object(&self) -> (&'static str, &Ebpf) {
        (self.kind.object(), &self.ebpf)
    }

    pub fn capacity(&self) -> MapCapacity {
        self.capacity
    }

    /// Entries in the kernel's target map and generation maps now.
    pub fn map_entries(&self) -> (usize, usize) {
        let generations = match &self.aggregates {
            Aggregates::OnCpu(drain) => drain
                .generations()
                .iter()
                .map(KernelGeneration::entries)
                .sum(),
            Aggregates::OffCpu(drain) => drain
                .generations()
                .iter()
                .map(KernelGeneration::entries)
                .sum(),
        };
        (self.targets.kernel_entries(), generations)
    }

    /// The descriptor that turns readable when the programs logged something.
    pub fn log_fd(&self) -> Option<RawFd> {
        self.logger.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Passes the programs' pending log records to tracing.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }
}

fn convert<V>(drained: Vec<Drained<V>>, value: impl Fn(V) -> StackValue) -> Vec<RawStack> {
    drained
        .into_iter()
        .map(|stack| RawStack {
            tgid: stack.tgid,
            preempted: stack.preempted(),
            user_truncated: stack.user_truncated(),
            kernel_truncated: stack.kernel_truncated(),
            user: stack.user,
            kernel: stack.kernel,
            value: value(stack.value),
        })
        .collect()
}

fn generations<V: Pod>(
    ebpf: &mut Ebpf,
    object: &'static str,
) -> Result<[KernelGeneration<V>; 2], Error> {
    let mut generation =
        |names: super::drain::GenerationNames| -> Result<KernelGeneration<V>, Error> {
            Ok(KernelGeneration {
                counts: take(ebpf, object, names.counts, HashMap::try_from)?,
                user_stacks: take(ebpf, object, names.user_stacks, HashMap::try_from)?,
                kernel_stacks: take(ebpf, object, names.kernel_stacks, HashMap::try_from)?,
                names,
            })
        };
    Ok([
        generation(GENERATION_NAMES[0])?,
        generation(GENERATION_NAMES[1])?,
    ])
}

/// Takes map `name` out of `ebpf` as the typed map `open` makes of it.
pub(super) fn take<T>(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
    open: impl FnOnce(aya::maps::Map) -> Result<T, aya::maps::MapError>,
) -> Result<T, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Missing {
        object,
        kind: "map",
        name,
    })?;
    open(map).map_err(|source| Error::Map {
        map: name,
        operation: "open",
        source,
    })
}

/// The program `name` of a loaded `object`, as its type `P`.
pub(super) fn program<'e, P>(
    ebpf: &'e mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<&'e mut P, Error>
where
    &'e mut P: TryFrom<&'e mut Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(Error::Missing {
            object,
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| Error::Program {
            program: name,
            source,
        })
}

/// Loads and attaches a raw tracepoint program (no kernel BTF needed).
pub(super) fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
    tracepoint: &'static str,
) -> Result<(), Error> {
    let program: &mut RawTracePoint = program(ebpf, object, name)?;
    program.load().map_err(|source| Error::Program {
        program: name,
        source,
    })?;
    program
        .attach(tracepoint)
        .map_err(|source| Error::AttachTracepoint {
            program: name,
            tracepoint,
            source,
        })?;
    Ok(())
}

/// The on-CPU sampler on the cpu-clock software event of every online CPU.
fn attach_sampler(ebpf: &mut Ebpf, frequency_hz: u64, cpus: &[u32]) -> Result<(), Error> {
    const PROGRAM: &str = "on_cpu_sample";
    let program: &mut PerfEvent = program(ebpf, ProfilerKind::OnCpu.object(), PROGRAM)?;
    program.load().map_err(|source| Error::Program {
        program: PROGRAM,
        source,
    })?;
    for &cpu in cpus {
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
            })?;
    }
    Ok(())
}

/// The off-CPU switch tracer on the `sched_switch` BTF tracepoint: BTF-typed task pointers let
/// it read a switched-out task's kernel stack.
fn attach_switch_tracer(ebpf: &mut Ebpf) -> Result<(), Error> {
    const PROGRAM: &str = "sched_switch";
    // The program's BTF type is resolved against the kernel's: read it only now, and let it go.
    let btf = Btf::from_sys_fs().map_err(Error::KernelBtf)?;
    let program: &mut BtfTracePoint = program(ebpf, ProfilerKind::OffCpu.object(), PROGRAM)?;
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
    })?;
    Ok(())
}

// The key layout user space decodes must be the one the programs write.
const _: () = assert!(size_of::<StackKey>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ProfilerSettings {
        ProfilerSettings {
            frequency_hz: 99,
            off_cpu_sample_probability: 1.0,
            drain_interval: Duration::from_secs(1),
            map_memory_bytes: memory::DEFAULT_MAP_MEMORY_BYTES,
            max_targets: 1024,
        }
    }

    #[test]
    fn settings_no_profiler_can_run_with_are_refused_by_name() {
        assert!(settings().validate().is_ok());
        type Spoil = fn(&mut ProfilerSettings);
        let cases: [(Spoil, &str); 5] = [
            (|s| s.frequency_hz = 0, "frequency"),
            (|s| s.off_cpu_sample_probability = 0.0, "probability"),
            (
                |s| s.drain_interval = Duration::from_millis(1),
                "drain interval",
            ),
            (|s| s.map_memory_bytes = 1 << 20, "map memory"),
            (|s| s.max_targets = 0, "targets"),
        ];
        for (spoil, named) in cases {
            let mut bad = settings();
            spoil(&mut bad);
            let error = bad.validate().expect_err(named).to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn on_cpu_maps_hold_four_drain_intervals_of_samples_within_the_budget() {
        let mut big = settings();
        big.frequency_hz = 999;
        big.drain_interval = Duration::from_secs(2);
        big.map_memory_bytes = 1 << 30;
        assert_eq!(
            big.capacity(ProfilerKind::OnCpu, 4).aggregates,
            4 * 999 * 4 * 2
        );
        let small = settings().capacity(ProfilerKind::OnCpu, 2);
        assert_eq!(small.aggregates, 1024, "the floor");
        assert!(!small.limited_by_budget);
    }
}
