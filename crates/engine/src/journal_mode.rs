//! Journal mode (`mirroringMode: journal`): the primary's writes reach the
//! replica through the primary image's journal instead of sync snapshots.
//!
//! - **Enable** (primary side, [`enable_journaling`]): exclusive-lock and
//!   journaling are turned on for the image (what was turned on is kept in
//!   the registry record, so that Disable turns exactly that off again); the
//!   record says `mode: journal`; the scheduler takes no sync snapshots of it.
//! - **Replica side** ([`run_journal_image`], one blocking task per image,
//!   started by the replayer's discovery like a snapshot sync): registers
//!   `csirr-<local fsid>` as a client of the primary's journal (data: an
//!   rbd-mirror `MirrorPeerClientMeta`, so that librbd and `rbd mirror image
//!   disable` decode it), takes a sync snapshot on the primary *after*
//!   registering and copies the replica to it with the snapshot-mode copy
//!   ([`super::replayer::sync_image`]); records the snapshot in the replica's
//!   record as `journal.skip_until`; then replays the journal from the
//!   registered position with [`JournalReplayer`], skipping every entry
//!   before that snapshot's `SnapCreate` (the replica holds their effect), polling
//!   every [`IDLE_POLL`] while idle and at once again after work. A restart
//!   finds the record and the registered client and resumes from the
//!   committed position without a new bootstrap.
//! - **Disable** (primary side, [`disable_journal_primary`]): unregisters
//!   this replicator's clients and turns off the features Enable turned on.
//!
//! Roles (promote, demote, resync) are in [`super::journal_roles`]: librbd's
//! journal tags record who is primary.

use std::cell::Cell;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;

use csirr_ceph::{self as ceph, ErrorKind, Image, IoCtx, features};
use csirr_journal::{
    Client, ClientData, ClientState, Journal, JournalError, MirrorPeerClientMeta, MirrorPeerState,
};

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::journal_replay::{JournalReplayer, ReplayConfig, ReplayStats};
use super::registry::{
    ImageRecord, JournalReplica, Registry, ReplayState, ReplicaStatus, Role, SyncPoint, sync_snaps,
};
use super::replayer::Job;

/// The registry's `mode` of journal-mode images.
pub const MODE: &str = "journal";

/// The prefix of this replicator's client ids in a primary's journal.
pub const CLIENT_PREFIX: &str = "csirr-";

/// How long the replay loop waits before it tries again when a role change
/// holds the image.
pub const IDLE_POLL: Duration = Duration::from_millis(50);

/// Default of `--journal-probe-interval`: how often an idle replica checks
/// (one stat) whether the object where the primary's next entry lands grew.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// Default of `--journal-idle-probe-interval`: the probe interval of a
/// replica that found nothing for [`QUIET_AFTER`]. Most of an idle replica's
/// CPU is its probes; a write after a quiet spell waits at most this long.
pub const DEFAULT_IDLE_PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// How long a replica finds no entry before it probes at the idle interval.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);

/// A quiet replica reads the journal in full at most this often when nothing
/// woke it (the safety net for a lost notification; rbd-mirror polls every
/// 5 s), unless `--journal-poll-interval` is longer.
const QUIET_POLL: Duration = Duration::from_secs(5);

/// A quiet replica re-reads the primary's record, sizes what is behind and
/// reports its status this often (well inside the primary's 60 s for a
/// silent peer).
const QUIET_CHECK: Duration = Duration::from_secs(10);

/// How often a replica probes, reads in full and checks, by whether its last
/// entries came at least [`QUIET_AFTER`] ago.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cadence {
    probe: Duration,
    poll: Duration,
    check: Duration,
}

impl Cadence {
    /// The cadence of a replica whose last entries came `quiet_for` ago,
    /// with the configured active and idle probe intervals and poll interval.
    fn new(active: Duration, idle: Duration, poll: Duration, quiet_for: Duration) -> Cadence {
        if quiet_for < QUIET_AFTER {
            Cadence {
                probe: active,
                poll,
                check: CHECK_EVERY,
            }
        } else {
            Cadence {
                probe: idle.max(active),
                poll: poll.max(QUIET_POLL),
                check: QUIET_CHECK,
            }
        }
    }
}

/// Default of `--journal-poll-interval`: how often an idle replica reads the
/// primary's journal in full when nothing woke it.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Unread journal bytes read to count the entries behind at most; beyond
/// them the count is estimated from the mean entry size.
const BEHIND_SCAN_LIMIT: u64 = 4 << 20;

/// Default of `--journal-max-sets-behind`: with librbd's defaults (16 MiB
/// objects, splay width 4) 32 sets are 2 GiB of journal.
pub const DEFAULT_MAX_SETS_BEHIND: u64 = 32;

/// How often the replay loop re-reads the primary's record (disabled, role
/// changed) and reports its status to the primary's registry at most.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// The client id of the replicator whose local cluster has `fsid`: stable
/// across restarts and unique per replica site.
pub fn client_id(fsid: &str) -> String {
    format!("{CLIENT_PREFIX}{fsid}")
}

/// rbd-mirror's client data for a peer in `state` replicating into replica
/// image `image_id` (`""` before it exists).
pub fn peer_client_data(image_id: &str, state: MirrorPeerState) -> ClientData {
    ClientData::MirrorPeer(MirrorPeerClientMeta {
        image_id: image_id.to_string(),
        state,
        sync_object_count: 0,
        sync_points: Vec::new(),
        snap_seqs: Vec::new(),
    })
}

/// Turns on exclusive-lock and journaling of `img` where they are off;
/// returns the features turned on. When Ceph refuses, what this call turned
/// on is turned off again and the answer is
/// [`EngineError::JournalUnavailable`]. Blocking.
pub fn enable_journaling(img: &Image, volume: &str) -> Result<u64> {
    let have = img.features().ctx(|| img.spec())?;
    let unavailable = |e: ceph::Error| EngineError::JournalUnavailable {
        volume: volume.to_string(),
        reason: format!("enabling features on {}: {e}", img.spec()),
    };
    let mut added = 0;
    for f in [features::EXCLUSIVE_LOCK, features::JOURNALING] {
        if have & f != 0 {
            continue;
        }
        if let Err(e) = img.update_features(f, true) {
            if added != 0
                && let Err(undo) = img.update_features(added, false)
            {
                tracing::warn!(image = %img.spec(), error = %undo, "cannot turn the features added back off");
            }
            return Err(unavailable(e));
        }
        added |= f;
    }
    Ok(added)
}

/// Journal mode's part of disabling replication of a primary: unregisters
/// every client of this replicator from its journal (a missing journal or
/// client is fine) and turns off the features Enable turned on (`added`),
/// journaling first. Journaling that was on before Enable stays on: another
/// user (rbd-mirror, an operator) wanted it. Blocking.
pub fn disable_journal_primary(img: &Image, added: u64) -> Result<()> {
    let key = img.spec();
    let id = img.id().ctx(|| key.clone())?;
    match Journal::open(img.ioctx(), &id) {
        Ok(journal) => {
            for c in journal.clients().map_err(|e| journal_err(e, &key))? {
                if !c.id.starts_with(CLIENT_PREFIX) {
                    continue;
                }
                match journal.unregister_client(&c.id) {
                    Ok(()) => {
                        tracing::info!(image = %key, client = %c.id, "journal client unregistered")
                    }
                    Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(journal_err(e, &key)),
                }
            }
        }
        Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(journal_err(e, &key)),
    }
    for f in [features::JOURNALING, features::EXCLUSIVE_LOCK] {
        if added & f == 0 {
            continue;
        }
        match img.update_features(f, false) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                // Already off, or another feature (object-map) needs it now.
                tracing::info!(image = %key, feature = f, error = %e, "feature left as it is");
            }
            Err(e) => return Err(e).ctx(|| format!("turning feature {f} of {key} off")),
        }
    }
    Ok(())
}

fn journal_err(e: JournalError, what: &str) -> EngineError {
    match e {
        JournalError::Ceph(source) => Err::<(), _>(source)
            .ctx(|| format!("the journal of {what}"))
            .unwrap_err(),
        e => EngineError::Internal(format!("the journal of {what}: {e}")),
    }
}

/// Wakes the replay loop when the primary's journal header is notified.
/// librbd notifies it (checked on 16.2.15, see docs/journal.md) at a new tag
/// (every lock acquisition), a new active object set, a client's commit
/// (librbd's own every 5 s while it writes, and at close), registration and
/// trim; never at an append.
struct HeaderWake {
    flag: Arc<(parking_lot::Mutex<bool>, parking_lot::Condvar)>,
    watch: Option<ceph::Watch>,
}

impl HeaderWake {
    fn new() -> Self {
        Self {
            flag: Arc::default(),
            watch: None,
        }
    }

    /// Watches the header of `journal` unless a healthy watch is there;
    /// whether one is. A failure is logged: the loop then reads the journal
    /// in full at every probe interval. Blocking.
    fn ensure(&mut self, journal: &Journal, key: &str) -> bool {
        if self.watch.as_ref().is_some_and(ceph::Watch::healthy) {
            return true;
        }
        // Dropped before a new one: unwatching waits for its callbacks.
        self.watch = None;
        let flag = Arc::clone(&self.flag);
        let on_event = Box::new(move || {
            let (m, cv) = &*flag;
            *m.lock() = true;
            cv.notify_all();
        });
        match ceph::Watch::new(journal.header_ioctx(), &journal.header_oid(), on_event) {
            Ok(w) => {
                tracing::debug!(image = %key, object = %w.object(), "watching the primary's journal header");
                self.watch = Some(w);
                // Whatever was notified while no watch was there.
                self.raise();
                true
            }
            Err(e) => {
                tracing::warn!(image = %key, error = %e, "cannot watch the primary's journal header; reading it in full at every probe");
                false
            }
        }
    }

    fn raise(&self) {
        let (m, cv) = &*self.flag;
        *m.lock() = true;
        cv.notify_all();
    }

    /// Whether a notification came since the last call.
    fn take(&self) -> bool {
        std::mem::take(&mut *self.flag.0.lock())
    }

    /// Waits up to `timeout`, less when a notification comes (it stays
    /// raised for [`HeaderWake::take`]).
    fn wait(&self, timeout: Duration) {
        let (m, cv) = &*self.flag;
        let mut g = m.lock();
        let _ = cv.wait_while_for(&mut g, |raised| !*raised, timeout);
    }
}

/// What a journal-mode replica reports about itself.
struct Progress {
    /// The start of the newest poll that found nothing more to replay:
    /// everything the primary wrote before it is on the replica.
    caught_up: Option<chrono::DateTime<Utc>>,
    since: Instant,
    base: ReplayStats,
    metered: ReplayStats,
    /// Object sets behind the primary's active set, as last checked.
    sets_behind: Option<u64>,
    /// Bytes of the primary's journal not replayed yet, as last checked.
    bytes_behind: Option<u64>,
    /// Entries of the primary's journal not replayed yet, as last checked.
    entries_behind: Option<u64>,
    /// Full reads since the last metrics update, by cause: a header
    /// notification, a probe that found an entry, the poll interval.
    by_watch: u64,
    by_probe: u64,
    by_poll: u64,
    last_report: Option<Instant>,
}

/// The status callback the bootstrap, the lag check and the loop share.
type Report<'a> = dyn Fn(ReplayState, String, Option<SyncPoint>, Option<u64>) + 'a;

/// Writes a journal-mode replica's status into the primary's registry,
/// with the figures the replay loop last measured.
struct Reporter<'a> {
    peer_reg: &'a Registry,
    job: &'a Job,
    fsid: String,
    /// Journal bytes and entries left to replay and the entry rate, as last
    /// measured.
    pending: Cell<Option<u64>>,
    pending_entries: Cell<Option<u64>>,
    entry_rate: Cell<Option<u64>>,
}

impl Reporter<'_> {
    fn report(&self, st: ReplayState, message: String, last: Option<SyncPoint>, rate: Option<u64>) {
        let s = ReplicaStatus {
            replica_fsid: self.fsid.clone(),
            state: st,
            message,
            percent: None,
            syncing_snap: None,
            last_sync: last,
            bytes_pending: self.pending.get(),
            bytes_per_sec: rate,
            entries_pending: self.pending_entries.get(),
            entries_per_sec: self.entry_rate.get(),
            updated_at: Utc::now(),
        };
        if let Err(e) = self.peer_reg.put_status(&self.job.primary.image_id, &s) {
            tracing::warn!(image = %self.job.key(), error = %e, "cannot report status to the primary");
        }
    }
}

/// Replicates the primary of `job` (a journal-mode record) into its
/// replica until `stop`, the pool's lease lost, a role change on the image,
/// or the primary's record no longer asking for it. Returns an error when
/// replication fails; the caller reports it and the next discovery pass
/// starts the image again. Blocking.
pub fn run_journal_image(engine: &Engine, job: &Job, stop: &AtomicBool) -> Result<()> {
    let key = job.key();
    let local = engine.local()?;
    let peer_io = job
        .peer
        .ioctx(&job.pool, &job.namespace)
        .ctx(|| format!("opening {key} on the peer"))?;
    let local_io = job.local_ioctx(&local)?;
    let local_reg = Registry::new(Arc::clone(&local_io));
    let peer_reg = Registry::new(Arc::clone(&peer_io));
    let reporter = Reporter {
        peer_reg: &peer_reg,
        job,
        fsid: local.fsid().to_string(),
        pending: Cell::new(None),
        pending_entries: Cell::new(None),
        entry_rate: Cell::new(None),
    };
    let report = |st: ReplayState, m: String, last: Option<SyncPoint>, rate: Option<u64>| {
        reporter.report(st, m, last, rate);
    };
    let client = client_id(local.fsid());
    let journal =
        Journal::open(&peer_io, &job.primary.image_id).map_err(|e| journal_err(e, &key))?;
    let rec = replica_record(&local_io, &local_reg, job)?;
    let rec = match settle_role(engine, job, &local_io, &local_reg, &journal, rec, &report)? {
        ControlFlow::Continue(rec) => rec,
        ControlFlow::Break(()) => return Ok(()),
    };
    let rec = ensure_bootstrapped(
        engine, job, &journal, &client, &local_reg, rec, stop, &report,
    )?;
    if let Some(behind) = too_far_behind(engine, &journal, &client, &key)? {
        return resync_laggy(
            engine, &journal, &client, &local_reg, rec, &key, behind, &report,
        );
    }
    let replayer = open_replayer(engine, job, &local_io, &local_reg, journal, &client, &rec)?;
    ReplayLoop::new(
        engine, job, &client, &local_reg, &reporter, &report, rec, replayer,
    )
    .run(stop, &peer_io)
}

/// What a replica whose record is not `secondary` does before it replays:
/// a finished relocation or a demotion on both sites stops; a demoted
/// replica adopts the new primary's journal when it links to its demotion
/// (otherwise it waits for a forced resync); primary on both sites is a
/// split-brain error. Blocking.
fn settle_role(
    engine: &Engine,
    job: &Job,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    journal: &Journal,
    rec: Option<ImageRecord>,
    report: &Report,
) -> Result<ControlFlow<(), Option<ImageRecord>>> {
    let key = job.key();
    let Some(r) = rec.clone().filter(|r| r.role != Role::Secondary) else {
        return Ok(ControlFlow::Continue(rec));
    };
    match (r.role, job.primary.role) {
        // A finished relocation: the peer is demoted, this side primary.
        (Role::Primary, Role::Demoted) => Ok(ControlFlow::Break(())),
        (Role::Primary, _) => Err(EngineError::FailedPrecondition(format!(
            "split-brain: {key} is primary on both sites; nothing is replayed or \
             overwritten. Decide which site keeps its data, demote the other one and \
             resync it (ResyncVolume with force)"
        ))),
        (Role::Demoted, Role::Primary) => {
            match engine.journal_adopt_linked(
                local_io,
                local_reg,
                &r,
                journal,
                job.peer.fsid(),
                &job.primary.image_id,
                &key,
            )? {
                Some(adopted) => Ok(ControlFlow::Continue(Some(adopted))),
                None => {
                    report(
                        ReplayState::Stopped,
                        format!(
                            "{key} is demoted on the replica's site and the new primary's \
                             journal does not link to its demotion (a forced promotion): it \
                             waits for ResyncVolume with force"
                        ),
                        None,
                        None,
                    );
                    Ok(ControlFlow::Break(()))
                }
            }
        }
        _ => {
            report(
                ReplayState::Stopped,
                format!("{key} is demoted on both sites; waiting for one to be promoted"),
                None,
                None,
            );
            Ok(ControlFlow::Break(()))
        }
    }
}

/// The replica's record once its journal client is registered and
/// connected and the replica bootstrapped: `rec` when it is, else after a
/// (new) bootstrap. Blocking.
#[allow(clippy::too_many_arguments)]
fn ensure_bootstrapped(
    engine: &Engine,
    job: &Job,
    journal: &Journal,
    client: &str,
    local_reg: &Registry,
    rec: Option<ImageRecord>,
    stop: &AtomicBool,
    report: &Report,
) -> Result<ImageRecord> {
    let key = job.key();
    let registered = journal.client(client).map_err(|e| journal_err(e, &key))?;
    let bootstrapped = rec.as_ref().is_some_and(|r| r.journal.is_some())
        && registered
            .as_ref()
            .is_some_and(|c| c.state == ClientState::Connected);
    if let (true, Some(rec)) = (bootstrapped, rec) {
        return Ok(rec);
    }
    if registered
        .as_ref()
        .is_some_and(|c| c.state == ClientState::Disconnected)
    {
        tracing::info!(image = %key, client, "journal client was disconnected: registering anew");
        journal
            .unregister_client(client)
            .map_err(|e| journal_err(e, &key))?;
    }
    bootstrap(engine, job, journal, client, local_reg, stop, report)
}

/// The replayer of `rec`'s replica: the replica's handle (held, and locked
/// against other writers), and the skip of what the bootstrap copied if it
/// is not done yet. Blocking.
fn open_replayer(
    engine: &Engine,
    job: &Job,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    journal: Journal,
    client: &str,
    rec: &ImageRecord,
) -> Result<JournalReplayer> {
    let key = job.key();
    let replica = match engine.held.get(&key) {
        Some(img) => img,
        None => {
            let img = Image::open(local_io, &job.primary.image_name)
                .ctx(|| format!("opening replica {key}"))?;
            super::replayer::lock_replica(&img)
                .ctx(|| format!("locking replica {key} against other writers"))?;
            engine.held.put(&key, img.clone());
            img
        }
    };
    let cfg = ReplayConfig {
        commit_every: 1024,
        // Back to the loop at least every 4096 entries while it works off a
        // backlog: the checks, the entries behind and the reports go on.
        max_per_call: 4096,
        ..ReplayConfig::default()
    };
    let mut replayer = JournalReplayer::start(journal, client, replica, cfg)?;
    if let Some(snap) = rec.journal.as_ref().and_then(|j| j.skip_until.clone()) {
        let (reg, id) = (local_reg.clone(), rec.image_id.clone());
        replayer.skip_io_until_snap(
            &snap,
            Box::new(move || {
                let mut r = reg
                    .get(&id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "the replica's record is gone".to_string())?;
                if let Some(j) = r.journal.as_mut() {
                    j.skip_until = None;
                }
                reg.put(&mut r).map_err(|e| e.to_string())
            }),
        );
    }
    Ok(replayer)
}

/// What a periodic check decided.
enum Check {
    /// Replay on.
    Go,
    /// The primary no longer asks for journal replication.
    Stop,
    /// This many object sets behind the primary's active set: resync.
    Laggy(u64),
}

/// What a turn's full read did.
enum Read {
    /// Applied this many entries.
    Applied(u64),
    /// A role change holds the image: try again shortly.
    Busy,
    /// A role change took the image: stop.
    Stop,
}

/// The replay loop of one journal-mode replica: probes, full reads under
/// the image's slot, periodic checks, metrics and status, and the waits
/// between them (see [`Cadence`]).
struct ReplayLoop<'a> {
    engine: &'a Engine,
    job: &'a Job,
    key: String,
    client: &'a str,
    local_reg: &'a Registry,
    reporter: &'a Reporter<'a>,
    report: &'a Report<'a>,
    rec: ImageRecord,
    replayer: JournalReplayer,
    slot: Arc<super::slots::Slot>,
    labels: csirr_metrics::ImageLabels,
    p: Progress,
    wake: HeaderWake,
    watching: bool,
    last_check: Instant,
    generation: u64,
    demoted_at: Option<u64>,
    /// The last full read of the journal.
    last_full: Option<Instant>,
    /// The last read found entries: read again at once.
    busy: bool,
    last_entries: Instant,
}

impl<'a> ReplayLoop<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        engine: &'a Engine,
        job: &'a Job,
        client: &'a str,
        local_reg: &'a Registry,
        reporter: &'a Reporter<'a>,
        report: &'a Report<'a>,
        rec: ImageRecord,
        replayer: JournalReplayer,
    ) -> Self {
        let key = job.key();
        let slot = engine.slots.get(&key);
        let mut wake = HeaderWake::new();
        // Watched before the first read, so that nothing notified after it
        // is missed.
        let watching = wake.ensure(replayer.journal(), &key);
        Self {
            p: Progress {
                caught_up: None,
                since: Instant::now(),
                base: replayer.stats(),
                metered: replayer.stats(),
                sets_behind: None,
                bytes_behind: None,
                entries_behind: None,
                by_watch: 0,
                by_probe: 0,
                by_poll: 0,
                last_report: None,
            },
            engine,
            job,
            client,
            local_reg,
            reporter,
            report,
            generation: slot.generation(),
            demoted_at: rec.journal.as_ref().and_then(|j| j.demoted_at),
            rec,
            replayer,
            slot,
            labels: job.labels(),
            key,
            wake,
            watching,
            // The first turn checks (and sizes what is behind) at once.
            last_check: Instant::now()
                .checked_sub(CHECK_EVERY)
                .unwrap_or_else(Instant::now),
            last_full: None,
            busy: true,
            last_entries: Instant::now(),
        }
    }

    /// Runs until stopped, cancelled, or the image is no longer this
    /// primary's replica. Blocking.
    fn run(mut self, stop: &AtomicBool, peer_io: &Arc<IoCtx>) -> Result<()> {
        let cfg = &self.engine.cfg;
        loop {
            if stop.load(Ordering::Relaxed)
                || !self.engine.leases.ok(&self.job.pool)
                || self.slot.cancelled()
            {
                return Ok(());
            }
            let cadence = Cadence::new(
                cfg.journal_probe_interval,
                cfg.journal_idle_probe_interval,
                cfg.journal_poll_interval,
                self.last_entries.elapsed(),
            );
            if self.last_check.elapsed() >= cadence.check {
                match self.check()? {
                    Check::Go => {}
                    Check::Stop => return Ok(()),
                    Check::Laggy(behind) => return self.resync(peer_io, behind),
                }
            }
            // Without a watch, every probe interval reads in full (no
            // notification says when a new tag or object set starts).
            let poll_every = if self.watching {
                cadence.poll
            } else {
                cadence.probe.min(cadence.poll)
            };
            let t0 = Utc::now();
            let full = self.wants_full_read(poll_every, t0)?;
            let mut n = 0;
            if full {
                match self.read(t0)? {
                    Read::Applied(k) => n = k,
                    Read::Busy => {
                        self.busy = true;
                        std::thread::sleep(IDLE_POLL);
                        continue;
                    }
                    Read::Stop => return Ok(()),
                }
            }
            self.publish(full, n, cadence.check);
            if !self.busy {
                self.wait(&cadence, poll_every);
            }
        }
    }

    /// The periodic check: the primary's record still asks for it, the
    /// header watch, what is behind (and whether too much). Blocking.
    fn check(&mut self) -> Result<Check> {
        self.last_check = Instant::now();
        if !still_wanted(self.reporter.peer_reg, self.job)? {
            tracing::info!(image = %self.key, "the primary no longer asks for journal replication; stopping");
            return Ok(Check::Stop);
        }
        self.watching = self.wake.ensure(self.replayer.journal(), &self.key);
        let p = &mut self.p;
        p.sets_behind = sets_behind(self.replayer.journal(), self.client, &self.key)?;
        (p.bytes_behind, p.entries_behind) = match self.replayer.behind(BEHIND_SCAN_LIMIT) {
            Ok(b) => (Some(b.bytes), Some(b.entries)),
            Err(e) => {
                tracing::debug!(image = %self.key, error = %e, "cannot size what is left to replay");
                (None, None)
            }
        };
        Ok(
            match p
                .sets_behind
                .filter(|&b| b > self.engine.cfg.journal_max_sets_behind)
            {
                Some(behind) => Check::Laggy(behind),
                None => Check::Go,
            },
        )
    }

    /// Resyncs a replica too far behind (the replayer let go first).
    fn resync(self, peer_io: &Arc<IoCtx>, behind: u64) -> Result<()> {
        let Self {
            engine,
            job,
            key,
            client,
            local_reg,
            report,
            rec,
            replayer,
            ..
        } = self;
        drop(replayer);
        let journal =
            Journal::open(peer_io, &job.primary.image_id).map_err(|e| journal_err(e, &key))?;
        let rec = local_reg.get(&rec.image_id)?.ok_or_else(|| {
            EngineError::Internal(format!("replica {key} lost its registry record"))
        })?;
        resync_laggy(
            engine, &journal, client, local_reg, rec, &key, behind, report,
        )
    }

    /// Whether this turn reads the journal in full: after work, on a header
    /// notification, at the poll interval, or when the probe found an entry
    /// (counted by cause). A probe that finds nothing marks the replica
    /// caught up at `t0`. Blocking.
    fn wants_full_read(&mut self, poll_every: Duration, t0: chrono::DateTime<Utc>) -> Result<bool> {
        let notified = self.wake.take();
        let timed = self.last_full.is_none_or(|t| t.elapsed() >= poll_every);
        let p = &mut self.p;
        if self.busy || notified || timed {
            if !self.busy {
                if notified {
                    p.by_watch += 1;
                } else {
                    p.by_poll += 1;
                }
            }
            return Ok(true);
        }
        if self.replayer.probe()? {
            p.by_probe += 1;
            return Ok(true);
        }
        if p.caught_up.is_some() {
            // Nothing where the next entry lands, and no new tag or object
            // set notified: caught up at the probe's start.
            p.caught_up = Some(t0);
        }
        Ok(false)
    }

    /// Applies what is readable, under the image's slot (a role change
    /// holds it otherwise); records a demotion the journal showed. Blocking.
    fn read(&mut self, t0: chrono::DateTime<Utc>) -> Result<Read> {
        let slot = Arc::clone(&self.slot);
        let Some(guard) = slot.try_enter() else {
            return Ok(Read::Busy);
        };
        if slot.generation() != self.generation {
            // A role change ran meanwhile: replay on only if the image is
            // still this primary's replica.
            self.generation = slot.generation();
            let now = self.local_reg.get(&self.rec.image_id)?;
            if !now.as_ref().is_some_and(|r| {
                r.role == Role::Secondary
                    && r.journal.is_some()
                    && r.primary
                        .as_ref()
                        .is_some_and(|p| p.image_id == self.job.primary.image_id)
            }) {
                tracing::info!(image = %self.key, role = ?now.map(|r| r.role), "a role change took the image; journal replay stops");
                return Ok(Read::Stop);
            }
        }
        self.last_full = Some(Instant::now());
        let n = self.replayer.replay_available()?;
        if self.replayer.demoted() != self.demoted_at {
            // Recorded under the slot: a planned promotion reads it.
            self.record_demotion()?;
        }
        drop(guard);
        self.busy = n > 0;
        if self.busy {
            self.last_entries = Instant::now();
        } else {
            if self.p.caught_up.is_none() {
                tracing::info!(image = %self.key, skipped_io = self.replayer.stats().skipped_io, "journal replay caught up");
            }
            self.p.caught_up = Some(t0);
            // The entries behind stay as the last check counted them: a
            // read that found nothing under load (the next entry's append
            // not done yet while later ones are) is no proof that nothing
            // is behind.
        }
        Ok(Read::Applied(n))
    }

    /// Stores the primary's demotion the replayer saw in the replica's
    /// record. Blocking.
    fn record_demotion(&mut self) -> Result<()> {
        let key = &self.key;
        let mut r = self.local_reg.get(&self.rec.image_id)?.ok_or_else(|| {
            EngineError::Internal(format!("replica {key} lost its registry record"))
        })?;
        if let Some(j) = r.journal.as_mut() {
            j.demoted_at = self.replayer.demoted();
        }
        self.local_reg.put(&mut r)?;
        self.demoted_at = self.replayer.demoted();
        if let Some(t) = self.demoted_at {
            tracing::info!(image = %key, tag = t, "the primary was demoted; the replica holds everything it wrote");
        }
        Ok(())
    }

    /// Metrics after every full read (and every `check_every`), the status
    /// every `check_every`.
    fn publish(&mut self, full: bool, n: u64, check_every: Duration) {
        let stats = self.replayer.stats();
        let committed = self.replayer.committed().newest().cloned();
        let due = self
            .p
            .last_report
            .is_none_or(|t| t.elapsed() >= check_every);
        if full || due {
            let p = &mut self.p;
            self.engine.metrics.journal_progress(
                &self.labels,
                &csirr_metrics::JournalProgress {
                    entries: stats.entries - p.metered.entries,
                    io_bytes: stats.io_bytes - p.metered.io_bytes,
                    caught_up: p.caught_up,
                    sets_behind: p.sets_behind,
                    bytes_behind: p.bytes_behind,
                    entries_behind: p.entries_behind,
                    committed: committed.as_ref().map(|c| (c.tag_tid, c.entry_tid)),
                    watch_wakeups: std::mem::take(&mut p.by_watch),
                    probe_hits: std::mem::take(&mut p.by_probe),
                    timed_polls: std::mem::take(&mut p.by_poll),
                },
            );
            p.metered = stats;
        }
        if !due {
            return;
        }
        let p = &mut self.p;
        let secs = p.since.elapsed().as_secs_f64().max(0.001);
        let rate = ((stats.io_bytes - p.base.io_bytes) as f64 / secs) as u64;
        let entries_rate = ((stats.entries - p.base.entries) as f64 / secs) as u64;
        let (state, msg) = status_message(
            p,
            n,
            self.replayer.skipping(),
            self.demoted_at,
            stats.entries,
            entries_rate,
        );
        let msg = match &committed {
            Some(c) => format!(
                "{msg}; committed at tag {} entry {} (object {})",
                c.tag_tid, c.entry_tid, c.object_number
            ),
            None => msg,
        };
        let last = p.caught_up.map(|t| SyncPoint {
            snap_name: format!("journal:{}", self.client),
            snap_time: t,
            completed_at: Utc::now(),
            duration_ms: 0,
            bytes: stats.io_bytes,
        });
        self.reporter.pending.set(p.bytes_behind);
        self.reporter.pending_entries.set(p.entries_behind);
        self.reporter.entry_rate.set(Some(entries_rate));
        (self.report)(state, msg, last, Some(rate));
        p.last_report = Some(Instant::now());
        p.since = Instant::now();
        p.base = stats;
    }

    /// Until the next probe, the next full read, the next check, or a
    /// notification.
    fn wait(&self, cadence: &Cadence, poll_every: Duration) {
        let until_full = self
            .last_full
            .map(|t| poll_every.saturating_sub(t.elapsed()))
            .unwrap_or_default();
        let wait = cadence
            .probe
            .min(until_full)
            .min(cadence.check.saturating_sub(self.last_check.elapsed()));
        if !wait.is_zero() {
            self.wake.wait(wait);
        }
    }
}

/// The replica's state and message for the primary's status: after `n`
/// entries in the last read, skipping the bootstrap's part or not, with the
/// primary's demotion if seen.
fn status_message(
    p: &Progress,
    n: u64,
    skipping: bool,
    demoted_at: Option<u64>,
    entries: u64,
    entries_rate: u64,
) -> (ReplayState, String) {
    let behind = p
        .entries_behind
        .map(|e| format!(", {e} entries behind"))
        .unwrap_or_default()
        + &p.sets_behind
            .map(|b| format!(", {b} object sets behind the primary's active set"))
            .unwrap_or_default()
        + &p.bytes_behind
            .map(|b| format!(", {b} journal bytes to replay"))
            .unwrap_or_default();
    match (n, skipping, demoted_at) {
        (0, false, Some(tag)) => (
            ReplayState::Idle,
            format!("journal: the primary was demoted; replayed up to its demotion (tag {tag})"),
        ),
        (_, true, _) => (
            ReplayState::Syncing,
            "journal: skipping what the bootstrap copied".to_string(),
        ),
        (0, false, None) => (
            ReplayState::Idle,
            format!("journal: caught up, {entries} entries replayed since start"),
        ),
        (_, false, _) => (
            ReplayState::Syncing,
            format!(
                "journal: replaying ({n} entries in the last poll, {entries_rate} \
                 entries/s){behind}"
            ),
        ),
    }
}

/// Reports a failed journal replay of `job` to the primary's registry
/// (GetVolumeReplicationInfo and `status` show it until the next discovery
/// pass starts the image again). Blocking.
pub fn report_failure(engine: &Engine, job: &Job, err: &EngineError) {
    let Ok(local) = engine.local() else { return };
    let Ok(peer_io) = job.peer.ioctx(&job.pool, &job.namespace) else {
        return;
    };
    let st = ReplicaStatus {
        replica_fsid: local.fsid().to_string(),
        state: ReplayState::Error,
        message: format!("journal replay failed (restarted at the next discovery pass): {err}"),
        percent: None,
        syncing_snap: None,
        last_sync: None,
        bytes_pending: None,
        bytes_per_sec: None,
        entries_pending: None,
        entries_per_sec: None,
        updated_at: Utc::now(),
    };
    if let Err(e) = Registry::new(peer_io).put_status(&job.primary.image_id, &st) {
        tracing::warn!(image = %job.key(), error = %e, "cannot report status to the primary");
    }
}

/// How many object sets client `client` is behind the journal's active
/// set, when that is more than the configured bound.
fn too_far_behind(
    engine: &Engine,
    journal: &Journal,
    client: &str,
    key: &str,
) -> Result<Option<u64>> {
    Ok(sets_behind(journal, client, key)?.filter(|&b| b > engine.cfg.journal_max_sets_behind))
}

/// How many object sets client `client` is behind the journal's active set
/// (two header reads); `None` when it is not registered.
fn sets_behind(journal: &Journal, client: &str, key: &str) -> Result<Option<u64>> {
    let Some(c) = journal.client(client).map_err(|e| journal_err(e, key))? else {
        return Ok(None);
    };
    let sets = journal.object_sets().map_err(|e| journal_err(e, key))?;
    Ok(Some(client_sets_behind(journal, &c, sets)))
}

/// How many object sets client `c` is behind the active set, with the
/// journal's `(minimum_set, active_set)`: from the oldest set its commit
/// position names (the minimum set when it committed nothing).
fn client_sets_behind(journal: &Journal, c: &Client, (minimum_set, active_set): (u64, u64)) -> u64 {
    let width = u64::from(journal.layout().splay_width.max(1));
    let oldest = c
        .commit_position
        .positions
        .iter()
        .map(|p| p.object_number / width)
        .min()
        .unwrap_or(minimum_set);
    active_set.saturating_sub(oldest)
}

/// How often a primary's sidecar checks how far behind its journal's
/// replica clients are.
const BOUND_CHECK_EVERY: Duration = Duration::from_secs(10);

impl Engine {
    /// The primary's side of the bound on its journals: a replica client of
    /// this project (`csirr-*`) more than `--journal-max-sets-behind` object
    /// sets behind the active set is disconnected, as librbd disconnects a
    /// laggy client, and the journal is trimmed past it. A replica site (or
    /// its sidecar) that stays down then no longer grows the primary's
    /// journal without bound; when it returns it finds its client
    /// disconnected and bootstraps again from a new snapshot (a delta from
    /// the newest common sync snapshot). A replica that is up resyncs
    /// itself at the same bound. Each image at most every
    /// [`BOUND_CHECK_EVERY`] (`cache`). Blocking; failures are logged.
    pub(crate) fn bound_primary_journals(
        &self,
        io: &Arc<IoCtx>,
        records: &[ImageRecord],
        cache: &super::scheduler::DueCache,
    ) {
        let now = Utc::now();
        for rec in records {
            if rec.role != Role::Primary
                || rec.mode != MODE
                || cache.get(&rec.image_id).is_some_and(|d| d > now)
            {
                continue;
            }
            cache.set(
                &rec.image_id,
                now + chrono::TimeDelta::from_std(BOUND_CHECK_EVERY).unwrap_or_default(),
            );
            let key = super::slots::image_key(io.pool(), io.namespace(), &rec.image_name);
            if let Err(e) = self.bound_journal(io, &rec.image_id, &key) {
                tracing::warn!(image = %key, error = %e, "cannot check the journal's replica clients");
            }
        }
    }

    /// [`Engine::bound_primary_journals`] for one image.
    fn bound_journal(&self, io: &Arc<IoCtx>, image_id: &str, key: &str) -> Result<()> {
        let journal = match Journal::open(io, image_id) {
            Ok(j) => j,
            Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(journal_err(e, key)),
        };
        let sets = journal.object_sets().map_err(|e| journal_err(e, key))?;
        let bound = self.cfg.journal_max_sets_behind;
        let mut disconnected = false;
        for c in journal.clients().map_err(|e| journal_err(e, key))? {
            if !c.id.starts_with(CLIENT_PREFIX) || c.state == ClientState::Disconnected {
                continue;
            }
            let behind = client_sets_behind(&journal, &c, sets);
            if behind > bound {
                tracing::warn!(image = %key, client = %c.id, behind, bound, "a replica's journal client is too far behind: disconnected, the journal is trimmed past it, and the replica resyncs from a new snapshot when it returns");
                journal
                    .disconnect_client(&c.id)
                    .map_err(|e| journal_err(e, key))?;
                disconnected = true;
            }
        }
        if disconnected {
            let to = journal.trim().map_err(|e| journal_err(e, key))?;
            tracing::info!(image = %key, minimum_set = to, "journal trimmed past the disconnected clients");
        }
        Ok(())
    }
}

/// A replica too far behind: reported, its client unregistered (so that
/// it pins the primary's journal no longer) and its bootstrap state
/// cleared, so that the next start bootstraps it again from a new
/// snapshot (a delta from the newest common sync snapshot).
#[allow(clippy::too_many_arguments)]
fn resync_laggy(
    engine: &Engine,
    journal: &Journal,
    client: &str,
    local_reg: &Registry,
    mut rec: ImageRecord,
    key: &str,
    behind: u64,
    report: &dyn Fn(ReplayState, String, Option<SyncPoint>, Option<u64>),
) -> Result<()> {
    let bound = engine.cfg.journal_max_sets_behind;
    tracing::warn!(image = %key, behind, bound, "journal replica too far behind; resyncing it from a new snapshot");
    report(
        ReplayState::Error,
        format!(
            "journal: the replica is {behind} object sets behind the primary (bound {bound}); \
             resyncing it from a new snapshot"
        ),
        None,
        None,
    );
    engine.held.release(key);
    rec.journal = None;
    local_reg.put(&mut rec)?;
    match journal.unregister_client(client) {
        Ok(()) => {}
        Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(journal_err(e, key)),
    }
    engine.metrics.journal_resynced(key);
    Ok(())
}

/// Whether the primary's record still asks for journal replication.
fn still_wanted(peer_reg: &Registry, job: &Job) -> Result<bool> {
    if peer_reg
        .tombstones()?
        .iter()
        .any(|t| t.image_id == job.primary.image_id)
    {
        return Ok(false);
    }
    // A demoted primary still has its demotion to deliver.
    Ok(peer_reg
        .get(&job.primary.image_id)?
        .is_some_and(|r| matches!(r.role, Role::Primary | Role::Demoted) && r.mode == MODE))
}

/// The replica's record, if the replica exists.
fn replica_record(local_io: &Arc<IoCtx>, reg: &Registry, job: &Job) -> Result<Option<ImageRecord>> {
    let key = job.key();
    let img = match Image::open_read_only(local_io, &job.primary.image_name, None) {
        Ok(i) => i,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("opening replica {key}")),
    };
    let id = img.id().ctx(|| format!("replica {key}"))?;
    reg.get(&id)
}

/// Takes the bootstrap's sync snapshot on the primary (after the client's
/// registration: every write after it is in the journal); returns its name.
fn bootstrap_snapshot(engine: &Engine, job: &Job) -> Result<String> {
    let key = job.key();
    let peer_io = job
        .peer
        .ioctx(&job.pool, &job.namespace)
        .ctx(|| format!("opening {key} on the peer"))?;
    let primary = Image::open_by_id(&peer_io, &job.primary.image_id)
        .ctx(|| format!("opening primary {key}"))?;
    let snaps = primary
        .snap_list()
        .ctx(|| format!("listing snapshots of primary {key}"))?;
    let seq = match sync_snaps(&snaps).keys().next_back() {
        Some(&s) => super::registry::next_sync_seq(s)?,
        None => 1,
    };
    engine.take_sync_snapshot(&primary, seq)
}

/// Copies the replica up to the primary's sync snapshot `snap` with the
/// snapshot-mode sync (a delta from the newest common point, resumable);
/// returns the replica's record once it holds `snap`. Gives up within an
/// hour, or when stopped.
fn copy_to(
    engine: &Engine,
    job: &Job,
    local_reg: &Registry,
    stop: &AtomicBool,
    snap: &str,
) -> Result<ImageRecord> {
    let key = job.key();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if stop.load(Ordering::Relaxed) || !engine.leases.ok(&job.pool) {
            return Err(EngineError::Unavailable(format!(
                "the bootstrap of {key} was stopped (shutdown or the pool's lease lost)"
            )));
        }
        super::replayer::sync_image(engine, job, stop, &mut None)?;
        let local_io = local_reg.ioctx();
        if let Some(r) = replica_record(local_io, local_reg, job)?
            && r.last_sync.as_ref().is_some_and(|l| l.snap_name == snap)
            && r.pending_snap.is_none()
        {
            return Ok(r);
        }
        if Instant::now() > deadline {
            return Err(EngineError::Timeout(format!(
                "the bootstrap copy of {key} to {snap} did not complete"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers in the primary's journal, takes a sync snapshot on the
/// primary after that, copies the replica to it and records it as the
/// point the replay skips IO up to. Returns the replica's record.
fn bootstrap(
    engine: &Engine,
    job: &Job,
    journal: &Journal,
    client: &str,
    local_reg: &Registry,
    stop: &AtomicBool,
    report: &dyn Fn(ReplayState, String, Option<SyncPoint>, Option<u64>),
) -> Result<ImageRecord> {
    let key = job.key();
    let begun = Instant::now();
    let registered = journal
        .register_or_reuse(client, &peer_client_data("", MirrorPeerState::Syncing))
        .map_err(|e| journal_err(e, &key))?;
    tracing::info!(image = %key, client, from = ?registered.commit_position.newest(), "registered in the primary's journal");
    report(
        ReplayState::Starting,
        "journal: bootstrapping the replica from a snapshot".into(),
        None,
        None,
    );
    let snap = bootstrap_snapshot(engine, job)?;
    let mut rec = copy_to(engine, job, local_reg, stop, &snap)?;
    rec.journal = Some(JournalReplica {
        client_id: client.to_string(),
        skip_until: Some(snap.clone()),
        demoted_at: None,
    });
    // The features the volume's Enable added travel with the volume: a
    // promotion of this replica keeps them, so that Disable on the new
    // primary turns exactly those off.
    rec.features_added = Some(job.primary.features_added.unwrap_or(0));
    local_reg.put(&mut rec)?;
    journal
        .update_client_data(
            client,
            &peer_client_data(&rec.image_id, MirrorPeerState::Replaying),
        )
        .map_err(|e| journal_err(e, &key))?;
    tracing::info!(
        image = %key,
        snapshot = %snap,
        seconds = begun.elapsed().as_secs_f64(),
        "journal bootstrap complete; replaying"
    );
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_stable_and_prefixed() {
        assert_eq!(client_id("abc"), "csirr-abc");
        assert!(client_id("abc").starts_with(CLIENT_PREFIX));
    }

    #[test]
    fn client_data_decodes_as_a_mirror_peer() {
        let d = peer_client_data("img", MirrorPeerState::Replaying);
        let back = ClientData::decode_all(&d.encode()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn replicas_slow_down_only_after_a_quiet_spell() {
        let (fast, slow, poll) = (
            Duration::from_millis(50),
            Duration::from_millis(250),
            Duration::from_secs(1),
        );
        let busy = Cadence::new(fast, slow, poll, Duration::ZERO);
        assert_eq!(
            (busy.probe, busy.poll, busy.check),
            (fast, poll, CHECK_EVERY)
        );
        assert_eq!(Cadence::new(fast, slow, poll, QUIET_AFTER / 2), busy);
        let quiet = Cadence::new(fast, slow, poll, QUIET_AFTER);
        assert_eq!(
            (quiet.probe, quiet.poll, quiet.check),
            (slow, QUIET_POLL, QUIET_CHECK)
        );
        // Configured intervals longer than the quiet ones are kept, and an
        // idle probe interval below the active one never speeds probes up.
        let long = Duration::from_secs(600);
        let q = Cadence::new(slow, fast, long, QUIET_AFTER * 10);
        assert_eq!((q.probe, q.poll), (slow, long));
        // The primary counts a replica silent after 60 s.
        assert!(QUIET_CHECK * 3 < Duration::from_secs(60));
    }
}
