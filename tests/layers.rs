//! The workspace's crates depend on each other one way only: gRPC -> engine
//! -> {journal, omap, csi, metrics} -> ceph -> ceph-sys, read from `cargo
//! metadata`, so a new path dependency that points up the layering (or a
//! gRPC or CLI crate pulled into the engine) fails here. Also checked: only
//! the two Ceph crates may contain `unsafe`; every other crate forbids it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Each workspace crate and the workspace crates it may depend on.
const LAYERS: &[(&str, &[&str])] = &[
    ("csirr-ceph-sys", &[]),
    ("csirr-ceph", &["csirr-ceph-sys"]),
    ("csirr-csi", &[]),
    ("csirr-metrics", &[]),
    ("csirr-journal", &["csirr-ceph"]),
    ("csirr-omap", &["csirr-ceph", "csirr-csi"]),
    (
        "csirr-engine",
        &[
            "csirr-ceph",
            "csirr-csi",
            "csirr-journal",
            "csirr-metrics",
            "csirr-omap",
        ],
    ),
    (
        "csirr-grpc",
        &[
            "csirr-ceph",
            "csirr-csi",
            "csirr-engine",
            "csirr-journal",
            "csirr-metrics",
            "csirr-omap",
        ],
    ),
];

/// External crates that belong to the transport or the CLI, never to the
/// layers below gRPC.
const TRANSPORT_AND_CLI: &[&str] = &["tonic", "prost", "hyper", "clap", "tower"];

/// The crates allowed to contain `unsafe` code.
const UNSAFE_CRATES: &[&str] = &["csirr-ceph-sys", "csirr-ceph"];

/// A workspace package: its name, its manifest's directory and the names
/// of its normal (non-dev, non-build) dependencies.
struct Package {
    name: String,
    dir: PathBuf,
    deps: BTreeSet<String>,
}

fn workspace() -> Vec<Package> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let mut packages = Vec::new();
    for p in meta["packages"].as_array().expect("packages") {
        let manifest = PathBuf::from(p["manifest_path"].as_str().expect("manifest_path"));
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .map(|d| d["name"].as_str().expect("name").to_string())
            .collect();
        packages.push(Package {
            name: p["name"].as_str().expect("name").to_string(),
            dir: manifest.parent().expect("a directory").to_path_buf(),
            deps,
        });
    }
    packages
}

#[test]
fn crates_depend_one_way() {
    let packages = workspace();
    let layers: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let mut violations = Vec::new();
    for p in &packages {
        seen.insert(p.name.as_str());
        if p.name == "csi-rbd-replicator" {
            continue; // the binary wires everything
        }
        let Some(allowed) = layers.get(p.name.as_str()) else {
            violations.push(format!(
                "{} is not in the layering of tests/layers.rs",
                p.name
            ));
            continue;
        };
        for d in &p.deps {
            let ours = layers.contains_key(d.as_str()) || d == "csi-rbd-replicator";
            if ours && !allowed.contains(&d.as_str()) {
                violations.push(format!("{} depends on {d}", p.name));
            }
            if p.name != "csirr-grpc" && TRANSPORT_AND_CLI.contains(&d.as_str()) {
                violations.push(format!("{} depends on {d} (transport or CLI)", p.name));
            }
        }
    }
    for (name, _) in LAYERS {
        assert!(seen.contains(name), "{name} is not a workspace member");
    }
    assert!(
        violations.is_empty(),
        "dependencies against the layering:\n{}",
        violations.join("\n")
    );
}

#[test]
fn only_the_ceph_crates_have_unsafe() {
    for p in workspace() {
        let lib = p.dir.join("src/lib.rs");
        let text = std::fs::read_to_string(&lib).expect("every crate is a library");
        let forbids = text.contains("#![forbid(unsafe_code)]");
        if UNSAFE_CRATES.contains(&p.name.as_str()) {
            continue;
        }
        assert!(forbids, "{} must #![forbid(unsafe_code)]", lib.display());
        if p.name == "csi-rbd-replicator" {
            // The binary's root is not under the library's forbid.
            let main = std::fs::read_to_string(p.dir.join("src/main.rs")).expect("main.rs");
            assert!(
                main.contains("#![forbid(unsafe_code)]"),
                "src/main.rs must #![forbid(unsafe_code)]"
            );
        }
    }
}

#[test]
fn no_source_file_is_left_outside_a_crate() {
    // The layers' old home: every module moved into crates/.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut dirs: Vec<String> = std::fs::read_dir(&src)
        .expect("src")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert!(dirs.is_empty(), "directories under src/: {dirs:?}");
}
