//! `csi-rbd-replicator status` (the built binary) and the sidecars'
//! `/metrics` and `/healthz` against the real pair: after a sync the primary
//! and the replica report their role and last sync point; a silent peer or a
//! passed RPO turns the exit code to 1; an unreadable pool to 2; the metrics
//! show the RPCs, the local cluster and the per-image gauges, and drop an
//! image's series when it leaves the registry. Own pool.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const MIB: u64 = 1 << 20;

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs `status ARGS` as the CSI user of `site`.
fn status(site: Site, args: &[&str]) -> Output {
    cli("status", site, args)
}

/// `GET path` on 127.0.0.1:`port`: the status line and the body.
async fn get(port: u16, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics port");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let resp = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Polls `/metrics` until every line of `want` is in it.
async fn wait_metrics(port: u16, want: &[String], timeout: Duration) -> String {
    let what = format!("the metrics on port {port} to show {want:?}");
    eventually(&what, timeout, Duration::from_millis(300), || async move {
        let (_, body) = get(port, "/metrics").await;
        if want.iter().all(|w| body.contains(w.as_str())) {
            return Ok(body);
        }
        let missing: Vec<_> = want.iter().filter(|w| !body.contains(w.as_str())).collect();
        Err(format!("{missing:?} missing from:\n{body}"))
    })
    .await
}

#[tokio::test]
async fn status_and_metrics_after_a_sync() {
    let pool = TestPool::new("status");
    let (port_a, port_b) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let a = Sidecar::start(
        Site::A,
        &[
            "--no-replayer",
            "--pools",
            &pool.name,
            "--metrics-address",
            &addr_a,
        ],
    )
    .await;
    let b = Sidecar::start(
        Site::B,
        &["--pools", &pool.name, "--metrics-address", &addr_b],
    )
    .await;
    let name = "img";
    let io = pool.ioctx(Site::A);
    let img = create_image_in(&io, name, 32 * MIB, &[(0, 4 << 20), (20 * MIB, 1 << 20)], 1);
    let image_id = img.id().expect("image id");
    drop(img);
    let vid = format!("{}/{name}", pool.name);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1m")]))
        .await
        .expect("enable");
    wait_synced(&a, &vid, Duration::from_secs(120)).await;
    let first = first_sync(&io, name);

    // (a) The primary's side, verbose text: role, replica, last sync point.
    let o = status(Site::A, &["--pool", &pool.name, "--verbose"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        format!(
            "pool {}:\nhealth: OK\nimages: 1 total (1 primary)\n    1 idle\n",
            pool.name
        ),
        "\nIMAGES\nimg:\n  role:           primary\n  health:         OK\n".to_string(),
        "  state:          idle\n".to_string(),
        "  schedule:       every 60s, RPO threshold 120s\n".to_string(),
        format!("  last sync:      {first} at "),
        "  replica ".to_string(),
        "    last report:    ".to_string(),
    ] {
        assert!(out.contains(&want), "missing {want:?} in {}", text(&o));
    }

    // The same as JSON.
    let o = status(Site::A, &["--pool", &pool.name, "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j = json(&o);
    let p = &j["pools"][0];
    assert_eq!(p["pool"], pool.name.as_str(), "{j}");
    assert_eq!(p["summary"]["health"], "OK", "{j}");
    assert_eq!(p["summary"]["states"]["idle"], 1, "{j}");
    let i = &p["images"][0];
    assert_eq!(i["name"], name, "{j}");
    assert_eq!(i["image_id"], image_id.as_str(), "{j}");
    assert_eq!(i["role"], "primary", "{j}");
    assert_eq!(i["state"], "idle", "{j}");
    assert_eq!(i["bytes_pending"], 0, "{j}");
    assert!(i["seconds_behind"].as_u64().is_some(), "{j}");
    assert_eq!(i["last_sync"]["snap_name"], first.as_str(), "{j}");
    assert!(i["last_sync"]["bytes"].as_u64() >= Some(5 * MIB), "{j}");
    assert_eq!(i["replicas"][0]["state"], "idle", "{j}");
    assert_eq!(j["errors"], serde_json::json!([]), "{j}");

    // The replica's side: its own record.
    let o = status(Site::B, &["--pool", &pool.name, "--verbose"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "images: 1 total (1 secondary)\n".to_string(),
        "img:\n  role:           secondary\n".to_string(),
        format!("  last sync:      {first} at "),
        format!("  primary:        image {image_id} on cluster "),
    ] {
        assert!(out.contains(&want), "missing {want:?} in {}", text(&o));
    }

    // Every pool: this one is among them.
    let o = status(Site::A, &[]);
    assert!(
        matches!(o.status.code(), Some(0 | 1)),
        "reading every pool: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("pool {}:\n", pool.name)),
        "{}",
        text(&o)
    );

    // An RPO threshold below the lag: WARNING, exit code 1.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let o = status(Site::A, &["--pool", &pool.name, "--rpo-factor", "0.001"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = status(
        Site::A,
        &["--pool", &pool.name, "--rpo-factor", "0.001", "-v"],
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("  description:    RPO exceeded: "),
        "{}",
        text(&o)
    );

    // A pool that does not exist: exit code 2, the error in the JSON.
    let missing = unique("no-such-pool");
    let o = status(Site::A, &["--pool", &missing, "--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert_eq!(
        json(&o)["errors"][0]["pool"],
        missing.as_str(),
        "{}",
        text(&o)
    );

    // (b) Metrics. Site-a served the RPCs; both sides' collectors feed the
    // per-image gauges from their registries.
    let labels = format!("pool=\"{}\",namespace=\"\",image=\"{name}\"", pool.name);
    let body = wait_metrics(
        port_a,
        &[
            "csi_rbd_replicator_rpc_requests_total{method=\"replication.Controller/EnableVolumeReplication\",code=\"OK\"} 1".to_string(),
            "csi_rbd_replicator_rpc_duration_seconds_count{method=\"replication.Controller/EnableVolumeReplication\"} 1".to_string(),
            "csi_rbd_replicator_rpc_requests_total{method=\"replication.Controller/GetVolumeReplicationInfo\",code=\"OK\"}".to_string(),
            "csi_rbd_replicator_rpc_requests_total{method=\"identity.Identity/Probe\",code=\"OK\"}".to_string(),
            "csi_rbd_replicator_local_cluster_up 1".to_string(),
            format!("csi_rbd_replicator_replica_state{{{labels},state=\"idle\"}} 1"),
            format!("csi_rbd_replicator_replica_state{{{labels},state=\"syncing\"}} 0"),
            format!("csi_rbd_replicator_replica_lag_seconds{{{labels}}} "),
            format!("csi_rbd_replicator_replica_pending_bytes{{{labels}}} 0"),
            format!("csi_rbd_replicator_replica_rpo_threshold_seconds{{{labels}}} 120.0"),
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(body.ends_with("# EOF\n"), "{body}");
    wait_metrics(
        port_b,
        &[
            "csi_rbd_replicator_local_cluster_up 1".to_string(),
            format!("csi_rbd_replicator_replica_state{{{labels},state=\"idle\"}} 1"),
            format!("csi_rbd_replicator_replica_lag_seconds{{{labels}}} "),
            // The replayer's own counters.
            format!("csi_rbd_replicator_syncs_total{{{labels},result=\"ok\"}} 1"),
            format!("csi_rbd_replicator_sync_bytes_total{{{labels}}} "),
            format!(
                "csi_rbd_replicator_sync_duration_seconds_count{{pool=\"{}\",namespace=\"\"}} 1",
                pool.name
            ),
        ],
        Duration::from_secs(30),
    )
    .await;
    let (line, body) = get(port_b, "/healthz").await;
    assert!(line.contains(" 200 "), "{line}: {body}");
    assert_eq!(body, "ok\n");
    let (line, _) = get(port_b, "/nothing-here").await;
    assert!(line.contains(" 404 "), "{line}");

    // A silent peer: with site-b stopped, its status ages past --stale-after.
    drop(b);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let o = status(
        Site::A,
        &["--pool", &pool.name, "--stale-after", "2s", "--verbose"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("health: WARNING\n"), "{}", text(&o));
    assert!(out.contains("  state:          stopped\n"), "{}", text(&o));
    assert!(
        out.contains("  description:    replica silent for "),
        "{}",
        text(&o)
    );

    // The image leaves the registry: its series go away on the next pass.
    io.omap_rm_keys(
        "csi-rbd-replicator.registry",
        &[&format!("image.{image_id}")],
    )
    .expect("remove the registry record");
    let (what, labels) = ("the removed image's series to go", &labels);
    let body = eventually(
        what,
        Duration::from_secs(30),
        Duration::from_millis(300),
        || async move {
            let (_, body) = get(port_a, "/metrics").await;
            if body.contains(labels) {
                Err(body)
            } else {
                Ok(body)
            }
        },
    )
    .await;
    assert!(
        body.contains("csi_rbd_replicator_local_cluster_up 1"),
        "{body}"
    );
}

/// `--metrics-address` that cannot be bound stops `serve` with a clear error.
#[tokio::test]
async fn unusable_metrics_address_is_refused() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let o = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .arg("serve")
        .arg("--endpoint")
        .arg(format!("unix://{}/s.sock", dir.path().display()))
        .args(["--drivername", DRIVER])
        .arg("--csi-config")
        .arg(env("CSIRR_CSI_CONFIG"))
        .args(["--cluster-id", Site::A.id()])
        .arg("--secret-dir")
        .arg(Site::A.secret_dir())
        .args(["--no-replayer", "--metrics-address", &addr])
        .output()
        .expect("serve runs");
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("--metrics-address {addr}:")),
        "{}",
        text(&o)
    );
}
