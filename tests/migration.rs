//! Pool mode and pool migration (issues 16 and 17) against the real pair,
//! through the `pool enable|disable` and `migrate start|status|switch|cleanup`
//! commands talking to the sidecars' admin APIs.
//!
//! Pools of their own (created by the test on both sites, peers
//! bootstrapped), shaped like the OpenStack seed: "glance" with a base
//! image and a protected snapshot, "nova" with two clones of it, "cinder"
//! with volumes; one more cinder volume created after `migrate start`; two
//! images written while the migration runs. After the switch every image on
//! the target equals the source at its final sync point (native `rbd
//! export` checksums, and the switch's own `--verify`), the nova clones are
//! clones of the target's glance image at the same snapshot, and the
//! downtime the switch measured is printed.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use csi_rbd_replicator::ceph::Image;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(180);

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
}

/// `migrate OP --from site-a --from-endpoint A --to-endpoint B --pool ...`.
fn migrate(op: &str, a: &Sidecar, b: &Sidecar, pools: &[&str], args: &[&str]) -> Output {
    let mut c = bin();
    c.args(["migrate", op, "--from", "site-a"])
        .arg("--from-endpoint")
        .arg(format!("unix://{}", a.socket.display()))
        .arg("--to-endpoint")
        .arg(format!("unix://{}", b.socket.display()));
    for p in pools {
        c.args(["--pool", p]);
    }
    c.args(args).output().expect("migrate runs")
}

fn role(io: &Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> String {
    registry_record(io, name).map_or("none".into(), |r| r["role"].as_str().unwrap().into())
}

/// Pool mode on a pool of its own: the images present are enrolled at once,
/// an image created afterwards is replicated too (checksums at its sync
/// point), `pool disable` enrolls nothing more, bad input changes nothing.
#[tokio::test]
async fn pool_mode_replicates_images_created_later() {
    let pool = TestPool::new("poolmode");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    drop(create_image_in(&aio, "before", 8 * MIB, &[(0, 1 << 20)], 1));
    let ep = format!("unix://{}", a.socket.display());

    // Bad input: refused, nothing enrolled.
    let o = bin()
        .args([
            "pool",
            "enable",
            &pool.name,
            "--schedule",
            "soon",
            "--endpoint",
            &ep,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("INVALID_ARGUMENT"), "{}", text(&o));
    assert_eq!(role(&aio, "before"), "none");
    let o = bin()
        .args(["pool", "enable", "no-such-pool", "--endpoint", &ep])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("NOT_FOUND"), "{}", text(&o));

    let o = bin()
        .args(["pool", "enable", &pool.name, "--schedule", "3s", "--json"])
        .args(["--endpoint", &ep])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["enabled"], true, "{j}");
    assert_eq!(j["images_enrolled"], 1, "{j}");
    assert_eq!(j["scheduling_interval"], "3s", "{j}");
    assert_eq!(role(&aio, "before"), "primary");

    // Created after pool mode was turned on: the replayer's pass enrolls it.
    let img = create_image_in(
        &aio,
        "after",
        16 * MIB,
        &[(MIB, 2 << 20), (9 * MIB, 1 << 20)],
        2,
    );
    drop(img);
    wait_until("the new image is enrolled", LONG, || {
        role(&aio, "after") == "primary"
    })
    .await;
    let rec = registry_record(&aio, "after").unwrap();
    assert_eq!(rec["schedule"]["interval"], "3s", "{rec}");
    for name in ["before", "after"] {
        let snap = converged_after(&pool, Site::A, name, None).await;
        let s = format!("{}/{name}@{snap}", pool.name);
        assert_eq!(checksum(Site::A, &s), checksum(Site::B, &s), "{s}");
    }

    // Off: a later image is not enrolled (two passes at --poll-interval 1s
    // give it every chance).
    let o = bin()
        .args(["pool", "disable", &pool.name, "--endpoint", &ep])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("pool mode off"), "{}", text(&o));
    drop(create_image_in(&aio, "later", 8 * MIB, &[(0, 1 << 20)], 3));
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(role(&aio, "later"), "none");
    assert_eq!(role(&aio, "after"), "primary", "replicated images stay so");

    // A RADOS namespace is enabled on its own: its images replicate, the
    // default namespace's stay as they are.
    let ns = "tenant";
    for site in [Site::A, Site::B] {
        rbd_ok(
            site,
            &[
                "namespace",
                "create",
                "--pool",
                &pool.name,
                "--namespace",
                ns,
            ],
        );
    }
    let (tna, tnb) = (
        admin(Site::A).ioctx(&pool.name, ns).unwrap(),
        admin(Site::B).ioctx(&pool.name, ns).unwrap(),
    );
    drop(create_image_in(&tna, "t-0", 8 * MIB, &[(MIB, 1 << 20)], 4));
    let o = bin()
        .args([
            "pool",
            "enable",
            &pool.name,
            "--namespace",
            ns,
            "--schedule",
            "3s",
        ])
        .args(["--endpoint", &ep])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "{}/{ns}: pool mode on (every 3s), 1 images enrolled now",
            pool.name
        )),
        "{}",
        text(&o)
    );
    drop(create_image_in(
        &tna,
        "t-1",
        8 * MIB,
        &[(3 * MIB, 1 << 20)],
        5,
    ));
    wait_until("the namespace's new image is enrolled", LONG, || {
        role(&tna, "t-1") == "primary"
    })
    .await;
    assert_eq!(
        role(&aio, "later"),
        "none",
        "the default namespace is not in pool mode"
    );
    for name in ["t-0", "t-1"] {
        let mut common = None;
        wait_until(
            "a sync point of the namespace's image on both sites",
            LONG,
            || {
                let theirs = sync_snaps_in(&tnb, name);
                common = sync_snaps_in(&tna, name)
                    .into_iter()
                    .rev()
                    .find(|s| theirs.contains(s));
                common.is_some()
            },
        )
        .await;
        let at = format!("{}/{ns}/{name}@{}", pool.name, common.unwrap());
        assert_eq!(checksum(Site::A, &at), checksum(Site::B, &at), "{at}");
    }
}

/// Writes to `images` until `stop`, holding them open (a running VM).
fn writer(
    images: Vec<(Arc<csi_rbd_replicator::ceph::IoCtx>, String)>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let open: Vec<Image> = images
            .iter()
            .map(|(io, n)| Image::open(io, n).expect("open"))
            .collect();
        let mut k = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for img in &open {
                write(img, &[((k % 12) * MIB, 256 << 10)], 7000 + k);
            }
            k += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        k
    })
}

/// The seed's migration: glance, nova (clones) and cinder from site-a to
/// site-b with start, status, switch and cleanup, writes until the switch.
#[tokio::test]
async fn migration_of_glance_nova_cinder_pools() {
    let glance = TestPool::new("glance");
    let nova = TestPool::new("nova");
    let cinder = TestPool::new("cinder");
    let all = format!("{},{},{}", glance.name, nova.name, cinder.name);
    let a = Sidecar::start(Site::A, &["--pools", &all]).await;
    let b = Sidecar::start(Site::B, &["--pools", &all]).await;
    let (ga, na, ca) = (
        glance.ioctx(Site::A),
        nova.ioctx(Site::A),
        cinder.ioctx(Site::A),
    );
    let pools = [
        glance.name.as_str(),
        nova.name.as_str(),
        cinder.name.as_str(),
    ];

    // The seed: a glance base image with a snapshot, two nova clones of it
    // (one with data of its own), two cinder volumes.
    drop(create_image_in(
        &ga,
        "base",
        32 * MIB,
        &[(0, 4 << 20), (20 * MIB, 2 << 20)],
        11,
    ));
    let base_snap = format!("{}/base@snap", glance.name);
    rbd_ok(Site::A, &["snap", "create", &base_snap]);
    rbd_ok(Site::A, &["snap", "protect", &base_snap]);
    for vm in ["vm-0", "vm-1"] {
        rbd_ok(
            Site::A,
            &["clone", &base_snap, &format!("{}/{vm}", nova.name)],
        );
    }
    write(&Image::open(&na, "vm-0").unwrap(), &[(MIB, 1 << 20)], 12);
    for (k, v) in ["vol-0", "vol-1"].iter().enumerate() {
        drop(create_image_in(
            &ca,
            v,
            16 * MIB,
            &[(k as u64 * MIB, 3 << 20)],
            20 + k as u64,
        ));
    }

    // Clones whose parent's pool is not migrated, without --flatten:
    // refused, naming them, nothing enrolled.
    let o = migrate("start", &a, &b, &pools[1..], &["--json"]);
    eprintln!("$ migrate start (nova and cinder only)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = json(&o)["error"].as_str().unwrap().to_string();
    assert!(err.contains(&format!("{}/vm-0", nova.name)), "{err}");
    assert!(err.contains(&format!("parent {base_snap}")), "{err}");
    assert!(err.contains("--flatten"), "{err}");
    assert_eq!(role(&na, "vm-0"), "none");
    assert_eq!(role(&ca, "vol-0"), "none");

    // With glance migrated too, the clones stay clones.
    let o = migrate("start", &a, &b, &pools, &["--schedule", "5s"]);
    eprintln!("$ migrate start\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(t.contains("migration site-a -> site-b started"), "{t}");
    assert!(
        t.contains(&format!(
            "{}: pool mode on (every 5s), 2 images, 2 enrolled now",
            nova.name
        )),
        "{t}"
    );
    assert!(
        t.contains(&format!(
            "clones kept as clones: {}/vm-0 -> {base_snap}",
            nova.name
        )),
        "{t}"
    );
    for (io, n) in [(&ga, "base"), (&na, "vm-0"), (&na, "vm-1"), (&ca, "vol-0")] {
        assert_eq!(role(io, n), "primary", "{n}");
    }

    // A volume created while the migration runs, and writes into two
    // images (held open, as a running VM holds its disk).
    drop(create_image_in(
        &ca,
        "vol-new",
        8 * MIB,
        &[(2 * MIB, 1 << 20)],
        30,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        vec![
            (Arc::clone(&na), "vm-1".to_string()),
            (Arc::clone(&ca), "vol-0".to_string()),
        ],
        Arc::clone(&stop),
    );
    let stopper = {
        let stop = Arc::clone(&stop);
        scopeguard(move || stop.store(true, Ordering::Relaxed))
    };

    // Status until every image, the new one included, is ready.
    let mut last = String::new();
    wait_until("every image ready to switch", LONG, || {
        let o = migrate("status", &a, &b, &pools, &[]);
        last = text(&o);
        o.status.code() == Some(0)
    })
    .await;
    eprintln!("$ migrate status\n{last}");
    assert!(
        last.contains(&format!("{}/vol-new: primary", cinder.name)),
        "{last}"
    );
    let o = migrate("status", &a, &b, &pools, &["--json"]);
    let j = json(&o);
    let images: Vec<&serde_json::Value> = j["pools"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["images"].as_array().unwrap())
        .collect();
    assert_eq!(images.len(), 6, "{j}");
    assert!(images.iter().all(|i| i["ready"] == true), "{j}");
    let open: Vec<&str> = images
        .iter()
        .filter(|i| !i["clients"].as_array().unwrap().is_empty())
        .map(|i| i["image"].as_str().unwrap())
        .collect();
    assert_eq!(
        open,
        [
            format!("{}/vm-1", nova.name),
            format!("{}/vol-0", cinder.name)
        ],
        "{j}"
    );

    // The switch is refused while the writer has images open, naming them;
    // nothing changes.
    let o = migrate("switch", &a, &b, &pools, &["--json"]);
    eprintln!("$ migrate switch (clients open)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let refused = json(&o)["refused"].as_str().unwrap().to_string();
    assert!(
        refused.contains(&format!("{}/vol-0 open by client.", cinder.name)),
        "{refused}"
    );
    assert_eq!(role(&ca, "vol-0"), "primary");

    // The application stops; the switch takes the final deltas.
    drop(stopper);
    let rounds = w.join().unwrap();
    assert!(rounds > 0);
    let names: Vec<(&TestPool, &str)> = vec![
        (&glance, "base"),
        (&nova, "vm-0"),
        (&nova, "vm-1"),
        (&cinder, "vol-0"),
        (&cinder, "vol-1"),
        (&cinder, "vol-new"),
    ];
    let heads: Vec<String> = names
        .iter()
        .map(|(p, n)| checksum(Site::A, &format!("{}/{n}", p.name)))
        .collect();
    let o = migrate("switch", &a, &b, &pools, &["--verify", "--json"]);
    eprintln!("$ migrate switch --verify --json\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["images"].as_array().unwrap().len(), 6, "{j}");
    assert!(
        j["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["identical"] == true),
        "{j}"
    );
    let downtime = j["downtime_ms"].as_u64().unwrap();
    assert!(downtime > 0, "{j}");
    eprintln!(
        "MEASURED switch downtime with 6 images in 3 pools: {downtime} ms (final sync snapshots {} ms, final delta and promotion {} ms)",
        j["demote_ms"], j["final_delta_and_promote_ms"]
    );
    for ((p, n), head) in names.iter().zip(&heads) {
        let i = j["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["image"] == format!("{}/{n}", p.name))
            .unwrap_or_else(|| panic!("{n} not in {j}"));
        let snap = i["snapshot"].as_str().unwrap();
        let at = format!("{}/{n}@{snap}", p.name);
        let (sa, sb) = (checksum(Site::A, &at), checksum(Site::B, &at));
        assert_eq!(sa, sb, "{at}: target differs from the source");
        assert_eq!(
            &sa, head,
            "{at}: the final sync point misses the last writes"
        );
        assert_eq!(
            i["source_sha256"], sa,
            "{at}: --verify's checksum is not rbd export's"
        );
        assert_eq!(role(&p.ioctx(Site::B), n), "primary", "{n}");
        assert_ne!(role(&p.ioctx(Site::A), n), "primary", "{n}");
    }
    // The nova disks are clones of the target's glance image at the same
    // snapshot.
    for vm in ["vm-0", "vm-1"] {
        let info = rbd_ok(Site::B, &["info", &format!("{}/{vm}", nova.name)]);
        assert!(
            info.contains(&format!("parent: {base_snap}")),
            "{vm} on the target is not a clone of {base_snap}: {info}"
        );
    }
    // The user snapshot of the glance base is on the target too.
    assert!(
        rbd_ok(Site::B, &["snap", "ls", &format!("{}/base", glance.name)]).contains(" snap "),
        "glance base snapshot missing on the target"
    );

    // Cleanup: replication state and sync snapshots gone on both sites,
    // the source images kept (not removed without --remove-source).
    let o = migrate("cleanup", &a, &b, &pools, &["--json"]);
    eprintln!("$ migrate cleanup --json\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for ((p, n), head) in names.iter().zip(&heads) {
        for site in [Site::A, Site::B] {
            let io = p.ioctx(site);
            assert!(registry_record(&io, n).is_none(), "{n} on {}", site.id());
            assert!(sync_snaps_in(&io, n).is_empty(), "{n} on {}", site.id());
        }
        assert_eq!(
            &checksum(Site::B, &format!("{}/{n}", p.name)),
            head,
            "{n}: the target changed"
        );
        assert!(
            Image::open_read_only(&p.ioctx(Site::A), n, None).is_ok(),
            "{n}: the source image is gone"
        );
    }
    // Nothing is replicated any more: a status says so (not ready).
    let o = migrate("status", &a, &b, &pools, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("pool mode off"), "{}", text(&o));
}

/// `migrate start --flatten`: a nova clone whose parent's pool is not
/// migrated becomes a flat copy on the target (its parent's data included,
/// its holes kept), and the switch finds it identical at the final sync
/// point.
#[tokio::test]
async fn migration_with_flatten_makes_flat_copies_of_clones() {
    let glance = TestPool::new("glance");
    let nova = TestPool::new("nova");
    let all = format!("{},{}", glance.name, nova.name);
    let a = Sidecar::start(Site::A, &["--pools", &all]).await;
    let b = Sidecar::start(Site::B, &["--pools", &all]).await;
    let (ga, na) = (glance.ioctx(Site::A), nova.ioctx(Site::A));
    drop(create_image_in(
        &ga,
        "base",
        32 * MIB,
        &[(0, 4 << 20), (20 * MIB, 2 << 20)],
        41,
    ));
    let base_snap = format!("{}/base@snap", glance.name);
    rbd_ok(Site::A, &["snap", "create", &base_snap]);
    rbd_ok(Site::A, &["snap", "protect", &base_snap]);
    let vm = format!("{}/vm-0", nova.name);
    rbd_ok(Site::A, &["clone", &base_snap, &vm]);
    // Its own data over the parent's, and past it.
    write(
        &Image::open(&na, "vm-0").unwrap(),
        &[(MIB, 1 << 20), (28 * MIB, 1 << 20)],
        42,
    );
    let pools = [nova.name.as_str()];

    let o = migrate("start", &a, &b, &pools, &["--flatten", "--schedule", "5s"]);
    eprintln!("$ migrate start --flatten\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        t.contains(&format!("clones replicated as flat copies: {vm}")),
        "{t}"
    );
    wait_until("the flattened clone ready to switch", LONG, || {
        migrate("status", &a, &b, &pools, &[]).status.code() == Some(0)
    })
    .await;
    let head = checksum(Site::A, &vm);
    let o = migrate("switch", &a, &b, &pools, &["--verify", "--json"]);
    eprintln!("$ migrate switch --verify --json\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let img = &j["images"][0];
    assert_eq!(img["image"], vm.as_str(), "{j}");
    assert_eq!(img["identical"], true, "{j}");
    let at = format!("{vm}@{}", img["snapshot"].as_str().unwrap());
    assert_eq!(checksum(Site::B, &at), head, "{at} on the target");
    assert_eq!(checksum(Site::B, &vm), head, "{vm} on the target");
    // Flat: no parent on the target, and the glance pool there holds no
    // image the clone could lean on.
    let info = rbd_ok(Site::B, &["info", &vm]);
    assert!(
        !info.contains("parent:"),
        "{vm} on the target is a clone: {info}"
    );
    assert!(
        rbd_ok(Site::B, &["ls", &glance.name]).trim().is_empty(),
        "the glance pool was not migrated"
    );
    // Sparse: what the target allocated (its snapshots' and head's, as
    // `rbd du` counts them with fast-diff) is about what the clone reads
    // as data (the parent's 6 MiB and its own 2 MiB, in three 4 MiB
    // objects), far from its 32 MiB.
    let du = rbd_ok(Site::B, &["du", "--format", "json", &vm]);
    let used = serde_json::from_str::<serde_json::Value>(&du).unwrap()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["used_size"].as_u64().unwrap())
        .sum::<u64>();
    assert!(used > 0 && used <= 16 * MIB, "{vm} uses {used} bytes: {du}");
}

/// The switch's downtime with `CSIRR_MIGRATE_IMAGES` images (8 by default;
/// the README's figure ran 20) in one pool, written until just before the
/// switch (so the final delta carries the writes since the last sync
/// point): every image identical at its final sync point (`--verify`, and
/// `rbd export` for a sample), the downtime printed.
#[tokio::test]
async fn migration_switch_downtime_with_many_images() {
    let n: usize = std::env::var("CSIRR_MIGRATE_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let pool = TestPool::new("migscale");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let names: Vec<String> = (0..n).map(|k| format!("disk-{k:02}")).collect();
    for (k, name) in names.iter().enumerate() {
        drop(create_image_in(
            &aio,
            name,
            32 * MIB,
            &[(0, 4 << 20), (16 * MIB, 2 << 20)],
            100 + k as u64,
        ));
    }
    let pools = [pool.name.as_str()];
    let o = migrate("start", &a, &b, &pools, &["--schedule", "10s"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(
        names
            .iter()
            .map(|n| (Arc::clone(&aio), n.clone()))
            .collect(),
        Arc::clone(&stop),
    );
    let stopper = {
        let stop = Arc::clone(&stop);
        scopeguard(move || stop.store(true, Ordering::Relaxed))
    };
    let mut last = String::new();
    wait_until("every image ready to switch", LONG, || {
        let o = migrate("status", &a, &b, &pools, &[]);
        last = text(&o);
        o.status.code() == Some(0)
    })
    .await;
    eprintln!("$ migrate status\n{last}");
    // Writes go on past the first sync points, up to the switch.
    tokio::time::sleep(Duration::from_secs(5)).await;
    drop(stopper);
    let rounds = w.join().unwrap();
    let o = migrate("switch", &a, &b, &pools, &["--verify", "--parallel", "16"]);
    eprintln!("$ migrate switch --verify --parallel 16\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        t.contains(&format!("switched {n} images site-a -> site-b: downtime ")),
        "{t}"
    );
    assert!(t.contains("every image identical"), "{t}");
    eprintln!(
        "MEASURED {n} images, {rounds} write rounds of 256 KiB each: {}",
        t.lines().last().unwrap_or_default()
    );
    for name in [&names[0], &names[n - 1]] {
        let head = checksum(Site::A, &format!("{}/{name}", pool.name));
        assert_eq!(
            checksum(Site::B, &format!("{}/{name}", pool.name)),
            head,
            "{name}"
        );
    }
    let o = migrate("cleanup", &a, &b, &pools, &["--remove-source"]);
    eprintln!("$ migrate cleanup --remove-source\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for name in &names {
        assert!(
            Image::open_read_only(&aio, name, None).is_err(),
            "{name}: the source image is still there"
        );
        assert!(
            registry_record(&pool.ioctx(Site::B), name).is_none(),
            "{name}"
        );
    }
    let trash = rbd_ok(Site::A, &["trash", "ls", &pool.name]);
    assert_eq!(trash.lines().count(), n, "{trash}");
}

/// The registry record of image id `id` on a site (the image may have
/// another name's id now), as JSON.
fn record_by_id(io: &Arc<csi_rbd_replicator::ceph::IoCtx>, id: &str) -> Option<serde_json::Value> {
    io.omap_get_all("csi-rbd-replicator.registry", &format!("image.{id}"))
        .ok()?
        .values()
        .next()
        .and_then(|v| serde_json::from_slice(v).ok())
}

/// The replica statuses reported for primary image id `id`, as text.
fn statuses_of(io: &Arc<csi_rbd_replicator::ceph::IoCtx>, id: &str) -> String {
    io.omap_get_all("csi-rbd-replicator.registry", &format!("status.{id}."))
        .unwrap_or_default()
        .values()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

/// Live-migration of a replicated primary (`rbd migration`, a new object
/// size in the same pool under the same name), syncing every 2 s: while
/// prepared, replication pauses (the record and the replica's status say
/// so, no sync snapshot is taken); abort leaves it as it was (the next sync
/// point converges); prepare, writes, execute and commit move the record to
/// the new image id and the replica follows from the sync snapshot the
/// migration copied (its sync point after the commit equals the primary's,
/// and copies only what changed, no full resync).
#[tokio::test]
async fn live_migration_of_a_replicated_primary() {
    let pool = TestPool::new("livemig");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let _b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "vol";
    let spec = format!("{}/{name}", pool.name);
    drop(create_image_in(
        &aio,
        name,
        32 * MIB,
        &[(0, 8 << 20), (20 * MIB, 2 << 20)],
        41,
    ));
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &spec, &[("schedulingInterval", "2s")]))
        .await
        .expect("enable");
    let s1 = converged_after(&pool, Site::A, name, None).await;
    let old_id = Image::open_read_only(&aio, name, None)
        .unwrap()
        .id()
        .unwrap();
    let prepare = [
        "migration",
        "prepare",
        "--object-size",
        "8M",
        "--stripe-unit",
        "8M",
        "--stripe-count",
        "1",
        &spec,
        &spec,
    ];
    let state = |io: &Arc<csi_rbd_replicator::ceph::IoCtx>| {
        record_by_id(io, &old_id).map(|r| r["live_migration"]["state"].clone())
    };
    // Prepared: paused, and said so; then aborted: as it was.
    prepare_migration(&prepare).await;
    wait_until("the migration is seen", LONG, || {
        state(&aio).is_some_and(|s| s == "prepared")
    })
    .await;
    let paused_at = sync_snaps_in(&aio, name);
    wait_until("the replica reports the pause", LONG, || {
        statuses_of(&aio, &old_id).contains("live-migrated")
    })
    .await;
    write(&Image::open(&aio, name).unwrap(), &[(4 * MIB, 1 << 20)], 42);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        sync_snaps_in(&aio, name),
        paused_at,
        "a sync snapshot was taken during the migration"
    );
    rbd_ok(Site::A, &["migration", "abort", &spec]);
    wait_until("the abort is seen", LONG, || {
        state(&aio).is_some_and(|s| s.is_null())
    })
    .await;
    let s2 = converged_after(&pool, Site::A, name, Some(&s1)).await;

    // Prepared, written, executed, committed: the replica follows.
    prepare_migration(&prepare).await;
    wait_until("the migration is seen", LONG, || {
        state(&aio).is_some_and(|s| s == "prepared")
    })
    .await;
    write(
        &Image::open(&aio, name).unwrap(),
        &[(12 * MIB, 1 << 20), (31 * MIB, 4096)],
        43,
    );
    rbd_ok(Site::A, &["migration", "execute", &spec]);
    rbd_ok(Site::A, &["migration", "commit", &spec]);
    let new_id = Image::open_read_only(&aio, name, None)
        .unwrap()
        .id()
        .unwrap();
    assert_ne!(new_id, old_id);
    wait_until("the record follows the new image", LONG, || {
        registry_record(&aio, name).is_some_and(|r| r["migrated_from"] == old_id.as_str())
    })
    .await;
    assert!(
        record_by_id(&aio, &old_id).is_none(),
        "the old record stayed"
    );
    let replica_id = Image::open_read_only(&bio, name, None)
        .unwrap()
        .id()
        .unwrap();
    let s3 = converged_with_head(&pool, name, &s2).await;
    let rec = registry_record(&bio, name).expect("replica record");
    assert_eq!(rec["primary"]["image_id"], new_id.as_str(), "{rec}");
    let bytes = rec["last_sync"]["bytes"].as_u64().unwrap();
    // librbd's migration copyup makes an object written while prepared
    // differ whole from the copied snapshot (8 MiB objects here).
    eprintln!("MEASURED first delta after the commit (to {s3}): {bytes} bytes");
    // The same replica, no resync: the next delta on the new image carries
    // just its write.
    write(
        &Image::open(&aio, name).unwrap(),
        &[(2 * MIB, 64 << 10)],
        44,
    );
    let s4 = converged_after(&pool, Site::A, name, Some(&s3)).await;
    let rec = registry_record(&bio, name).expect("replica record");
    let bytes = rec["last_sync"]["bytes"].as_u64().unwrap();
    eprintln!("MEASURED next delta ({s3} -> {s4}): {bytes} bytes");
    assert!(bytes <= 1 << 20, "not an incremental delta: {rec}");
    assert_eq!(
        Image::open_read_only(&bio, name, None)
            .unwrap()
            .id()
            .unwrap(),
        replica_id,
        "the replica was recreated"
    );
    let snaps = sync_snaps_in(&bio, name);
    assert!(
        [&s2, &s3, &s4].iter().all(|s| snaps.contains(s)),
        "a sync point is missing on the replica: {snaps:?}"
    );
}

/// `rbd migration prepare|execute|commit` of a replicated primary to another
/// pool, written while prepared: the record moves to the destination pool's
/// registry (`moved_from` the old place), the sidecar of site-b moves the
/// replica the same way on its cluster (its sync snapshots come along, the
/// old replica is gone), and replication goes on from the last sync point
/// before the migration, with no full copy and no sync point missing.
#[tokio::test]
async fn live_migration_to_another_pool_moves_the_replica_too() {
    let (p1, p2) = (TestPool::new("lmfrom"), TestPool::new("lmto"));
    let pools = format!("{},{}", p1.name, p2.name);
    let args = ["--pools", pools.as_str()];
    let a = Sidecar::start(Site::A, &args).await;
    let _b = Sidecar::start(Site::B, &args).await;
    let (s1, old_id) = replicated_in(&a, &p1).await;
    let new_id = migrate_on_site_a(&p1, &p2, &old_id).await;
    let (a2, b1, b2) = (p2.ioctx(Site::A), p1.ioctx(Site::B), p2.ioctx(Site::B));
    let name = "vol";
    wait_until("the replica moves with it", LONG, || {
        registry_record(&b2, name).is_some_and(|r| r["primary"]["image_id"] == new_id.as_str())
    })
    .await;
    assert!(
        !image_exists_in(&b1, name),
        "the old replica is still there"
    );
    assert!(
        registry_record(&b1, name).is_none(),
        "the old replica record stayed"
    );
    let moved_replica = Image::open_read_only(&b2, name, None)
        .unwrap()
        .id()
        .unwrap();
    assert!(
        sync_snaps_in(&b2, name).contains(&s1),
        "the moved replica lost the last sync point before the migration"
    );

    let s2 = converged_with_head(&p2, name, &s1).await;
    let rec = registry_record(&b2, name).expect("replica record");
    let bytes = rec["last_sync"]["bytes"].as_u64().unwrap();
    eprintln!("MEASURED first delta after the move (to {s2}): {bytes} bytes");
    assert!(bytes < 16 << 20, "a full copy after the move: {rec}");
    write(
        &Image::open(&a2, name).unwrap(),
        &[(20 * MIB, 64 << 10)],
        53,
    );
    let s3 = converged_after(&p2, Site::A, name, Some(&s2)).await;
    let rec = registry_record(&b2, name).expect("replica record");
    let bytes = rec["last_sync"]["bytes"].as_u64().unwrap();
    eprintln!("MEASURED next delta ({s2} -> {s3}): {bytes} bytes");
    assert!(bytes <= 1 << 20, "not an incremental delta: {rec}");
    assert_eq!(
        Image::open_read_only(&b2, name, None)
            .unwrap()
            .id()
            .unwrap(),
        moved_replica,
        "the replica was recreated"
    );
}

/// Enables replication of a 32 MiB image `vol` (16 MiB written) in `pool`
/// on site-a with a 2 s schedule; its first sync point on both sites, and
/// its image id.
async fn replicated_in(a: &Sidecar, pool: &TestPool) -> (String, String) {
    let aio = pool.ioctx(Site::A);
    drop(create_image_in(&aio, "vol", 32 * MIB, &[(0, 16 << 20)], 51));
    let spec = format!("{}/vol", pool.name);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &spec, &[("schedulingInterval", "2s")]))
        .await
        .expect("enable");
    let s1 = converged_after(pool, Site::A, "vol", None).await;
    let id = Image::open_read_only(&aio, "vol", None)
        .unwrap()
        .id()
        .unwrap();
    (s1, id)
}

/// Live-migrates site-a's `vol` (image id `old_id`) from pool `p1` to `p2`:
/// prepare, seen by the sidecar, 1 MiB written while prepared, execute,
/// commit; then waits until the primary's record moved to `p2`. Returns the
/// new image id.
async fn migrate_on_site_a(p1: &TestPool, p2: &TestPool, old_id: &str) -> String {
    let (a1, a2) = (p1.ioctx(Site::A), p2.ioctx(Site::A));
    let (from, to) = (format!("{}/vol", p1.name), format!("{}/vol", p2.name));
    prepare_migration(&["migration", "prepare", &from, &to]).await;
    wait_until("the migration is seen", LONG, || {
        record_by_id(&a1, old_id).is_some_and(|r| r["live_migration"]["state"] == "prepared")
    })
    .await;
    write(&Image::open(&a2, "vol").unwrap(), &[(4 * MIB, 1 << 20)], 52);
    rbd_ok(Site::A, &["migration", "execute", &to]);
    rbd_ok(Site::A, &["migration", "commit", &to]);
    let new_id = Image::open_read_only(&a2, "vol", None)
        .unwrap()
        .id()
        .unwrap();
    wait_until("the record moves to the destination pool", LONG, || {
        registry_record(&a2, "vol").is_some_and(|r| {
            r["migrated_from"] == old_id && r["moved_from"]["pool"] == p1.name.as_str()
        })
    })
    .await;
    assert!(
        registry_record(&a1, "vol").is_none(),
        "the old record stayed"
    );
    new_id
}

/// The replica's move interrupted right after its `prepare` (site-b's
/// sidecar was down during the primary's migration, and the prepare was run
/// as a crash would have left it): the restarted sidecar executes and
/// commits it, moves the replica's record, and replication goes on from
/// the sync point before the migration, equal on both sides.
#[tokio::test]
async fn an_interrupted_replica_move_is_finished_after_a_restart() {
    let (p1, p2) = (TestPool::new("lmcrash"), TestPool::new("lmcrashto"));
    let pools = format!("{},{}", p1.name, p2.name);
    let args = ["--pools", pools.as_str()];
    let a = Sidecar::start(Site::A, &args).await;
    let mut b = Sidecar::start(Site::B, &args).await;
    let (s1, old_id) = replicated_in(&a, &p1).await;
    // Stopped cleanly: the replica's lock is released, so that the
    // prepare below finds it closed.
    b.stop();
    let new_id = migrate_on_site_a(&p1, &p2, &old_id).await;
    let (b1, b2) = (p1.ioctx(Site::B), p2.ioctx(Site::B));
    let (from, to) = (format!("{}/vol", p1.name), format!("{}/vol", p2.name));
    rbd_ok(Site::B, &["migration", "prepare", &from, &to]);
    let _b = Sidecar::start(Site::B, &args).await;
    wait_until("the replica's move is finished", LONG, || {
        registry_record(&b2, "vol").is_some_and(|r| r["primary"]["image_id"] == new_id.as_str())
    })
    .await;
    assert!(
        !image_exists_in(&b1, "vol"),
        "the old replica is still there"
    );
    assert!(
        registry_record(&b1, "vol").is_none(),
        "the old replica record stayed"
    );
    assert!(
        sync_snaps_in(&b2, "vol").contains(&s1),
        "the moved replica lost the last sync point before the migration"
    );
    converged_with_head(&p2, "vol", &s1).await;
}

/// The first sync point after `after` that both sites hold (equal there)
/// and that holds the primary's head, i.e. the writes made during a
/// migration (the primary is quiet by now). A point taken on schedule
/// before the migration's prepare may converge first: up to three are
/// looked at. Returns its name.
async fn converged_with_head(pool: &TestPool, name: &str, after: &str) -> String {
    let spec = format!("{}/{name}", pool.name);
    let head = checksum(Site::A, &spec);
    let mut after = after.to_string();
    for _ in 0..3 {
        let s = converged_after(pool, Site::A, name, Some(&after)).await;
        if checksum(Site::A, &format!("{spec}@{s}")) == head {
            return s;
        }
        after = s;
    }
    panic!("no sync point after {after} holds the writes made during the migration");
}

/// `rbd ARGS` (a `migration prepare`) on site-a, retried until it gets
/// through: librbd refuses to prepare while any client has the image open
/// (EBUSY, "image has watchers"), and the sidecar does for a moment at each
/// sync snapshot (every 2 s here), as a VM would all the time. An operator
/// retries; so do the tests.
async fn prepare_migration(args: &[&str]) {
    let mut last = String::new();
    for _ in 0..50 {
        let o = rbd(Site::A, args);
        if o.status.success() {
            return;
        }
        last = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(last.contains("has watchers"), "prepare failed: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("prepare never found the image closed: {last}");
}

/// Whether image `name` exists in `io`.
fn image_exists_in(io: &Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> bool {
    Image::open_read_only(io, name, None).is_ok()
}

/// `migrate start --create-pools` with admin access to both clusters: a
/// pool (with a namespace) that exists only on the source, not mirrored
/// and not peered, is created on the target, both sides put in image
/// mirror mode and peered; the images of both namespaces migrate and
/// switch (`--verify`); `cleanup --remove-peers` removes the peers on both
/// sides.
#[tokio::test]
async fn migrate_start_creates_and_peers_missing_target_pools() {
    // Removed from both sites on drop, however far the test got.
    let pool = TestPool {
        name: unique("mkpool"),
    };
    let p = pool.name.clone();
    ceph_ok(Site::A, &["osd", "pool", "create", &p, "8", "8"]);
    rbd_ok(Site::A, &["pool", "init", &p]);
    rbd_ok(Site::A, &["namespace", "create", &format!("{p}/ns1")]);
    let (aio, ansio) = (
        admin(Site::A).ioctx(&p, "").unwrap(),
        admin(Site::A).ioctx(&p, "ns1").unwrap(),
    );
    drop(create_image_in(&aio, "vol", 16 * MIB, &[(0, 2 << 20)], 41));
    drop(create_image_in(
        &ansio,
        "nsvol",
        8 * MIB,
        &[(MIB, 1 << 20)],
        42,
    ));
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let ns = format!("{p}/ns1");
    let pools = [p.as_str(), ns.as_str()];
    let (ca, ka, cb, kb) = (
        Site::A.conf(),
        Site::A.keyring(),
        Site::B.conf(),
        Site::B.keyring(),
    );
    let admin_args = [
        "--from-conf",
        ca.as_str(),
        "--from-keyring",
        ka.as_str(),
        "--to-conf",
        cb.as_str(),
        "--to-keyring",
        kb.as_str(),
    ];

    // Without admin access: refused before anything changes.
    let o = migrate("start", &a, &b, &pools, &["--create-pools"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--from-conf"), "{}", text(&o));
    assert!(!admin(Site::B).pool_list().unwrap().contains(&p));

    let mut args = vec!["--create-pools", "--schedule", "5s"];
    args.extend(admin_args);
    let o = migrate("start", &a, &b, &pools, &args);
    eprintln!("$ migrate start --create-pools\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = text(&o);
    assert_eq!(t.matches("created pool").count(), 1, "{t}");
    for want in [
        format!("created pool {p}"),
        format!("created namespace {p}/ns1"),
        format!("{p}: peered both ways"),
    ] {
        assert!(t.contains(&want), "{want}: {t}");
    }
    let bio = admin(Site::B).ioctx(&p, "").unwrap();
    assert_eq!(
        csi_rbd_replicator::ceph::admin::mirror_mode(&bio).unwrap(),
        1
    );
    assert_eq!(
        csi_rbd_replicator::ceph::rbd::mirror_peer_list(&bio)
            .unwrap()
            .len(),
        1
    );

    wait_until("both images ready to switch", LONG, || {
        migrate("status", &a, &b, &pools, &[]).status.code() == Some(0)
    })
    .await;
    let o = migrate("switch", &a, &b, &pools, &["--verify"]);
    eprintln!("$ migrate switch --verify\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for (spec, site_io) in [
        (format!("{p}/vol"), &bio),
        (
            format!("{p}/ns1/nsvol"),
            &admin(Site::B).ioctx(&p, "ns1").unwrap(),
        ),
    ] {
        assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec), "{spec}");
        let name = spec.rsplit('/').next().unwrap();
        assert_eq!(role(site_io, name), "primary", "{spec}");
    }

    let mut args = vec!["--remove-peers"];
    args.extend(admin_args);
    let o = migrate("cleanup", &a, &b, &pools, &args);
    eprintln!("$ migrate cleanup --remove-peers\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(text(&o).contains("removed peer site-a"), "{}", text(&o));
    for io in [&aio, &bio] {
        let peers = csi_rbd_replicator::ceph::rbd::mirror_peer_list(io).unwrap();
        assert!(peers.is_empty(), "{}: {peers:?}", io.spec());
    }
}
