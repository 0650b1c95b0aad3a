//! Generated csi-addons protobuf types, servers and clients.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `identity` package: the csi-addons Identity service.
pub mod identity {
    tonic::include_proto!("identity");
}

/// `replication` package: the csi-addons replication Controller service.
pub mod replication {
    tonic::include_proto!("replication");
}

/// `volumegroup` package: the csi-addons VolumeGroup Controller service.
pub mod volumegroup {
    tonic::include_proto!("volumegroup");
}

/// `fence` package: csi-addons NetworkFence, which the sidecar forwards to
/// ceph-csi (`serve --forward-endpoint`) and does not implement.
pub mod fence {
    tonic::include_proto!("fence");
}

/// `reclaimspace` package: csi-addons ReclaimSpace, forwarded like `fence`.
pub mod reclaimspace {
    tonic::include_proto!("reclaimspace");
}

/// `csirr.admin.v1` package: this project's own admin API (pool status,
/// pool promote and demote), served beside the csi-addons services.
pub mod admin {
    tonic::include_proto!("csirr.admin.v1");
}

/// `csi.v1` package: the CSI types the csi-addons protos refer to.
pub mod csi {
    /// CSI v1.
    pub mod v1 {
        tonic::include_proto!("csi.v1");
    }
}

/// Encoded `FileDescriptorSet` of the services the sidecar serves itself
/// (`identity`, `replication`, `volumegroup`, `csirr.admin.v1`), for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("csi_addons_descriptor");

/// Encoded `FileDescriptorSet` of every proto above, forwarded ones
/// included (RPC metric labels).
pub const ALL_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("csi_addons_all_descriptor");
