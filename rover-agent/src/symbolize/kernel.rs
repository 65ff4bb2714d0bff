//! Kernel addresses through `/proc/kallsyms`.
//!
//! kallsyms lists runtime (KASLR-randomized) addresses, so none of blazesym's KASLR offset
//! handling applies: no vmlinux is searched and the offset is pinned to 0. kallsyms has no
//! symbol sizes, so an address past the last function of a region resolves to that function.

use blazesym::MaybeDefault;
use blazesym::symbolize::source::{Kernel, Source};
use blazesym::symbolize::{Input, Reason, Symbolized};
use tracing::warn;

use super::SymbolizeStats;
use super::resolved::{SymbolCache, Symbols, fill_cache};

/// The `Frame::module` of kernel frames.
pub(super) const KERNEL_MODULE: &str = "[kernel.kallsyms]";

#[derive(Default)]
pub(super) struct KernelSymbols {
    symbols: SymbolCache,
    warned: bool,
}

impl KernelSymbols {
    /// Looks up the addresses not cached yet.
    pub fn resolve(
        &mut self,
        blazesym: &blazesym::symbolize::Symbolizer,
        addrs: impl IntoIterator<Item = u64>,
        stats: &mut SymbolizeStats,
    ) {
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            kaslr_offset: Some(0),
            debug_syms: false,
            ..Kernel::default()
        });
        let mut hidden = false;
        let result = fill_cache(&mut self.symbols, addrs, stats, |addrs| {
            let results = blazesym.symbolize(&source, Input::AbsAddr(addrs))?;
            hidden = results
                .iter()
                .any(|result| matches!(result, Symbolized::Unknown(Reason::MissingSyms)));
            Ok(results)
        });
        if self.warned {
            return;
        }
        if let Err(error) = result {
            warn!(%error, "cannot read /proc/kallsyms; kernel frames stay unknown");
            self.warned = true;
        } else if let Ok(failed @ 1..) = result {
            warn!(
                failed,
                "kernel symbol lookups failed; those frames stay unknown"
            );
            self.warned = true;
        } else if hidden {
            warn!(
                "/proc/kallsyms shows no addresses (kptr_restrict, missing CAP_SYSLOG?); kernel frames stay unknown"
            );
            self.warned = true;
        }
    }

    /// What `addr` resolved to; empty if unknown or not looked up.
    pub fn symbols(&self, addr: u64) -> Symbols {
        self.symbols.get(&addr).cloned().unwrap_or_default()
    }
}
