//! Loading a profiler object: what every profiler has (`rover_ebpf::profiler_maps!`) in one
//! place, the rest left to the caller.

use aya::maps::{MapData, PerCpuArray};
use aya::{Ebpf, EbpfLoader, Pod};

use super::aggregates::{Aggregates, open_map};
use super::target_filter::{TargetFilter, target_all};
use super::{Error, Targets};

/// Entries of each generation's maps.
pub(super) struct Capacity {
    pub aggregates: u32,
    pub stacks: u32,
}

/// A loaded object with its common maps taken out; programs are not loaded yet.
pub(super) struct Loaded<V> {
    pub ebpf: Ebpf,
    pub aggregates: Aggregates<V>,
    pub targets: TargetFilter,
    pub counters: PerCpuArray<MapData, u64>,
}

/// Loads `object` (its embedded `bytes`) for `targets`; `configure` sets what is particular to
/// it (more globals, map sizes).
pub(super) fn load<'a, V: Pod>(
    object: &'static str,
    bytes: &'static [u8],
    targets: &Targets,
    capacity: Capacity,
    configure: impl FnOnce(&mut EbpfLoader<'a>),
) -> Result<Loaded<V>, Error> {
    super::privilege::require()?;
    let all: &'static u8 = if target_all(targets) { &1 } else { &0 };
    let mut loader = EbpfLoader::new();
    loader
        // Rust eBPF carries no CO-RE relocations: the kernel's BTF would only cost memory.
        .btf(None)
        .override_global("TARGET_ALL", all, true)
        .map_max_entries("COUNTS_0", capacity.aggregates)
        .map_max_entries("COUNTS_1", capacity.aggregates)
        .map_max_entries("STACKS_0", capacity.stacks)
        .map_max_entries("STACKS_1", capacity.stacks);
    configure(&mut loader);
    let mut ebpf = loader
        .load(bytes)
        .map_err(|source| Error::Load { object, source })?;
    let aggregates = Aggregates::take(&mut ebpf, object)?;
    let targets = TargetFilter::take(&mut ebpf, object, targets)?;
    let counters = open_map(&mut ebpf, object, "COUNTERS", PerCpuArray::try_from)?;
    Ok(Loaded {
        ebpf,
        aggregates,
        targets,
        counters,
    })
}

/// The program `name` of a loaded `object`, as its type `P`.
pub(super) fn program<'e, P>(
    ebpf: &'e mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<&'e mut P, Error>
where
    &'e mut P: TryFrom<&'e mut aya::programs::Program, Error = aya::programs::ProgramError>,
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
