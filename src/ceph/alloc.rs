//! Allocator settings for a process that streams librados object buffers.
//!
//! Every read of a copy passes through a buffer librados' messenger
//! allocates for the reply (and, for sparse objects, one librbd fills with
//! zeroes) before it lands in the copy's own buffer. glibc serves blocks at
//! or above its mmap threshold with a fresh mapping: a 4 MiB block then costs
//! a thousand page faults each time, which measured 0.5 s per GiB copied on
//! two cores. Below the threshold the blocks come from the heap and are
//! reused. Left alone, glibc raises the threshold as large blocks are freed,
//! and freed blocks stay resident in the arenas of librados' many threads.
//!
//! So the threshold is set just above the largest transient block (twice the
//! copy chunk), and the arenas are capped: blocks are reused, and the
//! resident size stays close to what is actually in flight.

/// Applies the settings unless the environment sets them
/// (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_ARENA_MAX`). `largest_block`: the
/// largest buffer allocated per operation (the copy chunk). glibc only;
/// elsewhere a no-op. Call first thing in `main`.
pub fn tune_allocator(largest_block: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // Room for the chunk plus librados' alignment and headers.
            let threshold = largest_block.saturating_mul(2).clamp(1 << 20, 32 << 20);
            let threshold = libc::c_int::try_from(threshold).unwrap_or(libc::c_int::MAX);
            // SAFETY: mallopt only changes glibc's allocator parameters, under
            // its own lock; it takes no pointers.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) };
        }
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, 4) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = largest_block;
}
