//! The replication engine: volume resolution, the per-pool registry in RADOS,
//! the snapshot replayer and replication status. No gRPC types here: the
//! gRPC layer validates requests into the typed models below and maps
//! [`EngineError`] to status codes.
//!
//! Every Ceph call is blocking; the async entry points run them on tokio's
//! blocking pool (`spawn_blocking`), never on runtime worker threads. Work on
//! a volume runs to completion even if the RPC that asked for it goes away,
//! and holds the volume's [`oplock`] until then.

pub mod conn;
pub mod copy;
pub mod error;
pub mod oplock;
pub mod registry;
pub mod replayer;
pub mod resolve;
pub mod roles;
pub mod rollback;
pub mod scheduler;
pub mod slots;
pub mod status;
pub mod verify;
pub mod wakeup;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::ceph::Cluster;
use crate::csi::config::{ClusterConfig, ClusterMapping, CsiConfig};
use crate::csi::params::{MirroringMode, ReplicationParams};
use crate::csi::volume_id::VolumeId;

pub use conn::{Connections, Credentials};
pub use copy::CopyLimits;
pub use error::{CephContext, EngineError, Result};
use registry::{ImageRecord, Registry, Role, Schedule, sync_snap_seq};

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
    /// A replica more than this many schedule intervals behind is DEGRADED
    /// ("RPO exceeded").
    pub rpo_factor: f64,
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
            rpo_factor: status::DEFAULT_RPO_FACTOR,
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
}

/// Replication information of a primary volume.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationInfo {
    /// When the newest complete sync point was taken on the primary.
    pub last_sync_time: DateTime<Utc>,
    /// How long the copy of that sync point took.
    pub last_sync_duration: Duration,
    /// Bytes it copied.
    pub last_sync_bytes: u64,
    /// Health.
    pub health: Health,
    /// Human-readable state.
    pub message: String,
}

/// A duration in milliseconds from environment variable `name` (fault
/// injection for tests), if set and valid.
fn env_millis(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// The engine. Shared behind an `Arc` by the gRPC services and the replayer.
pub struct Engine {
    cfg: EngineConfig,
    conns: Connections,
    locks: oplock::OpLocks,
    last_local_ok: Mutex<Option<Instant>>,
    last_local_err: Mutex<Option<String>>,
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
    metrics: Arc<crate::metrics::Metrics>,
    /// What wakes the replayer between polls.
    wakeups: wakeup::Wakeups,
    /// Fault injection for tests: every volume operation first sleeps this
    /// long (`CSIRR_FAULT_OP_DELAY_MS`), which makes overlapping calls on one
    /// volume deterministic.
    fault_op_delay: Option<Duration>,
    /// Fault injection for tests: the replayer waits this long between
    /// reporting a sync point and taking the replica's snapshot of it
    /// (`CSIRR_FAULT_SNAP_DELAY_MS`), which holds the pending state open.
    fault_snap_delay: Option<Duration>,
}

impl Engine {
    /// An engine with `cfg`. Connects lazily.
    pub fn new(cfg: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            conns: Connections::new(cfg.op_timeout),
            locks: oplock::OpLocks::default(),
            last_local_ok: Mutex::new(None),
            last_local_err: Mutex::new(None),
            cookie: format!("csirr-{}", uuid::Uuid::new_v4()),
            throttle: Arc::new(copy::Throttle::new(cfg.max_bytes_per_second)),
            budget: copy::ByteBudget::new(cfg.limits.max_inflight_bytes),
            held: replayer::HeldImages::default(),
            slots: slots::ImageSlots::default(),
            metrics: Arc::new(crate::metrics::Metrics::new()),
            wakeups: wakeup::Wakeups::default(),
            fault_op_delay: env_millis("CSIRR_FAULT_OP_DELAY_MS"),
            fault_snap_delay: env_millis("CSIRR_FAULT_SNAP_DELAY_MS"),
            cfg,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The process's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// A connection to the local cluster with the sidecar's credentials.
    pub fn local(&self) -> Result<Arc<Cluster>> {
        self.conns
            .get(&self.cfg.local_cluster.mon_host(), &self.cfg.local_creds)
    }

    /// Runs blocking `f` on the blocking pool while holding the volume's
    /// operation lock; `Busy` if another operation holds it.
    async fn run_locked<T: Send + 'static>(
        self: &Arc<Self>,
        key: String,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let guard = self.locks.try_lock(&key)?;
        let me = Arc::clone(self);
        let delay = self.fault_op_delay;
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
            f(&me)
        })
        .await
        .map_err(|e| EngineError::Internal(format!("operation on {key} failed: {e}")))?
    }

    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Engine) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| EngineError::Internal(format!("operation failed: {e}")))?
    }

    /// Pings the local cluster and records the outcome for [`Engine::probe`].
    pub async fn check_local(self: &Arc<Self>) {
        let r = self
            .run(|e| e.local()?.ping().ctx(|| "pinging the local cluster".into()))
            .await;
        match r {
            Ok(()) => {
                *self.last_local_ok.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now());
                *self
                    .last_local_err
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "local cluster check failed");
                *self
                    .last_local_err
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
    }

    /// Ready when the local cluster answered within `within`; otherwise the
    /// reason.
    pub fn probe(&self, within: Duration) -> std::result::Result<(), String> {
        let ok = *self.last_local_ok.lock().unwrap_or_else(|p| p.into_inner());
        match ok {
            Some(t) if t.elapsed() <= within => Ok(()),
            _ => {
                let err = self
                    .last_local_err
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
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

    /// EnableVolumeReplication: registers the image as a primary and takes
    /// its first sync snapshot. Idempotent; on a replica it changes nothing.
    pub async fn enable(
        self: &Arc<Self>,
        req: VolumeRequest,
        params: ReplicationParams,
    ) -> Result<()> {
        if params.mirroring_mode != MirroringMode::Snapshot {
            return Err(EngineError::InvalidArgument(format!(
                "mirroringMode {} is not supported yet; use snapshot",
                params.mirroring_mode
            )));
        }
        let key = req.volume.to_string();
        self.run_locked(key, move |e| e.enable_blocking(&req, &params))
            .await
    }

    fn enable_blocking(&self, req: &VolumeRequest, params: &ReplicationParams) -> Result<()> {
        let vol = self.resolve(&req.volume, req.creds.as_ref())?;
        let reg = Registry::new(Arc::clone(vol.ioctx()));
        let map = params.to_map();
        let schedule = Schedule {
            interval: map.get("schedulingInterval").cloned(),
            start_time: map.get("schedulingStartTime").cloned(),
        };
        let span = tracing::info_span!("enable", volume = %req.volume, image = %vol.image.spec());
        let _e = span.enter();
        let mut rec = match reg.get(&vol.image_id)? {
            Some(rec) if rec.role == Role::Secondary => {
                tracing::info!("image is a replica; enable changes nothing");
                return Ok(());
            }
            Some(rec) => rec,
            None => ImageRecord {
                version: 1,
                image_name: vol.image.name().to_string(),
                image_id: vol.image_id.clone(),
                role: Role::Primary,
                mode: MirroringMode::Snapshot.to_string(),
                schedule: schedule.clone(),
                volume_id: vol.handle.as_ref().map(ToString::to_string),
                enabled_at: Utc::now(),
                primary: None,
                last_sync: None,
                checkpoint: None,
                bandwidth_limit: None,
                demotion_snap: None,
                role_change: None,
                pending_snap: None,
            },
        };
        rec.schedule = schedule;
        rec.bandwidth_limit = params.bandwidth_limit;
        // The first sync snapshot before the record: the scheduler takes one
        // for a primary record that has none (an interrupted Enable of an
        // earlier version), and would race this one while the monitor
        // commits it; two first sync points made the replica copy the image
        // twice. An Enable interrupted in between leaves a snapshot that
        // the retry adopts.
        let snaps = vol
            .image
            .snap_list()
            .ctx(|| format!("listing snapshots of {}", vol.image.spec()))?;
        let first = !snaps.iter().any(|s| sync_snap_seq(&s.name).is_some());
        if first {
            self.take_sync_snapshot(&vol.image, 1)?;
        }
        reg.put(&rec)?;
        if first {
            tracing::info!("replication enabled");
        } else {
            tracing::info!("replication already enabled");
        }
        reg.announce();
        Ok(())
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
        let last = match (&a.last_sync, a.health) {
            (Some(l), _) => l.clone(),
            // No sync point yet: an error (split-brain, a failing replayer)
            // is reported now rather than as "no info yet".
            (None, Health::Error) => {
                return Ok(ReplicationInfo {
                    last_sync_time: rec.enabled_at,
                    last_sync_duration: Duration::ZERO,
                    last_sync_bytes: 0,
                    health: a.health,
                    message: a.message,
                });
            }
            (None, _) => {
                return Err(EngineError::NoInfoYet(format!(
                    "no sync of volume {} has completed yet ({})",
                    req.volume, a.message
                )));
            }
        };
        Ok(ReplicationInfo {
            last_sync_time: last.snap_time,
            last_sync_duration: Duration::from_millis(last.duration_ms),
            last_sync_bytes: last.bytes,
            health: a.health,
            message: a.message,
        })
    }
}
