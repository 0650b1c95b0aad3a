//! csi-rbd-replicator: a CSI-Addons replication sidecar that copies Ceph RBD
//! images between two clusters inside its own process.
//!
//! Layers, imported one way only: [`ceph`] (safe librados/librbd wrappers, all
//! `unsafe` lives there) -> [`journal`] (the RBD journal format) -> [`csi`] (ceph-csi identities and parameters) ->
//! [`engine`] (volume resolution, registry, replayer; no gRPC) -> [`grpc`]
//! (services, the one error mapping) -> the binary's CLI.

#![warn(missing_docs)]

pub mod ceph;
pub mod csi;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod journal;
pub mod metrics;
pub mod omap;
