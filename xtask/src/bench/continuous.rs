//! `cargo xtask bench continuous`: what continuous profiling's checking costs the node agent.
//!
//! `rover-agent run` with 500 processes reported by a host rule and no task, measured twice in
//! one run, side by side: without a policy, and with every process under a continuous-profiling
//! policy that never fires (PROCESS_CPU, PROCESS_THREAD_COUNT and SYSTEM_LOAD items at
//! thresholds an idle host never reaches), so each process is sampled every second, checked
//! every 5 s and its values sent as meters. The difference is the checking's cost; targets:
//! <= 0.2% of a core, RSS growth <= 5 MiB. Rounds alternate the two, medians are printed.

use anyhow::bail;

use super::upload::{IdleFigures, fields, idle};
use crate::{setup, workloads};

const CPU_TARGET_PERCENT: f64 = 0.2;
const RSS_TARGET_MIB: f64 = 5.0;

pub(super) fn run(seconds: u64, processes: usize, rounds: usize) -> anyhow::Result<()> {
    if seconds == 0 || rounds == 0 || processes == 0 {
        bail!("--seconds, --rounds and --processes must each be at least 1");
    }
    setup::run()?;
    let agent = workloads::build_agent()?;
    let bench = workloads::build_tests_binary("upload-bench")?;
    let mut without = Vec::with_capacity(rounds);
    let mut with = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        eprintln!(
            "bench continuous: round {round}/{rounds}, {processes} processes, no policy, {seconds} s"
        );
        without.push(Measured::from(idle(
            &bench, &agent, processes, seconds, false,
        )?));
        eprintln!(
            "bench continuous: round {round}/{rounds}, {processes} processes under a policy, \
             {seconds} s"
        );
        with.push(Measured::from(idle(
            &bench, &agent, processes, seconds, true,
        )?));
    }

    let met = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "\nrover-agent run, {processes} processes reported, no task, {seconds} s per measure, \
         {rounds} round(s) alternating (medians)"
    );
    println!(
        "{:<46} {:>12} {:>12} {:>12}",
        "", "no policy", "policy", "difference"
    );
    let cpu = (
        median(&without, |m| m.sched_percent),
        median(&with, |m| m.sched_percent),
    );
    println!(
        "{:<46} {:>11.3}% {:>11.3}% {:>11.3}%   [target <= {CPU_TARGET_PERCENT}% of a core: {}]",
        "CPU, % of a core (scheduler's ns)",
        cpu.0,
        cpu.1,
        cpu.1 - cpu.0,
        met(cpu.1 - cpu.0 <= CPU_TARGET_PERCENT)
    );
    let ticks = (
        median(&without, |m| m.tick_percent),
        median(&with, |m| m.tick_percent),
    );
    println!(
        "{:<46} {:>11.3}% {:>11.3}% {:>11.3}%",
        "CPU, % of a core (clock ticks)",
        ticks.0,
        ticks.1,
        ticks.1 - ticks.0
    );
    let rss = (
        median(&without, |m| m.end_rss_mib),
        median(&with, |m| m.end_rss_mib),
    );
    println!(
        "{:<46} {:>12.1} {:>12.1} {:>12.1}   [target <= {RSS_TARGET_MIB} MiB: {}]",
        "RSS at the end (MiB)",
        rss.0,
        rss.1,
        rss.1 - rss.0,
        met(rss.1 - rss.0 <= RSS_TARGET_MIB)
    );
    let growth = (
        median(&without, |m| m.growth_mib),
        median(&with, |m| m.growth_mib),
    );
    println!(
        "{:<46} {:>12.1} {:>12.1} {:>12.1}",
        "RSS growth while measured (MiB)",
        growth.0,
        growth.1,
        growth.1 - growth.0
    );
    if cpu.0 > 0.0 {
        println!(
            "ratio of the agent's CPU with the policy to without: {:.2}",
            cpu.1 / cpu.0
        );
    }
    for (round, measured) in with.iter().enumerate() {
        println!(
            "policy round {}: {} (sampled {}), triggers {}, meters {}",
            round + 1,
            measured.done_line,
            measured.sampled,
            measured.triggers,
            measured.meters
        );
    }
    Ok(())
}

/// One measure's figures.
struct Measured {
    sched_percent: f64,
    tick_percent: f64,
    end_rss_mib: f64,
    growth_mib: f64,
    sampled: String,
    triggers: String,
    meters: String,
    done_line: String,
}

impl From<IdleFigures> for Measured {
    fn from(figures: IdleFigures) -> Self {
        let ready = fields(&figures.ready_line);
        let done = fields(&figures.done_line);
        let field = |fields: &std::collections::HashMap<String, String>, name: &str| {
            fields.get(name).cloned().unwrap_or_else(|| "?".to_owned())
        };
        let mib = |kib: u64| kib as f64 / 1024.0;
        Self {
            sched_percent: 100.0 * figures.sched_ms / 1000.0 / figures.wall.as_secs_f64(),
            tick_percent: figures.cpu_percent,
            end_rss_mib: mib(figures.end.rss_kib),
            growth_mib: mib(figures.end.rss_kib) - mib(figures.ready.rss_kib),
            sampled: field(&ready, "sampled"),
            triggers: field(&done, "triggers"),
            meters: field(&done, "meters"),
            done_line: figures.done_line,
        }
    }
}

fn median(measures: &[Measured], figure: impl Fn(&Measured) -> f64) -> f64 {
    let mut values: Vec<f64> = measures.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}
