//! Profiling windows → SkyWalking `EBPFProfilingData` messages: a batch per process and window,
//! a message per stack.
//!
//! A window is laid out when it is queued (stack ids, every size, each frame's `stackSymbols`
//! entry encoded once per window) and written out only when a stream sends it. A window holds
//! tens of thousands of stacks of tens of frames: kept as frame ids it takes about a tenth of its
//! encoded size while it waits for the OAP, and its bytes are written once, into the stream.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use prost::bytes::BufMut;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use rover_proto::v3::{EbpfProfilingStackType, EbpfProfilingTaskMetadata};

use crate::profile::{FrameId, FrameKind, Profile};

/// What the OAP shows for a frame the agent could not symbolize (Rover's word for it).
pub(super) const MISSING: &str = "[MISSING]";

/// Field numbers of the SkyWalking messages (`Profile.proto`).
const DATA_TASK: u32 = 1;
const DATA_ON_CPU: u32 = 2;
const DATA_OFF_CPU: u32 = 3;
/// `stacks` of `EBPFOnCPUProfiling` and `EBPFOffCPUProfiling`; then `dumpCount`/`switchCount`
/// and `duration`.
const PROFILING_STACKS: u32 = 1;
const PROFILING_COUNT: u32 = 2;
const PROFILING_DURATION: u32 = 3;
/// Of `EBPFProfilingStackMetadata`.
const STACK_TYPE: u32 = 1;
const STACK_ID: u32 = 2;
const STACK_SYMBOLS: u32 = 3;

/// Which backend task a window belongs to, and its time bounds.
#[derive(Clone, Debug)]
pub struct UploadTask {
    pub task_id: String,
    /// When profiling actually started: constant for the run (the OAP's schedule id hashes it).
    pub profiling_start: SystemTime,
    /// The task's end; `currentTime` is kept inside [start, end].
    pub end: SystemTime,
    /// On-CPU (`dumpCount`) or off-CPU (`switchCount`, `duration`).
    pub off_cpu: bool,
}

/// One process's stacks of one window of a task: sent together, dropped together. The task
/// metadata goes on the first message of the batch that a stream carries.
pub struct WindowBatch {
    pub(super) metadata: EbpfProfilingTaskMetadata,
    window: Arc<WindowTables>,
    messages: VecDeque<MessageLayout>,
    /// The encoded size of the messages left (without the task metadata).
    bytes: usize,
}

impl WindowBatch {
    pub fn messages(&self) -> usize {
        self.messages.len()
    }

    /// Encoded size of its messages, without the task metadata.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the next message; `with_task` puts the batch's task metadata on it.
    pub(super) fn pop_message(&mut self, with_task: bool) -> Option<OutgoingMessage> {
        let layout = self.messages.pop_front()?;
        self.bytes = self.bytes.saturating_sub(layout.encoded_len());
        Some(OutgoingMessage {
            task: with_task.then(|| self.metadata.clone()),
            layout,
            window: Arc::clone(&self.window),
        })
    }
}

/// What a window's batches share.
struct WindowTables {
    off_cpu: bool,
    /// The `stackSymbols` entries (key, length, name) of the frames used, end to end.
    symbol_fields: Vec<u8>,
    /// Where each frame's entry is in `symbol_fields`, by frame id; empty when unused.
    symbols: Vec<(u32, u32)>,
    /// Each distinct stack's frame ids, leaf first, end to end.
    stack_frames: Vec<FrameId>,
}

#[derive(Clone, Copy, Debug)]
struct StackLayout {
    stack_type: i32,
    stack_id: i32,
    /// Its frames in `stack_frames`.
    frames: (u32, u32),
    /// Of its `EBPFProfilingStackMetadata`.
    length: u32,
}

#[derive(Clone, Copy, Debug)]
struct MessageLayout {
    /// Kernel stack first, then user.
    stacks: [Option<StackLayout>; 2],
    count: i32,
    duration: i64,
    /// Of the `onCPU`/`offCPU` message.
    profiling_length: u32,
}

impl MessageLayout {
    /// The encoded message without its task metadata.
    fn encoded_len(&self) -> usize {
        let length = self.profiling_length as usize;
        key_len(DATA_ON_CPU) + encoded_len_varint(length as u64) + length
    }
}

/// A message on its way into a stream.
pub struct OutgoingMessage {
    task: Option<EbpfProfilingTaskMetadata>,
    layout: MessageLayout,
    window: Arc<WindowTables>,
}

impl OutgoingMessage {
    /// Writes the message as prost writes the same `EBPFProfilingData`, byte for byte: fields
    /// in number order, zeros left out.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let tables = &*self.window;
        if let Some(task) = &self.task {
            encode_key(DATA_TASK, WireType::LengthDelimited, buf);
            encode_varint(task.encoded_len() as u64, buf);
            // A `BufMut` that runs out of room panics; every one used here grows.
            let _ = task.encode(buf);
        }
        let layout = &self.layout;
        let field = if tables.off_cpu {
            DATA_OFF_CPU
        } else {
            DATA_ON_CPU
        };
        encode_key(field, WireType::LengthDelimited, buf);
        encode_varint(u64::from(layout.profiling_length), buf);
        for stack in layout.stacks.iter().flatten() {
            encode_key(PROFILING_STACKS, WireType::LengthDelimited, buf);
            encode_varint(u64::from(stack.length), buf);
            put_scalar(STACK_TYPE, i64::from(stack.stack_type), buf);
            put_scalar(STACK_ID, i64::from(stack.stack_id), buf);
            let (start, end) = stack.frames;
            for &id in &tables.stack_frames[start as usize..end as usize] {
                let (from, to) = tables.symbols[id as usize];
                buf.put_slice(&tables.symbol_fields[from as usize..to as usize]);
            }
        }
        put_scalar(PROFILING_COUNT, i64::from(layout.count), buf);
        if tables.off_cpu {
            put_scalar(PROFILING_DURATION, layout.duration, buf);
        }
    }

    pub fn encoded_len(&self) -> usize {
        let task = self.task.as_ref().map_or(0, |task| {
            let length = task.encoded_len();
            key_len(DATA_TASK) + encoded_len_varint(length as u64) + length
        });
        task + self.layout.encoded_len()
    }

    #[cfg(test)]
    pub(super) fn to_vec(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode(&mut buf);
        assert_eq!(buf.len(), self.encoded_len());
        buf
    }
}

/// Lays out one window of `task`: a batch per process (named by its OAP id from
/// `process_ids`), a message per stack. Samples of processes without an OAP id are left out.
pub fn encode_window(
    task: &UploadTask,
    process_ids: &HashMap<u32, String>,
    profile: &Profile,
) -> Vec<WindowBatch> {
    let window_end = profile.start + profile.duration;
    let current = window_end.clamp(task.profiling_start, task.end.max(task.profiling_start));
    let is_kernel: Vec<bool> = profile
        .frames()
        .iter()
        .map(|frame| frame.kind == FrameKind::Kernel)
        .collect();
    let mut tables = WindowTables {
        off_cpu: task.off_cpu,
        symbol_fields: Vec::new(),
        symbols: vec![(0, 0); profile.frames().len()],
        stack_frames: Vec::new(),
    };
    // Stack ids are shared by kernel and user stacks: one counter. Distinct stacks are found by
    // a hash of their frame ids, checked against the frames kept.
    let mut stacks: HashMap<(usize, u64), StackLayout, BuildHasherDefault<PassHasher>> =
        HashMap::default();
    let mut next_stack_id: i32 = 0;
    let mut layouts: Vec<(EbpfProfilingTaskMetadata, VecDeque<MessageLayout>, usize)> = Vec::new();
    let mut batch_of: HashMap<u32, usize, BuildHasherDefault<PassHasher>> = HashMap::default();
    // Reused for every sample: the frame ids of one of its stacks, leaf first.
    let mut ids: Vec<FrameId> = Vec::new();
    for sample in profile.samples() {
        let Some(process_id) = process_ids.get(&sample.process.pid) else {
            continue;
        };
        let batch = *batch_of.entry(sample.process.pid).or_insert_with(|| {
            layouts.push((
                EbpfProfilingTaskMetadata {
                    task_id: task.task_id.clone(),
                    process_id: process_id.clone(),
                    profiling_start_time: epoch_ms(task.profiling_start),
                    current_time: epoch_ms(current),
                },
                VecDeque::new(),
                0,
            ));
            layouts.len() - 1
        });
        let mut message = MessageLayout {
            stacks: [None, None],
            count: clamp_i32(profile.estimate(0, sample.values[0], 1)),
            duration: i64::try_from(profile.estimate(1, sample.values[1], 1)).unwrap_or(i64::MAX),
            profiling_length: 0,
        };
        let mut length = 0;
        for (index, kernel) in [true, false].into_iter().enumerate() {
            // Leaf first: the sample is root first.
            ids.clear();
            ids.extend(
                sample
                    .frames
                    .iter()
                    .rev()
                    .copied()
                    .filter(|&id| is_kernel.get(id as usize) == Some(&kernel)),
            );
            if ids.is_empty() {
                continue;
            }
            let key = (index, hash_ids(&ids));
            let known = stacks.get(&key).filter(|stack| {
                let (start, end) = stack.frames;
                tables.stack_frames[start as usize..end as usize] == ids[..]
            });
            let stack = match known {
                Some(stack) => *stack,
                None => {
                    let stack = tables.add_stack(kernel, next_stack_id, &ids, profile);
                    next_stack_id = next_stack_id.saturating_add(1);
                    // A hash shared by two stacks (never seen in practice) keeps the first.
                    stacks.entry(key).or_insert(stack);
                    stack
                }
            };
            length += key_len(PROFILING_STACKS)
                + encoded_len_varint(u64::from(stack.length))
                + stack.length as usize;
            message.stacks[index] = Some(stack);
        }
        length += scalar_len(PROFILING_COUNT, i64::from(message.count));
        if task.off_cpu {
            length += scalar_len(PROFILING_DURATION, message.duration);
        }
        message.profiling_length = u32::try_from(length).unwrap_or(u32::MAX);
        let (_, messages, bytes) = &mut layouts[batch];
        *bytes += message.encoded_len();
        messages.push_back(message);
    }
    let tables = Arc::new(tables);
    layouts
        .into_iter()
        .map(|(metadata, messages, bytes)| WindowBatch {
            metadata,
            window: Arc::clone(&tables),
            messages,
            bytes,
        })
        .collect()
}

impl WindowTables {
    /// Keeps a new stack's frames (leaf first), encoding the symbols of frames not seen yet.
    fn add_stack(
        &mut self,
        kernel: bool,
        stack_id: i32,
        ids: &[FrameId],
        profile: &Profile,
    ) -> StackLayout {
        let stack_type = if kernel {
            EbpfProfilingStackType::ProcessKernelSpace
        } else {
            EbpfProfilingStackType::ProcessUserSpace
        } as i32;
        let mut length = scalar_len(STACK_TYPE, i64::from(stack_type))
            + scalar_len(STACK_ID, i64::from(stack_id));
        for &id in ids {
            let entry = &mut self.symbols[id as usize];
            if entry.1 == 0 {
                let start = self.symbol_fields.len();
                let name = profile.frame(id).function.as_deref().unwrap_or(MISSING);
                encode_key(
                    STACK_SYMBOLS,
                    WireType::LengthDelimited,
                    &mut self.symbol_fields,
                );
                encode_varint(name.len() as u64, &mut self.symbol_fields);
                self.symbol_fields.extend_from_slice(name.as_bytes());
                *entry = (offset(start), offset(self.symbol_fields.len()));
            }
            length += (entry.1 - entry.0) as usize;
        }
        let start = offset(self.stack_frames.len());
        self.stack_frames.extend_from_slice(ids);
        StackLayout {
            stack_type,
            stack_id,
            frames: (start, offset(self.stack_frames.len())),
            length: offset(length),
        }
    }
}

/// Offsets within one window's tables: a window of 4 GiB of frames is far beyond any map size.
fn offset(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

/// rustc's Fx hash over a stack's frame ids (ids of one window, not attacker-chosen).
fn hash_ids(ids: &[FrameId]) -> u64 {
    ids.iter().fold(0u64, |hash, &id| {
        (hash.rotate_left(5) ^ u64::from(id)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95)
    })
}

/// For keys that are hashes already (or small integers, pids): a multiply spreads them.
#[derive(Default)]
struct PassHasher(u64);

impl Hasher for PassHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    fn write_usize(&mut self, value: usize) {
        self.write_u64(value as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The size of an `int32`/`int64`/enum field of proto3: nothing when zero.
fn scalar_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value as u64)
    }
}

fn put_scalar(tag: u32, value: i64, buf: &mut impl BufMut) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value as u64, buf);
    }
}

fn clamp_i32(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn epoch_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    })
}
