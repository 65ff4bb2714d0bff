//! Profiling windows → SkyWalking `EBPFProfilingData`, buffered (bounded in bytes, oldest dropped
//! first and counted) and sent each flush interval on one `collectProfilingData` stream.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use rover_proto::v3::{
    EbpfOffCpuProfiling, EbpfOnCpuProfiling, EbpfProfilingData, EbpfProfilingStackMetadata,
    EbpfProfilingStackType, EbpfProfilingTaskMetadata, ebpf_profiling_data,
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
pub struct WindowBatch {
    metadata: EbpfProfilingTaskMetadata,
    messages: VecDeque<EbpfProfilingData>,
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

/// Encodes one window of `task`: a batch per process (named by its OAP id from
/// `process_ids`), a message per stack. Samples of processes without an OAP id are left out.
pub fn encode_window(
    task: &UploadTask,
    process_ids: &HashMap<u32, String>,
    profile: &Profile,
) -> Vec<WindowBatch> {
    let window_end = profile.start + profile.duration;
    let current = window_end.clamp(task.profiling_start, task.end.max(task.profiling_start));
    let mut symbols: Vec<Option<String>> = vec![None; profile.frames().len()];
    let mut stack_ids: HashMap<(FrameKind, Vec<FrameId>), i32> = HashMap::new();
    let mut batches: Vec<WindowBatch> = Vec::new();
    let mut batch_of: HashMap<u32, usize> = HashMap::new();
    for sample in profile.samples() {
        let Some(process_id) = process_ids.get(&sample.process.pid) else {
            continue;
        };
        let index = *batch_of.entry(sample.process.pid).or_insert_with(|| {
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
            batches.len() - 1
        });
        let mut stacks = Vec::with_capacity(2);
        for kind in [FrameKind::Kernel, FrameKind::User] {
            // Leaf first: the sample is root first.
            let ids: Vec<FrameId> = sample
                .frames
                .iter()
                .rev()
                .copied()
                .filter(|&id| profile.frame(id).kind == kind)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let next_id = i32::try_from(stack_ids.len()).unwrap_or(i32::MAX);
            let stack_id = *stack_ids.entry((kind, ids.clone())).or_insert(next_id);
            let stack_symbols = ids
                .iter()
                .map(|&id| {
                    symbols[id as usize]
                        .get_or_insert_with(|| symbol(profile, id))
                        .clone()
                })
                .collect();
            stacks.push(EbpfProfilingStackMetadata {
                stack_type: match kind {
                    FrameKind::Kernel => EbpfProfilingStackType::ProcessKernelSpace,
                    FrameKind::User => EbpfProfilingStackType::ProcessUserSpace,
                } as i32,
                stack_id,
                stack_symbols,
            });
        }
        let count = clamp_i32(profile.estimate(0, sample.values[0], 1));
        let profiling = if task.off_cpu {
            ebpf_profiling_data::Profiling::OffCpu(EbpfOffCpuProfiling {
                stacks,
                switch_count: count,
                duration: i64::try_from(profile.estimate(1, sample.values[1], 1))
                    .unwrap_or(i64::MAX),
            })
        } else {
            ebpf_profiling_data::Profiling::OnCpu(EbpfOnCpuProfiling {
                stacks,
                dump_count: count,
            })
        };
        let message = EbpfProfilingData {
            task: None,
            profiling: Some(profiling),
        };
        let batch = &mut batches[index];
        batch.bytes += message.encoded_len();
        batch.messages.push_back(message);
    }
    batches
}

fn symbol(profile: &Profile, id: FrameId) -> String {
    let frame = profile.frame(id);
    match &frame.function {
        Some(function) => function.clone(),
        None => MISSING.to_owned(),
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

    /// The next message for a stream: the task metadata rides on the first message of a
    /// batch, so a batch cut by a failed stream starts again with it.
    fn next_message(&self, started: &mut bool) -> Option<EbpfProfilingData> {
        let mut queue = self.lock();
        let batch = queue.batches.front_mut()?;
        let mut message = batch.messages.pop_front()?;
        let bytes = message.encoded_len().min(batch.bytes);
        if !*started {
            message.task = Some(batch.metadata.clone());
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
        let result = self
            .backend
            .profiling()
            .collect_profiling_data(stream)
            .await;
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

    /// Waits for the flush interval or an early flush request, whichever comes first.
    pub async fn wait(buffer: &UploadBuffer, interval: Duration) {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = buffer.flush_now.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Frame, ProcessLabel, ValueType};

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
        let Some(ebpf_profiling_data::Profiling::OnCpu(on_cpu)) = &first.messages[0].profiling
        else {
            panic!("not on-CPU: {:?}", first.messages[0]);
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
            &batches[0].messages[0].profiling
        else {
            panic!("not off-CPU");
        };
        assert_eq!(off_cpu.switch_count, 10);
        assert_eq!(off_cpu.duration, 10_000);
    }

    fn batch(process_id: &str, messages: usize) -> WindowBatch {
        let message = EbpfProfilingData {
            task: None,
            profiling: Some(ebpf_profiling_data::Profiling::OnCpu(EbpfOnCpuProfiling {
                stacks: Vec::new(),
                dump_count: 1,
            })),
        };
        WindowBatch {
            metadata: EbpfProfilingTaskMetadata {
                task_id: "t".to_owned(),
                process_id: process_id.to_owned(),
                profiling_start_time: 1,
                current_time: 2,
            },
            bytes: message.encoded_len() * messages,
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
        let first = buffer.next_message(&mut started).expect("a message");
        assert_eq!(first.task.map(|task| task.process_id).as_deref(), Some("b"));
    }

    #[test]
    fn a_batch_cut_by_a_failed_stream_starts_again_with_its_task() {
        let buffer = UploadBuffer::new(usize::MAX);
        buffer.push(vec![batch("a", 3)]);
        let mut started = false;
        assert!(buffer.next_message(&mut started).unwrap().task.is_some());
        assert!(buffer.next_message(&mut started).unwrap().task.is_none());
        // The stream failed: the next one starts afresh.
        let mut started = false;
        let resumed = buffer.next_message(&mut started).unwrap();
        assert_eq!(
            resumed.task.map(|task| task.process_id).as_deref(),
            Some("a")
        );
        assert!(buffer.next_message(&mut started).is_none());
        assert_eq!(buffer.stats().batches_buffered, 0);
        assert_eq!(buffer.stats().bytes_buffered, 0);
    }
}
