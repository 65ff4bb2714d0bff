//! pprof files: a gzip-compressed `perftools.profiles.Profile` protobuf, read by `go tool pprof`,
//! Pyroscope, speedscope and others.

use std::collections::HashMap;
use std::io::{self, Write};
use std::time::{Duration, UNIX_EPOCH};

use flate2::Compression;
use flate2::write::GzEncoder;
use prost::Message;

use super::{Frame, FrameId, FrameKind, Profile, ProfileExporter, ValueType};

/// Writes every value type, sample labels `pid` (num) and `process` (str), and the notes as
/// comments.
///
/// Each location is one machine frame: a frame and those inlined into it (consecutive
/// `inlined` frames towards the leaf) share its location as several `line`s, innermost first,
/// as pprof expects. Mappings are per module with no address range, since frame addresses are
/// file offsets (`[kernel.kallsyms]` for kernel frames without one). Unknown frames are
/// function `[unknown]` at their address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pprof;

impl ProfileExporter for Pprof {
    fn export(&self, profile: &Profile, out: &mut dyn Write) -> io::Result<()> {
        let message = Builder::new().build(profile);
        let mut gzip = GzEncoder::new(out, Compression::default());
        gzip.write_all(&message.encode_to_vec())?;
        gzip.finish()?;
        Ok(())
    }
}

const KERNEL_MAPPING: &str = "[kernel.kallsyms]";

/// Builds the message, interning strings, functions, mappings and locations; ids are 1-based
/// positions in their lists.
struct Builder {
    out: proto::Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(i64, i64), u64>,
    mappings: HashMap<String, u64>,
    locations: HashMap<Vec<FrameId>, u64>,
}

impl Builder {
    fn new() -> Self {
        let mut builder = Self {
            out: proto::Profile::default(),
            strings: HashMap::new(),
            functions: HashMap::new(),
            mappings: HashMap::new(),
            locations: HashMap::new(),
        };
        builder.string(""); // string_table[0] must be "".
        builder
    }

    fn build(mut self, profile: &Profile) -> proto::Profile {
        for value_type in profile.value_types() {
            let value_type = self.value_type(value_type);
            self.out.sample_type.push(value_type);
        }
        if let Some((value_type, period)) = &profile.period {
            self.out.period_type = Some(self.value_type(value_type));
            self.out.period = int(*period);
        }
        self.out.time_nanos = profile.start.duration_since(UNIX_EPOCH).map_or(0, nanos);
        self.out.duration_nanos = nanos(profile.duration);
        for note in &profile.notes {
            let comment = self.string(note);
            self.out.comment.push(comment);
        }
        let (pid_key, process_key) = (self.string("pid"), self.string("process"));
        for sample in profile.samples() {
            // A frame starts a location unless it is inlined into the one before it.
            let location_id = sample
                .frames
                .chunk_by(|_, &next| profile.frame(next).inlined)
                .rev()
                .map(|frames| self.location(profile, frames))
                .collect();
            let label = vec![
                proto::Label {
                    key: pid_key,
                    num: sample.process.pid.into(),
                    ..Default::default()
                },
                proto::Label {
                    key: process_key,
                    str: self.string(&sample.process.name),
                    ..Default::default()
                },
            ];
            self.out.sample.push(proto::Sample {
                location_id,
                value: sample
                    .values
                    .iter()
                    .enumerate()
                    .map(|(index, &value)| int(profile.estimate(index, value, 1)))
                    .collect(),
                label,
            });
        }
        self.out
    }

    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = int(self.out.string_table.len() as u64);
        self.out.string_table.push(text.to_owned());
        self.strings.insert(text.to_owned(), index);
        index
    }

    fn value_type(&mut self, value_type: &ValueType) -> proto::ValueType {
        proto::ValueType {
            r#type: self.string(&value_type.kind),
            unit: self.string(&value_type.unit),
        }
    }

    /// The location of one machine frame: `frames` holds it and then the frames inlined into it.
    fn location(&mut self, profile: &Profile, frames: &[FrameId]) -> u64 {
        if let Some(&id) = self.locations.get(frames) {
            return id;
        }
        let outer = profile.frame(frames[0]);
        let mapping_id = self.mapping(outer);
        let mut line = Vec::with_capacity(frames.len());
        for &frame_id in frames.iter().rev() {
            let frame = profile.frame(frame_id);
            self.note_symbolization(mapping_id, frame);
            line.push(proto::Line {
                function_id: self.function(frame),
                line: frame.line.map_or(0, i64::from),
            });
        }
        let id = self.out.location.len() as u64 + 1;
        self.out.location.push(proto::Location {
            id,
            mapping_id,
            address: outer.address,
            line,
            is_folded: false,
        });
        self.locations.insert(frames.to_vec(), id);
        id
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let name = self.string(frame.function.as_deref().unwrap_or("[unknown]"));
        let filename = self.string(frame.file.as_deref().unwrap_or(""));
        let functions = &mut self.out.function;
        *self.functions.entry((name, filename)).or_insert_with(|| {
            let id = functions.len() as u64 + 1;
            functions.push(proto::Function {
                id,
                name,
                system_name: name,
                filename,
                start_line: 0,
            });
            id
        })
    }

    /// The mapping of `frame`'s module, or 0 (none) when the module is unknown.
    fn mapping(&mut self, frame: &Frame) -> u64 {
        let module = match (&frame.module, frame.kind) {
            (Some(module), _) => module.as_str(),
            (None, FrameKind::Kernel) => KERNEL_MAPPING,
            (None, FrameKind::User) => return 0,
        };
        if let Some(&id) = self.mappings.get(module) {
            return id;
        }
        let id = self.out.mapping.len() as u64 + 1;
        let filename = self.string(module);
        self.out.mapping.push(proto::Mapping {
            id,
            filename,
            ..Default::default()
        });
        self.mappings.insert(module.to_owned(), id);
        id
    }

    /// Records in the mapping what symbolization `frame` has, so that pprof does not try to
    /// symbolize its addresses again.
    fn note_symbolization(&mut self, mapping_id: u64, frame: &Frame) {
        let index = (mapping_id as usize).checked_sub(1);
        let Some(mapping) = index.and_then(|i| self.out.mapping.get_mut(i)) else {
            return; // No mapping: nothing to record.
        };
        mapping.has_functions |= frame.function.is_some();
        mapping.has_filenames |= frame.file.is_some();
        mapping.has_line_numbers |= frame.line.is_some();
        mapping.has_inline_frames |= frame.inlined;
    }
}

/// pprof's values are int64; ours never reach 2^63 in practice, so saturate.
fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// The messages of pprof's `profile.proto` (package `perftools.profiles`) that rover writes,
/// derived by hand with prost so that building needs no protoc; tags follow
/// <https://github.com/google/pprof/blob/main/proto/profile.proto>.
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// Leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
        #[prost(message, repeated, tag = "3")]
        pub label: Vec<Label>,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Label {
        #[prost(int64, tag = "1")]
        pub key: i64,
        #[prost(int64, tag = "2")]
        pub str: i64,
        #[prost(int64, tag = "3")]
        pub num: i64,
        #[prost(int64, tag = "4")]
        pub num_unit: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// Innermost inlined function first, the function of the machine frame last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, Copy, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::SystemTime;

    use flate2::read::GzDecoder;

    use super::*;
    use crate::profile::test_support::sample_profile;

    fn encode_decode(profile: &Profile) -> proto::Profile {
        let mut gzipped = Vec::new();
        Pprof
            .export(profile, &mut gzipped)
            .expect("export to memory");
        let mut encoded = Vec::new();
        GzDecoder::new(gzipped.as_slice())
            .read_to_end(&mut encoded)
            .expect("gzip");
        proto::Profile::decode(encoded.as_slice()).expect("a perftools.profiles.Profile")
    }

    /// A sample as text: its labels, values and frames leaf first as `function@mapping:line`,
    /// frames of one location joined by `+` (innermost first).
    fn render(pprof: &proto::Profile, sample: &proto::Sample) -> String {
        let string = |index: i64| {
            let index = usize::try_from(index).expect("non-negative string index");
            pprof.string_table[index].as_str()
        };
        let mut text = String::new();
        for label in &sample.label {
            let value = match label.str {
                0 => label.num.to_string(),
                index => string(index).to_owned(),
            };
            text += &format!("{}={value} ", string(label.key));
        }
        text += &format!("{:?}", sample.value);
        for &location_id in &sample.location_id {
            let location = find(&pprof.location, location_id, |l| l.id);
            let mapping = find(&pprof.mapping, location.mapping_id, |m| m.id);
            let lines: Vec<String> = location
                .line
                .iter()
                .map(|line| {
                    let function = find(&pprof.function, line.function_id, |f| f.id);
                    format!("{}:{}", string(function.name), line.line)
                })
                .collect();
            text += &format!(
                " {}@{}#{:#x}",
                lines.join("+"),
                string(mapping.filename),
                location.address
            );
        }
        text
    }

    /// The one element with `id`; ids are nonzero and unique.
    fn find<T>(items: &[T], id: u64, id_of: impl Fn(&T) -> u64) -> &T {
        assert_ne!(id, 0, "ids are nonzero");
        let mut matches = items.iter().filter(|item| id_of(item) == id);
        let item = matches.next().expect("referenced id exists");
        assert!(matches.next().is_none(), "id {id} is unique");
        item
    }

    #[test]
    fn pprof_round_trips() {
        let pprof = encode_decode(&sample_profile());
        let string = |index: i64| pprof.string_table[index as usize].as_str();
        assert_eq!(pprof.string_table[0], "");
        let types: Vec<(&str, &str)> = pprof
            .sample_type
            .iter()
            .map(|t| (string(t.r#type), string(t.unit)))
            .collect();
        assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
        let period_type = pprof.period_type.expect("period type");
        assert_eq!(
            (string(period_type.r#type), string(period_type.unit)),
            ("cpu", "nanoseconds")
        );
        assert_eq!(pprof.period, 1_000);
        assert_eq!(pprof.time_nanos, 1_700_000_000_000_000_000);
        assert_eq!(pprof.duration_nanos, 10_000_000_000);
        let comments: Vec<&str> = pprof.comment.iter().map(|&c| string(c)).collect();
        assert_eq!(comments, ["sampled at 1 kHz"]);

        let samples: Vec<String> = pprof.sample.iter().map(|s| render(&pprof, s)).collect();
        assert_eq!(
            samples,
            [
                "pid=1 process=app [3, 3000] do_syscall_64:0@[kernel.kallsyms]#0xffffffff81000000 \
                 fill:7+run:20@/usr/bin/app#0x1234 main:0@/usr/bin/app#0x1000",
                "pid=1 process=app [1, 1400] [unknown]:0@/usr/bin/app#0x2a \
                 main:0@/usr/bin/app#0x1000",
                "pid=1 process=app [1, 400] <[u8; 4]>::len:0@/usr/bin/app#0x1000 \
                 main:0@/usr/bin/app#0x1000",
                "pid=2 process=app [2, 2000] do_syscall_64:0@[kernel.kallsyms]#0xffffffff81000000 \
                 fill:7+run:20@/usr/bin/app#0x1234 main:0@/usr/bin/app#0x1000",
                "pid=3 process=db [5, 5500] query:0@/usr/bin/app#0x1000",
            ]
        );
        // Equal frames share a location, equal (name, file) a function.
        assert_eq!(pprof.location.len(), 6);
        assert_eq!(pprof.function.len(), 7);
        let app = pprof
            .mapping
            .iter()
            .find(|m| string(m.filename) == "/usr/bin/app")
            .expect("app mapping");
        assert!(app.has_functions && app.has_filenames && app.has_line_numbers);
        assert!(app.has_inline_frames);
        let files: Vec<&str> = pprof.function.iter().map(|f| string(f.filename)).collect();
        assert!(files.contains(&"src/buf.rs") && files.contains(&"src/run.rs"));
    }

    #[test]
    fn pprof_empty_profile() {
        let profile = Profile::new(vec![ValueType::new("samples", "count")], SystemTime::now());
        let pprof = encode_decode(&profile);
        assert_eq!(
            pprof.string_table,
            ["", "samples", "count", "pid", "process"]
        );
        assert_eq!(pprof.sample_type.len(), 1);
        assert!(pprof.sample.is_empty() && pprof.location.is_empty());
        assert!(pprof.function.is_empty() && pprof.mapping.is_empty());
    }
}
