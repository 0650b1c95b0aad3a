//! Fuzz target: `csi_rbd_replicator::fuzzing::params`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| csi_rbd_replicator::fuzzing::params(data));
