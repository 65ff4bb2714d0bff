//! Decides when stacks are drained, symbolized and folded into profiles: one runner per kind
//! of profile.

mod offcpu;
mod oncpu;
mod run;
mod stacks;

pub use offcpu::{OffCpuRequest, profile_off_cpu};
pub use oncpu::{OnCpuRequest, profile_on_cpu};

use std::time::Duration;

use crate::bpf::{Counters, Targets};
use crate::profile::Profile;
use crate::symbolize::{SymbolizeStats, SymbolizerConfig};

/// What every profile run needs, whatever it records.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub targets: Targets,
    pub duration: Duration,
    /// How often the kernel aggregates are drained and symbolized.
    pub drain_interval: Duration,
    pub symbolizer: SymbolizerConfig,
}

/// Why a profiling run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The requested duration elapsed.
    Completed,
    /// A signal (named) asked the agent to stop early.
    Stopped(&'static str),
    /// Every target process exited.
    TargetsExited,
    /// Draining failed; the profile holds what was captured before.
    Failed(String),
}

/// A finished run: the profile and what the user should know about how it was taken.
#[derive(Debug)]
pub struct ProfileRun {
    pub profile: Profile,
    pub counters: Counters,
    pub symbolize: SymbolizeStats,
    pub elapsed: Duration,
    pub end: EndReason,
    pub details: RunDetails,
}

/// What is particular to each kind of profile.
#[derive(Clone, Debug, PartialEq)]
pub enum RunDetails {
    OnCpu { frequency_hz: u64 },
    OffCpu { sample_probability: f64 },
}
