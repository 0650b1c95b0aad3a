//! Journal replay against the two real clusters: an image with journaling
//! on site-a, this crate registered as a client of its journal, IO and ops
//! through librbd (this crate's bindings and `rbd bench`), replayed with
//! `engine::journal_replay` onto a replica on site-b; primary and replica
//! must then export the same bytes, at the head and at the snapshot the
//! journal carried. A second replayer resumes from the committed position
//! and must apply exactly the new entries.

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::{Site, admin, checksum, pattern, pool, rbd, rbd_ok, unique};
use csi_rbd_replicator::ceph::{self as c, Image, IoCtx};
use csi_rbd_replicator::engine::journal_replay::{JournalReplayer, ReplayConfig};
use csi_rbd_replicator::journal::{
    ClientData, Event, EventEntry, Journal, MirrorPeerClientMeta, MirrorPeerState,
};

const MIB: u64 = 1 << 20;

/// A RADOS namespace of its own in the test pool on site-a, removed (with
/// its images) on drop.
struct Namespace {
    name: String,
    io: Arc<IoCtx>,
}

impl Namespace {
    fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        rbd_ok(
            Site::A,
            &["namespace", "create", &format!("{}/{name}", pool())],
        );
        let io = admin(Site::A)
            .ioctx(&pool(), &name)
            .expect("namespace ioctx");
        Self { name, io }
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{}/{image}", pool(), self.name)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Ok(images) = c::rbd::list(&self.io) {
            for i in images {
                let spec = self.spec(&i.name);
                let _ = rbd(Site::A, &["snap", "purge", "--no-progress", &spec]);
                let _ = rbd(Site::A, &["rm", "--no-progress", &spec]);
            }
        }
        let _ = rbd(
            Site::A,
            &["namespace", "remove", &format!("{}/{}", pool(), self.name)],
        );
    }
}

/// An image on site-b, removed with its snapshots on drop.
struct Replica {
    spec: String,
    img: Option<Image>,
}

impl Replica {
    fn create(size: u64) -> Self {
        let name = unique("jreplica");
        let io = admin(Site::B).ioctx(&pool(), "").unwrap();
        c::rbd::create(
            &io,
            &name,
            size,
            &c::CreateOptions {
                features: Some(c::features::LAYERING | c::features::EXCLUSIVE_LOCK),
                ..Default::default()
            },
        )
        .unwrap();
        let img = Image::open(&io, &name).unwrap();
        Self {
            spec: format!("{}/{name}", pool()),
            img: Some(img),
        }
    }

    fn image(&self) -> Image {
        self.img.clone().unwrap()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.img = None;
        let _ = rbd(Site::B, &["snap", "purge", "--no-progress", &self.spec]);
        let _ = rbd(Site::B, &["rm", "--no-progress", &self.spec]);
    }
}

/// Waits for one aio submitted by `f`.
fn aio(f: impl FnOnce(c::aio::AioCallback) -> c::Result<()>) -> c::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    f(Box::new(move |r, _| {
        let _ = tx.send(r.map(|_| ()));
    }))?;
    rx.recv().expect("aio completes")
}

fn peer_data() -> ClientData {
    ClientData::MirrorPeer(MirrorPeerClientMeta {
        image_id: String::new(),
        state: MirrorPeerState::Replaying,
        sync_object_count: 0,
        sync_points: Vec::new(),
        snap_seqs: Vec::new(),
    })
}

/// The events of the journal after position (tag, entry) `after`.
fn events_after(j: &Journal, after: (u64, u64)) -> Vec<Event> {
    j.read_all()
        .unwrap()
        .into_iter()
        .filter(|e| (e.tag_tid, e.entry_tid) > after)
        .map(|e| EventEntry::decode(&e.payload).unwrap().event)
        .collect()
}

#[test]
fn journal_replay_makes_the_replica_equal_and_resumes_after_its_commit() {
    let ns = Namespace::new("jreplay");
    let size = 64 * MIB;
    c::rbd::create(
        &ns.io,
        "img",
        size,
        &c::CreateOptions {
            features: Some(
                c::features::LAYERING | c::features::EXCLUSIVE_LOCK | c::features::JOURNALING,
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let primary = Image::open(&ns.io, "img").unwrap();
    let id = primary.id().unwrap();
    let j = Journal::open(&ns.io, &id).unwrap();
    let client = format!("csirr-{}", uuid::Uuid::new_v4());
    let registered = j
        .register_or_reuse(&client, &peer_data())
        .unwrap()
        .commit_position;
    assert!(
        registered.positions.is_empty(),
        "librbd committed nothing yet, so neither did we: {registered:?}"
    );

    // Round 1: every IO event type, a snapshot, a resize, then a random
    // write load from another client (a new tag).
    primary.write(0, &pattern(1, 4096)).unwrap();
    primary.write(MIB + 512, &pattern(2, 40_000)).unwrap(); // 3 events
    primary
        .write(3 * MIB, &pattern(3, 3 * MIB as usize))
        .unwrap();
    common::discard(&primary, 3 * MIB + 1000, 300_000); // unaligned
    common::discard(&primary, 5 * MIB, MIB);
    aio(|d| primary.aio_writesame(8 * MIB + 512, 64 * 1024, pattern(4, 512), d)).unwrap();
    let old = pattern(1, 4096)[..512].to_vec();
    let mut caw = old.clone();
    caw.extend(pattern(5, 512));
    aio(|d| primary.aio_compare_and_write(0, caw, d)).unwrap();
    // A compare that fails on the primary fails on the replica as well.
    let mut caw_miss = old;
    caw_miss.extend(pattern(6, 512));
    let miss = aio(|d| primary.aio_compare_and_write(0, caw_miss, d)).unwrap_err();
    assert_eq!(miss.errno(), libc::EILSEQ, "{miss}");
    primary.flush().unwrap();
    primary.snap_create("s1").unwrap();
    primary.write(512, &pattern(7, 8192)).unwrap();
    primary.resize(96 * MIB).unwrap();
    primary.write(90 * MIB, &pattern(8, 65536)).unwrap();
    primary.flush().unwrap();
    drop(primary);
    rbd_ok(
        Site::A,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "rand",
            "--io-size",
            "64K",
            "--io-total",
            "16M",
            "--io-threads",
            "8",
            &ns.spec("img"),
        ],
    );

    let replica = Replica::create(size);
    let t = Instant::now();
    let mut r = JournalReplayer::start(
        j_clone(&ns.io, &id),
        &client,
        replica.image(),
        ReplayConfig::default(),
    )
    .unwrap();
    // Everything is left to replay: at least the entries' bytes.
    let before = r.bytes_behind().unwrap();
    // Entries behind: every entry read and counted; a scan limit of 0
    // estimates them instead; the probe sees the first entry.
    let counted = r.behind(u64::MAX).unwrap();
    assert!(counted.exact && counted.entries > 0, "{counted:?}");
    let estimated = r.behind(0).unwrap();
    assert!(!estimated.exact && estimated.entries > 0, "{estimated:?}");
    assert!(
        r.probe().unwrap(),
        "the probe misses a journal full of entries"
    );
    let n1 = r.replay_available().unwrap();
    let took = t.elapsed();
    // What the reader dropped (entries of ended tags) was counted too.
    assert_eq!(
        counted.entries,
        n1 + r.reader_stats().skipped,
        "{counted:?}, {:?}",
        r.reader_stats()
    );
    let after = r.behind(u64::MAX).unwrap();
    assert_eq!((after.entries, after.exact), (0, true), "{after:?}");
    assert!(
        !r.probe().unwrap(),
        "the probe finds entries in a replayed journal"
    );
    // Each entry is framed with 33 bytes.
    assert!(
        before >= r.stats().entries * 33 && before > 0,
        "bytes behind before the replay: {before}, entries in it: {}",
        r.stats().entries
    );
    assert_eq!(
        r.bytes_behind().unwrap(),
        0,
        "bytes behind after the replay"
    );
    let stats = r.stats();
    let rstats = r.reader_stats();
    eprintln!(
        "round 1: {n1} entries in {took:?}, {:.1} MiB of IO events, {} bytes read; {stats:?}, {rstats:?}",
        stats.io_bytes as f64 / MIB as f64,
        rstats.bytes_read
    );
    let journaled = j.read_all().unwrap();
    assert_eq!(
        n1,
        journaled.len() as u64,
        "every entry of the journal, once"
    );
    assert!(
        stats.io_events >= 256 + 10,
        "the bench's 256 writes and ours: {stats:?}"
    );
    assert_eq!(stats.ops_applied, 2, "snapshot and resize: {stats:?}");
    assert!(stats.flushes >= 2, "{stats:?}");
    assert!(stats.commits >= 1);
    let caws = journaled
        .iter()
        .filter(|e| {
            matches!(
                EventEntry::decode(&e.payload).unwrap().event,
                Event::AioCompareAndWrite { .. }
            )
        })
        .count();
    assert_eq!(caws, 2, "the missed compare-and-write is journaled too");
    // Tags: the first open, then rbd bench's own.
    let tags: std::collections::BTreeSet<u64> = journaled.iter().map(|e| e.tag_tid).collect();
    assert!(tags.len() >= 2, "{tags:?}");

    // The replica is the primary, at the head and at the snapshot.
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec),
        "head"
    );
    assert_eq!(
        checksum(Site::A, &format!("{}@s1", ns.spec("img"))),
        checksum(Site::B, &format!("{}@s1", replica.spec)),
        "snapshot s1"
    );
    assert_eq!(replica.image().size().unwrap(), 96 * MIB);

    // The commit is in the journal: our client's position is the last
    // entry, newest first.
    let last = journaled.last().unwrap();
    let mine = j.client(&client).unwrap().unwrap().commit_position;
    assert_eq!(&mine, r.committed());
    let newest = mine.newest().unwrap();
    assert_eq!(
        (newest.object_number, newest.tag_tid, newest.entry_tid),
        (last.object_number, last.tag_tid, last.entry_tid)
    );
    // Nothing new: a second call takes nothing and commits nothing.
    let commits = r.stats().commits;
    assert_eq!(r.replay_available().unwrap(), 0);
    assert_eq!(r.stats().commits, commits);
    drop(r);

    // Round 2: a restarted replayer resumes from the committed position
    // and applies exactly the new entries: writes, and snapshot and
    // metadata ops between them.
    let primary = Image::open(&ns.io, "img").unwrap();
    for i in 0..10u64 {
        primary
            .write(i * 3 * MIB + 4096, &pattern(100 + i, 4096))
            .unwrap();
        match i {
            2 => primary.snap_create("s2").unwrap(),
            3 => primary.snap_protect("s2").unwrap(),
            4 => primary.snap_unprotect("s2").unwrap(),
            5 => primary.snap_rename("s1", "s1-renamed").unwrap(),
            6 => primary.metadata_set("csirr.journal-test", "false").unwrap(),
            7 => primary.snap_remove("s2").unwrap(),
            _ => {}
        }
    }
    primary.flush().unwrap();
    drop(primary);
    // A restart finds its client registered, at its commit.
    let again = j.register_or_reuse(&client, &peer_data()).unwrap();
    assert_eq!(again.commit_position, mine);
    assert_eq!(again.client_data().unwrap(), peer_data());
    let new = events_after(&j, (newest.tag_tid, newest.entry_tid));
    let new_writes = new
        .iter()
        .filter(|e| matches!(e, Event::AioWrite { .. }))
        .count();
    assert_eq!(new_writes, 10, "{new:?}");
    // Small reads and commits: the reader reads on past committed entries
    // in many steps, the replayer commits every few entries.
    let cfg = ReplayConfig {
        max_read: 64 << 10,
        commit_every: 4,
        ..ReplayConfig::default()
    };
    let mut r =
        JournalReplayer::start(j_clone(&ns.io, &id), &client, replica.image(), cfg).unwrap();
    // A restarted reader counts only what is after the commit position.
    let counted = r.behind(u64::MAX).unwrap();
    assert_eq!(counted.entries, new.len() as u64, "{counted:?}");
    let n2 = r.replay_available().unwrap();
    eprintln!(
        "round 2: {n2} entries; {:?}, {:?}",
        r.stats(),
        r.reader_stats()
    );
    assert_eq!(n2, new.len() as u64, "only the new entries");
    assert_eq!(r.stats().io_events, 10, "{:?}", r.stats());
    assert!(r.stats().commits >= 3, "{:?}", r.stats());
    let after_round2 = j.client(&client).unwrap().unwrap().commit_position;
    assert_eq!(&after_round2, r.committed());
    assert_ne!(after_round2, mine);
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec),
        "head after round 2"
    );
    let snaps = |img: &Image| -> Vec<String> {
        img.snap_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(snaps(&replica.image()), ["s1-renamed"]);
    assert_eq!(
        replica.image().metadata_get("csirr.journal-test").unwrap(),
        Some("false".to_string())
    );
    assert_eq!(r.stats().ops_applied, 6, "{:?}", r.stats());
    drop(r);

    // Round 3, a crash after applying round 2 but before its commit: the
    // position goes back to round 1's and a new replayer applies round 2
    // again. Ops already applied (the snapshot renamed, created and
    // removed, the key set) must not fail, and nothing may diverge.
    j.commit(&client, &mine).unwrap();
    let mut r = JournalReplayer::start(
        j_clone(&ns.io, &id),
        &client,
        replica.image(),
        ReplayConfig::default(),
    )
    .unwrap();
    assert_eq!(
        j.client(&client).unwrap().unwrap().commit_position,
        mine,
        "a commit may move back"
    );
    let n3 = r.replay_available().unwrap();
    eprintln!(
        "round 3: {n3} entries; {:?}, {:?}",
        r.stats(),
        r.reader_stats()
    );
    assert_eq!(n3, new.len() as u64);
    assert_eq!(r.stats().ops_applied, 6, "{:?}", r.stats());
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec),
        "head after round 3"
    );
    assert_eq!(
        checksum(Site::A, &format!("{}@s1-renamed", ns.spec("img"))),
        checksum(Site::B, &format!("{}@s1-renamed", replica.spec)),
    );
    assert_eq!(snaps(&replica.image()), ["s1-renamed"]);
    drop(r);

    j.unregister_client(&client).unwrap();
    assert!(j.client(&client).unwrap().is_none());
}

/// Another handle on the same journal (a replayer owns its own).
fn j_clone(io: &Arc<IoCtx>, id: &str) -> Journal {
    Journal::open(io, id).unwrap()
}

/// A replayer polling while the primary is written: small journal objects
/// (64 KiB) make the writer move through dozens of object sets, and
/// librbd's trimmer removes the sets behind our commits meanwhile. Two
/// writers take the lock in turn (two tags). Afterwards the replica equals
/// the primary. Prints how long single writes took to reach the replica
/// with a replayer polling every 10 ms.
#[test]
fn journal_replay_follows_a_live_writer_across_object_sets() {
    let ns = Namespace::new("jlive");
    let size = 64 * MIB;
    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "64M",
            "--image-feature",
            "layering,exclusive-lock,journaling",
            "--journal-object-size",
            "64K",
            &ns.spec("img"),
        ],
    );
    let id = Image::open(&ns.io, "img").unwrap().id().unwrap();
    let j = Journal::open(&ns.io, &id).unwrap();
    assert_eq!(j.layout().order, 16);
    let client = format!("csirr-{}", uuid::Uuid::new_v4());
    j.register_or_reuse(&client, &peer_data()).unwrap();
    let replica = Replica::create(size);
    let cfg = ReplayConfig {
        commit_every: 256,
        ..ReplayConfig::default()
    };
    let mut r =
        JournalReplayer::start(j_clone(&ns.io, &id), &client, replica.image(), cfg).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = Arc::clone(&stop);
    let replayer = std::thread::spawn(move || {
        let mut polls = 0u64;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            r.replay_available().expect("replay");
            polls += 1;
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        r.replay_available().expect("last replay");
        (r, polls)
    });

    let t = Instant::now();
    rbd_ok(
        Site::A,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "rand",
            "--io-size",
            "64K",
            "--io-total",
            "32M",
            "--io-threads",
            "8",
            &ns.spec("img"),
        ],
    );
    let bench = t.elapsed();
    let (_, active_after_bench) = j.object_sets().unwrap();

    // Single writes from another client: each until the replica has it.
    let primary = Image::open(&ns.io, "img").unwrap();
    let replica_img = replica.image();
    let mut lags = Vec::new();
    for i in 0..5u64 {
        let data = pattern(500 + i, 4096);
        let off = (7 + 11 * i) * MIB;
        let t = Instant::now();
        primary.write(off, &data).unwrap();
        primary.flush().unwrap();
        let mut buf = vec![0u8; 4096];
        loop {
            replica_img.read(off, &mut buf).unwrap();
            if buf == data {
                break;
            }
            assert!(
                t.elapsed() < std::time::Duration::from_secs(60),
                "write {i} never reached the replica"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        lags.push(t.elapsed());
    }
    drop(primary);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (r, polls) = replayer.join().expect("replayer thread");
    let (min_set, active) = j.object_sets().unwrap();
    eprintln!(
        "bench 32 MiB in {bench:?}; sets {min_set}..={active} (active {active_after_bench} after the bench); \
         {polls} polls; {:?}; {:?}; single-write lag {lags:?}",
        r.stats(),
        r.reader_stats()
    );
    assert!(
        active_after_bench >= 20,
        "the writer moved through many sets: {active_after_bench}"
    );
    assert!(min_set > 0, "librbd trimmed behind our commits");
    assert!(r.stats().io_events >= 512 * 5, "{:?}", r.stats());
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec)
    );
    let newest = *r.committed().newest().unwrap();
    let last = j.read_all().unwrap().pop().unwrap();
    assert_eq!(
        (newest.tag_tid, newest.entry_tid),
        (last.tag_tid, last.entry_tid),
        "everything committed"
    );
    drop(r);
    j.unregister_client(&client).unwrap();
}

/// With librbd closed (it trims only while open), the replayer trims the
/// primary's journal behind the connected clients' positions after its
/// commits; before it replays, its empty position pins every set.
#[test]
fn journal_replay_trims_behind_its_commits() {
    let ns = Namespace::new("jrtrim");
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
            &ns.spec("img"),
        ],
    );
    let id = Image::open(&ns.io, "img").unwrap().id().unwrap();
    let j = Journal::open(&ns.io, &id).unwrap();
    let client = format!("csirr-{}", uuid::Uuid::new_v4());
    j.register_or_reuse(&client, &peer_data()).unwrap();
    rbd_ok(
        Site::A,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-pattern",
            "rand",
            "--io-size",
            "64K",
            "--io-total",
            "8M",
            &ns.spec("img"),
        ],
    );
    let (min0, active0) = j.object_sets().unwrap();
    assert_eq!(min0, 0, "our empty position pins the journal");
    assert!(active0 >= 10, "active set {active0}");
    assert!(j.read_object(0, 0, 4096).unwrap().is_some());
    assert_eq!(j.trim().unwrap(), 0, "still pinned");

    let replica = Replica::create(32 * MIB);
    let cfg = ReplayConfig {
        commit_every: 64,
        ..ReplayConfig::default()
    };
    let mut r =
        JournalReplayer::start(j_clone(&ns.io, &id), &client, replica.image(), cfg).unwrap();
    r.replay_available().unwrap();
    let (min1, active1) = j.object_sets().unwrap();
    eprintln!(
        "sets {min0}..={active0} before, {min1}..={active1} after; {:?}",
        r.stats()
    );
    assert!(r.stats().trims >= 1, "{:?}", r.stats());
    // The minimum set is the oldest set a connected client still needs.
    let width = u64::from(j.layout().splay_width);
    let needed = j
        .clients()
        .unwrap()
        .iter()
        .flat_map(|c| c.commit_position.positions.iter())
        .map(|p| p.object_number / width)
        .min()
        .unwrap();
    assert_eq!(min1, needed);
    assert!(min1 > 0, "trimmed");
    for n in 0..min1 * width {
        assert_eq!(j.read_object(n, 0, 4096).unwrap(), None, "object {n}");
    }
    assert_eq!(j.trim().unwrap(), min1, "nothing more to trim");
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec)
    );
    drop(r);
    j.unregister_client(&client).unwrap();
}

/// With `require_min_compat_client` at Octopus, every append is padded
/// with zeroes to 4 KiB: the reader resumes in the middle of padding runs
/// and must still hand out every entry. Changes a cluster-wide setting:
/// runs alone, and puts it back.
#[test]
fn exclusive_journal_replay_reads_padded_objects() {
    let ns = Namespace::new("jrpad");
    let _restore = common::scopeguard(|| {
        common::ceph_ok(
            Site::A,
            &[
                "osd",
                "set-require-min-compat-client",
                "luminous",
                "--yes-i-really-mean-it",
            ],
        );
    });
    common::ceph_ok(
        Site::A,
        &[
            "osd",
            "set-require-min-compat-client",
            "octopus",
            "--yes-i-really-mean-it",
        ],
    );
    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "32M",
            "--image-feature",
            "layering,exclusive-lock,journaling",
            &ns.spec("img"),
        ],
    );
    let primary = Image::open(&ns.io, "img").unwrap();
    let id = primary.id().unwrap();
    let j = Journal::open(&ns.io, &id).unwrap();
    let client = format!("csirr-{}", uuid::Uuid::new_v4());
    j.register_or_reuse(&client, &peer_data()).unwrap();
    let replica = Replica::create(32 * MIB);
    let mut r = JournalReplayer::start(
        j_clone(&ns.io, &id),
        &client,
        replica.image(),
        ReplayConfig::default(),
    )
    .unwrap();
    // Replay after every write: each read starts where the last stopped,
    // inside the padding of the last append.
    let mut taken = 0;
    for i in 0..12u64 {
        primary
            .write(i * MIB + 100, &pattern(900 + i, 5000 + 700 * i as usize))
            .unwrap();
        primary.flush().unwrap();
        taken += r.replay_available().unwrap();
    }
    drop(primary);
    taken += r.replay_available().unwrap();
    let journaled = j.read_all().unwrap();
    assert_eq!(taken, journaled.len() as u64);
    let mut padded = 0;
    for n in 0..u64::from(j.layout().splay_width) {
        if let Some(buf) = j.read_object(n, 0, 1 << 24).unwrap() {
            assert_eq!(buf.len() % 4096, 0, "object {n} is padded");
            padded += 1;
        }
    }
    assert!(padded > 0);
    eprintln!("{taken} entries; {:?}; {:?}", r.stats(), r.reader_stats());
    assert_eq!(
        checksum(Site::A, &ns.spec("img")),
        checksum(Site::B, &replica.spec)
    );
    drop(r);
    j.unregister_client(&client).unwrap();
}
