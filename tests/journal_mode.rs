//! Journal mode (`mirroringMode: journal`) end to end on the real pair,
//! driven through gRPC: Enable on site-a turns on exclusive-lock and
//! journaling; the site-b sidecar registers in the primary's journal,
//! bootstraps the replica from a snapshot and replays the journal; the
//! replica must equal the primary (`rbd export` checksums) after `rbd
//! bench` and small writes; a restarted site-b sidecar resumes without a
//! new bootstrap; Disable unregisters the client and turns journaling off.
//! The lag of a single write and the catch-up after `rbd bench` are logged
//! (never asserted).

mod common;

use std::time::{Duration, Instant};

use common::*;
use csi_rbd_replicator::ceph::{self, Image};
use csi_rbd_replicator::grpc::proto::replication::get_volume_replication_info_response::Status as Health;
use csi_rbd_replicator::journal::{ClientData, Journal, MirrorPeerState};
use tonic::Code;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

/// Waits until the replica's export equals the primary's (the primary is
/// quiesced by the caller); returns how long it took.
async fn wait_equal(pool: &TestPool, name: &str, timeout: Duration) -> Duration {
    let spec = format!("{}/{name}", pool.name);
    let want = checksum(Site::A, &spec);
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < timeout {
        if image_exists_in(pool, Site::B, name) {
            last = checksum(Site::B, &spec);
            if last == want {
                return t.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the replica of {spec} never equalled the primary ({want} != {last})");
}

fn image_exists_in(pool: &TestPool, site: Site, name: &str) -> bool {
    Image::open_read_only(&pool.ioctx(site), name, None).is_ok()
}

fn our_clients(pool: &TestPool, name: &str) -> Vec<(String, ClientData)> {
    let io = pool.ioctx(Site::A);
    let id = Image::open_read_only(&io, name, None)
        .unwrap()
        .id()
        .unwrap();
    match Journal::open(&io, &id) {
        Ok(j) => j
            .clients()
            .unwrap()
            .into_iter()
            .filter(|c| c.id.starts_with("csirr-"))
            .map(|c| {
                let d = c.client_data().expect("our client data decodes");
                (c.id, d)
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn bench(pool: &TestPool, name: &str, total: &str) {
    rbd_ok(
        Site::A,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-threads",
            "8",
            "--io-total",
            total,
            "--io-pattern",
            "rand",
            &format!("{}/{name}", pool.name),
        ],
    );
}

#[tokio::test]
async fn journal_mode_replicates_resumes_and_disables() {
    let pool = TestPool::new("jmode");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let name = "jvol";
    let vid = format!("{}/{name}", pool.name);
    // A plain image without exclusive-lock: Enable must add both features.
    ceph::rbd::create(
        &aio,
        name,
        64 * MIB,
        &ceph::CreateOptions {
            features: Some(ceph::features::LAYERING),
            ..Default::default()
        },
    )
    .unwrap();
    {
        let img = Image::open(&aio, name).unwrap();
        write(&img, &[(0, 1 << 20), (40 * MIB, 300 << 10)], 1);
    }

    let mut ca = a.controller().await;
    let enabled_at = Instant::now();
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    let f = Image::open_read_only(&aio, name, None)
        .unwrap()
        .features()
        .unwrap();
    assert_ne!(f & ceph::features::JOURNALING, 0, "journaling off: {f:#x}");
    assert_ne!(f & ceph::features::EXCLUSIVE_LOCK, 0, "exclusive-lock off");
    let rec = registry_record(&aio, name).expect("record");
    assert_eq!(rec["mode"], "journal", "{rec}");
    assert_eq!(
        rec["features_added"].as_u64(),
        Some(ceph::features::EXCLUSIVE_LOCK | ceph::features::JOURNALING)
    );
    // Idempotent; the other mode is refused naming both.
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable again");
    let e = ca
        .enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "snapshot")]))
        .await
        .expect_err("switching modes");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("journal") && e.message().contains("snapshot"),
        "{e:?}"
    );

    // Bootstrap.
    let boot = wait_equal(&pool, name, LONG).await;
    let bootstrap = enabled_at.elapsed();
    eprintln!(
        "journal bootstrap: replica equal {:.2}s after Enable (last check {:.2}s)",
        bootstrap.as_secs_f64(),
        boot.as_secs_f64()
    );
    // The copy completes just before the client is marked replaying.
    wait_until("the client replaying", LONG, || {
        our_clients(&pool, name)
            .iter()
            .any(|(_, d)| matches!(d, ClientData::MirrorPeer(m) if m.state == MirrorPeerState::Replaying))
    })
    .await;
    let clients = our_clients(&pool, name);
    assert_eq!(clients.len(), 1, "{clients:?}");
    let replica_id = Image::open_read_only(&pool.ioctx(Site::B), name, None)
        .unwrap()
        .id()
        .unwrap();
    match &clients[0].1 {
        ClientData::MirrorPeer(m) => {
            assert_eq!(m.state, MirrorPeerState::Replaying);
            assert_eq!(m.image_id, replica_id);
        }
        d => panic!("client data {d:?}"),
    }
    let snaps_after_boot = sync_snaps_in(&aio, name);
    assert_eq!(snaps_after_boot.len(), 1, "{snaps_after_boot:?}");

    // A burst of random writes, then equality.
    let t = Instant::now();
    bench(&pool, name, "8M");
    let bench_s = t.elapsed().as_secs_f64();
    let caught = wait_equal(&pool, name, LONG).await;
    eprintln!(
        "rbd bench 2048 x 4 KiB random writes: {bench_s:.2}s on the primary, replica equal \
         {:.2}s after the bench ended ({:.0} entries/s end to end)",
        caught.as_secs_f64(),
        2048.0 / (bench_s + caught.as_secs_f64())
    );

    // The lag of one small write: written and flushed on the primary, then
    // read on the replica until it is there.
    let bio = pool.ioctx(Site::B);
    let mut lags = Vec::new();
    let img = Image::open(&aio, name).unwrap();
    // The first write takes the exclusive lock (and a new journal tag).
    write(&img, &[(30 * MIB, 4096)], 99);
    for i in 0..5u64 {
        let data = pattern(100 + i, 4096);
        let off = 20 * MIB + i * 8192;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t = Instant::now();
        img.write(off, &data).unwrap();
        img.flush().unwrap();
        let replica = Image::open_read_only(&bio, name, None).unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            replica.read(off, &mut buf).unwrap();
            if buf == data {
                break;
            }
            assert!(t.elapsed() < LONG, "write {i} never reached the replica");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags.push(t.elapsed().as_secs_f64());
    }
    drop(img);
    eprintln!("lag of a single 4 KiB write (5 tries, s): {lags:.3?}");

    // Status on the primary: a recent sync point, healthy.
    let info = wait_synced(&a, &vid, LONG).await;
    assert!(info.last_sync_time.is_some(), "{info:?}");
    let mut healthy = false;
    for _ in 0..50 {
        let i = ca
            .get_volume_replication_info(info_req(Site::A, &vid))
            .await
            .unwrap()
            .into_inner();
        if i.status == Health::Healthy as i32 {
            let age = i
                .last_sync_time
                .as_ref()
                .map(|t| chrono::Utc::now().timestamp() - t.seconds);
            assert!(age.is_some_and(|a| a < 60), "stale sync time: {i:?}");
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(healthy, "never healthy");

    // Restart the replica's sidecar: writes made while it is down arrive
    // without a new bootstrap (no new sync snapshot, no bootstrap logged).
    b.stop();
    {
        let img = Image::open(&aio, name).unwrap();
        write(&img, &[(50 * MIB, 64 << 10), (3 * MIB, 4096)], 7);
        discard(&img, 40 * MIB, 128 << 10);
        img.flush().unwrap();
    }
    let b2 = Sidecar::start(Site::B, &pool.args()).await;
    wait_equal(&pool, name, LONG).await;
    assert_eq!(
        sync_snaps_in(&aio, name),
        snaps_after_boot,
        "a new bootstrap"
    );
    assert!(
        !b2.log_text().contains("journal bootstrap complete"),
        "the restarted sidecar bootstrapped again"
    );
    assert_eq!(our_clients(&pool, name).len(), 1);

    // Role changes are not served in journal mode yet: a clear refusal
    // on both sides, and replication goes on (Promote of the primary is
    // idempotent).
    let mut cb = b2.controller().await;
    let e = cb
        .promote_volume(req::promote(Site::B, &vid, false))
        .await
        .expect_err("promote of a journal replica");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("journal"), "{e:?}");
    let e = cb
        .resync_volume(req::resync(Site::B, &vid, false))
        .await
        .expect_err("resync of a journal replica");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let e = ca
        .demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect_err("demote of a journal primary");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    ca.promote_volume(req::promote(Site::A, &vid, false))
        .await
        .expect("promote of the primary");
    assert_eq!(registry_record(&aio, name).unwrap()["role"], "primary");
    {
        let img = Image::open(&aio, name).unwrap();
        write(&img, &[(60 * MIB, 4096)], 11);
    }
    wait_equal(&pool, name, LONG).await;

    // Disable: our client is gone and journaling (which Enable turned on)
    // is off; the image stays usable.
    ca.disable_volume_replication(req::disable(Site::A, &vid))
        .await
        .expect("disable");
    assert!(our_clients(&pool, name).is_empty());
    let img = Image::open(&aio, name).unwrap();
    let f = img.features().unwrap();
    assert_eq!(
        f & ceph::features::JOURNALING,
        0,
        "journaling left on: {f:#x}"
    );
    write(&img, &[(0, 4096)], 9);
    drop(b2);
}

/// A replica more than `--journal-max-sets-behind` object sets behind (its
/// sidecar was down while the primary wrote) is reported, unregistered and
/// bootstrapped again from a new snapshot, and ends equal to the primary.
/// Journaling that was on before Enable stays on after Disable.
#[tokio::test]
async fn journal_replica_too_far_behind_is_resynced() {
    let pool = TestPool::new("jlag");
    let args = ["--pools", &pool.name, "--journal-max-sets-behind", "2"];
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut b = Sidecar::start(Site::B, &args).await;
    let aio = pool.ioctx(Site::A);
    let name = "lagvol";
    let vid = format!("{}/{name}", pool.name);
    // Small journal objects: 4 x 64 KiB per object set.
    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "32M",
            "--image-feature",
            "layering,exclusive-lock,journaling",
            "--journal-object-size",
            "64K",
            &vid,
        ],
    );
    let mut ca = a.controller().await;
    ca.enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    let rec = registry_record(&aio, name).expect("record");
    assert!(rec.get("features_added").is_none(), "{rec}");
    wait_equal(&pool, name, LONG).await;
    assert_eq!(sync_snaps_in(&aio, name).len(), 1);

    b.stop();
    bench(&pool, name, "8M");
    let b2 = Sidecar::start(Site::B, &args).await;
    wait_until("the replica found too far behind", LONG, || {
        b2.log_text().contains("too far behind")
    })
    .await;
    let t = Instant::now();
    wait_equal(&pool, name, LONG).await;
    eprintln!(
        "resync of a replica too far behind: equal {:.2}s after it was detected",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        sync_snaps_in(&aio, name).len(),
        2,
        "no new bootstrap snapshot"
    );
    assert_eq!(our_clients(&pool, name).len(), 1);

    ca.disable_volume_replication(req::disable(Site::A, &vid))
        .await
        .expect("disable");
    assert!(our_clients(&pool, name).is_empty());
    let f = Image::open_read_only(&aio, name, None)
        .unwrap()
        .features()
        .unwrap();
    assert_ne!(
        f & ceph::features::JOURNALING,
        0,
        "journaling turned off: {f:#x}"
    );
    drop(b2);
}
