//! Direct reads of an image's data objects (`ceph::DataObjects`, what a
//! delta reads the primary with) against librbd's reads of the same
//! snapshot, on the real pair: data written before the snapshot, data
//! overwritten after it, holes inside an object, bytes past an object's end
//! and objects that do not exist all read the same. Clones and fancy
//! striping are refused (librbd reads them).

mod common;

use std::sync::mpsc;

use common::*;
use csi_rbd_replicator::ceph::{self, DataObjects, Image};

const MIB: u64 = 1 << 20;

/// Reads `spans` (offset in the object, length) of object `objno` directly.
fn direct(objects: &DataObjects, objno: u64, spans: &[(u64, usize)]) -> Vec<u8> {
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
    r.expect("direct read");
    b
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
    let io = ioctx(Site::A, "");
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
    let sid = img
        .snap_list()
        .expect("snapshots")
        .into_iter()
        .find(|s| s.name == "s1")
        .expect("s1")
        .id;
    let at = Image::open_read_only(&io, &name, Some("s1")).expect("open at s1");
    let objects = DataObjects::open(&at, sid)
        .expect("layout")
        .expect("a plain format 2 image reads directly");
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
        // an object that does not exist
        (4, &[(0, 64 << 10), (2 * MIB, 8192)]),
    ];
    for (objno, spans) in cases {
        let d = direct(&objects, *objno, spans);
        let l = through_librbd(&at, obj, *objno, spans);
        assert!(
            d == l,
            "object {objno} spans {spans:?}: direct read differs from librbd's"
        );
    }
    // The overwrite is really there at the head, so the comparison above
    // could have failed.
    let head = through_librbd(&img, obj, 0, &[(MIB, 64 << 10)]);
    let snap = through_librbd(&at, obj, 0, &[(MIB, 64 << 10)]);
    assert_ne!(head, snap);

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
