//! `csi-rbd-replicator verify` against the real pair, run as the built
//! binary: a replica made by the replayer verifies identical (from either
//! side, while the replayer holds it locked), and a hand-made pair whose
//! sync snapshots differ in two 4 KiB blocks is reported with exactly those
//! blocks.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

const FIRST: &str = "csirr-sync.0000000001";
const MIB: u64 = 1 << 20;

/// Runs `verify` as the CSI user of `site`.
fn verify(site: Site, args: &[&str]) -> Output {
    cli("verify", site, args)
}

#[tokio::test]
async fn replicated_volume_verifies_identical_from_both_sides() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let _b = Sidecar::start(Site::B, &[]).await;
    let writes = [
        (0, 64 << 10),
        (5 * MIB + 12345, 300 << 10),
        (20 * MIB, 4 << 20),
        (48 * MIB - 4096, 4096),
    ];
    let (vol, _img) = create_csi_volume(Site::A, 48 * MIB, &writes);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vol.handle, &[]))
        .await
        .expect("enable");
    wait_synced(&a, &vol.handle, Duration::from_secs(120)).await;
    let first = first_sync(&ioctx(Site::A, ""), &vol.image);
    wait_replica_snap(&pool(), &vol.image, &first, Duration::from_secs(30)).await;

    // From the primary's side, by its ceph-csi handle.
    let o = verify(Site::A, &["--json", &vol.handle]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["identical"], true, "{r}");
    assert_eq!(r["snapshot"], first.as_str(), "{r}");
    assert_eq!(r["peer"], "site-b", "{r}");
    assert_eq!(r["bytes_compared"], 48 * MIB, "{r}");
    // Holes on both sides are not read: 4 chunks hold data.
    assert_eq!(r["bytes_read"], 4 * 4 * MIB, "{r}");

    // From the replica's side (held locked by the replayer), by image spec,
    // in text form.
    let spec = format!("{}/{}", pool(), vol.image);
    let o = verify(Site::B, &[&spec]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("IDENTICAL"), "{}", text(&o));
    assert!(out.contains(&first), "{}", text(&o));

    // --full reads every chunk and agrees.
    let o = verify(Site::B, &["--json", "--full", &spec]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(json(&o)["bytes_read"], 48 * MIB);
}

/// Two images made by hand, no sidecar: same name, same data, same sync
/// snapshot name, except one 4 KiB block inside written data and one block
/// that only the replica wrote (a hole on the primary). Differences on the
/// heads after the snapshot must not count.
#[tokio::test]
async fn hand_made_pair_reports_the_differing_blocks() {
    let name = unique("verify-diff");
    let writes = [(0, 16 << 20), (30 * MIB, 1 << 20)];
    let a = create_image(Site::A, &name, 64 * MIB, &writes);
    let b = create_image(Site::B, &name, 64 * MIB, &writes);
    let changed = 8 * MIB + 12 * 1024;
    let mut block = vec![0u8; 4096];
    a.read(changed, &mut block).expect("read");
    block.iter_mut().for_each(|x| *x ^= 0x5a);
    b.write(changed, &block).expect("write");
    let hole = 50 * MIB;
    b.write(hole, &[7u8; 4096]).expect("write");
    b.flush().expect("flush");
    a.snap_create(FIRST).expect("snap");
    b.snap_create(FIRST).expect("snap");
    // After the snapshot: heads differ elsewhere; verify reads the snapshot.
    a.write(40 * MIB, &[1u8; 4096]).expect("write");
    a.flush().expect("flush");
    drop((a, b));

    let spec = format!("{}/{name}", pool());
    let o = verify(Site::B, &["--json", &spec]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let r = json(&o);
    assert_eq!(r["identical"], false, "{r}");
    assert_eq!(r["snapshot"], FIRST, "{r}");
    assert_eq!(r["differing_extents"], 2, "{r}");
    assert_eq!(r["differing_bytes"], 8192, "{r}");
    assert_eq!(
        r["extents"],
        serde_json::json!([
            {"offset": changed, "length": 4096},
            {"offset": hole, "length": 4096},
        ]),
        "{r}"
    );

    // Text form, from the other side, limited to one extent.
    let o = verify(Site::A, &["--max-extents", "1", &spec]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("DIFFERENT: 2 extent(s), 8192 bytes"), "{out}");
    assert!(out.contains(&changed.to_string()), "{out}");
    assert!(!out.contains(&hole.to_string()), "{out}");

    // A snapshot that does not exist, or a volume that does not: exit 2.
    let o = verify(Site::A, &["--snapshot", "nope", &spec]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nope"));
    let o = verify(Site::A, &["--json", &format!("{}/no-such-image", pool())]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(json(&o)["error"].is_string());

    for site in [Site::A, Site::B] {
        rbd_ok(site, &["snap", "purge", &spec]);
        rbd_ok(site, &["rm", "--no-progress", &spec]);
    }
}

/// An image that exists only locally has nothing to be compared with.
#[tokio::test]
async fn image_without_a_peer_copy_is_an_error() {
    let name = unique("verify-alone");
    let img = create_image(Site::A, &name, 8 * MIB, &[(0, 4096)]);
    img.snap_create(FIRST).expect("snap");
    drop(img);
    let spec = format!("{}/{name}", pool());
    let o = verify(Site::A, &[&spec]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no peer has an image"),
        "{}",
        text(&o)
    );
    rbd_ok(Site::A, &["snap", "purge", &spec]);
    rbd_ok(Site::A, &["rm", "--no-progress", &spec]);
}
