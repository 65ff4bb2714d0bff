//! Continuous profiling: the checkers' readings of workloads with known ground truth.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use integration_tests::{machine_lock, workload_path};
use rover_agent::task::continuous::{CpuUsage, ProcReader};

/// The `duty_cycle` workload: `percent` % of a core in `duty_cycle_burn`, `1 + idle_threads`
/// threads, for `seconds`; returned once it said it is ready (its threads all exist).
struct DutyCycle {
    child: Child,
}

impl DutyCycle {
    fn start(percent: u32, idle_threads: u32, seconds: u32) -> Self {
        let mut child = Command::new(workload_path("duty_cycle"))
            .args([percent, idle_threads, seconds].map(|n| n.to_string()))
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

/// PROCESS_THREAD_COUNT: `num_threads` of `stat` counts every thread of the process, the same
/// number `/proc/PID/status` (where Rover reads it) gives.
#[test]
fn thread_count_follows_spawned_threads() {
    let _lock = machine_lock();
    let mut reader = ProcReader::new("/proc");
    for idle_threads in [0, 7, 40] {
        let workload = DutyCycle::start(0, idle_threads, 30);
        let threads = reader
            .process_stat(workload.pid())
            .expect("the workload's stat")
            .threads;
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
    }
}

/// PROCESS_CPU: a process using 30 % of a core reads 30 ± 5, each one-second reading and their
/// mean.
#[test]
fn cpu_use_of_a_duty_cycled_process_reads_its_duty_cycle() {
    let _lock = machine_lock();
    let workload = DutyCycle::start(30, 0, 30);
    // Let the burner settle into its period.
    std::thread::sleep(Duration::from_millis(500));
    let pid = workload.pid();
    let mut reader = ProcReader::new("/proc");
    let mut usage = CpuUsage::new(ticks_per_second());
    let first = usage.update(
        reader.process_stat(pid).expect("the workload's stat"),
        Instant::now(),
    );
    assert_eq!(first, None, "the first sample has nothing to compare with");
    let mut readings = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let stat = reader.process_stat(pid).expect("the workload's stat");
        readings.extend(usage.update(stat, Instant::now()));
    }
    assert_eq!(readings.len(), 5, "one reading a second: {readings:?}");
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
