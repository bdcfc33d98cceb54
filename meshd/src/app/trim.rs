//! Memory a reload freed, handed back to the kernel. A reload builds the
//! next config and snapshot beside the running ones and parses its files
//! in between, then drops the old: with glibc, most of what it freed stays
//! in the allocator's arenas — counted in meshd's RSS, and so against the
//! pod's memory limit, until reused. `malloc_trim` returns the free pages
//! of every arena (not only the top of the heap, as glibc does on its own).

/// Hands back the pages the allocator holds free (glibc only; elsewhere a
/// no-op).
#[cfg(target_env = "gnu")]
pub fn release_freed() {
    // SAFETY: `malloc_trim` takes no pointer and works on glibc's own
    // arenas under their locks; any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
pub fn release_freed() {}
