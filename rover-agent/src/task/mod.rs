//! Decides when stacks are drained, symbolized and folded into profiles: one runner per kind
//! of profile.

mod oncpu;
mod stacks;

pub use oncpu::{OnCpuRequest, profile_on_cpu};

use std::time::Duration;

use crate::bpf::Counters;
use crate::profile::Profile;
use crate::symbolize::SymbolizeStats;

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
}
