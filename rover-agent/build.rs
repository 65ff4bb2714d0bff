//! Builds the eBPF programs (`rover-ebpf`, nightly, `bpfel-unknown-none`) and leaves the objects in
//! `OUT_DIR`, where `src/bpf/object.rs` embeds them: `cargo build` is the only build.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// The eBPF binaries of `rover-ebpf` (one object per profiler).
const OBJECTS: &[&str] = &["oncpu", "offcpu", "events", "tasks", "process_cpu"];

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../rover-ebpf");
    let common_dir = manifest_dir.join("../rover-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());

    if matches!(env::var("AYA_BUILD_SKIP").as_deref(), Ok("1" | "true")) {
        // For `cargo check`/`clippy` without nightly: the agent then carries empty objects and
        // says so when it tries to load them.
        let out_dir = PathBuf::from(env::var("OUT_DIR")?);
        for object in OBJECTS {
            fs::write(out_dir.join(object), [])?;
        }
    } else {
        check_toolchain()?;
    }
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    // aya-build relays the nested cargo's progress lines as warnings; keep only real messages.
    // SAFETY: build scripts are single-threaded.
    unsafe { env::set_var("CARGO_TERM_QUIET", "true") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "rover-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// Fails early, naming the fix, when the eBPF toolchain is missing (aya-build's own failure is
/// a wall of cargo output).
fn check_toolchain() -> anyhow::Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output();
    // bpf-linker links the nightly's own libLLVM, which `rustup run` puts on the library path.
    let has_linker = Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output();
    match (nightly, has_linker) {
        (Ok(nightly), Ok(linker)) if nightly.status.success() && linker.status.success() => Ok(()),
        _ => bail!(
            "building the eBPF programs needs a nightly toolchain with rust-src and bpf-linker: \
             run `cargo xtask setup` once, or set AYA_BUILD_SKIP=1 to check without them"
        ),
    }
}
