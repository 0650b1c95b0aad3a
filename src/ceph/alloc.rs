//! Allocator settings for a process that streams librados object buffers.
//!
//! glibc raises its mmap threshold every time a large mmapped block is
//! freed; after that, 4 MiB object buffers (ours, and librados' receive
//! buffers) come from the per-thread arenas of librados' many threads, where
//! freed ones stay resident. A fixed threshold and a few arenas keep the
//! resident size close to what is actually in flight.

/// Applies the settings unless the environment sets them
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`). glibc only; elsewhere a
/// no-op. Call once, first thing in `main`.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only changes glibc's allocator parameters, under
            // its own lock; it takes no pointers.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
        }
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 4) };
        }
    }
}
