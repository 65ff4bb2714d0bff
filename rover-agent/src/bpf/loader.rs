//! The loader of the engine's objects, made once per engine: aya's loader parses the kernel's
//! BTF when it is made (~20 MB of memory for a moment, which this agent never uses: Rust eBPF
//! has no CO-RE relocations), so one loader serves every load instead of each load paying it.

use aya::EbpfLoader;

use super::ProfilerSettings;

/// The load-time globals of every object, fixed for the engine's life. Names absent from an
/// object are skipped (one loader loads all three objects).
pub(super) struct Globals {
    /// `LOG_DEBUG` (profilers): kernel debug logs compiled in.
    log_debug: u8,
    /// `SAMPLE_ALL`, `SAMPLE_THRESHOLD` (off-CPU): keep every switch-out, or those whose
    /// random u32 is below the threshold (p × 2^32).
    sample_all: u8,
    sample_threshold: u32,
    /// `TASK_TGID_OFFSET` (events): where `task_struct::tgid` is; `None` when the kernel's BTF
    /// does not tell (no fork events then).
    pub task_tgid_offset: Result<u32, String>,
}

impl Globals {
    pub fn new(settings: &ProfilerSettings) -> Self {
        let p = settings.off_cpu_sample_probability;
        Self {
            log_debug: u8::from(super::log::debug_enabled()),
            sample_all: u8::from(p >= 1.0),
            sample_threshold: (p * 4_294_967_296.0).min(f64::from(u32::MAX)) as u32,
            task_tgid_offset: super::kernel_btf::task_tgid_offset(),
        }
    }
}

/// A loader with the globals set; each load adds its maps' sizes.
pub(super) fn loader(globals: &Globals) -> EbpfLoader<'_> {
    let mut loader = EbpfLoader::new();
    loader
        // Rust eBPF carries no CO-RE relocations: the kernel's BTF would only cost memory.
        .btf(None)
        .override_global("LOG_DEBUG", &globals.log_debug, false)
        .override_global("SAMPLE_ALL", &globals.sample_all, false)
        .override_global("SAMPLE_THRESHOLD", &globals.sample_threshold, false)
        // The off-CPU profiler's THREADS is task-local storage, which aya creates but has no
        // type for (the program alone uses it).
        .allow_unsupported_maps();
    if let Ok(offset) = &globals.task_tgid_offset {
        loader.override_global("TASK_TGID_OFFSET", offset, false);
    }
    loader
}
