//! Journal replay: applies the entries of a primary image's journal
//! (read with [`JournalReader`]) to a replica image through librbd, and
//! commits this replicator's position in the primary's journal.
//!
//! - IO events (write, discard, write-same, compare-and-write) are
//!   submitted as aio, up to `max_in_flight` at once; an IO that overlaps
//!   one in flight waits for everything in flight first, so that the
//!   replica sees overlapping writes in journal order. IO past the
//!   replica's end is clipped, as librbd's replay does.
//! - A flush event waits for the IO in flight and flushes the replica.
//! - Op events (snapshots, resize, metadata, ...) are held until their
//!   `OpFinish`: with `r >= 0` the IO in flight is drained and the op is
//!   applied (the errors rbd-mirror ignores, e.g. `EEXIST` on a snapshot
//!   create, count as done); with `r < 0` the op is dropped. An
//!   `OpFinish` whose start was not seen was committed before (replay
//!   resumed after its start): nothing to do. `Rename` and
//!   `UpdateFeatures` are not applied: the replica's name and features
//!   are the replicator's.
//! - Entries of an ended tag never reach here (the reader drops them);
//!   op starts of an ended tag without their finish are dropped.
//! - Commit: after `commit_every` entries and at the end of each
//!   [`JournalReplayer::replay_available`] that applied any, the IO in flight is drained,
//!   the replica flushed, and the position of the newest entry such that
//!   it and everything before it is applied (an op start waiting for its
//!   finish holds the position back) is sent with cls `client_commit`.
//!   A replayer restarted from that position applies nothing twice except
//!   IO after it, which is idempotent up to the next flush.
//! - Trim: after a commit that moved this client's oldest object set, the
//!   primary's journal is trimmed behind every connected client
//!   ([`Journal::trim`]), as librbd's trimmer does while the image is open.
//!
//! Every call is blocking: run it on a thread of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc;

use csirr_ceph::{self as ceph, ErrorKind, Image};
use csirr_journal::{
    CommitTracker, DecodeError, Event, EventEntry, Journal, JournalError, JournalReader,
    ObjectPosition, ObjectSetPosition, ReadEntry, SnapEvent, SnapshotNamespace,
};

use super::error::EngineError;

/// Bounds of a replayer.
#[derive(Debug, Clone, Copy)]
pub struct ReplayConfig {
    /// IO events applied at once at most (rbd-mirror: 64).
    pub max_in_flight: usize,
    /// Entries applied between two commits at most.
    pub commit_every: u64,
    /// Entries taken from the reader per poll at most.
    pub batch: usize,
    /// Bytes read from one journal object per read at most (and queued
    /// per splay offset at most).
    pub max_read: usize,
    /// Trim the primary's journal behind the clients after a commit that
    /// moved this client's oldest set (librbd trims only while it has the
    /// image open).
    pub trim: bool,
    /// Entries one [`JournalReplayer::replay_available`] takes at most (it
    /// returns earlier only when nothing more is readable), so that a
    /// caller replaying a backlog gets control back to report progress.
    pub max_per_call: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            commit_every: 4096,
            batch: 1024,
            max_read: csirr_journal::reader::DEFAULT_MAX_READ,
            trim: true,
            max_per_call: u64::MAX,
        }
    }
}

/// What stopped a replay.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading or committing in the journal failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Applying to the replica failed.
    #[error("replica {replica}: {source}")]
    Replica {
        /// The replica image.
        replica: String,
        /// The failed call.
        #[source]
        source: ceph::Error,
    },
    /// An entry's payload is not a librbd event.
    #[error("journal entry {tag_tid}/{entry_tid}: {source}")]
    Decode {
        /// Its tag.
        tag_tid: u64,
        /// Its number.
        entry_tid: u64,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// Recording the replayer's own state (outside the journal) failed.
    #[error("recording the replay state: {0}")]
    State(String),
    /// An event this replayer cannot apply (an unknown type, or an op
    /// started twice).
    #[error("journal entry {tag_tid}/{entry_tid}: {what}")]
    Unsupported {
        /// Its tag.
        tag_tid: u64,
        /// Its number.
        entry_tid: u64,
        /// What.
        what: String,
    },
}

impl From<ReplayError> for EngineError {
    fn from(e: ReplayError) -> Self {
        match e {
            ReplayError::Journal(JournalError::Ceph(source))
            | ReplayError::Replica { source, .. } => EngineError::Ceph {
                context: "journal replay".into(),
                source,
            },
            e => EngineError::Internal(e.to_string()),
        }
    }
}

/// Result of a replay step.
pub type ReplayResult<T> = Result<T, ReplayError>;

/// Counters of a replayer since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Entries taken from the reader.
    pub entries: u64,
    /// IO events applied.
    pub io_events: u64,
    /// Bytes those IO events covered.
    pub io_bytes: u64,
    /// Flush events applied.
    pub flushes: u64,
    /// Ops applied (after an `OpFinish` with `r >= 0`).
    pub ops_applied: u64,
    /// Ops dropped (`r < 0`, or their tag ended before their finish).
    pub ops_dropped: u64,
    /// Events that need nothing on the replica (demote/promote markers,
    /// renames, feature changes, finishes of ops committed before).
    pub ignored: u64,
    /// `client_commit` calls made.
    pub commits: u64,
    /// Trims of the primary's journal.
    pub trims: u64,
    /// Entries skipped because the bootstrap snapshot holds their effect.
    pub skipped_io: u64,
}

/// Called once before the first commit after the replay passed the
/// bootstrap snapshot's `SnapCreate`: records (outside the journal) that
/// nothing is to be skipped any more, before a commit moves past it.
pub type SkipPassed = Box<dyn FnMut() -> Result<(), String> + Send>;

/// An op start waiting for its finish.
struct PendingOp {
    event: Event,
    tag_tid: u64,
    seq: u64,
}

/// Applies one primary journal to one replica image.
pub struct JournalReplayer {
    journal: Journal,
    client_id: String,
    reader: JournalReader,
    replica: Image,
    replica_size: u64,
    replica_object_size: u64,
    cfg: ReplayConfig,
    tracker: CommitTracker,
    committed: ObjectSetPosition,
    /// The journal's minimum set after this replayer's last trim.
    trimmed_below: u64,
    /// Entries handed out and not yet in the tracker, with whether they
    /// are applied; `base_seq` is the sequence number of the first.
    uncommitted: VecDeque<(ObjectPosition, bool)>,
    base_seq: u64,
    ops: HashMap<u64, PendingOp>,
    in_flight: HashMap<u64, (u64, u64)>,
    next_io: u64,
    done_tx: mpsc::Sender<(u64, ceph::Result<()>)>,
    done_rx: mpsc::Receiver<(u64, ceph::Result<()>)>,
    stats: ReplayStats,
    /// Entries are skipped until the `SnapCreate` of this snapshot.
    skip_until: Option<String>,
    /// Set when the skip ended and its hook has not run yet.
    on_skip_passed: Option<SkipPassed>,
    skip_passed: bool,
    /// The tag of the last entry applied when that entry is the
    /// `DemotePromote` of a demotion (a tag owned by `<orphan>`): the
    /// primary was demoted and the replica holds everything before it.
    demoted: Option<u64>,
}

impl std::fmt::Debug for JournalReplayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalReplayer")
            .field("journal", &self.journal)
            .field("client_id", &self.client_id)
            .field("replica", &self.replica.spec())
            .field("committed", &self.committed)
            .finish()
    }
}

impl JournalReplayer {
    /// A replayer of `journal` onto `replica` for registered client
    /// `client_id`, resuming after the client's commit position.
    /// `NotFound` (as [`JournalError::Ceph`]) when the journal is gone;
    /// [`JournalError::BadHeader`] when the client is not registered.
    pub fn start(
        journal: Journal,
        client_id: &str,
        replica: Image,
        cfg: ReplayConfig,
    ) -> ReplayResult<Self> {
        let client = journal
            .client(client_id)?
            .ok_or_else(|| journal.bad(format!("client {client_id} is not registered")))?;
        let committed = client.commit_position;
        let reader = JournalReader::new(&journal, &committed)?.with_max_read(cfg.max_read);
        let tracker = CommitTracker::new(journal.layout().splay_width, &committed);
        let replica_err = |source| ReplayError::Replica {
            replica: replica.spec(),
            source,
        };
        let info = replica.stat().map_err(replica_err)?;
        let (tx, rx) = mpsc::channel();
        tracing::info!(
            journal = journal.image_id(),
            replica = %replica.spec(),
            client = client_id,
            from = ?committed.newest(),
            "journal replay starts"
        );
        Ok(Self {
            journal,
            client_id: client_id.to_string(),
            reader,
            replica_size: info.size,
            replica_object_size: info.obj_size.max(1),
            replica,
            cfg,
            tracker,
            committed,
            trimmed_below: 0,
            uncommitted: VecDeque::new(),
            base_seq: 0,
            ops: HashMap::new(),
            in_flight: HashMap::new(),
            next_io: 0,
            done_tx: tx,
            done_rx: rx,
            stats: ReplayStats::default(),
            skip_until: None,
            on_skip_passed: None,
            skip_passed: false,
            demoted: None,
        })
    }

    /// Skips every entry before the `SnapCreate` of snapshot `snap` (a
    /// bootstrap snapshot taken after this client registered, whose
    /// content the replica already holds: IO and ops alike); `passed`
    /// runs before the first commit after it.
    pub fn skip_io_until_snap(&mut self, snap: &str, passed: SkipPassed) {
        self.skip_until = Some(snap.to_string());
        self.on_skip_passed = Some(passed);
    }

    /// Whether IO is still being skipped (the bootstrap snapshot's
    /// `SnapCreate` not reached yet).
    pub fn skipping(&self) -> bool {
        self.skip_until.is_some()
    }

    /// The demotion tag when the last entry read is a demotion's
    /// `DemotePromote` (an `<orphan>` tag, as librbd's demotion writes):
    /// the primary was demoted and the replica, flushed at the end of each
    /// [`JournalReplayer::replay_available`], holds everything it wrote.
    pub fn demoted(&self) -> Option<u64> {
        self.demoted
    }

    /// Bytes of the primary's journal not replayed yet (an estimate: see
    /// [`csirr_journal::JournalReader::bytes_behind`]). Blocking.
    pub fn bytes_behind(&self) -> ReplayResult<u64> {
        Ok(self.reader.bytes_behind(&self.journal)?)
    }

    /// Entries and bytes of the primary's journal not replayed yet (see
    /// [`csirr_journal::JournalReader::entries_behind`]; up to
    /// `scan_limit` unread bytes are read to count them). Blocking.
    pub fn behind(&self, scan_limit: u64) -> ReplayResult<csirr_journal::Behind> {
        Ok(self.reader.entries_behind(&self.journal, scan_limit)?)
    }

    /// Whether an entry may be readable at the place the next one lands
    /// (one stat; see [`csirr_journal::JournalReader::probe`]). Blocking.
    pub fn probe(&self) -> ReplayResult<bool> {
        Ok(self.reader.probe(&self.journal)?)
    }

    /// The counters.
    pub fn stats(&self) -> ReplayStats {
        self.stats
    }

    /// The reader's counters.
    pub fn reader_stats(&self) -> csirr_journal::ReaderStats {
        self.reader.stats()
    }

    /// The position last committed in the primary's journal.
    pub fn committed(&self) -> &ObjectSetPosition {
        &self.committed
    }

    /// The primary's journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Applies every entry readable now (at most `max_per_call`),
    /// committing in batches and once at the end; returns how many entries
    /// it took.
    pub fn replay_available(&mut self) -> ReplayResult<u64> {
        let mut taken = 0u64;
        let mut since_commit = 0u64;
        loop {
            let want = (self.cfg.batch as u64).min(self.cfg.max_per_call.saturating_sub(taken));
            if want == 0 {
                break;
            }
            let batch = self.reader.poll(&self.journal, want as usize)?;
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            for e in batch {
                self.apply(e)?;
                taken += 1;
                since_commit += 1;
                if since_commit >= self.cfg.commit_every {
                    self.commit()?;
                    since_commit = 0;
                }
            }
            if (n as u64) < want {
                break;
            }
        }
        // An idle poll has nothing to commit: the last commit drained and
        // flushed everything applied before it (no flush of the replica
        // every idle poll).
        if taken > 0 {
            self.commit()?;
        }
        Ok(taken)
    }

    /// Waits for the IO in flight, flushes the replica and commits the
    /// position of everything applied (up to the oldest op still waiting
    /// for its finish). Does nothing when the position did not move.
    pub fn commit(&mut self) -> ReplayResult<()> {
        self.drain()?;
        self.flush_replica()?;
        while let Some(&(p, true)) = self.uncommitted.front() {
            self.tracker.advance(p);
            self.uncommitted.pop_front();
            self.base_seq += 1;
        }
        let position = self.tracker.position();
        if position == self.committed {
            return Ok(());
        }
        if self.skip_passed {
            if let Some(hook) = self.on_skip_passed.as_mut() {
                hook().map_err(ReplayError::State)?;
            }
            self.skip_passed = false;
            self.on_skip_passed = None;
        }
        self.journal.commit(&self.client_id, &position)?;
        self.stats.commits += 1;
        tracing::debug!(
            journal = self.journal.image_id(),
            replica = %self.replica.spec(),
            position = ?position.newest(),
            "journal position committed"
        );
        let oldest_set = position
            .positions
            .iter()
            .map(|p| p.object_number / u64::from(self.journal.layout().splay_width))
            .min();
        self.committed = position;
        if self.cfg.trim && oldest_set.is_some_and(|s| s > self.trimmed_below) {
            self.trimmed_below = self.journal.trim()?;
            self.stats.trims += 1;
        }
        Ok(())
    }

    fn replica_err(&self, source: ceph::Error) -> ReplayError {
        ReplayError::Replica {
            replica: self.replica.spec(),
            source,
        }
    }

    /// Records an entry as handed out; returns its sequence number.
    fn record(&mut self, p: ObjectPosition, done: bool) -> u64 {
        self.uncommitted.push_back((p, done));
        self.base_seq + self.uncommitted.len() as u64 - 1
    }

    fn mark_done(&mut self, seq: u64) {
        if let Some(i) = seq.checked_sub(self.base_seq)
            && let Some(slot) = self.uncommitted.get_mut(i as usize)
        {
            slot.1 = true;
        }
    }

    fn apply(&mut self, e: ReadEntry) -> ReplayResult<()> {
        let p = e.position;
        self.stats.entries += 1;
        let ev = EventEntry::decode(&e.payload).map_err(|source| ReplayError::Decode {
            tag_tid: p.tag_tid,
            entry_tid: p.entry_tid,
            source,
        })?;
        self.drop_ops_of_ended_tags(p.tag_tid);
        self.note_demotion(p, &ev.event)?;
        if !self.past_bootstrap(&ev.event) {
            // The bootstrap snapshot holds the effect of everything before
            // its SnapCreate (replaying an old shrink, say, would lose data
            // it holds); an op finishing after it whose start is skipped
            // here counts as committed before.
            self.stats.skipped_io += 1;
            return self.skip(p);
        }
        match ev.event {
            Event::AioFlush => {
                self.drain()?;
                self.flush_replica()?;
                self.stats.flushes += 1;
            }
            Event::OpFinish { op_tid, r } => return self.finish_op(p, op_tid, r),
            Event::DemotePromote => {
                self.stats.ignored += 1;
            }
            Event::Unknown { event_type } => {
                return Err(unsupported(p, format!("unknown event type {event_type}")));
            }
            op if op.is_op_start() => return self.start_op(p, op),
            io => {
                if !self.apply_io(p, io)? {
                    return self.skip(p);
                }
            }
        }
        self.record(p, true);
        Ok(())
    }

    /// A DemotePromote event in an orphan tag marks the primary demoted
    /// (until the next entry).
    fn note_demotion(&mut self, p: ObjectPosition, ev: &Event) -> ReplayResult<()> {
        self.demoted = None;
        if matches!(ev, Event::DemotePromote) {
            let tag = self.journal.tag(p.tag_tid)?;
            let orphan = tag
                .and_then(|t| t.tag_data().ok())
                .is_some_and(|d| d.mirror_uuid == csirr_journal::types::ORPHAN_MIRROR_UUID);
            if orphan {
                self.demoted = Some(p.tag_tid);
            }
        }
        Ok(())
    }

    /// Whether `ev` is to be replayed: false for everything before the
    /// bootstrap snapshot's SnapCreate, which ends the skipping.
    fn past_bootstrap(&mut self, ev: &Event) -> bool {
        let Some(until) = self.skip_until.as_deref() else {
            return true;
        };
        let Event::SnapCreate(s) = ev else {
            return false;
        };
        if s.snap_name != until {
            return false;
        }
        tracing::info!(
            journal = self.journal.image_id(),
            replica = %self.replica.spec(),
            snapshot = %s.snap_name,
            skipped = self.stats.skipped_io,
            "bootstrap snapshot reached in the journal: replaying IO from here"
        );
        self.skip_until = None;
        self.skip_passed = true;
        true
    }

    /// Submits an IO event to the replica; false when it lies wholly past
    /// the replica's end (nothing to do).
    fn apply_io(&mut self, p: ObjectPosition, ev: Event) -> ReplayResult<bool> {
        match ev {
            Event::AioWrite { offset, mut data } => {
                let Some(len) = self.clip(offset, data.len() as u64) else {
                    return Ok(false);
                };
                data.truncate(len as usize);
                self.submit(offset, len, |img, done| img.aio_write(offset, data, done))?;
            }
            Event::AioDiscard {
                offset,
                length,
                discard_granularity_bytes,
                ..
            } => {
                let Some(len) = self.clip(offset, length) else {
                    return Ok(false);
                };
                for (o, l) in discard_extents(
                    offset,
                    len,
                    discard_granularity_bytes,
                    self.replica_object_size,
                ) {
                    self.submit(o, l, |img, done| img.aio_write_zeroes(o, l, done))?;
                }
            }
            Event::AioWriteSame {
                offset,
                length,
                data,
            } => {
                let plen = data.len() as u64;
                let Some(len) = self.clip(offset, length).map(|l| l - l % plen) else {
                    return Ok(false);
                };
                if len > 0 {
                    self.submit(offset, len, |img, done| {
                        img.aio_writesame(offset, len, data, done)
                    })?;
                }
            }
            Event::AioCompareAndWrite {
                offset,
                length,
                mut cmp_data,
                write_data,
            } => {
                if self.clip(offset, length) != Some(length) {
                    return Ok(false);
                }
                cmp_data.extend_from_slice(&write_data);
                self.submit(offset, length, |img, done| {
                    img.aio_compare_and_write(offset, cmp_data, done)
                })?;
            }
            other => {
                return Err(unsupported(p, format!("unexpected event {other:?}")));
            }
        }
        Ok(true)
    }

    /// The start of a maintenance op: held until its OpFinish says whether
    /// it succeeded on the primary.
    fn start_op(&mut self, p: ObjectPosition, op: Event) -> ReplayResult<()> {
        let Some(op_tid) = op.op_tid() else {
            return Err(unsupported(
                p,
                format!("op event without an op tid: {op:?}"),
            ));
        };
        if self.ops.contains_key(&op_tid) {
            return Err(unsupported(p, format!("op {op_tid} started twice")));
        }
        let seq = self.record(p, false);
        self.ops.insert(
            op_tid,
            PendingOp {
                event: op,
                tag_tid: p.tag_tid,
                seq,
            },
        );
        Ok(())
    }

    /// An OpFinish: applies its op when it succeeded on the primary (after
    /// the IO before it), drops it when it failed.
    fn finish_op(&mut self, p: ObjectPosition, op_tid: u64, r: i32) -> ReplayResult<()> {
        match self.ops.remove(&op_tid) {
            Some(op) if r >= 0 => {
                self.drain()?;
                if self.apply_op(&op.event)? {
                    self.stats.ops_applied += 1;
                } else {
                    self.stats.ignored += 1;
                }
                self.mark_done(op.seq);
            }
            Some(op) => {
                tracing::info!(
                    journal = self.journal.image_id(),
                    replica = %self.replica.spec(),
                    op_tid,
                    r,
                    "op failed on the primary: not replayed"
                );
                self.stats.ops_dropped += 1;
                self.mark_done(op.seq);
            }
            // Its start was committed before this replay began.
            None => self.stats.ignored += 1,
        }
        self.record(p, true);
        Ok(())
    }

    /// An IO event that needs nothing on the replica (all past its end).
    fn skip(&mut self, p: ObjectPosition) -> ReplayResult<()> {
        self.stats.ignored += 1;
        self.record(p, true);
        Ok(())
    }

    /// The part of `[offset, offset + len)` inside the replica: its
    /// length, `None` when nothing is.
    fn clip(&self, offset: u64, len: u64) -> Option<u64> {
        (offset < self.replica_size).then(|| len.min(self.replica_size - offset))
    }

    fn drop_ops_of_ended_tags(&mut self, tag_tid: u64) {
        let ended: Vec<u64> = self
            .ops
            .iter()
            .filter(|(_, op)| op.tag_tid < tag_tid)
            .map(|(t, _)| *t)
            .collect();
        for op_tid in ended {
            let op = self.ops.remove(&op_tid).expect("listed");
            tracing::warn!(
                journal = self.journal.image_id(),
                replica = %self.replica.spec(),
                op_tid,
                tag = op.tag_tid,
                "op start without a finish in an ended tag: dropped"
            );
            self.stats.ops_dropped += 1;
            self.mark_done(op.seq);
        }
    }

    /// Submits one aio over `[off, off + len)` once nothing in flight
    /// overlaps it and there is room.
    fn submit(
        &mut self,
        off: u64,
        len: u64,
        f: impl FnOnce(&Image, ceph::aio::AioCallback) -> ceph::Result<()>,
    ) -> ReplayResult<()> {
        let overlaps = self
            .in_flight
            .values()
            .any(|&(o, l)| o < off + len && off < o + l);
        if overlaps {
            self.drain()?;
        }
        while self.in_flight.len() >= self.cfg.max_in_flight.max(1) {
            self.wait_one()?;
        }
        let id = self.next_io;
        self.next_io += 1;
        let tx = self.done_tx.clone();
        f(
            &self.replica,
            Box::new(move |r, _| {
                // A compare-and-write that does not match on the replica
                // did not match on the primary either (the replica equals
                // the primary at this entry): nothing was written there.
                let r = match r {
                    Err(e) if e.errno() == libc::EILSEQ => Ok(()),
                    r => r.map(|_| ()),
                };
                let _ = tx.send((id, r));
            }),
        )
        .map_err(|e| self.replica_err(e))?;
        self.in_flight.insert(id, (off, len));
        self.stats.io_events += 1;
        self.stats.io_bytes += len;
        Ok(())
    }

    fn wait_one(&mut self) -> ReplayResult<()> {
        let (id, r) = self
            .done_rx
            .recv()
            .expect("the replayer holds a sender: recv cannot fail");
        self.in_flight.remove(&id);
        r.map_err(|e| self.replica_err(e))
    }

    /// Waits for every IO in flight; the first error is returned.
    fn drain(&mut self) -> ReplayResult<()> {
        let mut first = Ok(());
        while !self.in_flight.is_empty() {
            if let Err(e) = self.wait_one()
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }

    fn flush_replica(&self) -> ReplayResult<()> {
        self.replica.flush().map_err(|e| self.replica_err(e))
    }

    /// Applies an op whose finish said it succeeded on the primary;
    /// `false` for an op that is not replayed.
    fn apply_op(&mut self, ev: &Event) -> ReplayResult<bool> {
        let img = &self.replica;
        // The errors rbd-mirror's replay ignores, per op.
        let ok_if = |r: ceph::Result<()>, kind: ErrorKind| match r {
            Err(e) if e.kind() == kind => Ok(()),
            r => r,
        };
        let ok_if_errno = |r: ceph::Result<()>, errno: i32| match r {
            Err(e) if e.errno() == errno => Ok(()),
            r => r,
        };
        let user = |s: &SnapEvent| s.snap_namespace == SnapshotNamespace::User;
        let r = match ev {
            Event::Resize { size, .. } => {
                let r = img.resize(*size);
                if r.is_ok() {
                    self.replica_size = *size;
                }
                r
            }
            Event::SnapCreate(s) if user(s) => {
                ok_if(img.snap_create(&s.snap_name), ErrorKind::AlreadyExists)
            }
            Event::SnapRemove(s) if user(s) => {
                ok_if(img.snap_remove(&s.snap_name), ErrorKind::NotFound)
            }
            Event::SnapProtect(s) if user(s) => {
                ok_if_errno(img.snap_protect(&s.snap_name), libc::EBUSY)
            }
            Event::SnapUnprotect(s) if user(s) => {
                ok_if_errno(img.snap_unprotect(&s.snap_name), libc::EINVAL)
            }
            Event::SnapRollback(s) if user(s) => img.snap_rollback(&s.snap_name),
            Event::SnapRename {
                src_snap_name,
                dst_snap_name,
                ..
            } if !src_snap_name.is_empty() => match img.snap_rename(src_snap_name, dst_snap_name) {
                // Applied before a restart that replays it again: the
                // source is gone and the destination there.
                Err(e)
                    if e.is_not_found()
                        && img
                            .snap_list()
                            .is_ok_and(|l| l.iter().any(|s| &s.name == dst_snap_name)) =>
                {
                    Ok(())
                }
                r => ok_if(r, ErrorKind::AlreadyExists),
            },
            Event::SnapLimit { limit, .. } => ok_if_errno(img.snap_set_limit(*limit), libc::ERANGE),
            Event::MetadataSet { key, value, .. } => img.metadata_set(key, value),
            Event::MetadataRemove { key, .. } => img.metadata_remove(key),
            Event::Flatten { .. } => ok_if_errno(img.flatten(), libc::EINVAL),
            other => {
                // Renames and feature changes belong to the replicator;
                // group, trash and mirror snapshots are not the user's.
                tracing::info!(
                    journal = self.journal.image_id(),
                    replica = %img.spec(),
                    event_type = other.event_type(),
                    "op not replayed on the replica"
                );
                return Ok(false);
            }
        };
        r.map(|()| true).map_err(|e| self.replica_err(e))
    }
}

/// An entry this replayer cannot apply, at `p`.
fn unsupported(p: ObjectPosition, what: String) -> ReplayError {
    ReplayError::Unsupported {
        tag_tid: p.tag_tid,
        entry_tid: p.entry_tid,
        what,
    }
}

/// What a discard of `[offset, offset + len)` with granularity
/// `granularity` zeroes, as librbd's `ImageDiscardRequest` prunes it on the
/// primary: each object's part shrunk inwards to multiples of the
/// granularity (at most the object size), dropped when nothing is left;
/// the whole of it with granularity 0, or when the granularity is the
/// object size and the part reaches the object's end. Replayed as exact
/// zeroing, the replica ends up with the primary's bytes whatever its own
/// discard settings.
pub fn discard_extents(
    offset: u64,
    len: u64,
    granularity: u32,
    object_size: u64,
) -> Vec<(u64, u64)> {
    if len == 0 {
        return Vec::new();
    }
    let g = u64::from(granularity).min(object_size);
    if g == 0 {
        return vec![(offset, len)];
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let obj_start = at - at % object_size;
        let piece_end = end.min(obj_start + object_size);
        let (mut s, mut e) = (at - obj_start, piece_end - obj_start);
        if g < object_size || e < object_size {
            s = s.div_ceil(g) * g;
            e -= e % g;
        }
        if s < e {
            match out.last_mut() {
                Some((o, l)) if *o + *l == obj_start + s => *l += e - s,
                _ => out.push((obj_start + s, e - s)),
            }
        }
        at = piece_end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::discard_extents;

    const OBJ: u64 = 4 << 20;

    #[test]
    fn discards_are_pruned_as_librbd_prunes_them() {
        // Granularity 0: everything.
        assert_eq!(discard_extents(100, 5000, 0, OBJ), [(100, 5000)]);
        // 64 KiB: inwards to 64 KiB multiples.
        let k64 = 64 << 10;
        assert_eq!(
            discard_extents(1000, 3 * k64, k64 as u32, OBJ),
            [(k64, 2 * k64)]
        );
        // Too small: nothing.
        assert!(discard_extents(1000, 4096, k64 as u32, OBJ).is_empty());
        // Across an object boundary: pruned per object, merged back.
        assert_eq!(
            discard_extents(OBJ - k64 - 1, 2 * k64 + 2, k64 as u32, OBJ),
            [(OBJ - k64, 2 * k64)]
        );
        // Granularity of the object size: whole objects, and a part that
        // reaches its object's end (tail truncation).
        assert_eq!(
            discard_extents(OBJ / 2, OBJ, OBJ as u32, OBJ),
            [(OBJ / 2, OBJ / 2)]
        );
        assert_eq!(discard_extents(OBJ, OBJ, u32::MAX, OBJ), [(OBJ, OBJ)]);
    }
}
