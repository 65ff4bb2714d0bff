//! Kernel-side debug logs (aya-log) into the agent's tracing.
//!
//! The programs log rare events only (an off-CPU episode whose end was never seen, a failed
//! stack-map insert), rate-limited per CPU in the kernel. Whether they log at all is decided
//! when an object is loaded: with debug logging off for the `rover_agent::bpf` target, the
//! `LOG_DEBUG` global is 0 and the verifier removes every log statement.

use aya::Ebpf;
use aya_log::EbpfLogger;
use tracing::debug;

/// The tracing target kernel records are logged under.
const TARGET: &str = "rover_agent::bpf::kernel";

/// Whether the programs should log (read at load time).
pub(super) fn debug_enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Forwards aya-log records (which arrive through the `log` facade's trait) to tracing.
pub(super) struct TracingBridge;

impl log::Log for TracingBridge {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        debug!(target: TARGET, "{}", record.args());
    }

    fn flush(&self) {}
}

/// The logger of an object, when its programs log: poll its descriptor, then
/// [`flush`](EbpfLogger::flush) it.
pub(super) type KernelLogger = EbpfLogger<TracingBridge>;

/// Starts reading the log records of a loaded object whose programs were built to log.
pub(super) fn start(ebpf: &mut Ebpf) -> Option<KernelLogger> {
    if !debug_enabled() {
        return None;
    }
    match EbpfLogger::init_with_logger(ebpf, TracingBridge) {
        Ok(logger) => Some(logger),
        Err(error) => {
            debug!("kernel-side debug logs unavailable: {error}");
            None
        }
    }
}
