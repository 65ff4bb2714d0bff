//! Continuous profiling: the checkers' readings of workloads with known ground truth, and
//! `rover-agent run` end to end against the fake OAP's policies: triggers reported with their
//! causes, triggered runs uploaded under the task id the reply gave, silence, policy updates,
//! meters.
//!
//! The agent tests need BPF (`rover-agent run` checks its privileges at start): they take the
//! machine lock and skip (fail in CI) without it.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::cpu_time::process_cpu;
use integration_tests::fake_oap::{FakeOap, Recorded, fold_received, process_id};
use integration_tests::node_agent::{
    ContinuousConfig, HostRule, NodeAgent, NodeConfig, prepare, token,
};
use integration_tests::{bpf_available, machine_lock, workload_path};
use rover_agent::task::continuous::{CpuUsage, HostReadings, ProcReader, ProcessStat};
use rover_proto::v3::{
    Commands, ContinuousProfilingReport, ContinuousProfilingTriggeredMonitorType,
    KeyStringValuePair, continuous_profiling_cause, continuous_profiling_report, meter_data,
};
use serde_json::{Value, json};
use tokio::time::sleep;

/// The `duty_cycle` workload: `percent` % of a core in `duty_cycle_burn`, `1 + idle_threads`
/// threads, for `seconds`; returned once it said it is ready (its threads all exist).
struct DutyCycle {
    child: Child,
}

impl DutyCycle {
    fn start(percent: u32, idle_threads: u32, seconds: u32, tag: &str) -> Self {
        let mut child = Command::new(workload_path("duty_cycle"))
            .args([percent, idle_threads, seconds].map(|n| n.to_string()))
            .arg(tag)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the duty_cycle workload");
        let stdout = child.stdout.take().expect("piped stdout");
        let (ready, readied) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = ready.send(line);
        });
        let line = readied
            .recv_timeout(Duration::from_secs(10))
            .expect("duty_cycle says ready within 10 s");
        assert_eq!(line.trim(), "ready", "duty_cycle's first line");
        Self { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DutyCycle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `USER_HZ`, the unit of `stat`'s CPU times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).expect("a positive USER_HZ")
}

/// The agent's reading of `pid`, which must come from the kernel's process list.
fn kernel_reading(readings: &mut HostReadings, pid: u32) -> ProcessStat {
    let stat = readings
        .process_stats(&[pid])
        .pop()
        .expect("one reading")
        .expect("the workload is listed");
    assert!(
        readings.reads_kernel_list(),
        "the agent reads processes through its process-CPU iterator (see its warning above)"
    );
    stat
}

/// PROCESS_THREAD_COUNT: the agent's reading counts every thread of the process, the same
/// number `/proc/PID/status` (where Rover reads it) and `stat` give.
#[test]
fn thread_count_follows_spawned_threads() {
    if !bpf_available("thread_count_follows_spawned_threads") {
        return;
    }
    let _lock = machine_lock();
    let mut readings = HostReadings::new();
    let mut proc_reader = ProcReader::new("/proc");
    for idle_threads in [0, 7, 40] {
        let workload = DutyCycle::start(0, idle_threads, 600, "");
        let threads = kernel_reading(&mut readings, workload.pid()).threads;
        assert_eq!(
            threads,
            u64::from(1 + idle_threads),
            "main thread plus {idle_threads} idle ones"
        );
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", workload.pid())).expect("status");
        let status_threads = status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .and_then(|count| count.trim().parse::<u64>().ok());
        assert_eq!(status_threads, Some(threads), "Threads: in status");
        let stat = proc_reader.process_stat(workload.pid()).expect("stat");
        assert_eq!(stat.threads, threads, "num_threads in stat");
    }
}

/// The kernel's list and `/proc/PID/stat` tell the same process: the same start time, thread
/// count and CPU time (stat's, in clock ticks, rounds each of utime and stime down), for a
/// burning process, and for this one after a thread of it burned 300 ms and exited (the time
/// of exited threads stays counted); a process that exited is not listed, and counts as gone.
#[test]
fn the_kernel_list_agrees_with_procfs() {
    if !bpf_available("the_kernel_list_agrees_with_procfs") {
        return;
    }
    let _lock = machine_lock();
    let tick_ns = 1_000_000_000 / ticks_per_second();
    let mut readings = HostReadings::new();
    let mut proc_reader = ProcReader::new("/proc");
    // 60 % of a core in the main thread, 5 idle threads.
    let workload = DutyCycle::start(60, 5, 600, "");
    std::thread::sleep(Duration::from_millis(700));
    let pid = workload.pid();
    for _ in 0..5 {
        let before = proc_reader.process_stat(pid).expect("stat before");
        let listed = kernel_reading(&mut readings, pid);
        let after = proc_reader.process_stat(pid).expect("stat after");
        assert_eq!(listed.start_time, before.start_time, "start time in ticks");
        assert_eq!(listed.threads, before.threads, "threads");
        assert!(
            before.cpu_ns <= listed.cpu_ns && listed.cpu_ns <= after.cpu_ns + 2 * tick_ns,
            "CPU time: stat {} ns, then the kernel's list {} ns, then stat {} ns",
            before.cpu_ns,
            listed.cpu_ns,
            after.cpu_ns
        );
        assert!(listed.cpu_ns > 0, "a burning process used CPU");
        std::thread::sleep(Duration::from_millis(300));
    }
    // This process, once a thread of it burned and exited. Reading its own process, stat also
    // counts the reading thread's time since its last tick, which the list leaves out.
    let own = std::process::id();
    let burned = Duration::from_millis(300);
    std::thread::spawn(move || {
        let start = integration_tests::cpu_time::thread_cpu();
        while integration_tests::cpu_time::thread_cpu() - start < burned {
            std::hint::black_box(0u64);
        }
    })
    .join()
    .expect("the burning thread");
    let before = proc_reader.process_stat(own).expect("own stat before");
    let listed = kernel_reading(&mut readings, own);
    let after = proc_reader.process_stat(own).expect("own stat after");
    assert!(
        before.cpu_ns <= listed.cpu_ns + 2 * tick_ns && listed.cpu_ns <= after.cpu_ns + 2 * tick_ns,
        "CPU time of a process a thread of which exited: stat {} ns, then the kernel's list {} \
         ns, then stat {} ns",
        before.cpu_ns,
        listed.cpu_ns,
        after.cpu_ns
    );
    assert!(
        listed.cpu_ns >= burned.as_nanos() as u64,
        "the exited thread's time counts"
    );
    drop(workload);
    let gone = readings
        .process_stats(&[pid])
        .pop()
        .expect("one reading")
        .expect_err("an exited (and reaped) process is not listed");
    assert!(gone.process_gone(), "{gone}");
}

/// PROCESS_CPU: a process using 30 % of a core reads 30 ± 5, each one-second reading and their
/// mean, read as the agent reads it.
///
/// The host may freeze this test's processes for minutes (benchmarks elsewhere): a reading whose
/// interval came out much longer than the second slept is not a reading of the duty cycle and
/// is taken again (at most 30 attempts), and the workload lives long enough to outlast a freeze.
#[test]
fn cpu_use_of_a_duty_cycled_process_reads_its_duty_cycle() {
    const ATTEMPTS: usize = 30;
    if !bpf_available("cpu_use_of_a_duty_cycled_process_reads_its_duty_cycle") {
        return;
    }
    let _lock = machine_lock();
    let workload = DutyCycle::start(30, 0, 3600, "");
    // Let the burner settle into its period.
    std::thread::sleep(Duration::from_millis(500));
    let pid = workload.pid();
    let mut host = HostReadings::new();
    let mut usage = CpuUsage::default();
    let mut then = Instant::now();
    let first = usage.update(kernel_reading(&mut host, pid), then);
    assert_eq!(first, None, "the first sample has nothing to compare with");
    let mut readings = Vec::new();
    let mut frozen = 0;
    for _ in 0..ATTEMPTS {
        if readings.len() == 5 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        let now = Instant::now();
        let reading = usage.update(kernel_reading(&mut host, pid), now);
        if now - then > Duration::from_millis(1500) {
            frozen += 1;
        } else {
            readings.extend(reading);
        }
        then = now;
    }
    assert_eq!(
        readings.len(),
        5,
        "five one-second readings in {ATTEMPTS} attempts ({frozen} intervals too long): \
         {readings:?}"
    );
    let mean = readings.iter().sum::<f64>() / readings.len() as f64;
    eprintln!("PROCESS_CPU readings {readings:.1?}, mean {mean:.1}");
    assert!(
        (mean - 30.0).abs() <= 5.0,
        "readings {readings:.1?} (mean {mean:.1}) not 30 ± 5"
    );
    for reading in &readings {
        assert!(
            (reading - 30.0).abs() <= 5.0,
            "a one-second reading {reading:.1} not 30 ± 5 (all: {readings:.1?})"
        );
    }
}

// --- The node agent against the fake OAP's policies ------------------------------------------

/// Upper bound of any single wait for something the agent does within a few periods.
const WAIT: Duration = Duration::from_secs(30);
/// The runs' length (`ContinuousConfig::default`'s `execute_duration`).
const RUN: Duration = Duration::from_secs(5);
/// The on-CPU sampling frequency (`dump_period: 10.1ms` in `NodeConfig::new`).
const FREQUENCY_HZ: f64 = 99.0;

/// A host rule for the `duty_cycle` started with `percent` and `token`, reported as process
/// `process_name` of `service` (names differ: two processes of one name in one instance are
/// one process to the OAP).
fn rule(
    percent: u32,
    idle_threads: u32,
    token: &str,
    service: &str,
    process_name: &str,
) -> HostRule {
    HostRule {
        process_name: process_name.to_owned(),
        ..HostRule::new(
            &format!("/duty_cycle {percent} {idle_threads} [0-9]+ {token}$"),
            service,
        )
    }
}

/// A policy's `Profiling` object with one item.
fn profiling(target: &str, monitor: &str, threshold: &str, period: u32, count: u32) -> Value {
    json!({ target: { monitor: { "Threshold": threshold, "Period": period, "Count": count } } })
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

/// The continuous reports of `process_name`, with the task id each got.
fn reports_of<'a>(
    recorded: &'a Recorded,
    process_name: &str,
) -> Vec<(&'a ContinuousProfilingReport, Option<&'a str>)> {
    recorded
        .continuous_reports
        .iter()
        .zip(&recorded.continuous_task_ids)
        .filter(|(report, _)| report.process_name == process_name)
        .map(|(report, task_id)| (report, task_id.as_deref()))
        .collect()
}

/// The single-value cause of a report: (type, threshold, current).
fn causes(
    report: &ContinuousProfilingReport,
) -> Vec<(ContinuousProfilingTriggeredMonitorType, f64, f64)> {
    report
        .causes
        .iter()
        .map(|cause| match &cause.cause {
            Some(continuous_profiling_cause::Cause::SingleValue(value)) => {
                (cause.r#type(), value.threshold, value.current)
            }
            other => panic!("not a single-value cause: {other:?}"),
        })
        .collect()
}

/// A meter as received: its labels (name, value), its service and its value.
type ReceivedMeter = (Vec<(String, String)>, String, f64);

/// The meters named `name` of process `process_name`.
fn meters_of(recorded: &Recorded, name: &str, process_name: &str) -> Vec<ReceivedMeter> {
    recorded
        .meters
        .iter()
        .filter_map(|meter| {
            let Some(meter_data::Metric::SingleValue(value)) = &meter.metric else {
                return None;
            };
            let labels: Vec<(String, String)> = value
                .labels
                .iter()
                .map(|label| (label.name.clone(), label.value.clone()))
                .collect();
            (value.name == name
                && labels.contains(&("process_name".to_owned(), process_name.to_owned())))
            .then(|| (labels, meter.service.clone(), value.value))
        })
        .collect()
}

/// The ON_CPU burner fires with its cause, its run uploads under the reply's task id with the
/// burner's hot function, no second trigger comes within the silence, the process under the
/// threshold never fires, a process started after the policy was fetched fires too, and the
/// PROCESS_CPU meters carry Rover's name and labels.
#[tokio::test]
async fn a_hot_process_fires_once_and_its_run_uploads_under_the_reply_task_id() {
    if !bpf_available("a_hot_process_fires_once_and_its_run_uploads_under_the_reply_task_id") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let service = "e2e-continuous-cpu";
    fake.set_policy(
        service,
        "cpu-1",
        profiling("ON_CPU", "PROCESS_CPU", "50", 5, 3),
    );
    let tag = token("cpu");
    let mut config = NodeConfig::new(
        &fake,
        vec![
            rule(100, 0, &tag, service, "burner"),
            rule(20, 0, &tag, service, "cool"),
            rule(100, 1, &tag, service, "late"),
        ],
    );
    config.continuous = Some(ContinuousConfig::default());
    let burner = DutyCycle::start(100, 0, 600, &tag);
    let cool = DutyCycle::start(20, 0, 600, &tag);
    let mut agent = NodeAgent::start(&config, &[]);

    let recorded = wait(&fake, &agent, "the burner's trigger", WAIT, |r| {
        !reports_of(r, "burner").is_empty()
    })
    .await;
    let context = agent.context(&fake);
    let (report, task_id) = reports_of(&recorded, "burner")[0];
    let task_id = task_id.expect("the fake gave a task id").to_owned();
    assert_eq!(report.service_name, service, "{context}");
    assert_eq!(report.layer, "OS_LINUX", "{context}");
    assert_eq!(report.duration, 5, "execute_duration in seconds\n{context}");
    assert!(
        matches!(
            report.target_task,
            Some(continuous_profiling_report::TargetTask::OnCpu(_))
        ),
        "{context}"
    );
    let report_causes = causes(report);
    assert_eq!(report_causes.len(), 1, "{context}");
    let (kind, threshold, current) = report_causes[0];
    assert_eq!(
        kind,
        ContinuousProfilingTriggeredMonitorType::ProcessCpu,
        "{context}"
    );
    assert_eq!(threshold, 50.0, "{context}");
    assert!(
        (50.0..=105.0).contains(&current),
        "current {current}\n{context}"
    );
    assert!(
        recorded.policy_queries.iter().any(|query| query
            .policies
            .iter()
            .any(|policy| policy.service_name == service && policy.uuid.is_empty())),
        "the first query sends UUID \"\"\n{context}"
    );

    // The run: uploads under the reply's task id for the burner only, the hot function in them.
    let burner_id = process_id(service, &report.instance_name, "burner");
    // The burner's share of a core while its run records: what the sample count follows (a
    // busy host may give it less than a core).
    let cpu_before = (
        process_cpu(burner.pid()).expect("burner's CPU"),
        Instant::now(),
    );
    sleep(RUN + Duration::from_secs(3)).await;
    let cpu_share = (process_cpu(burner.pid()).expect("burner's CPU") - cpu_before.0).as_secs_f64()
        / cpu_before.1.elapsed().as_secs_f64();
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    let stacks = fold_received(&recorded.profiling_streams, &task_id, None);
    assert_eq!(
        stacks.process_ids.iter().collect::<Vec<_>>(),
        [&burner_id],
        "the run's uploads name the burner\n{context}"
    );
    let total = stacks.total_count() as f64;
    let hot = stacks.count_with_frame(|frame| frame == "duty_cycle_burn") as f64;
    let folded = stacks.to_folded();
    integration_tests::assert_near(
        total,
        FREQUENCY_HZ * RUN.as_secs_f64() * cpu_share,
        0.15,
        &format!("samples of the burner over its 5 s run at {cpu_share:.2} of a core"),
        &format!("{folded}\n{context}"),
    );
    assert!(
        hot / total >= 0.9,
        "duty_cycle_burn holds {hot} of {total} samples\n{folded}\n{context}"
    );

    // Still hot, checked every second, but silenced: no second trigger; the cool one never.
    sleep(Duration::from_secs(4)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert_eq!(reports_of(&recorded, "burner").len(), 1, "{context}");
    assert!(reports_of(&recorded, "cool").is_empty(), "{context}");

    // A process started after the policy was fetched fires too (the burner stops, so that
    // the late one has its core on a host of two).
    drop(burner);
    let late = DutyCycle::start(100, 1, 600, &tag);
    let recorded = wait(&fake, &agent, "the late process's trigger", WAIT, |r| {
        !reports_of(r, "late").is_empty()
    })
    .await;
    let context = agent.context(&fake);
    let (late_report, late_task) = reports_of(&recorded, "late")[0];
    assert!(
        late_task.is_some_and(|late_task| late_task != task_id),
        "{context}"
    );
    assert_eq!(causes(late_report)[0].1, 50.0, "{context}");
    assert!(reports_of(&recorded, "cool").is_empty(), "{context}");

    // Meters: Rover's name and labels, the cool process's value its duty cycle.
    let cool_meters = meters_of(&recorded, "rover_con_p_process_cpu", "cool");
    assert!(cool_meters.len() >= 3, "{context}");
    for (labels, meter_service, _) in &cool_meters {
        assert_eq!(
            *labels,
            [
                ("process_name".to_owned(), "cool".to_owned()),
                ("layer".to_owned(), "OS_LINUX".to_owned())
            ],
            "{context}"
        );
        assert_eq!(meter_service, service, "{context}");
    }
    let values: Vec<f64> = cool_meters.iter().map(|(_, _, value)| *value).collect();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    assert!(
        (mean - 20.0).abs() <= 5.0,
        "cool's PROCESS_CPU meters {values:?}\n{context}"
    );
    let burner_meters = meters_of(&recorded, "rover_con_p_process_cpu", "burner");
    assert!(
        burner_meters
            .iter()
            .filter(|(_, _, value)| *value >= 50.0)
            .count()
            >= 3,
        "the burner fired on 3 values ≥ 50: its meters show them too: {burner_meters:?}\n{context}"
    );
    drop((cool, late));
}

/// PROCESS_THREAD_COUNT fires for the process with many threads (OFF_CPU), with the exact
/// count as its current value; a malformed policy reply is logged and the same UUID sent again;
/// an empty reply to the report is logged and the trigger tried again at the next check; the
/// thread count meters carry each process's count.
#[tokio::test]
async fn thread_count_fires_and_bad_replies_are_retried() {
    if !bpf_available("thread_count_fires_and_bad_replies_are_retried") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let service = "e2e-continuous-threads";
    fake.set_policy(
        service,
        "threads-1",
        profiling("OFF_CPU", "PROCESS_THREAD_COUNT", "20", 3, 2),
    );
    fake.queue_report_reply(Commands::default());
    fake.queue_policy_reply(Commands {
        commands: vec![rover_proto::v3::Command {
            command: "ContinuousProfilingPolicyQuery".to_owned(),
            args: vec![KeyStringValuePair {
                key: "ServiceWithPolicyJSON".to_owned(),
                value: "[{\"ServiceName\": ".to_owned(),
            }],
        }],
    });
    let tag = token("threads");
    let mut config = NodeConfig::new(
        &fake,
        vec![
            rule(0, 30, &tag, service, "many"),
            rule(0, 2, &tag, service, "few"),
        ],
    );
    config.continuous = Some(ContinuousConfig::default());
    let many = DutyCycle::start(0, 30, 600, &tag);
    let few = DutyCycle::start(0, 2, 600, &tag);
    let mut agent = NodeAgent::start(&config, &[]);

    let recorded = wait(&fake, &agent, "a trigger with a task id", WAIT, |r| {
        reports_of(r, "many")
            .iter()
            .any(|(_, task_id)| task_id.is_some())
    })
    .await;
    let context = agent.context(&fake);
    // The malformed policy reply: logged, the next query sent the same UUID ("") again.
    assert!(
        agent
            .wait_for_log(&["WARN", "ServiceWithPolicyJSON is not JSON"], WAIT)
            .is_some(),
        "{context}"
    );
    let uuids: Vec<&str> = recorded
        .policy_queries
        .iter()
        .flat_map(|query| &query.policies)
        .filter(|policy| policy.service_name == service)
        .map(|policy| policy.uuid.as_str())
        .collect();
    assert!(
        uuids.len() >= 2 && uuids[..2] == ["", ""],
        "{uuids:?}\n{context}"
    );
    let reports = reports_of(&recorded, "many");
    assert_eq!(
        reports.len(),
        2,
        "the empty reply, then the retry\n{context}"
    );
    assert_eq!(reports[0].1, None, "{context}");
    assert!(
        agent
            .wait_for_log(&["reportProfilingTask is empty", "retried"], WAIT)
            .is_some(),
        "{context}"
    );
    for (report, _) in &reports {
        assert_eq!(
            causes(report),
            [(
                ContinuousProfilingTriggeredMonitorType::ProcessThreadCount,
                20.0,
                31.0
            )],
            "{context}"
        );
        assert!(
            matches!(
                report.target_task,
                Some(continuous_profiling_report::TargetTask::OffCpu(_))
            ),
            "{context}"
        );
    }
    let task_id = reports[1].1.expect("a task id").to_owned();
    let recorded = wait(&fake, &agent, "the off-CPU run's upload", WAIT, |r| {
        fold_received(&r.profiling_streams, &task_id, None).messages > 0
    })
    .await;
    let many_id = process_id(service, &reports[1].0.instance_name, "many");
    let stacks = fold_received(&recorded.profiling_streams, &task_id, None);
    assert_eq!(stacks.process_ids.iter().collect::<Vec<_>>(), [&many_id]);

    sleep(Duration::from_secs(3)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert!(reports_of(&recorded, "few").is_empty(), "{context}");
    assert_eq!(
        reports_of(&recorded, "many").len(),
        2,
        "silenced\n{context}"
    );
    for (name, threads) in [("many", 31.0), ("few", 3.0)] {
        let meters = meters_of(&recorded, "rover_con_p_process_thread_count", name);
        assert!(!meters.is_empty(), "{name}\n{context}");
        assert!(
            meters.iter().all(|(_, _, value)| *value == threads),
            "{name}: {meters:?}\n{context}"
        );
    }
    drop((many, few));
}

/// With `max_triggered_runs: 1`, a second process that fires waits (logged once) for the first
/// run to end before its own trigger is reported.
#[tokio::test]
async fn a_trigger_beyond_max_triggered_runs_waits_for_a_run_to_end() {
    if !bpf_available("a_trigger_beyond_max_triggered_runs_waits_for_a_run_to_end") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let service = "e2e-continuous-cap";
    fake.set_policy(
        service,
        "cap-1",
        profiling("ON_CPU", "PROCESS_THREAD_COUNT", "20", 3, 2),
    );
    let tag = token("cap");
    let mut config = NodeConfig::new(
        &fake,
        vec![
            rule(0, 30, &tag, service, "first"),
            rule(0, 25, &tag, service, "second"),
        ],
    );
    config.continuous = Some(ContinuousConfig {
        max_triggered_runs: 1,
        ..ContinuousConfig::default()
    });
    let first = DutyCycle::start(0, 30, 600, &tag);
    let second = DutyCycle::start(0, 25, 600, &tag);
    let mut agent = NodeAgent::start(&config, &[]);
    wait(&fake, &agent, "the first trigger", WAIT, |r| {
        !r.continuous_reports.is_empty()
    })
    .await;
    let first_reported = Instant::now();
    let recorded = wait(&fake, &agent, "the second trigger", WAIT, |r| {
        r.continuous_reports.len() >= 2
    })
    .await;
    let waited = first_reported.elapsed();
    let context = agent.context(&fake);
    let names: Vec<&str> = recorded
        .continuous_reports
        .iter()
        .map(|report| report.process_name.as_str())
        .collect();
    assert!(
        names == ["first", "second"] || names == ["second", "first"],
        "{names:?}\n{context}"
    );
    assert!(
        waited >= RUN - Duration::from_millis(500),
        "the second trigger came {waited:?} after the first, before its {RUN:?} run ended\n{context}"
    );
    let log = agent.stderr();
    let cap_warnings = log
        .lines()
        .filter(|line| line.contains("WARN") && line.contains("max_triggered_runs"))
        .count();
    assert_eq!(cap_warnings, 1, "{context}");
    agent.assert_running(&fake);
    drop((first, second));
}

/// A new UUID replaces the policy, the same UUID brings nothing new, UUID `""` stops the
/// checks (and their meters); an invalid item is dropped with one warning and the rest kept,
/// an HTTP item is logged once as not supported; SYSTEM_LOAD is sent as a meter.
#[tokio::test]
async fn policy_updates_replace_keep_or_stop_the_checks() {
    if !bpf_available("policy_updates_replace_keep_or_stop_the_checks") {
        return;
    }
    let _lock = prepare();
    let fake = FakeOap::start().expect("fake OAP");
    let service = "e2e-continuous-updates";
    // Never fires: 6 threads under a threshold of 50.
    fake.set_policy(
        service,
        "update-1",
        profiling("ON_CPU", "PROCESS_THREAD_COUNT", "50", 2, 1),
    );
    let tag = token("updates");
    let mut config = NodeConfig::new(&fake, vec![rule(0, 5, &tag, service, "six")]);
    config.continuous = Some(ContinuousConfig::default());
    let six = DutyCycle::start(0, 5, 600, &tag);
    let mut agent = NodeAgent::start(&config, &[]);
    let queried = |uuid: &'static str| {
        move |r: &Recorded| {
            r.policy_queries.iter().any(|query| {
                query
                    .policies
                    .iter()
                    .any(|policy| policy.service_name == service && policy.uuid == uuid)
            })
        }
    };
    let meter = "rover_con_p_process_thread_count";
    wait(
        &fake,
        &agent,
        "a query with UUID update-1 and meters",
        WAIT,
        |r| queried("update-1")(r) && meters_of(r, meter, "six").len() >= 3,
    )
    .await;
    // The same UUID: the fake replies nothing, the agent keeps it and keeps checking.
    fake.clear_recorded();
    sleep(Duration::from_secs(3)).await;
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert!(recorded.policy_queries.len() >= 2, "{context}");
    assert!(queried("update-1")(&recorded), "{context}");
    assert!(!queried("")(&recorded), "{context}");
    assert!(recorded.continuous_reports.is_empty(), "{context}");
    assert!(
        meters_of(&recorded, meter, "six")
            .iter()
            .all(|(_, _, value)| *value == 6.0),
        "{context}"
    );

    // A new UUID with a threshold of 5: fires with the current count. Beside it, an invalid
    // item (dropped with a warning) and an HTTP one (logged once as not supported).
    fake.set_policy(
        service,
        "update-2",
        json!({ "ON_CPU": {
            "PROCESS_THREAD_COUNT": { "Threshold": "5", "Period": 2, "Count": 1 },
            "PROCESS_CPU": { "Threshold": "500", "Period": 2, "Count": 1 },
            "HTTP_ERROR_RATE": { "Threshold": "10", "Period": 2, "Count": 1 },
            "SYSTEM_LOAD": { "Threshold": "1000", "Period": 2, "Count": 1 },
        } }),
    );
    let recorded = wait(&fake, &agent, "the trigger of policy update-2", WAIT, |r| {
        !r.continuous_reports.is_empty()
    })
    .await;
    let context = agent.context(&fake);
    assert_eq!(
        causes(&recorded.continuous_reports[0]),
        [(
            ContinuousProfilingTriggeredMonitorType::ProcessThreadCount,
            5.0,
            6.0
        )],
        "{context}"
    );
    let log = agent.stderr();
    let warnings = |parts: &[&str]| {
        log.lines()
            .filter(|line| line.contains("WARN") && parts.iter().all(|part| line.contains(part)))
            .count()
    };
    assert_eq!(
        warnings(&["monitor \"PROCESS_CPU\" dropped", "500"]),
        1,
        "{context}"
    );
    assert_eq!(
        warnings(&["HTTP_ERROR_RATE is not supported"]),
        1,
        "{context}"
    );
    // SYSTEM_LOAD (far under its threshold) is sampled and sent as a meter of the process: the
    // host's 1-minute load average.
    let recorded = wait(&fake, &agent, "a SYSTEM_LOAD meter", WAIT, |r| {
        !meters_of(r, "rover_con_p_system_load", "six").is_empty()
    })
    .await;
    let loadavg = std::fs::read_to_string("/proc/loadavg").expect("/proc/loadavg");
    let host_load: f64 = loadavg
        .split_whitespace()
        .next()
        .and_then(|load| load.parse().ok())
        .expect("a load average");
    let load_meters = meters_of(&recorded, "rover_con_p_system_load", "six");
    let (labels, _, load) = load_meters.last().expect("a meter");
    assert_eq!(
        *labels,
        [
            ("process_name".to_owned(), "six".to_owned()),
            ("layer".to_owned(), "OS_LINUX".to_owned())
        ],
        "{context}"
    );
    assert!(
        (load - host_load).abs() <= 0.5,
        "SYSTEM_LOAD meter {load} vs /proc/loadavg {host_load}\n{context}"
    );

    // Removed: the agent's next query names update-2 and gets UUID ""; checks and meters stop.
    fake.remove_policy(service);
    wait(
        &fake,
        &agent,
        "a query with UUID \"\" after the removal",
        WAIT,
        |r| queried("update-2")(r) && queried("")(r),
    )
    .await;
    sleep(Duration::from_secs(2)).await;
    fake.clear_recorded();
    sleep(Duration::from_secs(3)).await;
    agent.assert_running(&fake);
    let recorded = fake.recorded();
    let context = agent.context(&fake);
    assert!(meters_of(&recorded, meter, "six").is_empty(), "{context}");
    assert!(queried("")(&recorded), "{context}");
    assert!(!queried("update-2")(&recorded), "{context}");
    drop(six);
}
