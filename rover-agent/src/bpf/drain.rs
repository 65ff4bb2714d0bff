//! Draining the kernel aggregates without losing or double-counting anything, even when a system
//! call fails halfway.
//!
//! aya 0.14 has no lookup-and-delete or batch operations on hash maps, and reading a value then
//! deleting its key would lose what programs add in between. So every map programs write comes
//! in two generations (`COUNTS_g`, `USER_STACKS_g`, `KERNEL_STACKS_g`) and the `CONTROL` array
//! holds an epoch whose low bit says which one programs use. A drain:
//! 1. increments the epoch, flipping programs to the other generation;
//! 2. waits until no program can still be writing the old one: `membarrier(MEMBARRIER_CMD_GLOBAL)`
//!    is a `synchronize_rcu()`, and BPF programs run non-preemptible inside RCU read-side
//!    sections, so every program that read the old epoch has returned when it does;
//! 3. reads every stack of the old generation, then every aggregate, resolving its stacks;
//! 4. deletes every key it read, leaving the old generation empty for the next flip.
//!
//! Programs store the stacks an aggregate references in the aggregate's own generation
//! (off-CPU episodes store theirs when they close), so step 3 finds them all.
//!
//! Failures: the state between calls says how far the old generation got ([`Pending`]). A
//! failed flip changes nothing; after a failed wait or read the old generation is left intact
//! and the next call resumes there, reading it whole (nothing of it was returned) without
//! flipping again; once its content is returned, keys whose deletion failed are deleted first
//! thing in the next call, and programs are not flipped back onto it before it is empty. So each
//! recorded event is returned exactly once (see the exact-count integration test and the
//! fault-injection unit tests below).

use std::collections::HashMap as StdHashMap;
use std::io;

use aya::Pod;
use aya::maps::{Array, HashMap, MapData};
use rover_common::{
    KernelStack, LOST_STACK, MAX_KERNEL_FRAMES, MAX_USER_FRAMES, NO_STACK, STACK_FLAG_PREEMPTED,
    StackKey, UserStack, control,
};
use tracing::warn;

use super::{Error, RawFrames};

/// One aggregate as drained, its stacks resolved; `V` is the kernel's value type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Drained<V> {
    pub tgid: u32,
    /// `STACK_FLAG_*` bits.
    pub flags: u32,
    pub user: RawFrames,
    pub kernel: RawFrames,
    pub value: V,
}

impl<V> Drained<V> {
    pub fn preempted(&self) -> bool {
        self.flags & STACK_FLAG_PREEMPTED != 0
    }

    /// A stack as deep as the programs record was cut there (deeper ones are not told apart).
    pub fn user_truncated(&self) -> bool {
        matches!(&self.user, RawFrames::Captured(frames) if frames.len() >= MAX_USER_FRAMES)
    }

    pub fn kernel_truncated(&self) -> bool {
        matches!(&self.kernel, RawFrames::Captured(frames) if frames.len() >= MAX_KERNEL_FRAMES)
    }
}

/// The maps of one generation, as the drain uses them: aya's maps in the agent, plain maps in
/// the unit tests (which make any operation fail on demand).
pub(super) trait Generation<V> {
    fn aggregate_keys(&self) -> Result<Vec<StackKey>, Error>;
    fn aggregate(&self, key: &StackKey) -> Result<V, Error>;
    fn remove_aggregate(&mut self, key: &StackKey) -> Result<(), Error>;
    fn stack_keys(&self, kind: StackKind) -> Result<Vec<u64>, Error>;
    /// The frames of a stored stack, innermost first.
    fn stack(&self, kind: StackKind, hash: u64) -> Result<Vec<u64>, Error>;
    fn remove_stack(&mut self, kind: StackKind, hash: u64) -> Result<(), Error>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum StackKind {
    User,
    Kernel,
}

/// Publishing the epoch, and waiting for programs that may still use the previous one.
pub(super) trait EpochControl {
    fn publish(&mut self, epoch: u64) -> Result<(), Error>;
    fn wait_for_programs(&mut self) -> Result<(), Error>;
}

/// How far the generation programs no longer write got.
#[derive(Debug)]
enum Pending {
    /// Programs write one generation; the other is empty.
    Nothing,
    /// Programs were flipped away from generation `index`, whose content is intact and not
    /// returned yet; `waited` once no program can still write it.
    Unread { index: usize, waited: bool },
    /// The content of generation `index` was returned, but these keys are still to be deleted.
    Undeleted {
        index: usize,
        aggregates: Vec<StackKey>,
        stacks: Vec<(StackKind, u64)>,
    },
}

pub(super) struct Drain<V, G> {
    generations: [G; 2],
    /// The epoch published last: programs write generation `epoch & 1`.
    epoch: u64,
    pending: Pending,
    _value: std::marker::PhantomData<V>,
}

impl<V, G: Generation<V>> Drain<V, G> {
    /// Publishes epoch 0 (programs write generation 0).
    pub fn new(control: &mut impl EpochControl, generations: [G; 2]) -> Result<Self, Error> {
        control.publish(0)?;
        Ok(Self {
            generations,
            epoch: 0,
            pending: Pending::Nothing,
            _value: std::marker::PhantomData,
        })
    }

    /// Everything recorded since the previous successful drain. On error, what was recorded is
    /// kept for the next call.
    pub fn drain(&mut self, control: &mut impl EpochControl) -> Result<Vec<Drained<V>>, Error> {
        if let Pending::Undeleted { .. } = self.pending {
            self.finish_deleting()?;
        }
        if let Pending::Nothing = self.pending {
            let next = self.epoch + 1;
            control.publish(next)?;
            self.pending = Pending::Unread {
                index: (self.epoch & 1) as usize,
                waited: false,
            };
            self.epoch = next;
        }
        let Pending::Unread { index, waited } = &mut self.pending else {
            unreachable!("pending deletions were finished above")
        };
        let index = *index;
        if !*waited {
            control.wait_for_programs()?;
            *waited = true;
        }
        let generation = &mut self.generations[index];
        let (drained, aggregates, stacks) = read(generation)?;
        self.pending = Pending::Undeleted {
            index,
            aggregates,
            stacks,
        };
        if let Err(error) = self.finish_deleting() {
            // What was read is returned now; the keys left are deleted before the generation
            // is written again.
            warn!("clearing drained kernel aggregates failed, retried at the next drain: {error}");
        }
        Ok(drained)
    }

    fn finish_deleting(&mut self) -> Result<(), Error> {
        let Pending::Undeleted {
            index,
            aggregates,
            stacks,
        } = &mut self.pending
        else {
            return Ok(());
        };
        let generation = &mut self.generations[*index];
        while let Some(key) = aggregates.last() {
            generation.remove_aggregate(key)?;
            aggregates.pop();
        }
        while let Some(&(kind, hash)) = stacks.last() {
            generation.remove_stack(kind, hash)?;
            stacks.pop();
        }
        self.pending = Pending::Nothing;
        Ok(())
    }

    /// The maps of both generations, for inspection (tests, the soak's map-entry count).
    pub fn generations(&self) -> &[G; 2] {
        &self.generations
    }
}

/// Reads a whole generation: its aggregates with their stacks resolved, and the keys to delete.
#[expect(clippy::type_complexity, reason = "a private helper's three results")]
fn read<V>(
    generation: &impl Generation<V>,
) -> Result<(Vec<Drained<V>>, Vec<StackKey>, Vec<(StackKind, u64)>), Error> {
    let mut stacks = StdHashMap::new();
    let mut stack_keys = Vec::new();
    for kind in [StackKind::User, StackKind::Kernel] {
        for hash in generation.stack_keys(kind)? {
            stacks.insert((kind, hash), generation.stack(kind, hash)?);
            stack_keys.push((kind, hash));
        }
    }
    let keys = generation.aggregate_keys()?;
    let mut drained = Vec::with_capacity(keys.len());
    for key in &keys {
        drained.push(Drained {
            tgid: key.tgid,
            flags: key.flags,
            user: resolve(&stacks, StackKind::User, key.user_stack),
            kernel: resolve(&stacks, StackKind::Kernel, key.kernel_stack),
            value: generation.aggregate(key)?,
        });
    }
    Ok((drained, keys, stack_keys))
}

/// A stack reference as frames, or lost if its stack is not in the generation.
fn resolve(
    stacks: &StdHashMap<(StackKind, u64), Vec<u64>>,
    kind: StackKind,
    reference: u64,
) -> RawFrames {
    match reference {
        NO_STACK => RawFrames::Absent,
        LOST_STACK => RawFrames::Lost,
        hash => match stacks.get(&(kind, hash)) {
            Some(frames) => RawFrames::Captured(frames.clone()),
            // Cannot happen while programs store stacks before referencing them (see above).
            None => RawFrames::Lost,
        },
    }
}

/// A generation's maps in the kernel.
pub(super) struct KernelGeneration<V> {
    pub counts: HashMap<MapData, StackKey, V>,
    pub user_stacks: HashMap<MapData, u64, UserStack>,
    pub kernel_stacks: HashMap<MapData, u64, KernelStack>,
    /// The maps' names, for errors.
    pub names: GenerationNames,
}

#[derive(Clone, Copy)]
pub(super) struct GenerationNames {
    pub counts: &'static str,
    pub user_stacks: &'static str,
    pub kernel_stacks: &'static str,
}

pub(super) const GENERATION_NAMES: [GenerationNames; 2] = [
    GenerationNames {
        counts: "COUNTS_0",
        user_stacks: "USER_STACKS_0",
        kernel_stacks: "KERNEL_STACKS_0",
    },
    GenerationNames {
        counts: "COUNTS_1",
        user_stacks: "USER_STACKS_1",
        kernel_stacks: "KERNEL_STACKS_1",
    },
];

fn map_error(
    map: &'static str,
    operation: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map {
        map,
        operation,
        source,
    }
}

fn keys<K: Pod>(map: &HashMap<MapData, K, impl Pod>, name: &'static str) -> Result<Vec<K>, Error> {
    map.keys()
        .collect::<Result<_, _>>()
        .map_err(map_error(name, "iterate"))
}

/// Deleting a key that is gone already is no failure.
fn removed(result: Result<(), aya::maps::MapError>, name: &'static str) -> Result<(), Error> {
    super::error::deleted(result).map_err(map_error(name, "delete"))
}

impl<V: Pod> Generation<V> for KernelGeneration<V> {
    fn aggregate_keys(&self) -> Result<Vec<StackKey>, Error> {
        keys(&self.counts, self.names.counts)
    }

    fn aggregate(&self, key: &StackKey) -> Result<V, Error> {
        self.counts
            .get(key, 0)
            .map_err(map_error(self.names.counts, "lookup"))
    }

    fn remove_aggregate(&mut self, key: &StackKey) -> Result<(), Error> {
        removed(self.counts.remove(key), self.names.counts)
    }

    fn stack_keys(&self, kind: StackKind) -> Result<Vec<u64>, Error> {
        match kind {
            StackKind::User => keys(&self.user_stacks, self.names.user_stacks),
            StackKind::Kernel => keys(&self.kernel_stacks, self.names.kernel_stacks),
        }
    }

    fn stack(&self, kind: StackKind, hash: u64) -> Result<Vec<u64>, Error> {
        let frames = |len: u64, frames: &[u64]| frames[..(len as usize).min(frames.len())].to_vec();
        match kind {
            StackKind::User => self
                .user_stacks
                .get(&hash, 0)
                .map(|stack| frames(stack.len, &stack.frames))
                .map_err(map_error(self.names.user_stacks, "lookup")),
            StackKind::Kernel => self
                .kernel_stacks
                .get(&hash, 0)
                .map(|stack| frames(stack.len, &stack.frames))
                .map_err(map_error(self.names.kernel_stacks, "lookup")),
        }
    }

    fn remove_stack(&mut self, kind: StackKind, hash: u64) -> Result<(), Error> {
        match kind {
            StackKind::User => removed(self.user_stacks.remove(&hash), self.names.user_stacks),
            StackKind::Kernel => {
                removed(self.kernel_stacks.remove(&hash), self.names.kernel_stacks)
            }
        }
    }
}

impl<V: Pod> KernelGeneration<V> {
    /// Entries held now (the soak reports them).
    pub fn entries(&self) -> usize {
        self.counts.keys().count()
            + self.user_stacks.keys().count()
            + self.kernel_stacks.keys().count()
    }
}

/// The `CONTROL` map's epoch slot, and the kernel's RCU barrier.
impl EpochControl for Array<MapData, u64> {
    fn publish(&mut self, epoch: u64) -> Result<(), Error> {
        self.set(control::EPOCH, epoch, 0)
            .map_err(map_error("CONTROL", "update"))
    }

    fn wait_for_programs(&mut self) -> Result<(), Error> {
        wait_for_running_programs()
    }
}

/// Returns once every eBPF program that was running on any CPU has finished.
pub(super) fn wait_for_running_programs() -> Result<(), Error> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    loop {
        // SAFETY: membarrier takes two integers and touches no memory of ours.
        let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
        if result == 0 {
            return Ok(());
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EINVAL) => {
                // nohz_full kernels refuse the global barrier. Programs run for microseconds
                // without preemption, so a pause many orders of magnitude longer is a safe
                // substitute.
                std::thread::sleep(std::time::Duration::from_millis(20));
                return Ok(());
            }
            _ => return Err(Error::Barrier(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Which operation of a fake fails next (after `after` more successes of its kind).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Operation {
        Publish,
        Wait,
        ReadKeys,
        Read,
        Remove,
    }

    #[derive(Default)]
    struct Faults {
        failing: Option<(Operation, u32)>,
    }

    impl Faults {
        fn check(&mut self, operation: Operation) -> Result<(), Error> {
            match &mut self.failing {
                Some((failing, after)) if *failing == operation => {
                    if *after == 0 {
                        self.failing = None;
                        return Err(Error::Barrier(io::Error::other(format!(
                            "injected {operation:?} failure"
                        ))));
                    }
                    *after -= 1;
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    }

    /// Plain maps standing in for a generation; shares the fault plan with the control.
    #[derive(Default)]
    struct FakeGeneration {
        counts: BTreeMap<(u32, u64, u64), u64>,
        stacks: BTreeMap<(u8, u64), Vec<u64>>,
        faults: std::rc::Rc<std::cell::RefCell<Faults>>,
    }

    fn kind_tag(kind: StackKind) -> u8 {
        match kind {
            StackKind::User => 0,
            StackKind::Kernel => 1,
        }
    }

    impl Generation<u64> for FakeGeneration {
        fn aggregate_keys(&self) -> Result<Vec<StackKey>, Error> {
            self.faults.borrow_mut().check(Operation::ReadKeys)?;
            Ok(self
                .counts
                .keys()
                .map(|&(tgid, user_stack, kernel_stack)| StackKey {
                    tgid,
                    flags: 0,
                    user_stack,
                    kernel_stack,
                })
                .collect())
        }

        fn aggregate(&self, key: &StackKey) -> Result<u64, Error> {
            self.faults.borrow_mut().check(Operation::Read)?;
            Ok(self.counts[&(key.tgid, key.user_stack, key.kernel_stack)])
        }

        fn remove_aggregate(&mut self, key: &StackKey) -> Result<(), Error> {
            self.faults.borrow_mut().check(Operation::Remove)?;
            self.counts
                .remove(&(key.tgid, key.user_stack, key.kernel_stack));
            Ok(())
        }

        fn stack_keys(&self, kind: StackKind) -> Result<Vec<u64>, Error> {
            self.faults.borrow_mut().check(Operation::ReadKeys)?;
            Ok(self
                .stacks
                .keys()
                .filter(|(tag, _)| *tag == kind_tag(kind))
                .map(|&(_, hash)| hash)
                .collect())
        }

        fn stack(&self, kind: StackKind, hash: u64) -> Result<Vec<u64>, Error> {
            self.faults.borrow_mut().check(Operation::Read)?;
            Ok(self.stacks[&(kind_tag(kind), hash)].clone())
        }

        fn remove_stack(&mut self, kind: StackKind, hash: u64) -> Result<(), Error> {
            self.faults.borrow_mut().check(Operation::Remove)?;
            self.stacks.remove(&(kind_tag(kind), hash));
            Ok(())
        }
    }

    struct FakeControl {
        epoch: u64,
        faults: std::rc::Rc<std::cell::RefCell<Faults>>,
    }

    impl EpochControl for FakeControl {
        fn publish(&mut self, epoch: u64) -> Result<(), Error> {
            self.faults.borrow_mut().check(Operation::Publish)?;
            self.epoch = epoch;
            Ok(())
        }

        fn wait_for_programs(&mut self) -> Result<(), Error> {
            self.faults.borrow_mut().check(Operation::Wait)
        }
    }

    /// A program run: adds `n` samples of process `tgid` to the generation the epoch selects.
    fn record(drain: &mut Drain<u64, FakeGeneration>, control: &FakeControl, tgid: u32, n: u64) {
        let generation = &mut drain.generations[(control.epoch & 1) as usize];
        let user_stack = 100 + u64::from(tgid);
        generation
            .stacks
            .insert((0, user_stack), vec![0x1000, u64::from(tgid)]);
        *generation
            .counts
            .entry((tgid, user_stack, NO_STACK))
            .or_default() += n;
    }

    fn total(drained: &[Drained<u64>]) -> u64 {
        drained.iter().map(|stack| stack.value).sum()
    }

    #[test]
    fn every_recorded_sample_is_drained_exactly_once_whatever_fails() {
        let operations = [
            Operation::Publish,
            Operation::Wait,
            Operation::ReadKeys,
            Operation::Read,
            Operation::Remove,
        ];
        for operation in operations {
            for after in 0..6 {
                let faults = std::rc::Rc::new(std::cell::RefCell::new(Faults::default()));
                let generation = || FakeGeneration {
                    faults: faults.clone(),
                    ..FakeGeneration::default()
                };
                let mut control = FakeControl {
                    epoch: 99,
                    faults: faults.clone(),
                };
                let mut drain =
                    Drain::new(&mut control, [generation(), generation()]).expect("new");
                let (mut recorded, mut drained, mut errors) = (0, 0, 0);
                for round in 0..12u64 {
                    for tgid in 1..4 {
                        record(&mut drain, &control, tgid, round + u64::from(tgid));
                        recorded += round + u64::from(tgid);
                    }
                    if round == 3 {
                        faults.borrow_mut().failing = Some((operation, after));
                    }
                    match drain.drain(&mut control) {
                        Ok(stacks) => {
                            assert!(
                                stacks
                                    .iter()
                                    .all(|s| matches!(s.user, RawFrames::Captured(_)))
                            );
                            drained += total(&stacks);
                        }
                        Err(_) => errors += 1,
                    }
                }
                // Nothing more is recorded: the last drains collect the rest.
                for _ in 0..3 {
                    drained += total(&drain.drain(&mut control).expect("no faults left"));
                }
                assert_eq!(
                    drained, recorded,
                    "{operation:?} failing after {after}: {errors} failed drains"
                );
                let left: usize = drain
                    .generations()
                    .iter()
                    .map(|g| g.counts.len() + g.stacks.len())
                    .sum();
                assert_eq!(left, 0, "{operation:?} after {after}: keys left");
            }
        }
    }

    #[test]
    fn a_failed_flip_leaves_programs_on_their_generation() {
        let faults = std::rc::Rc::new(std::cell::RefCell::new(Faults::default()));
        let mut control = FakeControl {
            epoch: 0,
            faults: faults.clone(),
        };
        let generation = || FakeGeneration {
            faults: faults.clone(),
            ..FakeGeneration::default()
        };
        let mut drain = Drain::new(&mut control, [generation(), generation()]).expect("new");
        faults.borrow_mut().failing = Some((Operation::Publish, 0));
        assert!(drain.drain(&mut control).is_err());
        assert_eq!(control.epoch, 0);
        drain.drain(&mut control).expect("retry");
        assert_eq!(control.epoch, 1);
    }
}
