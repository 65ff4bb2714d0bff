//! `rover-agent run` end to end against the fake OAP, over real sockets: processes found by host
//! rules are reported and kept alive, the OAP's tasks run at their start time on the right
//! processes and their data arrives with the workloads' ground truth, outages, TLS,
//! authentication, configuration and shutdown behave as the protocol requires.
//!
//! Every test that starts the agent needs BPF (`rover-agent run` checks its privileges at start),
//! so it takes the machine lock and skips (fails in CI) without it.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use integration_tests::fake_oap::{
    FakeOap, FakeOapConfig, ReceivedStacks, Recorded, TaskCommand, TestCertificates, fold_received,
    now_ms, process_id,
};
use integration_tests::node_agent::{HostRule, NodeAgent, NodeConfig, prepare, token};
use integration_tests::{Workload, agent, bpf_available, run_agent, workload_path};
use rover_proto::v3::{EbpfProfilingTaskMetadata, ebpf_process_properties};

/// Upper bound of any single wait for something the agent does within a few periods.
const WAIT: Duration = Duration::from_secs(20);
/// The on-CPU sampling frequency the configurations ask for (`dump_period: 10.1ms`). Not 100 Hz:
/// a 10 ms period is 2.5 of cpu_split's 4 ms hot_a+hot_b cycles, so samples alias onto two
/// phases of the cycle and the 3:1 split comes out anywhere between 2:0 and 1:1 (as oncpu.rs,
/// 99 Hz).
const FREQUENCY_HZ: f64 = 99.0;

/// A host rule matching workload `name` started with `token` as an argument.
fn rule(name: &str, token: &str, service: &str) -> HostRule {
    HostRule::new(&format!("/{name} .*{token}"), service)
}

/// Waits for `condition`, or panics with the agent's log and what the fake recorded.
async fn wait(
    fake: &FakeOap,
    agent: &NodeAgent,
    what: &str,
    timeout: Duration,
    condition: impl Fn(&Recorded) -> bool,
) -> Recorded {
    match fake.wait_for(condition, timeout).await {
        Ok(recorded) => recorded,
        Err(error) => panic!("waiting for {what}: {error}\n{}", agent.context(fake)),
    }
}

/// The OAP id of the reported process with `pid`.
fn reported_id(recorded: &Recorded, pid: u32) -> Option<String> {
    recorded
        .reported_processes()
        .into_iter()
        .rev()
        .find(|(_, _, reported)| i64::from(*reported) == i64::from(pid))
        .map(|(id, _, _)| id)
}

async fn wait_reported(fake: &FakeOap, agent: &NodeAgent, workload: &Workload) -> String {
    let pid = workload.pid();
    let recorded = wait(fake, agent, &format!("a report of pid {pid}"), WAIT, |r| {
        reported_id(r, pid).is_some()
    })
    .await;
    reported_id(&recorded, pid).expect("reported")
}

/// Every message received for `task_id`, with the stream it came in (index) and the task
/// metadata it carried or inherited.
fn task_messages(recorded: &Recorded, task_id: &str) -> Vec<(usize, EbpfProfilingTaskMetadata)> {
    let mut found = Vec::new();
    for (index, stream) in recorded.profiling_streams.iter().enumerate() {
        let mut task: Option<&EbpfProfilingTaskMetadata> = None;
        for message in &stream.messages {
            if let Some(metadata) = &message.task {
                task = Some(metadata);
            }
            if let Some(task) = task.filter(|task| task.task_id == task_id) {
                found.push((index, task.clone()));
            }
        }
    }
    found
}

fn has_upload(recorded: &Recorded, task_id: &str) -> bool {
    !task_messages(recorded, task_id).is_empty()
}

/// The `profilingStartTime` every message of `task_id` carries; panics if they differ.
fn profiling_start(recorded: &Recorded, task_id: &str, context: &str) -> i64 {
    let starts: BTreeSet<i64> = task_messages(recorded, task_id)
        .iter()
        .map(|(_, task)| task.profiling_start_time)
        .collect();
    assert_eq!(
        starts.len(),
        1,
        "task {task_id}: profilingStartTime must be one constant, got {starts:?}\n{context}"
    );
    *starts.first().expect("one")
}

/// Maps wall-clock epoch milliseconds onto `Instant`s (the fake records `Instant`s).
struct Clock {
    instant: Instant,
    ms: i64,
}

impl Clock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            ms: now_ms(),
        }
    }

    fn instant_of(&self, ms: i64) -> Instant {
        let offset = Duration::from_millis((ms - self.ms).unsigned_abs());
        if ms >= self.ms {
            self.instant + offset
        } else {
            self.instant - offset
        }
    }
}

/// Sleeps until `instant` (at once if it passed).
async fn sleep_until(instant: Instant) {
    tokio::time::sleep(instant.saturating_duration_since(Instant::now())).await;
}

/// The share of hot_a in hot_a + hot_b (cpu_split's ground truth: 75%) and the total count.
fn check_cpu_split(stacks: &ReceivedStacks, seconds: f64, context: &str) {
    let folded = stacks.to_folded();
    let context = format!("{folded}\n{context}");
    let a = stacks.count_with_frame(|frame| frame == "hot_a") as f64;
    let b = stacks.count_with_frame(|frame| frame == "hot_b") as f64;
    assert!(a + b > 0.0, "no samples in hot_a/hot_b:\n{context}");
    let share_a = a / (a + b);
    assert!(
        (0.70..=0.80).contains(&share_a),
        "hot_a has {:.1}% of hot_a+hot_b, expected 75 ± 5 points\n{context}",
        share_a * 100.0
    );
    integration_tests::assert_near(
        stacks.total_count() as f64,
        FREQUENCY_HZ * seconds,
        0.10,
        &format!("samples of cpu_split's one busy thread over {seconds} s"),
        &context,
    );
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("reading the host name")
        .trim()
        .to_owned()
}

// --- 1. Process reports ---------------------------------------------------------------------

#[tokio::test]
async fn host_rule_processes_are_reported_kept_alive_and_forgotten_after_exit() {
    if !bpf_available("host_rule_processes_are_reported_kept_alive_and_forgotten_after_exit") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let by_host = token("host");
    let by_pid = token("pid");
    let cpu = Workload::spawn("cpu_split", &["60", &by_host]);
    // One sleep of a minute: it blocks quietly until killed.
    let sleeper = Workload::spawn("sleeper", &["1", "60000", "0", &by_pid]);
    let mut config = NodeConfig::new(
        &fake,
        vec![
            HostRule {
                labels: "e2e,by-host".to_owned(),
                ..rule("cpu_split", &by_host, "e2e-service")
            },
            HostRule {
                instance_name: "pid-{{.Process.Pid}}".to_owned(),
                labels: "e2e,by-pid".to_owned(),
                ..rule("sleeper", &by_pid, "e2e-service")
            },
        ],
    );
    const EVERY: usize = 3;
    config.properties_report_period = EVERY as u32;
    let mut agent = NodeAgent::start(&config, &[]);

    let (cpu_pid, sleeper_pid) = (cpu.pid(), sleeper.pid());
    // Both reported, then three full reports (so 2 × EVERY heartbeats after the first).
    let full_reports = |r: &Recorded| {
        r.process_reports
            .iter()
            .filter(|report| {
                let pids: BTreeSet<i64> = report
                    .processes
                    .iter()
                    .filter_map(|p| match &p.metadata {
                        Some(ebpf_process_properties::Metadata::HostProcess(host)) => {
                            Some(i64::from(host.pid))
                        }
                        _ => None,
                    })
                    .collect();
                pids.contains(&i64::from(cpu_pid)) && pids.contains(&i64::from(sleeper_pid))
            })
            .count()
    };
    let recorded = wait(&fake, &agent, "three full reports", WAIT, |r| {
        full_reports(r) >= 3 && !r.task_queries.is_empty()
    })
    .await;
    agent.assert_running(&fake);
    let context = agent.context(&fake);

    // Names and properties.
    let host = host_name();
    let mut host_ip: Option<IpAddr> = None;
    for report in &recorded.process_reports {
        for process in &report.processes {
            let Some(ebpf_process_properties::Metadata::HostProcess(meta)) = &process.metadata
            else {
                panic!("not a host process: {process:?}\n{context}");
            };
            let entity = meta.entity.as_ref().expect("entity");
            let pid = u32::try_from(meta.pid).expect("pid");
            let (instance, labels, name, args) = if pid == cpu_pid {
                (
                    host.clone(),
                    ["e2e", "by-host"],
                    "cpu_split",
                    vec!["60", by_host.as_str()],
                )
            } else if pid == sleeper_pid {
                (
                    format!("pid-{sleeper_pid}"),
                    ["e2e", "by-pid"],
                    "sleeper",
                    vec!["1", "60000", "0", by_pid.as_str()],
                )
            } else {
                panic!("an unexpected process was reported: {process:?}\n{context}");
            };
            assert_eq!(entity.layer, "OS_LINUX", "{context}");
            assert_eq!(entity.service_name, "e2e-service", "{context}");
            assert_eq!(entity.instance_name, instance, "{context}");
            assert_eq!(entity.process_name, name, "{context}");
            assert_eq!(entity.labels, labels, "{context}");
            let keys: Vec<&str> = meta.properties.iter().map(|p| p.key.as_str()).collect();
            assert_eq!(
                keys,
                ["host_ip", "pid", "command_line", "support_ebpf_profiling"],
                "{context}"
            );
            let ip: IpAddr = meta.properties[0].value.parse().unwrap_or_else(|_| {
                panic!(
                    "host_ip {:?} is not an IP\n{context}",
                    meta.properties[0].value
                )
            });
            assert!(!ip.is_loopback(), "host_ip is {ip}\n{context}");
            assert!(
                host_ip.is_none_or(|seen| seen == ip),
                "host_ip changed\n{context}"
            );
            host_ip = Some(ip);
            assert_eq!(meta.properties[1].value, pid.to_string(), "{context}");
            let mut command_line = vec![workload_path(name).display().to_string()];
            command_line.extend(args.iter().map(|arg| (*arg).to_owned()));
            assert_eq!(
                meta.properties[2].value,
                command_line.join(" "),
                "{context}"
            );
            assert_eq!(meta.properties[3].value, "true", "{context}");
        }
    }

    // One agent id everywhere.
    let agent_id = recorded.process_reports[0].ebpf_agent_id.clone();
    assert_eq!(
        agent_id.len(),
        36,
        "agent id {agent_id:?} is not a UUID\n{context}"
    );
    assert!(
        recorded
            .process_reports
            .iter()
            .all(|report| report.ebpf_agent_id == agent_id),
        "reports carry different agent ids\n{context}"
    );
    assert!(
        !recorded.keep_alives.is_empty()
            && recorded
                .keep_alives
                .iter()
                .all(|ping| ping.ebpf_agent_id == agent_id),
        "keepAlives must carry ebpfAgentID {agent_id}\n{context}"
    );
    assert!(
        recorded
            .task_queries
            .iter()
            .all(|query| query.rover_instance_id == agent_id),
        "queryTasks must carry roverInstanceId {agent_id}\n{context}"
    );

    // Heartbeats: a full report every EVERY heartbeats, keepAlives of both in between.
    let mut heartbeats = Vec::new();
    let (mut reports, mut pings) = (0, 0);
    for call in &recorded.calls {
        match call.method {
            // A copy taken between a call and its message lacks the last message.
            "reportProcesses" => {
                let Some(report) = recorded.process_reports.get(reports) else {
                    break;
                };
                heartbeats.push(("report", report.processes.len()));
                reports += 1;
            }
            "keepAlive" => {
                let Some(ping) = recorded.keep_alives.get(pings) else {
                    break;
                };
                heartbeats.push(("keepAlive", ping.processes.len()));
                pings += 1;
            }
            _ => {}
        }
    }
    let report_positions: Vec<usize> = heartbeats
        .iter()
        .enumerate()
        .filter(|(_, (kind, _))| *kind == "report")
        .map(|(index, _)| index)
        .collect();
    assert!(report_positions.len() >= 3, "{heartbeats:?}\n{context}");
    for pair in report_positions.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            EVERY,
            "a full report every {EVERY} heartbeats expected: {heartbeats:?}\n{context}"
        );
    }
    assert!(
        heartbeats.iter().all(|(_, processes)| *processes == 2),
        "every heartbeat should carry both processes: {heartbeats:?}\n{context}"
    );

    // The sleeper exits: once the scanner saw it, keepAlives and reports leave it out.
    drop(sleeper);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = fake.recorded();
    let (pings_before, reports_before) = (before.keep_alives.len(), before.process_reports.len());
    let recorded = wait(&fake, &agent, "keepAlives after the exit", WAIT, |r| {
        r.keep_alives.len() >= pings_before + 3 && r.process_reports.len() > reports_before
    })
    .await;
    let context = agent.context(&fake);
    let sleeper_entity_seen = |processes: Vec<(String, i32)>| {
        processes
            .iter()
            .any(|(name, pid)| name == "sleeper" || i64::from(*pid) == i64::from(sleeper_pid))
    };
    for ping in &recorded.keep_alives[pings_before..] {
        let names = ping
            .processes
            .iter()
            .map(|p| {
                let entity = p.entity_metadata.as_ref().expect("entity");
                (entity.process_name.clone(), 0)
            })
            .collect();
        assert!(
            !sleeper_entity_seen(names),
            "a keepAlive after the exit still has the sleeper: {ping:?}\n{context}"
        );
        assert!(
            ping.processes.iter().any(|p| p
                .entity_metadata
                .as_ref()
                .is_some_and(|e| e.process_name == "cpu_split")),
            "cpu_split is no longer kept alive: {ping:?}\n{context}"
        );
    }
    for report in &recorded.process_reports[reports_before..] {
        let processes = report
            .processes
            .iter()
            .filter_map(|p| match &p.metadata {
                Some(ebpf_process_properties::Metadata::HostProcess(host)) => Some((
                    host.entity
                        .as_ref()
                        .map(|e| e.process_name.clone())
                        .unwrap_or_default(),
                    host.pid,
                )),
                _ => None,
            })
            .collect();
        assert!(
            !sleeper_entity_seen(processes),
            "a report after the exit still has the sleeper: {report:?}\n{context}"
        );
    }
    agent.assert_running(&fake);
    drop(cpu);
}

// --- 2. An ON_CPU task at its start time -------------------------------------------------------

#[tokio::test]
async fn on_cpu_task_starts_on_time_and_uploads_the_ground_truth() {
    if !bpf_available("on_cpu_task_starts_on_time_and_uploads_the_ground_truth") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("oncpu");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-oncpu")]);
    let flush = Duration::from_secs(1);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;

    const DURATION_S: i64 = 5;
    let clock = Clock::now();
    let start_ms = clock.ms + 3000;
    fake.add_task(TaskCommand {
        start_ms,
        ..TaskCommand::on_cpu("oncpu-1", std::slice::from_ref(&id), clock.ms, DURATION_S)
    });
    let recorded = wait(&fake, &agent, "the task's first upload", WAIT, |r| {
        has_upload(r, "oncpu-1")
    })
    .await;
    let context = agent.context(&fake);
    let start = clock.instant_of(start_ms);
    let first_stream = task_messages(&recorded, "oncpu-1")[0].0;
    assert!(
        recorded.profiling_streams[first_stream].opened >= start,
        "an upload came {:?} before the task's start\n{context}",
        start - recorded.profiling_streams[first_stream].opened
    );
    let profiling_start_ms = profiling_start(&recorded, "oncpu-1", &context);
    assert!(
        profiling_start_ms >= start_ms,
        "profilingStartTime {profiling_start_ms} is before the task's start {start_ms}\n{context}"
    );

    // The run ends DURATION_S after it started; nothing comes 2 flushes after that.
    let end_ms = profiling_start_ms + DURATION_S * 1000;
    let quiet_from = clock.instant_of(end_ms) + 2 * flush;
    sleep_until(quiet_from + 2 * flush).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert_eq!(
        profiling_start(&recorded, "oncpu-1", &context),
        profiling_start_ms
    );
    let flush_ms = i64::try_from(flush.as_millis()).expect("ms");
    for (stream, task) in task_messages(&recorded, "oncpu-1") {
        assert!(
            (start_ms..=start_ms + DURATION_S * 1000 + flush_ms).contains(&task.current_time),
            "currentTime {} outside [start {start_ms}, start + duration + a flush]\n{context}",
            task.current_time
        );
        assert_eq!(task.process_id, id, "{context}");
        assert!(
            recorded.profiling_streams[stream].opened <= quiet_from,
            "an upload {:?} after the task's end + 2 flushes\n{context}",
            recorded.profiling_streams[stream].opened - quiet_from
        );
        assert!(recorded.profiling_streams[stream].completed, "{context}");
    }
    let stacks = fold_received(&recorded.profiling_streams, "oncpu-1", Some(&id));
    assert_eq!(stacks.without_task, 0, "{context}");
    assert_eq!(stacks.invalid, 0, "{context}");
    check_cpu_split(&stacks, DURATION_S as f64, &context);
    drop(cpu);
}

// --- 3. OFF_CPU and ON_CPU at once -----------------------------------------------------------

#[tokio::test]
async fn off_cpu_and_on_cpu_tasks_run_at_once_on_different_processes() {
    if !bpf_available("off_cpu_and_on_cpu_tasks_run_at_once_on_different_processes") {
        return;
    }
    let _lock = prepare();
    const SLEEPS: u64 = 20;
    const SLEEP_MS: u64 = 50;
    /// The sleeper starts its sleeps this long after it started.
    const SLEEPER_START_MS: u64 = 9000;
    const DURATION_S: i64 = 8;
    let fake = FakeOap::start().expect("fake OAP");
    let cpu_tag = token("both-cpu");
    let sleep_tag = token("both-sleep");
    let cpu = Workload::spawn("cpu_split", &["60", &cpu_tag]);
    let sleeper_spawned = Instant::now();
    let sleeper = Workload::spawn(
        "sleeper",
        &[
            &SLEEPS.to_string(),
            &SLEEP_MS.to_string(),
            &SLEEPER_START_MS.to_string(),
            &sleep_tag,
        ],
    );
    let config = NodeConfig::new(
        &fake,
        vec![
            rule("cpu_split", &cpu_tag, "e2e-both"),
            rule("sleeper", &sleep_tag, "e2e-both"),
        ],
    );
    let mut agent = NodeAgent::start(&config, &[]);
    let cpu_id = wait_reported(&fake, &agent, &cpu).await;
    let sleeper_id = wait_reported(&fake, &agent, &sleeper).await;
    let now = now_ms();
    fake.add_task(TaskCommand {
        target: "OFF_CPU".to_owned(),
        ..TaskCommand::on_cpu("both-off", std::slice::from_ref(&sleeper_id), now, 20)
    });
    fake.add_task(TaskCommand::on_cpu(
        "both-on",
        std::slice::from_ref(&cpu_id),
        now,
        DURATION_S,
    ));
    // Both must be running before the sleeps begin.
    let sleeps_begin = sleeper_spawned + Duration::from_millis(SLEEPER_START_MS);
    for task in ["both-off", "both-on"] {
        let timeout = sleeps_begin
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_millis(500));
        assert!(
            agent
                .wait_for_log(&["task started", task], timeout)
                .is_some(),
            "task {task} did not start before the sleeper's sleeps\n{}",
            agent.context(&fake)
        );
    }
    // The sleeper exits after its sleeps, which ends the off-CPU run; the on-CPU one ends at
    // its deadline.
    sleeper.wait();
    let recorded = wait(&fake, &agent, "the off-CPU task's last upload", WAIT, |r| {
        let stacks = fold_received(&r.profiling_streams, "both-off", None);
        stacks
            .by_stack
            .keys()
            .any(|stack| stack.contains("sleep_in_named_function"))
    })
    .await;
    let on_start = profiling_start(&recorded, "both-on", &agent.context(&fake));
    sleep_until(Clock::now().instant_of(on_start + DURATION_S * 1000) + Duration::from_secs(3))
        .await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);

    let off = fold_received(&recorded.profiling_streams, "both-off", Some(&sleeper_id));
    assert_eq!(off.invalid, 0, "{context}");
    assert_eq!(
        off.process_ids,
        BTreeSet::from([sleeper_id.clone()]),
        "{context}"
    );
    let (switches, off_ns) = off
        .by_stack
        .iter()
        .filter(|(stack, _)| stack.split(';').any(|f| f == "sleep_in_named_function"))
        .fold((0, 0), |(count, ns), (_, value)| {
            (count + value.count, ns + value.duration_ns)
        });
    let off_context = format!(
        "{}\n{context}",
        off.folded_text(integration_tests::fake_oap::FoldValue::DurationNs)
    );
    assert!(
        (SLEEPS..=SLEEPS + 5).contains(&switches),
        "{switches} switches in sleep_in_named_function, expected {SLEEPS}..={}\n{off_context}",
        SLEEPS + 5
    );
    integration_tests::assert_near(
        off_ns as f64,
        (SLEEPS * SLEEP_MS * 1_000_000) as f64,
        0.05,
        "off-CPU ns in sleep_in_named_function",
        &off_context,
    );

    let on = fold_received(&recorded.profiling_streams, "both-on", Some(&cpu_id));
    assert_eq!(
        on.process_ids,
        BTreeSet::from([cpu_id.clone()]),
        "{context}"
    );
    check_cpu_split(&on, DURATION_S as f64, &context);
    drop(cpu);
}

// --- 4. Foreign, replaced and extended tasks -------------------------------------------------

#[tokio::test]
async fn a_task_for_another_nodes_process_is_ignored() {
    if !bpf_available("a_task_for_another_nodes_process_is_ignored") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("foreign");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-foreign")]);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    let foreign = process_id("other-service", "other-node", "java");
    let now = now_ms();
    fake.add_task(TaskCommand::on_cpu(
        "foreign-1",
        std::slice::from_ref(&foreign),
        now,
        10,
    ));
    let queries = fake.recorded().task_queries.len();
    wait(&fake, &agent, "five more task queries", WAIT, |r| {
        r.task_queries.len() >= queries + 5
    })
    .await;
    agent.assert_running(&fake);
    // The agent still works: a task for its own process runs.
    fake.add_task(TaskCommand::on_cpu(
        "foreign-2",
        std::slice::from_ref(&id),
        now_ms(),
        3,
    ));
    let recorded = wait(&fake, &agent, "the own task's upload", WAIT, |r| {
        has_upload(r, "foreign-2")
    })
    .await;
    let context = agent.context(&fake);
    assert!(
        !has_upload(&recorded, "foreign-1"),
        "data uploaded for another node's task\n{context}"
    );
    assert!(
        !context
            .lines()
            .any(|line| line.contains("task started") && line.contains("foreign-1")),
        "another node's task was started\n{context}"
    );
    agent.assert_running(&fake);
    drop(cpu);
}

#[tokio::test]
async fn another_task_for_the_same_process_and_target_replaces_the_running_one() {
    if !bpf_available("another_task_for_the_same_process_and_target_replaces_the_running_one") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("replace");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-replace")]);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    let first_update = now_ms();
    fake.add_task(TaskCommand::on_cpu(
        "replace-old",
        std::slice::from_ref(&id),
        first_update,
        60,
    ));
    wait(&fake, &agent, "the old task's uploads", WAIT, |r| {
        task_messages(r, "replace-old")
            .iter()
            .map(|(stream, _)| stream)
            .collect::<BTreeSet<_>>()
            .len()
            >= 2
    })
    .await;
    fake.add_task(TaskCommand::on_cpu(
        "replace-new",
        std::slice::from_ref(&id),
        now_ms().max(first_update + 1),
        60,
    ));
    let recorded = wait(&fake, &agent, "the new task's upload", WAIT, |r| {
        has_upload(r, "replace-new")
    })
    .await;
    let first_new = task_messages(&recorded, "replace-new")[0].0;
    // A few more flushes: the old task must be silent, the new one keeps going.
    let streams_then = recorded.profiling_streams.len();
    let recorded = wait(&fake, &agent, "three more uploads", WAIT, |r| {
        task_messages(r, "replace-new")
            .iter()
            .filter(|(stream, _)| *stream >= streams_then)
            .count()
            >= 3
    })
    .await;
    let context = agent.context(&fake);
    let last_old = task_messages(&recorded, "replace-old")
        .last()
        .map(|(stream, _)| *stream)
        .expect("old uploads");
    assert!(
        last_old <= first_new,
        "the old task uploaded (stream {last_old}) after the new one started (stream \
         {first_new})\n{context}"
    );
    profiling_start(&recorded, "replace-new", &context);
    agent.assert_running(&fake);
    drop(cpu);
}

#[tokio::test]
async fn the_same_task_sent_again_extends_the_run() {
    if !bpf_available("the_same_task_sent_again_extends_the_run") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("extend");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-extend")]);
    let flush = Duration::from_secs(1);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    const DURATION_S: i64 = 4;
    let first = TaskCommand::on_cpu("extend-1", std::slice::from_ref(&id), now_ms(), DURATION_S);
    fake.add_task(first.clone());
    let recorded = wait(&fake, &agent, "the task's first upload", WAIT, |r| {
        has_upload(r, "extend-1")
    })
    .await;
    let profiling_start_ms = profiling_start(&recorded, "extend-1", &agent.context(&fake));
    let first_end = profiling_start_ms + DURATION_S * 1000;
    // Sent again (a new update time) well before its first end.
    let resent_at = now_ms();
    assert!(resent_at + 1500 < first_end, "{}", agent.context(&fake));
    fake.add_task(TaskCommand {
        update_ms: resent_at.max(first.update_ms + 1),
        ..first
    });
    let clock = Clock::now();
    // The second end is DURATION_S after the agent got the command (within a poll).
    let latest_second_end = resent_at + DURATION_S * 1000 + 1500;
    sleep_until(clock.instant_of(latest_second_end) + 3 * flush).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert_eq!(
        profiling_start(&recorded, "extend-1", &context),
        profiling_start_ms,
        "{context}"
    );
    let times: Vec<i64> = task_messages(&recorded, "extend-1")
        .iter()
        .map(|(_, task)| task.current_time)
        .collect();
    let latest = times.iter().copied().max().expect("uploads");
    assert!(
        latest >= first_end + 1000,
        "no upload past the first end {first_end} (latest currentTime {latest}): not \
         extended\n{context}"
    );
    assert!(
        latest <= latest_second_end,
        "currentTime {latest} past the extended end {latest_second_end}\n{context}"
    );
    let quiet_from = clock.instant_of(latest_second_end) + 2 * flush;
    for (stream, _) in task_messages(&recorded, "extend-1") {
        assert!(
            recorded.profiling_streams[stream].opened <= quiet_from,
            "an upload after the extended end + 2 flushes\n{context}"
        );
    }
    drop(cpu);
}

/// A run that started after its task's start (the agent saw the task late) outlives the window
/// its command gives; the same task sent again after that window still extends the run.
#[tokio::test]
async fn a_late_run_is_extended_by_its_task_sent_again_after_the_window() {
    if !bpf_available("a_late_run_is_extended_by_its_task_sent_again_after_the_window") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("late");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-late")]);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    const DURATION_S: i64 = 6;
    // Started 4 s ago: its window ends in 2 s (the agent polls every second), the run lasts
    // 6 s from when it starts.
    let task_start_ms = now_ms() - 4000;
    let first = TaskCommand::on_cpu(
        "late-1",
        std::slice::from_ref(&id),
        task_start_ms,
        DURATION_S,
    );
    fake.add_task(first.clone());
    let recorded = wait(&fake, &agent, "the task's first upload", WAIT, |r| {
        has_upload(r, "late-1")
    })
    .await;
    let profiling_start_ms = profiling_start(&recorded, "late-1", &agent.context(&fake));
    let run_end = profiling_start_ms + DURATION_S * 1000;
    let window_end = task_start_ms + DURATION_S * 1000;
    let clock = Clock::now();
    sleep_until(clock.instant_of(window_end + 200)).await;
    let resent_at = now_ms();
    assert!(
        resent_at > window_end && resent_at + 1500 < run_end,
        "sent again at {resent_at}: not between the window's end {window_end} and the run's \
         end {run_end} - 1.5 s\n{}",
        agent.context(&fake)
    );
    fake.add_task(TaskCommand {
        update_ms: resent_at.max(first.update_ms + 1),
        ..first
    });
    let latest_end = resent_at + DURATION_S * 1000 + 1500;
    sleep_until(clock.instant_of(latest_end) + Duration::from_secs(2)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    let latest = task_messages(&recorded, "late-1")
        .iter()
        .map(|(_, task)| task.current_time)
        .max()
        .expect("uploads");
    assert!(
        latest >= run_end + 1000,
        "no upload past the run's first end {run_end} (latest currentTime {latest}): not \
         extended\n{context}"
    );
    assert!(
        latest <= latest_end,
        "currentTime {latest} past the extended end {latest_end}\n{context}"
    );
    drop(cpu);
}

// --- 5. OAP outages --------------------------------------------------------------------------

#[tokio::test]
async fn an_oap_outage_mid_task_is_survived_and_the_buffered_data_delivered() {
    if !bpf_available("an_oap_outage_mid_task_is_survived_and_the_buffered_data_delivered") {
        return;
    }
    let _lock = prepare();
    let mut fake = FakeOap::start().expect("fake OAP");
    let tag = token("outage");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-outage")]);
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    const DURATION_S: i64 = 14;
    fake.add_task(TaskCommand::on_cpu(
        "outage-1",
        std::slice::from_ref(&id),
        now_ms(),
        DURATION_S,
    ));
    let recorded = wait(&fake, &agent, "the task's first upload", WAIT, |r| {
        has_upload(r, "outage-1")
    })
    .await;
    let profiling_start_ms = profiling_start(&recorded, "outage-1", &agent.context(&fake));

    fake.stop();
    let down_ms = now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.assert_running(&fake);
    let before = fake.recorded();
    fake.start_again().expect("restarting the fake OAP");
    let up_ms = now_ms();
    let recorded = wait(
        &fake,
        &agent,
        "a report and an upload after the restart",
        Duration::from_secs(30),
        |r| {
            r.process_reports.len() > before.process_reports.len()
                && r.profiling_streams.len() > before.profiling_streams.len()
                && task_messages(r, "outage-1")
                    .iter()
                    .any(|(stream, _)| *stream >= before.profiling_streams.len())
        },
    )
    .await;
    let context = agent.context(&fake);
    assert!(
        recorded.process_reports[before.process_reports.len()..]
            .iter()
            .any(|report| report.processes.iter().any(|p| match &p.metadata {
                Some(ebpf_process_properties::Metadata::HostProcess(host)) => {
                    i64::from(host.pid) == i64::from(cpu.pid())
                }
                _ => false,
            })),
        "the process was not reported again to the restarted OAP\n{context}"
    );
    // Wait for the end of the run, then check everything arrived.
    let end = Clock::now().instant_of(profiling_start_ms + DURATION_S * 1000);
    sleep_until(end + Duration::from_secs(8)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert_eq!(
        profiling_start(&recorded, "outage-1", &context),
        profiling_start_ms
    );
    let during_outage = task_messages(&recorded, "outage-1")
        .iter()
        .filter(|(_, task)| (down_ms + 500..=up_ms).contains(&task.current_time))
        .count();
    assert!(
        during_outage > 0,
        "no data recorded during the outage [{down_ms}, {up_ms}] was delivered\n{context}"
    );
    let stacks = fold_received(&recorded.profiling_streams, "outage-1", Some(&id));
    check_cpu_split(&stacks, DURATION_S as f64, &context);
    drop(cpu);
}

#[tokio::test]
async fn a_tiny_upload_buffer_drops_during_an_outage_and_says_so() {
    if !bpf_available("a_tiny_upload_buffer_drops_during_an_outage_and_says_so") {
        return;
    }
    let _lock = prepare();
    let mut fake = FakeOap::start().expect("fake OAP");
    let tag = token("tiny");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let mut config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-tiny")]);
    // A window of cpu_split is about a kilobyte: three or four fit.
    config.upload_buffer = Some("4KiB".to_owned());
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    fake.add_task(TaskCommand::on_cpu(
        "tiny-1",
        std::slice::from_ref(&id),
        now_ms(),
        30,
    ));
    wait(&fake, &agent, "two uploads", WAIT, |r| {
        task_messages(r, "tiny-1")
            .iter()
            .map(|(stream, _)| stream)
            .collect::<BTreeSet<_>>()
            .len()
            >= 2
    })
    .await;
    assert!(
        !agent.stderr().contains("upload buffer full"),
        "windows dropped while the OAP was up: the bound is too small for the test\n{}",
        agent.context(&fake)
    );
    fake.stop();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let before = fake.recorded().profiling_streams.len();
    fake.start_again().expect("restarting the fake OAP");
    wait(
        &fake,
        &agent,
        "uploads after the restart",
        Duration::from_secs(30),
        |r| {
            task_messages(r, "tiny-1")
                .iter()
                .any(|(stream, _)| *stream >= before)
        },
    )
    .await;
    let line = agent
        .wait_for_log(
            &["upload buffer full", "total_dropped="],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no dropped count in the log\n{}", agent.context(&fake)));
    let dropped: u64 = line
        .split("total_dropped=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|count| count.parse().ok())
        .unwrap_or_else(|| panic!("no count in {line:?}"));
    assert!(dropped > 0, "{line}");
    agent.assert_running(&fake);
    drop(cpu);
}

// --- 6. Authentication and TLS ---------------------------------------------------------------

#[tokio::test]
async fn the_configured_authentication_is_on_every_call() {
    if !bpf_available("the_configured_authentication_is_on_every_call") {
        return;
    }
    let _lock = prepare();
    const SECRET: &str = "e2e-secret-token";
    let fake = FakeOap::start_with(FakeOapConfig {
        required_authentication: Some(SECRET.to_owned()),
        ..FakeOapConfig::default()
    })
    .expect("fake OAP");
    let tag = token("auth");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let mut config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-auth")]);
    config.backend_extra = vec![format!("authentication: {SECRET}")];
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    fake.add_task(TaskCommand::on_cpu(
        "auth-1",
        std::slice::from_ref(&id),
        now_ms(),
        3,
    ));
    let recorded = wait(&fake, &agent, "every kind of call", WAIT, |r| {
        has_upload(r, "auth-1")
            && !r.keep_alives.is_empty()
            && [
                "reportProcesses",
                "keepAlive",
                "queryTasks",
                "collectProfilingData",
            ]
            .iter()
            .all(|method| r.calls.iter().any(|call| call.method == *method))
    })
    .await;
    let context = agent.context(&fake);
    for call in &recorded.calls {
        assert_eq!(
            call.authentication.as_deref(),
            Some(SECRET),
            "{} without the authentication\n{context}",
            call.method
        );
    }
    agent.assert_running(&fake);
    drop(cpu);
}

/// A fake OAP serving TLS with `server`'s certificate, a cpu_split workload, and an agent that
/// reaches the fake by name (`localhost`) trusting `trusted`'s CA.
fn start_over_tls(
    server: &TestCertificates,
    trusted: &TestCertificates,
    tag: &str,
) -> (FakeOap, Workload, NodeAgent) {
    let fake = FakeOap::start_with(FakeOapConfig {
        tls: Some(server.server_tls()),
        ..FakeOapConfig::default()
    })
    .expect("fake OAP");
    let service = format!("e2e-{tag}");
    let tag = token(tag);
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let mut config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, &service)]);
    config.addr = format!("localhost:{}", fake.addr().port());
    config.backend_extra = vec![
        "enable_TLS: true".to_owned(),
        format!("ca_pem_path: {}", trusted.ca_path.display()),
    ];
    let agent = NodeAgent::start(&config, &[]);
    (fake, cpu, agent)
}

#[tokio::test]
async fn tls_with_the_servers_ca_works() {
    if !bpf_available("tls_with_the_servers_ca_works") {
        return;
    }
    let _lock = prepare();
    let certificates = TestCertificates::generate().expect("certificates");
    let (fake, cpu, mut agent) = start_over_tls(&certificates, &certificates, "tls");
    let id = wait_reported(&fake, &agent, &cpu).await;
    fake.add_task(TaskCommand::on_cpu(
        "tls-1",
        std::slice::from_ref(&id),
        now_ms(),
        3,
    ));
    wait(&fake, &agent, "an upload over TLS", WAIT, |r| {
        has_upload(r, "tls-1") && !r.keep_alives.is_empty()
    })
    .await;
    agent.assert_running(&fake);
    drop(cpu);
}

#[tokio::test]
async fn tls_with_another_ca_sends_nothing_and_logs_the_certificate_error() {
    if !bpf_available("tls_with_another_ca_sends_nothing_and_logs_the_certificate_error") {
        return;
    }
    let _lock = prepare();
    let certificates = TestCertificates::generate().expect("certificates");
    let other = TestCertificates::generate().expect("other certificates");
    let (fake, cpu, mut agent) = start_over_tls(&certificates, &other, "tls-bad");
    let line = agent.wait_for_log(&["failed", "certificate"], WAIT);
    let context = agent.context(&fake);
    let line = line.unwrap_or_else(|| panic!("no certificate error in the log\n{context}"));
    // Both test CAs have the same name, so rustls finds "the" issuer and rejects its
    // signature (BadSignature); with an unrelated CA it says UnknownIssuer.
    assert!(
        line.contains("invalid peer certificate"),
        "the error should say the OAP's certificate was rejected: {line}\n{context}"
    );
    // A few more heartbeats and polls: still nothing arrives, and the agent keeps trying.
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    assert!(
        recorded.calls.is_empty(),
        "calls arrived through an untrusted certificate\n{}",
        agent.context(&fake)
    );
    drop(cpu);
}

// --- 7. Environment and configuration errors -------------------------------------------------

#[tokio::test]
async fn rover_environment_variables_override_the_files_values() {
    if !bpf_available("rover_environment_variables_override_the_files_values") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("env");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let mut config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-env")]);
    // Defaults that cannot work: nothing listens on port 1, a heartbeat a minute long.
    config.addr = "${ROVER_BACKEND_ADDR:127.0.0.1:1}".to_owned();
    config.heartbeat_period = "${ROVER_PROCESS_DISCOVERY_HEARTBEAT_PERIOD:60s}".to_owned();
    let addr = fake.addr().to_string();
    let agent = NodeAgent::start(
        &config,
        &[
            ("ROVER_BACKEND_ADDR", addr.as_str()),
            ("ROVER_PROCESS_DISCOVERY_HEARTBEAT_PERIOD", "1s"),
        ],
    );
    wait_reported(&fake, &agent, &cpu).await;
    wait(
        &fake,
        &agent,
        "keepAlives at the 1 s heartbeat",
        Duration::from_secs(10),
        |r| r.keep_alives.len() >= 2,
    )
    .await;
    drop(cpu);
}

#[test]
fn an_unknown_key_stops_the_agent_at_once_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("rover.yaml");
    std::fs::write(
        &path,
        "core:\n  backend:\n    addr: 127.0.0.1:1\nprocess_discovery:\n  heartbeat_periodd: 1s\n",
    )
    .expect("writing the configuration");
    // Built before the clock starts.
    integration_tests::agent_binary();
    let started = Instant::now();
    let run = run_agent(agent().arg("run").arg("--config").arg(&path));
    assert!(
        !run.success,
        "the agent accepted an unknown key: {}",
        run.stderr
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the agent took {:?} to refuse its configuration",
        started.elapsed()
    );
    assert!(
        run.stderr.contains("process_discovery.heartbeat_periodd"),
        "the error does not name the key: {}",
        run.stderr
    );
}

// --- 8. Shutdown -----------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_during_a_task_uploads_its_last_window_and_exits_zero_in_time() {
    if !bpf_available("sigterm_during_a_task_uploads_its_last_window_and_exits_zero_in_time") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let tag = token("sigterm");
    let cpu = Workload::spawn("cpu_split", &["60", &tag]);
    let mut config = NodeConfig::new(&fake, vec![rule("cpu_split", &tag, "e2e-sigterm")]);
    // Long flushes: the last window is clearly the one sent at shutdown.
    config.flush_interval = "4s".to_owned();
    config.shutdown_deadline = "3s".to_owned();
    let mut agent = NodeAgent::start(&config, &[]);
    let id = wait_reported(&fake, &agent, &cpu).await;
    fake.add_task(TaskCommand::on_cpu(
        "sigterm-1",
        std::slice::from_ref(&id),
        now_ms(),
        60,
    ));
    let recorded = wait(&fake, &agent, "the task's first upload", WAIT, |r| {
        has_upload(r, "sigterm-1")
    })
    .await;
    let profiling_start_ms = profiling_start(&recorded, "sigterm-1", &agent.context(&fake));
    // Mid-window.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let streams_before = fake.recorded().profiling_streams.len();
    let terminated = Instant::now();
    let terminated_ms = now_ms();
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(3 + 5));
    let context = agent.context(&fake);
    let status = status.unwrap_or_else(|| {
        panic!(
            "the agent still runs {:?} after SIGTERM (shutdown_deadline 3s)\n{context}",
            terminated.elapsed()
        )
    });
    assert!(
        status.success(),
        "the agent exited with {status}\n{context}"
    );
    let recorded = fake.recorded();
    let last = task_messages(&recorded, "sigterm-1")
        .last()
        .map(|(stream, _)| *stream)
        .expect("uploads");
    assert!(
        last >= streams_before,
        "no stream after SIGTERM carried the task's last window\n{context}"
    );
    let last_stream = &recorded.profiling_streams[last];
    assert!(
        last_stream.completed,
        "the last stream did not complete\n{context}"
    );
    assert!(
        last_stream.opened >= terminated,
        "the last stream opened before SIGTERM\n{context}"
    );
    // Everything up to SIGTERM arrived: the samples cover the run's whole time.
    let seconds = (terminated_ms - profiling_start_ms) as f64 / 1000.0;
    let stacks = fold_received(&recorded.profiling_streams, "sigterm-1", Some(&id));
    check_cpu_split(&stacks, seconds, &context);
    drop(cpu);
}
