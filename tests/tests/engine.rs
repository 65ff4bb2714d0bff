//! One agent, many tasks, through the library API: programs loaded once and unloaded when idle,
//! live targets, flush windows, short-lived processes, pid reuse.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::{
    Windows, agent_config, assert_near, bpf_available, function_names, machine_lock, prog_type,
    programs_held, runtime, task_spec, workload_path,
};
use rover_agent::bpf::{ProfilerKind, Targets};
use rover_agent::profile::Profile;
use rover_agent::task::{Agent, ProfileWindow, TaskNotice, WindowSink};

const FREQUENCY_HZ: f64 = 99.0;

/// A child process killed (and reaped) when dropped.
struct Spawned(Child);

impl Spawned {
    fn start(name: &str, args: &[&str], stdin: Stdio) -> Self {
        let child = Command::new(workload_path(name))
            .args(args)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("starting workload {name}: {error}"));
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn release(&mut self) {
        self.0
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(b"g")
            .expect("releasing the workload");
    }

    /// Waits (at most `timeout`) for it to exit successfully; returns what it printed.
    fn finish(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("waiting for a workload") {
                let mut out = String::new();
                if let Some(stdout) = self.0.stdout.as_mut() {
                    std::io::Read::read_to_string(stdout, &mut out).expect("workload output");
                }
                assert!(status.success(), "workload failed ({status}): {out}");
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "workload still runs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Samples (value 0) per function over every window, and per process id.
fn by_function(windows: &[ProfileWindow]) -> (BTreeMap<String, u64>, BTreeMap<u32, u64>, u64) {
    let mut functions = BTreeMap::new();
    let mut pids = BTreeMap::new();
    let mut total = 0;
    for window in windows {
        let profile = &window.profile;
        for sample in profile.samples() {
            let value = sample.values[0];
            total += value;
            *pids.entry(sample.process.pid).or_default() += value;
            let mut seen = std::collections::BTreeSet::new();
            for name in function_names(profile, sample) {
                if seen.insert(name.clone()) {
                    *functions.entry(name).or_default() += value;
                }
            }
        }
    }
    (functions, pids, total)
}

fn describe(windows: &[ProfileWindow]) -> String {
    let mut text = String::new();
    for (index, window) in windows.iter().enumerate() {
        let profile = &window.profile;
        text += &format!("window {index} ({:?}):\n", profile.duration);
        for sample in profile.samples() {
            text += &format!(
                "  {}[{}] {} {:?}\n",
                sample.process.name,
                sample.process.pid,
                function_names(profile, sample).join(";"),
                sample.values
            );
        }
    }
    text
}

#[test]
fn two_tasks_share_one_program_of_each_kind_and_each_sees_only_its_processes() {
    if !bpf_available("two_tasks_share_one_program_of_each_kind") {
        return;
    }
    let _lock = machine_lock();
    let split = Spawned::start("cpu_split", &["10"], Stdio::null());
    let mut sleeper = Spawned::start("sleeper", &["50", "20", "-"], Stdio::piped());
    // Busy too, profiled by neither task.
    let _bystander = Spawned::start("busy_threads", &["1", "10"], Stdio::null());
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let (on_windows, off_windows) = (Windows::default(), Windows::default());
    let runtime = runtime();
    let (on_cpu, off_cpu, on_elapsed) = runtime.block_on(async {
        let started = Instant::now();
        let on_cpu = agent
            .start_task(
                task_spec(
                    ProfilerKind::OnCpu,
                    Targets::Pids(vec![split.pid()]),
                    Some(Duration::from_secs(1)),
                ),
                Box::new(on_windows.clone()),
            )
            .await
            .expect("on-CPU task starts");
        let programs = programs_held();
        assert_eq!(
            programs.get(&prog_type::PERF_EVENT),
            Some(&1),
            "{programs:?}"
        );
        assert_eq!(programs.get(&prog_type::TRACING), None, "{programs:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;

        let mut off_cpu = agent
            .start_task(
                task_spec(
                    ProfilerKind::OffCpu,
                    Targets::Pids(vec![sleeper.pid()]),
                    None,
                ),
                Box::new(off_windows.clone()),
            )
            .await
            .expect("off-CPU task starts");
        sleeper.release();
        let programs = programs_held();
        assert_eq!(
            programs.get(&prog_type::PERF_EVENT),
            Some(&1),
            "{programs:?}"
        );
        assert_eq!(programs.get(&prog_type::TRACING), Some(&1), "{programs:?}");
        let status = agent.status().await.expect("status");
        assert_eq!(status.profilers.len(), 2, "{status:?}");
        assert_eq!(status.recordings, 2, "{status:?}");
        // The sleeper sleeps 50 × 20 ms and exits.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let notice = tokio::time::timeout_at(deadline.into(), off_cpu.notice())
                .await
                .expect("the sleeper's exit is reported");
            if notice == Some(TaskNotice::AllProcessesExited) {
                break;
            }
        }
        let off_summary = off_cpu.stop().await.expect("off-CPU task stops");
        let programs = programs_held();
        assert_eq!(programs.get(&prog_type::TRACING), None, "{programs:?}");
        assert_eq!(
            programs.get(&prog_type::PERF_EVENT),
            Some(&1),
            "{programs:?}"
        );

        tokio::time::sleep(Duration::from_secs(1)).await;
        let on_elapsed = started.elapsed();
        let on_summary = on_cpu.stop().await.expect("on-CPU task stops");
        let status = agent.status().await.expect("status");
        assert!(
            status.profilers.is_empty() && !status.process_events,
            "{status:?}"
        );
        (on_summary, off_summary, on_elapsed)
    });
    assert!(
        programs_held().is_empty(),
        "programs left after both tasks stopped: {:?}",
        programs_held()
    );
    let truth = sleeper.finish(Duration::from_secs(5));

    // On-CPU: only cpu_split, in several windows, split 3:1, at 99 Hz.
    let windows = on_windows.take();
    let context = describe(&windows);
    assert!(windows.len() >= 3, "{} windows\n{context}", windows.len());
    let (functions, pids, total) = by_function(&windows);
    assert_eq!(
        pids.keys().copied().collect::<Vec<_>>(),
        [split.pid()],
        "{context}"
    );
    assert_eq!(total, on_cpu.counters.recorded, "{context}");
    let (a, b) = (functions["hot_a"] as f64, functions["hot_b"] as f64);
    let share = a / (a + b);
    assert!(
        (0.70..=0.80).contains(&share),
        "hot_a has {:.1}% of hot_a+hot_b, expected 75 ± 5 points\n{context}",
        share * 100.0
    );
    assert_near(
        total as f64,
        FREQUENCY_HZ * on_elapsed.as_secs_f64(),
        0.10,
        "samples of one busy thread",
        &context,
    );

    // Off-CPU: only the sleeper, its 50 sleeps of 20 ms.
    let windows = off_windows.take();
    let context = format!("{}\nworkload: {truth}", describe(&windows));
    assert_eq!(windows.len(), 1, "{context}");
    let (functions, pids, _) = by_function(&windows);
    assert_eq!(
        pids.keys().copied().collect::<Vec<_>>(),
        [sleeper.pid()],
        "{context}"
    );
    let switches = functions["sleep_in_named_function"];
    let missed = off_cpu.counters.episode_ends_missed;
    assert!(
        (50 - missed..=55).contains(&switches),
        "{switches} switches in sleep_in_named_function, {missed} missed\n{context}"
    );
    let profile = &windows[0].profile;
    let off_cpu_ns: u64 = profile
        .samples()
        .iter()
        .filter(|sample| {
            function_names(profile, sample)
                .iter()
                .any(|f| f == "sleep_in_named_function")
        })
        .map(|sample| sample.values[1])
        .sum();
    assert_near(
        off_cpu_ns as f64,
        50.0 * 20e6,
        0.05,
        "off-CPU ns in sleep_in_named_function",
        &context,
    );
}

/// Keeps each window with the workload's CPU time when the sink got it.
struct CpuWindows {
    windows: Arc<Mutex<Vec<ProfileWindow>>>,
}

impl WindowSink for CpuWindows {
    fn window(&mut self, window: ProfileWindow) -> anyhow::Result<()> {
        self.windows
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push(window);
        Ok(())
    }
}

/// Nanoseconds the threads of `pid` have run on a CPU (`/proc/PID/task/TID/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|error| panic!("listing the threads of {pid}: {error}"));
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn windows_sum_to_the_kernel_count_and_each_holds_its_own_cpu_time() {
    if !bpf_available("windows_sum_to_the_kernel_count") {
        return;
    }
    let _lock = machine_lock();
    const HZ: f64 = 999.0;
    let busy = Spawned::start("busy_threads", &["1", "30"], Stdio::null());
    let agent = Agent::start(agent_config(999, Duration::from_secs(1))).expect("agent");
    let windows = Arc::new(Mutex::new(Vec::new()));
    let sink = CpuWindows {
        windows: windows.clone(),
    };
    let (summary, cpu_seconds, wall_seconds) = runtime().block_on(async {
        let (cpu_before, wall_before) = (cpu_ns(busy.pid()), Instant::now());
        let task = agent
            .start_task(
                task_spec(
                    ProfilerKind::OnCpu,
                    Targets::Pids(vec![busy.pid()]),
                    Some(Duration::from_secs(1)),
                ),
                Box::new(sink),
            )
            .await
            .expect("task starts");
        while windows.lock().expect("windows").len() < 10 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let summary = task.stop().await.expect("task stops");
        let cpu = (cpu_ns(busy.pid()) - cpu_before) as f64 / 1e9;
        (summary, cpu, wall_before.elapsed().as_secs_f64())
    });
    let windows = std::mem::take(&mut *windows.lock().expect("windows"));
    let context = describe(&windows);
    let total: u64 = windows.iter().map(|w| w.profile.recorded_total(0)).sum();
    assert_eq!(
        total, summary.counters.recorded,
        "the windows' samples differ from the kernel's count\n{context}"
    );
    assert_eq!(summary.counters.losses(), 0, "{:?}", summary.counters);
    // The one busy thread runs this share of the time; each window holds its part of it.
    let share = cpu_seconds / wall_seconds;
    assert!(share > 0.8, "the workload ran only {share:.2} of the time");
    let full: Vec<&ProfileWindow> = windows.iter().filter(|w| !w.last).collect();
    assert!(full.len() >= 10, "{} full windows\n{context}", full.len());
    for (index, window) in full.iter().enumerate() {
        let seconds = window.profile.duration.as_secs_f64();
        assert_near(
            window.profile.recorded_total(0) as f64,
            HZ * seconds * share,
            0.10,
            &format!("samples of window {index} ({seconds:.3} s)"),
            &context,
        );
        // Windows follow each other without gap or overlap.
        if let Some(next) = windows.get(index + 1) {
            assert_eq!(
                window.profile.start + window.profile.duration,
                next.profile.start,
                "windows {index} and {} do not meet",
                index + 1
            );
        }
    }
}

#[test]
fn processes_that_live_less_than_a_drain_interval_are_symbolized() {
    if !bpf_available("processes_that_live_less_than_a_drain_interval_are_symbolized") {
        return;
    }
    let _lock = machine_lock();
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let windows = Windows::default();
    let runtime = runtime();
    let task = runtime
        .block_on(agent.start_task(
            task_spec(ProfilerKind::OnCpu, Targets::All, None),
            Box::new(windows.clone()),
        ))
        .expect("task of every process starts");
    // 200 children in a row, each burning 40 ms in child_burns and exiting.
    let mut churn = Spawned::start("fork_churn", &["200", "40"], Stdio::null());
    let parent = churn.pid();
    let printed = churn.finish(Duration::from_secs(60));
    let summary = runtime.block_on(task.stop()).expect("task stops");
    let windows = windows.take();
    let profile: &Profile = &windows[0].profile;
    let (mut total, mut named) = (0, 0);
    let mut children = std::collections::BTreeSet::new();
    for sample in profile.samples() {
        if sample.process.name != "fork_churn" || sample.process.pid == parent {
            continue;
        }
        children.insert(sample.process.pid);
        total += sample.values[0];
        if function_names(profile, sample)
            .iter()
            .any(|f| f == "child_burns")
        {
            named += sample.values[0];
        }
    }
    let context = format!(
        "{printed}; {} children sampled; {named} of {total} samples named; {:?}\n{}",
        children.len(),
        summary.symbolize,
        describe(&windows)
            .lines()
            .filter(|line| line.contains("fork_churn"))
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // 200 × 40 ms of CPU at 99 Hz: about 790 samples.
    assert!(total >= 500, "too few child samples\n{context}");
    assert!(children.len() >= 150, "too few children sampled\n{context}");
    assert!(
        named as f64 >= 0.95 * total as f64,
        "only {named} of {total} child samples carry child_burns\n{context}"
    );
}

/// Starts workload `name` with `args` on pid `pid`, which must be free, by setting the pid the
/// kernel hands out next; other processes may take it first, so it retries.
fn spawn_on_pid(pid: u32, name: &str, args: &[&str]) -> Option<Spawned> {
    for _ in 0..100 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("writing /proc/sys/kernel/ns_last_pid (needs root)");
        let spawned = Spawned::start(name, args, Stdio::null());
        if spawned.pid() == pid {
            return Some(spawned);
        }
    }
    None
}

#[test]
fn a_new_process_given_an_exited_targets_pid_is_not_recorded() {
    if !bpf_available("a_new_process_given_an_exited_targets_pid_is_not_recorded") {
        return;
    }
    let _lock = machine_lock();
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let windows = Windows::default();
    let runtime = runtime();
    let mut first = Spawned::start("busy_threads", &["1", "1"], Stdio::null());
    let pid = first.pid();
    let (summary, unrouted) = runtime.block_on(async {
        let mut task = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::Pids(vec![pid]), None),
                Box::new(windows.clone()),
            )
            .await
            .expect("task starts");
        first.finish(Duration::from_secs(10));
        // Reaped: its pid is free. A new process (burning CPU in hot_a and hot_b) takes it.
        let second = spawn_on_pid(pid, "cpu_split", &["2"]).expect("the pid could be reused");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let status = agent.status().await.expect("status");
        assert_eq!(
            status.target_entries, 0,
            "the exited target is still in the kernel"
        );
        let notice = tokio::time::timeout(Duration::from_secs(5), task.notice()).await;
        assert_eq!(
            notice.ok().flatten(),
            Some(TaskNotice::AllProcessesExited),
            "the exit was not reported"
        );
        drop(second);
        let summary = task.stop().await.expect("task stops");
        (summary, status.unrouted_stacks)
    });
    let windows = windows.take();
    let context = describe(&windows);
    let (functions, _, total) = by_function(&windows);
    assert!(
        functions.get("spin_thread").copied().unwrap_or(0) > 50,
        "the first process was not recorded\n{context}"
    );
    assert!(
        !functions.contains_key("hot_a") && !functions.contains_key("hot_b"),
        "the process that reused the pid was recorded\n{context}"
    );
    assert_eq!(unrouted, 0, "stacks recorded for nobody");
    assert_eq!(total, summary.counters.recorded, "{context}");
}

#[test]
fn removing_and_re_adding_targets_10000_times_leaves_no_target_behind() {
    if !bpf_available("removing_and_re_adding_targets_10000_times") {
        return;
    }
    let _lock = machine_lock();
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let sleeper = Spawned::start("sleeper", &["1", "60000"], Stdio::null());
    let pid = sleeper.pid();
    runtime().block_on(async {
        let first = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::Pids(vec![pid]), None),
                Box::new(Windows::default()),
            )
            .await
            .expect("first task");
        // A second task, of no process yet, keeps the profiler loaded throughout.
        let second = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::Pids(Vec::new()), None),
                Box::new(Windows::default()),
            )
            .await
            .expect("second task");
        for round in 0..10_000 {
            first.remove_process(pid).await.expect("remove");
            first.add_process(pid).await.expect("add");
            if round % 10 == 0 {
                // Held twice, then once again.
                second.add_process(pid).await.expect("add to the second");
                second
                    .remove_process(pid)
                    .await
                    .expect("remove from the second");
            }
        }
        let status = agent.status().await.expect("status");
        assert_eq!(status.target_entries, 1, "{status:?}");
        first.stop().await.expect("first stops");
        let status = agent.status().await.expect("status");
        assert_eq!(status.profilers.len(), 1, "{status:?}");
        assert_eq!(status.target_entries, 0, "targets left: {status:?}");
        second.stop().await.expect("second stops");
        let status = agent.status().await.expect("status");
        assert!(status.profilers.is_empty(), "{status:?}");
    });
}

/// A sink that blocks on its first window until released.
struct BlockingSink {
    entered: std::sync::mpsc::Sender<()>,
    release: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
    first: bool,
}

impl WindowSink for BlockingSink {
    fn window(&mut self, _window: ProfileWindow) -> anyhow::Result<()> {
        if std::mem::take(&mut self.first) {
            let _ = self.entered.send(());
            let _ = self.release.lock().map(|release| release.recv());
        }
        Ok(())
    }
}

#[test]
fn stopping_does_not_wait_for_symbolization_or_sinks() {
    if !bpf_available("stopping_does_not_wait_for_symbolization_or_sinks") {
        return;
    }
    let _lock = machine_lock();
    let busy = Spawned::start("busy_threads", &["1", "10"], Stdio::null());
    let agent = Agent::start(agent_config(99, Duration::from_millis(100))).expect("agent");
    let (entered, in_sink) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel();
    let sink = BlockingSink {
        entered,
        release: Arc::new(Mutex::new(released)),
        first: true,
    };
    runtime().block_on(async {
        let mut task = agent
            .start_task(
                task_spec(
                    ProfilerKind::OnCpu,
                    Targets::Pids(vec![busy.pid()]),
                    Some(Duration::from_millis(200)),
                ),
                Box::new(sink),
            )
            .await
            .expect("task starts");
        // The collector is now stuck in the sink, with windows piling up behind it.
        tokio::task::spawn_blocking(move || in_sink.recv().expect("the sink was called"))
            .await
            .expect("waiting for the sink");
        tokio::time::sleep(Duration::from_millis(500)).await;
        task.halt()
            .await
            .expect("halting does not wait for the collector");
        assert!(programs_held().is_empty(), "{:?}", programs_held());
        let status = agent.status().await.expect("status");
        assert!(status.profilers.is_empty(), "{status:?}");
        release.send(()).expect("release the sink");
        let summary = task
            .finish()
            .await
            .expect("the task finishes once released");
        assert!(summary.windows >= 2, "{summary:?}");
    });
}

#[test]
fn a_full_target_map_is_an_error_naming_the_pid_never_a_silent_miss() {
    if !bpf_available("a_full_target_map_is_an_error") {
        return;
    }
    let _lock = machine_lock();
    let mut config = agent_config(99, Duration::from_secs(1));
    config.profilers.max_targets = 2;
    let agent = Agent::start(config).expect("agent");
    let sleepers: Vec<Spawned> = (0..3)
        .map(|_| Spawned::start("sleeper", &["1", "60000"], Stdio::null()))
        .collect();
    runtime().block_on(async {
        let pids: Vec<u32> = sleepers.iter().map(Spawned::pid).collect();
        let error = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::Pids(pids.clone()), None),
                Box::new(Windows::default()),
            )
            .await
            .err()
            .map(|error| format!("{error:#}"))
            .expect("three targets do not fit a map of two");
        assert!(
            error.contains("full") && error.contains(&pids[2].to_string()),
            "{error}"
        );
        let status = agent.status().await.expect("status");
        assert!(status.profilers.is_empty(), "a failed task left {status:?}");

        let task = agent
            .start_task(
                task_spec(ProfilerKind::OnCpu, Targets::Pids(pids[..2].to_vec()), None),
                Box::new(Windows::default()),
            )
            .await
            .expect("two fit");
        let error = task
            .add_process(pids[2])
            .await
            .expect_err("a third does not");
        assert!(format!("{error:#}").contains("full"), "{error:#}");
        task.remove_process(pids[0]).await.expect("remove one");
        task.add_process(pids[2])
            .await
            .expect("then the third fits");
        task.stop().await.expect("stops");
    });
}

/// Off-CPU options live beside each target: two tasks on two sleepers, one leaving out waits
/// shorter than its sleeps, the other keeping them, at the same time.
#[test]
fn concurrent_off_cpu_tasks_keep_their_own_per_target_options() {
    if !bpf_available("concurrent_off_cpu_tasks_keep_their_own_per_target_options") {
        return;
    }
    let _lock = machine_lock();
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let mut short = Spawned::start("sleeper", &["30", "10", "-"], Stdio::piped());
    let mut kept = Spawned::start("sleeper", &["30", "10", "-"], Stdio::piped());
    let (short_windows, kept_windows) = (Windows::default(), Windows::default());
    let (short_summary, kept_summary) = runtime().block_on(async {
        let mut options = task_spec(ProfilerKind::OffCpu, Targets::Pids(vec![short.pid()]), None);
        options.options.min_block = Duration::from_millis(50);
        let first = agent
            .start_task(options, Box::new(short_windows.clone()))
            .await
            .expect("first task");
        let second = agent
            .start_task(
                task_spec(ProfilerKind::OffCpu, Targets::Pids(vec![kept.pid()]), None),
                Box::new(kept_windows.clone()),
            )
            .await
            .expect("second task");
        // The same process with other options is refused by name.
        let mut conflicting =
            task_spec(ProfilerKind::OffCpu, Targets::Pids(vec![short.pid()]), None);
        conflicting.options.exclude_preempt = true;
        let error = agent
            .start_task(conflicting, Box::new(Windows::default()))
            .await
            .err()
            .map(|error| format!("{error:#}"))
            .expect("other options for the same process");
        assert!(error.contains("other options"), "{error}");
        short.release();
        kept.release();
        short.finish(Duration::from_secs(10));
        kept.finish(Duration::from_secs(10));
        (
            first.stop().await.expect("first stops"),
            second.stop().await.expect("second stops"),
        )
    });
    let switches = |windows: &Windows| {
        let (functions, _, _) = by_function(&windows.take());
        functions
            .get("sleep_in_named_function")
            .copied()
            .unwrap_or(0)
    };
    // Every 10 ms sleep is shorter than 50 ms: left out, and counted as such.
    assert_eq!(switches(&short_windows), 0);
    assert!(
        short_summary.counters.too_short >= 30,
        "{:?}",
        short_summary.counters
    );
    let kept_switches = switches(&kept_windows);
    let missed = kept_summary.counters.episode_ends_missed;
    assert!(
        (30 - missed..=35).contains(&kept_switches),
        "{kept_switches} switches kept, {missed} missed"
    );
}

/// Process discovery learns of execs and exits from the kernel: every one is marked, each once,
/// and a process that neither exec'd nor exited is not.
#[test]
fn execs_and_exits_are_marked_for_discovery() {
    if !bpf_available("execs_and_exits_are_marked_for_discovery") {
        return;
    }
    let agent = Agent::start(agent_config(99, Duration::from_secs(1))).expect("agent");
    let runtime = runtime();
    let mut changes = runtime
        .block_on(agent.track_process_changes())
        .expect("tracking process changes");
    let idle = Command::new("sleep").arg("30").spawn().expect("sleep");
    // Execs into `sleep` once told to (a line on stdin): an exec after the first look.
    let mut execs = Command::new("sh")
        .args(["-c", "read _; exec sleep 30"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("sh");
    let mut exits = Command::new("true").spawn().expect("true");
    exits.wait().expect("true exits");
    let first = changes.take().expect("first look");
    assert!(!first.overflowed);
    // `sleep` and `sh` were exec'd by their forks; `true` exec'd and exited.
    for (name, pid) in [
        ("sleep", idle.id()),
        ("sh", execs.id()),
        ("true", exits.id()),
    ] {
        assert!(
            first.pids.contains(&pid),
            "{name} ({pid}) not marked: {first:?}"
        );
    }
    writeln!(execs.stdin.take().expect("stdin"), "go").expect("telling sh to exec");
    // Bounded: until its exec is marked, 5 s at most.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut later = std::collections::HashSet::new();
    while !later.contains(&execs.id()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        later.extend(changes.take().expect("later look").pids);
    }
    assert!(
        later.contains(&execs.id()),
        "the exec of {} not marked",
        execs.id()
    );
    assert!(
        !later.contains(&idle.id()),
        "an unchanged process was marked: {later:?}"
    );
    for mut child in [idle, execs] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
