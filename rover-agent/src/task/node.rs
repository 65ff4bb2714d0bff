//! Node agent mode: this host's processes reported to the OAP, the OAP's tasks run on the
//! shared agent, their windows uploaded, until shutdown.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::Agent;
use super::backend_tasks::BackendTasks;
use super::continuous::{ContinuousConfig, Scheduler};
use super::discovery::{DEFAULT_SCAN_PERIOD, NodeSources, ProcessSources, discover_and_report};
use super::http::{EndpointState, serve};
use super::run_counts::RunCounts;
use crate::backend::{Backend, Backoff, ProcessDirectory, ProcessReporter, UploadBuffer, Uploader};
use crate::config::Settings;

/// Retries after a failed call start here and double up to the period of what failed.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Runs the node agent until `shutdown` resolves, its HTTP endpoint on `http` (bound to
/// `rover_rs.http_listen`, see [`bind_endpoint`](super::bind_endpoint)); then stops the tasks,
/// flushes what they recorded (within the configured deadline) and returns.
pub async fn run_node(
    agent: Agent,
    agent_id: String,
    settings: &Settings,
    sources: NodeSources,
    http: std::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let agent = Arc::new(agent);
    let backend = Backend::new(&settings.backend).context("setting up the backend connection")?;
    info!(agent_id, backend = backend.addr(), "node agent started");
    let directory = ProcessDirectory::default();
    let buffer = Arc::new(UploadBuffer::new(
        usize::try_from(settings.rover_rs.upload_buffer).unwrap_or(usize::MAX),
    ));
    // Tasks stop first, so that their last windows are queued before the final flush.
    let (stopping, stop) = watch::channel(false);
    let (stopping_upload, stop_upload) = watch::channel(false);

    let reporter = ProcessReporter::new(
        backend.clone(),
        agent_id.clone(),
        settings.discovery.properties_report_period,
        directory.clone(),
    );
    let runs = Arc::new(RunCounts::default());
    let discovery_synced = Arc::new(AtomicBool::new(false));
    // Readiness needs the programs to load here; the profilers themselves load when a task
    // starts, so one is loaded once now, off the async threads.
    let programs_load = Arc::new(OnceLock::new());
    {
        let agent = Arc::clone(&agent);
        let programs_load = Arc::clone(&programs_load);
        tokio::task::spawn_blocking(move || {
            let loaded = agent.check_programs_load();
            if let Err(problem) = &loaded {
                error!(
                    "the eBPF programs do not load on this host, profiling tasks will fail: {problem}"
                );
            }
            let _ = programs_load.set(loaded);
            // The object parsed to load it leaves freed heap behind.
            crate::heap::release_freed_memory();
        });
    }
    let sources = ProcessSources::start(sources, &agent).await?;
    let discovery = tokio::spawn(discover_and_report(
        reporter,
        sources,
        settings
            .discovery
            .scanner
            .as_ref()
            .map_or(DEFAULT_SCAN_PERIOD, |scanner| scanner.period),
        settings.discovery.heartbeat_period,
        Arc::clone(&discovery_synced),
        stop.clone(),
    ));
    let uploader = tokio::spawn(upload(
        Uploader::new(backend.clone()),
        Arc::clone(&buffer),
        settings.profiling.flush_interval,
        stop_upload,
    ));
    let tasks = settings.profiling.active.then(|| {
        tokio::spawn(poll_tasks(
            BackendTasks::new(
                Arc::clone(&agent),
                backend.clone(),
                agent_id.clone(),
                directory.clone(),
                Arc::clone(&buffer),
                settings.profiling.flush_interval,
                Arc::clone(&runs),
            ),
            settings.profiling.check_interval,
            stop.clone(),
        ))
    });
    let continuous = settings.profiling.active.then(|| {
        tokio::spawn(
            Scheduler::new(
                Arc::clone(&agent),
                backend.clone(),
                directory.clone(),
                Arc::clone(&buffer),
                ContinuousConfig::new(settings),
                Arc::clone(&runs),
            )
            .run(stop.clone()),
        )
    });
    let mut loops = vec![
        ("discovery", discovery.abort_handle()),
        ("upload", uploader.abort_handle()),
    ];
    loops.extend(
        tasks
            .as_ref()
            .map(|tasks| ("task poll", tasks.abort_handle())),
    );
    loops.extend(
        continuous
            .as_ref()
            .map(|continuous| ("continuous profiling", continuous.abort_handle())),
    );
    let endpoint = tokio::spawn(serve(
        http,
        Arc::new(EndpointState {
            agent: Arc::clone(&agent),
            backend: backend.clone(),
            buffer: Arc::clone(&buffer),
            directory: directory.clone(),
            runs,
            discovery_synced,
            programs_load,
            loops,
        }),
        stop.clone(),
    ));

    shutdown.await;
    info!("shutting down: stopping tasks, flushing what they recorded");
    let _ = stopping.send(true);
    let deadline = settings.rover_rs.shutdown_deadline;
    let finished = tokio::time::timeout(deadline, async {
        for runs in [tasks, continuous].into_iter().flatten() {
            let _ = runs.await;
        }
        let _ = stopping_upload.send(true);
        let _ = uploader.await;
    })
    .await;
    if finished.is_err() {
        warn!(
            ?deadline,
            "shutdown deadline passed: windows still queued are dropped"
        );
    }
    let stats = buffer.stats();
    info!(
        messages_sent = stats.messages_sent,
        batches_dropped = stats.batches_dropped,
        batches_unsent = stats.batches_buffered,
        "uploads at shutdown"
    );
    discovery.abort();
    // The endpoint holds the agent: it ends first, so that the agent's threads end here.
    let _ = endpoint.await;
    drop(Arc::try_unwrap(agent).ok());
    Ok(())
}

async fn poll_tasks(mut tasks: BackendTasks, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut backoff = Backoff::new(FIRST_RETRY, interval);
    let mut failing = false;
    loop {
        let polled = tokio::select! {
            polled = tasks.poll() => polled,
            _ = stop.changed() => break,
        };
        let wait = match polled {
            Ok(()) => {
                failing = false;
                backoff.succeeded();
                interval
            }
            Err(error) => {
                if !failing {
                    warn!("{error}; retrying with backoff");
                }
                failing = true;
                backoff.failed()
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = stop.changed() => break,
        }
    }
    tasks.stop_all().await;
}

/// Flushes every `interval` (or sooner when a task ended); while the OAP is unreachable the
/// buffer holds the windows (bounded) and retries back off. At shutdown, one last flush.
async fn upload(
    uploader: Uploader,
    buffer: Arc<UploadBuffer>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(FIRST_RETRY, interval.max(FIRST_RETRY) * 6);
    let mut dropped_logged = 0;
    let mut wait = interval;
    loop {
        let stopping = tokio::select! {
            () = Uploader::wait(&buffer, wait) => false,
            _ = stop.changed() => true,
        };
        match uploader.flush(&buffer).await {
            Ok(_) => {
                backoff.succeeded();
                wait = interval;
            }
            Err(error) => {
                let stats = buffer.stats();
                warn!(
                    queued_bytes = stats.bytes_buffered,
                    "{error}; windows kept for the next attempt"
                );
                wait = backoff.failed().max(interval);
            }
        }
        let stats = buffer.stats();
        if stats.batches_dropped > dropped_logged {
            warn!(
                dropped = stats.batches_dropped - dropped_logged,
                total_dropped = stats.batches_dropped,
                "upload buffer full: oldest windows dropped (rover_rs.upload_buffer)"
            );
            dropped_logged = stats.batches_dropped;
        }
        if stopping {
            return;
        }
    }
}
