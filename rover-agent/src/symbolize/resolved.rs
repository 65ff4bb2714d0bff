//! What an address resolves to, and how that becomes [`Frame`]s.

use std::rc::Rc;

use blazesym::symbolize::{CodeInfo, Symbolized};

use super::SymbolizeStats;
use crate::profile::{Frame, FrameKind};

/// One function at an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Symbol {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

/// The functions at one address, innermost inlined function first; empty when unknown.
pub(super) type Symbols = Rc<[Symbol]>;

/// Converts one blazesym result, expanding inlined functions leaf first.
pub(super) fn symbols_of(symbolized: &Symbolized<'_>) -> Symbols {
    let Symbolized::Sym(sym) = symbolized else {
        return Rc::new([]);
    };
    // blazesym lists inlined functions outermost first and gives each the location inside it.
    let inlined = sym.inlined.iter().rev().map(|inlined| Symbol {
        function: inlined.name.to_string(),
        file: inlined.code_info.as_ref().map(source_file),
        line: inlined.code_info.as_ref().and_then(|info| info.line),
        inlined: true,
    });
    let outer = Symbol {
        function: sym.name.to_string(),
        file: sym.code_info.as_deref().map(source_file),
        line: sym.code_info.as_ref().and_then(|info| info.line),
        inlined: false,
    };
    inlined.chain([outer]).collect()
}

fn source_file(info: &CodeInfo<'_>) -> String {
    info.to_path().display().to_string()
}

/// Appends the frames of one stack entry: its symbols, or one unknown frame when there are none.
pub(super) fn push_frames(
    frames: &mut Vec<Frame>,
    stats: &mut SymbolizeStats,
    kind: FrameKind,
    module: &str,
    address: u64,
    symbols: &[Symbol],
) {
    if symbols.is_empty() {
        stats.frames += 1;
        stats.unknown_frames += 1;
        frames.push(Frame {
            kind,
            function: None,
            module: Some(module.to_owned()),
            address,
            file: None,
            line: None,
            inlined: false,
        });
        return;
    }
    stats.frames += symbols.len() as u64;
    frames.extend(symbols.iter().map(|symbol| Frame {
        kind,
        function: Some(symbol.function.clone()),
        module: Some(module.to_owned()),
        address,
        file: symbol.file.clone(),
        line: symbol.line,
        inlined: symbol.inlined,
    }));
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::ffi::OsStr;

    use blazesym::symbolize::{InlinedFn, Reason, Sym};

    use super::*;

    fn code_info(file: &'static str, line: u32) -> CodeInfo<'static> {
        CodeInfo {
            dir: None,
            file: Cow::Borrowed(OsStr::new(file)),
            line: Some(line),
            column: None,
            _non_exhaustive: (),
        }
    }

    #[test]
    fn inlined_functions_come_leaf_first() {
        let inlined = |name: &'static str, line| InlinedFn {
            name: Cow::Borrowed(name),
            code_info: Some(code_info("a.c", line)),
            _non_exhaustive: (),
        };
        let sym = Sym {
            name: Cow::Borrowed("outer"),
            module: None,
            addr: 0x1000,
            offset: 4,
            size: None,
            code_info: Some(Box::new(code_info("a.c", 10))),
            inlined: vec![inlined("middle", 20), inlined("leaf", 30)].into_boxed_slice(),
            _non_exhaustive: (),
        };
        let symbols = symbols_of(&Symbolized::Sym(sym));
        let names: Vec<_> = symbols
            .iter()
            .map(|s| (s.function.as_str(), s.line, s.inlined))
            .collect();
        assert_eq!(
            names,
            [
                ("leaf", Some(30), true),
                ("middle", Some(20), true),
                ("outer", Some(10), false)
            ]
        );
        assert_eq!(symbols[0].file.as_deref(), Some("a.c"));
    }

    #[test]
    fn unknown_result_becomes_one_unknown_frame() {
        let symbols = symbols_of(&Symbolized::Unknown(Reason::UnknownAddr));
        let mut stats = SymbolizeStats::default();
        let mut frames = Vec::new();
        push_frames(
            &mut frames,
            &mut stats,
            FrameKind::User,
            "[anon]",
            0x42,
            &symbols,
        );
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].function, None);
        assert_eq!(frames[0].module.as_deref(), Some("[anon]"));
        assert_eq!(frames[0].address, 0x42);
        assert_eq!((stats.frames, stats.unknown_frames), (1, 1));
    }
}
