//! rover-agent: an eBPF profiling node agent for Apache SkyWalking.
//!
//! Data flows `bpf` (kernel aggregates → raw stacks) → `symbolize` (addresses → frames) →
//! `profile` (data model, file exporters); `task` wires them together; `cli` is the front end;
//! `backend` turns what the SkyWalking OAP sends into typed values.

pub mod backend;
pub mod bpf;
pub mod cli;
pub mod config;
pub mod process;
pub mod profile;
pub mod symbolize;
pub mod task;
