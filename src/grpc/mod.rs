//! gRPC layer: the csi-addons Identity and replication Controller services,
//! the server that carries them (unix socket and TCP, health, reflection),
//! and the one mapping from engine errors to status codes.

mod authority;
pub mod identity;
pub mod metrics;
pub mod proto;
pub mod replication;
pub mod server;
pub mod status;
