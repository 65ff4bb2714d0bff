//! vDSO frames, symbolized through the agent's own vDSO: every 64-bit process of a kernel maps
//! the same image.

use std::ops::Range;

use blazesym::Pid;
use blazesym::symbolize::Input;
use blazesym::symbolize::source::{Process, Source};
use procfs::process::MMapPath;
use tracing::debug;

use super::SymbolizeStats;
use super::resolved::{SymbolCache, Symbols, fill_cache};

pub(super) const VDSO_MODULE: &str = "[vdso]";

pub(super) struct VdsoSymbols {
    /// The agent's vDSO, when it has one.
    own: Option<Range<u64>>,
    /// Keyed by offset into the vDSO.
    symbols: SymbolCache,
}

impl VdsoSymbols {
    pub fn new() -> Self {
        let own = procfs::process::Process::myself()
            .and_then(|process| process.maps())
            .map(|maps| {
                maps.into_iter()
                    .find(|map| map.pathname == MMapPath::Vdso)
                    .map(|map| map.address.0..map.address.1)
            });
        let own = own.unwrap_or_else(|error| {
            debug!(%error, "cannot find own vDSO; vDSO frames stay unknown");
            None
        });
        Self {
            own,
            symbols: SymbolCache::new(),
        }
    }

    /// Looks up the offsets not cached yet.
    pub fn resolve(
        &mut self,
        blazesym: &blazesym::symbolize::Symbolizer,
        offsets: impl IntoIterator<Item = u64>,
        stats: &mut SymbolizeStats,
    ) {
        let Some(own) = self.own.clone() else {
            return;
        };
        let source = Source::Process(Process {
            debug_syms: false,
            perf_map: false,
            map_files: false,
            ..Process::new(Pid::Slf)
        });
        let offsets = offsets
            .into_iter()
            .filter(|&offset| offset < own.end - own.start);
        let result = fill_cache(&mut self.symbols, offsets, stats, |offsets| {
            let addrs: Vec<u64> = offsets.iter().map(|offset| own.start + offset).collect();
            blazesym.symbolize(&source, Input::AbsAddr(&addrs))
        });
        if let Err(error) = result {
            debug!(%error, "cannot symbolize vDSO frames");
        }
    }

    /// What `offset` resolved to; empty if unknown or not looked up.
    pub fn symbols(&self, offset: u64) -> Symbols {
        self.symbols.get(&offset).cloned().unwrap_or_default()
    }
}
