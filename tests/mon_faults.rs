//! Monitor and local-cluster fault classes (issue 13, fault suite):
//!
//! - the peer's monitor hung (SIGSTOP), then killed, while the replica's
//!   sidecar copies a sync point from it;
//! - the local cluster's monitor and OSD hung together: Probe answers
//!   `ready=false` (never an error: the csi-addons sidecar exits on one),
//!   and ready again once they run.
//!
//! After each fault heals: the acknowledged sync point is unchanged, the
//! replica reaches the pending sync point and a new one with the primary's
//! checksums, with no restart (the engine resumes by itself), every RPC
//! called during the fault was answered within its deadline with OK or a
//! retry code, and neither sidecar exited or panicked.
//!
//! They freeze and stop daemons of the shared pair: test.sh runs
//! `exclusive_` tests alone; every daemon is resumed or restarted by a guard,
//! also when an assertion fails.

mod common;

use std::time::{Duration, Instant};

use common::fault::*;
use common::*;
use csi_rbd_replicator::grpc::proto::identity::ProbeRequest;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);

/// The pool, both sidecars (site-b replays, rate-limited so that the copy
/// is long enough to be hit) and an image replicated to its first sync
/// point. Returns the volume ID, the image name and the acknowledged first
/// sync point.
async fn replicated(
    prefix: &str,
    rate: &str,
) -> (TestPool, Sidecar, Sidecar, String, &'static str, String) {
    let pool = TestPool::new(prefix);
    let mut a_args = vec!["--no-replayer", "--pools", &pool.name];
    a_args.extend(FAULT_ARGS);
    let a = Sidecar::start(Site::A, &a_args).await;
    let mut b_args = vec![
        "--pools",
        &pool.name,
        "--max-bytes-per-second",
        rate,
        "--checkpoint-interval",
        "1s",
    ];
    b_args.extend(FAULT_ARGS);
    let b = Sidecar::start(Site::B, &b_args).await;
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&pool.ioctx(Site::A), name, 128 * MIB, &[(0, 8 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let first = first_sync(&pool.ioctx(Site::A), name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;
    (pool, a, b, vid, name, first)
}

/// Polls site `sc`'s Probe until it answers `ready`; every answer must be
/// OK (not ready is `ready=false`), each within [`DEADLINE`].
async fn probe_until(sc: &Sidecar, ready: bool, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut c = sc.identity().await;
        let r = tokio::time::timeout(DEADLINE, c.probe(ProbeRequest {}))
            .await
            .unwrap_or_else(|_| panic!("Probe on {} not answered in time", sc.site.id()))
            .unwrap_or_else(|s| panic!("Probe on {} answered an error: {s:?}", sc.site.id()));
        if r.into_inner().ready == Some(ready) {
            eprintln!("{} Probe: ready={ready}", sc.site.id());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} Probe never answered ready={ready}",
            sc.site.id()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test]
async fn exclusive_peer_mon_hung_and_killed_during_replication() {
    let (pool, mut a, mut b, vid, name, first) = replicated("monhang", "4M").await;
    let acked = checksum(Site::B, &format!("{vid}@{first}"));
    // A delta of 64 MiB at 4 MB/s: the copy runs through both faults.
    let s2 = write_and_snap(&pool, Site::A, name, 2, 16 * MIB, 64 << 20);
    copy_under_way(&pool, Site::B, name, &s2).await;

    let mut watch = Watch::start();
    watch.add(&a, &[Rpc::Probe, Rpc::Info(vid.clone())], DEADLINE);
    watch.add(&b, &[Rpc::Probe], DEADLINE);
    {
        let _hung = Hung::new(Site::A, Daemon::Mon);
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
    {
        let _down = Stopped::new(Site::A, Daemon::Mon);
        tokio::time::sleep(Duration::from_secs(12)).await;
    }
    let calls = watch.finish().await;
    check_calls(&calls);
    // The replica's own cluster answered all along: its sidecar stayed ready.
    for c in calls
        .iter()
        .filter(|c| c.site == "site-b" && c.rpc == "Probe")
    {
        assert_eq!(
            c.outcome,
            Outcome::Ok(Some(true)),
            "site-b went unready for a fault of its peer"
        );
    }

    resumed_after_fault(&pool, &vid, name, &first, &acked, &s2, &mut a, &mut b).await;
}

#[tokio::test]
async fn exclusive_local_mon_and_osd_hung_probe_not_ready() {
    let (pool, mut a, mut b, vid, name, first) = replicated("localhang", "8M").await;
    let acked = checksum(Site::B, &format!("{vid}@{first}"));
    let s2 = write_and_snap(&pool, Site::A, name, 2, 16 * MIB, 48 << 20);
    copy_under_way(&pool, Site::B, name, &s2).await;

    // site-b's sidecar loses its own cluster (the replica's writes hang);
    // site-a's sidecar loses its peer.
    let mut watch = Watch::start();
    watch.add(&b, &[Rpc::Probe], DEADLINE);
    watch.add(&a, &[Rpc::Info(vid.clone())], DEADLINE);
    {
        let osd = Hung::new(Site::B, Daemon::Osd);
        let mon = Hung::new(Site::B, Daemon::Mon);
        // Ready means the local cluster answered within the last 30 s.
        probe_until(&b, false, Duration::from_secs(120)).await;
        drop(mon);
        drop(osd);
    }
    // The Ceph 16 read-lease stall after an OSD pause (see
    // repeer_until_clean): what an operator does, before judging the sidecar.
    repeer_until_clean(Site::B, Duration::from_secs(180)).await;
    probe_until(&b, true, Duration::from_secs(120)).await;
    check_calls(&watch.finish().await);

    resumed_after_fault(&pool, &vid, name, &first, &acked, &s2, &mut a, &mut b).await;
}
