//! ceph-csi identities: volume handles, volume group IDs, the ceph-csi `config.json` and
//! cluster-mapping files, VolumeReplicationClass parameters.
//!
//! Pure parsing and validation: nothing here talks to Ceph or to gRPC, and the
//! only I/O is reading the two config files. Every error names the input and
//! says what is wrong, because the gRPC layer hands these messages to users as
//! INVALID_ARGUMENT.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
pub mod group_id;
pub mod handle;
pub mod params;
pub mod volume_id;

pub use config::{ClusterConfig, ClusterMapping, ConfigError, CsiConfig, PoolLocation};
pub use group_id::{GroupIdError, VolumeGroupId};
pub use handle::{HandleError, VolumeHandle};
pub use params::{FlattenMode, MirroringMode, ParamError, ReplicationParams, StartTime};
pub use volume_id::{VolumeId, VolumeIdError};
