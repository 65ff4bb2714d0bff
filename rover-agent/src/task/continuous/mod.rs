//! Continuous profiling's checks: per process under a policy, the monitors' values are sampled
//! every `fetch_interval` into one-second windows, and a policy item fires when enough of its
//! window reaches the threshold.
//!
//! This is the checking half; the scheduler that polls policies, reports fired triggers and
//! starts their runs builds on it.

mod checker;
mod sampler;
mod window;

pub use checker::{Checker, Fired, Readings};
pub use sampler::{CpuUsage, ProcReader, ProcessStat, SampleError};
pub use window::CheckWindow;
