//! `cargo xtask bench oncpu`: whole-host sampling of a busy machine, rover-agent against
//! `perf record -a -g` in the same run.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context as _;

use super::{BpfStats, KillOnDrop, measure_with_program_time};
use crate::{setup, workloads, workspace_root};

pub(super) fn run(seconds: u64, frequency: u64) -> anyhow::Result<()> {
    setup::run()?;
    let agent = workloads::build_agent()?;
    let out_dir = workspace_root().join("target/bench");
    let busy = workloads::build("busy_threads", &out_dir)?;
    let demo = workloads::build("demo", &out_dir)?;
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let _stats = BpfStats::enable()?;

    // A busy machine: every CPU spinning, plus a process making system calls.
    let load_seconds = (seconds * 2 + 30).to_string();
    let _load = [
        KillOnDrop(
            Command::new(&busy)
                .args([&cpus.to_string(), &load_seconds])
                .spawn()?,
        ),
        KillOnDrop(
            Command::new(&demo)
                .arg(&load_seconds)
                .stdout(Stdio::null())
                .spawn()?,
        ),
    ];
    std::thread::sleep(Duration::from_secs(1));

    let duration = format!("{seconds}s");
    let agent_output = out_dir.join("agent.folded");
    eprintln!("bench oncpu: rover-agent profile --all for {seconds} s");
    let (agent_cost, program) = measure_with_program_time(
        Command::new(&agent)
            .args(["profile", "--all", "--duration", &duration, "--frequency"])
            .arg(frequency.to_string())
            .arg("--output")
            .arg(&agent_output)
            .stderr(Stdio::null()),
    )?;
    let perf_data = out_dir.join("perf.data");
    eprintln!("bench oncpu: perf record -F {frequency} -a -g for {seconds} s");
    let (perf_cost, _) = measure_with_program_time(
        Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                &frequency.to_string(),
                "-a",
                "-g",
                "-o",
            ])
            .arg(&perf_data)
            .args(["--", "sleep", &seconds.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .context("running perf (Debian package linux-perf)")?;
    eprintln!("bench oncpu: perf script (perf's symbolization, which rover-agent does in-process)");
    let (script_cost, _) = measure_with_program_time(
        Command::new("perf")
            .args(["script", "-i"])
            .arg(&perf_data)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;

    let wall = Duration::from_secs(seconds);
    let agent_total = agent_cost.cpu + program.run_time;
    let percent = |cpu: Duration| 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\non-CPU, whole host, {frequency} Hz, {seconds} s, {cpus} CPUs busy");
    println!(
        "{:<44} {:>10} {:>12} {:>14}",
        "", "CPU (ms)", "% of a core", "peak RSS (MiB)"
    );
    let row = |name: &str, cpu: Duration, rss: Option<u64>| {
        println!(
            "{name:<44} {:>10.1} {:>11.3}% {:>14}",
            cpu.as_secs_f64() * 1000.0,
            percent(cpu),
            rss.map_or_else(String::new, |kib| format!("{:.1}", mib(kib)))
        )
    };
    row(
        "rover-agent process (user+sys)",
        agent_cost.cpu,
        Some(agent_cost.peak_rss_kib),
    );
    row(
        &format!(
            "rover-agent eBPF program ({} runs, {} ns/run)",
            program.runs,
            program.run_time.as_nanos() / u128::from(program.runs.max(1))
        ),
        program.run_time,
        None,
    );
    row(
        "rover-agent total   [target <= 0.5%, 30 MiB]",
        agent_total,
        Some(agent_cost.peak_rss_kib),
    );
    row(
        "perf record -a -g (process only)",
        perf_cost.cpu,
        Some(perf_cost.peak_rss_kib),
    );
    row(
        "perf script (post-processing)",
        script_cost.cpu,
        Some(script_cost.peak_rss_kib),
    );
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    println!(
        "ratio rover-agent total / perf record: CPU {:.2}, peak RSS {:.2}",
        ratio(agent_total, perf_cost.cpu),
        agent_cost.peak_rss_kib as f64 / perf_cost.peak_rss_kib.max(1) as f64
    );
    println!(
        "ratio rover-agent total / (perf record + perf script): CPU {:.2}",
        ratio(agent_total, perf_cost.cpu + script_cost.cpu)
    );
    println!(
        "(perf's in-kernel sampling and unwinding is not attributable to a process and is not \
         counted; rover-agent's in-kernel time is)"
    );
    Ok(())
}
