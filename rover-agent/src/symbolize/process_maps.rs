//! Snapshots of processes' executable mappings, taken while they live so that their stacks
//! still symbolize after they exit. Reading `/proc` only: the files a snapshot maps are opened
//! and held by the [`ProcessTable`](super::ProcessTable).

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use procfs::ProcError;
use procfs::process::{MMPermissions, MMapPath, MemoryMap, Process};

use super::mapped_files::FileId;

const DELETED_SUFFIX: &str = " (deleted)";

/// What an executable mapping maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    /// A file, held open by the process table unless it could not be opened or used.
    File(FileId),
    Vdso,
    /// Anonymous (JIT) memory or another pseudo-mapping: nothing to read symbols from.
    Anonymous,
}

#[derive(Clone, Debug)]
pub(super) struct Mapping {
    pub range: Range<u64>,
    /// File offset of `range.start`.
    pub offset: u64,
    /// The path the process sees (without ` (deleted)`), or `[anon]`, `[vdso]`, `[heap]`...
    /// Shared: snapshots of forked processes and located stack entries copy it.
    pub module: Arc<str>,
    pub target: Target,
}

impl Mapping {
    /// The file offset of `addr`, which lies in (or just past) the mapping.
    pub fn file_offset(&self, addr: u64) -> u64 {
        addr.wrapping_sub(self.range.start)
            .wrapping_add(self.offset)
    }
}

/// A mapping as read from `/proc/PID/maps`, with what opening its file needs.
#[derive(Debug)]
pub(super) struct ReadMapping {
    pub mapping: Mapping,
    /// For file mappings: the path as the process sees it, and whether it was deleted.
    pub path: Option<(PathBuf, bool)>,
}

/// How the process a snapshot was taken of is told from a later one with its PID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum StartTime {
    /// Never seen alive: nothing is known.
    #[default]
    Never,
    /// Cloned from its parent at fork without reading `/proc`: read at the next check.
    Unread,
    /// `starttime` from `/proc/PID/stat`.
    At(u64),
}

#[derive(Clone, Debug, Default)]
pub(super) struct ProcessSnapshot {
    pub start_time: StartTime,
    /// `comm`, read with the mappings.
    pub name: Option<String>,
    /// Sorted by address, not overlapping.
    pub mappings: Vec<Mapping>,
    /// When the process was reported, or found, exited.
    pub exited_at: Option<Instant>,
    /// Tells this snapshot from a later one of the same PID (set by the process table).
    pub serial: u64,
}

impl ProcessSnapshot {
    /// The mapping containing `addr`.
    pub fn find(&self, addr: u64) -> Option<&Mapping> {
        let index = self
            .mappings
            .partition_point(|mapping| mapping.range.start <= addr)
            .checked_sub(1)?;
        let mapping = &self.mappings[index];
        mapping.range.contains(&addr).then_some(mapping)
    }

    pub fn files(&self) -> impl Iterator<Item = FileId> + '_ {
        self.mappings
            .iter()
            .filter_map(|mapping| match mapping.target {
                Target::File(file) => Some(file),
                Target::Vdso | Target::Anonymous => None,
            })
    }
}

/// What `/proc/PID/stat` shows of a live process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ProcessStat {
    pub start_time: u64,
    pub name: String,
}

/// The stat of `pid`; `Err` if it is gone, a zombie or dead (its memory map is gone).
pub(super) fn read_stat(pid: u32) -> Result<ProcessStat, ProcError> {
    let stat = Process::new(proc_pid(pid)?)?.stat()?;
    if is_dead(stat.state) {
        return Err(ProcError::NotFound(None));
    }
    Ok(ProcessStat {
        start_time: stat.starttime,
        name: stat.comm,
    })
}

/// The executable mappings of `pid`, sorted by address.
pub(super) fn read_mappings(pid: u32) -> Result<Vec<ReadMapping>, ProcError> {
    let mut mappings: Vec<ReadMapping> = Process::new(proc_pid(pid)?)?
        .maps()?
        .into_iter()
        .filter(|map| map.perms.contains(MMPermissions::EXECUTE))
        .map(read_mapping)
        .collect();
    mappings.sort_unstable_by_key(|read| read.mapping.range.start);
    Ok(mappings)
}

/// Whether `pid` still runs the process that started at `start_time`.
pub(super) fn is_running(pid: u32, start_time: u64) -> bool {
    read_stat(pid).is_ok_and(|stat| stat.start_time == start_time)
}

fn proc_pid(pid: u32) -> Result<i32, ProcError> {
    i32::try_from(pid).map_err(|_| ProcError::NotFound(None))
}

/// Zombie or dead: the memory map is gone.
fn is_dead(state: char) -> bool {
    matches!(state, 'Z' | 'X')
}

fn read_mapping(map: MemoryMap) -> ReadMapping {
    let (start, end) = map.address;
    let (module, target, path) = match map.pathname {
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
            (module, Target::File(file), Some((path, deleted)))
        }
        MMapPath::Vdso => ("[vdso]".to_owned(), Target::Vdso, None),
        other => (pseudo_path_name(&other), Target::Anonymous, None),
    };
    ReadMapping {
        mapping: Mapping {
            range: start..end,
            offset: map.offset,
            module: module.into(),
            target,
        },
        path,
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
    use std::path::Path;

    use super::*;

    fn mapping(range: Range<u64>) -> Mapping {
        Mapping {
            range,
            offset: 0x1000,
            module: "[anon]".into(),
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
    fn own_process_mappings_have_the_test_binary() {
        let pid = std::process::id();
        let stat = read_stat(pid).expect("own process is readable");
        assert!(is_running(pid, stat.start_time));
        assert!(!is_running(pid, stat.start_time + 1));
        let mappings = read_mappings(pid).expect("own maps are readable");
        let own = own_process_mappings_have_the_test_binary as fn() as usize as u64;
        let read = mappings
            .iter()
            .find(|read| read.mapping.range.contains(&own))
            .expect("own code is mapped");
        assert!(matches!(read.mapping.target, Target::File(_)), "{read:?}");
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(Path::new(&*read.mapping.module), exe);
        assert_eq!(read.path.as_ref().map(|(path, _)| path), Some(&exe));
    }

    #[test]
    fn vanished_process_is_an_error_not_a_panic() {
        // PIDs above pid_max (at most 2^22) never exist.
        assert!(read_stat(u32::MAX - 1).is_err());
        assert!(read_stat(1 << 23).is_err());
        assert!(read_mappings(1 << 23).is_err());
        assert!(!is_running(1 << 23, 0));
    }
}
