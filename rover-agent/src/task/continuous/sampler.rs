//! What the checkers read: every watched process's CPU time and thread count, in one read of
//! the kernel's process-CPU iterator ([`HostReadings`]), or from `/proc/PID/stat` under a
//! configurable proc root (a fake one in tests) when the iterator cannot be used; and the host's
//! 1-minute load average from `/proc/loadavg`.

use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::warn;

use crate::bpf::ProcessCpuList;
use crate::process::proc_files::{ns_per_tick, split_stat};

/// Why a reading failed. A process that exited shows as [`SampleError::process_gone`].
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not in the expected form: {text:?}", path.display())]
    Malformed { path: PathBuf, text: String },
    #[error("process {pid} is not in the kernel's list: it exited")]
    NotListed { pid: u32 },
}

impl SampleError {
    /// The process is gone (its `/proc` entry vanished while or before it was read).
    pub fn process_gone(&self) -> bool {
        match self {
            Self::Read { source, .. } => {
                source.kind() == io::ErrorKind::NotFound
                    || source.raw_os_error() == Some(libc::ESRCH)
            }
            Self::NotListed { .. } => true,
            Self::Malformed { .. } => false,
        }
    }
}

/// The fields of `/proc/PID/stat` the checkers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessStat {
    /// `utime + stime` in nanoseconds (procfs gives it in clock ticks, the kernel's list in
    /// nanoseconds).
    pub cpu_ns: u64,
    /// `num_threads`.
    pub threads: u64,
    /// `starttime`, clock ticks after boot: a reused pid has another.
    pub start_time: u64,
}

/// Reads the proc files, reusing one buffer (this runs for every process under a policy every
/// second).
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    text: String,
    ns_per_tick: u64,
}

impl ProcReader {
    /// `root` is `/proc` in the agent.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            text: String::with_capacity(512),
            ns_per_tick: ns_per_tick(),
        }
    }

    fn read(&mut self, path: &Path) -> Result<(), SampleError> {
        self.text.clear();
        std::fs::File::open(path)
            .and_then(|mut file| file.read_to_string(&mut self.text))
            .map(drop)
            .map_err(|source| SampleError::Read {
                path: path.to_owned(),
                source,
            })
    }

    fn malformed(&self, path: PathBuf) -> SampleError {
        SampleError::Malformed {
            path,
            text: self.text.trim_end().to_owned(),
        }
    }

    /// `/proc/PID/stat`: utime(14) + stime(15), num_threads(20), starttime(22).
    pub fn process_stat(&mut self, pid: u32) -> Result<ProcessStat, SampleError> {
        let path = self.root.join(pid.to_string()).join("stat");
        self.read(&path)?;
        let parsed = split_stat(&self.text).and_then(|(_, fields)| {
            // Field 3 (state) is the first after the comm.
            let mut fields = fields.skip(11);
            let mut next = || fields.next()?.parse::<u64>().ok();
            let utime = next()?;
            let stime = next()?;
            let mut fields = fields.skip(4);
            let threads = fields.next()?.parse().ok()?;
            let start_time = fields.nth(1)?.parse().ok()?;
            Some(ProcessStat {
                cpu_ns: utime.checked_add(stime)?.checked_mul(self.ns_per_tick)?,
                threads,
                start_time,
            })
        });
        parsed.ok_or_else(|| self.malformed(path))
    }

    /// The first field of `/proc/loadavg`: the 1-minute load average.
    pub fn load_average(&mut self) -> Result<f64, SampleError> {
        let path = self.root.join("loadavg");
        self.read(&path)?;
        self.text
            .split_whitespace()
            .next()
            .and_then(|load| load.parse::<f64>().ok())
            .filter(|load| load.is_finite() && *load >= 0.0)
            .ok_or_else(|| self.malformed(path))
    }
}

/// What the agent's checker reads: every watched process in one read of the kernel's
/// process-CPU iterator (loaded at the first sample), or `/proc/PID/stat` per process when the
/// iterator cannot be loaded or fails (then for good, said once), and `/proc/loadavg`.
pub struct HostReadings {
    list: KernelList,
    proc: ProcReader,
}

enum KernelList {
    NotLoaded,
    Loaded(Box<ProcessCpuList>),
    Unusable,
}

impl HostReadings {
    pub fn new() -> Self {
        Self {
            list: KernelList::NotLoaded,
            proc: ProcReader::new("/proc"),
        }
    }

    /// Whether the processes are read from the kernel's list (after the first sample).
    pub fn reads_kernel_list(&self) -> bool {
        matches!(self.list, KernelList::Loaded(_))
    }

    /// Reads every process of `pids` once, in their order.
    pub fn process_stats(&mut self, pids: &[u32]) -> Vec<Result<ProcessStat, SampleError>> {
        if matches!(self.list, KernelList::NotLoaded) {
            self.list = match ProcessCpuList::load() {
                Ok(list) => KernelList::Loaded(Box::new(list)),
                Err(error) => {
                    warn!(
                        "continuous profiling reads each process's /proc/PID/stat instead of the \
                         kernel's process list ({:#}), which costs more CPU",
                        anyhow::Error::from(error)
                    );
                    KernelList::Unusable
                }
            };
        }
        if let KernelList::Loaded(list) = &mut self.list {
            match list.read(pids) {
                Ok(listed) => {
                    return pids
                        .iter()
                        .map(|&pid| {
                            listed
                                .get(&pid)
                                .map(|process| ProcessStat {
                                    cpu_ns: process.runtime_ns,
                                    threads: u64::from(process.threads),
                                    start_time: process.start_time,
                                })
                                .ok_or(SampleError::NotListed { pid })
                        })
                        .collect();
                }
                Err(error) => {
                    warn!(
                        "the kernel's process list failed, continuous profiling reads each \
                         process's /proc/PID/stat from now on: {:#}",
                        anyhow::Error::from(error)
                    );
                    self.list = KernelList::Unusable;
                }
            }
        }
        pids.iter()
            .map(|&pid| self.proc.process_stat(pid))
            .collect()
    }

    pub fn load_average(&mut self) -> Result<f64, SampleError> {
        self.proc.load_average()
    }
}

impl Default for HostReadings {
    fn default() -> Self {
        Self::new()
    }
}

/// One process's CPU use between consecutive samples, in % of one core: what it used lately,
/// not Rover's average over its whole life.
#[derive(Clone, Debug, Default)]
pub struct CpuUsage {
    previous: Option<(ProcessStat, Instant)>,
}

impl CpuUsage {
    /// The use since the previous sample; `None` for the first one, and when the pid now names
    /// another process or no time passed (the next sample starts from this one).
    pub fn update(&mut self, stat: ProcessStat, at: Instant) -> Option<f64> {
        let previous = self.previous.replace((stat, at));
        let (before, then) = previous?;
        if before.start_time != stat.start_time {
            return None;
        }
        let wall = at.checked_duration_since(then)?.as_secs_f64();
        let ns = stat.cpu_ns.checked_sub(before.cpu_ns)?;
        (wall > 0.0).then(|| ns as f64 / 1e9 / wall * 100.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A stat line as the kernel writes it, with a comm that has spaces and parentheses.
    fn stat_line(pid: u32, utime: u64, stime: u64, threads: u64, start: u64) -> String {
        format!(
            "{pid} (my (odd) app) S 1 {pid} {pid} 0 -1 4194560 1000 0 0 0 {utime} {stime} 0 0 \
             20 0 {threads} 0 {start} 1000000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 \
             0 17 1 0 0 0 0 0\n"
        )
    }

    fn fake_proc() -> tempfile::TempDir {
        tempfile::tempdir().expect("a temporary directory")
    }

    fn write_stat(root: &Path, pid: u32, line: &str) {
        let dir = root.join(pid.to_string());
        std::fs::create_dir_all(&dir).expect("create the pid directory");
        std::fs::write(dir.join("stat"), line).expect("write stat");
    }

    #[test]
    fn stat_fields_are_read_past_an_odd_comm() {
        let root = fake_proc();
        write_stat(root.path(), 123, &stat_line(123, 100, 50, 7, 999));
        let mut reader = ProcReader::new(root.path());
        assert_eq!(
            reader.process_stat(123).expect("readable"),
            ProcessStat {
                cpu_ns: 150 * ns_per_tick(),
                threads: 7,
                start_time: 999,
            }
        );
    }

    #[test]
    fn a_vanished_process_and_a_malformed_stat() {
        let root = fake_proc();
        let mut reader = ProcReader::new(root.path());
        let gone = reader.process_stat(9).expect_err("no such process");
        assert!(gone.process_gone(), "{gone}");
        write_stat(root.path(), 9, "9 (x) S 1 2 3\n");
        let short = reader.process_stat(9).expect_err("too few fields");
        assert!(!short.process_gone());
        assert!(
            short
                .to_string()
                .ends_with("/9/stat is not in the expected form: \"9 (x) S 1 2 3\""),
            "{short}"
        );
        write_stat(
            root.path(),
            9,
            &stat_line(9, 1, 1, 1, 1).replacen(" 1 1 0 0 20", " x 1 0 0 20", 1),
        );
        assert!(reader.process_stat(9).is_err());
    }

    #[test]
    fn cpu_use_is_the_cpu_time_delta_over_wall_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let ms = |ms: u64| ms * 1_000_000;
        let stat = |cpu_ns, start_time| ProcessStat {
            cpu_ns,
            threads: 1,
            start_time,
        };
        let mut usage = CpuUsage::default();
        assert_eq!(
            usage.update(stat(ms(10_000), 5), t0),
            None,
            "the first sample"
        );
        // 400 ms over 1 s: 40 % of a core.
        assert_eq!(usage.update(stat(ms(10_400), 5), t0 + s(1)), Some(40.0));
        // 3 s over 2 s: 1.5 cores.
        assert_eq!(usage.update(stat(ms(13_400), 5), t0 + s(3)), Some(150.0));
        assert_eq!(
            usage.update(stat(ms(13_400), 5), t0 + s(4)),
            Some(0.0),
            "idle"
        );
        assert_eq!(
            usage.update(stat(ms(13_500), 5), t0 + s(4)),
            None,
            "no time passed"
        );
        // The pid was reused: a new process, a new start.
        assert_eq!(usage.update(stat(ms(30), 77), t0 + s(5)), None);
        assert_eq!(usage.update(stat(ms(530), 77), t0 + s(6)), Some(50.0));
        // A clock going back or CPU time going back never panic.
        assert_eq!(usage.update(stat(ms(600), 77), t0 + s(2)), None);
        assert_eq!(usage.update(stat(ms(100), 77), t0 + s(9)), None);
        // Below a clock tick: the kernel's list counts nanoseconds.
        usage.update(stat(0, 1), t0);
        assert_eq!(usage.update(stat(2_500_000, 1), t0 + s(1)), Some(0.25));
    }

    /// SYSTEM_LOAD through an injected reading: a fake `/proc/loadavg`.
    #[test]
    fn load_average_is_the_first_field_of_loadavg() {
        let root = fake_proc();
        let mut reader = ProcReader::new(root.path());
        let missing = reader.load_average().expect_err("no file");
        assert!(missing.to_string().contains("loadavg"), "{missing}");
        let loadavg = root.path().join("loadavg");
        std::fs::write(&loadavg, "3.52 0.80 0.40 2/345 6789\n").expect("write");
        assert_eq!(reader.load_average().expect("readable"), 3.52);
        for bad in ["", "x 1 2", "-1 0 0", "NaN 1 1"] {
            std::fs::write(&loadavg, bad).expect("write");
            assert!(reader.load_average().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_real_proc_root_reads_this_host() {
        let mut reader = ProcReader::new("/proc");
        let me = reader
            .process_stat(std::process::id())
            .expect("this process");
        assert!(me.threads >= 1);
        assert!(reader.load_average().expect("the host's load") >= 0.0);
    }
}
