//! Direct reads of an image's data objects (`ceph::DataObjects`, what a
//! delta reads the primary with, and the sparse reads of a first sync)
//! against librbd's reads of the same
//! snapshot, on the real pair: data written before the snapshot, data
//! overwritten after it, holes inside an object and bytes past an object's
//! end read the same, in the default and in a RADOS namespace; a missing
//! object is an error, never zeroes. Clones and fancy striping are refused
//! (librbd reads them). A copy whose direct reads fail reads through librbd
//! and is still exact.

mod common;

use std::sync::mpsc;

use common::*;
use csi_rbd_replicator::ceph::{self, DataObjects, Image};
use csi_rbd_replicator::engine::copy;

const MIB: u64 = 1 << 20;

/// Reads `spans` (offset in the object, length) of object `objno` directly.
fn direct(objects: &DataObjects, objno: u64, spans: &[(u64, usize)]) -> Vec<u8> {
    try_direct(objects, objno, spans).expect("direct read")
}

fn try_direct(objects: &DataObjects, objno: u64, spans: &[(u64, usize)]) -> ceph::Result<Vec<u8>> {
    let total: usize = spans.iter().map(|s| s.1).sum();
    // Dirty on purpose: holes must come back as zeroes, not stale bytes.
    let buf = vec![0xa5u8; total];
    let (tx, rx) = mpsc::channel();
    objects
        .aio_read(
            objno,
            spans,
            buf,
            Box::new(move |r, b| {
                let _ = tx.send((r, b));
            }),
        )
        .expect("submit");
    let (r, b) = rx.recv().expect("completion");
    r.map(|()| b)
}

/// Reads `[off, off + len)` of object `objno` sparsely and rebuilds it
/// densely (the holes as zeroes); also returns the bytes of data returned.
fn sparse(objects: &DataObjects, objno: u64, off: u64, len: u64) -> ceph::Result<(Vec<u8>, usize)> {
    let (tx, rx) = mpsc::channel();
    objects
        .aio_sparse_read(
            objno,
            off,
            len,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .expect("submit");
    let d = rx.recv().expect("completion")?;
    let mut out = vec![0u8; len as usize];
    for (o, bytes) in d.pieces() {
        let at = (o - off) as usize;
        out[at..at + bytes.len()].copy_from_slice(bytes);
    }
    Ok((out, d.data().len()))
}

/// `img` opened read-only at snapshot `snap`, and its data objects there.
fn at_snapshot(io: &std::sync::Arc<ceph::IoCtx>, img: &Image, snap: &str) -> (Image, DataObjects) {
    let sid = img
        .snap_list()
        .expect("snapshots")
        .into_iter()
        .find(|s| s.name == snap)
        .expect("the snapshot")
        .id;
    let at = Image::open_read_only(io, img.name(), Some(snap)).expect("open at the snapshot");
    let objects = DataObjects::open(&at, sid)
        .expect("layout")
        .expect("a plain format 2 image reads directly");
    (at, objects)
}

/// The same spans through librbd.
fn through_librbd(img: &Image, obj: u64, objno: u64, spans: &[(u64, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(off, len) in spans {
        let mut b = vec![0u8; len];
        let n = img.read(objno * obj + off, &mut b).expect("librbd read");
        assert_eq!(n, len);
        out.extend_from_slice(&b);
    }
    out
}

#[test]
fn direct_object_reads_equal_librbds_at_the_snapshot() {
    reads_equal_librbds_in(&ioctx(Site::A, ""));
}

#[test]
fn direct_object_reads_in_a_rados_namespace() {
    // The pair creates RADOS namespace ns1 in its pool (as tests/omap.rs uses).
    reads_equal_librbds_in(&ioctx(Site::A, "ns1"));
}

fn reads_equal_librbds_in(io: &std::sync::Arc<ceph::IoCtx>) {
    let io = io.clone();
    let name = unique("objread");
    // Object 0 full, object 1 partly (a hole before and after 64 KiB),
    // object 2 written only in its first 100 KiB (a short object), objects
    // 3 and 4 never written.
    let img = create_image_in(
        &io,
        &name,
        20 * MIB,
        &[(0, 4 << 20), (5 * MIB, 64 << 10), (8 * MIB, 100 << 10)],
        7,
    );
    img.snap_create("s1").expect("snapshot");
    // Overwrite after the snapshot: the snapshot must still read the old data.
    write(&img, &[(MIB, 512 << 10), (5 * MIB, 64 << 10)], 9);
    let (at, objects) = at_snapshot(&io, &img, "s1");
    let obj = objects.object_size();
    assert_eq!(obj, 4 * MIB);

    let cases: &[(u64, &[(u64, usize)])] = &[
        // several extents of one object in one operation, one overwritten
        // after the snapshot
        (0, &[(0, 4096), (MIB, 64 << 10), (3 * MIB, 1 << 20)]),
        // data and the holes around it
        (1, &[(0, 64 << 10), (MIB - 4096, 72 << 10), (2 * MIB, 4096)]),
        // a short object: bytes past its end read as zeroes
        (2, &[(90 << 10, 64 << 10), (MIB, 4096)]),
    ];
    for (objno, spans) in cases {
        let d = direct(&objects, *objno, spans);
        let l = through_librbd(&at, obj, *objno, spans);
        assert!(
            d == l,
            "object {objno} spans {spans:?}: direct read differs from librbd's"
        );
    }
    // Sparse reads (what a first sync reads whole objects with): the
    // extents returned, holes filled with zeroes, equal librbd's read of the
    // range; the holes do not come back as data.
    for (objno, off, len, most) in [
        (0, 0, obj, obj),
        (0, MIB, MIB, MIB),
        (1, 0, obj, 256 << 10),
        (1, MIB - 4096, 2 * MIB, 256 << 10),
        (2, 0, obj, 256 << 10),
        (2, 90 << 10, MIB, 64 << 10),
    ] {
        let (dense, data) = sparse(&objects, objno, off, len).expect("sparse read");
        let l = through_librbd(&at, obj, objno, &[(off, len as usize)]);
        assert!(
            dense == l,
            "object {objno} [{off}, +{len}): sparse read differs from librbd's"
        );
        assert!(
            data as u64 <= most,
            "object {objno} [{off}, +{len}): {data} bytes of data returned, holes included"
        );
    }
    let e = sparse(&objects, 4, 0, obj).expect_err("missing object");
    assert_eq!(e.kind(), ceph::ErrorKind::NotFound, "{e}");
    // The overwrite is really there at the head, so the comparison above
    // could have failed.
    let head = through_librbd(&img, obj, 0, &[(MIB, 64 << 10)]);
    let snap = through_librbd(&at, obj, 0, &[(MIB, 64 << 10)]);
    assert_ne!(head, snap);
    // An object that does not exist is an error, not zeroes.
    let e = try_direct(&objects, 4, &[(0, 64 << 10)]).expect_err("missing object");
    assert_eq!(e.kind(), ceph::ErrorKind::NotFound, "{e}");

    drop(objects);
    drop(at);
    img.snap_remove("s1").expect("remove snapshot");
    drop(img);
    ceph::rbd::remove(&io, &name).expect("remove image");
}

#[test]
fn clones_and_fancy_striping_read_through_librbd() {
    let io = ioctx(Site::A, "");
    let parent = unique("objread-parent");
    let child = unique("objread-child");
    let striped = unique("objread-striped");
    let p = create_image_in(&io, &parent, 8 * MIB, &[(0, 1 << 20)], 3);
    p.snap_create("base").expect("snapshot");
    drop(p);
    let spec = |n: &str| format!("{}/{n}", pool());
    rbd_ok(
        Site::A,
        &["snap", "protect", &format!("{}@base", spec(&parent))],
    );
    rbd_ok(
        Site::A,
        &["clone", &format!("{}@base", spec(&parent)), &spec(&child)],
    );
    let c = Image::open(&io, &child).expect("open clone");
    c.snap_create("c1").expect("snapshot clone");
    let cid = c
        .snap_list()
        .expect("snapshots")
        .into_iter()
        .find(|s| s.name == "c1")
        .expect("c1")
        .id;
    let at = Image::open_read_only(&io, &child, Some("c1")).expect("open clone at c1");
    assert!(
        DataObjects::open(&at, cid).expect("layout").is_none(),
        "a clone's unwritten objects live in its parent"
    );
    drop(at);

    rbd_ok(
        Site::A,
        &[
            "create",
            "--size",
            "8M",
            "--stripe-unit",
            "1M",
            "--stripe-count",
            "4",
            &spec(&striped),
        ],
    );
    let s = Image::open(&io, &striped).expect("open striped");
    s.snap_create("s").expect("snapshot striped");
    let sid = s.snap_list().expect("snapshots")[0].id;
    let at = Image::open_read_only(&io, &striped, Some("s")).expect("open striped at s");
    assert!(DataObjects::open(&at, sid).expect("layout").is_none());
    drop(at);

    c.snap_remove("c1").expect("remove clone snapshot");
    drop(c);
    s.snap_remove("s").expect("remove striped snapshot");
    drop(s);
    ceph::rbd::remove(&io, &child).expect("remove clone");
    ceph::rbd::remove(&io, &striped).expect("remove striped");
    rbd_ok(
        Site::A,
        &["snap", "unprotect", &format!("{}@base", spec(&parent))],
    );
    rbd_ok(Site::A, &["snap", "rm", &format!("{}@base", spec(&parent))]);
    ceph::rbd::remove(&io, &parent).expect("remove parent");
}

#[test]
fn a_copy_whose_direct_reads_fail_reads_through_librbd() {
    let io = ioctx(Site::A, "");
    let bio = ioctx(Site::B, "");
    let name = unique("objread-fallback");
    // s0 before any write: at s0 no data object exists, so direct reads at
    // s0 fail (as reads with caps that miss the data pool would).
    let img = create_image_in(&io, &name, 16 * MIB, &[], 1);
    img.snap_create("s0").expect("snapshot s0");
    write(
        &img,
        &[(0, 64 << 10), (MIB, 64 << 10), (6 * MIB, 3 << 20)],
        5,
    );
    img.snap_create("s1").expect("snapshot s1");
    let snaps = img.snap_list().expect("snapshots");
    let s0 = snaps.iter().find(|s| s.name == "s0").expect("s0").id;
    let at0 = Image::open_read_only(&io, &name, Some("s0")).expect("open at s0");
    let at1 = Image::open_read_only(&io, &name, Some("s1")).expect("open at s1");
    let wrong = DataObjects::open(&at0, s0)
        .expect("layout")
        .expect("direct");
    // The premise: direct reads of this copy fail.
    let e = try_direct(&wrong, 0, &[(0, 4096)]).expect_err("no object at s0");
    assert_eq!(e.kind(), ceph::ErrorKind::NotFound, "{e}");

    let dst = create_image_in(&bio, &name, 16 * MIB, &[], 1);
    let extents = copy::changed_extents(&at1, Some("s0"), 16 * MIB, 2 * MIB, false).expect("diff");
    let stats = copy::copy_extents(
        copy::Source {
            image: &at1,
            objects: Some(&wrong),
            sparse: false,
        },
        (&dst).into(),
        &extents,
        true,
        copy::CopyLimits::default(),
        None,
        &[],
        &|| false,
        &mut |_, _| {},
    )
    .expect("copy falls back to librbd");
    assert_eq!(stats.bytes_written, (64 << 10) * 2 + (3 << 20));
    let mut want = vec![0u8; 16 * MIB as usize];
    let mut got = vec![0u8; 16 * MIB as usize];
    at1.read(0, &mut want).expect("read source");
    dst.read(0, &mut got).expect("read copy");
    assert!(want == got, "the copy differs from the source at s1");
    assert!(want.iter().any(|b| *b != 0));

    drop((wrong, at0, at1, dst));
    for s in ["s0", "s1"] {
        img.snap_remove(s).expect("remove snapshot");
    }
    drop(img);
    ceph::rbd::remove(&io, &name).expect("remove source");
    ceph::rbd::remove(&bio, &name).expect("remove copy");
}

/// A first sync's copy with sparse reads, onto a fresh image and onto one
/// full of old data (an interrupted first sync): both equal the source at
/// the snapshot, holes and written zeroes included, and only the allocated
/// data was read.
#[test]
fn sparse_first_copies_equal_the_source() {
    let io = ioctx(Site::A, "");
    let bio = ioctx(Site::B, "");
    let name = unique("objread-sparse");
    let size = 24 * MIB;
    let written: &[(u64, usize)] = &[
        (0, 64 << 10),
        (MIB + 4096, 100 << 10),
        (3 * MIB, 2 << 20),
        (9 * MIB - (32 << 10), 64 << 10),
        (20 * MIB, 64 << 10),
    ];
    let img = create_image_in(&io, &name, size, written, 11);
    // Zeroes written inside data: allocated, but nothing to write on a
    // fresh copy.
    img.write(3 * MIB + (256 << 10), &vec![0u8; 128 << 10])
        .expect("write zeroes");
    img.flush().expect("flush");
    img.snap_create("s1").expect("snapshot");
    // After the snapshot: the copy must not see it.
    write(&img, &[(12 * MIB, 1 << 20)], 12);
    let (at, objects) = at_snapshot(&io, &img, "s1");
    let mut want = vec![0u8; size as usize];
    at.read(0, &mut want).expect("read source");

    let fresh = create_image_in(&bio, &format!("{name}-fresh"), size, &[], 1);
    // Written directly, as a first sync into a new replica is.
    let direct = create_image_in(&bio, &format!("{name}-direct"), size, &[], 1);
    // Old data everywhere: every hole of the source must be zeroed, through
    // librbd or directly.
    let old = create_image_in(
        &bio,
        &format!("{name}-old"),
        size,
        &[(0, size as usize)],
        13,
    );
    let old_direct = create_image_in(
        &bio,
        &format!("{name}-olddirect"),
        size,
        &[(0, size as usize)],
        14,
    );
    let old_direct_objects = DataObjects::open_head(&old_direct)
        .expect("layout")
        .expect("direct");
    let mut extents = copy::changed_extents(&at, None, size, 2 * MIB, true).expect("allocated");
    let data = written.iter().map(|w| w.1 as u64).sum::<u64>();
    let direct_objects = DataObjects::open_head(&direct)
        .expect("layout")
        .expect("a plain image is written directly");
    // The objects with data, marked in the object map before the writes.
    ceph::objects::mark_objects_exist(&direct, &[(0, size / MIB / 4)]).expect("object map");
    for (dst, is_fresh, objs) in [
        (&fresh, true, None),
        (&direct, true, Some(&direct_objects)),
        (&old, false, None),
        (&old_direct, false, Some(&old_direct_objects)),
    ] {
        if !is_fresh {
            let have = copy::changed_extents(dst, None, size, 2 * MIB, true).expect("replica");
            for (s, e) in copy::uncovered(&have, &extents) {
                extents.push(copy::Extent {
                    off: s,
                    len: e - s,
                    data: false,
                });
            }
            extents.sort_by_key(|e| e.off);
        }
        let stats = copy::copy_extents(
            copy::Source {
                image: &at,
                objects: Some(&objects),
                sparse: true,
            },
            copy::Dest {
                image: dst,
                objects: objs,
            },
            &extents,
            is_fresh,
            copy::CopyLimits::default(),
            None,
            &[],
            &|| false,
            &mut |_, _| {},
        )
        .expect("copy");
        // A new handle reads with the object map on disk.
        let reader = Image::open(&bio, dst.name()).expect("open copy");
        let mut got = vec![0u8; size as usize];
        reader.read(0, &mut got).expect("read copy");
        let direct = objs.is_some();
        assert!(
            want == got,
            "fresh={is_fresh} direct={direct}: the copy differs from the source at s1"
        );
        // Whole objects were listed; only their allocated data came over.
        assert!(
            stats.bytes_read >= data && stats.bytes_read < data + MIB,
            "fresh={is_fresh}: {stats:?} for {data} bytes written"
        );
        if is_fresh {
            assert!(stats.bytes_skipped >= 128 << 10, "{stats:?}");
            assert!(stats.bytes_written <= data - (128 << 10), "{stats:?}");
        }
    }
    assert!(want.iter().any(|b| *b != 0));

    // The direct copy's objects are marked in the object map (librbd would
    // skip reading an object it says does not exist; `du` counts them).
    let du = rbd_ok(
        Site::B,
        &[
            "du",
            "--format",
            "json",
            &format!("{}/{name}-direct", pool()),
        ],
    );
    let used =
        serde_json::from_str::<serde_json::Value>(&du).expect("du json")["images"][0]["used_size"]
            .as_u64()
            .expect("used_size");
    assert_eq!(
        used,
        6 * 4 * MIB,
        "the object map has not all objects marked"
    );

    drop((objects, direct_objects, old_direct_objects, at));
    drop((fresh, direct, old, old_direct));
    img.snap_remove("s1").expect("remove snapshot");
    drop(img);
    ceph::rbd::remove(&io, &name).expect("remove source");
    for n in ["fresh", "direct", "old", "olddirect"] {
        ceph::rbd::remove(&bio, &format!("{name}-{n}")).expect("remove copy");
    }
}
