//! Replication through gRPC against the real two-cluster pair: a volume
//! enabled on site-a appears, byte for byte, on site-b, copied by the site-b
//! sidecar. Checksums compare the primary's sync snapshot with the replica's,
//! both read with the native `rbd export`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use csi_rbd_replicator::grpc::proto::identity::{
    GetCapabilitiesRequest, GetIdentityRequest, ProbeRequest, capability,
};
use csi_rbd_replicator::grpc::proto::replication::get_volume_replication_info_response::Status as Health;

const MIB: u64 = 1 << 20;

fn spec(pool: &TestPool, image: &str, snap: &str) -> String {
    format!("{}/{image}@{snap}", pool.name)
}

#[tokio::test]
async fn identity_reports_driver_capabilities_and_readiness() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut id = a.identity().await;
    let who = id
        .get_identity(GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(who.name, DRIVER);
    assert!(!who.vendor_version.is_empty());
    assert_eq!(
        who.manifest.get("cluster-id").map(String::as_str),
        Some("site-a")
    );
    let caps = id
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let has_controller = caps.iter().any(|c| {
        matches!(&c.r#type, Some(capability::Type::Service(s))
            if s.r#type == capability::service::Type::ControllerService as i32)
    });
    let has_replication = caps.iter().any(|c| {
        matches!(&c.r#type, Some(capability::Type::VolumeReplication(v))
            if v.r#type == capability::volume_replication::Type::VolumeReplication as i32)
    });
    assert!(has_controller && has_replication, "{caps:?}");
    let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
    assert_eq!(ready, Some(true));
}

/// A ceph-csi style volume with holes: data at scattered offsets, unwritten
/// objects in between, and a partial object at the end.
#[tokio::test]
async fn csi_volume_with_holes_replicates_byte_for_byte() {
    let pool = TestPool::new("holes");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let writes = [
        (0, 64 << 10),
        (5 * MIB + 12345, 300 << 10),
        (40 * MIB, 4 << 20),
        (63 * MIB, 1 << 20),
        (200 * MIB - 4096, 4096),
    ];
    let (vol, _img) = create_csi_volume_in(&pool.ioctx(Site::A), Site::A, 200 * MIB, &writes);
    let mut ca = a.controller().await;
    ca.enable_volume_replication(enable_req(
        Site::A,
        &vol.handle,
        &[("mirroringMode", "snapshot")],
    ))
    .await
    .expect("enable");

    // No replayer runs yet on site-b: no sync time is invented; the health
    // is unknown until a replica reports.
    let early = ca
        .get_volume_replication_info(info_req(Site::A, &vol.handle))
        .await
        .expect("info before any sync")
        .into_inner();
    assert!(early.last_sync_time.is_none(), "{early:?}");
    assert!(early.last_sync_duration.is_none(), "{early:?}");
    assert_eq!(early.status, Health::Unknown as i32, "{early:?}");
    assert!(sync_snaps_in(&pool.ioctx(Site::B), &vol.image).is_empty());

    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let info = wait_synced(&a, &vol.handle, Duration::from_secs(120)).await;
    assert_eq!(info.status, Health::Healthy as i32, "{info:?}");
    assert!(info.last_sync_time.is_some());
    assert!(info.last_sync_duration.is_some());
    let written: u64 = writes.iter().map(|w| w.1 as u64).sum();
    assert!(info.last_sync_bytes as u64 >= written, "{info:?}");

    let first = first_sync(&pool.ioctx(Site::A), &vol.image);
    // Reported complete once flushed; the replica's snapshot follows.
    wait_replica_snap(&pool.name, &vol.image, &first, Duration::from_secs(30)).await;
    let primary = checksum(Site::A, &spec(&pool, &vol.image, &first));
    let replica = checksum(Site::B, &spec(&pool, &vol.image, &first));
    assert_eq!(primary, replica, "replica of {} differs", vol.image);

    // Holes stay holes: the replica allocates no more than the primary.
    let pa = allocated(Site::A, &spec(&pool, &vol.image, &first));
    let pb = allocated(Site::B, &spec(&pool, &vol.image, &first));
    assert!(pb <= pa, "replica allocates {pb} bytes, primary {pa}");
    assert!(
        pb < 100 * MIB,
        "replica of a sparse image is not sparse: {pb}"
    );

    // ceph-csi's journal on site-b points the volume's uuid at the replica,
    // with the replica's own image id and the primary's PV name.
    let rio = pool.ioctx(Site::B);
    let replica_id = csi_rbd_replicator::ceph::Image::open_read_only(&rio, &vol.image, None)
        .and_then(|i| i.id())
        .unwrap();
    let entry = rio
        .omap_get_all(&format!("csi.volume.{}", vol.uuid), "")
        .expect("journal entry on site-b");
    assert_eq!(entry["csi.imagename"], vol.image.as_bytes());
    assert_eq!(entry["csi.imageid"], replica_id.as_bytes());
    let pv = String::from_utf8_lossy(&entry["csi.volname"]).into_owned();
    let dir = rio
        .omap_get_all("csi.volumes.default", "")
        .expect("journal directory on site-b");
    assert_eq!(dir[&format!("csi.volume.{pv}")], vol.uuid.as_bytes());

    // Through the cluster mapping, site-a's original handle resolves on
    // site-b to the replica (Enable on a replica is a no-op that succeeds).
    let tmp = tempfile::tempdir().unwrap();
    let mapping = pool.mapping_file(tmp.path());
    let b2 = Sidecar::start(
        Site::B,
        &[
            "--no-replayer",
            "--pools",
            &pool.name,
            "--cluster-mapping",
            mapping.to_str().unwrap(),
        ],
    )
    .await;
    b2.controller()
        .await
        .enable_volume_replication(enable_req(Site::B, &vol.handle, &[]))
        .await
        .expect("site-a's handle resolves on site-b");
    assert_eq!(sync_snaps_in(&rio, &vol.image), vec![first.clone()]);
}

/// More than 1 GiB, written sequentially, plus data past the 1 GiB mark.
#[tokio::test]
async fn large_image_replicates_and_reports_time() {
    let pool = TestPool::new("large");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let name = "large";
    create_image_in(
        &pool.ioctx(Site::A),
        name,
        1536 * MIB,
        &[(0, 1 << 30), (1400 * MIB, 8 << 20)],
        1,
    );
    let vid = format!("{}/{name}", pool.name);
    let started = Instant::now();
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[]))
        .await
        .expect("enable");
    let info = wait_synced(&a, &vid, Duration::from_secs(300)).await;
    let took = started.elapsed();
    eprintln!(
        "first complete replica of 1.5 GiB image with 1.008 GiB written: {:.2}s (engine copy {:?})",
        took.as_secs_f64(),
        info.last_sync_duration
    );
    wait_replica_snap(
        &pool.name,
        name,
        &first_sync(&pool.ioctx(Site::A), name),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        checksum(
            Site::A,
            &spec(&pool, name, &first_sync(&pool.ioctx(Site::A), name))
        ),
        checksum(
            Site::B,
            &spec(&pool, name, &first_sync(&pool.ioctx(Site::A), name))
        )
    );
}

#[tokio::test]
async fn enable_is_idempotent_and_replica_is_locked() {
    let pool = TestPool::new("idem");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let name = "idem";
    create_image_in(&pool.ioctx(Site::A), name, 32 * MIB, &[(0, 1 << 20)], 1);
    let vid = format!("{}/{name}", pool.name);
    let mut ca = a.controller().await;
    for _ in 0..3 {
        ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "5m")]))
            .await
            .expect("enable");
    }
    // Three Enables, one first sync point.
    let first = first_sync(&pool.ioctx(Site::A), name);
    assert_eq!(
        sync_snaps_in(&pool.ioctx(Site::A), name),
        vec![first.clone()]
    );
    wait_synced(&a, &vid, Duration::from_secs(120)).await;
    wait_replica_snap(&pool.name, name, &first, Duration::from_secs(30)).await;

    // Another client cannot write the replica while the replayer holds it.
    let o = rbd(
        Site::B,
        &["bench", "--io-type", "write", "--io-total", "4K", &vid],
    );
    assert!(
        !o.status.success(),
        "a foreign write to the replica succeeded"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Read-only file system"), "{err}");

    // Enable on the replica's side leaves the replica alone.
    let b = Sidecar::start(Site::B, &["--no-replayer", "--pools", &pool.name]).await;
    b.controller()
        .await
        .enable_volume_replication(enable_req(Site::B, &vid, &[]))
        .await
        .expect("enable on the replica side");
    assert_eq!(
        sync_snaps_in(&pool.ioctx(Site::B), name),
        vec![first_sync(&pool.ioctx(Site::A), name)]
    );
}

/// Enable has an image's first sync snapshot taken (in the background)
/// while the site's own scheduler passes run every second: the scheduler,
/// which takes a first snapshot for a primary record that has none, must
/// never race Enable into a second first sync point (the replica would copy
/// the image twice).
#[tokio::test]
async fn enable_and_a_busy_scheduler_take_one_first_sync_point() {
    let pool = TestPool::new("firstsnap");
    let mut args = pool.args().to_vec();
    args.extend(["--poll-interval", "1s"]);
    let a = Sidecar::start(Site::A, &args).await;
    let io = pool.ioctx(Site::A);
    let names: Vec<String> = (0..8).map(|i| format!("first-{i}")).collect();
    for n in &names {
        create_image_in(&io, n, 8 * MIB, &[(0, 64 << 10)], 1);
    }
    let mut ca = a.controller().await;
    for n in &names {
        ca.enable_volume_replication(enable_req(
            Site::A,
            &format!("{}/{n}", pool.name),
            &[("schedulingInterval", "5m")],
        ))
        .await
        .expect("enable");
    }
    // Each first snapshot follows its Enable in the background; then room
    // for a racing one to land (a monitor commit).
    for n in &names {
        first_sync(&io, n);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in &names {
        let snaps = sync_snaps_in(&io, n);
        assert_eq!(snaps.len(), 1, "{n}: {snaps:?}\n{}", a.log_text());
    }
}
