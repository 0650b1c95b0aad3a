//! The per-pool replication registry in RADOS.
//!
//! Layout: one object, [`REGISTRY_OBJECT`], in each pool and RADOS namespace
//! that holds replicated images. Its omap keys:
//!
//! | key | value (JSON) | written by |
//! |---|---|---|
//! | `image.<image id>` | [`ImageRecord`]: role, schedule, sync state | the sidecar of the cluster the image lives on |
//! | `status.<image id>.<replica fsid>` | [`ReplicaStatus`]: how the replica of that primary image is doing | the replayer on the replica's cluster, through its peer user |
//!
//! | `disabled.<image id>` | [`Tombstone`]: replication of this primary was disabled; its replica should go to the trash | DisableVolumeReplication on the primary; removed by the replica's replayer once handled |
//! | `detached.<primary image id>` | [`Tombstone`]: the replica of that primary was disabled here and is a normal image now; the replayer leaves it alone | DisableVolumeReplication on the replica's side |
//!
//! The object also carries the replayer's leader lease (a cls lock named
//! [`LEASE_NAME`]): only the lease holder of a cluster replays the pool.
//!
//! Image records are only ever changed by compare-and-swap: every
//! [`Registry::put`] and [`Registry::remove`] carries an `omap_cmp` of the
//! record's key against the exact bytes it held when it was read
//! ([`ImageRecord::revision`]; absent for a record created now), and the OSD
//! applies the write only if they still match. Two sidecars on one site (a
//! two-replica Deployment, a rolling update, a frozen lease holder that
//! wakes up after a takeover) can then never overwrite each other's newer
//! record: the writer that read an older value gets
//! [`EngineError::Conflict`], re-reads and decides again. Status reports
//! (`status.*`) and markers are written whole by one writer each and stay
//! plain writes.
//!
//! Sync points are RBD snapshots named `csirr-sync.<seq>.<random>` (see
//! [`sync_snap_name`]) on the primary; the replica gets a snapshot of the same
//! name once the delta up to it is completely copied. The random part makes a
//! name unique across clusters, so two sides that both acted as primary can
//! never hold different snapshots of the same name: "the newest sync snapshot
//! both sides have" is exact, which resync after split-brain relies on. A
//! process restart rebuilds all state from this object and those snapshots.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::{CephContext, EngineError, Result};
use csirr_ceph::{ErrorKind, IoCtx, OmapCmp, WriteOp};

/// Name of the registry object in each pool/namespace.
pub const REGISTRY_OBJECT: &str = "csi-rbd-replicator.registry";
/// Name of the replayer's lease lock on the registry object.
pub const LEASE_NAME: &str = "csi-rbd-replicator.replayer";
/// Prefix of sync snapshot names.
pub const SYNC_SNAP_PREFIX: &str = "csirr-sync.";

const IMAGE_KEY: &str = "image.";
const STATUS_KEY: &str = "status.";
const DISABLED_KEY: &str = "disabled.";
const DETACHED_KEY: &str = "detached.";

/// The sequence number after `newest`; an error on overflow (a hostile or
/// corrupt sync snapshot name), never a wrap to 0.
pub fn next_sync_seq(newest: u64) -> Result<u64> {
    newest.checked_add(1).ok_or_else(|| {
        EngineError::FailedPrecondition(format!(
            "the newest sync snapshot has sequence {newest}; no later one can be named"
        ))
    })
}

/// A new, unique sync snapshot name of sequence number `seq`.
pub fn sync_snap_name(seq: u64) -> String {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{SYNC_SNAP_PREFIX}{seq:010}.{}", &tag[..8])
}

/// The sequence number of a sync snapshot name (`csirr-sync.<seq>` with an
/// optional `.<tag>`), `None` for other snapshots.
pub fn sync_snap_seq(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(SYNC_SNAP_PREFIX)?;
    let digits = rest.split_once('.').map_or(rest, |(d, _)| d);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The sync snapshots among `snaps` with their sequence numbers, ordered by
/// sequence (then snapshot id).
pub fn sync_snapshots(snaps: &[csirr_ceph::SnapInfo]) -> Vec<(u64, csirr_ceph::SnapInfo)> {
    let mut v: Vec<(u64, csirr_ceph::SnapInfo)> = snaps
        .iter()
        .filter_map(|s| sync_snap_seq(&s.name).map(|q| (q, s.clone())))
        .collect();
    v.sort_by_key(|(q, s)| (*q, s.id));
    v
}

/// The sync snapshots among `snaps` by sequence number (the newest last).
pub fn sync_snaps(
    snaps: &[csirr_ceph::SnapInfo],
) -> std::collections::BTreeMap<u64, csirr_ceph::SnapInfo> {
    sync_snapshots(snaps).into_iter().collect()
}

/// Which side of a replication an image is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Written by applications; the source of sync snapshots.
    Primary,
    /// A replica written only by the replayer.
    Secondary,
    /// A former primary after DemoteVolume: locked against writers, its
    /// final sync snapshot waiting to reach the peer; becomes a replica of
    /// the new primary with ResyncVolume.
    Demoted,
}

/// Replication schedule as given by the VolumeReplicationClass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// `schedulingInterval`, e.g. `5m`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interval: Option<String>,
    /// `schedulingStartTime`, ISO 8601.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub start_time: Option<String>,
}

impl Schedule {
    /// The schedule a VolumeReplicationClass' validated parameters name.
    pub fn of(params: &csirr_csi::params::ReplicationParams) -> Self {
        let map = params.to_map();
        Self {
            interval: map.get(csirr_csi::params::SCHEDULING_INTERVAL_KEY).cloned(),
            start_time: map
                .get(csirr_csi::params::SCHEDULING_START_TIME_KEY)
                .cloned(),
        }
    }
}

/// Where the primary of a replica lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryRef {
    /// fsid of the primary's cluster.
    pub fsid: String,
    /// librbd id of the primary image.
    pub image_id: String,
}

/// A complete sync point: a snapshot that exists on both sides with equal
/// content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPoint {
    /// Snapshot name (same on both sides).
    pub snap_name: String,
    /// When the snapshot was taken on the primary.
    pub snap_time: DateTime<Utc>,
    /// When the replica finished copying it.
    pub completed_at: DateTime<Utc>,
    /// How long the copy took, in milliseconds.
    pub duration_ms: u64,
    /// Bytes copied (read from the primary and written, or zeroed).
    pub bytes: u64,
}

/// The registry record of one image on its own cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Record format version.
    pub version: u32,
    /// Image name.
    pub image_name: String,
    /// librbd image id on this cluster.
    pub image_id: String,
    /// Role on this cluster.
    pub role: Role,
    /// The mirroring mode: `snapshot` or `journal`.
    pub mode: String,
    /// Journal mode, primary: the features Enable turned on (exclusive-lock,
    /// journaling), which Disable turns off again.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub features_added: Option<u64>,
    /// Journal mode, replica: its registration in the primary's journal and
    /// how far the bootstrap got.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub journal: Option<JournalReplica>,
    /// Schedule of sync snapshots (primary side).
    #[serde(default)]
    pub schedule: Schedule,
    /// The volume ID replication was enabled with, when it was a CSI handle.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub volume_id: Option<String>,
    /// When replication was enabled (primary) or the replica created.
    pub enabled_at: DateTime<Utc>,
    /// For a replica: its primary.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub primary: Option<PrimaryRef>,
    /// For a replica: the newest complete sync point.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_sync: Option<SyncPoint>,
    /// For a replica: progress of the delta being copied, so that a restart
    /// resumes it instead of starting over.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub checkpoint: Option<Checkpoint>,
    /// For a replica: `last_sync` was recorded once its data was flushed,
    /// before the replica's snapshot of it existed; the head holds exactly
    /// that sync point until this snapshot is taken, which happens before
    /// anything writes the replica again (or promotes it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pending_snap: Option<String>,
    /// Byte-rate cap of this image's replication (bytes/s), from the
    /// `bandwidthLimit` parameter; applied by the replayer.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth_limit: Option<u64>,
    /// Primary: the replica of this image, when it is a clone, is a flat
    /// copy even when its parent is replicated (`replicaClones=flatten`).
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub flatten_replica: bool,
    /// Primary: a live-migration of the image (`rbd migration prepare`)
    /// seen by its sidecar and not finished yet: replication pauses at the
    /// last sync point until it is committed (the record then follows the
    /// new image) or aborted.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub live_migration: Option<LiveMigration>,
    /// Primary: the image id this record followed a committed
    /// live-migration from; the replica of that id follows it too.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub migrated_from: Option<String>,
    /// Primary: where the image was before a committed live-migration to
    /// another pool, namespace or name; the replica, still there on the
    /// peer, moves the same way before it syncs again.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub moved_from: Option<Place>,
    /// Demoted: the final sync snapshot taken by DemoteVolume.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub demotion_snap: Option<String>,
    /// When and how the role last changed, for operators.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub role_change: Option<RoleChange>,
    /// What the record's key held when this record was read (never
    /// stored): the value [`Registry::put`] expects to replace.
    #[serde(skip)]
    pub revision: Revision,
}

impl ImageRecord {
    /// A new record of image `image_name` (`image_id`) in `role`, enabled
    /// now, with nothing replicated, migrated or changed yet.
    pub fn new(
        image_name: String,
        image_id: String,
        role: Role,
        mode: String,
        schedule: Schedule,
    ) -> ImageRecord {
        ImageRecord {
            version: 1,
            image_name,
            image_id,
            role,
            mode,
            features_added: None,
            journal: None,
            schedule,
            volume_id: None,
            enabled_at: Utc::now(),
            primary: None,
            last_sync: None,
            checkpoint: None,
            pending_snap: None,
            bandwidth_limit: None,
            flatten_replica: false,
            live_migration: None,
            migrated_from: None,
            moved_from: None,
            demotion_snap: None,
            role_change: None,
            revision: Revision::default(),
        }
    }
}

/// Where an image lives in its cluster: pool, RADOS namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// The pool's name.
    pub pool: String,
    /// The RADOS namespace (`""`: the default one).
    #[serde(default)]
    pub namespace: String,
    /// The image's name.
    pub name: String,
}

/// A live-migration of a primary image (`rbd migration prepare`), as the
/// scheduler last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMigration {
    /// The destination image's pool id, namespace, name and id.
    pub dest_pool_id: i64,
    /// See `dest_pool_id`.
    #[serde(default)]
    pub dest_namespace: String,
    /// See `dest_pool_id`.
    pub dest_name: String,
    /// See `dest_pool_id`.
    pub dest_id: String,
    /// librbd's state: prepared, executing, executed, ...
    pub state: String,
    /// When the scheduler saw that state.
    pub seen_at: DateTime<Utc>,
}

/// The stored bytes of a record as it was read, or none for a record not
/// stored yet: what a conditional write compares the key against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revision(Option<Arc<[u8]>>);

impl Revision {
    /// The revision of a record read as `stored`.
    pub(crate) fn of(stored: &[u8]) -> Self {
        Self(Some(stored.into()))
    }

    /// The stored bytes (none: the record must not exist yet).
    pub(crate) fn stored(&self) -> Option<&[u8]> {
        self.0.as_deref()
    }
}

/// A journal-mode replica's state (in its own record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalReplica {
    /// Its client id in the primary's journal.
    pub client_id: String,
    /// The bootstrap snapshot while the replay has not passed its
    /// `SnapCreate` yet: IO entries before it are already in the replica
    /// and are skipped. `None` once passed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub skip_until: Option<String>,
    /// The primary's demotion (its `<orphan>` tag) once the replay applied
    /// it: the replica holds everything the primary wrote, and a planned
    /// promotion may proceed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub demoted_at: Option<u64>,
}

/// The last role change of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// When.
    pub at: DateTime<Utc>,
    /// What happened, e.g. `promoted (forced, rolled back 12 MiB)`.
    pub what: String,
}

/// A marker that replication of an image was disabled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// Image id the marker is about (the primary's).
    pub image_id: String,
    /// Image name.
    pub image_name: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// How far a delta got: every extent below `offset` of the delta from
/// snapshot `from` (none: the first full copy) to snapshot `to` is on the
/// replica and flushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Base snapshot of the delta.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub from: Option<String>,
    /// Target snapshot of the delta.
    pub to: String,
    /// Offset below which the delta is complete.
    pub offset: u64,
    /// Bytes the delta has in all.
    pub total: u64,
}

/// The ioctx of every RBD namespace of the pool of `io` (the default
/// namespace's, which must be `io`, first): where the registries of a pool
/// live. A pool without a namespace directory has only the default one.
pub fn namespace_ioctxs(io: &Arc<IoCtx>) -> Result<Vec<Arc<IoCtx>>> {
    let names = match csirr_ceph::rbd::namespace_list(io) {
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            return Err(e).ctx(|| format!("listing the RBD namespaces of pool {}", io.pool()));
        }
    };
    let mut out = vec![Arc::clone(io)];
    for ns in names {
        out.push(
            io.cluster()
                .ioctx_by_id(io.pool_id(), io.pool(), &ns)
                .ctx(|| format!("opening {}/{ns}", io.pool()))?,
        );
    }
    Ok(out)
}

/// What the replayer is doing with one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayState {
    /// Replica being created, nothing copied yet.
    Starting,
    /// Copying a delta.
    Syncing,
    /// Up to date with the newest sync snapshot.
    Idle,
    /// Not replaying on purpose (demoted image waiting for a resync, replica
    /// detached); see the message.
    Stopped,
    /// Stopped with an error; see the message.
    Error,
    /// A state a newer version reported that this one does not know.
    #[serde(other)]
    Unknown,
}

/// How the replica of an image is doing, as its replayer reports it to the
/// primary's registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// fsid of the replica's cluster.
    pub replica_fsid: String,
    /// State.
    pub state: ReplayState,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// Progress of the running sync, 0-100.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub percent: Option<f64>,
    /// Snapshot being synced.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub syncing_snap: Option<String>,
    /// Newest complete sync point.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_sync: Option<SyncPoint>,
    /// Bytes of the running sync still to copy.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_pending: Option<u64>,
    /// Copy rate of the running sync, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_per_sec: Option<u64>,
    /// Journal mode: entries of the primary's journal not replayed yet.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entries_pending: Option<u64>,
    /// Journal mode: entries replayed per second since the last report.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub entries_per_sec: Option<u64>,
    /// When this status was written (a heartbeat).
    pub updated_at: DateTime<Utc>,
}

/// The registry of one pool/namespace.
#[derive(Clone)]
pub struct Registry {
    io: Arc<IoCtx>,
}

impl Registry {
    /// The registry in `io`'s pool and namespace.
    pub fn new(io: Arc<IoCtx>) -> Self {
        Self { io }
    }

    /// Tells the peers' replayers watching this registry that a record
    /// changed (fire and forget), so that they act now rather than at their
    /// next poll.
    pub fn announce(&self) {
        super::wakeup::announce(&self.io, REGISTRY_OBJECT);
    }

    /// The ioctx.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.io
    }

    fn read_prefix(&self, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        match self.io.omap_get_all(REGISTRY_OBJECT, prefix) {
            Ok(m) => Ok(m),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).ctx(|| format!("reading the registry of {}", self.io.spec())),
        }
    }

    fn decode<T: for<'de> Deserialize<'de>>(&self, key: &str, v: &[u8]) -> Result<T> {
        serde_json::from_slice(v).map_err(|e| {
            EngineError::Internal(format!(
                "registry record {key} in {} is corrupt: {e}",
                self.io.spec()
            ))
        })
    }

    /// The record of image `id`, if any.
    pub fn get(&self, id: &str) -> Result<Option<ImageRecord>> {
        let key = format!("{IMAGE_KEY}{id}");
        let m = match self.io.omap_get_vals_by_keys(REGISTRY_OBJECT, &[&key]) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", self.io.spec())),
        };
        m.get(&key).map(|v| self.decode_record(&key, v)).transpose()
    }

    fn decode_record(&self, key: &str, v: &[u8]) -> Result<ImageRecord> {
        let mut rec: ImageRecord = self.decode(key, v)?;
        rec.revision = Revision::of(v);
        Ok(rec)
    }

    /// Decodes every value of `prefix`, skipping (and reporting, per key)
    /// the ones this version cannot read: a corrupt value, or a record of a
    /// newer version with a role this one does not know. Such a record is
    /// never acted on: not replicated over, not removed.
    fn decode_all<T: for<'de> Deserialize<'de>>(&self, prefix: &str) -> Result<Vec<T>> {
        self.decode_all_with(prefix, |k, v| self.decode(k, v))
    }

    fn decode_all_with<T>(
        &self,
        prefix: &str,
        decode: impl Fn(&str, &[u8]) -> Result<T>,
    ) -> Result<Vec<T>> {
        Ok(self
            .read_prefix(prefix)?
            .iter()
            .filter_map(|(k, v)| match decode(k, v) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "skipping a registry record this version cannot read");
                    None
                }
            })
            .collect())
    }

    /// All image records this version can read (see [`Registry::decode_all`]).
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        self.decode_all_with(IMAGE_KEY, |k, v| self.decode_record(k, v))
    }

    /// Writes `rec` if its key still holds what `rec` was read as (a record
    /// that was not read from the registry must not exist yet), and makes
    /// what was written `rec`'s revision, so that the caller can change and
    /// write it again. [`EngineError::Conflict`] when another writer changed
    /// or created the record since: nothing is written, and the caller
    /// re-reads it and decides again.
    pub fn put(&self, rec: &mut ImageRecord) -> Result<()> {
        let key = format!("{IMAGE_KEY}{}", rec.image_id);
        let val = serde_json::to_vec(rec).map_err(|e| EngineError::Internal(e.to_string()))?;
        self.swap(&key, rec.revision.stored(), Some(&val), &[])?;
        rec.revision = Revision::of(&val);
        Ok(())
    }

    /// Removes the record `rec` and the replica statuses of its image, if
    /// the record still holds what `rec` was read as; else
    /// [`EngineError::Conflict`] and nothing is removed. A record already
    /// gone is not an error.
    pub fn remove(&self, rec: &ImageRecord) -> Result<()> {
        let id = &rec.image_id;
        let status_keys: Vec<String> = self
            .read_prefix(&format!("{STATUS_KEY}{id}."))?
            .into_keys()
            .collect();
        let key = format!("{IMAGE_KEY}{id}");
        let also: Vec<&str> = status_keys.iter().map(String::as_str).collect();
        self.swap(&key, rec.revision.stored(), None, &also)
    }

    /// Moves the record `old` (as it was read) to `new`'s image id, the
    /// replica statuses of the old id removed, in one operation that the
    /// OSD applies only if `old`'s key still holds what it was read as
    /// (else [`EngineError::Conflict`] and nothing changes): a primary
    /// image that a committed live-migration replaced.
    pub fn rebind(&self, old: &ImageRecord, new: &mut ImageRecord) -> Result<()> {
        let old_key = format!("{IMAGE_KEY}{}", old.image_id);
        let new_key = format!("{IMAGE_KEY}{}", new.image_id);
        let mut gone: Vec<String> = self
            .read_prefix(&format!("{STATUS_KEY}{}.", old.image_id))?
            .into_keys()
            .collect();
        gone.push(old_key.clone());
        let val = serde_json::to_vec(new).map_err(|e| EngineError::Internal(e.to_string()))?;
        let mut op = WriteOp::new().ctx(|| "creating a write op".into())?;
        op.omap_cmp(
            &old_key,
            OmapCmp::Eq,
            old.revision.stored().unwrap_or_default(),
        );
        op.omap_set(&[(new_key.as_str(), val.as_slice())]);
        let keys: Vec<&str> = gone.iter().map(String::as_str).collect();
        op.omap_rm_keys(&keys);
        match op.operate(&self.io, REGISTRY_OBJECT) {
            Ok(()) => {
                new.revision = Revision::of(&val);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Canceled => Err(EngineError::Conflict(format!(
                "the registry record {old_key} in {} was changed by another writer since it \
                 was read; re-read it and retry",
                self.io.spec()
            ))),
            Err(e) => Err(e).ctx(|| {
                format!(
                    "moving {old_key} to {new_key} in the registry of {}",
                    self.io.spec()
                )
            }),
        }
    }

    /// Replaces omap `key` (with `new`, or removes it and `also`) in one
    /// operation that the OSD applies only if the key holds `expected`
    /// (`None`: the key is absent; a missing key compares equal to an empty
    /// value, and records are never empty).
    pub(crate) fn swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
        also: &[&str],
    ) -> Result<()> {
        let what = || format!("writing {key} in the registry of {}", self.io.spec());
        for attempt in 0..2 {
            let mut op = WriteOp::new().ctx(|| "creating a write op".into())?;
            op.omap_cmp(key, OmapCmp::Eq, expected.unwrap_or_default());
            match new {
                Some(v) => op.omap_set(&[(key, v)]),
                None => {
                    let mut keys = also.to_vec();
                    keys.push(key);
                    op.omap_rm_keys(&keys);
                }
            }
            let err = match op.operate(&self.io, REGISTRY_OBJECT) {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            match err.kind() {
                ErrorKind::Canceled => {
                    tracing::info!(key, pool = %self.io.spec(), "registry record changed by another writer since it was read");
                    return Err(EngineError::Conflict(format!(
                        "the registry record {key} in {} was changed by another writer since \
                         it was read (another sidecar on this site?); re-read it and retry",
                        self.io.spec()
                    )));
                }
                // No registry object: nothing to remove, or, for a record
                // created now, the object to create first (a compare needs
                // an object). A record that was read and whose object is gone
                // was removed by someone else.
                ErrorKind::NotFound if new.is_none() => return Ok(()),
                ErrorKind::NotFound if expected.is_none() && attempt == 0 => {
                    let mut op = WriteOp::new().ctx(|| "creating a write op".into())?;
                    op.create(false);
                    op.operate(&self.io, REGISTRY_OBJECT).ctx(what)?;
                }
                ErrorKind::NotFound => {
                    return Err(EngineError::Conflict(format!(
                        "the registry of {} was removed since {key} was read; re-read it and retry",
                        self.io.spec()
                    )));
                }
                _ => return Err(err).ctx(what),
            }
        }
        Err(EngineError::Internal(format!(
            "{}: the registry object vanished while it was created",
            what()
        )))
    }

    /// Statuses reported by the replicas of primary image `id`.
    pub fn statuses(&self, id: &str) -> Result<Vec<ReplicaStatus>> {
        self.decode_all(&format!("{STATUS_KEY}{id}."))
    }

    /// Reports the status of the replica (on cluster `st.replica_fsid`) of
    /// primary image `id`.
    pub fn put_status(&self, id: &str, st: &ReplicaStatus) -> Result<()> {
        let key = format!("{STATUS_KEY}{id}.{}", st.replica_fsid);
        let val = serde_json::to_vec(st).map_err(|e| EngineError::Internal(e.to_string()))?;
        self.io
            .omap_set(REGISTRY_OBJECT, &[(&key, &val)])
            .ctx(|| format!("reporting status to {}", self.io.spec()))
    }

    fn put_marker(&self, prefix: &str, t: &Tombstone) -> Result<()> {
        let key = format!("{prefix}{}", t.image_id);
        let val = serde_json::to_vec(t).map_err(|e| EngineError::Internal(e.to_string()))?;
        self.io
            .omap_set(REGISTRY_OBJECT, &[(&key, &val)])
            .ctx(|| format!("writing the registry of {}", self.io.spec()))
    }

    fn markers(&self, prefix: &str) -> Result<Vec<Tombstone>> {
        self.decode_all(prefix)
    }

    fn remove_key(&self, key: &str) -> Result<()> {
        match self.io.omap_rm_keys(REGISTRY_OBJECT, &[key]) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            r => r.ctx(|| format!("writing the registry of {}", self.io.spec())),
        }
    }

    /// Records that replication of primary image `t.image_id` was disabled.
    pub fn put_tombstone(&self, t: &Tombstone) -> Result<()> {
        self.put_marker(DISABLED_KEY, t)
    }

    /// Disabled primaries whose replicas have not handled it yet.
    pub fn tombstones(&self) -> Result<Vec<Tombstone>> {
        self.markers(DISABLED_KEY)
    }

    /// Forgets a tombstone (its replica was handled).
    pub fn remove_tombstone(&self, image_id: &str) -> Result<()> {
        self.remove_key(&format!("{DISABLED_KEY}{image_id}"))
    }

    /// Records that the local replica of primary `t.image_id` was detached.
    pub fn put_detached(&self, t: &Tombstone) -> Result<()> {
        self.put_marker(DETACHED_KEY, t)
    }

    /// Primaries whose local replicas were detached.
    pub fn detached(&self) -> Result<Vec<Tombstone>> {
        self.markers(DETACHED_KEY)
    }

    /// Forgets a detached marker (replication of that primary resumes).
    pub fn remove_detached(&self, primary_image_id: &str) -> Result<()> {
        self.remove_key(&format!("{DETACHED_KEY}{primary_image_id}"))
    }

    /// Takes or renews the replayer lease for `ttl`. `Ok(false)` when another
    /// process holds it.
    pub fn acquire_lease(&self, cookie: &str, ttl: Duration) -> Result<bool> {
        // The lock needs the object to exist.
        let mut op = csirr_ceph::WriteOp::new().ctx(|| "creating a write op".into())?;
        op.create(false);
        op.operate(&self.io, REGISTRY_OBJECT)
            .ctx(|| format!("creating the registry of {}", self.io.spec()))?;
        match self.io.lock_exclusive(
            REGISTRY_OBJECT,
            LEASE_NAME,
            cookie,
            "csi-rbd-replicator replayer lease",
            Some(ttl),
        ) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.kind(), ErrorKind::Busy | ErrorKind::AlreadyExists) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("taking the replayer lease on {}", self.io.spec())),
        }
    }

    /// Gives the lease up (on shutdown).
    pub fn release_lease(&self, cookie: &str) {
        let _ = self.io.unlock(REGISTRY_OBJECT, LEASE_NAME, cookie);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sequence_never_wraps() {
        assert_eq!(next_sync_seq(1).unwrap(), 2);
        assert!(next_sync_seq(u64::MAX).is_err());
        // A hostile name parses to u64::MAX and stops there.
        let max = sync_snap_seq(&format!("csirr-sync.{}", u64::MAX)).unwrap();
        assert!(next_sync_seq(max).is_err());
    }

    #[test]
    fn snap_names_are_unique_round_trip_and_sort() {
        let a = sync_snap_name(7);
        assert!(a.starts_with("csirr-sync.0000000007."), "{a}");
        assert_ne!(a, sync_snap_name(7));
        assert_eq!(sync_snap_seq(&a), Some(7));
        assert_eq!(sync_snap_seq("csirr-sync.0000000007"), Some(7));
        assert_eq!(sync_snap_seq("user-snap"), None);
        assert_eq!(sync_snap_seq("csirr-sync.x"), None);
        assert_eq!(sync_snap_seq("csirr-sync..abc"), None);
        assert!(sync_snap_name(9) < sync_snap_name(10));
    }

    #[test]
    fn record_json_round_trip() {
        let r = ImageRecord {
            primary: Some(PrimaryRef {
                fsid: "f".into(),
                image_id: "p".into(),
            }),
            bandwidth_limit: Some(1 << 20),
            ..ImageRecord::new(
                "csi-vol-1".into(),
                "abc".into(),
                Role::Secondary,
                "snapshot".into(),
                Schedule {
                    interval: Some("5m".into()),
                    start_time: None,
                },
            )
        };
        let j = serde_json::to_string(&r).unwrap();
        assert!(!j.contains("revision"), "{j}");
        assert!(j.contains("\"role\":\"secondary\""), "{j}");
        let back: ImageRecord = serde_json::from_str(&j).unwrap();
        assert_eq!(back, r);
    }
}
