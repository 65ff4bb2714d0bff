//! Lookup results of user binaries, the vDSO and the kernel in one cache bounded by bytes.
//!
//! Entries are weighed by an estimate of their heap bytes (strings included) and evicted by
//! `quick_cache`'s S3-FIFO policy (recently and often used entries stay) when a new one would
//! exceed the bound. An entry heavier than the whole bound is not kept at all. Lookups never read
//! back what they just inserted: each stack carries its results in its own map, so a tiny bound
//! costs lookups, never correctness.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::mem::size_of;
use std::rc::Rc;

use blazesym::symbolize::{Reason, Symbolized};
use quick_cache::{Lifecycle, Weighter};

use super::SymbolizeStats;
use super::binaries::BinaryId;
use super::resolved::{Symbol, Symbols, symbols_of};

/// What a cached result was looked up for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum SymbolKey {
    /// A file offset of a binary.
    Binary(BinaryId, u64),
    /// An offset into the vDSO.
    Vdso(u64),
    /// A kernel address.
    Kernel(u64),
}

/// What an address resolved to.
#[derive(Clone, Debug, Default)]
pub(super) struct Resolved {
    pub symbols: Symbols,
    /// The module to report, where it comes with the symbol (kernel modules).
    pub module: Option<Rc<str>>,
}

/// Bookkeeping per entry besides key and value: the cache's slab entry and hash table slot.
const ENTRY_OVERHEAD_BYTES: usize = 32;
/// The strong and weak counts in front of an `Rc`'s value.
const RC_HEADER_BYTES: usize = 2 * size_of::<usize>();

impl Resolved {
    /// Estimated heap bytes of an entry holding this value. `module` is shared between entries
    /// (one per kernel module): only its pointer counts.
    fn entry_bytes(&self) -> usize {
        let strings: usize = self
            .symbols
            .iter()
            .map(|symbol| {
                symbol.function.capacity() + symbol.file.as_ref().map_or(0, String::capacity)
            })
            .sum();
        ENTRY_OVERHEAD_BYTES
            + size_of::<SymbolKey>()
            + size_of::<Self>()
            + RC_HEADER_BYTES
            + self.symbols.len() * size_of::<Symbol>()
            + strings
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct ByteWeighter;

impl Weighter<SymbolKey, Resolved> for ByteWeighter {
    fn weight(&self, _key: &SymbolKey, value: &Resolved) -> u64 {
        value.entry_bytes() as u64
    }
}

/// Counts the entries an insertion evicted (or refused as too heavy).
#[derive(Clone, Copy, Debug, Default)]
struct CountEvictions;

impl Lifecycle<SymbolKey, Resolved> for CountEvictions {
    type RequestState = u64;

    fn begin_request(&self) -> u64 {
        0
    }

    fn on_evict(&self, evicted: &mut u64, _key: SymbolKey, _value: Resolved) {
        *evicted += 1;
    }
}

type Entries =
    quick_cache::unsync::Cache<SymbolKey, Resolved, ByteWeighter, RandomState, CountEvictions>;

pub(super) struct SymbolCache {
    entries: Entries,
    evictions: u64,
}

/// A guess of the average entry, to size the cache's record of recently evicted keys.
const TYPICAL_ENTRY_BYTES: usize = 256;

impl SymbolCache {
    /// A cache of at most `bytes` (estimated).
    pub fn new(bytes: usize) -> Self {
        Self {
            entries: Entries::with(
                (bytes / TYPICAL_ENTRY_BYTES).max(1),
                bytes as u64,
                ByteWeighter,
                RandomState::new(),
                CountEvictions,
            ),
            evictions: 0,
        }
    }

    /// The cached result for `key`, now counted as used.
    pub fn get(&self, key: &SymbolKey) -> Option<&Resolved> {
        self.entries.get(key)
    }

    pub fn insert(&mut self, key: SymbolKey, value: Resolved) {
        self.evictions += self.entries.insert_with_lifecycle(key, value);
    }

    /// Drops the entries whose key `keep` rejects (not counted as evictions).
    pub fn retain(&mut self, keep: impl Fn(&SymbolKey) -> bool) {
        self.entries.retain(|key, _| keep(key));
    }

    /// Estimated bytes held now.
    pub fn bytes(&self) -> u64 {
        self.entries.weight()
    }

    /// Entries evicted (or refused) to stay within the bound, so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Puts the symbols of each of `wanted` (keyed by `key`) in `found`: from the cache, else
    /// looked up with one `symbolize` call for all misses. Returns how many lookups failed
    /// with an error (cached as unknown, not retried).
    ///
    /// On error nothing is cached or found, so the misses read as unknown.
    pub fn fill<'s>(
        &mut self,
        wanted: impl IntoIterator<Item = u64>,
        key: impl Fn(u64) -> SymbolKey,
        found: &mut HashMap<SymbolKey, Symbols>,
        stats: &mut SymbolizeStats,
        symbolize: impl FnOnce(&[u64]) -> blazesym::Result<Vec<Symbolized<'s>>>,
    ) -> blazesym::Result<usize> {
        let mut misses = Vec::new();
        for addr in wanted {
            let key = key(addr);
            if found.contains_key(&key) {
                continue;
            }
            match self.get(&key) {
                Some(cached) => {
                    found.insert(key, cached.symbols.clone());
                }
                None => misses.push(addr),
            }
        }
        if misses.is_empty() {
            return Ok(0);
        }
        misses.sort_unstable();
        misses.dedup();
        stats.symbol_lookups += misses.len() as u64;
        let results = symbolize(&misses)?;
        let failed = results
            .iter()
            .filter(|result| matches!(result, Symbolized::Unknown(Reason::IgnoredError)))
            .count();
        for (addr, result) in misses.into_iter().zip(&results) {
            let symbols = symbols_of(result);
            let key = key(addr);
            found.insert(key, symbols.clone());
            self.insert(
                key,
                Resolved {
                    symbols,
                    module: None,
                },
            );
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;

    use blazesym::symbolize::Sym;

    use super::*;

    fn sym(name: &str) -> Symbolized<'static> {
        Symbolized::Sym(Sym {
            name: Cow::Owned(name.to_owned()),
            module: None,
            addr: 0x1000,
            offset: 0,
            size: None,
            code_info: None,
            inlined: Box::new([]),
            _non_exhaustive: (),
        })
    }

    fn name(symbols: &Symbols) -> Option<&str> {
        symbols.first().map(|symbol| symbol.function.as_str())
    }

    #[test]
    fn cache_is_filled_once_per_address() {
        let mut cache = SymbolCache::new(1 << 20);
        let mut stats = SymbolizeStats::default();
        let mut calls = Vec::new();
        let mut failures = Vec::new();
        for _ in 0..2 {
            let mut found = HashMap::new();
            let failed = cache.fill(
                [3, 1, 3],
                SymbolKey::Vdso,
                &mut found,
                &mut stats,
                |addrs| {
                    calls.push(addrs.to_vec());
                    Ok(vec![
                        Symbolized::Unknown(Reason::UnknownAddr),
                        Symbolized::Unknown(Reason::IgnoredError),
                    ])
                },
            );
            failures.push(failed.expect("fake lookup succeeds"));
            assert_eq!(found.len(), 2);
        }
        assert_eq!(calls, [vec![1, 3]]);
        assert_eq!(failures, [1, 0]);
        assert_eq!(stats.symbol_lookups, 2);
        assert_eq!(cache.entries.len(), 2);
    }

    #[test]
    fn keys_of_different_sources_do_not_collide() {
        let mut cache = SymbolCache::new(1 << 20);
        let mut stats = SymbolizeStats::default();
        let mut found = HashMap::new();
        for (key, function) in [
            (SymbolKey::Vdso as fn(u64) -> SymbolKey, "vdso"),
            (SymbolKey::Kernel, "kernel"),
            (|offset| SymbolKey::Binary(BinaryId(7), offset), "binary"),
        ] {
            cache
                .fill([0x10], key, &mut found, &mut stats, |_| {
                    Ok(vec![sym(function)])
                })
                .expect("fake lookup succeeds");
        }
        assert_eq!(found.len(), 3);
        assert_eq!(name(&found[&SymbolKey::Kernel(0x10)]), Some("kernel"));
        assert_eq!(
            name(&found[&SymbolKey::Binary(BinaryId(7), 0x10)]),
            Some("binary")
        );
    }

    #[test]
    fn byte_bound_evicts_and_lookups_stay_correct() {
        const BOUND: usize = 8 * 1024;
        let mut cache = SymbolCache::new(BOUND);
        let mut stats = SymbolizeStats::default();
        let function = |addr: u64| format!("function_with_a_long_name_{addr:08}");
        let lookup = |cache: &mut SymbolCache, stats: &mut SymbolizeStats, addr: u64| {
            let mut found = HashMap::new();
            cache
                .fill([addr], SymbolKey::Kernel, &mut found, stats, |addrs| {
                    Ok(addrs.iter().map(|&addr| sym(&function(addr))).collect())
                })
                .expect("fake lookup succeeds");
            found[&SymbolKey::Kernel(addr)].clone()
        };
        for addr in 0..1000 {
            let symbols = lookup(&mut cache, &mut stats, addr);
            assert_eq!(name(&symbols), Some(function(addr).as_str()));
            assert!(cache.bytes() <= BOUND as u64, "{} bytes", cache.bytes());
        }
        assert!(cache.evictions() > 0);
        assert_eq!(stats.symbol_lookups, 1000);
        // What was evicted is looked up again, with the same result.
        for addr in 0..1000 {
            let symbols = lookup(&mut cache, &mut stats, addr);
            assert_eq!(name(&symbols), Some(function(addr).as_str()));
        }
        assert!(stats.symbol_lookups > 1000);
        assert!(cache.bytes() <= BOUND as u64);
    }

    #[test]
    fn entry_heavier_than_the_bound_is_still_returned() {
        let mut cache = SymbolCache::new(16);
        let mut stats = SymbolizeStats::default();
        let mut found = HashMap::new();
        cache
            .fill([1], SymbolKey::Kernel, &mut found, &mut stats, |_| {
                Ok(vec![sym("too_heavy")])
            })
            .expect("fake lookup succeeds");
        assert_eq!(name(&found[&SymbolKey::Kernel(1)]), Some("too_heavy"));
        assert_eq!(cache.bytes(), 0);
        assert_eq!(cache.evictions(), 1);
    }

    #[test]
    fn entries_weigh_their_strings() {
        let short = Resolved {
            symbols: Rc::new([Symbol {
                function: "f".to_owned(),
                file: None,
                line: None,
                inlined: false,
            }]),
            module: None,
        };
        let long = Resolved {
            symbols: Rc::new([Symbol {
                function: "f".repeat(1000),
                file: Some("a.c".to_owned()),
                line: Some(1),
                inlined: false,
            }]),
            module: None,
        };
        assert!(long.entry_bytes() >= short.entry_bytes() + 1000);
        assert!(Resolved::default().entry_bytes() < short.entry_bytes());
    }
}
