//! gRPC layer: the csi-addons Identity and replication Controller services.

pub mod proto;
