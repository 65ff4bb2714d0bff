//! `cargo xtask setup`: the eBPF toolchain, installed only where missing.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{output, run as run_command};

pub(crate) fn run() -> anyhow::Result<()> {
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"])).context(
        "no nightly Rust toolchain: the eBPF programs need one. Install it with \
         `rustup toolchain install nightly --component rust-src`",
    )?;
    ensure_nightly_components()?;
    ensure_bpf_linker(&version)?;
    eprintln!("xtask setup: nightly (rust-src, clippy) and bpf-linker are ready");
    Ok(())
}

/// rust-src to build `core` for the BPF target; clippy to lint the eBPF crate.
fn ensure_nightly_components() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    for component in ["rust-src", "clippy"] {
        if installed.lines().any(|line| line.starts_with(component)) {
            continue;
        }
        eprintln!("xtask setup: adding {component} to the nightly toolchain");
        run_command(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// bpf-linker must link the nightly's own LLVM. A working `bpf-linker` under `rustup run
/// nightly` (which puts the nightly's lib directory on the library path) has loaded exactly
/// that library, whose file name carries the LLVM and toolchain versions; after a nightly
/// update it no longer starts, and is rebuilt.
fn ensure_bpf_linker(nightly_version: &str) -> anyhow::Result<()> {
    let works = linker_starts();
    if works {
        return Ok(());
    }
    let major = llvm_major(nightly_version)?;
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let library = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| {
            format!(
                "the nightly toolchain has no libLLVM.so.{major}* in {}",
                lib_dir.display()
            )
        })?;
    // bpf-linker's build finds LLVM as `$LLVM_PREFIX/lib/libLLVM.so`.
    let prefix = std::env::temp_dir().join(format!("rover-xtask-llvm-{}", std::process::id()));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&library, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    eprintln!(
        "xtask setup: building bpf-linker against the nightly's LLVM {major} ({}), about a minute",
        library.display()
    );
    let result = run_command(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--force",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major}"))
            .env("LLVM_PREFIX", &prefix),
    );
    let _ = std::fs::remove_dir_all(&prefix);
    result?;
    let works = linker_starts();
    if !works {
        bail!("bpf-linker was installed but does not start under `rustup run nightly`");
    }
    Ok(())
}

/// Whether bpf-linker starts under the nightly toolchain.
fn linker_starts() -> bool {
    output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"])).is_ok()
}

fn llvm_major(rustc_version: &str) -> anyhow::Result<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.split('.').next())
        .and_then(|major| major.trim().parse().ok())
        .with_context(|| format!("no `LLVM version:` in `rustc +nightly -vV`:\n{rustc_version}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        let version =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(version).ok(), Some(22));
        assert!(llvm_major("rustc 1.0").is_err());
    }
}
