//! The agent's heap.

/// Gives the heap memory a moment of work freed (a big binary's parse, the first report of
/// every process of a node) back to the system: glibc keeps freed pages below live ones.
pub(crate) fn release_freed_memory() {
    // SAFETY: glibc's malloc_trim only walks its own heap.
    unsafe { libc::malloc_trim(0) };
}
