//! `rover-agent run`: the node agent, configured by a Rover-layout YAML file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use tracing::{info, warn};

use super::EngineArgs;
use crate::config::Settings;
use crate::process::kubernetes::{KubernetesDiscovery, analyzer::Analyzers};
use crate::process::{HostFacts, HostRuleScanner};
use crate::task::{Agent, KubernetesSource, NodeSources, bind_endpoint, run_node};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The configuration file: Rover's `rover_configs.yaml` layout, `${ENV:default}` values.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// Loads the configuration (before logging starts: its level is in the file), then runs the
/// node agent until SIGINT or SIGTERM.
pub(super) fn run(args: &RunArgs, verbose: u8) -> anyhow::Result<ExitCode> {
    let loaded = Settings::load(&args.config)?;
    let settings = loaded.settings;
    super::init_logging(
        verbose,
        Some(&settings.log_level.to_string().to_lowercase()),
    );
    for warning in &loaded.warnings {
        warn!("{}: {warning}", args.config.display());
    }
    if settings.discovery.scanner.is_none() && !settings.discovery.kubernetes.active {
        warn!(
            "neither process_discovery.scanner rules nor process_discovery.kubernetes.active: \
             no process is reported, so the OAP can hand out no task (see configs/rover.yaml)"
        );
    }
    crate::bpf::require_privilege().context("rover-agent run profiles processes")?;
    // First: a taken port stops the start before anything is loaded.
    let http = bind_endpoint(settings.rover_rs.http_listen)?;
    let engine = EngineArgs {
        frequency: Some(frequency_hz(settings.profiling.on_cpu_dump_period)),
        sample_probability: Some(settings.rover_rs.off_cpu_sample_probability),
        drain_interval: Duration::from_secs(1),
        map_memory: settings.rover_rs.map_memory,
        max_targets: settings.rover_rs.max_targets,
        debug_info: false,
    };
    let agent_config = engine
        .agent_config()
        .context("profiling.task.on_cpu.dump_period / rover_rs settings")?;
    // One id for the agent's life, sent as both ebpfAgentID and roverInstanceId.
    let agent_id = uuid::Uuid::new_v4().to_string();
    let sources = node_sources(&settings, &agent_id)?;
    // One worker: the async side waits on sockets and timers, the work runs on the engine's
    // thread and the blocking pool; a second worker cost ~0.15 ms of wake-ups per pod event
    // (`cargo xtask bench discovery`).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let agent = Agent::start(agent_config)?;
    runtime.block_on(run_node(agent, agent_id, &settings, sources, http, async {
        let signal = super::stop_signal().await;
        info!("{signal} received");
    }))?;
    Ok(ExitCode::SUCCESS)
}

/// Rover's `dump_period` (time between two samples) as a sampling frequency.
fn frequency_hz(dump_period: Duration) -> u64 {
    let period_ns = dump_period.as_nanos().max(1);
    u64::try_from((1_000_000_000 + period_ns / 2) / period_ns)
        .unwrap_or(1)
        .max(1)
}

/// The host rules and the Kubernetes discovery as configured; a template or rule that does not
/// parse is an error naming its key.
fn node_sources(settings: &Settings, agent_id: &str) -> anyhow::Result<NodeSources> {
    let discovery = &settings.discovery;
    if discovery.scanner.is_none() && !discovery.kubernetes.active {
        return Ok(NodeSources {
            host_rules: None,
            kubernetes: None,
        });
    }
    let facts = HostFacts::detect(
        settings.cluster_name.clone(),
        settings.rover_rs.host_ip,
        agent_id.to_owned(),
    )
    .context("finding this node's IP address (rover_rs.host_ip sets it)")?;
    let host_rules = match &discovery.scanner {
        Some(scanner) => Some(HostRuleScanner::new(scanner, facts.clone())?),
        None => None,
    };
    let kubernetes = if discovery.kubernetes.active {
        let kubernetes = &discovery.kubernetes;
        let node_name = kubernetes.node_name.clone().context(
            "process_discovery.kubernetes.node_name is empty: set it to this node's name (Rover's \
             file reads it from ${ROVER_PROCESS_DISCOVERY_KUBERNETES_NODE_NAME}; the DaemonSet \
             sets that from spec.nodeName)",
        )?;
        let analyzers = Analyzers::new(&kubernetes.analyzers)?;
        if kubernetes.analyzers.iter().all(|analyzer| !analyzer.active) {
            warn!(
                "process_discovery.kubernetes.analyzers: none is active, so no process of a pod \
                 is reported"
            );
        }
        Some(KubernetesSource {
            discovery: KubernetesDiscovery::new(analyzers, facts, "/proc"),
            node_name,
            namespaces: kubernetes.namespaces.clone(),
        })
    } else {
        None
    };
    Ok(NodeSources {
        host_rules,
        kubernetes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rovers_default_dump_period_is_111_hz() {
        assert_eq!(frequency_hz(Duration::from_millis(9)), 111);
        assert_eq!(frequency_hz(Duration::from_millis(10)), 100);
        assert_eq!(frequency_hz(Duration::from_secs(1)), 1);
    }
}
