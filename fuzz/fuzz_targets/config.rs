//! Fuzz target: `csi_rbd_replicator::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| csi_rbd_replicator::fuzzing::config(data));
