//! Draining the kernel aggregates without losing or double-counting anything.
//!
//! aya 0.14 has no lookup-and-delete or batch operations on hash maps, and reading a value then
//! deleting its key would lose what programs add in between. So every map programs write comes
//! in two generations (`COUNTS_0`/`COUNTS_1`, `STACKS_0`/`STACKS_1`) and the `CONTROL` array says
//! which one programs use. A drain:
//! 1. flips `CONTROL` to the other generation;
//! 2. waits until no program can still be writing the old one: `membarrier(MEMBARRIER_CMD_GLOBAL)`
//!    is a `synchronize_rcu()`, and BPF programs run non-preemptible inside RCU read-side
//!    sections, so every program that read the old generation has returned when it does;
//! 3. reads every aggregate of the old generation and the stacks they reference;
//! 4. deletes every key of the old generation's maps, leaving them empty for the next flip.
//!
//! Each recorded event is thus read exactly once; the `recorded` counter checks it (see the
//! exact-count integration test).

use std::collections::HashMap as StdHashMap;
use std::io;

use aya::Ebpf;
use aya::Pod;
use aya::maps::{Array, HashMap, MapData};
use rover_common::{CONTROL_GENERATION, LOST_STACK, NO_STACK, StackFrames, StackKey};

use super::{Error, RawFrames, RawStack};

struct Generation<V> {
    counts: HashMap<MapData, StackKey, V>,
    stacks: HashMap<MapData, u64, StackFrames>,
}

pub(super) struct Aggregates<V> {
    control: Array<MapData, u32>,
    generations: [Generation<V>; 2],
    active: u32,
}

const COUNTS: [&str; 2] = ["COUNTS_0", "COUNTS_1"];
const STACKS: [&str; 2] = ["STACKS_0", "STACKS_1"];

impl<V: Pod> Aggregates<V> {
    /// Takes the control and generation maps out of a loaded object.
    pub(super) fn take(ebpf: &mut Ebpf, object: &'static str) -> Result<Self, Error> {
        let control =
            Array::try_from(take_map(ebpf, object, "CONTROL")?).map_err(|source| Error::Map {
                map: "CONTROL",
                operation: "open",
                source,
            })?;
        let mut generation = |index: usize| -> Result<Generation<V>, Error> {
            let open = |name: &'static str, source| Error::Map {
                map: name,
                operation: "open",
                source,
            };
            Ok(Generation {
                counts: HashMap::try_from(take_map(ebpf, object, COUNTS[index])?)
                    .map_err(|source| open(COUNTS[index], source))?,
                stacks: HashMap::try_from(take_map(ebpf, object, STACKS[index])?)
                    .map_err(|source| open(STACKS[index], source))?,
            })
        };
        let generations = [generation(0)?, generation(1)?];
        let mut aggregates = Self {
            control,
            generations,
            active: 0,
        };
        aggregates.set_active(0)?;
        Ok(aggregates)
    }

    fn set_active(&mut self, generation: u32) -> Result<(), Error> {
        self.control
            .set(CONTROL_GENERATION, generation, 0)
            .map_err(|source| Error::Map {
                map: "CONTROL",
                operation: "update",
                source,
            })?;
        self.active = generation;
        Ok(())
    }

    /// Everything recorded since the previous drain.
    pub(super) fn drain(&mut self) -> Result<Vec<RawStack<V>>, Error> {
        let drained = self.active;
        self.set_active(1 - drained)?;
        wait_for_running_programs()?;

        let generation = &mut self.generations[drained as usize];
        let index = drained as usize;
        let keys = collect_keys(generation.counts.keys(), COUNTS[index])?;
        let mut stacks: StdHashMap<u64, RawFrames> = StdHashMap::new();
        let mut drained_stacks = Vec::with_capacity(keys.len());
        for key in &keys {
            let value = match generation.counts.get(key, 0) {
                Ok(value) => value,
                Err(source) => {
                    return Err(Error::Map {
                        map: COUNTS[index],
                        operation: "lookup",
                        source,
                    });
                }
            };
            let mut resolve = |reference: u64| {
                stacks
                    .entry(reference)
                    .or_insert_with(|| read_stack(&generation.stacks, reference))
                    .clone()
            };
            drained_stacks.push(RawStack {
                tgid: key.tgid,
                user: resolve(key.user_stack),
                kernel: resolve(key.kernel_stack),
                value,
            });
        }
        for key in &keys {
            remove(generation.counts.remove(key), COUNTS[index])?;
        }
        // Also the stacks no aggregate references (their sample found the aggregate map full).
        for reference in collect_keys(generation.stacks.keys(), STACKS[index])? {
            remove(generation.stacks.remove(&reference), STACKS[index])?;
        }
        Ok(drained_stacks)
    }
}

fn take_map(
    ebpf: &mut Ebpf,
    object: &'static str,
    name: &'static str,
) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::Missing {
        object,
        kind: "map",
        name,
    })
}

fn collect_keys<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    map: &'static str,
) -> Result<Vec<K>, Error> {
    keys.collect::<Result<_, _>>().map_err(|source| Error::Map {
        map,
        operation: "iterate",
        source,
    })
}

fn remove(result: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), Error> {
    match result {
        Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(Error::Map {
            map,
            operation: "delete",
            source,
        }),
    }
}

fn read_stack(stacks: &HashMap<MapData, u64, StackFrames>, reference: u64) -> RawFrames {
    match reference {
        NO_STACK => RawFrames::Absent,
        LOST_STACK => RawFrames::Lost,
        hash => match stacks.get(&hash, 0) {
            Ok(trace) => {
                let len = (trace.len as usize).min(trace.frames.len());
                RawFrames::Captured(trace.frames[..len].to_vec())
            }
            // Programs store a stack before the aggregate that references it, in the same
            // generation, so this means the map was tampered with: report it as lost.
            Err(_) => RawFrames::Lost,
        },
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
