//! Site failover the Cinder way and failback (issue 16) against the real
//! pair, through the `failover` and `failback` commands talking to both
//! sites' sidecars: a pool of eight replicated images with data plus one
//! image that is not replicated; a failover to site-b with both sites up
//! (every image clean, site-b at site-a's last write); a failover where
//! site-a stops answering demotions part-way (a fail point: some images
//! clean, the rest forced at their last sync point, the report says which),
//! then a failback with relocation once site-a's sidecar is back (the
//! forced images resynced from site-b, everything primary on site-a again
//! with site-b's writes); the same with site-a really lost part-way (its
//! sidecar killed, OSD and monitor stopped) and a failback that keeps
//! site-b primary; a DR drill on site-b during active replication (drill
//! images equal to the replica's sync point, the replica unchanged).
//! Checksums with the native `rbd export`.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use csi_rbd_replicator::ceph::Image;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(150);
const N: usize = 8;

fn names() -> Vec<String> {
    (0..N).map(|k| format!("vol-{k}")).collect()
}

/// Eight images on site-a in `pool`, replicated and synced once, and one
/// image `plain` that is not replicated.
async fn eight_replicated(pool: &TestPool, a: &Sidecar) {
    let aio = pool.ioctx(Site::A);
    let mut ca = a.controller().await;
    for (k, name) in names().iter().enumerate() {
        drop(create_image_in(
            &aio,
            name,
            16 * MIB,
            &[(k as u64 * MIB, 1 << 20), (12 * MIB, 512 << 10)],
            200 + k as u64,
        ));
        let vid = format!("{}/{name}", pool.name);
        ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
            .await
            .expect("enable");
    }
    drop(create_image_in(&aio, "plain", 8 * MIB, &[(0, 1 << 20)], 99));
    for name in names() {
        wait_synced(a, &format!("{}/{name}", pool.name), LONG).await;
    }
}

/// `csi-rbd-replicator OP --to SITE --to-endpoint .. --from-endpoint ..
/// --pool P ARGS`.
fn site_cli(op: &str, to: &Sidecar, from: &Sidecar, pool: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .arg(op)
        .args(["--to", to.site.id(), "--pool", pool])
        .arg("--to-endpoint")
        .arg(format!("unix://{}", to.socket.display()))
        .arg("--from-endpoint")
        .arg(format!("unix://{}", from.socket.display()))
        .args(args)
        .output()
        .expect("command runs")
}

/// Image name -> outcome, from a JSON report.
fn outcomes(j: &serde_json::Value) -> Vec<(String, String)> {
    j["images"]
        .as_array()
        .unwrap_or_else(|| panic!("no images: {j}"))
        .iter()
        .map(|i| {
            (
                i["image"].as_str().unwrap().to_string(),
                i["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn role(io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> String {
    registry_record(io, name).map_or("none".into(), |r| r["role"].as_str().unwrap().into())
}

/// Both sites up: every image is demoted on site-a and promoted on site-b
/// (clean), site-b holds site-a's last write, the image that is not
/// replicated is listed and untouched; a second failover finds every image
/// already primary.
#[tokio::test]
async fn failover_with_both_sites_up_is_clean() {
    let pool = TestPool::new("sitefo");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    eight_replicated(&pool, &a).await;
    // A write after the first sync point: the demotion snapshot carries it.
    let img = Image::open(&aio, "vol-3").expect("open");
    write(&img, &[(14 * MIB, 1 << 20)], 333);
    drop(img);
    let a_head: Vec<String> = names()
        .iter()
        .map(|n| checksum(Site::A, &format!("{}/{n}", pool.name)))
        .collect();
    let plain = checksum(Site::A, &format!("{}/plain", pool.name));

    let o = site_cli("failover", &b, &a, &pool.name, &["--json"]);
    eprintln!("$ failover --to site-b --json\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let mut want: Vec<(String, String)> = names()
        .into_iter()
        .map(|n| (n, "clean".to_string()))
        .collect();
    want.push(("plain".into(), "not_replicated".into()));
    want.sort();
    assert_eq!(outcomes(&j), want, "{j}");
    assert_eq!(j["to"], "site-b", "{j}");
    assert_eq!(j["from"], "site-a", "{j}");
    assert!(j["from_lost"].is_null(), "{j}");
    assert_eq!(j["totals"]["clean"], N, "{j}");
    assert_eq!(j["totals"]["not_replicated"], 1, "{j}");
    assert_eq!(j["timings"]["clean"]["images"], N, "{j}");
    let plain_j = j["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == "plain")
        .unwrap();
    assert_eq!(plain_j["sites"], serde_json::json!(["site-a"]), "{j}");
    assert!(plain_j.get("steps").is_none(), "never touched: {j}");
    for i in j["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["image"] != "plain")
    {
        let ops: Vec<&str> = i["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["op"].as_str().unwrap())
            .collect();
        assert_eq!(ops, ["demote", "promote"], "{i}");
        assert_eq!(i["steps"][0]["site"], "site-a", "{i}");
        assert_eq!(i["steps"][1]["site"], "site-b", "{i}");
    }
    for (k, n) in names().iter().enumerate() {
        assert_eq!(role(&bio, n), "primary", "{n}");
        assert_ne!(role(&aio, n), "primary", "{n}");
        assert_eq!(
            checksum(Site::B, &format!("{}/{n}", pool.name)),
            a_head[k],
            "{n}: site-b does not hold site-a's last write"
        );
    }
    // The image that is not replicated: untouched, and only on site-a.
    assert!(registry_record(&aio, "plain").is_none());
    assert_eq!(checksum(Site::A, &format!("{}/plain", pool.name)), plain);
    assert!(sync_snaps_in(&aio, "plain").is_empty());
    assert!(
        rbd(Site::B, &["info", &format!("{}/plain", pool.name)])
            .status
            .code()
            != Some(0),
        "plain appeared on site-b"
    );

    // Again: nothing to do, every image already primary; text output.
    let o = site_cli("failover", &b, &a, &pool.name, &[]);
    eprintln!("$ failover --to site-b (again)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.starts_with(&format!(
            "failover to site-b (from site-a), pools {}:\n",
            pool.name
        )),
        "{t}"
    );
    assert!(
        t.contains(&format!("  {}/vol-0: already primary (", pool.name)),
        "{t}"
    );
    assert!(
        t.contains("9 images: 8 already primary, 1 not replicated, in "),
        "{t}"
    );

    // The wrong site for the endpoint: refused before anything changes.
    let o = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .args(["failover", "--to", "site-a", "--pool", &pool.name, "--json"])
        .arg("--to-endpoint")
        .arg(format!("unix://{}", b.socket.display()))
        .arg("--from-endpoint")
        .arg(format!("unix://{}", a.socket.display()))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        json(&o)["error"]
            .as_str()
            .is_some_and(|e| e.contains("serves cluster \"site-b\", not \"site-a\"")),
        "{}",
        text(&o)
    );
    assert_ne!(role(&aio, "vol-0"), "primary");
    assert_eq!(role(&bio, "vol-0"), "primary");
}

/// Site-a stops answering demotions after three images (fail point): those
/// three are clean, the other five are forced at their last sync point, the
/// report says which and why; site-a's sidecar comes back, site-b writes,
/// and `failback --relocate` resyncs the forced images from site-b and makes
/// site-a primary again for all eight, with site-b's writes.
#[tokio::test]
async fn failover_when_the_old_site_stops_answering_then_failback() {
    let pool = TestPool::new("sitefb");
    let mut a = Sidecar::start_with_env(
        Site::A,
        &pool.args(),
        &[("FAILPOINTS", "admin::image_demote=3*off->return")],
    )
    .await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    eight_replicated(&pool, &a).await;
    let at_sync: Vec<String> = names()
        .iter()
        .map(|n| {
            let first = first_sync(&aio, n);
            checksum(Site::A, &format!("{}/{n}@{first}", pool.name))
        })
        .collect();
    // Writes after the sync point on every image: the clean ones carry them
    // over, the forced ones lose them.
    for (k, n) in names().iter().enumerate() {
        let img = Image::open(&aio, n).expect("open");
        write(&img, &[(10 * MIB, 1 << 20)], 500 + k as u64);
    }
    let a_head: Vec<String> = names()
        .iter()
        .map(|n| checksum(Site::A, &format!("{}/{n}", pool.name)))
        .collect();

    let o = site_cli(
        "failover",
        &b,
        &a,
        &pool.name,
        &["--json", "--parallel", "1", "--timeout", "20s"],
    );
    eprintln!(
        "$ failover --to site-b, site-a stops answering\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(3), "forced images: {}", text(&o));
    let j = json(&o);
    let got = outcomes(&j);
    let clean: Vec<&str> = got
        .iter()
        .filter(|(_, o)| o == "clean")
        .map(|(n, _)| n.as_str())
        .collect();
    let forced: Vec<&str> = got
        .iter()
        .filter(|(_, o)| o == "forced")
        .map(|(n, _)| n.as_str())
        .collect();
    assert_eq!((clean.len(), forced.len()), (3, 5), "{j}");
    assert_eq!(j["totals"]["not_replicated"], 1, "{j}");
    assert!(
        j["from_lost"]
            .as_str()
            .is_some_and(|s| s.contains("demotion of") && s.contains("UNAVAILABLE")),
        "{j}"
    );
    for i in j["images"].as_array().unwrap() {
        if i["outcome"] == "forced" {
            let last = i["steps"].as_array().unwrap().last().unwrap().clone();
            assert_eq!(last["op"], "promote --force", "{i}");
            assert_eq!(last["code"], "OK", "{i}");
            assert!(i["error"].is_string(), "forced says why: {i}");
        }
    }
    for (k, n) in names().iter().enumerate() {
        assert_eq!(role(&bio, n), "primary", "{n}");
        let on_b = checksum(Site::B, &format!("{}/{n}", pool.name));
        if clean.contains(&n.as_str()) {
            assert_ne!(role(&aio, n), "primary", "{n}");
            assert_eq!(on_b, a_head[k], "{n}: clean, site-a's last write");
        } else {
            assert_eq!(role(&aio, n), "primary", "{n}: site-a never answered");
            assert_eq!(on_b, at_sync[k], "{n}: forced, at the last sync point");
        }
    }

    // Site-a's sidecar is back (without the fault); site-b, now primary,
    // writes to a forced image and a clean one.
    a.stop();
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let touched = [forced[0], clean[0]];
    for (k, n) in touched.iter().enumerate() {
        let img = Image::open(&bio, n).expect("open on site-b");
        write(&img, &[(2 * MIB, 1 << 20)], 800 + k as u64);
    }
    let b_head: Vec<String> = names()
        .iter()
        .map(|n| checksum(Site::B, &format!("{}/{n}", pool.name)))
        .collect();

    let o = site_cli(
        "failback",
        &a,
        &b,
        &pool.name,
        &["--relocate", "--json", "--wait", "2m"],
    );
    eprintln!("$ failback --to site-a --relocate --json\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let mut want: Vec<(String, String)> = names()
        .into_iter()
        .map(|n| (n, "relocated".to_string()))
        .collect();
    want.push(("plain".into(), "not_replicated".into()));
    want.sort();
    assert_eq!(outcomes(&j), want, "{j}");
    for i in j["images"].as_array().unwrap() {
        let ops: Vec<&str> = i["steps"]
            .as_array()
            .map(|s| s.iter().map(|s| s["op"].as_str().unwrap()).collect())
            .unwrap_or_default();
        let name = i["image"].as_str().unwrap();
        if forced.contains(&name) {
            assert_eq!(ops, ["demote", "resync", "demote", "promote"], "{i}");
            assert_eq!(i["steps"][0]["site"], "site-a", "{i}");
            assert_eq!(i["steps"][2]["site"], "site-b", "{i}");
        } else if clean.contains(&name) {
            // A replica already, or demoted still (then resynced first).
            assert!(ops.ends_with(&["demote", "promote"]), "{i}");
            assert!(!ops.contains(&"promote --force"), "{i}");
        }
    }
    for (k, n) in names().iter().enumerate() {
        assert_eq!(role(&aio, n), "primary", "{n}");
        assert_ne!(role(&bio, n), "primary", "{n}");
        assert_eq!(
            checksum(Site::A, &format!("{}/{n}", pool.name)),
            b_head[k],
            "{n}: site-a does not hold site-b's last write"
        );
    }
    drop(a);
}

/// A DR drill on site-b: each replica copied at its newest complete sync
/// point into `csirr-drill-IMAGE` (same content as site-a at that point),
/// the replica unchanged; replication goes on meanwhile (a new sync point
/// reaches site-b and reads the same on both sites) and the drill images
/// keep the drilled point; `drill stop` removes them. A drill on the
/// primary site, or a second one, is refused.
#[tokio::test]
async fn drill_during_active_replication() {
    let pool = TestPool::new("sitedrill");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    eight_replicated(&pool, &a).await;
    let drilled = ["vol-1", "vol-6"];
    let first: Vec<String> = drilled.iter().map(|n| first_sync(&aio, n)).collect();
    for (k, n) in drilled.iter().enumerate() {
        wait_replica_snap(&pool.name, n, &first[k], LONG).await;
    }
    let at_sync: Vec<String> = drilled
        .iter()
        .zip(&first)
        .map(|(n, s)| checksum(Site::A, &format!("{}/{n}@{s}", pool.name)))
        .collect();
    let replica_before: Vec<String> = drilled
        .iter()
        .map(|n| checksum(Site::B, &format!("{}/{n}", pool.name)))
        .collect();

    let o = b.drill_cli(&[
        "start", &pool.name, "--image", "vol-1", "--image", "vol-6", "--json",
    ]);
    eprintln!("$ drill start --json (site-b)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["site"], "site-b", "{j}");
    let imgs = j["images"].as_array().unwrap();
    assert_eq!(imgs.len(), 2, "{j}");
    for (k, n) in drilled.iter().enumerate() {
        assert_eq!(imgs[k]["image"], *n, "{j}");
        assert_eq!(imgs[k]["drill_image"], format!("csirr-drill-{n}"), "{j}");
        assert_eq!(imgs[k]["snapshot"], first[k].as_str(), "{j}");
        assert!(imgs[k]["sync_time"].is_string(), "{j}");
        assert_eq!(
            checksum(Site::B, &format!("{}/csirr-drill-{n}", pool.name)),
            at_sync[k],
            "{n}: the drill image is not the replica's sync point"
        );
        assert_eq!(
            checksum(Site::B, &format!("{}/{n}", pool.name)),
            replica_before[k],
            "{n}: the replica changed"
        );
        assert_eq!(role(&bio, n), "secondary");
    }
    // Only the named replicas were drilled.
    assert!(!image_exists_in(&bio, "csirr-drill-vol-0"));

    // A second drill, and a drill on the primary site: refused.
    let o = b.drill_cli(&["start", &pool.name, "--image", "vol-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("a drill is running"), "{}", text(&o));
    let o = a.drill_cli(&["start", &pool.name, "--image", "vol-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not a replica here"), "{}", text(&o));

    // Replication goes on during the drill.
    let snap = format!("csirr-sync.{:010}", 900);
    for (k, n) in drilled.iter().enumerate() {
        let img = Image::open(&aio, n).expect("open on site-a");
        write(&img, &[(4 * MIB, 1 << 20)], 900 + k as u64);
        img.snap_create(&snap).expect("sync snapshot");
    }
    wait_until("site-b holds the new sync point", LONG, || {
        drilled
            .iter()
            .all(|n| sync_snaps_in(&bio, n).contains(&snap))
    })
    .await;
    for (k, n) in drilled.iter().enumerate() {
        let spec = format!("{}/{n}@{snap}", pool.name);
        assert_eq!(checksum(Site::A, &spec), checksum(Site::B, &spec), "{spec}");
        assert_eq!(
            checksum(Site::B, &format!("{}/csirr-drill-{n}", pool.name)),
            at_sync[k],
            "{n}: the drill image moved"
        );
    }

    let o = b.drill_cli(&["stop", &pool.name]);
    eprintln!("$ drill stop (site-b)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("drill stop on site-b: 2 drill images removed"),
        "{}",
        text(&o)
    );
    for n in drilled {
        assert!(!image_exists_in(&bio, &format!("csirr-drill-{n}")));
    }
}

fn image_exists_in(io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>, name: &str) -> bool {
    csi_rbd_replicator::ceph::rbd::list(io)
        .expect("list")
        .iter()
        .any(|s| s.name == name)
}

/// Per-outcome p50 / max per image and the total of a site report, seconds.
fn report_times(j: &serde_json::Value, outcome: &str) -> String {
    let t = &j["timings"][outcome];
    format!(
        "{} {outcome}: per image p50 {:.2}s max {:.2}s",
        t["images"],
        t["p50_ms"].as_f64().unwrap_or(0.0) / 1000.0,
        t["max_ms"].as_f64().unwrap_or(0.0) / 1000.0
    )
}

/// A pool of many small images (`CSIRR_FAILOVER_IMAGES`, default 12; the
/// README's figure is from 100), `CSIRR_POOL_PARALLEL` (8) at once: a
/// failover to site-b with both sites up (every image clean), then back to
/// site-a with site-b failing demotions after half of them (fail point):
/// the first half clean, the rest forced. Prints the time per image and in
/// total.
#[tokio::test]
async fn failover_at_scale_clean_and_forced() {
    let n: usize = std::env::var("CSIRR_FAILOVER_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
        .max(4);
    let parallel = std::env::var("CSIRR_POOL_PARALLEL").unwrap_or_else(|_| "8".into());
    let half = n / 2;
    let pool = TestPool::new("sitescale");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let fp = format!("admin::image_demote={half}*off->return");
    let b = Sidecar::start_with_env(Site::B, &pool.args(), &[("FAILPOINTS", &fp)]).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    let mut ca = a.controller().await;
    for k in 0..n {
        let name = format!("s-{k:03}");
        drop(create_image_in(
            &aio,
            &name,
            4 * MIB,
            &[(0, 1 << 20)],
            1000 + k as u64,
        ));
        let vid = format!("{}/{name}", pool.name);
        ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
            .await
            .expect("enable");
    }
    for k in 0..n {
        wait_synced(&a, &format!("{}/s-{k:03}", pool.name), LONG).await;
    }

    let o = site_cli(
        "failover",
        &b,
        &a,
        &pool.name,
        &["--json", "--parallel", &parallel],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["totals"]["clean"], n, "{j}");
    eprintln!(
        "failover of {n} to site-b, both up, --parallel {parallel}: {}, total {:.2}s",
        report_times(&j, "clean"),
        j["duration_ms"].as_f64().unwrap() / 1000.0
    );
    for k in 0..n {
        assert_eq!(role(&bio, &format!("s-{k:03}")), "primary");
    }

    let o = site_cli(
        "failover",
        &a,
        &b,
        &pool.name,
        &["--json", "--parallel", &parallel],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["totals"]["clean"], half, "{j}");
    assert_eq!(j["totals"]["forced"], n - half, "{j}");
    eprintln!(
        "failover of {n} to site-a, site-b lost after {half}, --parallel {parallel}: {}; {}; total {:.2}s",
        report_times(&j, "clean"),
        report_times(&j, "forced"),
        j["duration_ms"].as_f64().unwrap() / 1000.0
    );
    for k in 0..n {
        assert_eq!(role(&aio, &format!("s-{k:03}")), "primary");
    }
}

/// The old site really goes away part-way through a failover: site-a's
/// fourth demotion stalls (fail point), and meanwhile site-a's sidecar is
/// killed and its OSD and monitor stopped. The three images demoted before
/// are clean, the other five are forced at their last sync point. Site-a
/// returns, site-b writes, and `failback` without `--relocate` leaves
/// site-b primary for all eight with site-a their replica: the forced ones
/// demoted there and resynced, the clean ones replicas already; a sync
/// point taken on site-b after its writes reads the same on both sites.
///
/// Stops site-a's daemons: test.sh runs `exclusive_` tests alone.
#[tokio::test]
async fn exclusive_failover_with_site_a_lost_part_way_then_failback_in_place() {
    let pool = TestPool::new("sitelost");
    let mut a = Sidecar::start_with_env(
        Site::A,
        &pool.args(),
        &[("FAILPOINTS", "admin::image_demote=3*off->sleep(60000)")],
    )
    .await;
    let b = Sidecar::start(Site::B, &["--op-timeout", "10s", "--pools", &pool.name]).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    eight_replicated(&pool, &a).await;
    let at_sync: Vec<String> = names()
        .iter()
        .map(|n| {
            let first = first_sync(&aio, n);
            checksum(Site::A, &format!("{}/{n}@{first}", pool.name))
        })
        .collect();

    let (to, from) = (
        format!("unix://{}", b.socket.display()),
        format!("unix://{}", a.socket.display()),
    );
    let mut cli = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"));
    cli.args(["failover", "--to", "site-b", "--pool", &pool.name])
        .args(["--to-endpoint", &to, "--from-endpoint", &from])
        .args(["--json", "--parallel", "1", "--timeout", "20s"]);
    let run = tokio::task::spawn_blocking(move || cli.output().expect("failover runs"));
    // Once three images are primary on site-b, the fourth demotion stalls
    // on site-a (or is about to be sent): site-a goes away.
    wait_until("three clean demotions", LONG, || {
        names()
            .iter()
            .filter(|n| role(&bio, n) == "primary")
            .count()
            >= 3
    })
    .await;
    let restore = lose_site_a(&mut a);
    let o = run.await.expect("failover thread");
    eprintln!("$ failover --to site-b, site-a lost part-way\n{}", text(&o));
    assert_eq!(o.status.code(), Some(3), "forced images: {}", text(&o));
    let j = json(&o);
    let got = outcomes(&j);
    let clean: Vec<String> = got
        .iter()
        .filter(|(_, o)| o == "clean")
        .map(|(n, _)| n.clone())
        .collect();
    let forced: Vec<String> = got
        .iter()
        .filter(|(_, o)| o == "forced")
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!((clean.len(), forced.len()), (3, 5), "{j}");
    // A connection that broke mid-call is UNAVAILABLE, not tonic's UNKNOWN.
    assert!(
        j["from_lost"]
            .as_str()
            .is_some_and(|s| s.contains("UNAVAILABLE")),
        "the report says site-a was lost and why: {j}"
    );
    for (k, n) in names().iter().enumerate() {
        assert_eq!(role(&bio, n), "primary", "{n}");
        if forced.contains(n) {
            assert_eq!(
                checksum(Site::B, &format!("{}/{n}", pool.name)),
                at_sync[k],
                "{n}: forced, at the last sync point"
            );
        }
    }

    // Site-a returns; site-b writes to a forced and a clean image.
    drop(restore);
    let a = Sidecar::start(Site::A, &pool.args()).await;
    for (k, n) in [&forced[0], &clean[0]].into_iter().enumerate() {
        let img = Image::open(&bio, n).expect("open on site-b");
        write(&img, &[(2 * MIB, 1 << 20)], 900 + k as u64);
    }
    let o = site_cli("failback", &a, &b, &pool.name, &["--json", "--wait", "2m"]);
    eprintln!(
        "$ failback --to site-a --json (no --relocate)\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    for (n, outcome) in outcomes(&j) {
        let want: &[&str] = if forced.contains(&n) {
            &["resynced"]
        } else if clean.contains(&n) {
            &["already_replica", "resynced"]
        } else {
            &["not_replicated"]
        };
        assert!(want.contains(&outcome.as_str()), "{n}: {outcome}: {j}");
    }
    // Site-b stays primary; a sync point taken there after its writes
    // reaches site-a and reads the same on both sites.
    let snap = format!("csirr-sync.{:010}", 990);
    for n in names() {
        assert_eq!(role(&bio, &n), "primary", "{n}");
        assert_eq!(role(&aio, &n), "secondary", "{n}");
        let head = checksum(Site::B, &format!("{}/{n}", pool.name));
        Image::open(&bio, &n)
            .expect("open on site-b")
            .snap_create(&snap)
            .expect("sync snapshot on site-b");
        let got =
            converged_after(&pool, Site::B, &n, Some(&format!("csirr-sync.{:010}", 989))).await;
        assert_eq!(got, snap, "{n}");
        assert_eq!(
            checksum(Site::A, &format!("{}/{n}@{snap}", pool.name)),
            head,
            "{n}: site-a's replica is not site-b's head"
        );
    }
    drop(a);
}
