//! The deployment manifests agree with each other and with the binary: the
//! socket our sidecar serves is the one the csi-addons sidecar connects to,
//! the one it forwards to is ceph-csi's moved csi-addons endpoint,
//! the driver name is the VolumeReplicationClass's provisioner, every mount
//! names a volume, the secret directory is where the Secret is mounted, the
//! VolumeReplicationClass parameters parse, and RBAC grants what
//! `--watch-pvs` uses. Pure file checks: no cluster needed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use csi_rbd_replicator::csi::params::ReplicationParams;
use csi_rbd_replicator::grpc::server::Endpoint;
use serde_yaml::Value;

const OURS: &str = "csi-rbd-replicator";
const CSI_ADDONS: &str = "csi-addons";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).expect("valid YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string in {v:?}"))
}

fn seq<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v[key].as_sequence().map(Vec::as_slice).unwrap_or(&[])
}

/// A container's env as name -> value (fieldRef values are left out).
fn env_of(c: &Value) -> HashMap<String, String> {
    seq(c, "env")
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Expands Kubernetes' `$(VAR)` references from the container's env.
fn expand(arg: &str, env: &HashMap<String, String>) -> String {
    let mut out = arg.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    assert!(!out.contains("$("), "unresolved reference in {arg:?}");
    out
}

/// The value of `--flag=value` among a container's args, expanded.
fn flag(c: &Value, name: &str) -> Option<String> {
    let env = env_of(c);
    seq(c, "args").iter().find_map(|a| {
        let a = a.as_str()?;
        a.strip_prefix(&format!("--{name}="))
            .map(|v| expand(v, &env))
    })
}

fn has_flag(c: &Value, name: &str) -> bool {
    seq(c, "args")
        .iter()
        .any(|a| a.as_str() == Some(&format!("--{name}")))
}

struct Flavour {
    dir: PathBuf,
    namespace: &'static str,
    driver: &'static str,
    secret: &'static str,
    service_account: &'static str,
}

fn flavours() -> Vec<Flavour> {
    let k = root().join("deploy/kubernetes");
    vec![
        Flavour {
            dir: k.clone(),
            namespace: "default",
            driver: "rbd.csi.ceph.com",
            secret: "csi-rbd-secret",
            service_account: "rbd-csi-provisioner",
        },
        Flavour {
            dir: k.join("rook"),
            namespace: "rook-ceph",
            driver: "rook-ceph.rbd.csi.ceph.com",
            secret: "rook-csi-rbd-provisioner",
            service_account: "rook-csi-rbd-provisioner-sa",
        },
    ]
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    seq(pod, "containers")
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The mount of `c` whose mountPath is `dir` or a parent of `path`.
fn mount_for<'a>(c: &'a Value, path: &str) -> &'a Value {
    seq(c, "volumeMounts")
        .iter()
        .filter(|m| {
            let mp = m["mountPath"].as_str().unwrap_or("").trim_end_matches('/');
            path == mp || path.starts_with(&format!("{mp}/"))
        })
        .max_by_key(|m| m["mountPath"].as_str().map_or(0, str::len))
        .unwrap_or_else(|| panic!("no mount holds {path} in {}", s(c, &["name"])))
}

fn socket_path(endpoint: &str) -> &str {
    endpoint
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("{endpoint:?} is not a unix:// endpoint"))
}

#[test]
fn provisioner_patches_agree_with_themselves_and_the_vrc() {
    for f in flavours() {
        let patch = docs(&f.dir.join("provisioner-patch.yaml")).remove(0);
        assert_eq!(s(&patch, &["kind"]), "Deployment");
        assert_eq!(
            s(&patch, &["metadata", "name"]),
            "csi-rbdplugin-provisioner"
        );
        assert_eq!(s(&patch, &["metadata", "namespace"]), f.namespace);
        let pod = &patch["spec"]["template"]["spec"];
        let ours = container(pod, OURS);
        let addons = container(pod, CSI_ADDONS);
        assert_eq!(seq(ours, "args")[0].as_str(), Some("serve"));

        // One socket, seen by both containers through the same volume.
        let endpoint = flag(ours, "endpoint").expect("--endpoint");
        let theirs = flag(addons, "csi-addons-address").expect("--csi-addons-address");
        assert_eq!(endpoint, theirs, "{}", f.dir.display());
        assert_eq!(
            env_of(addons).get("CSIADDONS_ENDPOINT"),
            Some(&endpoint),
            "CSIADDONS_ENDPOINT of the csi-addons sidecar"
        );
        let sock = socket_path(&endpoint);
        assert_eq!(sock, "/csi/csi-addons.sock");
        let (m1, m2) = (mount_for(ours, sock), mount_for(addons, sock));
        assert_eq!(m1["name"], m2["name"], "the socket directory is one volume");
        assert_eq!(m1["mountPath"], m2["mountPath"]);
        // ceph-csi's own csi-addons server moved out of the way.
        let plugin = container(pod, "csi-rbdplugin");
        let moved = env_of(plugin)
            .into_iter()
            .find(|(k, _)| k.contains("ADDONS_ENDPOINT"))
            .expect("ceph-csi's csi-addons endpoint is moved");
        assert_ne!(socket_path(&moved.1), sock);
        // ... and our sidecar forwards the services it does not serve there,
        // through a directory both containers mount from the same volume.
        let forward = flag(ours, "forward-endpoint").expect("--forward-endpoint");
        assert_eq!(
            forward, moved.1,
            "--forward-endpoint is ceph-csi's endpoint"
        );
        assert!(forward.parse::<Endpoint>().is_ok(), "{forward}");
        let upstream = socket_path(&forward);
        assert_eq!(upstream, "/csi/csi-addons-cephcsi.sock");
        let (f1, f2) = (mount_for(ours, upstream), mount_for(plugin, upstream));
        assert_eq!(
            f1["name"], f2["name"],
            "the forwarded socket is on one volume"
        );
        assert_eq!(f1["mountPath"], f2["mountPath"]);

        // Every mount names a volume of the patch.
        let volumes: HashMap<&str, &Value> = seq(pod, "volumes")
            .iter()
            .map(|v| (s(v, &["name"]), v))
            .collect();
        for c in seq(pod, "containers") {
            for m in seq(c, "volumeMounts") {
                let name = s(m, &["name"]);
                assert!(
                    volumes.contains_key(name),
                    "{}: container {} mounts undefined volume {name}",
                    f.dir.display(),
                    s(c, &["name"])
                );
            }
        }

        // The secret directory is the Secret's mount, the Secret the VRC's.
        let secret_dir = flag(ours, "secret-dir").expect("--secret-dir");
        let m = mount_for(ours, &secret_dir);
        assert_eq!(m["mountPath"].as_str(), Some(secret_dir.as_str()));
        assert_eq!(
            s(volumes[s(m, &["name"])], &["secret", "secretName"]),
            f.secret
        );
        // The ceph-csi config files are on the config volume.
        for fl in ["csi-config", "cluster-mapping"] {
            let p = flag(ours, fl).unwrap_or_else(|| panic!("--{fl}"));
            let m = mount_for(ours, &p);
            let v = volumes[s(m, &["name"])];
            assert!(
                v.get("configMap").is_some() || v.get("projected").is_some(),
                "--{fl} {p} is not on a ConfigMap volume"
            );
        }
        assert!(flag(ours, "cluster-id").is_some());
        // Every flag the manifest passes is one `serve` knows.
        let help = std::process::Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
            .args(["serve", "--help"])
            .output()
            .expect("the binary runs");
        let help = String::from_utf8_lossy(&help.stdout);
        for arg in seq(ours, "args").iter().filter_map(Value::as_str).skip(1) {
            let name = arg.split('=').next().unwrap_or(arg);
            assert!(
                help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
                "{}: serve has no {name}",
                f.dir.display()
            );
        }
        assert!(has_flag(ours, "watch-pvs"));
        assert_eq!(
            ours["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true)
        );

        // The driver name is the VolumeReplicationClass's provisioner.
        let vrc = docs(&f.dir.join("volumereplicationclass.yaml")).remove(0);
        assert_eq!(s(&vrc, &["kind"]), "VolumeReplicationClass");
        assert_eq!(flag(ours, "drivername").as_deref(), Some(f.driver));
        assert_eq!(s(&vrc, &["spec", "provisioner"]), f.driver);
        let prefix = "replication.storage.openshift.io/";
        let params = vrc["spec"]["parameters"].as_mapping().expect("parameters");
        assert_eq!(
            params[format!("{prefix}replication-secret-name").as_str()].as_str(),
            Some(f.secret)
        );
        assert_eq!(
            params[format!("{prefix}replication-secret-namespace").as_str()].as_str(),
            Some(f.namespace)
        );
        // What reaches the driver (the controller strips the prefixed keys)
        // is valid for the sidecar.
        let sent: HashMap<String, String> = params
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
            .filter(|(k, _)| !k.starts_with(prefix))
            .collect();
        let parsed =
            ReplicationParams::parse(&sent).unwrap_or_else(|e| panic!("{}: {e}", f.dir.display()));
        assert!(
            parsed.ignored.is_empty(),
            "unknown keys: {:?}",
            parsed.ignored
        );
    }
}

fn grants(rule: &Value, group: &str, resource: &str, verbs: &[&str]) -> bool {
    let has = |key: &str, want: &str| {
        seq(rule, key)
            .iter()
            .any(|v| v.as_str() == Some(want) || v.as_str() == Some("*"))
    };
    has("apiGroups", group) && has("resources", resource) && verbs.iter().all(|v| has("verbs", v))
}

#[test]
fn rbac_grants_what_the_pv_watch_uses() {
    for f in flavours() {
        let all = docs(&f.dir.join("rbac.yaml"));
        let of = |kind: &str| -> Vec<&Value> {
            all.iter()
                .filter(|d| d["kind"].as_str() == Some(kind))
                .collect()
        };
        let role_grants = |kind: &str, name: &str, group: &str, res: &str, verbs: &[&str]| {
            of(kind).iter().any(|r| {
                r["metadata"]["name"].as_str() == Some(name)
                    && seq(r, "rules")
                        .iter()
                        .any(|rule| grants(rule, group, res, verbs))
            })
        };
        // Each binding names a role of the file that grants the right thing,
        // to the provisioner's ServiceAccount.
        let mut pv = false;
        let mut lease = false;
        for (bkind, rkind) in [
            ("ClusterRoleBinding", "ClusterRole"),
            ("RoleBinding", "Role"),
        ] {
            for b in of(bkind) {
                let role = s(b, &["roleRef", "name"]);
                assert_eq!(s(b, &["roleRef", "kind"]), rkind);
                let sa = seq(b, "subjects").iter().any(|sub| {
                    sub["kind"].as_str() == Some("ServiceAccount")
                        && sub["name"].as_str() == Some(f.service_account)
                        && sub["namespace"].as_str() == Some(f.namespace)
                });
                assert!(sa, "{bkind} {role} does not bind {}", f.service_account);
                if rkind == "Role" {
                    assert_eq!(s(b, &["metadata", "namespace"]), f.namespace);
                }
                pv |= role_grants(
                    rkind,
                    role,
                    "",
                    "persistentvolumes",
                    &["get", "list", "watch"],
                ) && rkind == "ClusterRole";
                lease |= role_grants(
                    rkind,
                    role,
                    "coordination.k8s.io",
                    "leases",
                    &["get", "list", "watch", "create", "update"],
                );
            }
        }
        assert!(
            pv,
            "{}: no cluster-wide get/list/watch on persistentvolumes",
            f.dir.display()
        );
        assert!(lease, "{}: no Lease rights", f.dir.display());
    }
}

#[test]
fn dockerfile_builds_on_bookworm_and_runs_unprivileged() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let from: Vec<&str> = text.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(from.len(), 2, "multi-stage: {from:?}");
    assert!(from[0].contains("rust:1.95") && from[0].contains("bookworm"));
    assert!(from[1].contains("debian:12-slim"));
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let pinned = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .unwrap_or_default();
    assert!(
        from[0].contains(&format!("rust:{pinned}-")),
        "the builder image matches rust-toolchain.toml ({pinned})"
    );
    for pkg in ["librbd-dev", "librados-dev", "librbd1", "librados2"] {
        assert!(text.contains(pkg), "{pkg}");
    }
    assert!(text.contains("--features kube"));
    let user = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    // The UID the manifests run as is the image's.
    for f in flavours() {
        let patch = docs(&f.dir.join("provisioner-patch.yaml")).remove(0);
        let ours = container(&patch["spec"]["template"]["spec"], OURS);
        let uid = ours["securityContext"]["runAsUser"].as_u64().unwrap();
        assert!(user.starts_with(&uid.to_string()), "{user} vs {uid}");
    }
}

/// No client admin socket in what we ship: the image and the manifests do
/// not write a ceph.conf or environment that turns one on (librados' client
/// default is none, and `Cluster::connect` forces it off as well; see
/// tests/least_privilege.rs).
#[test]
fn nothing_shipped_enables_a_client_admin_socket() {
    let mut files = vec![root().join("Dockerfile")];
    let mut dirs = vec![root().join("deploy/kubernetes")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 3, "{files:?}");
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for (n, line) in text.lines().enumerate() {
            // Settings, not comments: `admin socket = X` / `admin_socket = X`
            // in a ceph.conf, `--admin-socket X` on a command line or in
            // CEPH_ARGS. Only an empty value is allowed.
            let code = line.split('#').next().unwrap_or_default();
            let norm: String = code
                .to_ascii_lowercase()
                .chars()
                .filter(|c| !matches!(c, ' ' | '-' | '_'))
                .collect();
            if let Some((_, value)) = norm.split_once("adminsocket") {
                let value = value.trim_start_matches('=').trim_matches(['"', '\'']);
                assert!(
                    value.is_empty(),
                    "{}:{}: sets a client admin socket: {line}",
                    f.display(),
                    n + 1
                );
            }
        }
    }
}
