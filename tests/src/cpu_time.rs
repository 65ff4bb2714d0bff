//! CPU time of processes: for the benchmarks' binaries, and for tests whose expected sample
//! count follows how much CPU a workload got.

use std::time::Duration;

/// User + system CPU of this process so far, every thread included.
pub fn own_cpu() -> Duration {
    // SAFETY: rusage is plain integers (all-zero is valid); getrusage writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let time = |value: libc::timeval| {
        Duration::from_secs(value.tv_sec as u64) + Duration::from_micros(value.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// User + system CPU of process `pid` so far, every thread included (dead ones too), from
/// `/proc/PID/stat` in clock ticks.
pub fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |index: usize| -> u64 {
        fields
            .get(index - 3)
            .and_then(|field| field.parse().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_millis(
        (ticks(14) + ticks(15)) * 1000 / per_second,
    ))
}

/// CPU time of the calling thread so far.
pub fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain integers (all-zero is valid); clock_gettime writes into it.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}
