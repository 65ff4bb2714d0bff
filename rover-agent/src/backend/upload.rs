//! Profiling windows laid out for SkyWalking (`profiling_data.rs`), buffered (bounded by their
//! encoded size, oldest dropped first and counted) and sent each flush interval on one
//! `collectProfilingData` stream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use rover_proto::v3::Commands;
use tokio::sync::Notify;

use super::profiling_data::{OutgoingMessage, WindowBatch};
use super::{Backend, Error};

/// What the buffer has done, for logs and the summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Messages of streams the OAP acknowledged.
    pub messages_sent: u64,
    /// Their encoded bytes.
    pub bytes_sent: u64,
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
            if batch.messages() > 0 {
                queue.bytes += batch.bytes();
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
            queue.bytes -= oldest.bytes();
            queue.stats.batches_dropped += 1;
            queue.stats.bytes_dropped += oldest.bytes() as u64;
        }
    }

    /// The next message for a stream: the task metadata rides on the first message of a batch,
    /// so a batch cut by a failed stream starts again with it.
    fn next_message(&self, started: &mut bool) -> Option<OutgoingMessage> {
        let mut queue = self.lock();
        let batch = queue.batches.front_mut()?;
        let bytes_before = batch.bytes();
        let message = batch.pop_message(!*started)?;
        *started = true;
        let sent_bytes = bytes_before - batch.bytes();
        if batch.messages() == 0 {
            queue.batches.pop_front();
            *started = false;
        }
        queue.bytes -= sent_bytes;
        queue.stats.messages_sent += 1;
        queue.stats.bytes_sent += sent_bytes as u64;
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
        let before = buffer.stats();
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
        let after = buffer.stats();
        let sent = after.messages_sent - before.messages_sent;
        if result.is_err() {
            let mut queue = buffer.lock();
            queue.stats.messages_sent -= sent;
            queue.stats.bytes_sent -= after.bytes_sent - before.bytes_sent;
            queue.stats.messages_lost_in_flight += sent;
        }
        self.backend
            .outcome("collectProfilingData", result)
            .map(|_| sent)
    }

    /// `collectProfilingData` with messages laid out already (the generated client would encode
    /// `EBPFProfilingData` values).
    async fn collect_profiling_data(
        &self,
        stream: impl futures_util::Stream<Item = OutgoingMessage> + Send + 'static,
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

/// Writes laid-out messages straight into the stream's buffer; decodes the reply with prost.
#[derive(Clone, Copy, Debug, Default)]
struct EncodedCodec;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = OutgoingMessage;
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
    type Item = OutgoingMessage;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: OutgoingMessage,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
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
    use std::collections::HashMap;
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::backend::profiling_data::{MISSING, UploadTask, encode_window};
    use crate::profile::{Frame, FrameKind, ProcessLabel, Profile, ValueType};
    use rover_proto::v3::{EbpfProfilingData, EbpfProfilingStackType, ebpf_profiling_data};

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

        let mut batches = encode_window(&task(false), &ids(), &profile);
        assert_eq!(batches.len(), 2);
        let first = &mut batches[0];
        assert_eq!(first.metadata.process_id, "p1");
        assert_eq!(first.metadata.profiling_start_time, 100_000);
        assert_eq!(first.metadata.current_time, 110_000);
        assert_eq!(first.messages(), 2);
        let message = decode(&first.pop_message(false).expect("a message").to_vec());
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
    fn a_stack_seen_again_keeps_its_id_and_distinct_stacks_get_their_own() {
        let mut profile = profile(vec![
            ValueType::new("samples", "count"),
            ValueType::new("cpu", "nanoseconds"),
        ]);
        let user = [
            frame(FrameKind::User, Some("main")),
            frame(FrameKind::User, Some("work")),
        ];
        let process = ProcessLabel {
            pid: 1,
            name: "a".to_owned(),
        };
        for kernel in ["read", "write"] {
            let mut stack = user.to_vec();
            stack.push(frame(FrameKind::Kernel, Some(kernel)));
            profile.add(&process, &stack, &[1, 10]);
        }
        profile.add(&process, &user[..1], &[1, 10]);
        let mut batches = encode_window(&task(false), &ids(), &profile);
        let ids: Vec<Vec<(i32, i32)>> = std::iter::from_fn(|| batches[0].pop_message(false))
            .map(|message| {
                let Some(ebpf_profiling_data::Profiling::OnCpu(on_cpu)) =
                    decode(&message.to_vec()).profiling
                else {
                    panic!("not on-CPU");
                };
                on_cpu
                    .stacks
                    .iter()
                    .map(|stack| (stack.stack_type, stack.stack_id))
                    .collect()
            })
            .collect();
        let (kernel, user) = (
            EbpfProfilingStackType::ProcessKernelSpace as i32,
            EbpfProfilingStackType::ProcessUserSpace as i32,
        );
        // Ids are shared by both kinds: kernel `read` 0, user `work main` 1, kernel `write` 2,
        // user `main` 3.
        assert_eq!(
            ids,
            [
                vec![(kernel, 0), (user, 1)],
                vec![(kernel, 2), (user, 1)],
                vec![(user, 3)],
            ]
        );
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
        let mut batches = encode_window(&task(true), &ids(), &profile);
        let message = batches[0].pop_message(false).expect("a message").to_vec();
        let Some(ebpf_profiling_data::Profiling::OffCpu(off_cpu)) = &decode(&message).profiling
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
                let message = message.to_vec();
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

    /// A batch of `messages` distinct one-frame stacks of one process.
    fn batch(process_id: &str, messages: usize) -> WindowBatch {
        let mut profile = profile(vec![
            ValueType::new("samples", "count"),
            ValueType::new("cpu", "nanoseconds"),
        ]);
        let process = ProcessLabel {
            pid: 1,
            name: "a".to_owned(),
        };
        for index in 0..messages {
            let name = format!("function_{index:03}");
            profile.add(&process, &[frame(FrameKind::User, Some(&name))], &[1, 10]);
        }
        let ids = HashMap::from([(1, process_id.to_owned())]);
        let mut batches = encode_window(&task(false), &ids, &profile);
        assert_eq!(batches.len(), 1);
        batches.remove(0)
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
        let first = decode(
            &buffer
                .next_message(&mut started)
                .expect("a message")
                .to_vec(),
        );
        assert_eq!(first.task.map(|task| task.process_id).as_deref(), Some("b"));
    }

    #[test]
    fn a_batch_cut_by_a_failed_stream_starts_again_with_its_task() {
        let buffer = UploadBuffer::new(usize::MAX);
        buffer.push(vec![batch("a", 3)]);
        let mut started = false;
        let next =
            |started: &mut bool| decode(&buffer.next_message(started).expect("a message").to_vec());
        assert!(next(&mut started).task.is_some());
        assert!(next(&mut started).task.is_none());
        // The stream failed: the next one starts afresh.
        let mut started = false;
        let resumed = next(&mut started);
        assert_eq!(
            resumed.task.map(|task| task.process_id).as_deref(),
            Some("a")
        );
        assert!(buffer.next_message(&mut started).is_none());
        assert_eq!(buffer.stats().batches_buffered, 0);
        assert_eq!(buffer.stats().bytes_buffered, 0);
    }
}
