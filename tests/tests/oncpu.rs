//! On-CPU profiling against workloads with known ground truth, through the real CLI.

use std::path::Path;
use std::time::Duration;

use integration_tests::{
    Folded, Windows, Workload, agent, agent_config, assert_near, bpf_available, machine_lock,
    run_agent, runtime,
};
use rover_agent::bpf::{ProfilerKind, TargetOptions, Targets};
use rover_agent::task::{Agent, TaskSpec};

const FREQUENCY_HZ: f64 = 99.0;

fn cpus() -> f64 {
    std::thread::available_parallelism().map_or(1, usize::from) as f64
}

/// Profiles `pid` (or everything) for `seconds` into a folded file and parses it.
fn profile_folded(target: &[&str], seconds: u32, dir: &Path) -> (Folded, String) {
    let output = dir.join("profile.folded");
    let run = run_agent(
        agent()
            .arg("profile")
            .args(target)
            .args(["--duration", &format!("{seconds}s"), "--output"])
            .arg(&output),
    );
    assert!(run.success, "agent failed: {}", run.stderr);
    (Folded::read(&output), run.stderr)
}

fn is(name: &'static str) -> impl Fn(&str) -> bool {
    move |frame| frame == name
}

#[test]
fn two_functions_split_three_to_one_and_sample_count_matches_frequency() {
    if !bpf_available("two_functions_split_three_to_one") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("cpu_split", &["8"]);
    let pid = workload.pid().to_string();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 5, dir.path());
    let context = format!("{folded}\n{stderr}");

    let a = folded.with_frame(is("hot_a")) as f64;
    let b = folded.with_frame(is("hot_b")) as f64;
    assert!(a + b > 0.0, "no samples in hot_a/hot_b:\n{context}");
    let share_a = a / (a + b);
    assert!(
        (0.70..=0.80).contains(&share_a),
        "hot_a has {:.1}% of hot_a+hot_b, expected 75 ± 5 points\n{context}",
        share_a * 100.0
    );
    let total = folded.process_total("cpu_split") as f64;
    assert_near(
        total,
        FREQUENCY_HZ * 5.0,
        0.10,
        "samples of one busy thread",
        &context,
    );
}

#[test]
fn busy_threads_fill_min_of_threads_and_cpus() {
    if !bpf_available("busy_threads_fill_min_of_threads_and_cpus") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let threads = cpus() as usize + 1;
    let workload = Workload::spawn("busy_threads", &[&threads.to_string(), "8"]);
    let pid = workload.pid().to_string();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 5, dir.path());
    let expected = FREQUENCY_HZ * 5.0 * (threads as f64).min(cpus());
    let context = format!("{folded}\n{stderr}");
    let total = folded.process_total("busy_threads") as f64;
    assert_near(
        total,
        expected,
        0.10,
        &format!("samples of {threads} busy threads"),
        &context,
    );
    assert!(
        folded.with_frame(is("spin_thread")) as f64 >= 0.95 * total,
        "samples outside spin_thread:\n{context}"
    );
}

#[test]
fn syscall_heavy_workload_shows_marked_kernel_frames_under_its_user_frames() {
    if !bpf_available("syscall_heavy_workload_shows_kernel_frames") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("syscalls", &["6"]);
    let pid = workload.pid().to_string();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 3, dir.path());
    let context = format!("{folded}\n{stderr}");
    // Kernel frames come after (above) the user frame that made the system call.
    let in_kernel_under_user = folded.matching(|stack| {
        let Some(user) = stack.iter().position(|frame| frame == "make_syscalls") else {
            return false;
        };
        let kernel = &stack[user + 1..];
        !kernel.is_empty() && kernel.iter().all(|frame| frame.ends_with("_[k]"))
    });
    let total = folded.process_total("syscalls");
    assert!(
        in_kernel_under_user as f64 >= 0.3 * total as f64,
        "only {in_kernel_under_user} of {total} samples have kernel frames under make_syscalls:\n{context}"
    );
    assert!(
        folded.with_frame(|frame| frame.contains("sys_write") && frame.ends_with("_[k]")) > 0,
        "no marked sys_write kernel frame:\n{context}"
    );
}

#[test]
fn rust_frames_are_demangled() {
    if !bpf_available("rust_frames_are_demangled") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("rust_spin", &["6"]);
    let pid = workload.pid().to_string();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 2, dir.path());
    let context = format!("{folded}\n{stderr}");
    let demangled = folded.with_frame(|frame| {
        frame.starts_with("rust_spin::engine::Spinner") && frame.ends_with("spin_for")
    });
    assert!(
        demangled as f64 >= 0.8 * folded.total() as f64,
        "spin_for not demangled in most samples:\n{context}"
    );
    assert!(
        folded.with_frame(|frame| frame.starts_with("_ZN") || frame.starts_with("_R")) == 0,
        "mangled names remain:\n{context}"
    );
}

#[test]
fn a_process_that_exits_before_the_profile_ends_is_still_symbolized() {
    if !bpf_available("a_process_that_exits_before_the_profile_ends_is_still_symbolized") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    // Profile the whole host for 4 s; the workload lives for 3 of them.
    let workload = Workload::spawn("cpu_split", &["3"]);
    let (folded, stderr) = profile_folded(&["--all"], 4, dir.path());
    workload.wait();
    let context = format!("{stderr}\n{folded}");
    let total = folded.process_total("cpu_split");
    let named = folded.matching(|stack| {
        stack.first().is_some_and(|root| root == "cpu_split")
            && stack
                .iter()
                .any(|frame| frame == "hot_a" || frame == "hot_b")
    });
    assert!(
        total as f64 > FREQUENCY_HZ * 2.0,
        "too few cpu_split samples ({total}):\n{context}"
    );
    assert!(
        named as f64 >= 0.95 * total as f64,
        "only {named} of {total} samples of the exited process are symbolized:\n{context}"
    );
}

#[test]
fn target_exiting_mid_profile_still_writes_what_was_captured() {
    if !bpf_available("target_exiting_mid_profile_still_writes_what_was_captured") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("cpu_split", &["2"]);
    let pid = workload.pid().to_string();
    let started = std::time::Instant::now();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 30, dir.path());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the agent kept running after its only target exited"
    );
    assert!(stderr.contains("every target process exited"), "{stderr}");
    assert!(
        folded.with_frame(is("hot_a")) > 0,
        "nothing captured:\n{folded}\n{stderr}"
    );
}

#[test]
fn svg_and_pprof_outputs_carry_the_profile() {
    if !bpf_available("svg_and_pprof_outputs_carry_the_profile") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("cpu_split", &["6"]);
    let pid = workload.pid().to_string();
    for output in ["flame.svg", "cpu.pb.gz"] {
        let path = dir.path().join(output);
        let run = run_agent(
            agent()
                .args(["profile", "--pid", &pid, "--duration", "2s", "--output"])
                .arg(&path),
        );
        assert!(run.success, "{output}: {}", run.stderr);
        assert!(
            run.stderr.contains(&format!("to {}", path.display())),
            "{}",
            run.stderr
        );
    }
    let svg = std::fs::read_to_string(dir.path().join("flame.svg")).expect("svg written");
    assert!(svg.starts_with("<?xml") && svg.contains("hot_a") && svg.contains("hot_b"));

    let profile = integration_tests::pprof::read(&dir.path().join("cpu.pb.gz"));
    assert_eq!(
        profile.sample_types(),
        [("samples", "count"), ("cpu", "nanoseconds")]
    );
    let hot_a = profile.samples_with_function("hot_a");
    assert!(hot_a.0 > 0, "no pprof sample in hot_a");
    // cpu nanoseconds = samples × period.
    assert_eq!(hot_a.1, hot_a.0 * (1_000_000_000 / 99));
}

/// The drain scheme neither loses nor double-counts: with drains every 10 ms racing a 999 Hz
/// sampler, the drained counts sum exactly to what the programs say they recorded.
#[test]
fn draining_loses_and_double_counts_nothing() {
    if !bpf_available("draining_loses_and_double_counts_nothing") {
        return;
    }
    let _lock = machine_lock();
    let workload = Workload::spawn("busy_threads", &["2", "8"]);
    let agent = Agent::start(agent_config(999, Duration::from_millis(10))).expect("agent");
    let windows = Windows::default();
    let summary = runtime().block_on(async {
        let task = agent
            .start_task(
                TaskSpec {
                    kind: ProfilerKind::OnCpu,
                    targets: Targets::Pids(vec![workload.pid()]),
                    options: TargetOptions::default(),
                    window: None,
                },
                Box::new(windows.clone()),
            )
            .await
            .expect("task starts");
        tokio::time::sleep(Duration::from_secs(3)).await;
        task.stop().await.expect("task stops")
    });
    let counters = summary.counters;
    assert_eq!(counters.losses(), 0, "{counters:?}");
    assert!(
        counters.recorded > 2000,
        "too few samples to mean anything: {counters:?}"
    );
    let drained: u64 = windows
        .take()
        .iter()
        .map(|window| window.profile.recorded_total(0))
        .sum();
    assert_eq!(
        drained, counters.recorded,
        "drained counts differ from recorded samples"
    );
}

/// Ctrl-C (SIGINT) and SIGTERM end the profile early, write what was captured and exit cleanly.
#[test]
fn sigint_and_sigterm_stop_the_profile_and_write_it() {
    if !bpf_available("sigint_and_sigterm_stop_the_profile_and_write_it") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("cpu_split", &["20"]);
    let pid = workload.pid().to_string();
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let output = dir.path().join(format!("{name}.folded"));
        let agent = agent()
            .args(["profile", "--pid", &pid, "--duration", "60s", "--output"])
            .arg(&output)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the agent");
        std::thread::sleep(Duration::from_secs(2));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(agent.id() as libc::pid_t, signal) };
        let started = std::time::Instant::now();
        let finished = agent.wait_with_output().expect("agent exits");
        let stderr = String::from_utf8_lossy(&finished.stderr);
        assert!(finished.status.success(), "{name}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: slow to stop"
        );
        assert!(stderr.contains(&format!("stopped by {name}")), "{stderr}");
        let folded = Folded::read(&output);
        assert!(
            folded.with_frame(is("hot_a")) > 0,
            "{name}: nothing written\n{folded}\n{stderr}"
        );
    }
}

/// A user stack deeper than the agent records (127 frames) is cut at its root end: every output
/// marks it `[truncated]` there, and the summary counts it.
#[test]
fn stacks_deeper_than_recorded_are_marked_truncated_at_their_root() {
    if !bpf_available("stacks_deeper_than_recorded_are_marked_truncated_at_their_root") {
        return;
    }
    let _lock = machine_lock();
    let dir = tempfile::tempdir().expect("temp dir");
    let workload = Workload::spawn("deep_recursion", &["30", "200"]);
    let pid = workload.pid().to_string();
    let (folded, stderr) = profile_folded(&["--pid", &pid], 2, dir.path());
    let context = format!("{folded}\n{stderr}");
    let total = folded.process_total("deep_recursion");
    let marked = folded.matching(|stack| {
        stack.get(1).is_some_and(|frame| frame == "[truncated]")
            && stack.iter().filter(|frame| *frame == "recurse").count() >= 100
    });
    assert!(total > 100, "too few samples\n{context}");
    assert!(
        marked as f64 >= 0.95 * total as f64,
        "only {marked} of {total} samples are marked truncated at their root\n{context}"
    );
    let counted: u64 = stderr
        .split(" stacks truncated")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0);
    assert!(
        counted > 0,
        "the summary does not count truncated stacks\n{stderr}"
    );

    for output in ["flame.svg", "cpu.pb.gz"] {
        let path = dir.path().join(output);
        let run = run_agent(
            agent()
                .args(["profile", "--pid", &pid, "--duration", "1s", "--output"])
                .arg(&path),
        );
        assert!(run.success, "{output}: {}", run.stderr);
        let marked = if output.ends_with(".svg") {
            std::fs::read_to_string(&path)
                .expect("svg")
                .contains("[truncated]")
        } else {
            integration_tests::pprof::read(&path)
                .samples_with_function("[truncated]")
                .0
                > 0
        };
        assert!(marked, "{output} lacks the [truncated] frame");
    }
}

/// Rare kernel-side events reach the agent's log at debug level (aya-log), rate-limited per
/// CPU, and never silently: stacks lost to a full stack map are logged and counted.
#[test]
fn kernel_side_debug_logs_reach_the_agents_log() {
    if !bpf_available("kernel_side_debug_logs_reach_the_agents_log") {
        return;
    }
    let _lock = machine_lock();
    // Thousands of distinct stacks within one (long) drain interval, into the smallest maps.
    let workload = Workload::spawn("many_stacks", &["30", "120"]);
    let run = run_agent(
        agent()
            .args(["profile", "--pid", &workload.pid().to_string()])
            .args(["--frequency", "2999", "--drain-interval", "60s"])
            .args([
                "--map-memory",
                "4MiB",
                "--duration",
                "6s",
                "--output",
                "/dev/null",
            ])
            .env("RUST_LOG", "rover_agent::bpf::kernel=debug,warn"),
    );
    assert!(run.success, "{}", run.stderr);
    let logged = run
        .stderr
        .lines()
        .filter(|line| line.contains("rover_agent::bpf::kernel") && line.contains("stack map full"))
        .count();
    assert!(logged > 0, "no kernel-side log record:\n{}", run.stderr);
    let cpus = cpus() as usize;
    assert!(
        logged <= 4 * cpus,
        "{logged} records: more than the rate limit lets through in one drain interval"
    );
    let lost: u64 = run
        .stderr
        .split("user stacks ")
        .nth(1)
        .and_then(|tail| tail.split(',').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or(0);
    assert!(lost > 0, "stacks lost but not counted:\n{}", run.stderr);
}
