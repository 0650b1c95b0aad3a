//! ceph-csi's cluster configuration files, as mounted in the provisioner pod.
//!
//! - [`CsiConfig`]: `/etc/ceph-csi-config/config.json`, a JSON array of
//!   `{"clusterID", "monitors", "rbd": {"radosNamespace"}, ...}`. Unknown
//!   fields (`cephFS`, `nfs`, `readAffinity`, Rook's `namespace`, ...) are
//!   ignored; the legacy top-level `radosNamespace` is read when `rbd` does not
//!   set one. An empty `radosNamespace` means the default namespace.
//! - [`ClusterMapping`]: `/etc/ceph-csi-config/cluster-mapping.json`, which
//!   says which cluster ID and pool IDs on this site correspond to those in
//!   handles that the peer site issued. A missing file means no mapping, as in
//!   ceph-csi.
//!
//! Structural problems (bad JSON, an entry without a cluster ID, duplicate
//! cluster IDs, a pool ID that is not a number) fail the load; problems that
//! only matter for one cluster (no monitors) are reported when that cluster is
//! asked for, so one bad entry does not take down every other volume. This
//! module reads files only; it never connects to a cluster.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where ceph-csi mounts `config.json`.
pub const CONFIG_PATH: &str = "/etc/ceph-csi-config/config.json";

/// Where ceph-csi mounts `cluster-mapping.json`.
pub const CLUSTER_MAPPING_PATH: &str = "/etc/ceph-csi-config/cluster-mapping.json";

/// One cluster of `config.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The cluster ID, as in StorageClasses and volume handles.
    pub cluster_id: String,
    /// Monitor addresses (`host:port`, possibly `v2:`/`v1:` prefixed).
    pub monitors: Vec<String>,
    /// The RADOS namespace for RBD images; `None` for the default namespace.
    pub rados_namespace: Option<String>,
}

impl ClusterConfig {
    /// The monitors joined by commas, the form librados' `mon_host` takes.
    pub fn mon_host(&self) -> String {
        self.monitors.join(",")
    }
}

/// The parsed `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CsiConfig {
    source: String,
    clusters: Vec<ClusterConfig>,
}

#[derive(Deserialize)]
struct RawCluster {
    #[serde(rename = "clusterID", default)]
    cluster_id: Option<String>,
    #[serde(default)]
    monitors: Option<Vec<String>>,
    #[serde(default)]
    rbd: Option<RawRbd>,
    /// ceph-csi before 3.x had the namespace at the top level.
    #[serde(rename = "radosNamespace", default)]
    legacy_rados_namespace: Option<String>,
}

#[derive(Deserialize)]
struct RawRbd {
    #[serde(rename = "radosNamespace", default)]
    rados_namespace: Option<String>,
}

impl CsiConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = read(path)?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates the contents of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::parse("config.json", text)
    }

    fn parse(source: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: Vec<RawCluster> = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            file: source.to_owned(),
            source: e,
        })?;
        let mut clusters: Vec<ClusterConfig> = Vec::with_capacity(raw.len());
        for (entry, r) in raw.into_iter().enumerate() {
            let cluster_id = r.cluster_id.unwrap_or_default();
            if cluster_id.is_empty() {
                return Err(ConfigError::MissingClusterId {
                    file: source.to_owned(),
                    entry,
                });
            }
            if let Some(first) = clusters.iter().position(|c| c.cluster_id == cluster_id) {
                return Err(ConfigError::DuplicateClusterId {
                    file: source.to_owned(),
                    cluster_id,
                    first,
                    second: entry,
                });
            }
            let rados_namespace = r
                .rbd
                .and_then(|rbd| rbd.rados_namespace)
                .filter(|ns| !ns.is_empty())
                .or(r.legacy_rados_namespace)
                .filter(|ns| !ns.is_empty());
            clusters.push(ClusterConfig {
                cluster_id,
                monitors: r.monitors.unwrap_or_default(),
                rados_namespace,
            });
        }
        Ok(Self {
            source: source.to_owned(),
            clusters,
        })
    }

    /// All entries, in file order, as written (not checked for monitors).
    pub fn clusters(&self) -> &[ClusterConfig] {
        &self.clusters
    }

    /// Whether `cluster_id` has an entry.
    pub fn contains(&self, cluster_id: &str) -> bool {
        self.clusters.iter().any(|c| c.cluster_id == cluster_id)
    }

    /// The entry for `cluster_id`, checked to be usable (it has monitors).
    pub fn cluster(&self, cluster_id: &str) -> Result<&ClusterConfig, ConfigError> {
        let cluster = self
            .clusters
            .iter()
            .find(|c| c.cluster_id == cluster_id)
            .ok_or_else(|| ConfigError::UnknownCluster {
                file: self.source.clone(),
                cluster_id: cluster_id.to_owned(),
                known: self.cluster_ids(),
            })?;
        self.check_usable(cluster)
    }

    /// The only entry, for requests that name no cluster (image specs).
    pub fn default_cluster(&self) -> Result<&ClusterConfig, ConfigError> {
        match self.clusters.as_slice() {
            [only] => self.check_usable(only),
            [] => Err(ConfigError::NoClusters {
                file: self.source.clone(),
            }),
            _ => Err(ConfigError::AmbiguousDefault {
                file: self.source.clone(),
                known: self.cluster_ids(),
            }),
        }
    }

    fn cluster_ids(&self) -> Vec<String> {
        self.clusters.iter().map(|c| c.cluster_id.clone()).collect()
    }

    fn check_usable<'a>(&self, c: &'a ClusterConfig) -> Result<&'a ClusterConfig, ConfigError> {
        if c.monitors.is_empty() {
            return Err(ConfigError::NoMonitors {
                file: self.source.clone(),
                cluster_id: c.cluster_id.clone(),
            });
        }
        if let Some(index) = c.monitors.iter().position(|m| m.trim().is_empty()) {
            return Err(ConfigError::EmptyMonitor {
                file: self.source.clone(),
                cluster_id: c.cluster_id.clone(),
                index,
            });
        }
        Ok(c)
    }
}

/// A cluster ID and pool ID: where a handle's image lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolLocation {
    /// The cluster ID.
    pub cluster_id: String,
    /// The pool ID.
    pub pool_id: i64,
}

impl fmt::Display for PoolLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cluster {:?} pool {}", self.cluster_id, self.pool_id)
    }
}

/// One entry of `cluster-mapping.json`.
///
/// Every pair is symmetric: `(a, b)` maps `a` to `b` and `b` to `a`, because
/// the same file is installed on both sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingEntry {
    /// `clusterIDMapping` pairs, in key order.
    pub cluster_ids: Vec<(String, String)>,
    /// `RBDPoolIDMapping` pairs, in file order (keys in order within a map).
    pub rbd_pool_ids: Vec<(i64, i64)>,
}

/// The parsed `cluster-mapping.json`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterMapping {
    entries: Vec<MappingEntry>,
}

#[derive(Deserialize)]
struct RawMapping {
    #[serde(rename = "clusterIDMapping", alias = "ClusterIDMapping", default)]
    cluster_ids: Option<BTreeMap<String, String>>,
    #[serde(rename = "RBDPoolIDMapping", default)]
    rbd_pool_ids: Option<Vec<BTreeMap<String, String>>>,
}

impl ClusterMapping {
    /// Reads and validates the mapping file; a missing file is an empty mapping.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&path.display().to_string(), &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses and validates the contents of a `cluster-mapping.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        Self::parse("cluster-mapping.json", text)
    }

    fn parse(source: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: Vec<RawMapping> = serde_json::from_str(text).map_err(|e| ConfigError::Json {
            file: source.to_owned(),
            source: e,
        })?;
        let mut entries = Vec::with_capacity(raw.len());
        for (entry, r) in raw.into_iter().enumerate() {
            let cluster_ids: Vec<(String, String)> =
                r.cluster_ids.unwrap_or_default().into_iter().collect();
            if cluster_ids.is_empty() {
                return Err(ConfigError::MissingClusterIdMapping {
                    file: source.to_owned(),
                    entry,
                });
            }
            if cluster_ids
                .iter()
                .any(|(a, b)| a.is_empty() || b.is_empty())
            {
                return Err(ConfigError::EmptyMappedClusterId {
                    file: source.to_owned(),
                    entry,
                });
            }
            let mut rbd_pool_ids = Vec::new();
            for map in r.rbd_pool_ids.unwrap_or_default() {
                for (a, b) in map {
                    let id = |value: &str| {
                        parse_pool_id(value).ok_or_else(|| ConfigError::InvalidMappedPoolId {
                            file: source.to_owned(),
                            entry,
                            value: value.to_owned(),
                        })
                    };
                    rbd_pool_ids.push((id(&a)?, id(&b)?));
                }
            }
            entries.push(MappingEntry {
                cluster_ids,
                rbd_pool_ids,
            });
        }
        Ok(Self { entries })
    }

    /// The entries, in file order.
    pub fn entries(&self) -> &[MappingEntry] {
        &self.entries
    }

    /// Whether the file had no entries (or did not exist).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every location `(cluster_id, pool_id)` maps to, in ceph-csi's order:
    /// for each entry whose cluster pair contains `cluster_id` (on either
    /// side), the other side of that pair combined with the other side of each
    /// pool pair that contains `pool_id`. Duplicates are dropped.
    pub fn candidates(&self, cluster_id: &str, pool_id: i64) -> Vec<PoolLocation> {
        let mut out: Vec<PoolLocation> = Vec::new();
        for entry in &self.entries {
            for (a, b) in &entry.cluster_ids {
                let Some(mapped_cluster) = other_side(a, b, cluster_id) else {
                    continue;
                };
                for (p, q) in &entry.rbd_pool_ids {
                    let Some(mapped_pool) = other_side(p, q, &pool_id) else {
                        continue;
                    };
                    let loc = PoolLocation {
                        cluster_id: mapped_cluster.clone(),
                        pool_id: *mapped_pool,
                    };
                    if !out.contains(&loc) {
                        out.push(loc);
                    }
                }
            }
        }
        out
    }

    /// The locations on this site to try, in order, for a handle that names
    /// `(cluster_id, pool_id)`: the handle's own location first when its
    /// cluster is in `config` (ceph-csi also tries it first and consults the
    /// mapping only when the pool or image is not found), then each mapped
    /// location whose cluster is in `config`.
    ///
    /// Fails when none is usable: the cluster is unknown here and no mapping
    /// translates it to a known one.
    pub fn local_candidates(
        &self,
        config: &CsiConfig,
        cluster_id: &str,
        pool_id: i64,
    ) -> Result<Vec<PoolLocation>, ConfigError> {
        let mut out = Vec::new();
        if config.contains(cluster_id) {
            out.push(PoolLocation {
                cluster_id: cluster_id.to_owned(),
                pool_id,
            });
        }
        for loc in self.candidates(cluster_id, pool_id) {
            if config.contains(&loc.cluster_id) && !out.contains(&loc) {
                out.push(loc);
            }
        }
        if out.is_empty() {
            return Err(ConfigError::UnmappedCluster {
                cluster_id: cluster_id.to_owned(),
                pool_id,
                known: config.cluster_ids(),
            });
        }
        Ok(out)
    }
}

/// The other side of the pair `(a, b)` if `x` is one of its sides.
fn other_side<'a, T: PartialEq<U> + ?Sized, U: ?Sized>(a: &'a T, b: &'a T, x: &U) -> Option<&'a T> {
    if a == x {
        Some(b)
    } else if b == x {
        Some(a)
    } else {
        None
    }
}

/// A pool ID as the mapping file writes it: decimal, not negative.
fn parse_pool_id(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })
}

/// A config file that cannot be used, or a cluster it does not describe.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is not the expected JSON.
    #[error("{file} is not a valid ceph-csi config file: {source}")]
    Json {
        /// The file (its path, or its usual name when parsed from a string).
        file: String,
        /// The JSON error, with line and column.
        source: serde_json::Error,
    },
    /// An entry of `config.json` has no `clusterID`.
    #[error("{file}: entry {entry} has no clusterID (or an empty one)")]
    MissingClusterId {
        /// The file.
        file: String,
        /// The entry's 0-based index.
        entry: usize,
    },
    /// Two entries of `config.json` share a `clusterID`.
    #[error("{file}: entries {first} and {second} both have clusterID {cluster_id:?}")]
    DuplicateClusterId {
        /// The file.
        file: String,
        /// The shared cluster ID.
        cluster_id: String,
        /// The first entry's 0-based index.
        first: usize,
        /// The second entry's 0-based index.
        second: usize,
    },
    /// No entry has this cluster ID.
    #[error("cluster ID {cluster_id:?} is not in {file} (known: {})", list(.known))]
    UnknownCluster {
        /// The file.
        file: String,
        /// The cluster ID asked for.
        cluster_id: String,
        /// The cluster IDs the file has.
        known: Vec<String>,
    },
    /// The entry has no monitors.
    #[error("{file}: cluster {cluster_id:?} has no monitors")]
    NoMonitors {
        /// The file.
        file: String,
        /// The cluster ID.
        cluster_id: String,
    },
    /// A monitor address is empty.
    #[error("{file}: cluster {cluster_id:?} has an empty monitor address at index {index}")]
    EmptyMonitor {
        /// The file.
        file: String,
        /// The cluster ID.
        cluster_id: String,
        /// The 0-based index in `monitors`.
        index: usize,
    },
    /// A default cluster was asked for, but the file has none.
    #[error("{file} has no clusters")]
    NoClusters {
        /// The file.
        file: String,
    },
    /// A default cluster was asked for, but the file has several.
    #[error(
        "{file} has {} clusters ({}); use a ceph-csi volume handle, which names its cluster",
        .known.len(),
        list(.known)
    )]
    AmbiguousDefault {
        /// The file.
        file: String,
        /// The cluster IDs the file has.
        known: Vec<String>,
    },
    /// An entry of the mapping file has no `clusterIDMapping` pairs.
    #[error("{file}: entry {entry} has no clusterIDMapping")]
    MissingClusterIdMapping {
        /// The file.
        file: String,
        /// The entry's 0-based index.
        entry: usize,
    },
    /// A `clusterIDMapping` pair has an empty side.
    #[error("{file}: entry {entry} maps an empty cluster ID")]
    EmptyMappedClusterId {
        /// The file.
        file: String,
        /// The entry's 0-based index.
        entry: usize,
    },
    /// A `RBDPoolIDMapping` pool ID is not a non-negative decimal number.
    #[error(
        "{file}: entry {entry}: RBDPoolIDMapping pool ID {value:?} is not a non-negative \
         decimal integer"
    )]
    InvalidMappedPoolId {
        /// The file.
        file: String,
        /// The entry's 0-based index.
        entry: usize,
        /// The bad pool ID.
        value: String,
    },
    /// A handle's cluster is neither configured here nor mapped to a cluster
    /// that is.
    #[error(
        "cluster ID {cluster_id:?} (pool ID {pool_id}) is not configured on this site and \
         the cluster mapping does not translate it to one that is (configured: {})",
        list(.known)
    )]
    UnmappedCluster {
        /// The handle's cluster ID.
        cluster_id: String,
        /// The handle's pool ID.
        pool_id: i64,
        /// The cluster IDs configured here.
        known: Vec<String>,
    },
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        return "none".to_owned();
    }
    ids.iter()
        .map(|id| format!("{id:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Rook writes: one entry per CephCluster (clusterID = its namespace)
    /// plus one per CephBlockPoolRadosNamespace (clusterID = a hash).
    const ROOK: &str = r#"[
      {"clusterID":"rook-ceph","monitors":["10.96.12.1:6789","10.96.12.2:6789"],
       "namespace":"rook-ceph",
       "cephFS":{"netNamespaceFilePath":"","subvolumeGroup":"","kernelMountOptions":"","fuseMountOptions":""},
       "rbd":{"netNamespaceFilePath":"","radosNamespace":""},
       "nfs":{"netNamespaceFilePath":""},
       "readAffinity":{"enabled":false,"crushLocationLabels":null}},
      {"clusterID":"80fc4f4bacc064be641633e6ed25ba7e","monitors":["10.96.12.1:6789","10.96.12.2:6789"],
       "namespace":"rook-ceph",
       "cephFS":{"netNamespaceFilePath":"","subvolumeGroup":"","kernelMountOptions":"","fuseMountOptions":""},
       "rbd":{"netNamespaceFilePath":"","radosNamespace":"namespace-a"},
       "nfs":{"netNamespaceFilePath":""},
       "readAffinity":{"enabled":false,"crushLocationLabels":null}}
    ]"#;

    /// The ceph-csi Helm chart / example ConfigMap form.
    const PLAIN: &str = r#"[
      {
        "clusterID": "b9127830-b0cc-4e34-aa47-9d1a2e9949a8",
        "monitors": ["v2:192.168.1.10:3300/0,v1:192.168.1.10:6789/0", "192.168.1.11:6789"],
        "cephFS": {"subvolumeGroup": "csi"}
      }
    ]"#;

    #[test]
    fn plain_single_cluster() {
        let cfg = CsiConfig::from_json(PLAIN).unwrap();
        let c = cfg.default_cluster().unwrap();
        assert_eq!(c.cluster_id, "b9127830-b0cc-4e34-aa47-9d1a2e9949a8");
        assert_eq!(c.monitors.len(), 2);
        assert_eq!(c.rados_namespace, None);
        assert_eq!(
            c.mon_host(),
            "v2:192.168.1.10:3300/0,v1:192.168.1.10:6789/0,192.168.1.11:6789"
        );
        assert_eq!(
            cfg.cluster("b9127830-b0cc-4e34-aa47-9d1a2e9949a8").unwrap(),
            c
        );
    }

    #[test]
    fn rook_format() {
        let cfg = CsiConfig::from_json(ROOK).unwrap();
        assert_eq!(cfg.clusters().len(), 2);
        let main = cfg.cluster("rook-ceph").unwrap();
        assert_eq!(
            main.rados_namespace, None,
            "empty radosNamespace is the default"
        );
        let ns = cfg.cluster("80fc4f4bacc064be641633e6ed25ba7e").unwrap();
        assert_eq!(ns.rados_namespace.as_deref(), Some("namespace-a"));
        let err = cfg.default_cluster().unwrap_err();
        assert!(matches!(err, ConfigError::AmbiguousDefault { .. }));
        assert_eq!(
            err.to_string(),
            "config.json has 2 clusters (\"rook-ceph\", \"80fc4f4bacc064be641633e6ed25ba7e\"); \
             use a ceph-csi volume handle, which names its cluster"
        );
    }

    #[test]
    fn rbd_absent_null_and_legacy_namespace() {
        let cfg = CsiConfig::from_json(
            r#"[{"clusterID":"a","monitors":["m:6789"]},
                {"clusterID":"b","monitors":["m:6789"],"rbd":null},
                {"clusterID":"c","monitors":["m:6789"],"radosNamespace":"old"},
                {"clusterID":"d","monitors":["m:6789"],"radosNamespace":"old","rbd":{"radosNamespace":"new"}},
                {"clusterID":"e","monitors":["m:6789"],"rbd":{"mirrorDaemonCount":2}}]"#,
        )
        .unwrap();
        let ns = |id: &str| cfg.cluster(id).unwrap().rados_namespace.clone();
        assert_eq!(ns("a"), None);
        assert_eq!(ns("b"), None);
        assert_eq!(ns("c").as_deref(), Some("old"));
        assert_eq!(ns("d").as_deref(), Some("new"));
        assert_eq!(ns("e"), None);
    }

    #[test]
    fn unknown_cluster() {
        let cfg = CsiConfig::from_json(ROOK).unwrap();
        let err = cfg.cluster("site-b").unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster ID \"site-b\" is not in config.json (known: \"rook-ceph\", \
             \"80fc4f4bacc064be641633e6ed25ba7e\")"
        );
        assert!(cfg.contains("rook-ceph"));
        assert!(!cfg.contains("site-b"));
    }

    #[test]
    fn structural_errors() {
        let err = CsiConfig::from_json(r#"{"clusterID":"a"}"#).unwrap_err();
        assert!(matches!(err, ConfigError::Json { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("config.json is not a valid ceph-csi config file")
        );

        let err = CsiConfig::from_json(r#"[{"monitors":["m"]}]"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.json: entry 0 has no clusterID (or an empty one)"
        );
        let err = CsiConfig::from_json(r#"[{"clusterID":"a"},{"clusterID":""}]"#).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::MissingClusterId { entry: 1, .. }
        ));

        let err =
            CsiConfig::from_json(r#"[{"clusterID":"a"},{"clusterID":"b"},{"clusterID":"a"}]"#)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "config.json: entries 0 and 2 both have clusterID \"a\""
        );

        let err = CsiConfig::from_json(r#"[{"clusterID":"a","monitors":"m:6789"}]"#).unwrap_err();
        assert!(matches!(err, ConfigError::Json { .. }));
    }

    #[test]
    fn monitor_problems_are_per_cluster() {
        let cfg = CsiConfig::from_json(
            r#"[{"clusterID":"ok","monitors":["m:6789"]},
                {"clusterID":"none","monitors":[]},
                {"clusterID":"null","monitors":null},
                {"clusterID":"blank","monitors":["m:6789"," "]}]"#,
        )
        .unwrap();
        assert!(cfg.cluster("ok").is_ok());
        assert_eq!(
            cfg.cluster("none").unwrap_err().to_string(),
            "config.json: cluster \"none\" has no monitors"
        );
        assert!(matches!(
            cfg.cluster("null"),
            Err(ConfigError::NoMonitors { .. })
        ));
        assert!(matches!(
            cfg.cluster("blank"),
            Err(ConfigError::EmptyMonitor { index: 1, .. })
        ));
    }

    #[test]
    fn empty_config() {
        let cfg = CsiConfig::from_json("[]").unwrap();
        assert_eq!(
            cfg.default_cluster().unwrap_err().to_string(),
            "config.json has no clusters"
        );
        assert_eq!(
            cfg.cluster("x").unwrap_err().to_string(),
            "cluster ID \"x\" is not in config.json (known: none)"
        );
    }

    #[test]
    fn load_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, PLAIN).unwrap();
        let cfg = CsiConfig::load(&path).unwrap();
        assert!(cfg.default_cluster().is_ok());

        std::fs::write(&path, "[{").unwrap();
        let err = CsiConfig::load(&path).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{} is not", path.display()))
        );

        let missing = dir.path().join("nope.json");
        let err = CsiConfig::load(&missing).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }));
        assert!(err.to_string().starts_with("cannot read "));

        // A missing mapping file is no mapping, as in ceph-csi.
        assert!(ClusterMapping::load(&missing).unwrap().is_empty());
        let mpath = dir.path().join("cluster-mapping.json");
        std::fs::write(&mpath, MAPPING).unwrap();
        assert_eq!(ClusterMapping::load(&mpath).unwrap().entries().len(), 2);
    }

    /// ceph-csi's documented example, one site pair per entry.
    const MAPPING: &str = r#"[
      {"clusterIDMapping": {"site1-storage": "site2-storage"},
       "RBDPoolIDMapping": [{"1": "2", "11": "12"}],
       "CephFSFscIDMapping": [{"13": "34", "3": "4"}]},
      {"clusterIDMapping": {"site3-storage": "site2-storage"},
       "RBDPoolIDMapping": [{"5": "2", "16": "12"}]}
    ]"#;

    fn loc(c: &str, p: i64) -> PoolLocation {
        PoolLocation {
            cluster_id: c.into(),
            pool_id: p,
        }
    }

    #[test]
    fn mapping_is_symmetric() {
        let m = ClusterMapping::from_json(MAPPING).unwrap();
        assert_eq!(
            m.entries()[0].cluster_ids,
            vec![("site1-storage".into(), "site2-storage".into())]
        );
        assert_eq!(m.entries()[0].rbd_pool_ids, vec![(1, 2), (11, 12)]);
        // Key side to value side.
        assert_eq!(
            m.candidates("site1-storage", 1),
            vec![loc("site2-storage", 2)]
        );
        assert_eq!(
            m.candidates("site1-storage", 11),
            vec![loc("site2-storage", 12)]
        );
        // Value side to key side: site2 is in both entries.
        assert_eq!(
            m.candidates("site2-storage", 2),
            vec![loc("site1-storage", 1), loc("site3-storage", 5)]
        );
        // Unmapped pool or cluster: nothing.
        assert!(m.candidates("site1-storage", 7).is_empty());
        assert!(m.candidates("site9", 1).is_empty());
    }

    #[test]
    fn local_candidates_translate_a_peer_handle() {
        // Site 2's provisioner: its config.json knows only site2-storage.
        let cfg =
            CsiConfig::from_json(r#"[{"clusterID":"site2-storage","monitors":["10.1.0.1:6789"]}]"#)
                .unwrap();
        let m = ClusterMapping::from_json(MAPPING).unwrap();
        // A handle issued by site 1 (failover): translated to site 2's ids.
        assert_eq!(
            m.local_candidates(&cfg, "site1-storage", 11).unwrap(),
            vec![loc("site2-storage", 12)]
        );
        // A local handle is tried as is.
        assert_eq!(
            m.local_candidates(&cfg, "site2-storage", 12).unwrap(),
            vec![loc("site2-storage", 12)]
        );
        // Unknown and unmapped.
        let err = m.local_candidates(&cfg, "site1-storage", 99).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster ID \"site1-storage\" (pool ID 99) is not configured on this site and the \
             cluster mapping does not translate it to one that is (configured: \"site2-storage\")"
        );
    }

    #[test]
    fn rook_same_cluster_id_on_both_sites() {
        // Rook names both clusters after their namespace, so only pool ids
        // differ; the handle's own location comes first, then the mapped one.
        let cfg = CsiConfig::from_json(ROOK).unwrap();
        let m = ClusterMapping::from_json(
            r#"[{"clusterIDMapping":{"rook-ceph":"rook-ceph"},"RBDPoolIDMapping":[{"1":"3"}]}]"#,
        )
        .unwrap();
        assert_eq!(
            m.local_candidates(&cfg, "rook-ceph", 1).unwrap(),
            vec![loc("rook-ceph", 1), loc("rook-ceph", 3)]
        );
        assert_eq!(
            m.local_candidates(&cfg, "rook-ceph", 3).unwrap(),
            vec![loc("rook-ceph", 3), loc("rook-ceph", 1)]
        );
        // No mapping file at all: the handle as is.
        assert_eq!(
            ClusterMapping::default()
                .local_candidates(&cfg, "rook-ceph", 1)
                .unwrap(),
            vec![loc("rook-ceph", 1)]
        );
    }

    #[test]
    fn mapping_errors() {
        let err = ClusterMapping::from_json(r#"[{"RBDPoolIDMapping":[{"1":"2"}]}]"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster-mapping.json: entry 0 has no clusterIDMapping"
        );
        let err = ClusterMapping::from_json(r#"[{"clusterIDMapping":{}}]"#).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::MissingClusterIdMapping { entry: 0, .. }
        ));
        let err = ClusterMapping::from_json(r#"[{"clusterIDMapping":{"a":""}}]"#).unwrap_err();
        assert!(matches!(err, ConfigError::EmptyMappedClusterId { .. }));
        for bad in ["x", "-1", "0x1", "", " 1", "99999999999999999999"] {
            let text = format!(
                r#"[{{"clusterIDMapping":{{"a":"b"}}}},
                    {{"clusterIDMapping":{{"a":"b"}},"RBDPoolIDMapping":[{{"1":"{bad}"}}]}}]"#
            );
            let err = ClusterMapping::from_json(&text).unwrap_err();
            assert!(
                matches!(&err, ConfigError::InvalidMappedPoolId { entry: 1, value, .. } if value == bad),
                "{bad:?}: {err}"
            );
        }
        let err = ClusterMapping::from_json(
            r#"[{"clusterIDMapping":{"a":"b"},"RBDPoolIDMapping":[{"1":"x"}]}]"#,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster-mapping.json: entry 0: RBDPoolIDMapping pool ID \"x\" is not a \
             non-negative decimal integer"
        );
        assert!(matches!(
            ClusterMapping::from_json(r#"{"clusterIDMapping":{"a":"b"}}"#),
            Err(ConfigError::Json { .. })
        ));
        // A CephFS-only entry still needs its cluster pair, and is fine without RBD pools.
        let m = ClusterMapping::from_json(
            r#"[{"clusterIDMapping":{"a":"b"},"CephFSFscIDMapping":[{"1":"2"}]}]"#,
        )
        .unwrap();
        assert!(m.candidates("a", 1).is_empty());
    }

    #[test]
    fn rooks_capitalised_mapping_key_is_accepted() {
        // Rook writes "ClusterIDMapping"; ceph-csi (Go) reads keys
        // case-insensitively.
        let m = ClusterMapping::from_json(
            r#"[{"ClusterIDMapping": {"site-a": "site-b"}, "RBDPoolIDMapping": [{"1": "2"}]}]"#,
        )
        .unwrap();
        assert_eq!(m.candidates("site-a", 1).len(), 1);
    }
}
