//! The off-CPU profiler: `sched_switch` on the `sched_switch` BTF tracepoint.

use std::path::Path;
use std::time::Duration;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::BtfTracePoint;
use aya::programs::tp_btf::BtfTracePointLinkId;
use aya::{Btf, Ebpf};
use rover_common::{OffCpuThread, OffCpuValue};

use super::aggregates::{Aggregates, collect_keys, open_map, remove};
use super::loader::{Capacity, Loaded, load};
use super::target_filter::TargetFilter;
use super::{Counters, Error, RawStack, Targets, object};

const OBJECT: &str = "offcpu";
const PROGRAM: &str = "sched_switch";

/// How the off-CPU profiler runs.
#[derive(Clone, Debug, PartialEq)]
pub struct OffCpuConfig {
    pub targets: Targets,
    /// Leave out involuntary switches (preemption of a runnable thread).
    pub exclude_preempt: bool,
    /// Leave out episodes shorter than this.
    pub min_block: Duration,
    /// Probability (0 < p ≤ 1) that a switch-out is recorded; totals are scaled by 1/p.
    pub sample_probability: f64,
}

/// Off-CPU totals of one stack, scaled to estimate every episode when sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OffCpu {
    pub switches: u64,
    pub off_cpu_ns: u64,
}

/// Episodes that were still open (threads still switched out) when profiling stopped, and
/// stale ones removed while it ran (their thread vanished without being switched back in).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenEpisodes {
    pub open_at_stop: u64,
    pub stale_removed: u64,
}

/// A loaded, attached off-CPU profiler; dropping it detaches the program.
pub struct OffCpuProbe {
    aggregates: Aggregates<OffCpuValue>,
    targets: TargetFilter,
    threads: HashMap<MapData, u64, OffCpuThread>,
    counters: PerCpuArray<MapData, u64>,
    sample_probability: f64,
    link: Option<BtfTracePointLinkId>,
    episodes: OpenEpisodes,
    ebpf: Ebpf,
}

impl OffCpuProbe {
    pub fn start(config: &OffCpuConfig) -> Result<Self, Error> {
        let p = config.sample_probability;
        if !(p > 0.0 && p <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "sample probability {p} is not in (0, 1]"
            )));
        }
        let exclude_preempt: u8 = config.exclude_preempt.into();
        let min_block_ns = u64::try_from(config.min_block.as_nanos()).unwrap_or(u64::MAX);
        let sample_all: u8 = (p >= 1.0).into();
        // Kept when a uniform u32 is below p × 2^32.
        let threshold = (p * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32;
        // Episodes are unbounded in number: size for a host-wide profile or a few processes.
        let (capacity, threads) = match config.targets {
            Targets::All => (
                Capacity {
                    aggregates: 8192,
                    stacks: 8192,
                },
                65536,
            ),
            Targets::Pids(_) => (
                Capacity {
                    aggregates: 2048,
                    stacks: 4096,
                },
                8192,
            ),
        };
        let Loaded {
            mut ebpf,
            aggregates,
            targets,
            counters,
        } = load(
            OBJECT,
            object::offcpu()?,
            &config.targets,
            capacity,
            |loader| {
                loader
                    .override_global("EXCLUDE_PREEMPT", &exclude_preempt, true)
                    .override_global("MIN_BLOCK_NS", &min_block_ns, true)
                    .override_global("SAMPLE_ALL", &sample_all, true)
                    .override_global("SAMPLE_THRESHOLD", &threshold, true)
                    .map_max_entries("THREADS", threads);
            },
        )?;
        let threads = open_map(&mut ebpf, OBJECT, "THREADS", HashMap::try_from)?;
        let link = attach(&mut ebpf)?;
        Ok(Self {
            aggregates,
            targets,
            threads,
            counters,
            sample_probability: p,
            link: Some(link),
            episodes: OpenEpisodes::default(),
            ebpf,
        })
    }

    /// Starts profiling one more process.
    pub fn add_target(&mut self, pid: u32) -> Result<(), Error> {
        self.targets.add(pid)
    }

    /// Episodes closed since the previous drain, scaled by 1/p when sampling.
    pub fn drain(&mut self) -> Result<Vec<RawStack<OffCpu>>, Error> {
        let referenced = self.sweep_open_episodes()?;
        let raw = self.aggregates.drain(referenced)?;
        let p = self.sample_probability;
        Ok(raw
            .into_iter()
            .map(|stack| RawStack {
                tgid: stack.tgid,
                preempted: stack.preempted,
                user: stack.user,
                kernel: stack.kernel,
                value: scale(stack.value, p),
            })
            .collect())
    }

    /// The stacks of open episodes (which drains must keep), after removing the entries of
    /// threads that no longer exist (their last switch-out was missed).
    fn sweep_open_episodes(&mut self) -> Result<Vec<u64>, Error> {
        let mut referenced = Vec::new();
        for task in collect_keys(self.threads.keys(), "THREADS")? {
            let Ok(thread) = self.threads.get(&task, 0) else {
                continue; // the thread died meanwhile
            };
            if !Path::new(&format!("/proc/{}", thread.tid)).exists() {
                remove(self.threads.remove(&task), "THREADS")?;
                if thread.start_ns != 0 {
                    self.episodes.stale_removed += 1;
                }
                continue;
            }
            if thread.start_ns != 0 {
                referenced.push(thread.user_stack);
            }
        }
        Ok(referenced)
    }

    /// Detaches the program: nothing is recorded after this returns, so a following
    /// [`drain`](Self::drain) collects everything and the counters are final.
    pub fn stop(&mut self) -> Result<(), Error> {
        if let Some(link) = self.link.take() {
            program(&mut self.ebpf)?
                .detach(link)
                .map_err(|source| Error::Program {
                    program: PROGRAM,
                    source,
                })?;
        }
        Ok(())
    }

    /// After [`stop`](Self::stop): drops the per-thread state, counting the episodes still
    /// open (they have no end), and returns those counts.
    pub fn discard_open_episodes(&mut self) -> Result<OpenEpisodes, Error> {
        for task in collect_keys(self.threads.keys(), "THREADS")? {
            if self
                .threads
                .get(&task, 0)
                .is_ok_and(|thread| thread.start_ns != 0)
            {
                self.episodes.open_at_stop += 1;
            }
            remove(self.threads.remove(&task), "THREADS")?;
        }
        Ok(self.episodes)
    }

    /// Threads the kernel keeps state for: target threads that were switched out at least once
    /// and have not exited.
    pub fn tracked_threads(&self) -> Result<usize, Error> {
        Ok(collect_keys(self.threads.keys(), "THREADS")?.len())
    }

    /// Totals since the profiler started.
    pub fn counters(&self) -> Result<Counters, Error> {
        Counters::read(&self.counters)
    }
}

/// Estimates every episode from the kept ones: counts and post-capture time scale by 1/p, the
/// capture time (which only kept episodes spent) is added as measured.
fn scale(value: OffCpuValue, p: f64) -> OffCpu {
    if p >= 1.0 {
        return OffCpu {
            switches: value.switches,
            off_cpu_ns: value.off_cpu_ns + value.capture_ns,
        };
    }
    OffCpu {
        switches: (value.switches as f64 / p).round() as u64,
        off_cpu_ns: (value.off_cpu_ns as f64 / p).round() as u64 + value.capture_ns,
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut BtfTracePoint, Error> {
    super::loader::program(ebpf, OBJECT, PROGRAM)
}

fn attach(ebpf: &mut Ebpf) -> Result<BtfTracePointLinkId, Error> {
    // The program's BTF type is resolved against the kernel's: read it only now, and let it go.
    let btf = Btf::from_sys_fs().map_err(Error::KernelBtf)?;
    let program = program(ebpf)?;
    program
        .load("sched_switch", &btf)
        .map_err(|source| Error::Program {
            program: PROGRAM,
            source,
        })?;
    program.attach().map_err(|source| Error::AttachTracepoint {
        program: PROGRAM,
        tracepoint: "sched_switch (BTF)",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_totals_add_the_capture_time() {
        let value = OffCpuValue {
            switches: 3,
            off_cpu_ns: 3000,
            capture_ns: 30,
        };
        assert_eq!(
            scale(value, 1.0),
            OffCpu {
                switches: 3,
                off_cpu_ns: 3030
            }
        );
    }

    #[test]
    fn sampled_totals_scale_all_but_the_capture_time() {
        let value = OffCpuValue {
            switches: 10,
            off_cpu_ns: 10_000,
            capture_ns: 500,
        };
        assert_eq!(
            scale(value, 0.1),
            OffCpu {
                switches: 100,
                off_cpu_ns: 100_500
            }
        );
    }
}
