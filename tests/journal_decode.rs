//! The RBD journal decoder against journals real librbd writes on site-a:
//! each test does known IO and ops on an image with exclusive-lock and
//! journaling (through this crate's librbd bindings and the `rbd` CLI),
//! then reads the journal back with `csi_rbd_replicator::journal` and
//! checks every event against what was done. Each test works in a RADOS
//! namespace (or pool) of its own.

mod common;

use std::sync::Arc;

use common::{Site, admin, ceph, ceph_ok, pattern, pool, rbd, rbd_ok, scopeguard, unique};
use csi_rbd_replicator::ceph::{self as c, Image, IoCtx};
use csi_rbd_replicator::journal::{
    ClientData, ClientState, Event, EventEntry, Journal, JournalError, MirrorPeerClientMeta,
    MirrorPeerState, RecordedEntry, ScanEnd, SnapshotNamespace, TagData, scan_object,
};

const MIB: u64 = 1 << 20;

/// A RADOS namespace of its own in the test pool on site-a, removed (with
/// its images) on drop.
struct Namespace {
    pool: String,
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
        Self {
            pool: pool(),
            name,
            io,
        }
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{}/{image}", pool(), self.name)
    }

    /// Arguments of `rbd journal CMD` for `image` (the positional spec of
    /// journal commands names a journal, not an image).
    fn journal_args<'a>(&'a self, cmd: &'a str, image: &'a str) -> Vec<&'a str> {
        vec![
            "journal",
            cmd,
            "--pool",
            &self.pool,
            "--namespace",
            &self.name,
            "--image",
            image,
        ]
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let spec = format!("{}/{}", self.pool, self.name);
        if let Ok(images) = c::rbd::list(&self.io) {
            for i in images {
                let spec = self.spec(&i.name);
                let _ = rbd(Site::A, &["snap", "purge", "--no-progress", &spec]);
                let _ = rbd(Site::A, &["rm", "--no-progress", &spec]);
            }
        }
        let _ = rbd(Site::A, &["mirror", "pool", "disable", &spec]);
        let _ = rbd(Site::A, &["namespace", "remove", &spec]);
    }
}

/// Creates a journaled image and opens it.
fn journaled_image(io: &Arc<IoCtx>, name: &str, size: u64) -> Image {
    c::rbd::create(
        io,
        name,
        size,
        &c::CreateOptions {
            features: Some(
                c::features::LAYERING | c::features::EXCLUSIVE_LOCK | c::features::JOURNALING,
            ),
            ..Default::default()
        },
    )
    .expect("create journaled image");
    Image::open(io, name).expect("open image")
}

/// Every entry of the journal with its decoded event.
fn events(j: &Journal) -> Vec<(RecordedEntry, EventEntry)> {
    j.read_all()
        .expect("read the journal")
        .into_iter()
        .map(|e| {
            let ev = EventEntry::decode(&e.payload)
                .unwrap_or_else(|err| panic!("entry {}/{}: {err}", e.tag_tid, e.entry_tid));
            (e, ev)
        })
        .collect()
}

/// What [`workload`] did, to check the journal against.
struct Done {
    image_id: String,
    writes: Vec<(u64, Vec<u8>)>,
    discard: (u64, u64),
    snap: String,
    new_size: u64,
}

/// Writes, discards, flushes, snapshots and grows a fresh journaled image,
/// then closes it (librbd commits its own position on close).
fn workload(io: &Arc<IoCtx>, name: &str) -> Done {
    let img = journaled_image(io, name, 64 * MIB);
    let image_id = img.id().unwrap();
    // One small write, one that librbd splits into three events (at most
    // 16340 data bytes each), one after the resize.
    let writes = vec![
        (0, pattern(1, 4096)),
        (MIB + 512, pattern(2, 40_000)),
        (100 * MIB, pattern(3, 512)),
    ];
    img.write(writes[0].0, &writes[0].1).unwrap();
    img.write(writes[1].0, &writes[1].1).unwrap();
    let discard = (8 * MIB, MIB);
    common::discard(&img, discard.0, discard.1);
    img.flush().unwrap();
    let snap = "before-resize".to_string();
    img.snap_create(&snap).unwrap();
    let new_size = 128 * MIB;
    img.resize(new_size).unwrap();
    img.write(writes[2].0, &writes[2].1).unwrap();
    img.flush().unwrap();
    drop(img);
    Done {
        image_id,
        writes,
        discard,
        snap,
        new_size,
    }
}

/// Checks the journal of `done`'s image: the tag, the placement of the
/// entries, librbd's commit position, and every event.
fn check_journal(io: &Arc<IoCtx>, done: &Done) -> Journal {
    let j = Journal::open(io, &done.image_id).expect("open journal");
    let layout = j.layout();
    assert_eq!(
        (layout.order, layout.splay_width, layout.pool_id),
        (24, 4, -1)
    );
    let (min, active) = j.object_sets().unwrap();
    assert_eq!(min, j.minimum_set().unwrap());
    assert_eq!(active, j.active_set().unwrap());
    assert_eq!((min, active), (0, 0), "a few KiB stay in set 0");

    // librbd's own client and its tag class.
    let clients = j.clients().unwrap();
    assert_eq!(clients.len(), 1, "{clients:?}");
    let me = j.client("").unwrap().expect("librbd's client");
    assert_eq!(me, clients[0]);
    assert_eq!(me.state, ClientState::Connected);
    let ClientData::Image(meta) = me.client_data().unwrap() else {
        panic!("client \"\" is not an image client: {me:?}");
    };
    assert!(!meta.resync_requested);
    assert!(j.client("nobody").unwrap().is_none());

    // Tags: 0 from journal creation, then one per lock acquisition; all
    // owned by the local image (primary), in the image's class.
    let tags = j.tags("", 0, Some(meta.tag_class)).unwrap();
    assert!(!tags.is_empty());
    for t in &tags {
        assert_eq!(t.tag_class, meta.tag_class);
        assert_eq!(t.tag_data().unwrap().mirror_uuid, "");
        assert_eq!(j.tag(t.tid).unwrap().as_ref(), Some(t));
    }
    assert_eq!(tags, j.tags("", 0, None).unwrap());
    assert!(j.tag(tags.last().unwrap().tid + 100).unwrap().is_none());

    let all = events(&j);
    let tag = all.first().expect("entries").0.tag_tid;
    assert!(
        all.iter().all(|(e, _)| e.tag_tid == tag),
        "one lock acquisition, one tag: {:?}",
        all.iter()
            .map(|(e, _)| (e.tag_tid, e.entry_tid))
            .collect::<Vec<_>>()
    );
    assert!(tags.iter().any(|t| t.tid == tag), "tag {tag} is listed");
    let td: TagData = tags
        .iter()
        .find(|t| t.tid == tag)
        .unwrap()
        .tag_data()
        .unwrap();
    assert_eq!(td.mirror_uuid, "");
    let width = u64::from(layout.splay_width);
    for (i, (e, ev)) in all.iter().enumerate() {
        assert_eq!(
            e.entry_tid, i as u64,
            "entry numbers are consecutive from 0"
        );
        assert_eq!(
            e.object_number,
            e.entry_tid % width,
            "placement of {}",
            e.entry_tid
        );
        assert_eq!(ev.version, 5);
        assert!(ev.timestamp.is_some_and(|t| t.sec > 1_600_000_000));
    }

    // librbd committed everything on close: its newest position is the
    // last entry, and it holds at most one position per object.
    let pos = &j.client("").unwrap().unwrap().commit_position.positions;
    let last = &all.last().unwrap().0;
    assert_eq!(
        pos.first()
            .map(|p| (p.object_number, p.tag_tid, p.entry_tid)),
        Some((last.object_number, last.tag_tid, last.entry_tid)),
        "{pos:?}"
    );
    assert!(pos.len() <= usize::from(layout.splay_width));

    // The events, flushes set aside (librbd adds its own).
    let evs: Vec<&Event> = all.iter().map(|(_, ev)| &ev.event).collect();
    let flushes = evs.iter().filter(|e| matches!(e, Event::AioFlush)).count();
    assert!(flushes >= 2, "two explicit flushes: {flushes}");
    let mut it = evs.iter().filter(|e| !matches!(e, Event::AioFlush));
    let expect_write = |it: &mut dyn Iterator<Item = &&Event>, (off, data): &(u64, Vec<u8>)| {
        let mut got = Vec::new();
        while got.len() < data.len() {
            match it.next() {
                Some(Event::AioWrite { offset, data: d }) => {
                    assert_eq!(*offset, off + got.len() as u64);
                    assert!(d.len() <= 16340, "write events hold at most 16340 bytes");
                    got.extend_from_slice(d);
                }
                other => panic!("expected a write at {off}, got {other:?}"),
            }
        }
        assert_eq!(
            crc32c::crc32c(&got),
            crc32c::crc32c(data),
            "data of the write at {off}"
        );
    };
    expect_write(&mut it, &done.writes[0]);
    expect_write(&mut it, &done.writes[1]);
    match it.next() {
        Some(Event::AioDiscard { offset, length, .. }) => {
            assert_eq!((*offset, *length), done.discard)
        }
        other => panic!("expected the discard, got {other:?}"),
    }
    let snap_op = match it.next() {
        Some(Event::SnapCreate(s)) => {
            assert_eq!(s.snap_name, done.snap);
            assert_eq!(s.snap_namespace, SnapshotNamespace::User);
            s.op_tid
        }
        other => panic!("expected the snapshot, got {other:?}"),
    };
    assert_eq!(
        it.next(),
        Some(&&Event::OpFinish {
            op_tid: snap_op,
            r: 0
        })
    );
    let resize_op = match it.next() {
        Some(Event::Resize { op_tid, size }) => {
            assert_eq!(*size, done.new_size);
            *op_tid
        }
        other => panic!("expected the resize, got {other:?}"),
    };
    assert_ne!(resize_op, snap_op);
    assert_eq!(
        it.next(),
        Some(&&Event::OpFinish {
            op_tid: resize_op,
            r: 0
        })
    );
    expect_write(&mut it, &done.writes[2]);
    assert_eq!(it.next(), None, "nothing else was journaled");
    j
}

#[test]
fn journal_records_what_librbd_did() {
    let ns = Namespace::new("jdec");
    let done = workload(&ns.io, "img");
    let j = check_journal(&ns.io, &done);
    // Without Octopus-only clients there is no padding: the objects are
    // exactly their entries.
    for n in 0..u64::from(j.layout().splay_width) {
        let buf = j.read_object(n, 0, 1 << 25).unwrap().unwrap_or_default();
        let scan = scan_object(&buf, 0, j.layout().object_size());
        assert_eq!(scan.end, ScanEnd::Clean);
        let sum: u64 = scan.entries.iter().map(|e| e.encoded_len()).sum();
        assert_eq!(sum, buf.len() as u64, "object {n} is entries only");
        // Reading from an entry boundary gives the rest of the entries.
        if let Some(second) = scan.entries.get(1) {
            let rest = j.read_object(n, second.offset, 1 << 25).unwrap().unwrap();
            let again = scan_object(&rest, second.offset, j.layout().object_size());
            assert_eq!(again.entries, scan.entries[1..]);
        }
    }
    assert_eq!(j.read_object(1000, 0, 4096).unwrap(), None);
    if let Ok(dir) = std::env::var("CSIRR_JOURNAL_CORPUS") {
        write_corpus(&ns.io, &j, std::path::Path::new(&dir));
    }
}

/// Writes the seed corpus of the `journal` fuzz target (fuzz/corpus/journal)
/// from this journal: the first entry of each event type as framed in its
/// object (write entries cut to their first 64 bytes of data: a seed need
/// not be large), and the header's raw client and tag values.
fn write_corpus(io: &Arc<IoCtx>, j: &Journal, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for (e, ev) in events(j) {
        let kind = format!("{:?}", ev.event)
            .split([' ', '(', '{'])
            .next()
            .unwrap()
            .to_lowercase();
        if !seen.insert(kind.clone()) {
            continue;
        }
        let bytes = match ev.event {
            Event::AioWrite { offset, data } => {
                let short = EventEntry {
                    event: Event::AioWrite {
                        offset,
                        data: data[..64].to_vec(),
                    },
                    ..ev
                };
                csi_rbd_replicator::journal::entry::encode_entry(
                    e.tag_tid,
                    e.entry_tid,
                    &short.encode(),
                )
            }
            _ => {
                let obj = j
                    .read_object(e.object_number, e.offset, 1 << 20)
                    .unwrap()
                    .unwrap();
                obj[..33 + e.payload.len()].to_vec()
            }
        };
        std::fs::write(dir.join(format!("entry-{kind}")), bytes).unwrap();
    }
    let header = j.header_oid();
    let vals = io.omap_get_all(&header, "").unwrap();
    for (k, v) in vals {
        let name = if k == "client_" {
            "client-librbd".to_string()
        } else if let Some(t) = k.strip_prefix("tag_") {
            format!("tag-{}", u64::from_str_radix(t, 16).unwrap())
        } else {
            continue;
        };
        std::fs::write(dir.join(name), v).unwrap();
    }
}

#[test]
fn journal_data_in_a_journal_pool_keeps_the_image_pool_id() {
    // The journal pool goes after the namespace (its image needs it to
    // be removed): declared first, dropped last.
    let jpool = unique("jdata");
    ceph_ok(Site::A, &["osd", "pool", "create", &jpool, "8", "8"]);
    ceph_ok(
        Site::A,
        &["osd", "pool", "application", "enable", &jpool, "rbd"],
    );
    let _rm = scopeguard(|| {
        let _ = ceph(
            Site::A,
            &[
                "osd",
                "pool",
                "rm",
                &jpool,
                &jpool,
                "--yes-i-really-really-mean-it",
            ],
        );
    });
    let ns = Namespace::new("jpool");
    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "16M",
            "--image-feature",
            "layering,exclusive-lock,journaling",
            "--journal-pool",
            &jpool,
            "--journal-splay-width",
            "2",
            &ns.spec("img"),
        ],
    );
    let img = Image::open(&ns.io, "img").unwrap();
    let id = img.id().unwrap();
    let data = pattern(9, 8192);
    img.write(4096, &data).unwrap();
    img.flush().unwrap();
    drop(img);

    let j = Journal::open(&ns.io, &id).unwrap();
    let jpool_id = admin(Site::A).pool_lookup(&jpool).unwrap();
    assert_eq!(j.layout().pool_id, jpool_id);
    assert_eq!(j.layout().splay_width, 2);
    assert_eq!(j.data_ioctx().pool(), jpool);
    // In the journal pool's default namespace, not the image's.
    assert_eq!(j.data_ioctx().namespace(), "");
    // The data objects carry the image pool's id, not the journal pool's.
    let image_pool_id = ns.io.pool_id();
    assert_ne!(image_pool_id, jpool_id);
    assert_eq!(
        j.object_oid(0),
        format!("journal_data.{image_pool_id}.{id}.0")
    );
    let info = rbd_ok(Site::A, &ns.journal_args("info", "img"));
    assert!(
        info.contains(&format!("journal_data.{image_pool_id}.{id}.")),
        "{info}"
    );
    let mut buf = [0u8; 64];
    for (io, pool_id) in [(j.data_ioctx(), jpool_id), (&ns.io, image_pool_id)] {
        let err = io
            .read(&format!("journal_data.{pool_id}.{id}.0"), 0, &mut buf)
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
    }
    let writes: Vec<(u64, usize, u32)> = events(&j)
        .into_iter()
        .filter_map(|(_, ev)| match ev.event {
            Event::AioWrite { offset, data } => Some((offset, data.len(), crc32c::crc32c(&data))),
            _ => None,
        })
        .collect();
    assert_eq!(writes, vec![(4096, data.len(), crc32c::crc32c(&data))]);
}

#[test]
fn journal_client_registration_is_what_rbd_mirror_decodes() {
    let ns = Namespace::new("jreg");
    let img = journaled_image(&ns.io, "img", 16 * MIB);
    let id = img.id().unwrap();
    img.write(0, &pattern(4, 4096)).unwrap();
    img.flush().unwrap();
    // librbd commits its position on close (while open, only every few
    // seconds).
    drop(img);
    let j = Journal::open(&ns.io, &id).unwrap();

    let peer = uuid::Uuid::new_v4().to_string();
    let data = peer_data();
    j.register_client(&peer, &data).unwrap();
    let err = j.register_client(&peer, &data).unwrap_err();
    assert!(
        matches!(&err, JournalError::Ceph(e)
            if e.kind() == c::ErrorKind::AlreadyExists),
        "{err}"
    );
    let me = j.client(&peer).unwrap().expect("registered");
    assert_eq!(me.client_data().unwrap(), data);
    assert_eq!(me.state, ClientState::Connected);
    // A new client starts where the existing one (librbd's) is.
    let librbd = j.client("").unwrap().unwrap();
    assert_eq!(me.commit_position, librbd.commit_position);
    assert!(!me.commit_position.positions.is_empty());
    // Registered clients may list tags.
    assert!(!j.tags(&peer, 0, None).unwrap().is_empty());

    // The rbd CLI lists it (decoding the cls record); `mirror image
    // disable` decodes every client's data and unregisters peers.
    rbd_ok(
        Site::A,
        &[
            "mirror",
            "pool",
            "enable",
            &format!("{}/{}", ns.pool, ns.name),
            "image",
        ],
    );
    let status = rbd_ok(Site::A, &ns.journal_args("status", "img"));
    assert!(status.contains(&format!("id={peer}")), "{status}");
    rbd_ok(
        Site::A,
        &["mirror", "image", "enable", &ns.spec("img"), "journal"],
    );
    // The disable walks the clients in id order: ours (a uuid, hex) comes
    // before "garbage", whose data is not ClientData. It decodes ours as a
    // mirror peer and unregisters it, then fails on the garbage.
    j.register_client_raw("garbage", b"\x07").unwrap();
    let o = rbd(Site::A, &["mirror", "image", "disable", &ns.spec("img")]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("Bad message"),
        "{}",
        common::text(&o)
    );
    assert!(
        j.client(&peer).unwrap().is_none(),
        "disable unregistered the peer client"
    );
    assert!(j.client("garbage").unwrap().is_some());
    j.unregister_client("garbage").unwrap();
    rbd_ok(Site::A, &["mirror", "image", "disable", &ns.spec("img")]);
    // Disabling journal mirroring turns journaling off and removes the
    // journal (16.2.15), our client with it.
    let img = Image::open(&ns.io, "img").unwrap();
    assert_eq!(img.features().unwrap() & c::features::JOURNALING, 0);
    let gone =
        |r: Result<_, JournalError>| matches!(r, Err(JournalError::Ceph(e)) if e.is_not_found());
    assert!(gone(j.client(&peer).map(|_| ())), "the header is gone");
    assert!(gone(Journal::open(&ns.io, &id).map(|_| ())));
    img.update_features(c::features::JOURNALING, true).unwrap();
    drop(img);
    let j = Journal::open(&ns.io, &id).unwrap();
    assert_eq!(j.clients().unwrap().len(), 1, "a fresh journal");

    // Register again, update, unregister.
    j.register_client(&peer, &data).unwrap();
    let syncing = ClientData::MirrorPeer(MirrorPeerClientMeta {
        image_id: "replica-id".into(),
        state: MirrorPeerState::Syncing,
        sync_object_count: 0,
        sync_points: Vec::new(),
        snap_seqs: vec![(4, 5)],
    });
    j.update_client_data(&peer, &syncing).unwrap();
    assert_eq!(
        j.client(&peer).unwrap().unwrap().client_data().unwrap(),
        syncing
    );
    j.unregister_client(&peer).unwrap();
    assert!(j.client(&peer).unwrap().is_none());
    let err = j.unregister_client(&peer).unwrap_err();
    assert!(
        matches!(&err, JournalError::Ceph(e) if e.is_not_found()),
        "{err}"
    );
    assert_eq!(j.clients().unwrap().len(), 1);
}

/// With `require_min_compat_client` at Octopus or newer, cls
/// `journal.append` pads every append with zeroes to the OSD's allocation
/// unit (4 KiB here). Changes a cluster-wide setting: runs alone, and puts
/// it back.
#[test]
fn exclusive_journal_padding_is_skipped() {
    let ns = Namespace::new("jpad");
    let _restore = scopeguard(|| {
        ceph_ok(
            Site::A,
            &[
                "osd",
                "set-require-min-compat-client",
                "luminous",
                "--yes-i-really-mean-it",
            ],
        );
    });
    ceph_ok(
        Site::A,
        &[
            "osd",
            "set-require-min-compat-client",
            "octopus",
            "--yes-i-really-mean-it",
        ],
    );
    let done = workload(&ns.io, "img");
    let j = check_journal(&ns.io, &done);
    let mut padded = 0;
    for n in 0..u64::from(j.layout().splay_width) {
        let Some(buf) = j.read_object(n, 0, 1 << 25).unwrap() else {
            continue;
        };
        assert_eq!(buf.len() % 4096, 0, "object {n}: {} bytes", buf.len());
        let scan = scan_object(&buf, 0, j.layout().object_size());
        assert_eq!(scan.end, ScanEnd::Clean);
        let sum: u64 = scan.entries.iter().map(|e| e.encoded_len()).sum();
        if sum < buf.len() as u64 {
            padded += 1;
        }
    }
    assert!(padded > 0, "some object carries padding");
}

/// A peer client in the registration's shape (replaying, no replica yet).
fn peer_data() -> ClientData {
    ClientData::MirrorPeer(MirrorPeerClientMeta {
        image_id: String::new(),
        state: MirrorPeerState::Replaying,
        sync_object_count: 0,
        sync_points: Vec::new(),
        snap_seqs: Vec::new(),
    })
}

/// Writes `n` × 64 KiB through librbd and closes the image (librbd commits
/// and trims on close).
fn write_and_close(io: &Arc<IoCtx>, name: &str, n: u64, seed: u64) {
    let img = Image::open(io, name).unwrap();
    for i in 0..n {
        img.write(i * 65536, &pattern(seed + i, 65536)).unwrap();
    }
    img.flush().unwrap();
}

/// Trimming on 16.2.15: a connected client pins the journal, a
/// disconnected one does not, and registering copies the oldest position
/// of the connected clients only.
#[test]
fn journal_trimming_follows_connected_clients() {
    let ns = Namespace::new("jtrim");
    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "16M",
            "--image-feature",
            "layering,exclusive-lock,journaling",
            "--journal-object-size",
            "64K",
            "--journal-splay-width",
            "2",
            &ns.spec("img"),
        ],
    );
    write_and_close(&ns.io, "img", 1, 0);
    let id = Image::open(&ns.io, "img").unwrap().id().unwrap();
    let j = Journal::open(&ns.io, &id).unwrap();
    assert_eq!((j.layout().order, j.layout().splay_width), (16, 2));

    let a = format!("a-{}", uuid::Uuid::new_v4());
    j.register_client(&a, &peer_data()).unwrap();
    let pos_a = j.client(&a).unwrap().unwrap().commit_position;
    assert!(!pos_a.positions.is_empty());

    // 2 MiB of writes: some 32 sets of 2 × 64 KiB objects. A, connected
    // at the start, keeps every set.
    write_and_close(&ns.io, "img", 32, 100);
    let (min1, active1) = j.object_sets().unwrap();
    eprintln!("A connected: sets {min1}..={active1}");
    assert!(active1 >= 10, "the journal moved on: active set {active1}");
    assert_eq!(min1, 0, "a connected client pins the journal");

    let mut args = ns.journal_args("client", "img");
    args.insert(2, "disconnect");
    args.extend(["--client-id", a.as_str()]);
    rbd_ok(Site::A, &args);
    assert_eq!(
        j.client(&a).unwrap().unwrap().state,
        ClientState::Disconnected
    );
    write_and_close(&ns.io, "img", 4, 200);
    let (min2, active2) = j.object_sets().unwrap();
    eprintln!("A disconnected: sets {min2}..={active2}");

    let b = format!("b-{}", uuid::Uuid::new_v4());
    j.register_client(&b, &peer_data()).unwrap();
    let pos_b = j.client(&b).unwrap().unwrap().commit_position;
    let librbd = j.client("").unwrap().unwrap().commit_position;
    eprintln!("A {pos_a:?}\nB {pos_b:?}\nlibrbd {librbd:?}");
    // The trimmer ignored the disconnected client: the sets it pinned are
    // gone (their objects too).
    assert!(min2 > 0 && min2 <= active2, "sets {min2}..={active2}");
    assert_eq!(j.read_object(0, 0, 4096).unwrap(), None);
    assert!(j.client(&a).unwrap().is_some(), "A is still registered");
    // A new client starts at librbd's position, not at the disconnected
    // client's older one: register's minimum skips disconnected clients.
    assert_eq!(pos_b, librbd);
    assert_ne!(pos_b, pos_a);
    let width = u64::from(j.layout().splay_width);
    assert!(pos_b.newest().unwrap().object_number / width >= min2);
    // Every open of the image took the lock again: a new tag each time.
    assert!(pos_b.newest().unwrap().tag_tid > pos_a.newest().unwrap().tag_tid);
}
