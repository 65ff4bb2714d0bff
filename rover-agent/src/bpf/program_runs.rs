//! Time the kernel spent in the agent's programs, as it counts it while
//! `kernel.bpf_stats_enabled` is 1 (the agent never turns it on: the count costs two clock
//! reads per program run).

use std::collections::BTreeMap;

use aya::Ebpf;
use tracing::debug;

const BPF_STATS_ENABLED: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Runs of one program and the time they took, summed over every load of its object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgramRuns {
    /// The embedded object (`oncpu`, `offcpu`, `events`).
    pub object: &'static str,
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// Whether the kernel counts program run time now; `false` when it cannot be read (an old
/// kernel, no procfs).
pub fn bpf_stats_enabled() -> bool {
    std::fs::read_to_string(BPF_STATS_ENABLED).is_ok_and(|value| value.trim() == "1")
}

/// Programs ever loaded, keyed by (object, program): what objects loaded earlier counted is
/// kept when they are unloaded, so the totals never go back.
#[derive(Debug, Default)]
pub(super) struct ProgramTotals {
    retired: BTreeMap<(&'static str, String), ProgramRuns>,
}

impl ProgramTotals {
    /// Keeps what the programs of `ebpf` counted; called before they are unloaded.
    pub fn retire(&mut self, object: &'static str, ebpf: &Ebpf) {
        for runs in read(object, ebpf) {
            add(&mut self.retired, runs);
        }
    }

    /// The retired totals plus what the programs loaded now counted.
    pub fn with_loaded<'a>(
        &self,
        loaded: impl IntoIterator<Item = (&'static str, &'a Ebpf)>,
    ) -> Vec<ProgramRuns> {
        let mut totals = self.retired.clone();
        for (object, ebpf) in loaded {
            for runs in read(object, ebpf) {
                add(&mut totals, runs);
            }
        }
        totals.into_values().collect()
    }
}

fn add(totals: &mut BTreeMap<(&'static str, String), ProgramRuns>, runs: ProgramRuns) {
    let total = totals
        .entry((runs.object, runs.program.clone()))
        .or_insert_with(|| ProgramRuns {
            object: runs.object,
            program: runs.program.clone(),
            ..ProgramRuns::default()
        });
    total.runs += runs.runs;
    total.run_time_ns += runs.run_time_ns;
}

/// The loaded programs of `ebpf` (those unloaded already have no information left).
fn read(object: &'static str, ebpf: &Ebpf) -> Vec<ProgramRuns> {
    ebpf.programs()
        .filter_map(|(name, program)| match program.info() {
            Ok(info) => Some(ProgramRuns {
                object,
                program: name.to_owned(),
                runs: info.run_count(),
                run_time_ns: u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
            }),
            Err(error) => {
                debug!(object, program = name, "no run statistics: {error}");
                None
            }
        })
        .collect()
}
