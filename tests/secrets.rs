//! No secret anywhere a DR scenario leaves text (issue 13, security): both
//! sites' cephx keys — as sent in the requests' secrets and read from
//! `--secret-dir` — must not appear, as the key, its base64 encoding (a
//! Kubernetes Secret's `data`) or its raw secret bytes (raw or hex), in:
//!
//! - every line the two sidecars logged, at debug level for every crate
//!   and trace for this one;
//! - every gRPC answer and error message of the scenario (Enable, Info,
//!   Demote, a refused Promote, Promote, Resync, Disable);
//! - the `status` CLI's output (text, `--verbose`, `--json`) and `verify`'s;
//! - both sidecars' `/metrics`;
//! - what is in RADOS in the test pool on both sites: every object's data
//!   (RBD data objects aside: image content), its xattrs and its omap keys
//!   and values (the registry, the leases, the image headers with their
//!   snapshot names and metadata, rbd_mirroring, the trash).
//!
//! The scenario: enable on A, first sync; demote A, a refused early
//! Promote, planned Promote on B, resync A; a write on B replicated to A;
//! disable on B.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use tonic::Code;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);

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
    let resp = String::from_utf8_lossy(&buf).into_owned();
    assert!(resp.starts_with("HTTP/1.1 200"), "GET /metrics: {resp}");
    resp
}

/// Every form in which a site's key could leak, named.
fn needles(site: Site) -> Vec<(String, Vec<u8>)> {
    let key = secrets(site)["userKey"].trim().to_string();
    assert!(key.len() >= 40, "{}: not a cephx key: {key:?}", site.id());
    let b64 = base64::engine::general_purpose::STANDARD;
    // A cephx key is base64 of: type (u16), created (u32 s + u32 ns),
    // length (u16), then the secret itself.
    let raw = b64.decode(&key).expect("the key is base64");
    let secret = raw[12..].to_vec();
    assert_eq!(secret.len(), 16, "{}: unexpected key layout", site.id());
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let id = site.id();
    vec![
        (format!("{id} key"), key.clone().into_bytes()),
        (format!("{id} key, base64"), b64.encode(&key).into_bytes()),
        (format!("{id} secret bytes"), secret),
        (format!("{id} secret, hex"), hex.into_bytes()),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `rados -p POOL ARGS` as admin on `site`; None if it failed.
fn rados(site: Site, pool: &str, args: &[&str]) -> Option<Vec<u8>> {
    let o = Command::new("rados")
        .arg("-c")
        .arg(site.conf())
        .arg("--keyring")
        .arg(site.keyring())
        .args(["-p", pool])
        .args(args)
        .output()
        .expect("rados runs");
    o.status.success().then_some(o.stdout)
}

/// What is stored in `pool` on `site`: per object (but RBD data objects),
/// its data, its xattrs and its omap; keyed by where it was read.
fn pool_contents(when: &str, site: Site, pool: &str) -> BTreeMap<String, Vec<u8>> {
    let cluster = admin(site);
    let mut out = BTreeMap::new();
    let ls = rados(site, pool, &["ls", "--all"]).expect("rados ls");
    for line in String::from_utf8_lossy(&ls).lines() {
        let (ns, obj) = line.split_once('\t').unwrap_or(("", line));
        let at = format!("{when}, {}:{pool}/{ns}/{obj}", site.id());
        out.insert(format!("{at} (name)"), obj.as_bytes().to_vec());
        if obj.starts_with("rbd_data.") {
            continue;
        }
        let nsargs = ["-N", ns];
        let with_ns = |args: &[&str]| {
            let mut v: Vec<&str> = nsargs.to_vec();
            v.extend_from_slice(args);
            rados(site, pool, &v)
        };
        if let Some(data) = with_ns(&["get", obj, "-"]) {
            out.insert(format!("{at} data"), data);
        }
        let attrs = with_ns(&["listxattr", obj]).unwrap_or_default();
        for attr in String::from_utf8_lossy(&attrs).lines() {
            if let Some(v) = with_ns(&["getxattr", obj, attr]) {
                out.insert(format!("{at} xattr {attr}"), v);
            }
        }
        let io = cluster.ioctx(pool, ns).expect("ioctx");
        if let Ok(omap) = io.omap_get_all(obj, "") {
            for (k, v) in omap {
                out.insert(format!("{at} omap value {k}"), v);
                out.insert(format!("{at} omap key {k}"), k.into_bytes());
            }
        }
    }
    out
}

#[tokio::test]
async fn dr_scenario_leaves_no_key_in_logs_status_metrics_or_rados() {
    let pool = TestPool::new("secrets");
    let (pa, pb) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    // Everything a verbose operator would turn on.
    let verbose = [("RUST_LOG", "debug,csi_rbd_replicator=trace")];
    let a = Sidecar::start_with_env(
        Site::A,
        &["--pools", &pool.name, "--metrics-address", &addr_a],
        &verbose,
    )
    .await;
    let b = Sidecar::start_with_env(
        Site::B,
        &["--pools", &pool.name, "--metrics-address", &addr_b],
        &verbose,
    )
    .await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let name = "vault";
    let vid = format!("{}/{name}", pool.name);
    let img = create_image_in(&aio, name, 32 * MIB, &[(0, 4 << 20)], 1);
    let (mut ca, mut cb) = (a.controller().await, b.controller().await);
    // Every answer of the scenario, as the caller sees it.
    let mut answers: Vec<String> = Vec::new();

    let r = ca
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await;
    answers.push(format!("enable: {r:?}"));
    r.expect("enable");
    answers.push(format!("info A: {:?}", wait_synced(&a, &vid, LONG).await));
    answers.push(format!(
        "info B: {:?}",
        cb.get_volume_replication_info(info_req(Site::B, &vid))
            .await
    ));
    drop(img);

    // Planned relocation to B, with the refusal of a too-early Promote.
    let early = cb.promote_volume(req::promote(Site::B, &vid, false)).await;
    answers.push(format!("early promote B: {early:?}"));
    assert_eq!(
        early.expect_err("A is still primary").code(),
        Code::FailedPrecondition
    );
    let r = ca.demote_volume(req::demote(Site::A, &vid, false)).await;
    answers.push(format!("demote A: {r:?}"));
    r.expect("demote A");
    promote_planned(&b, &vid, LONG).await;
    answers.push(format!(
        "promote B again: {:?}",
        cb.promote_volume(req::promote(Site::B, &vid, false)).await
    ));
    resync_until_ready(&a, &vid, false, LONG).await;
    answers.push(format!(
        "resync A: {:?}",
        ca.resync_volume(req::resync(Site::A, &vid, false)).await
    ));

    // B writes; A follows.
    let bimg = csi_rbd_replicator::ceph::Image::open(&bio, name).expect("open on B");
    write(&bimg, &[(8 * MIB, 1 << 20)], 2);
    bimg.snap_create("csirr-sync.0000000900.manual")
        .expect("sync snapshot");
    drop(bimg);
    wait_until("A holds B's sync point", LONG, || {
        sync_snaps_in(&aio, name)
            .iter()
            .any(|s| s == "csirr-sync.0000000900.manual")
    })
    .await;
    answers.push(format!("info B: {:?}", wait_synced(&b, &vid, LONG).await));
    answers.push(format!(
        "info A: {:?}",
        ca.get_volume_replication_info(info_req(Site::A, &vid))
            .await
    ));

    // Status and verify while replicating, and the metrics.
    let mut outputs: Vec<(String, Vec<u8>)> = Vec::new();
    for site in [Site::A, Site::B] {
        for args in [&[][..], &["--verbose"][..], &["--verbose", "--json"][..]] {
            let o = cli("status", site, args);
            outputs.push((
                format!("status {args:?} on {}", site.id()),
                text(&o).into_bytes(),
            ));
        }
    }
    let v = cli("verify", Site::B, &[&vid, "--json"]);
    assert!(v.status.success(), "{}", text(&v));
    outputs.push(("verify on site-b".into(), text(&v).into_bytes()));
    for (site, port) in [(Site::A, pa), (Site::B, pb)] {
        outputs.push((
            format!("/metrics of {}", site.id()),
            metrics(port).await.into_bytes(),
        ));
    }
    // RADOS while the image is replicated (records, leases, headers).
    let mut stored = pool_contents("replicating", Site::A, &pool.name);
    stored.extend(pool_contents("replicating", Site::B, &pool.name));

    // The end: disable on the primary (B); A's replica goes to the trash.
    let r = cb
        .disable_volume_replication(req::disable(Site::B, &vid))
        .await;
    answers.push(format!("disable B: {r:?}"));
    r.expect("disable");
    wait_until("A's replica moves to the trash", LONG, || {
        csi_rbd_replicator::ceph::Image::open_read_only(&aio, name, None).is_err()
    })
    .await;
    let missing = ca
        .disable_volume_replication(req::disable(Site::A, &format!("{}/nope", pool.name)))
        .await;
    answers.push(format!("disable of an unknown volume: {missing:?}"));
    for site in [Site::A, Site::B] {
        let o = cli("status", site, &["--verbose", "--json"]);
        outputs.push((
            format!("status after disable on {}", site.id()),
            text(&o).into_bytes(),
        ));
    }
    stored.extend(pool_contents("disabled", Site::A, &pool.name));
    stored.extend(pool_contents("disabled", Site::B, &pool.name));
    for (site, port) in [(Site::A, pa), (Site::B, pb)] {
        outputs.push((
            format!("/metrics of {} after disable", site.id()),
            metrics(port).await.into_bytes(),
        ));
    }

    // Where text came from; all of it must be clean.
    for sc in [&a, &b] {
        let log = std::fs::read(&sc.log).expect("sidecar log");
        // The trace level did reach this crate's code paths.
        assert!(
            contains(&log, b"TRACE") || contains(&log, b"DEBUG"),
            "{}: no debug lines: the log level did not take",
            sc.site.id()
        );
        outputs.push((format!("log of the {} sidecar", sc.site.id()), log));
    }
    outputs.extend(
        answers
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("answer {i}"), s.clone().into_bytes())),
    );
    outputs.extend(stored);
    assert!(
        outputs.iter().any(|(w, _)| w.contains("omap value image.")),
        "the registry records were not read: {:?}",
        outputs.iter().map(|(w, _)| w).collect::<Vec<_>>()
    );

    let mut leaks = Vec::new();
    for site in [Site::A, Site::B] {
        for (form, needle) in needles(site) {
            for (what, hay) in &outputs {
                if contains(hay, &needle) {
                    leaks.push(format!("{form} in {what}"));
                }
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
