//! Replication status as an operator reads it: per image a state (starting,
//! syncing N%, replaying/idle, stopped, error with reason), the recovery
//! point (seconds behind the primary, bytes pending, copy rate, time to catch
//! up) and a health verdict with a one-line reason.
//!
//! Owns: [`assess`] and [`assess_secondary`], pure functions of registry
//! data and the time (unit-tested without Ceph), which
//! `GetVolumeReplicationInfo`, the `status` command and the metrics all use,
//! so that they never disagree; [`Engine::pool_status`], which reads a
//! pool's registries (every RBD namespace) for the `status` command; the
//! text rendering of the command; and [`collect_metrics`], which feeds the
//! per-image gauges of [`csirr_metrics`] from the same assessments.
//!
//! Must not: write anything to Ceph, or decide replication (it only reads
//! what the replayer and the scheduler recorded).
//!
//! Rules of the verdict, first match wins, per replica of a primary:
//! 1. The replayer reported `error` (or a split-brain): ERROR with its
//!    message.
//! 2. The status is older than `stale_after` (a silent peer): DEGRADED,
//!    state `stopped`, "replica silent for Ns (last report: ...)".
//! 3. Seconds behind > `rpo_factor` x the schedule interval: DEGRADED, "RPO
//!    exceeded: Ns behind, threshold Ms". Seconds behind is the age of the
//!    newest complete sync point (its snapshot time on the primary); before
//!    the first one there is no recovery point and no RPO verdict (the
//!    state says `starting` or `syncing N%`).
//! 4. Otherwise HEALTHY.
//!
//! A primary that no replica has reported for longer than `stale_after`
//! since replication was enabled is DEGRADED (`stopped`). With several
//! replicas, the image's verdict and figures are those of the worst one;
//! `last_sync` is the newest sync point any replica has.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Serialize, Serializer};
use tokio_util::sync::CancellationToken;

use super::error::{CephContext, EngineError, Result};
use super::registry::{
    Checkpoint, ImageRecord, PrimaryRef, Registry, ReplayState, ReplicaStatus, Role, Schedule,
    SyncPoint,
};
use super::scheduler::Plan;
use super::{Engine, EngineConfig, Health};
use csirr_ceph::{Image, IoCtx};
use csirr_metrics::{ImageLabels, Metrics, ReplicaProgress};

/// Default RPO threshold, as a multiple of the schedule interval.
pub const DEFAULT_RPO_FACTOR: f64 = 2.0;

/// What the replication of an image is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Replica being created or waiting for the first sync snapshot.
    Starting,
    /// Copying a delta (or the first full copy).
    Syncing,
    /// Up to date with the primary's newest sync snapshot, replaying.
    Idle,
    /// Nobody replays: the replica's replayer stopped reporting, or no
    /// replica ever reported.
    Stopped,
    /// The replayer stopped on an error.
    Error,
}

impl State {
    /// The name the status command and the `state` metric label use (one of
    /// [`csirr_metrics::REPLICA_STATES`]).
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Syncing => "syncing",
            State::Idle => "idle",
            State::Stopped => "stopped",
            State::Error => "error",
        }
    }
}

/// How healthy, as the status command prints it (like `rbd mirror pool
/// status`): OK, WARNING, ERROR (UNKNOWN: not judged yet).
pub fn health_word(h: Health) -> &'static str {
    match h {
        Health::Healthy => "OK",
        Health::Degraded => "WARNING",
        Health::Error => "ERROR",
        Health::Unknown => "UNKNOWN",
    }
}

fn ser_health<S: Serializer>(h: &Health, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(health_word(*h))
}

fn rank(h: Health) -> u8 {
    match h {
        Health::Healthy => 0,
        Health::Unknown => 1,
        Health::Degraded => 2,
        Health::Error => 3,
    }
}

/// The verdict on one replica of a primary image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplicaAssessment {
    /// fsid of the replica's cluster.
    pub replica_fsid: String,
    /// Health.
    #[serde(serialize_with = "ser_health")]
    pub health: Health,
    /// State.
    pub state: State,
    /// One line for an operator.
    pub message: String,
    /// Progress of the running sync, 0-100.
    pub percent: Option<f64>,
    /// Sync snapshot being copied.
    pub syncing_snap: Option<String>,
    /// Age of the newest complete sync point; `None` before the first.
    pub seconds_behind: Option<u64>,
    /// Bytes of the running sync still to copy; 0 when idle.
    pub bytes_pending: Option<u64>,
    /// Copy rate of the running sync.
    pub bytes_per_sec: Option<u64>,
    /// `bytes_pending / bytes_per_sec`.
    pub eta_seconds: Option<u64>,
    /// Journal mode: entries of the primary's journal not replayed yet.
    pub entries_pending: Option<u64>,
    /// Journal mode: entries replayed per second.
    pub entries_per_sec: Option<u64>,
    /// Newest complete sync point.
    pub last_sync: Option<SyncPoint>,
    /// When the replayer last reported.
    pub updated_at: DateTime<Utc>,
    /// How long ago that was.
    pub reported_seconds_ago: u64,
}

/// The verdict on one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    /// Health (the worst replica's).
    #[serde(serialize_with = "ser_health")]
    pub health: Health,
    /// One line for an operator: for `GetVolumeReplicationInfo`'s
    /// `status_message`.
    pub message: String,
    /// State (the worst replica's).
    pub state: State,
    /// Progress of the running sync, 0-100.
    pub percent: Option<f64>,
    /// Seconds behind the primary (the worst replica's).
    pub seconds_behind: Option<u64>,
    /// Bytes still to copy in the running sync; 0 when idle.
    pub bytes_pending: Option<u64>,
    /// Copy rate of the running sync.
    pub bytes_per_sec: Option<u64>,
    /// Estimated seconds to catch up with the sync point being copied.
    pub eta_seconds: Option<u64>,
    /// Seconds behind above which the image is DEGRADED.
    pub rpo_threshold_seconds: u64,
    /// The newest complete sync point of any replica (the recovery point
    /// `last_sync_*` report).
    pub last_sync: Option<SyncPoint>,
    /// Per replica (primaries only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaAssessment>,
}

fn secs_since(t: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    u64::try_from(now.signed_duration_since(t).num_seconds()).unwrap_or(0)
}

/// The RPO threshold of `schedule`: `factor` x its interval (a factor that
/// is not a positive number counts as [`DEFAULT_RPO_FACTOR`]).
pub fn rpo_threshold(schedule: &Schedule, factor: f64) -> Duration {
    let factor = if factor.is_finite() && factor > 0.0 {
        factor
    } else {
        DEFAULT_RPO_FACTOR
    };
    let secs = Plan::of(schedule).interval.as_secs_f64() * factor;
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

/// `n` bytes for people: `512 B`, `64.0 MiB`.
pub fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

fn clean_percent(p: Option<f64>) -> Option<f64> {
    p.filter(|p| p.is_finite()).map(|p| p.clamp(0.0, 100.0))
}

fn eta(pending: Option<u64>, rate: Option<u64>) -> Option<u64> {
    match (pending, rate) {
        (Some(p), Some(r)) if r > 0 => Some(p.div_ceil(r)),
        _ => None,
    }
}

/// "syncing csirr-sync.0000000004 42% at 80.0 MiB/s, ETA 3s".
fn syncing_text(
    snap: Option<&str>,
    percent: Option<f64>,
    rate: Option<u64>,
    eta: Option<u64>,
) -> String {
    let mut s = "syncing".to_string();
    if let Some(snap) = snap {
        let _ = write!(s, " {snap}");
    }
    if let Some(p) = percent {
        let _ = write!(s, " {p:.0}%");
    }
    if let Some(r) = rate {
        let _ = write!(s, " at {}/s", fmt_bytes(r));
    }
    if let Some(e) = eta {
        let _ = write!(s, ", ETA {e}s");
    }
    s
}

/// "42s behind (csirr-sync.0000000003)" or "no sync point yet".
fn lag_text(behind: Option<u64>, last: Option<&SyncPoint>) -> String {
    match (behind, last) {
        (Some(b), Some(l)) => format!("{b}s behind ({})", l.snap_name),
        _ => "no sync point yet".to_string(),
    }
}

fn rpo_text(behind: u64, threshold: Duration) -> String {
    format!(
        "RPO exceeded: {behind}s behind, threshold {}s",
        threshold.as_secs()
    )
}

/// What the replica is doing, in words: its state, a sync's progress,
/// and the journal entries it is behind.
fn activity_text(
    st: &ReplicaStatus,
    state: State,
    percent: Option<f64>,
    pending: Option<u64>,
    rate: Option<u64>,
) -> String {
    let activity = match state {
        State::Starting if st.message.is_empty() => "starting".to_string(),
        State::Starting => format!("starting: {}", st.message),
        State::Syncing => syncing_text(
            st.syncing_snap.as_deref(),
            percent,
            rate,
            eta(pending, rate),
        ),
        State::Stopped if st.message.is_empty() => "replication stopped".to_string(),
        State::Stopped => format!("replication stopped: {}", st.message),
        _ => "replaying, idle".to_string(),
    };
    match (st.entries_pending, st.entries_per_sec) {
        (Some(e), Some(r)) if r > 0 => {
            format!("{activity}, {e} journal entries behind, {r} entries/s")
        }
        (Some(e), _) => format!("{activity}, {e} journal entries behind"),
        (None, _) => activity,
    }
}

/// The message of a replica in error (or in split-brain).
fn error_text(st: &ReplicaStatus, split_brain: bool, stale: bool, reported: u64) -> String {
    let mut m = if split_brain {
        st.message.clone()
    } else if st.message.is_empty() {
        "replica error (no detail reported)".to_string()
    } else {
        format!("replica error: {}", st.message)
    };
    if stale {
        let _ = write!(m, " (reported {reported}s ago)");
    }
    m
}

fn assess_replica(
    st: &ReplicaStatus,
    now: DateTime<Utc>,
    stale_after: Duration,
    threshold: Duration,
) -> ReplicaAssessment {
    let reported = secs_since(st.updated_at, now);
    let stale = now
        .signed_duration_since(st.updated_at)
        .to_std()
        .is_ok_and(|age| age > stale_after);
    let behind = st.last_sync.as_ref().map(|l| secs_since(l.snap_time, now));
    let (mut state, percent, mut pending, mut rate) = match st.state {
        ReplayState::Starting => (State::Starting, None, None, None),
        ReplayState::Syncing => (
            State::Syncing,
            clean_percent(st.percent),
            st.bytes_pending,
            st.bytes_per_sec,
        ),
        ReplayState::Idle => (State::Idle, None, Some(0), None),
        ReplayState::Stopped => (State::Stopped, None, None, None),
        ReplayState::Error => (State::Error, None, None, None),
        // Reported by a newer replica: judged by its sync point and age only.
        ReplayState::Unknown => (State::Starting, None, None, None),
    };
    let activity = activity_text(st, state, percent, pending, rate);
    let lag = lag_text(behind, st.last_sync.as_ref());
    let rpo_exceeded = behind.filter(|b| Duration::from_secs(*b) > threshold);
    let split_brain = st.message.starts_with("split-brain");
    let (health, message) = if st.state == ReplayState::Error || split_brain {
        state = State::Error;
        (Health::Error, error_text(st, split_brain, stale, reported))
    } else if stale {
        state = State::Stopped;
        pending = None;
        rate = None;
        let verdict = match rpo_exceeded {
            Some(b) => rpo_text(b, threshold),
            None => lag,
        };
        (
            Health::Degraded,
            format!("replica silent for {reported}s (last report: {activity}); {verdict}"),
        )
    } else if st.state == ReplayState::Stopped {
        // Not replaying on purpose (replica detached or demoted): the
        // primary is not protected.
        (Health::Degraded, format!("{activity}; {lag}"))
    } else if let Some(b) = rpo_exceeded {
        (
            Health::Degraded,
            format!("{}; {activity}", rpo_text(b, threshold)),
        )
    } else {
        (Health::Healthy, format!("{activity}; {lag}"))
    };
    let syncing = state == State::Syncing;
    ReplicaAssessment {
        replica_fsid: st.replica_fsid.clone(),
        health,
        state,
        message,
        percent: percent.filter(|_| syncing),
        syncing_snap: st.syncing_snap.clone().filter(|_| syncing),
        seconds_behind: behind,
        bytes_pending: pending,
        bytes_per_sec: rate.filter(|_| syncing),
        eta_seconds: eta(pending, rate).filter(|_| syncing),
        entries_pending: st.entries_pending.filter(|_| !stale),
        entries_per_sec: st.entries_per_sec.filter(|_| !stale),
        last_sync: st.last_sync.clone(),
        updated_at: st.updated_at,
        reported_seconds_ago: reported,
    }
}

/// The verdict on primary image `rec` from the statuses its replicas
/// reported (`Registry::statuses`); see the module doc for the rules.
pub fn assess(
    rec: &ImageRecord,
    statuses: &[ReplicaStatus],
    now: DateTime<Utc>,
    stale_after: Duration,
    rpo_factor: f64,
) -> Assessment {
    let threshold = rpo_threshold(&rec.schedule, rpo_factor);
    let replicas: Vec<ReplicaAssessment> = statuses
        .iter()
        .map(|s| assess_replica(s, now, stale_after, threshold))
        .collect();
    let last_sync = replicas
        .iter()
        .filter_map(|r| r.last_sync.as_ref())
        .max_by_key(|l| l.snap_time)
        .cloned();
    let worst = replicas
        .iter()
        .max_by_key(|r| (rank(r.health), r.seconds_behind.unwrap_or(0)));
    let Some(w) = worst else {
        let since = secs_since(rec.enabled_at, now);
        let silent = now
            .signed_duration_since(rec.enabled_at)
            .to_std()
            .is_ok_and(|age| age > stale_after);
        let (health, state, message) = if silent {
            (
                Health::Degraded,
                State::Stopped,
                format!(
                    "no replica has reported in the {since}s since replication was enabled; \
                     is a replayer running on the peer cluster?"
                ),
            )
        } else {
            (
                Health::Healthy,
                State::Starting,
                "starting: waiting for a replica to report".to_string(),
            )
        };
        return Assessment {
            health,
            message,
            state,
            percent: None,
            seconds_behind: None,
            bytes_pending: None,
            bytes_per_sec: None,
            eta_seconds: None,
            rpo_threshold_seconds: threshold.as_secs(),
            last_sync: None,
            replicas,
        };
    };
    let message = if replicas.len() > 1 {
        format!("replica {}: {}", w.replica_fsid, w.message)
    } else {
        w.message.clone()
    };
    Assessment {
        health: w.health,
        message,
        state: w.state,
        percent: w.percent,
        seconds_behind: w.seconds_behind,
        bytes_pending: w.bytes_pending,
        bytes_per_sec: w.bytes_per_sec,
        eta_seconds: w.eta_seconds,
        rpo_threshold_seconds: threshold.as_secs(),
        last_sync,
        replicas: replicas.clone(),
    }
}

/// The verdict on replica image `rec`, from its own record on this cluster:
/// its newest complete sync point and the checkpoint of a running delta
/// (`image_size`: the replica's size, for the checkpoint's progress, which
/// is a position in the image). Rules 3 and 4 of the module doc; whether
/// the replayer is alive is only visible on the primary's side.
pub fn assess_secondary(
    rec: &ImageRecord,
    now: DateTime<Utc>,
    rpo_factor: f64,
    image_size: Option<u64>,
) -> Assessment {
    let threshold = rpo_threshold(&rec.schedule, rpo_factor);
    let behind = rec.last_sync.as_ref().map(|l| secs_since(l.snap_time, now));
    let (state, percent, activity) = match (&rec.checkpoint, &rec.last_sync) {
        (Some(c), _) => {
            let percent = image_size
                .filter(|s| *s > 0)
                .map(|s| (c.offset as f64 * 100.0 / s as f64).clamp(0.0, 100.0));
            let mut a = syncing_text(Some(&c.to), percent, None, None);
            let _ = write!(a, " (checkpoint at {})", fmt_bytes(c.offset));
            (State::Syncing, percent, a)
        }
        (None, Some(_)) => (State::Idle, None, "replica, idle".to_string()),
        (None, None) => (State::Starting, None, "starting".to_string()),
    };
    let lag = lag_text(behind, rec.last_sync.as_ref());
    let (health, message) = match behind.filter(|b| Duration::from_secs(*b) > threshold) {
        Some(b) => (
            Health::Degraded,
            format!("{}; {activity}", rpo_text(b, threshold)),
        ),
        None => (Health::Healthy, format!("{activity}; {lag}")),
    };
    Assessment {
        health,
        message,
        state,
        percent,
        seconds_behind: behind,
        bytes_pending: None,
        bytes_per_sec: None,
        eta_seconds: None,
        rpo_threshold_seconds: threshold.as_secs(),
        last_sync: rec.last_sync.clone(),
        replicas: Vec::new(),
    }
}

/// The verdict on a demoted image (`rec.role` is `Demoted`) from
/// [`assess`] of its replicas' statuses: it is not written and waits for
/// ResyncVolume, so neither the RPO nor a silent peer counts; errors (e.g. a
/// split-brain) do.
pub fn demoted(mut a: Assessment) -> Assessment {
    if a.health == Health::Error {
        return a;
    }
    a.health = Health::Healthy;
    a.message = if a.replicas.is_empty() {
        "demoted, waiting for ResyncVolume".to_string()
    } else {
        format!(
            "demoted, waiting for ResyncVolume; last replica report: {}",
            a.message
        )
    };
    if a.state != State::Syncing {
        a.state = State::Stopped;
        a.bytes_pending = None;
        a.bytes_per_sec = None;
        a.eta_seconds = None;
    }
    a
}

/// Thresholds of the assessment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatusOptions {
    /// A replica status older than this is a silent peer.
    pub stale_after: Duration,
    /// RPO threshold as a multiple of the schedule interval.
    pub rpo_factor: f64,
}

impl StatusOptions {
    /// The thresholds of `cfg` (the RPO factor is [`DEFAULT_RPO_FACTOR`]).
    pub fn of(cfg: &EngineConfig) -> Self {
        Self {
            stale_after: cfg.peer_stale_after,
            rpo_factor: cfg.rpo_factor,
        }
    }
}

/// One image of a pool, as the status command reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageStatus {
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub name: String,
    /// librbd image id on this cluster.
    pub image_id: String,
    /// Role on this cluster.
    pub role: Role,
    /// Schedule interval, seconds.
    pub interval_seconds: u64,
    /// For a replica: its primary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<PrimaryRef>,
    /// For a replica: the running delta's checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The verdict.
    #[serde(flatten)]
    pub status: Assessment,
}

impl ImageStatus {
    /// `namespace/name`, or `name` in the default namespace.
    pub fn spec(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// Counts of a pool's images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolSummary {
    /// The worst image health.
    #[serde(serialize_with = "ser_health")]
    pub health: Health,
    /// Replicated images.
    pub images: usize,
    /// By state name.
    pub states: BTreeMap<&'static str, usize>,
    /// By role on this cluster.
    pub roles: BTreeMap<String, usize>,
}

/// The name of a role, as in the registry (`primary`, `secondary`, ...).
pub fn role_name(r: Role) -> String {
    format!("{r:?}").to_lowercase()
}

/// The replicated images of one pool (every namespace) on this cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolStatus {
    /// Pool name.
    pub pool: String,
    /// Counts.
    pub summary: PoolSummary,
    /// Images, by namespace and name.
    pub images: Vec<ImageStatus>,
}

impl PoolStatus {
    /// The status of `pool` made of `images`.
    pub fn new(pool: &str, mut images: Vec<ImageStatus>) -> Self {
        images.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut states = BTreeMap::new();
        let mut roles = BTreeMap::new();
        for i in &images {
            *states.entry(i.status.state.as_str()).or_insert(0) += 1;
            *roles.entry(role_name(i.role)).or_insert(0) += 1;
        }
        let health = images
            .iter()
            .map(|i| i.status.health)
            .max_by_key(|h| rank(*h))
            .unwrap_or(Health::Healthy);
        Self {
            pool: pool.to_string(),
            summary: PoolSummary {
                health,
                images: images.len(),
                states,
                roles,
            },
            images,
        }
    }
}

/// A pool the `status` command could not read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolError {
    /// Pool name.
    pub pool: String,
    /// Why.
    pub error: String,
}

/// What the `status` command prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusReport {
    /// Pools read.
    pub pools: Vec<PoolStatus>,
    /// Pools that could not be read.
    pub errors: Vec<PoolError>,
}

impl StatusReport {
    /// 0: every image healthy; 1: an image is degraded or in error; 2: a
    /// pool could not be read.
    pub fn exit_code(&self) -> u8 {
        if !self.errors.is_empty() {
            2
        } else if self
            .pools
            .iter()
            .any(|p| p.summary.health != Health::Healthy)
        {
            1
        } else {
            0
        }
    }
}

fn image_size(io: &Arc<IoCtx>, id: &str) -> Option<u64> {
    Image::open_by_id_read_only(io, id, None)
        .and_then(|i| i.size())
        .map_err(|e| tracing::debug!(image_id = id, error = %e, "cannot read the replica's size"))
        .ok()
}

impl Engine {
    /// The pools `status` and the metrics look at: `--pools`, or every pool
    /// of the local cluster. Blocking.
    pub fn status_pools(&self) -> Result<Vec<String>> {
        match &self.cfg.pools {
            Some(p) => Ok(p.clone()),
            None => self.local()?.pool_list().ctx(|| "listing pools".into()),
        }
    }

    /// Reads the registries of `pool` (every RBD namespace) on the local
    /// cluster and assesses each replicated image. Reads only. Blocking.
    pub fn pool_status(&self, pool: &str, opts: &StatusOptions) -> Result<PoolStatus> {
        self.pool_status_in(pool, None, opts)
    }

    /// [`Engine::pool_status`] of one RBD namespace of `pool` (`None`:
    /// every namespace); `NotFound` when the pool or the namespace does not
    /// exist. Reads only. Blocking.
    pub fn pool_status_in(
        &self,
        pool: &str,
        namespace: Option<&str>,
        opts: &StatusOptions,
    ) -> Result<PoolStatus> {
        let now = Utc::now();
        let mut images = Vec::new();
        for nio in self.pool_ioctxs(pool, namespace)? {
            let ns = nio.namespace().to_string();
            let reg = Registry::new(Arc::clone(&nio));
            for rec in reg.list()? {
                let status = match rec.role {
                    Role::Primary => {
                        let statuses = reg.statuses(&rec.image_id)?;
                        assess(&rec, &statuses, now, opts.stale_after, opts.rpo_factor)
                    }
                    Role::Demoted => {
                        let statuses = reg.statuses(&rec.image_id)?;
                        demoted(assess(
                            &rec,
                            &statuses,
                            now,
                            opts.stale_after,
                            opts.rpo_factor,
                        ))
                    }
                    Role::Secondary => {
                        let size = rec
                            .checkpoint
                            .as_ref()
                            .and_then(|_| image_size(&nio, &rec.image_id));
                        assess_secondary(&rec, now, opts.rpo_factor, size)
                    }
                };
                images.push(ImageStatus {
                    namespace: ns.clone(),
                    name: rec.image_name.clone(),
                    image_id: rec.image_id.clone(),
                    role: rec.role,
                    interval_seconds: Plan::of(&rec.schedule).interval.as_secs(),
                    primary: rec.primary.clone(),
                    checkpoint: rec.checkpoint.clone(),
                    status,
                });
            }
        }
        Ok(PoolStatus::new(pool, images))
    }

    /// The `status` command's report: `only` that pool (an error if it
    /// cannot be read), or every pool of [`Engine::status_pools`] that holds
    /// replicated images (pools this user may not read are skipped). Reads
    /// only. Blocking.
    pub fn status_report(&self, only: Option<&str>, opts: &StatusOptions) -> Result<StatusReport> {
        let pools = match only {
            Some(p) => vec![p.to_string()],
            None => self.status_pools()?,
        };
        let mut report = StatusReport::default();
        for pool in pools {
            match self.pool_status(&pool, opts) {
                Ok(ps) if only.is_some() || !ps.images.is_empty() => report.pools.push(ps),
                Ok(_) => {}
                // Pools this user may not read, or gone meanwhile, hold none
                // of its volumes.
                Err(EngineError::PermissionDenied(_) | EngineError::NotFound(_))
                    if only.is_none() => {}
                Err(e) => report.errors.push(PoolError {
                    pool,
                    error: e.to_string(),
                }),
            }
        }
        Ok(report)
    }

    /// One pass of [`collect_metrics`]. Blocking.
    fn collect_once(&self, metrics: &Metrics, opts: &StatusOptions) -> Result<()> {
        let pools = self.status_pools()?;
        let mut present: HashSet<ImageLabels> = HashSet::new();
        let mut unread: HashSet<String> = HashSet::new();
        for pool in &pools {
            match self.pool_status(pool, opts) {
                Ok(ps) => {
                    for img in &ps.images {
                        let labels = ImageLabels::new(&ps.pool, &img.namespace, &img.name);
                        record_image(metrics, &labels, &img.status);
                        present.insert(labels);
                    }
                }
                Err(e) => {
                    tracing::debug!(pool = %pool, error = %e, "no status for the metrics");
                    unread.insert(pool.clone());
                }
            }
        }
        // Images no longer in a registry, or in a pool that is gone; a pool
        // that could not be read keeps its series.
        metrics.retain_images(|l| present.contains(l) || unread.contains(&l.pool));
        Ok(())
    }
}

/// Records the assessment of one image in the per-image gauges.
pub fn record_image(metrics: &Metrics, labels: &ImageLabels, a: &Assessment) {
    metrics.replica_progress(
        labels,
        &ReplicaProgress {
            lag_seconds: a.seconds_behind.map(|s| s as f64),
            pending_bytes: a.bytes_pending,
            bytes_per_second: a.bytes_per_sec,
            rpo_threshold_seconds: a.rpo_threshold_seconds as f64,
            state: a.state.as_str(),
        },
    );
}

/// Feeds the per-image gauges of `metrics` from the registries of the
/// served pools every `every`, until `cancel`. Scrapes never wait for Ceph.
pub async fn collect_metrics(
    engine: Arc<Engine>,
    metrics: Arc<Metrics>,
    opts: StatusOptions,
    every: Duration,
    cancel: CancellationToken,
) {
    loop {
        let (e, m) = (Arc::clone(&engine), Arc::clone(&metrics));
        match tokio::task::spawn_blocking(move || e.collect_once(&m, &opts)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "status collection for the metrics failed")
            }
            Err(err) => tracing::error!(error = %err, "status collection panicked"),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// `time (took Ns, N bytes)` of a sync point.
fn sync_point_text(l: &SyncPoint) -> String {
    format!(
        "{} at {} (took {:.1}s, {})",
        l.snap_name,
        l.snap_time.format("%Y-%m-%dT%H:%M:%SZ"),
        l.duration_ms as f64 / 1000.0,
        fmt_bytes(l.bytes)
    )
}

fn state_text(state: State, percent: Option<f64>) -> String {
    match (state, percent) {
        (State::Syncing, Some(p)) => format!("syncing {p:.0}%"),
        (s, _) => s.as_str().to_string(),
    }
}

/// The `status` command's text: per pool a summary, and with `verbose` one
/// block per image. Unreadable pools are not in it (the command prints them
/// to stderr).
pub fn render_text(report: &StatusReport, verbose: bool) -> String {
    let pools = &report.pools;
    let mut out = String::new();
    if pools.is_empty() && report.errors.is_empty() {
        out.push_str("no replicated images\n");
    }
    for (n, p) in pools.iter().enumerate() {
        if n > 0 {
            out.push('\n');
        }
        let s = &p.summary;
        let _ = writeln!(out, "pool {}:", p.pool);
        let _ = writeln!(out, "health: {}", health_word(s.health));
        let roles: Vec<String> = s.roles.iter().map(|(r, n)| format!("{n} {r}")).collect();
        if roles.is_empty() {
            let _ = writeln!(out, "images: 0 total");
        } else {
            let _ = writeln!(out, "images: {} total ({})", s.images, roles.join(", "));
        }
        for (state, count) in &s.states {
            let _ = writeln!(out, "    {count} {state}");
        }
        if !verbose || p.images.is_empty() {
            continue;
        }
        out.push_str("\nIMAGES\n");
        for (k, img) in p.images.iter().enumerate() {
            if k > 0 {
                out.push('\n');
            }
            render_image(&mut out, img);
        }
    }
    out
}

fn field(out: &mut String, indent: &str, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{indent}{:<16}{value}", format!("{key}:"));
}

fn render_image(out: &mut String, img: &ImageStatus) {
    let a = &img.status;
    let _ = writeln!(out, "{}:", img.spec());
    let i = "  ";
    field(out, i, "role", role_name(img.role));
    field(out, i, "health", health_word(a.health));
    field(out, i, "state", state_text(a.state, a.percent));
    field(out, i, "description", &a.message);
    field(
        out,
        i,
        "schedule",
        format!(
            "every {}s, RPO threshold {}s",
            img.interval_seconds, a.rpo_threshold_seconds
        ),
    );
    match &a.last_sync {
        Some(l) => field(out, i, "last sync", sync_point_text(l)),
        None => field(out, i, "last sync", "none yet"),
    }
    if let Some(b) = a.seconds_behind {
        field(out, i, "seconds behind", b);
    }
    if let Some(p) = &img.primary {
        field(
            out,
            i,
            "primary",
            format!("image {} on cluster {}", p.image_id, p.fsid),
        );
    }
    if let Some(c) = &img.checkpoint {
        let pct = a.percent.map(|p| format!(", {p:.0}%")).unwrap_or_default();
        field(
            out,
            i,
            "checkpoint",
            format!(
                "{} -> {}: done below {}{pct} (delta of {})",
                c.from.as_deref().unwrap_or("(full copy)"),
                c.to,
                fmt_bytes(c.offset),
                fmt_bytes(c.total)
            ),
        );
    }
    if img.role != Role::Secondary && a.replicas.is_empty() {
        field(out, i, "replicas", "none reported");
    }
    for r in &a.replicas {
        render_replica(out, r);
    }
}

/// One replica's lines under its image in [`render_image`].
fn render_replica(out: &mut String, r: &ReplicaAssessment) {
    let _ = writeln!(out, "  replica {}:", r.replica_fsid);
    let j = "    ";
    field(out, j, "health", health_word(r.health));
    field(out, j, "state", state_text(r.state, r.percent));
    if let Some(s) = &r.syncing_snap {
        field(out, j, "syncing", s);
    }
    if let Some(v) = r.bytes_per_sec {
        field(out, j, "rate", format!("{}/s", fmt_bytes(v)));
    }
    if let Some(v) = r.seconds_behind {
        field(out, j, "seconds behind", v);
    }
    if let Some(v) = r.bytes_pending {
        field(out, j, "bytes pending", format!("{v} ({})", fmt_bytes(v)));
    }
    if let Some(v) = r.eta_seconds {
        field(out, j, "eta", format!("{v}s"));
    }
    if let Some(v) = r.entries_pending {
        field(out, j, "entries pending", v);
    }
    if let Some(v) = r.entries_per_sec {
        field(out, j, "entry rate", format!("{v}/s"));
    }
    match &r.last_sync {
        Some(l) => field(out, j, "last sync", sync_point_text(l)),
        None => field(out, j, "last sync", "none yet"),
    }
    field(
        out,
        j,
        "last report",
        format!("{}s ago", r.reported_seconds_ago),
    );
    field(out, j, "message", &r.message);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use csirr_metrics::REPLICA_STATES;

    const STALE: Duration = Duration::from_secs(60);

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2025-01-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn ago(secs: i64) -> DateTime<Utc> {
        now() - TimeDelta::seconds(secs)
    }

    // Records and statuses are made from JSON, as the registry stores them,
    // so that fields added later with defaults need no change here.
    fn primary(interval: &str) -> ImageRecord {
        serde_json::from_value(serde_json::json!({
            "version": 1,
            "image_name": "csi-vol-1",
            "image_id": "abc",
            "role": "primary",
            "mode": "snapshot",
            "schedule": { "interval": interval },
            "enabled_at": ago(3600),
        }))
        .unwrap()
    }

    fn point(seq: u32, taken_ago: i64) -> SyncPoint {
        SyncPoint {
            snap_name: format!("csirr-sync.{seq:010}"),
            snap_time: ago(taken_ago),
            completed_at: ago(taken_ago - 2),
            duration_ms: 1500,
            bytes: 64 << 20,
        }
    }

    fn status(state: ReplayState, reported_ago: i64, last: Option<SyncPoint>) -> ReplicaStatus {
        serde_json::from_value(serde_json::json!({
            "replica_fsid": "fsid-b",
            "state": state,
            "last_sync": last,
            "updated_at": ago(reported_ago),
        }))
        .unwrap()
    }

    fn syncing(reported_ago: i64, last: Option<SyncPoint>) -> ReplicaStatus {
        ReplicaStatus {
            percent: Some(42.4),
            syncing_snap: Some("csirr-sync.0000000004".into()),
            bytes_pending: Some(30 << 20),
            bytes_per_sec: Some(10 << 20),
            ..status(ReplayState::Syncing, reported_ago, last)
        }
    }

    fn check(rec: &ImageRecord, st: &[ReplicaStatus]) -> Assessment {
        assess(rec, st, now(), STALE, DEFAULT_RPO_FACTOR)
    }

    #[test]
    fn idle_and_recent_is_healthy_with_the_lag() {
        let a = check(
            &primary("5m"),
            &[status(ReplayState::Idle, 2, Some(point(3, 42)))],
        );
        assert_eq!(a.health, Health::Healthy);
        assert_eq!(a.state, State::Idle);
        assert_eq!(a.seconds_behind, Some(42));
        assert_eq!(a.bytes_pending, Some(0));
        assert_eq!(a.eta_seconds, None);
        assert_eq!(a.rpo_threshold_seconds, 600);
        assert_eq!(
            a.message,
            "replaying, idle; 42s behind (csirr-sync.0000000003)"
        );
        assert_eq!(a.last_sync, Some(point(3, 42)));
    }

    #[test]
    fn journal_replicas_report_entries_behind_and_their_rate() {
        let st = ReplicaStatus {
            entries_pending: Some(120),
            entries_per_sec: Some(900),
            ..status(ReplayState::Idle, 2, Some(point(3, 1)))
        };
        let a = check(&primary("5m"), std::slice::from_ref(&st));
        assert_eq!(
            a.message,
            "replaying, idle, 120 journal entries behind, 900 entries/s; 1s behind \
             (csirr-sync.0000000003)"
        );
        assert_eq!(a.replicas[0].entries_pending, Some(120));
        assert_eq!(a.replicas[0].entries_per_sec, Some(900));
        // A silent replica's figures are not current.
        let a = check(
            &primary("5m"),
            &[ReplicaStatus {
                updated_at: ago(500),
                ..st
            }],
        );
        assert_eq!(a.replicas[0].entries_pending, None);
    }

    #[test]
    fn syncing_reports_percent_rate_pending_and_eta() {
        let a = check(&primary("5m"), &[syncing(1, Some(point(3, 310)))]);
        assert_eq!(a.health, Health::Healthy);
        assert_eq!(a.state, State::Syncing);
        assert_eq!(a.percent, Some(42.4));
        assert_eq!(a.bytes_pending, Some(30 << 20));
        assert_eq!(a.bytes_per_sec, Some(10 << 20));
        assert_eq!(a.eta_seconds, Some(3));
        assert_eq!(
            a.message,
            "syncing csirr-sync.0000000004 42% at 10.0 MiB/s, ETA 3s; \
             310s behind (csirr-sync.0000000003)"
        );
    }

    #[test]
    fn first_sync_has_no_recovery_point_and_no_rpo_verdict() {
        let a = check(&primary("1m"), &[syncing(1, None)]);
        assert_eq!(a.health, Health::Healthy);
        assert_eq!(a.seconds_behind, None);
        assert!(a.message.ends_with("; no sync point yet"), "{}", a.message);
        let mut st = status(ReplayState::Starting, 1, None);
        st.message = "waiting for the first sync snapshot".into();
        let a = check(&primary("1m"), &[st]);
        assert_eq!(a.state, State::Starting);
        assert_eq!(a.health, Health::Healthy);
        assert_eq!(
            a.message,
            "starting: waiting for the first sync snapshot; no sync point yet"
        );
    }

    #[test]
    fn rpo_exceeded_is_degraded_with_both_numbers() {
        // 5m interval, factor 2: threshold 600s.
        let a = check(&primary("5m"), &[syncing(1, Some(point(3, 601)))]);
        assert_eq!(a.health, Health::Degraded);
        assert_eq!(a.state, State::Syncing);
        assert!(
            a.message
                .starts_with("RPO exceeded: 601s behind, threshold 600s; syncing "),
            "{}",
            a.message
        );
        assert_eq!(a.eta_seconds, Some(3));
        // Exactly at the threshold is still fine.
        let a = check(&primary("5m"), &[syncing(1, Some(point(3, 600)))]);
        assert_eq!(a.health, Health::Healthy);
        // Another factor.
        let a = assess(
            &primary("5m"),
            &[status(ReplayState::Idle, 1, Some(point(3, 400)))],
            now(),
            STALE,
            1.0,
        );
        assert_eq!(a.health, Health::Degraded);
        assert_eq!(a.rpo_threshold_seconds, 300);
        assert_eq!(
            a.message,
            "RPO exceeded: 400s behind, threshold 300s; replaying, idle"
        );
    }

    #[test]
    fn rpo_threshold_defaults_and_guards() {
        let s = Schedule::default();
        assert_eq!(rpo_threshold(&s, 2.0), Duration::from_secs(600));
        assert_eq!(rpo_threshold(&s, f64::NAN), Duration::from_secs(600));
        assert_eq!(rpo_threshold(&s, -1.0), Duration::from_secs(600));
        assert_eq!(rpo_threshold(&s, 1.5), Duration::from_secs(450));
        assert_eq!(rpo_threshold(&s, f64::MAX), Duration::MAX);
        let bad = Schedule {
            interval: Some("often".into()),
            start_time: None,
        };
        assert_eq!(rpo_threshold(&bad, 2.0), Duration::from_secs(600));
    }

    #[test]
    fn silent_peer_is_degraded_and_stopped() {
        let a = check(
            &primary("5m"),
            &[status(ReplayState::Idle, 300, Some(point(3, 320)))],
        );
        assert_eq!(a.health, Health::Degraded);
        assert_eq!(a.state, State::Stopped);
        assert_eq!(a.bytes_pending, None);
        assert_eq!(
            a.message,
            "replica silent for 300s (last report: replaying, idle); \
             320s behind (csirr-sync.0000000003)"
        );
        // Silent and past the RPO: both reasons.
        let a = check(&primary("1m"), &[syncing(90, Some(point(3, 200)))]);
        assert_eq!(a.state, State::Stopped);
        assert_eq!(a.eta_seconds, None);
        assert!(
            a.message
                .starts_with("replica silent for 90s (last report: syncing ")
                && a.message
                    .ends_with("; RPO exceeded: 200s behind, threshold 120s"),
            "{}",
            a.message
        );
        // Exactly stale_after is not silent yet.
        let a = check(
            &primary("5m"),
            &[status(ReplayState::Idle, 60, Some(point(3, 70)))],
        );
        assert_eq!(a.health, Health::Healthy);
    }

    #[test]
    fn replayer_error_is_error_with_its_message() {
        let mut st = status(ReplayState::Error, 3, Some(point(3, 30)));
        st.message = "opening primary rbd/img: permission denied".into();
        let a = check(&primary("5m"), &[st.clone()]);
        assert_eq!(a.health, Health::Error);
        assert_eq!(a.state, State::Error);
        assert_eq!(
            a.message,
            "replica error: opening primary rbd/img: permission denied"
        );
        // An old error stays an error, with its age.
        st.updated_at = ago(500);
        let a = check(&primary("5m"), &[st]);
        assert_eq!(a.health, Health::Error);
        assert!(a.message.ends_with(" (reported 500s ago)"), "{}", a.message);
        let a = check(&primary("5m"), &[status(ReplayState::Error, 1, None)]);
        assert_eq!(a.message, "replica error (no detail reported)");
    }

    #[test]
    fn split_brain_passes_through_as_error() {
        let msg = "split-brain: rbd/img is primary on both clusters; nothing is copied. \
                   Demote one side and resync it";
        for state in [ReplayState::Error, ReplayState::Idle] {
            let mut st = status(state, 1, Some(point(3, 30)));
            st.message = msg.into();
            let a = check(&primary("5m"), &[st]);
            assert_eq!(a.health, Health::Error);
            assert_eq!(a.state, State::Error);
            assert_eq!(a.message, msg);
        }
    }

    #[test]
    fn replication_stopped_on_purpose_is_degraded() {
        let mut st = status(ReplayState::Stopped, 1, None);
        st.message = "replication was disabled on the replica's site".into();
        let a = check(&primary("5m"), &[st]);
        assert_eq!((a.health, a.state), (Health::Degraded, State::Stopped));
        assert_eq!(
            a.message,
            "replication stopped: replication was disabled on the replica's site; \
             no sync point yet"
        );
    }

    #[test]
    fn demoted_image_is_neither_lagging_nor_silent() {
        let mut rec = primary("1m");
        rec.role = Role::Demoted;
        // Old sync point, silent peer: would be DEGRADED on a primary.
        let a = demoted(check(
            &rec,
            &[status(ReplayState::Idle, 900, Some(point(4, 1000)))],
        ));
        assert_eq!((a.health, a.state), (Health::Healthy, State::Stopped));
        assert!(
            a.message.starts_with(
                "demoted, waiting for ResyncVolume; last replica report: replica silent"
            ),
            "{}",
            a.message
        );
        // The final sync snapshot still being copied.
        let a = demoted(check(&rec, &[syncing(1, Some(point(3, 30)))]));
        assert_eq!((a.health, a.state), (Health::Healthy, State::Syncing));
        assert_eq!(a.eta_seconds, Some(3));
        // Errors stay errors.
        let mut st = status(ReplayState::Error, 1, None);
        st.message = "split-brain: x".into();
        let a = demoted(check(&rec, &[st]));
        assert_eq!(
            (a.health, a.message.as_str()),
            (Health::Error, "split-brain: x")
        );
        assert_eq!(
            demoted(check(&rec, &[])).message,
            "demoted, waiting for ResyncVolume"
        );
    }

    #[test]
    fn no_replica_is_starting_then_stopped() {
        let mut rec = primary("5m");
        rec.enabled_at = ago(10);
        let a = check(&rec, &[]);
        assert_eq!((a.health, a.state), (Health::Healthy, State::Starting));
        assert_eq!(a.message, "starting: waiting for a replica to report");
        rec.enabled_at = ago(120);
        let a = check(&rec, &[]);
        assert_eq!((a.health, a.state), (Health::Degraded, State::Stopped));
        assert!(
            a.message
                .starts_with("no replica has reported in the 120s since replication was enabled"),
            "{}",
            a.message
        );
    }

    #[test]
    fn worst_replica_decides_and_newest_sync_point_is_kept() {
        let good = ReplicaStatus {
            replica_fsid: "fsid-good".into(),
            ..status(ReplayState::Idle, 1, Some(point(5, 20)))
        };
        let bad = ReplicaStatus {
            replica_fsid: "fsid-bad".into(),
            ..status(ReplayState::Idle, 1, Some(point(2, 900)))
        };
        let a = check(&primary("5m"), &[good, bad]);
        assert_eq!(a.health, Health::Degraded);
        assert_eq!(a.seconds_behind, Some(900));
        assert_eq!(a.last_sync, Some(point(5, 20)));
        assert!(
            a.message
                .starts_with("replica fsid-bad: RPO exceeded: 900s behind"),
            "{}",
            a.message
        );
        assert_eq!(a.replicas.len(), 2);
    }

    #[test]
    fn odd_values_are_sanitised() {
        // Clock skew: a sync point or a report from the future.
        let mut st = syncing(-30, Some(point(3, -5)));
        st.percent = Some(f64::NAN);
        st.bytes_per_sec = Some(0);
        let a = check(&primary("5m"), &[st]);
        assert_eq!(a.health, Health::Healthy);
        assert_eq!(a.seconds_behind, Some(0));
        assert_eq!(a.percent, None);
        assert_eq!(a.eta_seconds, None);
        let mut st = syncing(1, None);
        st.percent = Some(250.0);
        assert_eq!(check(&primary("5m"), &[st]).percent, Some(100.0));
    }

    #[test]
    fn secondary_from_its_record() {
        let mut rec = primary("1m");
        rec.role = Role::Secondary;
        let a = assess_secondary(&rec, now(), 2.0, None);
        assert_eq!((a.health, a.state), (Health::Healthy, State::Starting));
        assert_eq!(a.message, "starting; no sync point yet");
        rec.last_sync = Some(point(7, 30));
        let a = assess_secondary(&rec, now(), 2.0, None);
        assert_eq!((a.health, a.state), (Health::Healthy, State::Idle));
        assert_eq!(
            a.message,
            "replica, idle; 30s behind (csirr-sync.0000000007)"
        );
        rec.checkpoint = Some(
            serde_json::from_value(serde_json::json!({
                "from": "csirr-sync.0000000007",
                "to": "csirr-sync.0000000008",
                "offset": 256 << 20,
                "total": 100 << 20,
            }))
            .unwrap(),
        );
        rec.last_sync = Some(point(7, 500));
        let a = assess_secondary(&rec, now(), 2.0, Some(1 << 30));
        assert_eq!((a.health, a.state), (Health::Degraded, State::Syncing));
        assert_eq!(a.percent, Some(25.0));
        assert_eq!(
            a.message,
            "RPO exceeded: 500s behind, threshold 120s; \
             syncing csirr-sync.0000000008 25% (checkpoint at 256.0 MiB)"
        );
    }

    #[test]
    fn states_are_the_metric_label_values() {
        for s in [
            State::Starting,
            State::Syncing,
            State::Idle,
            State::Stopped,
            State::Error,
        ] {
            assert!(REPLICA_STATES.contains(&s.as_str()), "{s:?}");
        }
    }

    fn pool_of(images: Vec<(&str, Role, Assessment)>) -> PoolStatus {
        PoolStatus::new(
            "replicapool",
            images
                .into_iter()
                .map(|(name, role, status)| ImageStatus {
                    namespace: String::new(),
                    name: name.into(),
                    image_id: format!("id-{name}"),
                    role,
                    interval_seconds: 300,
                    primary: (role == Role::Secondary).then(|| PrimaryRef {
                        fsid: "fsid-a".into(),
                        image_id: "pid".into(),
                    }),
                    checkpoint: None,
                    status,
                })
                .collect(),
        )
    }

    #[test]
    fn pool_summary_counts_and_renders() {
        let idle = check(
            &primary("5m"),
            &[status(ReplayState::Idle, 2, Some(point(3, 42)))],
        );
        let lagging = check(&primary("5m"), &[syncing(1, Some(point(3, 700)))]);
        let mut rec = primary("5m");
        rec.role = Role::Secondary;
        rec.last_sync = Some(point(2, 10));
        let replica = assess_secondary(&rec, now(), 2.0, None);
        let p = pool_of(vec![
            ("b-lagging", Role::Primary, lagging),
            ("a-idle", Role::Primary, idle),
            ("c-replica", Role::Secondary, replica),
        ]);
        assert_eq!(p.summary.health, Health::Degraded);
        assert_eq!(p.summary.images, 3);
        assert_eq!(p.summary.roles.get("primary"), Some(&2));
        assert_eq!(p.summary.roles.get("secondary"), Some(&1));
        assert_eq!(p.summary.states.get("idle"), Some(&2));
        assert_eq!(p.summary.states.get("syncing"), Some(&1));
        assert_eq!(p.images[0].name, "a-idle");

        let report = StatusReport {
            pools: vec![p.clone()],
            errors: Vec::new(),
        };
        assert_eq!(report.exit_code(), 1);
        let short = render_text(&report, false);
        assert_eq!(
            short,
            "pool replicapool:\nhealth: WARNING\nimages: 3 total (2 primary, 1 secondary)\n    \
             2 idle\n    1 syncing\n"
        );
        let long = render_text(&report, true);
        for want in [
            "IMAGES\na-idle:\n  role:           primary\n  health:         OK\n",
            "  state:          syncing 42%\n",
            "  description:    RPO exceeded: 700s behind, threshold 600s; syncing",
            "  replica fsid-b:\n    health:         WARNING\n",
            "    rate:           10.0 MiB/s\n",
            "    bytes pending:  31457280 (30.0 MiB)\n",
            "    eta:            3s\n",
            "    last sync:      csirr-sync.0000000003 at 2025-01-01T11:59:18Z (took 1.5s, 64.0 MiB)\n",
            "c-replica:\n  role:           secondary\n",
            "  primary:        image pid on cluster fsid-a\n",
        ] {
            assert!(long.contains(want), "missing {want:?} in:\n{long}");
        }

        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["summary"]["health"], "WARNING");
        assert_eq!(j["summary"]["states"]["idle"], 2);
        assert_eq!(j["images"][0]["role"], "primary");
        assert_eq!(j["images"][0]["health"], "OK");
        assert_eq!(j["images"][0]["state"], "idle");
        assert_eq!(j["images"][0]["seconds_behind"], 42);
        assert_eq!(
            j["images"][0]["last_sync"]["snap_name"],
            "csirr-sync.0000000003"
        );
        assert_eq!(j["images"][1]["replicas"][0]["eta_seconds"], 3);
        assert_eq!(j["images"][2]["primary"]["fsid"], "fsid-a");
        assert!(j["images"][2].get("replicas").is_none());
    }

    #[test]
    fn report_exit_codes() {
        let mut r = StatusReport::default();
        assert_eq!(r.exit_code(), 0);
        assert_eq!(render_text(&r, true), "no replicated images\n");
        let idle = check(
            &primary("5m"),
            &[status(ReplayState::Idle, 2, Some(point(3, 42)))],
        );
        r.pools.push(pool_of(vec![("a", Role::Primary, idle)]));
        assert_eq!(r.exit_code(), 0);
        r.errors.push(PoolError {
            pool: "gone".into(),
            error: "pool gone does not exist".into(),
        });
        assert_eq!(r.exit_code(), 2);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["errors"][0]["pool"], "gone");
        assert_eq!(j["pools"][0]["summary"]["health"], "OK");
    }

    #[test]
    fn assessments_feed_the_gauges() {
        let m = Metrics::new();
        let a = check(&primary("5m"), &[syncing(1, Some(point(3, 42)))]);
        record_image(&m, &ImageLabels::new("p", "ns", "img"), &a);
        let text = m.encode().unwrap();
        for want in [
            r#"replica_lag_seconds{pool="p",namespace="ns",image="img"} 42.0"#,
            r#"replica_pending_bytes{pool="p",namespace="ns",image="img"} 31457280"#,
            r#"replica_rpo_threshold_seconds{pool="p",namespace="ns",image="img"} 600.0"#,
            r#"replica_state{pool="p",namespace="ns",image="img",state="syncing"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }

    #[test]
    fn byte_sizes_read_well() {
        assert_eq!(fmt_bytes(0), "0 B");
        assert_eq!(fmt_bytes(1023), "1023 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(64 << 20), "64.0 MiB");
        assert_eq!(fmt_bytes(u64::MAX), "16.0 EiB");
    }
}
