//! Raw kernel stacks → profile samples: symbolize while the processes live, fold root first.

use std::collections::HashMap;
use std::time::Instant;

use crate::bpf::{RawFrames, RawStack};
use crate::process;
use crate::profile::{Frame, FrameKind, ProcessLabel, Profile};
use crate::symbolize::Symbolizer;

pub(super) struct StackFolder {
    symbolizer: Symbolizer,
    labels: HashMap<u32, ProcessLabel>,
}

impl StackFolder {
    pub(super) fn new(symbolizer: Symbolizer) -> Self {
        Self {
            symbolizer,
            labels: HashMap::new(),
        }
    }

    /// Remembers the name and memory map of `pid` now, while it runs.
    pub(super) fn observe(&mut self, pid: u32) {
        self.label(pid);
        self.symbolizer.observe_process(pid);
    }

    pub(super) fn symbolizer(&self) -> &Symbolizer {
        &self.symbolizer
    }

    /// Forgets processes that exited more than the symbolizer's grace period ago.
    pub(super) fn retire_exited(&mut self) {
        self.symbolizer.retire_exited(Instant::now());
        let symbolizer = &self.symbolizer;
        self.labels.retain(|&pid, _| symbolizer.knows(pid));
    }

    /// Adds `values` to the symbolized stack of `raw`: process, user frames root first, then
    /// kernel frames root first.
    pub(super) fn add<V>(&mut self, profile: &mut Profile, raw: &RawStack<V>, values: &[u64]) {
        let label = self.label(raw.tgid);
        let mut frames = Vec::new();
        match &raw.user {
            RawFrames::Captured(addresses) => frames.extend(
                self.symbolizer
                    .user_frames(raw.tgid, addresses)
                    .into_iter()
                    .rev(),
            ),
            RawFrames::Lost => frames.push(lost(FrameKind::User)),
            RawFrames::Absent => {}
        }
        match &raw.kernel {
            RawFrames::Captured(addresses) => {
                frames.extend(self.symbolizer.kernel_frames(addresses).into_iter().rev())
            }
            RawFrames::Lost => frames.push(lost(FrameKind::Kernel)),
            RawFrames::Absent => {}
        }
        if raw.preempted {
            // Not kernel code: no kernel marking.
            frames.push(synthetic(FrameKind::User, "[preempted]"));
        }
        profile.add(&label, &frames, values);
    }

    fn label(&mut self, pid: u32) -> ProcessLabel {
        self.labels
            .entry(pid)
            .or_insert_with(|| process::label(pid))
            .clone()
    }
}

/// Stands for a stack the kernel could not store, so its samples still count where they belong.
fn lost(kind: FrameKind) -> Frame {
    let name = match kind {
        FrameKind::User => "[lost user stack]",
        FrameKind::Kernel => "[lost kernel stack]",
    };
    synthetic(kind, name)
}

/// A frame the agent adds to say something about the stack (not code at an address).
fn synthetic(kind: FrameKind, name: &str) -> Frame {
    Frame {
        kind,
        function: Some(name.to_owned()),
        module: None,
        address: 0,
        file: None,
        line: None,
        inlined: false,
    }
}
