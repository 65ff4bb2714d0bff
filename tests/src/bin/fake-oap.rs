//! The fake SkyWalking OAP for the demo: listens on a loopback port, waits for an agent to report
//! a process named `--process-name`, hands out one profiling task for it starting now, and when
//! the agent has uploaded (the task is over and no stream came for `--quiet` seconds) writes what
//! the OAP received as folded stacks and an SVG flame graph, then exits. Bounded by `--timeout`.
//!
//! ```text
//! fake-oap --port 11800 --process-name demo --duration 10 --output /tmp/demo.svg
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::{Parser, ValueEnum};
use integration_tests::fake_oap::{
    FakeOap, FakeOapConfig, FoldValue, TaskCommand, fold_received, now_ms,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Target {
    #[value(name = "ON_CPU")]
    OnCpu,
    #[value(name = "OFF_CPU")]
    OffCpu,
}

#[derive(Debug, Parser)]
#[command(about = "A fake SkyWalking OAP that hands out one profiling task and draws what it got")]
struct Args {
    /// Port to listen on (127.0.0.1).
    #[arg(long, default_value_t = 11800)]
    port: u16,
    /// Profile the first reported process with this process name.
    #[arg(long)]
    process_name: String,
    /// What to profile.
    #[arg(long, value_enum, default_value = "ON_CPU")]
    target: Target,
    /// Task duration in seconds (`FixedTriggerDuration`).
    #[arg(long, default_value_t = 10)]
    duration: i64,
    /// Where to write the SVG flame graph.
    #[arg(long)]
    output: PathBuf,
    /// Where to write the folded stacks (default: the output path with `.folded`).
    #[arg(long)]
    folded: Option<PathBuf>,
    /// Seconds without a new upload, after the task's end, that mean the agent is done.
    #[arg(long, default_value_t = 7)]
    quiet: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// Refuse calls whose `authentication` metadata is not this value.
    #[arg(long)]
    authentication: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.duration > 0, "--duration must be positive");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let fake = FakeOap::start_with(FakeOapConfig {
        addr: ([127, 0, 0, 1], args.port).into(),
        tls: None,
        required_authentication: args.authentication.clone(),
    })?;
    println!("fake OAP listening on {}", fake.addr());

    let name = args.process_name.as_str();
    let recorded = fake
        .wait_for(
            |recorded| recorded.process_id_named(name).is_some(),
            deadline.saturating_duration_since(Instant::now()),
        )
        .await
        .with_context(|| format!("no process named {name:?} was reported"))?;
    let process_id = recorded
        .process_id_named(name)
        .context("reported process vanished")?;

    let (target, value) = match args.target {
        Target::OnCpu => ("ON_CPU", FoldValue::Count),
        Target::OffCpu => ("OFF_CPU", FoldValue::DurationNs),
    };
    let start_ms = now_ms();
    let task_id = format!("fake-oap-{start_ms}");
    fake.add_task(TaskCommand {
        task_id: task_id.clone(),
        process_ids: vec![process_id.clone()],
        target: target.to_owned(),
        start_ms,
        duration_s: args.duration,
        update_ms: start_ms,
    });
    println!(
        "queued {target} task {task_id} for {name} (process id {process_id}) for {}s",
        args.duration
    );

    let end_ms = start_ms + args.duration * 1000;
    let quiet = Duration::from_secs(args.quiet);
    let recorded = loop {
        let recorded = fake.recorded();
        let last_upload = recorded
            .profiling_streams
            .iter()
            .filter(|stream| !stream.messages.is_empty())
            .map(|stream| stream.last_message)
            .max();
        let uploaded = recorded.streams_for_task(&task_id) > 0;
        if now_ms() >= end_ms && uploaded && last_upload.is_some_and(|at| at.elapsed() >= quiet) {
            break recorded;
        }
        if Instant::now() >= deadline {
            if uploaded {
                eprintln!("timed out while the agent was still uploading; writing what came");
                break recorded;
            }
            bail!("timed out: no profiling data for task {task_id}; recorded {recorded}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };

    let stacks = fold_received(&recorded.profiling_streams, &task_id, Some(&process_id));
    let folded = stacks.folded_text(value);
    let folded_path = args
        .folded
        .clone()
        .unwrap_or_else(|| args.output.with_extension("folded"));
    std::fs::write(&folded_path, &folded)
        .with_context(|| format!("writing {}", folded_path.display()))?;
    println!(
        "received {} messages in {} streams: {} stacks, {} samples, {} ns off-CPU",
        stacks.messages,
        recorded.streams_for_task(&task_id),
        stacks.by_stack.len(),
        stacks.total_count(),
        stacks.total_duration_ns()
    );
    if stacks.without_task > 0 || stacks.invalid > 0 {
        eprintln!(
            "warning: {} messages without a task, {} with negative values",
            stacks.without_task, stacks.invalid
        );
    }
    println!("folded stacks: {}", folded_path.display());
    if folded.is_empty() {
        bail!("the agent uploaded no samples for {name}: no flame graph");
    }

    let mut options = inferno::flamegraph::Options::default();
    options.title = format!("{name}: {target} as the OAP received it (task {task_id})");
    options.count_name = match value {
        FoldValue::Count => "samples".to_owned(),
        FoldValue::DurationNs => "ns".to_owned(),
    };
    options.hash = true;
    let file = std::fs::File::create(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    inferno::flamegraph::from_lines(&mut options, folded.lines(), std::io::BufWriter::new(file))
        .context("drawing the flame graph")?;
    println!("flame graph: {}", args.output.display());
    Ok(())
}
