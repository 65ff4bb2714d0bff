//! Node agent mode: this host's processes reported to the OAP, the OAP's tasks run on the
//! shared agent, their windows uploaded, until shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Agent;
use super::backend_tasks::BackendTasks;
use crate::backend::{Backend, Backoff, ProcessDirectory, ProcessReporter, UploadBuffer, Uploader};
use crate::bpf::ProcessChanges;
use crate::config::Settings;
use crate::process::{HostRuleScanner, ScanChanges};

/// Retries after a failed call start here and double up to the period of what failed.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Runs the node agent until `shutdown` resolves; then stops the tasks, flushes what they
/// recorded (within the configured deadline) and returns.
pub async fn run_node(
    agent: Agent,
    agent_id: String,
    settings: &Settings,
    scanner: Option<HostRuleScanner>,
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
    let scanner = match scanner {
        Some(scanner) => Some(HostScan::new(scanner, &agent).await),
        None => None,
    };
    let discovery = tokio::spawn(discover_and_report(
        reporter,
        scanner,
        settings
            .discovery
            .scanner
            .as_ref()
            .map_or(Duration::MAX, |scanner| scanner.period),
        settings.discovery.heartbeat_period,
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
            ),
            settings.profiling.check_interval,
            stop.clone(),
        ))
    });

    shutdown.await;
    info!("shutting down: stopping tasks, flushing what they recorded");
    let _ = stopping.send(true);
    let deadline = settings.rover_rs.shutdown_deadline;
    let finished = tokio::time::timeout(deadline, async {
        if let Some(tasks) = tasks {
            let _ = tasks.await;
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
    drop(Arc::try_unwrap(agent).ok());
    Ok(())
}

/// The host rules' scanner and, when the kernel can tell, the processes that changed between
/// two scans: with them a scan reads only changed and new processes, not every `stat`.
struct HostScan {
    scanner: HostRuleScanner,
    changes: Option<ProcessChanges>,
}

impl HostScan {
    async fn new(scanner: HostRuleScanner, agent: &super::Agent) -> Self {
        let changes = agent
            .track_process_changes()
            .await
            .inspect_err(|error| {
                info!(
                    "each host process scan reads every process, as the kernel cannot tell which \
                     changed: {error:#}"
                );
            })
            .ok();
        Self { scanner, changes }
    }

    /// Blocking.
    fn scan(&mut self) -> Result<ScanChanges, crate::process::host_rules::Error> {
        let changed = match self.changes.as_mut().map(ProcessChanges::take) {
            Some(Ok(changed)) if !changed.overflowed => Some(changed.pids),
            Some(Ok(_)) => {
                debug!("more processes changed than the kernel could mark: reading every one");
                None
            }
            Some(Err(error)) => {
                warn!("process changes unreadable, each scan reads every process now: {error}");
                self.changes = None;
                None
            }
            None => None,
        };
        self.scanner.scan(changed.as_ref())
    }
}

/// Rescans host processes every scanner period and heartbeats every `heartbeat`; a failed
/// heartbeat is retried sooner, with backoff.
async fn discover_and_report(
    mut reporter: ProcessReporter,
    mut scanner: Option<HostScan>,
    scan_period: Duration,
    heartbeat: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_scan = tokio::time::Instant::now();
    let mut next_heartbeat = tokio::time::Instant::now();
    let mut backoff = Backoff::new(FIRST_RETRY, heartbeat);
    let mut failing = false;
    loop {
        // The time first: taking the scanner when it is not due would drop it (and every scan
        // after the first heartbeat that falls between two scans).
        if tokio::time::Instant::now() >= next_scan
            && let Some(owned) = scanner.take()
        {
            match tokio::task::spawn_blocking(move || {
                let mut owned = owned;
                let changes = owned.scan();
                (owned, changes)
            })
            .await
            {
                Ok((owned, Ok(changes))) => {
                    scanner = Some(owned);
                    if !changes.added.is_empty() || !changes.removed.is_empty() {
                        debug!(
                            added = changes.added.len(),
                            removed = changes.removed.len(),
                            "host processes changed"
                        );
                    }
                    // A pid in both lists was replaced (reused, exec, renamed).
                    for pid in changes.removed {
                        reporter.removed(pid);
                    }
                    for entity in changes.added {
                        reporter.added(entity);
                    }
                }
                Ok((owned, Err(error))) => {
                    scanner = Some(owned);
                    warn!("scanning host processes: {error}");
                }
                Err(error) => warn!("the process scan panicked: {error}; host rules are off"),
            }
            next_scan += scan_period;
        }
        if tokio::time::Instant::now() >= next_heartbeat {
            match reporter.heartbeat().await {
                Ok(()) => {
                    if failing {
                        info!("the OAP answers again");
                    }
                    failing = false;
                    backoff.succeeded();
                    next_heartbeat = tokio::time::Instant::now() + heartbeat;
                }
                Err(error) => {
                    if !failing {
                        warn!("{error}; retrying with backoff");
                    }
                    failing = true;
                    next_heartbeat = tokio::time::Instant::now() + backoff.failed();
                }
            }
        }
        let wake = if scanner.is_some() {
            next_scan.min(next_heartbeat)
        } else {
            next_heartbeat
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => return,
        }
    }
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
