//! The replica's OSD hangs (SIGSTOP, not a clean stop) in the middle of a
//! copy that writes the replica's data objects directly, with a short op
//! timeout: the writes time out while their messages may still sit in the
//! messenger's queue. The buffers of a failed write are never handed back
//! for reuse, so nothing the copier reuses can still be queued (issue
//! 13.2); the sidecar survives, and once the OSD runs again the replica
//! converges to the primary byte for byte.
//!
//! After SIGCONT the PGs left laggy by Ceph 16's read leases are re-peered
//! (as an operator would, README Operations) before the data is compared.
//!
//! Freezes site-b's OSD: test.sh runs `exclusive_` tests alone.

mod common;

use std::time::Duration;

use common::fault::{Daemon, Hung, repeer_until_clean};
use common::*;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

#[tokio::test]
async fn exclusive_hung_replica_osd_during_direct_writes() {
    let pool = TestPool::new("osdhang");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let b = Sidecar::start(
        Site::B,
        &[
            "--op-timeout",
            "5s",
            "--max-bytes-per-second",
            "24M",
            "--checkpoint-interval",
            "1s",
            "--pools",
            &pool.name,
        ],
    )
    .await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 128 * MIB, &[(0, 96 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    wait_until("the copy to be under way", LONG, || {
        registry_record(&bio, name)
            .and_then(|r| r["checkpoint"]["offset"].as_u64())
            .is_some_and(|o| o > 8 * MIB)
    })
    .await;
    let hung = Hung::new(Site::B, Daemon::Osd);
    // Past the op timeout: the writes in flight time out.
    tokio::time::sleep(Duration::from_secs(12)).await;
    drop(hung);
    // Ceph 16 can leave PGs of the paused OSD "waiting for readable" after
    // SIGCONT until they are re-peered (read leases; see
    // repeer_until_clean): an operator's step, not the sidecar's. The data
    // check below is the point of the test.
    let repeered = repeer_until_clean(Site::B, Duration::from_secs(120)).await;
    eprintln!("after the hang: {repeered:?}");
    let first = first_sync(&aio, name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;
    let spec = format!("{vid}@{first}");
    assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec));
    // The sidecar lived through it.
    b.identity()
        .await
        .probe(csi_rbd_replicator::grpc::proto::identity::ProbeRequest {})
        .await
        .expect("the sidecar answers");
    assert!(
        b.log_text().contains("its buffers are kept"),
        "no direct write failed: the OSD was not hung during the copy"
    );
}
