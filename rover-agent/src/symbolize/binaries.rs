//! Open binaries shared by all processes, each with its own symbol cache.
//!
//! A binary is found by the (device, inode) that `/proc/PID/maps` shows, so a file already
//! known is never opened again; a new file is opened once and keyed by its GNU build ID when it
//! has one, so identical binaries (e.g. one image in many containers) share one open file and
//! one cache. The file stays open while any process snapshot uses it: it outlives its processes
//! and its path (deleted binaries, other mount namespaces), and blazesym reads it through
//! `/proc/self/fd/N`.
//!
//! A binary with a separate debug file ([`DebugFile`], looked for when the binary is opened) is
//! looked up there first, then in the binary itself for what the debug file leaves unknown. The
//! debug file is held open and closed with the binary.

use std::collections::{HashMap, HashSet};
use std::error::Error;
use std::fs::File;
use std::io;
use std::path::PathBuf;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Reason, Symbolized, evict};
use tracing::{debug, warn};

use super::SymbolizeStats;
use super::debug_file::{DebugFile, fd_path};
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
    debug_file: Option<DebugFile>,
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
    /// The binary mapped from `file` by process `pid`, opening it with `open` only if it is not
    /// known yet. `None` if the file cannot be used (warned once per file).
    pub fn get_or_open(
        &mut self,
        pid: u32,
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
        match self.open(pid, name, open, stats) {
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
        pid: u32,
        name: &str,
        open: impl FnOnce() -> io::Result<File>,
        stats: &mut SymbolizeStats,
    ) -> Result<BinaryId, Box<dyn Error>> {
        let file = open()?;
        let fd_path = fd_path(&file);
        let build_id = blazesym::helper::read_elf_build_id(&fd_path)?.map(|id| id.into_owned());
        if let Some(&id) = build_id.as_ref().and_then(|id| self.by_build_id.get(id)) {
            return Ok(id);
        }
        let id = BinaryId(self.next_id);
        self.next_id += 1;
        stats.binaries_opened += 1;
        let debug_file = match build_id
            .as_deref()
            .map(|id| DebugFile::find(pid, id, &file))
        {
            Some(Ok(Some(debug_file))) => {
                debug!(binary = name, debug_file = %debug_file.path.display(), "found debug file");
                Some(debug_file)
            }
            Some(Ok(None)) | None => None,
            Some(Err(error)) => {
                warn!(binary = name, %error, "cannot use the debug file of binary");
                None
            }
        };
        if let Some(build_id) = build_id {
            self.by_build_id.insert(build_id, id);
        }
        self.binaries.insert(
            id,
            Binary {
                _file: file,
                fd_path,
                name: name.to_owned(),
                debug_file,
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

    /// Looks up the file offsets not cached yet, one blazesym call per binary and file.
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
            let debug_file = binary.debug_file.as_mut().filter(|file| !file.broken);
            if binary.broken && debug_file.is_none() {
                continue;
            }
            let mut debug_failed = None;
            let source = Source::Elf(Elf {
                // The debug file holds the binary's DWARF: not read a second time (through the
                // binary's debug link) for what it could not resolve.
                debug_syms: debug_info && debug_file.is_none(),
                ..Elf::new(&binary.fd_path)
            });
            let binary_broken = binary.broken;
            let offsets = group.iter().map(|&(_, offset)| offset);
            let result = fill_cache(&mut binary.symbols, offsets, stats, |offsets| {
                let mut found = match debug_file {
                    Some(file) => file
                        .symbolize(blazesym, debug_info, offsets)
                        .unwrap_or_else(|error| {
                            file.broken = true;
                            debug_failed = Some(error);
                            unknown(offsets.len())
                        }),
                    None => unknown(offsets.len()),
                };
                let rest: Vec<usize> = (0..offsets.len())
                    .filter(|&index| !matches!(found[index], Symbolized::Sym(_)))
                    .collect();
                if rest.is_empty() || binary_broken {
                    return Ok(found);
                }
                let rest_offsets: Vec<u64> = rest.iter().map(|&index| offsets[index]).collect();
                let in_binary = blazesym.symbolize(&source, Input::FileOffset(&rest_offsets))?;
                for (index, symbolized) in rest.into_iter().zip(in_binary) {
                    found[index] = symbolized;
                }
                Ok(found)
            });
            let mut problems = Vec::new();
            if let (Some(file), Some(error)) = (&binary.debug_file, debug_failed) {
                problems.push(format!("debug file {}: {error}", file.path.display()));
            }
            match result {
                Ok(0) => {}
                Ok(failed) => problems.push(format!("{failed} lookups failed")),
                Err(error) => {
                    binary.broken = true;
                    problems.push(error.to_string());
                }
            }
            if !problems.is_empty() && !binary.warned {
                let problem = problems.join("; ");
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
            // blazesym must let go of the paths before the fd numbers can name other files.
            let debug_file = binary.debug_file.as_ref().map(|file| &file.fd_path);
            for fd_path in [&binary.fd_path].into_iter().chain(debug_file) {
                let evict = evict::Evict::Elf(evict::Elf::new(fd_path));
                if let Err(error) = blazesym.evict(&evict) {
                    warn!(binary = binary.name, %error, "cannot evict binary from blazesym's cache");
                }
            }
            false
        });
    }

    /// How many binaries are held open.
    pub fn len(&self) -> usize {
        self.binaries.len()
    }
}

/// `count` results for addresses not looked up yet.
fn unknown<'s>(count: usize) -> Vec<Symbolized<'s>> {
    (0..count)
        .map(|_| Symbolized::Unknown(Reason::UnknownAddr))
        .collect()
}
