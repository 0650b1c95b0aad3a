//! Incremental reading of an image's journal in replay order, from a
//! commit position, as `journal::JournalPlayer` does.
//!
//! The reader keeps a cursor (object number, byte offset) per splay offset
//! and a queue of the entries read there but not yet handed out. Each
//! [`JournalReader::poll`] reads the active set once (one omap read), then
//! every offset's current object from its cursor (bytes already read are
//! not read again), moves an offset to its next object (`+ splay_width`)
//! only when the object's set is below the active set (the writer closed
//! it before moving on, so the read was complete), and hands out entries
//! in (tag, entry) order:
//!
//! - entry `n` of the active tag is at offset `n % splay_width`: entries
//!   there of older tags, or of this tag below `n`, are stale or already
//!   committed and dropped;
//! - a newer tag at the expected place, or anywhere once the expected
//!   offset has nothing more, ends the active tag (its owner lost the lock:
//!   late appends of the old tag are dropped, as librbd does);
//! - a new tag starts with its entry 0 at offset 0;
//! - a later entry of the active tag where `n` should be is a gap
//!   ([`JournalError::Gap`]): the journal lost entries (trimmed under us).
//!
//! Nothing more to hand out is not an error: `poll` returns what it has,
//! and the next call resumes at the cursors. A commit position does not
//! carry byte offsets, so a reader created from one reads the objects of
//! the position's newest set from their start once, skipping what was
//! committed. [`CommitTracker`] turns handed-out positions into the
//! `ObjectSetPosition` that cls `client_commit` takes.

use std::collections::{BTreeMap, VecDeque};

use super::entry::{Entry, ScanEnd, scan_object};
use super::io::{Journal, JournalError, JournalResult};
use super::types::{ObjectPosition, ObjectSetPosition};

/// Bytes read from one object per poll at most, by default.
pub const DEFAULT_MAX_READ: usize = 4 << 20;

/// An entry handed out by the reader, with where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    /// Its object, tag and number: what a commit records.
    pub position: ObjectPosition,
    /// Its payload (an encoded [`super::EventEntry`] for librbd).
    pub payload: Vec<u8>,
}

/// How much of a journal a reader has not handed out yet
/// ([`JournalReader::entries_behind`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Behind {
    /// Entries (counted, or estimated past the scan limit).
    pub entries: u64,
    /// Bytes: held back payloads plus unread object bytes, padding
    /// included.
    pub bytes: u64,
    /// Whether every entry was counted (no estimate).
    pub exact: bool,
}

/// Where reading of one splay offset stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    object_number: u64,
    offset: u64,
}

/// Counters of a reader since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Bytes read from data objects.
    pub bytes_read: u64,
    /// Object reads issued.
    pub reads: u64,
    /// Entries handed out.
    pub entries: u64,
    /// Entries dropped: of an ended tag, or at or before the start
    /// position.
    pub skipped: u64,
}

/// Reads a journal's entries in replay order, incrementally.
#[derive(Debug)]
pub struct JournalReader {
    width: u64,
    object_size: u64,
    max_read: usize,
    cursors: Vec<Cursor>,
    queues: Vec<VecDeque<ReadEntry>>,
    queued_bytes: Vec<usize>,
    /// The tag being handed out, and its next entry number.
    tag: Option<u64>,
    next_entry: u64,
    /// Tags at or below this one ended: their entries are dropped.
    floor: Option<u64>,
    stats: ReaderStats,
}

impl JournalReader {
    /// A reader that hands out the entries after `from` (a client's commit
    /// position; empty: everything still in the journal).
    pub fn new(journal: &Journal, from: &ObjectSetPosition) -> JournalResult<Self> {
        let layout = journal.layout();
        let width = u64::from(layout.splay_width);
        let (minimum_set, _) = journal.object_sets()?;
        // Entries after the newest committed one were appended after it,
        // so to its set or a later one.
        let (start_set, tag, next_entry) = match from.newest() {
            Some(p) => (
                (p.object_number / width).max(minimum_set),
                Some(p.tag_tid),
                p.entry_tid + 1,
            ),
            None => (minimum_set, None, 0),
        };
        Ok(Self {
            width,
            object_size: layout.object_size(),
            max_read: DEFAULT_MAX_READ,
            cursors: (0..width)
                .map(|o| Cursor {
                    object_number: start_set * width + o,
                    offset: 0,
                })
                .collect(),
            queues: (0..width).map(|_| VecDeque::new()).collect(),
            queued_bytes: vec![0; width as usize],
            tag,
            next_entry,
            floor: None,
            stats: ReaderStats::default(),
        })
    }

    /// Bytes of the journal this reader has not handed out yet: what its
    /// cursors have not read of each offset's objects up to the active set
    /// (a stat per object, padding included), plus what it read and holds
    /// back. An estimate of how far behind its client is.
    pub fn bytes_behind(&self, journal: &Journal) -> JournalResult<u64> {
        let (_, active_set) = journal.object_sets()?;
        let mut behind: u64 = self.queued_bytes.iter().map(|&b| b as u64).sum();
        for (o, c) in self.cursors.iter().enumerate() {
            let last = active_set * self.width + o as u64;
            let mut obj = c.object_number;
            while obj <= last {
                let size = journal.data_object_size(obj)?.unwrap_or(0);
                let read = if obj == c.object_number { c.offset } else { 0 };
                behind += size.saturating_sub(read);
                obj += self.width;
            }
        }
        Ok(behind)
    }

    /// Whether the object where the next entry of the active tag lands
    /// (offset 0 when no tag is active: a new tag starts there) has grown
    /// past this reader's cursor: one stat, no header read, nothing read
    /// or consumed. `false` says nothing about entries appended to a new
    /// object set or by a new tag elsewhere: cls `set_active_set` and
    /// `tag_create` notify the journal header, which a caller watches, and
    /// a full [`JournalReader::poll`] now and then is the safety net.
    /// Blocking.
    pub fn probe(&self, journal: &Journal) -> JournalResult<bool> {
        let offset = match self.tag {
            Some(_) => (self.next_entry % self.width) as usize,
            None => 0,
        };
        if !self.queues[offset].is_empty() {
            return Ok(true);
        }
        let c = self.cursors[offset];
        Ok(journal
            .data_object_size(c.object_number)?
            .is_some_and(|size| size > c.offset))
    }

    /// Journal entries this reader has not handed out yet: those it holds
    /// back, plus those in what its cursors have not read of each offset's
    /// objects up to the active set. The unread bytes are read and framed
    /// (nothing is decoded or consumed) up to `scan_limit` bytes; beyond
    /// that the rest is estimated from the mean entry size seen (the
    /// answer's `exact` is then false). Entries of ended tags, and of the
    /// active tag at or before the cursor, are not counted. Blocking.
    pub fn entries_behind(&self, journal: &Journal, scan_limit: u64) -> JournalResult<Behind> {
        let (_, active_set) = journal.object_sets()?;
        let mut b = Behind {
            entries: self.queues.iter().map(|q| q.len() as u64).sum(),
            bytes: self.queued_bytes.iter().map(|&n| n as u64).sum(),
            exact: true,
        };
        let (mut scanned, mut scanned_entries, mut unscanned) = (0u64, 0u64, 0u64);
        for (o, c) in self.cursors.iter().enumerate() {
            let last = active_set * self.width + o as u64;
            let mut obj = c.object_number;
            while obj <= last {
                let from = if obj == c.object_number { c.offset } else { 0 };
                let size = journal.data_object_size(obj)?.unwrap_or(0);
                let left = size.saturating_sub(from);
                obj += self.width;
                if left == 0 {
                    continue;
                }
                b.bytes += left;
                if scanned + left > scan_limit {
                    unscanned += left;
                    continue;
                }
                let Some(buf) = journal.read_object(obj - self.width, from, left as usize)? else {
                    continue;
                };
                scanned += buf.len() as u64;
                let scan = scan_object(&buf, from, self.object_size);
                scanned_entries += scan
                    .entries
                    .iter()
                    .filter(|e| !self.is_stale(e.tag_tid, e.entry_tid))
                    .count() as u64;
            }
        }
        b.entries += scanned_entries;
        if unscanned > 0 {
            b.exact = false;
            // Without a sample, librbd's 4 KiB writes: 33 bytes of framing
            // and an event of about 4 KiB.
            let mean = scanned
                .checked_div(scanned_entries)
                .unwrap_or(4096 + 64)
                .max(1);
            b.entries += unscanned.div_ceil(mean);
        }
        Ok(b)
    }

    /// Sets the most bytes read from one object per poll (at least 4 KiB).
    pub fn with_max_read(mut self, max_read: usize) -> Self {
        self.max_read = max_read.max(4096);
        self
    }

    /// The counters.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// The tag being read, if one started.
    pub fn active_tag(&self) -> Option<u64> {
        self.tag
    }

    /// Reads what was appended since the last call and returns up to
    /// `max_entries` entries in replay order; fewer only when nothing more
    /// is readable yet. Call again at once when it returned `max_entries`.
    pub fn poll(&mut self, journal: &Journal, max_entries: usize) -> JournalResult<Vec<ReadEntry>> {
        let (minimum_set, active_set) = journal.object_sets()?;
        let mut out = Vec::new();
        loop {
            let mut more = false;
            for offset in 0..self.width as usize {
                more |= self.fetch(journal, offset, minimum_set, active_set)?;
            }
            out.extend(self.drain(journal.image_id(), max_entries - out.len())?);
            // Reads that stopped at their size bound (e.g. skipping
            // committed entries) read on until the batch is full.
            if out.len() >= max_entries || !more {
                return Ok(out);
            }
        }
    }

    /// Reads offset `offset` from its cursor, moving on over final
    /// objects; `true` when it stopped at the read size bound with more
    /// to read.
    fn fetch(
        &mut self,
        journal: &Journal,
        offset: usize,
        minimum_set: u64,
        active_set: u64,
    ) -> JournalResult<bool> {
        // Grows when one entry does not fit in a read.
        let mut want = self.max_read;
        loop {
            if self.queued_bytes[offset] >= self.max_read {
                return Ok(false);
            }
            let cur = self.cursors[offset];
            let set = cur.object_number / self.width;
            if set < minimum_set {
                // Trimmed (a reader started below the minimum): whatever
                // was there is gone; a gap shows up in the drain.
                self.cursors[offset] = Cursor {
                    object_number: minimum_set * self.width + offset as u64,
                    offset: 0,
                };
                continue;
            }
            // The active set was read before the object: a set below it
            // was closed before this read, which therefore saw all of it.
            let closed = set < active_set;
            self.stats.reads += 1;
            let Some(buf) = journal.read_object(cur.object_number, cur.offset, want)? else {
                if closed {
                    self.next_object(offset);
                    continue;
                }
                return Ok(false);
            };
            self.stats.bytes_read += buf.len() as u64;
            let full = buf.len() == want;
            let scan = scan_object(&buf, cur.offset, self.object_size);
            if let ScanEnd::Corrupt(e) = scan.end {
                return Err(JournalError::Corrupt {
                    object: journal.object_oid(cur.object_number),
                    source: e,
                });
            }
            self.enqueue(offset, cur.object_number, &scan.entries);
            self.cursors[offset].offset = scan.next_offset;
            if full && scan.next_offset == cur.offset {
                // An entry larger than a read: read it whole. Entries
                // never exceed the object size (the scan says so).
                want = want.saturating_mul(2);
                continue;
            }
            if full {
                return Ok(true);
            }
            if !closed {
                return Ok(false);
            }
            if scan.end == ScanEnd::Partial {
                return Err(journal.bad(format!(
                    "closed object {} ends inside an entry at offset {}",
                    journal.object_oid(cur.object_number),
                    scan.next_offset
                )));
            }
            self.next_object(offset);
        }
    }

    /// Queues the `entries` read from object `object_number` at splay
    /// offset `offset`, dropping stale ones as they are read, so that
    /// committed entries never fill the queues.
    fn enqueue(&mut self, offset: usize, object_number: u64, entries: &[Entry<'_>]) {
        for e in entries {
            if self.is_stale(e.tag_tid, e.entry_tid) {
                self.stats.skipped += 1;
                continue;
            }
            self.queued_bytes[offset] += e.payload.len();
            self.queues[offset].push_back(ReadEntry {
                position: ObjectPosition {
                    object_number,
                    tag_tid: e.tag_tid,
                    entry_tid: e.entry_tid,
                },
                payload: e.payload.to_vec(),
            });
        }
    }

    /// Whether entry (tag, entry) is of an ended tag, or handed out (or
    /// committed) already.
    fn is_stale(&self, tag_tid: u64, entry_tid: u64) -> bool {
        match self.tag {
            Some(t) => tag_tid < t || (tag_tid == t && entry_tid < self.next_entry),
            None => self.floor.is_some_and(|f| tag_tid <= f),
        }
    }

    fn next_object(&mut self, offset: usize) {
        let c = &mut self.cursors[offset];
        c.object_number += self.width;
        c.offset = 0;
    }

    fn pop(&mut self, offset: usize) -> Option<ReadEntry> {
        let e = self.queues[offset].pop_front()?;
        self.queued_bytes[offset] -= e.payload.len();
        Some(e)
    }

    /// Hands out queued entries in order until one is missing.
    fn drain(&mut self, image_id: &str, max_entries: usize) -> JournalResult<Vec<ReadEntry>> {
        let mut out = Vec::new();
        while out.len() < max_entries {
            let Some(tag) = self.tag else {
                // A tag starts with its entry 0, at offset 0.
                let floor = self.floor;
                while self.queues[0]
                    .front()
                    .is_some_and(|f| floor.is_some_and(|fl| f.position.tag_tid <= fl))
                {
                    self.pop(0);
                    self.stats.skipped += 1;
                }
                match self.queues[0].front() {
                    None => break,
                    // Reading from an empty position starts at the oldest
                    // entry left, whatever its number.
                    Some(f) if f.position.entry_tid == 0 || floor.is_none() => {
                        self.tag = Some(f.position.tag_tid);
                        self.next_entry = f.position.entry_tid;
                        continue;
                    }
                    Some(f) => {
                        return Err(JournalError::Gap {
                            journal: image_id.to_string(),
                            tag_tid: f.position.tag_tid,
                            expected: 0,
                            found: f.position.entry_tid,
                        });
                    }
                }
            };
            let offset = (self.next_entry % self.width) as usize;
            let next = self.next_entry;
            while self.queues[offset].front().is_some_and(|f| {
                f.position.tag_tid < tag
                    || (f.position.tag_tid == tag && f.position.entry_tid < next)
            }) {
                self.pop(offset);
                self.stats.skipped += 1;
            }
            match self.queues[offset].front() {
                Some(f) if f.position.tag_tid == tag && f.position.entry_tid == next => {
                    let e = self.pop(offset).expect("front exists");
                    self.next_entry += 1;
                    self.stats.entries += 1;
                    out.push(e);
                }
                Some(f) if f.position.tag_tid == tag => {
                    return Err(JournalError::Gap {
                        journal: image_id.to_string(),
                        tag_tid: tag,
                        expected: next,
                        found: f.position.entry_tid,
                    });
                }
                Some(_) => self.end_tag(tag),
                None => {
                    let newer = self
                        .queues
                        .iter()
                        .any(|q| q.iter().any(|e| e.position.tag_tid > tag));
                    if !newer {
                        break;
                    }
                    self.end_tag(tag);
                }
            }
        }
        Ok(out)
    }

    /// The active tag ended: its owner lost the lock.
    fn end_tag(&mut self, tag: u64) {
        tracing::debug!(tag, next_entry = self.next_entry, "journal tag ended");
        self.floor = Some(tag);
        self.tag = None;
    }
}

/// Turns positions applied in replay order into commit positions: the
/// newest position of each splay offset, newest first, as librbd's
/// `JournalMetadata::committed` keeps them.
#[derive(Debug, Clone)]
pub struct CommitTracker {
    width: u64,
    per_offset: BTreeMap<u64, ObjectPosition>,
}

impl CommitTracker {
    /// Starts from `from` (what the client has committed).
    pub fn new(splay_width: u8, from: &ObjectSetPosition) -> Self {
        let width = u64::from(splay_width.max(1));
        let mut per_offset = BTreeMap::new();
        // Oldest first, so that the newest of an offset wins.
        for p in from.positions.iter().rev() {
            per_offset.insert(p.object_number % width, *p);
        }
        Self { width, per_offset }
    }

    /// Records that `p` and everything before it was applied.
    pub fn advance(&mut self, p: ObjectPosition) {
        self.per_offset.insert(p.object_number % self.width, p);
    }

    /// The position to commit: newest first, one per offset.
    pub fn position(&self) -> ObjectSetPosition {
        let mut positions: Vec<ObjectPosition> = self.per_offset.values().copied().collect();
        positions.sort_by_key(|p| std::cmp::Reverse((p.tag_tid, p.entry_tid)));
        ObjectSetPosition { positions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(object_number: u64, tag_tid: u64, entry_tid: u64) -> ObjectPosition {
        ObjectPosition {
            object_number,
            tag_tid,
            entry_tid,
        }
    }

    fn reader(width: u64, tag: Option<u64>, next_entry: u64) -> JournalReader {
        JournalReader {
            width,
            object_size: 1 << 24,
            max_read: DEFAULT_MAX_READ,
            cursors: (0..width)
                .map(|o| Cursor {
                    object_number: o,
                    offset: 0,
                })
                .collect(),
            queues: (0..width).map(|_| VecDeque::new()).collect(),
            queued_bytes: vec![0; width as usize],
            tag,
            next_entry,
            floor: None,
            stats: ReaderStats::default(),
        }
    }

    /// Queues entry (tag, entry) of set `set` where the writer puts it.
    fn put(r: &mut JournalReader, set: u64, tag: u64, entry: u64) {
        let offset = entry % r.width;
        r.queues[offset as usize].push_back(ReadEntry {
            position: pos(set * r.width + offset, tag, entry),
            payload: vec![1],
        });
        r.queued_bytes[offset as usize] += 1;
    }

    fn tids(v: &[ReadEntry]) -> Vec<(u64, u64)> {
        v.iter()
            .map(|e| (e.position.tag_tid, e.position.entry_tid))
            .collect()
    }

    #[test]
    fn entries_come_in_order_and_wait_for_a_missing_one() {
        let mut r = reader(4, None, 0);
        for n in [0, 1, 3, 5] {
            put(&mut r, 0, 7, n);
        }
        // Entry 2 is not readable yet (appends to objects race): 3 and 5
        // wait for it.
        assert_eq!(tids(&r.drain("i", 100).unwrap()), [(7, 0), (7, 1)]);
        assert_eq!(r.drain("i", 100).unwrap(), []);
        put(&mut r, 0, 7, 2);
        put(&mut r, 0, 7, 4);
        assert_eq!(
            tids(&r.drain("i", 2).unwrap()),
            [(7, 2), (7, 3)],
            "at most max_entries"
        );
        assert_eq!(tids(&r.drain("i", 100).unwrap()), [(7, 4), (7, 5)]);
        assert_eq!(r.stats.entries, 6);
    }

    #[test]
    fn a_commit_position_skips_what_was_committed_and_older_tags() {
        // Committed up to tag 5 entry 5.
        let mut r = reader(4, Some(5), 6);
        put(&mut r, 0, 4, 2); // an older tag
        for n in 0..9 {
            put(&mut r, n / 4, 5, n);
        }
        assert_eq!(tids(&r.drain("i", 100).unwrap()), [(5, 6), (5, 7), (5, 8)]);
        assert_eq!(r.stats.skipped, 1 + 6);
    }

    #[test]
    fn a_newer_tag_ends_the_active_one() {
        let mut r = reader(4, None, 0);
        for n in 0..3 {
            put(&mut r, 0, 1, n);
        }
        assert_eq!(r.drain("i", 100).unwrap().len(), 3);
        // Tag 1 ended at entry 2; tag 2 starts at offset 0. Entries 1 of
        // tag 2 come before its entry 0 is readable: wait.
        put(&mut r, 0, 2, 1);
        assert_eq!(r.drain("i", 100).unwrap(), []);
        put(&mut r, 0, 2, 0);
        // A late append of tag 1 is dropped.
        put(&mut r, 0, 1, 3);
        put(&mut r, 0, 2, 2);
        put(&mut r, 0, 2, 3);
        assert_eq!(
            tids(&r.drain("i", 100).unwrap()),
            [(2, 0), (2, 1), (2, 2), (2, 3)]
        );
        assert_eq!(r.active_tag(), Some(2));
    }

    #[test]
    fn missing_entries_are_a_gap() {
        let mut r = reader(2, Some(3), 4);
        put(&mut r, 0, 3, 6);
        let err = r.drain("img", 100).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::Gap {
                    tag_tid: 3,
                    expected: 4,
                    found: 6,
                    ..
                }
            ),
            "{err}"
        );
        // A new tag must start at its entry 0.
        let mut r = reader(2, Some(3), 4);
        put(&mut r, 0, 4, 2);
        assert!(matches!(
            r.drain("img", 100).unwrap_err(),
            JournalError::Gap {
                tag_tid: 4,
                expected: 0,
                found: 2,
                ..
            }
        ));
    }

    #[test]
    fn commit_tracker_keeps_the_newest_per_offset_newest_first() {
        let from = ObjectSetPosition {
            positions: vec![pos(1, 2, 5), pos(0, 2, 4), pos(3, 1, 7)],
        };
        let mut t = CommitTracker::new(4, &from);
        assert_eq!(t.position(), from);
        t.advance(pos(2, 2, 6));
        t.advance(pos(7, 2, 7));
        assert_eq!(
            t.position().positions,
            vec![pos(7, 2, 7), pos(2, 2, 6), pos(1, 2, 5), pos(0, 2, 4)]
        );
        // A new tag: entry 0 at offset 0 replaces the old offset 0.
        t.advance(pos(8, 3, 0));
        assert_eq!(t.position().newest(), Some(&pos(8, 3, 0)));
        assert_eq!(t.position().positions.len(), 4);
    }
}
