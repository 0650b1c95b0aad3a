//! The data mover: copies the extents that changed between two snapshots of
//! the primary (or all allocated extents, for a first sync) into the replica
//! with bounded parallel aio.
//!
//! Runs on a blocking thread. One scheduler loop submits aio reads while the
//! byte budget and op limit allow, and reacts to completions arriving on a
//! channel from librbd's completion thread: a finished read becomes a write
//! (or nothing, for an all-zero buffer on a fresh replica, or an exact
//! write-zeroes otherwise); a finished write returns its buffer to a free
//! list. Memory is bounded by the budget whatever the image size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use crate::ceph::{self, Image};

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

impl Default for CopyLimits {
    fn default() -> Self {
        Self {
            max_inflight_bytes: 64 << 20,
            max_ops: 32,
            chunk: 4 << 20,
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
/// snapshot `from` (`None`: everything allocated), split at `chunk`
/// boundaries.
pub fn changed_extents(
    src: &Image,
    from: Option<&str>,
    size: u64,
    chunk: u64,
) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let r = src.diff_iterate::<_, std::convert::Infallible>(
        from,
        0,
        size,
        false,
        |off, len, exists| {
            push_split(&mut out, off, len, exists, chunk);
            Ok(())
        },
    );
    match r {
        Ok(()) => Ok(out),
        Err(ceph::rbd::DiffError::Ceph(e)) => Err(EngineError::Ceph {
            context: format!("listing changed extents of {}", src.spec()),
            source: e,
        }),
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
pub fn uncovered(have: &[Extent], want: &[Extent]) -> Vec<(u64, u64)> {
    let mut w: Vec<(u64, u64)> = want.iter().map(|e| (e.off, e.off + e.len)).collect();
    w.sort_unstable();
    let mut out = Vec::new();
    for h in have {
        let (mut s, e) = (h.off, h.off + h.len);
        for &(ws, we) in &w {
            if we <= s {
                continue;
            }
            if ws >= e {
                break;
            }
            if ws > s {
                out.push((s, ws));
            }
            s = s.max(we);
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
    Read {
        idx: usize,
        ext: Extent,
        res: ceph::Result<usize>,
        buf: Vec<u8>,
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
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl Throttle {
    /// A throttle of `bytes_per_sec` (0: unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            rate: std::sync::atomic::AtomicU64::new(bytes_per_sec),
            state: std::sync::Mutex::new((bytes_per_sec as f64, std::time::Instant::now())),
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

    /// Takes `n` bytes, or says how long to wait before trying again.
    fn try_take(&self, n: u64) -> Result<(), std::time::Duration> {
        let rate = self.rate() as f64;
        if rate <= 0.0 {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
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
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let tokens = (st.0 + st.1.elapsed().as_secs_f64() * rate).min(rate.max(n as f64));
        (tokens < n as f64).then(|| std::time::Duration::from_secs_f64((n as f64 - tokens) / rate))
    }
}

/// Whether `buf` holds only zero bytes (16 bytes at a time).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// A byte budget shared by the copies running at once: a lone copy may use
/// all of it, several share it first come, first served. Each copy may
/// always keep one operation in flight beyond it, so none starves.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ByteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            used: AtomicUsize::new(0),
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
}

/// The bytes one copy has in flight, against its own cap and the shared
/// budget; whatever is still held goes back on drop.
struct InFlight<'a> {
    shared: Option<&'a ByteBudget>,
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
        if let Some(s) = self.shared
            && !s.try_take(n, force)
        {
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
        if let Some(s) = self.shared {
            s.give(n);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.bytes;
        self.give(n);
    }
}

/// Read buffers of a copy: full-chunk buffers are reused (a bounded number,
/// what the byte budget can have in flight), everything else is allocated at
/// its exact size, so that the memory held is what the budget counts.
struct BufPool {
    chunk: usize,
    max: usize,
    free: Vec<Vec<u8>>,
}

impl BufPool {
    fn new(limits: CopyLimits) -> Self {
        let chunk = limits.chunk as usize;
        Self {
            chunk,
            // A few spares: buffers come back about as fast as they go out.
            max: (limits.max_inflight_bytes / chunk.max(1)).clamp(1, 2),
            free: Vec::new(),
        }
    }

    /// A buffer of `len` bytes (contents unspecified).
    fn take(&mut self, len: usize) -> Vec<u8> {
        if len == self.chunk
            && let Some(b) = self.free.pop()
        {
            return b;
        }
        vec![0; len]
    }

    /// Returns a buffer: kept if it is a full chunk and the pool has room.
    fn give(&mut self, buf: Vec<u8>) {
        if buf.len() == self.chunk && buf.capacity() == self.chunk && self.free.len() < self.max {
            self.free.push(buf);
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
    src: &Image,
    dst: &Image,
    extents: &[Extent],
    fresh: bool,
    limits: CopyLimits,
    shared: Option<&ByteBudget>,
    throttles: &[&Throttle],
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CopyStats> {
    let (tx, rx) = mpsc::channel::<Event>();
    let mut stats = CopyStats::default();
    let mut free = BufPool::new(limits);
    let mut next = 0usize;
    let mut inflight_ops = 0usize;
    let mut inflight = InFlight {
        shared,
        cap: limits.max_inflight_bytes.max(limits.chunk as usize),
        bytes: 0,
    };
    let mut done_bytes = 0u64;
    let mut first_err: Option<EngineError> = None;
    let mut mark = Watermark::new(extents.len());
    // Writes still outstanding per extent.
    let mut pending = vec![0u32; extents.len()];
    let mut throttle_wait: Option<std::time::Duration> = None;

    let ceph_err = |what: &str, img: &Image, e: ceph::Error| EngineError::Ceph {
        context: format!("{what} {}", img.spec()),
        source: e,
    };

    loop {
        // Submit as much as the limits allow.
        while first_err.is_none() && next < extents.len() && inflight_ops < limits.max_ops {
            if cancelled() {
                first_err = Some(EngineError::Unavailable("sync cancelled".into()));
                break;
            }
            let ext = extents[next];
            let idx = next;
            if ext.data {
                let len = ext.len as usize;
                if !inflight.try_take(len, inflight_ops == 0) {
                    break;
                }
                if let Err(wait) = take_all(throttles, ext.len) {
                    inflight.give(len);
                    throttle_wait = Some(wait);
                    break;
                }
                let buf = free.take(len);
                let t = tx.clone();
                let r = src.aio_read(
                    ext.off,
                    buf,
                    Box::new(move |res, buf| {
                        let _ = t.send(Event::Read { idx, ext, res, buf });
                    }),
                );
                if let Err(e) = r {
                    inflight.give(len);
                    first_err = Some(ceph_err("reading", src, e));
                    break;
                }
            } else {
                let t = tx.clone();
                let len = ext.len;
                let r = dst.aio_write_zeroes(
                    ext.off,
                    ext.len,
                    Box::new(move |res, buf| {
                        let _ = t.send(Event::Written {
                            idx,
                            len,
                            res,
                            buf,
                            zero: true,
                            hole: true,
                        });
                    }),
                );
                if let Err(e) = r {
                    first_err = Some(ceph_err("zeroing", dst, e));
                    break;
                }
                pending[idx] = 1;
            }
            inflight_ops += 1;
            next += 1;
        }
        if inflight_ops == 0 {
            match throttle_wait.take() {
                // Throttled with nothing in flight: wait, then submit again.
                Some(wait) if first_err.is_none() => {
                    std::thread::sleep(wait.min(std::time::Duration::from_millis(200)));
                    continue;
                }
                _ => break,
            }
        }
        let ev = match throttle_wait.take() {
            Some(wait) => match rx.recv_timeout(wait.min(std::time::Duration::from_millis(200))) {
                Ok(ev) => ev,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match ev {
            Event::Read { idx, ext, res, buf } => match res {
                Err(e) => {
                    inflight_ops -= 1;
                    inflight.give(buf.len());
                    free.give(buf);
                    first_err.get_or_insert(ceph_err("reading", src, e));
                }
                Ok(_) if first_err.is_some() => {
                    inflight_ops -= 1;
                    inflight.give(buf.len());
                    free.give(buf);
                }
                Ok(_) => {
                    stats.bytes_read += ext.len;
                    inflight_ops -= 1;
                    inflight.give(buf.len());
                    let runs = zero_runs(&buf);
                    let whole = runs.len() == 1;
                    let mut buf = Some(buf);
                    let mut subs = 0u32;
                    for (start, len, zero) in runs {
                        if zero && fresh {
                            stats.bytes_skipped += len as u64;
                            continue;
                        }
                        let off = ext.off + start as u64;
                        let t = tx.clone();
                        let l = len as u64;
                        let cb: ceph::aio::AioCallback = Box::new(move |res, b| {
                            let _ = t.send(Event::Written {
                                idx,
                                len: l,
                                res,
                                buf: b,
                                zero,
                                hole: false,
                            });
                        });
                        let r = if zero {
                            // Zero exactly, without data: the replica stays
                            // sparse where the primary is.
                            dst.aio_write_zeroes(off, l, cb)
                        } else {
                            let data = match (whole, buf.take()) {
                                (true, Some(b)) => b,
                                (_, b) => {
                                    // A run of its own, in a buffer of its size.
                                    let src = b.as_deref().unwrap_or(&[]);
                                    let d = src.get(start..start + len).unwrap_or(&[]).to_vec();
                                    buf = b;
                                    d
                                }
                            };
                            inflight.take(data.len());
                            dst.aio_write(off, data, cb)
                        };
                        match r {
                            Ok(()) => {
                                subs += 1;
                                inflight_ops += 1;
                            }
                            Err(e) => {
                                if !zero {
                                    inflight.give(len);
                                }
                                first_err.get_or_insert(ceph_err("writing", dst, e));
                                break;
                            }
                        }
                    }
                    if let Some(b) = buf {
                        free.give(b);
                    }
                    pending[idx] = subs;
                    if subs == 0 {
                        done_bytes += ext.len;
                        mark.complete(idx);
                        progress(done_bytes, mark.offset(extents));
                    }
                }
            },
            Event::Written {
                idx,
                len,
                res,
                buf,
                zero,
                hole,
            } => {
                inflight_ops -= 1;
                if !zero {
                    inflight.give(buf.len());
                }
                free.give(buf);
                match res {
                    Err(e) => {
                        first_err.get_or_insert(ceph_err("writing", dst, e));
                    }
                    Ok(_) => {
                        if zero {
                            stats.bytes_zeroed += len;
                            if hole {
                                stats.bytes_holes += len;
                            }
                        } else {
                            stats.bytes_written += len;
                        }
                        pending[idx] = pending[idx].saturating_sub(1);
                        if pending[idx] == 0 {
                            done_bytes += extents[idx].len;
                            mark.complete(idx);
                            progress(done_bytes, mark.offset(extents));
                        }
                    }
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    dst.flush().map_err(|e| ceph_err("flushing", dst, e))?;
    Ok(stats)
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
    fn uncovered_ranges() {
        let have = [ext(0, 100), ext(200, 50)];
        let want = [ext(10, 20), ext(50, 60), ext(220, 100)];
        assert_eq!(uncovered(&have, &want), vec![(0, 10), (30, 50), (200, 220)]);
        assert_eq!(uncovered(&have, &[]), vec![(0, 100), (200, 250)]);
        assert!(uncovered(&[], &want).is_empty());
        assert!(uncovered(&[ext(10, 5)], &[ext(0, 100)]).is_empty());
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
