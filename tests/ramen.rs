//! Ramen's DR orchestrations on top of the csi-addons controller's reconcile
//! loop (tests/common/controller.rs), against the two real clusters:
//! relocation there and back, deletion of the VolumeReplications (replica
//! side first), and failover without site-a followed by its recovery. Every
//! scenario must converge with no call outside the loops, and no sync point
//! acknowledged before a switch may be lost (checksums at every step).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::controller::{Desired, State, VolumeReplication, run_until};
use common::*;
use csi_rbd_replicator::ceph::{Image, IoCtx};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);
const PARAMS: [(&str, &str); 1] = [("schedulingInterval", "10s")];

fn role(io: &Arc<IoCtx>, name: &str) -> String {
    registry_record(io, name).map_or_else(
        || "none".to_string(),
        |r| r["role"].as_str().unwrap_or_default().to_string(),
    )
}

/// Relocation A -> B and back under Ramen, then deletion of both
/// VolumeReplications, replica side first.
#[tokio::test]
async fn ramen_relocates_there_and_back_then_deletes() {
    let pool = TestPool::new("ramen");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "app";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 64 * MIB, &[(0, 8 << 20)], 1);

    let mut va = VolumeReplication::new(&a, &vid, &PARAMS, Desired::Primary);
    run_until("A primary with a sync point", &mut [&mut va], LONG, |v| {
        v[0].status.state == State::Primary && v[0].status.last_sync_time.is_some()
    })
    .await;
    let first = converged_after(&pool, Site::A, name, None).await;
    // The application writes, then stops (Ramen quiesces it).
    write(&img, &[(16 * MIB, 4 << 20)], 2);
    drop(img);
    let a_final = checksum(Site::A, &vid);

    // Relocate A -> B: A secondary; Ramen waits for its VolumeReplication to
    // settle (Degraded=False) before it promotes B. Both sides are demoted
    // meanwhile: A's Resync must answer ready once B holds its demotion
    // snapshot (issue 12.1), or this stalls.
    va.set(Desired::Secondary);
    run_until("A demoted and settled", &mut [&mut va], LONG, |v| {
        v[0].status.state == State::Secondary && !v[0].status.degraded
    })
    .await;
    let mut vb = VolumeReplication::new(&b, &vid, &PARAMS, Desired::Primary);
    run_until("B primary", &mut [&mut va, &mut vb], LONG, |v| {
        v[1].status.state == State::Primary
    })
    .await;
    assert!(
        !vb.status.calls.iter().any(|(c, _)| c == "Promote(force)"),
        "a planned relocation forced the promotion: {:?}",
        vb.status.calls
    );
    assert_eq!(checksum(Site::B, &vid), a_final, "B lost A's last writes");

    // A becomes a replica of B by itself (orderly switch, no resync copy),
    // and its VolumeReplication settles.
    run_until(
        "A a replica of B again",
        &mut [&mut va, &mut vb],
        LONG,
        |v| role(&aio, name) == "secondary" && !v[0].status.degraded,
    )
    .await;
    let rec = registry_record(&aio, name).unwrap();
    let what = rec["role_change"]["what"].as_str().unwrap_or_default();
    assert!(
        what.contains("orderly"),
        "A did not resume by itself: {rec}"
    );
    let bimg = Image::open(&bio, name).unwrap();
    write(&bimg, &[(32 * MIB, 2 << 20)], 3);
    drop(bimg);
    let at_b = converged_after(&pool, Site::B, name, Some(&first)).await;
    let b_final = checksum(Site::B, &vid);

    // Relocate back B -> A.
    vb.set(Desired::Secondary);
    run_until(
        "B demoted and settled",
        &mut [&mut va, &mut vb],
        LONG,
        |v| v[1].status.state == State::Secondary && !v[1].status.degraded,
    )
    .await;
    va.set(Desired::Primary);
    run_until("A primary again", &mut [&mut va, &mut vb], LONG, |v| {
        v[0].status.state == State::Primary
    })
    .await;
    assert_eq!(checksum(Site::A, &vid), b_final, "A lost B's last writes");
    run_until(
        "B a replica of A again",
        &mut [&mut va, &mut vb],
        LONG,
        |_| role(&bio, name) == "secondary",
    )
    .await;
    let aimg = Image::open(&aio, name).unwrap();
    write(&aimg, &[(48 * MIB, 1 << 20)], 4);
    drop(aimg);
    let at_a = converged_after(&pool, Site::A, name, Some(&at_b)).await;

    // Delete the VolumeReplications, the replica's first: replication goes
    // on (issue 12.4); the primary's Disable then ends it.
    vb.delete();
    run_until("B's VolumeReplication deleted", &mut [&mut vb], LONG, |v| {
        v[0].gone()
    })
    .await;
    assert_eq!(role(&bio, name), "secondary", "B's replica was detached");
    let aimg = Image::open(&aio, name).unwrap();
    write(&aimg, &[(56 * MIB, 1 << 20)], 5);
    aimg.snap_create("csirr-sync.9000000000.manual").unwrap();
    drop(aimg);
    converged_after(&pool, Site::A, name, Some(&at_a)).await;
    va.delete();
    run_until("A's VolumeReplication deleted", &mut [&mut va], LONG, |v| {
        v[0].gone()
    })
    .await;
    assert_eq!(role(&aio, name), "none");
    wait_until("B's replica moves to the trash", LONG, || {
        Image::open_read_only(&bio, name, None).is_err()
    })
    .await;

    // No secret reached a log line or a status, anywhere in the scenario.
    for site in [Site::A, Site::B] {
        let key = secrets(site)["userKey"].trim().to_string();
        for sc in [&a, &b] {
            assert!(
                !sc.log_text().contains(&key),
                "{}'s key in a log",
                site.id()
            );
        }
        let st = cli("status", site, &["--verbose", "--json"]);
        assert!(!text(&st).contains(&key), "{}'s key in status", site.id());
    }
}

/// Failover under Ramen with site-a's sidecar and cluster down: B is
/// promoted (the controller forces after FAILED_PRECONDITION) and holds the
/// last sync point A's VolumeReplication acknowledged; when A returns, its
/// VolumeReplication is set secondary with autoResync and it converges to B.
///
/// Stops site-a's daemons: test.sh runs `exclusive_` tests alone.
#[tokio::test]
async fn exclusive_ramen_failover_without_site_a_then_recovery() {
    let pool = TestPool::new("ramenfo");
    let mut a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &["--op-timeout", "10s", "--pools", &pool.name]).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "db";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 64 * MIB, &[(0, 8 << 20)], 1);
    let mut va = VolumeReplication::new(&a, &vid, &PARAMS, Desired::Primary);
    run_until("A primary with a sync point", &mut [&mut va], LONG, |v| {
        v[0].status.last_sync_time.is_some()
    })
    .await;
    write(&img, &[(20 * MIB, 4 << 20)], 2);
    // A sync point after the write that the VolumeReplication acknowledges.
    let first = first_sync(&aio, name);
    let acked = converged_after(&pool, Site::A, name, Some(&first)).await;
    let acked_sum = checksum(Site::A, &format!("{vid}@{acked}"));
    run_until("A's VR shows the sync point", &mut [&mut va], LONG, |v| {
        v[0].status.last_sync_time.is_some()
    })
    .await;
    drop(va);

    // Site-a is lost: its sidecar, OSD and monitor.
    drop(img);
    let restore = lose_site_a(&mut a);
    let mut vb = VolumeReplication::new(&b, &vid, &PARAMS, Desired::Primary);
    run_until("B primary without A", &mut [&mut vb], LONG, |v| {
        v[0].status.state == State::Primary
    })
    .await;
    assert!(
        vb.status.calls.iter().any(|(c, _)| c == "Promote(force)"),
        "{:?}",
        vb.status.calls
    );
    assert_eq!(role(&bio, name), "primary");
    let b_head = checksum(Site::B, &vid);
    assert_eq!(
        b_head, acked_sum,
        "B does not hold the acknowledged sync point"
    );
    let bimg = Image::open(&bio, name).unwrap();
    write(&bimg, &[(40 * MIB, 2 << 20)], 3);
    drop(bimg);

    // Site-a returns; Ramen sets its VolumeReplication secondary, with
    // autoResync, the stale one still saying Primary.
    drop(restore);
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut va = VolumeReplication::new(&a, &vid, &PARAMS, Desired::Secondary);
    va.status.state = State::Primary;
    va.auto_resync = true;
    run_until(
        "A secondary and resynced",
        &mut [&mut va, &mut vb],
        Duration::from_secs(240),
        |v| v[0].status.state == State::Secondary && !v[0].status.degraded,
    )
    .await;
    assert_eq!(role(&aio, name), "secondary");
    converged_after(&pool, Site::B, name, Some(&acked)).await;
}
