//! Network partition between the sites (issue 13, fault suite), on the
//! netns pair: each cluster and its sidecar run in the site's own network
//! namespace, and `ceph-pair.sh partition` drops every packet on the link
//! between the namespaces, both ways, silently (each site still reaches its
//! own cluster; the tests reach both from the root namespace).
//!
//! - during a copy: the replica's sidecar is cut off from the primary in
//!   the middle of a delta;
//! - during a planned relocation: Demote on the primary and a planned
//!   Promote on the replica while the sites cannot see each other. The
//!   Promote must not succeed (the replica cannot hold the demotion
//!   snapshot); once healed, it does, with every write of the old primary.
//!
//! After the partition heals: the acknowledged sync point is unchanged, the
//! replica equals a sync point of the primary (checksums), replication
//! resumes with no restart, every RPC during the partition was answered
//! within its deadline with OK or a retry code, and no sidecar exited or
//! panicked.
//!
//! Run them with the netns pair: `deploy/dev/faults.sh` (or test.sh's
//! partition phase) brings it up; by hand:
//!   CSIRR_PAIR_NETNS=1 CSIRR_PAIR_DIR=/tmp/pair-netns deploy/dev/ceph-pair.sh up
//!   eval "$(CSIRR_PAIR_NETNS=1 CSIRR_PAIR_DIR=/tmp/pair-netns deploy/dev/ceph-pair.sh env)"
//!   cargo nextest run --test partition --test-threads 1

mod common;

use std::time::{Duration, Instant};

use common::fault::*;
use common::*;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);

/// Sidecar flags: `FAULT_ARGS`, this pool only, and `extra`.
fn args<'a>(pool: &'a TestPool, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--pools", pool.name.as_str()];
    v.extend(FAULT_ARGS);
    v.extend(extra);
    v
}

/// Creates `name` on site-a with `data` bytes written, enables it through
/// `a` and waits for the first sync point on site-b; returns it.
async fn enabled(pool: &TestPool, a: &Sidecar, name: &str, data: usize) -> String {
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&pool.ioctx(Site::A), name, 128 * MIB, &[(0, data)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let first = first_sync(&pool.ioctx(Site::A), name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;
    first
}

#[tokio::test]
async fn exclusive_netns_partition_during_copy() {
    assert!(netns_pair(), "needs the netns pair (see the module docs)");
    let pool = TestPool::new("partcopy");
    let mut a = Sidecar::start(Site::A, &args(&pool, &["--no-replayer"])).await;
    let mut b = Sidecar::start(
        Site::B,
        &args(
            &pool,
            &[
                "--max-bytes-per-second",
                "4M",
                "--checkpoint-interval",
                "1s",
            ],
        ),
    )
    .await;
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    let first = enabled(&pool, &a, name, 8 << 20).await;
    let acked = checksum(Site::B, &format!("{vid}@{first}"));
    let s2 = write_and_snap(&pool, Site::A, name, 2, 16 * MIB, 64 << 20);
    copy_under_way(&pool, Site::B, name, &s2).await;

    let mut watch = Watch::start();
    watch.add(&a, &[Rpc::Probe, Rpc::Info(vid.clone())], DEADLINE);
    watch.add(&b, &[Rpc::Probe], DEADLINE);
    {
        let _cut = Partition::new();
        // Well past the op timeout: requests in flight time out, sessions
        // to the peer's monitor and OSD go stale.
        tokio::time::sleep(Duration::from_secs(25)).await;
    }
    let calls = watch.finish().await;
    check_calls(&calls);
    // Each site still reached its own cluster: both stayed ready.
    for c in calls.iter().filter(|c| c.rpc == "Probe") {
        assert_eq!(
            c.outcome,
            Outcome::Ok(Some(true)),
            "{} went unready for a partition from its peer",
            c.site
        );
    }

    resumed_after_fault(&pool, &vid, name, &first, &acked, &s2, &mut a, &mut b).await;
}

#[tokio::test]
async fn exclusive_netns_partition_during_relocation() {
    assert!(netns_pair(), "needs the netns pair (see the module docs)");
    let pool = TestPool::new("partrole");
    // Both replay: after the relocation site-a follows site-b by itself.
    let mut a = Sidecar::start(Site::A, &args(&pool, &[])).await;
    let mut b = Sidecar::start(Site::B, &args(&pool, &[])).await;
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    let first = enabled(&pool, &a, name, 8 << 20).await;
    let acked = checksum(Site::B, &format!("{vid}@{first}"));
    // Writes after the last sync point: the demotion must carry them over.
    write(
        &csi_rbd_replicator::ceph::Image::open(&pool.ioctx(Site::A), name).unwrap(),
        &[(32 * MIB, 8 << 20)],
        2,
    );
    let head = checksum(Site::A, &vid);

    let mut watch = Watch::start();
    // Probe only: GetVolumeReplicationInfo is for primaries, and the roles
    // change under the watcher.
    watch.add(&a, &[Rpc::Probe], DEADLINE);
    watch.add(&b, &[Rpc::Probe], DEADLINE);
    let demoted;
    {
        let _cut = Partition::new();
        let t0 = Instant::now();
        let mut ca = a.controller().await;
        demoted = answered(
            "Demote on site-a (partitioned)",
            DEADLINE,
            &[],
            ca.demote_volume(req::demote(Site::A, &vid, false)),
        )
        .await
        .is_ok();
        let mut cb = b.controller().await;
        // FAILED_PRECONDITION is ceph-csi's answer when the peer cannot
        // confirm the demotion: the controller may then force (a failover,
        // which is the orchestrator's call); anything but OK is safe here.
        let r = answered(
            "planned Promote on site-b (partitioned)",
            DEADLINE,
            &[tonic::Code::FailedPrecondition],
            cb.promote_volume(req::promote(Site::B, &vid, false)),
        )
        .await;
        assert!(
            r.is_err(),
            "site-b was promoted while cut off from the demoted primary: \
             it cannot hold the demotion snapshot"
        );
        // Keep the sites apart past the op timeout.
        if let Some(rest) = Duration::from_secs(20).checked_sub(t0.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    check_calls(&watch.finish().await);
    assert_eq!(
        checksum(Site::B, &format!("{vid}@{first}")),
        acked,
        "the acknowledged sync point changed"
    );

    // Healed: the controller's retries complete the relocation.
    if !demoted {
        let mut ca = a.controller().await;
        let deadline = Instant::now() + LONG;
        while let Err(s) = answered(
            "Demote on site-a again",
            DEADLINE,
            &[],
            ca.demote_volume(req::demote(Site::A, &vid, false)),
        )
        .await
        {
            assert!(Instant::now() < deadline, "Demote never succeeded: {s:?}");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    // Planned (never forced), retried as a relocation's orchestrator would
    // while the peer is still out of reach or the demotion snapshot still
    // being copied.
    let mut cb = b.controller().await;
    let deadline = Instant::now() + LONG;
    while let Err(s) = answered(
        "planned Promote on site-b after the partition",
        DEADLINE,
        &[tonic::Code::FailedPrecondition],
        cb.promote_volume(req::promote(Site::B, &vid, false)),
    )
    .await
    {
        assert!(Instant::now() < deadline, "Promote never succeeded: {s:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(checksum(Site::B, &vid), head, "the relocation lost writes");
    // The old primary follows the new one by itself.
    let s = write_and_snap(&pool, Site::B, name, 900, 8 * MIB, 1 << 20);
    replica_equal_at(&pool, Site::A, name, &s).await;
    a.assert_alive();
    b.assert_alive();
}
