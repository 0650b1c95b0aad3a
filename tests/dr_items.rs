//! What a user hits behind the real csi-addons controller, one test each
//! (issue 12): Probe never fails the csi-addons sidecar, no invented sync
//! times, Disable on a replica keeps DR, bad keys and unsupported modes get
//! their codes, Promote applies the class' schedule, the destination's
//! volume ID resolves on the peer; and clones replicate with their parent's
//! data (issue 13.1), or stay clones when their parent is replicated too
//! (issue 17).

mod common;

use std::time::Duration;

use common::*;
use csi_rbd_replicator::ceph::Image;
use csi_rbd_replicator::grpc::proto::identity::ProbeRequest;
use csi_rbd_replicator::grpc::proto::replication as pb;
use tonic::Code;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);

/// Probe answers OK with `ready=false` (never an error, which makes the
/// csi-addons sidecar exit) while the local cluster does not answer, and
/// while the replayer is down.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "uses fail points: cargo nextest run --features failpoints"
)]
async fn probe_says_not_ready_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    // A monitor address nothing listens on.
    std::fs::write(
        &cfg,
        r#"[{"clusterID": "site-a", "monitors": ["v2:127.0.0.1:3399"]}]"#,
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let lost = Sidecar::start_unready(
        Site::A,
        &["--csi-config", &cfg, "--op-timeout", "2s", "--no-replayer"],
        &[],
    )
    .await;
    let dead =
        Sidecar::start_unready(Site::A, &[], &[("FAILPOINTS", "replayer::start=panic")]).await;
    for (sc, why) in [(&lost, "local cluster site-a"), (&dead, "replayer")] {
        let mut id = sc.identity().await;
        for _ in 0..5 {
            let r = id
                .probe(ProbeRequest {})
                .await
                .expect("Probe is not an error");
            assert_eq!(r.into_inner().ready, Some(false));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(
            sc.log_text().contains("not ready") && sc.log_text().contains(why),
            "the reason is logged: {}",
            sc.log_text()
        );
    }
    assert!(
        dead.log_text().contains("restarting"),
        "the replayer is restarted"
    );
}

/// A malformed userKey is INVALID_ARGUMENT naming the user, never the key;
/// journal mode on an image that cannot have journaling (its pool's
/// journal pool does not exist) is FAILED_PRECONDITION, and the features
/// Enable turned on before failing are off again; none changes anything.
#[tokio::test]
async fn bad_keys_and_journal_mode_get_their_codes() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let name = unique("keys");
    create_image(Site::A, &name, 8 << 20, &[(0, 4096)]);
    let vid = format!("{}/{name}", pool());
    let mut c = a.controller().await;
    for bad in ["not a key!", "AQBsecretsecretsecretsecretsecretsecr=="] {
        let mut r = enable_req(Site::A, &vid, &[]);
        r.secrets.insert("userKey".into(), bad.into());
        let e = c.enable_volume_replication(r).await.expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("client."), "{e:?}");
        assert!(!e.message().contains(bad), "the key is shown: {e:?}");
    }
    assert!(snapshots(Site::A, &name).is_empty(), "something changed");
    assert!(!a.log_text().contains("AQBsecret"), "a key reached the log");

    let tp = TestPool::new("nojournal");
    rbd_ok(
        Site::A,
        &[
            "config",
            "pool",
            "set",
            &tp.name,
            "rbd_journal_pool",
            "no-such-pool",
        ],
    );
    let aio = tp.ioctx(Site::A);
    csi_rbd_replicator::ceph::rbd::create(
        &aio,
        "vol",
        8 * MIB,
        &csi_rbd_replicator::ceph::CreateOptions {
            features: Some(csi_rbd_replicator::ceph::features::LAYERING),
            ..Default::default()
        },
    )
    .unwrap();
    let jvid = format!("{}/vol", tp.name);
    let e = c
        .enable_volume_replication(enable_req(Site::A, &jvid, &[("mirroringMode", "journal")]))
        .await
        .expect_err("journal mode without a journal pool");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("journal mode"), "{e:?}");
    let f = Image::open_read_only(&aio, "vol", None)
        .unwrap()
        .features()
        .unwrap();
    assert_eq!(
        f,
        csi_rbd_replicator::ceph::features::LAYERING,
        "features changed: {f:#x}"
    );
    assert!(
        registry_record(&aio, "vol").is_none(),
        "a record was written"
    );
}

/// DisableVolumeReplication on a healthy replica (the VolumeReplication
/// deleted on the secondary site) answers success and replication goes on;
/// with `force=true` it detaches the replica; Disable never fails on the
/// class' parameters.
#[tokio::test]
async fn disable_on_a_replica_keeps_replicating_unless_forced() {
    let pool = TestPool::new("keepdr");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 32 * MIB, &[(0, 4 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    wait_synced(&a, &vid, LONG).await;
    let first = first_sync(&aio, name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;

    let mut cb = b.controller().await;
    let mut r = req::disable(Site::B, &vid);
    r.parameters
        .insert("schedulingInterval".into(), "not an interval".into());
    cb.disable_volume_replication(r)
        .await
        .expect("disable on a healthy replica");
    assert_eq!(registry_record(&bio, name).unwrap()["role"], "secondary");
    // Replication goes on.
    write(&img, &[(8 * MIB, 1 << 20)], 2);
    let s2 = "csirr-sync.0000000002.keepdr";
    img.snap_create(s2).unwrap();
    drop(img);
    wait_replica_snap(&pool.name, name, s2, LONG).await;
    let spec = format!("{vid}@{s2}");
    assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec));

    let mut r = req::disable(Site::B, &vid);
    r.parameters.insert("force".into(), "true".into());
    cb.disable_volume_replication(r)
        .await
        .expect("forced disable");
    assert!(registry_record(&bio, name).is_none(), "still a replica");
    assert_eq!(checksum(Site::B, &vid), checksum(Site::A, &spec));
    // A normal image now: writable by anyone.
    let bimg = Image::open(&bio, name).unwrap();
    write(&bimg, &[(0, 4096)], 3);
}

/// The schedule belongs to the primary: PromoteVolume applies the class'
/// schedule, as ceph-csi does at promotion; without one it keeps the image's.
#[tokio::test]
async fn promote_applies_the_class_schedule() {
    let pool = TestPool::new("promsched");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 16 * MIB, &[(0, 1 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    wait_synced(&a, &vid, LONG).await;
    wait_replica_snap(&pool.name, name, &first_sync(&aio, name), LONG).await;
    let mut r = req::promote(Site::B, &vid, true);
    r.parameters
        .insert("schedulingInterval".into(), "7m".into());
    b.controller()
        .await
        .promote_volume(r)
        .await
        .expect("forced promotion");
    let rec = registry_record(&bio, name).unwrap();
    assert_eq!(rec["role"], "primary", "{rec}");
    assert_eq!(rec["schedule"]["interval"], "7m", "{rec}");
    // Promote again without a schedule: kept.
    b.controller()
        .await
        .promote_volume(req::promote(Site::B, &vid, false))
        .await
        .expect("promote (idempotent)");
    assert_eq!(
        registry_record(&bio, name).unwrap()["schedule"]["interval"],
        "7m"
    );
    // Invalid parameters are refused and change nothing.
    let mut r = req::promote(Site::B, &vid, false);
    r.parameters
        .insert("schedulingInterval".into(), "often".into());
    let e = b.controller().await.promote_volume(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        registry_record(&bio, name).unwrap()["schedule"]["interval"],
        "7m"
    );
}

/// GetReplicationDestinationInfo names the replica on the peer: the handle
/// re-minted with the peer's cluster ID and pool ID (same uuid), which the
/// peer's sidecar resolves; a plain ID names the same place. The capability
/// is advertised.
#[tokio::test]
async fn destination_info_names_the_replica_on_the_peer() {
    let pool = TestPool::new("dest");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let (vol, _img) = create_csi_volume_in(&aio, Site::A, 16 * MIB, &[(0, 1 << 20)]);
    let mut ca = a.controller().await;
    ca.enable_volume_replication(enable_req(Site::A, &vol.handle, &[]))
        .await
        .expect("enable");
    wait_synced(&a, &vol.handle, LONG).await;
    let ask = |vid: &str| pb::GetReplicationDestinationInfoRequest {
        replication_source: source(vid),
        secrets: secrets(Site::A),
    };
    let dest = ca
        .get_replication_destination_info(ask(&vol.handle))
        .await
        .expect("destination info")
        .into_inner();
    let Some(pb::replication_destination::Type::Volume(v)) =
        dest.replication_destination.and_then(|d| d.r#type)
    else {
        panic!("no volume destination");
    };
    let want = format!("0001-0006-site-b-{:016x}-{}", bio.pool_id(), vol.uuid);
    assert_eq!(v.volume_id, want);
    // The peer's sidecar resolves it (through the journal the replayer
    // wrote there): the replica answers Resync as a ready replica.
    wait_until("the replica's journal on site-b", LONG, || {
        bio.omap_get_all(&format!("csi.volume.{}", vol.uuid), "")
            .is_ok_and(|m| !m.is_empty())
    })
    .await;
    let ready = b
        .controller()
        .await
        .resync_volume(req::resync(Site::B, &v.volume_id, false))
        .await
        .expect("the peer resolves the destination ID")
        .into_inner()
        .ready;
    assert!(ready);
    // A plain ID names the same pool, namespace and image on the peer.
    let name = "plain";
    let plain = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 8 * MIB, &[(0, 4096)], 2);
    ca.enable_volume_replication(enable_req(Site::A, &plain, &[]))
        .await
        .expect("enable plain");
    let d = ca
        .get_replication_destination_info(ask(&plain))
        .await
        .expect("destination of a plain ID")
        .into_inner();
    assert!(format!("{d:?}").contains(&plain), "{d:?}");
    let caps = a
        .identity()
        .await
        .get_capabilities(csi_rbd_replicator::grpc::proto::identity::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        format!("{caps:?}").contains("GetReplicationDestinationInfo"),
        "GET_REPLICATION_DESTINATION_INFO not advertised: {caps:?}"
    );
}

/// A clone (every ceph-csi volume restored from a snapshot or cloned from a
/// PVC) replicates with its parent's data: the replica reads byte for byte
/// what the primary does, and `verify` compares what a reader sees.
#[tokio::test]
async fn clones_replicate_with_their_parent_data() {
    let pool = TestPool::new("clone");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let parent = create_image_in(
        &aio,
        "golden",
        32 * MIB,
        &[(0, 8 << 20), (20 * MIB, 2 << 20)],
        1,
    );
    drop(parent);
    let p = &pool.name;
    rbd_ok(Site::A, &["snap", "create", &format!("{p}/golden@base")]);
    rbd_ok(Site::A, &["snap", "protect", &format!("{p}/golden@base")]);
    rbd_ok(
        Site::A,
        &["clone", &format!("{p}/golden@base"), &format!("{p}/child")],
    );
    let child = Image::open(&aio, "child").unwrap();
    write(&child, &[(4 * MIB, 1 << 20)], 2);
    drop(child);
    let vid = format!("{p}/child");
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[]))
        .await
        .expect("enable on a clone");
    let first = first_sync(&aio, "child");
    wait_replica_snap(p, "child", &first, LONG).await;
    let spec = format!("{vid}@{first}");
    assert_eq!(
        checksum(Site::A, &spec),
        checksum(Site::B, &spec),
        "the replica lacks the parent's data"
    );
    let o = cli("verify", Site::A, &[&vid, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
}

/// On site-a in `pool`: "golden" (32 MiB, 10 MiB of data from `seed`) with
/// the protected snapshot "base", and "child", a clone of it. Returns the
/// pool's name, the snapshot's spec and both volume IDs.
fn golden_and_child(
    pool: &TestPool,
    aio: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>,
    seed: u64,
) -> (String, String, String, String) {
    let p = pool.name.clone();
    drop(create_image_in(
        aio,
        "golden",
        32 * MIB,
        &[(0, 8 << 20), (20 * MIB, 2 << 20)],
        seed,
    ));
    let base = format!("{p}/golden@base");
    rbd_ok(Site::A, &["snap", "create", &base]);
    rbd_ok(Site::A, &["snap", "protect", &base]);
    let (gvid, cvid) = (format!("{p}/golden"), format!("{p}/child"));
    rbd_ok(Site::A, &["clone", &base, &cvid]);
    (p, base, gvid, cvid)
}

/// Enables the parent, then the clone, hourly, on site-a (a clone enabled
/// while its parent is not replicated gets a flat replica), and waits for
/// the clone's first sync point on site-b. Returns site-a's controller
/// client and that sync point.
async fn enable_golden_then_child(
    a: &Sidecar,
    aio: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>,
    gvid: &str,
    cvid: &str,
) -> (
    pb::controller_client::ControllerClient<tonic::transport::Channel>,
    String,
) {
    let hourly = [("schedulingInterval", "1h")];
    let mut ca = a.controller().await;
    for vid in [gvid, cvid] {
        ca.enable_volume_replication(enable_req(Site::A, vid, &hourly))
            .await
            .expect("enable");
    }
    let first = first_sync(aio, "child");
    let pool = cvid.split('/').next().unwrap_or_default();
    wait_replica_snap(pool, "child", &first, LONG).await;
    (ca, first)
}

/// `cvid` is a clone of `base` on both sites (`rbd info` names its parent).
fn assert_clone_on_both_sites(cvid: &str, base: &str) {
    for site in [Site::A, Site::B] {
        let info = rbd_ok(site, &["info", cvid]);
        assert!(
            info.contains(&format!("parent: {base}")),
            "the clone lost its parent on {}: {info}",
            site.id()
        );
    }
}

/// A clone whose parent is replicated too stays a clone on the replica, as
/// rbd-mirror keeps it: the replica is a clone of the parent's replica at
/// the same snapshot (`rbd info` names it), only the clone's own objects
/// are copied (not the parent's data), and both read the same (the
/// parent's data, the clone's writes, a discard over parent data); later
/// deltas, a planned relocation to the replica's site and replication back
/// keep the link on both sites.
#[tokio::test]
async fn clones_stay_clones_when_their_parent_is_replicated() {
    let pool = TestPool::new("clonelink");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let (p, base, gvid, cvid) = golden_and_child(&pool, &aio, 1);
    let child = Image::open(&aio, "child").unwrap();
    write(&child, &[(4 * MIB, 1 << 20)], 2);
    discard(&child, 20 * MIB, 1 << 20);
    drop(child);
    let (mut ca, first) = enable_golden_then_child(&a, &aio, &gvid, &cvid).await;
    let at = format!("{cvid}@{first}");
    assert_eq!(checksum(Site::A, &at), checksum(Site::B, &at), "{at}");
    let info = rbd_ok(Site::B, &["info", &cvid]);
    assert!(
        info.contains(&format!("parent: {base}")),
        "the replica is not a clone of the parent's replica: {info}"
    );
    // The clone's own objects only (objects 1 and 5, 4 MiB each): a flat
    // copy reads 10 MiB of the parent's data besides.
    let rec = registry_record(&bio, "child").expect("replica record");
    let bytes = rec["last_sync"]["bytes"].as_u64().unwrap();
    eprintln!("MEASURED first sync of the clone: {bytes} bytes copied");
    assert!(bytes <= 8 * MIB, "the parent's data was copied: {rec}");

    // A delta of the clone.
    let child = Image::open(&aio, "child").unwrap();
    write(&child, &[(12 * MIB, 1 << 20), (30 * MIB, 512 << 10)], 3);
    let next = format!("csirr-sync.{:010}", 900);
    child.snap_create(&next).expect("sync snapshot");
    drop(child);
    wait_replica_snap(&p, "child", &next, LONG).await;
    let at = format!("{cvid}@{next}");
    assert_eq!(checksum(Site::A, &at), checksum(Site::B, &at), "{at}");

    // Planned relocation of the clone to B: promoted there, still a clone;
    // A follows it as a replica and stays a clone too.
    ca.demote_volume(req::demote(Site::A, &cvid, false))
        .await
        .expect("demote the clone on A");
    promote_planned(&b, &cvid, LONG).await;
    resync_until_ready(&a, &cvid, false, LONG).await;
    let bimg = Image::open(&bio, "child").expect("open the promoted clone on B");
    write(&bimg, &[(8 * MIB, 1 << 20)], 4);
    let back = format!("csirr-sync.{:010}", 950);
    bimg.snap_create(&back).expect("sync snapshot on B");
    drop(bimg);
    let at = format!("{cvid}@{back}");
    wait_until("A replicates B's clone", LONG, || {
        sync_snaps_in(&aio, "child").contains(&back)
    })
    .await;
    assert_eq!(checksum(Site::A, &at), checksum(Site::B, &at), "{at}");
    assert_clone_on_both_sites(&cvid, &base);
    assert_eq!(
        registry_record(&bio, "child").unwrap()["role"],
        "primary",
        "B is the clone's primary"
    );
}

/// Forced failover of a clone whose parent is replicated: with site-a's
/// sidecar gone, B's replica is promoted by force at the clone's last
/// complete sync point and stays a clone of the parent's replica; when A
/// returns, its clone (written after that point, over the parent's data) is
/// demoted and resynced by force, rolled back through the clone, and both
/// sides read the same at B's next sync point, both still clones.
#[tokio::test]
async fn a_clone_fails_over_by_force_and_back_keeping_its_parent() {
    let pool = TestPool::new("clonefo");
    let mut a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let (_, base, gvid, cvid) = golden_and_child(&pool, &aio, 5);
    write(
        &Image::open(&aio, "child").unwrap(),
        &[(12 * MIB, 1 << 20)],
        6,
    );
    let (ca, first) = enable_golden_then_child(&a, &aio, &gvid, &cvid).await;
    let at_first = checksum(Site::A, &format!("{cvid}@{first}"));

    // A writes on after the sync point, over the parent's data (object 0,
    // not copied up yet) and its own; then site-a's sidecar is gone.
    write(
        &Image::open(&aio, "child").unwrap(),
        &[(2 * MIB, 1 << 20), (12 * MIB, 1 << 20)],
        7,
    );
    a.kill();
    drop(ca);

    let mut cb = b.controller().await;
    cb.promote_volume(req::promote(Site::B, &cvid, true))
        .await
        .expect("forced promotion of the clone");
    assert_eq!(checksum(Site::B, &cvid), at_first, "B is not at {first}");
    let rec = registry_record(&bio, "child").unwrap();
    assert_eq!(rec["role"], "primary", "{rec}");
    assert!(
        rbd_ok(Site::B, &["info", &cvid]).contains(&format!("parent: {base}")),
        "the promoted clone lost its parent"
    );
    // The application writes on B, over the parent's data too.
    let bimg = Image::open(&bio, "child").expect("open the promoted clone");
    write(&bimg, &[(6 * MIB, 1 << 20)], 8);
    drop(bimg);

    // Site-a returns: its clone (split from B) is demoted and resynced by
    // force, and follows B.
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut ca = a.controller().await;
    ca.demote_volume(req::demote(Site::A, &cvid, false))
        .await
        .expect("demote A's clone");
    resync_until_ready(&a, &cvid, true, LONG).await;
    let next = format!("csirr-sync.{:010}", 960);
    Image::open(&bio, "child")
        .unwrap()
        .snap_create(&next)
        .expect("sync snapshot on B");
    wait_until("A replicates B's clone", LONG, || {
        sync_snaps_in(&aio, "child").contains(&next)
    })
    .await;
    let at = format!("{cvid}@{next}");
    assert_eq!(checksum(Site::A, &at), checksum(Site::B, &at), "{at}");
    assert_eq!(checksum(Site::A, &at), checksum(Site::B, &cvid), "{at}");
    assert_clone_on_both_sites(&cvid, &base);
    assert_eq!(registry_record(&aio, "child").unwrap()["role"], "secondary");
}

/// Every RPC answers within its deadline (UNAVAILABLE past it, the work
/// going on and holding the volume until done), and RPCs doing cluster work
/// are bounded so that a flood cannot starve replication (issue 13.8).
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "uses fail points: cargo nextest run --features failpoints"
)]
async fn rpcs_answer_within_their_deadline_and_are_bounded() {
    let a = Sidecar::start_with_env(
        Site::A,
        &[
            "--no-replayer",
            "--rpc-timeout",
            "2s",
            "--max-concurrent-rpcs",
            "1",
        ],
        &[("FAILPOINTS", "engine::op=sleep(5000)")],
    )
    .await;
    let (n1, n2) = (unique("slow"), unique("slow"));
    create_image(Site::A, &n1, 8 << 20, &[(0, 4096)]);
    create_image(Site::A, &n2, 8 << 20, &[(0, 4096)]);
    let (v1, v2) = (format!("{}/{n1}", pool()), format!("{}/{n2}", pool()));
    let mut c = a.controller().await;
    let t = std::time::Instant::now();
    let e = c
        .enable_volume_replication(enable_req(Site::A, &v1, &[]))
        .await
        .expect_err("past the deadline");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Still running: the volume is busy; another volume waits for the one
    // RPC slot past its own deadline.
    let busy = c
        .demote_volume(req::demote(Site::A, &v1, false))
        .await
        .expect_err("busy");
    assert_eq!(busy.code(), Code::Aborted, "{busy:?}");
    let starved = c
        .enable_volume_replication(enable_req(Site::A, &v2, &[]))
        .await
        .expect_err("no slot within the deadline");
    assert_eq!(starved.code(), Code::Unavailable, "{starved:?}");
    // The first call finished in the background; the one that never got a
    // slot never ran.
    let io = ioctx(Site::A, "");
    wait_until("the first Enable to complete", LONG, || {
        registry_record(&io, &n1).is_some()
    })
    .await;
    assert!(
        registry_record(&io, &n2).is_none(),
        "a refused call changed something"
    );
}
