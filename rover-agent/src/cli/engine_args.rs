//! Flags that configure the agent itself (what its profilers are loaded with and how it
//! symbolizes), shared by `profile` and `check`, and their validation.

use std::time::Duration;

use anyhow::bail;
use clap::Args;

use crate::bpf::{DEFAULT_MAP_MEMORY_BYTES, MIN_MAP_MEMORY_BYTES, ProfilerSettings};
use crate::symbolize::{DEFAULT_SYMBOL_CACHE_BYTES, SymbolizerConfig};
use crate::task::AgentConfig;

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// On-CPU: samples per second on each CPU [default: 99].
    #[arg(long, value_name = "HZ", value_parser = clap::value_parser!(u64).range(1..))]
    pub frequency: Option<u64>,
    /// Off-CPU: record each switch-out with probability P (0 < P <= 1), decided in the kernel
    /// before any stack walk, and scale counts and times by 1/P. For threads switching hundreds
    /// of thousands of times per second [default: 1, exact].
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    pub sample_probability: Option<f64>,
    /// How often kernel aggregates are drained and symbolized.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub drain_interval: Duration,
    /// Kernel memory for the maps of each profiler, e.g. 32MiB: bounds how many distinct stacks
    /// a drain interval holds (more are counted as losses). `check` shows what it gives.
    #[arg(long, value_name = "SIZE", default_value = "32MiB", value_parser = parse_size)]
    pub map_memory: u64,
    /// Processes each profiler can record at once (the size of its target map).
    #[arg(long, value_name = "N", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_048_576))]
    pub max_targets: u32,
    /// Also read DWARF debug info: inlined functions as frames of their own, source files and
    /// lines (pprof). Costs memory in proportion to the debug info of the profiled binaries.
    #[arg(long)]
    pub debug_info: bool,
}

impl EngineArgs {
    pub fn agent_config(&self) -> anyhow::Result<AgentConfig> {
        let frequency_hz = self.frequency.unwrap_or(99);
        if let Some(max_rate) = max_sample_rate()
            && frequency_hz > max_rate
        {
            bail!(
                "--frequency {frequency_hz} exceeds the kernel's limit of {max_rate} Hz \
                 (sysctl kernel.perf_event_max_sample_rate): choose a lower frequency or raise \
                 the limit"
            );
        }
        if frequency_hz > 1_000_000_000 {
            bail!("--frequency {frequency_hz} is above 1 GHz");
        }
        let drain = self.drain_interval;
        if drain < Duration::from_millis(10) || drain > Duration::from_secs(60) {
            bail!("--drain-interval must be between 10ms and 60s");
        }
        if self.map_memory < MIN_MAP_MEMORY_BYTES {
            bail!(
                "--map-memory {} is below the {} the smallest maps need",
                bytesize::ByteSize(self.map_memory).display().iec(),
                bytesize::ByteSize(MIN_MAP_MEMORY_BYTES).display().iec()
            );
        }
        Ok(AgentConfig {
            profilers: ProfilerSettings {
                frequency_hz,
                off_cpu_sample_probability: self.sample_probability.unwrap_or(1.0),
                drain_interval: drain,
                map_memory_bytes: self.map_memory,
                max_targets: self.max_targets,
            },
            symbolizer: SymbolizerConfig {
                debug_info: self.debug_info,
                symbol_cache_bytes: DEFAULT_SYMBOL_CACHE_BYTES,
            },
            // An exited process's last samples are drained within one interval.
            exited_process_grace: (drain * 5).max(Duration::from_secs(10)),
        })
    }
}

// `--map-memory`'s default is spelled out above for `--help`: it must be the budget's default.
const _: () = assert!(DEFAULT_MAP_MEMORY_BYTES == 32 << 20);

fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!(
            "`{text}` is not a probability in (0, 1]: e.g. 0.1 keeps one switch in ten"
        )),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|error| format!("`{text}` is not a size ({error}): use e.g. 32MiB, 64M"))
}

fn max_sample_rate() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds)
            .map_err(|_| format!("`{text}` is not a duration: use e.g. 10s, 1m30s, 500ms"));
    }
    humantime::parse_duration(text).map_err(|error| {
        format!("`{text}` is not a duration ({error}): use e.g. 10s, 1m30s, 500ms")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
    }

    #[test]
    fn probabilities_must_be_in_the_unit_interval() {
        assert_eq!(parse_probability("0.1"), Ok(0.1));
        assert_eq!(parse_probability("1"), Ok(1.0));
        for bad in ["0", "1.5", "-0.2", "abc", "NaN"] {
            let error = parse_probability(bad).expect_err(bad);
            assert!(error.contains("(0, 1]"), "{bad}: {error}");
        }
    }

    #[test]
    fn bad_durations_say_what_is_expected() {
        for bad in ["ten", "-1", "5 parsecs", ""] {
            let error = parse_duration(bad).expect_err(bad);
            assert!(error.contains("e.g. 10s"), "{bad}: {error}");
        }
    }

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_size("32MiB"), Ok(32 << 20));
        assert_eq!(parse_size("64M"), Ok(64_000_000));
        assert!(parse_size("lots").expect_err("lots").contains("e.g. 32MiB"));
    }
}
