//! What the programs need from the kernel's BTF, found at load time (Rust eBPF has no CO-RE
//! relocations): the offset of `task_struct::tgid`, which the fork program reads.
//!
//! The file (`/sys/kernel/btf/vmlinux`, ~6 MB) is streamed through a small buffer, twice: once
//! for the offsets of two names in its string section, once through its type section for the
//! struct and member with those names. Parsing it whole costs the agent ~40 MB of heap (aya,
//! btf-rs), mapping it ~6 MB of resident pages: this costs neither.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};

const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const MAGIC: u16 = 0xeb9f;

/// `BTF_KIND_STRUCT`.
const KIND_STRUCT: u32 = 4;

/// Byte offset of `tgid` in `struct task_struct`, if the kernel's BTF tells it.
pub(super) fn task_tgid_offset() -> Result<u32, String> {
    let file = File::open(VMLINUX).map_err(|error| format!("opening {VMLINUX}: {error}"))?;
    member_offset(file, "task_struct", "tgid").map_err(|error| format!("{VMLINUX}: {error}"))
}

struct Header {
    type_start: u64,
    type_len: u64,
    str_start: u64,
    str_len: u64,
}

fn member_offset(mut btf: impl Read + Seek, strukt: &str, member: &str) -> io::Result<u32> {
    let header = read_header(&mut btf)?;
    btf.seek(SeekFrom::Start(header.str_start))?;
    let names = find_strings(
        BufReader::new((&mut btf).take(header.str_len)),
        &[strukt, member],
    )?;
    let (Some(strukt_name), Some(member_name)) = (names[0], names[1]) else {
        return Err(invalid(format!(
            "no `{strukt}` or `{member}` among its names"
        )));
    };
    btf.seek(SeekFrom::Start(header.type_start))?;
    let mut types = BufReader::new((&mut btf).take(header.type_len));
    while let Some([name, info, _size]) = read_words::<3>(&mut types)? {
        let kind = (info >> 24) & 0x1f;
        let vlen = info & 0xffff;
        if kind == KIND_STRUCT && name == strukt_name {
            let kind_flag = info >> 31 != 0;
            for _ in 0..vlen {
                let [name, _type, offset] = read_words::<3>(&mut types)?
                    .ok_or_else(|| invalid(format!("`{strukt}` is cut short")))?;
                if name == member_name {
                    // With kind_flag, the low 24 bits are the bit offset (bitfields above).
                    let bits = if kind_flag {
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    return Ok(bits / 8);
                }
            }
            return Err(invalid(format!("`{strukt}` has no member `{member}`")));
        }
        skip(&mut types, trailing_bytes(kind, vlen)?)?;
    }
    Err(invalid(format!("no struct `{strukt}`")))
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
fn find_strings<const N: usize>(
    mut strings: impl BufRead,
    wanted: &[&str; N],
) -> io::Result<[Option<u32>; N]> {
    let mut found = [None; N];
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
        let pid = member_offset(File::open(VMLINUX).expect("open"), "task_struct", "pid")
            .expect("pid offset");
        assert_eq!(offset, pid + 4);
        assert!(offset > 64 && offset.is_multiple_of(4), "{offset}");
    }

    /// A hand-made BTF: an INT, then `struct s { int a; int b; }`.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0s\0a\0b\0";
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
        assert_eq!(
            member_offset(io::Cursor::new(&btf), "s", "b").expect("b"),
            4
        );
        assert_eq!(
            member_offset(io::Cursor::new(&btf), "s", "a").expect("a"),
            0
        );
        assert!(member_offset(io::Cursor::new(&btf), "s", "c").is_err());
        assert!(member_offset(io::Cursor::new(&btf[..40]), "s", "b").is_err());
    }
}
