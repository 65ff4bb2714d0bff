//! How big each profiler's maps are: derived from a memory budget, so that kernel memory stays
//! bounded whatever the frequency, CPU count and drain interval are.
//!
//! Every map is preallocated (allocating in the programs' contexts can fail), so its size is paid
//! at load time whether it fills or not. A hash map entry costs the kernel's element header
//! (`struct htab_elem`, 48 bytes here) plus the key and value rounded to 8 bytes, and each map
//! keeps one spare element per possible CPU and a power-of-two bucket array (16 bytes a bucket).

use rover_common::{KernelStack, StackKey, TargetOptions, UserStack};

/// The kernel's per-element header of a preallocated hash map.
const ELEMENT_HEADER: u64 = 48;
const BUCKET: u64 = 16;

/// Default budget of each loaded profiler's maps.
pub const DEFAULT_MAP_MEMORY_BYTES: u64 = 32 << 20;
/// Smallest budget accepted: room for the smallest maps a profiler is useful with.
pub const MIN_MAP_MEMORY_BYTES: u64 = 4 << 20;
/// Aggregates below this are not worth loading for.
const MIN_AGGREGATES: u32 = 1024;

/// Entries of each generation's maps of one profiler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapCapacity {
    /// Distinct (process, stacks) aggregates per drain interval.
    pub aggregates: u32,
    /// Distinct user stacks, and kernel stacks, per drain interval.
    pub user_stacks: u32,
    pub kernel_stacks: u32,
    /// Bytes the maps take (both generations, the target map and the per-CPU buffers).
    pub bytes: u64,
    /// Whether the budget made the maps smaller than wanted.
    pub limited_by_budget: bool,
}

/// Bytes a preallocated hash map of `entries` entries takes.
pub(super) fn hash_map_bytes(entries: u32, key: usize, value: usize, cpus: u32) -> u64 {
    let element =
        ELEMENT_HEADER + (key as u64).next_multiple_of(8) + (value as u64).next_multiple_of(8);
    (u64::from(entries) + u64::from(cpus)) * element
        + u64::from(entries).next_power_of_two() * BUCKET
}

/// Per-profiler maps that do not depend on the aggregate count: targets and per-CPU buffers.
fn fixed_bytes(max_targets: u32, cpus: u32) -> u64 {
    let per_cpu_buffers = (size_of::<UserStack>() + size_of::<KernelStack>() + 256) as u64;
    hash_map_bytes(max_targets, 4, size_of::<TargetOptions>(), cpus)
        + u64::from(cpus) * per_cpu_buffers
}

/// The capacity that gives `wanted` aggregates (at least [`MIN_AGGREGATES`]) within `budget`
/// bytes, or as many as the budget holds.
pub(super) fn capacity(
    wanted: u32,
    value: usize,
    budget: u64,
    max_targets: u32,
    cpus: u32,
) -> MapCapacity {
    let wanted = wanted.max(MIN_AGGREGATES);
    let fixed = fixed_bytes(max_targets, cpus);
    let total = |entries: u32| {
        fixed
            + 2 * (hash_map_bytes(entries, size_of::<StackKey>(), value, cpus)
                + hash_map_bytes(entries, 8, size_of::<UserStack>(), cpus)
                + hash_map_bytes(entries, 8, size_of::<KernelStack>(), cpus))
    };
    // The most that fits (the bytes grow with the entries, in steps where buckets double).
    let (mut low, mut high) = (MIN_AGGREGATES, wanted);
    while low < high {
        let middle = low + (high - low).div_ceil(2);
        if total(middle) <= budget {
            low = middle;
        } else {
            high = middle - 1;
        }
    }
    MapCapacity {
        aggregates: low,
        user_stacks: low,
        kernel_stacks: low,
        bytes: total(low),
        limited_by_budget: low < wanted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wanted_capacity_within_the_budget_is_granted() {
        let capacity = capacity(2000, 8, 32 << 20, 1024, 2);
        assert_eq!(capacity.aggregates, 2000);
        assert!(!capacity.limited_by_budget);
        assert!(capacity.bytes < 32 << 20, "{capacity:?}");
    }

    #[test]
    fn the_budget_bounds_the_maps_whatever_is_wanted() {
        for cpus in [2, 64, 512] {
            for wanted in [10_000, 1_000_000, u32::MAX] {
                let budget = 32 << 20;
                let capacity = capacity(wanted, 8, budget, 1024, cpus);
                assert!(capacity.limited_by_budget, "{cpus} CPUs, {wanted}");
                assert!(
                    capacity.bytes <= budget || capacity.aggregates == MIN_AGGREGATES,
                    "{cpus} CPUs, {wanted} wanted: {capacity:?}"
                );
            }
        }
    }

    #[test]
    fn kernel_stacks_cost_about_half_a_user_stack() {
        let user = hash_map_bytes(1 << 16, 8, size_of::<UserStack>(), 2);
        let kernel = hash_map_bytes(1 << 16, 8, size_of::<KernelStack>(), 2);
        assert!(kernel * 10 < user * 6, "{kernel} vs {user}");
    }
}
