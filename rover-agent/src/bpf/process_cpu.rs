//! The process-CPU iterator object: the CPU time, thread count and start time of the watched
//! processes, all in one read, for continuous profiling's checks every second (procfs costs a
//! `stat` file per process).

use std::collections::{HashMap, HashSet};

use aya::Ebpf;
use aya::maps::{HashMap as BpfHashMap, MapData};
use rover_common::{PROCESS_CPU_WATCHED_MAX, ProcessCpuRecord};

use super::profiler::take;
use super::{Error, kernel_btf, object, task_iter};
use crate::process::proc_files::ns_per_tick;

const OBJECT: &str = "process_cpu";
const PROGRAM: &str = "process_cpu";
const WATCHED_MAP: &str = "WATCHED";

/// A process as the kernel keeps it now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessCpu {
    /// CPU time of all its threads, those that exited included (what `stat`'s `utime + stime`
    /// add up to, in nanoseconds).
    pub runtime_ns: u64,
    pub threads: u32,
    /// Clock ticks after boot, as `stat`'s `starttime` (a reused pid has another).
    pub start_time: u64,
}

/// The loaded iterator and the processes it lists.
pub struct ProcessCpuList {
    ebpf: Ebpf,
    watched_map: BpfHashMap<MapData, u32, u8>,
    /// What `watched_map` holds.
    watched: HashSet<u32>,
    /// Nanoseconds per clock tick, the unit of `stat`'s start time.
    ns_per_tick: u64,
    chunk: Vec<u8>,
}

impl ProcessCpuList {
    /// Loads the iterator. Needs the agent's eBPF privileges and the kernel's BTF.
    pub fn load() -> Result<Self, Error> {
        super::privilege::require_privilege()?;
        let [
            pid,
            tgid,
            start_boottime,
            se,
            signal,
            sum_exec_runtime,
            sum_sched_runtime,
            nr_threads,
        ] = kernel_btf::member_offsets(&[
            ("task_struct", "pid"),
            ("task_struct", "tgid"),
            ("task_struct", "start_boottime"),
            ("task_struct", "se"),
            ("task_struct", "signal"),
            ("sched_entity", "sum_exec_runtime"),
            ("signal_struct", "sum_sched_runtime"),
            ("signal_struct", "nr_threads"),
        ])
        .map_err(Error::KernelLayout)?;
        let task_sum_exec_runtime = se
            .zip(sum_exec_runtime)
            .and_then(|(se, runtime)| se.checked_add(runtime));
        let mut ebpf = task_iter::load(
            OBJECT,
            object::process_cpu()?,
            PROGRAM,
            &[
                ("TASK_PID", pid),
                ("TASK_TGID", tgid),
                ("TASK_START_BOOTTIME", start_boottime),
                ("TASK_SUM_EXEC_RUNTIME", task_sum_exec_runtime),
                ("TASK_SIGNAL", signal),
                ("SIGNAL_SUM_SCHED_RUNTIME", sum_sched_runtime),
                ("SIGNAL_NR_THREADS", nr_threads),
            ],
        )?;
        let watched_map = take(&mut ebpf, OBJECT, WATCHED_MAP, BpfHashMap::try_from)?;
        Ok(Self {
            ebpf,
            watched_map,
            watched: HashSet::new(),
            ns_per_tick: ns_per_tick(),
            chunk: Vec::new(),
        })
    }

    /// The processes of `pids` that are alive, as the kernel keeps them now; a pid missing from
    /// the answer names no process. More than [`PROCESS_CPU_WATCHED_MAX`] pids is an error.
    pub fn read(&mut self, pids: &[u32]) -> Result<HashMap<u32, ProcessCpu>, Error> {
        self.watch(pids)?;
        let mut threads_runtime_ns: HashMap<u32, u64> = HashMap::with_capacity(pids.len());
        let mut leaders: HashMap<u32, ProcessCpu> = HashMap::with_capacity(pids.len());
        let ns_per_tick = self.ns_per_tick;
        // SAFETY: `ProcessCpuRecord` is what the program writes, integers only.
        unsafe {
            task_iter::run(
                &mut self.ebpf,
                OBJECT,
                PROGRAM,
                &mut self.chunk,
                Error::ProcessCpuList,
                |record: ProcessCpuRecord| {
                    if record.threads == 0 {
                        let sum = threads_runtime_ns.entry(record.tgid).or_default();
                        *sum = sum.saturating_add(record.runtime_ns);
                    } else {
                        leaders.insert(
                            record.tgid,
                            ProcessCpu {
                                runtime_ns: record.runtime_ns,
                                threads: record.threads,
                                start_time: record.start_boottime_ns / ns_per_tick,
                            },
                        );
                    }
                },
            )?;
        }
        // A process is its leader's record (a process whose leader thread exited keeps it, as a
        // zombie, until the last thread exits), plus its other threads' time.
        for (tgid, process) in &mut leaders {
            if let Some(runtime_ns) = threads_runtime_ns.get(tgid) {
                process.runtime_ns = process.runtime_ns.saturating_add(*runtime_ns);
            }
        }
        Ok(leaders)
    }

    /// Makes the kernel's set of watched processes `pids`.
    fn watch(&mut self, pids: &[u32]) -> Result<(), Error> {
        if pids.len() > PROCESS_CPU_WATCHED_MAX as usize {
            return Err(Error::ProcessCpuList(std::io::Error::other(format!(
                "{} processes to read, more than the {PROCESS_CPU_WATCHED_MAX} the iterator \
                 watches",
                pids.len()
            ))));
        }
        let wanted: HashSet<u32> = pids.iter().copied().collect();
        let gone: Vec<u32> = self.watched.difference(&wanted).copied().collect();
        for pid in gone {
            super::error::deleted(self.watched_map.remove(&pid)).map_err(|source| Error::Map {
                map: WATCHED_MAP,
                operation: "delete",
                source,
            })?;
            self.watched.remove(&pid);
        }
        for pid in wanted {
            if !self.watched.contains(&pid) {
                self.watched_map
                    .insert(pid, 1, 0)
                    .map_err(|source| Error::Map {
                        map: WATCHED_MAP,
                        operation: "update",
                        source,
                    })?;
                self.watched.insert(pid);
            }
        }
        Ok(())
    }
}
