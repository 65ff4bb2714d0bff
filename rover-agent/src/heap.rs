//! The agent's heap.

/// One heap for all of the agent's threads, set before any thread starts (a thread takes its
/// arena at its first allocation): glibc's per-thread arenas keep what a thread freed (a
/// profiler's load, a task's symbol caches, a first scan's reads) out of reach of malloc_trim
/// and of the other threads, so an agent back to idle would keep the memory of its busiest
/// moment.
pub(crate) fn use_one_arena() {
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Gives the heap memory a moment of work freed (a big binary's parse, the first report of
/// every process of a node) back to the system: glibc keeps freed pages below live ones.
pub(crate) fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim only walks its own heap.
    unsafe { libc::malloc_trim(0) };
}
