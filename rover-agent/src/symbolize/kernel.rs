//! Kernel addresses through `/proc/kallsyms`, held in a compact table of its own.
//!
//! Why not blazesym's kallsyms source: it keeps every symbol as its own allocation, about 8 MB
//! on this machine's kernel, a quarter of the agent's whole memory budget. This table keeps only
//! code symbols, 16 bytes each plus their names in one string: about 5 MB for the same kernel.
//! It also keeps the module of module symbols, which blazesym drops.
//!
//! kallsyms lists runtime (KASLR-randomized) addresses and no symbol sizes: an address resolves
//! to the closest code symbol at or below it.

use std::io::{self, BufRead, BufReader};
use std::rc::Rc;

use tracing::warn;

use super::SymbolizeStats;
use super::resolved::{Symbol, Symbols};
use super::symbol_cache::{Resolved, SymbolCache, SymbolKey};

/// The `Frame::module` of frames in the core kernel; module frames carry `[module]`.
pub(super) const KERNEL_MODULE: &str = "[kernel.kallsyms]";
const KALLSYMS: &str = "/proc/kallsyms";

/// Code symbols of the running kernel, sorted by address.
#[derive(Debug, Default)]
pub(super) struct Kallsyms {
    /// Sorted by address.
    symbols: Vec<KernelSymbol>,
    names: String,
    /// Shared by the cache entries of their symbols.
    modules: Vec<Rc<str>>,
}

/// 16 bytes per symbol; the name lives in `Kallsyms::names`.
#[derive(Clone, Copy, Debug)]
struct KernelSymbol {
    address: u64,
    name_start: u32,
    name_len: u16,
    /// Index into `Kallsyms::modules`; 0 is the core kernel.
    module: u16,
}

impl Kallsyms {
    /// Parses kallsyms text (`ADDRESS TYPE NAME [MODULE]` lines).
    pub fn parse(mut reader: impl BufRead) -> io::Result<Self> {
        let mut table = Self {
            modules: vec![KERNEL_MODULE.into()],
            ..Self::default()
        };
        let mut line = String::new();
        while {
            line.clear();
            reader.read_line(&mut line)? > 0
        } {
            let mut fields = line.split_ascii_whitespace();
            let (Some(address), Some("t" | "T"), Some(name)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let (Ok(address), Ok(name_len)) =
                (u64::from_str_radix(address, 16), u16::try_from(name.len()))
            else {
                continue;
            };
            let module = match fields.next() {
                Some(module) => table.module_index(module.trim_matches(['[', ']'])),
                None => 0,
            };
            let name_start = table.names.len() as u32;
            table.names.push_str(name);
            table.symbols.push(KernelSymbol {
                address,
                name_start,
                name_len,
                module,
            });
        }
        if !table.symbols.is_empty() && table.symbols.iter().all(|symbol| symbol.address == 0) {
            return Err(io::Error::other(
                "/proc/kallsyms shows no addresses (kernel.kptr_restrict, or no CAP_SYSLOG)",
            ));
        }
        // The core kernel comes sorted; modules follow in their own ranges.
        table.symbols.sort_by_key(|symbol| symbol.address);
        table.symbols.shrink_to_fit();
        table.names.shrink_to_fit();
        Ok(table)
    }

    fn module_index(&mut self, module: &str) -> u16 {
        let module = format!("[{module}]");
        match self.modules.iter().position(|known| **known == module) {
            Some(index) => index as u16,
            None => {
                self.modules.push(module.into());
                (self.modules.len() - 1) as u16
            }
        }
    }

    /// How many code symbols the table holds.
    pub fn symbol_count(&self) -> usize {
        self.symbols.len()
    }

    pub fn load() -> io::Result<Self> {
        let file = std::fs::File::open(KALLSYMS)?;
        Self::parse(BufReader::with_capacity(64 * 1024, file))
    }

    /// The function containing `address` and its module.
    pub fn lookup(&self, address: u64) -> Option<(&str, &Rc<str>)> {
        let index = self
            .symbols
            .partition_point(|symbol| symbol.address <= address)
            .checked_sub(1)?;
        let symbol = self.symbols[index];
        let start = symbol.name_start as usize;
        let name = &self.names[start..start + usize::from(symbol.name_len)];
        Some((name, &self.modules[usize::from(symbol.module)]))
    }
}

/// Kernel symbols, loaded on first use; resolved addresses go to the symbol cache.
pub(super) struct KernelSymbols {
    table: Option<Kallsyms>,
    /// Set when kallsyms could not be read: frames stay unknown, warned once.
    failed: bool,
    /// [`KERNEL_MODULE`], shared by unknown frames.
    core: Rc<str>,
}

impl Default for KernelSymbols {
    fn default() -> Self {
        Self {
            table: None,
            failed: false,
            core: KERNEL_MODULE.into(),
        }
    }
}

impl KernelSymbols {
    /// The function at `address` (none if unknown) and the module to report it under.
    pub fn symbols(
        &mut self,
        address: u64,
        cache: &mut SymbolCache,
        stats: &mut SymbolizeStats,
    ) -> (Symbols, Rc<str>) {
        let key = SymbolKey::Kernel(address);
        let module_of = |resolved: &Resolved, core: &Rc<str>| {
            resolved.module.clone().unwrap_or_else(|| Rc::clone(core))
        };
        if let Some(known) = cache.get(&key) {
            return (known.symbols.clone(), module_of(known, &self.core));
        }
        stats.symbol_lookups += 1;
        let resolved = match self.table().and_then(|table| table.lookup(address)) {
            Some((name, module)) => Resolved {
                symbols: Rc::new([Symbol {
                    function: name.to_owned(),
                    file: None,
                    line: None,
                    inlined: false,
                }]),
                module: Some(Rc::clone(module)),
            },
            None => Resolved::default(),
        };
        let found = (resolved.symbols.clone(), module_of(&resolved, &self.core));
        cache.insert(key, resolved);
        found
    }

    fn table(&mut self) -> Option<&Kallsyms> {
        if self.table.is_none() && !self.failed {
            match Kallsyms::load() {
                Ok(table) => self.table = Some(table),
                Err(error) => {
                    warn!(%error, "cannot read {KALLSYMS}; kernel frames stay unknown");
                    self.failed = true;
                }
            }
        }
        self.table.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81000000 T _stext
ffffffff81001000 t helper
ffffffff81002000 D some_data
ffffffff81003000 T schedule
ffffffffc0001000 t ext4_read [ext4]
ffffffffc0000000 T ext4_init\t[ext4]
";

    fn lookup(table: &Kallsyms, address: u64) -> Option<(&str, &str)> {
        table
            .lookup(address)
            .map(|(name, module)| (name, &**module))
    }

    #[test]
    fn code_addresses_resolve_to_the_closest_symbol_below() {
        let table = Kallsyms::parse(SAMPLE.as_bytes()).expect("parses");
        assert_eq!(
            lookup(&table, 0xffffffff81001010),
            Some(("helper", KERNEL_MODULE))
        );
        // Data symbols are not functions: the code symbol below wins.
        assert_eq!(
            lookup(&table, 0xffffffff81002010),
            Some(("helper", KERNEL_MODULE))
        );
        assert_eq!(
            lookup(&table, 0xffffffff81003000),
            Some(("schedule", KERNEL_MODULE))
        );
        assert_eq!(lookup(&table, 0xffffffff80000000), None);
    }

    #[test]
    fn module_symbols_keep_their_module_even_out_of_order() {
        let table = Kallsyms::parse(SAMPLE.as_bytes()).expect("parses");
        assert_eq!(
            lookup(&table, 0xffffffffc0000010),
            Some(("ext4_init", "[ext4]"))
        );
        assert_eq!(
            lookup(&table, 0xffffffffc0001010),
            Some(("ext4_read", "[ext4]"))
        );
    }

    #[test]
    fn hidden_addresses_are_an_error() {
        let hidden = "0000000000000000 T _stext\n0000000000000000 T schedule\n";
        let error = Kallsyms::parse(hidden.as_bytes()).expect_err("addresses hidden");
        assert!(error.to_string().contains("kptr_restrict"), "{error}");
    }

    #[test]
    fn the_running_kernel_resolves_schedule() {
        let text = std::fs::read_to_string(KALLSYMS).unwrap_or_default();
        let Some(address) = text
            .lines()
            .find(|line| line.ends_with(" schedule"))
            .and_then(|line| u64::from_str_radix(line.split(' ').next()?, 16).ok())
            .filter(|&address| address != 0)
        else {
            eprintln!("skipping: kallsyms addresses are hidden for this user");
            return;
        };
        let table = Kallsyms::load().expect("kallsyms loads");
        assert_eq!(
            lookup(&table, address).map(|(name, _)| name),
            Some("schedule")
        );
    }
}
