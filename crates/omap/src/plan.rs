//! The omap generator's pure core: from one PersistentVolume object to what
//! its journal entry on this cluster must be.
//!
//! Two steps, neither of which writes anything:
//!
//! 1. [`examine`] reads the PV object alone (plus ceph-csi's config files):
//!    is it a PV of our driver, a dynamically provisioned one, with a
//!    well-formed handle and the attributes ceph-csi records? Which locations
//!    of this cluster can its handle resolve to, through the cluster mapping?
//! 2. [`resolve`] asks the cluster, through the [`Lookup`] trait, for the pool
//!    ids and the image id, and produces the [`Entry`] and the pools it goes
//!    to. It checks that the handle will resolve to exactly that pool, so that
//!    the entries written are the ones ceph-csi will read.
//!
//! What ceph-csi's own PV controller (`RegenerateJournal`) does, and where
//! this differs: it also skips PVs of other drivers, static PVs and PVs being
//! deleted, uses the PV name as the request name and the claim's namespace as
//! the owner, and takes the uuid from the handle. It skips PVs without a
//! claim; this generator does not (a restored PV may have had its claimRef
//! cleared) and leaves the owner unset then. For an encrypted volume without
//! an `encryptionType` attribute it records `block`, the type ceph-csi's
//! CreateVolume records for RBD, where RegenerateJournal records an empty
//! type.

use std::fmt;

use serde_json::Value;

use csirr_csi::config::{ClusterConfig, ClusterMapping, CsiConfig};
use csirr_csi::handle::{HandleError, VolumeHandle};

use super::error::OmapError;
use super::journal::{DEFAULT_VOLUME_NAME_PREFIX, Encryption, Entry};

/// What [`examine`] needs besides the PV.
#[derive(Debug, Clone, Copy)]
pub struct PlanContext<'a> {
    /// The CSI driver name whose PVs are ours (`--drivername`).
    pub driver: &'a str,
    /// ceph-csi's `config.json`.
    pub csi_config: &'a CsiConfig,
    /// ceph-csi's cluster mapping.
    pub mapping: &'a ClusterMapping,
    /// The cluster this process writes to (`--cluster-id`).
    pub local: &'a ClusterConfig,
}

/// A location of this cluster a handle may resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// A cluster ID of `config.json` that names this cluster.
    pub cluster_id: String,
    /// The pool id the handle means there.
    pub pool_id: i64,
    /// That cluster ID's RADOS namespace ("" for the default one).
    pub namespace: String,
}

/// A PV of our driver whose entry can be generated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PvTarget {
    /// The PV name (ceph-csi's request name).
    pub pv_name: String,
    /// Its volume handle.
    pub handle: VolumeHandle,
    /// The image pool (`pool` attribute).
    pub pool: String,
    /// The journal pool (`journalPool`, default the image pool).
    pub journal_pool: String,
    /// The image name (`imageName`, or `volumeNamePrefix` + uuid).
    pub image_name: String,
    /// The claim's namespace.
    pub owner: Option<String>,
    /// Encryption settings, for an encrypted volume.
    pub encryption: Option<Encryption>,
    /// The `radosNamespace` attribute, when the PV has one.
    pub namespace_attribute: Option<String>,
    /// Where on this cluster the handle may resolve, in ceph-csi's order.
    pub candidates: Vec<Candidate>,
}

/// Why a PV is not ours to handle (not a failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IgnoreReason {
    /// `spec.csi.driver` names another driver.
    OtherDriver(String),
    /// The PV has no `spec.csi` (an in-tree or local volume).
    NotCsi,
    /// A static PV (`staticVolume: "true"`): ceph-csi keeps no journal entry.
    StaticVolume,
    /// The PV is being deleted.
    BeingDeleted,
}

impl fmt::Display for IgnoreReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OtherDriver(d) => write!(f, "driver {d:?} is not ours"),
            Self::NotCsi => f.write_str("not a CSI volume (no spec.csi)"),
            Self::StaticVolume => f.write_str(
                "static volume (staticVolume: \"true\"): ceph-csi keeps no journal entry",
            ),
            Self::BeingDeleted => f.write_str("being deleted"),
        }
    }
}

/// Why a PV's entry cannot be generated (a failure: changes nothing).
#[derive(Debug, thiserror::Error)]
pub enum PvProblem {
    /// The object is not a PersistentVolume.
    #[error("not a PersistentVolume (kind {})", kind.as_deref().map_or("missing".to_owned(), |k| format!("{k:?}")))]
    NotAPersistentVolume {
        /// Its `kind`.
        kind: Option<String>,
    },
    /// A field the PV must have is missing or not a string.
    #[error("{0} is missing or empty")]
    MissingField(&'static str),
    /// A volume attribute ceph-csi records is missing.
    #[error(
        "spec.csi.volumeAttributes.{0} is missing or empty (ceph-csi records it when it \
         provisions a volume)"
    )]
    MissingAttribute(&'static str),
    /// The volume handle is not a ceph-csi handle.
    #[error("spec.csi.volumeHandle: {0}")]
    MalformedHandle(#[source] HandleError),
    /// The `imageName` attribute does not end with the handle's uuid.
    #[error("imageName {image_name:?} does not end with the handle's uuid {uuid}")]
    ImageNameMismatch {
        /// The attribute.
        image_name: String,
        /// The handle's uuid.
        uuid: String,
    },
    /// The `clusterID` attribute is neither the handle's cluster nor mapped
    /// to it.
    #[error(
        "volumeAttributes.clusterID {attribute:?} is neither the handle's cluster ID \
         {handle:?} nor mapped to it in the cluster mapping"
    )]
    ClusterIdMismatch {
        /// The attribute.
        attribute: String,
        /// The handle's cluster ID.
        handle: String,
    },
    /// The handle's cluster is not configured here and not mapped to a
    /// cluster that is.
    #[error("{0}")]
    UnmappedCluster(String),
    /// The handle resolves only to other clusters than this one.
    #[error(
        "the handle's cluster ID {handle_cluster:?} (pool id {pool_id}) resolves only to \
         {others}, not to cluster {local:?} that this process writes to; add a \
         clusterIDMapping to the cluster mapping or run with the matching --cluster-id"
    )]
    NotThisCluster {
        /// The handle's cluster ID.
        handle_cluster: String,
        /// The handle's pool id.
        pool_id: i64,
        /// The cluster IDs it resolves to.
        others: String,
        /// `--cluster-id`.
        local: String,
    },
    /// The PV's `radosNamespace` is not the one ceph-csi reads the handle in.
    #[error(
        "volumeAttributes.radosNamespace is {attribute:?}, but ceph-csi resolves the handle \
         through cluster ID {cluster_id:?}, whose radosNamespace in config.json is {config:?}"
    )]
    NamespaceMismatch {
        /// The attribute.
        attribute: String,
        /// The cluster ID used.
        cluster_id: String,
        /// Its namespace in `config.json`.
        config: String,
    },
    /// A pool does not exist on this cluster.
    #[error("pool {pool:?} ({what}) does not exist on this cluster")]
    PoolMissing {
        /// The pool.
        pool: String,
        /// `pool` or `journalPool`.
        what: &'static str,
    },
    /// The handle's pool id does not lead to the `pool` attribute's pool.
    #[error(
        "pool {pool:?} has id {pool_id} on this cluster, but the handle names pool id \
         {handle_pool_id} of cluster {handle_cluster:?}, which resolves here to {resolves}; \
         add an RBDPoolIDMapping {{\"{handle_pool_id}\": \"{pool_id}\"}} to the cluster \
         mapping"
    )]
    PoolNotMapped {
        /// The `pool` attribute.
        pool: String,
        /// Its id here.
        pool_id: i64,
        /// The handle's cluster ID.
        handle_cluster: String,
        /// The handle's pool id.
        handle_pool_id: i64,
        /// The locations the handle resolves to here.
        resolves: String,
    },
    /// The image does not exist on this cluster.
    #[error("image {spec} does not exist on this cluster (not replicated here yet?)")]
    ImageMissing {
        /// `pool[/namespace]/image`.
        spec: String,
    },
    /// Reading or writing the journal failed, or the entry belongs to
    /// another volume.
    #[error(transparent)]
    Journal(#[from] OmapError),
}

/// The verdict of [`examine`] on one object.
#[derive(Debug)]
pub enum Verdict {
    /// A PV of ours: generate its entry.
    Target(Box<PvTarget>),
    /// Not ours; not a failure.
    Ignore(IgnoreReason),
    /// Ours (or not a PV at all) but unusable: a failure.
    Reject(PvProblem),
}

/// The PV name of an object, if it has one (for messages).
pub fn object_name(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// Decides what one object is and, for a PV of ours, what its entry needs.
/// Pure.
pub fn examine(obj: &Value, ctx: &PlanContext<'_>) -> Verdict {
    match examine_inner(obj, ctx) {
        Ok(Ok(t)) => Verdict::Target(Box::new(t)),
        Ok(Err(reason)) => Verdict::Ignore(reason),
        Err(problem) => Verdict::Reject(problem),
    }
}

fn examine_inner(
    obj: &Value,
    ctx: &PlanContext<'_>,
) -> Result<Result<PvTarget, IgnoreReason>, PvProblem> {
    let kind = obj.get("kind").and_then(Value::as_str);
    if kind != Some("PersistentVolume") {
        return Err(PvProblem::NotAPersistentVolume {
            kind: kind.map(str::to_owned),
        });
    }
    let pv_name = object_name(obj).ok_or(PvProblem::MissingField("metadata.name"))?;
    if obj
        .pointer("/metadata/deletionTimestamp")
        .is_some_and(|v| !v.is_null())
    {
        return Ok(Err(IgnoreReason::BeingDeleted));
    }
    let Some(csi) = obj.pointer("/spec/csi").filter(|v| v.is_object()) else {
        return Ok(Err(IgnoreReason::NotCsi));
    };
    let driver = str_at(csi, "/driver").ok_or(PvProblem::MissingField("spec.csi.driver"))?;
    if driver != ctx.driver {
        return Ok(Err(IgnoreReason::OtherDriver(driver.to_owned())));
    }
    let attr = |name: &str| {
        csi.get("volumeAttributes")
            .and_then(|a| a.get(name))
            .and_then(Value::as_str)
    };
    if attr("staticVolume") == Some("true") {
        return Ok(Err(IgnoreReason::StaticVolume));
    }
    let raw_handle =
        str_at(csi, "/volumeHandle").ok_or(PvProblem::MissingField("spec.csi.volumeHandle"))?;
    let handle = VolumeHandle::parse(raw_handle).map_err(PvProblem::MalformedHandle)?;
    let nonempty = |name: &'static str| attr(name).filter(|s| !s.is_empty());
    let pool = nonempty("pool").ok_or(PvProblem::MissingAttribute("pool"))?;
    let journal_pool = nonempty("journalPool").unwrap_or(pool);
    let uuid = handle.uuid();
    let image_name = match nonempty("imageName") {
        Some(n) if n.ends_with(uuid) => n.to_owned(),
        Some(n) => {
            return Err(PvProblem::ImageNameMismatch {
                image_name: n.to_owned(),
                uuid: uuid.to_owned(),
            });
        }
        None => format!(
            "{}{uuid}",
            nonempty("volumeNamePrefix").unwrap_or(DEFAULT_VOLUME_NAME_PREFIX)
        ),
    };
    if let Some(c) = nonempty("clusterID")
        && c != handle.cluster_id()
        && !mapped(ctx.mapping, handle.cluster_id(), c)
    {
        return Err(PvProblem::ClusterIdMismatch {
            attribute: c.to_owned(),
            handle: handle.cluster_id().to_owned(),
        });
    }
    let candidates = candidates(ctx, &handle)?;
    let encryption = (attr("encrypted") == Some("true")).then(|| Encryption {
        kms_id: nonempty("encryptionKMSID").unwrap_or("default").to_owned(),
        kind: nonempty("encryptionType").unwrap_or("block").to_owned(),
    });
    Ok(Ok(PvTarget {
        pv_name: pv_name.to_owned(),
        pool: pool.to_owned(),
        journal_pool: journal_pool.to_owned(),
        image_name,
        owner: str_at(obj, "/spec/claimRef/namespace").map(str::to_owned),
        encryption,
        namespace_attribute: attr("radosNamespace").map(str::to_owned),
        candidates,
        handle,
    }))
}

/// Whether the mapping pairs cluster IDs `a` and `b` (either direction).
fn mapped(mapping: &ClusterMapping, a: &str, b: &str) -> bool {
    mapping.entries().iter().any(|e| {
        e.cluster_ids
            .iter()
            .any(|(x, y)| (x == a && y == b) || (x == b && y == a))
    })
}

/// The locations of this cluster the handle may resolve to.
fn candidates(ctx: &PlanContext<'_>, h: &VolumeHandle) -> Result<Vec<Candidate>, PvProblem> {
    let all = ctx
        .mapping
        .local_candidates(ctx.csi_config, h.cluster_id(), h.pool_id())
        .map_err(|e| PvProblem::UnmappedCluster(e.to_string()))?;
    let local_mons = ctx.local.mon_host();
    let mut out = Vec::new();
    let mut others = Vec::new();
    for loc in all {
        let cc = ctx
            .csi_config
            .clusters()
            .iter()
            .find(|c| c.cluster_id == loc.cluster_id);
        match cc {
            Some(cc) if cc.cluster_id == ctx.local.cluster_id || cc.mon_host() == local_mons => {
                out.push(Candidate {
                    cluster_id: loc.cluster_id,
                    pool_id: loc.pool_id,
                    namespace: cc.rados_namespace.clone().unwrap_or_default(),
                });
            }
            _ => others.push(loc.to_string()),
        }
    }
    if out.is_empty() {
        return Err(PvProblem::NotThisCluster {
            handle_cluster: h.cluster_id().to_owned(),
            pool_id: h.pool_id(),
            others: others.join(", "),
            local: ctx.local.cluster_id.clone(),
        });
    }
    Ok(out)
}

/// What [`resolve`] asks the cluster.
pub trait Lookup {
    /// The id of pool `name`, `None` when it does not exist.
    fn pool_id(&self, name: &str) -> Result<Option<i64>, OmapError>;
    /// The librbd id of image `image` in pool `pool` (id `pool_id`),
    /// namespace `namespace`; `None` when it does not exist.
    fn image_id(
        &self,
        pool_id: i64,
        pool: &str,
        namespace: &str,
        image: &str,
    ) -> Result<Option<String>, OmapError>;
}

/// A pool by id and name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRef {
    /// Pool id on this cluster.
    pub id: i64,
    /// Pool name.
    pub name: String,
}

/// Everything needed to write one PV's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The entry.
    pub entry: Entry,
    /// The journal (directory) pool.
    pub journal: PoolRef,
    /// The image pool.
    pub image: PoolRef,
    /// The RADOS namespace of both.
    pub namespace: String,
    /// The cluster ID of `config.json` the handle resolves through.
    pub cluster_id: String,
}

impl Resolved {
    /// `pool[/namespace]/image`.
    pub fn image_spec(&self) -> String {
        spec(
            &self.image.name,
            &self.namespace,
            Some(&self.entry.image_name),
        )
    }
}

fn spec(pool: &str, ns: &str, image: Option<&str>) -> String {
    let mut s = pool.to_owned();
    if !ns.is_empty() {
        s.push('/');
        s.push_str(ns);
    }
    if let Some(i) = image {
        s.push('/');
        s.push_str(i);
    }
    s
}

/// Completes a target with what the cluster says. Pure apart from `lookup`.
pub fn resolve(t: &PvTarget, lookup: &impl Lookup) -> Result<Resolved, PvProblem> {
    let image_pool_id = lookup
        .pool_id(&t.pool)?
        .ok_or_else(|| PvProblem::PoolMissing {
            pool: t.pool.clone(),
            what: "pool",
        })?;
    let Some(cand) = t.candidates.iter().find(|c| c.pool_id == image_pool_id) else {
        return Err(PvProblem::PoolNotMapped {
            pool: t.pool.clone(),
            pool_id: image_pool_id,
            handle_cluster: t.handle.cluster_id().to_owned(),
            handle_pool_id: t.handle.pool_id(),
            resolves: t
                .candidates
                .iter()
                .map(|c| format!("cluster {:?} pool id {}", c.cluster_id, c.pool_id))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if let Some(ns) = &t.namespace_attribute
        && *ns != cand.namespace
    {
        return Err(PvProblem::NamespaceMismatch {
            attribute: ns.clone(),
            cluster_id: cand.cluster_id.clone(),
            config: cand.namespace.clone(),
        });
    }
    let journal_pool_id = if t.journal_pool == t.pool {
        image_pool_id
    } else {
        lookup
            .pool_id(&t.journal_pool)?
            .ok_or_else(|| PvProblem::PoolMissing {
                pool: t.journal_pool.clone(),
                what: "journalPool",
            })?
    };
    let image_id = lookup
        .image_id(image_pool_id, &t.pool, &cand.namespace, &t.image_name)?
        .ok_or_else(|| PvProblem::ImageMissing {
            spec: spec(&t.pool, &cand.namespace, Some(&t.image_name)),
        })?;
    Ok(Resolved {
        entry: Entry {
            uuid: t.handle.uuid().to_owned(),
            pv_name: t.pv_name.clone(),
            image_name: t.image_name.clone(),
            image_id,
            owner: t.owner.clone(),
            encryption: t.encryption.clone(),
        },
        journal: PoolRef {
            id: journal_pool_id,
            name: t.journal_pool.clone(),
        },
        image: PoolRef {
            id: image_pool_id,
            name: t.pool.clone(),
        },
        namespace: cand.namespace.clone(),
        cluster_id: cand.cluster_id.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::journal::{Outcome, Placement, Stored, diff};
    use crate::manifest;

    const DRIVER: &str = "rook-ceph.rbd.csi.ceph.com";
    const UUID: &str = "92837648-1431-11eb-8990-0242ac110005";

    /// `kubectl get pv -o yaml` of a Rook-provisioned RBD PV on the primary
    /// cluster (cluster ID `rook-ceph`, pool id 2), and of a static PV, in
    /// one List as kubectl writes it.
    const ROOK_LIST: &str = r#"apiVersion: v1
items:
- apiVersion: v1
  kind: PersistentVolume
  metadata:
    annotations:
      pv.kubernetes.io/provisioned-by: rook-ceph.rbd.csi.ceph.com
      volume.kubernetes.io/provisioner-deletion-secret-name: rook-csi-rbd-provisioner
      volume.kubernetes.io/provisioner-deletion-secret-namespace: rook-ceph
    creationTimestamp: "2024-05-02T09:13:41Z"
    finalizers:
    - kubernetes.io/pv-protection
    name: pvc-4a4c2fa3-086b-49fc-a1ef-fd8b0768f4b1
    resourceVersion: "4411"
    uid: 0f2c3a51-5d0e-4b59-9d1e-2b8a4c4d1c11
  spec:
    accessModes:
    - ReadWriteOnce
    capacity:
      storage: 1Gi
    claimRef:
      apiVersion: v1
      kind: PersistentVolumeClaim
      name: rbd-pvc
      namespace: apps
      resourceVersion: "4398"
      uid: 4a4c2fa3-086b-49fc-a1ef-fd8b0768f4b1
    csi:
      controllerExpandSecretRef:
        name: rook-csi-rbd-provisioner
        namespace: rook-ceph
      driver: rook-ceph.rbd.csi.ceph.com
      fsType: ext4
      nodeStageSecretRef:
        name: rook-csi-rbd-node
        namespace: rook-ceph
      volumeAttributes:
        clusterID: rook-ceph
        imageFeatures: layering
        imageFormat: "2"
        imageName: csi-vol-92837648-1431-11eb-8990-0242ac110005
        journalPool: replicapool
        pool: replicapool
        storage.kubernetes.io/csiProvisionerIdentity: 1603348800044-8081-rook-ceph.rbd.csi.ceph.com
      volumeHandle: 0001-0009-rook-ceph-0000000000000002-92837648-1431-11eb-8990-0242ac110005
    persistentVolumeReclaimPolicy: Delete
    storageClassName: rook-ceph-block
    volumeMode: Filesystem
  status:
    phase: Bound
- apiVersion: v1
  kind: PersistentVolume
  metadata:
    name: static-pv
  spec:
    accessModes:
    - ReadWriteOnce
    capacity:
      storage: 1Gi
    csi:
      driver: rook-ceph.rbd.csi.ceph.com
      fsType: ext4
      nodeStageSecretRef:
        name: rook-csi-rbd-node
        namespace: rook-ceph
      volumeAttributes:
        clusterID: rook-ceph
        pool: replicapool
        staticVolume: "true"
        imageFeatures: layering
      volumeHandle: static-image
    persistentVolumeReclaimPolicy: Retain
    volumeMode: Filesystem
- apiVersion: v1
  kind: PersistentVolume
  metadata:
    name: pvc-cephfs
  spec:
    csi:
      driver: rook-ceph.cephfs.csi.ceph.com
      volumeHandle: 0001-0009-rook-ceph-0000000000000001-1b7f2a3e-0000-11ec-a251-0242ac110002
kind: List
metadata:
  resourceVersion: ""
"#;

    /// A PV as the upstream ceph-csi (non-Rook) deployment writes it, with a
    /// separate journal pool, a RADOS namespace, encryption and a name prefix.
    const CEPH_CSI_JSON: &str = r#"{
      "apiVersion": "v1",
      "kind": "PersistentVolume",
      "metadata": {"name": "pvc-0b0f3a4d-7e1c-4f3e-9d55-6a1b2c3d4e5f"},
      "spec": {
        "claimRef": {"kind": "PersistentVolumeClaim", "name": "data", "namespace": "db"},
        "csi": {
          "driver": "rbd.csi.ceph.com",
          "volumeAttributes": {
            "clusterID": "b9127830-b0cc-4e34-aa47-9d1a2e9949a8",
            "encrypted": "true",
            "encryptionKMSID": "vault-test",
            "imageName": "team-a-6e696bba-064f-11ec-a251-0242ac110002",
            "journalPool": "rbd-journal",
            "pool": "rbd-fast",
            "radosNamespace": "team-a",
            "volumeNamePrefix": "team-a-"
          },
          "volumeHandle": "0001-0024-b9127830-b0cc-4e34-aa47-9d1a2e9949a8-0000000000000006-6e696bba-064f-11ec-a251-0242ac110002"
        }
      }
    }"#;

    struct Site {
        config: CsiConfig,
        mapping: ClusterMapping,
    }

    fn rook_dr() -> Site {
        Site {
            config: CsiConfig::from_json(
                r#"[{"clusterID":"rook-ceph","monitors":["10.0.0.1:6789"],"rbd":{"radosNamespace":""}},
                    {"clusterID":"rook-ceph-secondary","monitors":["10.1.0.1:6789"]}]"#,
            )
            .unwrap(),
            mapping: ClusterMapping::from_json(
                r#"[{"clusterIDMapping":{"rook-ceph":"rook-ceph-secondary"},"RBDPoolIDMapping":[{"2":"5"}]}]"#,
            )
            .unwrap(),
        }
    }

    fn ctx<'a>(site: &'a Site, driver: &'a str, local: &str) -> PlanContext<'a> {
        PlanContext {
            driver,
            csi_config: &site.config,
            mapping: &site.mapping,
            local: site.config.cluster(local).unwrap(),
        }
    }

    /// A recorded cluster: pool ids and image ids.
    #[derive(Default)]
    struct FakeCluster {
        pools: BTreeMap<String, i64>,
        images: BTreeMap<(i64, String, String), String>,
    }

    impl Lookup for FakeCluster {
        fn pool_id(&self, name: &str) -> Result<Option<i64>, OmapError> {
            Ok(self.pools.get(name).copied())
        }
        fn image_id(
            &self,
            pool_id: i64,
            _pool: &str,
            ns: &str,
            image: &str,
        ) -> Result<Option<String>, OmapError> {
            Ok(self
                .images
                .get(&(pool_id, ns.to_owned(), image.to_owned()))
                .cloned())
        }
    }

    fn objects(text: &str) -> Vec<Value> {
        manifest::parse(text, "t")
            .unwrap()
            .into_iter()
            .map(|o| o.value)
            .collect()
    }

    fn target(v: Verdict) -> PvTarget {
        match v {
            Verdict::Target(t) => *t,
            other => panic!("not a target: {other:?}"),
        }
    }

    fn problem(v: Verdict) -> PvProblem {
        match v {
            Verdict::Reject(p) => p,
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn rook_list_on_the_secondary_through_the_mapping() {
        let site = rook_dr();
        let c = ctx(&site, DRIVER, "rook-ceph-secondary");
        let objs = objects(ROOK_LIST);
        assert_eq!(objs.len(), 3);

        let t = target(examine(&objs[0], &c));
        assert_eq!(t.pv_name, "pvc-4a4c2fa3-086b-49fc-a1ef-fd8b0768f4b1");
        assert_eq!(t.owner.as_deref(), Some("apps"));
        assert_eq!(t.image_name, format!("csi-vol-{UUID}"));
        assert_eq!(
            t.candidates,
            vec![Candidate {
                cluster_id: "rook-ceph-secondary".into(),
                pool_id: 5,
                namespace: String::new()
            }]
        );
        assert!(matches!(
            examine(&objs[1], &c),
            Verdict::Ignore(IgnoreReason::StaticVolume)
        ));
        assert!(matches!(
            examine(&objs[2], &c),
            Verdict::Ignore(IgnoreReason::OtherDriver(_))
        ));

        let mut cluster = FakeCluster::default();
        cluster.pools.insert("replicapool".into(), 5);
        let img = (5, String::new(), format!("csi-vol-{UUID}"));
        // The image has not arrived yet: a failure that writes nothing.
        let p = resolve(&t, &cluster).unwrap_err();
        assert!(matches!(p, PvProblem::ImageMissing { .. }), "{p}");
        assert!(
            p.to_string()
                .contains(&format!("replicapool/csi-vol-{UUID}"))
        );

        cluster.images.insert(img, "5e4a1b2c3d".into());
        let r = resolve(&t, &cluster).unwrap();
        assert_eq!(r.cluster_id, "rook-ceph-secondary");
        assert_eq!(r.image.id, 5);
        assert_eq!(r.journal.id, 5);
        assert_eq!(r.entry.uuid, UUID);
        assert_eq!(r.entry.image_id, "5e4a1b2c3d");

        // What would be written on an empty cluster: exactly ceph-csi's keys.
        let at = Placement {
            instance: "default".into(),
            journal_pool_id: r.journal.id,
            journal_spec: "replicapool".into(),
            image_pool_id: r.image.id,
            image_spec: "replicapool".into(),
        };
        let plan = diff(&r.entry, &at, &Stored::default()).unwrap();
        assert_eq!(plan.outcome, Outcome::Created);
        let set: BTreeMap<String, String> = plan.volume.unwrap().set.into_iter().collect();
        assert_eq!(
            set,
            BTreeMap::from([
                ("csi.imageid".into(), "5e4a1b2c3d".into()),
                ("csi.imagename".into(), format!("csi-vol-{UUID}")),
                (
                    "csi.volname".into(),
                    "pvc-4a4c2fa3-086b-49fc-a1ef-fd8b0768f4b1".into()
                ),
                ("csi.volume.owner".into(), "apps".into()),
            ])
        );
        assert_eq!(
            plan.directory.unwrap().set,
            vec![(
                "csi.volume.pvc-4a4c2fa3-086b-49fc-a1ef-fd8b0768f4b1".into(),
                UUID.into()
            )]
        );
    }

    #[test]
    fn same_pv_on_the_primary_resolves_to_its_own_pool() {
        let site = rook_dr();
        let c = ctx(&site, DRIVER, "rook-ceph");
        let t = target(examine(&objects(ROOK_LIST)[0], &c));
        assert_eq!(t.candidates[0].cluster_id, "rook-ceph");
        assert_eq!(t.candidates[0].pool_id, 2);
        let mut cluster = FakeCluster::default();
        cluster.pools.insert("replicapool".into(), 2);
        cluster
            .images
            .insert((2, String::new(), format!("csi-vol-{UUID}")), "abc".into());
        assert_eq!(resolve(&t, &cluster).unwrap().cluster_id, "rook-ceph");
    }

    #[test]
    fn unmapped_pool_id_is_explained() {
        let site = rook_dr();
        let c = ctx(&site, DRIVER, "rook-ceph-secondary");
        let t = target(examine(&objects(ROOK_LIST)[0], &c));
        let mut cluster = FakeCluster::default();
        cluster.pools.insert("replicapool".into(), 7);
        let p = resolve(&t, &cluster).unwrap_err();
        let msg = p.to_string();
        assert!(matches!(p, PvProblem::PoolNotMapped { .. }));
        assert!(msg.contains(r#"{"2": "7"}"#), "{msg}");
    }

    #[test]
    fn ceph_csi_pv_with_journal_pool_namespace_and_encryption() {
        let site = Site {
            config: CsiConfig::from_json(
                r#"[{"clusterID":"b9127830-b0cc-4e34-aa47-9d1a2e9949a8","monitors":["192.168.1.1:6789"],"rbd":{"radosNamespace":"team-a"}}]"#,
            )
            .unwrap(),
            mapping: ClusterMapping::default(),
        };
        let c = ctx(
            &site,
            "rbd.csi.ceph.com",
            "b9127830-b0cc-4e34-aa47-9d1a2e9949a8",
        );
        let t = target(examine(&objects(CEPH_CSI_JSON)[0], &c));
        assert_eq!(t.journal_pool, "rbd-journal");
        assert_eq!(
            t.encryption,
            Some(Encryption {
                kms_id: "vault-test".into(),
                kind: "block".into()
            })
        );
        let mut cluster = FakeCluster::default();
        cluster.pools.insert("rbd-fast".into(), 6);
        cluster.pools.insert("rbd-journal".into(), 3);
        cluster
            .images
            .insert((6, "team-a".into(), t.image_name.clone()), "77aa".into());
        let r = resolve(&t, &cluster).unwrap();
        assert_eq!((r.journal.id, r.image.id), (3, 6));
        assert_eq!(r.namespace, "team-a");
        assert_eq!(
            r.image_spec(),
            "rbd-fast/team-a/team-a-6e696bba-064f-11ec-a251-0242ac110002"
        );

        // The namespace in config.json wins; a PV that disagrees fails.
        let other = CsiConfig::from_json(
            r#"[{"clusterID":"b9127830-b0cc-4e34-aa47-9d1a2e9949a8","monitors":["192.168.1.1:6789"]}]"#,
        )
        .unwrap();
        let site2 = Site {
            config: other,
            mapping: ClusterMapping::default(),
        };
        let c2 = ctx(
            &site2,
            "rbd.csi.ceph.com",
            "b9127830-b0cc-4e34-aa47-9d1a2e9949a8",
        );
        let t2 = target(examine(&objects(CEPH_CSI_JSON)[0], &c2));
        let p = resolve(&t2, &cluster).unwrap_err();
        assert!(matches!(p, PvProblem::NamespaceMismatch { .. }), "{p}");
    }

    fn rook_pv(edit: impl FnOnce(&mut Value)) -> Value {
        let mut v = objects(ROOK_LIST).remove(0);
        edit(&mut v);
        v
    }

    #[test]
    fn bad_pvs_are_rejected_with_the_reason() {
        let site = rook_dr();
        let c = ctx(&site, DRIVER, "rook-ceph-secondary");
        let cases: Vec<(Value, &str)> = vec![
            (
                serde_json::json!({"kind": "PersistentVolumeClaim", "metadata": {"name": "x"}}),
                "not a PersistentVolume (kind \"PersistentVolumeClaim\")",
            ),
            (
                serde_json::json!({"metadata": {"name": "x"}}),
                "kind missing",
            ),
            (
                rook_pv(|v| v["metadata"]["name"] = Value::Null),
                "metadata.name is missing",
            ),
            (
                rook_pv(|v| {
                    v["spec"]["csi"]["volumeAttributes"]
                        .as_object_mut()
                        .unwrap()
                        .remove("pool");
                }),
                "volumeAttributes.pool is missing",
            ),
            (
                rook_pv(|v| v["spec"]["csi"]["volumeHandle"] = "0001-0009-rook-ceph-zz".into()),
                "spec.csi.volumeHandle: invalid volume handle",
            ),
            (
                rook_pv(|v| v["spec"]["csi"]["volumeHandle"] = Value::Null),
                "spec.csi.volumeHandle is missing",
            ),
            (
                rook_pv(|v| v["spec"]["csi"]["volumeAttributes"]["imageName"] = "csi-vol-x".into()),
                "does not end with the handle's uuid",
            ),
            (
                rook_pv(|v| v["spec"]["csi"]["volumeAttributes"]["clusterID"] = "elsewhere".into()),
                "neither the handle's cluster ID",
            ),
            (
                rook_pv(|v| {
                    v["spec"]["csi"]["volumeHandle"] =
                        format!("0001-0007-unknown-0000000000000002-{UUID}").into();
                    v["spec"]["csi"]["volumeAttributes"]["clusterID"] = "unknown".into();
                }),
                "is not configured on this site",
            ),
        ];
        for (obj, want) in cases {
            let msg = problem(examine(&obj, &c)).to_string();
            assert!(msg.contains(want), "{want:?} not in {msg:?}");
        }
    }

    #[test]
    fn handle_of_another_cluster_without_mapping_is_not_ours() {
        let site = Site {
            config: rook_dr().config,
            mapping: ClusterMapping::default(),
        };
        let c = ctx(&site, DRIVER, "rook-ceph-secondary");
        let msg = problem(examine(&objects(ROOK_LIST)[0], &c)).to_string();
        assert!(
            msg.contains("not to cluster \"rook-ceph-secondary\""),
            "{msg}"
        );
    }

    #[test]
    fn ignored_pvs() {
        let site = rook_dr();
        let c = ctx(&site, DRIVER, "rook-ceph-secondary");
        let deleting = rook_pv(|v| {
            v["metadata"]["deletionTimestamp"] = "2024-05-02T10:00:00Z".into();
        });
        assert!(matches!(
            examine(&deleting, &c),
            Verdict::Ignore(IgnoreReason::BeingDeleted)
        ));
        let hostpath = serde_json::json!({"kind": "PersistentVolume", "metadata": {"name": "h"},
            "spec": {"hostPath": {"path": "/data"}}});
        assert!(matches!(
            examine(&hostpath, &c),
            Verdict::Ignore(IgnoreReason::NotCsi)
        ));
        // A PV whose claim was cleared is still generated, without owner.
        let unbound = rook_pv(|v| {
            v["spec"].as_object_mut().unwrap().remove("claimRef");
        });
        assert_eq!(target(examine(&unbound, &c)).owner, None);
    }
}
