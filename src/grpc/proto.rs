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

/// Encoded `FileDescriptorSet` of all the protos above, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("csi_addons_descriptor");
