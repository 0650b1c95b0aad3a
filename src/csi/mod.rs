//! ceph-csi identities: volume handles, the ceph-csi `config.json` and
//! cluster-mapping files, VolumeReplicationClass parameters.
