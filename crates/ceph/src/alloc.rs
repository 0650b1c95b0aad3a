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
//! resident size stays close to what is actually in flight. The copy's own
//! buffers, long-lived, are mapped apart ([`ProcessAllocator`]) so that they
//! do not fragment those arenas.

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

/// Hands the free memory of glibc's arenas back to the system
/// (`malloc_trim(0)`): what librbd freed when image handles closed and the
/// reply buffers of copies that ended stay resident otherwise (measured: 200
/// image handles opened and closed left 68 MiB resident). The replayer calls
/// it after each sync, and the copies every 32 MiB they read in all.
/// Blocking (walks every arena, a fraction of a millisecond here); glibc
/// only, elsewhere a no-op.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and runs under glibc's own arena
    // locks, so it is safe alongside allocations on other threads.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Rust allocations of at least this many bytes are mapped on their own.
const LARGE: usize = 1 << 20;

/// The process's Rust allocator (installed by the binary): large blocks, in
/// practice the copy buffers, are mapped on their own instead of coming from
/// glibc's arenas; everything else is the system allocator's.
///
/// The copy buffers live long (the byte budget reuses them) while librados'
/// transient reply buffers of the same size churn through the same arenas:
/// interleaved, they fragment the arenas, which grew to three times the
/// budget with six images copied at once. Mapped apart, the buffers are
/// bounded by the budget and returned whole when freed; the reuse keeps
/// them from page-faulting again.
#[derive(Debug, Default)]
pub struct ProcessAllocator;

impl ProcessAllocator {
    fn mapped(layout: std::alloc::Layout) -> bool {
        layout.size() >= LARGE && layout.align() <= 4096
    }
}

// Large blocks come from anonymous private mappings, which are page-aligned
// (so any alignment up to 4096 holds), zero-filled, and unmapped with the
// same length in `dealloc` (Rust passes the layout the block was allocated or
// reallocated with); everything else is delegated to `System` unchanged.
// SAFETY: as above.
unsafe impl std::alloc::GlobalAlloc for ProcessAllocator {
    // SAFETY: callers uphold `GlobalAlloc::alloc`'s contract (see the impl).
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if !Self::mapped(layout) {
            // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
            return unsafe { std::alloc::System.alloc(layout) };
        }
        // SAFETY: an anonymous mapping takes no pointers; failure is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            p.cast()
        }
    }

    // SAFETY: `GlobalAlloc::alloc_zeroed`'s contract, upheld as for the impl above.
    // SAFETY: callers uphold `GlobalAlloc::alloc_zeroed`'s contract (see the impl).
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if Self::mapped(layout) {
            // SAFETY: as `alloc`; fresh anonymous mappings are zero-filled.
            unsafe { self.alloc(layout) }
        } else {
            // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
    }

    // SAFETY: `GlobalAlloc::dealloc`'s contract, upheld as for the impl above.
    // SAFETY: callers uphold `GlobalAlloc::dealloc`'s contract (see the impl).
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        if Self::mapped(layout) {
            // SAFETY: ptr was mapped by `alloc` with exactly layout.size().
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
        } else {
            // SAFETY: ptr came from `System` with this layout.
            unsafe { std::alloc::System.dealloc(ptr, layout) };
        }
    }

    // SAFETY: `GlobalAlloc::realloc`'s contract, upheld as for the impl above.
    // SAFETY: callers uphold `GlobalAlloc::realloc`'s contract (see the impl).
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let new =
            // SAFETY: the caller guarantees that new_size makes a valid layout.
            unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !Self::mapped(layout) && !Self::mapped(new) {
            // SAFETY: both the old and the new block belong to `System`.
            return unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        }
        // Moving between a mapped and a heap block: allocate, copy, free.
        // SAFETY: both blocks are valid for the copied prefix and disjoint;
        // the old block is freed with its own layout.
        unsafe {
            let p = self.alloc(new);
            if !p.is_null() {
                std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
            p
        }
    }
}
