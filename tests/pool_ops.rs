//! Pool-scale operations (issue 16) against the real pair: the admin API
//! (`csirr.admin.v1.Admin`, tonic client) and the `pool` command on a
//! pool of three replicated images: status counts and per-image lines, bad
//! input that changes nothing, a planned relocation of the whole pool
//! (pool demote on site-a, pool promote on site-b) with the data written on
//! site-b replicating back, and a forced pool promotion while site-a's
//! sidecar is stopped. Checksums with the native `rbd export`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use csi_rbd_replicator::ceph::Image;
use csi_rbd_replicator::grpc::proto::admin as apb;
use tonic::Code;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(120);
const IMAGES: [&str; 3] = ["app-0", "app-1", "app-2"];

/// Three images on site-a in `pool`, each replicated and synced once;
/// returns the volume IDs.
async fn three_replicated(pool: &TestPool, a: &Sidecar) -> Vec<String> {
    let aio = pool.ioctx(Site::A);
    let mut ca = a.controller().await;
    let mut vids = Vec::new();
    for (k, name) in IMAGES.iter().enumerate() {
        let off = k as u64 * 4 * MIB;
        drop(create_image_in(
            &aio,
            name,
            32 * MIB,
            &[(off, 2 << 20), (20 * MIB, 1 << 20)],
            10 + k as u64,
        ));
        let vid = format!("{}/{name}", pool.name);
        ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
            .await
            .expect("enable");
        vids.push(vid);
    }
    for vid in &vids {
        wait_synced(a, vid, LONG).await;
    }
    vids
}

/// The pool's status from the admin API.
async fn pool_status(sc: &Sidecar, pool: &str) -> apb::PoolStatusResponse {
    sc.admin_api()
        .await
        .pool_status(apb::PoolStatusRequest {
            pool: pool.into(),
            namespace: String::new(),
            default_namespace_only: false,
        })
        .await
        .expect("PoolStatus")
        .into_inner()
}

/// Polls PoolStatus until `done` holds.
async fn status_until(
    sc: &Sidecar,
    pool: &str,
    what: &str,
    done: impl Fn(&apb::PoolStatusResponse) -> bool,
) -> apb::PoolStatusResponse {
    let done = &done;
    eventually(what, LONG, Duration::from_millis(300), || async move {
        let s = pool_status(sc, pool).await;
        if done(&s) {
            Ok(s)
        } else {
            Err(format!("{s:#?}"))
        }
    })
    .await
}

fn roles(io: &std::sync::Arc<csi_rbd_replicator::ceph::IoCtx>) -> Vec<String> {
    IMAGES
        .iter()
        .map(|n| {
            registry_record(io, n).map_or("none".into(), |r| r["role"].as_str().unwrap().into())
        })
        .collect()
}

fn results_of(j: &serde_json::Value) -> Vec<(String, String, String, String)> {
    j["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results: {j}"))
        .iter()
        .map(|r| {
            (
                r["image"].as_str().unwrap().to_string(),
                r["role_before"].as_str().unwrap().to_string(),
                r["role_after"].as_str().unwrap().to_string(),
                r["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Status counts and image lines; bad input changes nothing; pool demote on
/// site-a then pool promote on site-b relocate the whole pool with no data
/// loss; data written on site-b then replicates back to site-a.
#[tokio::test]
async fn pool_status_and_planned_relocation_of_a_whole_pool() {
    let pool = TestPool::new("poolops");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    three_replicated(&pool, &a).await;

    // Status on site-a: three primaries, each replica idle, each line with
    // the sync point both sites hold and the seconds behind.
    let s = status_until(&a, &pool.name, "3 idle", |s| {
        s.states.get("idle") == Some(&3)
    })
    .await;
    assert_eq!(s.images, 3, "{s:#?}");
    assert_eq!(s.health, apb::Health::Ok as i32, "{s:#?}");
    assert_eq!(s.roles.get("primary"), Some(&3), "{s:#?}");
    let names: Vec<&str> = s.image_statuses.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, IMAGES);
    for i in &s.image_statuses {
        let first = first_sync(&aio, &i.name);
        // The replica's snapshot follows its report of the sync point.
        wait_replica_snap(&pool.name, &i.name, &first, LONG).await;
        assert_eq!(i.role, "primary");
        assert_eq!(i.state, "idle");
        let last = i.last_sync.as_ref().expect("last sync");
        assert_eq!(last.snapshot, first, "{i:#?}");
        assert!(i.seconds_behind.is_some(), "{i:#?}");
        assert!(
            i.description.contains(&format!("behind ({first})")),
            "{i:#?}"
        );
    }
    // Site-b sees three replicas.
    let sb = pool_status(&b, &pool.name).await;
    assert_eq!(sb.roles.get("secondary"), Some(&3), "{sb:#?}");

    // The command: text like `rbd mirror pool status --verbose`, and JSON.
    let o = a.pool_cli(&["status", &pool.name]);
    eprintln!("$ pool status (site-a)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        format!(
            "pool {}:\nhealth: OK\nimages: 3 total (3 primary)\n    3 idle\n",
            pool.name
        ),
        "\nIMAGES\napp-0:\n  role:           primary\n  health:         OK\n".to_string(),
        "app-2:\n".to_string(),
        "  seconds behind: ".to_string(),
    ] {
        assert!(out.contains(&want), "{want:?} not in:\n{out}");
    }
    let j = json(&a.pool_cli(&["status", &pool.name, "--json"]));
    assert_eq!(j["images"], 3, "{j}");
    assert_eq!(j["image_statuses"][1]["name"], "app-1", "{j}");
    assert_eq!(j["image_statuses"][1]["state"], "idle", "{j}");

    // Bad input: the right code, nothing changed.
    let mut api = a.admin_api().await;
    let e = api
        .pool_status(apb::PoolStatusRequest::default())
        .await
        .expect_err("empty pool name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = api
        .pool_status(apb::PoolStatusRequest {
            pool: "no-such-pool".into(),
            namespace: String::new(),
            default_namespace_only: false,
        })
        .await
        .expect_err("unknown pool");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = api
        .pool_status(apb::PoolStatusRequest {
            pool: pool.name.clone(),
            namespace: "no-such-ns".into(),
            default_namespace_only: false,
        })
        .await
        .expect_err("unknown namespace");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = api
        .pool_demote(apb::PoolDemoteRequest {
            pool: "no-such-pool".into(),
            ..Default::default()
        })
        .await
        .expect_err("demote of an unknown pool");
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = api
        .pool_promote(apb::PoolPromoteRequest {
            pool: String::new(),
            force: true,
            ..Default::default()
        })
        .await
        .expect_err("promote of an empty pool name");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let o = a.pool_cli(&["demote", "no-such-pool", "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        json(&o)["error"].as_str().unwrap().starts_with("NOT_FOUND"),
        "{}",
        text(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .args([
            "pool",
            "status",
            &pool.name,
            "--endpoint",
            "unix:///nonexistent/x.sock",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(roles(&aio), ["primary"; 3]);
    assert_eq!(roles(&bio), ["secondary"; 3]);

    // Planned relocation of the whole pool: demote site-a, promote site-b.
    let a_last: Vec<String> = IMAGES
        .iter()
        .map(|n| checksum(Site::A, &format!("{}/{n}", pool.name)))
        .collect();
    let o = a.pool_cli(&["demote", &pool.name, "--json"]);
    eprintln!("$ pool demote --json (site-a)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let mut got = results_of(&j);
    got.sort();
    for (k, r) in got.iter().enumerate() {
        assert_eq!(
            r,
            &(
                IMAGES[k].into(),
                "primary".into(),
                "demoted".into(),
                "changed".into()
            ),
            "{j}"
        );
    }
    assert_eq!(j["summary"]["changed"], 3, "{j}");
    assert_eq!(roles(&aio), ["demoted"; 3]);
    // Idempotent: the second demotion changes nothing. Run on a terminal
    // (util-linux `script` gives it a pty): a progress line follows the
    // images.
    let cmd = format!(
        "{} pool demote {} --endpoint unix://{}",
        env!("CARGO_BIN_EXE_csi-rbd-replicator"),
        pool.name,
        a.socket.display()
    );
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .expect("script runs");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("\x1b[Kpool demote: 3/3 done, 0 failed (last: app-"),
        "{t:?}"
    );
    assert!(t.contains("0 changed, 3 unchanged"), "{t}");

    let o = b.pool_cli(&["promote", &pool.name, "--wait", "2m"]);
    eprintln!("$ pool promote (site-b)\n{}", text(&o));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("Promoted 3 of 3 images: 3 changed, 0 unchanged, 0 skipped, 0 failed"),
        "{t}"
    );
    for n in IMAGES {
        assert!(
            t.contains(&format!("  {n}: secondary -> primary, changed (")),
            "{t}"
        );
    }
    assert_eq!(roles(&bio), ["primary"; 3]);
    for (k, n) in IMAGES.iter().enumerate() {
        assert_eq!(
            checksum(Site::B, &format!("{}/{n}", pool.name)),
            a_last[k],
            "{n}: site-b does not hold site-a's last write"
        );
    }

    // Site-b writes; a sync point of each image reaches site-a, which
    // became a replica by itself; both read the same at it.
    let snap = format!("csirr-sync.{:010}", 900);
    for (k, n) in IMAGES.iter().enumerate() {
        let img = Image::open(&bio, n).expect("open on site-b");
        write(&img, &[(8 * MIB + k as u64 * MIB, 1 << 20)], 40 + k as u64);
        img.snap_create(&snap).expect("sync snapshot");
    }
    wait_until("site-a holds site-b's sync point", LONG, || {
        IMAGES
            .iter()
            .all(|n| sync_snaps_in(&aio, n).contains(&snap))
    })
    .await;
    for n in IMAGES {
        let spec = format!("{}/{n}@{snap}", pool.name);
        assert_eq!(checksum(Site::B, &spec), checksum(Site::A, &spec), "{spec}");
    }
    assert_eq!(roles(&aio), ["secondary"; 3]);
    let sb = status_until(&b, &pool.name, "3 primaries at the new sync point", |s| {
        s.roles.get("primary") == Some(&3)
            && s.image_statuses
                .iter()
                .all(|i| i.last_sync.as_ref().is_some_and(|l| l.snapshot == snap))
    })
    .await;
    assert_eq!(sb.images, 3);
}

/// Site-a's sidecar is stopped (its cluster is up and its images primary):
/// a planned pool promotion on site-b fails for every image and changes
/// nothing (exit 1); with --force every image is promoted at its last
/// complete sync point (exit 0).
#[tokio::test]
async fn pool_promote_force_while_the_other_sidecar_is_stopped() {
    let pool = TestPool::new("poolforce");
    let mut a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (aio, bio) = (pool.ioctx(Site::A), pool.ioctx(Site::B));
    three_replicated(&pool, &a).await;
    // The sync point site-b holds, as site-a has it.
    let at_sync: Vec<String> = IMAGES
        .iter()
        .map(|n| {
            let first = first_sync(&aio, n);
            checksum(Site::A, &format!("{}/{n}@{first}", pool.name))
        })
        .collect();
    // Writes after it that never reach site-b.
    for (k, n) in IMAGES.iter().enumerate() {
        let img = Image::open(&aio, n).expect("open on site-a");
        write(&img, &[(24 * MIB, 1 << 20)], 70 + k as u64);
    }
    a.stop();

    let o = b.pool_cli(&["promote", &pool.name, "--wait", "1s"]);
    eprintln!(
        "$ pool promote, site-a's sidecar stopped (site-b)\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(
        t.contains("0 changed, 0 unchanged, 0 skipped, 3 failed"),
        "{t}"
    );
    let o = b.pool_cli(&["promote", &pool.name, "--wait", "1s", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let j = json(&o);
    for r in j["results"].as_array().unwrap() {
        assert_eq!(r["outcome"], "failed", "{j}");
        assert_eq!(r["code"], "FAILED_PRECONDITION", "{j}");
        assert_eq!(r["role_after"], "secondary", "{j}");
    }
    assert_eq!(j["summary"]["failed"], 3, "{j}");
    assert_eq!(roles(&bio), ["secondary"; 3]);

    let o = b.pool_cli(&[
        "promote",
        &pool.name,
        "--force",
        "--parallel",
        "2",
        "--json",
    ]);
    eprintln!(
        "$ pool promote --force --parallel 2 --json (site-b)\n{}",
        text(&o)
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    assert_eq!(j["parallel"], 2, "{j}");
    let mut got = results_of(&j);
    got.sort();
    for (k, r) in got.iter().enumerate() {
        assert_eq!(
            r,
            &(
                IMAGES[k].into(),
                "secondary".into(),
                "primary".into(),
                "changed".into()
            ),
            "{j}"
        );
    }
    assert_eq!(roles(&bio), ["primary"; 3]);
    for (k, n) in IMAGES.iter().enumerate() {
        assert_eq!(
            checksum(Site::B, &format!("{}/{n}", pool.name)),
            at_sync[k],
            "{n}: site-b is not at the last complete sync point"
        );
    }
    // Promoting again: unchanged.
    let o = b.pool_cli(&["promote", &pool.name, "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("0 changed, 3 unchanged"),
        "{}",
        text(&o)
    );
}

/// Per-image p50 and max and the total of a pool operation's JSON report,
/// in seconds.
fn timings(j: &serde_json::Value) -> (f64, f64, f64) {
    let mut ms: Vec<u64> = j["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["duration_ms"].as_u64().unwrap())
        .collect();
    ms.sort_unstable();
    let s = |v: u64| v as f64 / 1000.0;
    (
        s(ms[ms.len() / 2]),
        s(*ms.last().unwrap()),
        s(j["summary"]["duration_ms"].as_u64().unwrap()),
    )
}

/// Asserts that every image of a pool operation's JSON report went from
/// `before` to `after`, and returns the report.
fn all_changed(o: &std::process::Output, n: usize, before: &str, after: &str) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", text(o));
    let j = json(o);
    let results = j["results"].as_array().unwrap();
    assert_eq!(results.len(), n, "{j}");
    for r in results {
        assert_eq!(
            (
                r["role_before"].as_str(),
                r["role_after"].as_str(),
                r["outcome"].as_str()
            ),
            (Some(before), Some(after), Some("changed")),
            "{r}"
        );
    }
    assert_eq!(j["summary"]["changed"], n, "{j}");
    j
}

/// A pool of many small images (`CSIRR_POOL_IMAGES`, default 12; the
/// README's figure is from 100), `CSIRR_POOL_PARALLEL` (default 8) at once: a planned relocation site-a -> site-b with
/// the pool commands, then a forced failover back to site-a with site-b's
/// sidecar stopped. Prints the time per image and in total; checks roles
/// and, on a sample, that no data was lost.
#[tokio::test]
async fn pool_relocation_and_forced_failover_at_scale() {
    let n: usize = std::env::var("CSIRR_POOL_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12)
        .max(3);
    let parallel = std::env::var("CSIRR_POOL_PARALLEL").unwrap_or_else(|_| "8".into());
    let pool = TestPool::new("poolscale");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let mut b = Sidecar::start(Site::B, &pool.args()).await;
    let aio = pool.ioctx(Site::A);
    let names: Vec<String> = (0..n).map(|k| format!("vol-{k:03}")).collect();
    let mut ca = a.controller().await;
    let t0 = Instant::now();
    for (k, name) in names.iter().enumerate() {
        drop(create_image_in(
            &aio,
            name,
            4 * MIB,
            &[(0, 1 << 20)],
            100 + k as u64,
        ));
        let vid = format!("{}/{name}", pool.name);
        ca.enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
            .await
            .expect("enable");
    }
    let setup = t0.elapsed();
    status_until(&a, &pool.name, "every image idle", |s| {
        s.states.get("idle") == Some(&(n as u32))
    })
    .await;
    eprintln!(
        "{n} images: created and enabled in {:.1}s, all replicated after {:.1}s",
        setup.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let sample = [0, n / 2, n - 1];
    let a_last: Vec<String> = sample
        .iter()
        .map(|k| checksum(Site::A, &format!("{}/{}", pool.name, names[*k])))
        .collect();

    // Planned relocation of the pool.
    let j = all_changed(
        &a.pool_cli(&["demote", &pool.name, "--json", "--parallel", &parallel]),
        n,
        "primary",
        "demoted",
    );
    let (p50, max, total) = timings(&j);
    eprintln!("pool demote of {n}: per image p50 {p50:.2}s max {max:.2}s, total {total:.2}s");
    let j = all_changed(
        &b.pool_cli(&[
            "promote",
            &pool.name,
            "--wait",
            "2m",
            "--json",
            "--parallel",
            &parallel,
        ]),
        n,
        "secondary",
        "primary",
    );
    let (p50, max, total) = timings(&j);
    eprintln!(
        "pool promote (planned) of {n}: per image p50 {p50:.2}s max {max:.2}s, total {total:.2}s"
    );
    for (i, k) in sample.iter().enumerate() {
        let spec = format!("{}/{}", pool.name, names[*k]);
        assert_eq!(
            checksum(Site::B, &spec),
            a_last[i],
            "{spec} after relocation"
        );
    }

    // Site-a turns into replicas of site-b by itself; then site-b is lost
    // (its sidecar stops) and site-a takes over by force.
    status_until(&a, &pool.name, "every image a replica on site-a", |s| {
        s.roles.get("secondary") == Some(&(n as u32))
    })
    .await;
    b.stop();
    let j = all_changed(
        &a.pool_cli(&[
            "promote",
            &pool.name,
            "--force",
            "--json",
            "--parallel",
            &parallel,
        ]),
        n,
        "secondary",
        "primary",
    );
    let (p50, max, total) = timings(&j);
    eprintln!(
        "pool promote --force of {n}: per image p50 {p50:.2}s max {max:.2}s, total {total:.2}s"
    );
    for (i, k) in sample.iter().enumerate() {
        let spec = format!("{}/{}", pool.name, names[*k]);
        assert_eq!(
            checksum(Site::A, &spec),
            a_last[i],
            "{spec} after the failover"
        );
    }
}
