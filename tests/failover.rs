//! Disaster-recovery semantics through gRPC, as the csi-addons controller
//! drives them, against the real pair: planned relocation both ways,
//! split-brain, resync, disable. Checksums compare what the old primary had
//! with what the new primary holds.

mod common;

use std::time::Duration;

use common::*;
use csi_rbd_replicator::grpc::proto::replication::get_volume_replication_info_response::Status as Health;
use tonic::Code;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

/// A -> B -> A with writes on each side in between: after each move the new
/// primary's content equals the old primary's last write.
#[tokio::test]
async fn planned_relocation_there_and_back() {
    let pool = TestPool::new("reloc");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "app";
    let vid = format!("{}/{name}", pool.name);
    let head = |site: Site| checksum(site, &vid);
    let img = create_image_in(&aio, name, 64 * MIB, &[(0, 8 << 20)], 1);
    let (mut ca, mut cb) = (a.controller().await, b.controller().await);
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    ca.promote_volume(req::promote(Site::A, &vid, false))
        .await
        .expect("promote of a primary succeeds");
    wait_synced(&a, &vid, LONG).await;

    // Writes after the last sync point, then the application stops.
    write(&img, &[(20 * MIB, 4 << 20), (63 * MIB, 1 << 20)], 2);
    // While the application still has the image open, demotion is refused
    // and names the holder.
    let busy = ca
        .demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect_err("demote with a writer");
    assert_eq!(busy.code(), Code::FailedPrecondition);
    assert!(busy.message().contains("in use by client."), "{busy:?}");
    drop(img);
    let a_last = head(Site::A);
    // Promoting B while A is still primary: FAILED_PRECONDITION.
    let early = cb
        .promote_volume(req::promote(Site::B, &vid, false))
        .await
        .expect_err("peer still primary");
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");

    for _ in 0..2 {
        ca.demote_volume(req::demote(Site::A, &vid, false))
            .await
            .expect("demote (idempotent)");
    }
    // The demoted image refuses writers.
    let o = rbd(
        Site::A,
        &["bench", "--io-type", "write", "--io-total", "4K", &vid],
    );
    assert!(
        !o.status.success(),
        "a write to the demoted image succeeded"
    );
    promote_planned(&b, &vid, LONG).await;
    assert_eq!(head(Site::B), a_last, "B does not hold A's last write");
    resync_until_ready(&a, &vid, false, LONG).await;

    // Now B is primary: write there and move back.
    let bimg = csi_rbd_replicator::ceph::Image::open(&bio, name).expect("open on B");
    write(&bimg, &[(5 * MIB, 3 << 20)], 3);
    drop(bimg);
    let b_last = head(Site::B);
    cb.demote_volume(req::demote(Site::B, &vid, false))
        .await
        .expect("demote B");
    promote_planned(&a, &vid, LONG).await;
    assert_eq!(head(Site::A), b_last, "A does not hold B's last write");
    resync_until_ready(&b, &vid, false, LONG).await;

    // Replication flows A -> B again.
    let aimg = csi_rbd_replicator::ceph::Image::open(&aio, name).expect("open on A");
    write(&aimg, &[(30 * MIB, 1 << 20)], 4);
    let snap = format!("csirr-sync.{:010}", 900);
    aimg.snap_create(&snap).expect("sync snapshot");
    wait_replica_snap(&pool.name, name, &snap, LONG).await;
    assert_eq!(
        checksum(Site::A, &format!("{vid}@{snap}")),
        checksum(Site::B, &format!("{vid}@{snap}"))
    );
    let info = wait_synced(&a, &vid, LONG).await;
    assert_eq!(info.status, Health::Healthy as i32, "{info:?}");
}

/// Both sides promoted: each reports ERROR naming split-brain and nothing is
/// overwritten; demote + resync with force resolves it, copying only what
/// differs since the last shared sync point.
#[tokio::test]
async fn split_brain_is_reported_on_both_sides_and_resync_resolves_it() {
    let pool = TestPool::new("brain");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "app";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 64 * MIB, &[(0, 16 << 20)], 1);
    let (mut ca, mut cb) = (a.controller().await, b.controller().await);
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    wait_synced(&a, &vid, LONG).await;

    // B is promoted by force while A is alive and primary.
    cb.promote_volume(req::promote(Site::B, &vid, true))
        .await
        .expect("forced promotion");
    write(&img, &[(40 * MIB, 2 << 20)], 2);
    let bimg = csi_rbd_replicator::ceph::Image::open(&bio, name).unwrap();
    write(&bimg, &[(8 * MIB, 1 << 20)], 3);
    drop(bimg);
    let a_head = checksum(Site::A, &vid);
    let b_head = checksum(Site::B, &vid);

    // Both sides say split-brain.
    for (sc, c) in [(&a, &mut ca), (&b, &mut cb)] {
        let mut said = String::new();
        for _ in 0..100 {
            match c.get_volume_replication_info(info_req(sc.site, &vid)).await {
                Ok(r) if r.get_ref().status == Health::Error as i32 => {
                    said = r.into_inner().status_message;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        assert!(said.contains("split-brain"), "{}: {said:?}", sc.site.id());
    }
    // Nothing was overwritten on either side.
    assert_eq!(checksum(Site::A, &vid), a_head);
    assert_eq!(checksum(Site::B, &vid), b_head);

    // Keep B's data: demote A, resync it. Without force: refused, naming
    // split-brain; with force: A's change since the shared point is rolled
    // back and only what differs is copied.
    drop(img);
    ca.demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect("demote A");
    let refused = ca
        .resync_volume(req::resync(Site::A, &vid, false))
        .await
        .expect_err("resync without force after split-brain");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("split-brain"), "{refused:?}");
    resync_until_ready(&a, &vid, true, LONG).await;
    let rec = registry_record(&aio, name).expect("A's record");
    assert_eq!(rec["role"], "secondary", "{rec}");
    let copied = rec["last_sync"]["bytes"].as_u64().unwrap();
    assert!(
        copied <= 8 * MIB,
        "resync copied {copied} bytes for a 1 MiB difference"
    );
    let newest = sync_snaps_in(&bio, name).last().cloned().unwrap();
    assert_eq!(
        checksum(Site::A, &format!("{vid}@{newest}")),
        checksum(Site::B, &format!("{vid}@{newest}")),
    );
}

/// Disable on the primary moves the replica to the RBD trash (recoverable)
/// and removes the sync snapshots; it is idempotent; an unknown volume is
/// NOT_FOUND.
#[tokio::test]
async fn disable_trashes_the_replica_and_is_idempotent() {
    let pool = TestPool::new("disable");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "gone";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 16 * MIB, &[(0, 1 << 20)], 1);
    let mut ca = a.controller().await;
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[]))
        .await
        .expect("enable");
    wait_synced(&a, &vid, LONG).await;
    for _ in 0..2 {
        ca.disable_volume_replication(req::disable(Site::A, &vid))
            .await
            .expect("disable (idempotent)");
    }
    assert!(sync_snaps_in(&aio, name).is_empty(), "sync snapshots left");
    assert!(
        registry_record(&aio, name).is_none(),
        "registry record left"
    );
    wait_until("the replica moves to the trash", LONG, || {
        csi_rbd_replicator::ceph::Image::open_read_only(&bio, name, None).is_err()
    })
    .await;
    let trash = rbd_ok(Site::B, &["trash", "ls", &pool.name]);
    assert!(trash.contains(name), "replica not in the trash: {trash}");
    let missing = ca
        .disable_volume_replication(req::disable(Site::A, &format!("{}/nope", pool.name)))
        .await
        .expect_err("unknown volume");
    assert_eq!(missing.code(), Code::NotFound);
}

/// Bad or missing volume IDs, unknown volumes, wrong secrets and a second
/// call while one runs get the codes the spec gives, for every role RPC.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "uses fail points: cargo nextest run --features failpoints"
)]
async fn role_rpcs_reject_bad_input_with_spec_codes() {
    let a = Sidecar::start_with_env(
        Site::A,
        &["--no-replayer"],
        &[("FAILPOINTS", "engine::op=sleep(1500)")],
    )
    .await;
    let name = unique("roles");
    create_image(Site::A, &name, 8 << 20, &[(0, 4096)]);
    let vid = format!("{}/{name}", pool());
    let nope = format!("{}/{}", pool(), unique("nope"));
    let mut c = a.controller().await;
    let bad_secrets =
        |mut r: csi_rbd_replicator::grpc::proto::replication::PromoteVolumeRequest| {
            r.secrets.insert(
                "userKey".into(),
                "AQBrS0xgAAAAABAAq9pY4D4F6Nf2C4Mx3Xe6Mw==".into(),
            );
            r
        };
    for (what, vid, code) in [
        ("empty", "", Code::InvalidArgument),
        ("malformed", "a/b/c/d", Code::InvalidArgument),
        ("unknown", nope.as_str(), Code::NotFound),
        ("not enabled", vid.as_str(), Code::FailedPrecondition),
    ] {
        let e = c
            .promote_volume(req::promote(Site::A, vid, false))
            .await
            .expect_err(what);
        assert_eq!(e.code(), code, "promote {what}: {e:?}");
        let e = c
            .demote_volume(req::demote(Site::A, vid, false))
            .await
            .expect_err(what);
        assert_eq!(e.code(), code, "demote {what}: {e:?}");
        let e = c
            .resync_volume(req::resync(Site::A, vid, false))
            .await
            .expect_err(what);
        assert_eq!(e.code(), code, "resync {what}: {e:?}");
    }
    let e = c
        .promote_volume(bad_secrets(req::promote(Site::A, &vid, false)))
        .await
        .expect_err("wrong key");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // Disable of a volume that is not replicated: success (idempotent).
    c.disable_volume_replication(req::disable(Site::A, &vid))
        .await
        .expect("disable of a non-replicated volume");

    // A second call on the same volume while one runs: ABORTED, and the
    // first one completes.
    let mut c2 = a.controller().await;
    let first = tokio::spawn({
        let vid = vid.clone();
        async move {
            c2.enable_volume_replication(enable_req(Site::A, &vid, &[]))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = c
        .demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect_err("concurrent call");
    assert_eq!(second.code(), Code::Aborted, "{second:?}");
    first.await.unwrap().expect("the first call completes");
}

/// Disaster: site-a goes away in the middle of a delta. B is promoted by
/// force within the timeout and holds exactly the last complete sync point
/// (only the partially copied extents are rolled back). When A comes back it
/// is demoted and resynced, copying only what changed, and converges to B.
///
/// Stops site-a's daemons: test.sh runs `exclusive_` tests alone.
#[tokio::test]
async fn exclusive_disaster_force_promote_then_failback() {
    let pool = TestPool::new("disaster");
    let mut a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let slow = [
        "--max-bytes-per-second",
        "32M",
        "--checkpoint-interval",
        "1s",
        "--op-timeout",
        "10s",
        "--pools",
        &pool.name,
    ];
    let b = Sidecar::start(Site::B, &slow).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "db";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 256 * MIB, &[(0, 16 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[]))
        .await
        .expect("enable");
    let s1 = first_sync(&aio, name);
    wait_replica_snap(&pool.name, name, &s1, LONG).await;
    let at_s1 = checksum(Site::B, &format!("{vid}@{s1}"));

    // A large delta starts replicating slowly...
    write(&img, &[(32 * MIB, 160 << 20)], 2);
    drop(img);
    let s2 = "csirr-sync.0000000002.disaster";
    csi_rbd_replicator::ceph::Image::open(&aio, name)
        .unwrap()
        .snap_create(s2)
        .unwrap();
    wait_until("the delta to be under way", LONG, || {
        registry_record(&bio, name)
            .and_then(|r| r["checkpoint"]["offset"].as_u64())
            .is_some_and(|o| o > 32 * MIB)
    })
    .await;

    // ... and site-a disappears: its sidecar, its OSD and its monitor.
    let restore = lose_site_a(&mut a);

    let t = std::time::Instant::now();
    b.controller()
        .await
        .promote_volume(req::promote(Site::B, &vid, true))
        .await
        .expect("forced promotion without the peer");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(60),
        "forced promotion took {took:?}"
    );
    // B holds exactly the last complete sync point.
    assert_eq!(checksum(Site::B, &vid), at_s1, "B is not at {s1}");
    let rec = registry_record(&bio, name).unwrap();
    assert_eq!(rec["role"], "primary", "{rec}");
    let what = rec["role_change"]["what"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        what.contains("forced") && what.contains("rolled back"),
        "{what}"
    );
    let rolled: u64 = what
        .split_whitespace()
        .skip_while(|w| *w != "back")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(u64::MAX);
    assert!(
        rolled > 0 && rolled < 160 * MIB,
        "rolled back {rolled} bytes: only the partial delta"
    );

    // The application writes on B.
    let bimg = csi_rbd_replicator::ceph::Image::open(&bio, name).unwrap();
    write(&bimg, &[(200 * MIB, 4 << 20)], 3);
    drop(bimg);

    // Site-a comes back; its image still claims primary.
    drop(restore);
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let ca = a.controller().await;
    // Clients of the lost site leave watches that the OSD expires after its
    // watch timeout (30 s): Demote names them and is retried, as the
    // controller does.
    eventually("demote A", LONG, Duration::from_secs(2), || {
        let (mut ca, r) = (ca.clone(), req::demote(Site::A, &vid, false));
        async move {
            match ca.demote_volume(r).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == Code::FailedPrecondition => {
                    assert!(s.message().contains("in use by"), "{s:?}");
                    Err(s.message().to_string())
                }
                Err(s) => panic!("demote A: {s:?}"),
            }
        }
    })
    .await;
    resync_until_ready(&a, &vid, true, LONG).await;
    // B's newest sync point reaches A, copying what B changed, not the image.
    let bsnap = loop {
        let snaps = sync_snaps_in(&bio, name);
        let newest = snaps.last().cloned().unwrap();
        if newest != s1 && newest != s2 && sync_snaps_in(&aio, name).contains(&newest) {
            break newest;
        }
        // B's scheduler waits for A to report before its next sync point.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if snaps.iter().all(|s| *s == s1) {
            let bimg = csi_rbd_replicator::ceph::Image::open(&bio, name).unwrap();
            let _ = bimg.snap_create("csirr-sync.0000000003.failback");
        }
    };
    assert_eq!(
        checksum(Site::A, &format!("{vid}@{bsnap}")),
        checksum(Site::B, &format!("{vid}@{bsnap}")),
    );
    let arec = registry_record(&aio, name).unwrap();
    let copied = arec["last_sync"]["bytes"].as_u64().unwrap();
    assert!(
        copied <= 16 * MIB,
        "failback copied {copied} bytes for a 4 MiB change"
    );
}

/// A sync point is reported complete as soon as its data is flushed; the
/// replica's snapshot of it follows. A replayer killed in between leaves the
/// point pending: a forced promotion (no replayer running) takes the
/// snapshot and promotes exactly that point, without rolling anything back.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "uses fail points: cargo nextest run --features failpoints"
)]
async fn forced_promotion_settles_a_pending_sync_point() {
    let pool = TestPool::new("pending");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    // The replayer holds the pending state open for a minute.
    let mut b = Sidecar::start_with_env(
        Site::B,
        &pool.args(),
        &[(
            "FAILPOINTS",
            "replayer::before_replica_snapshot=sleep(60000)",
        )],
    )
    .await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "app";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(
        &aio,
        name,
        32 * MIB,
        &[(0, 3 << 20), (20 * MIB, 1 << 20)],
        3,
    );
    drop(img);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let first = first_sync(&aio, name);
    wait_until("the sync point to be pending", LONG, || {
        registry_record(&bio, name)
            .is_some_and(|r| r["pending_snap"].as_str() == Some(first.as_str()))
    })
    .await;
    assert!(
        !sync_snaps_in(&bio, name).contains(&first),
        "the replica's snapshot exists before the fault delay ended"
    );
    b.kill();
    let b2 = Sidecar::start(Site::B, &["--no-replayer", "--pools", &pool.name]).await;
    b2.controller()
        .await
        .promote_volume(req::promote(Site::B, &vid, true))
        .await
        .expect("forced promotion");
    assert!(
        sync_snaps_in(&bio, name).contains(&first),
        "promotion did not take the pending snapshot"
    );
    assert_eq!(
        checksum(Site::B, &vid),
        checksum(Site::A, &format!("{vid}@{first}")),
        "the promoted image is not the pending sync point"
    );
    let rec = registry_record(&bio, name).expect("record");
    assert_eq!(rec["role"], "primary");
    assert!(rec.get("pending_snap").is_none(), "{rec}");
}
