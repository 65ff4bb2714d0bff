//! Symbolization of real processes: C and C++ fixtures compiled at test time, exited and
//! deleted binaries, another mount namespace, separate debug files, kernel symbols.
//!
//! Tests that need root skip loudly without it, unless `CI=true`, where they fail instead.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rover_agent::profile::{Frame, FrameKind};
use rover_agent::symbolize::{
    DEFAULT_SYMBOL_CACHE_BYTES, ProcessTable, Symbolizer, SymbolizerConfig,
};

const GRACE: Duration = Duration::from_secs(30);

const C_FIXTURE: &str = r#"
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) int rover_fixture_work(int x) {
    return x * 3 + 1;
}

int main(void) {
    printf("%p\n", (void *)rover_fixture_work);
    fflush(stdout);
    volatile int sink = rover_fixture_work(1);
    (void)sink;
    sleep(600);
    return 0;
}
"#;

const CPP_FIXTURE: &str = r#"
#include <cstdio>
#include <unistd.h>

namespace rover {
namespace fixture {
__attribute__((noinline)) int work(int x, const char *tag) {
    return x * 2 + tag[0];
}
}
}

int main() {
    std::printf("%p\n", reinterpret_cast<void *>(&rover::fixture::work));
    std::fflush(stdout);
    sleep(600);
    return 0;
}
"#;

/// A `static` function: only in `.symtab`, which stripping removes.
const STATIC_FIXTURE: &str = r#"
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) static int rover_hidden_work(int x) {
    return x * 5 + 2;
}

int main(void) {
    printf("%p\n", (void *)rover_hidden_work);
    fflush(stdout);
    volatile int sink = rover_hidden_work(1);
    (void)sink;
    sleep(600);
    return 0;
}
"#;

/// Whether the test may run: true as root; otherwise skips loudly, or fails under `CI=true`.
fn root_or_skip(test: &str) -> bool {
    let euid = fs::metadata("/proc/self")
        .map(|meta| meta.uid())
        .expect("read /proc/self");
    if euid == 0 {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} needs root (euid {euid}) and CI=true forbids skipping it"
    );
    eprintln!("\n!!!!!!!! SKIPPED {test}: needs root (euid {euid}); run it as root !!!!!!!!\n");
    false
}

fn config() -> SymbolizerConfig {
    SymbolizerConfig {
        debug_info: true,
        symbol_cache_bytes: DEFAULT_SYMBOL_CACHE_BYTES,
    }
}

/// A symbolizer with a table of its own.
fn symbolizer(config: SymbolizerConfig) -> Symbolizer {
    Symbolizer::new(config, ProcessTable::new(GRACE))
}

/// The frames of `stack` of `pid`, asserting that the stack was not cut.
fn user_frames(symbolizer: &mut Symbolizer, pid: u32, stack: &[u64]) -> Vec<Frame> {
    let frames = symbolizer.user_frames(pid, stack);
    assert!(!frames.cut, "{frames:#?}");
    frames.frames
}

/// Compiles `source` (written as `name` in `dir`) with `compiler` and `extra` arguments;
/// returns the binary.
fn compile(dir: &Path, compiler: &str, name: &str, source: &str, extra: &[&str]) -> PathBuf {
    let source_path = dir.join(name);
    fs::write(&source_path, source).expect("write fixture source");
    let binary = dir.join("fixture");
    let status = Command::new(compiler)
        .args(["-g", "-O1", "-fno-omit-frame-pointer", "-Wl,--build-id"])
        .args(extra)
        .arg("-o")
        .arg(&binary)
        .arg(&source_path)
        .status()
        .unwrap_or_else(|error| panic!("run {compiler}: {error}"));
    assert!(status.success(), "{compiler} failed: {status}");
    binary
}

fn compile_c(dir: &Path) -> PathBuf {
    compile(dir, "cc", "fixture.c", C_FIXTURE, &[])
}

/// A running fixture that printed the address of its function; killed on drop.
struct Fixture {
    child: Child,
    addr: u64,
}

impl Fixture {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn fixture");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read fixture output");
        let addr = u64::from_str_radix(line.trim().trim_start_matches("0x"), 16)
            .unwrap_or_else(|error| panic!("fixture printed {line:?}: {error}"));
        Self { child, addr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The stack of a sample in the function: the instruction, then a return address in it.
    fn stack(&self) -> [u64; 2] {
        [self.addr, self.addr + 1]
    }

    /// Kills the fixture and reaps it: its PID no longer exists afterwards.
    fn exit(&mut self) {
        // Already exited is fine: only the reaping matters.
        let _ = self.child.kill();
        self.child.wait().expect("reap fixture");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that both frames of [`Fixture::stack`] name `function` in `module`.
fn assert_named(frames: &[Frame], function: &str, module: &Path) {
    assert_eq!(frames.len(), 2, "{frames:#?}");
    for frame in frames {
        assert_eq!(frame.kind, FrameKind::User);
        assert_eq!(frame.function.as_deref(), Some(function), "{frames:#?}");
        assert_eq!(frame.module.as_deref().map(Path::new), Some(module));
        assert!(!frame.inlined);
    }
    // Addresses are file offsets of the original addresses.
    assert_eq!(frames[1].address, frames[0].address + 1);
}

fn assert_c_fixture_named(frames: &[Frame], module: &Path) {
    assert_named(frames, "rover_fixture_work", module);
    assert!(
        frames[0]
            .file
            .as_deref()
            .is_some_and(|file| file.ends_with("fixture.c")),
        "DWARF file: {frames:#?}"
    );
    assert!(
        frames[0].line.is_some_and(|line| (5..=6).contains(&line)),
        "DWARF line: {frames:#?}"
    );
}

#[test]
fn c_fixture_symbolizes_alive_and_after_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile_c(dir.path());
    let mut fixture = Fixture::spawn(Command::new(&binary));
    let pid = fixture.pid();
    let table = ProcessTable::new(GRACE);
    let mut symbolizer = Symbolizer::new(config(), table.clone());
    table.capture(pid);
    assert_eq!(table.name(pid).as_deref(), Some("fixture"));
    let stack = fixture.stack();
    assert_c_fixture_named(&user_frames(&mut symbolizer, pid, &stack), &binary);

    fixture.exit();
    assert_c_fixture_named(&user_frames(&mut symbolizer, pid, &stack), &binary);

    // No exit event: the liveness check finds it gone.
    let now = Instant::now();
    assert_eq!(table.retire(now), 0);
    symbolizer.retire(Instant::now());
    assert_c_fixture_named(&user_frames(&mut symbolizer, pid, &stack), &binary);
    assert_eq!(table.retire(now + GRACE), 1);
    assert_eq!(table.stats().open_files, 0, "files closed");
    symbolizer.retire(Instant::now());
    assert_eq!(symbolizer.stats().open_binaries, 0, "binaries closed");
    let frames = user_frames(&mut symbolizer, pid, &stack);
    assert!(frames.iter().all(|f| f.function.is_none()), "{frames:#?}");
    assert_eq!(symbolizer.stats().unknown_frames, 2);
}

#[test]
fn garbage_return_address_ends_the_stack_even_after_exit() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile_c(dir.path());
    let mut fixture = Fixture::spawn(Command::new(&binary));
    let pid = fixture.pid();
    let mut symbolizer = symbolizer(config());
    // What a frame-pointer walk through code without frame pointers reads: ASCII text.
    let [addr, ret] = fixture.stack();
    let stack = [addr, ret, 0x2f65_6c61_636f_6c2f, ret];
    for alive in [true, false] {
        let frames = symbolizer.user_frames(pid, &stack);
        assert!(frames.cut, "alive: {alive}");
        assert_c_fixture_named(&frames.frames, &binary);
        fixture.exit();
    }
    assert_eq!(symbolizer.stats().stacks_cut, 2);
}

#[test]
fn deleted_binary_symbolizes_alive_and_after_exit() {
    if !root_or_skip("deleted_binary_symbolizes_alive_and_after_exit") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile_c(dir.path());
    let mut fixture = Fixture::spawn(Command::new(&binary));
    let pid = fixture.pid();
    let mut seen_before = symbolizer(config());
    seen_before.processes().capture(pid);

    fs::remove_file(&binary).expect("delete fixture binary");
    // First sees the process with its binary already deleted: only map_files reach it.
    let mut seen_after = symbolizer(config());
    let stack = fixture.stack();
    assert_c_fixture_named(&user_frames(&mut seen_after, pid, &stack), &binary);

    fixture.exit();
    assert_c_fixture_named(&user_frames(&mut seen_before, pid, &stack), &binary);
    assert_c_fixture_named(&user_frames(&mut seen_after, pid, &stack), &binary);
}

#[test]
fn binary_in_another_mount_namespace_symbolizes() {
    if !root_or_skip("binary_in_another_mount_namespace_symbolizes") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile_c(dir.path());
    let mount_point = tempfile::tempdir().expect("mount point");
    let inner = mount_point.path().join("inner/fixture");
    // A tmpfs mounted in a private mount namespace only: `inner` does not exist in ours.
    let script = format!(
        "mount -t tmpfs none '{mnt}' && mkdir '{mnt}/inner' && cp '{bin}' '{inner}' && exec '{inner}'",
        mnt = mount_point.path().display(),
        bin = binary.display(),
        inner = inner.display(),
    );
    let mut command = Command::new("unshare");
    command.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let mut fixture = Fixture::spawn(command);
    assert!(!inner.exists(), "the binary must not be visible here");

    let pid = fixture.pid();
    let mut symbolizer = symbolizer(config());
    let stack = fixture.stack();
    assert_c_fixture_named(&user_frames(&mut symbolizer, pid, &stack), &inner);
    fixture.exit();
    assert_c_fixture_named(&user_frames(&mut symbolizer, pid, &stack), &inner);
}

#[test]
fn identical_binaries_share_one_open_file_and_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile_c(dir.path());
    // Another inode with the same build ID, as the same image in two containers.
    let copy = dir.path().join("fixture-copy");
    fs::copy(&binary, &copy).expect("copy fixture");
    let first = Fixture::spawn(Command::new(&binary));
    let second = Fixture::spawn(Command::new(&binary));
    let copied = Fixture::spawn(Command::new(&copy));

    let mut symbolizer = symbolizer(config());
    assert_c_fixture_named(
        &user_frames(&mut symbolizer, first.pid(), &first.stack()),
        &binary,
    );
    let after_first = symbolizer.stats();
    assert!(after_first.binaries_opened > 0);
    let files_after_first = symbolizer.processes().stats().open_files;

    assert_c_fixture_named(
        &user_frames(&mut symbolizer, second.pid(), &second.stack()),
        &binary,
    );
    // The same file, mapped by two processes, is held open once.
    assert_eq!(symbolizer.processes().stats().open_files, files_after_first);
    assert_c_fixture_named(
        &user_frames(&mut symbolizer, copied.pid(), &copied.stack()),
        &copy,
    );
    let after_all = symbolizer.stats();
    assert_eq!(after_all.binaries_opened, after_first.binaries_opened);
    assert_eq!(after_all.open_binaries, after_first.open_binaries);
    assert_eq!(after_all.symbol_lookups, after_first.symbol_lookups);
}

#[test]
fn cpp_symbols_are_demangled() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = compile(dir.path(), "g++", "fixture.cpp", CPP_FIXTURE, &[]);
    let fixture = Fixture::spawn(Command::new(&binary));
    let mut symbolizer = symbolizer(config());
    let frames = user_frames(&mut symbolizer, fixture.pid(), &fixture.stack());
    assert_named(&frames, "rover::fixture::work(int, char const*)", &binary);
}

/// Runs `command`, asserting success.
fn run(command: &mut Command) {
    let status = command
        .status()
        .unwrap_or_else(|error| panic!("run {command:?}: {error}"));
    assert!(status.success(), "{command:?} failed: {status}");
}

/// The static fixture built with `build_id` (hex) and `extra` arguments, split into a stripped
/// binary (returned first) and its separate debug file.
fn stripped_with_debug_file(dir: &Path, build_id: &str, extra: &[&str]) -> (PathBuf, PathBuf) {
    let build_id_arg = format!("-Wl,--build-id=0x{build_id}");
    let mut args = vec![build_id_arg.as_str()];
    args.extend_from_slice(extra);
    let binary = compile(dir, "cc", "fixture.c", STATIC_FIXTURE, &args);
    let debug_file = dir.join("fixture.debug");
    let stripped = dir.join("fixture-stripped");
    run(Command::new("objcopy")
        .arg("--only-keep-debug")
        .arg(&binary)
        .arg(&debug_file));
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(&stripped)
        .arg(&binary));
    (stripped, debug_file)
}

fn config_without_dwarf() -> SymbolizerConfig {
    SymbolizerConfig {
        debug_info: false,
        ..config()
    }
}

#[test]
fn stripped_binary_without_debug_file_leaves_static_functions_unknown() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Not installed anywhere: the build ID names no debug file on this host.
    let (stripped, _) =
        stripped_with_debug_file(dir.path(), "726f7665722d6e6f2d6465627567000000000001", &[]);
    let fixture = Fixture::spawn(Command::new(&stripped));
    for config in [config(), config_without_dwarf()] {
        let mut symbolizer = symbolizer(config);
        let frames = user_frames(&mut symbolizer, fixture.pid(), &fixture.stack());
        assert_eq!(frames.len(), 2, "{frames:#?}");
        // `.dynsym` has only imports and `stdout`: nothing precedes the function.
        for frame in &frames {
            assert_eq!(frame.function, None, "{frames:#?}");
            assert_eq!(frame.module.as_deref().map(Path::new), Some(&*stripped));
        }
        assert_eq!(frames[1].address, frames[0].address + 1);
    }
}

#[test]
fn debug_file_in_the_process_root_names_static_functions() {
    if !root_or_skip("debug_file_in_the_process_root_names_static_functions") {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let build_id = "726f7665722d6465627567000000000000000001";
    // Static: runs in a root holding nothing but itself and its debug file, like a container.
    let (stripped, debug_file) = stripped_with_debug_file(dir.path(), build_id, &["-static"]);
    let mount_point = tempfile::tempdir().expect("mount point");
    let root = mount_point.path();
    let debug_dir = format!(
        "{}/usr/lib/debug/.build-id/{}",
        root.display(),
        &build_id[..2]
    );
    // The root is a tmpfs mounted in a private mount namespace only: only /proc/PID/root
    // reaches its debug file, the host's / has none.
    let script = format!(
        "mount -t tmpfs none '{root}' && mkdir -p '{debug_dir}' && cp '{debug}' '{debug_dir}/{rest}.debug' \
         && cp '{bin}' '{root}/fixture' && exec chroot '{root}' /fixture",
        root = root.display(),
        debug = debug_file.display(),
        rest = &build_id[2..],
        bin = stripped.display(),
    );
    let mut command = Command::new("unshare");
    command.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let mut fixture = Fixture::spawn(command);
    assert!(
        !Path::new(&debug_dir).exists(),
        "the debug file must not be visible here"
    );

    let pid = fixture.pid();
    // `/proc/PID/maps` names it as seen from our root.
    let module = &root.join("fixture");
    let stack = fixture.stack();
    let mut without_dwarf = symbolizer(config_without_dwarf());
    let frames = user_frames(&mut without_dwarf, pid, &stack);
    assert_named(&frames, "rover_hidden_work", module);
    assert!(
        frames.iter().all(|f| f.file.is_none() && f.line.is_none()),
        "{frames:#?}"
    );
    // With DWARF, that of the debug file gives the source line too.
    let mut with_dwarf = symbolizer(config());
    let frames = user_frames(&mut with_dwarf, pid, &stack);
    assert_named(&frames, "rover_hidden_work", module);
    assert!(
        frames[0]
            .file
            .as_deref()
            .is_some_and(|file| file.ends_with("fixture.c")),
        "DWARF file: {frames:#?}"
    );

    // The debug file stays open with the binary after the process exits, and is closed with it.
    fixture.exit();
    assert_named(
        &user_frames(&mut without_dwarf, pid, &stack),
        "rover_hidden_work",
        module,
    );
    let now = Instant::now();
    without_dwarf.processes().exited(pid, now);
    assert_eq!(without_dwarf.processes().retire(now + GRACE), 1);
    without_dwarf.retire(Instant::now());
    assert_eq!(without_dwarf.processes().stats().open_files, 0);
    assert_eq!(without_dwarf.stats().open_binaries, 0);

    // The same binary, run where no debug file can be found, has no name for the function.
    let fixture = Fixture::spawn(Command::new(&stripped));
    let mut symbolizer = symbolizer(config_without_dwarf());
    let frames = user_frames(&mut symbolizer, fixture.pid(), &fixture.stack());
    assert!(frames.iter().all(|f| f.function.is_none()), "{frames:#?}");
}

/// The address of a function symbol in `/proc/kallsyms`.
fn kallsyms_function(name: &str) -> u64 {
    let kallsyms = fs::read_to_string("/proc/kallsyms").expect("read /proc/kallsyms");
    kallsyms
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (addr, kind, symbol) = (fields.next()?, fields.next()?, fields.next()?);
            (symbol == name && matches!(kind, "t" | "T"))
                .then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{name} not in /proc/kallsyms"))
}

#[test]
fn kernel_frames_come_from_kallsyms() {
    if !root_or_skip("kernel_frames_come_from_kallsyms") {
        return;
    }
    let schedule = kallsyms_function("schedule");
    assert_ne!(schedule, 0, "kallsyms addresses hidden");
    let mut symbolizer = symbolizer(config());
    // A return address just past the start of `schedule` is looked up inside it too.
    let frames = symbolizer.kernel_frames(&[schedule, schedule + 1, 0x1]);
    assert_eq!(frames.len(), 3, "{frames:#?}");
    for frame in &frames {
        assert_eq!(frame.kind, FrameKind::Kernel);
        assert_eq!(frame.module.as_deref(), Some("[kernel.kallsyms]"));
    }
    assert_eq!(frames[0].function.as_deref(), Some("schedule"));
    assert_eq!(frames[0].address, schedule);
    assert_eq!(frames[1].function.as_deref(), Some("schedule"));
    assert_eq!(frames[1].address, schedule + 1);
    // Below every kernel symbol.
    assert_eq!(frames[2].function, None);
    assert_eq!(frames[2].address, 0x1);
    assert_eq!(symbolizer.stats().unknown_frames, 1);
}
