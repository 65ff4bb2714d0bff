//! Draining the kernel aggregates without losing or double-counting anything.
//!
//! aya 0.14 has no lookup-and-delete or batch operations on hash maps, and reading a value then
//! deleting its key would lose what programs add in between. So every map programs write comes
//! in two generations (`COUNTS_0`/`COUNTS_1`, `STACKS_0`/`STACKS_1`) and the `CONTROL` array holds
//! an epoch whose low bit says which one programs use. A drain:
//! 1. increments the epoch, flipping programs to the other generation;
//! 2. waits until no program can still be writing the old one: `membarrier(MEMBARRIER_CMD_GLOBAL)`
//!    is a `synchronize_rcu()`, and BPF programs run non-preemptible inside RCU read-side
//!    sections, so every program that read the old generation has returned when it does;
//! 3. reads every stack of the old generation, then every aggregate, resolving its stacks;
//! 4. deletes every key of the old generation's maps, leaving them empty for the next flip.
//!
//! Each recorded event is thus read exactly once; the `recorded` counter checks it (see the
//! exact-count integration test). Programs store the stacks an aggregate references in the
//! aggregate's own generation (off-CPU episodes store theirs when they close), so step 3 finds
//! them all.

use std::collections::HashMap as StdHashMap;
use std::io;

use aya::Ebpf;
use aya::Pod;
use aya::maps::{Array, HashMap, MapData};
use rover_common::{
    CONTROL_EPOCH, LOST_STACK, NO_STACK, STACK_FLAG_PREEMPTED, StackFrames, StackKey,
};

use super::{Error, RawFrames, RawStack};

struct Generation<V> {
    counts: HashMap<MapData, StackKey, V>,
    stacks: HashMap<MapData, u64, StackFrames>,
}

pub(super) struct Aggregates<V> {
    control: Array<MapData, u32>,
    generations: [Generation<V>; 2],
    /// Drains so far; the epoch in `CONTROL` is this number (truncated), so programs write
    /// generation `drains & 1`.
    drains: u64,
}

const COUNTS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
const STACKS: [&str; 2] = ["STACKS_0", "STACKS_1"];

impl<V: Pod> Aggregates<V> {
    /// Takes the control and generation maps out of a loaded object.
    pub(super) fn take(ebpf: &mut Ebpf, object: &'static str) -> Result<Self, Error> {
        let control = open_map(ebpf, object, "CONTROL", Array::try_from)?;
        let mut generation = |index: usize| -> Result<Generation<V>, Error> {
            Ok(Generation {
                counts: open_map(ebpf, object, COUNTS[index], HashMap::try_from)?,
                stacks: open_map(ebpf, object, STACKS[index], HashMap::try_from)?,
            })
        };
        let generations = [generation(0)?, generation(1)?];
        let mut aggregates = Self {
            control,
            generations,
            drains: 0,
        };
        aggregates.publish_epoch()?;
        Ok(aggregates)
    }

    fn publish_epoch(&mut self) -> Result<(), Error> {
        self.control
            .set(CONTROL_EPOCH, self.drains as u32, 0)
            .map_err(|source| Error::Map {
                map: "CONTROL",
                operation: "update",
                source,
            })
    }

    /// Everything recorded since the previous drain.
    pub(super) fn drain(&mut self) -> Result<Vec<RawStack<V>>, Error> {
        let index = (self.drains & 1) as usize;
        self.drains += 1;
        self.publish_epoch()?;
        wait_for_running_programs()?;

        let generation = &mut self.generations[index];
        let stack_keys = collect_keys(generation.stacks.keys(), STACKS[index])?;
        let mut stacks = StdHashMap::with_capacity(stack_keys.len());
        for &hash in &stack_keys {
            let trace = generation
                .stacks
                .get(&hash, 0)
                .map_err(|source| Error::Map {
                    map: STACKS[index],
                    operation: "lookup",
                    source,
                })?;
            let len = (trace.len as usize).min(trace.frames.len());
            stacks.insert(hash, trace.frames[..len].to_vec());
        }

        let keys = collect_keys(generation.counts.keys(), COUNTS[index])?;
        let mut drained_stacks = Vec::with_capacity(keys.len());
        for key in &keys {
            let value = generation.counts.get(key, 0).map_err(|source| Error::Map {
                map: COUNTS[index],
                operation: "lookup",
                source,
            })?;
            drained_stacks.push(RawStack {
                tgid: key.tgid,
                preempted: key.flags & STACK_FLAG_PREEMPTED != 0,
                user: resolve(&stacks, key.user_stack),
                kernel: resolve(&stacks, key.kernel_stack),
                value,
            });
        }
        for key in &keys {
            remove(generation.counts.remove(key), COUNTS[index])?;
        }
        for hash in &stack_keys {
            remove(generation.stacks.remove(hash), STACKS[index])?;
        }
        Ok(drained_stacks)
    }
}

/// A stack reference as frames, or lost if its stack is not in the generation.
fn resolve(stacks: &StdHashMap<u64, Vec<u64>>, reference: u64) -> RawFrames {
    match reference {
        NO_STACK => RawFrames::Absent,
        LOST_STACK => RawFrames::Lost,
        hash => match stacks.get(&hash) {
            Some(frames) => RawFrames::Captured(frames.clone()),
            // Cannot happen while programs store stacks before referencing them (see above).
            None => RawFrames::Lost,
        },
    }
}

/// Takes map `name` out of `ebpf` as the typed map `open` makes of it.
pub(super) fn open_map<T>(
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

pub(super) fn collect_keys<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    map: &'static str,
) -> Result<Vec<K>, Error> {
    keys.collect::<Result<_, _>>().map_err(|source| Error::Map {
        map,
        operation: "iterate",
        source,
    })
}

pub(super) fn remove(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), Error> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map {
            map,
            operation: "delete",
            source,
        }),
    }
}

/// Returns once every eBPF program that was running on any CPU has finished.
fn wait_for_running_programs() -> Result<(), Error> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EINVAL) {
        // nohz_full kernels refuse the global barrier. Programs run for microseconds without
        // preemption, so a pause many orders of magnitude longer is a safe substitute.
        std::thread::sleep(std::time::Duration::from_millis(20));
        return Ok(());
    }
    Err(Error::Barrier(error))
}
