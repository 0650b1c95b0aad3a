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
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use csirr_ceph::{self as ceph, Cluster, ErrorKind, Image, IoCtx, features};

use super::copy::{self, Extent};
use super::error::{CephContext, EngineError, Result};
use super::registry::{
    Checkpoint, ImageRecord, Place, PrimaryRef, Registry, ReplayState, ReplicaStatus, Role,
    SyncPoint, namespace_ioctxs, sync_snap_seq, sync_snaps,
};
use super::scheduler::DueCache;
use super::slots::image_key;
use super::wakeup::WatchTarget;
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
    pub(crate) fn labels(&self) -> csirr_metrics::ImageLabels {
        csirr_metrics::ImageLabels::new(&self.pool, &self.namespace, &self.primary.image_name)
    }

    /// The job's pool and namespace on the local cluster.
    pub(crate) fn local_ioctx(&self, local: &Arc<Cluster>) -> Result<Arc<IoCtx>> {
        local.ioctx(&self.pool, &self.namespace).ctx(|| {
            format!(
                "opening {}/{} on the local cluster",
                self.pool, self.namespace
            )
        })
    }

    /// The image's key in the held images and the slots: the same key the
    /// RPCs derive from a resolved volume.
    pub(crate) fn key(&self) -> String {
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
        self.open.lock().get(key).cloned()
    }

    /// Holds `img` (its lock already taken).
    pub fn put(&self, key: &str, img: Image) {
        self.open.lock().insert(key.to_string(), img);
    }

    /// Releases the lock of `key` and forgets it.
    pub fn release(&self, key: &str) {
        let img = self.open.lock().remove(key);
        if let Some(img) = img {
            let _ = img.lock_release();
        }
    }

    /// Releases the images of pool `pool` (its lease was lost: another
    /// replayer takes them over).
    pub fn release_pool(&self, pool: &str) {
        let prefix = format!("{pool}/");
        let gone: Vec<Image> = {
            let mut open = self.open.lock();
            let keys: Vec<String> = open
                .keys()
                .filter(|k| k.starts_with(&prefix))
                .cloned()
                .collect();
            keys.iter().filter_map(|k| open.remove(k)).collect()
        };
        for img in gone {
            let _ = img.lock_release();
        }
    }

    /// Releases everything (shutdown).
    pub fn release_all(&self) {
        let all: Vec<Image> = self.open.lock().drain().map(|(_, i)| i).collect();
        for img in all {
            let _ = img.lock_release();
        }
    }
}

/// Runs the replayer until `cancel`, restarting it with backoff when it
/// dies (a panic, or an unexpected end); readiness ([`Engine::probe`]) is
/// down, with the reason, until it runs again.
pub async fn supervise(engine: Arc<Engine>, cancel: CancellationToken) {
    let (e, c) = (Arc::clone(&engine), cancel.clone());
    super::background::supervise(engine, "replayer", cancel, move || {
        run(Arc::clone(&e), c.clone())
    })
    .await;
}

/// The replayer: discovery, syncs and the local scheduler pass, until
/// `cancel`. Use [`supervise`] to run it.
pub async fn run(engine: Arc<Engine>, cancel: CancellationToken) {
    // Tests: `replayer::start=panic` kills the replayer task at its start.
    fail::fail_point!("replayer::start");
    let mut work = Work::new(&engine);
    let mut pool_mode_scanned: Option<Instant> = None;
    let mut leased: HashSet<(String, String)> = HashSet::new();
    let due = Arc::new(DueCache::default());
    // Volume groups (group_repl.rs): a loop of their own.
    let groups = tokio::spawn(super::group_repl::run(Arc::clone(&engine), cancel.clone()));
    let renewer = spawn_lease_renewer(&engine, &cancel);
    loop {
        let e = Arc::clone(&engine);
        let pass = Instant::now();
        let discovered = tokio::task::spawn_blocking(move || e.discover()).await;
        match discovered {
            Ok(Ok((jobs, pools))) => {
                tracing::debug!(
                    seconds = pass.elapsed().as_secs_f64(),
                    jobs = jobs.len(),
                    "discovery pass"
                );
                leased = pools;
                for job in jobs {
                    work.start(&engine, job);
                }
            }
            Ok(Err(err)) => {
                engine.note_error(&err);
                tracing::warn!(error = %err, "replayer discovery failed");
            }
            Err(err) => tracing::error!(error = %err, "replayer discovery panicked"),
        }
        scheduler_pass(&engine, &leased, &due).await;
        // Pool mode: the new images of pools in pool mode are enabled, once
        // per poll interval (the loop also turns at every notification; the
        // scan lists namespaces and images).
        if pool_mode_scanned.is_none_or(|t| t.elapsed() >= engine.cfg.poll_interval) {
            pool_mode_scanned = Some(Instant::now());
            engine
                .pool_mode_pass(leased.iter().map(|(p, _)| p.clone()).collect())
                .await;
        }
        work.reap();
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(engine.cfg.poll_interval) => {}
            () = engine.wakeups.wait() => {
                tracing::trace!("woken by a notification");
            }
        }
    }
    work.stop().await;
    engine.background.drain(Duration::from_secs(30)).await;
    let _ = renewer.await;
    let _ = groups.await;
    let e = Arc::clone(&engine);
    let _ = tokio::task::spawn_blocking(move || {
        e.wakeups.clear();
        e.held.release_all();
        e.release_leases(&leased);
    })
    .await;
}

/// Renews the pool leases this process holds, every quarter of their
/// time to live, until `cancel`.
fn spawn_lease_renewer(
    engine: &Arc<Engine>,
    cancel: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (engine, cancel) = (Arc::clone(engine), cancel.clone());
    tokio::spawn(async move {
        let period = engine.lease_ttl() / 4;
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
            let e = Arc::clone(&engine);
            if let Err(err) = tokio::task::spawn_blocking(move || e.renew_leases()).await {
                tracing::error!(error = %err, "lease renewal panicked");
            }
        }
    })
}

/// Sync snapshots of this cluster's primaries on their schedule, and
/// demoted images locked: the scheduler's part of a replayer pass.
async fn scheduler_pass(engine: &Arc<Engine>, leased: &Leases, due: &Arc<DueCache>) {
    let (e, l, c) = (Arc::clone(engine), leased.clone(), Arc::clone(due));
    match tokio::task::spawn_blocking(move || e.local_pass(&l, &c)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::debug!(snapshots = n, "scheduled sync snapshots taken"),
        Ok(Err(err)) => {
            engine.note_error(&err);
            tracing::warn!(error = %err, "scheduler pass failed");
        }
        Err(err) => tracing::error!(error = %err, "scheduler pass panicked"),
    }
}

/// The replayer's running work: one sync task per image with something to
/// copy (at most `--max-concurrent-syncs` moving data at once), and one
/// long-lived replay loop per journal-mode image, kept apart from the
/// syncs so that a round of syncs still ends.
struct Work {
    sem: Arc<Semaphore>,
    /// Keys of the images with a task running: one task per image.
    running: Arc<Mutex<HashSet<String>>>,
    /// Set at shutdown: running syncs stop between submissions.
    stop: Arc<AtomicBool>,
    syncs: tokio::task::JoinSet<()>,
    journals: tokio::task::JoinSet<()>,
}

impl Work {
    fn new(engine: &Engine) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(engine.cfg.max_concurrent_syncs.max(1))),
            running: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            syncs: tokio::task::JoinSet::new(),
            journals: tokio::task::JoinSet::new(),
        }
    }

    /// Starts the task of `job` unless one runs for its image already.
    fn start(&mut self, engine: &Arc<Engine>, job: Job) {
        let key = job.key();
        if !self.running.lock().insert(key.clone()) {
            return;
        }
        if job.primary.mode == super::journal_mode::MODE {
            self.start_journal(engine, job, key);
        } else {
            self.start_sync(engine, job, key);
        }
    }

    /// A long-lived replay loop for a journal-mode image, outside the sync
    /// slots; a failure is reported to the primary and the next discovery
    /// pass starts it again.
    fn start_journal(&mut self, engine: &Arc<Engine>, job: Job, key: String) {
        let (e, run, stop) = (
            Arc::clone(engine),
            Arc::clone(&self.running),
            Arc::clone(&self.stop),
        );
        self.journals.spawn(async move {
            let span = tracing::info_span!("journal", image = %key);
            let e2 = Arc::clone(&e);
            let res = tokio::task::spawn_blocking(move || {
                let _e = span.enter();
                let r = super::journal_mode::run_journal_image(&e2, &job, &stop);
                if let Err(err) = &r {
                    e2.held.release(&job.key());
                    super::journal_mode::report_failure(&e2, &job, err);
                }
                r
            })
            .await;
            match res {
                Ok(Ok(())) => tracing::info!(image = %key, "journal replay stopped"),
                Ok(Err(err)) => {
                    e.note_error(&err);
                    tracing::warn!(image = %key, error = %err, "journal replay failed")
                }
                Err(err) => {
                    e.held.release(&key);
                    tracing::error!(image = %key, error = %err, "journal replay panicked")
                }
            }
            run.lock().remove(&key);
        });
    }

    /// One sync of a snapshot-mode image, once a sync slot is free.
    fn start_sync(&mut self, engine: &Arc<Engine>, job: Job, key: String) {
        let (e, sem, run, stop) = (
            Arc::clone(engine),
            Arc::clone(&self.sem),
            Arc::clone(&self.running),
            Arc::clone(&self.stop),
        );
        self.syncs.spawn(async move {
            let mut progressed = false;
            if let Ok(permit) = sem.acquire_owned().await {
                let span = tracing::info_span!("sync", image = %key);
                let e2 = Arc::clone(&e);
                let res = tokio::task::spawn_blocking(move || {
                    let _e = span.enter();
                    let mut permit = Some(permit);
                    let r = sync_image(&e2, &job, &stop, &mut permit);
                    // What the sync freed (its primary's handle, librados'
                    // reply buffers) sits in the arenas' holes until
                    // trimmed: return it now, not when the round is over.
                    ceph::alloc::release_free_memory();
                    r
                })
                .await;
                match res {
                    Ok(Ok(done)) => progressed = done,
                    Ok(Err(err)) => {
                        e.note_error(&err);
                        tracing::warn!(image = %key, error = %err, "sync failed")
                    }
                    Err(err) => {
                        tracing::error!(image = %key, error = %err, "sync task panicked")
                    }
                }
            }
            run.lock().remove(&key);
            // A sync point may have been taken while this one was copied;
            // its notification found the image busy.
            if progressed {
                e.wakeups.wake();
            }
        });
    }

    /// Collects the tasks that ended.
    fn reap(&mut self) {
        while self.syncs.try_join_next().is_some() {}
        while self.journals.try_join_next().is_some() {}
    }

    /// Stops the running work and waits for it (shutdown).
    async fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            running = self.syncs.len() + self.journals.len(),
            "replayer stopping; waiting for syncs to stop"
        );
        while self.syncs.join_next().await.is_some() {}
        while self.journals.join_next().await.is_some() {}
    }
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
        let mut watch = Vec::new();
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
            if !self.renew_lease(&io) {
                continue;
            }
            leased.insert((pool.clone(), String::new()));
            for peer in peers {
                match self.peer_jobs(&io, &pool, &peer, &mut watch) {
                    Ok(mut j) => jobs.append(&mut j),
                    Err(e) => {
                        tracing::warn!(pool = %pool, peer = %peer.site_name, error = %e, "cannot read peer")
                    }
                }
            }
        }
        self.wakeups.watch_only(watch);
        Ok((jobs, leased))
    }

    /// How long a replayer lease lasts unless renewed.
    fn lease_ttl(&self) -> Duration {
        self.cfg.poll_interval * 6 + Duration::from_secs(10)
    }

    /// Takes or renews the lease on the pool of `io` (its default
    /// namespace); whether this process holds it now. A lease another
    /// replayer took releases this process' images of the pool. Errors are
    /// per pool: the lease counts until it runs out. Blocking.
    fn renew_lease(&self, io: &Arc<IoCtx>) -> bool {
        let pool = io.pool();
        let asked = Instant::now();
        match Registry::new(Arc::clone(io)).acquire_lease(&self.cookie, self.lease_ttl()) {
            Ok(true) => {
                self.leases.renewed(pool, asked, self.lease_ttl());
                true
            }
            Ok(false) => {
                if self.leases.lost(pool) {
                    tracing::warn!(
                        pool,
                        "another replayer took the lease; letting its images go"
                    );
                    self.held.release_pool(pool);
                } else {
                    tracing::debug!(pool, "another replayer holds the lease");
                }
                false
            }
            Err(e) => {
                self.note_error(&e);
                let ok = self.leases.ok(pool);
                tracing::warn!(pool, error = %e, still_valid = ok, "cannot renew the replayer lease");
                if !ok && self.leases.lost(pool) {
                    self.held.release_pool(pool);
                }
                ok
            }
        }
    }

    /// Renews the lease of every pool this process holds, on its own timer
    /// (a pass may take longer than a lease). Blocking.
    fn renew_leases(&self) {
        let Ok(local) = self.local() else {
            for pool in self.leases.pools() {
                if !self.leases.ok(&pool) && self.leases.lost(&pool) {
                    self.held.release_pool(&pool);
                }
            }
            return;
        };
        for pool in self.leases.pools() {
            match local.ioctx(&pool, "") {
                Ok(io) => {
                    self.renew_lease(&io);
                }
                Err(e) => {
                    tracing::warn!(pool = %pool, error = %e, "cannot open pool to renew its lease")
                }
            }
        }
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

    /// Moves the replicas of the peer's `tombstones` (replication disabled
    /// there) to the trash; a tombstone whose replica went and whose record
    /// is gone from the peer's `records` is cleared. Failures are logged
    /// and retried on the next pass.
    fn bury_all(
        &self,
        lio: &Arc<IoCtx>,
        preg: &Registry,
        records: &[ImageRecord],
        tombstones: &[super::registry::Tombstone],
    ) {
        for t in tombstones {
            match self.bury(lio, t) {
                Ok(true) if !records.iter().any(|r| r.image_id == t.image_id) => {
                    if let Err(e) = preg.remove_tombstone(&t.image_id) {
                        tracing::warn!(error = %e, "cannot clear tombstone");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(image = %t.image_name, error = %e, "cannot trash replica")
                }
            }
        }
    }

    /// The jobs of the primaries in pool `pool` of mirror peer `peer`; adds
    /// the objects whose notifications should wake the replayer to `watch`.
    fn peer_jobs(
        &self,
        io: &IoCtx,
        pool: &str,
        peer: &ceph::MirrorPeer,
        watch: &mut Vec<WatchTarget>,
    ) -> Result<Vec<Job>> {
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
            watch.push(WatchTarget::registry(&nio));
            let preg = Registry::new(Arc::clone(&nio));
            let Ok(lio) = local.ioctx(pool, &ns) else {
                continue;
            };
            // Replicas of primaries whose replication was disabled go to
            // the trash. The primary's record may still be listed while its
            // side finishes disabling: no job for it (that would create the
            // replica again), and the tombstone stays until the record is
            // gone.
            let records = preg.list()?;
            let tombstones = preg.tombstones()?;
            self.bury_all(&lio, &preg, &records, &tombstones);
            let detached: HashSet<String> = Registry::new(Arc::clone(&lio))
                .detached()?
                .into_iter()
                .map(|t| t.image_id)
                .collect();
            for rec in records {
                if tombstones.iter().any(|t| t.image_id == rec.image_id) {
                    continue;
                }
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
    /// (primaries), bounds the journals of journal-mode primaries, and locks
    /// demoted images this process does not hold yet
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
                self.bound_primary_journals(&nio, &records, cache);
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
            // librbd itself refuses every writer of a journal-mode image
            // demoted in its journal (its lock included).
            if rec.role != Role::Demoted || rec.mode == super::journal_mode::MODE {
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

    /// Gives up what this process holds through the local connection `old`
    /// and drops it, because that connection can no longer lock replicas.
    /// Its syncs stop first (the leases are forgotten here), then the replica
    /// locks and the pool leases are released through `old`, so that the
    /// next pass takes them at once through a new connection instead of
    /// waiting for the old leases to expire.
    fn reconnect_local(&self, old: &Arc<Cluster>) {
        let pools = self.leases.pools();
        self.leases.clear();
        self.held.release_all();
        for pool in pools {
            if let Ok(io) = old.ioctx(&pool, "") {
                Registry::new(io).release_lease(&self.cookie);
            }
        }
        self.conns.forget(old);
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

/// Takes the replica's exclusive lock. Fail point `replayer::lock_replica`
/// (tests) answers as librbd did after an OSD stall: EINVAL.
pub(crate) fn lock_replica(img: &Image) -> ceph::Result<()> {
    fail::fail_point!("replayer::lock_replica", |_| Err(
        ceph::Error::invalid_input("rbd_lock_acquire", img.spec())
    ));
    img.lock_acquire(ceph::LockMode::Exclusive)
}

fn snap_time(img: &Image, id: u64) -> DateTime<Utc> {
    img.snap_timestamp(id)
        .ok()
        .and_then(|s| Utc.timestamp_opt(s, 0).single())
        .unwrap_or_else(Utc::now)
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
            entries_pending: None,
            entries_per_sec: None,
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
/// Returns whether it completed a sync point. `permit`, the slot among the
/// syncs that move data at once, is released as soon as the data is copied
/// (snapshotting and pruning the replica need none). Blocking.
pub fn sync_image(
    engine: &Engine,
    job: &Job,
    stop: &AtomicBool,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> Result<bool> {
    let key = job.key();
    // A role change on this image is running: skip this round.
    let slot = engine.slots.get(&key);
    let Some(_guard) = slot.try_enter() else {
        return Ok(false);
    };
    // A lost lease stops the copy: another replayer owns the image now.
    let cancelled = || {
        stop.load(std::sync::atomic::Ordering::Relaxed)
            || slot.cancelled()
            || !engine.leases.ok(&job.pool)
    };
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
    let result = sync_inner(engine, &local, job, &peer_io, &cancelled, &reporter, permit);
    if let Err(e @ EngineError::Conflict(_)) = &result {
        // Another replayer (a new lease holder) or a role change wrote the
        // replica's record since this sync read it: this sync's view is
        // stale and nothing more of it is written. The next pass re-reads.
        engine.held.release(&key);
        tracing::info!(image = %key, error = %e, "sync stopped: its registry record changed under it");
        return result;
    }
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

/// What a sync found ready to copy: the primary with its newest sync
/// snapshot, and the replica that replays it here.
struct Ready {
    /// The sync's read-only handle of the primary.
    primary: Image,
    /// The primary's snapshots.
    pall: Vec<ceph::SnapInfo>,
    /// The primary's newest sync snapshot: where this sync copies to.
    target: ceph::SnapInfo,
    replica: Image,
    /// The replica's snapshots.
    rall: Vec<ceph::SnapInfo>,
    /// The replica's registry record.
    rec: ImageRecord,
    /// Whether this sync created the replica.
    fresh: bool,
}

/// The steps of a sync before any data moves: the primary's target, the
/// replica (created if needed, ours, replaying here), a migrated primary
/// followed, a pending replica snapshot taken. `None` (reported) when there
/// is nothing to copy now, including when the replica already holds the
/// target (then only the record and the pruning are brought up to date).
fn ready_to_copy(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    reporter: &Reporter<'_>,
) -> Result<Option<Ready>> {
    let key = job.key();
    if paused_by_live_migration(job, local_reg, reporter)? {
        return Ok(None);
    }
    let Some((primary, pall, target)) = primary_and_target(peer_io, job, reporter)? else {
        return Ok(None);
    };
    if let Some(moved) = &job.primary.moved_from {
        follow_moved_primary(engine, local, job, local_io, local_reg, moved)?;
    }
    let link = match replica_link(engine, local, job, local_io, &primary)? {
        ControlFlow::Continue(link) => link,
        ControlFlow::Break(why) => {
            tracing::info!(image = %key, reason = %why, "replica of a clone waits for its parent");
            reporter.report(ReplayState::Starting, why, None);
            return Ok(None);
        }
    };
    // The replica: existing (must be ours), or created now.
    let (replica, mut rec, fresh) = replica_for_sync(
        engine,
        local,
        job,
        peer_io,
        local_io,
        local_reg,
        &primary,
        &target,
        link.as_ref(),
    )?;
    if !replays_here(
        engine, job, peer_io, local_io, local_reg, &mut rec, &replica, &primary, reporter,
    )? {
        return Ok(None);
    }
    follow_live_migrated_primary(job, local_reg, &mut rec)?;
    // A sync point recorded before its snapshot existed (the process
    // stopped in between): take the snapshot before anything looks at or
    // writes the replica.
    settle_pending_snap(&replica, local_reg, &mut rec)?;
    let rall = replica
        .snap_list()
        .ctx(|| format!("listing snapshots of replica {key}"))?;
    if rall.iter().any(|s| s.name == target.name) {
        record_held_target(local_reg, &mut rec, &primary, &target, reporter)?;
        let psync = sync_snaps(&pall);
        let doomed = surplus(engine.cfg.keep_snapshots, &psync, &[&target.name]);
        drop(primary);
        prune_primary(peer_io, &job.primary.image_id, &doomed, &key);
        prune_replica(engine, &pall, &replica, &rall, &target.name, &key);
        return Ok(None);
    }
    Ok(Some(Ready {
        primary,
        pall,
        target,
        replica,
        rall,
        rec,
        fresh,
    }))
}

/// One sync of `job`'s replica to the primary's newest sync snapshot, in
/// named steps; whether a sync point was completed. Blocking.
fn sync_inner(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    cancelled: &dyn Fn() -> bool,
    reporter: &Reporter<'_>,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> Result<bool> {
    let key = job.key();
    let begun = Instant::now();
    let local_io = job.local_ioctx(local)?;
    let local_reg = Registry::new(Arc::clone(&local_io));
    let Some(Ready {
        primary,
        pall,
        target,
        replica,
        rall,
        mut rec,
        fresh,
    }) = ready_to_copy(engine, local, job, peer_io, &local_io, &local_reg, reporter)?
    else {
        return Ok(false);
    };
    let (base, points) = plan_and_prune(engine, peer_io, job, &pall, &rall, &target, begun);
    let sides = Sides {
        engine,
        job,
        primary: &primary,
        replica: &replica,
        local_reg: &local_reg,
        cancelled,
        reporter,
    };
    let started = Instant::now();
    let from = base.as_ref().map(|b| b.name.clone());
    let bytes = copy_points(&sides, &mut rec, from, &points, fresh)?;
    let elapsed = started.elapsed();
    if cancelled() {
        return Err(EngineError::Unavailable(format!(
            "the sync of {key} was stopped (shutdown, a role change, or the pool's lease lost)"
        )));
    }
    complete_sync_point(&sides, &mut rec, &target, bytes, elapsed)?;
    drop(permit.take());
    // Not a client of the primary any longer than needed: an open handle
    // counts as one for "is the volume in use?" checks.
    drop(primary);
    // Tests: `replayer::before_replica_snapshot=sleep(ms)` holds the
    // pending state open between the report and the replica's snapshot.
    fail::fail_point!("replayer::before_replica_snapshot");
    settle_and_prune(
        engine,
        &replica,
        &local_reg,
        &mut rec,
        &pall,
        &target.name,
        &key,
    )?;
    Ok(true)
}

/// The sync points to copy (from the replica's newest sync snapshot the
/// primary still has, `base`, to `target`), and the primary's surplus sync
/// snapshots pruned on a thread of their own (each removal waits for a
/// monitor commit), never the delta's base or target; the primary's
/// scheduler removes what is left before it takes the next one.
fn plan_and_prune(
    engine: &Engine,
    peer_io: &Arc<IoCtx>,
    job: &Job,
    pall: &[ceph::SnapInfo],
    rall: &[ceph::SnapInfo],
    target: &ceph::SnapInfo,
    begun: Instant,
) -> (Option<ceph::SnapInfo>, Vec<ceph::SnapInfo>) {
    let psync = sync_snaps(pall);
    let (base, points) = plan_points(pall, &psync, rall, target);
    tracing::debug!(
        base = ?base.as_ref().map(|b| &b.name),
        target = %target.name,
        seconds = begun.elapsed().as_secs_f64(),
        "sync planned"
    );
    let protect: Vec<&str> = base
        .iter()
        .map(|b| b.name.as_str())
        .chain([target.name.as_str()])
        .collect();
    spawn_prune_primary(
        engine,
        peer_io,
        job,
        surplus(engine.cfg.keep_snapshots, &psync, &protect),
    );
    (base, points)
}

/// The primary of `job`, read-only (a read-write handle would make this
/// process one of its clients; pruning opens one just for that), its
/// snapshots and its newest sync snapshot; `None` (reported) while it has
/// none yet. Blocking.
fn primary_and_target(
    peer_io: &Arc<IoCtx>,
    job: &Job,
    reporter: &Reporter<'_>,
) -> Result<Option<(Image, Vec<ceph::SnapInfo>, ceph::SnapInfo)>> {
    let key = job.key();
    let primary = Image::open_by_id_read_only(peer_io, &job.primary.image_id, None)
        .ctx(|| format!("opening primary {key}"))?;
    let pall = primary
        .snap_list()
        .ctx(|| format!("listing snapshots of primary {key}"))?;
    let Some((_, target)) = sync_snaps(&pall).into_iter().next_back() else {
        reporter.report(
            ReplayState::Starting,
            "waiting for the first sync snapshot".into(),
            None,
        );
        return Ok(None);
    };
    let target = target.clone();
    Ok(Some((primary, pall, target)))
}

/// After a sync point: the replica's snapshot of it (pending until now),
/// then the replica's surplus snapshots removed. Blocking.
fn settle_and_prune(
    engine: &Engine,
    replica: &Image,
    local_reg: &Registry,
    rec: &mut ImageRecord,
    pall: &[ceph::SnapInfo],
    target: &str,
    key: &str,
) -> Result<()> {
    settle_pending_snap(replica, local_reg, rec)?;
    let rall = replica
        .snap_list()
        .ctx(|| format!("listing snapshots of replica {key}"))?;
    prune_replica(engine, pall, replica, &rall, target, key);
    Ok(())
}

/// Whether the primary is being live-migrated on its cluster: then nothing
/// is copied until the migration is committed (the record then names the
/// new image) or aborted, and the replica says so. Blocking.
fn paused_by_live_migration(
    job: &Job,
    local_reg: &Registry,
    reporter: &Reporter<'_>,
) -> Result<bool> {
    let Some(lm) = &job.primary.live_migration else {
        return Ok(false);
    };
    let last = local_reg
        .list()?
        .into_iter()
        .find(|r| r.image_name == job.primary.image_name)
        .and_then(|r| r.last_sync);
    reporter.report(
        ReplayState::Stopped,
        format!(
            "the primary is being live-migrated (rbd migration, state {}, to {}): \
             replication is paused at its last sync point; it follows the new image after \
             `rbd migration commit` (moved the same way when it went to another pool), and goes on as before after \
             `rbd migration abort`",
            lm.state, lm.dest_name
        ),
        last,
    );
    Ok(true)
}

/// The primary was live-migrated on its cluster from `moved` (another
/// pool, namespace or name): the replica, still there on this cluster,
/// moves the same way with `rbd migration prepare|execute|commit` here (its
/// data and sync snapshots come along, nothing crosses the network), and its
/// record with it, so that the next delta starts from the newest sync point
/// both sides have instead of a full copy. Resumes a move that a crash
/// interrupted; does nothing once the replica is here. Blocking.
fn follow_moved_primary(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    moved: &Place,
) -> Result<()> {
    let key = job.key();
    if engine.held.get(&key).is_some() {
        return Ok(());
    }
    let old_io = match local.ioctx(&moved.pool, &moved.namespace) {
        Ok(io) => io,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("opening {}/{} here", moved.pool, moved.namespace)),
    };
    let old_key = image_key(&moved.pool, &moved.namespace, &moved.name);
    let old_reg = Registry::new(Arc::clone(&old_io));
    let from = job.primary.migrated_from.as_deref();
    let Some(old) = old_reg.list()?.into_iter().find(|r| {
        r.image_name == moved.name && r.primary.as_ref().map(|p| p.image_id.as_str()) == from
    }) else {
        // Nothing left there: moved already, or never replicated here.
        return Ok(());
    };
    let name = &job.primary.image_name;
    let Some(_slot) = engine
        .slots
        .get(&old_key)
        .enter_cancelling(Duration::from_secs(5))
    else {
        return Err(EngineError::Unavailable(format!(
            "the replica {old_key} is busy; it moves to {key} at the next sync"
        )));
    };
    let old_there = match Image::open_by_id_read_only(&old_io, &old.image_id, None) {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::NotFound => false,
        Err(e) => return Err(e).ctx(|| format!("opening replica {old_key} by id")),
    };
    if !old_there && !image_exists(local_io, name).ctx(|| format!("looking up {key}"))? {
        tracing::warn!(image = %key, from = %old_key, "the replica to move is gone: a new one is copied");
        old_reg.remove(&old)?;
        return Ok(());
    }
    migrate_replica(
        engine,
        &old_io,
        moved,
        &old.image_id,
        old_there,
        local_io,
        name,
    )?;
    let img = Image::open_read_only(local_io, name, None).ctx(|| format!("opening {key}"))?;
    let id = img.id().ctx(|| key.clone())?;
    drop(img);
    if local_reg.get(&id)?.is_none() {
        let mut rec = old.clone();
        rec.image_id = id;
        rec.image_name = name.clone();
        rec.primary = old.primary.clone().map(|p| PrimaryRef {
            fsid: p.fsid,
            image_id: job.primary.image_id.clone(),
        });
        rec.revision = Default::default();
        local_reg.put(&mut rec)?;
    }
    old_reg.remove(&old)?;
    tracing::info!(image = %key, from = %old_key, "replica moved with its primary");
    Ok(())
}

/// The live-migration of the old replica (image id `old_id`, at `moved`
/// in `old_io`) to `name` in `local_io`, run or finished: prepared when the
/// old replica is still there and nothing is at the new place yet, then
/// executed and committed. Refuses an image at the new place that is
/// neither. Blocking.
fn migrate_replica(
    engine: &Engine,
    old_io: &IoCtx,
    moved: &Place,
    old_id: &str,
    old_there: bool,
    local_io: &IoCtx,
    name: &str,
) -> Result<()> {
    let key = image_key(local_io.pool(), local_io.namespace(), name);
    let old_key = image_key(&moved.pool, &moved.namespace, &moved.name);
    if old_there && !image_exists(local_io, name).ctx(|| format!("looking up {key}"))? {
        tracing::info!(image = %key, from = %old_key, "the primary was live-migrated: moving the replica the same way");
        engine.held.release(&old_key);
        ceph::rbd::migration_prepare(old_io, &moved.name, local_io, name)
            .ctx(|| format!("moving replica {old_key} to {key}"))?;
    }
    match ceph::rbd::migration_status(local_io, name)
        .ctx(|| format!("reading the migration status of {key}"))?
    {
        Some(st) if st.source_id == old_id => {
            if st.state != "executed" {
                ceph::rbd::migration_execute(local_io, name)
                    .ctx(|| format!("copying replica {old_key} to {key}"))?;
            }
            ceph::rbd::migration_commit(local_io, name)
                .ctx(|| format!("committing the move of replica {old_key} to {key}"))?;
        }
        Some(st) => {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} here is in another live-migration (from image id {}); not moving replica \
                 {old_key} there",
                st.source_id
            )));
        }
        None if old_there => {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} exists here and is not the replica {old_key} moved; not touching either"
            )));
        }
        None => {}
    }
    Ok(())
}

/// For a replica still to be created of a clone: the parent snapshot to
/// clone it from when the parent is replicated and its replica holds that
/// snapshot, `None` for a flat copy (or a replica that exists), or why it
/// waits. Blocking.
fn replica_link(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    local_io: &IoCtx,
    primary: &Image,
) -> Result<ControlFlow<String, Option<ParentLink>>> {
    let key = job.key();
    if engine.held.get(&key).is_some()
        || image_exists(local_io, &job.primary.image_name)
            .ctx(|| format!("looking up replica {key}"))?
    {
        return Ok(ControlFlow::Continue(None));
    }
    Ok(match clone_plan(local, job, primary)? {
        ClonePlan::Flat => ControlFlow::Continue(None),
        ClonePlan::Link(l) => ControlFlow::Continue(Some(l)),
        ClonePlan::Wait(why) => ControlFlow::Break(why),
    })
}

/// A replica whose record names another primary image than the peer's:
/// after a committed live-migration of that primary (its sync snapshots
/// came along by name) the record follows the new image; otherwise the
/// replica is not this primary's and is not touched. Blocking.
fn follow_live_migrated_primary(
    job: &Job,
    local_reg: &Registry,
    rec: &mut ImageRecord,
) -> Result<()> {
    let Some(p) = rec
        .primary
        .clone()
        .filter(|p| p.image_id != job.primary.image_id)
    else {
        return Ok(());
    };
    let key = job.key();
    if job.primary.migrated_from.as_deref() != Some(p.image_id.as_str()) {
        return Err(EngineError::FailedPrecondition(format!(
            "{key} here replicates another primary image than the peer's; not touching it"
        )));
    }
    tracing::info!(image = %key, from = %p.image_id, to = %job.primary.image_id, "the primary was live-migrated: the replica follows its new image");
    rec.primary = Some(PrimaryRef {
        fsid: p.fsid,
        image_id: job.primary.image_id.clone(),
    });
    local_reg.put(rec)?;
    Ok(())
}

/// The replica already has the primary's newest sync point (e.g. a demoted
/// image resynced to the peer that replayed its demotion snapshot): records
/// it as this replica's complete sync point and reports it. Blocking.
fn record_held_target(
    local_reg: &Registry,
    rec: &mut ImageRecord,
    primary: &Image,
    target: &ceph::SnapInfo,
    reporter: &Reporter<'_>,
) -> Result<()> {
    if rec
        .last_sync
        .as_ref()
        .is_none_or(|l| l.snap_name != target.name)
    {
        rec.last_sync = Some(SyncPoint {
            snap_name: target.name.clone(),
            snap_time: snap_time(primary, target.id),
            completed_at: Utc::now(),
            duration_ms: 0,
            bytes: 0,
        });
        rec.checkpoint = None;
        local_reg.put(rec)?;
    }
    reporter.report(ReplayState::Idle, String::new(), rec.last_sync.clone());
    Ok(())
}

/// Removes the primary's `doomed` sync snapshots on a background thread.
fn spawn_prune_primary(engine: &Engine, peer_io: &Arc<IoCtx>, job: &Job, doomed: Vec<String>) {
    if doomed.is_empty() {
        return;
    }
    let key = job.key();
    let (io, id, k) = (
        Arc::clone(peer_io),
        job.primary.image_id.clone(),
        key.clone(),
    );
    engine
        .background
        .spawn_blocking("prune-primary", &key, move || {
            prune_primary(&io, &id, &doomed, &k)
        });
}

/// Copies the deltas from `from` through every point in turn (user
/// snapshots on the way, then the target); a user snapshot is taken on the
/// replica before the next delta writes. Returns the bytes transferred.
/// Blocking.
fn copy_points(
    sides: &Sides<'_, '_>,
    rec: &mut ImageRecord,
    mut from: Option<String>,
    points: &[ceph::SnapInfo],
    mut fresh: bool,
) -> Result<u64> {
    let mut bytes = 0u64;
    for (i, point) in points.iter().enumerate() {
        let stats = delta(sides, rec, from.as_deref(), point, fresh)?;
        bytes += stats.transferred();
        // A user snapshot on the way is the next delta's base: it must
        // exist before that delta writes.
        if i + 1 < points.len() {
            sides
                .replica
                .snap_create(&point.name)
                .ctx(|| format!("snapshotting replica {}@{}", sides.job.key(), point.name))?;
        }
        from = Some(point.name.clone());
        fresh = false;
    }
    Ok(bytes)
}

/// The replica's head is the target, flushed by the copy: records the sync
/// point complete (its replica snapshot pending: a monitor commit, up to a
/// second, taken right after and always before the next delta or a
/// promotion touches the replica), counts and reports it. Blocking.
fn complete_sync_point(
    sides: &Sides<'_, '_>,
    rec: &mut ImageRecord,
    target: &ceph::SnapInfo,
    bytes: u64,
    elapsed: Duration,
) -> Result<()> {
    rec.checkpoint = None;
    rec.pending_snap = Some(target.name.clone());
    rec.last_sync = Some(SyncPoint {
        snap_name: target.name.clone(),
        snap_time: snap_time(sides.primary, target.id),
        completed_at: Utc::now(),
        duration_ms: elapsed.as_millis() as u64,
        bytes,
    });
    sides.local_reg.put(rec)?;
    tracing::info!(snapshot = %target.name, bytes, seconds = elapsed.as_secs_f64(), "sync point complete");
    sides
        .engine
        .metrics
        .sync_finished(&sides.job.labels(), bytes, elapsed, true);
    sides
        .reporter
        .report(ReplayState::Idle, String::new(), rec.last_sync.clone());
    Ok(())
}

/// The replica of `job` for a sync: the handle this process holds, or the
/// image opened (or created from the primary's `target`), locked against
/// other writers and held when it is a replica. Returns it with its record
/// and whether it was created empty now.
#[allow(clippy::too_many_arguments)]
fn replica_for_sync(
    engine: &Engine,
    local: &Arc<Cluster>,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    primary: &Image,
    target: &ceph::SnapInfo,
    link: Option<&ParentLink>,
) -> Result<(Image, ImageRecord, bool)> {
    let key = job.key();
    Ok(match engine.held.get(&key) {
        Some(img) => {
            let id = img.id().ctx(|| format!("replica {key}"))?;
            let rec = local_reg.get(&id)?.ok_or_else(|| {
                EngineError::Internal(format!("replica {key} lost its registry record"))
            })?;
            (img, rec, false)
        }
        None => {
            let (img, rec, fresh) =
                open_or_create_replica(local_io, local_reg, job, primary, target, link)?;
            if rec.role == Role::Secondary {
                let locked = lock_replica(&img);
                if let Err(e) = locked {
                    // The replica was created with exclusive-lock, so EINVAL
                    // means this connection's image state is broken (seen
                    // after an OSD hang timed out the close of the previous
                    // handle); only a new client recovers, as a restart did.
                    if e.kind() == ceph::ErrorKind::InvalidInput {
                        tracing::warn!(
                            image = %key,
                            error = %e,
                            "cannot lock the replica through this connection; reconnecting"
                        );
                        engine.reconnect_local(local);
                    }
                    return Err(e).ctx(|| format!("locking replica {key} against other writers"));
                }
                engine.held.put(&key, img.clone());
                ensure_csi_journal(peer_io, local_io, job, &rec.image_id);
            }
            (img, rec, fresh)
        }
    })
}

/// Whether the sync goes on given this side's role (`rec`) and the
/// primary's: a replica does; a demoted image whose peer promoted after an
/// orderly switch becomes a replica again first; anything else is reported
/// and nothing is copied (`false`), or is a split brain (an error).
#[allow(clippy::too_many_arguments)]
fn replays_here(
    engine: &Engine,
    job: &Job,
    peer_io: &Arc<IoCtx>,
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    rec: &mut ImageRecord,
    replica: &Image,
    primary: &Image,
    reporter: &Reporter<'_>,
) -> Result<bool> {
    let key = job.key();
    match rec.role {
        Role::Secondary => Ok(true),
        // Demoted here while the peer is primary: after an orderly switch
        // (the peer promoted once it held this side's demotion snapshot, and
        // nothing was written here since), this side is a replica again by
        // itself, as rbd-mirror resumes. Anything else is a split brain that
        // only ResyncVolume with force may settle.
        Role::Demoted if job.primary.role == Role::Primary => {
            let div = engine.divergence(replica, primary, &key)?;
            if div.diverged() {
                reporter.report(
                    ReplayState::Stopped,
                    format!(
                        "{key} is demoted on the replica's site and diverged from this primary \
                     (newest common sync point: {}); it waits for ResyncVolume with force",
                        div.common.as_deref().unwrap_or("none")
                    ),
                    None,
                );
                return Ok(false);
            }
            let primary_ref = PrimaryRef {
                fsid: job.peer.fsid().to_string(),
                image_id: job.primary.image_id.clone(),
            };
            engine.adopt_as_replica(local_reg, rec, replica, &key, primary_ref, &div)?;
            ensure_csi_journal(peer_io, local_io, job, &rec.image_id);
            Ok(true)
        }
        Role::Demoted => {
            reporter.report(
                ReplayState::Stopped,
                format!("{key} is demoted on both sites; waiting for one to be promoted"),
                None,
            );
            Ok(false)
        }
        Role::Primary if job.primary.role == Role::Primary => {
            Err(EngineError::FailedPrecondition(format!(
                "split-brain: {key} is primary on both sites; nothing is copied or \
             overwritten. Decide which site keeps its data, demote the other one and \
             resync it (ResyncVolume with force)"
            )))
        }
        // The peer is demoted and this side primary: a finished relocation,
        // nothing to replay.
        Role::Primary => Ok(false),
    }
}

/// The delta's base (the newest sync snapshot both sides have) and the
/// points to reach from it in order: the user snapshots taken on the
/// primary between the base and `target` that the replica (`rall`) lacks
/// (it gets them too), then `target`.
fn plan_points(
    pall: &[ceph::SnapInfo],
    psync: &BTreeMap<u64, ceph::SnapInfo>,
    rall: &[ceph::SnapInfo],
    target: &ceph::SnapInfo,
) -> (Option<ceph::SnapInfo>, Vec<ceph::SnapInfo>) {
    let rnames: HashSet<&str> = rall.iter().map(|s| s.name.as_str()).collect();
    let base = sync_snaps(rall)
        .into_values()
        .rev()
        .find_map(|r| psync.values().find(|p| p.name == r.name).cloned());
    let base_id = base.as_ref().map_or(0, |b| b.id);
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
    (base, points)
}

/// Takes the replica's snapshot of a sync point recorded complete before
/// its snapshot existed (`pending_snap`), then clears the mark. The head
/// still holds exactly that sync point: nothing writes a replica between
/// recording it and this. Blocking.
pub(crate) fn settle_pending_snap(
    replica: &Image,
    reg: &Registry,
    rec: &mut ImageRecord,
) -> Result<()> {
    let Some(name) = rec.pending_snap.clone() else {
        return Ok(());
    };
    match replica.snap_create(&name) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).ctx(|| format!("snapshotting replica {}@{name}", replica.spec())),
    }
    rec.pending_snap = None;
    reg.put(rec)
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
        .and_then(|v| csirr_csi::handle::VolumeHandle::parse(v).ok())
        .map(|h| h.uuid().to_owned())
        .or_else(|| csirr_omap::uuid_from_image_name(&job.primary.image_name).map(str::to_owned));
    let Some(uuid) = uuid else { return };
    match csirr_omap::replicate_entry(peer_io, local_io, &uuid, replica_id) {
        Ok(o) => tracing::info!(outcome = %o, uuid, "ceph-csi journal entry of the replica"),
        Err(csirr_omap::OmapError::PrimaryEntryMissing { .. }) => {
            tracing::debug!(uuid, "not a ceph-csi volume: no journal entry to replicate")
        }
        Err(e) => {
            tracing::warn!(error = %e, uuid, "cannot write the ceph-csi journal entry of the replica")
        }
    }
}

/// What every delta of one sync works on.
#[derive(Clone, Copy)]
struct Sides<'a, 'r> {
    engine: &'a Engine,
    job: &'a Job,
    /// The sync's read-only handle of the primary.
    primary: &'a Image,
    replica: &'a Image,
    /// The replica's registry.
    local_reg: &'a Registry,
    cancelled: &'a dyn Fn() -> bool,
    reporter: &'a Reporter<'r>,
}

/// Copies the delta `from` -> `to` of the primary into the replica, resuming
/// from the record's checkpoint when it is for the same delta. The
/// primary's handle is set to snapshot `to`.
fn delta(
    sides: &Sides<'_, '_>,
    rec: &mut ImageRecord,
    from: Option<&str>,
    to: &ceph::SnapInfo,
    fresh: bool,
) -> Result<copy::CopyStats> {
    let Sides {
        engine,
        job,
        primary,
        replica,
        ..
    } = *sides;
    let key = job.key();
    let plan = DeltaPlan::new(sides, rec, from, to, fresh)?;
    plan.log_start(from, to);
    // The cap is the primary's setting (its Enable parameters).
    let throttle = copy::Throttle::new(job.primary.bandwidth_limit.unwrap_or(0));
    let throttles = [&*engine.throttle, &throttle];
    let started = Instant::now();
    // A checkpoint refused because the record changed under this sync
    // (another replayer took over) stops the copy at once.
    let lost_record = AtomicBool::new(false);
    let stopped = || (sides.cancelled)() || lost_record.load(std::sync::atomic::Ordering::Relaxed);
    let mut watch = DeltaProgress {
        sides,
        rec,
        from,
        to,
        total: plan.total,
        remaining: plan.remaining,
        resume_at: plan.resume_at,
        started,
        last_report: started,
        last_checkpoint: started,
        ckpt_err: None,
        lost_record: &lost_record,
    };
    let stats = copy::copy_extents(
        copy::Source {
            image: primary,
            objects: plan.objects.as_ref(),
            sparse: plan.sparse,
        },
        copy::Dest {
            image: replica,
            objects: plan.dst_objects.as_ref(),
        },
        &plan.extents,
        // A clone is not empty: its parent shows through where zeroes are
        // skipped.
        fresh && plan.resume_at == 0 && !plan.linked,
        engine.cfg.limits,
        Some(&engine.budget),
        &throttles,
        &stopped,
        &mut |done, mark| watch.tick(done, mark),
    );
    let stats = delta_outcome(stats, watch.ckpt_err.take())?;
    if plan.dst_objects.is_some() {
        reload_object_map(replica).ctx(|| format!("replica {key}"))?;
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

/// A delta's outcome from the copy's and the failed checkpoint write's
/// (`ckpt_err`), if any: a record changed under the sync (`Conflict`)
/// stopped the copy and is the reason; another checkpoint failure is only
/// logged (the next checkpoint or the sync point records the progress).
fn delta_outcome(
    stats: Result<copy::CopyStats>,
    ckpt_err: Option<EngineError>,
) -> Result<copy::CopyStats> {
    match ckpt_err {
        Some(e @ EngineError::Conflict(_)) => Err(e),
        Some(e) => {
            tracing::debug!(error = %e, "a checkpoint write failed during the delta");
            stats
        }
        None => stats,
    }
}

/// What one delta copies and how: its extents (past a checkpoint of the
/// same delta), and the data objects read and written directly when the
/// layouts allow.
struct DeltaPlan {
    /// The primary's data objects at the target snapshot.
    objects: Option<ceph::DataObjects>,
    /// The replica's data objects, written directly.
    dst_objects: Option<ceph::DataObjects>,
    extents: Vec<copy::Extent>,
    /// Bytes of the whole delta.
    total: u64,
    /// Bytes left past the checkpoint.
    remaining: u64,
    resume_at: u64,
    /// A first sync: objects read sparsely.
    sparse: bool,
    /// The replica is a clone of the parent's replica.
    linked: bool,
}

impl DeltaPlan {
    /// Logs what the delta `from` -> `to` is about to copy, and how.
    fn log_start(&self, from: Option<&str>, to: &ceph::SnapInfo) {
        tracing::info!(
            from = ?from,
            to = %to.name,
            bytes = self.total,
            remaining = self.remaining,
            resume_at = self.resume_at,
            extents = self.extents.len(),
            direct = self.objects.is_some(),
            sparse = self.sparse,
            direct_writes = self.dst_objects.is_some(),
            linked = self.linked,
            "delta started"
        );
    }

    /// Sets the primary's handle to `to`, sizes the replica like it and
    /// plans the copy. Blocking.
    fn new(
        sides: &Sides<'_, '_>,
        rec: &ImageRecord,
        from: Option<&str>,
        to: &ceph::SnapInfo,
        fresh: bool,
    ) -> Result<Self> {
        let Sides {
            engine,
            job,
            primary,
            replica,
            ..
        } = *sides;
        let key = job.key();
        // The handle that listed the snapshots, not a second open of the image.
        primary
            .snap_set(Some(&to.name))
            .ctx(|| format!("reading primary {key}@{}", to.name))?;
        let size = to.size;
        let rsize = replica.size().ctx(|| format!("replica {key}"))?;
        if rsize != size {
            tracing::info!(from = rsize, to = size, "resizing replica");
            replica
                .resize(size)
                .ctx(|| format!("resizing replica {key}"))?;
        }
        // A delta's extents are exactly what was written: read them from the
        // primary's data objects, an object's extents in one operation. A
        // first sync lists whole objects, mostly holes on a thin volume: it
        // reads each sparsely, so that only the allocated data comes over.
        let objects = ceph::DataObjects::open(primary, to.id).unwrap_or_else(|e| {
            tracing::debug!(error = %e, "reading through librbd");
            None
        });
        // Extents inside one object each, so that they can be read directly.
        let chunk = match &objects {
            Some(o) => engine.cfg.limits.chunk.min(o.object_size()),
            None => engine.cfg.limits.chunk,
        };
        // A replica that is a clone of the parent's replica (which holds the
        // parent snapshot's data): a first sync copies the primary's own
        // objects only.
        let linked =
            from.is_none() && replica.parent_overlap().ctx(|| format!("replica {key}"))? > 0;
        let mut extents =
            delta_extents(sides, from, size, chunk, objects.is_some(), fresh, linked)?;
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
        // The replica's objects are written directly too, an object's
        // extents in one operation, once they are marked in its object map.
        let dst_objects = match &objects {
            Some(o) => direct_replica(replica, &extents, o.object_size())
                .ctx(|| format!("replica {key}"))?,
            None => None,
        };
        Ok(Self {
            objects,
            dst_objects,
            extents,
            total,
            remaining,
            resume_at,
            sparse: from.is_none(),
            linked,
        })
    }
}

/// The extents a delta `from` -> the primary's snapshot set copies, in
/// `chunk`s inside one object each: what changed; for a first sync of a
/// replica that is a clone (`linked`), the primary's own objects plus zero
/// where the primary no longer reads from its parent; for a first sync
/// over a replica that holds data (an interrupted one, not `fresh`), zero
/// wherever the source has nothing. Blocking.
fn delta_extents(
    sides: &Sides<'_, '_>,
    from: Option<&str>,
    size: u64,
    chunk: u64,
    direct: bool,
    fresh: bool,
    linked: bool,
) -> Result<Vec<Extent>> {
    let (primary, replica) = (sides.primary, sides.replica);
    // A first sync of an image read directly (no parent data at the
    // snapshot) lists whole objects: from the object map alone when it is
    // valid, instead of asking every object of the image (13 s for a thin
    // 1 TiB image on the dev pair); the sparse reads bring over only their
    // allocated data. A clone's first sync lists the extents a reader sees
    // through to its parent, read through librbd. Both sides have the same
    // pool/name: the error says which one failed.
    let whole = from.is_none() && direct;
    let mut extents = if linked {
        linked_extents(sides, size, chunk)?
    } else {
        copy::changed_extents(primary, from, size, chunk, whole)
            .map_err(|e| on_side(e, "primary"))?
    };
    // (A resumed linked first sync needs nothing more: what the replica
    // holds beyond the primary's own objects is its parent's data, as on
    // the primary.)
    if from.is_none() && !fresh && !linked {
        // A full copy over a replica that holds data (an interrupted first
        // sync): whatever the source does not cover must become zero. The
        // replica is never a clone: whole objects, from its object map.
        let have = copy::changed_extents(replica, None, size, chunk, true)
            .map_err(|e| on_side(e, "replica"))?;
        for (s, e) in copy::uncovered(&have, &extents) {
            extents.push(Extent {
                off: s,
                len: e - s,
                data: false,
            });
        }
        extents.sort_by_key(|e| e.off);
    }
    Ok(extents)
}

/// A linked first sync's extents: the primary's own objects, and zero
/// where the primary no longer reads from its parent but the replica would
/// (a shrink and grow cut the primary's overlap). Blocking.
fn linked_extents(sides: &Sides<'_, '_>, size: u64, chunk: u64) -> Result<Vec<Extent>> {
    let (primary, replica, key) = (sides.primary, sides.replica, sides.job.key());
    let mut own = copy::own_extents(primary, size, chunk).map_err(|e| on_side(e, "primary"))?;
    let pov = primary.parent_overlap().ctx(|| format!("primary {key}"))?;
    let rov = replica.parent_overlap().ctx(|| format!("replica {key}"))?;
    if pov >= rov {
        return Ok(own);
    }
    let gap = [Extent {
        off: pov,
        len: rov - pov,
        data: false,
    }];
    for (mut s, e) in copy::uncovered(&gap, &own.clone()) {
        while s < e {
            let end = ((s / chunk + 1) * chunk).min(e);
            own.push(Extent {
                off: s,
                len: end - s,
                data: false,
            });
            s = end;
        }
    }
    own.sort_by_key(|e| e.off);
    Ok(own)
}

/// A delta's progress while it copies: the percent and rate reported every
/// second, and a checkpoint every `checkpoint_interval` (flushed first, so
/// that what it claims is durable).
struct DeltaProgress<'s, 'a, 'r, 'c> {
    sides: &'s Sides<'a, 'r>,
    rec: &'c mut ImageRecord,
    from: Option<&'c str>,
    to: &'c ceph::SnapInfo,
    total: u64,
    remaining: u64,
    resume_at: u64,
    started: Instant,
    last_report: Instant,
    last_checkpoint: Instant,
    /// A checkpoint that could not be written (a conflict stays the
    /// reason the copy stopped).
    ckpt_err: Option<EngineError>,
    /// Set when a checkpoint was refused because the record changed under
    /// this sync (another replayer took over): the copy stops at once.
    lost_record: &'c AtomicBool,
}

impl DeltaProgress<'_, '_, '_, '_> {
    /// `done` bytes copied, everything below `mark` on the replica.
    fn tick(&mut self, done: u64, mark: u64) {
        if self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            self.report(done);
        }
        if self.last_checkpoint.elapsed() >= self.sides.engine.cfg.checkpoint_interval
            && mark > self.resume_at
        {
            self.last_checkpoint = Instant::now();
            self.checkpoint(mark);
        }
    }

    fn report(&self, done: u64) {
        let reporter = self.sides.reporter;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let done_total = self.total - self.remaining + done;
        reporter.put(ReplicaStatus {
            replica_fsid: reporter.fsid.clone(),
            state: ReplayState::Syncing,
            message: String::new(),
            percent: Some(if self.total == 0 {
                100.0
            } else {
                done_total as f64 * 100.0 / self.total as f64
            }),
            syncing_snap: Some(self.to.name.clone()),
            last_sync: self.rec.last_sync.clone(),
            bytes_pending: Some(self.total.saturating_sub(done_total)),
            bytes_per_sec: Some((done as f64 / secs) as u64),
            entries_pending: None,
            entries_per_sec: None,
            updated_at: Utc::now(),
        });
    }

    fn checkpoint(&mut self, mark: u64) {
        let key = self.sides.job.key();
        // What the checkpoint claims must be durable first.
        let r = self
            .sides
            .replica
            .flush()
            .ctx(|| format!("flushing replica {key}"))
            .and_then(|()| {
                self.rec.checkpoint = Some(Checkpoint {
                    from: self.from.map(str::to_string),
                    to: self.to.name.clone(),
                    offset: mark,
                    total: self.total,
                });
                self.sides.local_reg.put(self.rec)
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot write checkpoint");
            if matches!(e, EngineError::Conflict(_)) {
                self.lost_record
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
            // A conflict stays the reason the copy stopped.
            if !matches!(self.ckpt_err, Some(EngineError::Conflict(_))) {
                self.ckpt_err = Some(e);
            }
        }
    }
}

/// `e` naming the side (primary or replica) of an image whose pool and
/// name are the same on both clusters.
fn on_side(e: EngineError, side: &str) -> EngineError {
    match e {
        EngineError::Ceph { context, source } => EngineError::Ceph {
            context: format!("{context} (the {side})"),
            source,
        },
        other => other,
    }
}

/// The replica's data objects for direct writes (with its snapshot context:
/// no snapshot of the replica may be taken until the copy is done), with
/// the objects that `extents` touch marked in its object map; `None` when
/// there is no data to write, for another object size, or a layout only
/// librbd writes. Blocking.
fn direct_replica(
    replica: &Image,
    extents: &[Extent],
    obj: u64,
) -> ceph::Result<Option<ceph::DataObjects>> {
    // Nothing to write (an unchanged sync point, discards only): librbd
    // needs no reload afterwards. A journal would miss the writes that
    // bypass librbd.
    let runs = object_runs(extents, obj);
    if runs.is_empty() || replica.features()? & ceph::features::JOURNALING != 0 {
        return Ok(None);
    }
    let Some(objects) = ceph::DataObjects::open_head(replica)? else {
        return Ok(None);
    };
    if objects.object_size() != obj {
        return Ok(None);
    }
    ceph::objects::mark_objects_exist(replica, &runs)?;
    Ok(Some(objects))
}

/// The runs `start..end` of objects of `obj` bytes that the data extents
/// touch.
fn object_runs(extents: &[Extent], obj: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| e.data && e.len > 0) {
        let (first, end) = (e.off / obj, (e.off + e.len - 1) / obj + 1);
        match runs.last_mut() {
            Some(r) if first <= r.1 => r.1 = r.1.max(end),
            _ => runs.push((first, end)),
        }
    }
    runs
}

/// Makes librbd reload the replica's object map from disk after direct
/// writes: its copy in memory does not know the objects written, and a
/// later discard would skip them. Re-acquiring the exclusive lock loads the
/// map afresh. Blocking.
fn reload_object_map(replica: &Image) -> ceph::Result<()> {
    if replica.features()? & ceph::features::OBJECT_MAP == 0 {
        return Ok(());
    }
    replica.lock_release()?;
    replica.lock_acquire(ceph::LockMode::Exclusive)
}

/// The sync snapshots of `sync` beyond the newest `keep`, except those in
/// `keep_always`, oldest first.
pub(crate) fn surplus(
    keep: usize,
    sync: &BTreeMap<u64, ceph::SnapInfo>,
    keep_always: &[&str],
) -> Vec<String> {
    sync.values()
        .take(sync.len().saturating_sub(keep.max(1)))
        .filter(|s| !keep_always.contains(&s.name.as_str()))
        .map(|s| s.name.clone())
        .collect()
}

/// Removes the sync snapshots `doomed` of the primary with id `image_id` in
/// `io`, through a read-write handle opened for just that (the replayer
/// reads the primary through read-only ones, which are not clients of it).
fn prune_primary(io: &Arc<IoCtx>, image_id: &str, doomed: &[String], key: &str) {
    if doomed.is_empty() {
        return;
    }
    match Image::open_by_id(io, image_id) {
        Ok(img) => remove_snaps(&img, doomed, key, "primary"),
        Err(e) => tracing::warn!(image = key, error = %e, "cannot open the primary to prune it"),
    }
}

/// Removes the snapshots `names` of `img` (the `side` of image `key`).
/// Failures are logged: pruning is retried after every sync.
pub(crate) fn remove_snaps(img: &Image, names: &[String], key: &str, side: &str) {
    for name in names {
        match img.snap_remove(name) {
            Ok(()) => tracing::debug!(image = key, snapshot = %name, side, "pruned snapshot"),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(image = key, snapshot = %name, side, error = %e, "cannot prune snapshot")
            }
        }
    }
}

/// Keeps the newest `--keep-snapshots` sync snapshots on the replica, never
/// the one the next delta starts from (`keep_always`), and removes user
/// snapshots the primary no longer had (`pall`, listed at the start of the
/// sync). Failures are logged.
fn prune_replica(
    engine: &Engine,
    pall: &[ceph::SnapInfo],
    replica: &Image,
    rall: &[ceph::SnapInfo],
    keep_always: &str,
    key: &str,
) {
    let gone = replica_surplus(engine.cfg.keep_snapshots, pall, rall, keep_always);
    remove_snaps(replica, &gone, key, "replica");
}

/// What [`prune_replica`] removes of the replica's snapshots `rall`: the sync
/// snapshots beyond the newest `keep` except `keep_always`, and the user
/// snapshots that the primary's list `pall` lacks (none when that list is
/// empty: an unread list removes nothing).
fn replica_surplus(
    keep: usize,
    pall: &[ceph::SnapInfo],
    rall: &[ceph::SnapInfo],
    keep_always: &str,
) -> Vec<String> {
    let mut gone = surplus(keep, &sync_snaps(rall), &[keep_always]);
    let pnames: HashSet<&str> = pall.iter().map(|s| s.name.as_str()).collect();
    if !pnames.is_empty() {
        gone.extend(
            rall.iter()
                .filter(|s| sync_snap_seq(&s.name).is_none() && !pnames.contains(s.name.as_str()))
                .map(|s| s.name.clone()),
        );
    }
    gone
}

/// Opens the local replica of `job`, creating it if it does not exist.
/// Refuses an existing image that is not a replica of this primary.
fn open_or_create_replica(
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    job: &Job,
    primary: &Image,
    target: &ceph::SnapInfo,
    link: Option<&ParentLink>,
) -> Result<(Image, ImageRecord, bool)> {
    let name = &job.primary.image_name;
    let key = job.key();
    // A missing replica is created without opening it first: opening an
    // image that does not exist costs librbd a whole image context (its
    // copy of the configuration, about 350 KiB, built and torn down) for
    // every new replica; its id object answers in one read.
    if !image_exists(local_io, name).ctx(|| format!("looking up replica {key}"))?
        && let Some((img, rec)) = create_replica(local_io, local_reg, job, primary, target, link)?
    {
        return Ok((img, rec, true));
    }
    let img = Image::open(local_io, name).ctx(|| format!("opening replica {key}"))?;
    let id = img.id().ctx(|| format!("replica {key}"))?;
    match local_reg.get(&id)? {
        // A former primary (demoted) of this volume: the caller
        // decides whether it becomes a replica.
        Some(rec) if matches!(rec.role, Role::Primary | Role::Demoted) => Ok((img, rec, false)),
        Some(rec)
            if rec.primary.as_ref().is_some_and(|p| {
                p.image_id == job.primary.image_id
                    || job.primary.migrated_from.as_deref() == Some(p.image_id.as_str())
            }) =>
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

/// The parent snapshot on this cluster that the replica of a clone is
/// created from.
struct ParentLink {
    /// The parent replica's pool and namespace here.
    io: Arc<IoCtx>,
    /// The parent's name (the same on both clusters).
    image_name: String,
    /// The parent snapshot's name (a user snapshot the parent's replication
    /// brought over).
    snap_name: String,
    /// The parent spec, for logs and messages.
    spec: ceph::ParentSpec,
}

/// How the replica of a primary is created.
enum ClonePlan {
    /// Empty, then a full copy (a clone's parent data included).
    Flat,
    /// As a clone of the parent's replica; only the clone's own objects
    /// are copied.
    Link(ParentLink),
    /// Not yet: the parent is replicated but its replica here lacks the
    /// parent snapshot (why, for the status).
    Wait(String),
}

/// The parent of clone `primary` and its record on the peer, when the
/// replica can be a clone: not flattened on request, the parent still
/// visible (overlap), its snapshot a user snapshot (a removed one, in clone
/// v2's trash namespace, no replication brings over), and the parent
/// replicated. `None`: the replica is a flat copy. Blocking.
fn replicated_parent(
    job: &Job,
    primary: &Image,
) -> Result<Option<(ceph::ParentSpec, ImageRecord)>> {
    let key = job.key();
    if job.primary.flatten_replica
        || primary.parent_overlap().ctx(|| format!("primary {key}"))? == 0
    {
        return Ok(None);
    }
    let Some(parent) = primary.parent().ctx(|| format!("primary {key}"))? else {
        return Ok(None);
    };
    if !parent.user_snap {
        return Ok(None);
    }
    let peer_io = job
        .peer
        .ioctx(&parent.pool, &parent.namespace)
        .ctx(|| format!("opening the pool of parent {parent} on the peer"))?;
    let Some(precord) = Registry::new(peer_io).get(&parent.image_id)? else {
        tracing::info!(image = %key, parent = %parent, "the parent is not replicated: the replica is a flat copy");
        return Ok(None);
    };
    Ok(Some((parent, precord)))
}

/// How the replica of `primary` (a clone or not) is created, as rbd-mirror
/// does: a clone whose parent image is replicated too (a registry record on
/// the peer) becomes a clone of the parent's replica here, once that holds
/// the parent snapshot; a clone whose parent is not replicated, or whose
/// primary record asks for it (`flatten_replica`), becomes a flat copy.
/// Blocking.
fn clone_plan(local: &Arc<Cluster>, job: &Job, primary: &Image) -> Result<ClonePlan> {
    let key = job.key();
    let Some((parent, precord)) = replicated_parent(job, primary)? else {
        return Ok(ClonePlan::Flat);
    };
    let wait = |why: &str| {
        Ok(ClonePlan::Wait(format!(
            "{key} is a clone of {parent}, which is replicated: {why}; the replica is created \
             as a clone of it once it is there (or set replicaClones=flatten for a flat copy)"
        )))
    };
    let lio = match local.ioctx(&parent.pool, &parent.namespace) {
        Ok(io) => io,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return wait("its pool does not exist on this cluster");
        }
        Err(e) => return Err(e).ctx(|| format!("opening the pool of parent {parent} here")),
    };
    if !image_exists(&lio, &parent.image_name).ctx(|| format!("looking up parent {parent} here"))? {
        return wait("its replica is not created on this cluster yet");
    }
    let here = Image::open_read_only(&lio, &parent.image_name, None)
        .ctx(|| format!("opening the replica of parent {parent}"))?;
    let here_id = here.id().ctx(|| format!("replica of parent {parent}"))?;
    // The image of that name here must be the parent's replica (or, after a
    // failover, the parent's primary whose replica the peer's is).
    let here_record = Registry::new(Arc::clone(&lio)).get(&here_id)?;
    let peer_is_its_replica = precord
        .primary
        .as_ref()
        .is_some_and(|p| p.image_id == here_id);
    if here_record.is_none() && !peer_is_its_replica {
        // The parent's replica between its creation and its registration
        // (both enabled at once), or an unrelated image that the parent's
        // own replication refuses to overwrite and reports: either way the
        // clone waits rather than turning flat for good.
        return wait("the image of its name here is not registered as its replica (yet)");
    }
    let related = here_record
        .and_then(|r| r.primary)
        .is_some_and(|p| p.image_id == parent.image_id)
        || peer_is_its_replica;
    if !related {
        tracing::warn!(image = %key, parent = %parent, "an image of the parent's name here is not its replica: the replica is a flat copy");
        return Ok(ClonePlan::Flat);
    }
    let has_snap = here
        .snap_list()
        .ctx(|| format!("listing snapshots of the replica of parent {parent}"))?
        .iter()
        .any(|s| s.name == parent.snap_name);
    if !has_snap {
        return wait(&format!(
            "its replica here does not hold snapshot {} yet",
            parent.snap_name
        ));
    }
    Ok(ClonePlan::Link(ParentLink {
        io: lio,
        image_name: parent.image_name.clone(),
        snap_name: parent.snap_name.clone(),
        spec: parent,
    }))
}

/// Whether an image `name` (format 2) exists in `io`: its id object exists.
fn image_exists(io: &IoCtx, name: &str) -> ceph::Result<bool> {
    let mut id = [0u8; 64];
    match io.read(&format!("rbd_id.{name}"), 0, &mut id) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates the replica of `job` as a copy of `primary`'s layout at `target`
/// (a clone of `link`'s snapshot, or empty) and registers it; `None` if an
/// image of that name exists after all.
fn create_replica(
    local_io: &Arc<IoCtx>,
    local_reg: &Registry,
    job: &Job,
    primary: &Image,
    target: &ceph::SnapInfo,
    link: Option<&ParentLink>,
) -> Result<Option<(Image, ImageRecord)>> {
    let name = &job.primary.image_name;
    let key = job.key();
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
    let created = match link {
        Some(l) => ceph::rbd::clone(&l.io, &l.image_name, &l.snap_name, local_io, name, &opts),
        None => ceph::rbd::create(local_io, name, target.size, &opts),
    };
    match created {
        Ok(()) => {}
        // Created in between, or an image without an id object (format 1):
        // what is there is checked below.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("creating replica {key}")),
    }
    let img = Image::open(local_io, name).ctx(|| format!("opening new replica {key}"))?;
    let id = img.id().ctx(|| format!("replica {key}"))?;
    let mut rec = ImageRecord {
        volume_id: job.primary.volume_id.clone(),
        primary: Some(PrimaryRef {
            fsid: job.peer.fsid().to_string(),
            image_id: job.primary.image_id.clone(),
        }),
        ..ImageRecord::new(
            name.clone(),
            id,
            Role::Secondary,
            job.primary.mode.clone(),
            job.primary.schedule.clone(),
        )
    };
    local_reg.put(&mut rec)?;
    match link {
        Some(l) => tracing::info!(
            features = feats,
            size = target.size,
            parent = %l.spec,
            "replica created as a clone of the parent's replica"
        ),
        None => tracing::info!(features = feats, size = target.size, "replica created"),
    }
    Ok(Some((img, rec)))
}

#[cfg(test)]
mod plan_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn data(off: u64, len: u64) -> Extent {
        Extent {
            off,
            len,
            data: true,
        }
    }

    #[test]
    fn object_runs_merge_touching_objects_and_skip_zero_extents() {
        const OBJ: u64 = 4 << 20;
        let extents = [
            data(0, 2 << 20),
            data(2 << 20, 2 << 20),
            // object 1 untouched; 2 and 3 by one extent across them
            data(3 * OBJ - 4096, 8192),
            Extent {
                off: 5 * OBJ,
                len: OBJ,
                data: false,
            },
            data(7 * OBJ + 1, 1),
        ];
        assert_eq!(object_runs(&extents, OBJ), vec![(0, 1), (2, 4), (7, 8)]);
        assert!(object_runs(&[], OBJ).is_empty());
    }
}
