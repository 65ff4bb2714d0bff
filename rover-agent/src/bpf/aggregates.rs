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
//! 3. copies every stack of the old generation into a user-space cache, then reads every
//!    aggregate of the old generation, resolving its stacks through the cache;
//! 4. deletes every key of the old generation's maps, leaving them empty for the next flip.
//!
//! Each recorded event is thus read exactly once; the `recorded` counter checks it (see the
//! exact-count integration test).
//!
//! The cache exists because an aggregate may reference a stack stored in an earlier generation:
//! an off-CPU episode captures its stacks when the thread is switched out and is aggregated when
//! it comes back, possibly many drains later. Programs store a stack in the generation current
//! at capture, so every stack passes through step 3 once; the cache keeps it while the caller
//! says it is still referenced (open episodes) and for two drains after its last use.

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

/// A stack read from the kernel, and the drain that last needed it.
struct CachedStack {
    frames: Vec<u64>,
    last_used: u64,
}

pub(super) struct Aggregates<V> {
    control: Array<MapData, u32>,
    generations: [Generation<V>; 2],
    stacks: StdHashMap<u64, CachedStack>,
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
            stacks: StdHashMap::new(),
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

    /// Everything recorded since the previous drain. `referenced` lists stack references that
    /// are still in use outside the aggregates (open off-CPU episodes): their stacks are kept.
    pub(super) fn drain(
        &mut self,
        referenced: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<RawStack<V>>, Error> {
        let index = (self.drains & 1) as usize;
        self.drains += 1;
        self.publish_epoch()?;
        wait_for_running_programs()?;
        let now = self.drains;

        let generation = &mut self.generations[index];
        let stack_keys = collect_keys(generation.stacks.keys(), STACKS[index])?;
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
            self.stacks.insert(
                hash,
                CachedStack {
                    frames: trace.frames[..len].to_vec(),
                    last_used: now,
                },
            );
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
                user: resolve(&mut self.stacks, key.user_stack, now),
                kernel: resolve(&mut self.stacks, key.kernel_stack, now),
                value,
            });
        }
        for key in &keys {
            remove(generation.counts.remove(key), COUNTS[index])?;
        }
        for hash in &stack_keys {
            remove(generation.stacks.remove(hash), STACKS[index])?;
        }

        for hash in referenced {
            if let Some(stack) = self.stacks.get_mut(&hash) {
                stack.last_used = now;
            }
        }
        self.stacks.retain(|_, stack| stack.last_used + 2 >= now);
        Ok(drained_stacks)
    }
}

/// A stack reference as frames: from the cache (marking it used), or lost if it is not there.
fn resolve(stacks: &mut StdHashMap<u64, CachedStack>, reference: u64, now: u64) -> RawFrames {
    match reference {
        NO_STACK => RawFrames::Absent,
        LOST_STACK => RawFrames::Lost,
        hash => match stacks.get_mut(&hash) {
            Some(stack) => {
                stack.last_used = now;
                RawFrames::Captured(stack.frames.clone())
            }
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
