//! Fuzz target: `csi_rbd_replicator::fuzzing::journal` (RBD journal
//! entries, librbd events, and the journal header's records). The seed
//! corpus in corpus/journal holds real 16.2.15 entries and header values;
//! docs/journal.md says how it was captured.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| csi_rbd_replicator::fuzzing::journal(data));
