//! The library's layers import one way only (src/lib.rs): a module may use
//! the modules below it, never one above. Read from the source tree, so a
//! new `crate::` path that points upwards fails here (doc comments and
//! comments are not imports and are skipped).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each layer and the modules it may import (besides itself).
const LAYERS: &[(&str, &[&str])] = &[
    ("ceph", &[]),
    ("csi", &[]),
    ("metrics", &[]),
    ("journal", &["ceph"]),
    ("omap", &["ceph", "csi"]),
    ("engine", &["ceph", "csi", "journal", "omap", "metrics"]),
    (
        "grpc",
        &["ceph", "csi", "journal", "omap", "metrics", "engine"],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::<module>` paths used outside comments in `text`.
fn crate_imports(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            // `csi_rbd_replicator::crate::` never occurs; a path segment
            // such as `my_crate::` is not ours.
            let before = &rest[..at];
            if !before.ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                used.insert(name);
            }
            rest = after;
        }
    }
    used
}

#[test]
fn layers_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut violations = Vec::new();
    for (layer, allowed) in LAYERS {
        let mut files = Vec::new();
        let dir = src.join(layer);
        if dir.is_dir() {
            rust_files(&dir, &mut files);
        }
        let single = src.join(format!("{layer}.rs"));
        if single.is_file() {
            files.push(single);
        }
        assert!(!files.is_empty(), "layer {layer} has no source files");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("readable source file");
            for used in crate_imports(&text) {
                let ok = used == *layer || allowed.contains(&used.as_str());
                let known = LAYERS.iter().any(|(l, _)| *l == used);
                if known && !ok {
                    violations.push(format!("{} uses crate::{used}", f.display()));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layering of src/lib.rs:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scanner_sees_imports_and_skips_comments() {
    let text = "use crate::engine::Engine;\n//! see crate::grpc\nlet x = crate::omap::f(); // crate::grpc\n";
    let got: Vec<String> = crate_imports(text).into_iter().collect();
    assert_eq!(got, ["engine", "omap"]);
}
