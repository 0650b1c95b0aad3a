//! The sidecar touches the clusters only as the least-privilege users the
//! README names, never as `client.admin`: its own CSI user (with exactly the
//! README's caps) for local work, and the mirror peer user of `rbd mirror
//! pool peer bootstrap` for the peer. Checked from the clusters' side: each
//! connection the sidecar logs ("connected to cluster", with its instance
//! id) is looked up among the monitor's sessions, which name the cephx
//! entity that authenticated and its caps. Also: no client admin socket,
//! whatever a ceph.conf asks for.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use common::*;
use csi_rbd_replicator::ceph::{Cluster, ConnectConfig};
use csi_rbd_replicator::grpc::proto::replication::get_volume_replication_info_response::Status as Health;

const CSI_USER: &str = "csi-rbd-provisioner";
/// The user `rbd mirror pool peer bootstrap create` makes.
const PEER_USER: &str = "rbd-mirror-peer";
const PEER_MON_CAPS: &str = "profile rbd-mirror-peer";

/// The caps the README's **Credentials** paragraph gives the CSI user:
/// `mon '...'`, `osd '...'`, `mgr '...'` lines of its code block.
fn readme_caps() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let after = readme
        .split("**Credentials.**")
        .nth(1)
        .expect("a **Credentials.** paragraph in README.md");
    let block = after.split("```").nth(1).expect("a code block of caps");
    let caps: BTreeMap<String, String> = block
        .lines()
        .filter_map(|l| {
            let (service, rest) = l.trim().split_once(' ')?;
            let caps = rest.trim().strip_prefix('\'')?.strip_suffix('\'')?;
            Some((service.to_string(), caps.to_string()))
        })
        .collect();
    assert_eq!(
        caps.keys().map(String::as_str).collect::<Vec<_>>(),
        ["mgr", "mon", "osd"],
        "README caps block: {block}"
    );
    caps
}

/// `ceph auth get` of `entity` on a site: its caps.
fn auth_caps(site: Site, entity: &str) -> BTreeMap<String, String> {
    let out = ceph_ok(site, &["auth", "get", entity, "-f", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("auth get json");
    v[0]["caps"]
        .as_object()
        .expect("caps")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// The `key = ...` of a keyring file.
fn keyring_key(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = ").map(str::to_string))
        .expect("a key in the keyring")
}

#[test]
fn the_suite_runs_sidecars_as_the_csi_user_with_exactly_the_readme_caps() {
    let want = readme_caps();
    for site in [Site::A, Site::B] {
        // What every test sidecar and CLI gets (`--secret-dir`, and the
        // requests' secrets): the CSI user, not admin.
        let dir = site.secret_dir();
        let user = std::fs::read_to_string(dir.join("userID")).unwrap();
        let key = std::fs::read_to_string(dir.join("userKey")).unwrap();
        assert_eq!(user.trim(), CSI_USER, "{}", site.id());
        assert_ne!(
            key.trim(),
            keyring_key(&site.keyring()),
            "{}: the sidecar's secret is the admin key",
            site.id()
        );
        assert_eq!(secrets(site)["userID"], user);
        // And that user has exactly the README's caps, nothing more.
        assert_eq!(
            auth_caps(site, &format!("client.{CSI_USER}")),
            want,
            "{}: caps of client.{CSI_USER} differ from the README's",
            site.id()
        );
    }
}

/// One "connected to cluster" log line.
#[derive(Debug)]
struct Connection {
    mon_host: String,
    user: String,
    instance_id: u64,
}

/// The connections a log reports.
fn connections(log: &str) -> Vec<Connection> {
    log.lines()
        .filter(|l| l.contains("connected to cluster"))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .unwrap_or_else(|| panic!("no {name}= in {l}"))
                    .to_string()
            };
            Connection {
                mon_host: field("mon_host"),
                user: field("user"),
                instance_id: field("instance_id").parse().expect("instance_id"),
            }
        })
        .collect()
}

/// The site whose monitor `mon_host` names.
fn site_of(mon_host: &str) -> Site {
    if mon_host.contains(":3300") || mon_host.contains(":6789") {
        Site::A
    } else if mon_host.contains(":3301") || mon_host.contains(":6790") {
        Site::B
    } else {
        panic!("mon_host {mon_host} is neither site")
    }
}

/// The monitor's sessions on a site: global id -> (entity, mon caps).
fn sessions(site: Site) -> BTreeMap<u64, (String, String)> {
    let out = ceph_ok(site, &["tell", "mon.a", "sessions", "-f", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("sessions json");
    v.as_array()
        .expect("a list of sessions")
        .iter()
        .map(|s| {
            (
                s["global_id"].as_u64().unwrap_or(0),
                (
                    s["entity_name"].as_str().unwrap_or_default().to_string(),
                    s["caps"]["text"].as_str().unwrap_or_default().to_string(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn sidecars_and_the_omap_generator_connect_only_as_least_privilege_users() {
    let pool = TestPool::new("caps");
    let a = Sidecar::start(Site::A, &pool.args()).await;
    let b = Sidecar::start(Site::B, &pool.args()).await;
    let (vol, _img) =
        create_csi_volume_in(&pool.ioctx(Site::A), Site::A, 8 << 20, &[(0, 64 << 10)]);
    a.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vol.handle, &[]))
        .await
        .expect("enable");
    let info = wait_synced(&a, &vol.handle, Duration::from_secs(120)).await;
    assert_eq!(info.status, Health::Healthy as i32, "{info:?}");

    let readme_mon = readme_caps()["mon"].clone();
    let live = [(Site::A, sessions(Site::A)), (Site::B, sessions(Site::B))];
    let mut seen = Vec::new();
    for sc in [&a, &b] {
        let conns = connections(&sc.log_text());
        assert!(!conns.is_empty(), "{} logged no connection", sc.site.id());
        for c in conns {
            assert!(
                c.user == CSI_USER || c.user == PEER_USER,
                "sidecar {} connected as client.{}: {c:?}",
                sc.site.id(),
                c.user
            );
            let site = site_of(&c.mon_host);
            let Some((entity, caps)) = live
                .iter()
                .find(|(s, _)| *s == site)
                .and_then(|(_, m)| m.get(&c.instance_id))
            else {
                // Closed since (a dropped connection); the others decide.
                continue;
            };
            // The cluster's word: who authenticated, with which caps.
            assert_eq!(entity, &format!("client.{}", c.user), "{c:?}");
            let want = if c.user == CSI_USER {
                &readme_mon
            } else {
                PEER_MON_CAPS
            };
            assert_eq!(caps, want, "mon caps of {c:?}");
            seen.push((sc.site, site, c.user));
        }
    }
    // Each sidecar is live on its own cluster as the CSI user, and site-b's
    // replayer on site-a as the peer user.
    for (sidecar, cluster, user) in [
        (Site::A, Site::A, CSI_USER),
        (Site::B, Site::B, CSI_USER),
        (Site::B, Site::A, PEER_USER),
    ] {
        assert!(
            seen.iter()
                .any(|(s, c, u)| *s == sidecar && *c == cluster && u == user),
            "no live session of sidecar {} on {} as client.{user}; seen {seen:?}",
            sidecar.id(),
            cluster.id()
        );
    }

    // The omap generator, run as the tests run it (`common::cli`'s flags).
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("pvs.yaml");
    std::fs::write(&empty, "apiVersion: v1\nkind: List\nitems: []\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .arg("omap-generate")
        .arg("--csi-config")
        .arg(env("CSIRR_CSI_CONFIG"))
        .arg("--cluster-mapping")
        .arg(env("CSIRR_CLUSTER_MAPPING"))
        .args(["--cluster-id", Site::B.id()])
        .arg("--secret-dir")
        .arg(Site::B.secret_dir())
        .args(["--drivername", DRIVER, "--dry-run", "--pv"])
        .arg(&empty)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let conns = connections(&stderr);
    assert_eq!(conns.len(), 1, "{}", text(&out));
    assert_eq!(conns[0].user, CSI_USER, "{}", text(&out));
}

#[test]
fn no_client_admin_socket_even_when_ceph_conf_asks_for_one() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ceph.conf");
    std::fs::write(
        &conf,
        format!(
            "[global]\nmon_host = {}\n[client]\nadmin_socket = {}/$name.$pid.asok\n",
            env("CSIRR_SITE_A_MON"),
            dir.path().display()
        ),
    )
    .unwrap();
    let key = std::fs::read_to_string(Site::A.secret_dir().join("userKey")).unwrap();
    let cluster = Cluster::connect(&ConnectConfig {
        conf_file: Some(conf.to_str().unwrap().to_string()),
        user: CSI_USER.into(),
        key: Some(key.trim().to_string().into()),
        op_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .expect("connect as the CSI user");
    cluster.ping().expect("ping");
    let sockets: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".asok"))
        .collect();
    assert!(
        sockets.is_empty(),
        "client admin socket created: {sockets:?}"
    );
}
