//! Off-CPU profiling against workloads with known ground truth, through the real CLI.
//!
//! Most workloads here wait for a byte on stdin before their measured part: the test starts the
//! agent, waits until it has attached its programs, then releases the workload, so the profile
//! covers exactly what the workload measures; `--pid` profiling then ends by itself once the
//! workload has exited.

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::pprof::DecodedProfile;
use integration_tests::{
    Folded, Workload, agent, agent_binary, assert_near, bpf_available, machine_lock, run_agent,
    workload_path,
};

const PREEMPTED: &str = "[preempted]";

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// A child process killed (and reaped) when dropped.
struct Guarded {
    child: Child,
    name: String,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A workload started with START `-`: it waits for a byte on stdin before its measured part.
struct Gated(Guarded);

impl Gated {
    fn spawn(name: &str, args: &[&str]) -> Self {
        let child = Command::new(workload_path(name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("starting workload {name}: {error}"));
        Self(Guarded {
            child,
            name: name.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.0.child.id()
    }

    /// Lets the workload start its measured part.
    fn release(&mut self) {
        let mut stdin = self.0.child.stdin.take().expect("stdin is piped");
        stdin
            .write_all(b"g")
            .unwrap_or_else(|error| panic!("releasing {}: {error}", self.0.name));
    }

    /// Waits for the workload to exit by itself (successfully) and returns what it printed.
    fn finish(mut self, timeout: Duration) -> String {
        let name = self.0.name.clone();
        let status = wait_timeout(&mut self.0.child, timeout)
            .unwrap_or_else(|| panic!("workload {name} still runs after {timeout:?}"));
        let mut stdout = String::new();
        std::io::Read::read_to_string(
            self.0.child.stdout.as_mut().expect("stdout is piped"),
            &mut stdout,
        )
        .unwrap_or_else(|error| panic!("reading the output of {name}: {error}"));
        assert!(
            status.success(),
            "workload {name} failed ({status}): {stdout}"
        );
        stdout
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns workload `name` pinned to `cpu` (threads it creates inherit the affinity).
fn spawn_pinned(name: &str, args: &[&str], cpu: usize) -> Guarded {
    let mut command = Command::new(workload_path(name));
    command.args(args).stdout(Stdio::null());
    // SAFETY: the closure only calls sched_setaffinity, which is async-signal-safe, on plain
    // stack data.
    unsafe {
        command.pre_exec(move || {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .unwrap_or_else(|error| panic!("starting workload {name}: {error}"));
    Guarded {
        child,
        name: name.to_owned(),
    }
}

/// A running agent, its stderr going to a file.
struct RunningAgent {
    process: Guarded,
    stderr_path: PathBuf,
}

impl RunningAgent {
    /// Starts `rover-agent profile --type off-cpu ARGS` and returns once its programs are
    /// attached: it holds a BPF link (or a perf event carrying the tracepoint program), plus a
    /// grace period for it to finish setting up its target filter.
    fn start(args: &[&str], dir: &Path) -> Self {
        let stderr_path = dir.join("agent.stderr");
        let stderr = File::create(&stderr_path).expect("agent stderr file");
        let child = agent()
            .args(["profile", "--type", "off-cpu"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|error| panic!("starting the agent: {error}"));
        let mut agent = Self {
            process: Guarded {
                child,
                name: "rover-agent".to_owned(),
            },
            stderr_path,
        };
        agent.wait_attached();
        agent
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn wait_attached(&mut self) {
        let pid = self.process.child.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.process.child.try_wait().expect("polling the agent") {
                panic!(
                    "the agent exited ({status}) before attaching:\n{}",
                    self.stderr()
                );
            }
            if holds_attachment(pid) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the agent attached nothing within 30 s:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    /// Waits for the agent to end by itself (its targets exited) and returns its stderr.
    fn finish(mut self, timeout: Duration) -> String {
        let status = wait_timeout(&mut self.process.child, timeout);
        let stderr = self.stderr();
        let status = status.unwrap_or_else(|| {
            panic!("the agent still runs {timeout:?} after its targets exited:\n{stderr}")
        });
        assert!(status.success(), "the agent failed ({status}):\n{stderr}");
        stderr
    }
}

/// Whether process `pid` holds a BPF link or a perf event: what attaching a tracepoint program
/// leaves behind.
fn holds_attachment(pid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    entries.flatten().any(|entry| {
        std::fs::read_link(entry.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target.contains("bpf_link") || target.contains("[perf_event]")
        })
    })
}

/// Profiles a gated workload from before its start to after its exit and returns the agent's
/// stderr and the workload's stdout.
fn profile_gated(
    mut workload: Gated,
    agent_args: &[&str],
    output: &Path,
    dir: &Path,
    timeout: Duration,
) -> (String, String) {
    let pid = workload.pid().to_string();
    let mut args = vec!["--pid", &pid, "--duration", "120s", "--output"];
    let output = output.to_str().expect("utf-8 temp path");
    args.push(output);
    args.extend_from_slice(agent_args);
    let agent = RunningAgent::start(&args, dir);
    workload.release();
    let truth = workload.finish(timeout);
    let stderr = agent.finish(Duration::from_secs(30));
    (stderr, truth)
}

/// The value after `key` in whitespace-separated `key value` text.
fn field<T: std::str::FromStr>(line: &str, key: &str) -> T {
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == key {
            if let Some(value) = words.next().and_then(|value| value.parse().ok()) {
                return value;
            }
            break;
        }
    }
    panic!("no numeric {key} in {line:?}")
}

/// One pprof sample: frames root first, then (switches, off-CPU ns).
struct PprofStack {
    frames: Vec<String>,
    switches: i64,
    off_cpu_ns: i64,
}

fn pprof_stacks(profile: &DecodedProfile) -> Vec<PprofStack> {
    let function_name = |id: u64| {
        let function = profile
            .function
            .iter()
            .find(|function| function.id == id)
            .unwrap_or_else(|| panic!("missing function {id}"));
        profile.string(function.name)
    };
    let location_frames = |id: u64| -> Vec<String> {
        let location = profile
            .location
            .iter()
            .find(|location| location.id == id)
            .unwrap_or_else(|| panic!("missing location {id}"));
        // Lines are innermost first.
        location
            .line
            .iter()
            .rev()
            .map(|line| function_name(line.function_id).clone())
            .collect()
    };
    profile
        .sample
        .iter()
        .map(|sample| PprofStack {
            // Locations are leaf first.
            frames: sample
                .location_id
                .iter()
                .rev()
                .flat_map(|&id| location_frames(id))
                .collect(),
            switches: sample.value[0],
            off_cpu_ns: sample.value[1],
        })
        .collect()
}

/// The profile as text for assertion messages: one `frames switches off_cpu_ns` line per
/// sample, largest off-CPU time first, at most 40.
fn describe(profile: &DecodedProfile) -> String {
    let mut stacks = pprof_stacks(profile);
    stacks.sort_by_key(|stack| std::cmp::Reverse(stack.off_cpu_ns));
    let mut text = format!("pprof: {} samples\n", stacks.len());
    for stack in stacks.iter().take(40) {
        let _ = writeln!(
            text,
            "{} switches={} off_cpu_ns={}",
            stack.frames.join(";"),
            stack.switches,
            stack.off_cpu_ns
        );
    }
    text
}

/// What a pprof off-CPU run gave: the decoded profile, the workload's stdout, the agent's
/// stderr, and all of it as context for assertion messages.
struct PprofRun {
    profile: DecodedProfile,
    workload: String,
    stderr: String,
    context: String,
}

impl PprofRun {
    fn new(output: &Path, workload: String, stderr: String) -> Self {
        let profile = integration_tests::pprof::read(output);
        let context = format!(
            "workload:\n{workload}{}agent stderr:\n{stderr}",
            describe(&profile)
        );
        assert_eq!(
            profile.sample_types(),
            [("switches", "count"), ("off_cpu", "nanoseconds")],
            "{context}"
        );
        Self {
            profile,
            workload,
            stderr,
            context,
        }
    }
}

/// Profiles a gated workload off-CPU into pprof (plus `agent_args`) and decodes the result.
fn profile_gated_pprof(workload: Gated, agent_args: &[&str], dir: &Path) -> PprofRun {
    let output = dir.join("offcpu.pb.gz");
    let mut args = vec!["--format", "pprof"];
    args.extend_from_slice(agent_args);
    let (stderr, stdout) = profile_gated(workload, &args, &output, dir, Duration::from_secs(30));
    PprofRun::new(&output, stdout, stderr)
}

/// What a profile holds under one function, voluntary switches and preemptions apart.
struct InFunction {
    /// Voluntary switches (stacks not ending in `[preempted]`).
    switches: i64,
    /// Off-CPU time of the voluntary switches.
    off_cpu_ns: i64,
    /// Preemptions.
    preempted: i64,
}

fn in_function(profile: &DecodedProfile, function: &str) -> InFunction {
    let mut found = InFunction {
        switches: 0,
        off_cpu_ns: 0,
        preempted: 0,
    };
    for stack in pprof_stacks(profile) {
        if !stack.frames.iter().any(|f| f == function) {
            continue;
        }
        if ends_preempted(&stack.frames) {
            found.preempted += stack.switches;
        } else {
            found.switches += stack.switches;
            found.off_cpu_ns += stack.off_cpu_ns;
        }
    }
    found
}

fn ends_preempted(stack: &[String]) -> bool {
    stack.last().is_some_and(|leaf| leaf == PREEMPTED)
}

#[test]
fn sleeps_in_a_named_function_are_counted_and_timed() {
    if !bpf_available("sleeps_in_a_named_function_are_counted_and_timed") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    const SLEEPS: i64 = 50;
    const SLEEP_MS: i64 = 20;
    let workload = Gated::spawn(
        "sleeper",
        &[&SLEEPS.to_string(), &SLEEP_MS.to_string(), "-"],
    );
    let PprofRun {
        profile,
        workload: truth,
        stderr,
        context,
    } = profile_gated_pprof(workload, &[], dir.path());

    // Preemptions in the function (load on the machine, not the workload's sleeps) apart.
    let InFunction {
        switches,
        off_cpu_ns,
        preempted,
    } = in_function(&profile, "sleep_in_named_function");
    // An episode whose end the program never saw is dropped and reported (rare, see
    // `counter::EPISODE_ENDS_MISSED`): it may be missing here, never silently.
    let missed = number_before(&stderr, "whose end was not seen") as i64;
    eprintln!(
        "sleeper: {switches} voluntary switches (expected {SLEEPS}; {preempted} preemptions \
         apart), {off_cpu_ns} ns off CPU (expected {} ± 5%, error {:+.2}%; the workload measured \
         {} ns)",
        SLEEPS * SLEEP_MS * 1_000_000,
        (off_cpu_ns as f64 / (SLEEPS * SLEEP_MS * 1_000_000) as f64 - 1.0) * 100.0,
        field::<f64>(&truth, "slept_ns")
    );
    assert!(
        (SLEEPS - missed..=SLEEPS).contains(&switches),
        "{switches} voluntary switches in sleep_in_named_function, expected {}..={SLEEPS}\n{context}",
        SLEEPS - missed,
    );
    assert_near(
        off_cpu_ns as f64,
        (SLEEPS * SLEEP_MS * 1_000_000) as f64,
        0.05,
        "off-CPU ns in sleep_in_named_function",
        &context,
    );
}

#[test]
fn lock_waits_hold_the_voluntary_off_cpu_time_under_futex_kernel_frames() {
    if !bpf_available("lock_waits_hold_the_voluntary_off_cpu_time_under_futex_kernel_frames") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    const THREADS: usize = 4;
    const SECONDS: u64 = 3;
    let workload = Workload::spawn("lock_contention", &[&THREADS.to_string(), "10"]);
    let pid = workload.pid().to_string();
    let output = dir.path().join("offcpu.folded");
    let run = run_agent(
        agent()
            .args(["profile", "--type", "off-cpu", "--pid", &pid])
            .args(["--duration", &format!("{SECONDS}s"), "--format", "folded"])
            .arg("--output")
            .arg(&output),
    );
    assert!(run.success, "agent failed: {}", run.stderr);
    let folded = Folded::read(&output);
    let context = format!("{folded}\n{}", run.stderr);

    // The preemption leaf is exactly `[preempted]`: not a kernel frame, so without `_[k]`.
    let marked = folded.with_frame(|frame| frame.starts_with(PREEMPTED) && frame != PREEMPTED);
    assert_eq!(
        marked, 0,
        "folded frames named like {PREEMPTED:?} but not exactly it (its leaf must read \
         `;{PREEMPTED}`)\n{context}"
    );
    let process = |stack: &[String]| stack.first().is_some_and(|root| root == "lock_contention");
    let total_us = folded.matching(process);
    let voluntary_us = folded.matching(|stack| process(stack) && !ends_preempted(stack));
    let waiting_us = folded.matching(|stack| {
        process(stack) && !ends_preempted(stack) && stack.iter().any(|f| f == "wait_for_lock")
    });
    // Waits whose kernel frames, all marked, include a futex one.
    let futex_us = folded.matching(|stack| {
        let Some(wait) = stack.iter().position(|frame| frame == "wait_for_lock") else {
            return false;
        };
        let above = &stack[wait + 1..];
        let kernel = above.iter().filter(|frame| frame.as_str() != PREEMPTED);
        !ends_preempted(stack)
            && kernel.clone().all(|frame| frame.ends_with("_[k]"))
            && kernel
                .clone()
                .any(|frame| frame.contains("futex") && frame.ends_with("_[k]"))
    });
    eprintln!(
        "lock_contention: total {total_us} µs, voluntary {voluntary_us} µs, in wait_for_lock \
         {waiting_us} µs ({:.2}% of voluntary), with a futex kernel frame {futex_us} µs",
        waiting_us as f64 * 100.0 / voluntary_us.max(1) as f64
    );

    // At most one thread per CPU runs, so at least THREADS − CPUs of them are off CPU at any
    // moment; only episodes cut by the start and end of the profile are missing.
    let floor = (THREADS.saturating_sub(cpus()).max(1) as u64) * SECONDS * 1_000_000;
    assert!(
        total_us as f64 >= 0.8 * floor as f64,
        "{total_us} µs off CPU, expected at least 80% of {floor} µs\n{context}"
    );
    // Nothing else in the process blocks voluntarily while it runs (its threads start before
    // and are joined after the profile): the lock waits are all of it but for stray kernel
    // blocking (page faults and the like).
    assert!(
        waiting_us as f64 >= 0.95 * voluntary_us as f64,
        "wait_for_lock holds {waiting_us} of {voluntary_us} voluntary off-CPU µs, expected \
         ≥ 95%\n{context}"
    );
    assert!(
        futex_us as f64 >= 0.95 * waiting_us as f64,
        "only {futex_us} of {waiting_us} µs in wait_for_lock have a futex kernel frame above \
         it\n{context}"
    );
    drop(workload);
}

/// Truth printed by cpu_bound.
struct SpinTruth {
    seconds: f64,
    off_cpu_ns: i64,
    voluntary: i64,
    involuntary: i64,
}

fn spin_truth(stdout: &str) -> SpinTruth {
    SpinTruth {
        seconds: field(stdout, "spin_seconds"),
        off_cpu_ns: field(stdout, "off_cpu_ns"),
        voluntary: field(stdout, "voluntary"),
        involuntary: field(stdout, "involuntary"),
    }
}

/// cpu_bound, pinned to the last CPU with one busy thread pinned there too: it runs about half
/// of the time and is preempted for the rest.
fn profile_preempted_spinner(agent_args: &[&str], output: &Path, dir: &Path) -> (String, String) {
    const SECONDS: &str = "3";
    let cpu = cpus() - 1;
    // The agent is built (once per test binary) before the competitor's time starts to run.
    agent_binary();
    let competitor = spawn_pinned("busy_threads", &["1", "20"], cpu);
    let workload = Gated::spawn("cpu_bound", &[SECONDS, "-", &cpu.to_string()]);
    let result = profile_gated(workload, agent_args, output, dir, Duration::from_secs(20));
    drop(competitor);
    result
}

#[test]
fn a_preempted_cpu_bound_thread_is_off_cpu_only_as_preempted() {
    if !bpf_available("a_preempted_cpu_bound_thread_is_off_cpu_only_as_preempted") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("offcpu.pb.gz");
    let (stderr, stdout) = profile_preempted_spinner(&["--format", "pprof"], &output, dir.path());
    let truth = spin_truth(&stdout);
    let PprofRun {
        profile, context, ..
    } = PprofRun::new(&output, stdout, stderr);
    let stacks = pprof_stacks(&profile);
    let total_ns: i64 = stacks.iter().map(|stack| stack.off_cpu_ns).sum();
    let preempted = stacks.iter().filter(|stack| {
        ends_preempted(&stack.frames) && stack.frames.iter().any(|f| f == "spin_forever")
    });
    let preempted_ns: i64 = preempted.clone().map(|stack| stack.off_cpu_ns).sum();
    let preempted_switches: i64 = preempted.map(|stack| stack.switches).sum();
    eprintln!(
        "cpu_bound: off CPU {total_ns} ns, preempted in spin_forever {preempted_ns} ns / \
         {preempted_switches} switches; truth {} ns ({:+.2}%) / {} involuntary + {} voluntary \
         switches ({:+.2}%) over {:.2} s",
        truth.off_cpu_ns,
        (preempted_ns as f64 / truth.off_cpu_ns as f64 - 1.0) * 100.0,
        truth.involuntary,
        truth.voluntary,
        (preempted_switches as f64 / truth.involuntary as f64 - 1.0) * 100.0,
        truth.seconds
    );

    // The setup works: sharing its CPU with one busy thread, it is off CPU about half the time.
    assert!(
        truth.off_cpu_ns as f64 >= 0.3 * truth.seconds * 1e9 && truth.involuntary >= 50,
        "the workload was barely preempted; the test setup is broken\n{context}"
    );
    assert_eq!(truth.voluntary, 0, "cpu_bound blocked\n{context}");
    assert!(
        preempted_ns as f64 >= 0.99 * total_ns as f64,
        "only {preempted_ns} of {total_ns} off-CPU ns are preempted spin_forever\n{context}"
    );
    assert_near(
        preempted_ns as f64,
        truth.off_cpu_ns as f64,
        0.05,
        "preempted off-CPU ns vs the thread's wall − CPU time",
        &context,
    );
    assert_near(
        preempted_switches as f64,
        truth.involuntary as f64,
        0.02,
        "preempted switches vs the thread's ru_nivcsw",
        &context,
    );
}

#[test]
fn excluding_preemption_leaves_a_cpu_bound_thread_without_off_cpu_time() {
    if !bpf_available("excluding_preemption_leaves_a_cpu_bound_thread_without_off_cpu_time") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("offcpu.folded");
    let (stderr, stdout) = profile_preempted_spinner(
        &[
            "--exclude-preempt",
            "--weight",
            "switches",
            "--format",
            "folded",
        ],
        &output,
        dir.path(),
    );
    let truth = spin_truth(&stdout);
    let folded = Folded::read(&output);
    let context = format!("workload: {stdout}folded:\n{folded}\nagent stderr:\n{stderr}");
    eprintln!(
        "cpu_bound --exclude-preempt: {} switches in the profile; truth {} voluntary, {} \
         involuntary",
        folded.total(),
        truth.voluntary,
        truth.involuntary
    );
    assert!(
        truth.involuntary >= 50,
        "the workload was barely preempted; the test setup is broken\n{context}"
    );
    // The thread never blocks once released (truth.voluntary is 0): nothing is left.
    assert_eq!(truth.voluntary, 0, "cpu_bound blocked\n{context}");
    assert_eq!(
        folded.total(),
        0,
        "off-CPU switches remain with --exclude-preempt\n{context}"
    );
    // Not empty for want of recording: each of its preemptions was seen, and left out.
    let excluded = number_before(&stderr, "preemptions excluded");
    assert_near(
        excluded as f64,
        truth.involuntary as f64,
        0.05,
        "preemptions excluded vs the thread's ru_nivcsw",
        &context,
    );
}

/// Truth printed by pingpong for one thread.
#[derive(Debug)]
struct ThreadTruth {
    off_cpu_ns: i64,
    switches: i64,
}

fn pingpong_truth(stdout: &str, thread: &str) -> ThreadTruth {
    let prefix = format!("thread {thread} ");
    let line = stdout
        .lines()
        .find(|line| line.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in {stdout:?}"));
    ThreadTruth {
        off_cpu_ns: field(line, "off_cpu_ns"),
        switches: field(line, "switches"),
    }
}

/// Profiles the ping-pong over its measured loop and compares each bounce function with its
/// thread's own truth; returns the context for further assertions.
fn check_pingpong(extra_args: &[&str], time_tolerance: f64, switch_tolerance: f64) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Gated::spawn("pingpong", &["3", "-"]);
    let PprofRun {
        profile,
        workload: stdout,
        stderr,
        context,
    } = profile_gated_pprof(workload, extra_args, dir.path());
    // Preconditions: the two threads had CPU 0 to themselves, at a high switch rate. Each
    // thread is off CPU while the other runs or something else does, so the sum of their
    // off-CPU times exceeds the wall time by what the rest of the machine took from CPU 0.
    let round_trips: f64 = field(&stdout, "round_trips");
    let seconds: f64 = field(&stdout, "seconds");
    let others_share = (pingpong_truth(&stdout, "ping").off_cpu_ns
        + pingpong_truth(&stdout, "pong").off_cpu_ns) as f64
        / (seconds * 1e9)
        - 1.0;
    eprintln!(
        "pingpong {extra_args:?}: {:.0} round trips/s, {:.2}% of CPU 0 taken by others",
        round_trips / seconds,
        others_share * 100.0
    );
    assert!(
        round_trips / seconds >= 50_000.0 && others_share < 0.05,
        "not the high switch rate this test is about: {:.0} round trips/s, {:.1}% of CPU 0 \
         taken by other processes (is another ping-pong, e.g. `cargo xtask bench offcpu`, \
         running?)\n{context}",
        round_trips / seconds,
        others_share * 100.0
    );

    let mut results = Vec::new();
    for (thread, function) in [("ping", "ping_bounce"), ("pong", "pong_bounce")] {
        let truth = pingpong_truth(&stdout, thread);
        let (switches, off_cpu_ns) = profile.samples_with_function(function);
        let line = format!(
            "{function} {extra_args:?}: off CPU {off_cpu_ns} ns vs truth {} ns ({:+.2}%), \
             {switches} switches vs truth {} ({:+.3}%)",
            truth.off_cpu_ns,
            (off_cpu_ns as f64 / truth.off_cpu_ns as f64 - 1.0) * 100.0,
            truth.switches,
            (switches as f64 / truth.switches as f64 - 1.0) * 100.0,
        );
        eprintln!("{line}");
        results.push((function, truth, switches, off_cpu_ns));
    }
    // All four comparisons are printed above before any of them fails.
    for (function, truth, switches, off_cpu_ns) in results {
        assert_near(
            off_cpu_ns as f64,
            truth.off_cpu_ns as f64,
            time_tolerance,
            &format!("off-CPU ns in {function} vs its thread's wall − CPU time"),
            &context,
        );
        assert_near(
            switches as f64,
            truth.switches as f64,
            switch_tolerance,
            &format!("switches in {function} vs its thread's ru_nvcsw + ru_nivcsw"),
            &context,
        );
    }
    stderr
}

#[test]
fn pingpong_exact_mode_matches_each_threads_own_truth() {
    if !bpf_available("pingpong_exact_mode_matches_each_threads_own_truth") {
        return;
    }
    let _lock = machine_lock();
    check_pingpong(&[], 0.05, 0.02);
}

#[test]
fn pingpong_sampled_mode_scales_to_each_threads_own_truth() {
    if !bpf_available("pingpong_sampled_mode_scales_to_each_threads_own_truth") {
        return;
    }
    let _lock = machine_lock();
    let stderr = check_pingpong(&["--sample-probability", "0.1"], 0.10, 0.10);
    assert!(
        stderr.to_lowercase().contains("sampl"),
        "stderr does not say the profile is sampled:\n{stderr}"
    );
}

#[test]
fn short_lived_threads_are_each_counted_and_leave_no_state() {
    if !bpf_available("short_lived_threads_are_each_counted_and_leave_no_state") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    const THREADS: i64 = 100;
    const SLEEPS: i64 = 3;
    const SLEEP_MS: i64 = 5;
    let workload = Gated::spawn(
        "thread_churn",
        &[
            &THREADS.to_string(),
            &SLEEPS.to_string(),
            &SLEEP_MS.to_string(),
            "-",
        ],
    );
    let PprofRun {
        profile,
        stderr,
        context,
        ..
    } = profile_gated_pprof(workload, &[], dir.path());
    // The truth is the sleeps: each is one voluntary switch. Preemptions inside `churn_sleep`
    // (a timer interrupt before the sleep starts) come from the machine's load, not from the
    // workload, so they are counted apart and only printed.
    let InFunction {
        switches,
        off_cpu_ns,
        preempted,
    } = in_function(&profile, "churn_sleep");
    // As in the sleeper test: episodes whose end was never seen are reported, not counted.
    let missed = number_before(&stderr, "whose end was not seen") as i64;
    let episodes = THREADS * SLEEPS;
    let expected_ns = episodes * SLEEP_MS * 1_000_000;
    eprintln!(
        "thread_churn: {switches} voluntary switches in churn_sleep (expected {episodes}, \
         {missed} ends missed; {preempted} preemptions apart), {off_cpu_ns} ns (nominal \
         {expected_ns}, {:+.2}%)",
        (off_cpu_ns as f64 / expected_ns as f64 - 1.0) * 100.0
    );
    assert!(
        (episodes - missed..=episodes).contains(&switches),
        "{switches} voluntary switches in churn_sleep, expected {}..={episodes}\n{context}",
        episodes - missed,
    );
    // Each sleep lasts its nominal time plus timer slack and wake-up latency.
    let counted_ns = (episodes - missed) * SLEEP_MS * 1_000_000;
    assert!(
        (counted_ns as f64..=1.10 * expected_ns as f64).contains(&(off_cpu_ns as f64)),
        "{off_cpu_ns} ns off CPU in churn_sleep, expected {counted_ns} to {expected_ns} + 10%\n{context}"
    );
    // Every thread, main included, exited inside the profile: none may be left with an open
    // episode at the end.
    let what = "episodes still open at the end";
    assert_eq!(
        number_before(&stderr, what),
        0,
        "an episode outlived its thread ({what})\n{context}"
    );
}

/// The number just before `what` in the agent's summary line.
fn number_before(stderr: &str, what: &str) -> u64 {
    let (before, _) = stderr
        .split_once(what)
        .unwrap_or_else(|| panic!("the agent's summary no longer reports {what:?}:\n{stderr}"));
    before
        .split_whitespace()
        .last()
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in:\n{stderr}"))
}

#[test]
fn min_block_drops_only_episodes_shorter_than_it() {
    if !bpf_available("min_block_drops_only_episodes_shorter_than_it") {
        return;
    }
    let _lock = machine_lock();
    const SLEEPS: u64 = 20;
    const SLEEP_MS: u64 = 5;
    // 5 ms sleeps last 5 ms and a little more: all kept above a 4 ms floor, none above 10 ms.
    for (min_block, expected) in [("4ms", SLEEPS), ("10ms", 0)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let output = dir.path().join("offcpu.folded");
        let workload = Gated::spawn(
            "sleeper",
            &[&SLEEPS.to_string(), &SLEEP_MS.to_string(), "-"],
        );
        let (stderr, truth) = profile_gated(
            workload,
            &[
                "--min-block",
                min_block,
                "--weight",
                "switches",
                "--format",
                "folded",
            ],
            &output,
            dir.path(),
            Duration::from_secs(30),
        );
        let folded = Folded::read(&output);
        let context = format!("workload: {truth}folded:\n{folded}\nagent stderr:\n{stderr}");
        let sleeps = folded.with_frame(|frame| frame == "sleep_in_named_function");
        eprintln!("sleeper --min-block {min_block}: {sleeps} switches (expected {expected})");
        assert!(
            (expected..=expected + 2).contains(&sleeps),
            "--min-block {min_block}: {sleeps} switches in sleep_in_named_function, expected \
             {expected}\n{context}"
        );
    }
}
