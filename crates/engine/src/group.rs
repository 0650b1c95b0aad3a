//! Volume groups (the csi-addons VolumeGroup controller service): RBD groups
//! named and journaled as ceph-csi names and journals them
//! ([`csirr_csi::group_id`], [`csirr_omap::group`]), so that group IDs and
//! journals interoperate with ceph-csi's.
//!
//! A group lives in the pool (and RADOS namespace) of its volumes: the RBD
//! group `csi-vol-group-<uuid>` and both journal objects are there, and the
//! group ID names that pool. Volumes of different pools cannot be grouped.
//! An image is in at most one group (librbd enforces it too).
//!
//! Every change checks everything it can first (volumes resolve, one pool,
//! no member of another group) and changes nothing when a check fails. Then
//! it changes RBD first and the journal second, each step idempotent, so that
//! a retry of an interrupted call completes it. Calls on one group (by
//! request name for Create, by ID otherwise) are serialised by the engine's
//! operation locks.
//!
//! Error kinds follow the spec's tables per RPC: a volume that cannot be
//! found is `InvalidArgument` for Create (as ceph-csi answers) and `NotFound`
//! for Modify; a volume already in another group is `FailedPrecondition` for
//! Create ("volumes cannot be grouped together") and `InvalidArgument` for
//! Modify ("volume to be added is incompatible").

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::Utc;
use tracing::info;

use csirr_ceph::{ErrorKind, IoCtx, group};
use csirr_csi::group_id::VolumeGroupId;
use csirr_csi::volume_id::VolumeId;
use csirr_omap::OmapError;
use csirr_omap::group as journal;
use csirr_omap::journal::DEFAULT_INSTANCE;

use super::Engine;
use super::conn::Credentials;
use super::error::{CephContext, EngineError, Result};
use super::resolve::Resolved;

/// One member of a group as the service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// The volume ID, as the group's journal records it.
    pub volume_id: String,
    /// The image's size in bytes (0 when the image cannot be opened).
    pub size: u64,
}

/// A volume group as the service reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// ceph-csi's group ID.
    pub id: VolumeGroupId,
    /// The members, ordered by volume ID.
    pub members: Vec<GroupMember>,
}

/// A CreateVolumeGroup request, validated.
#[derive(Debug, Clone)]
pub struct CreateGroup {
    /// The request name (not empty).
    pub name: String,
    /// The `pool` parameter: required without volumes.
    pub pool: Option<String>,
    /// The `clusterID` parameter: when given, the cluster this sidecar serves.
    pub cluster_id: Option<String>,
    /// The volumes, without duplicates.
    pub volumes: Vec<VolumeId>,
    /// Credentials from the RPC.
    pub creds: Option<Credentials>,
}

/// A page of [`Engine::list_groups`].
#[derive(Debug, Clone)]
pub struct GroupPage {
    /// The groups, ordered by ID.
    pub groups: Vec<GroupInfo>,
    /// The last ID of this page when more follow.
    pub next: Option<VolumeGroupId>,
}

/// Which RPC asks: the spec gives the same condition different codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Create,
    Modify,
}

/// A pool (opened in the cluster's RADOS namespace) and the groups its
/// directory records: request name -> uuid.
type GroupDirectory = (Arc<IoCtx>, BTreeMap<String, String>);

/// A group found through its ID: where it lives and its journal.
pub(crate) struct Located {
    /// The group's pool (in the cluster's RADOS namespace).
    pub(crate) io: Arc<IoCtx>,
    /// The ID as this cluster names the group.
    pub(crate) id: VolumeGroupId,
    /// Its ceph-csi journal.
    pub(crate) attrs: journal::GroupAttrs,
}

/// A resolved volume to add, with the ID its journal key records.
struct Member {
    key: String,
    resolved: Resolved,
}

fn same_place(a: &IoCtx, b: &IoCtx) -> bool {
    a.pool_id() == b.pool_id() && a.namespace() == b.namespace()
}

impl Engine {
    fn creds<'a>(&'a self, creds: Option<&'a Credentials>) -> &'a Credentials {
        creds.unwrap_or(&self.cfg.local_creds)
    }

    /// The RADOS namespace of the cluster this sidecar serves.
    fn local_namespace(&self) -> &str {
        self.cfg
            .local_cluster
            .rados_namespace
            .as_deref()
            .unwrap_or("")
    }

    /// Resolves `volumes`, for `rpc`: unknown volumes are `InvalidArgument`
    /// (Create) or `NotFound` (Modify).
    fn resolve_members(
        &self,
        rpc: Rpc,
        volumes: &[VolumeId],
        creds: Option<&Credentials>,
    ) -> Result<Vec<Member>> {
        volumes
            .iter()
            .map(|v| match self.resolve(v, creds) {
                Ok(resolved) => Ok(Member {
                    key: v.to_string(),
                    resolved,
                }),
                Err(EngineError::NotFound(m)) if rpc == Rpc::Create => Err(
                    EngineError::InvalidArgument(format!("cannot group volume {v}: {m}")),
                ),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Checks that no member to add is in a group other than `group_name`
    /// in `io`: `FailedPrecondition` (Create) or `InvalidArgument` (Modify).
    fn check_not_grouped_elsewhere(
        rpc: Rpc,
        io: &IoCtx,
        group_name: &str,
        members: &[&Member],
    ) -> Result<()> {
        for m in members {
            let img = &m.resolved.image;
            let Some(g) = img
                .group()
                .ctx(|| format!("volume {}: reading its group", m.key))?
            else {
                continue;
            };
            if g.pool_id == io.pool_id() && g.name == group_name {
                continue;
            }
            let msg = format!(
                "volume {} (image {}) is already in RBD group {} of pool id {}; a volume can \
                 be in one group only: remove it from that group first",
                m.key,
                img.spec(),
                g.name,
                g.pool_id
            );
            return Err(match rpc {
                Rpc::Create => EngineError::FailedPrecondition(msg),
                Rpc::Modify => EngineError::InvalidArgument(msg),
            });
        }
        Ok(())
    }

    /// Adds `members` to the RBD group and then to the journal. An image
    /// that is in this group already counts as added.
    fn add_members(io: &IoCtx, id: &VolumeGroupId, members: &[&Member]) -> Result<()> {
        let gname = id.group_name();
        for m in members {
            let img = &m.resolved.image;
            match group::image_add(io, &gname, img.ioctx(), img.name()) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let g = img.group().ctx(|| format!("volume {}", m.key))?;
                    if !matches!(&g, Some(g) if g.name == gname && g.pool_id == io.pool_id()) {
                        return Err(EngineError::FailedPrecondition(format!(
                            "volume {} was added to another group meanwhile: {e}",
                            m.key
                        )));
                    }
                }
                Err(e) => {
                    return Err(e).ctx(|| format!("group {id}: adding volume {}", m.key));
                }
            }
            journal::add_members(io, id.uuid(), &[&m.key])?;
            info!(group = %id, volume = %m.key, image = %img.spec(), "volume added to group");
        }
        Ok(())
    }

    /// Removes the member recorded as `key` from the RBD group and then from
    /// the journal. A member whose volume no longer resolves only leaves the
    /// journal.
    fn remove_member(
        &self,
        io: &IoCtx,
        id: &VolumeGroupId,
        key: &str,
        creds: Option<&Credentials>,
    ) -> Result<()> {
        let gname = id.group_name();
        let resolved = VolumeId::parse(key)
            .ok()
            .map(|v| self.resolve(&v, creds))
            .transpose();
        match resolved {
            Ok(Some(r)) => {
                match group::image_remove(io, &gname, r.ioctx(), r.image.name()) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(e).ctx(|| format!("group {id}: removing volume {key}")),
                }
                // Cuts of the group's replication are no use to it any more;
                // one that cannot go (a clone made from it) stays, and the
                // membership change stands.
                if let Err(e) = super::group_repl::drop_cut_snaps(&r.image) {
                    tracing::warn!(group = %id, volume = key, error = %e, "cannot remove the cut snapshots of a volume leaving the group");
                }
            }
            Ok(None) | Err(EngineError::NotFound(_)) => {
                tracing::warn!(group = %id, volume = key, "member does not resolve; removing its journal key only");
            }
            Err(e) => return Err(e),
        }
        journal::remove_members(io, id.uuid(), &[key])?;
        info!(group = %id, volume = key, "volume removed from group");
        Ok(())
    }

    /// Finds group `id` on this cluster; `None` when no candidate pool has
    /// its journal object.
    fn locate_group(
        &self,
        id: &VolumeGroupId,
        creds: Option<&Credentials>,
    ) -> Result<Option<Located>> {
        for io in self.handle_ioctxs("volume group", id.as_handle(), self.creds(creds))? {
            let Ok(io) = io else { continue };
            if let Some(attrs) = journal::read(&io, id.uuid())? {
                // The ID as this cluster names the group (a peer's ID
                // arrives translated through the cluster mapping).
                let id = VolumeGroupId::new(
                    self.cfg.local_cluster.cluster_id.clone(),
                    io.pool_id(),
                    id.uuid(),
                )
                .map_err(|e| EngineError::Internal(e.to_string()))?;
                return Ok(Some(Located { io, id, attrs }));
            }
        }
        Ok(None)
    }

    pub(crate) fn locate_existing(
        &self,
        id: &VolumeGroupId,
        creds: Option<&Credentials>,
    ) -> Result<Located> {
        self.locate_group(id, creds)?
            .ok_or_else(|| EngineError::NotFound(format!("volume group {id} does not exist")))
    }

    /// The report of a located group: members from the journal, sizes from
    /// their images.
    fn group_info(&self, g: &Located, creds: Option<&Credentials>) -> GroupInfo {
        let members = g
            .attrs
            .members
            .iter()
            .map(|key| {
                let size = VolumeId::parse(key)
                    .ok()
                    .and_then(|v| self.resolve(&v, creds).ok())
                    .and_then(|r| r.image.size().ok())
                    .unwrap_or(0);
                GroupMember {
                    volume_id: key.clone(),
                    size,
                }
            })
            .collect();
        GroupInfo {
            id: g.id.clone(),
            members,
        }
    }

    /// The pools of this cluster (in its RADOS namespace) that `creds` can
    /// read, each with the groups its directory records (request name ->
    /// uuid).
    fn group_directories(&self, creds: Option<&Credentials>) -> Result<Vec<GroupDirectory>> {
        let cluster = self
            .conns
            .get(&self.cfg.local_cluster.mon_host(), self.creds(creds))?;
        let ns = self.local_namespace();
        let mut out = Vec::new();
        for pool in cluster.pool_list().ctx(|| "listing pools".into())? {
            let io = match cluster.ioctx(&pool, ns) {
                Ok(io) => io,
                Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => {
                    continue;
                }
                Err(e) => return Err(e).ctx(|| format!("opening pool {pool}")),
            };
            match journal::list(&io, DEFAULT_INSTANCE) {
                Ok(groups) => out.push((io, groups)),
                Err(OmapError::Ceph { source, .. })
                    if source.kind() == ErrorKind::PermissionDenied =>
                {
                    tracing::debug!(pool, "no access to the pool; its groups are not listed");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    fn create_group_blocking(&self, req: &CreateGroup) -> Result<GroupInfo> {
        let local = &self.cfg.local_cluster.cluster_id;
        if let Some(c) = &req.cluster_id
            && c != local
        {
            return Err(EngineError::InvalidArgument(format!(
                "parameter clusterID {c:?}: this sidecar serves cluster {local:?}"
            )));
        }
        let creds = req.creds.as_ref();
        let members = self.resolve_members(Rpc::Create, &req.volumes, creds)?;
        let io = self.group_pool(req, &members)?;
        self.check_name_free_elsewhere(req, &io)?;

        let existing = journal::lookup(&io, DEFAULT_INSTANCE, &req.name)?;
        let (id, recorded) = match &existing {
            Some(uuid) => {
                let id =
                    VolumeGroupId::new(local.clone(), io.pool_id(), uuid.clone()).map_err(|e| {
                        EngineError::Internal(format!("directory of {}: {e}", io.spec()))
                    })?;
                let attrs = journal::read(&io, uuid)?.unwrap_or_default();
                (id, attrs.members)
            }
            None => {
                let uuid = uuid::Uuid::new_v4().to_string();
                let id = VolumeGroupId::new(local.clone(), io.pool_id(), uuid)
                    .map_err(|e| EngineError::Internal(e.to_string()))?;
                (id, BTreeSet::new())
            }
        };
        let wanted: BTreeSet<&str> = members.iter().map(|m| m.key.as_str()).collect();
        if let Some(extra) = recorded.iter().find(|k| !wanted.contains(k.as_str())) {
            return Err(EngineError::AlreadyExists(format!(
                "volume group {:?} exists already as {id} with volume {extra}, which this \
                 request does not name; change members with ModifyVolumeGroupMembership",
                req.name
            )));
        }
        let to_add: Vec<&Member> = members
            .iter()
            .filter(|m| !recorded.contains(&m.key))
            .collect();
        let gname = id.group_name();
        Self::check_not_grouped_elsewhere(Rpc::Create, &io, &gname, &to_add)?;

        if existing.is_none() {
            journal::reserve(
                &io,
                DEFAULT_INSTANCE,
                &req.name,
                id.uuid(),
                &gname,
                Utc::now(),
            )?;
        }
        match group::create(&io, &gname) {
            Ok(()) => {
                info!(group = %id, name = %req.name, rbd_group = %gname, pool = %io.spec(), "volume group created")
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                if existing.is_none()
                    && let Err(undo) = journal::remove(&io, DEFAULT_INSTANCE, id.uuid(), &req.name)
                {
                    tracing::warn!(group = %id, error = %undo, "undoing the reservation failed");
                }
                return Err(e).ctx(|| format!("group {id}: creating RBD group {gname}"));
            }
        }
        Self::add_members(&io, &id, &to_add)?;
        let located = self.locate_existing(&id, creds)?;
        Ok(self.group_info(&located, creds))
    }

    /// The pool (and namespace) of a group being created: the volumes',
    /// all in one, which must be `pool` when given and this cluster's
    /// namespace; `pool` alone for a group without volumes.
    fn group_pool(&self, req: &CreateGroup, members: &[Member]) -> Result<Arc<IoCtx>> {
        let local = &self.cfg.local_cluster.cluster_id;
        let creds = req.creds.as_ref();
        // The pool of the group: the volumes', all one, and `pool` if given.
        let io = match (members.first(), &req.pool) {
            (Some(first), _) => Arc::clone(first.resolved.ioctx()),
            (None, Some(pool)) => self
                .conns
                .get(&self.cfg.local_cluster.mon_host(), self.creds(creds))?
                .ioctx(pool, self.local_namespace())
                .map_err(|e| {
                    EngineError::InvalidArgument(format!("parameter pool {pool:?}: {e}"))
                })?,
            (None, None) => {
                return Err(EngineError::InvalidArgument(
                    "a volume group without volumes needs the parameter pool".into(),
                ));
            }
        };
        for m in members {
            if !same_place(m.resolved.ioctx(), &io) {
                return Err(EngineError::InvalidArgument(format!(
                    "volume {} is in {}, volume {} in {}: the volumes of a group must be in \
                     one pool",
                    members[0].key,
                    io.spec(),
                    m.key,
                    m.resolved.ioctx().spec()
                )));
            }
        }
        if let Some(pool) = &req.pool
            && pool != io.pool()
        {
            return Err(EngineError::InvalidArgument(format!(
                "parameter pool {pool:?}, but the volumes are in pool {:?}",
                io.pool()
            )));
        }
        if io.namespace() != self.local_namespace() {
            return Err(EngineError::InvalidArgument(format!(
                "the volumes are in RADOS namespace {:?}, but cluster {local:?} keeps its \
                 volumes in {:?}",
                io.namespace(),
                self.local_namespace()
            )));
        }
        Ok(io)
    }

    /// Refuses a group name that another request's group has in another
    /// pool.
    fn check_name_free_elsewhere(&self, req: &CreateGroup, io: &Arc<IoCtx>) -> Result<()> {
        let creds = req.creds.as_ref();
        // The same name elsewhere: another request's group.
        for (other, groups) in self.group_directories(creds)? {
            if !same_place(&other, io) && groups.contains_key(&req.name) {
                return Err(EngineError::AlreadyExists(format!(
                    "volume group {:?} exists already in pool {}; this request puts it in {}",
                    req.name,
                    other.spec(),
                    io.spec()
                )));
            }
        }
        Ok(())
    }

    fn modify_group_blocking(
        &self,
        id: &VolumeGroupId,
        volumes: &[VolumeId],
        creds: Option<&Credentials>,
    ) -> Result<GroupInfo> {
        let g = self.locate_existing(id, creds)?;
        let members = self.resolve_members(Rpc::Modify, volumes, creds)?;
        for m in &members {
            if !same_place(m.resolved.ioctx(), &g.io) {
                return Err(EngineError::InvalidArgument(format!(
                    "volume {} is in {}, but group {} is in {}: the volumes of a group must be \
                     in its pool",
                    m.key,
                    m.resolved.ioctx().spec(),
                    g.id,
                    g.io.spec()
                )));
            }
        }
        let wanted: BTreeSet<&str> = members.iter().map(|m| m.key.as_str()).collect();
        let to_add: Vec<&Member> = members
            .iter()
            .filter(|m| !g.attrs.members.contains(&m.key))
            .collect();
        let to_remove: Vec<&String> = g
            .attrs
            .members
            .iter()
            .filter(|k| !wanted.contains(k.as_str()))
            .collect();
        let gname = g.id.group_name();
        Self::check_not_grouped_elsewhere(Rpc::Modify, &g.io, &gname, &to_add)?;
        // A group whose RBD group was lost (or never made): make it again.
        match group::create(&g.io, &gname) {
            Ok(()) => {
                tracing::warn!(group = %g.id, rbd_group = %gname, "RBD group was missing; created it again")
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("group {}: creating RBD group {gname}", g.id)),
        }
        // Not while a cut of the group's replication is taken: a cut that
        // listed a leaving volume would snapshot it after its cut snapshots
        // were dropped.
        let _slot = self.take_slot(&Self::group_slot_key(&g.io, g.id.uuid()))?;
        for key in to_remove {
            self.remove_member(&g.io, &g.id, key, creds)?;
        }
        Self::add_members(&g.io, &g.id, &to_add)?;
        let located = self.locate_existing(&g.id, creds)?;
        Ok(self.group_info(&located, creds))
    }

    fn delete_group_blocking(&self, id: &VolumeGroupId, creds: Option<&Credentials>) -> Result<()> {
        // A group this cluster cannot have (its cluster ID or pool unknown
        // here) does not exist here either: OK, as the spec asks, and the
        // deleting controller is not blocked for good.
        let located = match self.locate_group(id, creds) {
            Err(EngineError::NotFound(why)) => {
                tracing::warn!(group = %id, reason = %why, "volume group cannot be on this cluster; nothing to delete");
                None
            }
            other => other?,
        };
        let Some(g) = located else {
            info!(group = %id, "volume group does not exist; nothing to delete");
            return Ok(());
        };
        let gname = g.id.group_name();
        let images = match group::image_list(&g.io, &gname) {
            Ok(images) => images,
            Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).ctx(|| format!("group {}: listing its images", g.id)),
        };
        if !g.attrs.members.is_empty() || !images.is_empty() {
            let mut names: Vec<String> = g.attrs.members.iter().cloned().collect();
            names.extend(images.into_iter().map(|i| i.name));
            return Err(EngineError::FailedPrecondition(format!(
                "volume group {} is not empty ({}): remove its volumes with \
                 ModifyVolumeGroupMembership first; deleting a group never deletes volumes",
                g.id,
                names.join(", ")
            )));
        }
        match group::remove(&g.io, &gname) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).ctx(|| format!("group {}: removing RBD group {gname}", g.id)),
        }
        journal::remove(&g.io, DEFAULT_INSTANCE, g.id.uuid(), &g.attrs.request_name)?;
        info!(group = %g.id, rbd_group = %gname, "volume group deleted");
        Ok(())
    }

    fn list_groups_blocking(
        &self,
        max: usize,
        after: Option<&VolumeGroupId>,
        creds: Option<&Credentials>,
    ) -> Result<GroupPage> {
        let local = &self.cfg.local_cluster.cluster_id;
        let mut all: Vec<(VolumeGroupId, Arc<IoCtx>)> = Vec::new();
        for (io, groups) in self.group_directories(creds)? {
            for uuid in groups.into_values() {
                match VolumeGroupId::new(local.clone(), io.pool_id(), uuid.clone()) {
                    Ok(id) => all.push((id, Arc::clone(&io))),
                    Err(e) => {
                        tracing::warn!(pool = %io.spec(), uuid, error = %e, "skipping a malformed group directory entry")
                    }
                }
            }
        }
        // Ordered by the ID's text, which the page token is.
        all.sort_by_key(|(id, _)| id.to_string());
        all.dedup_by_key(|(id, _)| id.to_string());
        let after = after.map(ToString::to_string);
        let mut rest = all
            .into_iter()
            .filter(|(id, _)| after.as_ref().is_none_or(|a| id.to_string() > *a))
            .peekable();
        let mut groups = Vec::new();
        for (id, io) in rest.by_ref() {
            // A group deleted meanwhile is skipped, as the spec allows.
            if let Some(attrs) = journal::read(&io, id.uuid())? {
                groups.push(self.group_info(&Located { io, id, attrs }, creds));
            }
            if max > 0 && groups.len() == max {
                break;
            }
        }
        let next = if rest.peek().is_some() {
            groups.last().map(|g| g.id.clone())
        } else {
            None
        };
        Ok(GroupPage { groups, next })
    }

    /// CreateVolumeGroup: creates group `req.name` with `req.volumes`, or
    /// answers with the group that name made before (completing its
    /// members when a previous call was interrupted).
    pub async fn create_group(self: &Arc<Self>, req: CreateGroup) -> Result<GroupInfo> {
        let key = format!("volume group name {}", req.name);
        self.run_locked(key, move |e| e.create_group_blocking(&req))
            .await
    }

    /// ModifyVolumeGroupMembership: makes `volumes` the group's members.
    pub async fn modify_group(
        self: &Arc<Self>,
        id: VolumeGroupId,
        volumes: Vec<VolumeId>,
        creds: Option<Credentials>,
    ) -> Result<GroupInfo> {
        let key = format!("volume group {id}");
        self.run_locked(key, move |e| {
            e.modify_group_blocking(&id, &volumes, creds.as_ref())
        })
        .await
    }

    /// DeleteVolumeGroup: deletes an empty group; a group that does not
    /// exist is deleted already.
    pub async fn delete_group(
        self: &Arc<Self>,
        id: VolumeGroupId,
        creds: Option<Credentials>,
    ) -> Result<()> {
        let key = format!("volume group {id}");
        self.run_locked(key, move |e| e.delete_group_blocking(&id, creds.as_ref()))
            .await
    }

    /// ControllerGetVolumeGroup.
    pub async fn get_group(
        self: &Arc<Self>,
        id: VolumeGroupId,
        creds: Option<Credentials>,
    ) -> Result<GroupInfo> {
        self.run(move |e| {
            let g = e.locate_existing(&id, creds.as_ref())?;
            Ok(e.group_info(&g, creds.as_ref()))
        })
        .await
    }

    /// ListVolumeGroups: at most `max` groups (0: all) with IDs after
    /// `after`, ordered by ID.
    pub async fn list_groups(
        self: &Arc<Self>,
        max: usize,
        after: Option<VolumeGroupId>,
        creds: Option<Credentials>,
    ) -> Result<GroupPage> {
        self.run(move |e| e.list_groups_blocking(max, after.as_ref(), creds.as_ref()))
            .await
    }
}

/// Takes a crash-consistent cut of group `id` (whose pool is `io`) as group
/// snapshot `snap`, and checks that librbd marked it complete. Blocking.
///
/// The cut is librbd's group snapshot (`rbd_group_snap_create`): it
/// quiesces every member and takes every member's exclusive lock through
/// the cooperative hand-over (the writers flush, then their new writes wait
/// for the lock), snapshots each member, then releases them all, so no
/// member's snapshot holds a write made after another member's snapshot
/// was taken. Taking the locks ourselves with `rbd_lock_acquire` would do
/// the same for ordering, but librbd refuses other clients' writes with
/// `EROFS` while such a lock is held (it is how replicas are fenced): on a
/// primary that is an I/O error in the application, not a pause.
///
/// Not usable for deltas yet: the member snapshots live in the group
/// snapshot namespace, and Pacific's `rbd_diff_iterate2` finds its start
/// snapshot by name in the user namespace only (docs/volume-groups.md).
pub fn consistent_cut(io: &IoCtx, id: &VolumeGroupId, snap: &str) -> Result<()> {
    let gname = id.group_name();
    group::snap_create(io, &gname, snap)
        .ctx(|| format!("group {id}: taking group snapshot {snap}"))?;
    let complete = group::snap_list(io, &gname)
        .ctx(|| format!("group {id}: listing its snapshots"))?
        .into_iter()
        .any(|s| s.name == snap && s.complete);
    if !complete {
        return Err(EngineError::Internal(format!(
            "group {id}: group snapshot {snap} is not complete after rbd_group_snap_create"
        )));
    }
    info!(group = %id, snap, "crash-consistent cut taken");
    Ok(())
}
