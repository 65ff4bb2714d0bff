//! Bad input and missing privilege: clear errors naming the problem and the fix, exit codes,
//! no profile started.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use integration_tests::{AgentRun, agent, agent_binary, run_agent};

fn profile(args: &[&str]) -> AgentRun {
    run_agent(agent().arg("profile").args(args))
}

fn assert_fails(run: &AgentRun, code: i32, message: &str) {
    assert_eq!(run.code, Some(code), "exit code; stderr:\n{}", run.stderr);
    assert!(
        run.stderr.contains(message),
        "stderr lacks {message:?}:\n{}",
        run.stderr
    );
}

#[test]
fn a_pid_that_does_not_exist_is_refused_by_name() {
    // pid_max is at most 2^22.
    let run = profile(&["--pid", "4194305", "--duration", "1s"]);
    assert_fails(&run, 1, "--pid 4194305: no such running process");
}

#[test]
fn invalid_frequencies_are_refused() {
    assert_fails(&profile(&["--all", "--frequency", "0"]), 2, "--frequency");
    assert_fails(
        &profile(&["--all", "--frequency", "often"]),
        2,
        "--frequency",
    );
    let run = profile(&["--all", "--frequency", "900000000"]);
    assert_fails(&run, 1, "exceeds the kernel's limit");
    assert!(
        run.stderr.contains("perf_event_max_sample_rate"),
        "{}",
        run.stderr
    );
}

#[test]
fn invalid_durations_are_refused() {
    assert_fails(
        &profile(&["--all", "--duration", "400d"]),
        1,
        "--duration must be at most a year",
    );
    assert_fails(
        &profile(&["--all", "--drain-interval", "5m"]),
        1,
        "--drain-interval must be between 10ms and 60s",
    );
    assert_fails(
        &profile(&["--all", "--duration", "0s"]),
        1,
        "--duration must be longer than zero",
    );
    assert_fails(
        &profile(&["--all", "--duration", "ten"]),
        2,
        "is not a duration",
    );
    assert_fails(
        &profile(&["--all", "--duration=-3"]),
        2,
        "is not a duration",
    );
}

#[test]
fn targets_are_required_and_exclusive() {
    assert_fails(&profile(&["--duration", "1s"]), 2, "--pid");
    assert_fails(&profile(&["--all", "--pid", "1"]), 2, "cannot be used with");
}

#[test]
fn an_unwritable_output_fails_before_profiling() {
    let run = profile(&[
        "--all",
        "--duration",
        "1s",
        "--output",
        "/nonexistent/dir/flame.svg",
    ]);
    assert_fails(&run, 1, "cannot write --output /nonexistent/dir/flame.svg");
}

/// Runs the agent as `nobody`, without any capability.
fn unprivileged(args: &[&str]) -> Option<AgentRun> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "switching to an unprivileged user needs root, and CI=true forbids skipping"
        );
        eprintln!("*** SKIPPING: switching to an unprivileged user needs root ***");
        return None;
    }
    // The build directory may not be reachable by `nobody`: run a copy from a world-readable
    // directory.
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let binary = dir.path().join("rover-agent");
    std::fs::copy(agent_binary(), &binary).expect("copy agent");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    Some(run_agent(
        Command::new(&binary)
            .args(args)
            .current_dir(dir.path())
            .uid(65534)
            .gid(65534),
    ))
}

#[test]
fn without_privilege_the_missing_capabilities_are_named() {
    let me = std::process::id().to_string();
    let Some(run) = unprivileged(&["profile", "--pid", &me, "--duration", "1s"]) else {
        return;
    };
    assert_fails(&run, 1, "missing privilege");
    assert!(
        run.stderr.contains("CAP_BPF and CAP_PERFMON"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("run as root"), "{}", run.stderr);
}

#[test]
fn check_reports_each_requirement_and_fails_without_privilege() {
    let Some(run) = unprivileged(&["check"]) else {
        return;
    };
    assert_eq!(run.code, Some(1), "{}{}", run.stdout, run.stderr);
    for capability in ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_SYSLOG"] {
        assert!(
            run.stdout.contains(&format!("[FAIL] {capability}")),
            "{}",
            run.stdout
        );
    }
    assert!(
        run.stdout.contains("capabilities.add: [SYS_PTRACE]"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("verdict: this host cannot run rover-agent"),
        "{}",
        run.stdout
    );
    for item in [
        "kernel version",
        "BTF",
        "host PID ns",
        "kernel symbols",
        "on-CPU sampler",
        "off-CPU tracer",
        "process events",
        "kernel memory",
    ] {
        assert!(
            run.stdout.contains(item),
            "check does not report {item}:\n{}",
            run.stdout
        );
    }
}

/// Off-CPU options refused before profiling: exit code 2 (clap) or 1 (validation), with a
/// message naming the option.
fn assert_off_cpu_refused(args: &[&str], option: &str) {
    let mut all = vec!["--type", "off-cpu", "--all", "--duration", "1s"];
    all.extend_from_slice(args);
    let run = profile(&all);
    assert!(
        matches!(run.code, Some(1 | 2)),
        "{args:?}: exit code {:?}; stderr:\n{}",
        run.code,
        run.stderr
    );
    assert!(
        run.stderr.contains(option),
        "{args:?}: stderr lacks {option:?}:\n{}",
        run.stderr
    );
}

#[test]
fn off_cpu_sample_probabilities_outside_zero_to_one_are_refused() {
    for value in ["0", "1.5", "abc", "-0.5", "NaN"] {
        assert_off_cpu_refused(
            &[&format!("--sample-probability={value}")],
            "--sample-probability",
        );
    }
}

#[test]
fn off_cpu_min_block_must_be_a_duration() {
    for value in ["-1ms", "soon"] {
        assert_off_cpu_refused(&[&format!("--min-block={value}")], "--min-block");
    }
}

#[test]
fn off_cpu_weight_is_time_or_switches() {
    let run = profile(&[
        "--type",
        "off-cpu",
        "--all",
        "--duration",
        "1s",
        "--weight",
        "bogus",
    ]);
    assert_fails(&run, 2, "--weight");
}

#[test]
fn exclude_preempt_is_refused_for_on_cpu_profiles() {
    let run = profile(&[
        "--type",
        "on-cpu",
        "--all",
        "--duration",
        "1s",
        "--exclude-preempt",
    ]);
    assert_fails(&run, 2, "--exclude-preempt");
}
