//! `csi-rbd-replicator verify`: proves that a replica holds the same bytes as
//! its primary at a sync point, reading only.
//!
//! The volume is resolved on the local cluster; its peer is the pool's Ceph
//! mirror peer that has an image of the same name in the same pool and RADOS
//! namespace. Both images are opened read-only at the same snapshot (the
//! newest sync snapshot both sides have, or `--snapshot`), and compared chunk
//! by chunk (one RBD object, 4 MiB by default) with bounded parallel aio
//! reads on both clusters. Holes read as zeroes; chunks that neither side
//! has allocated (per `rbd_diff_iterate2`, answered from the object map when
//! the image has fast-diff) are zero on both sides and are not read, unless
//! `full` is asked for.
//!
//! Why the chunks are compared byte for byte instead of hashed: both copies
//! pass through this process anyway, so a digest would only add CPU work
//! (sha256 runs at a few hundred MB/s to ~2 GB/s per core, which on 2 cores
//! is of the order of the read rate) and could, however unlikely, hide a
//! difference; and a digest only says that a 4 MiB chunk differs, while the
//! comparison names the differing 4 KiB blocks. A digest pays only when the two
//! sides are read by different hosts; a remote mode would add one then.
//!
//! Nothing here opens an image writable or writes anything: the replica may
//! be held under the replayer's exclusive lock while it is verified.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use serde::Serialize;

use csirr_ceph::{self as ceph, ErrorKind, Image, IoCtx};
use csirr_csi::volume_id::VolumeId;

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::registry::sync_snap_seq;

/// Granularity of reported differences.
pub const BLOCK: u64 = 4096;
/// Differing extents reported by default.
pub const DEFAULT_MAX_EXTENTS: usize = 10;
/// Chunks compared at once by default (each holds one buffer per side).
pub const DEFAULT_PARALLEL: usize = 8;
/// Chunks compared at once at most, whatever is asked.
pub const MAX_PARALLEL: usize = 256;
/// Chunk size when the image reports no object size.
const DEFAULT_CHUNK: u64 = 4 << 20;

/// What to verify and how.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Snapshot to compare; default: the newest sync snapshot on both sides.
    pub snapshot: Option<String>,
    /// Mirror peer (site name) to compare with; needed only when several
    /// peers have the image.
    pub peer: Option<String>,
    /// Differing extents to report at most.
    pub max_extents: usize,
    /// Chunks in flight at most (capped at [`MAX_PARALLEL`]).
    pub parallel: usize,
    /// Read every chunk, also those that neither side has allocated.
    pub full: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            snapshot: None,
            peer: None,
            max_extents: DEFAULT_MAX_EXTENTS,
            parallel: DEFAULT_PARALLEL,
            full: false,
        }
    }
}

/// A byte range of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiffExtent {
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The outcome of a verification.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The volume as given.
    pub volume: String,
    /// `pool[/namespace]/image`.
    pub image: String,
    /// The local cluster (its ceph-csi cluster ID).
    pub local_cluster: String,
    /// The peer's site name.
    pub peer: String,
    /// The snapshot compared.
    pub snapshot: String,
    /// Size of the snapshot on the local cluster.
    pub local_size: u64,
    /// Size of the snapshot on the peer.
    pub peer_size: u64,
    /// Chunk size used.
    pub chunk_size: u64,
    /// Bytes known equal or compared (holes on both sides count).
    pub bytes_compared: u64,
    /// Bytes read from each side.
    pub bytes_read: u64,
    /// Wall time of the comparison (without resolving and connecting).
    pub seconds: f64,
    /// True when both sides hold the same bytes.
    pub identical: bool,
    /// Bytes in differing blocks (and a size difference).
    pub differing_bytes: u64,
    /// Number of differing extents.
    pub differing_extents: u64,
    /// The first differing extents, by offset (block granularity).
    pub extents: Vec<DiffExtent>,
}

/// Progress of a running verification.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Bytes read per side so far.
    pub read: u64,
    /// Bytes to read per side in all.
    pub to_read: u64,
    /// Time since the comparison started.
    pub elapsed: Duration,
}

impl Engine {
    /// Compares volume `vol` (on the local cluster) with the image of the
    /// same name on its mirror peer, at one snapshot. Reads only. Blocking.
    pub fn verify(
        &self,
        vol: &VolumeId,
        opts: &VerifyOptions,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<VerifyReport> {
        let resolved = self.resolve(vol, None)?;
        let io = Arc::clone(resolved.ioctx());
        let name = resolved.image.name().to_string();
        // Only the ioctx and the name are kept: the images are reopened
        // read-only below.
        drop(resolved);
        let spec = format!("{}/{name}", io.spec());
        let local =
            Image::open_read_only(&io, &name, None).ctx(|| format!("opening {spec} read-only"))?;
        let (peer_name, peer) = self.peer_image(&io, &name, &spec, opts.peer.as_deref())?;

        let (snap, lsize, psize) =
            select_snapshot(&local, &peer, &spec, &peer_name, opts.snapshot.as_deref())?;

        let chunk = match local.stat() {
            Ok(i) if i.obj_size >= BLOCK => i.obj_size,
            _ => DEFAULT_CHUNK,
        };
        let size = lsize.min(psize);
        let started = Instant::now();
        let chunks = if opts.full {
            (0..size.div_ceil(chunk)).collect()
        } else {
            let mut a = allocated_chunks(&local, size, chunk)?;
            a.extend(allocated_chunks(&peer, size, chunk)?);
            a.sort_unstable();
            a.dedup();
            a
        };
        let mut agg = Aggregator::new(opts.max_extents);
        let read = compare_chunks(
            &local,
            &peer,
            &chunks,
            chunk,
            size,
            opts.parallel.max(1),
            &mut agg,
            &mut |read, to_read| {
                progress(&Progress {
                    read,
                    to_read,
                    elapsed: started.elapsed(),
                })
            },
        )?;
        if lsize != psize {
            agg.push(size, lsize.max(psize) - size);
        }
        let seconds = started.elapsed().as_secs_f64();
        Ok(VerifyReport {
            volume: vol.to_string(),
            image: spec,
            local_cluster: self.cfg.local_cluster.cluster_id.clone(),
            peer: peer_name,
            snapshot: snap,
            local_size: lsize,
            peer_size: psize,
            chunk_size: chunk,
            bytes_compared: size,
            bytes_read: read,
            seconds,
            identical: agg.total == 0,
            differing_bytes: agg.bytes,
            differing_extents: agg.total,
            extents: agg.extents,
        })
    }

    /// The image `name` on the pool's mirror peer, opened read-only.
    fn peer_image(
        &self,
        io: &IoCtx,
        name: &str,
        spec: &str,
        want: Option<&str>,
    ) -> Result<(String, Image)> {
        let peers = self.peers_of_pool(io.pool())?;
        if peers.is_empty() {
            return Err(EngineError::FailedPrecondition(format!(
                "pool {} has no mirror peers: nothing to compare {spec} with",
                io.pool()
            )));
        }
        let names: Vec<String> = peers.iter().map(|(p, _)| p.site_name.clone()).collect();
        let mut found = Vec::new();
        for (p, cluster) in peers {
            if want.is_some_and(|w| w != p.site_name) {
                continue;
            }
            let pio = match cluster.ioctx(io.pool(), io.namespace()) {
                Ok(x) => x,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(e).ctx(|| format!("opening {} on peer {}", io.spec(), p.site_name));
                }
            };
            match Image::open_read_only(&pio, name, None) {
                Ok(img) => found.push((p.site_name, img)),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx(|| format!("opening {spec} on peer {}", p.site_name)),
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(EngineError::NotFound(match want {
                Some(w) if !names.iter().any(|n| n == w) => format!(
                    "pool {} has no mirror peer {w:?} (peers: {})",
                    io.pool(),
                    names.join(", ")
                ),
                _ => format!("no peer has an image {spec} (peers: {})", names.join(", ")),
            })),
            _ => Err(EngineError::InvalidArgument(format!(
                "several peers have an image {spec} ({}); choose one with --peer",
                found
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }
}

fn sync_names(snaps: &[ceph::SnapInfo]) -> String {
    let v: Vec<&str> = snaps
        .iter()
        .filter(|s| sync_snap_seq(&s.name).is_some())
        .map(|s| s.name.as_str())
        .collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn snap_size(snaps: &[ceph::SnapInfo], name: &str) -> Option<u64> {
    snaps.iter().find(|s| s.name == name).map(|s| s.size)
}

/// Sets both images at the snapshot to compare: `wanted`, or else the
/// newest sync snapshot both have. Returns its name and its size on each
/// side.
fn select_snapshot(
    local: &Image,
    peer: &Image,
    spec: &str,
    peer_name: &str,
    wanted: Option<&str>,
) -> Result<(String, u64, u64)> {
    let lsnaps = local
        .snap_list()
        .ctx(|| format!("listing snapshots of {spec}"))?;
    let psnaps = peer
        .snap_list()
        .ctx(|| format!("listing snapshots of {spec} on peer {peer_name}"))?;
    let snap = match wanted {
        Some(s) => s.to_string(),
        None => newest_common_sync_snap(&lsnaps, &psnaps).ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "no sync snapshot of {spec} exists on both clusters \
                 (local: {}; peer {peer_name}: {})",
                sync_names(&lsnaps),
                sync_names(&psnaps)
            ))
        })?,
    };
    let lsize = snap_size(&lsnaps, &snap)
        .ok_or_else(|| EngineError::NotFound(format!("{spec}@{snap} does not exist")))?;
    let psize = snap_size(&psnaps, &snap).ok_or_else(|| {
        EngineError::NotFound(format!("{spec}@{snap} does not exist on peer {peer_name}"))
    })?;
    local
        .snap_set(Some(&snap))
        .ctx(|| format!("selecting {spec}@{snap}"))?;
    peer.snap_set(Some(&snap))
        .ctx(|| format!("selecting {spec}@{snap} on peer {peer_name}"))?;
    Ok((snap, lsize, psize))
}

/// The newest sync snapshot (by sequence number) present in both lists.
pub fn newest_common_sync_snap(a: &[ceph::SnapInfo], b: &[ceph::SnapInfo]) -> Option<String> {
    a.iter()
        .filter_map(|s| sync_snap_seq(&s.name).map(|q| (q, &s.name)))
        .filter(|(_, n)| b.iter().any(|t| &t.name == *n))
        .max_by_key(|(q, _)| *q)
        .map(|(_, n)| n.clone())
}

/// Indices of the chunks of `[0, size)` in which `img` (at the snapshot set
/// on it) has data a reader sees, a clone's parent included, sorted.
fn allocated_chunks(img: &Image, size: u64, chunk: u64) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let r = img.diff_iterate::<_, std::convert::Infallible>(
        None,
        0,
        size,
        true,
        true,
        |off, len, exists| {
            if exists && len > 0 {
                let first = off / chunk;
                let last = (off.saturating_add(len) - 1) / chunk;
                out.extend(first..=last);
            }
            Ok(())
        },
    );
    match r {
        Ok(()) => {}
        Err(ceph::rbd::DiffError::Ceph(e)) => {
            return Err(e).ctx(|| format!("listing allocated extents of {}", img.spec()));
        }
        Err(ceph::rbd::DiffError::Callback(never)) => match never {},
    }
    let max = size.div_ceil(chunk);
    out.retain(|c| *c < max);
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Differing runs of [`BLOCK`]-sized blocks between `a` and `b` (equal
/// lengths), as `(offset, length)` relative to the buffers' start.
pub fn differing_runs(a: &[u8], b: &[u8]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    if a == b {
        return out;
    }
    let bs = BLOCK as usize;
    for (i, (x, y)) in a.chunks(bs).zip(b.chunks(bs)).enumerate() {
        if x == y {
            continue;
        }
        let off = (i * bs) as u64;
        let len = x.len() as u64;
        match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        }
    }
    out
}

/// Collects differing runs in offset order: merges touching runs, counts
/// them all, keeps the first `max`.
#[derive(Debug)]
pub struct Aggregator {
    max: usize,
    extents: Vec<DiffExtent>,
    total: u64,
    bytes: u64,
    last_end: Option<u64>,
}

impl Aggregator {
    /// An aggregator keeping `max` extents.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            extents: Vec::new(),
            total: 0,
            bytes: 0,
            last_end: None,
        }
    }

    /// Adds run `[off, off+len)`; runs must come in increasing offset order.
    pub fn push(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.bytes += len;
        if self.last_end == Some(off) {
            if let Some(last) = self.extents.last_mut()
                && last.offset + last.length == off
            {
                last.length += len;
            }
        } else {
            self.total += 1;
            if self.extents.len() < self.max {
                self.extents.push(DiffExtent {
                    offset: off,
                    length: len,
                });
            }
        }
        self.last_end = Some(off + len);
    }

    /// The extents kept so far.
    pub fn extents(&self) -> &[DiffExtent] {
        &self.extents
    }

    /// Number of differing extents seen.
    pub fn total(&self) -> u64 {
        self.total
    }
}

enum Side {
    Local,
    Peer,
}

struct ReadDone {
    pos: usize,
    side: Side,
    res: ceph::Result<usize>,
    buf: Vec<u8>,
}

fn read_error(img: &Image, off: u64, e: ceph::Error) -> EngineError {
    match Err::<(), _>(e).ctx(|| format!("reading {} at {off}", img.spec())) {
        Err(x) => x,
        Ok(()) => EngineError::Internal("read error without an error".into()),
    }
}

/// Compares `chunks` (indices, sorted) of `a` and `b`, keeping `parallel`
/// chunks in flight, and feeds the differing runs to `agg` in offset order.
/// Returns the bytes read per side.
#[allow(clippy::too_many_arguments)]
fn compare_chunks(
    a: &Image,
    b: &Image,
    chunks: &[u64],
    chunk: u64,
    size: u64,
    parallel: usize,
    agg: &mut Aggregator,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let (tx, rx) = mpsc::channel::<ReadDone>();
    let mut c = ChunkCompare {
        a,
        b,
        chunks,
        chunk,
        size,
        tx,
        free: Vec::new(),
        halves: HashMap::new(),
        ready: BTreeMap::new(),
        next_submit: 0,
        next_report: 0,
        inflight: 0,
        window: parallel.clamp(1, MAX_PARALLEL) * 2,
        read: 0,
        first_err: None,
    };
    let to_read: u64 = chunks.iter().map(|i| c.range(*i).1).sum();
    loop {
        c.submit();
        if c.inflight == 0 {
            break;
        }
        let ev = match rx.recv_timeout(Duration::from_millis(250)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                progress(c.read, to_read);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        if c.on_read(ev, agg) {
            progress(c.read, to_read);
        }
    }
    if let Some(e) = c.first_err {
        return Err(e);
    }
    if c.next_report != chunks.len() {
        return Err(EngineError::Internal(format!(
            "verify compared {} of {} chunks",
            c.next_report,
            chunks.len()
        )));
    }
    Ok(c.read)
}

/// The state of [`compare_chunks`]: both sides' aio reads of a window of
/// chunks, and the comparisons reported in chunk order.
struct ChunkCompare<'a> {
    a: &'a Image,
    b: &'a Image,
    chunks: &'a [u64],
    chunk: u64,
    size: u64,
    tx: mpsc::Sender<ReadDone>,
    /// Buffers to reuse.
    free: Vec<Vec<u8>>,
    /// Buffers of chunks whose other side is still being read.
    halves: HashMap<usize, Vec<u8>>,
    /// Results of chunks done out of order, by position.
    ready: BTreeMap<usize, Vec<(u64, u64)>>,
    next_submit: usize,
    next_report: usize,
    /// Aio reads in flight: two per chunk.
    inflight: usize,
    window: usize,
    /// Bytes compared (per side).
    read: u64,
    first_err: Option<EngineError>,
}

impl ChunkCompare<'_> {
    /// Offset and length of chunk `idx`.
    fn range(&self, idx: u64) -> (u64, u64) {
        let off = idx * self.chunk;
        (off, self.chunk.min(self.size - off))
    }

    /// Starts the reads of both sides of the next chunks, up to the window;
    /// none after an error.
    fn submit(&mut self) {
        while self.first_err.is_none()
            && self.next_submit < self.chunks.len()
            && self.inflight < self.window
        {
            let pos = self.next_submit;
            let (off, len) = self.range(self.chunks[pos]);
            for (img, side) in [(self.a, Side::Local), (self.b, Side::Peer)] {
                let mut buf = self.free.pop().unwrap_or_default();
                buf.resize(len as usize, 0);
                let t = self.tx.clone();
                let r = img.aio_read(
                    off,
                    buf,
                    Box::new(move |res, buf| {
                        let _ = t.send(ReadDone {
                            pos,
                            side,
                            res,
                            buf,
                        });
                    }),
                );
                match r {
                    Ok(()) => self.inflight += 1,
                    Err(e) => {
                        self.first_err = Some(read_error(img, off, e));
                        break;
                    }
                }
            }
            self.next_submit += 1;
        }
    }

    /// One side of a chunk was read: once both are, compares them and
    /// reports what is in order to `agg`. Returns whether a chunk was
    /// compared.
    fn on_read(&mut self, ev: ReadDone, agg: &mut Aggregator) -> bool {
        self.inflight -= 1;
        let ReadDone {
            pos,
            side,
            res,
            mut buf,
        } = ev;
        let (off, len) = self.range(self.chunks[pos]);
        match res {
            Err(e) => {
                let img = match side {
                    Side::Local => self.a,
                    Side::Peer => self.b,
                };
                self.first_err
                    .get_or_insert_with(|| read_error(img, off, e));
                self.free.push(buf);
                return false;
            }
            Ok(n) => {
                // A short read (never expected inside the image) reads as
                // zeroes, like a hole.
                if n < buf.len() {
                    buf[n..].fill(0);
                }
            }
        }
        if self.first_err.is_some() {
            self.free.push(buf);
            return false;
        }
        let Some(other) = self.halves.remove(&pos) else {
            self.halves.insert(pos, buf);
            return false;
        };
        self.read += len;
        let runs = differing_runs(&buf, &other)
            .into_iter()
            .map(|(o, l)| (off + o, l))
            .collect();
        self.free.push(buf);
        self.free.push(other);
        self.ready.insert(pos, runs);
        while let Some(runs) = self.ready.remove(&self.next_report) {
            for (o, l) in runs {
                agg.push(o, l);
            }
            self.next_report += 1;
        }
        true
    }
}

/// Prints progress to stderr: a self-overwriting line a few times a second
/// on a terminal, a plain line every 5 s otherwise.
pub struct ProgressPrinter {
    tty: bool,
    every: Duration,
    last: Option<Instant>,
    started: Instant,
    printed: bool,
}

impl Default for ProgressPrinter {
    fn default() -> Self {
        Self::stderr()
    }
}

impl ProgressPrinter {
    /// A printer for this process's stderr.
    pub fn stderr() -> Self {
        let tty = std::io::stderr().is_terminal();
        Self {
            tty,
            every: if tty {
                Duration::from_millis(250)
            } else {
                Duration::from_secs(5)
            },
            last: None,
            started: Instant::now(),
            printed: false,
        }
    }

    /// Prints `p` if the last line is old enough.
    pub fn update(&mut self, p: &Progress) {
        let due = match self.last {
            Some(t) => t.elapsed() >= self.every,
            None => self.started.elapsed() >= self.every,
        };
        if !due {
            return;
        }
        self.last = Some(Instant::now());
        let pct = if p.to_read == 0 {
            100.0
        } else {
            p.read as f64 * 100.0 / p.to_read as f64
        };
        let secs = p.elapsed.as_secs_f64().max(1e-3);
        let line = format!(
            "verify: {pct:5.1}% ({} of {} MiB per side), {:.0} MiB/s",
            p.read >> 20,
            p.to_read >> 20,
            p.read as f64 / secs / (1 << 20) as f64
        );
        let mut err = std::io::stderr().lock();
        let _ = if self.tty {
            write!(err, "\r\x1b[K{line}")
        } else {
            writeln!(err, "{line}")
        };
        let _ = err.flush();
        self.printed = true;
    }

    /// Ends the progress display.
    pub fn finish(&mut self) {
        if self.tty && self.printed {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// The human-readable report.
pub fn render_text(r: &VerifyReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let _ = writeln!(
        s,
        "volume    {}\nimage     {} (local cluster {}, peer {})\nsnapshot  {}",
        r.volume, r.image, r.local_cluster, r.peer, r.snapshot
    );
    let _ = writeln!(
        s,
        "compared  {} bytes ({:.1} MiB; {:.1} MiB read per side) in {:.2} s ({:.0} MiB/s)",
        r.bytes_compared,
        mib(r.bytes_compared),
        mib(r.bytes_read),
        r.seconds,
        mib(r.bytes_read) / r.seconds.max(1e-3)
    );
    if r.local_size != r.peer_size {
        let _ = writeln!(
            s,
            "size      differs: local {} bytes, peer {} bytes",
            r.local_size, r.peer_size
        );
    }
    if r.identical {
        let _ = writeln!(s, "result    IDENTICAL");
    } else {
        let _ = writeln!(
            s,
            "result    DIFFERENT: {} extent(s), {} bytes differ; first {}:",
            r.differing_extents,
            r.differing_bytes,
            r.extents.len()
        );
        let _ = writeln!(s, "  {:>16}  {:>12}", "offset", "length");
        for e in &r.extents {
            let _ = writeln!(s, "  {:>16}  {:>12}", e.offset, e.length);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: u64, name: &str) -> ceph::SnapInfo {
        ceph::SnapInfo {
            id,
            size: 1 << 20,
            name: name.into(),
        }
    }

    #[test]
    fn picks_newest_common_sync_snapshot() {
        let a = [
            snap(1, "csirr-sync.0000000001"),
            snap(2, "csirr-sync.0000000002"),
            snap(3, "user"),
            snap(4, "csirr-sync.0000000003"),
        ];
        let b = [
            snap(7, "csirr-sync.0000000002"),
            snap(8, "csirr-sync.0000000001"),
            snap(9, "user"),
        ];
        assert_eq!(
            newest_common_sync_snap(&a, &b).as_deref(),
            Some("csirr-sync.0000000002")
        );
        assert_eq!(newest_common_sync_snap(&a, &[snap(1, "user")]), None);
        assert_eq!(newest_common_sync_snap(&[], &b), None);
    }

    #[test]
    fn runs_at_block_granularity() {
        let a = vec![0u8; 5 * BLOCK as usize + 100];
        let mut b = a.clone();
        assert!(differing_runs(&a, &b).is_empty());
        b[BLOCK as usize + 7] = 1;
        b[2 * BLOCK as usize] = 1;
        b[4 * BLOCK as usize + 1] = 1;
        b[5 * BLOCK as usize + 99] = 1;
        assert_eq!(
            differing_runs(&a, &b),
            vec![(BLOCK, 2 * BLOCK), (4 * BLOCK, BLOCK + 100)]
        );
    }

    #[test]
    fn aggregator_merges_counts_and_caps() {
        let mut g = Aggregator::new(2);
        g.push(0, 4096);
        g.push(4096, 4096); // touches: merged
        g.push(16384, 4096);
        g.push(32768, 4096); // beyond the cap: counted only
        g.push(36864, 4096); // touches an uncounted run: merged
        g.push(65536, 0); // empty: ignored
        assert_eq!(
            g.extents(),
            &[
                DiffExtent {
                    offset: 0,
                    length: 8192
                },
                DiffExtent {
                    offset: 16384,
                    length: 4096
                }
            ]
        );
        assert_eq!(g.total(), 3);
        assert_eq!(g.bytes, 5 * 4096);
    }

    #[test]
    fn text_report_names_extents() {
        let r = VerifyReport {
            volume: "p/i".into(),
            image: "p/i".into(),
            local_cluster: "site-b".into(),
            peer: "site-a".into(),
            snapshot: "csirr-sync.0000000001".into(),
            local_size: 1 << 20,
            peer_size: 1 << 20,
            chunk_size: 4 << 20,
            bytes_compared: 1 << 20,
            bytes_read: 1 << 20,
            seconds: 0.5,
            identical: false,
            differing_bytes: 4096,
            differing_extents: 1,
            extents: vec![DiffExtent {
                offset: 8192,
                length: 4096,
            }],
        };
        let t = render_text(&r);
        assert!(t.contains("DIFFERENT: 1 extent(s)"), "{t}");
        assert!(t.contains("8192") && t.contains("4096"), "{t}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["extents"][0]["offset"], 8192);
        assert_eq!(j["identical"], false);
    }
}
