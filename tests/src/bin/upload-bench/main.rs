//! The node agent's upload path and its idle cost, for `cargo xtask bench upload`. Prints one
//! `key=value` result line per measurement on stdout for the bench to read (progress goes to
//! stderr); timing and memory targets are the bench's business, never asserted here.
//!
//! - `upload-bench flush [--iterations N] [--warmup N]`: one window of 10,000 distinct stacks of
//!   depth 30 over 50 processes (already symbolized), encoded with `encode_window`, queued in an
//!   `UploadBuffer` and sent by `Uploader::flush` on loopback to a gRPC sink in another process
//!   (`upload-bench oap`) until it replied; N times after a warm-up. Checks, untimed, that the
//!   sink received every message of every flush and that each decodes. Prints
//!   `flush ...` with the median and max time and the sizes.
//! - `upload-bench idle --agent PATH [--processes 500] [--seconds 60]`: 500 sleeping processes
//!   named `rover-bench-idle-N`, the fake OAP, and `rover-agent run` with a host rule matching
//!   them and Rover's default periods. Prints `ready agent_pid=PID ...` once the fake has all of
//!   them reported and kept alive once (startup over), stays idle SECONDS, prints `done ...`, and
//!   once its stdin closes (the bench samples the agent's /proc at both lines) stops everything
//!   it started (also on error: guards).
//!   With `--policy` (`cargo xtask bench continuous`), the fake OAP gives the processes' service
//!   a continuous-profiling policy with one item of each sampled monitor (PROCESS_CPU,
//!   PROCESS_THREAD_COUNT, SYSTEM_LOAD) at thresholds an idle host never reaches: every process
//!   is sampled every second and checked, none fires. `ready` then also waits for a meter of
//!   every process (each one sampled), and `done` counts the meters and triggers.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use integration_tests::cpu_time::{own_cpu, process_cpu};
use integration_tests::fake_oap::{FakeOap, Recorded, process_id};
use prost::Message as _;
use prost::bytes::Bytes;
use raw_sink::{RawProfilingSink, RawStream};
use rover_agent::backend::{Backend, UploadBuffer, UploadTask, Uploader, encode_window};
use rover_agent::config::{BackendAddr, BackendSettings};
use rover_agent::profile::{Frame, FrameKind, ProcessLabel, Profile, ValueType};
use rover_proto::v3::{
    EbpfProfilingData, EbpfProfilingTaskMetadata, ebpf_profiling_data, meter_data,
};

mod raw_sink;

#[derive(Parser)]
#[command(about = "The node agent's upload path and idle cost (cargo xtask bench upload)")]
struct Args {
    #[command(subcommand)]
    command: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Encode and send one large window to the gRPC sink, repeatedly.
    Flush {
        #[arg(long, default_value_t = 20)]
        iterations: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10_000)]
        stacks: usize,
        #[arg(long, default_value_t = 30)]
        depth: usize,
        #[arg(long, default_value_t = 50)]
        processes: u32,
    },
    /// The receiving end of `flush`, in a process of its own (its work is not the agent's):
    /// `collectProfilingData` keeping messages undecoded (raw_sink.rs). Prints `listening
    /// ADDR`, then answers each `check` line on stdin by decoding and checking the streams
    /// received since the last one.
    Oap,
    /// `rover-agent run` with many reported processes and no task.
    Idle {
        /// The release `rover-agent` binary.
        #[arg(long)]
        agent: PathBuf,
        #[arg(long, default_value_t = 500)]
        processes: usize,
        /// How long to stay idle once every process is reported.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Put every process under a continuous-profiling policy that never fires.
        #[arg(long)]
        policy: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Mode::Flush {
            iterations,
            warmup,
            stacks,
            depth,
            processes,
        } => flush(iterations, warmup, stacks, depth, processes),
        Mode::Oap => oap(),
        Mode::Idle {
            agent,
            processes,
            seconds,
            policy,
        } => idle(&agent, processes, Duration::from_secs(seconds), policy),
    }
}

// ---------------------------------------------------------------------------------------------
// One flush of a large window.

/// A small deterministic generator (xorshift64*): the same profile every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "tokio",
    "runtime",
    "scheduler",
    "worker",
    "task",
    "poll",
    "future",
    "hyper",
    "proto",
    "h2",
    "codec",
    "framed",
    "read",
    "write",
    "buffer",
    "service",
    "handler",
    "order",
    "checkout",
    "payment",
    "inventory",
    "repository",
    "query",
    "execute",
    "serde",
    "json",
    "de",
    "ser",
    "deserialize",
    "visit_map",
    "alloc",
    "vec",
    "Vec",
    "HashMap",
    "insert",
    "get",
    "core",
    "ops",
    "function",
    "FnOnce",
    "call_once",
    "impl",
    "Service",
    "Router",
    "dispatch",
    "middleware",
    "tracing",
    "span",
    "Instrumented",
    "sqlx",
    "postgres",
    "connection",
    "PgConnection",
    "fetch_optional",
    "std",
    "io",
    "BufReader",
    "parse",
    "decode",
    "encode",
    "compress",
    "flate2",
    "crc32",
    "update",
    "rustls",
    "conn",
    "ConnectionCommon",
    "process_new_packets",
];

/// A name as a symbolizer hands them out: `a::b::C::method`, sometimes with generics.
fn function_name(rng: &mut Rng) -> String {
    let segments = 1 + rng.below(5);
    let mut name = String::new();
    for index in 0..segments {
        if index > 0 {
            name.push_str("::");
        }
        name.push_str(WORDS[rng.below(WORDS.len())]);
    }
    if rng.below(4) == 0 {
        name.push_str(&format!(
            "<{}::{}>",
            WORDS[rng.below(WORDS.len())],
            WORDS[rng.below(WORDS.len())]
        ));
    }
    name.push_str(&format!(
        "::{}_{}",
        WORDS[rng.below(WORDS.len())],
        rng.below(1000)
    ));
    name
}

fn user_frame(function: String, module: &str, address: u64) -> Frame {
    Frame {
        kind: FrameKind::User,
        function: Some(function),
        module: Some(module.to_owned()),
        address,
        file: None,
        line: None,
        inlined: false,
    }
}

fn kernel_frame(function: &str, address: u64) -> Frame {
    Frame {
        kind: FrameKind::Kernel,
        function: Some(function.to_owned()),
        module: Some("[kernel.kallsyms]".to_owned()),
        address,
        file: None,
        line: None,
        inlined: false,
    }
}

const KERNEL_FUNCTIONS: &[&str] = &[
    "entry_SYSCALL_64_after_hwframe",
    "do_syscall_64",
    "__x64_sys_futex",
    "do_futex",
    "futex_wait",
    "__x64_sys_epoll_wait",
    "do_epoll_wait",
    "ep_poll",
    "schedule_hrtimeout_range",
    "__x64_sys_read",
    "ksys_read",
    "vfs_read",
    "tcp_recvmsg",
    "__schedule",
    "asm_sysvec_apic_timer_interrupt",
];

/// A window of `stacks` distinct stacks of `depth` frames (a few kernel frames at the leaf end
/// of each), spread evenly over `processes` pids, every frame symbolized.
fn window(stacks: usize, depth: usize, processes: u32) -> (Profile, f64) {
    let mut rng = Rng(0x5eed_f0b0_b5e5);
    let modules = [
        "/usr/bin/order-service",
        "/usr/lib/x86_64-linux-gnu/libc.so.6",
    ];
    let pool: Vec<Frame> = (0..4000u64)
        .map(|index| {
            user_frame(
                function_name(&mut rng),
                modules[(index % 7 == 0) as usize],
                0x1000 + index * 0x40,
            )
        })
        .collect();
    let mean_name = pool
        .iter()
        .map(|frame| frame.function.as_ref().map_or(0, String::len))
        .sum::<usize>() as f64
        / pool.len() as f64;
    let roots = [
        user_frame("_start".to_owned(), modules[0], 0x10),
        user_frame("__libc_start_main".to_owned(), modules[1], 0x20),
        user_frame("main".to_owned(), modules[0], 0x30),
    ];
    let kernel: Vec<Frame> = KERNEL_FUNCTIONS
        .iter()
        .enumerate()
        .map(|(index, name)| kernel_frame(name, 0xffff_ffff_8100_0000 + index as u64 * 0x100))
        .collect();
    let mut profile = Profile::new(
        vec![
            ValueType::new("samples", "count"),
            ValueType::new("cpu", "nanoseconds"),
        ],
        SystemTime::now() - Duration::from_secs(5),
    );
    profile.duration = Duration::from_secs(5);
    let mut frames = Vec::with_capacity(depth);
    while profile.samples().len() < stacks {
        let index = profile.samples().len();
        let pid = 10_000 + index as u32 % processes;
        let kernel_frames = (2 + index % 4).min(depth);
        let user_frames = depth - kernel_frames;
        frames.clear();
        frames.extend(roots.iter().take(user_frames).cloned());
        while frames.len() < user_frames {
            frames.push(pool[rng.below(pool.len())].clone());
        }
        // Root first: the kernel frames are the leaf end.
        frames.extend(kernel[..kernel_frames].iter().rev().cloned());
        let samples = 1 + rng.below(20) as u64;
        profile.add(
            &ProcessLabel {
                pid,
                name: format!("service-{}", pid % 7),
            },
            &frames,
            &[samples, samples * 10_101_010],
        );
    }
    (profile, mean_name)
}

fn flush(
    iterations: usize,
    warmup: usize,
    stacks: usize,
    depth: usize,
    processes: u32,
) -> anyhow::Result<()> {
    ensure!(iterations > 0, "--iterations must be at least 1");
    ensure!(
        depth > 0 && processes > 0,
        "--depth and --processes must be positive"
    );
    let (profile, mean_name) = window(stacks, depth, processes);
    let process_ids: HashMap<u32, String> = (0..processes)
        .map(|index| {
            let pid = 10_000 + index;
            let name = format!("service-{}", pid % 7);
            (pid, process_id(&name, "node-1", &format!("{name}-{pid}")))
        })
        .collect();
    let now = SystemTime::now();
    let task = UploadTask {
        task_id: "0f3c2a9e-6d1b-4c4e-9a57-upload-bench".to_owned(),
        profiling_start: now - Duration::from_secs(10),
        end: now + Duration::from_secs(600),
        off_cpu: false,
    };
    let mut oap = Children(vec![
        die_with_parent(
            Command::new(std::env::current_exe()?)
                .arg("oap")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
        .spawn()
        .context("starting the gRPC sink process")?,
    ]);
    let oap_child = &mut oap.0[0];
    let oap_pid = oap_child.id();
    let mut to_oap = oap_child.stdin.take().context("sink stdin")?;
    let mut from_oap = std::io::BufReader::new(oap_child.stdout.take().context("sink stdout")?);
    let mut read_line = move || -> anyhow::Result<String> {
        let mut line = String::new();
        ensure!(
            std::io::BufRead::read_line(&mut from_oap, &mut line)? > 0,
            "the gRPC sink process exited"
        );
        Ok(line.trim().to_owned())
    };
    let listening = read_line()?;
    let addr: std::net::SocketAddr = listening
        .strip_prefix("listening ")
        .and_then(|addr| addr.parse().ok())
        .with_context(|| format!("the gRPC sink said {listening:?}"))?;
    // The node agent's runtime (`rover-agent run`): two workers. The channel is made in it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _entered = runtime.enter();
    let backend = Backend::new(&BackendSettings {
        addr: BackendAddr {
            host: addr.ip().to_string(),
            port: addr.port(),
        },
        tls: None,
        check_period: Duration::from_secs(5),
        authentication: None,
    })?;
    let uploader = Uploader::new(backend);
    // The agent's default `rover_rs.upload_buffer`.
    let buffer = Arc::new(UploadBuffer::new(16 << 20));
    eprintln!(
        "upload-bench flush: {} stacks of depth {depth} over {processes} processes, {} distinct \
         frames (function names {mean_name:.0} bytes on average); {warmup} warm-up + \
         {iterations} flushes",
        profile.samples().len(),
        profile.frames().len()
    );
    let expected = profile
        .samples()
        .iter()
        .filter(|sample| process_ids.contains_key(&sample.process.pid))
        .count();
    let mut rows: Vec<[Duration; 3]> = Vec::with_capacity(iterations);
    // CPU of this process (the agent's side: encoding, the runtime's workers sending) per flush,
    // and of the sink's process (receiving) during the flushes.
    let mut agent_cpu: Vec<Duration> = Vec::with_capacity(iterations);
    let mut oap_cpu = Duration::ZERO;
    let (mut messages, mut bytes, mut received_bytes) = (0, 0, 0);
    for round in 0..warmup + iterations {
        let oap_before = process_cpu(oap_pid)?;
        let cpu_before = own_cpu();
        let started = Instant::now();
        let batches = encode_window(&task, &process_ids, &profile);
        let encoded = started.elapsed();
        messages = batches.iter().map(|batch| batch.messages()).sum::<usize>();
        bytes = batches.iter().map(|batch| batch.bytes()).sum::<usize>();
        let batch_count = batches.len();
        buffer.push(batches);
        let pushed = started.elapsed();
        let sent = runtime.block_on(uploader.flush(&buffer))?;
        let total = started.elapsed();
        let cpu = own_cpu().saturating_sub(cpu_before);
        let oap_spent = process_cpu(oap_pid)?.saturating_sub(oap_before);

        // Correctness, outside the timing: everything arrived, on one completed stream, each
        // process's batch starting with its task metadata.
        let stats = buffer.stats();
        ensure!(
            stats.batches_dropped == 0 && stats.batches_buffered == 0,
            "the upload buffer dropped or kept batches: {stats:?}"
        );
        ensure!(
            sent as usize == expected && messages == expected,
            "sent {sent} messages, encoded {messages}, expected {expected}"
        );
        writeln!(to_oap, "check {} {expected} {batch_count}", task.task_id)?;
        let answer = read_line()?;
        received_bytes = answer
            .strip_prefix("ok received_bytes=")
            .and_then(|bytes| bytes.parse().ok())
            .with_context(|| format!("flush {}: {answer}", round + 1))?;
        if round >= warmup {
            rows.push([encoded, pushed - encoded, total - pushed]);
            agent_cpu.push(cpu);
            oap_cpu += oap_spent;
        } else {
            eprintln!(
                "upload-bench flush: warm-up {}: {:.1} ms",
                round + 1,
                ms(total)
            );
        }
    }
    let column = |index: usize| -> Vec<Duration> {
        let mut values: Vec<Duration> = rows.iter().map(|row| row[index]).collect();
        values.sort();
        values
    };
    let mut totals: Vec<Duration> = rows.iter().map(|row| row.iter().sum()).collect();
    totals.sort();
    let (encode, push, send) = (column(0), column(1), column(2));
    let oap_cpu = oap_cpu / iterations as u32;
    agent_cpu.sort();
    println!(
        "flush iterations={iterations} stacks={} depth={depth} processes={processes} \
         messages={messages} bytes={bytes} received_bytes={received_bytes} \
         mean_name_bytes={mean_name:.1} median_ms={:.2} max_ms={:.2} encode_median_ms={:.2} \
         push_median_ms={:.3} send_median_ms={:.2} send_max_ms={:.2} agent_cpu_median_ms={:.1} \
         oap_cpu_mean_ms={:.0}",
        profile.samples().len(),
        ms(median(&totals)),
        ms(*totals.last().unwrap_or(&Duration::ZERO)),
        ms(median(&encode)),
        ms(median(&push)),
        ms(median(&send)),
        ms(*send.last().unwrap_or(&Duration::ZERO)),
        ms(median(&agent_cpu)),
        ms(oap_cpu),
    );
    Ok(())
}

fn oap() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sink = RawProfilingSink::default();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    // The OAP's gRPC server (grpc-java on Netty) starts each stream with a 1 MiB flow-control
    // window and grows it with the bandwidth-delay product it measures (its auto flow control,
    // on by default): hyper's adaptive window does the same.
    let server = tonic::transport::Server::builder()
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .http2_adaptive_window(Some(true))
        .add_service(sink.clone())
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    runtime.spawn(server);
    println!("listening {addr}");
    std::io::stdout().flush()?;
    for line in std::io::stdin().lines() {
        let line = line?;
        let answer = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["check", task_id, expected, batches] => {
                match check_received(sink.take(), task_id, expected.parse()?, batches.parse()?) {
                    Ok(bytes) => format!("ok received_bytes={bytes}"),
                    Err(error) => format!("error {error:#}"),
                }
            }
            _ => bail!("gRPC sink process: unknown request {line:?}"),
        };
        println!("{answer}");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Checks one flush's stream, every message decoded as the OAP decodes it; returns the bytes
/// received.
fn check_received(
    streams: Vec<RawStream>,
    task_id: &str,
    expected: usize,
    batches: usize,
) -> anyhow::Result<usize> {
    let [stream] = streams.as_slice() else {
        bail!(
            "expected one collectProfilingData stream, the sink received {}",
            streams.len()
        );
    };
    ensure!(
        stream.completed,
        "the stream did not complete: {:?}",
        stream.error
    );
    ensure!(
        stream.messages.len() == expected,
        "the sink received {} messages of {expected}",
        stream.messages.len()
    );
    let mut headed: Vec<EbpfProfilingTaskMetadata> = Vec::new();
    for (index, bytes) in stream.messages.iter().enumerate() {
        let message = EbpfProfilingData::decode(bytes.as_ref())
            .with_context(|| format!("message {index} does not decode"))?;
        let stacks = match &message.profiling {
            Some(ebpf_profiling_data::Profiling::OnCpu(on_cpu)) => &on_cpu.stacks,
            other => bail!("message {index} is not on-CPU profiling: {other:?}"),
        };
        ensure!(
            !stacks.is_empty() && stacks.iter().all(|stack| !stack.stack_symbols.is_empty()),
            "message {index} has an empty stack"
        );
        headed.extend(message.task);
    }
    let processes: HashSet<&str> = headed.iter().map(|task| task.process_id.as_str()).collect();
    ensure!(
        headed.len() == batches
            && processes.len() == batches
            && headed.iter().all(|task| task.task_id == task_id),
        "{} messages carried task metadata, for {} processes; expected one per process ({batches})",
        headed.len(),
        processes.len()
    );
    Ok(stream.messages.iter().map(Bytes::len).sum())
}

fn median(sorted: &[Duration]) -> Duration {
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// The idle node agent.

/// The command-line prefix of the sleeping processes the host rule matches.
const IDLE_NAME: &str = "rover-bench-idle-";

/// Children killed (and reaped) when dropped, also when the bench fails half-way. Each child
/// also gets SIGKILL if this process dies without dropping them (`PR_SET_PDEATHSIG`).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// `rover-agent run`, stopped with SIGTERM (as a node would) when dropped; killed if it does
/// not exit in time.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn exited(&mut self) -> anyhow::Result<bool> {
        Ok(self.child.try_wait()?.is_some())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: a signal to our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills the child when this process dies, however it dies.
fn die_with_parent(command: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

fn config(port: u16) -> String {
    format!(
        "\
logger:
  level: INFO
core:
  backend:
    addr: 127.0.0.1:{port}
process_discovery:
  heartbeat_period: 20s
  scanner:
    period: 3s
    mode: REGEX
    regex:
      - match_cmd: \"^{IDLE_NAME}[0-9]+ \"
        layer: OS_LINUX
        service_name: {IDLE_SERVICE}
        instance_name: \"{{{{.Rover.HostName}}}}\"
        process_name: \"{{{{.Process.ExeNameInCommandLine}}}}\"
        labels: bench
profiling:
  check_interval: 10s
  flush_interval: 5s
"
    )
}

/// The service the host rule names the sleeping processes under (`config`).
const IDLE_SERVICE: &str = "rover-bench";

/// A policy with one item per sampled monitor, at thresholds an idle host never reaches: a
/// sleeping process at 95% of a core, 10,000 threads, a load of 10,000.
fn never_firing_policy() -> serde_json::Value {
    let item =
        |threshold: &str| serde_json::json!({ "Threshold": threshold, "Period": 5, "Count": 3 });
    serde_json::json!({
        "ON_CPU": {
            "PROCESS_CPU": item("95"),
            "PROCESS_THREAD_COUNT": item("10000"),
            "SYSTEM_LOAD": item("10000"),
        }
    })
}

/// How many of the processes named `names` have a `process_cpu` meter in `recorded`: the
/// checker sampled them (a meter carries the process's name).
fn sampled(recorded: &Recorded, names: &HashSet<String>) -> usize {
    recorded
        .meters
        .iter()
        .filter_map(|meter| match &meter.metric {
            Some(meter_data::Metric::SingleValue(value))
                if value.name.ends_with("_process_cpu") =>
            {
                value
                    .labels
                    .iter()
                    .find(|label| label.name == "process_name")
                    .map(|label| &label.value)
                    .filter(|name| names.contains(*name))
            }
            _ => None,
        })
        .collect::<HashSet<_>>()
        .len()
}

fn idle(
    agent_binary: &Path,
    processes: usize,
    seconds: Duration,
    policy: bool,
) -> anyhow::Result<()> {
    ensure!(processes > 0, "--processes must be at least 1");
    // Many children at once: make sure the sleepers are reaped even if a spawn fails midway.
    let mut sleepers = Children(Vec::with_capacity(processes));
    for index in 0..processes {
        sleepers.0.push(
            die_with_parent(
                Command::new("sleep")
                    .arg0(format!("{IDLE_NAME}{index}"))
                    .arg("3600")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )
            .spawn()
            .with_context(|| format!("starting sleeping process {index}"))?,
        );
    }
    let pids: HashSet<i32> = sleepers
        .0
        .iter()
        .filter_map(|child| i32::try_from(child.id()).ok())
        .collect();
    let fake = FakeOap::start()?;
    if policy {
        fake.set_policy(IDLE_SERVICE, "bench-never-fires", never_firing_policy());
    }
    let dir = tempfile::tempdir()?;
    let config_path = dir.path().join("node-agent.yaml");
    std::fs::write(&config_path, config(fake.addr().port()))?;
    let log = dir.path().join("agent.log");
    let log_file = std::fs::File::create(&log)?;
    let started = Instant::now();
    let mut agent = Agent {
        child: die_with_parent(
            Command::new(agent_binary)
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(log_file.try_clone()?)
                .stderr(log_file),
        )
        .spawn()
        .with_context(|| format!("starting {}", agent_binary.display()))?,
        log,
    };
    let agent_pid = agent.child.id();
    eprintln!(
        "upload-bench idle: {processes} processes named {IDLE_NAME}N, rover-agent run (pid \
         {agent_pid}) reporting to the fake OAP on {}",
        fake.addr()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reported = |recorded: &Recorded| {
        recorded
            .reported_processes()
            .iter()
            .filter(|(_, _, pid)| pids.contains(pid))
            .map(|(_, _, pid)| *pid)
            .collect::<HashSet<i32>>()
            .len()
    };
    let all_reported = runtime.block_on(fake.wait_for(
        |recorded| reported(recorded) == processes,
        Duration::from_secs(90),
    ));
    if let Err(timed_out) = all_reported {
        bail!(
            "{timed_out} ({} of {processes} processes reported); agent log:\n{}",
            reported(&timed_out.recorded),
            agent.log_tail()
        );
    }
    let reported_after = started.elapsed();
    // The agent reports before its engine is up (loading BPF takes a moment longer): wait for
    // the first keepAlive, one heartbeat later, so that startup is not measured as idle.
    if let Err(timed_out) = runtime.block_on(fake.wait_for(
        |recorded| !recorded.keep_alives.is_empty(),
        Duration::from_secs(90),
    )) {
        bail!("{timed_out}; agent log:\n{}", agent.log_tail());
    }
    // Under the policy, startup ends once every process was sampled and its values sent
    // (meters go out every check interval).
    let names: HashSet<String> = (0..processes)
        .map(|index| format!("{IDLE_NAME}{index}"))
        .collect();
    if policy
        && let Err(timed_out) = runtime.block_on(fake.wait_for(
            |recorded| sampled(recorded, &names) == processes,
            Duration::from_secs(90),
        ))
    {
        bail!(
            "{timed_out} ({} of {processes} processes sampled); agent log:\n{}",
            sampled(&timed_out.recorded, &names),
            agent.log_tail()
        );
    }
    let ready = fake.recorded();
    println!(
        "ready agent_pid={agent_pid} reported={} sampled={} reported_after_ms={} ready_after_ms={}",
        reported(&ready),
        sampled(&ready, &names),
        reported_after.as_millis(),
        started.elapsed().as_millis()
    );
    std::io::stdout().flush()?;
    let until = Instant::now() + seconds;
    while Instant::now() < until {
        if agent.exited()? {
            bail!(
                "the agent exited while idle; its log:\n{}",
                agent.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(200).min(until - Instant::now()));
    }
    let done = fake.recorded();
    let count = |method: &str| {
        done.calls
            .iter()
            .filter(|call| call.method == method)
            .count()
    };
    let ready_count = |method: &str| {
        ready
            .calls
            .iter()
            .filter(|call| call.method == method)
            .count()
    };
    println!(
        "done report_calls={} keep_alive_calls={} task_queries={} profiling_streams={} \
         reported={} policy_queries={} meters={} triggers={}",
        count("reportProcesses") - ready_count("reportProcesses"),
        count("keepAlive") - ready_count("keepAlive"),
        count("queryTasks") - ready_count("queryTasks"),
        done.profiling_streams.len(),
        reported(&done),
        done.policy_queries.len() - ready.policy_queries.len(),
        done.meters.len() - ready.meters.len(),
        done.continuous_reports.len(),
    );
    std::io::stdout().flush()?;
    // The bench samples the agent's /proc on `done`, then closes our stdin.
    let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    drop(agent);
    drop(sleepers);
    Ok(())
}
