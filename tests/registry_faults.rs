//! One record this version cannot read must not stop a pool: a corrupt
//! value, a record of a newer version (a role this one does not know) and a
//! newer replica state sit next to a good record, which still replicates,
//! and the unreadable ones are left alone (issue 13.6).

mod common;

use std::time::Duration;

use common::*;
use csi_rbd_replicator::engine::registry::REGISTRY_OBJECT;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

#[tokio::test]
async fn unreadable_registry_records_are_skipped_not_fatal() {
    let pool = TestPool::new("badrec");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let newer = serde_json::json!({
        "version": 9, "image_name": "future", "image_id": "f00d", "role": "resyncing",
        "mode": "snapshot", "schedule": {}, "enabled_at": "2026-01-01T00:00:00Z"
    })
    .to_string();
    let bad: [(&str, &[u8]); 4] = [
        ("image.dead", b"{not json"),
        ("image.f00d", newer.as_bytes()),
        ("disabled.beef", b"\xff\xfe"),
        ("status.f00d.someone", b"[]"),
    ];
    aio.omap_set(REGISTRY_OBJECT, &bad).unwrap();

    let name = "good";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 16 * MIB, &[(0, 2 << 20)], 1);
    let mut ca = a.controller().await;
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[]))
        .await
        .expect("enable next to unreadable records");
    let first = first_sync(&aio, name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;
    let spec = format!("{vid}@{first}");
    assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec));
    // A newer replica's state is read, not fatal.
    let bio = pool.ioctx(Site::B);
    let id = registry_record(&aio, name).unwrap()["image_id"]
        .as_str()
        .unwrap()
        .to_string();
    let st = serde_json::json!({
        "replica_fsid": "x", "state": "paused", "message": "from the future",
        "updated_at": "2026-01-01T00:00:00Z"
    })
    .to_string();
    aio.omap_set(
        REGISTRY_OBJECT,
        &[(&format!("status.{id}.x"), st.as_bytes())],
    )
    .unwrap();
    ca.get_volume_replication_info(info_req(Site::A, &vid))
        .await
        .expect("info with a newer replica's status");
    let o = cli("status", Site::A, &["--pool", &pool.name, "--json"]);
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    // The unreadable records are still there, untouched.
    let left = aio.omap_get_all(REGISTRY_OBJECT, "").unwrap();
    for (k, v) in bad {
        assert_eq!(left.get(k).map(Vec::as_slice), Some(v), "{k} changed");
    }
    assert!(a.log_text().contains("skipping a registry record"));
    drop(bio);
}
