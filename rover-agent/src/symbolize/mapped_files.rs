//! Files that processes map executable, opened while a process maps them.
//!
//! A file is opened through `/proc/PID/map_files` (any mount namespace, deleted files) when the
//! first snapshot that maps it is taken, and everything about it that needs the process alive is
//! read then: its GNU build ID and its separate debug file, looked for below the process's root.
//! What is left (parsing symbols) needs only the open file, so it can happen later, on another
//! thread, after the process exited.

use std::error::Error;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use super::debug_file::{DebugFile, fd_path};

/// A file as `/proc/PID/maps` identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct FileId {
    pub dev: (i32, i32),
    pub inode: u64,
}

/// A mapped ELF file, held open while a process snapshot maps it or a binary of the symbolizer
/// reads it (shared through an `Arc`).
pub(super) struct MappedFile {
    /// Held so that `fd_path` keeps naming this file.
    _file: File,
    /// `/proc/self/fd/N`: how blazesym opens (and caches) the file.
    pub fd_path: PathBuf,
    /// The path the process it was opened for mapped it under, for log messages.
    pub name: String,
    pub build_id: Option<Vec<u8>>,
    pub debug_file: Option<DebugFile>,
}

impl MappedFile {
    /// Opens the file that `pid` maps at `range` under `path` (named `name`), reads its build ID
    /// and finds its debug file. `Err` if it cannot be opened or is no ELF file.
    pub fn open(
        pid: u32,
        range: (u64, u64),
        path: &Path,
        deleted: bool,
        name: &str,
    ) -> Result<Self, Box<dyn Error>> {
        let file = open_mapped(pid, range, path, deleted)?;
        let fd_path = fd_path(&file);
        let build_id = blazesym::helper::read_elf_build_id(&fd_path)?.map(|id| id.into_owned());
        let debug_file = match build_id
            .as_deref()
            .map(|id| DebugFile::find(pid, id, &file))
        {
            Some(Ok(Some(debug_file))) => {
                debug!(binary = name, debug_file = %debug_file.path.display(), "found debug file");
                Some(debug_file)
            }
            Some(Ok(None)) | None => None,
            Some(Err(error)) => {
                warn!(binary = name, %error, "cannot use the debug file of binary");
                None
            }
        };
        Ok(Self {
            _file: file,
            fd_path,
            name: name.to_owned(),
            build_id,
            debug_file,
        })
    }
}

/// Opens a mapped file the way the process sees it: `/proc/PID/map_files` reaches it in any
/// mount namespace and after deletion; `/proc/PID/root/PATH` is the fallback without
/// CAP_SYS_ADMIN (it cannot reach deleted files, whose path may name another file by now).
fn open_mapped(pid: u32, (start, end): (u64, u64), path: &Path, deleted: bool) -> io::Result<File> {
    let map_file = File::open(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    match map_file {
        Ok(file) => Ok(file),
        Err(error) if deleted => Err(error),
        Err(_) => {
            let mut rooted = OsString::from(format!("/proc/{pid}/root"));
            rooted.push(path.as_os_str());
            File::open(rooted)
        }
    }
}
