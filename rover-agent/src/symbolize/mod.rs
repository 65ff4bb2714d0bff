//! Addresses → [`Frame`]s with blazesym, for a long-running agent whose processes come and go.
//!
//! Two types split the work so that the thread reacting to process events never waits for a
//! slow symbolization:
//!
//! - [`ProcessTable`] (`Clone` + `Send` + `Sync`, shared by the process watcher and the
//!   symbolizer) snapshots processes while they live: their executable mappings (`process_maps`)
//!   and name, taken when a process appears or `exec`s ([`ProcessTable::capture`]), cloned from
//!   the parent at fork ([`ProcessTable::forked`]), and again when a stack address is not
//!   covered (e.g. after `dlopen`). It holds each mapped file open once, however many processes
//!   map it (`mapped_files`, keyed by device and inode), opened through `/proc/PID/map_files`
//!   (any mount namespace, deleted files), and reads then what needs the process alive: the
//!   file's GNU build ID and its separate debug file. Stacks of exited processes therefore still
//!   symbolize until [`ProcessTable::retire`] forgets them, a grace period after they exited;
//!   their files close with the last snapshot that maps them. Its lock guards map operations
//!   only: `/proc` is read and files opened outside it, and blazesym is never called under it.
//! - [`Symbolizer`] (not `Send`: blazesym's caches use `Rc`; keep it on one thread) turns stacks
//!   into frames. It locates addresses in the table's snapshots, then looks them up in the
//!   binaries they fall in (`binaries`): each file the table holds becomes a binary keyed by
//!   build ID, so identical files (one image in many containers) share one blazesym parse. What
//!   addresses resolved to is kept in one cache bounded by bytes (`symbol_cache`), keyed by
//!   (binary, file offset), vDSO offset or kernel address. [`Symbolizer::retire`] drops the
//!   binaries whose files the table closed, with their cache entries and blazesym's parse.
//!
//! Nothing grows without bound while processes come and go: snapshots retire (exit events, and
//! a liveness check once per grace period for lost ones), files close with their last snapshot,
//! binaries with their files, and the symbol cache evicts.
//!
//! Stripped binaries (most distribution libraries) only keep `.dynsym`, which lacks their
//! internal functions. When a file with a GNU build ID `H` is first opened, its separate debug
//! file is looked for (once) at `usr/lib/debug/.build-id/H[..2]/H[2..].debug` below the root of
//! the process that mapped it (`/proc/PID/root`: a container carries its own), then below the
//! host's `/`, and kept open with the file if its build ID matches. Lookups go to the debug file
//! first, by virtual address (its segments are empty, so file offsets are translated with the
//! binary's `PT_LOAD` headers), and fall back to the binary by file offset. The debug file's
//! `.symtab` is cheap to read; its DWARF, often compressed and the main memory cost, is only
//! read with [`SymbolizerConfig::debug_info`].
//!
//! Address rule: entry 0 of a stack is the sampled instruction, later entries are return
//! addresses, which are looked up as `addr - 1` (inside the call instruction). A frame's
//! `address` is always derived from the original, unadjusted address: the file offset for
//! file-backed user frames and the vDSO, the absolute address for anonymous memory and
//! unmapped user addresses, the kernel address for kernel frames.
//!
//! Garbage rule: a frame-pointer walk through code built without frame pointers reads garbage
//! (e.g. ASCII text as "return addresses"). A return address that lies in no executable mapping
//! of its process, even after refreshing the snapshot of a live process, ends the stack: it and
//! every outer entry are dropped and [`UserFrames::cut`] is set. Anonymous executable memory
//! (JIT code) is mapped, so it stays. The sampled instruction is never cut, and neither are the
//! stacks of a process never seen alive, whose mappings are unknown.
//!
//! Limits: a stack is attributed by PID alone, so after PID reuse (or an `exec`) addresses still
//! covered by the old snapshot resolve against it; a forked child's start time is read at the
//! first liveness check, so a child that exits and whose PID is reused before then is taken for
//! the new process; modules loaded after the first kernel lookup are not seen.

mod binaries;
mod debug_file;
mod kernel;
mod mapped_files;
mod process_maps;
mod process_table;
mod resolved;
mod symbol_cache;
mod vdso;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blazesym::symbolize::Symbolizer as BlazeSymbolizer;

use crate::profile::{Frame, FrameKind};
use binaries::{BinaryCache, BinaryId};
use kernel::KernelSymbols;
use process_maps::Target;
use process_table::{Located, Locations};
use resolved::push_frames;
use symbol_cache::{SymbolCache, SymbolKey};
use vdso::{VDSO_MODULE, VdsoSymbols};

pub use process_table::{ProcessTable, ProcessTableStats};

/// How many kernel code symbols `/proc/kallsyms` lists with their addresses, read as kernel
/// frames are symbolized; an error when it shows no addresses (`kernel.kptr_restrict`, or no
/// CAP_SYSLOG) or cannot be read. For `rover-agent check`.
pub fn kernel_symbol_count() -> std::io::Result<usize> {
    kernel::Kallsyms::load().map(|table| table.symbol_count())
}

/// A bound for the symbol cache that keeps a busy host's hot functions: 8 MiB.
pub const DEFAULT_SYMBOL_CACHE_BYTES: usize = 8 << 20;

/// How long blazesym keeps a binary parsed (symbol tables, DWARF: tens of MB for a big one)
/// after its symbols were last looked up; the results stay in the symbol cache.
pub const PARSE_IDLE: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SymbolizerConfig {
    /// Use DWARF (inlined functions, file and line) when a binary or its debug file carries
    /// it. Without it, names come from ELF symbol tables (a debug file's `.symtab` included).
    pub debug_info: bool,
    /// Bound of the symbol cache (user, vDSO and kernel lookups), in estimated heap bytes.
    pub symbol_cache_bytes: usize,
}

/// Counters for the run summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SymbolizeStats {
    /// Frames returned, inlined frames included.
    pub frames: u64,
    /// Frames returned without a function name.
    pub unknown_frames: u64,
    /// Distinct binaries opened for symbolization (files with one build ID count once).
    pub binaries_opened: u64,
    /// Binaries in use now.
    pub open_binaries: u64,
    /// Addresses looked up in symbol files, i.e. symbol cache misses.
    pub symbol_lookups: u64,
    /// User stacks ended early at a return address in no mapping (garbage).
    pub stacks_cut: u64,
    /// Estimated bytes in the symbol cache now.
    pub cache_bytes: u64,
    /// Symbol cache entries evicted to stay within the bound.
    pub cache_evictions: u64,
}

/// The frames of one user stack.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserFrames {
    /// Leaf first, inlined frames expanded.
    pub frames: Vec<Frame>,
    /// Whether the stack was cut at a return address in no mapping: its outer frames are
    /// missing.
    pub cut: bool,
}

/// Where one user stack entry points.
enum Location {
    Binary {
        binary: BinaryId,
        module: Arc<str>,
        /// File offset of the original address, reported.
        offset: u64,
        /// File offset that is looked up.
        lookup: u64,
    },
    Vdso {
        offset: u64,
        lookup: u64,
    },
    /// Nothing to look up: the frame stays unknown.
    Opaque {
        module: Arc<str>,
        address: u64,
    },
}

pub struct Symbolizer {
    debug_info: bool,
    blazesym: BlazeSymbolizer,
    processes: ProcessTable,
    binaries: BinaryCache,
    vdso: VdsoSymbols,
    kernel: KernelSymbols,
    cache: SymbolCache,
    /// The module of addresses in no mapping.
    unknown_module: Arc<str>,
    stats: SymbolizeStats,
}

impl Symbolizer {
    /// A symbolizer of the stacks of the processes in `processes`.
    pub fn new(config: SymbolizerConfig, processes: ProcessTable) -> Self {
        let blazesym = BlazeSymbolizer::builder()
            .enable_code_info(config.debug_info)
            .enable_inlined_fns(config.debug_info)
            .enable_demangling(true)
            // Binaries are read through `/proc/self/fd/N` of files we hold open and evict before
            // closing, so they cannot change under a path: no need to stat on every lookup.
            .enable_auto_reload(false)
            .build();
        Self {
            debug_info: config.debug_info,
            blazesym,
            processes,
            binaries: BinaryCache::default(),
            vdso: VdsoSymbols::new(),
            kernel: KernelSymbols::default(),
            cache: SymbolCache::new(config.symbol_cache_bytes),
            unknown_module: "[unknown]".into(),
            stats: SymbolizeStats::default(),
        }
    }

    /// The table whose snapshots stacks are symbolized against.
    pub fn processes(&self) -> &ProcessTable {
        &self.processes
    }

    /// `stack`: leaf first; `[0]` is the sampled instruction, the rest return addresses. A PID
    /// the table does not know is captured now. The stack ends before the first return address
    /// in no mapping of the process (the garbage rule of this module).
    pub fn user_frames(&mut self, pid: u32, stack: &[u64]) -> UserFrames {
        if stack.is_empty() {
            return UserFrames::default();
        }
        let lookups: Vec<u64> = stack
            .iter()
            .enumerate()
            .map(|(index, &addr)| lookup_address(index, addr))
            .collect();
        let (mut locations, refreshed) = match self.processes.locate(pid, &lookups) {
            Some(locations) => (locations, false),
            None => {
                self.processes.capture_if_unknown(pid);
                // A snapshot taken just now is as fresh as a refresh would be.
                let locations = self.processes.locate(pid, &lookups);
                (locations.unwrap_or_default(), true)
            }
        };
        // Not covered: the process may have mapped code since (dlopen, exec). Re-reading its
        // maps once per stack bounds the cost of garbage addresses.
        if !refreshed && locations.found.iter().any(Option::is_none) && self.processes.refresh(pid)
        {
            locations = self.processes.locate(pid, &lookups).unwrap_or_default();
        }
        let kept = kept_entries(&locations, stack.len());
        let cut = kept < stack.len();
        if cut {
            self.stats.stacks_cut += 1;
        }

        let locations: Vec<Location> = stack[..kept]
            .iter()
            .enumerate()
            .map(|(index, &addr)| {
                let located = locations.found.get_mut(index).and_then(Option::take);
                self.location(located, addr, lookups[index])
            })
            .collect();
        let mut in_binaries = Vec::new();
        let mut in_vdso = Vec::new();
        for location in &locations {
            match *location {
                Location::Binary { binary, lookup, .. } => in_binaries.push((binary, lookup)),
                Location::Vdso { lookup, .. } => in_vdso.push(lookup),
                Location::Opaque { .. } => {}
            }
        }
        let mut found = HashMap::new();
        self.binaries.resolve(
            &self.blazesym,
            self.debug_info,
            &mut self.cache,
            in_binaries,
            &mut found,
            &mut self.stats,
        );
        self.vdso.resolve(
            &self.blazesym,
            &mut self.cache,
            in_vdso,
            &mut found,
            &mut self.stats,
        );

        let mut frames = Vec::with_capacity(kept);
        for location in &locations {
            let (module, address, key) = match location {
                Location::Binary {
                    binary,
                    module,
                    offset,
                    lookup,
                } => (
                    &**module,
                    *offset,
                    Some(SymbolKey::Binary(*binary, *lookup)),
                ),
                Location::Vdso { offset, lookup } => {
                    (VDSO_MODULE, *offset, Some(SymbolKey::Vdso(*lookup)))
                }
                Location::Opaque { module, address } => (&**module, *address, None),
            };
            let symbols = key.and_then(|key| found.get(&key));
            push_frames(
                &mut frames,
                &mut self.stats,
                FrameKind::User,
                module,
                address,
                symbols.map_or(&[][..], |symbols| &symbols[..]),
            );
        }
        UserFrames { frames, cut }
    }

    /// What to look up for a stack entry at `addr` (looked up as `lookup`), found in `located`.
    fn location(&mut self, located: Option<Located>, addr: u64, lookup: u64) -> Location {
        let Some(Located { mapping, file }) = located else {
            return Location::Opaque {
                module: Arc::clone(&self.unknown_module),
                address: addr,
            };
        };
        match (mapping.target, file) {
            (Target::File(id), Some(file)) => Location::Binary {
                binary: self.binaries.binary(id, &file, &mut self.stats),
                offset: mapping.file_offset(addr),
                lookup: mapping.file_offset(lookup),
                module: mapping.module,
            },
            // A file that could not be opened or used.
            (Target::File(_), None) => Location::Opaque {
                address: mapping.file_offset(addr),
                module: mapping.module,
            },
            (Target::Vdso, _) => Location::Vdso {
                offset: mapping.file_offset(addr),
                lookup: mapping.file_offset(lookup),
            },
            (Target::Anonymous, _) => Location::Opaque {
                module: mapping.module,
                address: addr,
            },
        }
    }

    /// `stack`: leaf first, kernel addresses as `bpf_get_stack` records them.
    pub fn kernel_frames(&mut self, stack: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(stack.len());
        for (index, &addr) in stack.iter().enumerate() {
            let (symbols, module) = self.kernel.symbols(
                lookup_address(index, addr),
                &mut self.cache,
                &mut self.stats,
            );
            push_frames(
                &mut frames,
                &mut self.stats,
                FrameKind::Kernel,
                &module,
                addr,
                &symbols,
            );
        }
        frames
    }

    /// Drops the binaries (with their cache entries and blazesym's parse) whose files the
    /// table no longer holds, and evicts blazesym's parse of those unused for
    /// [`PARSE_IDLE`]. Call it after [`ProcessTable::retire`]; returns whether it let go of
    /// anything (the caller may give the memory back).
    pub fn retire(&mut self, now: Instant) -> bool {
        let before = self.binaries.len();
        self.binaries
            .retain_held(&self.processes, &mut self.blazesym, &mut self.cache);
        let evicted = self
            .binaries
            .evict_idle(&mut self.blazesym, now, PARSE_IDLE);
        evicted > 0 || self.binaries.len() < before
    }

    pub fn stats(&self) -> SymbolizeStats {
        SymbolizeStats {
            open_binaries: self.binaries.len() as u64,
            cache_bytes: self.cache.bytes(),
            cache_evictions: self.cache.evictions(),
            ..self.stats
        }
    }
}

/// How many entries of a stack of `len` to keep: up to the first return address in no mapping
/// of a process whose mappings are known.
fn kept_entries(locations: &Locations, len: usize) -> usize {
    if !locations.mapped {
        return len;
    }
    (1..len)
        .find(|&index| locations.found.get(index).is_none_or(Option::is_none))
        .unwrap_or(len)
}

/// The address to look up for stack entry `index`: return addresses (all but the first) point
/// after the call instruction, possibly into the next function.
fn lookup_address(index: usize, addr: u64) -> u64 {
    if index == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    fn config() -> SymbolizerConfig {
        SymbolizerConfig {
            debug_info: true,
            symbol_cache_bytes: DEFAULT_SYMBOL_CACHE_BYTES,
        }
    }

    fn symbolizer() -> Symbolizer {
        Symbolizer::new(config(), ProcessTable::new(GRACE))
    }

    #[inline(never)]
    fn marker_leaf(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    #[inline(never)]
    fn marker_caller(x: u64) -> u64 {
        marker_leaf(std::hint::black_box(x)).wrapping_add(1)
    }

    fn addr_of(function: fn(u64) -> u64) -> u64 {
        function as usize as u64
    }

    /// A stack sampled in `marker_leaf`, called from `marker_caller`.
    fn marker_stack() -> [u64; 2] {
        [addr_of(marker_leaf), addr_of(marker_caller) + 1]
    }

    /// The names of the frames that are not inlined.
    fn outer_names(frames: &[Frame]) -> Vec<Option<&str>> {
        frames
            .iter()
            .filter(|f| !f.inlined)
            .map(|f| f.function.as_deref())
            .collect()
    }

    const MARKER_NAMES: [Option<&str>; 2] = [
        Some("rover_agent::symbolize::tests::marker_leaf"),
        Some("rover_agent::symbolize::tests::marker_caller"),
    ];

    /// An anonymous executable mapping, unmapped on drop.
    struct AnonCode {
        addr: *mut libc::c_void,
        len: usize,
    }

    impl AnonCode {
        fn map(len: usize, file: Option<&fs::File>) -> Option<Self> {
            let (flags, fd) = match file {
                Some(file) => (libc::MAP_PRIVATE, file.as_raw_fd()),
                None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            };
            // SAFETY: a fresh mapping chosen by the kernel, touching no existing memory.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_EXEC,
                    flags,
                    fd,
                    0,
                )
            };
            (addr != libc::MAP_FAILED).then_some(Self { addr, len })
        }

        fn start(&self) -> u64 {
            self.addr as u64
        }
    }

    impl Drop for AnonCode {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping created in `map`, which nothing else uses.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }

    /// A forked copy of this process that waits to be killed; killed and reaped on drop.
    struct ForkedChild(libc::pid_t);

    impl ForkedChild {
        /// Forks a child that exits at once (`wait_for_kill` false) or waits for a signal.
        fn fork(wait_for_kill: bool) -> Self {
            // SAFETY: the child calls only async-signal-safe functions (pause, _exit).
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
            if pid == 0 {
                // SAFETY: async-signal-safe calls in the forked child, which never returns.
                unsafe {
                    if wait_for_kill {
                        loop {
                            libc::pause();
                        }
                    }
                    libc::_exit(0);
                }
            }
            Self(pid)
        }

        fn pid(&self) -> u32 {
            self.0 as u32
        }

        /// Kills and reaps the child: its PID no longer exists afterwards.
        fn exit(&mut self) {
            if self.0 > 0 {
                // SAFETY: signals and reaps our own child.
                unsafe {
                    libc::kill(self.0, libc::SIGKILL);
                    libc::waitpid(self.0, std::ptr::null_mut(), 0);
                }
                self.0 = 0;
            }
        }
    }

    impl Drop for ForkedChild {
        fn drop(&mut self) {
            self.exit();
        }
    }

    #[test]
    fn binaries_unused_for_a_while_are_evicted_from_blazesym_and_still_resolve() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        let stack = [addr_of(marker_leaf)];
        let first = symbolizer.user_frames(pid, &stack);
        let now = Instant::now();
        assert!(!symbolizer.retire(now), "nothing idle yet");
        assert!(symbolizer.retire(now + PARSE_IDLE), "the parse is evicted");
        assert!(!symbolizer.retire(now + PARSE_IDLE), "and only once");
        let lookups = symbolizer.stats().symbol_lookups;
        assert_eq!(symbolizer.user_frames(pid, &stack), first);
        assert_eq!(
            symbolizer.stats().symbol_lookups,
            lookups,
            "served by the symbol cache"
        );
        // A new address parses the binary again.
        assert!(
            !symbolizer
                .user_frames(pid, &[addr_of(marker_caller)])
                .frames
                .is_empty()
        );
        assert_eq!(symbolizer.stats().symbol_lookups, lookups + 1);
    }

    #[test]
    fn own_rust_functions_get_demangled_names() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        assert_eq!(marker_caller(1), 4);
        // A return address one past the start still belongs to the function.
        let stack = marker_stack();
        let UserFrames { frames, cut } = symbolizer.user_frames(pid, &stack);
        assert!(!cut);
        // Optimized builds add frames for what got inlined (e.g. `black_box`).
        assert_eq!(outer_names(&frames), MARKER_NAMES);
        let leaf = frames.iter().find(|f| !f.inlined).expect("a leaf frame");
        let exe = std::env::current_exe().expect("current exe");
        assert_eq!(leaf.module.as_deref(), exe.to_str());
        // Source lines need DWARF, which release builds of this crate leave out (the C fixture
        // of tests/tests/symbolize.rs checks them).
        if cfg!(debug_assertions) {
            assert!(leaf.file.as_deref().is_some_and(|f| f.ends_with("mod.rs")));
            assert!(leaf.line.is_some());
        }
        // A file offset, which is below the relocated address.
        assert!(leaf.address < addr_of(marker_leaf));
        assert_eq!(symbolizer.stats().unknown_frames, 0);
        assert_eq!(
            symbolizer.processes().name(pid).as_deref(),
            procfs::process::Process::myself()
                .and_then(|p| p.stat())
                .map(|stat| stat.comm)
                .ok()
                .as_deref()
        );
    }

    #[test]
    fn repeated_addresses_hit_the_cache() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        let stack = [addr_of(marker_leaf)];
        let first = symbolizer.user_frames(pid, &stack);
        let stats = symbolizer.stats();
        assert_eq!(symbolizer.user_frames(pid, &stack), first);
        let again = symbolizer.stats();
        assert_eq!(again.symbol_lookups, stats.symbol_lookups);
        assert_eq!(again.binaries_opened, stats.binaries_opened);
        assert_eq!(again.frames, stats.frames + first.frames.len() as u64);
        assert!(again.cache_bytes > 0);
    }

    #[test]
    fn without_debug_info_names_come_from_elf_symbols() {
        let config = SymbolizerConfig {
            debug_info: false,
            ..config()
        };
        let mut symbolizer = Symbolizer::new(config, ProcessTable::new(Duration::ZERO));
        let frames = symbolizer
            .user_frames(std::process::id(), &[addr_of(marker_leaf)])
            .frames;
        assert_eq!(
            frames[0].function.as_deref(),
            Some("rover_agent::symbolize::tests::marker_leaf")
        );
        assert_eq!((frames[0].file.as_deref(), frames[0].line), (None, None));
    }

    #[test]
    fn anonymous_code_mapped_later_is_an_unknown_anon_frame() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        symbolizer.processes().capture(pid);
        // Mapped after the snapshot: found by refreshing it, like dlopen'ed code.
        let code = AnonCode::map(4096, None).expect("mmap");
        let addr = code.start() + 0x10;
        // As a return address too: anonymous code (JIT) is mapped, so the stack goes on.
        let UserFrames { frames, cut } =
            symbolizer.user_frames(pid, &[addr, addr, addr_of(marker_caller) + 1]);
        assert!(!cut);
        assert_eq!(
            frames.iter().filter(|f| !f.inlined).count(),
            3,
            "{frames:#?}"
        );
        for frame in &frames[..2] {
            assert_eq!(frame.function, None);
            assert_eq!(frame.module.as_deref(), Some("[anon]"));
            assert_eq!(frame.address, addr);
        }
        assert_eq!(symbolizer.stats().unknown_frames, 2);
    }

    #[test]
    fn unmapped_address_is_an_unknown_frame() {
        let mut symbolizer = symbolizer();
        // The sampled instruction in no mapping stays, as an unknown frame.
        let UserFrames { frames, cut } =
            symbolizer.user_frames(std::process::id(), &[0x20, addr_of(marker_caller) + 1]);
        assert!(!cut);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[unknown]"));
        assert_eq!(frames[0].address, 0x20);
        assert_eq!(outer_names(&frames[1..]), [MARKER_NAMES[1]]);
        let stats = symbolizer.stats();
        assert_eq!((stats.unknown_frames, stats.stacks_cut), (1, 0));
    }

    #[test]
    fn return_address_in_no_mapping_cuts_the_stack() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        let [leaf, caller] = marker_stack();
        // ASCII text ("/local/e"), as frame-pointer walks through python3 read.
        const GARBAGE: u64 = 0x2f65_6c61_636f_6c2f;
        for (stack, kept) in [
            (vec![leaf, 0x20, caller], 1),
            (vec![leaf, caller, GARBAGE, caller], 2),
            (vec![0x20, GARBAGE], 1),
            (vec![leaf, caller, u64::MAX], 2),
        ] {
            let UserFrames { frames, cut } = symbolizer.user_frames(pid, &stack);
            assert!(cut, "{stack:x?}");
            let outer = outer_names(&frames);
            assert_eq!(outer.len(), kept, "{stack:x?}: {frames:#?}");
            if stack[0] == leaf {
                assert_eq!(outer, MARKER_NAMES[..kept], "{stack:x?}");
            }
        }
        assert_eq!(symbolizer.stats().stacks_cut, 4);
        // An unmapped sampled instruction alone is no reason to cut.
        assert!(!symbolizer.user_frames(pid, &[GARBAGE]).cut);
        assert_eq!(symbolizer.stats().stacks_cut, 4);
    }

    #[test]
    fn vanished_process_gives_unknown_frames() {
        let mut symbolizer = symbolizer();
        // PIDs above pid_max (at most 2^22) never exist.
        let pid = 1 << 23;
        // Nothing is known of its mappings: not cut, whatever the addresses.
        let UserFrames { frames, cut } = symbolizer.user_frames(pid, &[0x1234, 0x5678]);
        assert!(!cut);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[unknown]"));
        let table = symbolizer.processes().clone();
        assert_eq!(table.name(pid), None);
        let now = Instant::now();
        assert_eq!(table.retire(now), 0);
        assert_eq!(table.stats().processes, 1, "kept for the grace period");
        assert_eq!(table.stats().exited, 1);
        assert_eq!(table.retire(now + GRACE), 1);
        assert_eq!(table.stats().processes, 0);
        assert!(table.stats().failed_captures >= 1);
    }

    #[test]
    fn malformed_elf_degrades_to_unknown_frames() {
        let path = std::env::temp_dir().join(format!(
            "rover-symbolize-malformed-{}.so",
            std::process::id()
        ));
        let mut file = fs::File::create(&path).expect("create temp file");
        let mut content = b"\x7fELF\x02\x01\x01".to_vec();
        content.resize(8192, 0xff);
        file.write_all(&content).expect("write temp file");
        let file = fs::File::open(&path).expect("reopen temp file");
        let Some(code) = AnonCode::map(8192, Some(&file)) else {
            eprintln!(
                "SKIPPED: cannot map {} executable (noexec?)",
                path.display()
            );
            return;
        };
        let mut symbolizer = symbolizer();
        let stack = [code.start() + 0x40, code.start() + 0x80];
        let frames = symbolizer.user_frames(std::process::id(), &stack).frames;
        fs::remove_file(&path).expect("remove temp file");
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.function.is_none()));
        assert_eq!(frames[0].module.as_deref(), path.to_str());
        assert_eq!(frames[0].address, 0x40);
        assert_eq!(frames[1].address, 0x80);
    }

    #[test]
    fn vdso_frames_are_attributed_to_the_vdso() {
        let Some(vdso) = procfs::process::Process::myself()
            .and_then(|p| p.maps())
            .expect("own maps")
            .into_iter()
            .find(|map| map.pathname == procfs::process::MMapPath::Vdso)
        else {
            eprintln!("SKIPPED: no vDSO in this process");
            return;
        };
        let (start, end) = vdso.address;
        let mut symbolizer = symbolizer();
        let stack: Vec<u64> = (start..end).step_by(16).collect();
        let frames = symbolizer.user_frames(std::process::id(), &stack).frames;
        assert!(frames.iter().all(|f| f.module.as_deref() == Some("[vdso]")));
        assert!(
            frames
                .iter()
                .filter_map(|f| f.function.as_deref())
                .any(|name| name.contains("gettime")),
            "no vDSO clock function found"
        );
    }

    #[test]
    fn kernel_address_in_no_symbol_is_unknown() {
        let mut symbolizer = symbolizer();
        let frames = symbolizer.kernel_frames(&[0x1]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].kind, FrameKind::Kernel);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[kernel.kallsyms]"));
        assert_eq!(frames[0].address, 0x1);
        assert_eq!(symbolizer.stats().unknown_frames, 1);
        // Cached too: a second lookup reads no symbols.
        let lookups = symbolizer.stats().symbol_lookups;
        assert_eq!(symbolizer.kernel_frames(&[0x1]), frames);
        assert_eq!(symbolizer.stats().symbol_lookups, lookups);
    }

    #[test]
    fn retire_keeps_running_processes_and_their_binaries() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        symbolizer.processes().capture(pid);
        symbolizer.user_frames(pid, &marker_stack());
        let open_files = symbolizer.processes().stats().open_files;
        let open = symbolizer.stats().open_binaries;
        assert!(open_files > 0 && open > 0);
        let table = symbolizer.processes().clone();
        assert_eq!(table.retire(Instant::now() + Duration::from_secs(3600)), 0);
        symbolizer.retire(Instant::now());
        assert_eq!(table.stats().open_files, open_files);
        assert_eq!(symbolizer.stats().open_binaries, open);
        assert!(table.knows(pid));
        assert_eq!(table.stats().exited, 0);
    }

    #[test]
    fn exited_process_retires_with_its_files_after_the_grace_period() {
        let mut child = ForkedChild::fork(true);
        let pid = child.pid();
        let table = ProcessTable::new(GRACE);
        table.capture(pid);
        let mut symbolizer = Symbolizer::new(config(), table.clone());
        let stack = marker_stack();
        assert_eq!(
            outer_names(&symbolizer.user_frames(pid, &stack).frames),
            MARKER_NAMES
        );
        assert!(table.stats().open_files > 0);

        child.exit();
        let exited = Instant::now();
        table.exited(pid, exited);
        assert_eq!(table.retire(exited + GRACE / 2), 0);
        assert_eq!(
            outer_names(&symbolizer.user_frames(pid, &stack).frames),
            MARKER_NAMES
        );
        assert_eq!(table.stats().exited, 1);

        assert_eq!(table.retire(exited + GRACE), 1);
        assert!(!table.knows(pid));
        assert_eq!(table.stats().open_files, 0, "files closed");
        symbolizer.retire(Instant::now());
        assert_eq!(symbolizer.stats().open_binaries, 0, "binaries dropped");
        let UserFrames { frames, cut } = symbolizer.user_frames(pid, &stack);
        assert!(!cut);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.function.is_none()), "{frames:#?}");
    }

    #[test]
    fn forked_child_symbolizes_from_the_parent_snapshot_after_exiting() {
        let parent = std::process::id();
        let table = ProcessTable::new(GRACE);
        table.capture(parent);
        let captures = table.stats().captures;
        let mut child = ForkedChild::fork(false);
        let pid = child.pid();
        table.forked(parent, pid);
        // Reaped before anything read its `/proc`: only the parent's snapshot can tell.
        child.exit();
        assert_eq!(table.stats().captures, captures, "no /proc read");
        assert_eq!(table.stats().forks, 1);
        assert_eq!(table.name(pid), table.name(parent));

        let mut symbolizer = Symbolizer::new(config(), table.clone());
        let UserFrames { frames, cut } = symbolizer.user_frames(pid, &marker_stack());
        assert!(!cut);
        assert_eq!(outer_names(&frames), MARKER_NAMES);

        // The liveness check finds the child gone; the parent runs on.
        let now = Instant::now();
        table.retire(now);
        assert_eq!(table.stats().exited, 1);
        assert_eq!(table.retire(now + GRACE), 1);
        assert!(!table.knows(pid) && table.knows(parent));

        // A parent never seen: the child is read from `/proc` (here: it never existed).
        table.forked(1 << 23, (1 << 23) + 1);
        assert!(table.knows((1 << 23) + 1));
        assert_eq!(table.stats().forks, 1);
    }

    #[test]
    fn symbol_cache_stays_within_its_byte_bound() {
        const BOUND: usize = 16 * 1024;
        let config = SymbolizerConfig {
            symbol_cache_bytes: BOUND,
            ..config()
        };
        let mut symbolizer = Symbolizer::new(config, ProcessTable::new(GRACE));
        let pid = std::process::id();
        // Distinct addresses through this binary's code, each its own cache entry.
        let base = addr_of(marker_leaf);
        let stacks: Vec<[u64; 1]> = (0..2000).map(|i| [base + i * 16]).collect();
        let first: Vec<UserFrames> = stacks
            .iter()
            .map(|stack| {
                let frames = symbolizer.user_frames(pid, stack);
                assert!(symbolizer.stats().cache_bytes <= BOUND as u64);
                frames
            })
            .collect();
        let stats = symbolizer.stats();
        assert!(stats.cache_evictions > 0, "{stats:?}");
        assert_eq!(stats.symbol_lookups, 2000);
        // Evicted entries are looked up again, to the same frames.
        for (stack, expected) in stacks.iter().zip(&first) {
            assert_eq!(&symbolizer.user_frames(pid, stack), expected);
        }
        let stats = symbolizer.stats();
        assert!(stats.symbol_lookups > 2000, "{stats:?}");
        assert!(stats.cache_bytes <= BOUND as u64, "{stats:?}");
    }

    #[test]
    fn table_is_used_from_two_threads_at_once() {
        fn shared<T: Clone + Send + Sync + 'static>() {}
        shared::<ProcessTable>();
        let pid = std::process::id();
        let table = ProcessTable::new(GRACE);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (table, stop) = (table.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut captures = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || captures == 0 {
                    table.capture(pid);
                    table.retire(Instant::now());
                    captures += 1;
                }
                captures
            })
        };
        let mut symbolizer = Symbolizer::new(config(), table.clone());
        for _ in 0..200 {
            let UserFrames { frames, cut } = symbolizer.user_frames(pid, &marker_stack());
            assert!(!cut);
            assert_eq!(outer_names(&frames), MARKER_NAMES);
            symbolizer.retire(Instant::now());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let captures = watcher.join().expect("watcher thread");
        assert!(captures > 0);
        assert!(table.stats().captures >= captures);
        assert!(table.knows(pid));
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_earlier() {
        assert_eq!(lookup_address(0, 0x1000), 0x1000);
        assert_eq!(lookup_address(1, 0x1000), 0xfff);
        assert_eq!(lookup_address(1, 0), 0);
    }
}
