//! What the task iterators (`tasks`: every process for discovery; `process_cpu`: the watched
//! processes' CPU time) share: loading an `iter/task` program with the member offsets the
//! kernel's BTF gives, and reading the fixed-size records a run writes.

use std::io::Read as _;
use std::mem::size_of;

use aya::programs::Iter;
use aya::{Btf, Ebpf, EbpfLoader};

use super::Error;
use super::profiler::program;

/// Read at a time: a few dozen discovery records, thousands of CPU records.
const CHUNK_BYTES: usize = 64 * 1024;

/// Loads `program` of `object` with its globals set (each a member offset, `None` when the
/// kernel's BTF lacks the member).
pub(super) fn load(
    object: &'static str,
    bytes: &'static [u8],
    program_name: &'static str,
    globals: &[(&'static str, Option<u32>)],
) -> Result<Ebpf, Error> {
    let mut values = Vec::with_capacity(globals.len());
    for &(name, value) in globals {
        let value = value.ok_or_else(|| {
            Error::KernelLayout(format!("no member for the `{object}` program's `{name}`"))
        })?;
        values.push((name, value));
    }
    let mut loader = EbpfLoader::new();
    // Rust eBPF carries no CO-RE relocations: the loader's own BTF would only cost memory.
    loader.btf(None);
    for (name, value) in &values {
        loader.override_global(name, value, true);
    }
    let mut ebpf = loader
        .load(bytes)
        .map_err(|source| Error::Load { object, source })?;
    // Parsing the BTF costs ~20 MB of heap for a moment, given back after.
    let btf = Btf::from_sys_fs().map_err(Error::KernelBtf)?;
    let iter: &mut Iter = program(&mut ebpf, object, program_name)?;
    iter.load("task", &btf).map_err(|source| Error::Program {
        program: program_name,
        source,
    })?;
    drop(btf);
    crate::heap::release_freed_memory();
    Ok(ebpf)
}

/// Runs the loaded iterator once and hands each record to `each`, read unaligned from
/// `chunk` (kept between runs). `read_error` names the iterator in a failed read.
///
/// # Safety
/// `R` must be the `#[repr(C)]` record the program writes, made of integers only (any bit
/// pattern valid).
pub(super) unsafe fn run<R>(
    ebpf: &mut Ebpf,
    object: &'static str,
    program_name: &'static str,
    chunk: &mut Vec<u8>,
    read_error: fn(std::io::Error) -> Error,
    mut each: impl FnMut(R),
) -> Result<(), Error> {
    let iter: &mut Iter = program(ebpf, object, program_name)?;
    let program_error = |source| Error::Program {
        program: program_name,
        source,
    };
    let link = iter.attach().map_err(program_error)?;
    let link = iter.take_link(link).map_err(program_error)?;
    let mut file = link
        .into_file()
        .map_err(|source| read_error(std::io::Error::other(source)))?;
    let record_len = size_of::<R>();
    chunk.resize(CHUNK_BYTES.max(record_len), 0);
    let mut filled = 0;
    loop {
        let read = file.read(&mut chunk[filled..]).map_err(read_error)?;
        filled += read;
        let whole = filled - filled % record_len;
        for bytes in chunk[..whole].chunks_exact(record_len) {
            // SAFETY: one whole record as the program wrote it; the caller vouches that any bit
            // pattern is a valid `R`.
            each(unsafe { bytes.as_ptr().cast::<R>().read_unaligned() });
        }
        chunk.copy_within(whole..filled, 0);
        filled -= whole;
        if read == 0 {
            break;
        }
    }
    if filled != 0 {
        return Err(read_error(std::io::Error::other(format!(
            "the list ended inside a record ({filled} bytes left)"
        ))));
    }
    Ok(())
}
