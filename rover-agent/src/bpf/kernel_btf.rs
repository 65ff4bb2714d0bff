//! What the programs need from the kernel's BTF, found at load time (Rust eBPF has no CO-RE
//! relocations): member offsets (`task_struct::tgid` for the fork program, the task and cgroup
//! members the task iterator reads) and enumerator values.
//!
//! The file (`/sys/kernel/btf/vmlinux`, ~6 MB) is streamed through a small buffer: once through
//! its string section for the offsets of the names asked for, then through its type section,
//! once more per level of anonymous struct a member is nested in. Parsing it whole costs the
//! agent ~40 MB of heap (aya, btf-rs), mapping it ~6 MB of resident pages: this costs neither.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// `BTF_KIND_STRUCT`, `BTF_KIND_UNION`, `BTF_KIND_ENUM`, `BTF_KIND_ENUM64`.
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_ENUM64: u32 = 19;

/// Byte offset of `tgid` in `struct task_struct`, if the kernel's BTF tells it.
pub(super) fn task_tgid_offset() -> Result<u32, String> {
    let [offset] = member_offsets(&[("task_struct", "tgid")])?;
    offset.ok_or_else(|| format!("{VMLINUX}: `task_struct` has no member `tgid`"))
}

/// Byte offsets of members (`(struct, member)`), `None` for a member the struct lacks; fails
/// when the BTF cannot be read or a struct is not in it.
pub(super) fn member_offsets<const N: usize>(
    members: &[(&str, &str); N],
) -> Result<[Option<u32>; N], String> {
    let file = File::open(VMLINUX).map_err(|error| format!("opening {VMLINUX}: {error}"))?;
    let found = lookup(file, members, &[]).map_err(|error| format!("{VMLINUX}: {error}"))?;
    let offsets: Vec<Option<u32>> = found.members;
    offsets
        .try_into()
        .map_err(|_| format!("{VMLINUX}: lookup lost members"))
}

/// The value of an enumerator (`memory_cgrp_id`), if the kernel's BTF has it.
pub(super) fn enumerator(name: &str) -> Result<Option<i64>, String> {
    let file = File::open(VMLINUX).map_err(|error| format!("opening {VMLINUX}: {error}"))?;
    let found = lookup(file, &[], &[name]).map_err(|error| format!("{VMLINUX}: {error}"))?;
    Ok(found.enumerators.first().copied().flatten())
}

struct Header {
    type_start: u64,
    type_len: u64,
    str_start: u64,
    str_len: u64,
}

/// What [`lookup`] found, in the order asked.
struct Found {
    members: Vec<Option<u32>>,
    enumerators: Vec<Option<i64>>,
}

/// Finds member offsets and enumerator values in one pass over the names and one over the
/// types, and one more per level of anonymous structs and unions a member is nested in
/// (`mm_struct`'s members are). A struct is taken at its first definition; a struct asked for
/// but absent fails.
fn lookup(
    mut btf: impl Read + Seek,
    members: &[(&str, &str)],
    enumerators: &[&str],
) -> io::Result<Found> {
    /// Anonymous levels looked through at most.
    const NESTING_MAX: usize = 4;
    let header = read_header(&mut btf)?;
    let mut names: Vec<&str> = members
        .iter()
        .flat_map(|(strukt, member)| [*strukt, *member])
        .chain(enumerators.iter().copied())
        .collect();
    names.sort_unstable();
    names.dedup();
    btf.seek(SeekFrom::Start(header.str_start))?;
    let offsets = find_strings(BufReader::new((&mut btf).take(header.str_len)), &names)?;
    let offset_of = |name: &str| {
        names
            .binary_search(&name)
            .ok()
            .and_then(|index| offsets[index])
    };
    let mut found = Found {
        members: vec![None; members.len()],
        enumerators: vec![None; enumerators.len()],
    };
    let mut structs_seen = vec![false; members.len()];
    // Where members not found yet are looked for next: (query, anonymous type id, its offset).
    let mut nested: Vec<(usize, u32, u32)> = Vec::new();
    for level in 0..=NESTING_MAX {
        if level > 0 && nested.is_empty() {
            break;
        }
        let looking = std::mem::take(&mut nested);
        btf.seek(SeekFrom::Start(header.type_start))?;
        let mut types = BufReader::new((&mut btf).take(header.type_len));
        let mut type_id = 0u32;
        while let Some([name, info, _size]) = read_words::<3>(&mut types)? {
            type_id += 1;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            // (query, offset of this type in the query's struct)
            let wanted: Vec<(usize, u32)> = if !matches!(kind, KIND_STRUCT | KIND_UNION) {
                Vec::new()
            } else if level == 0 {
                (0..members.len())
                    .filter(|&index| {
                        !structs_seen[index] && offset_of(members[index].0) == Some(name)
                    })
                    .map(|index| (index, 0))
                    .collect()
            } else {
                looking
                    .iter()
                    .filter(|(index, id, _)| *id == type_id && found.members[*index].is_none())
                    .map(|&(index, _, base)| (index, base))
                    .collect()
            };
            if !wanted.is_empty() {
                let kind_flag = info >> 31 != 0;
                let mut anonymous = Vec::new();
                for _ in 0..vlen {
                    let [member_name, member_type, offset] = read_words::<3>(&mut types)?
                        .ok_or_else(|| invalid("a struct is cut short".to_owned()))?;
                    // With kind_flag, the low 24 bits are the bit offset (bitfields above).
                    let bytes = if kind_flag {
                        offset & 0xff_ffff
                    } else {
                        offset
                    } / 8;
                    if member_name == 0 {
                        anonymous.push((member_type, bytes));
                    }
                    for &(index, base) in &wanted {
                        if offset_of(members[index].1) == Some(member_name) {
                            found.members[index] = Some(base + bytes);
                        }
                    }
                }
                for (index, base) in wanted {
                    structs_seen[index] = true;
                    if found.members[index].is_none() {
                        nested.extend(
                            anonymous
                                .iter()
                                .map(|&(member_type, bytes)| (index, member_type, base + bytes)),
                        );
                    }
                }
                continue;
            }
            if level == 0 && matches!(kind, KIND_ENUM | KIND_ENUM64) && !enumerators.is_empty() {
                for _ in 0..vlen {
                    let (entry_name, value) = if kind == KIND_ENUM {
                        let [entry_name, value] = read_words::<2>(&mut types)?
                            .ok_or_else(|| invalid("an enum is cut short".to_owned()))?;
                        (entry_name, i64::from(value as i32))
                    } else {
                        let [entry_name, low, high] = read_words::<3>(&mut types)?
                            .ok_or_else(|| invalid("an enum is cut short".to_owned()))?;
                        (
                            entry_name,
                            ((u64::from(high) << 32) | u64::from(low)) as i64,
                        )
                    };
                    for (slot, wanted) in found.enumerators.iter_mut().zip(enumerators) {
                        if slot.is_none() && offset_of(wanted) == Some(entry_name) {
                            *slot = Some(value);
                        }
                    }
                }
                continue;
            }
            skip(&mut types, trailing_bytes(kind, vlen)?)?;
        }
        if level == 0
            && let Some(index) = (0..members.len()).find(|&index| !structs_seen[index])
        {
            return Err(invalid(format!("no struct `{}`", members[index].0)));
        }
    }
    Ok(found)
}

fn read_header(btf: &mut impl Read) -> io::Result<Header> {
    let mut fixed = [0u8; 24];
    btf.read_exact(&mut fixed)?;
    let word =
        |at: usize| u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]);
    if u16::from_le_bytes([fixed[0], fixed[1]]) != MAGIC {
        return Err(invalid("not little-endian BTF".to_owned()));
    }
    let header_len = u64::from(word(4));
    Ok(Header {
        type_start: header_len + u64::from(word(8)),
        type_len: u64::from(word(12)),
        str_start: header_len + u64::from(word(16)),
        str_len: u64::from(word(20)),
    })
}

/// The offsets of `wanted` in a string section of NUL-terminated names.
fn find_strings(mut strings: impl BufRead, wanted: &[&str]) -> io::Result<Vec<Option<u32>>> {
    let mut found = vec![None; wanted.len()];
    let mut offset = 0u32;
    let mut name = Vec::new();
    loop {
        name.clear();
        let read = strings.read_until(0, &mut name)?;
        if read == 0 || found.iter().all(Option::is_some) {
            return Ok(found);
        }
        let text = name.strip_suffix(&[0]).unwrap_or(&name);
        for (slot, wanted) in found.iter_mut().zip(wanted) {
            if slot.is_none() && text == wanted.as_bytes() {
                *slot = Some(offset);
            }
        }
        offset = offset.saturating_add(read as u32);
    }
}

/// Bytes a type record of `kind` carries after its header.
fn trailing_bytes(kind: u32, vlen: u32) -> io::Result<u64> {
    let vlen = u64::from(vlen);
    Ok(match kind {
        // INT, VAR, DECL_TAG: one word; ARRAY: three.
        1 | 14 | 17 => 4,
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per member or entry.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO: 8 bytes per entry or parameter.
        6 | 13 => 8 * vlen,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: none.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        other => return Err(invalid(format!("unknown type kind {other}"))),
    })
}

fn read_words<const N: usize>(input: &mut impl Read) -> io::Result<Option<[u32; N]>> {
    let mut words = [0u32; N];
    for (index, word) in words.iter_mut().enumerate() {
        let mut bytes = [0u8; 4];
        match input.read_exact(&mut bytes) {
            Ok(()) => *word = u32::from_le_bytes(bytes),
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof && index == 0 => {
                return Ok(None);
            }
            Err(error) => return Err(error),
        }
    }
    Ok(Some(words))
}

fn skip(input: &mut impl Read, bytes: u64) -> io::Result<()> {
    let skipped = io::copy(&mut input.take(bytes), &mut io::sink())?;
    if skipped == bytes {
        Ok(())
    } else {
        Err(invalid("a type record is cut short".to_owned()))
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernel_has_a_tgid_offset() {
        if !std::path::Path::new(VMLINUX).exists() {
            eprintln!("SKIPPED: no kernel BTF here");
            return;
        }
        let offset = task_tgid_offset().expect("offset");
        // pid and tgid follow each other, far into the struct.
        let [pid, none] =
            member_offsets(&[("task_struct", "pid"), ("task_struct", "no_such_member")])
                .expect("pid offset");
        let pid = pid.expect("pid");
        assert_eq!(none, None);
        assert!(enumerator("memory_cgrp_id").expect("btf").is_some());
        // Nested in anonymous structs.
        let [arg_start, arg_end] =
            member_offsets(&[("mm_struct", "arg_start"), ("mm_struct", "arg_end")]).expect("mm");
        assert_eq!(arg_end, arg_start.map(|start| start + 8));
        assert_eq!(offset, pid + 4);
        assert!(offset > 64 && offset.is_multiple_of(4), "{offset}");
    }

    /// A hand-made BTF: an INT, `struct s { int a; int b; }`, `enum e { E0 = 7, E1 = -3 }`,
    /// `struct m { int a; struct { int b; int x; }; }`.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0e\0E0\0E1\0m\0x\0";
        let mut types = Vec::new();
        let mut word = |value: u32| types.extend_from_slice(&value.to_le_bytes());
        // [1] INT "int", size 4, encoding word.
        word(1);
        word(1 << 24);
        word(4);
        word(32);
        // [2] STRUCT "s", 2 members, size 8.
        word(5);
        word((KIND_STRUCT << 24) | 2);
        word(8);
        for (name, bits) in [(7, 0), (9, 32)] {
            word(name);
            word(1);
            word(bits);
        }
        // [3] ENUM "e" { E0 = 7, E1 = -3 }, size 4.
        word(11);
        word((KIND_ENUM << 24) | 2);
        word(4);
        for (name, value) in [(13, 7), (16, -3i32 as u32)] {
            word(name);
            word(value);
        }
        // [4] STRUCT "m" { int a; struct { int b; int x; }; }, size 12; [5] that anonymous
        // struct, defined after its user.
        word(19);
        word((KIND_STRUCT << 24) | 2);
        word(12);
        for (name, member_type, bits) in [(7, 1, 0), (0, 5, 32)] {
            word(name);
            word(member_type);
            word(bits);
        }
        word(0);
        word((KIND_STRUCT << 24) | 2);
        word(8);
        for (name, bits) in [(9, 0), (21, 32)] {
            word(name);
            word(1);
            word(bits);
        }
        let mut btf = Vec::new();
        btf.extend_from_slice(&MAGIC.to_le_bytes());
        btf.extend_from_slice(&[1, 0]);
        for value in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            btf.extend_from_slice(&value.to_le_bytes());
        }
        btf.extend_from_slice(&types);
        btf.extend_from_slice(strings);
        btf
    }

    #[test]
    fn finds_a_member_past_other_types() {
        let btf = tiny_btf();
        let members = |btf: &[u8], wanted: &[(&str, &str)]| {
            lookup(io::Cursor::new(btf), wanted, &[]).map(|found| found.members)
        };
        assert_eq!(
            members(&btf, &[("s", "b"), ("s", "a"), ("s", "c")]).expect("s"),
            [Some(4), Some(0), None]
        );
        assert_eq!(
            members(&btf, &[("m", "x"), ("m", "b"), ("m", "a"), ("m", "y")]).expect("m"),
            [Some(8), Some(4), Some(0), None]
        );
        assert!(members(&btf, &[("t", "a")]).is_err());
        assert!(members(&btf[..40], &[("s", "b")]).is_err());
    }

    #[test]
    fn finds_an_enumerator() {
        let btf = tiny_btf();
        let found = lookup(io::Cursor::new(&btf), &[], &["E1", "E9"]).expect("enum");
        assert_eq!(found.enumerators, [Some(-3), None]);
    }
}
