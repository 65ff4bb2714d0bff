//! The profile data model: symbolized stacks with their values, independent of where they came
//! from (eBPF maps) and where they go (files, the SkyWalking backend).

mod folded;
mod pprof;
mod svg;

use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

pub use folded::Folded;
pub use pprof::Pprof;
/// The pprof protobuf messages [`Pprof`] writes, for readers that decode its files (tests).
pub use pprof::proto as pprof_proto;
pub use svg::FlameGraphSvg;

/// Which side of the user/kernel boundary a frame runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FrameKind {
    User,
    Kernel,
}

/// One symbolized stack frame (an inlined function is a frame of its own).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    pub kind: FrameKind,
    /// Demangled function name; `None` when the address could not be symbolized.
    pub function: Option<String>,
    /// The binary the address belongs to (its path, `[kernel.kallsyms]`, `[vdso]`, ...), when known.
    pub module: Option<String>,
    /// Offset into `module` for user frames (file offset), the address for kernel frames.
    pub address: u64,
    /// Source file and line, when debug info has them.
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Whether this frame was inlined into its caller (the next frame towards the root).
    pub inlined: bool,
}

impl Frame {
    /// The frame as flame graphs show it: the function name, or `[unknown]` with module and
    /// offset so that misses stay attributable.
    pub fn display_name(&self) -> String {
        match (&self.function, &self.module) {
            (Some(function), _) => function.clone(),
            (None, Some(module)) => format!("[unknown] ({module}+{:#x})", self.address),
            (None, None) => format!("[unknown] ({:#x})", self.address),
        }
    }
}

/// The process a sample belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessLabel {
    pub pid: u32,
    /// The process name (`/proc/PID/comm`), or `pid-N` when it exited before it was seen.
    pub name: String,
}

/// What a sample value measures, in pprof's terms: `samples`/`count`, `cpu`/`nanoseconds`, ...
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueType {
    pub kind: String,
    pub unit: String,
}

impl ValueType {
    pub fn new(kind: &str, unit: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            unit: unit.to_owned(),
        }
    }
}

/// Index of a frame in [`Profile::frames`].
pub type FrameId = u32;

/// One distinct stack of one process, root first, with one value per [`Profile::value_types`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub process: ProcessLabel,
    pub frames: Vec<FrameId>,
    pub values: Vec<u64>,
}

/// Symbolized stacks and their values over one time range.
///
/// Values are kept as recorded. A value type may carry a scale (sampled off-CPU profiles record
/// one switch-out in 1/p and scale by 1/p): exporters and [`Profile::total`] apply it once, to
/// the sums they write, so that small per-stack values are not rounded before they add up.
#[derive(Clone, Debug)]
pub struct Profile {
    value_types: Vec<ValueType>,
    scales: Vec<f64>,
    /// The sampling period (e.g. `cpu`/`nanoseconds` and 1e9/frequency), if the profile samples.
    pub period: Option<(ValueType, u64)>,
    pub start: SystemTime,
    pub duration: Duration,
    /// Human-readable facts a reader needs (sampling probability, losses, ...); exporters that
    /// can carry comments do.
    pub notes: Vec<String>,
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, FrameId>,
    samples: Vec<Sample>,
    sample_ids: HashMap<(ProcessLabel, Vec<FrameId>), usize>,
}

impl Profile {
    pub fn new(value_types: Vec<ValueType>, start: SystemTime) -> Self {
        Self {
            scales: vec![1.0; value_types.len()],
            value_types,
            period: None,
            start,
            duration: Duration::ZERO,
            notes: Vec::new(),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            samples: Vec::new(),
            sample_ids: HashMap::new(),
        }
    }

    pub fn value_types(&self) -> &[ValueType] {
        &self.value_types
    }

    /// Every value of type `index` estimates `scale` times what was recorded.
    ///
    /// # Panics
    /// If `index` is not a value type: a programming error, not input.
    pub fn set_scale(&mut self, index: usize, scale: f64) {
        self.scales[index] = scale;
    }

    /// The estimate a recorded sum of value type `index` stands for, divided by `divisor` and
    /// rounded to nearest: the one rounding exporters do.
    pub fn estimate(&self, index: usize, recorded: u64, divisor: u64) -> u64 {
        let scale = self.scales[index];
        if scale == 1.0 {
            // Exact in integers (f64 would round sums above 2^53).
            let remainder = recorded % divisor;
            return recorded / divisor + u64::from(remainder >= divisor - remainder);
        }
        (recorded as f64 * scale / divisor as f64).round() as u64
    }

    /// Adds `values` to the stack `frames` (root first) of `process`, merging with an equal stack.
    ///
    /// # Panics
    /// If `values` does not have one entry per value type: a programming error, not input.
    pub fn add(&mut self, process: &ProcessLabel, frames: &[Frame], values: &[u64]) {
        assert_eq!(values.len(), self.value_types.len(), "one value per type");
        let ids: Vec<FrameId> = frames.iter().map(|frame| self.intern(frame)).collect();
        match self.sample_ids.get(&(process.clone(), ids.clone())) {
            Some(&index) => {
                for (sum, value) in self.samples[index].values.iter_mut().zip(values) {
                    *sum += value;
                }
            }
            None => {
                self.sample_ids
                    .insert((process.clone(), ids.clone()), self.samples.len());
                self.samples.push(Sample {
                    process: process.clone(),
                    frames: ids,
                    values: values.to_vec(),
                });
            }
        }
    }

    fn intern(&mut self, frame: &Frame) -> FrameId {
        if let Some(&id) = self.frame_ids.get(frame) {
            return id;
        }
        let id = FrameId::try_from(self.frames.len()).expect("fewer than 2^32 distinct frames");
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame.clone(), id);
        id
    }

    pub fn frame(&self, id: FrameId) -> &Frame {
        &self.frames[id as usize]
    }

    pub fn frames(&self) -> &[Frame] {
        &self.frames
    }

    /// Distinct stacks, in insertion order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The sum of value `index` over all samples, as recorded.
    pub fn recorded_total(&self, index: usize) -> u64 {
        self.samples.iter().map(|sample| sample.values[index]).sum()
    }

    /// The estimated total of value `index` (the recorded sum, scaled).
    pub fn total(&self, index: usize) -> u64 {
        self.estimate(index, self.recorded_total(index), 1)
    }
}

/// Writes a profile in one file format.
pub trait ProfileExporter {
    fn export(&self, profile: &Profile, out: &mut dyn Write) -> std::io::Result<()>;
}

/// Which value of a profile flame graphs and folded stacks are weighted by, and how it is
/// scaled for display (e.g. nanoseconds shown as microseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Weight {
    /// Index into [`Profile::value_types`].
    pub value_index: usize,
    /// Each value is divided by this (rounded to nearest) before it is written.
    pub divisor: u64,
    /// What one unit of the written value is, e.g. `samples` or `us`.
    pub unit_label: String,
}

/// Small hand-built profiles shared by the exporters' tests.
#[cfg(test)]
mod test_support {
    use super::*;

    pub(super) fn user(function: &str) -> Frame {
        Frame {
            kind: FrameKind::User,
            function: Some(function.to_owned()),
            module: Some("/usr/bin/app".to_owned()),
            address: 0x1000,
            file: None,
            line: None,
            inlined: false,
        }
    }

    pub(super) fn kernel(function: &str) -> Frame {
        Frame {
            kind: FrameKind::Kernel,
            function: Some(function.to_owned()),
            module: Some("[kernel.kallsyms]".to_owned()),
            address: 0xffff_ffff_8100_0000,
            file: None,
            line: None,
            inlined: false,
        }
    }

    pub(super) fn process(pid: u32, name: &str) -> ProcessLabel {
        ProcessLabel {
            pid,
            name: name.to_owned(),
        }
    }

    /// Values are (samples, cpu nanoseconds). Process `app` (pids 1 and 2) has a frame inlined
    /// into `run`, a kernel frame, an unknown frame and a name with `;`; process `db` one frame.
    pub(super) fn sample_profile() -> Profile {
        let mut profile = Profile::new(
            vec![
                ValueType::new("samples", "count"),
                ValueType::new("cpu", "nanoseconds"),
            ],
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        profile.duration = Duration::from_secs(10);
        profile.period = Some((ValueType::new("cpu", "nanoseconds"), 1_000));
        profile.notes.push("sampled at 1 kHz".to_owned());
        let run = Frame {
            address: 0x1234,
            file: Some("src/run.rs".to_owned()),
            line: Some(20),
            ..user("run")
        };
        let fill = Frame {
            function: Some("fill".to_owned()),
            file: Some("src/buf.rs".to_owned()),
            line: Some(7),
            inlined: true,
            ..run.clone()
        };
        let syscall = [user("main"), run, fill, kernel("do_syscall_64")];
        let unknown = Frame {
            function: None,
            address: 0x2a,
            ..user("")
        };
        let app = process(1, "app");
        profile.add(&app, &syscall, &[3, 3_000]);
        profile.add(&app, &[user("main"), unknown], &[1, 1_400]);
        profile.add(&app, &[user("main"), user("<[u8; 4]>::len")], &[1, 400]);
        // Another pid with the same name and stack: the same folded line.
        profile.add(&process(2, "app"), &syscall, &[2, 2_000]);
        profile.add(&process(3, "db"), &[user("query")], &[5, 5_500]);
        profile
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unscaled_estimates_divide_exactly_rounding_halves_up() {
        let profile = Profile::new(vec![ValueType::new("samples", "count")], SystemTime::now());
        assert_eq!(profile.estimate(0, 14, 10), 1);
        assert_eq!(profile.estimate(0, 15, 10), 2);
        assert_eq!(profile.estimate(0, 7, 1), 7);
        assert_eq!(profile.estimate(0, u64::MAX, 2), u64::MAX / 2 + 1);
    }

    #[test]
    fn scaled_estimates_round_once() {
        let mut profile =
            Profile::new(vec![ValueType::new("switches", "count")], SystemTime::now());
        profile.set_scale(0, 1.0 / 0.3);
        assert_eq!(profile.estimate(0, 1, 1), 3);
        assert_eq!(profile.estimate(0, 3, 1), 10);
        assert_eq!(profile.estimate(0, 3000, 1000), 10);
    }
}
