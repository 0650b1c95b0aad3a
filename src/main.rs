//! The csi-rbd-replicator command line.

fn main() {}
