//! Profiling windows → SkyWalking `EBPFProfilingData`, buffered (bounded in bytes, oldest dropped
//! first and counted) and sent each flush interval on one `collectProfilingData` stream.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use prost::bytes::Bytes;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
use rover_proto::v3::{
    Commands, EbpfProfilingStackMetadata, EbpfProfilingStackType, EbpfProfilingTaskMetadata,
};
use tokio::sync::Notify;

use super::{Backend, Error};
use crate::profile::{FrameId, FrameKind, Profile};

/// What the OAP shows for a frame the agent could not symbolize (Rover's word for it).
const MISSING: &str = "[MISSING]";

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
///
/// Messages are kept encoded (`EBPFProfilingData` without its task), slices of one buffer per
/// batch: a window holds tens of thousands of stacks of tens of frames, and a symbol string per
/// frame and message would cost as many allocations to build and to free as the window has
/// frames.
pub struct WindowBatch {
    metadata: EbpfProfilingTaskMetadata,
    messages: VecDeque<Bytes>,
    bytes: usize,
}

impl WindowBatch {
    pub fn messages(&self) -> usize {
        self.messages.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Field numbers of the SkyWalking messages written by hand (`Profile.proto`).
const DATA_TASK: u32 = 1;
const DATA_ON_CPU: u32 = 2;
const DATA_OFF_CPU: u32 = 3;
/// `stacks` of `EBPFOnCPUProfiling` and `EBPFOffCPUProfiling`.
const PROFILING_STACKS: u32 = 1;
const STACK_SYMBOLS: u32 = 3;

/// Encodes one window of `task`: a batch per process (named by its OAP id from
/// `process_ids`), a message per stack. Samples of processes without an OAP id are left out.
///
/// Each frame's `stackSymbols` entry is encoded once per window; a message is its stacks'
/// headers and those entries, written as protobuf's concatenation of fields (what prost
/// writes for the same message, byte for byte).
pub fn encode_window(
    task: &UploadTask,
    process_ids: &HashMap<u32, String>,
    profile: &Profile,
) -> Vec<WindowBatch> {
    let window_end = profile.start + profile.duration;
    let current = window_end.clamp(task.profiling_start, task.end.max(task.profiling_start));
    // Per frame, compact (a frame's full record is large, and each sample visits tens): whether
    // it is a kernel frame, and where its encoded `stackSymbols` entry is in `symbol_fields`
    // (encoded when first used; empty until then).
    let is_kernel: Vec<bool> = profile
        .frames()
        .iter()
        .map(|frame| frame.kind == FrameKind::Kernel)
        .collect();
    let mut symbol_fields: Vec<u8> = Vec::new();
    let mut symbols: Vec<std::ops::Range<usize>> = vec![0..0; profile.frames().len()];
    // Stack ids are shared by kernel and user stacks: one counter, a map per kind.
    let mut stack_ids: [HashMap<Vec<FrameId>, i32, BuildHasherDefault<FxHasher>>; 2] =
        Default::default();
    let mut next_stack_id: i32 = 0;
    let mut batches: Vec<WindowBatch> = Vec::new();
    // Each batch's messages, end to end, and where each ends; sliced once all are written.
    let mut encoded: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
    let mut batch_of: HashMap<u32, usize> = HashMap::new();
    // Reused for every sample: the frame ids of its kernel and user stacks.
    let mut ids: [Vec<FrameId>; 2] = [Vec::new(), Vec::new()];
    for sample in profile.samples() {
        let Some(process_id) = process_ids.get(&sample.process.pid) else {
            continue;
        };
        let batch_index = *batch_of.entry(sample.process.pid).or_insert_with(|| {
            batches.push(WindowBatch {
                metadata: EbpfProfilingTaskMetadata {
                    task_id: task.task_id.clone(),
                    process_id: process_id.clone(),
                    profiling_start_time: epoch_ms(task.profiling_start),
                    current_time: epoch_ms(current),
                },
                messages: VecDeque::new(),
                bytes: 0,
            });
            encoded.push((Vec::new(), Vec::new()));
            batches.len() - 1
        });
        // First the stacks' ids and sizes, then the message written straight into the batch.
        let mut stacks: [Option<(EbpfProfilingStackMetadata, usize)>; 2] = [None, None];
        let mut length = 0;
        for (index, kind) in [FrameKind::Kernel, FrameKind::User].into_iter().enumerate() {
            // Leaf first: the sample is root first.
            let ids = &mut ids[index];
            ids.clear();
            let kernel = kind == FrameKind::Kernel;
            ids.extend(
                sample
                    .frames
                    .iter()
                    .rev()
                    .copied()
                    .filter(|&id| is_kernel[id as usize] == kernel),
            );
            if ids.is_empty() {
                continue;
            }
            let known = &mut stack_ids[index];
            let stack_id = match known.get(ids.as_slice()) {
                Some(&id) => id,
                None => {
                    let id = next_stack_id;
                    next_stack_id = next_stack_id.saturating_add(1);
                    known.insert(ids.clone(), id);
                    id
                }
            };
            let header = EbpfProfilingStackMetadata {
                stack_type: match kind {
                    FrameKind::Kernel => EbpfProfilingStackType::ProcessKernelSpace,
                    FrameKind::User => EbpfProfilingStackType::ProcessUserSpace,
                } as i32,
                stack_id,
                stack_symbols: Vec::new(),
            };
            let mut stack_length = header.encoded_len();
            for &id in ids.iter() {
                let range = &mut symbols[id as usize];
                if range.end == 0 {
                    let start = symbol_fields.len();
                    put_symbol(profile, id, &mut symbol_fields);
                    *range = start..symbol_fields.len();
                }
                stack_length += range.len();
            }
            length +=
                key_len(PROFILING_STACKS) + encoded_len_varint(stack_length as u64) + stack_length;
            stacks[index] = Some((header, stack_length));
        }
        // The scalar fields after the stacks, as prost orders them (zeros left out).
        let count = clamp_i32(profile.estimate(0, sample.values[0], 1));
        let duration = i64::try_from(profile.estimate(1, sample.values[1], 1)).unwrap_or(i64::MAX);
        let field = if task.off_cpu {
            length += scalar_len(2, i64::from(count)) + scalar_len(3, duration);
            DATA_OFF_CPU
        } else {
            length += scalar_len(2, i64::from(count));
            DATA_ON_CPU
        };
        let (buffer, ends) = &mut encoded[batch_index];
        encode_key(field, WireType::LengthDelimited, buffer);
        encode_varint(length as u64, buffer);
        for (index, stack) in stacks.iter().enumerate() {
            let Some((header, stack_length)) = stack else {
                continue;
            };
            encode_key(PROFILING_STACKS, WireType::LengthDelimited, buffer);
            encode_varint(*stack_length as u64, buffer);
            put(header, buffer);
            for &id in &ids[index] {
                buffer.extend_from_slice(&symbol_fields[symbols[id as usize].clone()]);
            }
        }
        put_scalar(2, i64::from(count), buffer);
        if task.off_cpu {
            put_scalar(3, duration, buffer);
        }
        ends.push(buffer.len());
    }
    for (batch, (buffer, ends)) in batches.iter_mut().zip(encoded) {
        batch.bytes = buffer.len();
        let buffer = Bytes::from(buffer);
        let mut start = 0;
        batch.messages = ends
            .into_iter()
            .map(|end| {
                let message = buffer.slice(start..end);
                start = end;
                message
            })
            .collect();
    }
    batches
}

/// Appends a frame's entry of `stackSymbols`: key, length and name.
fn put_symbol(profile: &Profile, id: FrameId, buf: &mut Vec<u8>) {
    let name = profile.frame(id).function.as_deref().unwrap_or(MISSING);
    encode_key(STACK_SYMBOLS, WireType::LengthDelimited, buf);
    encode_varint(name.len() as u64, buf);
    buf.extend_from_slice(name.as_bytes());
}

/// The size of an `int32`/`int64` field of proto3: nothing when zero.
fn scalar_len(tag: u32, value: i64) -> usize {
    if value == 0 {
        0
    } else {
        key_len(tag) + encoded_len_varint(value as u64)
    }
}

fn put_scalar(tag: u32, value: i64, buf: &mut Vec<u8>) {
    if value != 0 {
        encode_key(tag, WireType::Varint, buf);
        encode_varint(value as u64, buf);
    }
}

/// A fast hash for the stack map's keys (frame ids of one window, not attacker-chosen):
/// rustc's Fx hash, a word at a time.
#[derive(Default)]
struct FxHasher(u64);

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.add(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.add(value);
    }

    fn write_usize(&mut self, value: usize) {
        self.add(value as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Appends `message`'s encoding (a `Vec` grows as needed: encoding into it cannot fail).
fn put(message: &impl Message, buf: &mut Vec<u8>) {
    let _ = message.encode(buf);
}

fn clamp_i32(value: u64) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn epoch_ms(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
    })
}

/// What the buffer has done, for logs and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Messages of streams the OAP acknowledged.
    pub messages_sent: u64,
    /// Batches (a process's window) dropped, oldest first, because the OAP could not take them
    /// in time and the buffer was full.
    pub batches_dropped: u64,
    pub bytes_dropped: u64,
    /// Messages handed to a stream that then failed: the OAP may or may not have them; they
    /// are not sent again (never counted twice).
    pub messages_lost_in_flight: u64,
    /// Waiting now.
    pub batches_buffered: usize,
    pub bytes_buffered: usize,
}

#[derive(Default)]
struct Queue {
    batches: VecDeque<WindowBatch>,
    bytes: usize,
    stats: UploadStats,
}

/// Windows waiting for the OAP, at most `bound_bytes` of them (encoded size).
pub struct UploadBuffer {
    queue: Mutex<Queue>,
    bound_bytes: usize,
    /// Wakes the uploader for a flush before its interval (a task ended, shutdown).
    flush_now: Notify,
}

impl UploadBuffer {
    pub fn new(bound_bytes: usize) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            bound_bytes,
            flush_now: Notify::new(),
        }
    }

    /// Queues a window's batches; drops the oldest batches beyond the bound.
    pub fn push(&self, batches: Vec<WindowBatch>) {
        let mut queue = self.lock();
        for batch in batches {
            if !batch.messages.is_empty() {
                queue.bytes += batch.bytes;
                queue.batches.push_back(batch);
            }
        }
        self.enforce_bound(&mut queue);
    }

    /// Asks the uploader to send what is queued now.
    pub fn flush_soon(&self) {
        self.flush_now.notify_one();
    }

    pub fn stats(&self) -> UploadStats {
        let queue = self.lock();
        UploadStats {
            batches_buffered: queue.batches.len(),
            bytes_buffered: queue.bytes,
            ..queue.stats
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic elsewhere while holding the lock leaves plain data: keep using it.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn enforce_bound(&self, queue: &mut Queue) {
        while queue.bytes > self.bound_bytes {
            let Some(oldest) = queue.batches.pop_front() else {
                break;
            };
            queue.bytes -= oldest.bytes;
            queue.stats.batches_dropped += 1;
            queue.stats.bytes_dropped += oldest.bytes as u64;
        }
    }

    /// The next message for a stream, encoded: the task metadata rides on the first message
    /// of a batch, so a batch cut by a failed stream starts again with it.
    fn next_message(&self, started: &mut bool) -> Option<Bytes> {
        let mut queue = self.lock();
        let batch = queue.batches.front_mut()?;
        let mut message = batch.messages.pop_front()?;
        let bytes = message.len().min(batch.bytes);
        if !*started {
            // Field 1 before the profiling field, as prost writes it.
            let metadata = batch.metadata.encoded_len();
            let mut with_task = Vec::with_capacity(
                key_len(DATA_TASK) + encoded_len_varint(metadata as u64) + metadata + message.len(),
            );
            encode_key(DATA_TASK, WireType::LengthDelimited, &mut with_task);
            encode_varint(metadata as u64, &mut with_task);
            put(&batch.metadata, &mut with_task);
            with_task.extend_from_slice(&message);
            message = Bytes::from(with_task);
            *started = true;
        }
        batch.bytes -= bytes;
        if batch.messages.is_empty() {
            queue.batches.pop_front();
            *started = false;
        }
        queue.bytes -= bytes;
        queue.stats.messages_sent += 1;
        Some(message)
    }
}

/// Sends the buffer's windows to the OAP.
pub struct Uploader {
    backend: Backend,
}

impl Uploader {
    pub fn new(backend: Backend) -> Self {
        Self { backend }
    }

    /// Sends what is queued on one stream. The stream takes messages from the buffer as gRPC
    /// sends them, so an OAP that cannot be reached takes nothing, and one that fails mid-way
    /// leaves the rest queued.
    pub async fn flush(&self, buffer: &Arc<UploadBuffer>) -> Result<u64, Error> {
        let queued = buffer.stats().batches_buffered;
        if queued == 0 {
            return Ok(0);
        }
        let sent_before = buffer.stats().messages_sent;
        // Only what is queued now: windows arriving during the send wait for the next flush.
        let mut remaining_batches = queued;
        let mut started = false;
        let source = Arc::clone(buffer);
        let stream = futures_util::stream::poll_fn(move |_| {
            if remaining_batches == 0 {
                return std::task::Poll::Ready(None);
            }
            let message = source.next_message(&mut started);
            if message.is_some() && !started {
                remaining_batches -= 1;
            }
            std::task::Poll::Ready(message)
        });
        let result = self.collect_profiling_data(stream).await;
        let sent = buffer.stats().messages_sent - sent_before;
        match result {
            Ok(_) => Ok(sent),
            Err(status) => {
                let mut queue = buffer.lock();
                queue.stats.messages_sent -= sent;
                queue.stats.messages_lost_in_flight += sent;
                Err(Error::call("collectProfilingData", &self.backend, status))
            }
        }
    }

    /// `collectProfilingData` with messages encoded already (the generated client would encode
    /// `EBPFProfilingData` values).
    async fn collect_profiling_data(
        &self,
        stream: impl futures_util::Stream<Item = Bytes> + Send + 'static,
    ) -> Result<tonic::Response<Commands>, tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.backend.channel());
        grpc.ready()
            .await
            .map_err(|error| tonic::Status::unknown(format!("Service was not ready: {error}")))?;
        let mut request = tonic::Request::new(stream);
        request.extensions_mut().insert(tonic::GrpcMethod::new(
            "skywalking.v3.EBPFProfilingService",
            "collectProfilingData",
        ));
        let path = tonic::codegen::http::uri::PathAndQuery::from_static(
            "/skywalking.v3.EBPFProfilingService/collectProfilingData",
        );
        grpc.client_streaming(request, path, EncodedCodec).await
    }

    /// Waits for the flush interval or an early flush request, whichever comes first.
    pub async fn wait(buffer: &UploadBuffer, interval: Duration) {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = buffer.flush_now.notified() => {}
        }
    }
}

/// Sends messages encoded already; decodes the reply with prost.
#[derive(Clone, Copy, Debug, Default)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = Commands;
    type Encoder = EncodedCodec;
    type Decoder = EncodedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for EncodedCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedCodec {
    type Item = Commands;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Commands>, tonic::Status> {
        Commands::decode(src)
            .map(Some)
            .map_err(|error| tonic::Status::internal(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, ProcessLabel, ValueType};
    use rover_proto::v3::{EbpfOnCpuProfiling, EbpfProfilingData, ebpf_profiling_data};

    /// A message as the OAP reads it.
    fn decode(message: &[u8]) -> EbpfProfilingData {
        EbpfProfilingData::decode(message).expect("a valid EBPFProfilingData")
    }

    fn frame(kind: FrameKind, function: Option<&str>) -> Frame {
        Frame {
            kind,
            function: function.map(str::to_owned),
            module: Some("m".to_owned()),
            address: 1,
            file: None,
            line: None,
            inlined: false,
        }
    }

    fn task(off_cpu: bool) -> UploadTask {
        UploadTask {
            task_id: "t1".to_owned(),
            profiling_start: UNIX_EPOCH + Duration::from_secs(100),
            end: UNIX_EPOCH + Duration::from_secs(110),
            off_cpu,
        }
    }

    fn profile(value_types: Vec<ValueType>) -> Profile {
        let mut profile = Profile::new(value_types, UNIX_EPOCH + Duration::from_secs(105));
        // Ends after the task: currentTime is clamped to the task's end.
        profile.duration = Duration::from_secs(30);
        profile
    }

    fn ids() -> HashMap<u32, String> {
        HashMap::from([(1, "p1".to_owned()), (2, "p2".to_owned())])
    }

    #[test]
    fn stacks_go_leaf_first_split_by_space_with_the_task_on_each_batch() {
        let mut profile = profile(vec![
            ValueType::new("samples", "count"),
            ValueType::new("cpu", "nanoseconds"),
        ]);
        let stack = [
            frame(FrameKind::User, Some("main")),
            frame(FrameKind::User, None),
            frame(FrameKind::User, Some("leaf")),
            frame(FrameKind::Kernel, Some("entry")),
            frame(FrameKind::Kernel, Some("do_work")),
        ];
        let one = ProcessLabel {
            pid: 1,
            name: "a".to_owned(),
        };
        profile.add(&one, &stack, &[3, 30]);
        profile.add(&one, &stack[..2], &[1, 10]);
        let other = ProcessLabel {
            pid: 2,
            name: "b".to_owned(),
        };
        profile.add(&other, &stack[..1], &[2, 20]);
        // Not a process of the task.
        let stranger = ProcessLabel {
            pid: 3,
            name: "c".to_owned(),
        };
        profile.add(&stranger, &stack[..1], &[9, 90]);

        let batches = encode_window(&task(false), &ids(), &profile);
        assert_eq!(batches.len(), 2);
        let first = &batches[0];
        assert_eq!(first.metadata.process_id, "p1");
        assert_eq!(first.metadata.profiling_start_time, 100_000);
        assert_eq!(first.metadata.current_time, 110_000);
        assert_eq!(first.messages(), 2);
        let message = decode(&first.messages[0]);
        let Some(ebpf_profiling_data::Profiling::OnCpu(on_cpu)) = &message.profiling else {
            panic!("not on-CPU: {message:?}");
        };
        assert_eq!(on_cpu.dump_count, 3);
        let kernel = &on_cpu.stacks[0];
        assert_eq!(
            kernel.stack_type,
            EbpfProfilingStackType::ProcessKernelSpace as i32
        );
        assert_eq!(kernel.stack_symbols, ["do_work", "entry"]);
        let user = &on_cpu.stacks[1];
        assert_eq!(
            user.stack_type,
            EbpfProfilingStackType::ProcessUserSpace as i32
        );
        assert_eq!(user.stack_symbols, ["leaf", MISSING, "main"]);
        assert_eq!(batches[1].metadata.process_id, "p2");
    }

    #[test]
    fn off_cpu_values_are_scaled_once_per_stack() {
        let mut profile = profile(vec![
            ValueType::new("switches", "count"),
            ValueType::new("off_cpu", "nanoseconds"),
        ]);
        profile.set_scale(0, 1.0 / 0.3);
        profile.set_scale(1, 1.0 / 0.3);
        let one = ProcessLabel {
            pid: 1,
            name: "a".to_owned(),
        };
        profile.add(&one, &[frame(FrameKind::User, Some("sleep"))], &[3, 3_000]);
        let batches = encode_window(&task(true), &ids(), &profile);
        let Some(ebpf_profiling_data::Profiling::OffCpu(off_cpu)) =
            &decode(&batches[0].messages[0]).profiling
        else {
            panic!("not off-CPU");
        };
        assert_eq!(off_cpu.switch_count, 10);
        assert_eq!(off_cpu.duration, 10_000);
    }

    #[test]
    fn messages_are_encoded_as_prost_encodes_them() {
        for off_cpu in [false, true] {
            let mut profile = profile(vec![
                ValueType::new("switches", "count"),
                ValueType::new("off_cpu", "nanoseconds"),
            ]);
            let long = "x".repeat(300);
            let stack = [
                frame(FrameKind::User, Some("main")),
                frame(FrameKind::User, Some(long.as_str())),
                frame(FrameKind::User, None),
                frame(FrameKind::Kernel, Some("do_syscall_64")),
            ];
            let one = ProcessLabel {
                pid: 1,
                name: "a".to_owned(),
            };
            profile.add(&one, &stack, &[3, 3_000]);
            profile.add(&one, &stack[..1], &[0, 0]);
            profile.add(&one, &stack[2..], &[1, 1 << 40]);
            let buffer = UploadBuffer::new(usize::MAX);
            buffer.push(encode_window(&task(off_cpu), &ids(), &profile));
            let mut started = false;
            let mut count = 0;
            while let Some(message) = buffer.next_message(&mut started) {
                assert_eq!(
                    message,
                    decode(&message).encode_to_vec(),
                    "off_cpu={off_cpu}"
                );
                count += 1;
            }
            assert_eq!(count, 3);
        }
    }

    fn batch(process_id: &str, messages: usize) -> WindowBatch {
        let message = EbpfProfilingData {
            task: None,
            profiling: Some(ebpf_profiling_data::Profiling::OnCpu(EbpfOnCpuProfiling {
                stacks: Vec::new(),
                dump_count: 1,
            })),
        }
        .encode_to_vec();
        let message = Bytes::from(message);
        WindowBatch {
            metadata: EbpfProfilingTaskMetadata {
                task_id: "t".to_owned(),
                process_id: process_id.to_owned(),
                profiling_start_time: 1,
                current_time: 2,
            },
            bytes: message.len() * messages,
            messages: std::iter::repeat_n(message, messages).collect(),
        }
    }

    #[test]
    fn a_full_buffer_drops_the_oldest_batches_and_counts_them() {
        let size = batch("a", 10).bytes();
        let buffer = UploadBuffer::new(size * 2);
        buffer.push(vec![batch("a", 10)]);
        buffer.push(vec![batch("b", 10), batch("c", 10)]);
        let stats = buffer.stats();
        assert_eq!(stats.batches_dropped, 1);
        assert_eq!(stats.bytes_dropped, size as u64);
        assert_eq!(stats.batches_buffered, 2);
        let mut started = false;
        let first = decode(&buffer.next_message(&mut started).expect("a message"));
        assert_eq!(first.task.map(|task| task.process_id).as_deref(), Some("b"));
    }

    #[test]
    fn a_batch_cut_by_a_failed_stream_starts_again_with_its_task() {
        let buffer = UploadBuffer::new(usize::MAX);
        buffer.push(vec![batch("a", 3)]);
        let mut started = false;
        assert!(
            decode(&buffer.next_message(&mut started).unwrap())
                .task
                .is_some()
        );
        assert!(
            decode(&buffer.next_message(&mut started).unwrap())
                .task
                .is_none()
        );
        // The stream failed: the next one starts afresh.
        let mut started = false;
        let resumed = decode(&buffer.next_message(&mut started).unwrap());
        assert_eq!(
            resumed.task.map(|task| task.process_id).as_deref(),
            Some("a")
        );
        assert!(buffer.next_message(&mut started).is_none());
        assert_eq!(buffer.stats().batches_buffered, 0);
        assert_eq!(buffer.stats().bytes_buffered, 0);
    }
}
