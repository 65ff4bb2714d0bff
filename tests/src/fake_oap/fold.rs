//! What the OAP makes of received profiling data, without the agent's code: the stacks of a
//! task folded the way the OAP's analyzer builds them.
//!
//! - Within a stream, a message without `task` belongs to the task of the message before it; a
//!   leading message without one is counted in [`ReceivedStacks::without_task`] (the real OAP
//!   fails such a stream).
//! - A message's stack is built like the OAP's `parseSymbols`: the symbols of its `stacks` in
//!   wire order, each put at the front, so the result is the whole wire sequence reversed. Each
//!   stack's symbols are leaf first on the wire; with the kernel stack sent before the user stack
//!   (as Rover does) this gives, root first, the user frames then the kernel frames. An agent that
//!   sends them in the other order gets kernel frames at the root here, as in the OAP's UI.
//! - On-CPU value: `dumpCount`; off-CPU: `switchCount` and `duration` (ns). A negative count or
//!   duration is counted in [`ReceivedStacks::invalid`] and not added.

use std::collections::{BTreeMap, BTreeSet};

use rover_proto::v3::ebpf_profiling_data::Profiling;
use rover_proto::v3::{EbpfProfilingStackMetadata, EbpfProfilingTaskMetadata};

use super::ProfilingStream;

/// The value of one folded stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackValue {
    /// On-CPU `dumpCount` or off-CPU `switchCount`, summed.
    pub count: u64,
    /// Off-CPU `duration` in nanoseconds, summed (0 for on-CPU).
    pub duration_ns: u64,
}

/// Which value a folded line carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldValue {
    Count,
    DurationNs,
}

/// A task's stacks as the OAP would show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceivedStacks {
    /// `root;...;leaf` → value.
    pub by_stack: BTreeMap<String, StackValue>,
    /// Messages of the task that were folded.
    pub messages: usize,
    /// The process ids the task's messages carried.
    pub process_ids: BTreeSet<String>,
    /// The smallest and largest `currentTime` seen (ms).
    pub time_range: Option<(i64, i64)>,
    /// Messages before any `task` in their stream (in every stream, whatever the task).
    pub without_task: usize,
    /// Messages of the task with a negative count or duration.
    pub invalid: usize,
    /// Messages of the task with neither `onCPU` nor `offCPU`.
    pub without_profiling: usize,
}

impl ReceivedStacks {
    pub fn total_count(&self) -> u64 {
        self.by_stack.values().map(|value| value.count).sum()
    }

    pub fn total_duration_ns(&self) -> u64 {
        self.by_stack.values().map(|value| value.duration_ns).sum()
    }

    /// The value of `stack` (`root;...;leaf`), zero when absent.
    pub fn get(&self, stack: &str) -> StackValue {
        self.by_stack.get(stack).copied().unwrap_or_default()
    }

    /// The total count of the stacks with a frame satisfying `frame`.
    pub fn count_with_frame(&self, frame: impl Fn(&str) -> bool) -> u64 {
        self.by_stack
            .iter()
            .filter(|(stack, _)| stack.split(';').any(&frame))
            .map(|(_, value)| value.count)
            .sum()
    }

    /// Folded text, `root;...;leaf value` per line; empty stacks and zero values are left out.
    pub fn folded_text(&self, value: FoldValue) -> String {
        let mut text = String::new();
        for (stack, stack_value) in &self.by_stack {
            let value = match value {
                FoldValue::Count => stack_value.count,
                FoldValue::DurationNs => stack_value.duration_ns,
            };
            if !stack.is_empty() && value > 0 {
                text.push_str(&format!("{stack} {value}\n"));
            }
        }
        text
    }

    /// The counts as the suite's [`Folded`](crate::Folded).
    pub fn to_folded(&self) -> crate::Folded {
        crate::Folded::parse(&self.folded_text(FoldValue::Count))
    }
}

/// Folds every message received for `task_id` (and, when given, `process_id`) in `streams`.
pub fn fold_received(
    streams: &[ProfilingStream],
    task_id: &str,
    process_id: Option<&str>,
) -> ReceivedStacks {
    let mut folded = ReceivedStacks::default();
    for stream in streams {
        let mut task: Option<&EbpfProfilingTaskMetadata> = None;
        for message in &stream.messages {
            if let Some(metadata) = &message.task {
                task = Some(metadata);
            }
            let Some(task) = task else {
                folded.without_task += 1;
                continue;
            };
            if task.task_id != task_id || process_id.is_some_and(|id| id != task.process_id) {
                continue;
            }
            folded.messages += 1;
            folded.process_ids.insert(task.process_id.clone());
            folded.time_range = Some(match folded.time_range {
                None => (task.current_time, task.current_time),
                Some((low, high)) => (low.min(task.current_time), high.max(task.current_time)),
            });
            let (stacks, count, duration) = match &message.profiling {
                Some(Profiling::OnCpu(on)) => (&on.stacks, i64::from(on.dump_count), 0),
                Some(Profiling::OffCpu(off)) => {
                    (&off.stacks, i64::from(off.switch_count), off.duration)
                }
                None => {
                    folded.without_profiling += 1;
                    continue;
                }
            };
            let (Ok(count), Ok(duration_ns)) = (u64::try_from(count), u64::try_from(duration))
            else {
                folded.invalid += 1;
                continue;
            };
            let value = folded.by_stack.entry(oap_stack(stacks)).or_default();
            value.count += count;
            value.duration_ns += duration_ns;
        }
    }
    folded
}

/// The OAP's `parseSymbols`: every symbol put at the front, in wire order; joined root first.
fn oap_stack(stacks: &[EbpfProfilingStackMetadata]) -> String {
    let mut symbols: Vec<&str> = stacks
        .iter()
        .flat_map(|stack| stack.stack_symbols.iter().map(String::as_str))
        .collect();
    symbols.reverse();
    symbols.join(";")
}

/// Whether `stream` carried a message for `task_id`.
pub(super) fn stream_has_task(stream: &ProfilingStream, task_id: &str) -> bool {
    let mut current = None;
    stream.messages.iter().any(|message| {
        if let Some(task) = &message.task {
            current = Some(task.task_id.as_str());
        }
        current == Some(task_id)
    })
}
