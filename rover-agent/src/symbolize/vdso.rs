//! vDSO frames, symbolized through the agent's own vDSO: every 64-bit process of a kernel maps
//! the same image.

use std::collections::HashMap;
use std::ops::Range;

use blazesym::Pid;
use blazesym::symbolize::Input;
use blazesym::symbolize::source::{Process, Source};
use procfs::process::MMapPath;
use tracing::debug;

use super::SymbolizeStats;
use super::resolved::Symbols;
use super::symbol_cache::{SymbolCache, SymbolKey};

pub(super) const VDSO_MODULE: &str = "[vdso]";

pub(super) struct VdsoSymbols {
    /// The agent's vDSO, when it has one.
    own: Option<Range<u64>>,
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
        Self { own }
    }

    /// Puts the symbols of `offsets` in `found`, from `cache` or looked up.
    pub fn resolve(
        &self,
        blazesym: &blazesym::symbolize::Symbolizer,
        cache: &mut SymbolCache,
        offsets: impl IntoIterator<Item = u64>,
        found: &mut HashMap<SymbolKey, Symbols>,
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
        let result = cache.fill(offsets, SymbolKey::Vdso, found, stats, |offsets| {
            let addrs: Vec<u64> = offsets.iter().map(|offset| own.start + offset).collect();
            blazesym.symbolize(&source, Input::AbsAddr(&addrs))
        });
        if let Err(error) = result {
            debug!(%error, "cannot symbolize vDSO frames");
        }
    }
}
