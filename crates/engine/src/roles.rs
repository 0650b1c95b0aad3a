//! Role changes, as the csi-addons controller drives them: DemoteVolume,
//! PromoteVolume (planned and forced), ResyncVolume and
//! DisableVolumeReplication.
//!
//! The rules that keep acknowledged data safe:
//! - A planned promotion succeeds only once the replica holds the peer's
//!   demotion snapshot; while it is still being copied the answer is
//!   UNAVAILABLE (retry), never FAILED_PRECONDITION, which would make the
//!   controller force the promotion and lose the tail.
//! - A forced promotion stops the local replayer, takes the image, and
//!   rolls a half-applied delta back to the last complete sync point,
//!   rewriting only the extents written since; it never contacts the peer.
//! - Resync discards local changes made after the newest sync point both
//!   sides share only when asked to (`force`), and then copies only what
//!   differs since that point.
//! - Disable moves a replica to the RBD trash (recoverable), never deletes it.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use csirr_ceph::{self as ceph, Cluster, ErrorKind, Image, IoCtx};
use csirr_csi::params::ReplicationParams;

use super::error::{CephContext, EngineError, Result};
use super::registry::{
    ImageRecord, PrimaryRef, Registry, Role, RoleChange, Schedule, Tombstone, sync_snapshots,
};
use super::replayer::settle_pending_snap;
use super::resolve::Resolved;
use super::rollback::rollback_to;
use super::slots::{SlotGuard, image_key};
use super::store::{CephVolume, VolumeStore};
use super::{Engine, VolumeRequest};

/// How a demoted image relates to the peer's new primary.
#[derive(Debug, Clone)]
pub(crate) struct Divergence {
    /// The newest sync snapshot both sides have.
    pub common: Option<String>,
    /// Local sync snapshots after `common` that the primary lacks.
    pub newer_here: Vec<String>,
    /// Whether the local head was written after `common`.
    pub head_changed: bool,
}

impl Divergence {
    /// How sync snapshots `ours` relate to the primary's `theirs`;
    /// `head_changed_since` tells whether the local head was written after
    /// a snapshot.
    pub(crate) fn of(
        ours: &[(u64, String)],
        theirs: &[String],
        head_changed_since: impl FnOnce(&str) -> Result<bool>,
    ) -> Result<Self> {
        // Newest sync snapshot both sides have (names are unique).
        let common_at = ours.iter().rposition(|(_, n)| theirs.contains(n));
        let common = common_at.map(|i| ours[i].1.clone());
        let newer_here: Vec<String> = ours
            .iter()
            .skip(common_at.map_or(0, |i| i + 1))
            .filter(|(_, n)| !theirs.contains(n))
            .map(|(_, n)| n.clone())
            .collect();
        let head_changed = match &common {
            Some(c) => head_changed_since(c)?,
            None => true,
        };
        Ok(Self {
            common,
            newer_here,
            head_changed,
        })
    }

    /// Whether the two sides went apart (a split brain, or a promotion that
    /// did not wait for this side's demotion snapshot): only a resync with
    /// force may discard the local changes.
    pub fn diverged(&self) -> bool {
        self.common.is_none() || self.head_changed || !self.newer_here.is_empty()
    }

    /// Why a resync without force refuses.
    fn explain(&self, key: &str) -> String {
        match &self.common {
            Some(c) => format!(
                "split-brain: {key} changed on this site after {c}, the newest sync point \
                 both sites share; ResyncVolume with force discards the local changes \
                 since {c} and copies only what differs"
            ),
            None => format!(
                "{key} shares no sync point with the new primary; ResyncVolume with force \
                 replaces its content with a full copy"
            ),
        }
    }
}

/// The newest sync point a non-primary record holds completely: a replica's
/// last complete sync, a demoted image's demotion snapshot.
fn newest_complete(rec: &ImageRecord) -> Option<String> {
    match rec.role {
        Role::Secondary => rec.last_sync.as_ref().map(|l| l.snap_name.clone()),
        Role::Demoted => rec.demotion_snap.clone(),
        Role::Primary => None,
    }
}

/// Sync snapshot names of an image, oldest first.
fn sync_names(img: &Image) -> Result<Vec<(u64, String)>> {
    let snaps = img
        .snap_list()
        .ctx(|| format!("listing snapshots of {}", img.spec()))?;
    Ok(sync_snapshots(&snaps)
        .into_iter()
        .map(|(q, s)| (q, s.name))
        .collect())
}

fn change(what: impl Into<String>) -> Option<RoleChange> {
    Some(RoleChange {
        at: Utc::now(),
        what: what.into(),
    })
}

impl Engine {
    pub(crate) fn key_of(vol: &Resolved) -> String {
        let io = vol.ioctx();
        image_key(io.pool(), io.namespace(), vol.image.name())
    }

    /// Takes the image's slot, stopping the replayer's work on it.
    pub(crate) fn take_slot(&self, key: &str) -> Result<SlotGuard> {
        // A running delta stops between submissions, but I/O in flight to
        // an unreachable peer only fails after the operation timeout.
        let wait = self.cfg.op_timeout + Duration::from_secs(10);
        self.slots.get(key).enter_cancelling(wait).ok_or_else(|| {
            EngineError::Unavailable(format!(
                "the replayer did not stop working on {key} within {wait:?}; retry"
            ))
        })
    }

    fn record_of(&self, vol: &Resolved, req: &VolumeRequest) -> Result<(Registry, ImageRecord)> {
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let rec = reg.get(&vol.image_id)?.ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "replication is not enabled for volume {}",
                req.volume
            ))
        })?;
        tracing::debug!(volume = %req.volume, "registry record read");
        // Tests: `roles::after_record_read=sleep(ms)` lets another writer
        // change the record under this role change.
        fail::fail_point!("roles::after_record_read");
        Ok((reg, rec))
    }

    /// The peer cluster of `io`'s pool (its first mirror peer) and the same
    /// pool and namespace there. Blocking.
    pub(crate) fn peer_of(&self, io: &IoCtx) -> Result<(Arc<Cluster>, Arc<IoCtx>)> {
        let peers = self.peers_of_pool(io.pool())?;
        let Some((peer, cluster)) = peers.into_iter().next() else {
            return Err(EngineError::FailedPrecondition(format!(
                "pool {} has no mirror peer",
                io.pool()
            )));
        };
        let pio = cluster
            .ioctx(io.pool(), io.namespace())
            .ctx(|| format!("opening {} on peer {}", io.spec(), peer.site_name))?;
        Ok((cluster, pio))
    }

    /// The peer's record of the image, found by the same pool, namespace and
    /// name. Blocking; bounded by the operation timeout.
    pub(crate) fn peer_record(
        &self,
        vol: &Resolved,
        primary_id: Option<&str>,
    ) -> Result<Option<ImageRecord>> {
        let (_, pio) = self.peer_of(vol.ioctx())?;
        let reg = Registry::new(Arc::clone(&pio));
        let rec = match primary_id {
            Some(id) => reg.get(id)?,
            None => reg
                .list()?
                .into_iter()
                .find(|r| r.image_name == vol.image.name()),
        };
        Ok(rec)
    }

    /// DemoteVolume: the image stops being primary. A final sync snapshot
    /// lets the peer catch up completely; the image is then locked against
    /// writers. Fails while writers have it open, naming them, unless
    /// `force`. Idempotent.
    pub async fn demote(self: &Arc<Self>, req: VolumeRequest, force: bool) -> Result<()> {
        let key = req.volume.to_string();
        self.run_locked(key, move |e| e.demote_blocking(&req, force))
            .await
    }

    fn demote_blocking(&self, req: &VolumeRequest, force: bool) -> Result<()> {
        self.on_volume(req, "demote", force, |s, rec| demote_volume(s, rec, force))
    }

    /// Runs the role change `op` on the volume of `req` through the storage
    /// seam: resolves it, reads its record, and logs within a span that
    /// names the operation, the volume and the image. Blocking.
    fn on_volume<T>(
        &self,
        req: &VolumeRequest,
        op: &'static str,
        force: bool,
        f: impl FnOnce(&CephVolume<'_>, ImageRecord) -> Result<T>,
    ) -> Result<T> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let (reg, rec) = self.record_of(&vol, req)?;
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("role", op, volume = %req.volume, image = %key, force);
        let _s = span.enter();
        let store = CephVolume {
            engine: self,
            req,
            vol: &vol,
            reg: &reg,
            key,
        };
        f(&store, rec)
    }

    /// Breaks the exclusive lock of `img` if a client other than this one
    /// holds it. Best effort: a lock that cannot be broken makes the writes
    /// that follow fail with a clear error instead.
    pub(crate) fn break_foreign_locks(&self, img: &Image, key: &str) {
        for owner in img.lock_owners().unwrap_or_default() {
            match img.lock_break(&owner) {
                Ok(()) => {
                    tracing::warn!(image = key, owner = %owner, "broke a stale exclusive lock")
                }
                Err(e) => {
                    tracing::debug!(image = key, owner = %owner, error = %e, "lock not broken")
                }
            }
        }
    }

    /// Takes the image's exclusive lock and keeps it (refusing other writers)
    /// unless this process already holds it.
    pub(crate) fn hold_lock(&self, key: &str, img: &Image) -> Result<()> {
        if self.held.get(key).is_some() {
            return Ok(());
        }
        match img.lock_acquire(ceph::LockMode::Exclusive) {
            Ok(()) => {}
            // Another client holds it: a live writer, or a dead one whose
            // watch the OSD has not expired yet (about 30 s).
            Err(e) if matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::Busy) => {
                let owners = img.lock_owners().unwrap_or_default();
                return Err(EngineError::Unavailable(format!(
                    "the exclusive lock of {key} is held by {}; retry once it is released \
                     (the lock of a client that died goes when its watch expires)",
                    if owners.is_empty() {
                        "another client".to_string()
                    } else {
                        owners.join(", ")
                    }
                )));
            }
            Err(e) => return Err(e).ctx(|| format!("locking {key} against writers")),
        }
        self.held.put(key, img.clone());
        Ok(())
    }

    /// PromoteVolume. Without `force`: succeeds when the image is primary,
    /// or a replica that holds the peer's demotion snapshot (zero data loss);
    /// UNAVAILABLE while that snapshot is still being copied;
    /// FAILED_PRECONDITION while the peer is primary or unreachable. With
    /// `force`: fails over without the peer, within the promote timeout.
    ///
    /// The schedule belongs to the primary: `params` (the
    /// VolumeReplicationClass' parameters) replace the image's schedule when
    /// they carry `schedulingInterval`, as ceph-csi applies it at promotion.
    pub async fn promote(
        self: &Arc<Self>,
        req: VolumeRequest,
        force: bool,
        params: ReplicationParams,
    ) -> Result<()> {
        let key = req.volume.to_string();
        let work = self.run_locked(key, move |e| e.promote_blocking(&req, force, &params));
        self.within_promote_timeout(work).await
    }

    /// Waits for `work` (a promotion) up to `--promote-timeout`; past it
    /// the answer is UNAVAILABLE while the work goes on in the background.
    pub(crate) async fn within_promote_timeout(
        &self,
        work: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let timeout = self.cfg.promote_timeout;
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Unavailable(format!(
                "promotion did not finish within {timeout:?}; it goes on in the background, \
                 retry to see its outcome"
            ))),
        }
    }

    fn promote_blocking(
        &self,
        req: &VolumeRequest,
        force: bool,
        params: &ReplicationParams,
    ) -> Result<()> {
        let schedule = params
            .scheduling_interval
            .is_some()
            .then(|| Schedule::of(params));
        self.on_volume(req, "promote", force, |s, rec| {
            promote_volume(s, rec, force, schedule)
        })
    }

    /// ResyncVolume on the demoted side: converts it into a replica of the
    /// peer's new primary from the newest sync snapshot both share (local
    /// changes after it are discarded only with `force`), or completely when
    /// they share none. Returns whether the replica is a complete copy of a
    /// sync point of the primary. Repeated calls are cheap.
    pub async fn resync(self: &Arc<Self>, req: VolumeRequest, force: bool) -> Result<bool> {
        let key = req.volume.to_string();
        self.run_locked(key, move |e| e.resync_blocking(&req, force))
            .await
    }

    fn resync_blocking(&self, req: &VolumeRequest, force: bool) -> Result<bool> {
        self.on_volume(req, "resync", force, |s, rec| resync_volume(s, rec, force))
    }

    /// How the local image `img` (not primary) relates to the peer's primary
    /// `primary`: the newest sync snapshot both have, the local sync
    /// snapshots after it that the primary lacks, and whether the head was
    /// written since it. Blocking.
    pub(crate) fn divergence(&self, img: &Image, primary: &Image, key: &str) -> Result<Divergence> {
        let theirs: Vec<String> = sync_names(primary)?.into_iter().map(|(_, n)| n).collect();
        Divergence::of(&sync_names(img)?, &theirs, |c| {
            let size = img.size().ctx(|| key.to_string())?;
            Ok(
                !crate::copy::changed_extents(img, Some(c), size, self.cfg.limits.chunk, false)?
                    .is_empty(),
            )
        })
    }

    /// Turns the local image `img` of `key` into a replica of `primary`:
    /// rolls back writes after the common sync point and removes the sync
    /// snapshots the primary lacks (both only when `div` diverged), records
    /// the new role and keeps the image locked against writers. The caller
    /// holds the image's slot. Returns the bytes rolled back. Blocking.
    pub(crate) fn adopt_as_replica(
        &self,
        reg: &Registry,
        rec: &mut ImageRecord,
        img: &Image,
        key: &str,
        primary: PrimaryRef,
        div: &Divergence,
    ) -> Result<u64> {
        let mut rolled = 0;
        if div.diverged() {
            // Another handle of this process may hold the lock: the rollback
            // writes through `img`.
            self.held.release(key);
            if let (Some(c), true) = (&div.common, div.head_changed) {
                rolled = rollback_to(img.ioctx(), img, c, self.cfg.limits, &|| false)?;
            }
            for n in &div.newer_here {
                img.snap_remove(n)
                    .ctx(|| format!("removing diverged snapshot {key}@{n}"))?;
            }
        }
        rec.role = Role::Secondary;
        rec.primary = Some(primary);
        rec.demotion_snap = None;
        rec.last_sync = None;
        rec.checkpoint = None;
        rec.role_change = change(match (&div.common, div.diverged()) {
            (Some(c), false) => format!("replica again from {c} (orderly switch)"),
            (Some(c), true) => format!("resync from {c} (rolled back {rolled} bytes)"),
            (None, _) => "full resync".to_string(),
        });
        // Locked before it is recorded a replica: a lock that cannot be
        // taken leaves it demoted, and a retry does it all again.
        self.hold_lock(key, img)?;
        reg.put(rec)?;
        reg.announce();
        tracing::info!(
            image = key,
            common = ?div.common,
            rolled_back_bytes = rolled,
            removed = div.newer_here.len(),
            "now a replica of the peer's primary"
        );
        Ok(rolled)
    }

    /// DisableVolumeReplication. On the primary (or a demoted image): stops
    /// replication, removes its sync snapshots and registry record, and
    /// leaves a tombstone that makes the peer's replayer move the replica to
    /// the RBD trash. On a replica: stops replaying it, brings it back to its
    /// last complete sync point, and leaves it as a normal image. Idempotent.
    pub async fn disable(self: &Arc<Self>, req: VolumeRequest, force: bool) -> Result<()> {
        let key = req.volume.to_string();
        self.run_locked(key, move |e| e.disable_blocking(&req, force))
            .await
    }

    fn disable_blocking(&self, req: &VolumeRequest, force: bool) -> Result<()> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let Some(rec) = reg.get(&vol.image_id)? else {
            return Ok(());
        };
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("disable", volume = %req.volume, image = %key, force);
        let _s = span.enter();
        if !force && rec.role != Role::Primary {
            // The primary's Disable ends replication (its replica then goes
            // to the trash); deleting the VolumeReplication on the replica's
            // site must not end DR silently. A demoted image whose peer took
            // over is a replica in all but name: the replayer adopts it.
            let peer = self.peer_record(&vol, rec.primary.as_ref().map(|p| p.image_id.as_str()));
            return match replica_health(&rec, peer.as_ref().map(Option::as_ref)) {
                Ok(()) => {
                    tracing::info!(
                        role = ?rec.role,
                        "not primary: replication goes on; the primary's DisableVolumeReplication \
                         ends it, force=true detaches this image"
                    );
                    Ok(())
                }
                Err(why) if rec.role == Role::Demoted => {
                    // No peer took over: this side still holds the data
                    // of record, so disabling here ends replication as on
                    // a primary.
                    tracing::info!(reason = %why, "demoted and no peer primary: disabling");
                    self.disable_here(&vol, &reg, rec, &key)
                }
                Err(why) => Err(EngineError::FailedPrecondition(format!(
                    "{key} is a replica that is not healthy ({why}); DisableVolumeReplication \
                     with parameter force=true detaches it as a normal image at its last \
                     complete sync point"
                ))),
            };
        }
        self.disable_here(&vol, &reg, rec, &key)
    }

    /// Disables replication of `vol` on this side, whatever its role.
    fn disable_here(
        &self,
        vol: &Resolved,
        reg: &Registry,
        mut rec: ImageRecord,
        key: &str,
    ) -> Result<()> {
        let key = key.to_string();
        let _slot = self.take_slot(&key)?;
        self.held.release(&key);
        match rec.role {
            Role::Primary | Role::Demoted => {
                // A journal-mode image demoted in its journal is promoted
                // back first: librbd refuses it every change (its
                // snapshots' removal too), and for good where journaling
                // stays on (it was on before Enable). No peer took over:
                // this side holds the data of record.
                if rec.mode == super::journal_mode::MODE
                    && rec.role == Role::Demoted
                    && super::journal_roles::local_demotion(vol.ioctx(), &vol.image_id, &key)?
                        .is_some()
                {
                    super::journal_roles::promote_journal(&vol.image, &key, None, false)?;
                }
                reg.put_tombstone(&Tombstone {
                    image_id: vol.image_id.clone(),
                    image_name: vol.image.name().to_string(),
                    at: Utc::now(),
                })?;
                for (_, n) in sync_names(&vol.image)? {
                    match vol.image.snap_remove(&n) {
                        Ok(()) => {}
                        Err(e) if e.kind() == ErrorKind::NotFound => {}
                        Err(e) => return Err(e).ctx(|| format!("removing {key}@{n}")),
                    }
                }
                if rec.mode == super::journal_mode::MODE {
                    super::journal_mode::disable_journal_primary(
                        &vol.image,
                        rec.features_added.unwrap_or(0),
                    )?;
                }
                reg.remove(&rec)?;
                reg.announce();
                tracing::info!(
                    "replication disabled; the peer's replayer moves the replica to the trash"
                );
            }
            Role::Secondary => {
                let last = rec.last_sync.as_ref().map(|l| l.snap_name.clone());
                self.break_foreign_locks(&vol.image, &key);
                settle_pending_snap(&vol.image, reg, &mut rec)?;
                // A journal-mode replica is at an entry boundary of its
                // primary, newer than its bootstrap snapshot: kept as it is.
                if let Some(s) = last
                    .as_ref()
                    .filter(|_| rec.mode != super::journal_mode::MODE)
                {
                    rollback_to(vol.ioctx(), &vol.image, s, self.cfg.limits, &|| false)?;
                }
                if let Some(p) = &rec.primary {
                    reg.put_detached(&Tombstone {
                        image_id: p.image_id.clone(),
                        image_name: vol.image.name().to_string(),
                        at: Utc::now(),
                    })?;
                }
                for (_, n) in sync_names(&vol.image)? {
                    let _ = vol.image.snap_remove(&n);
                }
                reg.remove(&rec)?;
                tracing::info!(last_sync = ?last, "replica detached; it is a normal image now");
            }
        }
        Ok(())
    }
}

/// Refuses to undo a demotion of `key` without force while the peer (its
/// record, or why it could not be read) is primary or cannot be asked.
pub(crate) fn peer_not_primary(peer: Result<Option<ImageRecord>>, key: &str) -> Result<()> {
    match peer {
        Ok(Some(p)) if p.role == Role::Primary => Err(EngineError::FailedPrecondition(format!(
            "the peer site is primary for {key}; promoting this side too would split \
             the brain. Demote the peer first"
        ))),
        Ok(_) => Ok(()),
        Err(e) => Err(EngineError::FailedPrecondition(format!(
            "cannot reach the peer to check its role ({e}); promote with force to take \
             over without it"
        ))),
    }
}

/// The peer's record for a planned promotion of `key`: it must have been
/// read and be demoted (FAILED_PRECONDITION naming what to do otherwise).
pub(crate) fn demoted_peer(peer: Result<Option<ImageRecord>>, key: &str) -> Result<ImageRecord> {
    let peer = peer.map_err(|e| {
        EngineError::FailedPrecondition(format!(
            "cannot reach the peer site of {key} ({e}); promote with force to fail over \
             without it"
        ))
    })?;
    let prec = peer.ok_or_else(|| {
        EngineError::FailedPrecondition(format!(
            "the peer site has no replication record for {key}"
        ))
    })?;
    match prec.role {
        Role::Demoted => Ok(prec),
        Role::Primary => Err(EngineError::FailedPrecondition(format!(
            "the peer site is still primary for {key}; demote it first, or promote with \
             force"
        ))),
        Role::Secondary => Err(EngineError::FailedPrecondition(format!(
            "the peer site's {key} is a replica too; nothing to promote from"
        ))),
    }
}

/// DemoteVolume's steps on a volume whose record is `rec`: refuse while
/// other clients have it open (unless `force`), keep the replayer off,
/// take the lock (nobody else writes after it), take the final sync
/// snapshot, record the demotion. A failure before the record is written
/// leaves the volume primary and unlocked.
pub(crate) fn demote_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
) -> Result<()> {
    let key = s.key().to_string();
    if rec.role != Role::Primary {
        tracing::info!(role = ?rec.role, "already not primary");
        // A journal-mode image demoted in its journal is refused to
        // every writer by librbd itself (its lock too).
        if rec.mode != super::journal_mode::MODE {
            s.hold_lock()?;
        }
        return Ok(());
    }
    let writers = s.writers()?;
    let owners = s.lock_owners()?;
    if !writers.is_empty() && !force {
        return Err(EngineError::FailedPrecondition(format!(
            "volume {key} is still in use by {}{}; stop the application (unmap the \
             volume) before demoting it",
            writers.join(", "),
            if owners.is_empty() {
                String::new()
            } else {
                format!(" (exclusive lock held by {})", owners.join(", "))
            }
        )));
    }
    if rec.mode == super::journal_mode::MODE {
        return super::journal_roles::demote_volume(s, rec, force, &owners);
    }
    // The scheduler stays off the image meanwhile (no sync snapshot of
    // its own racing the demotion snapshot).
    let _pause = s.pause()?;
    // The lock first: once this process holds it nobody else can write,
    // so the demotion snapshot below is the last state any client wrote
    // and a planned promotion elsewhere misses nothing. A lock that
    // cannot be taken fails the demotion before anything changes.
    if force {
        for o in &owners {
            s.break_lock(o);
        }
    }
    s.hold_lock()?;
    let snap = s
        .sync_snapshots()
        .and_then(|v| super::registry::next_sync_seq(v.last().map_or(0, |(q, _)| *q)))
        .and_then(|seq| s.take_sync_snapshot(seq));
    let snap = match snap {
        Ok(snap) => snap,
        Err(e) => {
            // Still primary: let the application have its image back.
            s.release_lock();
            return Err(e);
        }
    };
    rec.role = Role::Demoted;
    rec.demotion_snap = Some(snap.clone());
    rec.role_change = change(format!("demoted at {snap}"));
    if let Err(e) = s.put(&mut rec) {
        s.release_lock();
        return Err(e);
    }
    tracing::info!(snapshot = %snap, "demoted; final sync snapshot taken");
    Ok(())
}

/// PromoteVolume's steps on a volume whose record is `rec` (see
/// [`Engine::promote`] for the rules): a planned promotion of a replica
/// only once it holds the peer's demotion snapshot; a replica is rolled
/// back to its newest complete sync point before it is recorded primary,
/// so a failure before the record is written leaves it a replica.
pub(crate) fn promote_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
    schedule: Option<Schedule>,
) -> Result<()> {
    let key = s.key().to_string();
    if rec.role != Role::Primary && rec.mode == super::journal_mode::MODE {
        return super::journal_roles::promote_volume(s, rec, force, schedule);
    }
    match rec.role {
        Role::Primary => {
            if let Some(sch) = schedule.filter(|sch| *sch != rec.schedule) {
                tracing::info!(schedule = ?sch, "schedule changed at promotion");
                rec.schedule = sch;
                s.put(&mut rec)?;
            }
            return Ok(());
        }
        // Undo a demotion, unless the peer took over meanwhile.
        Role::Demoted if !force => peer_not_primary(s.peer_record(None), &key)?,
        Role::Secondary if !force => peer_demotion_replicated(s, &rec, &key)?,
        _ => {}
    }
    let _pause = s.pause()?;
    s.release_lock();
    let mut rolled = 0;
    if rec.role == Role::Secondary {
        rolled = replica_to_last_sync(s, &mut rec, force, &key)?;
    } else {
        rec.role_change = change(if force {
            "promoted (forced) from demoted"
        } else {
            "promoted from demoted"
        });
    }
    rec.role = Role::Primary;
    rec.primary = None;
    rec.checkpoint = None;
    rec.demotion_snap = None;
    if let Some(sch) = schedule {
        rec.schedule = sch;
    }
    s.put(&mut rec)?;
    tracing::info!(rolled_back_bytes = rolled, "promoted");
    Ok(())
}

/// A planned promotion of a replica: the peer is demoted and its demotion
/// snapshot is here, copied completely (even if the replica's snapshot of
/// it is still being taken); UNAVAILABLE (retry) while it is in flight.
fn peer_demotion_replicated<S: VolumeStore>(s: &S, rec: &ImageRecord, key: &str) -> Result<()> {
    let primary_id = rec.primary.as_ref().map(|p| p.image_id.as_str());
    let prec = demoted_peer(s.peer_record(primary_id), key)?;
    let Some(d) = prec.demotion_snap else {
        return Err(EngineError::Internal(format!(
            "peer record of {key} is demoted without a demotion snapshot"
        )));
    };
    let have = rec.pending_snap.as_deref() == Some(d.as_str())
        || s.sync_snapshots()?.into_iter().any(|(_, n)| n == d);
    if !have {
        return Err(EngineError::Unavailable(format!(
            "the peer's demotion snapshot {d} of {key} is still being replicated; \
             retry shortly"
        )));
    }
    Ok(())
}

/// A replica being promoted: its head back at its last complete sync point
/// (a partial delta rolled back; a lock left by a crashed replayer broken),
/// the change noted in `rec`. Returns the bytes rolled back.
fn replica_to_last_sync<S: VolumeStore>(
    s: &S,
    rec: &mut ImageRecord,
    force: bool,
    key: &str,
) -> Result<u64> {
    let last = match rec.last_sync.as_ref() {
        Some(l) => Some(l.snap_name.clone()),
        None => s.sync_snapshots()?.pop().map(|(_, n)| n),
    }
    .ok_or_else(|| {
        EngineError::FailedPrecondition(format!(
            "{key} never completed a sync; it holds no consistent data to promote"
        ))
    })?;
    s.break_foreign_locks();
    s.settle_pending(rec)?;
    let rolled = s.rollback_to(&last)?;
    rec.role_change = change(format!(
        "promoted{} at {last}{}",
        if force { " (forced)" } else { "" },
        if rolled > 0 {
            format!(", rolled back {rolled} bytes of a partial delta")
        } else {
            String::new()
        }
    ));
    Ok(rolled)
}

/// ResyncVolume's steps on a volume whose record is `rec` (see
/// [`Engine::resync`]): nothing to do on a replica (ready once it holds a
/// complete sync point) or while neither side is primary; otherwise the
/// demoted image becomes a replica of the peer's primary, discarding local
/// changes only with `force`. Returns whether the replica is complete.
pub(crate) fn resync_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
) -> Result<bool> {
    let key = s.key().to_string();
    if rec.mode == super::journal_mode::MODE {
        return super::journal_roles::resync_volume(s, rec, force);
    }
    match rec.role {
        Role::Primary => {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {key} is primary; demote it before resyncing it"
            )));
        }
        // Already a replica: ready once it holds a complete sync point of
        // its primary and no delta is half applied.
        Role::Secondary => return Ok(rec.last_sync.is_some() && rec.checkpoint.is_none()),
        Role::Demoted => {}
    }
    let prec = match s.peer_record(None)? {
        Some(p) if p.role == Role::Primary => p,
        other => {
            // Neither side is primary (a relocation in progress: Ramen
            // waits for this side to settle before it promotes the
            // other). Nothing to resync once the peer holds the newest
            // sync point this side has (its demotion snapshot).
            let ours = s.sync_snapshots()?.pop().map(|(_, n)| n);
            let theirs = other.as_ref().and_then(newest_complete);
            let settled = ours.is_some() && ours == theirs;
            tracing::info!(ours = ?ours, theirs = ?theirs, settled, "the peer is not primary");
            return Ok(settled);
        }
    };
    let _pause = s.pause()?;
    let (div, primary) = s.divergence_from(&prec.image_id)?;
    if div.diverged() && !force {
        return Err(EngineError::FailedPrecondition(div.explain(&key)));
    }
    s.adopt_as_replica(&mut rec, primary, &div)?;
    Ok(false)
}

/// Whether the replica `rec` is healthy enough to keep replicating after its
/// VolumeReplication is deleted: its primary answers, is still the primary
/// it replicates (or took over from this demoted image), and the replica
/// holds a complete sync point. The reason otherwise.
fn replica_health(
    rec: &ImageRecord,
    peer: std::result::Result<Option<&ImageRecord>, &EngineError>,
) -> std::result::Result<(), String> {
    let prec = match peer {
        Err(e) => return Err(format!("its primary site cannot be read: {e}")),
        Ok(None) => return Err("the peer site has no replication record for it".into()),
        Ok(Some(p)) => p,
    };
    match rec.role {
        Role::Demoted if prec.role == Role::Primary => Ok(()),
        Role::Demoted => Err("no site is primary for it".into()),
        _ if !matches!(prec.role, Role::Primary | Role::Demoted) => {
            Err("the peer's image is not primary".into())
        }
        _ if rec
            .primary
            .as_ref()
            .is_some_and(|p| p.image_id != prec.image_id) =>
        {
            Err("it replicates another image than the peer's primary".into())
        }
        _ if rec.mode == super::journal_mode::MODE && rec.journal.is_none() => {
            Err("it never completed its journal bootstrap".into())
        }
        _ if rec.mode != super::journal_mode::MODE && rec.last_sync.is_none() => {
            Err("it never completed a sync".into())
        }
        _ => Ok(()),
    }
}

impl Engine {
    /// Moves the local replica of a disabled primary to the RBD trash.
    /// Returns whether the tombstone was handled. Blocking.
    pub(crate) fn bury(&self, local_io: &Arc<IoCtx>, t: &Tombstone) -> Result<bool> {
        let key = image_key(local_io.pool(), local_io.namespace(), &t.image_name);
        let reg = Registry::new(Arc::clone(local_io));
        let img = match Image::open(local_io, &t.image_name) {
            Ok(i) => i,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e).ctx(|| format!("opening {key}")),
        };
        let id = img.id().ctx(|| key.clone())?;
        let Some(rec) = reg.get(&id)? else {
            // Not ours: leave it alone.
            return Ok(true);
        };
        if rec.role != Role::Secondary
            || rec
                .primary
                .as_ref()
                .is_none_or(|p| p.image_id != t.image_id)
        {
            return Ok(true);
        }
        let Some(_slot) = self
            .slots
            .get(&key)
            .enter_cancelling(Duration::from_secs(5))
        else {
            return Ok(false);
        };
        self.held.release(&key);
        drop(img);
        // Keep it restorable for a week (`rbd trash restore`).
        ceph::rbd::trash_move(local_io, &t.image_name, 7 * 86_400)
            .ctx(|| format!("moving {key} to the trash"))?;
        reg.remove(&rec)?;
        tracing::info!(image = %key, "replication disabled on the primary: replica moved to the trash");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    //! The role rules on two in-memory sites (`store::fake`): every order of
    //! demote, replicate and promote an operator or a controller can produce,
    //! and a failure injected at every step of a demotion and a promotion.

    use super::*;
    use crate::store::fake::{MemVolume, at_every_step, code, demote, promote, resync};

    #[test]
    fn planned_relocation_waits_for_the_demotion_snapshot() {
        let (a, b) = MemVolume::pair();
        assert!(a.write("v2"));
        // b cannot be promoted while a is primary, or before a's final
        // snapshot reached it.
        assert_eq!(code(promote(&b, false)), "failed-precondition");
        demote(&a, false).unwrap();
        let ra = a.rec();
        assert_eq!(ra.role, Role::Demoted);
        assert_eq!(a.site().lock.as_deref(), Some("me"), "demoted and locked");
        assert!(!a.write("lost"), "nobody writes a demoted image");
        assert_eq!(
            code(promote(&b, false)),
            "unavailable",
            "retry, never force"
        );
        a.replicate_to(&b);
        promote(&b, false).unwrap();
        assert_eq!(b.rec().role, Role::Primary);
        assert_eq!(b.site().head, "v2", "everything a acknowledged is on b");
        // Idempotent on both sides; a cannot take the role back unforced.
        promote(&b, false).unwrap();
        demote(&a, false).unwrap();
        assert_eq!(code(promote(&a, false)), "failed-precondition");
    }

    #[test]
    fn demotion_refuses_open_clients_unless_forced() {
        let (a, _b) = MemVolume::pair();
        a.with(|w| {
            w.sites[0].writers = vec!["client.7".into()];
            w.sites[0].lock = Some("client.7".into());
        });
        let err = demote(&a, false).unwrap_err().to_string();
        assert!(err.contains("client.7"), "{err}");
        assert_eq!(a.rec().role, Role::Primary, "nothing changed");
        assert_eq!(a.site().snaps.len(), 1, "no snapshot taken");
        demote(&a, true).unwrap();
        assert_eq!(a.rec().role, Role::Demoted);
        assert_eq!(
            a.site().lock.as_deref(),
            Some("me"),
            "the writer's lock broken"
        );
    }

    #[test]
    fn forced_promotion_rolls_back_to_the_last_complete_sync_point() {
        let (a, b) = MemVolume::pair();
        // A delta half applied on b when site a is lost.
        b.with(|w| w.sites[1].head = "v1+half-of-v2".into());
        a.with(|w| w.sites[0].reachable = false);
        assert_eq!(code(promote(&b, false)), "failed-precondition");
        promote(&b, true).unwrap();
        assert_eq!(b.site().head, "v1", "back at the sync point");
        let rb = b.rec();
        assert_eq!(rb.role, Role::Primary);
        assert!(rb.role_change.unwrap().what.contains("rolled back"));
        // The old primary comes back still primary: its unforced promotion
        // of a demotion would split the brain, and is refused.
        a.with(|w| w.sites[0].reachable = true);
        demote(&a, false).unwrap();
        assert_eq!(code(promote(&a, false)), "failed-precondition");
    }

    #[test]
    fn a_replica_that_never_synced_cannot_be_promoted() {
        let (_a, b) = MemVolume::pair();
        b.with(|w| {
            let s = &mut w.sites[1];
            s.snaps.clear();
            let mut rec = s.record().unwrap();
            rec.last_sync = None;
            s.store(&rec);
        });
        assert_eq!(code(promote(&b, true)), "failed-precondition");
        assert_eq!(b.rec().role, Role::Secondary);
    }

    #[test]
    fn a_record_changed_under_a_role_change_is_a_conflict() {
        let (a, _b) = MemVolume::pair();
        let stale = a.rec();
        demote(&a, false).unwrap();
        let err = demote_volume(&a, stale, false).unwrap_err();
        assert!(matches!(err, EngineError::Conflict(_)), "{err}");
        assert_eq!(a.rec().role, Role::Demoted);
    }

    #[test]
    fn a_failure_at_any_step_of_a_demotion_leaves_a_primary_or_a_demoted_image() {
        at_every_step(
            5,
            &MemVolume::pair,
            &|a, _| demote(a, false),
            &|at, a, _| {
                let (rec, site) = (a.rec(), a.site());
                match rec.role {
                    Role::Primary => assert_ne!(
                        site.lock.as_deref(),
                        Some("me"),
                        "step {at}: a failed demotion gives the image back to its application"
                    ),
                    Role::Demoted => {
                        let snap = rec.demotion_snap.expect("demoted at a snapshot");
                        assert!(site.snaps.iter().any(|(_, n, _)| *n == snap), "step {at}");
                        assert_eq!(site.lock.as_deref(), Some("me"), "step {at}");
                    }
                    Role::Secondary => panic!("step {at}: a primary became a replica"),
                }
            },
            &|at, a, _| assert_eq!(a.rec().role, Role::Demoted, "step {at}"),
        );
    }

    #[test]
    fn a_failure_at_any_step_of_a_promotion_leaves_a_replica_or_a_consistent_primary() {
        at_every_step(
            5,
            &|| {
                let (a, b) = MemVolume::pair();
                assert!(a.write("v2"));
                demote(&a, false).unwrap();
                a.replicate_to(&b);
                b.with(|w| w.sites[1].head = "v2+partial".into());
                (a, b)
            },
            &|_, b| promote(b, false),
            &|at, _, b| {
                let (rec, site) = (b.rec(), b.site());
                if rec.role == Role::Primary {
                    assert_eq!(site.head, "v2", "step {at}: primary only at the sync point");
                } else {
                    assert_eq!(rec.role, Role::Secondary, "step {at}");
                }
            },
            &|at, _, b| {
                assert_eq!(
                    (b.rec().role, b.site().head),
                    (Role::Primary, "v2".into()),
                    "step {at}"
                );
            },
        );
    }

    /// Site a was primary, wrote after the last sync point and was demoted;
    /// site b was promoted by force without it: a split brain.
    fn split_brain() -> (MemVolume, MemVolume) {
        let (a, b) = MemVolume::pair();
        a.with(|w| w.sites[0].reachable = false);
        promote(&b, true).unwrap();
        a.with(|w| w.sites[0].reachable = true);
        assert!(a.write("a-only"));
        demote(&a, false).unwrap();
        assert!(b.write("b-only"));
        (a, b)
    }

    #[test]
    fn resync_after_an_orderly_switch_keeps_everything() {
        let (a, b) = MemVolume::pair();
        assert_eq!(code(resync(&a, false).map(|_| ())), "failed-precondition");
        assert!(
            resync(&b, false).unwrap(),
            "a replica with a sync point is ready"
        );
        assert!(a.write("v2"));
        demote(&a, false).unwrap();
        // Neither side primary: settled once b holds a's demotion snapshot.
        assert!(!resync(&a, false).unwrap());
        a.replicate_to(&b);
        assert!(resync(&a, false).unwrap());
        promote(&b, false).unwrap();
        let snaps = a.site().snaps;
        assert!(!resync(&a, false).unwrap(), "a replica now, to be filled");
        let ra = a.rec();
        assert_eq!(ra.role, Role::Secondary);
        assert_eq!(a.site().snaps, snaps, "nothing removed");
        assert_eq!(a.site().head, "v2");
        assert_eq!(
            a.site().lock.as_deref(),
            Some("me"),
            "locked against writers"
        );
    }

    #[test]
    fn split_brain_is_resynced_only_with_force_and_from_the_common_point() {
        let (a, _b) = split_brain();
        let before = a.site();
        let err = resync(&a, false).unwrap_err().to_string();
        assert!(
            err.contains("split-brain") && err.contains("csirr-sync.1"),
            "{err}"
        );
        assert_eq!(a.rec().role, Role::Demoted, "nothing changed");
        assert_eq!(a.site().snaps, before.snaps);
        assert_eq!(a.site().head, before.head);
        assert!(!resync(&a, true).unwrap());
        let site = a.site();
        assert_eq!(a.rec().role, Role::Secondary);
        assert_eq!(site.head, "v1", "rolled back to the common sync point");
        assert_eq!(site.snaps.len(), 1, "a's own later snapshot removed");
    }

    #[test]
    fn a_failure_at_any_step_of_a_forced_resync_leaves_it_demoted_or_a_replica() {
        at_every_step(
            4,
            &split_brain,
            &|a, _| resync(a, true).map(drop),
            &|at, a, _| {
                let role = a.rec().role;
                assert!(
                    matches!(role, Role::Demoted | Role::Secondary),
                    "step {at}: {role:?}"
                );
            },
            &|at, a, _| {
                let site = a.site();
                assert_eq!(
                    (a.rec().role, site.head.as_str()),
                    (Role::Secondary, "v1"),
                    "step {at}"
                );
                assert_eq!(site.lock.as_deref(), Some("me"), "step {at}");
            },
        );
    }
}
