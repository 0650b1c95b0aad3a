//! Snapshot replication over time, against the real pair: deltas with
//! discards, resizes and user snapshots; a replayer killed mid-delta resumes
//! from its checkpoint; schedules; pruning; byte-rate caps. Each test has a
//! pool of its own so that it is the only replayer of that pool.

mod common;

use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn sync_name(seq: u64) -> String {
    format!("csirr-sync.{seq:010}")
}

fn spec(pool: &TestPool, image: &str, snap: &str) -> String {
    format!("{}/{image}@{snap}", pool.name)
}

fn enable_in(
    pool: &TestPool,
    image: &str,
    params: &[(&str, &str)],
) -> csi_rbd_replicator::grpc::proto::replication::EnableVolumeReplicationRequest {
    enable_req(Site::A, &format!("{}/{image}", pool.name), params)
}

/// Several rounds of random writes, discards, a user snapshot, a grow and a
/// shrink, each followed by a sync point: after each, the replica's snapshot
/// equals the primary's, checksum for checksum.
#[tokio::test]
async fn deltas_with_discards_resizes_and_user_snapshots_converge() {
    let pool = TestPool::new("deltas");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let io = pool.ioctx(Site::A);
    let name = "img";
    let img = create_image_in(&io, name, 64 * MIB, &[(0, 8 << 20), (30 * MIB, 3 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_in(&pool, name, &[]))
        .await
        .expect("enable");
    wait_replica_snap(
        &pool.name,
        name,
        &first_sync(&io, name),
        Duration::from_secs(60),
    )
    .await;

    type Change = Box<dyn Fn(&csi_rbd_replicator::ceph::Image)>;
    let rounds: Vec<Change> = vec![
        // Discards in objects that only the first sync wrote (directly,
        // bypassing librbd's object map in memory): whole and partial.
        Box::new(|img| {
            discard(img, 4 * MIB, 4 * MIB);
            discard(img, 31 * MIB, 64 << 10);
        }),
        // Random 64 KiB writes across the image.
        Box::new(|img| {
            let w: Vec<(u64, usize)> = (0..40)
                .map(|i| ((i * 7919 % 1000) * 64 * 1024, 64 << 10))
                .collect();
            write(img, &w, 2);
        }),
        // Discards: aligned, unaligned, across objects; a user snapshot in
        // between; more writes after it.
        Box::new(|img| {
            discard(img, 4 * MIB, 4 * MIB);
            discard(img, 30 * MIB + 12_345, 100_000);
            write(img, &[(50 * MIB, 1 << 20)], 3);
            img.snap_create("user-1").expect("user snapshot");
            discard(img, 0, 64 * 1024);
            write(img, &[(51 * MIB, 1 << 20)], 4);
        }),
        // Grow, and write past the old end.
        Box::new(|img| {
            img.resize(96 * MIB).expect("grow");
            write(img, &[(90 * MIB, 2 << 20), (63 * MIB, 2 << 20)], 5);
        }),
        // Shrink below data, then write near the new end.
        Box::new(|img| {
            img.resize(40 * MIB).expect("shrink");
            write(img, &[(39 * MIB, 1 << 20)], 6);
        }),
    ];
    for (round, change) in rounds.iter().enumerate() {
        change(&img);
        let snap = sync_name(round as u64 + 2);
        img.snap_create(&snap).expect("sync snapshot");
        wait_replica_snap(&pool.name, name, &snap, Duration::from_secs(60)).await;
        assert_eq!(
            checksum(Site::A, &spec(&pool, name, &snap)),
            checksum(Site::B, &spec(&pool, name, &snap)),
            "round {round}: replica differs at {snap}"
        );
    }
    // The user snapshot reached the replica with the primary's content.
    assert_eq!(
        checksum(Site::A, &spec(&pool, name, "user-1")),
        checksum(Site::B, &spec(&pool, name, "user-1")),
    );
    // Every older snapshot the replica still has kept its content through
    // the later deltas (written directly, with the replica's snapshot
    // context: a wrong one would overwrite them).
    let snaps = |site| -> Vec<String> {
        let out = rbd_ok(
            site,
            &[
                "snap",
                "ls",
                "--format",
                "json",
                &format!("{}/{name}", pool.name),
            ],
        );
        serde_json::from_str::<Vec<serde_json::Value>>(&out)
            .expect("snap ls json")
            .iter()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect()
    };
    let on_a = snaps(Site::A);
    let both: Vec<String> = snaps(Site::B)
        .into_iter()
        .filter(|n| on_a.contains(n))
        .collect();
    assert!(both.len() >= 3, "snapshots on both sides: {both:?}");
    for snap in &both {
        assert_eq!(
            checksum(Site::A, &spec(&pool, name, snap)),
            checksum(Site::B, &spec(&pool, name, snap)),
            "replica snapshot {snap} changed after it was taken"
        );
    }
    // The replica's size followed the shrink.
    let info = rbd_ok(
        Site::B,
        &["info", "--format", "json", &format!("{}/{name}", pool.name)],
    );
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["size"].as_u64(), Some(40 * MIB));
    // The deltas read the primary's data objects directly, the first sync
    // sparsely and wrote the replica's directly, and the checksums above
    // hold for those paths (the discards of round 0 are lost if librbd
    // keeps its stale object map after the direct writes).
    let log = b.log_text();
    assert!(
        log.contains("direct=true sparse=false"),
        "no delta read objects directly:\n{log}"
    );
    assert!(
        log.contains("direct=true sparse=true direct_writes=true"),
        "the first sync did not copy objects sparsely and directly:\n{log}"
    );
    assert!(
        log.contains("direct=true sparse=false direct_writes=true"),
        "no delta wrote objects directly:\n{log}"
    );
}

/// Kill -9 the replaying sidecar in the middle of a large delta; the next
/// one resumes from the checkpoint, copies less than the whole delta, and
/// the replica is exact.
#[tokio::test]
async fn killed_replayer_resumes_a_delta_from_its_checkpoint() {
    let pool = TestPool::new("resume");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let io = pool.ioctx(Site::A);
    let name = "big";
    let img = create_image_in(&io, name, 512 * MIB, &[(0, 4096)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_in(&pool, name, &[]))
        .await
        .expect("enable");
    // A slow replayer: 48 MiB/s, checkpoints every second.
    let slow = [
        "--max-bytes-per-second",
        "48M",
        "--checkpoint-interval",
        "1s",
        "--pools",
        &pool.name,
    ];
    let mut b = Sidecar::start(Site::B, &slow).await;
    wait_replica_snap(
        &pool.name,
        name,
        &first_sync(&io, name),
        Duration::from_secs(60),
    )
    .await;

    let total = 384 * MIB;
    write(&img, &[(64 * MIB, total as usize)], 2);
    img.snap_create(&sync_name(2)).expect("sync snapshot");

    // Wait for a checkpoint part way through, then kill the replayer.
    let rio = pool.ioctx(Site::B);
    let deadline = Instant::now() + Duration::from_secs(60);
    let offset = loop {
        let off = registry_record(&rio, name)
            .and_then(|r| r["checkpoint"]["offset"].as_u64())
            .unwrap_or(0);
        if off > 64 * MIB + 64 * MIB {
            break off;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint written; log:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    b.kill();
    let replica_snaps = sync_snaps_in(&rio, name);
    assert!(
        !replica_snaps.contains(&sync_name(2)),
        "a partial delta was marked complete: {replica_snaps:?}"
    );

    let _b2 = Sidecar::start(Site::B, &pool.args()).await;
    wait_replica_snap(&pool.name, name, &sync_name(2), Duration::from_secs(120)).await;
    let rec = registry_record(&rio, name).expect("replica record");
    let copied = rec["last_sync"]["bytes"].as_u64().expect("bytes");
    assert!(
        copied <= total - (offset - 64 * MIB) + 8 * MIB,
        "resumed delta copied {copied} bytes; checkpoint was at {offset} of {total}"
    );
    assert!(rec["checkpoint"].is_null(), "checkpoint left behind: {rec}");
    assert_eq!(
        checksum(Site::A, &spec(&pool, name, &sync_name(2))),
        checksum(Site::B, &spec(&pool, name, &sync_name(2))),
    );
}

/// A schedule of two seconds produces sync points at that cadence; a start
/// time in the future holds the first scheduled one back; old sync snapshots
/// are pruned on both sides; a per-image byte-rate cap slows the copy.
#[tokio::test]
async fn schedules_pruning_and_rate_cap() {
    let pool = TestPool::new("sched");
    let keep = ["--keep-snapshots", "2", "--pools", &pool.name];
    let a = Sidecar::start(Site::A, &keep).await;
    let _b = Sidecar::start(Site::B, &keep).await;
    let io = pool.ioctx(Site::A);
    create_image_in(&io, "fast", 16 * MIB, &[(0, 1 << 20)], 1);
    create_image_in(&io, "later", 16 * MIB, &[(0, 1 << 20)], 2);
    create_image_in(&io, "capped", 64 * MIB, &[(0, 48 << 20)], 3);
    let start = (chrono::Utc::now() + chrono::TimeDelta::seconds(12)).to_rfc3339();
    let mut c = a.controller().await;
    c.enable_volume_replication(enable_in(&pool, "fast", &[("schedulingInterval", "2s")]))
        .await
        .expect("enable fast");
    c.enable_volume_replication(enable_in(
        &pool,
        "later",
        &[
            ("schedulingInterval", "2s"),
            ("schedulingStartTime", &start),
        ],
    ))
    .await
    .expect("enable later");
    c.enable_volume_replication(enable_in(&pool, "capped", &[("bandwidthLimit", "12M")]))
        .await
        .expect("enable capped");

    let newest = |image: &str| {
        sync_snaps_in(&io, image)
            .last()
            .and_then(|n| {
                n.trim_start_matches("csirr-sync.")
                    .split('.')
                    .next()
                    .and_then(|q| q.parse::<u64>().ok())
            })
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let fast_early = newest("fast");
    assert!(
        newest("later") == 1,
        "start time in the future did not hold syncs back"
    );
    assert!(
        fast_early >= 3,
        "2s schedule produced only {fast_early} sync points in 8s"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let fast = newest("fast");
    let secs = t0.elapsed().as_secs();
    assert!(
        fast <= secs / 2 + 2,
        "{fast} sync points in {secs}s is faster than the schedule"
    );
    assert!(
        newest("later") >= 2,
        "start time passed but no scheduled sync"
    );

    // Pruning: the replica keeps exactly 2, the primary at most one more
    // (the pending sync point).
    // Sync points keep coming every 2 s: between a replica snapshot and the
    // prune that follows it the replica briefly holds one more, so sample
    // repeatedly: never more than keep + 1 (replica) or keep + 1 (primary,
    // the pending one), and exactly keep once a prune has run.
    let rio = pool.ioctx(Site::B);
    let mut settled = false;
    for _ in 0..50 {
        let (r, p) = (sync_snaps_in(&rio, "fast"), sync_snaps_in(&io, "fast"));
        assert!(r.len() <= 3, "replica holds {r:?}");
        assert!(p.len() <= 3, "primary holds {p:?}");
        settled |= r.len() == 2;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "the replica never settled at 2 sync snapshots");

    // 48 MiB at 12 MiB/s takes at least ~3 s (one second of burst).
    let info = wait_synced(
        &a,
        &format!("{}/capped", pool.name),
        Duration::from_secs(60),
    )
    .await;
    let d = info.last_sync_duration.expect("duration");
    assert!(d.seconds >= 2, "capped sync took {d:?}");
}

/// The replayer acts on RADOS notifications, not on its poll: with an
/// hour-long poll interval on the replica's side, an image enabled after the
/// replayer's first pass is replicated within seconds (Enable notifies the
/// registry), and so are the sync snapshots the primary's scheduler takes
/// (it notifies the registry after each).
#[tokio::test]
async fn notifications_wake_the_replayer_between_polls() {
    let pool = TestPool::new("wake");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &["--pools", &pool.name, "--poll-interval", "1h"]).await;
    let io = pool.ioctx(Site::A);
    // The replayer's first pass creates the peer's (empty) registry object to
    // watch it; after that, only notifications can wake it.
    wait_until(
        "the replayer to watch the registry",
        Duration::from_secs(30),
        || io.omap_get_all("csi-rbd-replicator.registry", "").is_ok(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let name = "img";
    let img = create_image_in(&io, name, 32 * MIB, &[(0, 4 << 20)], 7);
    a.controller()
        .await
        .enable_volume_replication(enable_in(&pool, name, &[("schedulingInterval", "3s")]))
        .await
        .expect("enable");
    let first = first_sync(&io, name);
    wait_replica_snap(&pool.name, name, &first, Duration::from_secs(30)).await;

    // The scheduler's next sync point, with new data in it.
    write(&img, &[(10 * MIB, 1 << 20), (31 * MIB, 64 << 10)], 8);
    let mut second = None;
    wait_until("the second sync snapshot", Duration::from_secs(30), || {
        second = sync_snaps_in(&io, name)
            .into_iter()
            .find(|n| n.starts_with("csirr-sync.0000000002"));
        second.is_some()
    })
    .await;
    let second = second.expect("second sync snapshot");
    wait_replica_snap(&pool.name, name, &second, Duration::from_secs(30)).await;
    assert_eq!(
        checksum(Site::B, &spec(&pool, name, &second)),
        checksum(Site::A, &spec(&pool, name, &second)),
        "replica of the scheduled sync point differs"
    );
}
