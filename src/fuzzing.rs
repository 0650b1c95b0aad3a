//! Entry points for the cargo-fuzz targets in `fuzz/`: each feeds arbitrary
//! bytes to one parser of untrusted input and must return, never panic.
//! Not an API: the functions exist so that the fuzz crate can reach parsers
//! that are private to this crate.

use std::collections::HashMap;

pub use csirr_ceph::objects::fuzz_snap_context as snap_context;
pub use csirr_grpc::fuzzing::{authority, hpack};

/// Registry values: image records, replica statuses, tombstones, and the
/// sync snapshot name parser.
pub fn registry(data: &[u8]) {
    use crate::engine::registry::{ImageRecord, ReplicaStatus, Tombstone, sync_snap_seq};
    if let Ok(rec) = serde_json::from_slice::<ImageRecord>(data) {
        // What this version reads, it writes back readable.
        let again = serde_json::to_vec(&rec).expect("a record serializes");
        let back: ImageRecord = serde_json::from_slice(&again).expect("and reads back");
        assert_eq!(back.image_id, rec.image_id);
    }
    let _ = serde_json::from_slice::<ReplicaStatus>(data);
    let _ = serde_json::from_slice::<Tombstone>(data);
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(seq) = sync_snap_seq(s)
    {
        let _ = crate::engine::registry::next_sync_seq(seq);
    }
}

/// Volume IDs (ceph-csi handles and `pool[/ns]/image`), and omap journal
/// values.
pub fn volume_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = crate::csi::volume_id::VolumeId::parse(s) {
        // What parses prints back to something that parses the same.
        let again = id.to_string();
        assert_eq!(
            crate::csi::volume_id::VolumeId::parse(&again).map(|i| i.to_string()),
            Ok(again)
        );
    }
    if let Ok(h) = crate::csi::handle::VolumeHandle::parse(s) {
        assert_eq!(crate::csi::handle::VolumeHandle::parse(&h.encode()), Ok(h));
    }
    let _ = crate::omap::journal::DirectoryValue::parse(s);
}

/// VolumeReplicationClass parameters: `key=value` lines.
pub fn params(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let map: HashMap<String, String> = s
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Ok(p) = crate::csi::params::ReplicationParams::parse(&map) {
        // The stored form validates again.
        let stored: HashMap<String, String> = p.to_map().into_iter().collect();
        crate::csi::params::ReplicationParams::parse(&stored).expect("stored parameters parse");
    }
    let _ = crate::csi::params::ReplicationParams::lenient_force(&map);
    let _ = crate::csi::params::StartTime::parse(s);
    let _ = crate::csi::params::parse_interval(s);
    let _ = crate::csi::params::parse_size(s);
}

/// ceph-csi's `config.json` and `cluster-mapping.json`.
pub fn config(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let config = crate::csi::config::CsiConfig::from_json(s);
    if let Ok(m) = crate::csi::config::ClusterMapping::from_json(s) {
        let _ = m.candidates("a", 1);
        if let Ok(c) = &config {
            let _ = m.local_candidates(c, "a", 1);
        }
    }
}

/// PersistentVolume manifests (YAML or JSON, objects or lists).
pub fn manifest(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = crate::omap::manifest::parse(s, "fuzz");
    }
}

/// The RBD journal decoders: `data` as the bytes of a journal object (its
/// entries' payloads decoded as librbd events), as one event payload, and
/// as the header's records (client, tag, tag data, position). What
/// decodes must encode back to the same value.
pub fn journal(data: &[u8]) {
    use crate::journal::{
        ClientData, Decoder, Encoder, EventEntry, ObjectSetPosition, TagData, scan_object,
    };
    let event = |payload: &[u8]| {
        if let Ok(e) = EventEntry::decode(payload) {
            let again = EventEntry::decode(&e.encode()).expect("an encoded event decodes");
            assert_eq!(again.event, e.event);
        }
    };
    let base = u64::from(data.first().copied().unwrap_or(0) % 16);
    let scan = scan_object(data, base, 1 << 24);
    assert!(scan.next_offset <= base + data.len() as u64);
    for e in &scan.entries {
        event(e.payload);
    }
    event(data);
    if let Ok(c) = ClientData::decode_all(data) {
        assert_eq!(ClientData::decode_all(&c.encode()).as_ref(), Ok(&c));
    }
    if let Ok(t) = TagData::decode_all(data) {
        assert_eq!(TagData::decode_all(&t.encode()).as_ref(), Ok(&t));
    }
    if let Ok(p) = ObjectSetPosition::decode(&mut Decoder::new(data)) {
        let mut e = Encoder::new();
        p.encode(&mut e);
        assert_eq!(
            ObjectSetPosition::decode(&mut Decoder::new(&e.into_bytes())).as_ref(),
            Ok(&p)
        );
    }
    if let Ok(c) = crate::journal::Client::decode(&mut Decoder::new(data)) {
        let _ = c.client_data();
    }
    if let Ok(t) = crate::journal::Tag::decode(&mut Decoder::new(data)) {
        let _ = t.tag_data();
    }
}
