//! csi-rbd-replicator: a CSI-Addons replication sidecar that copies Ceph RBD
//! images between two clusters inside its own process.
//!
//! Layers, imported one way only (checked by `tests/layers.rs`): [`ceph`]
//! (safe librados/librbd wrappers, all `unsafe` lives there), [`csi`]
//! (ceph-csi identities and parameters) and [`metrics`] at the bottom ->
//! [`journal`] (the RBD journal format) and [`omap`] (ceph-csi's omap
//! journal) -> [`engine`] (volume resolution, registry, replayer; no gRPC,
//! no CLI) -> [`grpc`] (services, the one error mapping) -> the binary
//! (CLI, wiring; `omap-generate` and `migrate` glue).

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
