//! Separate debug files, found by GNU build ID where distributions install them
//! (`/usr/lib/debug/.build-id/xx/yyyy.debug`, e.g. Debian's `libc6-dbg`). Their `.symtab` names
//! the internal functions that a stripped binary's `.dynsym` lacks, without reading DWARF.
//!
//! A debug file keeps the binary's headers, but its segments have no contents, so blazesym
//! cannot turn file offsets into addresses with it: that is done with the binary's own
//! `PT_LOAD` segments, and the debug file is looked up by virtual address.

use std::error::Error;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Reason, Symbolized, Symbolizer as BlazeSymbolizer};
use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{FileKind, elf};
use tracing::debug;

/// Where a build ID's debug file lies below a root directory.
const BUILD_ID_DIR: &str = "usr/lib/debug/.build-id";

/// A `PT_LOAD` segment: file offsets `offset..offset + size` are loaded at `vaddr..`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    size: u64,
    vaddr: u64,
}

/// A binary's separate debug file, held open.
pub(super) struct DebugFile {
    /// Held so that `fd_path` keeps naming this file.
    _file: File,
    /// `/proc/self/fd/N`: how blazesym opens (and caches) the file.
    pub fd_path: PathBuf,
    /// Where it was found, for log messages.
    pub path: PathBuf,
    /// The binary's loadable segments, to turn its file offsets into virtual addresses.
    segments: Vec<Segment>,
}

impl DebugFile {
    /// The debug file of `binary` (build ID `build_id`) in the root of process `pid` (a
    /// container carries its own), else in the host's. `Err` if one was found but `binary`'s
    /// segments cannot be read.
    pub fn find(pid: u32, build_id: &[u8], binary: &File) -> Result<Option<Self>, Box<dyn Error>> {
        let roots = [
            PathBuf::from(format!("/proc/{pid}/root")),
            PathBuf::from("/"),
        ];
        let Some((file, path)) = find_in(&roots, build_id) else {
            return Ok(None);
        };
        let segments = load_segments(binary)?;
        Ok(Some(Self {
            fd_path: fd_path(&file),
            _file: file,
            path,
            segments,
        }))
    }

    /// Looks up file offsets of the binary by their virtual addresses in the debug file;
    /// offsets outside the binary's segments are unknown.
    pub fn symbolize<'s>(
        &self,
        blazesym: &'s BlazeSymbolizer,
        debug_info: bool,
        offsets: &[u64],
    ) -> blazesym::Result<Vec<Symbolized<'s>>> {
        let vaddrs: Vec<Option<u64>> = offsets
            .iter()
            .map(|&offset| virtual_address(&self.segments, offset))
            .collect();
        let wanted: Vec<u64> = vaddrs.iter().flatten().copied().collect();
        let source = Source::Elf(Elf {
            debug_syms: debug_info,
            ..Elf::new(&self.fd_path)
        });
        let mut found = blazesym
            .symbolize(&source, Input::VirtOffset(&wanted))?
            .into_iter();
        Ok(vaddrs
            .iter()
            .map(|vaddr| match vaddr {
                Some(_) => found
                    .next()
                    .unwrap_or(Symbolized::Unknown(Reason::UnknownAddr)),
                None => Symbolized::Unknown(Reason::InvalidFileOffset),
            })
            .collect())
    }
}

/// `/proc/self/fd/N` of `file`: names it for blazesym while it stays open.
pub(super) fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// `xx/yyyy.debug` for build ID `xxyyyy`; `None` for IDs too short to split.
fn relative_path(build_id: &[u8]) -> Option<PathBuf> {
    let (first, rest) = build_id.split_first()?;
    if rest.is_empty() {
        return None;
    }
    let rest: String = rest.iter().map(|byte| format!("{byte:02x}")).collect();
    Some(PathBuf::from(format!("{first:02x}/{rest}.debug")))
}

/// Opens the first debug file of `build_id` below one of `roots` that is a regular ELF file
/// with that build ID. Returns it with its path.
fn find_in(roots: &[PathBuf], build_id: &[u8]) -> Option<(File, PathBuf)> {
    let relative = relative_path(build_id)?;
    roots.iter().find_map(|root| {
        let path = root.join(BUILD_ID_DIR).join(&relative);
        match open_matching(&path, build_id) {
            Ok(file) => file.map(|file| (file, path)),
            Err(error) => {
                if error.kind() != io::ErrorKind::NotFound {
                    debug!(path = %path.display(), %error, "cannot open debug file");
                }
                None
            }
        }
    })
}

/// Opens `path` if it is a regular file with build ID `build_id`.
fn open_matching(path: &Path, build_id: &[u8]) -> io::Result<Option<File>> {
    // Non-blocking: a container could put a FIFO there, whose open would wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        debug!(path = %path.display(), "debug file is not a regular file");
        return Ok(None);
    }
    let found = blazesym::helper::read_elf_build_id(&fd_path(&file)).map_err(io::Error::other)?;
    if found.as_deref() != Some(build_id) {
        debug!(path = %path.display(), "debug file has another build ID");
        return Ok(None);
    }
    Ok(Some(file))
}

/// The `PT_LOAD` segments of an ELF file, read from its headers only.
fn load_segments(binary: &File) -> Result<Vec<Segment>, Box<dyn Error>> {
    let data = ReadCache::new(binary);
    let segments = match FileKind::parse(&data)? {
        FileKind::Elf32 => segments_of::<elf::FileHeader32<object::Endianness>>(&data)?,
        FileKind::Elf64 => segments_of::<elf::FileHeader64<object::Endianness>>(&data)?,
        other => return Err(format!("not an ELF file: {other:?}").into()),
    };
    if segments.is_empty() {
        return Err("no loadable segments".into());
    }
    Ok(segments)
}

fn segments_of<H: FileHeader<Endian = object::Endianness>>(
    data: &ReadCache<&File>,
) -> object::Result<Vec<Segment>> {
    let header = H::parse(data)?;
    let endian = header.endian()?;
    Ok(header
        .program_headers(endian, data)?
        .iter()
        .filter(|phdr| phdr.p_type(endian) == elf::PT_LOAD)
        .map(|phdr| Segment {
            offset: phdr.p_offset(endian).into(),
            size: phdr.p_filesz(endian).into(),
            vaddr: phdr.p_vaddr(endian).into(),
        })
        .collect())
}

/// The virtual address of file offset `offset`, by the first segment containing it (as
/// blazesym does for `Input::FileOffset`).
fn virtual_address(segments: &[Segment], offset: u64) -> Option<u64> {
    segments.iter().find_map(|segment| {
        let delta = offset.checked_sub(segment.offset)?;
        (delta < segment.size).then(|| segment.vaddr.wrapping_add(delta))
    })
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    fn libc_path() -> PathBuf {
        let maps = fs::read_to_string("/proc/self/maps").expect("own maps");
        let path = maps
            .lines()
            .filter_map(|line| line.split_whitespace().nth(5))
            .find(|path| path.contains("/libc.so"))
            .expect("libc is mapped");
        PathBuf::from(path)
    }

    fn build_id(path: &Path) -> Vec<u8> {
        blazesym::helper::read_elf_build_id(path)
            .expect("read build ID")
            .expect("has a build ID")
            .into_owned()
    }

    /// Places `file` as the debug file of `build_id` below `root`.
    fn install(root: &Path, build_id: &[u8], file: &Path) -> PathBuf {
        let path = root
            .join(BUILD_ID_DIR)
            .join(relative_path(build_id).expect("long build ID"));
        fs::create_dir_all(path.parent().expect("has a parent")).expect("create dirs");
        fs::copy(file, &path).expect("copy file");
        path
    }

    #[test]
    fn debug_file_path_splits_the_build_id() {
        assert_eq!(
            relative_path(&[0x93, 0xac, 0x61, 0x0e]),
            Some(PathBuf::from("93/ac610e.debug"))
        );
        assert_eq!(relative_path(&[0x93]), None);
        assert_eq!(relative_path(&[]), None);
    }

    #[test]
    fn offsets_map_through_the_containing_segment() {
        let segments = [
            Segment {
                offset: 0,
                size: 0x500,
                vaddr: 0,
            },
            Segment {
                offset: 0x1000,
                size: 0x200,
                vaddr: 0x401000,
            },
        ];
        assert_eq!(virtual_address(&segments, 0x10), Some(0x10));
        assert_eq!(virtual_address(&segments, 0x1010), Some(0x401010));
        assert_eq!(virtual_address(&segments, 0x11ff), Some(0x4011ff));
        assert_eq!(virtual_address(&segments, 0x1200), None);
        assert_eq!(virtual_address(&segments, 0x800), None);
        assert_eq!(virtual_address(&segments, u64::MAX), None);
    }

    #[test]
    fn libc_segments_match_its_program_headers() {
        let libc = File::open(libc_path()).expect("open libc");
        let segments = load_segments(&libc).expect("libc segments");
        // The code segment is loaded at an address congruent to its offset.
        assert!(segments.len() >= 2, "{segments:?}");
        assert!(
            segments
                .iter()
                .all(|s| s.vaddr % 4096 == s.offset % 4096 && s.size > 0),
            "{segments:?}"
        );
    }

    #[test]
    fn non_elf_has_no_segments() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("not-elf");
        fs::write(&path, b"#!/bin/sh\n").expect("write file");
        let file = File::open(&path).expect("open file");
        assert!(load_segments(&file).is_err());
        fs::write(&path, b"\x7fELF\x02\x01\x01").expect("write file");
        let file = File::open(&path).expect("open file");
        assert!(load_segments(&file).is_err());
    }

    #[test]
    fn debug_file_is_found_in_the_first_root_with_a_matching_build_id() {
        let libc = libc_path();
        let id = build_id(&libc);
        let first = tempfile::tempdir().expect("temp dir");
        let second = tempfile::tempdir().expect("temp dir");
        let roots = [first.path().to_owned(), second.path().to_owned()];
        assert!(find_in(&roots, &id).is_none(), "nothing installed");

        // Any ELF with the build ID serves; libc itself is one.
        let expected = install(second.path(), &id, &libc);
        let (_, path) = find_in(&roots, &id).expect("found in the second root");
        assert_eq!(path, expected);

        // Another build ID at that path is ignored, and so is a FIFO, without blocking.
        let other = std::env::current_exe().expect("current exe");
        install(first.path(), &id, &other);
        assert_eq!(find_in(&roots, &id).map(|(_, path)| path), Some(expected));
        let fifo = first
            .path()
            .join(BUILD_ID_DIR)
            .join(relative_path(&id).expect("long build ID"));
        fs::remove_file(&fifo).expect("remove file");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("no NUL");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        assert!(find_in(&roots, &id).is_some());

        // A relative symlink inside the root is followed, as distributions install them.
        fs::remove_file(&fifo).expect("remove fifo");
        symlink("../../../../../libc-copy", &fifo).expect("symlink");
        fs::copy(&libc, first.path().join("libc-copy")).expect("copy libc");
        let (_, path) = find_in(&roots, &id).expect("found through the symlink");
        assert_eq!(path, fifo);
    }

    /// The file offset in `libc` of `function`, from the `.symtab` of its debug file.
    fn offset_in_debug_symtab(libc: &File, debug_file: &Path, function: &str) -> u64 {
        use object::{Object, ObjectSymbol};
        let data = fs::read(debug_file).expect("read debug file");
        let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data)
            .expect("parse debug file");
        let vaddr = elf
            .symbols()
            .find(|symbol| symbol.name() == Ok(function))
            .map(|symbol| symbol.address())
            .unwrap_or_else(|| panic!("{function} not in the debug file's .symtab"));
        load_segments(libc)
            .expect("libc segments")
            .iter()
            .find(|s| (s.vaddr..s.vaddr + s.size).contains(&vaddr))
            .map(|s| vaddr - s.vaddr + s.offset)
            .expect("function in a segment")
    }

    #[test]
    fn libc_start_thread_is_named_from_the_debug_file_without_dwarf() {
        let libc_path = libc_path();
        let id = build_id(&libc_path);
        let debug_path = Path::new("/")
            .join(BUILD_ID_DIR)
            .join(relative_path(&id).expect("long build ID"));
        if !debug_path.exists() {
            eprintln!(
                "\n!!!!!!!! SKIPPED: no libc debug file at {} (install libc6-dbg) !!!!!!!!\n",
                debug_path.display()
            );
            return;
        }
        let libc = File::open(&libc_path).expect("open libc");
        let offset = offset_in_debug_symtab(&libc, &debug_path, "start_thread");

        // libc alone only has .dynsym, where start_thread is missing.
        let blazesym = BlazeSymbolizer::new();
        let alone = Source::Elf(Elf {
            debug_syms: false,
            ..Elf::new(&libc_path)
        });
        let found = blazesym
            .symbolize(&alone, Input::FileOffset(&[offset]))
            .expect("symbolize libc");
        let name = match &found[0] {
            Symbolized::Sym(sym) => Some(sym.name.to_string()),
            Symbolized::Unknown(_) => None,
        };
        assert_ne!(name.as_deref(), Some("start_thread"));

        let maps = procfs::process::Process::myself()
            .and_then(|process| process.maps())
            .expect("own maps");
        let addr = maps
            .iter()
            // Executable: blazesym maps the whole file too.
            .filter(|map| map.perms.contains(procfs::process::MMPermissions::EXECUTE))
            .filter(|map| map.pathname == procfs::process::MMapPath::Path(libc_path.clone()))
            .find(|map| (map.offset..map.offset + map.address.1 - map.address.0).contains(&offset))
            .map(|map| map.address.0 + offset - map.offset)
            .expect("start_thread is mapped");
        let mut symbolizer = super::super::Symbolizer::new(
            super::super::SymbolizerConfig {
                debug_info: false,
                symbol_cache_bytes: super::super::DEFAULT_SYMBOL_CACHE_BYTES,
            },
            super::super::ProcessTable::new(std::time::Duration::ZERO),
        );
        // The sampled instruction, then a return address just past the function's start.
        let frames = symbolizer
            .user_frames(std::process::id(), &[addr, addr + 1])
            .frames;
        assert_eq!(frames.len(), 2, "{frames:#?}");
        for frame in &frames {
            assert_eq!(
                frame.function.as_deref(),
                Some("start_thread"),
                "{frames:#?}"
            );
            assert_eq!(frame.module.as_deref().map(Path::new), Some(&*libc_path));
            assert_eq!((frame.file.as_deref(), frame.line), (None, None));
        }
        assert_eq!(frames[0].address, offset);
    }
}
