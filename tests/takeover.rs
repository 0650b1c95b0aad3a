//! Two sidecars replaying one site (a Deployment with two replicas, or a
//! rolling update): one lease holder at a time, a takeover when it freezes
//! or dies, and a fenced old holder that reconnects and stays out of the
//! way. Every sync point on the replica equals the primary's, and a write
//! of the registry record based on what the old holder read before the
//! takeover is refused (issue 13.5).

mod common;

use std::time::Duration;

use common::*;
use csi_rbd_replicator::ceph::Image;
use csi_rbd_replicator::engine::EngineError;
use csi_rbd_replicator::engine::registry::{Checkpoint, Registry};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);

/// Writes on the primary, takes sync snapshot `seq`, and waits until the
/// replica holds it with the same content.
async fn sync_point(pool: &TestPool, name: &str, seq: u32, off: u64) -> String {
    let img = Image::open(&pool.ioctx(Site::A), name).unwrap();
    write(&img, &[(off, 1 << 20)], u64::from(seq));
    let snap = format!("csirr-sync.{seq:010}.takeover");
    img.snap_create(&snap).unwrap();
    drop(img);
    wait_replica_snap(&pool.name, name, &snap, LONG).await;
    let spec = format!("{}/{name}@{snap}", pool.name);
    assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec), "{spec}");
    snap
}

/// The holder of site-b's lease is frozen past its lease: the other sidecar
/// takes over; woken, the old one finds itself fenced, reconnects and
/// waits; when the new holder is killed, the old one takes over again.
#[tokio::test]
async fn a_second_replayer_takes_over_and_a_fenced_one_recovers() {
    let pool = TestPool::new("takeover");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let b1 = Sidecar::start(Site::B, &pool.args()).await;
    let b2 = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 32 * MIB, &[(0, 4 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    wait_replica_snap(&pool.name, name, &first_sync(&aio, name), LONG).await;
    let synced = |sc: &Sidecar| sc.log_text().contains("sync point complete");
    assert!(
        synced(&b1) ^ synced(&b2),
        "exactly one replayer copies: b1 {} b2 {}",
        synced(&b1),
        synced(&b2)
    );
    let (holder, other) = if synced(&b1) { (&b1, &b2) } else { (&b2, &b1) };

    // The replica's record as the holder last wrote it: what it would
    // write on, woken after the takeover.
    let bio = pool.ioctx(Site::B);
    let replica_id = Image::open_read_only(&bio, name, None)
        .unwrap()
        .id()
        .unwrap();
    let breg = Registry::new(bio);
    wait_until("the first sync point settled in the record", LONG, || {
        breg.get(&replica_id)
            .ok()
            .flatten()
            .is_some_and(|r| r.pending_snap.is_none() && r.last_sync.is_some())
    })
    .await;
    let mut stale = breg.get(&replica_id).unwrap().expect("replica record");
    holder.signal("STOP");
    let snap2 = sync_point(&pool, name, 2, 8 * MIB).await;
    assert!(synced(other), "the other replayer did not take over");
    // A checkpoint on the stale read (an old holder resuming a delta it
    // started before the takeover) is refused; the new holder's sync point
    // stands.
    stale.checkpoint = Some(Checkpoint {
        from: None,
        to: "csirr-sync.0000000002.stale".into(),
        offset: 4 * MIB,
        total: 8 * MIB,
    });
    let refused = breg.put(&mut stale);
    assert!(
        matches!(refused, Err(EngineError::Conflict(_))),
        "a write on the pre-takeover record must be refused: {refused:?}"
    );
    let now = breg.get(&replica_id).unwrap().unwrap();
    assert_eq!(
        now.last_sync.map(|l| l.snap_name).as_deref(),
        Some(snap2.as_str())
    );
    assert!(now.checkpoint.is_none(), "{:?}", now.checkpoint);
    holder.signal("CONT");
    sync_point(&pool, name, 3, 12 * MIB).await;

    // The new holder dies; the old one, fenced meanwhile, must take over
    // again through new connections.
    let before = holder.log_text().matches("sync point complete").count();
    other.signal("KILL");
    sync_point(&pool, name, 4, 16 * MIB).await;
    let after = holder.log_text().matches("sync point complete").count();
    assert!(after > before, "the first replayer did not take over again");
}

/// A replica lock refused with EINVAL through the local connection (what
/// librbd did after an OSD stall in the fault suite; a fail point fakes it
/// here): the sidecar gives its lease and locks up through that connection,
/// reconnects and takes the lease again at once, instead of seeing its own
/// old lease as another replayer's until it expires. Replication goes on
/// with equal checksums.
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
#[tokio::test]
async fn a_refused_replica_lock_reconnects_and_keeps_the_lease() {
    let pool = TestPool::new("relock");
    let a = Sidecar::start(Site::A, &["--no-replayer", "--pools", &pool.name]).await;
    let b = Sidecar::start_with_env(
        Site::B,
        &pool.args(),
        &[("FAILPOINTS", "replayer::lock_replica=1*return")],
    )
    .await;
    let aio = pool.ioctx(Site::A);
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 32 * MIB, &[(0, 4 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let first = first_sync(&aio, name);
    wait_replica_snap(&pool.name, name, &first, LONG).await;
    let spec = format!("{vid}@{first}");
    assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec), "{spec}");
    sync_point(&pool, name, 2, 8 * MIB).await;

    let log = b.log_text();
    assert!(
        log.contains("cannot lock the replica through this connection; reconnecting"),
        "the fail point did not fire: {log}"
    );
    assert!(
        !log.contains("another replayer took the lease"),
        "the sidecar locked itself out with its own old lease: {log}"
    );
}
