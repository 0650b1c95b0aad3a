//! Fault loop: kill -9 of a sidecar at a random point of a sync, a
//! Demote/Promote relocation, a forced Promote, or a journal-mode replay
//! under a writer that also creates and removes snapshots; then restart it
//! and check that no acknowledged sync point is lost, that the replica equals
//! a sync point of the primary (in journal mode: the primary's head and every
//! snapshot, with no new bootstrap), and that the engine resumes by itself.
//!
//! `CSIRR_FAULT_ITERATIONS` (default 4: one per class), `CSIRR_FAULT_SEED`
//! (default: the clock; printed) and `CSIRR_FAULT_CLASS` (only this class)
//! set the run; `deploy/dev/faults.sh N` runs
//! N iterations. The summary prints `N passed, N failed` per fault class.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::fault::write_and_snap;
use common::*;
use csi_rbd_replicator::ceph::Image;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);

/// splitmix64: a seeded sequence for reproducible fault points.
struct Seq(u64);

impl Seq {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The fault classes; the bounded CI run takes the first three.
const CLASSES: [&str; 4] = ["sync", "relocate", "journal", "forced-promote"];

/// One iteration of `class` with fault point `delay`; panics on a violation.
async fn iteration(class: &str, delay: Duration, it: u64) {
    let pool = TestPool::new(&format!("fault{it}"));
    let slow = ["--max-bytes-per-second", "64M", "--pools", &pool.name];
    let mut a = Sidecar::start(Site::A, &slow).await;
    let mut b = Sidecar::start(Site::B, &slow).await;
    let aio = pool.ioctx(Site::A);
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    if class == "journal" {
        return journal_replay_killed(&pool, &vid, delay, &a, &mut b).await;
    }
    create_image_in(&aio, name, 96 * MIB, &[(0, 16 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let first = first_sync(&aio, name);
    match class {
        "sync" => {
            wait_replica_snap(&pool.name, name, &first, LONG).await;
            let acked = checksum(Site::B, &format!("{vid}@{first}"));
            // A large delta; the replayer dies somewhere in it.
            write_and_snap(&pool, Site::A, name, 2, 16 * MIB, 64 << 20);
            tokio::time::sleep(delay).await;
            b.kill();
            assert_eq!(
                checksum(Site::B, &format!("{vid}@{first}")),
                acked,
                "an acknowledged sync point changed"
            );
            let _b = Sidecar::start(Site::B, &slow).await;
            converged_after(&pool, Site::A, name, Some(&first)).await;
        }
        "relocate" => {
            wait_replica_snap(&pool.name, name, &first, LONG).await;
            write(
                &Image::open(&aio, name).unwrap(),
                &[(32 * MIB, 32 << 20)],
                2,
            );
            let head = checksum(Site::A, &vid);
            // The primary's sidecar dies around its Demote.
            let mut ca = a.controller().await;
            let v = vid.clone();
            let demote =
                tokio::spawn(
                    async move { ca.demote_volume(req::demote(Site::A, &v, false)).await },
                );
            tokio::time::sleep(delay).await;
            a.kill();
            let _ = demote.await;
            a = Sidecar::start(Site::A, &slow).await;
            // The killed client's watch lingers until the OSD expires it
            // (about 30 s): Demote names it and is retried, as the
            // controller does.
            let mut ca = a.controller().await;
            let deadline = std::time::Instant::now() + LONG;
            loop {
                match ca.demote_volume(req::demote(Site::A, &vid, false)).await {
                    Ok(_) => break,
                    Err(s) if std::time::Instant::now() < deadline => {
                        eprintln!("demote again: {s:?}; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    Err(s) => panic!("demote again: {s:?}"),
                }
            }
            promote_planned(&b, &vid, LONG).await;
            assert_eq!(checksum(Site::B, &vid), head, "the relocation lost writes");
            // The old primary follows by itself.
            let snap = write_and_snap(&pool, Site::B, name, 900, 8 * MIB, 1 << 20);
            wait_replica_snap_on(&pool, Site::A, name, &snap).await;
            let spec = format!("{vid}@{snap}");
            assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec));
        }
        "forced-promote" => {
            wait_replica_snap(&pool.name, name, &first, LONG).await;
            let acked = checksum(Site::B, &format!("{vid}@{first}"));
            let s2 = write_and_snap(&pool, Site::A, name, 2, 16 * MIB, 64 << 20);
            let at_s2 = checksum(Site::A, &format!("{vid}@{s2}"));
            // Failover in the middle of the delta; the survivor's sidecar
            // dies during the forced promotion, and is asked again.
            tokio::time::sleep(Duration::from_millis(300)).await;
            a.kill();
            let mut cb = b.controller().await;
            let v = vid.clone();
            let promote =
                tokio::spawn(
                    async move { cb.promote_volume(req::promote(Site::B, &v, true)).await },
                );
            tokio::time::sleep(delay / 4).await;
            b.kill();
            let _ = promote.await;
            b = Sidecar::start(Site::B, &slow).await;
            b.controller()
                .await
                .promote_volume(req::promote(Site::B, &vid, true))
                .await
                .expect("forced promotion again");
            // The last complete sync point: the first, or the delta's if
            // it completed before the failover.
            let head = checksum(Site::B, &vid);
            assert!(
                head == acked || head == at_s2,
                "the survivor is not at a complete sync point"
            );
        }
        other => unreachable!("{other}"),
    }
}

/// The journal class: `name` in journal mode, a writer on site-a that
/// writes, creates a snapshot every sixth write and removes the older
/// ones (ops that must not be applied twice), site-b's sidecar killed
/// `delay` into it and started again once the writer is done. The replica
/// must reach the primary's head and hold exactly the primary's snapshots
/// with the same bytes, resuming from its committed position (no new
/// bootstrap snapshot on the primary).
async fn journal_replay_killed(
    pool: &TestPool,
    vid: &str,
    delay: Duration,
    a: &Sidecar,
    b: &mut Sidecar,
) {
    let name = "vol";
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    create_image_in(&aio, name, 64 * MIB, &[(0, 8 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    let head = |site: Site| checksum(site, vid);
    // Bootstrapped: the replica's journal client says so (a kill before
    // that bootstraps again, by design).
    wait_until("the journal replica replaying", LONG, || {
        replaying(&aio, name) && image_exists_in(&bio, name) && head(Site::B) == head(Site::A)
    })
    .await;
    let booted = sync_snaps_in(&aio, name);
    let writer = tokio::task::spawn_blocking({
        let aio = aio.clone();
        move || {
            let img = Image::open(&aio, name).unwrap();
            let mut kept = Vec::new();
            for i in 0..24u64 {
                let off = (i * 7919 % 60) * MIB + (i % 4) * 4096;
                write(&img, &[(off, 256 << 10)], 100 + i);
                if i % 6 == 5 {
                    let snap = format!("user{i:02}");
                    img.snap_create(&snap).unwrap();
                    kept.push(snap);
                }
                if kept.len() > 2 {
                    img.snap_remove(&kept.remove(0)).unwrap();
                }
                std::thread::sleep(Duration::from_millis(40));
            }
            kept
        }
    });
    tokio::time::sleep(delay).await;
    b.kill();
    let kept = writer.await.unwrap();
    *b = Sidecar::start(Site::B, &pool.args()).await;
    let want = head(Site::A);
    wait_until("the replica at the primary's head", LONG, || {
        head(Site::B) == want
    })
    .await;
    // The snapshots: the same names on both sides, each with the same bytes.
    let user = |io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>| {
        let img = Image::open_read_only(io, name, None).unwrap();
        let mut s: Vec<String> = img
            .snap_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| n.starts_with("user"))
            .collect();
        s.sort();
        s
    };
    wait_until("the replica's snapshots", LONG, || user(&bio) == kept).await;
    assert_eq!(user(&aio), kept);
    for snap in &kept {
        let spec = format!("{vid}@{snap}");
        assert_eq!(
            checksum(Site::A, &spec),
            checksum(Site::B, &spec),
            "{spec} differs between the sites"
        );
    }
    assert_eq!(sync_snaps_in(&aio, name), booted, "a new bootstrap");
    assert!(
        !b.log_text().contains("journal bootstrap complete"),
        "the restarted sidecar bootstrapped again"
    );
    b.assert_alive();
}

/// Whether this project's client of `name`'s journal is replaying (its
/// bootstrap complete).
fn replaying(io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> bool {
    use csi_rbd_replicator::journal::{ClientData, Journal, MirrorPeerState};
    let Some(id) = Image::open_read_only(io, name, None)
        .ok()
        .and_then(|i| i.id().ok())
    else {
        return false;
    };
    let Some(clients) = Journal::open(io, &id).ok().and_then(|j| j.clients().ok()) else {
        return false;
    };
    clients.iter().any(|c| {
        c.id.starts_with("csirr-")
            && matches!(c.client_data(), Ok(ClientData::MirrorPeer(m)) if m.state == MirrorPeerState::Replaying)
    })
}

/// Whether `name` exists in the pool of `io`.
fn image_exists_in(io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> bool {
    Image::open_read_only(io, name, None).is_ok()
}

/// Waits until `site`'s copy of `name` has snapshot `snap`.
async fn wait_replica_snap_on(pool: &TestPool, site: Site, name: &str, snap: &str) {
    let io = pool.ioctx(site);
    wait_until("the snapshot on the other side", LONG, || {
        sync_snaps_in(&io, name).iter().any(|s| s == snap)
    })
    .await;
}

#[tokio::test]
async fn fault_kill_loop() {
    let iterations: u64 = std::env::var("CSIRR_FAULT_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CLASSES.len() as u64);
    let seed: u64 = std::env::var("CSIRR_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("fault loop: {iterations} iterations, CSIRR_FAULT_SEED={seed}");
    let mut seq = Seq(seed);
    let mut results: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    let mut failures = Vec::new();
    let only = std::env::var("CSIRR_FAULT_CLASS").ok();
    if let Some(c) = &only {
        assert!(
            CLASSES.contains(&c.as_str()),
            "CSIRR_FAULT_CLASS: one of {CLASSES:?}"
        );
    }
    for it in 0..iterations {
        // The first iterations cover every class once.
        let class = if let Some(c) = &only {
            CLASSES.iter().find(|k| *k == c).unwrap()
        } else if it < CLASSES.len() as u64 {
            CLASSES[it as usize]
        } else {
            CLASSES[seq.below(CLASSES.len() as u64) as usize]
        };
        let delay = Duration::from_millis(seq.below(1500));
        eprintln!("iteration {it}: {class}, fault after {delay:?}");
        let r = tokio::spawn(async move { iteration(class, delay, it).await }).await;
        let e = results.entry(class).or_default();
        match r {
            Ok(()) => e.0 += 1,
            Err(err) => {
                e.1 += 1;
                failures.push(format!("iteration {it} ({class}, {delay:?}): {err}"));
            }
        }
    }
    for (class, (p, f)) in &results {
        eprintln!("{class}: {p} passed, {f} failed");
    }
    assert!(failures.is_empty(), "seed {seed}:\n{}", failures.join("\n"));
}
