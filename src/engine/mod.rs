//! The replication engine: volume resolution, the per-pool registry in RADOS,
//! the snapshot replayer and replication status. No gRPC types here.
