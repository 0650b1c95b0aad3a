//! The data mover: copies the extents that changed between two snapshots of
//! the primary (or all allocated extents, for a first sync) into the replica
//! with bounded parallel aio.
//!
//! Runs on a blocking thread. One scheduler loop submits aio reads while the
//! byte budget and op limit allow, and reacts to completions arriving on a
//! channel from librbd's and librados' completion threads: a finished read
//! becomes writes (nothing for all-zero runs on a fresh replica, exact
//! zeroes otherwise; a sparse read's data written straight from librados'
//! buffer); a finished write returns its buffer to a free list.
//! Memory is bounded by the budget whatever the image size.
//!
//! Reads and writes go through librbd, or, where the caller provides the
//! images' data objects ([`Source::objects`], [`Dest::objects`]), to the
//! objects directly: a delta's extents of one object in one read and one
//! write, a first sync's allocated data only (sparse reads).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;

use csirr_ceph::{self as ceph, DataObjects, Image, objects::SparseData};

use super::error::{EngineError, Result};

/// Limits of one copy.
#[derive(Debug, Clone, Copy)]
pub struct CopyLimits {
    /// Bytes of data buffers in flight at most.
    pub max_inflight_bytes: usize,
    /// Aio operations in flight at most.
    pub max_ops: usize,
    /// Largest single read/write.
    pub chunk: u64,
}

impl CopyLimits {
    /// The default chunk: half an RBD object. Larger chunks mean larger
    /// transient buffers in librados and librbd (see
    /// [`csirr_ceph::alloc`]); smaller ones more operations per object,
    /// which costs more on sparse objects, read whole on a first sync.
    pub const DEFAULT_CHUNK: u64 = 2 << 20;
}

impl Default for CopyLimits {
    fn default() -> Self {
        Self {
            max_inflight_bytes: 16 << 20,
            max_ops: 32,
            chunk: Self::DEFAULT_CHUNK,
        }
    }
}

/// What a copy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the primary.
    pub bytes_read: u64,
    /// Bytes written to the replica (data).
    pub bytes_written: u64,
    /// Bytes zeroed on the replica.
    pub bytes_zeroed: u64,
    /// Bytes read that were all zero and needed no write.
    pub bytes_skipped: u64,
    /// Of `bytes_zeroed`, the holes zeroed without reading anything.
    pub bytes_holes: u64,
}

impl CopyStats {
    /// Bytes of the delta applied: every byte read from the source, plus
    /// holes zeroed without a read (zero buffers are not counted twice).
    pub fn transferred(&self) -> u64 {
        self.bytes_read + self.bytes_holes
    }
}

/// A unit of work: copy `len` bytes at `off`, or zero them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in bytes.
    pub off: u64,
    /// Length in bytes.
    pub len: u64,
    /// `true`: data to copy; `false`: must become zeroes.
    pub data: bool,
}

/// Lists the extents of `src` (opened at the target snapshot) that differ from
/// snapshot `from` (`None`: everything a reader sees as allocated, a clone's
/// parent data included, so that a replica is a flat copy of it), split at
/// `chunk` boundaries.
///
/// `whole_object` lists whole objects instead of the extents inside them:
/// with a valid fast-diff object map librbd answers from the map alone (a
/// 1 TiB thin image in 0.07 s, instead of one `list_snaps` per object, 13 s
/// on the dev pair); without one, it falls back to asking the objects and
/// still reports whole objects. A superset of the changed extents, for a
/// caller that reads the objects sparsely or skips zeroes.
pub fn changed_extents(
    src: &Image,
    from: Option<&str>,
    size: u64,
    chunk: u64,
    whole_object: bool,
) -> Result<Vec<Extent>> {
    diff_extents(src, from, size, chunk, from.is_none(), whole_object).map_err(|source| {
        EngineError::Ceph {
            context: format!("listing changed extents of {}", src.spec()),
            source,
        }
    })
}

/// Lists the whole objects a clone `src` (opened at the target snapshot)
/// holds itself, its parent's data left out (`diff_iterate2` from the
/// image's creation with `include_parent` off), split at `chunk`
/// boundaries: what a replica that is a clone of the same parent snapshot
/// lacks. Whole objects, because an object the clone holds is read from it
/// alone (zeroes past its end, never the parent's data), and a replica's
/// object must be overwritten entirely after librbd copies it up from the
/// replica's parent.
pub fn own_extents(src: &Image, size: u64, chunk: u64) -> Result<Vec<Extent>> {
    diff_extents(src, None, size, chunk, false, true).map_err(|source| EngineError::Ceph {
        context: format!("listing the objects of clone {}", src.spec()),
        source,
    })
}

/// `diff_iterate2` over `[0, size)` since `from`, split at `chunk`
/// boundaries.
fn diff_extents(
    src: &Image,
    from: Option<&str>,
    size: u64,
    chunk: u64,
    include_parent: bool,
    whole_object: bool,
) -> ceph::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let r = src.diff_iterate::<_, std::convert::Infallible>(
        from,
        0,
        size,
        include_parent,
        whole_object,
        |off, len, exists| {
            push_split(&mut out, off, len, exists, chunk);
            Ok(())
        },
    );
    match r {
        Ok(()) => Ok(out),
        Err(ceph::rbd::DiffError::Ceph(e)) => Err(e),
        Err(ceph::rbd::DiffError::Callback(never)) => match never {},
    }
}

/// Appends `[off, off+len)` split at multiples of `chunk`.
fn push_split(out: &mut Vec<Extent>, off: u64, len: u64, data: bool, chunk: u64) {
    let end = off.saturating_add(len);
    let mut o = off;
    while o < end {
        let boundary = (o / chunk + 1).saturating_mul(chunk);
        let e = boundary.min(end);
        out.push(Extent {
            off: o,
            len: e - o,
            data,
        });
        o = e;
    }
}

/// The extents at or above `offset` (an extent straddling it is cut).
pub fn skip_below(extents: &[Extent], offset: u64) -> Vec<Extent> {
    extents
        .iter()
        .filter(|e| e.off + e.len > offset)
        .map(|e| {
            let start = e.off.max(offset);
            Extent {
                off: start,
                len: e.off + e.len - start,
                data: e.data,
            }
        })
        .collect()
}

/// Ranges allocated in `have` that `want` does not cover: what a replica
/// holds beyond the source's allocated extents, which must become zero.
/// Linear in the number of extents after sorting (a resumed first sync of a
/// large image has many on both sides).
pub fn uncovered(have: &[Extent], want: &[Extent]) -> Vec<(u64, u64)> {
    let ranges = |x: &[Extent]| {
        let mut r: Vec<(u64, u64)> = x
            .iter()
            .filter(|e| e.len > 0)
            .map(|e| (e.off, e.off.saturating_add(e.len)))
            .collect();
        r.sort_unstable();
        r
    };
    // Disjoint and sorted, so their ends grow too.
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (s, e) in ranges(want) {
        match covered.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => covered.push((s, e)),
        }
    }
    let mut out = Vec::new();
    let mut first = 0;
    for (mut s, e) in ranges(have) {
        while covered.get(first).is_some_and(|c| c.1 <= s) {
            first += 1;
        }
        for &(cs, ce) in covered[first..].iter().take_while(|c| c.0 < e) {
            if cs > s {
                out.push((s, cs));
            }
            s = s.max(ce);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

enum Event {
    /// A sparse read of extent `idx` (`len` bytes taken from the budget for
    /// it).
    Sparse {
        idx: usize,
        /// Object size of the source.
        obj: u64,
        len: usize,
        res: ceph::Result<SparseData>,
    },
    /// A read of extents `first..first + count`, one after the other in
    /// `buf`.
    Read {
        first: usize,
        count: usize,
        /// Read from the data objects directly (not through librbd).
        direct: bool,
        res: ceph::Result<()>,
        buf: Vec<u8>,
    },
    /// A direct write of extents `first..first + count` (in one object):
    /// `written` bytes of data from `bufs` (or, when `bufs` is empty, from
    /// a sparse read's own buffer, `written` bytes of the budget held for
    /// it) and `zeroed` bytes of zeroes.
    WrittenObject {
        first: usize,
        count: usize,
        written: u64,
        zeroed: u64,
        res: ceph::Result<()>,
        bufs: Vec<Vec<u8>>,
        from_read: bool,
    },
    Written {
        idx: usize,
        /// Bytes this write covers (a part of the extent).
        len: u64,
        res: ceph::Result<usize>,
        buf: Vec<u8>,
        zero: bool,
        /// Zeroes a hole of the diff (nothing was read for it).
        hole: bool,
    },
}

/// Most extents read in one operation on an object.
const MAX_UNIT_EXTENTS: usize = 64;

/// The end (exclusive) of the read unit starting at data extent `start`:
/// with `objects`, the following data extents of the same object up to
/// `chunk` bytes in all; through librbd, the extent alone.
fn unit_end(extents: &[Extent], start: usize, obj_size: Option<u64>, chunk: u64) -> usize {
    let Some(obj) = obj_size.filter(|o| *o > 0) else {
        return start + 1;
    };
    let first = extents[start];
    let objno = first.off / obj;
    if (first.off + first.len - 1) / obj != objno {
        return start + 1;
    }
    let mut bytes = first.len;
    let mut end = start + 1;
    while let Some(e) = extents.get(end) {
        if !e.data
            || e.off / obj != objno
            || (e.off + e.len - 1) / obj != objno
            || bytes + e.len > chunk
            || end - start >= MAX_UNIT_EXTENTS
        {
            break;
        }
        bytes += e.len;
        end += 1;
    }
    end
}

/// Granularity of zero detection inside a read buffer: runs of zero blocks
/// are skipped on a fresh replica (it stays sparse) or zeroed exactly.
const ZERO_BLOCK: usize = 64 << 10;

/// Splits `buf` into maximal runs of all-zero and non-zero blocks of
/// [`ZERO_BLOCK`] bytes: `(start, len, zero)`.
fn zero_runs(buf: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (i, block) in buf.chunks(ZERO_BLOCK).enumerate() {
        let zero = is_zero(block);
        match runs.last_mut() {
            Some(r) if r.2 == zero => r.1 += block.len(),
            _ => runs.push((i * ZERO_BLOCK, block.len(), zero)),
        }
    }
    runs
}

/// Operations still outstanding for an extent that can never complete: one
/// of its writes was not submitted, so completions of the others must not
/// count it done (a checkpoint would then skip it on resume).
const NEVER_DONE: u32 = u32::MAX;

/// What an extent waits for after submitting its writes: `subs` operations
/// went out and `failed` says whether one could not be submitted. `0`: done
/// now (nothing to write); [`NEVER_DONE`] when a submission failed.
fn outstanding(subs: u32, failed: bool) -> u32 {
    if failed { NEVER_DONE } else { subs }
}

/// Tracks which extents are done, to report the offset below which every
/// extent is complete: the checkpoint a resumed copy can skip to.
struct Watermark {
    done: Vec<bool>,
    low: usize,
}

impl Watermark {
    fn new(n: usize) -> Self {
        Self {
            done: vec![false; n],
            low: 0,
        }
    }

    fn complete(&mut self, idx: usize) {
        if let Some(d) = self.done.get_mut(idx) {
            *d = true;
        }
        while self.done.get(self.low).copied().unwrap_or(false) {
            self.low += 1;
        }
    }

    /// Offset below which all extents are complete.
    fn offset(&self, extents: &[Extent]) -> u64 {
        match extents.get(self.low) {
            Some(e) => e.off,
            None => extents.last().map_or(0, |e| e.off + e.len),
        }
    }
}

/// A byte-rate cap (token bucket, burst of one second), shared by every copy
/// it applies to. A rate of 0 means unlimited; the rate can change at any
/// time.
#[derive(Debug)]
pub struct Throttle {
    rate: std::sync::atomic::AtomicU64,
    state: parking_lot::Mutex<(f64, std::time::Instant)>,
}

impl Throttle {
    /// A throttle of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: std::sync::atomic::AtomicU64::new(bytes_per_sec),
            state: parking_lot::Mutex::new((bytes_per_sec as f64, std::time::Instant::now())),
        }
    }

    /// Changes the rate.
    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }

    /// The current rate (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Gives back `n` bytes taken for a read that returned less.
    fn refund(&self, n: u64) {
        let rate = self.rate() as f64;
        if rate > 0.0 {
            let mut st = self.state.lock();
            st.0 = (st.0 + n as f64).min(rate);
        }
    }

    /// Takes `n` bytes, or says how long to wait before trying again.
    fn try_take(&self, n: u64) -> Result<(), std::time::Duration> {
        let rate = self.rate() as f64;
        if rate <= 0.0 {
            return Ok(());
        }
        let mut st = self.state.lock();
        let now = std::time::Instant::now();
        let elapsed = now.duration_since(st.1).as_secs_f64();
        st.0 = (st.0 + elapsed * rate).min(rate.max(n as f64));
        st.1 = now;
        if st.0 >= n as f64 {
            st.0 -= n as f64;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((n as f64 - st.0) / rate))
        }
    }
}

/// Takes `n` bytes from every throttle, or the longest wait among them.
fn take_all(throttles: &[&Throttle], n: u64) -> Result<(), std::time::Duration> {
    // Check first so that a refusal takes nothing from the others.
    let wait = throttles.iter().filter_map(|t| t.peek_wait(n)).max();
    if let Some(w) = wait {
        return Err(w);
    }
    for t in throttles {
        let _ = t.try_take(n);
    }
    Ok(())
}

impl Throttle {
    fn peek_wait(&self, n: u64) -> Option<std::time::Duration> {
        let rate = self.rate() as f64;
        if rate <= 0.0 {
            return None;
        }
        let st = self.state.lock();
        let tokens = (st.0 + st.1.elapsed().as_secs_f64() * rate).min(rate.max(n as f64));
        (tokens < n as f64).then(|| std::time::Duration::from_secs_f64((n as f64 - tokens) / rate))
    }
}

/// Whether `buf` holds only zero bytes: 256 bytes at a time, ORed as
/// machine words (which the compiler vectorises), stopping at the first
/// block with data. A first sync of a thin volume scans gigabytes of zeroes.
fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(256);
    blocks.by_ref().all(|b| {
        b.chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8])))
            .fold(0, |acc, w| acc | w)
            == 0
    }) && blocks.remainder().iter().all(|b| *b == 0)
}

/// A byte budget shared by the copies running at once: a lone copy may use
/// all of it, several share it first come, first served. Each copy may
/// always keep one operation in flight beyond it, so none starves.
///
/// It also keeps the large read buffers the copies give back (up to the
/// limit): a 2 MiB buffer reused costs nothing, a new one 512 page faults.
/// The spares are released when the last copy using the budget ends.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
    /// Copies currently using the budget.
    copies: AtomicUsize,
    spare: parking_lot::Mutex<Vec<Vec<u8>>>,
}

/// Buffers at least this large are kept for reuse (smaller ones come from
/// the allocator's heap cheaply).
const SPARE_MIN: usize = 1 << 20;

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
            copies: AtomicUsize::new(0),
            spare: parking_lot::Mutex::new(Vec::new()),
        }
    }

    /// Bytes currently taken.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_take(&self, n: usize, force: bool) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if !force && cur + n > self.limit {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    fn spares(&self) -> parking_lot::MutexGuard<'_, Vec<Vec<u8>>> {
        self.spare.lock()
    }

    /// A buffer of `len` bytes (contents unspecified): a spare large enough
    /// if there is one, else a new one with room for the next power of two
    /// (the reads of a copy come in a few sizes up to its chunk).
    fn buffer(&self, len: usize) -> Vec<u8> {
        if len < SPARE_MIN {
            return vec![0; len];
        }
        let found = {
            let mut spare = self.spares();
            let best = spare
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            best.map(|i| spare.swap_remove(i))
        };
        let mut b = found.unwrap_or_else(|| Vec::with_capacity(len.next_power_of_two()));
        // Within the capacity: no reallocation, at most the growth zeroed.
        b.resize(len, 0);
        b
    }

    /// Takes back a buffer whose bytes are no longer counted as in flight:
    /// kept if it is large and the spares stay within the limit. A new
    /// buffer is made only when no spare fits, so the large buffers in
    /// existence never outnumber the most that were in flight at once.
    fn recycle(&self, buf: Vec<u8>) {
        if buf.capacity() < SPARE_MIN {
            return;
        }
        let mut spare = self.spares();
        let kept: usize = spare.iter().map(Vec::capacity).sum();
        if self.copies.load(Ordering::Acquire) > 0 && kept + buf.capacity() <= self.limit {
            spare.push(buf);
        }
    }

    /// Registers a copy; the spares go when the last one ends.
    fn enter(&self) -> BudgetUser<'_> {
        self.copies.fetch_add(1, Ordering::AcqRel);
        BudgetUser(self)
    }
}

/// A copy's registration with a [`ByteBudget`].
struct BudgetUser<'a>(&'a ByteBudget);

impl Drop for BudgetUser<'_> {
    fn drop(&mut self) {
        let mut spare = self.0.spares();
        if self.0.copies.fetch_sub(1, Ordering::AcqRel) == 1 {
            spare.clear();
            spare.shrink_to_fit();
        }
    }
}

/// The bytes one copy has in flight, against its own cap and the budget
/// (its own, or one shared with other copies); whatever is still held goes
/// back on drop.
struct InFlight<'a> {
    budget: &'a ByteBudget,
    cap: usize,
    bytes: usize,
}

impl InFlight<'_> {
    /// Takes `n` bytes if both budgets allow it, or unconditionally with
    /// `force` (the copy's only operation, or a write replacing its read).
    fn try_take(&mut self, n: usize, force: bool) -> bool {
        if !force && self.bytes + n > self.cap {
            return false;
        }
        if !self.budget.try_take(n, force) {
            return false;
        }
        self.bytes += n;
        true
    }

    /// Takes `n` bytes whatever the budgets say (a write replacing the read
    /// whose bytes it carries).
    fn take(&mut self, n: usize) {
        self.try_take(n, true);
    }

    fn give(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.budget.give(n);
    }

    /// Gives back the bytes of `buf` and the buffer itself.
    fn release(&mut self, buf: Vec<u8>) {
        self.give(buf.len());
        self.budget.recycle(buf);
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.bytes;
        self.give(n);
    }
}

/// Where the data extents of a copy are read from.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// The image (at the snapshot copied), read through librbd.
    pub image: &'a Image,
    /// Its data objects at that snapshot, read directly when the layout
    /// allows: the extents of one object in one operation.
    pub objects: Option<&'a DataObjects>,
    /// The data extents are allocated regions, not written ones (a first
    /// sync lists whole objects): read each from `objects` with a sparse
    /// read, which returns only what is allocated in it.
    pub sparse: bool,
}

impl<'a> From<&'a Image> for Source<'a> {
    fn from(image: &'a Image) -> Self {
        Self {
            image,
            objects: None,
            sparse: false,
        }
    }
}

/// Where a copy writes.
#[derive(Debug, Clone, Copy)]
pub struct Dest<'a> {
    /// The image, written through librbd.
    pub image: &'a Image,
    /// Its data objects at the head ([`DataObjects::open_head`]), written
    /// directly, the extents of an object in one operation. The caller has
    /// marked the objects in the object map
    /// ([`ceph::objects::mark_objects_exist`]), holds the exclusive lock,
    /// takes no snapshot during the copy, and makes librbd reload its map
    /// after it. Whole-extent zeroes (discards) still go through librbd.
    pub objects: Option<&'a DataObjects>,
}

impl<'a> From<&'a Image> for Dest<'a> {
    fn from(image: &'a Image) -> Self {
        Self {
            image,
            objects: None,
        }
    }
}

/// Copies `extents` (sorted by offset) from `src` to `dst`. `fresh` says the
/// replica is known to be all zeroes where not yet written (newly created),
/// so all-zero data needs no write. `progress(done_bytes, watermark)` is
/// called as work completes, with the offset below which every extent is
/// complete; `throttles` cap the byte rate; `cancelled()` turning true stops
/// submitting and drains. `shared`: a byte budget this copy shares with
/// others (besides its own `limits`). Blocking.
#[allow(clippy::too_many_arguments)]
pub fn copy_extents(
    src: Source<'_>,
    dest: Dest<'_>,
    extents: &[Extent],
    fresh: bool,
    limits: CopyLimits,
    shared: Option<&ByteBudget>,
    throttles: &[&Throttle],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyStats> {
    let own;
    let budget = match shared {
        Some(b) => b,
        None => {
            own = ByteBudget::new(limits.max_inflight_bytes.max(limits.chunk as usize));
            &own
        }
    };
    let _user = budget.enter();
    let dst = dest.image;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut c = Copier {
        src,
        dst,
        dst_objects: dest.objects,
        extents,
        fresh,
        limits,
        throttles,
        budget,
        tx,
        stats: CopyStats::default(),
        inflight: InFlight {
            budget,
            cap: limits.max_inflight_bytes.max(limits.chunk as usize),
            bytes: 0,
        },
        ops: 0,
        pending: vec![0u32; extents.len()],
        mark: Watermark::new(extents.len()),
        done_bytes: 0,
        first_err: None,
        progress,
        obj_size: src.objects.map(DataObjects::object_size),
        next: 0,
        retry: VecDeque::new(),
        throttle_wait: None,
    };
    // Submit what the limits allow, wait for one completion, handle it:
    // until everything is done or an error stopped the submissions and the
    // operations in flight have drained.
    let mut read_before = 0u64;
    loop {
        trim_now_and_then(c.stats.bytes_read - read_before);
        read_before = c.stats.bytes_read;
        c.submit_all(cancelled);
        let ev = match c.wait(&rx) {
            Wait::Event(ev) => ev,
            Wait::Again => continue,
            Wait::Done => break,
        };
        c.handle(ev);
    }
    if let Some(e) = c.first_err {
        return Err(e);
    }
    let stats = c.stats;
    dst.flush().map_err(|e| ceph_err("flushing", dst, e))?;
    Ok(stats)
}

/// Bytes read by all copies between two returns of freed memory to the
/// system.
const TRIM_EVERY: u64 = 32 << 20;

/// Counts `read` bytes against [`TRIM_EVERY`] across all copies and, when
/// they add up to it, returns the memory freed meanwhile (librados' reply
/// buffers leave holes in glibc's arenas, which otherwise stay resident).
fn trim_now_and_then(read: u64) {
    static SINCE: AtomicU64 = AtomicU64::new(0);
    if read == 0 {
        return;
    }
    let before = SINCE.fetch_add(read, Ordering::Relaxed);
    if before + read >= TRIM_EVERY && SINCE.swap(0, Ordering::Relaxed) >= TRIM_EVERY {
        ceph::alloc::release_free_memory();
    }
}

/// What the copy loop does after submitting.
enum Wait {
    /// Handle this completion.
    Event(Event),
    /// Submit again (a throttle's wait is over).
    Again,
    /// Nothing in flight and nothing more to submit (or an error).
    Done,
}

/// Whether the unit lies in one object of `obj` bytes (the extents are
/// split at the copy chunk, which may be larger than a small object).
fn unit_end_in_object(unit: &[Extent], obj: u64) -> bool {
    match (unit.first(), unit.last()) {
        (Some(f), Some(l)) => f.off / obj == (l.off + l.len - 1) / obj,
        _ => false,
    }
}

fn ceph_err(what: &str, img: &Image, e: ceph::Error) -> EngineError {
    EngineError::Ceph {
        context: format!("{what} {}", img.spec()),
        source: e,
    }
}

/// The data read for one extent: a buffer of its own, or its part of a
/// buffer shared with the other extents of its object.
enum Data<'b> {
    Owned(Vec<u8>),
    Part(&'b [u8]),
}

/// One write of a copy: offset, length, and the data (`None`: zeroes).
type Part = (u64, u64, Option<Vec<u8>>);

/// The state of one copy between its submissions and completions.
struct Copier<'a, 'p> {
    src: Source<'a>,
    dst: &'a Image,
    /// The destination's data objects, written directly.
    dst_objects: Option<&'a DataObjects>,
    extents: &'a [Extent],
    fresh: bool,
    limits: CopyLimits,
    throttles: &'a [&'a Throttle],
    budget: &'a ByteBudget,
    tx: mpsc::Sender<Event>,
    stats: CopyStats,
    inflight: InFlight<'a>,
    /// Operations in flight.
    ops: usize,
    /// Writes still outstanding per extent.
    pending: Vec<u32>,
    mark: Watermark,
    done_bytes: u64,
    first_err: Option<EngineError>,
    progress: &'p mut dyn FnMut(u64, u64),
    /// The source's object size while its data objects are read directly;
    /// `None` after a direct read failed (the rest goes through librbd).
    obj_size: Option<u64>,
    /// The next extent to submit.
    next: usize,
    /// Data extents whose direct read failed, to read again through librbd.
    retry: VecDeque<usize>,
    /// Set when a throttle stopped the submissions: how long it asks to
    /// wait.
    throttle_wait: Option<std::time::Duration>,
}

impl<'a> Copier<'a, '_> {
    /// Hands one completion to its handler.
    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Sparse { idx, obj, len, res } => self.on_sparse(idx, obj, len, res),
            Event::Read {
                first,
                count,
                direct,
                res,
                buf,
            } => self.on_read(first, count, direct, res, buf),
            Event::WrittenObject {
                first,
                count,
                written,
                zeroed,
                res,
                bufs,
                from_read,
            } => {
                if from_read {
                    self.inflight.give(written as usize);
                }
                self.on_written_object(first..first + count, written, zeroed, res, bufs)
            }
            Event::Written {
                idx,
                len,
                res,
                buf,
                zero,
                hole,
            } => self.on_written(idx, len, res, buf, zero, hole),
        }
    }

    /// Submits reads (and the zeroing of holes) as long as the limits allow,
    /// until everything is submitted, a limit is reached, or an error.
    fn submit_all(&mut self, cancelled: &dyn Fn() -> bool) {
        while self.first_err.is_none()
            && (!self.retry.is_empty() || self.next < self.extents.len())
            && self.ops < self.limits.max_ops
        {
            if cancelled() {
                self.first_err = Some(EngineError::Unavailable("sync cancelled".into()));
                break;
            }
            let again = self.retry.front().copied();
            let idx = again.unwrap_or(self.next);
            let submitted = if !self.extents[idx].data {
                self.submit_zeroes(idx)
            } else if let Some(sparse) = self.try_submit_sparse(idx, again.is_some()) {
                sparse
            } else {
                self.submit_read(idx, again.is_some())
            };
            if !submitted {
                break;
            }
        }
    }

    /// Zeroes hole `idx` on the destination. False when it failed.
    fn submit_zeroes(&mut self, idx: usize) -> bool {
        let ext = self.extents[idx];
        let done = self.written(idx, ext.len, true, true);
        let r = self.dst.aio_write_zeroes(ext.off, ext.len, done);
        if let Err(e) = r {
            self.first_err = Some(ceph_err("zeroing", self.dst, e));
            return false;
        }
        self.pending[idx] = 1;
        self.ops += 1;
        self.next += 1;
        true
    }

    /// Starts a sparse read of data extent `idx` when the source is read
    /// sparsely and the extent lies in one object: `Some(submitted)`, or
    /// `None` when it is read otherwise.
    fn try_submit_sparse(&mut self, idx: usize, again: bool) -> Option<bool> {
        let (true, Some(objects), Some(obj), false) =
            (self.src.sparse, self.src.objects, self.obj_size, again)
        else {
            return None;
        };
        if !unit_end_in_object(&self.extents[idx..=idx], obj) {
            return None;
        }
        match self.submit_sparse(objects, idx, obj, self.ops == 0) {
            Ok(()) => {
                self.next += 1;
                Some(true)
            }
            Err(wait) => {
                self.throttle_wait = wait;
                Some(false)
            }
        }
    }

    /// Starts the read of the unit starting at data extent `idx`: the
    /// extents of one object in one direct operation, or the extent alone
    /// through librbd (`again`: a direct read of it failed). False when a
    /// limit or an error stopped it.
    fn submit_read(&mut self, idx: usize, again: bool) -> bool {
        let (extents, ext) = (self.extents, self.extents[idx]);
        let end = unit_end(extents, idx, self.obj_size, self.limits.chunk);
        let unit = &extents[idx..end];
        let direct = match (self.src.objects, self.obj_size) {
            (Some(o), Some(obj)) if !again && unit_end_in_object(unit, obj) => Some((o, obj)),
            _ => None,
        };
        let unit = if direct.is_some() { unit } else { &unit[..1] };
        let len: u64 = unit.iter().map(|e| e.len).sum();
        let Ok(ulen) = usize::try_from(len) else {
            self.first_err = Some(EngineError::Internal(format!("extent of {len} bytes")));
            return false;
        };
        if !self.inflight.try_take(ulen, self.ops == 0) {
            return false;
        }
        if let Err(wait) = take_all(self.throttles, len) {
            self.inflight.give(ulen);
            self.throttle_wait = Some(wait);
            return false;
        }
        let buf = self.budget.buffer(ulen);
        let t = self.tx.clone();
        let count = unit.len();
        let r = match direct {
            Some((objects, obj)) => {
                let spans: Vec<(u64, usize)> =
                    unit.iter().map(|e| (e.off % obj, e.len as usize)).collect();
                objects.aio_read(
                    ext.off / obj,
                    &spans,
                    buf,
                    Box::new(move |res, buf| {
                        let _ = t.send(Event::Read {
                            first: idx,
                            count,
                            direct: true,
                            res,
                            buf,
                        });
                    }),
                )
            }
            None => self.src.image.aio_read(
                ext.off,
                buf,
                Box::new(move |res, buf| {
                    let _ = t.send(Event::Read {
                        first: idx,
                        count: 1,
                        direct: false,
                        res: res.map(|_| ()),
                        buf,
                    });
                }),
            ),
        };
        if let Err(e) = r {
            self.inflight.give(ulen);
            self.first_err = Some(ceph_err("reading", self.src.image, e));
            return false;
        }
        self.ops += 1;
        if again {
            self.retry.pop_front();
        } else {
            self.next = idx + count;
        }
        true
    }

    /// Waits for the next completion; when a throttle stopped the
    /// submissions, at most until it allows more.
    fn wait(&mut self, rx: &mpsc::Receiver<Event>) -> Wait {
        let cap = std::time::Duration::from_millis(200);
        if self.ops == 0 {
            return match self.throttle_wait.take() {
                // Throttled with nothing in flight: wait, then submit again.
                Some(wait) if self.first_err.is_none() => {
                    std::thread::sleep(wait.min(cap));
                    Wait::Again
                }
                _ => Wait::Done,
            };
        }
        match self.throttle_wait.take() {
            Some(wait) => match rx.recv_timeout(wait.min(cap)) {
                Ok(ev) => Wait::Event(ev),
                Err(mpsc::RecvTimeoutError::Timeout) => Wait::Again,
                Err(mpsc::RecvTimeoutError::Disconnected) => Wait::Done,
            },
            None => match rx.recv() {
                Ok(ev) => Wait::Event(ev),
                Err(_) => Wait::Done,
            },
        }
    }

    /// A direct read failed while the copy is healthy: the rest of the copy
    /// reads through librbd (e.g. caps that do not cover the data pool).
    fn fall_back_to_librbd(&mut self, e: &ceph::Error) {
        if self.obj_size.take().is_some() {
            tracing::warn!(
                error = %e,
                "reading data objects directly failed; reading through librbd"
            );
        }
    }

    /// A sparse read of extent `idx` completed.
    fn on_sparse(&mut self, idx: usize, obj: u64, len: usize, res: ceph::Result<SparseData>) {
        self.ops -= 1;
        if res.is_err() || self.first_err.is_some() {
            self.inflight.give(len);
        }
        match res {
            Err(e) if self.first_err.is_none() => {
                self.fall_back_to_librbd(&e);
                self.retry.push_back(idx);
            }
            Err(e) => {
                self.first_err
                    .get_or_insert(ceph_err("reading", self.src.image, e));
            }
            Ok(_) if self.first_err.is_some() => {}
            Ok(data) => {
                let got = data.data().len();
                self.stats.bytes_read += got as u64;
                for t in self.throttles {
                    t.refund((len - got.min(len)) as u64);
                }
                self.write_sparse(idx, obj, len, data);
            }
        }
    }

    /// A read of extents `first..first + count` completed into `buf`.
    fn on_read(
        &mut self,
        first: usize,
        count: usize,
        direct: bool,
        res: ceph::Result<()>,
        buf: Vec<u8>,
    ) {
        self.ops -= 1;
        match res {
            Err(e) if direct && self.first_err.is_none() => {
                self.fall_back_to_librbd(&e);
                self.inflight.release(buf);
                self.retry.extend(first..first + count);
            }
            Err(e) => {
                self.inflight.release(buf);
                self.first_err
                    .get_or_insert(ceph_err("reading", self.src.image, e));
            }
            Ok(()) if self.first_err.is_some() => self.inflight.release(buf),
            Ok(()) => {
                self.stats.bytes_read += buf.len() as u64;
                self.inflight.give(buf.len());
                let left = if count == 1 {
                    self.write_extent(first, Data::Owned(buf))
                } else {
                    self.write_unit(first, count, &buf);
                    Some(buf)
                };
                if let Some(b) = left {
                    self.budget.recycle(b);
                }
            }
        }
    }

    /// Writes the extents `first..first + count` of one object, read one
    /// after the other into `buf`: one direct write for them all, or
    /// librbd writes for each.
    fn write_unit(&mut self, first: usize, count: usize, buf: &[u8]) {
        let direct = self.direct_target(first..first + count);
        let mut all = Vec::new();
        let mut pos = 0usize;
        for i in first..first + count {
            let len = self.extents[i].len as usize;
            let Some(part) = buf.get(pos..pos + len) else {
                self.first_err.get_or_insert(EngineError::Internal(format!(
                    "read of {} bytes is short of extent {i}",
                    buf.len()
                )));
                break;
            };
            let (parts, _) = self.extent_parts(i, Data::Part(part));
            match direct {
                Some(_) => all.extend(parts),
                None => self.submit_writes(i, parts),
            }
            pos += len;
        }
        if let Some((objects, objno)) = direct
            && self.first_err.is_none()
        {
            self.write_object(objects, first..first + count, objno, all);
        }
    }

    /// A direct write of the extents `range` (one object) completed.
    fn on_written_object(
        &mut self,
        range: std::ops::Range<usize>,
        written: u64,
        zeroed: u64,
        res: ceph::Result<()>,
        bufs: Vec<Vec<u8>>,
    ) {
        self.ops -= 1;
        for b in bufs {
            self.inflight.release(b);
        }
        match res {
            Err(e) => {
                self.first_err
                    .get_or_insert(ceph_err("writing", self.dst, e));
            }
            Ok(()) => {
                self.stats.bytes_written += written;
                self.stats.bytes_zeroed += zeroed;
                for idx in range {
                    self.part_done(idx);
                }
            }
        }
    }

    /// A write of `len` bytes of extent `idx` completed (`zero`: zeroes,
    /// `hole`: of a hole of the diff).
    fn on_written(
        &mut self,
        idx: usize,
        len: u64,
        res: ceph::Result<usize>,
        buf: Vec<u8>,
        zero: bool,
        hole: bool,
    ) {
        self.ops -= 1;
        if zero {
            self.budget.recycle(buf);
        } else {
            self.inflight.release(buf);
        }
        match res {
            Err(e) => {
                self.first_err
                    .get_or_insert(ceph_err("writing", self.dst, e));
            }
            Ok(_) => {
                if zero {
                    self.stats.bytes_zeroed += len;
                    if hole {
                        self.stats.bytes_holes += len;
                    }
                } else {
                    self.stats.bytes_written += len;
                }
                self.part_done(idx);
            }
        }
    }

    /// The completion of a librbd write of `len` bytes of extent `idx`:
    /// sends [`Event::Written`] to the copy loop.
    fn written(&self, idx: usize, len: u64, zero: bool, hole: bool) -> ceph::aio::AioCallback {
        let t = self.tx.clone();
        Box::new(move |res, buf| {
            let _ = t.send(Event::Written {
                idx,
                len,
                res,
                buf,
                zero,
                hole,
            });
        })
    }

    /// One outstanding write of extent `idx` is done; the extent is when
    /// none is left.
    fn part_done(&mut self, idx: usize) {
        self.pending[idx] = self.pending[idx].saturating_sub(1);
        if self.pending[idx] == 0 {
            self.extent_done(idx);
        }
    }

    fn extent_done(&mut self, idx: usize) {
        self.done_bytes += self.extents[idx].len;
        self.mark.complete(idx);
        (self.progress)(self.done_bytes, self.mark.offset(self.extents));
    }

    /// Writes the data read for extent `idx`: its non-zero runs, and its
    /// zero runs as exact zeroes (nothing on a fresh replica). Returns the
    /// buffer if it was not handed to a write.
    fn write_extent(&mut self, idx: usize, data: Data<'_>) -> Option<Vec<u8>> {
        let (parts, left) = self.extent_parts(idx, data);
        match self.direct_target(idx..idx + 1) {
            Some((objects, objno)) => self.write_object(objects, idx..idx + 1, objno, parts),
            None => self.submit_writes(idx, parts),
        }
        left
    }

    /// The destination's data objects and the object number, when the
    /// extents `range` lie in one object of them.
    fn direct_target(&self, range: std::ops::Range<usize>) -> Option<(&'a DataObjects, u64)> {
        let objects = self.dst_objects?;
        let obj = objects.object_size();
        let first = self.extents.get(range.start)?;
        let last = self.extents.get(range.end.checked_sub(1)?)?;
        let objno = first.off / obj;
        ((last.off + last.len - 1) / obj == objno).then_some((objects, objno))
    }

    /// The writes that put `data`, read for extent `idx`, on the replica:
    /// `(offset, length, data)`, with `None` for zeroes (none on a fresh
    /// replica); and the buffer of `data` if it is not in them.
    fn extent_parts(&mut self, idx: usize, data: Data<'_>) -> (Vec<Part>, Option<Vec<u8>>) {
        let off = self.extents[idx].off;
        let runs = match &data {
            Data::Owned(v) => zero_runs(v),
            Data::Part(p) => zero_runs(p),
        };
        let mut parts = Vec::with_capacity(runs.len());
        match data {
            // One non-zero run covering a buffer of its own: written as is.
            Data::Owned(v) if matches!(runs.as_slice(), [(_, _, false)]) => {
                let len = v.len() as u64;
                parts.push((off, len, Some(v)));
                (parts, None)
            }
            Data::Owned(v) => {
                self.push_runs(&mut parts, off, &v, &runs);
                (parts, Some(v))
            }
            Data::Part(p) => {
                self.push_runs(&mut parts, off, p, &runs);
                (parts, None)
            }
        }
    }

    /// Appends the writes of `bytes` (at image offset `at`, split into
    /// `runs` by [`zero_runs`]): each non-zero run copied into a buffer of
    /// its own, each zero run as zeroes (nothing on a fresh replica).
    fn push_runs(
        &mut self,
        parts: &mut Vec<Part>,
        at: u64,
        bytes: &[u8],
        runs: &[(usize, usize, bool)],
    ) {
        for &(start, len, zero) in runs {
            let off = at + start as u64;
            if !zero {
                let mut b = self.inflight.budget.buffer(len);
                b.copy_from_slice(&bytes[start..start + len]);
                parts.push((off, len as u64, Some(b)));
            } else if self.fresh {
                self.stats.bytes_skipped += len as u64;
            } else {
                parts.push((off, len as u64, None));
            }
        }
    }

    /// Starts a sparse read of data extent `idx` (inside one object of
    /// `obj` bytes). `Err(Some(wait))`: throttled; `Err(None)`: over the
    /// budget, or failed (`first_err` set).
    fn submit_sparse(
        &mut self,
        objects: &DataObjects,
        idx: usize,
        obj: u64,
        force: bool,
    ) -> Result<(), Option<std::time::Duration>> {
        let ext = self.extents[idx];
        let Ok(len) = usize::try_from(ext.len) else {
            self.first_err = Some(EngineError::Internal(format!(
                "extent of {} bytes",
                ext.len
            )));
            return Err(None);
        };
        // The worst case: the whole extent allocated.
        if !self.inflight.try_take(len, force) {
            return Err(None);
        }
        if let Err(wait) = take_all(self.throttles, ext.len) {
            self.inflight.give(len);
            return Err(Some(wait));
        }
        let t = self.tx.clone();
        let r = objects.aio_sparse_read(
            ext.off / obj,
            ext.off % obj,
            ext.len,
            Box::new(move |res| {
                let _ = t.send(Event::Sparse { idx, obj, len, res });
            }),
        );
        if let Err(e) = r {
            self.inflight.give(len);
            self.first_err = Some(EngineError::Ceph {
                context: format!("reading the data objects of {objects:?}"),
                source: e,
            });
            return Err(None);
        }
        self.ops += 1;
        Ok(())
    }

    /// Writes what a sparse read returned for extent `idx` (which lies in
    /// one object of `obj` bytes; `len` bytes of the budget were taken for
    /// the read): the non-zero runs of its data, and, unless the replica is
    /// fresh, zeroes for the rest. Written directly, the data goes out of
    /// the read's own buffer (no copy; the budget keeps what it holds until
    /// the write completes); through librbd, it is copied.
    fn write_sparse(&mut self, idx: usize, obj: u64, len: usize, data: SparseData) {
        let ext = self.extents[idx];
        let base = ext.off - ext.off % obj;
        // (image offset, length, position in the read's data or None for
        // zeroes)
        let mut runs: Vec<(u64, u64, Option<usize>)> = Vec::new();
        let mut pos = ext.off;
        let mut at = 0usize;
        // The holes between the pieces were never read: zeroed unless the
        // replica is fresh, and not counted as skipped reads.
        let fresh = self.fresh;
        let hole = |runs: &mut Vec<(u64, u64, Option<usize>)>, from: u64, to: u64| {
            if to > from && !fresh {
                runs.push((from, to - from, None));
            }
        };
        for (o, bytes) in data.pieces() {
            let piece_at = base + o;
            hole(&mut runs, pos, piece_at);
            for (start, n, zero) in zero_runs(bytes) {
                let off = piece_at + start as u64;
                if !zero {
                    runs.push((off, n as u64, Some(at + start)));
                } else if fresh {
                    self.stats.bytes_skipped += n as u64;
                } else {
                    runs.push((off, n as u64, None));
                }
            }
            at += bytes.len();
            pos = piece_at + bytes.len() as u64;
        }
        hole(&mut runs, pos, ext.off + ext.len);
        let written: u64 = runs.iter().filter(|r| r.2.is_some()).map(|r| r.1).sum();
        match self.direct_target(idx..idx + 1) {
            Some((objects, objno)) if !runs.is_empty() => {
                // Keep what the write sends; the rest of the read's share
                // goes back now.
                self.inflight.give(len.saturating_sub(written as usize));
                self.write_read_data(objects, idx, objno, &runs, written, data);
            }
            direct => {
                self.inflight.give(len);
                let bytes = data.data();
                let parts = runs
                    .into_iter()
                    .map(|(off, n, at)| {
                        let buf = at.map(|a| {
                            let mut b = self.inflight.budget.buffer(n as usize);
                            b.copy_from_slice(&bytes[a..a + n as usize]);
                            b
                        });
                        (off, n, buf)
                    })
                    .collect();
                match direct {
                    Some((objects, objno)) => {
                        self.write_object(objects, idx..idx + 1, objno, parts)
                    }
                    None => self.submit_writes(idx, parts),
                }
            }
        }
    }

    /// Writes `runs` (image offsets in object `objno`; data at a position
    /// in `data`, or zeroes) of extent `idx` directly from the read's
    /// buffer, in one operation; `written` bytes of data, held in the
    /// budget until the completion.
    fn write_read_data(
        &mut self,
        objects: &DataObjects,
        idx: usize,
        objno: u64,
        runs: &[(u64, u64, Option<usize>)],
        written: u64,
        data: SparseData,
    ) {
        let base = objno * objects.object_size();
        let zeroed: u64 = runs.iter().filter(|r| r.2.is_none()).map(|r| r.1).sum();
        let parts: Vec<(u64, u64, Option<usize>)> = runs
            .iter()
            .map(|&(off, n, at)| (off - base, n, at))
            .collect();
        let done = self.written_object(idx..idx + 1, written, zeroed, true);
        let r = objects.aio_write_from_read(objno, &parts, data, done);
        self.object_write_started(r, idx..idx + 1, written);
    }

    /// Writes `parts` (image offsets, all in object `objno`) of the extents
    /// `range` directly, in one operation; they are done when it is.
    fn write_object(
        &mut self,
        objects: &DataObjects,
        range: std::ops::Range<usize>,
        objno: u64,
        parts: Vec<Part>,
    ) {
        if parts.is_empty() {
            for idx in range {
                self.pending[idx] = 0;
                self.extent_done(idx);
            }
            return;
        }
        let base = objno * objects.object_size();
        let (mut written, mut zeroed) = (0u64, 0u64);
        for p in &parts {
            match &p.2 {
                Some(b) => written += b.len() as u64,
                None => zeroed += p.1,
            }
        }
        let parts: Vec<Part> = parts
            .into_iter()
            .map(|(off, len, b)| (off - base, len, b))
            .collect();
        self.inflight.take(written as usize);
        let done = self.written_object(range.clone(), written, zeroed, false);
        let r = objects.aio_write(objno, parts, done);
        self.object_write_started(r, range, written);
    }

    /// The completion of a direct write of the extents `range`: sends
    /// [`Event::WrittenObject`] to the copy loop.
    fn written_object(
        &self,
        range: std::ops::Range<usize>,
        written: u64,
        zeroed: u64,
        from_read: bool,
    ) -> ceph::objects::ObjectWriteCallback {
        let t = self.tx.clone();
        Box::new(move |res, bufs| {
            let _ = t.send(Event::WrittenObject {
                first: range.start,
                count: range.len(),
                written,
                zeroed,
                res,
                bufs,
                from_read,
            });
        })
    }

    /// After starting a direct write of the extents `range` (`written`
    /// bytes of data held in the budget): counts it in flight or, when it
    /// did not start, gives the bytes back and records the error.
    fn object_write_started(
        &mut self,
        r: ceph::Result<()>,
        range: std::ops::Range<usize>,
        written: u64,
    ) {
        match r {
            Ok(()) => {
                self.ops += 1;
                for idx in range {
                    self.pending[idx] = 1;
                }
            }
            Err(e) => {
                self.inflight.give(written as usize);
                for idx in range {
                    self.pending[idx] = outstanding(0, true);
                }
                self.first_err
                    .get_or_insert(ceph_err("writing", self.dst, e));
            }
        }
    }

    /// Submits the writes of extent `idx`: `(offset, length, data)`, zeroes
    /// where the data is `None`; the extent is done when they all are.
    fn submit_writes(&mut self, idx: usize, parts: Vec<Part>) {
        let mut subs = 0u32;
        let mut failed = false;
        for (off, len, buf) in parts {
            let zero = buf.is_none();
            let cb = self.written(idx, len, zero, false);
            let r = match buf {
                // Zero exactly, without data: the replica stays sparse where
                // the primary is.
                None => self.dst.aio_write_zeroes(off, len, cb),
                Some(buf) => {
                    self.inflight.take(buf.len());
                    self.dst.aio_write(off, buf, cb)
                }
            };
            match r {
                Ok(()) => {
                    subs += 1;
                    self.ops += 1;
                }
                Err(e) => {
                    if !zero {
                        self.inflight.give(len as usize);
                    }
                    self.first_err
                        .get_or_insert(ceph_err("writing", self.dst, e));
                    failed = true;
                    break;
                }
            }
        }
        self.pending[idx] = outstanding(subs, failed);
        if self.pending[idx] == 0 {
            self.extent_done(idx);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(off: u64, len: u64) -> Extent {
        Extent {
            off,
            len,
            data: true,
        }
    }

    #[test]
    fn split_at_chunk_boundaries() {
        let mut v = Vec::new();
        push_split(&mut v, 3, 10, true, 4);
        let spans: Vec<(u64, u64)> = v.iter().map(|e| (e.off, e.len)).collect();
        assert_eq!(spans, vec![(3, 1), (4, 4), (8, 4), (12, 1)]);
        let total: u64 = v.iter().map(|e| e.len).sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn an_extent_whose_write_was_not_submitted_is_never_done() {
        assert_eq!(outstanding(0, false), 0, "nothing to write: done");
        assert_eq!(outstanding(3, false), 3);
        // The first write of an extent failed to submit: not done.
        assert_eq!(outstanding(0, true), NEVER_DONE);
        // Two went out, the third failed: their completions never reach 0.
        let mut pending = outstanding(2, true);
        for _ in 0..2 {
            pending = pending.saturating_sub(1);
        }
        assert_ne!(pending, 0);
        // The checkpoint stays below it.
        let extents = [
            Extent {
                off: 0,
                len: 10,
                data: true,
            },
            Extent {
                off: 10,
                len: 10,
                data: true,
            },
            Extent {
                off: 20,
                len: 10,
                data: true,
            },
        ];
        let mut w = Watermark::new(3);
        w.complete(0);
        w.complete(2);
        assert_eq!(w.offset(&extents), 10);
    }

    #[test]
    fn uncovered_matches_a_byte_by_byte_model() {
        // A deterministic spread of shapes: overlapping, touching, nested,
        // unsorted, empty.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let mut make = |k: u64| -> Vec<Extent> {
                (0..next(k)).map(|_| ext(next(200), next(40))).collect()
            };
            let (have, want) = (make(8), make(8));
            let mut model = vec![false; 256];
            for h in &have {
                model[h.off as usize..(h.off + h.len) as usize].fill(true);
            }
            for w in &want {
                model[w.off as usize..(w.off + w.len) as usize].fill(false);
            }
            let mut got = vec![false; 256];
            for (s, e) in uncovered(&have, &want) {
                assert!(s < e, "empty range from {have:?} {want:?}");
                got[s as usize..e as usize].fill(true);
            }
            assert_eq!(got, model, "have {have:?} want {want:?}");
        }
    }

    #[test]
    fn uncovered_ranges() {
        let have = [ext(0, 100), ext(200, 50)];
        let want = [ext(10, 20), ext(50, 60), ext(220, 100)];
        assert_eq!(uncovered(&have, &want), vec![(0, 10), (30, 50), (200, 220)]);
        assert_eq!(uncovered(&have, &[]), vec![(0, 100), (200, 250)]);
        assert!(uncovered(&[], &want).is_empty());
        assert!(uncovered(&[ext(10, 5)], &[ext(0, 100)]).is_empty());
    }

    fn data(off: u64, len: u64, data: bool) -> Extent {
        Extent { off, len, data }
    }

    #[test]
    fn read_units_group_an_objects_data_extents() {
        const M: u64 = 1 << 20;
        let v = [
            data(0, 64 << 10, true),
            data(M, 64 << 10, true),
            data(2 * M, 64 << 10, false),
            data(3 * M, 64 << 10, true),
            data(4 * M, 64 << 10, true),
            data(5 * M, 2 * M, true),
            data(7 * M, M, true),
        ];
        // Through librbd: one extent per read.
        assert_eq!(unit_end(&v, 0, None, 2 * M), 1);
        // Objects of 4 MiB: a hole ends a unit, so does the object's end.
        assert_eq!(unit_end(&v, 0, Some(4 * M), 2 * M), 2);
        assert_eq!(unit_end(&v, 3, Some(4 * M), 2 * M), 4);
        // The chunk bounds a unit's bytes.
        assert_eq!(unit_end(&v, 4, Some(4 * M), 2 * M), 5);
        assert_eq!(unit_end(&v, 5, Some(4 * M), 2 * M), 6);
        assert_eq!(unit_end(&v, 5, Some(4 * M), 4 * M), 7);
        // An extent crossing into the next (small) object goes alone.
        assert_eq!(unit_end(&v, 5, Some(M), 4 * M), 6);
        assert!(!unit_end_in_object(&v[5..6], M));
        assert!(unit_end_in_object(&v[0..2], 4 * M));
    }

    #[test]
    fn budget_reuses_buffers_by_capacity_within_its_limit() {
        const M: usize = 1 << 20;
        let b = ByteBudget::new(4 * M);
        let user = b.enter();
        let x = b.buffer(2 * M);
        assert_eq!((x.len(), x.capacity()), (2 * M, 2 * M));
        let y = b.buffer(3 * M / 2);
        assert_eq!(y.capacity(), 2 * M, "rounded up to the next power of two");
        let (px, py) = (x.as_ptr(), y.as_ptr());
        b.recycle(x);
        b.recycle(y);
        // A third large buffer would exceed the limit: dropped, not kept.
        b.recycle(vec![0; 2 * M]);
        assert_eq!(b.spares().len(), 2);
        // A shorter read gets a kept buffer, resized within its capacity.
        let z = b.buffer(M + 4096);
        assert_eq!(z.len(), M + 4096);
        assert!(z.as_ptr() == px || z.as_ptr() == py);
        b.recycle(z);
        // Small buffers are the allocator's business.
        b.recycle(vec![0; 64 << 10]);
        assert_eq!(b.spares().len(), 2);
        // The last copy to leave releases the spares.
        drop(user);
        assert!(b.spares().is_empty());
        b.recycle(vec![0; 2 * M]);
        assert!(
            b.spares().is_empty(),
            "nothing is kept with no copy running"
        );
    }

    #[test]
    fn zero_runs_coalesce_blocks() {
        let b = ZERO_BLOCK;
        let mut buf = vec![0u8; 5 * b + 100];
        buf[b + 3] = 1; // block 1 data
        buf[2 * b] = 1; // block 2 data
        buf[5 * b + 50] = 7; // the short tail block
        assert_eq!(
            zero_runs(&buf),
            vec![
                (0, b, true),
                (b, 2 * b, false),
                (3 * b, 2 * b, true),
                (5 * b, 100, false)
            ]
        );
        assert_eq!(zero_runs(&vec![0u8; 3 * b]), vec![(0, 3 * b, true)]);
        assert_eq!(zero_runs(&[]), vec![]);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        assert!(is_zero(&[0u8; 17]));
        let mut b = vec![0u8; 4099];
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[5] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&[]));
    }
}
