//! Volume group IDs as ceph-csi mints them, so that a group created here and
//! one created by ceph-csi are named alike.
//!
//! ceph-csi encodes a group ID exactly like a volume handle
//! (`0001-<cluster ID length, 4 hex>-<cluster ID>-<pool ID, 16 hex>-<uuid>`,
//! see [`super::handle`]): the pool is the one that holds the RBD group and
//! its omap journal, and the uuid names both the journal object
//! `csi.volume.group.<uuid>` and the RBD group `csi-vol-group-<uuid>`.
//! Nothing in the string tells a group ID from a volume handle; the RPC it
//! arrives in does.

use std::fmt;

use super::handle::{HandleError, VolumeHandle};

/// ceph-csi's default prefix of RBD group names (`csi-vol-group-<uuid>`).
pub const DEFAULT_GROUP_NAME_PREFIX: &str = "csi-vol-group-";

/// A validated volume group ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeGroupId(VolumeHandle);

/// A volume group ID that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupIdError {
    /// The request carries no group ID.
    #[error("volume group ID is empty")]
    Empty,
    /// The string is not in ceph-csi's ID encoding.
    #[error("volume group ID: {0}")]
    Encoding(#[from] HandleError),
    /// An RBD group name without the prefix ceph-csi's group IDs need.
    #[error("RBD group name {name:?} does not start with {prefix:?}")]
    NotAGroupName {
        /// The name.
        name: String,
        /// The prefix it needs.
        prefix: &'static str,
    },
}

impl VolumeGroupId {
    /// Builds an ID from its parts, checking each as [`parse`](Self::parse)
    /// does.
    pub fn new(
        cluster_id: impl Into<String>,
        pool_id: i64,
        uuid: impl Into<String>,
    ) -> Result<Self, GroupIdError> {
        Ok(Self(VolumeHandle::new(cluster_id, pool_id, uuid)?))
    }

    /// Parses the ID of a request.
    pub fn parse(s: &str) -> Result<Self, GroupIdError> {
        if s.is_empty() {
            return Err(GroupIdError::Empty);
        }
        Ok(Self(VolumeHandle::parse(s)?))
    }

    /// The ID of RBD group `name` (`csi-vol-group-<uuid>`) in pool
    /// `pool_id` of cluster `cluster_id`, as ceph-csi's `MakeVolumeGroupID`
    /// composes it.
    pub fn from_group_name(
        cluster_id: &str,
        pool_id: i64,
        name: &str,
    ) -> Result<Self, GroupIdError> {
        let uuid = name
            .strip_prefix(DEFAULT_GROUP_NAME_PREFIX)
            .ok_or_else(|| GroupIdError::NotAGroupName {
                name: name.to_string(),
                prefix: DEFAULT_GROUP_NAME_PREFIX,
            })?;
        Self::new(cluster_id, pool_id, uuid)
    }

    /// The cluster ID.
    pub fn cluster_id(&self) -> &str {
        self.0.cluster_id()
    }

    /// The id of the pool that holds the group and its journal.
    pub fn pool_id(&self) -> i64 {
        self.0.pool_id()
    }

    /// The uuid.
    pub fn uuid(&self) -> &str {
        self.0.uuid()
    }

    /// The RBD group's name, `csi-vol-group-<uuid>`.
    pub fn group_name(&self) -> String {
        format!("{DEFAULT_GROUP_NAME_PREFIX}{}", self.uuid())
    }

    /// The ID read as a volume handle, for resolving its cluster and pool
    /// through ceph-csi's config and cluster mapping.
    pub fn as_handle(&self) -> &VolumeHandle {
        &self.0
    }
}

impl fmt::Display for VolumeGroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "b0285c97-a0ce-11eb-8c66-0242ac110002";

    #[test]
    fn encodes_as_ceph_csi_does() {
        let id = VolumeGroupId::new("rook-ceph", 2, UUID).unwrap();
        assert_eq!(
            id.to_string(),
            format!("0001-0009-rook-ceph-0000000000000002-{UUID}")
        );
        assert_eq!(id.group_name(), format!("csi-vol-group-{UUID}"));
        assert_eq!(VolumeGroupId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(
            (id.cluster_id(), id.pool_id(), id.uuid()),
            ("rook-ceph", 2, UUID)
        );
    }

    #[test]
    fn from_group_name_needs_the_prefix() {
        let id =
            VolumeGroupId::from_group_name("site-a", 17, &format!("csi-vol-group-{UUID}")).unwrap();
        assert_eq!(
            id.to_string(),
            format!("0001-0006-site-a-0000000000000011-{UUID}")
        );
        assert!(matches!(
            VolumeGroupId::from_group_name("site-a", 17, &format!("csi-vol-{UUID}")),
            Err(GroupIdError::NotAGroupName { .. })
        ));
        assert!(matches!(
            VolumeGroupId::from_group_name("site-a", 17, "csi-vol-group-nope"),
            Err(GroupIdError::Encoding(_))
        ));
    }

    #[test]
    fn rejects_what_ceph_csi_would_not_write() {
        assert_eq!(VolumeGroupId::parse(""), Err(GroupIdError::Empty));
        for bad in [
            "group-1",
            "replicapool/img",
            "0001-0009-rook-ceph-00000000000000zz-b0285c97-a0ce-11eb-8c66-0242ac110002",
            "0001-0009-rook-ceph-0000000000000002-not-a-uuid",
            "0002-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002",
        ] {
            let e = VolumeGroupId::parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("volume group ID"), "{bad}: {e}");
        }
    }
}
