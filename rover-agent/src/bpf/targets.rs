//! The in-kernel target filter of one profiler: which processes it records, each with its
//! options, reference-counted across the tasks that want it.
//!
//! `TARGETS` maps a TGID to its [`TargetOptions`]; the `CONTROL` slots say whether every process
//! is a target (and with which options). The programs cache the last target per CPU, valid
//! while the targets' version is unchanged, so every removal or change bumps the version here
//! (after the map changed: a program that read the old version cannot have cached anything the
//! new map lacks). The kernel removes a target itself when its process exits (`target_exit`);
//! [`TargetTable::exited`] then forgets it here.

use std::collections::HashMap as StdHashMap;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, MapError};
use rover_common::{TARGET_EXCLUDE_PREEMPT, control};

use super::Error;

/// What the kernel applies to a target process (off-CPU; the on-CPU sampler has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetOptions {
    /// Leave out involuntary switches (preemption of a runnable thread).
    pub exclude_preempt: bool,
    /// Leave out episodes shorter than this.
    pub min_block: Duration,
}

impl TargetOptions {
    fn to_kernel(self) -> rover_common::TargetOptions {
        rover_common::TargetOptions {
            min_block_ns: u64::try_from(self.min_block.as_nanos()).unwrap_or(u64::MAX),
            flags: if self.exclude_preempt {
                TARGET_EXCLUDE_PREEMPT
            } else {
                0
            },
            _padding: 0,
        }
    }
}

impl std::fmt::Display for TargetOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "min-block {:?}, exclude-preempt {}",
            self.min_block, self.exclude_preempt
        )
    }
}

struct Held {
    /// Recordings holding this target.
    holders: u32,
    options: TargetOptions,
}

pub(super) struct TargetTable {
    profiler: &'static str,
    map: HashMap<MapData, u32, rover_common::TargetOptions>,
    capacity: u32,
    held: StdHashMap<u32, Held>,
    /// Recordings of every process, and their options.
    all: Option<(u32, TargetOptions)>,
    /// The value of `control::TARGETS_VERSION`, which only this table writes.
    version: u64,
}

impl TargetTable {
    pub fn new(
        profiler: &'static str,
        map: HashMap<MapData, u32, rover_common::TargetOptions>,
        capacity: u32,
    ) -> Self {
        Self {
            profiler,
            map,
            capacity,
            held: StdHashMap::new(),
            all: None,
            version: 0,
        }
    }

    /// One more recording wants `pid` with `options`.
    pub fn add(
        &mut self,
        control: &mut Array<MapData, u64>,
        pid: u32,
        options: TargetOptions,
    ) -> Result<(), Error> {
        let conflict = |existing: TargetOptions| Error::TargetOptionsConflict {
            pid,
            existing: existing.to_string(),
        };
        if let Some((_, all_options)) = self.all
            && all_options != options
        {
            return Err(conflict(all_options));
        }
        if let Some(held) = self.held.get_mut(&pid) {
            if held.options != options {
                return Err(conflict(held.options));
            }
            held.holders += 1;
            return Ok(());
        }
        let full = Error::TargetMapFull {
            profiler: self.profiler,
            pid,
            capacity: self.capacity,
        };
        if self.held.len() >= self.capacity as usize {
            return Err(full);
        }
        match self.map.insert(pid, options.to_kernel(), 0) {
            Ok(()) => {}
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                return Err(full);
            }
            Err(source) => return Err(map_error("update")(source)),
        }
        self.held.insert(
            pid,
            Held {
                holders: 1,
                options,
            },
        );
        // A stale cache entry of an earlier target with this pid carried other options.
        self.bump_version(control)
    }

    /// A recording no longer wants `pid`; the target goes when none does. Returns whether it
    /// went.
    pub fn remove(&mut self, control: &mut Array<MapData, u64>, pid: u32) -> Result<bool, Error> {
        let Some(held) = self.held.get_mut(&pid) else {
            return Ok(false);
        };
        held.holders -= 1;
        if held.holders > 0 {
            return Ok(false);
        }
        self.held.remove(&pid);
        self.delete(control, pid)?;
        Ok(true)
    }

    /// The process exited: the kernel removed its target already (or will find none); forget it.
    pub fn exited(&mut self, control: &mut Array<MapData, u64>, pid: u32) -> Result<(), Error> {
        if self.held.remove(&pid).is_some() {
            // Also removes an entry added after the kernel's `target_exit` ran.
            self.delete(control, pid)?;
        }
        Ok(())
    }

    fn delete(&mut self, control: &mut Array<MapData, u64>, pid: u32) -> Result<(), Error> {
        super::error::deleted(self.map.remove(&pid)).map_err(map_error("delete"))?;
        self.bump_version(control)
    }

    /// One more recording of every process.
    pub fn add_all(
        &mut self,
        control: &mut Array<MapData, u64>,
        options: TargetOptions,
    ) -> Result<(), Error> {
        if let Some((count, all_options)) = &mut self.all {
            if *all_options != options {
                return Err(Error::TargetOptionsConflict {
                    pid: 0,
                    existing: all_options.to_string(),
                });
            }
            *count += 1;
            return Ok(());
        }
        if let Some((&pid, held)) = self.held.iter().find(|(_, held)| held.options != options) {
            return Err(Error::TargetOptionsConflict {
                pid,
                existing: held.options.to_string(),
            });
        }
        let kernel = options.to_kernel();
        set(control, control::ALL_MIN_BLOCK_NS, kernel.min_block_ns)?;
        set(control, control::ALL_FLAGS, u64::from(kernel.flags))?;
        set(control, control::ALL_TARGETS, 1)?;
        self.all = Some((1, options));
        Ok(())
    }

    /// A recording of every process ended.
    pub fn remove_all(&mut self, control: &mut Array<MapData, u64>) -> Result<(), Error> {
        match &mut self.all {
            Some((count, _)) if *count > 1 => *count -= 1,
            Some(_) => {
                set(control, control::ALL_TARGETS, 0)?;
                self.all = None;
            }
            None => {}
        }
        Ok(())
    }

    /// Whether `pid` is a target of its own (not only through "every process").
    pub fn holds(&self, pid: u32) -> bool {
        self.held.contains_key(&pid)
    }

    /// Entries of the kernel map (the soak and the tests check it ends empty).
    pub fn kernel_entries(&self) -> usize {
        self.map.keys().count()
    }

    fn bump_version(&mut self, control: &mut Array<MapData, u64>) -> Result<(), Error> {
        self.version += 1;
        set(control, control::TARGETS_VERSION, self.version)
    }
}

fn set(control: &mut Array<MapData, u64>, slot: u32, value: u64) -> Result<(), Error> {
    control.set(slot, value, 0).map_err(|source| Error::Map {
        map: "CONTROL",
        operation: "update",
        source,
    })
}

fn map_error(operation: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map {
        map: "TARGETS",
        operation,
        source,
    }
}
