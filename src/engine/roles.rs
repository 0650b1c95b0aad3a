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

use crate::ceph::{self, Cluster, ErrorKind, Image, IoCtx};

use super::error::{CephContext, EngineError, Result};
use super::registry::{
    ImageRecord, PrimaryRef, Registry, Role, RoleChange, Tombstone, sync_snapshots,
};
use super::replayer::settle_pending_snap;
use super::resolve::Resolved;
use super::rollback::rollback_to;
use super::slots::{SlotGuard, image_key};
use super::{Engine, VolumeRequest};

/// The peer's view of an image: its cluster and its registry record.
struct PeerImage {
    cluster: Arc<Cluster>,
    io: Arc<IoCtx>,
    rec: Option<ImageRecord>,
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
    fn key_of(vol: &Resolved) -> String {
        let io = vol.ioctx();
        image_key(io.pool(), io.namespace(), vol.image.name())
    }

    /// Takes the image's slot, stopping the replayer's work on it.
    fn take_slot(&self, key: &str) -> Result<SlotGuard> {
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
        Ok((reg, rec))
    }

    /// The peer's record of the image, found by the same pool, namespace and
    /// name. Blocking; bounded by the operation timeout.
    fn peer_record(&self, vol: &Resolved, primary_id: Option<&str>) -> Result<PeerImage> {
        let io = vol.ioctx();
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
        let reg = Registry::new(Arc::clone(&pio));
        let rec = match primary_id {
            Some(id) => reg.get(id)?,
            None => reg
                .list()?
                .into_iter()
                .find(|r| r.image_name == vol.image.name()),
        };
        Ok(PeerImage {
            cluster,
            io: pio,
            rec,
        })
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
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let (reg, mut rec) = self.record_of(&vol, req)?;
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("demote", volume = %req.volume, image = %key);
        let _s = span.enter();
        if rec.role != Role::Primary {
            tracing::info!(role = ?rec.role, "already not primary");
            self.hold_lock(&key, &vol.image)?;
            return Ok(());
        }
        let me = vol.image.ioctx().cluster().instance_id();
        let writers: Vec<String> = vol
            .image
            .watchers()
            .ctx(|| format!("listing clients of {key}"))?
            .into_iter()
            .filter(|w| u64::try_from(w.id).ok() != Some(me))
            .map(|w| format!("client.{} at {}", w.id, w.addr))
            .collect();
        let owners = vol
            .image
            .lock_owners()
            .ctx(|| format!("reading the lock of {key}"))?;
        if !writers.is_empty() && !force {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {} is still in use by {}{}; stop the application (unmap the \
                 volume) before demoting it",
                req.volume,
                writers.join(", "),
                if owners.is_empty() {
                    String::new()
                } else {
                    format!(" (exclusive lock held by {})", owners.join(", "))
                }
            )));
        }
        let seq = sync_names(&vol.image)?.last().map_or(0, |(q, _)| *q) + 1;
        let snap = self.take_sync_snapshot(&vol.image, seq)?;
        rec.role = Role::Demoted;
        rec.demotion_snap = Some(snap.clone());
        rec.role_change = change(format!("demoted at {snap}"));
        reg.put(&rec)?;
        reg.announce();
        if force {
            for o in &owners {
                tracing::warn!(owner = %o, "breaking the lock of a writer (forced demotion)");
                let _ = vol.image.lock_break(o);
            }
        }
        self.hold_lock(&key, &vol.image)?;
        tracing::info!(snapshot = %snap, "demoted; final sync snapshot taken");
        Ok(())
    }

    /// Breaks the exclusive lock of `img` if a client other than this one
    /// holds it. Best effort: a lock that cannot be broken makes the writes
    /// that follow fail with a clear error instead.
    fn break_foreign_locks(&self, img: &Image, key: &str) {
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
        img.lock_acquire(ceph::LockMode::Exclusive)
            .ctx(|| format!("locking {key} against writers"))?;
        self.held.put(key, img.clone());
        Ok(())
    }

    /// PromoteVolume. Without `force`: succeeds when the image is primary,
    /// or a replica that holds the peer's demotion snapshot (zero data loss);
    /// UNAVAILABLE while that snapshot is still being copied;
    /// FAILED_PRECONDITION while the peer is primary or unreachable. With
    /// `force`: fails over without the peer, within the promote timeout.
    pub async fn promote(self: &Arc<Self>, req: VolumeRequest, force: bool) -> Result<()> {
        let key = req.volume.to_string();
        let timeout = self.cfg.promote_timeout;
        let work = self.run_locked(key, move |e| e.promote_blocking(&req, force));
        match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(EngineError::Unavailable(format!(
                "promotion did not finish within {timeout:?}; it goes on in the background, \
                 retry to see its outcome"
            ))),
        }
    }

    fn promote_blocking(&self, req: &VolumeRequest, force: bool) -> Result<()> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let (reg, mut rec) = self.record_of(&vol, req)?;
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("promote", volume = %req.volume, image = %key, force);
        let _s = span.enter();
        match rec.role {
            Role::Primary => return Ok(()),
            Role::Demoted if !force => {
                // Undo a demotion, unless the peer took over meanwhile.
                match self.peer_record(&vol, None) {
                    Ok(PeerImage { rec: Some(p), .. }) if p.role == Role::Primary => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "the peer site is primary for {key}; promoting this side too would \
                             split the brain. Demote the peer first"
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "cannot reach the peer to check its role ({e}); promote with force \
                             to take over without it"
                        )));
                    }
                }
            }
            Role::Secondary if !force => {
                let primary_id = rec.primary.as_ref().map(|p| p.image_id.clone());
                let peer = self.peer_record(&vol, primary_id.as_deref()).map_err(|e| {
                    EngineError::FailedPrecondition(format!(
                        "cannot reach the peer site of {key} ({e}); promote with force to fail \
                         over without it"
                    ))
                })?;
                let prec = peer.rec.ok_or_else(|| {
                    EngineError::FailedPrecondition(format!(
                        "the peer site has no replication record for {key}"
                    ))
                })?;
                match prec.role {
                    Role::Primary => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "the peer site is still primary for {key}; demote it first, or \
                             promote with force"
                        )));
                    }
                    Role::Secondary => {
                        return Err(EngineError::FailedPrecondition(format!(
                            "the peer site's {key} is a replica too; nothing to promote from"
                        )));
                    }
                    Role::Demoted => {
                        let Some(d) = prec.demotion_snap.clone() else {
                            return Err(EngineError::Internal(format!(
                                "peer record of {key} is demoted without a demotion snapshot"
                            )));
                        };
                        // Copied completely, even if the replica's snapshot
                        // of it is still being taken.
                        let have = rec.pending_snap.as_deref() == Some(d.as_str())
                            || sync_names(&vol.image)?.into_iter().any(|(_, n)| n == d);
                        if !have {
                            return Err(EngineError::Unavailable(format!(
                                "the peer's demotion snapshot {d} of {key} is still being \
                                 replicated; retry shortly"
                            )));
                        }
                    }
                }
            }
            _ => {}
        }
        let _slot = self.take_slot(&key)?;
        self.held.release(&key);
        let mut rolled = 0;
        if rec.role == Role::Secondary {
            let last = rec
                .last_sync
                .as_ref()
                .map(|l| l.snap_name.clone())
                .or_else(|| {
                    sync_names(&vol.image)
                        .ok()
                        .and_then(|v| v.last().map(|(_, n)| n.clone()))
                })
                .ok_or_else(|| {
                    EngineError::FailedPrecondition(format!(
                        "{key} never completed a sync; it holds no consistent data to promote"
                    ))
                })?;
            // A lock left by an earlier replayer (a crashed process) would
            // refuse our writes: break it. librbd refuses (EINVAL) to break a
            // lock of this very client, which was just released anyway.
            self.break_foreign_locks(&vol.image, &key);
            settle_pending_snap(&vol.image, &reg, &mut rec)?;
            rolled = rollback_to(vol.ioctx(), &vol.image, &last, self.cfg.limits, &|| false)?;
            rec.role_change = change(format!(
                "promoted{} at {last}{}",
                if force { " (forced)" } else { "" },
                if rolled > 0 {
                    format!(", rolled back {rolled} bytes of a partial delta")
                } else {
                    String::new()
                }
            ));
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
        reg.put(&rec)?;
        reg.announce();
        tracing::info!(rolled_back_bytes = rolled, "promoted");
        Ok(())
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
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let (reg, mut rec) = self.record_of(&vol, req)?;
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("resync", volume = %req.volume, image = %key, force);
        let _s = span.enter();
        match rec.role {
            Role::Primary => {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} is primary; demote it before resyncing it",
                    req.volume
                )));
            }
            Role::Secondary => {
                // Already a replica: ready once it holds a complete sync
                // point of its primary and no delta is half applied.
                return Ok(rec.last_sync.is_some() && rec.checkpoint.is_none());
            }
            Role::Demoted => {}
        }
        let peer = self.peer_record(&vol, None)?;
        let Some(prec) = peer.rec.filter(|p| p.role == Role::Primary) else {
            tracing::info!("the peer is not primary yet; waiting");
            return Ok(false);
        };
        let _slot = self.take_slot(&key)?;
        let pimg = Image::open_by_id_read_only(&peer.io, &prec.image_id, None)
            .ctx(|| format!("opening the peer's primary {key}"))?;
        let theirs: Vec<String> = sync_names(&pimg)?.into_iter().map(|(_, n)| n).collect();
        let ours = sync_names(&vol.image)?;
        // Newest sync snapshot both sides have (names are unique).
        let common = ours
            .iter()
            .rev()
            .find(|(_, n)| theirs.contains(n))
            .map(|(_, n)| n.clone());
        let newer_here: Vec<String> = ours
            .iter()
            .filter(|(q, n)| match &common {
                Some(c) => {
                    ours.iter()
                        .find(|(_, m)| m == c)
                        .is_some_and(|(cq, _)| q > cq)
                        && !theirs.contains(n)
                }
                None => true,
            })
            .map(|(_, n)| n.clone())
            .collect();
        let head_changed = match &common {
            Some(c) => {
                let size = vol.image.size().ctx(|| key.clone())?;
                !crate::engine::copy::changed_extents(
                    &vol.image,
                    Some(c),
                    size,
                    self.cfg.limits.chunk,
                )?
                .is_empty()
            }
            None => true,
        };
        let diverged = common.is_none() || head_changed || !newer_here.is_empty();
        if diverged && !force {
            return Err(EngineError::FailedPrecondition(match &common {
                Some(c) => format!(
                    "split-brain: {key} changed on this site after {c}, the newest sync point \
                     both sites share; ResyncVolume with force discards the local changes \
                     since {c} and copies only what differs"
                ),
                None => format!(
                    "{key} shares no sync point with the new primary; ResyncVolume with force \
                     replaces its content with a full copy"
                ),
            }));
        }
        self.held.release(&key);
        let rolled = match &common {
            Some(c) if head_changed => {
                rollback_to(vol.ioctx(), &vol.image, c, self.cfg.limits, &|| false)?
            }
            _ => 0,
        };
        for n in &newer_here {
            vol.image
                .snap_remove(n)
                .ctx(|| format!("removing diverged snapshot {key}@{n}"))?;
        }
        rec.role = Role::Secondary;
        rec.primary = Some(PrimaryRef {
            fsid: peer.cluster.fsid().to_string(),
            image_id: prec.image_id.clone(),
        });
        rec.demotion_snap = None;
        rec.last_sync = None;
        rec.checkpoint = None;
        rec.role_change = change(match &common {
            Some(c) => format!(
                "resync from {c}{}",
                if rolled > 0 {
                    format!(" (rolled back {rolled} bytes)")
                } else {
                    String::new()
                }
            ),
            None => "full resync".to_string(),
        });
        reg.put(&rec)?;
        reg.announce();
        self.hold_lock(&key, &vol.image)?;
        tracing::info!(common = ?common, rolled_back_bytes = rolled, removed = newer_here.len(), "now a replica of the peer's primary");
        Ok(false)
    }

    /// DisableVolumeReplication. On the primary (or a demoted image): stops
    /// replication, removes its sync snapshots and registry record, and
    /// leaves a tombstone that makes the peer's replayer move the replica to
    /// the RBD trash. On a replica: stops replaying it, brings it back to its
    /// last complete sync point, and leaves it as a normal image. Idempotent.
    pub async fn disable(self: &Arc<Self>, req: VolumeRequest) -> Result<()> {
        let key = req.volume.to_string();
        self.run_locked(key, move |e| e.disable_blocking(&req))
            .await
    }

    fn disable_blocking(&self, req: &VolumeRequest) -> Result<()> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let Some(mut rec) = reg.get(&vol.image_id)? else {
            return Ok(());
        };
        let key = Self::key_of(&vol);
        let span = tracing::info_span!("disable", volume = %req.volume, image = %key);
        let _s = span.enter();
        let _slot = self.take_slot(&key)?;
        self.held.release(&key);
        match rec.role {
            Role::Primary | Role::Demoted => {
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
                reg.remove(&vol.image_id)?;
                reg.announce();
                tracing::info!(
                    "replication disabled; the peer's replayer moves the replica to the trash"
                );
            }
            Role::Secondary => {
                let last = rec.last_sync.as_ref().map(|l| l.snap_name.clone());
                self.break_foreign_locks(&vol.image, &key);
                settle_pending_snap(&vol.image, &reg, &mut rec)?;
                if let Some(s) = &last {
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
                reg.remove(&vol.image_id)?;
                tracing::info!(last_sync = ?last, "replica detached; it is a normal image now");
            }
        }
        Ok(())
    }

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
        reg.remove(&id)?;
        tracing::info!(image = %key, "replication disabled on the primary: replica moved to the trash");
        Ok(true)
    }
}
