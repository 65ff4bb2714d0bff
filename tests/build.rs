//! Builds the test workloads (tests/workloads) with the flags in `workloads/cflags` (frame
//! pointers, no optimization: see `workloads/common.h`), so that every function the tests look
//! for keeps its own frame.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const C_WORKLOADS: &[&str] = &[
    "cpu_split",
    "busy_threads",
    "syscalls",
    "demo",
    "sleeper",
    "lock_contention",
    "cpu_bound",
    "pingpong",
    "thread_churn",
    "fork_churn",
    "deep_recursion",
    "many_stacks",
    "duty_cycle",
];
const RUST_WORKLOADS: &[&str] = &["rust_spin"];

fn main() {
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("workloads");
    println!("cargo:rerun-if-changed={}", source_dir.display());
    println!("cargo:rustc-env=WORKLOAD_DIR={}", out_dir.display());

    let cflags = std::fs::read_to_string(source_dir.join("cflags")).expect("workloads/cflags");
    let compiler = cc::Build::new().get_compiler();
    for name in C_WORKLOADS {
        let mut command = compiler.to_command();
        command
            .args(cflags.split_whitespace())
            .arg(source_dir.join(format!("{name}.c")))
            .arg("-o")
            .arg(out_dir.join(name));
        run(&mut command, name);
    }
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    for name in RUST_WORKLOADS {
        let mut command = Command::new(&rustc);
        command
            .args([
                "--edition",
                "2024",
                "-C",
                "opt-level=2",
                "-C",
                "force-frame-pointers=yes",
                "-g",
            ])
            .arg(source_dir.join(format!("{name}.rs")))
            .arg("-o")
            .arg(out_dir.join(name));
        run(&mut command, name);
    }
}

fn run(command: &mut Command, name: &str) {
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("cannot run {command:?} to build workload {name}: {error}"));
    assert!(
        status.success(),
        "building workload {name} failed: {command:?}"
    );
}
