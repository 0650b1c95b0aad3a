//! csi-rbd-replicator: a CSI-Addons replication sidecar that copies Ceph RBD
//! images between two clusters inside its own process.
//!
//! The layers are crates (`crates/`), each depending only on the ones below
//! it (checked by `tests/layers.rs` over `cargo metadata`):
//!
//! - [`ceph`] (`csirr-ceph`, over the raw `csirr-ceph-sys`): safe RAII
//!   wrappers over librados and librbd, the only crates with `unsafe`;
//! - [`csi`] (ceph-csi's identities and parameters) and [`metrics`];
//! - [`journal`] (the RBD journal's format) and [`omap`] (ceph-csi's omap
//!   journal, the omap generator);
//! - [`engine`]: volume resolution, the registry, roles, the scheduler and
//!   the replayer (no gRPC, no CLI);
//! - [`grpc`]: the services, their transport and the one mapping of engine
//!   errors to gRPC codes;
//! - the binary (`src/main.rs`): the CLI and the wiring.
//!
//! This library only re-exports the layers under one name, for the
//! integration tests and the fuzz targets.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub use csirr_ceph as ceph;
pub use csirr_csi as csi;
pub use csirr_engine as engine;
pub use csirr_grpc as grpc;
pub use csirr_journal as journal;
pub use csirr_metrics as metrics;
pub use csirr_omap as omap;

#[doc(hidden)]
pub mod fuzzing;
