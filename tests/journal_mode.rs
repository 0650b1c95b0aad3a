//! Journal mode (`mirroringMode: journal`) end to end on the real pair,
//! driven through gRPC: Enable on site-a turns on exclusive-lock and
//! journaling; the site-b sidecar registers in the primary's journal,
//! bootstraps the replica from a snapshot and replays the journal; the
//! replica must equal the primary (`rbd export` checksums) after `rbd
//! bench` and small writes; a restarted site-b sidecar resumes without a
//! new bootstrap; Disable unregisters the client and turns journaling off.
//! The lag of a single write and the catch-up after `rbd bench` are logged
//! (never asserted). Roles: a relocation there and back (demote, planned
//! promote, the old primary a replica by itself), and a forced failover
//! followed by a resync and a failback, with checksums at every switch and
//! the journal tags, clients and features as librbd and `rbd` see them.

mod common;

use std::time::{Duration, Instant};

use common::*;
use csi_rbd_replicator::ceph::{self, Image};
use csi_rbd_replicator::grpc::proto::replication::get_volume_replication_info_response::Status as Health;
use csi_rbd_replicator::journal::{ClientData, Journal, MirrorPeerState, TagData};
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
    eventually(
        "the primary to be healthy",
        LONG,
        Duration::from_millis(200),
        || {
            let (mut ca, req) = (ca.clone(), info_req(Site::A, &vid));
            async move {
                let i = ca
                    .get_volume_replication_info(req)
                    .await
                    .unwrap()
                    .into_inner();
                if i.status != Health::Healthy as i32 {
                    return Err(format!("{i:?}"));
                }
                let age = i
                    .last_sync_time
                    .as_ref()
                    .map(|t| chrono::Utc::now().timestamp() - t.seconds);
                assert!(age.is_some_and(|a| a < 60), "stale sync time: {i:?}");
                Ok(())
            }
        },
    )
    .await;

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

    // Promote of the primary is idempotent; replication goes on.
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

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The body of `GET /metrics` on 127.0.0.1:`port`.
async fn metrics(port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics port");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of the series of `/metrics` on `port` whose line starts with
/// `name{` and contains every label of `labels` (0 when absent).
async fn metric_value(port: u16, name: &str, labels: &[&str]) -> f64 {
    metrics(port)
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the sidecar whose metrics are on `port` reported the image
/// of label `image` caught up with the primary's journal.
async fn wait_caught_up(port: u16, image: &str) {
    let what = format!("{image} to catch up");
    eventually(&what, LONG, Duration::from_millis(100), || async move {
        let at = metric_value(
            port,
            "csi_rbd_replicator_journal_caught_up_timestamp_seconds",
            &[image],
        )
        .await;
        (at > 0.0).then_some(()).ok_or_else(String::new)
    })
    .await
}

/// Waits until the replica reads `data` at `off`.
async fn wait_data(pool: &TestPool, name: &str, off: u64, data: &[u8]) {
    let t = Instant::now();
    let mut buf = vec![0u8; data.len()];
    loop {
        if let Ok(replica) = Image::open_read_only(&pool.ioctx(Site::B), name, None) {
            replica.read(off, &mut buf).unwrap();
            if buf == data {
                return;
            }
        }
        assert!(
            t.elapsed() < LONG,
            "the write at {off} never reached the replica"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Appends notify nobody (docs/journal.md): a write at rest reaches the
/// replica through the probe of the object where the next entry lands, and
/// a new tag or object set through the notification librbd sends on the
/// journal header. First with the probe and the safety-net poll both at 10
/// minutes, so that only the watch can deliver within the test's deadline:
/// the writes of `rbd bench` (a new tag when it takes the lock, librbd's
/// commit when it closes: both notified) reach the replica, counted as
/// watch wake-ups. Then with the default probe and the poll still at 10
/// minutes: writes of a writer that keeps the image open (nothing notified
/// until librbd's commit, 5 s later) reach the replica, counted as probe
/// hits. The entries-behind gauge is exported.
#[tokio::test]
async fn journal_watch_and_probe_deliver_writes() {
    let pool = TestPool::new("jwake");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let only_watch = [
        "--pools",
        &pool.name,
        "--metrics-address",
        &addr,
        "--journal-poll-interval",
        "10m",
        "--journal-probe-interval",
        "10m",
    ];
    let mut b = Sidecar::start(Site::B, &only_watch).await;
    let aio = pool.ioctx(Site::A);
    let name = "jwake";
    let vid = format!("{}/{name}", pool.name);
    drop(create_image_in(&aio, name, 32 * MIB, &[(0, 1 << 20)], 1));
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    wait_equal(&pool, name, LONG).await;
    let image = format!("image=\"{name}\"");
    // The replay loop runs (its first full read found it caught up): what
    // is written from now on needs a wake-up.
    wait_caught_up(port, &image).await;
    let wakeups = "csi_rbd_replicator_journal_wakeups_total";
    let watch0 = metric_value(port, wakeups, &[&image, "cause=\"watch\""]).await;

    // Only the watch: a new tag and librbd's commit at close.
    bench(&pool, name, "64K");
    wait_equal(&pool, name, LONG).await;
    let watch1 = metric_value(port, wakeups, &[&image, "cause=\"watch\""]).await;
    assert!(
        watch1 > watch0,
        "no watch wake-up counted ({watch0} -> {watch1})"
    );
    assert_eq!(
        metric_value(port, wakeups, &[&image, "cause=\"probe\""]).await,
        0.0,
        "a probe ran with --journal-probe-interval 10m"
    );
    b.stop();

    // The probe: a writer that keeps the image open.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let probing = [
        "--pools",
        &pool.name,
        "--metrics-address",
        &addr,
        "--journal-poll-interval",
        "10m",
    ];
    let b2 = Sidecar::start(Site::B, &probing).await;
    wait_caught_up(port, &image).await;
    let img = Image::open(&aio, name).unwrap();
    // The first write takes the lock: a new tag, notified.
    img.write(8 * MIB, &pattern(21, 4096)).unwrap();
    img.flush().unwrap();
    wait_data(&pool, name, 8 * MIB, &pattern(21, 4096)).await;
    for i in 0..3u64 {
        let (off, data) = (9 * MIB + i * 8192, pattern(30 + i, 4096));
        img.write(off, &data).unwrap();
        img.flush().unwrap();
        wait_data(&pool, name, off, &data).await;
    }
    let hits = metric_value(port, wakeups, &[&image, "cause=\"probe\""]).await;
    assert!(hits >= 1.0, "no probe hit counted: {hits}");
    drop(img);
    wait_equal(&pool, name, LONG).await;
    // Caught up: nothing behind (the gauge is refreshed every 2 s).
    let t = Instant::now();
    loop {
        let body = metrics(port).await;
        let gauge = |name: &str| {
            body.lines()
                .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&image))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        if gauge("csi_rbd_replicator_journal_behind_entries") == Some(0.0)
            && gauge("csi_rbd_replicator_journal_behind_bytes") == Some(0.0)
        {
            // The committed position: past the writes above.
            let entry = gauge("csi_rbd_replicator_journal_committed_entry");
            assert!(
                entry.is_some_and(|e| e >= 4.0),
                "committed entry {entry:?}:\n{body}"
            );
            assert!(gauge("csi_rbd_replicator_journal_committed_tag").is_some());
            break;
        }
        assert!(
            t.elapsed() < LONG,
            "entries and bytes behind never 0 once caught up:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    // Site-a's own bound out of the way first: the replica finds itself
    // too far behind.
    let a_args = ["--pools", &pool.name, "--journal-max-sets-behind", "10000"];
    let mut a = Sidecar::start(Site::A, &a_args).await;
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

    // The replica's site down for long: the primary's sidecar disconnects
    // its client at the bound and trims the journal past it, and the
    // replica, back, bootstraps again from a new snapshot.
    let mut b2 = b2;
    b2.stop();
    a.stop();
    a = Sidecar::start(Site::A, &args).await;
    let id = Image::open_read_only(&aio, name, None)
        .unwrap()
        .id()
        .unwrap();
    let (min_before, _) = Journal::open(&aio, &id).unwrap().object_sets().unwrap();
    bench(&pool, name, "8M");
    // Disconnected, then the journal trimmed past it (to within the
    // active set and the sets librbd's own client still needs).
    let mut seen = String::new();
    wait_until(
        "the client disconnected and the journal trimmed",
        LONG,
        || {
            let j = Journal::open(&aio, &id).unwrap();
            let (min, active) = j.object_sets().unwrap();
            let gone = j.clients().unwrap().iter().any(|c| {
                c.id.starts_with("csirr-")
                    && c.state == csi_rbd_replicator::journal::ClientState::Disconnected
            });
            seen = format!("disconnected {gone}, sets {min_before} -> {min}, active {active}");
            gone && min > min_before && active - min <= 3
        },
    )
    .await;
    eprintln!("primary-side bound: {seen}");
    assert!(a.log_text().contains("too far behind: disconnected"));
    let b3 = Sidecar::start(Site::B, &args).await;
    wait_equal(&pool, name, LONG).await;
    assert!(
        b3.log_text().contains("registering anew"),
        "the returning replica did not register again"
    );
    assert_eq!(
        sync_snaps_in(&aio, name).len(),
        3,
        "no new bootstrap snapshot"
    );
    wait_until("the replica's client connected again", LONG, || {
        our_clients(&pool, name)
            .iter()
            .any(|(_, d)| matches!(d, ClientData::MirrorPeer(m) if m.state == MirrorPeerState::Replaying))
    })
    .await;
    drop(b2);
    let b2 = b3;
    let mut ca = a.controller().await;

    // Demoted, then disabled with no site primary: journaling (on before
    // Enable) stays on, and the journal is promoted back, or librbd would
    // refuse every writer of the image for good.
    ca.demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect("demote");
    assert_eq!(newest_tag(&pool, Site::A, name).1.mirror_uuid, "<orphan>");
    assert_librbd_refuses_writes(&pool, Site::A, name);
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
    assert_eq!(newest_tag(&pool, Site::A, name).1.mirror_uuid, "");
    bench(&pool, name, "64K");
    drop(b2);
}

/// Waits until `from`'s export of the image equals the other site's (the
/// primary `from` is quiesced by the caller); returns the checksum.
async fn wait_equal_from(pool: &TestPool, from: Site, name: &str) -> String {
    let spec = format!("{}/{name}", pool.name);
    let want = checksum(from, &spec);
    let to = from.other();
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < LONG {
        if Image::open_read_only(&pool.ioctx(to), name, None).is_ok() {
            last = checksum(to, &spec);
            if last == want {
                return want;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!(
        "{} never equalled {} ({want} != {last})",
        to.id(),
        from.id()
    );
}

/// The journal of `name` on `site`, when it has one.
fn journal_of(pool: &TestPool, site: Site, name: &str) -> Option<Journal> {
    let io = pool.ioctx(site);
    let id = Image::open_read_only(&io, name, None).ok()?.id().unwrap();
    Journal::open(&io, &id).ok()
}

/// The newest tag of librbd's client `""` in `name`'s journal on `site`,
/// decoded.
fn newest_tag(pool: &TestPool, site: Site, name: &str) -> (u64, TagData) {
    let j = journal_of(pool, site, name).expect("a journal");
    let t = j.tags("", 0, None).unwrap().pop().expect("a tag");
    (t.tid, t.tag_data().unwrap())
}

fn features_of(pool: &TestPool, site: Site, name: &str) -> u64 {
    Image::open_read_only(&pool.ioctx(site), name, None)
        .unwrap()
        .features()
        .unwrap()
}

fn role_of(pool: &TestPool, site: Site, name: &str) -> String {
    registry_record(&pool.ioctx(site), name)
        .map(|r| r["role"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

/// librbd refuses writers of an image demoted in its journal: `rbd bench`
/// cannot take the lock ("local image not promoted", EPERM).
fn assert_librbd_refuses_writes(pool: &TestPool, site: Site, name: &str) {
    let o = rbd(
        site,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-total",
            "4K",
            &format!("{}/{name}", pool.name),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "librbd let a writer in on {}",
        site.id()
    );
    assert!(err.contains("not permitted"), "{err}");
}

fn write_on(pool: &TestPool, site: Site, name: &str, writes: &[(u64, usize)], seed: u64) {
    let img = Image::open(&pool.ioctx(site), name).unwrap();
    write(&img, writes, seed);
    img.flush().unwrap();
}

/// Demote on `from`, planned promote on the other site (retried while the
/// replica still replays up to the demotion), the old primary a replica by
/// itself; checks the tags and clients on both sides, and that both sides
/// are equal at the switch.
async fn relocate(pool: &TestPool, name: &str, from: (&Sidecar, Site), to: (&Sidecar, Site)) {
    let vid = format!("{}/{name}", pool.name);
    let before = checksum(from.1, &vid);
    let snaps = sync_snaps_in(&pool.ioctx(to.1), name);
    from.0
        .controller()
        .await
        .demote_volume(req::demote(from.1, &vid, false))
        .await
        .expect("demote");
    let rec = registry_record(&pool.ioctx(from.1), name).unwrap();
    assert_eq!(rec["role"], "demoted", "{rec}");
    let (dtag, d) = newest_tag(pool, from.1, name);
    assert_eq!(d.mirror_uuid, "<orphan>", "{d:?}");
    assert_eq!(d.predecessor.mirror_uuid, "", "{d:?}");
    assert_eq!(
        rec["demotion_snap"].as_str(),
        Some(format!("journal-tag.{dtag}").as_str())
    );
    assert_librbd_refuses_writes(pool, from.1, name);
    // Demote again: idempotent, the same demotion.
    from.0
        .controller()
        .await
        .demote_volume(req::demote(from.1, &vid, false))
        .await
        .expect("demote again");
    assert_eq!(newest_tag(pool, from.1, name).0, dtag);

    let t = Instant::now();
    promote_planned(to.0, &vid, LONG).await;
    eprintln!(
        "relocation {} -> {}: planned promote answered {:.2}s after the demotion",
        from.1.id(),
        to.1.id(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(role_of(pool, to.1, name), "primary");
    assert_ne!(
        features_of(pool, to.1, name) & ceph::features::JOURNALING,
        0
    );
    // The new primary's journal: the peer's demotion recorded as an
    // orphan epoch, then librbd's orderly promotion linked to it.
    let (ptag, p) = newest_tag(pool, to.1, name);
    assert_eq!(p.mirror_uuid, "", "{p:?}");
    assert_eq!(p.predecessor.mirror_uuid, "<orphan>", "{p:?}");
    assert!(p.predecessor.commit_valid);
    assert_eq!(p.predecessor.entry_tid, 1);
    let j = journal_of(pool, to.1, name).unwrap();
    let o = j
        .tag(p.predecessor.tag_tid)
        .unwrap()
        .expect("the orphan epoch")
        .tag_data()
        .unwrap();
    assert_eq!(o.mirror_uuid, "<orphan>");
    assert_eq!(o.predecessor.mirror_uuid, admin(from.1).fsid());
    assert_eq!(o.predecessor.tag_tid, dtag);
    assert!(ptag > p.predecessor.tag_tid);
    // `rbd journal status` lists the old primary's client.
    let st = rbd_ok(
        to.1,
        &["journal", "status", "--pool", &pool.name, "--image", name],
    );
    assert!(
        st.contains(&format!("csirr-{}", admin(from.1).fsid())),
        "{st}"
    );
    // Equal at the switch: the old primary becomes a replica with no copy.
    assert_eq!(checksum(to.1, &vid), before, "the new primary differs");
    wait_until("the old primary a replica", LONG, || {
        role_of(pool, from.1, name) == "secondary"
    })
    .await;
    assert_eq!(
        features_of(pool, from.1, name) & ceph::features::JOURNALING,
        0,
        "a replica keeps no journal"
    );
    assert_eq!(checksum(from.1, &vid), before);
    // No bootstrap: the new primary got no sync snapshot.
    assert_eq!(sync_snaps_in(&pool.ioctx(to.1), name), snaps);
}

/// A relocation site-a -> site-b -> site-a with writes in between; both
/// sides are equal at each switch and after each site's writes; Disable on
/// the final primary unregisters the clients and turns off what Enable
/// turned on, and the replica goes to the trash.
#[tokio::test]
async fn journal_mode_relocates_both_ways() {
    let pool = TestPool::new("jreloc");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let name = "rvol";
    let vid = format!("{}/{name}", pool.name);
    ceph::rbd::create(
        &aio,
        name,
        32 * MIB,
        &ceph::CreateOptions {
            features: Some(ceph::features::LAYERING),
            ..Default::default()
        },
    )
    .unwrap();
    write_on(&pool, Site::A, name, &[(0, 1 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    wait_until("a replica", LONG, || {
        registry_record(&pool.ioctx(Site::B), name)
            .is_some_and(|r| r["journal"].get("skip_until").is_none() && !r["journal"].is_null())
    })
    .await;
    write_on(
        &pool,
        Site::A,
        name,
        &[(3 * MIB, 64 << 10), (20 * MIB, 4096)],
        2,
    );
    wait_equal_from(&pool, Site::A, name).await;

    relocate(&pool, name, (&a, Site::A), (&b, Site::B)).await;
    // site-b's writes reach site-a.
    write_on(&pool, Site::B, name, &[(5 * MIB, 128 << 10), (0, 4096)], 3);
    discard(
        &Image::open(&pool.ioctx(Site::B), name).unwrap(),
        20 * MIB,
        64 << 10,
    );
    wait_equal_from(&pool, Site::B, name).await;
    let info = wait_synced(&b, &vid, LONG).await;
    assert!(info.last_sync_time.is_some(), "{info:?}");
    // Resync of a replica that became one by itself: ready, no copy.
    resync_until_ready(&a, &vid, false, LONG).await;
    // The `status` command agrees on both sites.
    let image_in = |site: Site| {
        let st = json(&cli(
            "status",
            site,
            &["--pool", &pool.name, "--verbose", "--json"],
        ));
        st["pools"][0]["images"]
            .as_array()
            .and_then(|v| v.iter().find(|i| i["name"] == name).cloned())
            .unwrap_or_else(|| panic!("{name} not in the status of {}: {st}", site.id()))
    };
    assert_eq!(image_in(Site::B)["role"], "primary");
    // The replica reports the journal bytes it has left to replay: none.
    wait_until("site-a reporting nothing left to replay", LONG, || {
        image_in(Site::B)["replicas"][0]["bytes_pending"] == 0
    })
    .await;
    let on_a = image_in(Site::A);
    assert_eq!(on_a["role"], "secondary", "{on_a}");
    let b_id = Image::open_read_only(&pool.ioctx(Site::B), name, None)
        .unwrap()
        .id()
        .unwrap();
    assert_eq!(on_a["primary"]["image_id"], b_id.as_str(), "{on_a}");

    relocate(&pool, name, (&b, Site::B), (&a, Site::A)).await;
    write_on(&pool, Site::A, name, &[(7 * MIB, 64 << 10)], 4);
    wait_equal_from(&pool, Site::A, name).await;
    let mut healthy = false;
    for _ in 0..100 {
        let i = a
            .controller()
            .await
            .get_volume_replication_info(info_req(Site::A, &vid))
            .await
            .unwrap()
            .into_inner();
        if i.status == Health::Healthy as i32 {
            healthy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(healthy, "never healthy after the relocations");

    // Disable on the final primary (site-a): its journal loses our
    // clients, journaling goes off (Enable turned it on), the replica goes
    // to the trash.
    a.controller()
        .await
        .disable_volume_replication(req::disable(Site::A, &vid))
        .await
        .expect("disable");
    assert!(our_clients(&pool, name).is_empty());
    assert_eq!(
        features_of(&pool, Site::A, name) & ceph::features::JOURNALING,
        0
    );
    wait_until("the replica trashed", LONG, || {
        Image::open_read_only(&pool.ioctx(Site::B), name, None).is_err()
    })
    .await;
    write_on(&pool, Site::A, name, &[(0, 4096)], 5);
}

/// Forced failover to site-b with site-a's sidecar stopped (site-a still
/// primary, not demoted), writes on both sides (a split-brain), then
/// site-a demoted and resynced with force from site-b, then failed back by
/// a planned relocation; checksums at each step.
#[tokio::test]
async fn journal_mode_forced_failover_resync_and_failback() {
    let pool = TestPool::new("jfail");
    let mut a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let name = "fvol";
    let vid = format!("{}/{name}", pool.name);
    ceph::rbd::create(
        &aio,
        name,
        32 * MIB,
        &ceph::CreateOptions {
            features: Some(ceph::features::LAYERING | ceph::features::EXCLUSIVE_LOCK),
            ..Default::default()
        },
    )
    .unwrap();
    write_on(&pool, Site::A, name, &[(0, 1 << 20)], 1);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("mirroringMode", "journal")]))
        .await
        .expect("enable in journal mode");
    write_on(&pool, Site::A, name, &[(2 * MIB, 64 << 10)], 2);
    let agreed = wait_equal_from(&pool, Site::A, name).await;

    // Failover: site-a's sidecar is gone; site-b takes over by force.
    a.stop();
    let mut cb = b.controller().await;
    let e = cb
        .promote_volume(req::promote(Site::B, &vid, false))
        .await
        .expect_err("a planned promotion while site-a is primary");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    cb.promote_volume(req::promote(Site::B, &vid, true))
        .await
        .expect("forced promotion");
    assert_eq!(role_of(&pool, Site::B, name), "primary");
    assert_eq!(checksum(Site::B, &vid), agreed, "not at the last entry");
    // librbd's forced promotion: an epoch no peer links to.
    let (_, p) = newest_tag(&pool, Site::B, name);
    assert_eq!(p.mirror_uuid, "");
    assert_eq!(p.predecessor.mirror_uuid, "");
    assert_eq!(p.predecessor.entry_tid, 0);
    // Split brain: both sides written.
    write_on(&pool, Site::A, name, &[(9 * MIB, 64 << 10)], 3);
    write_on(&pool, Site::B, name, &[(4 * MIB, 64 << 10)], 4);

    // site-a's sidecar back: both report the split-brain; nothing copied.
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut ca = a.controller().await;
    let mut seen = false;
    for _ in 0..150 {
        let i = cb
            .get_volume_replication_info(info_req(Site::B, &vid))
            .await
            .unwrap()
            .into_inner();
        if i.status == Health::Error as i32 {
            assert!(
                i.status_message.contains("split-brain"),
                "{}",
                i.status_message
            );
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen, "site-b never reported the split-brain");
    assert_eq!(role_of(&pool, Site::A, name), "primary");

    // Failback: demote site-a, resync it (refused without force), then it
    // equals site-b.
    ca.demote_volume(req::demote(Site::A, &vid, false))
        .await
        .expect("demote site-a");
    let e = ca
        .resync_volume(req::resync(Site::A, &vid, false))
        .await
        .expect_err("resync without force");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("split-brain"), "{e:?}");
    let t = Instant::now();
    resync_until_ready(&a, &vid, true, LONG).await;
    let b_now = wait_equal_from(&pool, Site::B, name).await;
    eprintln!(
        "journal resync after a split-brain: site-a equal {:.2}s after ResyncVolume",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(role_of(&pool, Site::A, name), "secondary");
    assert_eq!(
        features_of(&pool, Site::A, name) & ceph::features::JOURNALING,
        0
    );
    // site-b's writes keep flowing.
    write_on(&pool, Site::B, name, &[(6 * MIB, 4096)], 5);
    let b_next = wait_equal_from(&pool, Site::B, name).await;
    assert_ne!(b_now, b_next);

    // Relocate back to site-a, then write there.
    relocate(&pool, name, (&b, Site::B), (&a, Site::A)).await;
    write_on(&pool, Site::A, name, &[(10 * MIB, 64 << 10)], 6);
    wait_equal_from(&pool, Site::A, name).await;

    // Disable on site-a: our clients gone; exclusive-lock was there before
    // Enable and stays, journaling (added) goes.
    ca.disable_volume_replication(req::disable(Site::A, &vid))
        .await
        .expect("disable");
    assert!(our_clients(&pool, name).is_empty());
    let f = features_of(&pool, Site::A, name);
    assert_eq!(f & ceph::features::JOURNALING, 0, "{f:#x}");
    assert_ne!(f & ceph::features::EXCLUSIVE_LOCK, 0, "{f:#x}");
}

/// Pool mode in journal mode (`pool enable --mode journal`): an image that
/// exists and one created afterwards are enrolled in journal mode (their
/// features turned on, the records say `journal`) and their replicas equal
/// the primaries after writes; a bad mode, and a schedule with journal
/// mode, are INVALID_ARGUMENT and turn nothing on.
#[tokio::test]
async fn journal_pool_mode_enrolls_existing_and_new_images() {
    use csi_rbd_replicator::grpc::proto::admin::PoolModeRequest;
    let pool = TestPool::new("jpool");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let plain = ceph::CreateOptions {
        features: Some(ceph::features::LAYERING),
        ..Default::default()
    };
    ceph::rbd::create(&aio, "before", 16 * MIB, &plain).unwrap();
    write(&Image::open(&aio, "before").unwrap(), &[(0, 1 << 20)], 1);
    let mut admin = a.admin_api().await;
    let req = |mode: &str, interval: &str| PoolModeRequest {
        pool: pool.name.clone(),
        mirroring_mode: mode.into(),
        scheduling_interval: interval.into(),
        ..Default::default()
    };
    for (mode, interval) in [("bogus", ""), ("journal", "1m")] {
        let e = admin
            .pool_mode_enable(req(mode, interval))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{mode} {interval}: {e:?}");
    }
    assert!(
        registry_record(&aio, "before").is_none(),
        "nothing enrolled"
    );
    let r = admin
        .pool_mode_enable(req("journal", ""))
        .await
        .expect("pool mode on in journal mode")
        .into_inner();
    assert_eq!((r.enabled, r.mirroring_mode.as_str()), (true, "journal"));
    assert_eq!(r.images_enrolled, 1, "{r:?}");
    ceph::rbd::create(&aio, "after", 16 * MIB, &plain).unwrap();
    wait_until("the new image enrolled", LONG, || {
        registry_record(&aio, "after").is_some()
    })
    .await;
    for (k, name) in ["before", "after"].into_iter().enumerate() {
        let rec = registry_record(&aio, name).expect("record");
        assert_eq!(rec["mode"], "journal", "{name}: {rec}");
        let img = Image::open(&aio, name).unwrap();
        assert_ne!(
            img.features().unwrap() & ceph::features::JOURNALING,
            0,
            "{name}"
        );
        write(
            &img,
            &[(4 * MIB, 512 << 10), (12 * MIB, 64 << 10)],
            10 + k as u64,
        );
        drop(img);
        wait_equal(&pool, name, LONG).await;
    }
    let got = admin
        .pool_mode_get(req("", ""))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.mirroring_mode, "journal", "{got:?}");
}
