//! Continuous profiling's checks: per process under a policy, the monitors' values are sampled
//! every `fetch_interval` into one-second windows, and a policy item fires when enough of its
//! window reaches the threshold.
//!
//! The scheduler polls the policies, keeps the checker's processes those of the services with
//! a policy, reports fired triggers and runs them on the shared agent.

mod checker;
mod policies;
mod sampler;
mod scheduler;
mod triggers;
mod window;

pub use checker::{Checker, Fired, Readings};
pub use sampler::{CpuUsage, HostReadings, ProcReader, ProcessStat, SampleError};
pub(crate) use scheduler::{ContinuousConfig, Scheduler};
pub use window::CheckWindow;
