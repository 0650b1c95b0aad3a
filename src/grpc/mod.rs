//! gRPC layer: the csi-addons Identity and replication Controller services.

mod authority;
pub mod proto;
pub mod server;
