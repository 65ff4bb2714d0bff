//! What the programs need from the kernel's BTF, found at load time (Rust eBPF has no CO-RE
//! relocations): the offset of `task_struct::tgid`, which the fork program reads.

/// Byte offset of `tgid` in `struct task_struct`, if the kernel's BTF tells it. Mapped rather
/// than parsed into memory: a few MB of page cache instead of ~40 MB of heap.
pub(super) fn task_tgid_offset() -> Result<u32, String> {
    use btf_rs::{Backend, Btf, Type};
    let path = "/sys/kernel/btf/vmlinux";
    let btf = Btf::from_file_with_backend(path, Backend::Mmap)
        .map_err(|error| format!("reading {path}: {error}"))?;
    let types = btf
        .resolve_types_by_name("task_struct")
        .map_err(|error| format!("no struct task_struct in {path}: {error}"))?;
    for task_struct in types {
        let Type::Struct(task_struct) = task_struct else {
            continue;
        };
        for member in &task_struct.members {
            if btf.resolve_name(member).is_ok_and(|name| name == "tgid") {
                return Ok(member.bit_offset() / 8);
            }
        }
    }
    Err(format!("struct task_struct in {path} has no tgid member"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_running_kernel_has_a_tgid_offset() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("SKIPPED: no kernel BTF here");
            return;
        }
        let offset = super::task_tgid_offset().expect("offset");
        // pid and tgid follow each other, far into the struct.
        assert!(offset > 64 && offset.is_multiple_of(4), "{offset}");
    }
}
