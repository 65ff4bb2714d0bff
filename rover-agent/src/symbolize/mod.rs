//! Addresses → [`Frame`]s with blazesym.
//!
//! User stacks are symbolized against a per-process snapshot (`process_maps`) of the
//! executable mappings, taken while the process lives: on [`Symbolizer::observe_process`], on
//! the first stack of a PID, and again when an address is not covered (e.g. after `dlopen`).
//! Each mapped binary is opened once through `/proc/PID/map_files` (any mount namespace,
//! deleted files) and held open in a cache shared by all processes (`binaries`), keyed by
//! (device, inode) and GNU build ID, with a cache of file offset → symbols. Stacks of exited
//! processes therefore still symbolize until [`Symbolizer::retire_exited`] drops them after
//! [`SymbolizerConfig::exited_process_grace`].
//!
//! Stripped binaries (most distribution libraries) only keep `.dynsym`, which lacks their
//! internal functions. When a binary with a GNU build ID `H` is first opened, its separate
//! debug file is looked for (once) at `usr/lib/debug/.build-id/H[..2]/H[2..].debug` below the
//! root of the process that mapped it (`/proc/PID/root`: a container carries its own), then
//! below the host's `/`, and kept open with the binary if its build ID matches. Lookups go to
//! the debug file first, by virtual address (its segments are empty, so file offsets are
//! translated with the binary's `PT_LOAD` headers), and fall back to the binary by file offset.
//! The debug file's `.symtab` is cheap to read; its DWARF, often compressed and the main memory
//! cost, is only read with [`SymbolizerConfig::debug_info`].
//!
//! Address rule: entry 0 of a stack is the sampled instruction, later entries are return
//! addresses, which are looked up as `addr - 1` (inside the call instruction). A frame's
//! `address` is always derived from the original, unadjusted address: the file offset for
//! file-backed user frames and the vDSO, the absolute address for anonymous memory and
//! unmapped user addresses, the kernel address for kernel frames.
//!
//! The [`Symbolizer`] is not `Send` (blazesym's caches use `Rc`): keep it on one thread.
//!
//! Limits: a stack is attributed by PID alone, so after PID reuse (or an `exec`) addresses still
//! covered by the old snapshot resolve against it; modules loaded after the first kernel lookup
//! are not seen.

mod binaries;
mod debug_file;
mod kernel;
mod process_maps;
mod resolved;
mod vdso;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use blazesym::symbolize::Symbolizer as BlazeSymbolizer;
use tracing::debug;

use crate::profile::{Frame, FrameKind};
use binaries::{BinaryCache, BinaryId};
use kernel::KernelSymbols;
use process_maps::{ProcessSnapshot, Target};
use resolved::push_frames;
use vdso::{VDSO_MODULE, VdsoSymbols};

#[derive(Clone, Debug)]
pub struct SymbolizerConfig {
    /// Use DWARF (inlined functions, file and line) when a binary or its debug file carries
    /// it. Without it, names come from ELF symbol tables (a debug file's `.symtab` included).
    pub debug_info: bool,
    /// How long the memory map and open binaries of an exited process are kept.
    pub exited_process_grace: Duration,
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
    /// Binaries held open now.
    pub open_binaries: u64,
    /// Addresses looked up in symbol files, i.e. symbol cache misses.
    pub symbol_lookups: u64,
}

/// Where one user stack entry points.
enum Location {
    Binary {
        binary: BinaryId,
        module: String,
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
        module: String,
        address: u64,
    },
}

pub struct Symbolizer {
    config: SymbolizerConfig,
    blazesym: BlazeSymbolizer,
    processes: HashMap<u32, ProcessSnapshot>,
    binaries: BinaryCache,
    vdso: VdsoSymbols,
    kernel: KernelSymbols,
    stats: SymbolizeStats,
}

impl Symbolizer {
    pub fn new(config: SymbolizerConfig) -> Self {
        let blazesym = BlazeSymbolizer::builder()
            .enable_code_info(config.debug_info)
            .enable_inlined_fns(config.debug_info)
            .enable_demangling(true)
            // Binaries are read through `/proc/self/fd/N` of files we hold open and evict before
            // closing, so they cannot change under a path: no need to stat on every lookup.
            .enable_auto_reload(false)
            .build();
        Self {
            config,
            blazesym,
            processes: HashMap::new(),
            binaries: BinaryCache::default(),
            vdso: VdsoSymbols::new(),
            kernel: KernelSymbols::default(),
            stats: SymbolizeStats::default(),
        }
    }

    /// Snapshot what symbolizing `pid` later needs, while it lives: its executable mappings and
    /// an open handle of each mapped binary. Replaces an earlier snapshot of the PID (call it
    /// when a process is first seen or after it `exec`s); keeps it if `pid` is gone.
    pub fn observe_process(&mut self, pid: u32) {
        match ProcessSnapshot::take(pid, &mut self.binaries, &mut self.stats) {
            Ok(snapshot) => {
                self.processes.insert(pid, snapshot);
            }
            Err(error) => {
                debug!(pid, %error, "cannot snapshot process; keeping what is known");
                // Remembered even empty, so that retire_exited forgets the PID in time.
                self.processes.entry(pid).or_default();
            }
        }
    }

    /// `stack`: leaf first; `[0]` is the sampled instruction, the rest return addresses.
    /// Returns frames leaf first, inlined frames expanded.
    pub fn user_frames(&mut self, pid: u32, stack: &[u64]) -> Vec<Frame> {
        if stack.is_empty() {
            return Vec::new();
        }
        // A snapshot taken just now is as fresh as a refresh would be.
        let mut refreshed = !self.processes.contains_key(&pid);
        if refreshed {
            self.observe_process(pid);
        }
        let mut locations = Vec::with_capacity(stack.len());
        for (index, &addr) in stack.iter().enumerate() {
            let lookup = lookup_address(index, addr);
            let mut location = self.locate(pid, addr, lookup);
            // Not covered: the process may have mapped code since (dlopen, exec). Re-reading
            // its maps once per stack bounds the cost of garbage addresses.
            if location.is_none() && !refreshed {
                refreshed = true;
                self.observe_process(pid);
                location = self.locate(pid, addr, lookup);
            }
            locations.push(location.unwrap_or_else(|| Location::Opaque {
                module: "[unknown]".to_owned(),
                address: addr,
            }));
        }

        let mut in_binaries = Vec::new();
        let mut in_vdso = Vec::new();
        for location in &locations {
            match *location {
                Location::Binary { binary, lookup, .. } => in_binaries.push((binary, lookup)),
                Location::Vdso { lookup, .. } => in_vdso.push(lookup),
                Location::Opaque { .. } => {}
            }
        }
        self.binaries.resolve(
            &self.blazesym,
            self.config.debug_info,
            in_binaries,
            &mut self.stats,
        );
        self.vdso.resolve(&self.blazesym, in_vdso, &mut self.stats);

        let mut frames = Vec::with_capacity(stack.len());
        for location in &locations {
            let (module, address, symbols) = match location {
                Location::Binary {
                    binary,
                    module,
                    offset,
                    lookup,
                } => (
                    module.as_str(),
                    *offset,
                    self.binaries.symbols(*binary, *lookup),
                ),
                Location::Vdso { offset, lookup } => {
                    (VDSO_MODULE, *offset, self.vdso.symbols(*lookup))
                }
                Location::Opaque { module, address } => {
                    (module.as_str(), *address, Default::default())
                }
            };
            push_frames(
                &mut frames,
                &mut self.stats,
                FrameKind::User,
                module,
                address,
                &symbols,
            );
        }
        frames
    }

    /// Where `addr` (looked up as `lookup`) points in the snapshot of `pid`; `None` if it is
    /// not covered.
    fn locate(&self, pid: u32, addr: u64, lookup: u64) -> Option<Location> {
        let mapping = self.processes.get(&pid)?.find(lookup)?;
        let location = match mapping.target {
            Target::Binary(binary) => Location::Binary {
                binary,
                module: mapping.module.clone(),
                offset: mapping.file_offset(addr),
                lookup: mapping.file_offset(lookup),
            },
            Target::Vdso => Location::Vdso {
                offset: mapping.file_offset(addr),
                lookup: mapping.file_offset(lookup),
            },
            Target::Unusable(_) => Location::Opaque {
                module: mapping.module.clone(),
                address: mapping.file_offset(addr),
            },
            Target::Anonymous => Location::Opaque {
                module: mapping.module.clone(),
                address: addr,
            },
        };
        Some(location)
    }

    /// `stack`: leaf first, kernel addresses as `bpf_get_stack` records them.
    pub fn kernel_frames(&mut self, stack: &[u64]) -> Vec<Frame> {
        let mut frames = Vec::with_capacity(stack.len());
        for (index, &addr) in stack.iter().enumerate() {
            let (symbols, module) = self
                .kernel
                .symbols(lookup_address(index, addr), &mut self.stats);
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

    /// Notes which observed processes have exited (as of `now`), forgets those first noted
    /// exited at least the grace period before `now`, and closes the binaries no remaining
    /// process maps. Call it periodically, e.g. once per profile.
    pub fn retire_exited(&mut self, now: Instant) {
        let grace = self.config.exited_process_grace;
        self.processes.retain(|&pid, snapshot| {
            if snapshot.is_running(pid) {
                snapshot.exited_at = None;
                return true;
            }
            let exited_at = *snapshot.exited_at.get_or_insert(now);
            now.saturating_duration_since(exited_at) < grace
        });

        let mut used_binaries = HashSet::new();
        let mut used_files = HashSet::new();
        for mapping in self.processes.values().flat_map(ProcessSnapshot::mappings) {
            match mapping.target {
                Target::Binary(binary) => {
                    used_binaries.insert(binary);
                }
                Target::Unusable(file) => {
                    used_files.insert(file);
                }
                Target::Vdso | Target::Anonymous => {}
            }
        }
        self.binaries
            .retain_used(&mut self.blazesym, &used_binaries, &used_files);
    }

    /// Whether `pid` is still remembered (observed, and not retired).
    pub fn knows(&self, pid: u32) -> bool {
        self.processes.contains_key(&pid)
    }

    pub fn stats(&self) -> SymbolizeStats {
        SymbolizeStats {
            open_binaries: self.binaries.len() as u64,
            ..self.stats
        }
    }
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

    use super::*;

    fn symbolizer() -> Symbolizer {
        Symbolizer::new(SymbolizerConfig {
            debug_info: true,
            exited_process_grace: Duration::from_secs(60),
        })
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

    #[test]
    fn own_rust_functions_get_demangled_names() {
        let mut symbolizer = symbolizer();
        let pid = std::process::id();
        assert_eq!(marker_caller(1), 4);
        // A return address one past the start still belongs to the function.
        let stack = [addr_of(marker_leaf), addr_of(marker_caller) + 1];
        let frames = symbolizer.user_frames(pid, &stack);
        // Optimized builds add frames for what got inlined (e.g. `black_box`).
        let names: Vec<_> = frames
            .iter()
            .filter(|f| !f.inlined)
            .map(|f| f.function.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                Some("rover_agent::symbolize::tests::marker_leaf"),
                Some("rover_agent::symbolize::tests::marker_caller"),
            ]
        );
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
        assert_eq!(again.frames, stats.frames + first.len() as u64);
    }

    #[test]
    fn without_debug_info_names_come_from_elf_symbols() {
        let mut symbolizer = Symbolizer::new(SymbolizerConfig {
            debug_info: false,
            exited_process_grace: Duration::ZERO,
        });
        let frames = symbolizer.user_frames(std::process::id(), &[addr_of(marker_leaf)]);
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
        symbolizer.observe_process(pid);
        // Mapped after the snapshot: found by refreshing it, like dlopen'ed code.
        let code = AnonCode::map(4096, None).expect("mmap");
        let addr = code.start() + 0x10;
        let frames = symbolizer.user_frames(pid, &[addr]);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[anon]"));
        assert_eq!(frames[0].address, addr);
        assert_eq!(symbolizer.stats().unknown_frames, 1);
    }

    #[test]
    fn unmapped_address_is_an_unknown_frame() {
        let mut symbolizer = symbolizer();
        let frames = symbolizer.user_frames(std::process::id(), &[0x10, 0x20]);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.function.is_none()));
        assert_eq!(frames[1].module.as_deref(), Some("[unknown]"));
        assert_eq!(frames[1].address, 0x20);
        let stats = symbolizer.stats();
        assert_eq!((stats.frames, stats.unknown_frames), (2, 2));
    }

    #[test]
    fn vanished_process_gives_unknown_frames() {
        let mut symbolizer = symbolizer();
        // PIDs above pid_max (at most 2^22) never exist.
        let frames = symbolizer.user_frames(1 << 23, &[0x1234]);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[unknown]"));
        let now = Instant::now();
        symbolizer.retire_exited(now);
        assert_eq!(symbolizer.processes.len(), 1, "kept for the grace period");
        symbolizer.retire_exited(now + Duration::from_secs(60));
        assert_eq!(symbolizer.processes.len(), 0);
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
        let frames = symbolizer.user_frames(std::process::id(), &stack);
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
        let frames = symbolizer.user_frames(std::process::id(), &stack);
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
    }

    #[test]
    fn retire_keeps_running_processes_and_their_binaries() {
        let mut symbolizer = symbolizer();
        symbolizer.observe_process(std::process::id());
        let open = symbolizer.stats().open_binaries;
        assert!(open > 0);
        symbolizer.retire_exited(Instant::now() + Duration::from_secs(3600));
        assert_eq!(symbolizer.stats().open_binaries, open);
        assert!(symbolizer.processes.contains_key(&std::process::id()));
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_earlier() {
        assert_eq!(lookup_address(0, 0x1000), 0x1000);
        assert_eq!(lookup_address(1, 0x1000), 0xfff);
        assert_eq!(lookup_address(1, 0), 0);
    }
}
