//! Replication of volume groups (`replication_source.volumegroup`, issue
//! 15): a group's sync point is a crash-consistent cut across all members,
//! copied member by member, and complete only when every member's replica
//! holds it.
//!
//! **A cut** `k` on the primary ([`Engine::take_cut`]): a user snapshot
//! `U_k` on every member (taken concurrently), then the group snapshot `G_k`
//! (`rbd_group_snap_create`: every member's I/O paused at once through
//! librbd's cooperative exclusive-lock hand-over; see
//! [`super::group::consistent_cut`]). Both are named `csirr-gcut.<seq>.<tag>`
//! (the member snapshots of `G_k` live in the group snapshot namespace).
//!
//! **The copy** (the replica site's replayer, [`Engine::group_pass`]): per
//! member, the primary's handle is set to its member snapshot of `G_k` by id,
//! and `rbd_diff_iterate2` lists the extents from the user snapshot `U_j` of
//! the last cut `j` the replica holds (found by name: Pacific looks up a
//! diff's start in the user namespace only) to `G_k`. `U_j` was taken before
//! `G_j`, so the list is a superset of what changed between `G_j` and `G_k`;
//! the extents are read at `G_k`, so the replica member ends up equal to its
//! member snapshot of `G_k`. The replica member then gets a user snapshot
//! named like the cut (its content is `G_k`'s). Only when every member holds
//! it is the cut recorded as the group's last complete cut; the primary's
//! older cuts are then removed. A member without a base (new in the group,
//! or a first sync) is copied whole.
//!
//! **State**: a record `group.<uuid>` ([`GroupRecord`]) in the registry
//! object of the group's pool on each side, and `gstatus.<uuid>.<fsid>`
//! ([`GroupStatus`]) written by the replica's replayer into the primary's
//! registry. Group records are written by compare-and-swap like image
//! records ([`put_record`]); besides, the RPCs on one group are serialised
//! in the process (operation lock on the group ID) and against the
//! replayer (the group's slot).
//!
//! **Membership**: a volume added to the group is copied whole before a cut
//! counts; a volume removed from it loses its cut snapshots on the primary
//! (ModifyVolumeGroupMembership), and its replica, once a cut without it is
//! complete, is unlocked, leaves the peer's group and goes to the RBD trash.
//!
//! **Roles**: Demote locks every member and takes a final cut; a planned
//! Promote succeeds once the replica's last complete cut is the peer's
//! demotion cut; a forced Promote rolls every member back to the last
//! complete cut (only the extents written since); the demoted side becomes
//! a replica again by itself when nothing was written there since its
//! demotion cut (as for volumes). Resync with force after a split brain
//! rolls the group back to the newest cut both sides hold
//! (`rbd_group_snap_rollback` to its group snapshot) and replicates from
//! there.

use std::collections::{BTreeMap, HashSet};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use csirr_ceph::{self as ceph, Cluster, ErrorKind, Image, IoCtx, features, group};
use csirr_csi::group_id::VolumeGroupId;
use csirr_csi::params::ReplicationParams;
use csirr_omap::group as journal;
use csirr_omap::journal::DEFAULT_INSTANCE;

use super::conn::Credentials;
use super::copy::{self, Extent};
use super::error::{CephContext, EngineError, Result};
use super::registry::{
    REGISTRY_OBJECT, Registry, ReplayState, Revision, Role, RoleChange, Schedule, SyncPoint,
    namespace_ioctxs,
};
use super::rollback::rollback_to;
use super::slots::image_key;
use super::{Engine, Health, LastSync, ReplicationInfo};

/// Prefix of cut names (user snapshots of members, group snapshots, and the
/// replica members' snapshots).
pub const CUT_PREFIX: &str = "csirr-gcut.";
const GROUP_KEY: &str = "group.";
const GSTATUS_KEY: &str = "gstatus.";

/// A new, unique cut name of sequence number `seq`.
pub fn cut_name(seq: u64) -> String {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{CUT_PREFIX}{seq:010}.{}", &tag[..8])
}

/// The sequence number of a cut name, `None` for other names.
pub fn cut_seq(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(CUT_PREFIX)?;
    let digits = rest.split_once('.').map_or(rest, |(d, _)| d);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// One member image of a group on one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRef {
    /// librbd image id on this cluster.
    pub image_id: String,
    /// Image name (the same on both clusters).
    pub image_name: String,
}

/// The registry record of a replicated group on one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// The group's uuid (the same on both clusters).
    pub uuid: String,
    /// The role of this side.
    pub role: Role,
    /// The primary's schedule of cuts.
    pub schedule: Schedule,
    /// The members on this cluster (on the primary: as of the newest cut).
    pub members: Vec<MemberRef>,
    /// When replication was enabled.
    pub enabled_at: DateTime<Utc>,
    /// Primary: when the newest cut was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cut_at: Option<DateTime<Utc>>,
    /// Replica: fsid of the primary's cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_fsid: Option<String>,
    /// Replica: the newest cut every member's replica holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cut: Option<SyncPoint>,
    /// Demoted: the final cut taken at demotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demotion_cut: Option<String>,
    /// The last role change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_change: Option<RoleChange>,
    /// What the record's key held when it was read (never stored): the
    /// value [`put_record`] expects to replace, as for image records.
    #[serde(skip)]
    pub revision: Revision,
}

/// How the replica of a group is doing, as its replayer reports it to the
/// primary's registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupStatus {
    /// fsid of the replica's cluster.
    pub replica_fsid: String,
    /// State.
    pub state: ReplayState,
    /// Detail.
    #[serde(default)]
    pub message: String,
    /// The newest complete cut (bytes summed over members).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_cut: Option<SyncPoint>,
    /// When this was written.
    pub updated_at: DateTime<Utc>,
}

/// The group record `uuid` in `io`'s registry object.
pub fn get_record(io: &IoCtx, uuid: &str) -> Result<Option<GroupRecord>> {
    let key = format!("{GROUP_KEY}{uuid}");
    let m = match io.omap_get_vals_by_keys(REGISTRY_OBJECT, &[&key]) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", io.spec())),
    };
    m.get(&key)
        .map(|v| {
            serde_json::from_slice(v)
                .map(|r: GroupRecord| GroupRecord {
                    revision: Revision::of(v),
                    ..r
                })
                .map_err(|e| {
                    EngineError::Internal(format!(
                        "group record {key} in {} is corrupt: {e}",
                        io.spec()
                    ))
                })
        })
        .transpose()
}

/// Every group record in `io`'s registry object (unreadable ones skipped).
pub fn list_records(io: &IoCtx) -> Result<Vec<GroupRecord>> {
    let m = match io.omap_get_all(REGISTRY_OBJECT, GROUP_KEY) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", io.spec())),
    };
    Ok(m.iter()
        .filter_map(|(k, v)| match serde_json::from_slice(v) {
            Ok(r) => Some(GroupRecord {
                revision: Revision::of(v),
                ..r
            }),
            Err(e) => {
                tracing::warn!(key = %k, error = %e, "skipping a group record this version cannot read");
                None
            }
        })
        .collect())
}

/// Writes `rec` (whole) if its key still holds what was read (or nothing,
/// for a new record): otherwise `Conflict`, and the caller decides again
/// from a fresh read, as for image records ([`Registry::put`]).
pub fn put_record(io: &Arc<IoCtx>, rec: &mut GroupRecord) -> Result<()> {
    let key = format!("{GROUP_KEY}{}", rec.uuid);
    let val = serde_json::to_vec(&*rec).map_err(|e| EngineError::Internal(e.to_string()))?;
    Registry::new(Arc::clone(io)).swap(&key, rec.revision.stored(), Some(&val), &[])?;
    rec.revision = Revision::of(&val);
    super::wakeup::announce(io, REGISTRY_OBJECT);
    Ok(())
}

/// Removes the record of group `uuid` and its replica statuses.
pub fn remove_record(io: &Arc<IoCtx>, uuid: &str) -> Result<()> {
    let mut keys: Vec<String> =
        match io.omap_get_all(REGISTRY_OBJECT, &format!("{GSTATUS_KEY}{uuid}.")) {
            Ok(m) => m.into_keys().collect(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", io.spec())),
        };
    keys.push(format!("{GROUP_KEY}{uuid}"));
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    match io.omap_rm_keys(REGISTRY_OBJECT, &refs) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        r => r.ctx(|| format!("writing the registry of {}", io.spec())),
    }?;
    super::wakeup::announce(io, REGISTRY_OBJECT);
    Ok(())
}

/// The replica statuses of group `uuid` in the primary's registry.
pub fn statuses(io: &IoCtx, uuid: &str) -> Result<Vec<GroupStatus>> {
    let m = match io.omap_get_all(REGISTRY_OBJECT, &format!("{GSTATUS_KEY}{uuid}.")) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", io.spec())),
    };
    Ok(m.values()
        .filter_map(|v| serde_json::from_slice(v).ok())
        .collect())
}

fn put_status(io: &IoCtx, uuid: &str, st: &GroupStatus) {
    let key = format!("{GSTATUS_KEY}{uuid}.{}", st.replica_fsid);
    let Ok(val) = serde_json::to_vec(st) else {
        return;
    };
    if let Err(e) = io.omap_set(REGISTRY_OBJECT, &[(&key, &val)]) {
        tracing::warn!(group = uuid, error = %e, "cannot report the group's status to the primary");
    }
}

pub(crate) fn change(what: impl Into<String>) -> Option<RoleChange> {
    Some(RoleChange {
        at: Utc::now(),
        what: what.into(),
    })
}

/// The RBD group name of group `uuid` (ceph-csi's).
pub(crate) fn gname(uuid: &str) -> String {
    format!("csi-vol-group-{uuid}")
}

/// The complete cuts among the group snapshots of `uuid` in `io`, by
/// sequence number.
pub(crate) fn group_cuts(io: &IoCtx, uuid: &str) -> Result<BTreeMap<u64, String>> {
    let snaps = match group::snap_list(io, &gname(uuid)) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).ctx(|| format!("listing the snapshots of group {uuid}")),
    };
    Ok(snaps
        .into_iter()
        .filter(|s| s.complete)
        .filter_map(|s| cut_seq(&s.name).map(|q| (q, s.name)))
        .collect())
}

/// The cut snapshots (user namespace) of `img`, by sequence number.
pub(crate) fn member_cuts(img: &Image) -> Result<BTreeMap<u64, ceph::SnapInfo>> {
    Ok(img
        .snap_list()
        .ctx(|| format!("listing snapshots of {}", img.spec()))?
        .into_iter()
        .filter_map(|s| cut_seq(&s.name).map(|q| (q, s)))
        .collect())
}

/// Removes every cut snapshot (`csirr-gcut.*`) of `img`: a volume that
/// left a replicated group keeps none.
pub(crate) fn drop_cut_snaps(img: &Image) -> Result<()> {
    for (_, s) in member_cuts(img)? {
        drop_snap(img, &s.name)?;
    }
    Ok(())
}

/// The members of RBD group `uuid` in `io` (its images in the same pool).
pub(crate) fn rbd_members(io: &Arc<IoCtx>, uuid: &str) -> Result<Vec<(MemberRef, Image)>> {
    let images = match group::image_list(io, &gname(uuid)) {
        Ok(i) => i,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).ctx(|| format!("listing the images of group {uuid}")),
    };
    let mut out = Vec::new();
    for gi in images {
        let img = Image::open(io, &gi.name).ctx(|| format!("opening group member {}", gi.name))?;
        let id = img.id().ctx(|| img.spec())?;
        out.push((
            MemberRef {
                image_id: id,
                image_name: gi.name,
            },
            img,
        ));
    }
    out.sort_by(|a, b| a.0.image_name.cmp(&b.0.image_name));
    Ok(out)
}

/// Removes snapshot `name` of `img`; absent is fine.
pub(crate) fn drop_snap(img: &Image, name: &str) -> Result<()> {
    match img.snap_remove(name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("removing {}@{name}", img.spec())),
    }
}

/// A group as a replication RPC names it.
#[derive(Debug, Clone)]
pub struct GroupRequest {
    /// The group.
    pub group: VolumeGroupId,
    /// Credentials from the RPC.
    pub creds: Option<Credentials>,
}

/// One group of the peer to replicate.
struct GroupJob {
    pool: String,
    namespace: String,
    peer: Arc<Cluster>,
    peer_io: Arc<IoCtx>,
    primary: GroupRecord,
}

impl Engine {
    /// The slot of group `uuid` in `io`: held by its cuts and copies and by
    /// the role changes and membership changes of the group.
    pub(crate) fn group_slot_key(io: &IoCtx, uuid: &str) -> String {
        format!("group:{}", image_key(io.pool(), io.namespace(), uuid))
    }

    pub(crate) fn member_key(io: &IoCtx, name: &str) -> String {
        image_key(io.pool(), io.namespace(), name)
    }

    /// Takes cut `seq` of group `uuid` in `io`: a user snapshot on every
    /// member, then the group snapshot. Returns its name and the members.
    /// Blocking.
    pub(crate) fn take_cut(&self, io: &Arc<IoCtx>, uuid: &str) -> Result<(String, Vec<MemberRef>)> {
        let members = rbd_members(io, uuid)?;
        let mut newest = group_cuts(io, uuid)?
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0);
        for (_, img) in &members {
            if let Some(q) = member_cuts(img)?.keys().next_back() {
                newest = newest.max(*q);
            }
        }
        let name = cut_name(super::registry::next_sync_seq(newest)?);
        // The user snapshots first (the bases of the next deltas), all at
        // once: each waits for a monitor round.
        let results: Vec<ceph::Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter()
                .map(|(_, img)| s.spawn(|| img.snap_create(&name)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ceph::Error::invalid_input("rbd_snap_create", "panicked"))
                    })
                })
                .collect()
        });
        let undo = |members: &[(MemberRef, Image)]| {
            for (_, img) in members {
                let _ = img.snap_remove(&name);
            }
        };
        if let Some((i, Err(e))) = results.into_iter().enumerate().find(|(_, r)| r.is_err()) {
            undo(&members);
            return Err(e).ctx(|| format!("taking cut {name} of {}", members[i].0.image_name));
        }
        let id = VolumeGroupId::new(
            self.cfg.local_cluster.cluster_id.clone(),
            io.pool_id(),
            uuid.to_string(),
        )
        .map_err(|e| EngineError::Internal(e.to_string()))?;
        if let Err(e) = super::group::consistent_cut(io, &id, &name) {
            undo(&members);
            let _ = group::snap_remove(io, &gname(uuid), &name);
            return Err(e);
        }
        Ok((name, members.into_iter().map(|(m, _)| m).collect()))
    }

    /// Cuts group `rec` now and records it. Blocking.
    fn cut_and_record(&self, io: &Arc<IoCtx>, rec: &mut GroupRecord) -> Result<String> {
        let (name, members) = self.take_cut(io, &rec.uuid)?;
        rec.members = members;
        rec.last_cut_at = Some(Utc::now());
        put_record(io, rec)?;
        Ok(name)
    }

    fn locate_for_replication(&self, req: &GroupRequest) -> Result<super::group::Located> {
        self.locate_existing(&req.group, req.creds.as_ref())
    }

    /// EnableVolumeReplication of a group: registers it as primary and takes
    /// its first cut. Members may not be replicated on their own. A replica
    /// group: nothing changes. Idempotent (the schedule is updated).
    pub async fn enable_group(
        self: &Arc<Self>,
        req: GroupRequest,
        params: ReplicationParams,
    ) -> Result<()> {
        let key = format!("volume group {}", req.group);
        self.run_locked(key, move |e| e.enable_group_blocking(&req, &params))
            .await
    }

    fn enable_group_blocking(&self, req: &GroupRequest, params: &ReplicationParams) -> Result<()> {
        if params.mirroring_mode != csirr_csi::params::MirroringMode::Snapshot {
            return Err(EngineError::InvalidArgument(format!(
                "volume group {}: only mirroringMode snapshot replicates groups",
                req.group
            )));
        }
        let g = self.locate_for_replication(req)?;
        let uuid = g.id.uuid().to_string();
        let span = tracing::info_span!("enable_group", group = %g.id);
        let _s = span.enter();
        let schedule = Schedule::of(params);
        if let Some(mut rec) = get_record(&g.io, &uuid)? {
            if rec.role == Role::Secondary {
                tracing::info!("group is a replica; enable changes nothing");
                return Ok(());
            }
            if rec.schedule != schedule {
                rec.schedule = schedule;
                put_record(&g.io, &mut rec)?;
            }
            return Ok(());
        }
        let reg = super::registry::Registry::new(Arc::clone(&g.io));
        let members = rbd_members(&g.io, &uuid)?;
        for (m, _) in &members {
            if reg.get(&m.image_id)?.is_some() {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} of group {} is replicated on its own; disable its replication \
                     before replicating the group",
                    m.image_name, g.id
                )));
            }
        }
        // The scheduler stays off the group until its first cut is taken.
        let _slot = self.take_slot(&Self::group_slot_key(&g.io, &uuid))?;
        let mut rec = GroupRecord {
            uuid,
            role: Role::Primary,
            schedule,
            members: members.into_iter().map(|(m, _)| m).collect(),
            enabled_at: Utc::now(),
            last_cut_at: None,
            primary_fsid: None,
            last_cut: None,
            demotion_cut: None,
            role_change: None,
            revision: Revision::default(),
        };
        put_record(&g.io, &mut rec)?;
        if !rec.members.is_empty() {
            let name = self.cut_and_record(&g.io, &mut rec)?;
            tracing::info!(cut = %name, members = rec.members.len(), "group replication enabled; first cut taken");
        }
        Ok(())
    }

    /// The peer's registry and cluster for group `g`. Blocking.
    fn group_peer(&self, io: &IoCtx) -> Result<(Arc<Cluster>, Arc<IoCtx>)> {
        self.peer_of(io)
    }

    fn group_record_of(&self, g: &super::group::Located) -> Result<GroupRecord> {
        get_record(&g.io, g.id.uuid())?.ok_or_else(|| {
            EngineError::FailedPrecondition(format!(
                "replication is not enabled for volume group {}",
                g.id
            ))
        })
    }

    /// Locks every member of `members` in `io` against writers (kept).
    pub(crate) fn hold_members(&self, io: &Arc<IoCtx>, members: &[MemberRef]) -> Result<()> {
        for m in members {
            let key = Self::member_key(io, &m.image_name);
            if self.held.get(&key).is_some() {
                continue;
            }
            let img =
                Image::open_by_id(io, &m.image_id).ctx(|| format!("opening group member {key}"))?;
            self.hold_lock(&key, &img)?;
        }
        Ok(())
    }

    /// Refuses (UNAVAILABLE, retry) when a member was written after cut
    /// `name`: librbd needs the members' locks free to take the group
    /// snapshot, so this process can lock them only after it, and a client
    /// that opened a member in between could have written after the cut.
    pub(crate) fn unwritten_since(
        &self,
        io: &Arc<IoCtx>,
        members: &[MemberRef],
        name: &str,
    ) -> Result<()> {
        for m in members {
            let img = Image::open_by_id_read_only(io, &m.image_id, None)
                .ctx(|| format!("opening group member {}", m.image_name))?;
            let size = img.size().ctx(|| m.image_name.clone())?;
            let written =
                crate::copy::changed_extents(&img, Some(name), size, self.cfg.limits.chunk, false)?;
            if !written.is_empty() {
                return Err(EngineError::Unavailable(format!(
                    "group member {} was written after the demotion cut {name} (a client \
                     opened it meanwhile); retry once the application has stopped",
                    m.image_name
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn release_members(&self, io: &IoCtx, members: &[MemberRef]) {
        for m in members {
            self.held.release(&Self::member_key(io, &m.image_name));
        }
    }

    /// How the demoted group `rec` in `io` relates to the peer's primary
    /// `p` (in `pio`). Blocking.
    pub(crate) fn group_divergence(
        &self,
        io: &Arc<IoCtx>,
        rec: &GroupRecord,
        pio: &Arc<IoCtx>,
        p: &GroupRecord,
    ) -> Result<Divergence> {
        // Cuts both sides hold: the group snapshots here, the user
        // snapshots of every member there.
        let ours = group_cuts(io, &rec.uuid)?;
        let mut theirs: Option<HashSet<String>> = None;
        for m in &p.members {
            let img = Image::open_by_id_read_only(pio, &m.image_id, None)
                .ctx(|| format!("opening the peer's {}", m.image_name))?;
            let names: HashSet<String> = member_cuts(&img)?.into_values().map(|s| s.name).collect();
            theirs = Some(match theirs {
                None => names,
                Some(t) => t.intersection(&names).cloned().collect(),
            });
        }
        let theirs = theirs.unwrap_or_default();
        let common = ours.values().rev().find(|n| theirs.contains(*n)).cloned();
        let Some(c) = common else {
            return Ok(Divergence::Diverged(None));
        };
        // Clean: the common cut is our demotion cut and nothing was written
        // since (the members were locked by the demotion).
        if rec.demotion_cut.as_deref() == Some(c.as_str()) {
            let mut changed = false;
            for m in &rec.members {
                let img = Image::open_by_id_read_only(io, &m.image_id, None)
                    .ctx(|| format!("opening {}", m.image_name))?;
                let size = img.size().ctx(|| img.spec())?;
                if !copy::changed_extents(&img, Some(&c), size, self.cfg.limits.chunk, false)?
                    .is_empty()
                {
                    changed = true;
                }
            }
            if !changed {
                return Ok(Divergence::Clean(c));
            }
        }
        Ok(Divergence::Diverged(Some(c)))
    }

    /// DisableVolumeReplication of a group. Primary (or demoted): its cuts
    /// and record go; the replica side detaches its members as normal
    /// images. Replica: replication goes on (the primary's Disable ends it)
    /// unless `force`, which detaches it here at its last complete cut.
    pub async fn disable_group(self: &Arc<Self>, req: GroupRequest, force: bool) -> Result<()> {
        let key = format!("volume group {}", req.group);
        self.run_locked(key, move |e| e.disable_group_blocking(&req, force))
            .await
    }

    fn disable_group_blocking(&self, req: &GroupRequest, force: bool) -> Result<()> {
        let g = match self.locate_for_replication(req) {
            Ok(g) => g,
            Err(EngineError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(rec) = get_record(&g.io, g.id.uuid())? else {
            return Ok(());
        };
        if rec.role == Role::Secondary && !force {
            tracing::info!(group = %g.id, "replica group: replication goes on; the primary's Disable ends it");
            return Ok(());
        }
        let _slot = self.take_slot(&Self::group_slot_key(&g.io, g.id.uuid()))?;
        self.detach_group(&g.io, &rec)
    }

    /// Ends replication of group `rec` on this side: a replica is rolled
    /// back to its last complete cut; cuts, locks and the record go.
    fn detach_group(&self, io: &Arc<IoCtx>, rec: &GroupRecord) -> Result<()> {
        self.release_members(io, &rec.members);
        for m in &rec.members {
            let img = match Image::open_by_id(io, &m.image_id) {
                Ok(i) => i,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e).ctx(|| format!("opening {}", m.image_name)),
            };
            if rec.role == Role::Secondary
                && let Some(l) = &rec.last_cut
            {
                for o in img.lock_owners().unwrap_or_default() {
                    let _ = img.lock_break(&o);
                }
                rollback_to(io, &img, &l.snap_name, self.cfg.limits, &|| false)?;
            }
            for (_, s) in member_cuts(&img)? {
                drop_snap(&img, &s.name)?;
            }
        }
        for name in group_cuts(io, &rec.uuid)?.into_values() {
            let _ = group::snap_remove(io, &gname(&rec.uuid), &name);
        }
        remove_record(io, &rec.uuid)?;
        tracing::info!(group = %rec.uuid, role = ?rec.role, "group replication disabled here");
        Ok(())
    }

    /// GetVolumeReplicationInfo of a group, on the primary: the newest cut
    /// every member's replica holds, with bytes summed over members.
    pub async fn group_replication_info(
        self: &Arc<Self>,
        req: GroupRequest,
    ) -> Result<ReplicationInfo> {
        self.run(move |e| e.group_info_blocking(&req)).await
    }

    fn group_info_blocking(&self, req: &GroupRequest) -> Result<ReplicationInfo> {
        let g = self.locate_for_replication(req)?;
        let rec = self.group_record_of(&g)?;
        if rec.role != Role::Primary {
            return Err(EngineError::FailedPrecondition(format!(
                "volume group {} is not primary here ({:?}); replication info is reported on \
                 the primary",
                g.id, rec.role
            )));
        }
        let sts = statuses(&g.io, g.id.uuid())?;
        let newest = sts.iter().max_by_key(|s| s.updated_at);
        let last = sts
            .iter()
            .filter_map(|s| s.last_cut.as_ref())
            .max_by_key(|l| l.snap_time);
        let stale = newest.is_some_and(|s| {
            Utc::now()
                .signed_duration_since(s.updated_at)
                .to_std()
                .unwrap_or_default()
                > self.cfg.peer_stale_after
        });
        let (health, message) = match newest {
            None => (
                Health::Unknown,
                "no replica has reported yet (first cut being copied?)".to_string(),
            ),
            Some(s) if s.state == ReplayState::Error => (Health::Error, s.message.clone()),
            Some(_) if stale => (
                Health::Degraded,
                "the replica's site has not reported recently".to_string(),
            ),
            Some(s) if last.is_none() => (
                Health::Degraded,
                format!("first cut not complete yet: {}", s.message),
            ),
            Some(s) => (
                Health::Healthy,
                format!(
                    "{:?}; last complete cut {} of {} members",
                    s.state,
                    last.map_or("", |l| l.snap_name.as_str()),
                    rec.members.len()
                ),
            ),
        };
        Ok(ReplicationInfo {
            last_sync: last.map(|l| LastSync {
                time: l.snap_time,
                duration: Duration::from_millis(l.duration_ms),
                bytes: l.bytes,
            }),
            health,
            message,
        })
    }

    /// GetReplicationDestinationInfo of a group: the group's ID on the peer
    /// (same uuid, the peer's cluster ID from the cluster mapping and the
    /// peer pool's ID) and each member's volume ID there, by the member's
    /// volume ID here (a ceph-csi handle re-minted the same way; a plain
    /// `pool/image` is the same on both sites).
    pub async fn group_destination(
        self: &Arc<Self>,
        req: GroupRequest,
    ) -> Result<(String, BTreeMap<String, String>)> {
        self.run(move |e| e.group_destination_blocking(&req)).await
    }

    fn group_destination_blocking(
        &self,
        req: &GroupRequest,
    ) -> Result<(String, BTreeMap<String, String>)> {
        let g = self.locate_for_replication(req)?;
        self.group_record_of(&g)?;
        let peer_id = self.peer_cluster_id()?;
        let (cluster, _) = self.group_peer(&g.io)?;
        let pool = g.io.pool();
        let peer_pool = cluster
            .pool_lookup(pool)
            .ctx(|| format!("looking up pool {pool} on the peer cluster {peer_id}"))?;
        let dest = VolumeGroupId::new(peer_id.clone(), peer_pool, g.id.uuid())
            .map_err(|e| EngineError::Internal(format!("minting the peer's group ID: {e}")))?;
        let volumes = g
            .attrs
            .members
            .iter()
            .map(|k| {
                let d = csirr_csi::handle::VolumeHandle::parse(k)
                    .ok()
                    .and_then(|h| h.with_location(&peer_id, peer_pool).ok())
                    .map_or_else(|| k.clone(), |h| h.to_string());
                (k.clone(), d)
            })
            .collect();
        Ok((dest.to_string(), volumes))
    }

    /// The replayer's group work over the pools whose lease this process
    /// holds: cuts of local primaries on their schedule, locks of local
    /// replicas and demoted groups, and the copy of every peer primary's
    /// newest cut. Blocking.
    pub(crate) fn group_pass(&self, cancelled: &(dyn Fn() -> bool + Sync)) -> Result<()> {
        let local = self.local()?;
        for pool in self.leases.pools() {
            if cancelled() {
                break;
            }
            let io = match local.ioctx(&pool, "") {
                Ok(io) => io,
                Err(_) => continue,
            };
            for nio in namespace_ioctxs(&io)? {
                let records = list_records(&nio)?;
                for rec in &records {
                    if let Err(e) = self.local_group(&nio, rec) {
                        tracing::warn!(group = %rec.uuid, error = %e, "group scheduler");
                    }
                }
            }
            let peers = match self.peers_of_pool(&pool) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(pool, error = %e, "no peer for group replication");
                    continue;
                }
            };
            for (_, cluster) in peers {
                let pio = match cluster.ioctx(&pool, "") {
                    Ok(p) => p,
                    Err(_) => continue,
                };
                for pnio in namespace_ioctxs(&pio)? {
                    let ns = pnio.namespace().to_string();
                    let Ok(lio) = local.ioctx(&pool, &ns) else {
                        continue;
                    };
                    let peer_records = list_records(&pnio)?;
                    self.detach_orphaned_replicas(&lio, &peer_records)?;
                    for p in peer_records {
                        if !matches!(p.role, Role::Primary | Role::Demoted) {
                            continue;
                        }
                        let job = GroupJob {
                            pool: pool.clone(),
                            namespace: ns.clone(),
                            peer: Arc::clone(&cluster),
                            peer_io: Arc::clone(&pnio),
                            primary: p,
                        };
                        if let Err(e) = self.sync_group(&job, cancelled) {
                            self.report_group_error(&job, &lio, local.fsid(), &e);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Replica groups of `lio` whose primary's replication was disabled
    /// (the peer, `peer_records`, has no record of them any more) are
    /// detached.
    fn detach_orphaned_replicas(
        &self,
        lio: &Arc<IoCtx>,
        peer_records: &[GroupRecord],
    ) -> Result<()> {
        for rec in list_records(lio)? {
            if rec.role == Role::Secondary && !peer_records.iter().any(|p| p.uuid == rec.uuid) {
                let key = Self::group_slot_key(lio, &rec.uuid);
                let slot = self.slots.get(&key);
                if let Some(_g) = slot.try_enter()
                    && let Err(e) = self.detach_group(lio, &rec)
                {
                    tracing::warn!(group = %rec.uuid, error = %e, "cannot detach replica group");
                }
            }
        }
        Ok(())
    }

    /// A failed sync of `job`: logged, counted, and reported as ERROR in
    /// the primary's registry with the replica's last complete cut.
    fn report_group_error(&self, job: &GroupJob, lio: &Arc<IoCtx>, fsid: &str, e: &EngineError) {
        tracing::warn!(group = %job.primary.uuid, error = %e, "group sync failed");
        self.note_error(e);
        put_status(
            &job.peer_io,
            &job.primary.uuid,
            &GroupStatus {
                replica_fsid: fsid.to_string(),
                state: ReplayState::Error,
                message: e.to_string(),
                last_cut: get_record(lio, &job.primary.uuid)
                    .ok()
                    .flatten()
                    .and_then(|r| r.last_cut),
                updated_at: Utc::now(),
            },
        );
    }

    /// The local half for group `rec` of `io`: a primary's cut when due;
    /// the members of a replica or demoted group locked.
    fn local_group(&self, io: &Arc<IoCtx>, rec: &GroupRecord) -> Result<()> {
        match rec.role {
            Role::Primary => {
                let plan = super::scheduler::Plan::of(&rec.schedule);
                let due = rec
                    .last_cut_at
                    .is_none_or(|t| plan.next_after(t) <= Utc::now());
                if due {
                    let key = Self::group_slot_key(io, &rec.uuid);
                    let slot = self.slots.get(&key);
                    let Some(_g) = slot.try_enter() else {
                        return Ok(());
                    };
                    // Re-read under the slot.
                    let Some(mut rec) = get_record(io, &rec.uuid)? else {
                        return Ok(());
                    };
                    if rec.role != Role::Primary {
                        return Ok(());
                    }
                    let name = self.cut_and_record(io, &mut rec)?;
                    tracing::info!(group = %rec.uuid, cut = %name, "scheduled group cut taken");
                }
            }
            Role::Demoted | Role::Secondary => {
                let key = Self::group_slot_key(io, &rec.uuid);
                let slot = self.slots.get(&key);
                // Re-read under the slot: a promotion may have released
                // the members since the records were listed.
                if let Some(_g) = slot.try_enter()
                    && let Some(rec) = get_record(io, &rec.uuid)?
                    && rec.role != Role::Primary
                {
                    self.hold_members(io, &rec.members)?;
                }
            }
        }
        Ok(())
    }

    /// Brings the local replica of the peer's group `job` up to the peer's
    /// newest complete cut. Blocking.
    fn sync_group(&self, job: &GroupJob, cancelled: &(dyn Fn() -> bool + Sync)) -> Result<()> {
        let local = self.local()?;
        let lio = local
            .ioctx(&job.pool, &job.namespace)
            .ctx(|| format!("opening {}/{} here", job.pool, job.namespace))?;
        let uuid = job.primary.uuid.clone();
        let key = Self::group_slot_key(&lio, &uuid);
        let slot = self.slots.get(&key);
        let Some(_guard) = slot.try_enter() else {
            return Ok(());
        };
        let cancelled = || cancelled() || slot.cancelled();
        let report = reporter(job, local.fsid().to_string());
        let mut rec = match get_record(&lio, &uuid)? {
            None => new_replica_record(job),
            Some(r) => r,
        };
        if self
            .settle_group_role(job, &lio, &mut rec, &report)?
            .is_break()
        {
            return Ok(());
        }
        let Some((target_seq, target)) = self.next_cut(job, &lio, &rec, &report)? else {
            return Ok(());
        };
        let target = &target;
        ensure_local_group(
            &lio,
            &job.peer_io,
            &uuid,
            &self.cfg.local_cluster.cluster_id,
        );
        let started = Instant::now();
        let cut = CutCopy {
            job,
            lio: &lio,
            rec: &rec,
            target,
            base: rec.last_cut.as_ref().map(|l| l.snap_name.clone()),
            cancelled: &cancelled,
            report: &report,
        };
        let (replicas, bytes, snap_time) = self.copy_cut(&cut)?;
        if cancelled() {
            return Err(EngineError::Unavailable(format!(
                "the sync of group {uuid} was stopped"
            )));
        }
        snapshot_members(&replicas, target)?;
        let elapsed = started.elapsed();
        rec.members = replicas.iter().map(|(m, _)| m.clone()).collect();
        rec.primary_fsid = Some(job.peer.fsid().to_string());
        rec.schedule = job.primary.schedule.clone();
        rec.last_cut = Some(SyncPoint {
            snap_name: target.clone(),
            snap_time: snap_time.unwrap_or_else(Utc::now),
            completed_at: Utc::now(),
            duration_ms: elapsed.as_millis() as u64,
            bytes,
        });
        put_record(&lio, &mut rec)?;
        tracing::info!(group = %uuid, cut = %target, members = replicas.len(), bytes, seconds = elapsed.as_secs_f64(), "group cut complete");
        report(ReplayState::Idle, String::new(), rec.last_cut.clone());
        drop(replicas);
        self.detach_left_members(&lio, &rec);
        self.prune_group(job, &lio, &rec, target_seq);
        Ok(())
    }

    /// Replicas of volumes that left the group: the local RBD group's
    /// images that the last complete cut did not copy (the record lists
    /// those it did). Each is unlocked, loses its cut snapshots, leaves the
    /// local group and goes to the RBD trash (restorable for a week with
    /// `rbd trash restore`), as a replica does when its volume's
    /// replication is disabled. Derived from the cluster's state, so a crash
    /// in between is finished after the next cut. Failures are logged and
    /// retried then.
    fn detach_left_members(&self, lio: &Arc<IoCtx>, rec: &GroupRecord) {
        let gn = gname(&rec.uuid);
        let Ok(images) = group::image_list(lio, &gn) else {
            return;
        };
        let left = images
            .into_iter()
            .filter(|gi| !rec.members.iter().any(|m| m.image_name == gi.name));
        for gi in left {
            let key = Self::member_key(lio, &gi.name);
            self.held.release(&key);
            let detached = Image::open(lio, &gi.name)
                .ctx(|| key.clone())
                .and_then(|img| drop_cut_snaps(&img))
                .and_then(|()| {
                    group::image_remove(lio, &gn, lio, &gi.name)
                        .and_then(|()| ceph::rbd::trash_move(lio, &gi.name, 7 * 86_400))
                        .ctx(|| key.clone())
                });
            match detached {
                Ok(()) => {
                    tracing::info!(group = %rec.uuid, image = %key, "volume left the group: its replica moved to the trash")
                }
                Err(e) => {
                    tracing::warn!(group = %rec.uuid, image = %key, error = %e, "cannot detach the replica of a volume that left the group; retried after the next cut")
                }
            }
        }
    }

    /// The primary's newest complete cut `(sequence, snapshot name)` when
    /// it is newer than the replica's (a primary may still hold older cuts
    /// of an earlier term); otherwise `None`, reported, and the replica's
    /// surplus cuts pruned.
    fn next_cut(
        &self,
        job: &GroupJob,
        lio: &Arc<IoCtx>,
        rec: &GroupRecord,
        report: &dyn Fn(ReplayState, String, Option<SyncPoint>),
    ) -> Result<Option<(u64, String)>> {
        let uuid = &job.primary.uuid;
        let held_seq = rec
            .last_cut
            .as_ref()
            .and_then(|l| cut_seq(&l.snap_name))
            .unwrap_or(0);
        let cuts = group_cuts(&job.peer_io, uuid)?;
        if rec.last_cut.is_some() && cuts.range(held_seq + 1..).next().is_none() {
            report(ReplayState::Idle, String::new(), rec.last_cut.clone());
            self.prune_group(job, lio, rec, held_seq);
            return Ok(None);
        }
        let Some((&target_seq, target)) = cuts.iter().next_back() else {
            report(
                ReplayState::Starting,
                "no complete cut on the primary yet".into(),
                None,
            );
            return Ok(None);
        };
        if rec
            .last_cut
            .as_ref()
            .is_some_and(|l| &l.snap_name == target)
        {
            report(ReplayState::Idle, String::new(), rec.last_cut.clone());
            self.prune_group(job, lio, rec, target_seq);
            return Ok(None);
        }
        Ok(Some((target_seq, target.clone())))
    }

    /// What a replica group whose record is not `secondary` does before it
    /// copies: a demoted one adopts the peer's primary after an orderly
    /// switch (otherwise it waits for a forced resync); demoted on both
    /// sites, or primary here after a relocation, it stops; primary on both
    /// sites is a split-brain error. Blocking.
    fn settle_group_role(
        &self,
        job: &GroupJob,
        lio: &Arc<IoCtx>,
        rec: &mut GroupRecord,
        report: &GroupReport,
    ) -> Result<ControlFlow<()>> {
        match (rec.role, job.primary.role) {
            (Role::Secondary, _) => Ok(ControlFlow::Continue(())),
            (Role::Demoted, Role::Primary) => {
                match self.group_divergence(lio, rec, &job.peer_io, &job.primary)? {
                    Divergence::Clean(cut) => {
                        let store = super::group_roles::CephGroup {
                            engine: self,
                            io: lio,
                            uuid: &job.primary.uuid,
                            name: format!("volume group {}", job.primary.uuid),
                        };
                        super::group_roles::adopt(
                            &store,
                            rec,
                            job.peer.fsid(),
                            &cut,
                            "replica again (orderly switch)",
                        )?;
                        Ok(ControlFlow::Continue(()))
                    }
                    Divergence::Diverged(c) => {
                        report(
                            ReplayState::Stopped,
                            format!(
                                "the group is demoted on the replica's site and diverged from \
                                 this primary (newest common cut: {}); it waits for \
                                 ResyncVolume with force",
                                c.as_deref().unwrap_or("none")
                            ),
                            None,
                        );
                        Ok(ControlFlow::Break(()))
                    }
                }
            }
            (Role::Demoted, _) => {
                report(
                    ReplayState::Stopped,
                    "the group is demoted on both sites; waiting for one to be promoted".into(),
                    None,
                );
                Ok(ControlFlow::Break(()))
            }
            (Role::Primary, Role::Primary) => Err(EngineError::FailedPrecondition(format!(
                "split-brain: volume group {} is primary on both sites; nothing is copied. \
                 Demote one site and resync it (ResyncVolume with force)",
                rec.uuid
            ))),
            (Role::Primary, _) => Ok(ControlFlow::Break(())),
        }
    }

    /// Copies every member of the primary to `cut.target`,
    /// `--max-concurrent-syncs` at a time. Blocking.
    fn copy_cut(&self, cut: &CutCopy<'_>) -> Result<CutCopied> {
        let mut replicas: Vec<(MemberRef, Image)> = Vec::new();
        let (mut bytes, mut snap_time) = (0u64, None);
        for batch in cut
            .job
            .primary
            .members
            .chunks(self.cfg.max_concurrent_syncs.max(1))
        {
            let done: Vec<Result<Option<Copied>>> = std::thread::scope(|s| {
                let hs: Vec<_> = batch
                    .iter()
                    .map(|m| s.spawn(|| self.copy_member_to_cut(cut, m)))
                    .collect();
                hs.into_iter()
                    .map(|h| {
                        h.join().unwrap_or_else(|_| {
                            Err(EngineError::Internal("a member copy panicked".into()))
                        })
                    })
                    .collect()
            });
            for d in done {
                if let Some((mref, replica, b, t)) = d? {
                    bytes += b;
                    snap_time = snap_time.or(t);
                    replicas.push((mref, replica));
                }
            }
        }
        Ok((replicas, bytes, snap_time))
    }

    /// One member's replica brought to `cut.target` (from the base cut when
    /// both sides hold it, in full otherwise); `None` when it is not a
    /// member at that cut. Blocking.
    fn copy_member_to_cut(&self, cut: &CutCopy<'_>, m: &MemberRef) -> Result<Option<Copied>> {
        let (job, target) = (cut.job, cut.target);
        if (cut.cancelled)() {
            return Err(EngineError::Unavailable(format!(
                "the sync of group {} was stopped",
                job.primary.uuid
            )));
        }
        let primary = Image::open_by_id_read_only(&job.peer_io, &m.image_id, None)
            .ctx(|| format!("opening the primary's {}", m.image_name))?;
        let Some(snap_id) = primary
            .group_snap_id(job.peer_io.pool_id(), &gname(&job.primary.uuid), target)
            .ctx(|| format!("finding {target} of {}", m.image_name))?
        else {
            tracing::debug!(member = %m.image_name, cut = %target, "not a member at this cut");
            return Ok(None);
        };
        let time = primary
            .snap_timestamp(snap_id)
            .ok()
            .and_then(|s| Utc.timestamp_opt(s, 0).single());
        let pbase = match &cut.base {
            Some(b) => member_cuts(&primary)?.values().any(|s| &s.name == b),
            None => false,
        };
        primary
            .snap_set_by_id(snap_id)
            .ctx(|| format!("reading the primary's {}@{target}", m.image_name))?;
        let (replica, fresh, mref) = self.open_or_create_member(cut.lio, cut.rec, m, &primary)?;
        let rbase = match &cut.base {
            Some(b) if pbase => member_cuts(&replica)?.values().any(|s| &s.name == b),
            _ => false,
        };
        let from = if rbase { cut.base.as_deref() } else { None };
        let bytes = self.copy_member(&primary, &replica, from, fresh, cut.cancelled)?;
        (cut.report)(
            ReplayState::Syncing,
            format!("copying cut {target}: {} done", m.image_name),
            cut.rec.last_cut.clone(),
        );
        Ok(Some((mref, replica, bytes, time)))
    }

    /// Opens (locked) or creates the replica of primary member `m`.
    /// Returns it, whether it is new (all zeroes), and its reference.
    fn open_or_create_member(
        &self,
        lio: &Arc<IoCtx>,
        rec: &GroupRecord,
        m: &MemberRef,
        primary: &Image,
    ) -> Result<(Image, bool, MemberRef)> {
        let key = Self::member_key(lio, &m.image_name);
        if let Some(img) = self.held.get(&key) {
            let id = img.id().ctx(|| key.clone())?;
            return Ok((
                img,
                false,
                MemberRef {
                    image_id: id,
                    image_name: m.image_name.clone(),
                },
            ));
        }
        let mut fresh = false;
        let img = match Image::open(lio, &m.image_name) {
            Ok(img) => {
                let id = img.id().ctx(|| key.clone())?;
                if !rec.members.iter().any(|r| r.image_id == id) {
                    return Err(EngineError::FailedPrecondition(format!(
                        "an image {key} exists on this cluster and is not a replica of the \
                         group's member; not overwriting it"
                    )));
                }
                img
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let pf = primary.features().ctx(|| format!("primary {key}"))?;
                let info = primary.stat().ctx(|| format!("primary {key}"))?;
                let feats = (pf | features::EXCLUSIVE_LOCK) & !features::JOURNALING;
                let opts = ceph::CreateOptions {
                    features: Some(feats),
                    order: Some(info.order as u64),
                    stripe: None,
                    data_pool: None,
                };
                ceph::rbd::create(lio, &m.image_name, info.size, &opts)
                    .ctx(|| format!("creating replica {key}"))?;
                fresh = true;
                tracing::info!(image = %key, size = info.size, "group member replica created");
                Image::open(lio, &m.image_name).ctx(|| format!("opening replica {key}"))?
            }
            Err(e) => return Err(e).ctx(|| format!("opening replica {key}")),
        };
        let id = img.id().ctx(|| key.clone())?;
        super::replayer::lock_replica(&img).ctx(|| format!("locking replica {key}"))?;
        self.held.put(&key, img.clone());
        let gn = gname(&rec.uuid);
        match group::image_add(lio, &gn, lio, &m.image_name) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                tracing::warn!(image = %key, error = %e, "cannot add the replica to its group")
            }
        }
        Ok((
            img,
            fresh,
            MemberRef {
                image_id: id,
                image_name: m.image_name.clone(),
            },
        ))
    }

    /// Copies `primary` (set to the cut's member snapshot) into `replica`:
    /// the extents changed since user snapshot `from`, or everything.
    /// Returns the bytes transferred. Blocking.
    fn copy_member(
        &self,
        primary: &Image,
        replica: &Image,
        from: Option<&str>,
        fresh: bool,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<u64> {
        let size = primary.size().ctx(|| primary.spec())?;
        if replica.size().ctx(|| replica.spec())? != size {
            replica
                .resize(size)
                .ctx(|| format!("resizing {}", replica.spec()))?;
        }
        let chunk = self.cfg.limits.chunk;
        let mut extents = copy::changed_extents(primary, from, size, chunk, false)?;
        if from.is_none() && !fresh {
            // A full copy over data: whatever the source does not cover
            // becomes zero.
            let have = copy::changed_extents(replica, None, size, chunk, false)?;
            for (s, e) in copy::uncovered(&have, &extents) {
                extents.push(Extent {
                    off: s,
                    len: e - s,
                    data: false,
                });
            }
            extents.sort_by_key(|e| e.off);
        }
        let stats = copy::copy_extents(
            copy::Source::from(primary),
            copy::Dest::from(replica),
            &extents,
            fresh,
            self.cfg.limits,
            Some(&self.budget),
            &[&*self.throttle],
            cancelled,
            &mut |_, _| {},
        )?;
        replica
            .flush()
            .ctx(|| format!("flushing {}", replica.spec()))?;
        tracing::debug!(image = %replica.spec(), from = ?from, bytes = stats.transferred(), "group member copied");
        Ok(stats.transferred())
    }

    /// Removes cuts older than the newest complete one (`keep`): on the
    /// primary its group snapshots and member snapshots, on the replica
    /// the members' snapshots. Failures are logged.
    fn prune_group(&self, job: &GroupJob, lio: &Arc<IoCtx>, rec: &GroupRecord, keep: u64) {
        let uuid = &job.primary.uuid;
        if let Ok(cuts) = group_cuts(&job.peer_io, uuid) {
            for (q, name) in cuts {
                if q < keep
                    && let Err(e) = group::snap_remove(&job.peer_io, &gname(uuid), &name)
                {
                    tracing::warn!(group = %uuid, cut = %name, error = %e, "cannot prune the primary's group snapshot");
                }
            }
        }
        for m in &job.primary.members {
            // Listed through a read-only handle (not a client of the image);
            // a writable one only while there is something to remove, as it
            // counts as a client in "is the group in use?" checks.
            let old: Vec<String> = Image::open_by_id_read_only(&job.peer_io, &m.image_id, None)
                .ok()
                .and_then(|img| member_cuts(&img).ok())
                .map(|c| {
                    c.into_iter()
                        .filter(|(q, _)| *q < keep)
                        .map(|(_, s)| s.name)
                        .collect()
                })
                .unwrap_or_default();
            if old.is_empty() {
                continue;
            }
            if let Ok(img) = Image::open_by_id(&job.peer_io, &m.image_id) {
                for name in &old {
                    let _ = drop_snap(&img, name);
                }
            }
        }
        for m in &rec.members {
            if let Some(img) = self.held.get(&Self::member_key(lio, &m.image_name))
                && let Ok(cuts) = member_cuts(&img)
            {
                for (q, s) in cuts {
                    if q < keep {
                        let _ = drop_snap(&img, &s.name);
                    }
                }
            }
        }
    }
}

/// A member copied to a cut: its replica, the bytes copied and when the
/// primary took the cut.
type Copied = (MemberRef, Image, u64, Option<DateTime<Utc>>);

/// The status callback of a group sync.
type GroupReport<'a> = dyn Fn(ReplayState, String, Option<SyncPoint>) + Sync + 'a;

/// How the replica of `job`'s group (on cluster `fsid`) reports its state:
/// a status in the primary's registry.
fn reporter(
    job: &GroupJob,
    fsid: String,
) -> impl Fn(ReplayState, String, Option<SyncPoint>) + Sync + '_ {
    move |state, message, last| {
        put_status(
            &job.peer_io,
            &job.primary.uuid,
            &GroupStatus {
                replica_fsid: fsid.clone(),
                state,
                message,
                last_cut: last,
                updated_at: Utc::now(),
            },
        );
    }
}

/// A cut copied: the members' replicas (those that are members at the
/// cut), the bytes copied, and the cut's time.
type CutCopied = (Vec<(MemberRef, Image)>, u64, Option<DateTime<Utc>>);

/// What copying one cut of a group needs.
struct CutCopy<'a> {
    job: &'a GroupJob,
    /// The group's pool and namespace here.
    lio: &'a Arc<IoCtx>,
    /// The replica group's record (before the cut).
    rec: &'a GroupRecord,
    /// The cut copied to.
    target: &'a str,
    /// The replica's last complete cut, the deltas' base where both sides
    /// hold it.
    base: Option<String>,
    cancelled: &'a (dyn Fn() -> bool + Sync),
    report: &'a GroupReport<'a>,
}

/// Snapshots every member replica at cut `target` (all at once: each waits
/// for a monitor round); one that exists already counts. Blocking.
fn snapshot_members(replicas: &[(MemberRef, Image)], target: &str) -> Result<()> {
    let snapped: Vec<Result<()>> = std::thread::scope(|s| {
        let hs: Vec<_> = replicas
            .iter()
            .map(|(_, r)| {
                s.spawn(move || match r.snap_create(target) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                    Err(e) => Err(e).ctx(|| format!("snapshotting {}@{target}", r.spec())),
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::Internal("a replica snapshot panicked".into()))
                })
            })
            .collect()
    });
    snapped.into_iter().collect()
}

/// Where a demoted group stands against the peer's primary.
pub(crate) enum Divergence {
    /// The peer holds our demotion cut and nothing was written here since.
    Clean(String),
    /// Written here after the newest common cut (or none in common).
    Diverged(Option<String>),
}

/// Creates the RBD group of `uuid` in `lio` and its ceph-csi journal (the
/// primary's request name, the members' volume IDs re-minted for this
/// cluster), so that the group ID resolves here after a failover (Ramen
/// restores the group with its ID). Best effort: failures are logged.
fn ensure_local_group(lio: &Arc<IoCtx>, pio: &IoCtx, uuid: &str, cluster_id: &str) {
    let gn = gname(uuid);
    match group::create(lio, &gn) {
        Ok(()) => tracing::info!(group = uuid, "RBD group created on the replica's cluster"),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => tracing::warn!(group = uuid, error = %e, "cannot create the RBD group here"),
    }
    let attrs = match journal::read(pio, uuid) {
        Ok(Some(a)) => a,
        Ok(None) => return,
        Err(e) => {
            tracing::debug!(group = uuid, error = %e, "no ceph-csi group journal on the primary");
            return;
        }
    };
    if matches!(journal::read(lio, uuid), Ok(Some(_))) {
        return;
    }
    if let Err(e) = journal::reserve(
        lio,
        DEFAULT_INSTANCE,
        &attrs.request_name,
        uuid,
        &gn,
        Utc::now(),
    ) {
        tracing::warn!(group = uuid, error = %e, "cannot write the group journal here");
        return;
    }
    let keys: Vec<String> = attrs
        .members
        .iter()
        .map(|k| {
            csirr_csi::handle::VolumeHandle::parse(k)
                .ok()
                .and_then(|h| h.with_location(cluster_id, lio.pool_id()).ok())
                .map_or_else(|| k.clone(), |h| h.to_string())
        })
        .collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    if let Err(e) = journal::add_members(lio, uuid, &refs) {
        tracing::warn!(group = uuid, error = %e, "cannot write the group journal's members here");
    }
}

/// The group replayer loop (beside the image replayer, which spawns it):
/// one [`Engine::group_pass`] per poll interval until `cancel`.
pub async fn run(engine: Arc<Engine>, cancel: tokio_util::sync::CancellationToken) {
    loop {
        let (e, c) = (Arc::clone(&engine), cancel.clone());
        match tokio::task::spawn_blocking(move || e.group_pass(&|| c.is_cancelled())).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                engine.note_error(&err);
                tracing::warn!(error = %err, "group replication pass failed");
            }
            Err(err) => tracing::error!(error = %err, "group replication pass panicked"),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(engine.cfg.poll_interval) => {}
        }
    }
}

/// The record of a replica group this cluster has not seen yet.
fn new_replica_record(job: &GroupJob) -> GroupRecord {
    GroupRecord {
        uuid: job.primary.uuid.clone(),
        role: Role::Secondary,
        schedule: job.primary.schedule.clone(),
        members: Vec::new(),
        enabled_at: Utc::now(),
        last_cut_at: None,
        primary_fsid: Some(job.peer.fsid().to_string()),
        last_cut: None,
        demotion_cut: None,
        role_change: None,
        revision: Revision::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_names_carry_their_sequence() {
        let n = cut_name(42);
        assert!(n.starts_with("csirr-gcut.0000000042."), "{n}");
        assert_eq!(cut_seq(&n), Some(42));
        assert_eq!(cut_seq("csirr-gcut.7"), Some(7));
        assert_eq!(cut_seq("csirr-sync.0000000001.abc"), None);
        assert_eq!(cut_seq("csirr-gcut.x1"), None);
        assert_eq!(cut_seq("csirr-gcut."), None);
    }
}
