//! Replication of volume groups (issue 15) against the real pair.
//!
//! The first test pins what the design rests on (docs/volume-groups.md,
//! "Group replication"): on Ceph 16.2, `rbd_diff_iterate2` from a user
//! snapshot to a group snapshot's member snapshot (set on the handle by id)
//! lists exactly the extents written between the two, so a delta between
//! two crash-consistent cuts can be copied from the member snapshots.

mod common;

use common::*;
use csi_rbd_replicator::ceph::{Image, group};

const MIB: u64 = 1 << 20;

/// Extents `(offset, length, exists)` that differ between user snapshot
/// `from` (or nothing) and the snapshot set on `img`.
fn diff(img: &Image, from: Option<&str>, size: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    img.diff_iterate::<_, ()>(from, 0, size, false, false, |o, l, e| {
        out.push((o, l, e));
        Ok(())
    })
    .unwrap();
    out
}

/// The whole of `img` as it reads now (head or the snapshot set).
fn content(img: &Image, size: u64) -> Vec<u8> {
    let mut buf = vec![0u8; size as usize];
    assert_eq!(img.read(0, &mut buf).unwrap(), buf.len());
    buf
}

#[test]
fn diff_from_a_user_snapshot_to_a_group_member_snapshot() {
    let pool = pool();
    let io = ioctx(Site::A, "");
    let gname = unique("grp");
    let img = unique("gimg");
    let size = 16 * MIB;
    let head = create_image(Site::A, &img, size, &[(0, 64 << 10), (8 * MIB, 4096)]);
    let _cleanup = scopeguard({
        let (pool, gname, img) = (pool.clone(), gname.clone(), img.clone());
        move || {
            let _ = rbd(Site::A, &["group", "rm", &format!("{pool}/{gname}")]);
            let _ = rbd(Site::A, &["snap", "purge", &format!("{pool}/{img}")]);
            let _ = rbd(Site::A, &["rm", &format!("{pool}/{img}")]);
        }
    });
    group::create(&io, &gname).unwrap();
    group::image_add(&io, &gname, &io, &img).unwrap();
    // Cut 1: user snapshot u1, then group snapshot g1 with a write between
    // them (it belongs to g1, not u1).
    head.snap_create("u1").unwrap();
    write(&head, &[(2 * MIB, 8192)], 7);
    group::snap_create(&io, &gname, "g1").unwrap();
    // Between cut 1 and cut 2: more writes, a discard of a whole object
    // (partial ones are skipped by librbd's default
    // rbd_skip_partial_discard).
    write(&head, &[(4 * MIB, 4096), (12 * MIB, MIB as usize)], 8);
    discard(&head, 8 * MIB, 4 * MIB);
    head.snap_create("u2").unwrap();
    group::snap_create(&io, &gname, "g2").unwrap();
    // After cut 2: not in any delta up to g2.
    write(&head, &[(14 * MIB, 4096)], 9);

    let ro = Image::open_read_only(&io, &img, None).unwrap();
    let g1 = ro
        .group_snap_id(io.pool_id(), &gname, "g1")
        .unwrap()
        .expect("g1 member");
    let g2 = ro
        .group_snap_id(io.pool_id(), &gname, "g2")
        .unwrap()
        .expect("g2 member");
    assert!(g1 < g2);
    assert_eq!(
        ro.group_snap_id(io.pool_id(), &gname, "nope").unwrap(),
        None
    );

    // The first copy: everything allocated at g1 (diff from nothing).
    ro.snap_set_by_id(g1).unwrap();
    let full: Vec<_> = diff(&ro, None, size);
    let covers = |ex: &[(u64, u64, bool)], off: u64, len: u64| {
        ex.iter()
            .any(|&(o, l, e)| e && o <= off && off + len <= o + l)
    };
    assert!(covers(&full, 0, 64 << 10), "{full:?}");
    assert!(
        covers(&full, 2 * MIB, 8192),
        "the write between u1 and g1: {full:?}"
    );
    assert!(!covers(&full, 4 * MIB, 4096), "{full:?}");
    // The delta u1 -> g2 (the user snapshot of cut 1 to the member snapshot
    // of cut 2): a superset of g1 -> g2.
    ro.snap_set_by_id(g2).unwrap();
    let delta = diff(&ro, Some("u1"), size);
    eprintln!("u1 -> g2: {delta:?}");
    assert!(covers(&delta, 2 * MIB, 8192), "{delta:?}");
    assert!(covers(&delta, 4 * MIB, 4096), "{delta:?}");
    assert!(covers(&delta, 12 * MIB, MIB), "{delta:?}");
    assert!(
        delta
            .iter()
            .any(|&(o, l, e)| !e && o <= 8 * MIB && 8 * MIB + 4096 <= o + l),
        "the discard is a hole in the delta: {delta:?}"
    );
    assert!(
        !delta
            .iter()
            .any(|&(o, l, _)| o < 14 * MIB + 4096 && 14 * MIB < o + l),
        "a write after g2 is not in a delta up to g2: {delta:?}"
    );
    assert!(
        !delta.iter().any(|&(o, l, _)| o < 64 << 10 && o + l > 0),
        "unchanged data since u1 is not in the delta: {delta:?}"
    );

    // Applying the first copy at g1 and then the delta u1 -> g2, both read
    // at the member snapshots, onto another image gives exactly g2.
    let copy = unique("gcopy");
    let dst = create_image(Site::A, &copy, size, &[]);
    let _cleanup2 = scopeguard({
        let (pool, copy) = (pool.clone(), copy.clone());
        move || {
            let _ = rbd(Site::A, &["rm", &format!("{pool}/{copy}")]);
        }
    });
    for (snap, from) in [(g1, None), (g2, Some("u1"))] {
        ro.snap_set_by_id(snap).unwrap();
        for (o, l, e) in diff(&ro, from, size) {
            let mut buf = vec![0u8; l as usize];
            if e {
                ro.read(o, &mut buf).unwrap();
            }
            dst.write(o, &buf).unwrap();
        }
    }
    dst.flush().unwrap();
    ro.snap_set_by_id(g2).unwrap();
    assert!(content(&dst, size) == content(&ro, size), "copy of g2");
    ro.snap_set(None).unwrap();
    assert!(
        content(&dst, size) != content(&ro, size),
        "the head moved on after g2"
    );
}

// --- replication of a group through gRPC, on two sites ---

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use csi_rbd_replicator::ceph::IoCtx;
use csi_rbd_replicator::csi::VolumeGroupId;
use csi_rbd_replicator::grpc::proto::replication as pb;
use csi_rbd_replicator::grpc::proto::volumegroup as vg;
use csi_rbd_replicator::grpc::proto::volumegroup::controller_client::ControllerClient as VgClient;
use tonic::Code;

const BLOCK: usize = 4096;
/// Slots of the data volume's bulk writes (1 MiB on), one per sequence
/// number modulo this.
const SLOTS: u64 = 512;

fn gsource(id: &str) -> Option<pb::ReplicationSource> {
    group_source(id)
}

fn params(p: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn g_enable(site: Site, id: &str, p: &[(&str, &str)]) -> pb::EnableVolumeReplicationRequest {
    pb::EnableVolumeReplicationRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        parameters: params(p),
        ..Default::default()
    }
}

fn g_promote(site: Site, id: &str, force: bool) -> pb::PromoteVolumeRequest {
    pb::PromoteVolumeRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        force,
        ..Default::default()
    }
}

fn g_demote(site: Site, id: &str) -> pb::DemoteVolumeRequest {
    pb::DemoteVolumeRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        ..Default::default()
    }
}

fn g_resync(site: Site, id: &str, force: bool) -> pb::ResyncVolumeRequest {
    pb::ResyncVolumeRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        force,
        ..Default::default()
    }
}

fn g_info(site: Site, id: &str) -> pb::GetVolumeReplicationInfoRequest {
    pb::GetVolumeReplicationInfoRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        ..Default::default()
    }
}

fn g_disable(site: Site, id: &str) -> pb::DisableVolumeReplicationRequest {
    pb::DisableVolumeReplicationRequest {
        replication_source: gsource(id),
        secrets: secrets(site),
        ..Default::default()
    }
}

/// The group record `uuid` in the registry of `io` (JSON), if any.
fn group_record(io: &IoCtx, uuid: &str) -> Option<serde_json::Value> {
    let key = format!("group.{uuid}");
    io.omap_get_vals_by_keys("csi-rbd-replicator.registry", &[&key])
        .ok()?
        .get(&key)
        .and_then(|v| serde_json::from_slice(v).ok())
}

fn last_cut(io: &IoCtx, uuid: &str) -> Option<String> {
    group_record(io, uuid)?["last_cut"]["snap_name"]
        .as_str()
        .map(str::to_string)
}

fn role(io: &IoCtx, uuid: &str) -> Option<String> {
    group_record(io, uuid)?["role"].as_str().map(str::to_string)
}

fn u64_at(img: &Image, off: u64) -> u64 {
    let mut b = [0u8; 8];
    img.read(off, &mut b).unwrap();
    u64::from_le_bytes(b)
}

fn slot(n: u64) -> u64 {
    MIB + (n % SLOTS) * 2 * BLOCK as u64
}

/// Checks that `log` and `data` (opened at one state) show a state that
/// existed at one instant of the writer: data's head never ahead of log's,
/// log at most one ahead, and data's bulk block of its head's number written.
/// Returns the log's number.
fn check_state(what: &str, log: &Image, data: &Image) -> u64 {
    let (l, d) = (u64_at(log, 0), u64_at(data, 0));
    assert!(
        d <= l && l <= d + 1,
        "{what}: log at {l}, data at {d}: not a state that existed at one instant"
    );
    if d > 0 {
        assert_eq!(u64_at(data, slot(d)), d, "{what}: data's block of {d}");
    }
    l
}

/// An application writing log n, then data's block n, then data's head n,
/// each flushed before the next, on its own connection to `site`.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(site: Site, pool: &str, log: &str, data: &str, from: u64) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(from));
        let thread = std::thread::spawn({
            let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
            let (pool, log, data) = (pool.to_string(), log.to_string(), data.to_string());
            move || -> Result<(), String> {
                let io = admin(site).ioctx(&pool, "").unwrap();
                let l = Image::open(&io, &log).map_err(|e| e.to_string())?;
                let d = Image::open(&io, &data).map_err(|e| e.to_string())?;
                let mut block = vec![0u8; BLOCK];
                let mut n = from;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    block[..8].copy_from_slice(&n.to_le_bytes());
                    for (img, off) in [(&l, 0), (&d, slot(n)), (&d, 0)] {
                        img.write(off, &block)
                            .map_err(|e| format!("write {n}: {e}"))?;
                        img.flush().map_err(|e| format!("flush {n}: {e}"))?;
                    }
                    written.store(n, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(())
            }
        });
        Writer {
            stop,
            written,
            thread: Some(thread),
        }
    }

    /// Stops it; its last acknowledged number.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap().expect("the writer's I/O never fails");
        }
        self.written.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// A group of `members` in `pool`, made on site-a's sidecar `a` as the
/// VolumeGroupReplicationContent controller does (CreateVolumeGroup): its
/// ID on site-a, its uuid, and the same group as site-b names it (what
/// Ramen restores there; `iob` is the pool on site-b).
async fn make_group(
    a: &Sidecar,
    pool: &str,
    iob: &Arc<IoCtx>,
    members: [&str; 2],
) -> (String, String, String) {
    let g = VgClient::new(channel_to(&a.socket).await.unwrap())
        .create_volume_group(vg::CreateVolumeGroupRequest {
            name: unique("vgrc"),
            volume_ids: members.iter().map(|m| format!("{pool}/{m}")).collect(),
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .expect("CreateVolumeGroup")
        .into_inner()
        .volume_group
        .unwrap();
    let ga = g.volume_group_id;
    let uuid = VolumeGroupId::parse(&ga).unwrap().uuid().to_string();
    let gb = VolumeGroupId::new("site-b", iob.pool_id(), uuid.clone())
        .unwrap()
        .to_string();
    (ga, uuid, gb)
}

/// Waits until `site`'s record of group `uuid` holds a complete cut other
/// than every one in `seen`; checks the consistency of its snapshot on the
/// members there and returns its name.
async fn next_cut(io: &Arc<IoCtx>, uuid: &str, seen: &[String], members: [&str; 2]) -> String {
    next_cut_at(io, uuid, seen, members).await.0
}

/// [`next_cut`] and the writer's sequence number at it.
async fn next_cut_at(
    io: &Arc<IoCtx>,
    uuid: &str,
    seen: &[String],
    members: [&str; 2],
) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(c) = last_cut(io, uuid).filter(|c| !seen.contains(c)) {
            // The next cut may complete and prune this one meanwhile.
            let at = |m: &str| Image::open_read_only(io, m, Some(&c));
            if let (Ok(l), Ok(d)) = (at(members[0]), at(members[1])) {
                let n = check_state(&format!("cut {c}"), &l, &d);
                eprintln!("cut {c}: log at {n}");
                return (c, n);
            }
        }
        assert!(Instant::now() < deadline, "no new complete cut of {uuid}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The whole content of `image` in `io` at `snap` (or its head).
fn read_all(io: &Arc<IoCtx>, image: &str, snap: Option<&str>) -> Vec<u8> {
    let img = Image::open_read_only(io, image, snap).unwrap();
    let size = img.size().unwrap();
    content(&img, size)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_replication_relocates_and_fails_over_with_every_member_at_one_instant() {
    let tp = TestPool::new("grepl");
    let pool = tp.name.clone();
    let (ioa, iob) = (tp.ioctx(Site::A), tp.ioctx(Site::B));
    let (log, data) = ("log".to_string(), "data".to_string());
    for m in [&log, &data] {
        drop(create_image_in(&ioa, m, 8 * MIB, &[], 1));
    }
    let a = Sidecar::start(Site::A, &tp.args()).await;
    let mut b = Some(Sidecar::start(Site::B, &tp.args()).await);

    let (ga, uuid, gb) = make_group(&a, &pool, &iob, [&log, &data]).await;
    let members = [log.as_str(), data.as_str()];

    let mut writer = Writer::start(Site::A, &pool, &log, &data, 0);
    while writer.written.load(Ordering::SeqCst) < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ca = a.controller().await;
    let t0 = Instant::now();
    ca.enable_volume_replication(g_enable(Site::A, &ga, &[("schedulingInterval", "3s")]))
        .await
        .expect("Enable of the group");
    // Enable again: idempotent.
    ca.enable_volume_replication(g_enable(Site::A, &ga, &[("schedulingInterval", "3s")]))
        .await
        .expect("Enable again");

    // Complete cuts on site-b, each one instant of the writer.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let c = next_cut(&iob, &uuid, &seen, members).await;
        if seen.is_empty() {
            eprintln!(
                "first complete cut {:.2} s after Enable",
                t0.elapsed().as_secs_f64()
            );
        }
        seen.push(c);
    }
    let info = ca
        .get_volume_replication_info(g_info(Site::A, &ga))
        .await
        .expect("info")
        .into_inner();
    eprintln!("info: {info:?}");
    assert!(info.last_sync_time.is_some(), "{info:?}");
    assert_eq!(info.status, 1, "HEALTHY: {info:?}");
    // The group's ID on site-b and its members' there.
    let dest = ca
        .get_replication_destination_info(pb::GetReplicationDestinationInfoRequest {
            replication_source: gsource(&ga),
            secrets: secrets(Site::A),
        })
        .await
        .expect("GetReplicationDestinationInfo of the group")
        .into_inner();
    match dest.replication_destination.and_then(|d| d.r#type) {
        Some(pb::replication_destination::Type::Volumegroup(d)) => {
            assert_eq!(d.volume_group_id, gb);
            let want: std::collections::HashMap<String, String> = members
                .iter()
                .map(|m| (format!("{pool}/{m}"), format!("{pool}/{m}")))
                .collect();
            assert_eq!(d.volume_ids, want);
        }
        other => panic!("{other:?}"),
    }
    // The group and its journal exist on site-b, with the replicas in it.
    let bimages: Vec<String> = group::image_list(&iob, &format!("csi-vol-group-{uuid}"))
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(bimages.len(), 2, "{bimages:?}");

    // --- planned relocation to site-b ---
    let last = writer.stop();
    let cb = b.as_ref().unwrap().controller().await;
    let minute_and_a_half = Duration::from_secs(90);
    // The controller requeues a Demote refused while a client has a member
    // open (site-b's replayer briefly opens the primary's members to prune
    // old cuts).
    eventually(
        "Demote on site-a",
        minute_and_a_half,
        Duration::from_millis(500),
        || {
            let (mut ca, req) = (ca.clone(), g_demote(Site::A, &ga));
            async move {
                match ca.demote_volume(req).await {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::FailedPrecondition => {
                        eprintln!("Demote on site-a requeued: {}", s.message());
                        Err(s.message().to_string())
                    }
                    Err(s) => panic!("Demote on site-a: {s:?}"),
                }
            }
        },
    )
    .await;
    eventually(
        "site-a to settle",
        minute_and_a_half,
        Duration::from_millis(300),
        || {
            let (mut ca, req) = (ca.clone(), g_resync(Site::A, &ga, false));
            async move {
                let r = ca.resync_volume(req).await.expect("Resync on site-a");
                r.into_inner().ready.then_some(()).ok_or_else(String::new)
            }
        },
    )
    .await;
    eventually(
        "planned Promote on site-b",
        minute_and_a_half,
        Duration::from_millis(200),
        || {
            let (mut cb, req) = (cb.clone(), g_promote(Site::B, &gb, false));
            async move {
                match cb.promote_volume(req).await {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::Unavailable => Err(s.message().to_string()),
                    Err(s) => panic!("planned Promote on site-b: {s:?}"),
                }
            }
        },
    )
    .await;
    for m in members {
        assert!(
            read_all(&ioa, m, None) == read_all(&iob, m, None),
            "{m}: site-b's head equals site-a's demoted head"
        );
    }
    let at = |io: &Arc<IoCtx>, m: &str| Image::open_read_only(io, m, None).unwrap();
    assert_eq!(
        check_state("site-b after relocation", &at(&iob, &log), &at(&iob, &data)),
        last,
        "nothing acknowledged was lost"
    );

    // Site-b writes; site-a becomes its replica by itself.
    let mut writer = Writer::start(Site::B, &pool, &log, &data, last);
    wait_until(
        "site-a to become a replica",
        Duration::from_secs(90),
        || role(&ioa, &uuid).as_deref() == Some("secondary"),
    )
    .await;
    let mut seen_a = vec![last_cut(&ioa, &uuid).unwrap_or_default()];
    for _ in 0..2 {
        let c = next_cut(&ioa, &uuid, &seen_a, members).await;
        seen_a.push(c);
    }
    let forced_at = last_cut(&ioa, &uuid).unwrap();

    // --- forced failover to site-a: site-b's sidecar is gone ---
    let mut sb = b.take().unwrap();
    sb.kill();
    drop(sb);
    // Let the writer go on past the last cut on site-b (not replicated).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last_b = writer.stop();
    ca.promote_volume(g_promote(Site::A, &ga, true))
        .await
        .expect("forced Promote on site-a");
    // The cut it rolled back to: the last complete one.
    let cut_now = last_cut(&ioa, &uuid).unwrap();
    let n = check_state("site-a after failover", &at(&ioa, &log), &at(&ioa, &data));
    assert!(n <= last_b, "{n} > {last_b}");
    for m in members {
        assert!(
            read_all(&ioa, m, None) == read_all(&ioa, m, Some(&cut_now)),
            "{m}: site-a's head is its last complete cut {cut_now} (was {forced_at} before)"
        );
    }

    // --- failback: site-b returns, is demoted and resynced with force ---
    let b2 = Sidecar::start(Site::B, &tp.args()).await;
    let mut cb = b2.controller().await;
    let mut writer = Writer::start(Site::A, &pool, &log, &data, n);
    // The killed sidecar's watches expire after about 30 s.
    let (ninety, half) = (Duration::from_secs(90), Duration::from_millis(500));
    eventually("Demote on site-b", ninety, half, || {
        let (mut cb, req) = (cb.clone(), g_demote(Site::B, &gb));
        async move {
            match cb.demote_volume(req).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == Code::FailedPrecondition => Err(s.message().to_string()),
                Err(s) => panic!("Demote on site-b: {s:?}"),
            }
        }
    })
    .await;
    let r = cb.resync_volume(g_resync(Site::B, &gb, false)).await;
    assert_eq!(
        r.as_ref().map_err(|s| s.code()).err(),
        Some(Code::FailedPrecondition),
        "split-brain without force: {r:?}"
    );
    cb.resync_volume(g_resync(Site::B, &gb, true))
        .await
        .expect("Resync with force on site-b");
    let mut seen_b = vec![last_cut(&iob, &uuid).unwrap_or_default()];
    for _ in 0..2 {
        let c = next_cut(&iob, &uuid, &seen_b, members).await;
        seen_b.push(c);
    }
    writer.stop();
    // Each member of site-b's newest cut equals site-a's member snapshot of
    // that group snapshot (read again if a newer cut pruned it meanwhile).
    let gname = format!("csi-vol-group-{uuid}");
    let mut compared = 0;
    for _ in 0..10 {
        let c = last_cut(&iob, &uuid).unwrap();
        compared = 0;
        for m in members {
            let pa = Image::open_read_only(&ioa, m, None).unwrap();
            let Some(id) = pa.group_snap_id(ioa.pool_id(), &gname, &c).unwrap() else {
                break;
            };
            pa.snap_set_by_id(id).unwrap();
            let size = pa.size().unwrap();
            let Ok(rb) = Image::open_read_only(&iob, m, Some(&c)) else {
                break;
            };
            assert!(
                content(&pa, size) == content(&rb, size),
                "{m}: site-b's cut {c} equals site-a's"
            );
            compared += 1;
        }
        if compared == members.len() {
            break;
        }
    }
    assert_eq!(
        compared,
        members.len(),
        "site-b's newest cut compared with site-a's"
    );

    // --- Disable on the primary: site-b lets go of its replicas ---
    ca.disable_volume_replication(g_disable(Site::A, &ga))
        .await
        .expect("Disable");
    assert!(group_record(&ioa, &uuid).is_none());
    wait_until(
        "site-b to let go of its group record",
        Duration::from_secs(60),
        || group_record(&iob, &uuid).is_none(),
    )
    .await;
    let snaps = Image::open_read_only(&ioa, &log, None)
        .unwrap()
        .snap_list()
        .unwrap();
    assert!(snaps.is_empty(), "cuts left on site-a: {snaps:?}");
    drop(b2);
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_replication_bad_input_gets_its_code() {
    let pool = pool();
    let io = ioctx(Site::A, "");
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut c = a.controller().await;
    let (m1, m2) = (unique("gm"), unique("gm"));
    for m in [&m1, &m2] {
        drop(create_image(Site::A, m, 4 * MIB, &[]));
    }
    let _cleanup = scopeguard({
        let (pool, m1, m2) = (pool.clone(), m1.clone(), m2.clone());
        move || {
            for m in [&m1, &m2] {
                let _ = rbd(Site::A, &["snap", "purge", &format!("{pool}/{m}")]);
                let _ = rbd(Site::A, &["rm", &format!("{pool}/{m}")]);
            }
        }
    });
    let code = |r: Result<tonic::Response<pb::EnableVolumeReplicationResponse>, tonic::Status>| {
        r.map(|_| ()).map_err(|s| s.code()).err()
    };
    // Malformed IDs.
    for id in ["", "not-a-group-id", "0001-0006-site-a-zzzz"] {
        assert_eq!(
            code(
                c.enable_volume_replication(g_enable(Site::A, id, &[]))
                    .await
            ),
            Some(Code::InvalidArgument),
            "{id:?}"
        );
    }
    // A well-formed ID of a group that does not exist.
    let missing = VolumeGroupId::new("site-a", io.pool_id(), uuid::Uuid::new_v4().to_string())
        .unwrap()
        .to_string();
    assert_eq!(
        code(
            c.enable_volume_replication(g_enable(Site::A, &missing, &[]))
                .await
        ),
        Some(Code::NotFound)
    );
    let mut vga = VgClient::new(channel_to(&a.socket).await.unwrap());
    let g = vga
        .create_volume_group(vg::CreateVolumeGroupRequest {
            name: unique("vgrc"),
            volume_ids: vec![format!("{pool}/{m1}"), format!("{pool}/{m2}")],
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_group
        .unwrap()
        .volume_group_id;
    let _cleanup2 = scopeguard({
        let (pool, g) = (pool.clone(), g.clone());
        move || {
            let uuid = VolumeGroupId::parse(&g).unwrap().uuid().to_string();
            let _ = rbd(
                Site::A,
                &["group", "rm", &format!("{pool}/csi-vol-group-{uuid}")],
            );
        }
    });
    // Bad parameters; journal mode for a group.
    for p in [
        &[("schedulingInterval", "five minutes")][..],
        &[("mirroringMode", "journal")][..],
    ] {
        assert_eq!(
            code(c.enable_volume_replication(g_enable(Site::A, &g, p)).await),
            Some(Code::InvalidArgument),
            "{p:?}"
        );
    }
    // Not enabled yet: role changes and info are FAILED_PRECONDITION.
    let fp = Some(Code::FailedPrecondition);
    let e = |r: Result<(), tonic::Status>| r.map_err(|s| s.code()).err();
    assert_eq!(
        e(c.promote_volume(g_promote(Site::A, &g, false))
            .await
            .map(|_| ())),
        fp
    );
    assert_eq!(
        e(c.demote_volume(g_demote(Site::A, &g)).await.map(|_| ())),
        fp
    );
    assert_eq!(
        e(c.resync_volume(g_resync(Site::A, &g, false))
            .await
            .map(|_| ())),
        fp
    );
    assert_eq!(
        e(c.get_volume_replication_info(g_info(Site::A, &g))
            .await
            .map(|_| ())),
        fp
    );
    // Disable of a group not enabled: nothing to do.
    c.disable_volume_replication(g_disable(Site::A, &g))
        .await
        .expect("Disable");
    // A member replicated on its own cannot be replicated with the group.
    let v1 = format!("{pool}/{m1}");
    c.enable_volume_replication(enable_req(Site::A, &v1, &[]))
        .await
        .expect("Enable of the volume");
    assert_eq!(
        code(
            c.enable_volume_replication(g_enable(Site::A, &g, &[]))
                .await
        ),
        fp
    );
    assert!(
        group::snap_list(
            &io,
            &format!("csi-vol-group-{}", VolumeGroupId::parse(&g).unwrap().uuid())
        )
        .unwrap()
        .is_empty(),
        "no cut taken"
    );
    c.disable_volume_replication(req::disable(Site::A, &v1))
        .await
        .expect("Disable of the volume");
    // Now it works, and the first cut is there.
    c.enable_volume_replication(g_enable(Site::A, &g, &[]))
        .await
        .expect("Enable of the group");
    let cuts = group::snap_list(
        &io,
        &format!("csi-vol-group-{}", VolumeGroupId::parse(&g).unwrap().uuid()),
    )
    .unwrap();
    assert_eq!(cuts.len(), 1, "{cuts:?}");
    assert!(
        cuts[0].complete && cuts[0].name.starts_with("csirr-gcut."),
        "{cuts:?}"
    );
    c.disable_volume_replication(g_disable(Site::A, &g))
        .await
        .expect("Disable of the group");
    assert!(
        group::snap_list(
            &io,
            &format!("csi-vol-group-{}", VolumeGroupId::parse(&g).unwrap().uuid())
        )
        .unwrap()
        .is_empty()
    );
}

/// A volume added to a replicated group is copied whole; the first cut that
/// includes it is complete only once its replica holds it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_added_later_is_copied_whole_and_one_removed_is_released() {
    let tp = TestPool::new("gadd");
    let pool = tp.name.clone();
    let (ioa, iob) = (tp.ioctx(Site::A), tp.ioctx(Site::B));
    drop(create_image_in(
        &ioa,
        "m1",
        8 * MIB,
        &[(0, MIB as usize)],
        1,
    ));
    drop(create_image_in(
        &ioa,
        "m2",
        8 * MIB,
        &[(MIB, 3 * MIB as usize), (7 * MIB, 4096)],
        2,
    ));
    let a = Sidecar::start(Site::A, &tp.args()).await;
    let b = Sidecar::start(Site::B, &tp.args()).await;
    let mut vga = VgClient::new(channel_to(&a.socket).await.unwrap());
    let ga = vga
        .create_volume_group(vg::CreateVolumeGroupRequest {
            name: unique("vgrc"),
            volume_ids: vec![format!("{pool}/m1")],
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .volume_group
        .unwrap()
        .volume_group_id;
    let uuid = VolumeGroupId::parse(&ga).unwrap().uuid().to_string();
    let mut ca = a.controller().await;
    ca.enable_volume_replication(g_enable(Site::A, &ga, &[("schedulingInterval", "2s")]))
        .await
        .expect("Enable");
    let members_b =
        || group_record(&iob, &uuid).map_or(0, |r| r["members"].as_array().map_or(0, Vec::len));
    wait_until("a first cut", Duration::from_secs(60), || {
        last_cut(&iob, &uuid).is_some()
    })
    .await;
    assert_eq!(members_b(), 1);
    assert!(!image_exists_in(&iob, "m2"));
    vga.modify_volume_group_membership(vg::ModifyVolumeGroupMembershipRequest {
        volume_group_id: ga.clone(),
        volume_ids: vec![format!("{pool}/m1"), format!("{pool}/m2")],
        secrets: secrets(Site::A),
        ..Default::default()
    })
    .await
    .expect("Modify");
    wait_until("a cut with the new member", Duration::from_secs(60), || {
        members_b() >= 2
    })
    .await;
    // The cut recorded complete holds the new member whole.
    let c = last_cut(&iob, &uuid).unwrap();
    let got = Image::open_read_only(&iob, "m2", Some(&c));
    if let Ok(img) = got {
        let size = img.size().unwrap();
        assert!(
            content(&img, size) == read_all(&ioa, "m2", None),
            "m2 at {c} on site-b equals site-a's m2"
        );
    } else {
        // A newer cut completed and pruned it: the newest one holds it too.
        let c = last_cut(&iob, &uuid).unwrap();
        assert!(read_all(&iob, "m2", Some(&c)) == read_all(&ioa, "m2", None));
    }

    // m1 leaves: on site-a it keeps no cut snapshot; once a cut without it
    // is complete, its replica on site-b is unlocked, leaves the group and
    // goes to the trash (restorable), and replication goes on with m2.
    vga.modify_volume_group_membership(vg::ModifyVolumeGroupMembershipRequest {
        volume_group_id: ga.clone(),
        volume_ids: vec![format!("{pool}/m2")],
        secrets: secrets(Site::A),
        ..Default::default()
    })
    .await
    .expect("Modify removing m1");
    let cut_snaps = |io: &Arc<IoCtx>, name: &str| -> Vec<String> {
        Image::open_read_only(io, name, None)
            .unwrap()
            .snap_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| n.starts_with("csirr-gcut."))
            .collect()
    };
    assert_eq!(cut_snaps(&ioa, "m1"), Vec::<String>::new());
    wait_until("m1's replica released", Duration::from_secs(60), || {
        members_b() == 1 && !image_exists_in(&iob, "m1")
    })
    .await;
    let trash = rbd_ok(Site::B, &["trash", "ls", &pool]);
    assert!(
        trash.split_whitespace().any(|w| w == "m1"),
        "m1's replica is not in the trash: {trash}"
    );
    write(&Image::open(&ioa, "m2").unwrap(), &[(2 * MIB, 4096)], 9);
    // A cut taken before the write may complete first; a later one brings
    // it (the replica's head is its last complete cut).
    wait_until("m2's write on site-b", Duration::from_secs(60), || {
        read_all(&iob, "m2", None) == read_all(&ioa, "m2", None)
    })
    .await;
    assert_eq!(members_b(), 1);
    ca.disable_volume_replication(g_disable(Site::A, &ga))
        .await
        .expect("Disable");
    drop(b);
    drop(a);
}

fn image_exists_in(io: &Arc<IoCtx>, name: &str) -> bool {
    Image::open_read_only(io, name, None).is_ok()
}

/// The schedule of the controller-driven group tests.
const GROUP_PARAMS: [(&str, &str); 1] = [("schedulingInterval", "3s")];

/// A pool with two empty 8 MiB images on site-a, `log` and `data`, and the
/// pool's ioctx on each site.
fn log_and_data(prefix: &str) -> (TestPool, Arc<IoCtx>, Arc<IoCtx>) {
    let tp = TestPool::new(prefix);
    let (ioa, iob) = (tp.ioctx(Site::A), tp.ioctx(Site::B));
    for m in ["log", "data"] {
        drop(create_image_in(&ioa, m, 8 * MIB, &[], 1));
    }
    (tp, ioa, iob)
}

/// Site-a's VolumeReplication of group `ga` (uuid `uuid`) reconciled to
/// primary with the interleaving writer running, until site-b holds two
/// complete cuts after the first sync: the writer, the VolumeReplication
/// and the writer's sequence number at the second cut.
async fn primary_with_two_cuts<'a>(
    a: &'a Sidecar,
    pool: &str,
    ga: &str,
    iob: &Arc<IoCtx>,
    uuid: &str,
) -> (Writer, common::controller::VolumeReplication<'a>, u64) {
    use common::controller::{Desired, State, VolumeReplication, run_until};
    let writer = Writer::start(Site::A, pool, "log", "data", 0);
    let mut va = VolumeReplication::group(a, ga, &GROUP_PARAMS, Desired::Primary);
    run_until(
        "site-a primary with a sync",
        &mut [&mut va],
        Duration::from_secs(150),
        |v| v[0].status.state == State::Primary && v[0].status.last_sync_time.is_some(),
    )
    .await;
    let (mut seen, mut at_cut) = (Vec::new(), 0);
    for _ in 0..2 {
        let (c, n) = next_cut_at(iob, uuid, &seen, ["log", "data"]).await;
        seen.push(c);
        at_cut = n;
    }
    (writer, va, at_cut)
}

/// A group driven the way the controllers drive it: the group made with
/// CreateVolumeGroup (the VolumeGroupReplicationContent controller), then a
/// VolumeReplication of the group on each site reconciled with the
/// VolumeReplication controller's calls, retries and requeues
/// (`common::controller`), relocated to site-b and back the way Ramen
/// orders it (the old primary's VolumeReplication set secondary and
/// settled first, then the new one primary). Every complete cut on the
/// replica, and each new primary's head, is a state that existed at one
/// instant of the writer, and nothing acknowledged before a relocation is
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_relocates_there_and_back_driven_by_the_controllers() {
    use common::controller::{Desired, State, VolumeReplication, run_until};
    let (tp, ioa, iob) = log_and_data("gvr");
    let pool = tp.name.clone();
    let (log, data) = ("log".to_string(), "data".to_string());
    let a = Sidecar::start(Site::A, &tp.args()).await;
    let b = Sidecar::start(Site::B, &tp.args()).await;
    let (ga, uuid, gb) = make_group(&a, &pool, &iob, [&log, &data]).await;
    let members = [log.as_str(), data.as_str()];
    let (params, long) = (GROUP_PARAMS, Duration::from_secs(150));
    let at = |io: &Arc<IoCtx>, m: &str| Image::open_read_only(io, m, None).unwrap();
    let (mut writer, mut va, _) = primary_with_two_cuts(&a, &pool, &ga, &iob, &uuid).await;

    // Relocation to site-b: the application stops, site-a's VR goes
    // secondary and settles, then site-b's VR is created primary.
    let last = writer.stop();
    va.set(Desired::Secondary);
    run_until("site-a demoted", &mut [&mut va], long, |v| {
        v[0].status.state == State::Secondary
    })
    .await;
    let mut vb = VolumeReplication::group(&b, &gb, &params, Desired::Primary);
    run_until(
        "site-b primary, site-a its settled replica",
        &mut [&mut va, &mut vb],
        long,
        |v| {
            v[1].status.state == State::Primary
                && v[0].status.state == State::Secondary
                && !v[0].status.degraded
        },
    )
    .await;
    assert_eq!(
        check_state("site-b after relocation", &at(&iob, &log), &at(&iob, &data)),
        last,
        "nothing acknowledged on site-a was lost"
    );
    assert!(
        !vb.status.calls.iter().any(|(c, _)| c == "Promote(force)"),
        "a planned relocation never forces: {:?}",
        vb.status.calls
    );

    // Site-b writes; site-a replicates it; and back.
    let mut writer = Writer::start(Site::B, &pool, &log, &data, last);
    let mut seen_a = vec![last_cut(&ioa, &uuid).unwrap_or_default()];
    for _ in 0..2 {
        run_until("site-a replicating", &mut [&mut va, &mut vb], long, |_| {
            last_cut(&ioa, &uuid).is_some_and(|c| !seen_a.contains(&c))
        })
        .await;
        let c = next_cut(&ioa, &uuid, &seen_a, members).await;
        seen_a.push(c);
    }
    let last = writer.stop();
    vb.set(Desired::Secondary);
    run_until("site-b demoted", &mut [&mut vb, &mut va], long, |v| {
        v[0].status.state == State::Secondary
    })
    .await;
    va.set(Desired::Primary);
    run_until(
        "site-a primary again, site-b its settled replica",
        &mut [&mut va, &mut vb],
        long,
        |v| {
            v[0].status.state == State::Primary
                && v[1].status.state == State::Secondary
                && !v[1].status.degraded
        },
    )
    .await;
    assert_eq!(
        check_state(
            "site-a after relocating back",
            &at(&ioa, &log),
            &at(&ioa, &data)
        ),
        last,
        "nothing acknowledged on site-b was lost"
    );
    assert_eq!(role(&ioa, &uuid).as_deref(), Some("primary"));
    // Site-b's record turns from demoted to secondary once its replayer
    // takes the group on as site-a's replica; a new cut proves it.
    wait_until("site-b a replica again", long, || {
        role(&iob, &uuid).as_deref() == Some("secondary")
    })
    .await;
    let c = next_cut(
        &iob,
        &uuid,
        &[last_cut(&iob, &uuid).unwrap_or_default()],
        members,
    )
    .await;
    eprintln!("site-b replicates site-a again: cut {c}");
}

/// A group failed over and back the way the controllers do it when site-a's
/// sidecar is gone: site-b's VolumeReplication set primary gets
/// FAILED_PRECONDITION for the planned promotion (site-a's record still
/// says primary) and forces it; site-b then holds a complete cut at least as
/// new as the last one seen, every member at one instant of the writer.
/// When site-a's sidecar returns, Ramen sets its VolumeReplication
/// secondary with autoResync (its status still says Primary): Demote and a
/// forced Resync make site-a a replica of site-b again, and site-b's new
/// writes reach it as complete cuts at one instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_fails_over_and_back_driven_by_the_controllers() {
    use common::controller::{Desired, State, VolumeReplication, run_until};
    let (tp, ioa, iob) = log_and_data("gvrfo");
    let pool = tp.name.clone();
    let (log, data) = ("log".to_string(), "data".to_string());
    let mut a = Sidecar::start(Site::A, &tp.args()).await;
    let b = Sidecar::start(Site::B, &tp.args()).await;
    let (ga, uuid, gb) = make_group(&a, &pool, &iob, [&log, &data]).await;
    let members = [log.as_str(), data.as_str()];
    let (params, long) = (GROUP_PARAMS, Duration::from_secs(150));
    let at = |io: &Arc<IoCtx>, m: &str| Image::open_read_only(io, m, None).unwrap();
    let (mut writer, va, at_cut) = primary_with_two_cuts(&a, &pool, &ga, &iob, &uuid).await;

    // Site-a's sidecar and its application are gone.
    drop(va);
    a.kill();
    let lost_after = writer.stop();
    let mut vb = VolumeReplication::group(&b, &gb, &params, Desired::Primary);
    run_until(
        "site-b primary without site-a's sidecar",
        &mut [&mut vb],
        long,
        |v| v[0].status.state == State::Primary,
    )
    .await;
    assert!(
        vb.status.calls.iter().any(|(c, _)| c == "Promote(force)"),
        "the controller forced the promotion: {:?}",
        vb.status.calls
    );
    assert_eq!(role(&iob, &uuid).as_deref(), Some("primary"));
    let n_b = check_state(
        "site-b after the failover",
        &at(&iob, &log),
        &at(&iob, &data),
    );
    assert!(
        at_cut <= n_b && n_b <= lost_after,
        "site-b at {n_b}: not a complete cut since the last one seen ({at_cut}..={lost_after})"
    );
    eprintln!("failover: site-b at {n_b}, site-a had written {lost_after}");

    // Site-b writes; site-a returns and is set secondary with autoResync.
    let mut writer = Writer::start(Site::B, &pool, &log, &data, n_b);
    let a = Sidecar::start(Site::A, &tp.args()).await;
    let mut va = VolumeReplication::group(&a, &ga, &params, Desired::Secondary);
    va.status.state = State::Primary;
    va.auto_resync = true;
    run_until(
        "site-a secondary and resynced",
        &mut [&mut va, &mut vb],
        Duration::from_secs(240),
        |v| v[0].status.state == State::Secondary && !v[0].status.degraded,
    )
    .await;
    wait_until("site-a a replica", long, || {
        role(&ioa, &uuid).as_deref() == Some("secondary")
    })
    .await;
    let mut seen_a = vec![last_cut(&ioa, &uuid).unwrap_or_default()];
    for _ in 0..2 {
        let (c, n) = next_cut_at(&ioa, &uuid, &seen_a, members).await;
        assert!(
            n >= n_b,
            "site-a's cut {c} at {n}, before site-b's start {n_b}"
        );
        seen_a.push(c);
    }
    let last = writer.stop();
    let (_, n) = next_cut_at(&ioa, &uuid, &seen_a, members).await;
    assert!(
        n <= last,
        "site-a's cut at {n}, beyond site-b's last write {last}"
    );
    drop(vb);
}
