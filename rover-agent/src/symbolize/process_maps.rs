//! Snapshots of processes' executable mappings, taken while they live so that their stacks
//! still symbolize after they exit.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use procfs::ProcError;
use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process};

use super::SymbolizeStats;
use super::binaries::{BinaryCache, BinaryId, FileId};

const DELETED_SUFFIX: &str = " (deleted)";

/// What an executable mapping maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// A binary held open in the [`BinaryCache`].
    Binary(BinaryId),
    /// A file that could not be opened or read.
    Unusable(FileId),
    Vdso,
    /// Anonymous (JIT) memory or another pseudo-mapping: nothing to read symbols from.
    Anonymous,
}

#[derive(Debug)]
pub(super) struct Mapping {
    pub range: Range<u64>,
    /// File offset of `range.start`.
    pub offset: u64,
    /// The path the process sees (without ` (deleted)`), or `[anon]`, `[vdso]`, `[heap]`...
    pub module: String,
    pub target: Target,
}

impl Mapping {
    /// The file offset of `addr`, which lies in (or just past) the mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.range.start)
            .wrapping_add(self.offset)
    }
}

#[derive(Debug, Default)]
pub(super) struct ProcessSnapshot {
    /// `starttime` from `/proc/PID/stat`: tells the process from a later one with its PID.
    /// `None` when the process was never seen alive.
    start_time: Option<u64>,
    /// Sorted by address, not overlapping.
    mappings: Vec<Mapping>,
    /// When [`Self::is_running`] was first seen false.
    pub exited_at: Option<Instant>,
}

impl ProcessSnapshot {
    /// Reads the executable mappings of `pid` and opens (or finds) the binaries they map.
    pub fn take(
        pid: u32,
        binaries: &mut BinaryCache,
        stats: &mut SymbolizeStats,
    ) -> Result<Self, ProcError> {
        let process = Process::new(proc_pid(pid)?)?;
        let stat = process.stat()?;
        if is_dead(stat.state) {
            return Err(ProcError::NotFound(None));
        }
        let mut mappings: Vec<Mapping> = process
            .maps()?
            .into_iter()
            .filter(|map| map.perms.contains(MMPermissions::EXECUTE))
            .map(|map| snapshot_mapping(pid, &map, binaries, stats))
            .collect();
        mappings.sort_unstable_by_key(|mapping| mapping.range.start);
        Ok(Self {
            start_time: Some(stat.starttime),
            mappings,
            exited_at: None,
        })
    }

    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let index = self
            .mappings
            .partition_point(|mapping| mapping.range.start <= addr)
            .checked_sub(1)?;
        let mapping = &self.mappings[index];
        mapping.range.contains(&addr).then_some(mapping)
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// Whether `pid` still runs the process this snapshot was taken of.
    pub fn is_running(&self, pid: u32) -> bool {
        let Some(start_time) = self.start_time else {
            return false;
        };
        let stat = proc_pid(pid)
            .and_then(Process::new)
            .and_then(|process| process.stat());
        stat.is_ok_and(|stat| !is_dead(stat.state) && stat.starttime == start_time)
    }
}

fn proc_pid(pid: u32) -> Result<i32, ProcError> {
    i32::try_from(pid).map_err(|_| ProcError::NotFound(None))
}

/// Zombie or dead: the memory map is gone.
fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

fn snapshot_mapping(
    pid: u32,
    map: &MemoryMap,
    binaries: &mut BinaryCache,
    stats: &mut SymbolizeStats,
) -> Mapping {
    let (start, end) = map.address;
    let (module, target) = match &map.pathname {
        MMapPath::Path(path) => {
            let shown = path.to_string_lossy();
            let (module, deleted) = match shown.strip_suffix(DELETED_SUFFIX) {
                Some(module) => (module.to_owned(), true),
                None => (shown.into_owned(), false),
            };
            let file = FileId {
                dev: map.dev,
                inode: map.inode,
            };
            let open = || open_mapped(pid, map.address, path, deleted);
            let target = match binaries.get_or_open(pid, file, &module, open, stats) {
                Some(binary) => Target::Binary(binary),
                None => Target::Unusable(file),
            };
            (module, target)
        }
        MMapPath::Vdso => ("[vdso]".to_owned(), Target::Vdso),
        other => (pseudo_path_name(other), Target::Anonymous),
    };
    Mapping {
        range: start..end,
        offset: map.offset,
        module,
        target,
    }
}

/// Opens a mapped file the way the process sees it: `/proc/PID/map_files` reaches it in any
/// mount namespace and after deletion; `/proc/PID/root/PATH` is the fallback without
/// CAP_SYS_ADMIN (it cannot reach deleted files, whose path may name another file by now).
fn open_mapped(pid: u32, (start, end): (u64, u64), path: &Path, deleted: bool) -> io::Result<File> {
    let map_file = File::open(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    match map_file {
        Ok(file) => Ok(file),
        Err(error) if deleted => Err(error),
        Err(_) => {
            let mut rooted = OsString::from(format!("/proc/{pid}/root"));
            rooted.push(path.as_os_str());
            File::open(rooted)
        }
    }
}

/// The `Frame::module` of a mapping without a file.
fn pseudo_path_name(path: &MMapPath) -> String {
    match path {
        MMapPath::Anonymous => "[anon]".to_owned(),
        MMapPath::Heap => "[heap]".to_owned(),
        MMapPath::Stack => "[stack]".to_owned(),
        MMapPath::TStack(tid) => format!("[stack:{tid}]"),
        MMapPath::Vdso => "[vdso]".to_owned(),
        MMapPath::Vvar => "[vvar]".to_owned(),
        MMapPath::Vsyscall => "[vsyscall]".to_owned(),
        MMapPath::Rollup => "[rollup]".to_owned(),
        MMapPath::Vsys(key) => format!("/SYSV{key:08x}"),
        MMapPath::Other(name) => format!("[{name}]"),
        MMapPath::Path(path) => path.to_string_lossy().into_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapping(range: Range<u64>) -> Mapping {
        Mapping {
            range,
            offset: 0x1000,
            module: "[anon]".to_owned(),
            target: Target::Anonymous,
        }
    }

    #[test]
    fn find_returns_the_covering_mapping_only() {
        let snapshot = ProcessSnapshot {
            mappings: vec![mapping(0x1000..0x2000), mapping(0x3000..0x4000)],
            ..ProcessSnapshot::default()
        };
        assert_eq!(snapshot.find(0x0fff).map(|m| m.range.start), None);
        assert_eq!(snapshot.find(0x1000).map(|m| m.range.start), Some(0x1000));
        assert_eq!(snapshot.find(0x1fff).map(|m| m.range.start), Some(0x1000));
        assert_eq!(snapshot.find(0x2000).map(|m| m.range.start), None);
        assert_eq!(snapshot.find(0x3abc).map(|m| m.range.start), Some(0x3000));
        assert_eq!(snapshot.find(u64::MAX).map(|m| m.range.start), None);
        assert_eq!(mapping(0x1000..0x2000).file_offset(0x1234), 0x1234);
    }

    #[test]
    fn pseudo_paths_keep_their_proc_names() {
        assert_eq!(pseudo_path_name(&MMapPath::Anonymous), "[anon]");
        assert_eq!(
            pseudo_path_name(&MMapPath::Other("anon:jit".to_owned())),
            "[anon:jit]"
        );
        assert_eq!(pseudo_path_name(&MMapPath::TStack(7)), "[stack:7]");
    }

    #[test]
    fn own_process_snapshot_has_the_test_binary() {
        let mut binaries = BinaryCache::default();
        let mut stats = SymbolizeStats::default();
        let snapshot = ProcessSnapshot::take(std::process::id(), &mut binaries, &mut stats)
            .expect("own process is readable");
        assert!(snapshot.is_running(std::process::id()));
        let own = snapshot_addr();
        let mapping = snapshot.find(own).expect("own code is mapped");
        assert!(matches!(mapping.target, Target::Binary(_)), "{mapping:?}");
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(Path::new(&mapping.module), exe);
    }

    fn snapshot_addr() -> u64 {
        own_process_snapshot_has_the_test_binary as fn() as usize as u64
    }

    #[test]
    fn vanished_process_is_an_error_not_a_panic() {
        let mut binaries = BinaryCache::default();
        let mut stats = SymbolizeStats::default();
        // PIDs above pid_max (at most 2^22) never exist.
        assert!(ProcessSnapshot::take(u32::MAX - 1, &mut binaries, &mut stats).is_err());
        assert!(ProcessSnapshot::take(1 << 23, &mut binaries, &mut stats).is_err());
        assert!(!ProcessSnapshot::default().is_running(1));
    }
}
