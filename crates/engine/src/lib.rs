//! The replication engine: volume resolution, the per-pool registry in RADOS,
//! the snapshot replayer and replication status. No gRPC types here: the
//! gRPC layer validates requests into the typed models below and maps
//! [`EngineError`] to status codes.
//!
//! Every Ceph call is blocking; the async entry points run them on tokio's
//! blocking pool (`spawn_blocking`), never on runtime worker threads. Work on
//! a volume runs to completion even if the RPC that asked for it goes away,
//! and holds the volume's [`oplock`] until then.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod background;
pub mod conn;
pub mod copy;
pub mod drill;
pub mod error;
pub mod group;
pub mod group_repl;
mod group_roles;
pub mod journal_mode;
pub mod journal_replay;
pub mod journal_roles;
pub mod lease;
pub mod live_migration;
pub mod migrate;
pub mod oplock;
pub mod pool;
pub mod pool_mode;
pub mod registry;
pub mod replayer;
pub mod resolve;
pub mod roles;
pub mod rollback;
pub mod scheduler;
pub mod slots;
pub mod status;
mod store;
pub mod verify;
pub mod wakeup;

use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use csirr_ceph::Cluster;
use csirr_csi::config::{ClusterConfig, ClusterMapping, CsiConfig};
use csirr_csi::params::{FlattenMode, MirroringMode, ReplicationParams};
use csirr_csi::volume_id::VolumeId;

pub use conn::{Connections, Credentials};
pub use copy::CopyLimits;
pub use error::{CephContext, EngineError, Result};
use registry::{ImageRecord, Registry, Role, Schedule};

/// Static configuration of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// ceph-csi's `config.json`.
    pub csi_config: CsiConfig,
    /// ceph-csi's cluster-mapping file (may be empty).
    pub mapping: ClusterMapping,
    /// The local cluster (`--cluster-id`).
    pub local_cluster: ClusterConfig,
    /// Credentials for background work on the local cluster.
    pub local_creds: Credentials,
    /// Bound on every cluster operation.
    pub op_timeout: Duration,
    /// Limits of one copy.
    pub limits: CopyLimits,
    /// How often the replayer looks for work.
    pub poll_interval: Duration,
    /// Pools the replayer serves; `None`: every pool with mirror peers.
    pub pools: Option<Vec<String>>,
    /// Images synced at once at most.
    pub max_concurrent_syncs: usize,
    /// A replica status older than this counts as a silent peer.
    pub peer_stale_after: Duration,
    /// Sync snapshots kept on each side.
    pub keep_snapshots: usize,
    /// How often a running delta records its progress.
    pub checkpoint_interval: Duration,
    /// Byte-rate cap of all replication of this process (0: unlimited).
    pub max_bytes_per_second: u64,
    /// Bound on PromoteVolume, forced or not.
    pub promote_timeout: Duration,
    /// Bound on every other RPC's answer.
    pub rpc_timeout: Duration,
    /// RPCs doing cluster work at once.
    pub max_concurrent_rpcs: usize,
    /// A replica more than this many schedule intervals behind is DEGRADED
    /// ("RPO exceeded").
    pub rpo_factor: f64,
    /// Journal mode: object sets a replica may be behind the primary's
    /// active set before it is resynced from a new snapshot.
    pub journal_max_sets_behind: u64,
    /// Journal mode: how often the replay loop reads the primary's journal
    /// in full (header and every splay offset) when nothing woke it: the
    /// safety net for a lost notification on the journal header.
    pub journal_poll_interval: Duration,
    /// Journal mode: how often the replay loop checks (one stat) whether the
    /// object where the primary's next entry lands grew. Appends notify
    /// nobody, so this bounds the lag of a write at rest.
    pub journal_probe_interval: Duration,
    /// Journal mode: the probe interval once a replica found no entry for
    /// `journal_mode::QUIET_AFTER` (never shorter than the probe interval).
    pub journal_idle_probe_interval: Duration,
}

impl EngineConfig {
    /// A configuration with the defaults of `serve` for everything but where
    /// the local cluster is and how to authenticate to it.
    pub fn new(
        csi_config: CsiConfig,
        mapping: ClusterMapping,
        local_cluster: ClusterConfig,
        local_creds: Credentials,
    ) -> Self {
        Self {
            csi_config,
            mapping,
            local_cluster,
            local_creds,
            op_timeout: Duration::from_secs(30),
            limits: CopyLimits::default(),
            poll_interval: Duration::from_secs(5),
            pools: None,
            max_concurrent_syncs: 4,
            peer_stale_after: Duration::from_secs(60),
            keep_snapshots: 3,
            checkpoint_interval: Duration::from_secs(5),
            max_bytes_per_second: 0,
            promote_timeout: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(150),
            max_concurrent_rpcs: 32,
            rpo_factor: status::DEFAULT_RPO_FACTOR,
            journal_max_sets_behind: journal_mode::DEFAULT_MAX_SETS_BEHIND,
            journal_poll_interval: journal_mode::DEFAULT_POLL_INTERVAL,
            journal_probe_interval: journal_mode::DEFAULT_PROBE_INTERVAL,
            journal_idle_probe_interval: journal_mode::DEFAULT_IDLE_PROBE_INTERVAL,
        }
    }
}

/// A request naming one volume.
#[derive(Debug, Clone)]
pub struct VolumeRequest {
    /// The volume.
    pub volume: VolumeId,
    /// Credentials from the RPC, if it carried any.
    pub creds: Option<Credentials>,
}

/// Health of replication as `GetVolumeReplicationInfo` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Working.
    Healthy,
    /// Stalled or lagging; may need attention.
    Degraded,
    /// Broken; needs attention.
    Error,
    /// Not known yet (e.g. no replica has reported since Enable).
    Unknown,
}

/// Replication information of a primary volume.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationInfo {
    /// The newest complete sync point; `None` until one exists (never an
    /// invented time).
    pub last_sync: Option<LastSync>,
    /// Health.
    pub health: Health,
    /// Human-readable state.
    pub message: String,
}

/// A complete sync point as GetVolumeReplicationInfo reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSync {
    /// When its snapshot was taken on the primary.
    pub time: DateTime<Utc>,
    /// How long its copy took.
    pub duration: Duration,
    /// Bytes it copied.
    pub bytes: u64,
}

/// The engine. Shared behind an `Arc` by the gRPC services and the replayer.
pub struct Engine {
    cfg: EngineConfig,
    conns: Connections,
    locks: oplock::OpLocks,
    last_local_ok: Mutex<Option<Instant>>,
    last_local_err: Mutex<Option<String>>,
    /// Why a supervised loop (the replayer, ...) is not running, while it
    /// is not (for readiness).
    down: Mutex<std::collections::BTreeMap<&'static str, String>>,
    cookie: String,
    /// The global byte-rate cap, shared by every copy.
    throttle: Arc<copy::Throttle>,
    /// The bytes of copy buffers in flight, shared by every copy.
    budget: copy::ByteBudget,
    /// Images this process keeps open and exclusively locked (replicas and
    /// demoted images), so that nobody else writes them.
    held: replayer::HeldImages,
    /// Per-image exclusion between the replayer and role changes.
    slots: slots::ImageSlots,
    /// The process's metrics.
    metrics: Arc<csirr_metrics::Metrics>,
    /// What wakes the replayer between polls.
    wakeups: wakeup::Wakeups,
    /// The replayer's pool leases.
    leases: lease::LeaseTable,
    /// Blocking threads RPCs may use at once (the replayer's are bounded
    /// by `max_concurrent_syncs`).
    rpc_slots: Arc<tokio::sync::Semaphore>,
    /// First sync snapshots Enable left to the background, at most
    /// [`scheduler::SNAPSHOT_BATCH`] at once.
    first_snaps: Arc<tokio::sync::Semaphore>,
    /// Jobs started in the background (pruning, first sync snapshots).
    background: background::Background,
}

/// How many times a role change re-reads and decides again when the
/// registry record it decided on changed under it, before it answers
/// `Conflict`.
pub const CONFLICT_ATTEMPTS: u32 = 3;

impl Engine {
    /// An engine with `cfg`. Connects lazily.
    pub fn new(cfg: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            conns: Connections::new(cfg.op_timeout),
            locks: oplock::OpLocks::default(),
            last_local_ok: Mutex::new(None),
            last_local_err: Mutex::new(None),
            down: Mutex::default(),
            cookie: format!("csirr-{}", uuid::Uuid::new_v4()),
            throttle: Arc::new(copy::Throttle::new(cfg.max_bytes_per_second)),
            budget: copy::ByteBudget::new(cfg.limits.max_inflight_bytes),
            held: replayer::HeldImages::default(),
            slots: slots::ImageSlots::default(),
            metrics: Arc::new(csirr_metrics::Metrics::new()),
            wakeups: wakeup::Wakeups::default(),
            leases: lease::LeaseTable::default(),
            rpc_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_rpcs.max(1))),
            first_snaps: Arc::new(tokio::sync::Semaphore::new(scheduler::SNAPSHOT_BATCH)),
            background: background::Background::default(),
            cfg,
        })
    }

    /// The peer's cluster ID: the other side of the cluster mapping's
    /// `clusterIDMapping` entry that names the local cluster.
    pub(crate) fn peer_cluster_id(&self) -> Result<String> {
        let local_id = &self.cfg.local_cluster.cluster_id;
        self.cfg
            .mapping
            .entries()
            .iter()
            .flat_map(|e| e.cluster_ids.iter())
            .find_map(|(a, b)| match (a == local_id, b == local_id) {
                (true, _) => Some(b.clone()),
                (_, true) => Some(a.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                EngineError::FailedPrecondition(format!(
                    "cluster-mapping.json has no clusterIDMapping entry for the local cluster \
                     {local_id}: the peer's cluster ID is unknown"
                ))
            })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<csirr_metrics::Metrics> {
        &self.metrics
    }

    /// A connection to the local cluster with the sidecar's credentials.
    pub fn local(&self) -> Result<Arc<Cluster>> {
        self.conns
            .get(&self.cfg.local_cluster.mon_host(), &self.cfg.local_creds)
    }

    /// Runs blocking `f` on the blocking pool while holding the volume's
    /// operation lock; `Busy` if another operation holds it. Answers within
    /// the RPC deadline (UNAVAILABLE past it); the work itself runs to
    /// completion and keeps the volume locked until then.
    ///
    /// `f` reads the registry record it decides on and writes its decision
    /// conditionally: when another writer changed the record in between
    /// (`Conflict`), `f` runs again from the start, re-reading and deciding
    /// anew (every role change is idempotent), up to [`CONFLICT_ATTEMPTS`]
    /// times; then the conflict is the answer (ABORTED: retry later).
    async fn run_locked<T: Send + 'static>(
        self: &Arc<Self>,
        key: String,
        f: impl Fn(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let guard = self.locks.try_lock(&key)?;
        let what = format!("the operation on {key}");
        self.run_within(self.cfg.rpc_timeout, what, move |e| {
            let _guard = guard;
            // Tests: `engine::op=sleep(ms)` makes overlapping calls on one
            // volume deterministic.
            fail::fail_point!("engine::op");
            let mut attempt = 1;
            loop {
                match f(e) {
                    Err(EngineError::Conflict(m)) if attempt < CONFLICT_ATTEMPTS => {
                        tracing::info!(volume = %key, attempt, reason = %m, "registry record changed meanwhile; deciding again");
                        attempt += 1;
                    }
                    r => return r,
                }
            }
        })
        .await
    }

    /// Runs blocking `f` on the blocking pool, answering within the RPC
    /// deadline.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run_within(self.cfg.rpc_timeout, "the operation".into(), f)
            .await
    }

    /// Runs blocking `f` in one of the RPC slots, answering within `limit`
    /// (the wait for a slot included): `Unavailable` past it, while `f`
    /// goes on in the background.
    async fn run_within<T: Send + 'static>(
        self: &Arc<Self>,
        limit: Duration,
        what: String,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = Arc::clone(self);
        let slots = Arc::clone(&self.rpc_slots);
        let work = async move {
            let permit = slots
                .acquire_owned()
                .await
                .map_err(|_| EngineError::Unavailable("shutting down".into()))?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                f(&me)
            })
            .await
            .map_err(|e| EngineError::Internal(format!("{what} failed: {e}")))?
        };
        match tokio::time::timeout(limit, work).await {
            Ok(r) => {
                if let Err(e) = &r {
                    self.note_error(e);
                }
                r
            }
            Err(_) => Err(EngineError::Unavailable(format!(
                "no answer within {limit:?} (a cluster is slow or unreachable); work already \
                 started goes on in the background, retry to see its outcome"
            ))),
        }
    }

    /// Pings the local cluster and records the outcome for [`Engine::probe`].
    pub async fn check_local(self: &Arc<Self>) {
        // Bounded, and outside the RPC slots: neither a hung monitor nor a
        // flood of RPCs may stall the health loop.
        let limit = self.cfg.op_timeout + Duration::from_secs(5);
        let me = Arc::clone(self);
        let ping = tokio::task::spawn_blocking(move || {
            me.local()?
                .ping()
                .ctx(|| "pinging the local cluster".into())
        });
        let r = match tokio::time::timeout(limit, ping).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(EngineError::Internal(format!("pinging failed: {e}"))),
            Err(_) => Err(EngineError::Timeout(format!(
                "the local cluster did not answer a ping within {limit:?}"
            ))),
        };
        match r {
            Ok(()) => {
                *self.last_local_ok.lock() = Some(Instant::now());
                *self.last_local_err.lock() = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "local cluster check failed");
                *self.last_local_err.lock() = Some(e.to_string());
            }
        }
    }

    /// Reacts to an error that means this client was fenced (blocklisted,
    /// e.g. by another replayer breaking its locks): its connections are
    /// dead for good, so they are dropped and made anew, and what it held
    /// (locks, leases) is gone already.
    pub(crate) fn note_error(&self, e: &EngineError) {
        if e.is_blocklisted() {
            tracing::warn!(
                error = %e,
                "this client was blocklisted (another replayer took over?); reconnecting"
            );
            self.conns.forget_all();
            self.held.release_all();
            self.leases.clear();
        }
    }

    /// Records whether supervised loop `task` runs: `Some(reason)` while it
    /// does not (it died and waits to be restarted), `None` once it runs
    /// again.
    pub fn set_down(&self, task: &'static str, reason: Option<String>) {
        let mut down = self.down.lock();
        match reason {
            Some(r) => down.insert(task, r),
            None => down.remove(task),
        };
    }

    /// Ready when the local cluster answered within `within` and every
    /// supervised loop of this process (the replayer, if it runs one) is
    /// running; otherwise the reason.
    pub fn probe(&self, within: Duration) -> std::result::Result<(), String> {
        if let Some(why) = self.down.lock().values().next().cloned() {
            return Err(why);
        }
        let ok = *self.last_local_ok.lock();
        match ok {
            Some(t) if t.elapsed() <= within => Ok(()),
            _ => {
                let err = self.last_local_err.lock().clone();
                Err(match (ok, err) {
                    (_, Some(e)) => format!(
                        "local cluster {} is not answering: {e}",
                        self.cfg.local_cluster.cluster_id
                    ),
                    (None, None) => format!(
                        "local cluster {} has not been reached yet",
                        self.cfg.local_cluster.cluster_id
                    ),
                    (Some(t), None) => format!(
                        "local cluster {} last answered {}s ago",
                        self.cfg.local_cluster.cluster_id,
                        t.elapsed().as_secs()
                    ),
                })
            }
        }
    }

    /// EnableVolumeReplication: registers the image as a primary. Idempotent;
    /// on a replica it changes nothing.
    ///
    /// The first sync snapshot is taken in the background once the record
    /// is written (a snapshot waits for a monitor round, 0.5-1 s; many
    /// Enables in a row share those rounds instead of paying one each).
    /// Until it exists the volume reports no sync point, as before its first
    /// copy; the scheduler takes it if this process dies first.
    pub async fn enable(
        self: &Arc<Self>,
        req: VolumeRequest,
        params: ReplicationParams,
    ) -> Result<()> {
        let key = req.volume.to_string();
        let volume = key.clone();
        let first = self
            .run_locked(key, move |e| e.enable_blocking(&req, &params))
            .await?;
        if let Some(first) = first {
            self.spawn_first_sync_point(volume, first);
        }
        Ok(())
    }

    /// Takes `first` (an image Enable just registered) in the background,
    /// sharing monitor rounds with the other first snapshots in flight.
    fn spawn_first_sync_point(self: &Arc<Self>, volume: String, first: scheduler::FirstSync) {
        let (me, sem) = (Arc::clone(self), Arc::clone(&self.first_snaps));
        let key = first.key();
        self.background.spawn("first-sync", &key, async move {
            let Ok(_permit) = sem.acquire_owned().await else {
                return;
            };
            let span = tracing::info_span!("enable", volume = %volume, image = %first.key());
            let res = tokio::task::spawn_blocking(move || {
                let _e = span.enter();
                me.take_first_sync_point(&first)
            })
            .await;
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(
                    volume = %volume,
                    error = %e,
                    "first sync snapshot failed; the scheduler takes it at its next pass"
                ),
                Err(e) => {
                    tracing::error!(volume = %volume, error = %e, "first sync snapshot panicked")
                }
            }
        });
    }

    fn enable_blocking(
        &self,
        req: &VolumeRequest,
        params: &ReplicationParams,
    ) -> Result<Option<scheduler::FirstSync>> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let schedule = Schedule::of(params);
        let span = tracing::info_span!("enable", volume = %req.volume, image = %vol.image.spec());
        let _e = span.enter();
        let mut rec = match reg.get(&vol.image_id)? {
            Some(rec) if rec.role == Role::Secondary => {
                tracing::info!("image is a replica; enable changes nothing");
                return Ok(None);
            }
            Some(rec) if rec.mode != params.mirroring_mode.as_str() => {
                return Err(EngineError::ModeMismatch {
                    volume: req.volume.to_string(),
                    enabled: rec.mode,
                    requested: params.mirroring_mode.to_string(),
                });
            }
            Some(rec) => rec,
            None => ImageRecord {
                volume_id: vol.handle.as_ref().map(ToString::to_string),
                ..ImageRecord::new(
                    vol.image.name().to_string(),
                    vol.image_id.clone(),
                    Role::Primary,
                    params.mirroring_mode.to_string(),
                    schedule.clone(),
                )
            },
        };
        rec.schedule = schedule;
        rec.bandwidth_limit = params.bandwidth_limit;
        // How the replica of a clone is made is decided when it is created
        // (the replayer's `clone_plan`); a later change applies to replicas
        // created after it.
        rec.flatten_replica = params.flatten_replica;
        // ceph-csi's flattenMode: `force` detaches a clone from its parent
        // first (its replica is then a plain image too).
        if params.flatten_mode == FlattenMode::Force
            && vol.image.parent_overlap().ctx(|| vol.image.spec())? > 0
        {
            tracing::info!("flattening the clone before enabling (flattenMode force)");
            vol.image
                .flatten()
                .ctx(|| format!("flattening {}", vol.image.spec()))?;
        }
        if params.mirroring_mode == MirroringMode::Journal {
            let added = journal_mode::enable_journaling(&vol.image, &req.volume.to_string())?;
            if added != 0 {
                rec.features_added = Some(rec.features_added.unwrap_or(0) | added);
            }
            reg.put(&mut rec)?;
            // The replica side registers in the journal and bootstraps
            // itself from a snapshot it takes after registering.
            reg.announce();
            tracing::info!(
                features_added = added,
                "replication enabled in journal mode"
            );
            return Ok(None);
        }
        reg.put(&mut rec)?;
        // Whether a first sync snapshot is still needed is decided in the
        // background, under the image's slot (a check here would be stale).
        tracing::info!("replication enabled");
        Ok(Some(scheduler::FirstSync {
            io: Arc::clone(vol.ioctx()),
            image_id: vol.image_id.clone(),
            image_name: vol.image.name().to_string(),
        }))
    }

    /// GetVolumeReplicationInfo on a primary: the newest complete sync point
    /// any replica reported, and the health of replication.
    pub async fn info(self: &Arc<Self>, req: VolumeRequest) -> Result<ReplicationInfo> {
        self.run(move |e| e.info_blocking(&req)).await
    }

    fn info_blocking(&self, req: &VolumeRequest) -> Result<ReplicationInfo> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let rec = reg.get(&vol.image_id)?.ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "replication is not enabled for volume {}",
                req.volume
            ))
        })?;
        if rec.role != Role::Primary {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {} is not primary here ({:?}); replication info is reported on the \
                 primary",
                req.volume, rec.role
            )));
        }
        let statuses = reg.statuses(&vol.image_id)?;
        let a = status::assess(
            &rec,
            &statuses,
            Utc::now(),
            self.cfg.peer_stale_after,
            self.cfg.rpo_factor,
        );
        // No sync point yet: say why, never invent one. A replica that has
        // not reported cannot be judged (UNKNOWN) unless the pool cannot
        // replicate at all; a first copy in progress is no recovery point
        // yet (DEGRADED).
        let (health, mut message) = (a.health, a.message);
        let health = match (&a.last_sync, health) {
            (Some(_), h) => h,
            (None, Health::Healthy) if a.replicas.is_empty() => {
                match csirr_ceph::rbd::mirror_peer_list(vol.ioctx()) {
                    Ok(p) if !p.is_empty() => Health::Unknown,
                    // A one-way (rx-only) peer is registered on the
                    // replica's side only, so this is not final: DEGRADED
                    // until a replica reports.
                    Ok(_) => {
                        message = format!(
                            "no replica has reported and pool {} has no mirror peer here: \
                             unless a peer cluster pulls it (rx-only), nothing replicates this \
                             volume (add the peer with `rbd mirror pool peer bootstrap import`)",
                            vol.ioctx().pool()
                        );
                        Health::Degraded
                    }
                    Err(e) => {
                        message = format!("{message}; the pool's mirror peers cannot be read: {e}");
                        Health::Unknown
                    }
                }
            }
            (None, Health::Healthy) => Health::Degraded,
            (None, h) => h,
        };
        Ok(ReplicationInfo {
            last_sync: a.last_sync.map(|l| LastSync {
                time: l.snap_time,
                duration: Duration::from_millis(l.duration_ms),
                bytes: l.bytes,
            }),
            health,
            message,
        })
    }
}

impl Engine {
    /// GetReplicationDestinationInfo: the volume ID of the replica on the
    /// peer cluster. A ceph-csi handle is re-minted with the peer's cluster
    /// ID (the other side of the local cluster in `cluster-mapping.json`)
    /// and the peer pool's ID, keeping the uuid (the omap generator writes
    /// the peer's journal under the same uuid), so a PersistentVolume made
    /// on the peer from it resolves without the mapping. A plain
    /// `pool[/namespace]/image` ID names the same place on the peer.
    pub async fn destination(self: &Arc<Self>, req: VolumeRequest) -> Result<String> {
        self.run(move |e| e.destination_blocking(&req)).await
    }

    fn destination_blocking(&self, req: &VolumeRequest) -> Result<String> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        if reg.get(&vol.image_id)?.is_none() {
            return Err(EngineError::FailedPrecondition(format!(
                "replication is not enabled for volume {}",
                req.volume
            )));
        }
        let Some(handle) = &vol.handle else {
            return Ok(req.volume.to_string());
        };
        let peer_id = self.peer_cluster_id()?;
        let pool = vol.ioctx().pool();
        let (_, peer) = self
            .peers_of_pool(pool)?
            .into_iter()
            .next()
            .ok_or_else(|| {
                EngineError::FailedPrecondition(format!("pool {pool} has no mirror peer"))
            })?;
        let peer_pool = peer
            .pool_lookup(pool)
            .ctx(|| format!("looking up pool {pool} on the peer cluster {peer_id}"))?;
        if let Some(mapped) = self
            .cfg
            .mapping
            .candidates(&self.cfg.local_cluster.cluster_id, vol.ioctx().pool_id())
            .into_iter()
            .find(|l| l.cluster_id == peer_id)
            .filter(|l| l.pool_id != peer_pool)
        {
            tracing::warn!(
                pool,
                mapped = mapped.pool_id,
                actual = peer_pool,
                "cluster-mapping.json maps the pool to another ID than the peer's; using the \
                 peer's"
            );
        }
        let dest = handle
            .with_location(&peer_id, peer_pool)
            .map_err(|e| EngineError::Internal(format!("minting the peer's volume ID: {e}")))?;
        Ok(dest.to_string())
    }
}
