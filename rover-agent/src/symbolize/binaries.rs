//! Open binaries shared by all processes, each with its own symbol cache.
//!
//! A binary is found by the (device, inode) that `/proc/PID/maps` shows, so a file already
//! known is never opened again; a new file is opened once and keyed by its GNU build ID when it
//! has one, so identical binaries (e.g. one image in many containers) share one open file and
//! one cache. The file stays open while any process snapshot uses it: it outlives its processes
//! and its path (deleted binaries, other mount namespaces), and blazesym reads it through
//! `/proc/self/fd/N`.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, evict};
use tracing::warn;

use super::SymbolizeStats;
use super::resolved::{SymbolCache, Symbols, fill_cache};

/// A file as `/proc/PID/maps` identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct FileId {
    pub dev: (i32, i32),
    pub inode: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct BinaryId(u64);

struct Binary {
    /// Held so that `fd_path` keeps naming this file.
    _file: File,
    /// `/proc/self/fd/N`: how blazesym opens (and caches) the file.
    fd_path: PathBuf,
    /// The path a process mapped it under, for log messages.
    name: String,
    symbols: SymbolCache,
    /// Set after blazesym failed on the whole file (malformed ELF...): not parsed again.
    broken: bool,
    /// Whether a failure was logged: once per binary.
    warned: bool,
}

#[derive(Default)]
pub(super) struct BinaryCache {
    binaries: HashMap<BinaryId, Binary>,
    by_file: HashMap<FileId, BinaryId>,
    by_build_id: HashMap<Vec<u8>, BinaryId>,
    /// Files that could not be opened or are no ELF: warned about once, not retried while used.
    unusable: HashSet<FileId>,
    next_id: u64,
}

impl BinaryCache {
    /// The binary mapped from `file`, opening it with `open` only if it is not known yet.
    /// `None` if the file cannot be used (warned once per file).
    pub fn get_or_open(
        &mut self,
        file: FileId,
        name: &str,
        open: impl FnOnce() -> io::Result<File>,
        stats: &mut SymbolizeStats,
    ) -> Option<BinaryId> {
        if let Some(&id) = self.by_file.get(&file) {
            return Some(id);
        }
        if self.unusable.contains(&file) {
            return None;
        }
        match self.open(name, open, stats) {
            Ok(id) => {
                self.by_file.insert(file, id);
                Some(id)
            }
            Err(error) => {
                warn!(binary = name, %error, "cannot open binary; its frames stay unknown");
                self.unusable.insert(file);
                None
            }
        }
    }

    fn open(
        &mut self,
        name: &str,
        open: impl FnOnce() -> io::Result<File>,
        stats: &mut SymbolizeStats,
    ) -> Result<BinaryId, Box<dyn Error>> {
        let file = open()?;
        let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        let build_id = blazesym::helper::read_elf_build_id(&fd_path)?.map(|id| id.into_owned());
        if let Some(&id) = build_id.as_ref().and_then(|id| self.by_build_id.get(id)) {
            return Ok(id);
        }
        let id = BinaryId(self.next_id);
        self.next_id += 1;
        stats.binaries_opened += 1;
        if let Some(build_id) = build_id {
            self.by_build_id.insert(build_id, id);
        }
        self.binaries.insert(
            id,
            Binary {
                _file: file,
                fd_path,
                name: name.to_owned(),
                symbols: SymbolCache::new(),
                broken: false,
                warned: false,
            },
        );
        Ok(id)
    }

    /// What `offset` (a file offset) of `binary` resolved to; empty if unknown or not looked up.
    pub fn symbols(&self, binary: BinaryId, offset: u64) -> Symbols {
        self.binaries
            .get(&binary)
            .and_then(|binary| binary.symbols.get(&offset).cloned())
            .unwrap_or_default()
    }

    /// Looks up the file offsets not cached yet, one blazesym call per binary.
    pub fn resolve(
        &mut self,
        blazesym: &blazesym::symbolize::Symbolizer,
        debug_info: bool,
        mut wanted: Vec<(BinaryId, u64)>,
        stats: &mut SymbolizeStats,
    ) {
        wanted.sort_unstable();
        for group in wanted.chunk_by(|a, b| a.0 == b.0) {
            let Some(binary) = self.binaries.get_mut(&group[0].0) else {
                continue;
            };
            if binary.broken {
                continue;
            }
            let source = Source::Elf(Elf {
                debug_syms: debug_info,
                ..Elf::new(&binary.fd_path)
            });
            let offsets = group.iter().map(|&(_, offset)| offset);
            let result = fill_cache(&mut binary.symbols, offsets, stats, |offsets| {
                blazesym.symbolize(&source, Input::FileOffset(offsets))
            });
            let problem = match result {
                Ok(0) => continue,
                Ok(failed) => format!("{failed} lookups failed"),
                Err(error) => {
                    binary.broken = true;
                    error.to_string()
                }
            };
            if !binary.warned {
                warn!(binary = binary.name, %problem, "cannot read symbols; frames stay unknown");
                binary.warned = true;
            }
        }
    }

    /// Closes the binaries not in `used_binaries` and forgets the unusable files not in
    /// `used_files`: those no process snapshot maps any more.
    pub fn retain_used(
        &mut self,
        blazesym: &mut blazesym::symbolize::Symbolizer,
        used_binaries: &HashSet<BinaryId>,
        used_files: &HashSet<FileId>,
    ) {
        self.unusable.retain(|file| used_files.contains(file));
        self.by_file.retain(|_, id| used_binaries.contains(id));
        self.by_build_id.retain(|_, id| used_binaries.contains(id));
        self.binaries.retain(|id, binary| {
            if used_binaries.contains(id) {
                return true;
            }
            // blazesym must let go of the path before the fd number can name another file.
            let evict = evict::Evict::Elf(evict::Elf::new(&binary.fd_path));
            if let Err(error) = blazesym.evict(&evict) {
                warn!(binary = binary.name, %error, "cannot evict binary from blazesym's cache");
            }
            false
        });
    }

    /// How many binaries are held open.
    pub fn len(&self) -> usize {
        self.binaries.len()
    }
}
