//! rover-agent: an eBPF profiling node agent for Apache SkyWalking.
//!
//! Data flows `bpf` (kernel aggregates → raw stacks) → `symbolize` (addresses → frames) →
//! `profile` (data model, file exporters); `backend` talks to the SkyWalking OAP; `process` finds
//! the processes it is told of; `config` reads the node agent's file; `task` wires them
//! together (and serves the HTTP endpoint); `metrics` writes the self-metrics they count; `cli`
//! is the front end.

pub mod backend;
pub mod bpf;
pub mod cli;
pub mod config;
mod error_chain;
mod heap;
pub mod metrics;
pub mod process;
pub mod profile;
pub mod symbolize;
pub mod task;
