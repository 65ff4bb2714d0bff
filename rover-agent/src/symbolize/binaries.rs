//! The binaries stacks were symbolized in, each with its parse in blazesym's cache.
//!
//! A binary comes from a file the [`ProcessTable`](super::ProcessTable) holds open, found by the
//! (device, inode) that `/proc/PID/maps` showed. It is keyed by its GNU build ID when it has one,
//! so identical binaries (e.g. one image in many containers) share one blazesym parse and one
//! set of cache entries. Its file is shared with the table (`Arc`): it stays open while the
//! binary is used, and blazesym reads it through `/proc/self/fd/N`, whatever happened to its
//! path (deleted binaries, other mount namespaces).
//!
//! A binary with a separate debug file (found when the table opened it) is looked up there
//! first, then in the binary itself for what the debug file leaves unknown.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Reason, Symbolized, evict};
use tracing::warn;

use super::SymbolizeStats;
use super::mapped_files::{FileId, MappedFile};
use super::process_table::ProcessTable;
use super::resolved::Symbols;
use super::symbol_cache::{SymbolCache, SymbolKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct BinaryId(pub(super) u64);

struct Binary {
    file: Arc<MappedFile>,
    /// When its symbols were last looked up, and whether blazesym may hold its parse (symbol
    /// tables, DWARF) since: a binary no stack needed for a while is evicted from blazesym's
    /// cache, so that what stays parsed is what is in use.
    last_used: Instant,
    parsed: bool,
    /// Set after blazesym failed on the whole file (malformed ELF...): not parsed again.
    broken: bool,
    /// The same for the debug file.
    debug_file_broken: bool,
    /// Whether a failure was logged: once per binary.
    warned: bool,
}

#[derive(Default)]
pub(super) struct BinaryCache {
    binaries: HashMap<BinaryId, Binary>,
    by_file: HashMap<FileId, BinaryId>,
    by_build_id: HashMap<Vec<u8>, BinaryId>,
    next_id: u64,
}

impl BinaryCache {
    /// The binary of `file` (opened by the table as `mapped`).
    pub fn binary(
        &mut self,
        file: FileId,
        mapped: &Arc<MappedFile>,
        stats: &mut SymbolizeStats,
    ) -> BinaryId {
        if let Some(&id) = self.by_file.get(&file) {
            return id;
        }
        let known = mapped
            .build_id
            .as_ref()
            .and_then(|build_id| self.by_build_id.get(build_id));
        let id = match known {
            Some(&id) => id,
            None => {
                let id = BinaryId(self.next_id);
                self.next_id += 1;
                stats.binaries_opened += 1;
                if let Some(build_id) = &mapped.build_id {
                    self.by_build_id.insert(build_id.clone(), id);
                }
                self.binaries.insert(
                    id,
                    Binary {
                        file: Arc::clone(mapped),
                        last_used: Instant::now(),
                        parsed: false,
                        broken: false,
                        debug_file_broken: false,
                        warned: false,
                    },
                );
                id
            }
        };
        self.by_file.insert(file, id);
        id
    }

    /// Puts the symbols of the `wanted` file offsets in `found`, from `cache` or looked up with
    /// one blazesym call per binary and file.
    pub fn resolve(
        &mut self,
        blazesym: &blazesym::symbolize::Symbolizer,
        debug_info: bool,
        cache: &mut SymbolCache,
        mut wanted: Vec<(BinaryId, u64)>,
        found: &mut HashMap<SymbolKey, Symbols>,
        stats: &mut SymbolizeStats,
    ) {
        wanted.sort_unstable();
        for group in wanted.chunk_by(|a, b| a.0 == b.0) {
            let id = group[0].0;
            let Some(binary) = self.binaries.get_mut(&id) else {
                continue;
            };
            binary.last_used = Instant::now();
            binary.parsed = true;
            let debug_file = binary
                .file
                .debug_file
                .as_ref()
                .filter(|_| !binary.debug_file_broken);
            if binary.broken && debug_file.is_none() {
                continue;
            }
            let mut debug_failed = None;
            let source = Source::Elf(Elf {
                // The debug file holds the binary's DWARF: not read a second time (through the
                // binary's debug link) for what it could not resolve.
                debug_syms: debug_info && debug_file.is_none(),
                ..Elf::new(&binary.file.fd_path)
            });
            let binary_broken = binary.broken;
            let offsets = group.iter().map(|&(_, offset)| offset);
            let key = |offset| SymbolKey::Binary(id, offset);
            let result = cache.fill(offsets, key, found, stats, |offsets| {
                let mut found = match debug_file {
                    Some(file) => file
                        .symbolize(blazesym, debug_info, offsets)
                        .unwrap_or_else(|error| {
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
            if let (Some(file), Some(error)) = (&binary.file.debug_file, debug_failed) {
                binary.debug_file_broken = true;
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
                let name = &binary.file.name;
                warn!(binary = name, %problem, "cannot read symbols; frames stay unknown");
                binary.warned = true;
            }
        }
    }

    /// Drops the binaries none of whose files `table` still holds, with their entries in
    /// `cache` and their parse in blazesym's cache.
    pub fn retain_held(
        &mut self,
        table: &ProcessTable,
        blazesym: &mut blazesym::symbolize::Symbolizer,
        cache: &mut SymbolCache,
    ) {
        table.retain_held(&mut self.by_file);
        let used: HashSet<BinaryId> = self.by_file.values().copied().collect();
        self.by_build_id.retain(|_, id| used.contains(id));
        let retired: HashSet<BinaryId> = self
            .binaries
            .extract_if(|id, _| !used.contains(id))
            .map(|(id, binary)| {
                // blazesym must let go of the paths before the fd numbers can name other files:
                // the file closes when the last `Arc` (maybe this one) goes.
                evict_parse(blazesym, &binary);
                id
            })
            .collect();
        if !retired.is_empty() {
            cache.retain(|key| !matches!(key, SymbolKey::Binary(id, _) if retired.contains(id)));
        }
    }

    /// Evicts from blazesym's cache the parse of binaries whose symbols were not looked up for
    /// `idle`; a later lookup parses them again. Returns how many were evicted.
    pub fn evict_idle(
        &mut self,
        blazesym: &mut blazesym::symbolize::Symbolizer,
        now: Instant,
        idle: Duration,
    ) -> usize {
        let mut evicted = 0;
        for binary in self.binaries.values_mut() {
            if binary.parsed && now.saturating_duration_since(binary.last_used) >= idle {
                evict_parse(blazesym, binary);
                binary.parsed = false;
                evicted += 1;
            }
        }
        evicted
    }

    /// How many binaries are in use.
    pub fn len(&self) -> usize {
        self.binaries.len()
    }
}

/// Makes blazesym forget what it parsed of `binary` (and of its debug file).
fn evict_parse(blazesym: &mut blazesym::symbolize::Symbolizer, binary: &Binary) {
    let debug_file = binary.file.debug_file.as_ref().map(|file| &file.fd_path);
    for fd_path in [&binary.file.fd_path].into_iter().chain(debug_file) {
        let evict = evict::Evict::Elf(evict::Elf::new(fd_path));
        if let Err(error) = blazesym.evict(&evict) {
            let name = &binary.file.name;
            warn!(binary = name, %error, "cannot evict binary from blazesym's cache");
        }
    }
}

/// `count` results for addresses not looked up yet.
fn unknown<'s>(count: usize) -> Vec<Symbolized<'s>> {
    (0..count)
        .map(|_| Symbolized::Unknown(Reason::UnknownAddr))
        .collect()
}
