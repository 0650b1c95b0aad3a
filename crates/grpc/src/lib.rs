//! gRPC layer: the csi-addons Identity, replication Controller and
//! VolumeGroup Controller services, this project's admin service (pool
//! operations, site failover and drills) and its clients (pool commands;
//! site failover and failback across two sidecars),
//! the server that carries them (unix socket and TCP, health, reflection),
//! the forwarding of every other service to ceph-csi, and the one mapping
//! from errors to status codes.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub(crate) mod authority;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod group_replication;
pub mod identity;
pub mod metrics;
pub mod migrate_client;
pub mod proto;
pub mod replication;
pub mod server;
pub mod site_client;
pub mod status;
pub mod tls;
pub mod volumegroup;
