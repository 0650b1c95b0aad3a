//! The snapshot replayer: pulls primary images of the peer cluster into
//! replicas on the local cluster.
//!
//! Every poll interval it lists the local pools (or `--pools`), reads each
//! pool's Ceph mirror peers and their `mon_host`/`key` attributes (what
//! `rbd mirror pool peer bootstrap import` stores), takes the pool's replayer
//! lease so that one process per cluster replays, and reads the peer's
//! registry in the same pool name and every namespace. For each primary image
//! there it runs [`sync_image`] on the blocking pool, a bounded number at a
//! time: create the replica if needed (same pool, namespace and name, same
//! size and features, plus exclusive-lock), keep it open and locked so that
//! nobody else can write it, copy the delta from the newest common sync
//! snapshot to the primary's newest one, then snapshot the replica and record
//! the sync point on both sides.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::ceph::{self, Cluster, ErrorKind, Image, IoCtx, features};

use super::copy::{self, Extent};
use super::error::{CephContext, EngineError, Result};
use super::registry::{
    Checkpoint, ImageRecord, PrimaryRef, Registry, ReplayState, ReplicaStatus, Role, SyncPoint,
    namespace_ioctxs, sync_snap_seq, sync_snapshots,
};
use super::scheduler::DueCache;
use super::slots::image_key;
use super::{Credentials, Engine};

/// One image to replicate: where its primary is.
#[derive(Clone)]
pub struct Job {
    /// Pool name (same on both sides).
    pub pool: String,
    /// RADOS namespace (same on both sides).
    pub namespace: String,
    /// The peer cluster holding the primary.
    pub peer: Arc<Cluster>,
    /// The primary's registry record.
    pub primary: ImageRecord,
}

impl Job {
    fn labels(&self) -> crate::metrics::ImageLabels {
        crate::metrics::ImageLabels::new(&self.pool, &self.namespace, &self.primary.image_name)
    }

    /// The image's key in the held images and the slots: the same key the
    /// RPCs derive from a resolved volume.
    fn key(&self) -> String {
        image_key(&self.pool, &self.namespace, &self.primary.image_name)
    }
}

/// Pools (and namespaces) whose replayer lease this process holds.
type Leases = HashSet<(String, String)>;

/// Images this process holds open and exclusively locked, by
/// `pool[/ns]/name`: replicas while they are replayed, demoted images until
/// they are resynced. Releasing drops the lock.
#[derive(Default)]
pub struct HeldImages {
    open: Mutex<HashMap<String, Image>>,
}

impl HeldImages {
    /// The held image `key`, if any.
    pub fn get(&self, key: &str) -> Option<Image> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// Holds `img` (its lock already taken).
    pub fn put(&self, key: &str, img: Image) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), img);
    }

    /// Releases the lock of `key` and forgets it.
    pub fn release(&self, key: &str) {
        let img = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(img) = img {
            let _ = img.lock_release();
        }
    }

    /// Releases everything (shutdown).
    pub fn release_all(&self) {
        let all: Vec<Image> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .map(|(_, i)| i)
            .collect();
        for img in all {
            let _ = img.lock_release();
        }
    }
}

/// Runs the replayer until `cancel`.
pub async fn run(engine: Arc<Engine>, cancel: CancellationToken) {
    let sem = Arc::new(Semaphore::new(engine.cfg.max_concurrent_syncs.max(1)));
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut leased: HashSet<(String, String)> = HashSet::new();
    let due = Arc::new(DueCache::default());
    loop {
        let e = Arc::clone(&engine);
        let discovered = tokio::task::spawn_blocking(move || e.discover()).await;
        match discovered {
            Ok(Ok((jobs, pools))) => {
                leased = pools;
                for job in jobs {
                    let key = job.key();
                    if !running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key.clone())
                    {
                        continue;
                    }
                    let (e, s, run, stop) = (
                        Arc::clone(&engine),
                        Arc::clone(&sem),
                        Arc::clone(&running),
                        Arc::clone(&stop),
                    );
                    tasks.spawn(async move {
                        if let Ok(_permit) = s.acquire_owned().await {
                            let span = tracing::info_span!("sync", image = %key);
                            let k2 = key.clone();
                            let res = tokio::task::spawn_blocking(move || {
                                let _e = span.enter();
                                sync_image(&e, &job, &stop)
                            })
                            .await;
                            match res {
                                Ok(Ok(())) => {}
                                Ok(Err(err)) => {
                                    tracing::warn!(image = %k2, error = %err, "sync failed")
                                }
                                Err(err) => {
                                    tracing::error!(image = %k2, error = %err, "sync task panicked")
                                }
                            }
                        }
                        run.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
                    });
                }
            }
            Ok(Err(err)) => tracing::warn!(error = %err, "replayer discovery failed"),
            Err(err) => tracing::error!(error = %err, "replayer discovery panicked"),
        }
        // Sync snapshots of this cluster's primaries on their schedule, and
        // demoted images locked.
        let (e, l, c) = (Arc::clone(&engine), leased.clone(), Arc::clone(&due));
        match tokio::task::spawn_blocking(move || e.local_pass(&l, &c)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::debug!(snapshots = n, "scheduled sync snapshots taken"),
            Ok(Err(err)) => tracing::warn!(error = %err, "scheduler pass failed"),
            Err(err) => tracing::error!(error = %err, "scheduler pass panicked"),
        }
        while tasks.try_join_next().is_some() {}
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(engine.cfg.poll_interval) => {}
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        running = tasks.len(),
        "replayer stopping; waiting for syncs to stop"
    );
    while tasks.join_next().await.is_some() {}
    let e = Arc::clone(&engine);
    let _ = tokio::task::spawn_blocking(move || {
        e.held.release_all();
        e.release_leases(&leased);
    })
    .await;
}

impl Engine {
    /// Finds the images to replicate. Returns the jobs and the pools whose
    /// lease this process holds. Blocking.
    fn discover(&self) -> Result<(Vec<Job>, Leases)> {
        let local = self.local()?;
        let pools = match &self.cfg.pools {
            Some(p) => p.clone(),
            None => local.pool_list().ctx(|| "listing pools".into())?,
        };
        let mut jobs = Vec::new();
        let mut leased = HashSet::new();
        for pool in pools {
            let io = match local.ioctx(&pool, "") {
                Ok(io) => io,
                Err(e) => {
                    tracing::debug!(pool = %pool, error = %e, "skipping pool");
                    continue;
                }
            };
            let peers = match ceph::rbd::mirror_peer_list(&io) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(pool = %pool, error = %e, "no mirror peers readable");
                    continue;
                }
            };
            if peers.is_empty() {
                continue;
            }
            let reg = Registry::new(Arc::clone(&io));
            if !reg.acquire_lease(
                &self.cookie,
                self.cfg.poll_interval * 6 + Duration::from_secs(10),
            )? {
                tracing::debug!(pool = %pool, "another replayer holds the lease");
                continue;
            }
            leased.insert((pool.clone(), String::new()));
            for peer in peers {
                match self.peer_jobs(&io, &pool, &peer) {
                    Ok(mut j) => jobs.append(&mut j),
                    Err(e) => {
                        tracing::warn!(pool = %pool, peer = %peer.site_name, error = %e, "cannot read peer")
                    }
                }
            }
        }
        Ok((jobs, leased))
    }

    /// Connects to mirror peer `peer` of the pool of `io` with the
    /// `mon_host`/`key` attributes that `rbd mirror pool peer bootstrap
    /// import` stored. Blocking.
    pub fn connect_peer(&self, io: &IoCtx, peer: &ceph::MirrorPeer) -> Result<Arc<Cluster>> {
        let pool = io.pool();
        let attrs = ceph::rbd::mirror_peer_attributes(io, &peer.uuid).ctx(|| {
            format!(
                "reading the attributes of mirror peer {} of pool {pool} \
                 (a least-privilege user needs mon cap \
                 'allow command \"config-key get\" with \"key\" prefix \"rbd/mirror/peer/\"')",
                peer.site_name
            )
        })?;
        let (Some(mon), Some(key)) = (attrs.get("mon_host"), attrs.get("key")) else {
            return Err(EngineError::FailedPrecondition(format!(
                "mirror peer {} of pool {pool} has no mon_host/key attributes \
                 (add the peer with `rbd mirror pool peer bootstrap import`)",
                peer.site_name
            )));
        };
        let creds = Credentials::new(&peer.client_name, key)?;
        self.conns.get(mon, &creds)
    }

    /// The peer clusters of the local pool `pool`. Blocking.
    pub fn peers_of_pool(&self, pool: &str) -> Result<Vec<(ceph::MirrorPeer, Arc<Cluster>)>> {
        let io = self
            .local()?
            .ioctx(pool, "")
            .ctx(|| format!("opening pool {pool}"))?;
        let peers =
            ceph::rbd::mirror_peer_list(&io).ctx(|| format!("listing mirror peers of {pool}"))?;
        peers
            .into_iter()
            .map(|p| {
                let c = self.connect_peer(&io, &p)?;
                Ok((p, c))
            })
            .collect()
    }

    fn peer_jobs(&self, io: &IoCtx, pool: &str, peer: &ceph::MirrorPeer) -> Result<Vec<Job>> {
        let cluster = self.connect_peer(io, peer)?;
        let pio = match cluster.ioctx(pool, "") {
            Ok(p) => p,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).ctx(|| format!("opening pool {pool} on peer {}", peer.site_name));
            }
        };
        let mut jobs = Vec::new();
        let local = self.local()?;
        for nio in namespace_ioctxs(&pio)? {
            let ns = nio.namespace().to_string();
            let preg = Registry::new(nio);
            let Ok(lio) = local.ioctx(pool, &ns) else {
                continue;
            };
            // Replicas of primaries whose replication was disabled go to
            // the trash.
            for t in preg.tombstones()? {
                match self.bury(&lio, &t) {
                    Ok(true) => {
                        if let Err(e) = preg.remove_tombstone(&t.image_id) {
                            tracing::warn!(error = %e, "cannot clear tombstone");
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(image = %t.image_name, error = %e, "cannot trash replica")
                    }
                }
            }
            let detached: HashSet<String> = Registry::new(Arc::clone(&lio))
                .detached()?
                .into_iter()
                .map(|t| t.image_id)
                .collect();
            for rec in preg.list()? {
                // A demoted primary still has its final sync snapshot to
                // deliver.
                if matches!(rec.role, Role::Primary | Role::Demoted) {
                    if detached.contains(&rec.image_id) {
                        Reporter {
                            reg: preg.clone(),
                            image_id: &rec.image_id,
                            fsid: local.fsid().to_string(),
                        }
                        .report(
                            ReplayState::Stopped,
                            "replication was disabled on the replica's site; the replica is a \
                             normal image there"
                                .into(),
                            None,
                        );
                        continue;
                    }
                    jobs.push(Job {
                        pool: pool.to_string(),
                        namespace: ns.clone(),
                        peer: Arc::clone(&cluster),
                        primary: rec,
                    });
                }
            }
        }
        Ok(jobs)
    }

    /// The local half of a poll, over every namespace of the leased pools,
    /// reading each registry once: takes the sync snapshots that are due
    /// (primaries) and locks demoted images this process does not hold yet
    /// (after a restart they refuse writers again). Returns the snapshots
    /// taken.
    fn local_pass(&self, leased: &Leases, cache: &DueCache) -> Result<usize> {
        let local = self.local()?;
        let mut taken = 0;
        for (pool, _) in leased {
            let io = local
                .ioctx(pool, "")
                .ctx(|| format!("opening pool {pool}"))?;
            for nio in namespace_ioctxs(&io)? {
                let records = Registry::new(Arc::clone(&nio)).list()?;
                taken += self.schedule_pool(&nio, &records, cache)?;
                if let Err(e) = self.hold_demoted(&nio, &records) {
                    tracing::warn!(pool = %nio.spec(), error = %e, "cannot lock demoted images");
                }
            }
        }
        Ok(taken)
    }

    /// Takes and keeps the lock of every demoted image among `records` (of
    /// `nio`'s pool and namespace) that this process does not hold yet.
    fn hold_demoted(&self, nio: &Arc<IoCtx>, records: &[ImageRecord]) -> Result<()> {
        for rec in records {
            if rec.role != Role::Demoted {
                continue;
            }
            let key = image_key(nio.pool(), nio.namespace(), &rec.image_name);
            if self.held.get(&key).is_some() {
                continue;
            }
            // A role change on it is running (e.g. a resync that just
            // released it): leave it to that.
            let slot = self.slots.get(&key);
            let Some(_guard) = slot.try_enter() else {
                continue;
            };
            // Re-read under the slot: the role may have changed since.
            if Registry::new(Arc::clone(nio))
                .get(&rec.image_id)?
                .is_none_or(|r| r.role != Role::Demoted)
            {
                continue;
            }
            match Image::open_by_id(nio, &rec.image_id) {
                Ok(img) => self.hold_lock(&key, &img)?,
                Err(e) => tracing::warn!(image = %key, error = %e, "cannot open demoted image"),
            }
        }
        Ok(())
    }

    fn release_leases(&self, leased: &HashSet<(String, String)>) {
        let Ok(local) = self.local() else { return };
        for (pool, ns) in leased {
            if let Ok(io) = local.ioctx(pool, ns) {
                Registry::new(io).release_lease(&self.cookie);
            }
        }
    }
}

fn snap_time(img: &Image, id: u64) -> DateTime<Utc> {
    img.snap_timestamp(id)
        .ok()
        .and_then(|s| Utc.timestamp_opt(s, 0).single())
        .unwrap_or_else(Utc::now)
}

/// Sync snapshots of an image by sequence number.
fn sync_snaps(snaps: &[ceph::SnapInfo]) -> BTreeMap<u64, ceph::SnapInfo> {
    sync_snapshots(snaps).into_iter().collect()
}

/// Writes the replica's status into the primary's registry.
struct Reporter<'a> {
    reg: Registry,
    image_id: &'a str,
    fsid: String,
}

impl Reporter<'_> {
    fn report(&self, state: ReplayState, message: String, last: Option<SyncPoint>) {
        self.put(ReplicaStatus {
            replica_fsid: self.fsid.clone(),
            state,
            message,
            percent: None,
            syncing_snap: None,
            last_sync: last,
            bytes_pending: None,
            bytes_per_sec: None,
            updated_at: Utc::now(),
        });
    }

    fn put(&self, st: ReplicaStatus) {
        if let Err(e) = self.reg.put_status(self.image_id, &st) {
            tracing::warn!(error = %e, "cannot report status to the primary");
        }
    }
}

/// Brings the replica of `job` up to the primary's newest sync snapshot.
/// Blocking.
pub fn sync_image(engine: &Engine, job: &Job, stop: &AtomicBool) -> Result<()> {
    let key = job.key();
    // A role change on this image is running: skip this round.
    let slot = engine.slots.get(&key);
    let Some(_guard) = slot.try_enter() else {
        return Ok(());
    };
    let cancelled = || stop.load(std::sync::atomic::Ordering::Relaxed) || slot.cancelled();
    let local = engine.local()?;
    let peer_io = job
        .peer
        .ioctx(&job.pool, &job.namespace)
        .ctx(|| format!("opening {key} on the peer"))?;
    let reporter = Reporter {
        reg: Registry::new(Arc::clone(&peer_io)),
        image_id: &job.primary.image_id,
        fsid: local.fsid().to_string(),
    };
    let result = sync_inner(engine, &local, job, &peer_io, &cancelled, &reporter);
    if let Err(e) = &result {
        engine.held.release(&key);
        let last = local
            .ioctx(&job.pool, &job.namespace)
            .ok()
            .and_then(|io| Registry::new(io).list().ok())
            .and_then(|l| {
                l.into_iter()
                    .find(|r| r.image_name == job.primary.image_name)
                    .and_then(|r| r.last_sync)
            });
        if !cancelled() {
            engine
                .metrics
                .sync_finished(&job.labels(), 0, Duration::ZERO, false);
            reporter.report(ReplayState::Error, e.to_string(), last);
        }
    }
    result
}

fn sync_inner(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    cancelled: &dyn Fn() -> bool,
    reporter: &Reporter<'_>,
) -> Result<()> {
    let key = job.key();
    let local_io = local.ioctx(&job.pool, &job.namespace).ctx(|| {
        format!(
            "opening {}/{} on the local cluster",
            job.pool, job.namespace
        )
    })?;
    let local_reg = Registry::new(Arc::clone(&local_io));

    // The primary (read-write handle: pruning removes its old sync
    // snapshots; librbd forwards that to the lock owner) and its newest
    // sync snapshot.
    let primary = Image::open_by_id(peer_io, &job.primary.image_id)
        .ctx(|| format!("opening primary {key}"))?;
    let pall = primary
        .snap_list()
        .ctx(|| format!("listing snapshots of primary {key}"))?;
    let psync = sync_snaps(&pall);
    let Some((_, target)) = psync.iter().next_back() else {
        reporter.report(
            ReplayState::Starting,
            "waiting for the first sync snapshot".into(),
            None,
        );
        return Ok(());
    };
    let target = target.clone();

    // The replica: existing (must be ours), or created now.
    let (replica, mut rec, fresh) = match engine.held.get(&key) {
        Some(img) => {
            let id = img.id().ctx(|| format!("replica {key}"))?;
            let rec = local_reg.get(&id)?.ok_or_else(|| {
                EngineError::Internal(format!("replica {key} lost its registry record"))
            })?;
            (img, rec, false)
        }
        None => {
            let (img, rec, fresh) =
                open_or_create_replica(&local_io, &local_reg, job, &primary, &target)?;
            if rec.role == Role::Secondary {
                img.lock_acquire(ceph::LockMode::Exclusive)
                    .ctx(|| format!("locking replica {key} against other writers"))?;
                engine.held.put(&key, img.clone());
                ensure_csi_journal(peer_io, &local_io, job, &rec.image_id);
            }
            (img, rec, fresh)
        }
    };
    match rec.role {
        Role::Secondary => {}
        Role::Demoted => {
            reporter.report(
                ReplayState::Stopped,
                format!(
                    "{key} is demoted on the replica's site and waits for ResyncVolume \
                     to become a replica of this primary"
                ),
                None,
            );
            return Ok(());
        }
        Role::Primary if job.primary.role == Role::Primary => {
            return Err(EngineError::FailedPrecondition(format!(
                "split-brain: {key} is primary on both sites; nothing is copied or \
                 overwritten. Decide which site keeps its data, demote the other one and \
                 resync it (ResyncVolume with force)"
            )));
        }
        // The peer is demoted and this side primary: a finished relocation,
        // nothing to replay.
        Role::Primary => return Ok(()),
    }
    if rec
        .primary
        .as_ref()
        .is_some_and(|p| p.image_id != job.primary.image_id)
    {
        return Err(EngineError::FailedPrecondition(format!(
            "{key} here replicates another primary image than the peer's; not touching it"
        )));
    }

    let rall = replica
        .snap_list()
        .ctx(|| format!("listing snapshots of replica {key}"))?;
    let rnames: HashSet<&str> = rall.iter().map(|s| s.name.as_str()).collect();
    if rnames.contains(target.name.as_str()) {
        // The replica already has the primary's newest sync point (e.g. a
        // demoted image resynced to the peer that replayed its demotion
        // snapshot): record it as this replica's complete sync point.
        if rec
            .last_sync
            .as_ref()
            .is_none_or(|l| l.snap_name != target.name)
        {
            rec.last_sync = Some(SyncPoint {
                snap_name: target.name.clone(),
                snap_time: snap_time(&primary, target.id),
                completed_at: Utc::now(),
                duration_ms: 0,
                bytes: 0,
            });
            rec.checkpoint = None;
            local_reg.put(&rec)?;
        }
        reporter.report(ReplayState::Idle, String::new(), rec.last_sync.clone());
        prune(
            engine,
            &primary,
            &psync,
            &replica,
            &rall,
            &target.name,
            &key,
        );
        return Ok(());
    }
    // Base of the delta: the newest sync snapshot both sides have.
    let base = sync_snaps(&rall)
        .into_values()
        .rev()
        .find_map(|r| psync.values().find(|p| p.name == r.name).cloned());
    let base_id = base.as_ref().map_or(0, |b| b.id);
    // Points to reach in order: user snapshots taken on the primary between
    // the base and the target (the replica gets them too), then the target.
    let mut points: Vec<ceph::SnapInfo> = pall
        .iter()
        .filter(|s| {
            sync_snap_seq(&s.name).is_none()
                && s.id > base_id
                && s.id < target.id
                && !rnames.contains(s.name.as_str())
        })
        .cloned()
        .collect();
    points.sort_by_key(|s| s.id);
    points.push(target.clone());

    let started = Instant::now();
    let mut bytes = 0u64;
    let mut from = base.map(|b| b.name);
    let mut fresh = fresh;
    for point in &points {
        let stats = delta(
            engine,
            job,
            peer_io,
            &replica,
            &local_reg,
            &mut rec,
            from.as_deref(),
            point,
            fresh,
            cancelled,
            reporter,
        )?;
        bytes += stats.transferred();
        replica
            .snap_create(&point.name)
            .ctx(|| format!("snapshotting replica {key}@{}", point.name))?;
        from = Some(point.name.clone());
        fresh = false;
    }
    let elapsed = started.elapsed();
    rec.checkpoint = None;
    rec.last_sync = Some(SyncPoint {
        snap_name: target.name.clone(),
        snap_time: snap_time(&primary, target.id),
        completed_at: Utc::now(),
        duration_ms: elapsed.as_millis() as u64,
        bytes,
    });
    local_reg.put(&rec)?;
    tracing::info!(snapshot = %target.name, bytes, seconds = elapsed.as_secs_f64(), "sync point complete");
    engine
        .metrics
        .sync_finished(&job.labels(), bytes, elapsed, true);
    let rall = replica
        .snap_list()
        .ctx(|| format!("listing snapshots of replica {key}"))?;
    // Prune before reporting: the primary's scheduler takes its next sync
    // snapshot only once it sees this report, so the primary never holds more
    // than --keep-snapshots plus the one pending.
    prune(
        engine,
        &primary,
        &psync,
        &replica,
        &rall,
        &target.name,
        &key,
    );
    reporter.report(ReplayState::Idle, String::new(), rec.last_sync.clone());
    Ok(())
}

/// Writes ceph-csi's journal entries for the replica of a ceph-csi volume on
/// this cluster (same uuid and image name, the replica's own image id), so
/// that a PersistentVolume restored here finds its image. Best effort: a
/// failure is logged and never stops the data sync.
fn ensure_csi_journal(peer_io: &IoCtx, local_io: &IoCtx, job: &Job, replica_id: &str) {
    let uuid = job
        .primary
        .volume_id
        .as_deref()
        .and_then(|v| crate::csi::handle::VolumeHandle::parse(v).ok())
        .map(|h| h.uuid().to_owned())
        .or_else(|| crate::omap::uuid_from_image_name(&job.primary.image_name).map(str::to_owned));
    let Some(uuid) = uuid else { return };
    match crate::omap::replicate_entry(peer_io, local_io, &uuid, replica_id) {
        Ok(o) => tracing::info!(outcome = %o, uuid, "ceph-csi journal entry of the replica"),
        Err(crate::omap::OmapError::PrimaryEntryMissing { .. }) => {
            tracing::debug!(uuid, "not a ceph-csi volume: no journal entry to replicate")
        }
        Err(e) => {
            tracing::warn!(error = %e, uuid, "cannot write the ceph-csi journal entry of the replica")
        }
    }
}

/// Copies the delta `from` -> `to` of the primary into the replica, resuming
/// from the record's checkpoint when it is for the same delta.
#[allow(clippy::too_many_arguments)]
fn delta(
    engine: &Engine,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    replica: &Image,
    local_reg: &Registry,
    rec: &mut ImageRecord,
    from: Option<&str>,
    to: &ceph::SnapInfo,
    fresh: bool,
    cancelled: &dyn Fn() -> bool,
    reporter: &Reporter<'_>,
) -> Result<copy::CopyStats> {
    let key = job.key();
    let src = Image::open_by_id_read_only(peer_io, &job.primary.image_id, Some(&to.name))
        .ctx(|| format!("opening primary {key}@{}", to.name))?;
    let size = to.size;
    let rsize = replica.size().ctx(|| format!("replica {key}"))?;
    if rsize != size {
        tracing::info!(from = rsize, to = size, "resizing replica");
        replica
            .resize(size)
            .ctx(|| format!("resizing replica {key}"))?;
    }
    let chunk = engine.cfg.limits.chunk;
    let mut extents = copy::changed_extents(&src, from, size, chunk)?;
    if from.is_none() && !fresh {
        // A full copy over a replica that holds data (an interrupted first
        // sync): whatever the source does not cover must become zero.
        let have = copy::changed_extents(replica, None, size, chunk)?;
        for (s, e) in copy::uncovered(&have, &extents) {
            extents.push(Extent {
                off: s,
                len: e - s,
                data: false,
            });
        }
        extents.sort_by_key(|e| e.off);
    }
    let total: u64 = extents.iter().map(|e| e.len).sum();
    // Resume from a checkpoint of the same delta.
    let resume_at = rec
        .checkpoint
        .as_ref()
        .filter(|c| c.from.as_deref() == from && c.to == to.name)
        .map_or(0, |c| c.offset);
    if resume_at > 0 {
        extents = copy::skip_below(&extents, resume_at);
    }
    let remaining: u64 = extents.iter().map(|e| e.len).sum();
    tracing::info!(
        from = ?from,
        to = %to.name,
        bytes = total,
        remaining,
        resume_at,
        extents = extents.len(),
        "delta started"
    );
    // The cap is the primary's setting (its Enable parameters).
    let throttle = copy::Throttle::new(job.primary.bandwidth_limit.unwrap_or(0));
    let throttles = [&*engine.throttle, &throttle];
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut last_checkpoint = Instant::now();
    let every = engine.cfg.checkpoint_interval;
    let mut ckpt_err = None;
    let mut progress = |done: u64, mark: u64| {
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let done_total = total - remaining + done;
            reporter.put(ReplicaStatus {
                replica_fsid: reporter.fsid.clone(),
                state: ReplayState::Syncing,
                message: String::new(),
                percent: Some(if total == 0 {
                    100.0
                } else {
                    done_total as f64 * 100.0 / total as f64
                }),
                syncing_snap: Some(to.name.clone()),
                last_sync: rec.last_sync.clone(),
                bytes_pending: Some(total.saturating_sub(done_total)),
                bytes_per_sec: Some((done as f64 / secs) as u64),
                updated_at: Utc::now(),
            });
        }
        if last_checkpoint.elapsed() >= every && mark > resume_at {
            last_checkpoint = Instant::now();
            // What the checkpoint claims must be durable first.
            let r = replica
                .flush()
                .ctx(|| format!("flushing replica {key}"))
                .and_then(|()| {
                    rec.checkpoint = Some(Checkpoint {
                        from: from.map(str::to_string),
                        to: to.name.clone(),
                        offset: mark,
                        total,
                    });
                    local_reg.put(rec)
                });
            if let Err(e) = r {
                tracing::warn!(error = %e, "cannot write checkpoint");
                ckpt_err = Some(e);
            }
        }
    };
    let stats = copy::copy_extents(
        &src,
        replica,
        &extents,
        fresh && resume_at == 0,
        engine.cfg.limits,
        &throttles,
        cancelled,
        &mut progress,
    )?;
    if let Some(e) = ckpt_err {
        tracing::debug!(error = %e, "a checkpoint write failed during the delta");
    }
    tracing::info!(
        to = %to.name,
        bytes_read = stats.bytes_read,
        bytes_written = stats.bytes_written,
        bytes_zeroed = stats.bytes_zeroed,
        bytes_skipped = stats.bytes_skipped,
        seconds = started.elapsed().as_secs_f64(),
        "delta complete"
    );
    Ok(stats)
}

/// Keeps the newest `--keep-snapshots` sync snapshots on both sides, never
/// the one the next delta starts from (`keep_always`). Also removes user
/// snapshots from the replica that the primary no longer has. Failures are
/// logged: pruning is retried after every sync.
fn prune(
    engine: &Engine,
    primary: &Image,
    psync: &BTreeMap<u64, ceph::SnapInfo>,
    replica: &Image,
    rall: &[ceph::SnapInfo],
    keep_always: &str,
    key: &str,
) {
    let keep = engine.cfg.keep_snapshots.max(1);
    let doomed = |sync: &BTreeMap<u64, ceph::SnapInfo>| -> Vec<String> {
        let n = sync.len();
        sync.values()
            .take(n.saturating_sub(keep))
            .filter(|s| s.name != keep_always)
            .map(|s| s.name.clone())
            .collect()
    };
    for name in doomed(psync) {
        match primary.snap_remove(&name) {
            Ok(()) => {
                tracing::debug!(image = key, snapshot = %name, "pruned primary sync snapshot")
            }
            Err(e) => {
                tracing::warn!(image = key, snapshot = %name, error = %e, "cannot prune primary snapshot")
            }
        }
    }
    let rsync = sync_snaps(rall);
    let mut gone = doomed(&rsync);
    let pnames: HashSet<String> = primary
        .snap_list()
        .map(|l| l.into_iter().map(|s| s.name).collect())
        .unwrap_or_default();
    if !pnames.is_empty() {
        gone.extend(
            rall.iter()
                .filter(|s| sync_snap_seq(&s.name).is_none() && !pnames.contains(&s.name))
                .map(|s| s.name.clone()),
        );
    }
    for name in gone {
        match replica.snap_remove(&name) {
            Ok(()) => tracing::debug!(image = key, snapshot = %name, "pruned replica snapshot"),
            Err(e) => {
                tracing::warn!(image = key, snapshot = %name, error = %e, "cannot prune replica snapshot")
            }
        }
    }
}

/// Opens the local replica of `job`, creating it if it does not exist.
/// Refuses an existing image that is not a replica of this primary.
fn open_or_create_replica(
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    job: &Job,
    primary: &Image,
    target: &ceph::SnapInfo,
) -> Result<(Image, ImageRecord, bool)> {
    let name = &job.primary.image_name;
    let key = job.key();
    match Image::open(local_io, name) {
        Ok(img) => {
            let id = img.id().ctx(|| format!("replica {key}"))?;
            match local_reg.get(&id)? {
                Some(rec) if rec.role == Role::Primary => Ok((img, rec, false)),
                Some(rec)
                    if rec
                        .primary
                        .as_ref()
                        .is_some_and(|p| p.image_id == job.primary.image_id) =>
                {
                    Ok((img, rec, false))
                }
                Some(_) => Err(EngineError::FailedPrecondition(format!(
                    "{key} on this cluster is a replica of another primary image; not touching it"
                ))),
                None => Err(EngineError::FailedPrecondition(format!(
                    "an image {key} exists on this cluster and is not a replica; not overwriting it"
                ))),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let pf = primary.features().ctx(|| format!("primary {key}"))?;
            let info = primary.stat().ctx(|| format!("primary {key}"))?;
            // Snapshot mode never needs the journal; the exclusive lock is how
            // the replica is protected from other writers.
            let feats = (pf | features::EXCLUSIVE_LOCK) & !features::JOURNALING;
            let stripe = if pf & features::STRIPINGV2 != 0 {
                Some(primary.stripe().ctx(|| format!("primary {key}"))?)
            } else {
                None
            };
            let opts = ceph::CreateOptions {
                features: Some(feats),
                order: Some(info.order as u64),
                stripe,
                data_pool: None,
            };
            ceph::rbd::create(local_io, name, target.size, &opts)
                .ctx(|| format!("creating replica {key}"))?;
            let img = Image::open(local_io, name).ctx(|| format!("opening new replica {key}"))?;
            let id = img.id().ctx(|| format!("replica {key}"))?;
            let rec = ImageRecord {
                version: 1,
                image_name: name.clone(),
                image_id: id,
                role: Role::Secondary,
                mode: job.primary.mode.clone(),
                schedule: job.primary.schedule.clone(),
                volume_id: job.primary.volume_id.clone(),
                enabled_at: Utc::now(),
                primary: Some(PrimaryRef {
                    fsid: job.peer.fsid().to_string(),
                    image_id: job.primary.image_id.clone(),
                }),
                last_sync: None,
                checkpoint: None,
                bandwidth_limit: None,
                demotion_snap: None,
                role_change: None,
            };
            local_reg.put(&rec)?;
            tracing::info!(features = feats, size = target.size, "replica created");
            Ok((img, rec, true))
        }
        Err(e) => Err(e).ctx(|| format!("opening replica {key}")),
    }
}
