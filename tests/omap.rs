//! The omap generator against the real two-cluster pair: `omap-generate` on
//! PersistentVolume manifests writes exactly ceph-csi's journal entries,
//! changes nothing the second time, never overwrites another volume's entry,
//! rejects bad manifests per PV without touching anything, and makes a
//! site-a handle resolve on site-b through the cluster mapping; the
//! replayer's hook copies an entry from the primary to the replica.
//!
//! Each test uses fresh uuids and PV names, so the tests share the pool's
//! `csi.volumes.default` without seeing each other.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::*;
use csi_rbd_replicator::ceph::{self, Image, IoCtx};
use csi_rbd_replicator::csi::config::{ClusterMapping, CsiConfig};
use csi_rbd_replicator::omap::{self, Outcome};

const MIB: u64 = 1 << 20;

/// Every omap pair of an object (empty when it does not exist).
fn omap_of(io: &IoCtx, oid: &str) -> BTreeMap<String, String> {
    match io.omap_get_all(oid, "") {
        Ok(m) => m
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect(),
        Err(e) if e.is_not_found() => BTreeMap::new(),
        Err(e) => panic!("reading {oid}: {e}"),
    }
}

/// The directory value of `pv` in `io` (`None` when absent).
fn dir_key(io: &IoCtx, pv: &str) -> Option<String> {
    omap_of(io, "csi.volumes.default").remove(&format!("csi.volume.{pv}"))
}

/// What `omap-generate` may touch for one volume: its directory key and its
/// volume object.
fn footprint(io: &IoCtx, pv: &str, uuid: &str) -> (Option<String>, BTreeMap<String, String>) {
    (dir_key(io, pv), omap_of(io, &format!("csi.volume.{uuid}")))
}

fn handle(cluster: &str, pool_id: i64, uuid: &str) -> String {
    format!("0001-{:04x}-{cluster}-{pool_id:016x}-{uuid}", cluster.len())
}

/// A PV as `kubectl get pv -o yaml` shows a ceph-csi RBD volume.
fn pv_yaml(name: &str, handle: &str, attrs: &[(&str, &str)]) -> String {
    let mut a = String::new();
    for (k, v) in attrs {
        a.push_str(&format!("      {k}: \"{v}\"\n"));
    }
    format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata:
  annotations:
    pv.kubernetes.io/provisioned-by: {DRIVER}
  finalizers:
  - kubernetes.io/pv-protection
  name: {name}
spec:
  accessModes:
  - ReadWriteOnce
  capacity:
    storage: 8Mi
  claimRef:
    apiVersion: v1
    kind: PersistentVolumeClaim
    name: data-{name}
    namespace: apps
  csi:
    controllerExpandSecretRef:
      name: csi-rbd-provisioner
      namespace: ceph-csi
    driver: {DRIVER}
    fsType: ext4
    volumeAttributes:
{a}      storage.kubernetes.io/csiProvisionerIdentity: 1714641221512-8081-{DRIVER}
    volumeHandle: {handle}
  persistentVolumeReclaimPolicy: Delete
  storageClassName: csi-rbd-sc
  volumeMode: Filesystem
status:
  phase: Bound
"#
    )
}

/// Standard attributes of a volume in the test pool.
fn attrs<'a>(cluster: &'a str, pool: &'a str, image: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("clusterID", cluster),
        ("imageFeatures", "layering,exclusive-lock"),
        ("imageName", image),
        ("journalPool", pool),
        ("pool", pool),
    ]
}

struct Run {
    ok: bool,
    out: String,
}

/// Runs `omap-generate` on `site` with manifest `text`.
fn generate(site: Site, text: &str, extra: &[&str]) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pv.yaml");
    std::fs::write(&file, text).unwrap();
    generate_files(site, &[&file], extra)
}

fn generate_files(site: Site, files: &[&Path], extra: &[&str]) -> Run {
    let mut args: Vec<&str> = vec!["--pv"];
    args.extend(files.iter().map(|f| f.to_str().unwrap_or_default()));
    args.extend(["--drivername", DRIVER]);
    args.extend(extra.iter().copied());
    let o = cli("omap-generate", site, &args);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Run {
        ok: o.status.success(),
        out,
    }
}

fn new_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn image_id(io: &Arc<IoCtx>, name: &str) -> String {
    Image::open_read_only(io, name, None)
        .and_then(|i| i.id())
        .expect("image id")
}

#[test]
fn generate_creates_exactly_ceph_csis_entries_once() {
    let io = ioctx(Site::B, "");
    let uuid = new_uuid();
    let image = format!("csi-vol-{uuid}");
    create_image(Site::B, &image, 8 * MIB, &[(0, 4096)]);
    let id = image_id(&io, &image);
    let pv = unique("pvc");
    let h = handle("site-b", io.pool_id(), &uuid);
    let yaml = pv_yaml(&pv, &h, &attrs("site-b", &pool(), &image));

    let r = generate(Site::B, &yaml, &[]);
    assert!(r.ok, "{}", r.out);
    assert!(r.out.contains(&format!("{pv}: created")), "{}", r.out);
    assert!(
        r.out
            .contains("1 created, 0 repaired, 0 unchanged, 0 skipped, 0 failed"),
        "{}",
        r.out
    );

    let (dir, vol) = footprint(&io, &pv, &uuid);
    assert_eq!(dir.as_deref(), Some(uuid.as_str()));
    let want: BTreeMap<String, String> = [
        ("csi.volname", pv.as_str()),
        ("csi.imagename", image.as_str()),
        ("csi.imageid", id.as_str()),
        ("csi.volume.owner", "apps"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(vol, want);

    // Again: nothing changes.
    let before = footprint(&io, &pv, &uuid);
    let r = generate(Site::B, &yaml, &[]);
    assert!(r.ok, "{}", r.out);
    assert!(r.out.contains(&format!("{pv}: unchanged")), "{}", r.out);
    assert_eq!(footprint(&io, &pv, &uuid), before);

    // A stale image id (the image was recreated) is repaired, and only it.
    io.omap_set(
        &format!("csi.volume.{uuid}"),
        &[("csi.imageid", b"10a1b2c3d4e5")],
    )
    .unwrap();
    let dry = generate(Site::B, &yaml, &["--dry-run"]);
    assert!(
        dry.ok && dry.out.contains("would be repaired"),
        "{}",
        dry.out
    );
    assert_eq!(
        omap_of(&io, &format!("csi.volume.{uuid}"))["csi.imageid"],
        "10a1b2c3d4e5",
        "a dry run writes nothing"
    );
    let r = generate(Site::B, &yaml, &[]);
    assert!(r.ok, "{}", r.out);
    assert!(
        r.out.contains("repaired (csi.imageid was \"10a1b2c3d4e5\""),
        "{}",
        r.out
    );
    assert_eq!(footprint(&io, &pv, &uuid), before);

    // The handle resolves through the entries, as ceph-csi resolves it.
    let e = omap::journal::read_entry(&io, &io, "default", &pv)
        .unwrap()
        .unwrap();
    assert_eq!(e.directory.uuid, uuid);
    assert_eq!(e.volume.unwrap().image_id(), Some(id.as_str()));
}

#[test]
fn conflicting_entries_are_reported_not_overwritten() {
    let io = ioctx(Site::B, "");
    let uuid = new_uuid();
    let image = format!("csi-vol-{uuid}");
    create_image(Site::B, &image, 8 * MIB, &[]);
    let h = handle("site-b", io.pool_id(), &uuid);

    // The PV name's directory key belongs to another volume.
    let pv = unique("pvc");
    let other = new_uuid();
    io.omap_set(
        "csi.volumes.default",
        &[(&format!("csi.volume.{pv}"), other.as_bytes())],
    )
    .unwrap();
    let before = footprint(&io, &pv, &uuid);
    let r = generate(
        Site::B,
        &pv_yaml(&pv, &h, &attrs("site-b", &pool(), &image)),
        &[],
    );
    assert!(!r.ok, "{}", r.out);
    assert!(
        r.out.contains(&format!("{pv}: FAILED, nothing changed")),
        "{}",
        r.out
    );
    assert!(r.out.contains(&other) && r.out.contains(&uuid), "{}", r.out);
    assert!(r.out.contains("belongs to another volume"), "{}", r.out);
    assert_eq!(footprint(&io, &pv, &uuid), before);
    assert!(before.1.is_empty());

    // csi.volume.<uuid> names another PV.
    let pv2 = unique("pvc");
    io.omap_set(
        &format!("csi.volume.{uuid}"),
        &[
            ("csi.volname", b"pvc-someone-else"),
            ("csi.imagename", image.as_bytes()),
        ],
    )
    .unwrap();
    let before = footprint(&io, &pv2, &uuid);
    let r = generate(
        Site::B,
        &pv_yaml(&pv2, &h, &attrs("site-b", &pool(), &image)),
        &[],
    );
    assert!(!r.ok, "{}", r.out);
    assert!(
        r.out.contains("csi.volname is \"pvc-someone-else\"") && r.out.contains(&pv2),
        "{}",
        r.out
    );
    assert_eq!(footprint(&io, &pv2, &uuid), before);
    assert_eq!(before.0, None);
}

#[test]
fn bad_manifests_get_a_message_per_pv_and_change_nothing() {
    let io = ioctx(Site::B, "");
    let uuid = new_uuid();
    let image = format!("csi-vol-{uuid}");
    create_image(Site::B, &image, 8 * MIB, &[]);
    let h = handle("site-b", io.pool_id(), &uuid);
    let pool = pool();
    let good = attrs("site-b", &pool, &image);
    let no_pool: Vec<_> = good.iter().filter(|(k, _)| *k != "pool").cloned().collect();

    let names: Vec<String> = (0..5).map(|_| unique("pvc")).collect();
    let other_driver = pv_yaml(&names[1], &h, &good).replace(
        &format!("driver: {DRIVER}"),
        "driver: rook-ceph.cephfs.csi.ceph.com",
    );
    let missing_image_uuid = new_uuid();
    let docs = [
        // Not a PV at all.
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {}\n  namespace: apps\n",
            names[0]
        ),
        other_driver,
        pv_yaml(&names[2], &h, &no_pool),
        pv_yaml(
            &names[3],
            "0001-0006-site-b-zz00000000000002-not-a-uuid",
            &good,
        ),
        pv_yaml(
            &names[4],
            &handle("site-b", io.pool_id(), &missing_image_uuid),
            &attrs("site-b", &pool, &format!("csi-vol-{missing_image_uuid}")),
        ),
    ];
    let before: Vec<_> = names.iter().map(|n| footprint(&io, n, &uuid)).collect();
    let r = generate(Site::B, &docs.join("---\n"), &[]);
    assert!(!r.ok, "{}", r.out);
    let line = |n: &str| {
        r.out
            .lines()
            .find(|l| l.starts_with(&format!("{n}:")))
            .unwrap_or_else(|| panic!("no line for {n} in:\n{}", r.out))
            .to_owned()
    };
    let expect = [
        "FAILED, nothing changed: not a PersistentVolume (kind \"PersistentVolumeClaim\")",
        "skipped: driver \"rook-ceph.cephfs.csi.ceph.com\" is not ours",
        "FAILED, nothing changed: spec.csi.volumeAttributes.pool is missing",
        "FAILED, nothing changed: spec.csi.volumeHandle: invalid volume handle",
        "FAILED, nothing changed: image replicapool/csi-vol-",
    ];
    for (n, want) in names.iter().zip(expect) {
        let l = line(n);
        assert!(l.contains(want), "{want:?} not in {l:?}");
        assert!(l.contains("document "), "source missing in {l:?}");
    }
    assert!(
        r.out
            .contains("0 created, 0 repaired, 0 unchanged, 1 skipped, 4 failed"),
        "{}",
        r.out
    );
    let after: Vec<_> = names.iter().map(|n| footprint(&io, n, &uuid)).collect();
    assert_eq!(after, before);
    assert!(omap_of(&io, &format!("csi.volume.{missing_image_uuid}")).is_empty());

    // Skipping another driver's PV is not a failure.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("other.json");
    std::fs::write(
        &f,
        r#"{"apiVersion":"v1","kind":"PersistentVolume","metadata":{"name":"nfs-pv"},
           "spec":{"csi":{"driver":"nfs.csi.k8s.io","volumeHandle":"server#share"}}}"#,
    )
    .unwrap();
    let missing = dir.path().join("missing.yaml");
    let r = generate_files(Site::B, &[&f], &[]);
    assert!(r.ok, "{}", r.out);
    assert!(r.out.contains("nfs-pv: skipped"), "{}", r.out);
    // An unreadable file is a failure of its own.
    let r = generate_files(Site::B, &[&f, &missing], &[]);
    assert!(!r.ok && r.out.contains("missing.yaml"), "{}", r.out);
}

#[test]
fn site_a_handle_is_generated_on_site_b_and_resolves_through_the_mapping() {
    let a = ioctx(Site::A, "");
    let b = ioctx(Site::B, "");
    assert_ne!(a.pool_id(), b.pool_id(), "the pair maps different pool ids");
    let uuid = new_uuid();
    let image = format!("csi-vol-{uuid}");
    // The replica on site-b; the PV (backed up on site-a) carries site-a's
    // handle and cluster ID.
    create_image(Site::B, &image, 8 * MIB, &[(0, 4096)]);
    let pv = unique("pvc");
    let h = handle("site-a", a.pool_id(), &uuid);
    let yaml = pv_yaml(&pv, &h, &attrs("site-a", &pool(), &image));

    // On site-a the image does not exist: nothing is written there.
    let r = generate(Site::A, &yaml, &[]);
    assert!(
        !r.ok && r.out.contains("does not exist on this cluster"),
        "{}",
        r.out
    );
    assert_eq!(footprint(&a, &pv, &uuid), (None, BTreeMap::new()));

    let r = generate(Site::B, &yaml, &[]);
    assert!(r.ok, "{}", r.out);
    assert!(r.out.contains("cluster ID \"site-b\""), "{}", r.out);

    // Resolve the original handle on site-b the way ceph-csi does: the
    // mapping turns (site-a, pool 1) into (site-b, pool 2), whose
    // csi.volume.<uuid> names the image.
    let config = CsiConfig::load(env("CSIRR_CSI_CONFIG")).unwrap();
    let mapping = ClusterMapping::load(env("CSIRR_CLUSTER_MAPPING")).unwrap();
    let hh = csi_rbd_replicator::csi::VolumeHandle::parse(&h).unwrap();
    let loc = mapping
        .local_candidates(&config, hh.cluster_id(), hh.pool_id())
        .unwrap()
        .into_iter()
        .find(|l| l.cluster_id == "site-b")
        .expect("site-a's handle maps to site-b");
    assert_eq!(loc.pool_id, b.pool_id());
    let cluster = admin(Site::B);
    let name = cluster.pool_reverse_lookup(loc.pool_id).unwrap();
    let io = cluster.ioctx_by_id(loc.pool_id, &name, "").unwrap();
    let attrs = omap::journal::read_volume(&io, hh.uuid()).unwrap().unwrap();
    assert_eq!(attrs.image_name(), Some(image.as_str()));
    assert_eq!(attrs.pv_name(), Some(pv.as_str()));
    let img = Image::open_read_only(&io, attrs.image_name().unwrap(), None).unwrap();
    assert_eq!(attrs.image_id(), Some(img.id().unwrap().as_str()));
    assert_eq!(dir_key(&io, &pv).as_deref(), Some(uuid.as_str()));
}

#[test]
fn rados_namespace_of_the_mapped_cluster_is_used() {
    // A Rook-style setup: one cluster ID per RADOS namespace. Site-a's
    // "site-a-ns1" maps to site-b's "site-b-ns1", both in namespace ns1.
    let dir = tempfile::tempdir().unwrap();
    let mons = |site: &str| env(&format!("CSIRR_SITE_{site}_MON"));
    let config = serde_json::json!([
        {"clusterID": "site-a-ns1", "monitors": [mons("A")], "rbd": {"radosNamespace": "ns1"}},
        {"clusterID": "site-b-ns1", "monitors": [mons("B")], "rbd": {"radosNamespace": "ns1"}},
    ]);
    let a_pool = ioctx(Site::A, "").pool_id();
    let b = ioctx(Site::B, "ns1");
    let mapping = serde_json::json!([{
        "clusterIDMapping": {"site-a-ns1": "site-b-ns1"},
        "RBDPoolIDMapping": [{a_pool.to_string(): b.pool_id().to_string()}],
    }]);
    let cfg_path = dir.path().join("config.json");
    let map_path = dir.path().join("cluster-mapping.json");
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    std::fs::write(&map_path, mapping.to_string()).unwrap();

    let uuid = new_uuid();
    let image = format!("csi-vol-{uuid}");
    ceph::rbd::create(&b, &image, 8 * MIB, &ceph::CreateOptions::default()).unwrap();
    let id = image_id(&b, &image);
    let pv = unique("pvc");
    let pool = pool();
    let mut at = attrs("site-a-ns1", &pool, &image);
    at.push(("radosNamespace", "ns1"));
    let yaml = pv_yaml(&pv, &handle("site-a-ns1", a_pool, &uuid), &at);
    let file = dir.path().join("pv.yaml");
    std::fs::write(&file, yaml).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .arg("omap-generate")
        .arg("--pv")
        .arg(&file)
        .args(["--drivername", DRIVER, "--cluster-id", "site-b-ns1"])
        .arg("--csi-config")
        .arg(&cfg_path)
        .arg("--cluster-mapping")
        .arg(&map_path)
        .arg("--secret-dir")
        .arg(Site::B.secret_dir())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(dir_key(&b, &pv).as_deref(), Some(uuid.as_str()));
    assert_eq!(
        omap_of(&b, &format!("csi.volume.{uuid}"))["csi.imageid"],
        id
    );
    // Nothing in the default namespace.
    let default_ns = ioctx(Site::B, "");
    assert_eq!(footprint(&default_ns, &pv, &uuid), (None, BTreeMap::new()));
}

#[test]
fn replicate_entry_copies_the_primarys_entry_with_the_replicas_id() {
    let (vol, _img) = create_csi_volume(Site::A, 8 * MIB, &[(0, 4096)]);
    let a = ioctx(Site::A, "");
    let b = ioctx(Site::B, "");
    create_image(Site::B, &vol.image, 8 * MIB, &[]);
    let replica_id = image_id(&b, &vol.image);
    let primary = omap_of(&a, &format!("csi.volume.{}", vol.uuid));
    let pv = primary["csi.volname"].clone();
    assert_eq!(
        omap::uuid_from_image_name(&vol.image),
        Some(vol.uuid.as_str())
    );

    let out = omap::replicate_entry(&a, &b, &vol.uuid, &replica_id).unwrap();
    assert_eq!(out, Outcome::Created);
    let mut want = primary.clone();
    want.insert("csi.imageid".into(), replica_id.clone());
    assert_eq!(omap_of(&b, &format!("csi.volume.{}", vol.uuid)), want);
    assert_eq!(dir_key(&b, &pv).as_deref(), Some(vol.uuid.as_str()));

    // Idempotent.
    let before = footprint(&b, &pv, &vol.uuid);
    assert_eq!(
        omap::replicate_entry(&a, &b, &vol.uuid, &replica_id).unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(footprint(&b, &pv, &vol.uuid), before);

    // The replica was recreated: its new id replaces the stale one.
    match omap::replicate_entry(&a, &b, &vol.uuid, "1f2e3d4c5b6a").unwrap() {
        Outcome::Repaired(fixes) => assert!(fixes[0].contains("csi.imageid"), "{fixes:?}"),
        o => panic!("{o:?}"),
    }

    // A directory key of another volume is never overwritten.
    let other = new_uuid();
    b.omap_set(
        "csi.volumes.default",
        &[(&format!("csi.volume.{pv}"), other.as_bytes())],
    )
    .unwrap();
    let e = omap::replicate_entry(&a, &b, &vol.uuid, &replica_id).unwrap_err();
    assert!(e.is_conflict(), "{e}");
    assert_eq!(dir_key(&b, &pv).as_deref(), Some(other.as_str()));
    assert_eq!(
        omap_of(&b, &format!("csi.volume.{}", vol.uuid))["csi.imageid"],
        "1f2e3d4c5b6a"
    );

    // An image that is not a ceph-csi volume on the primary.
    let missing = new_uuid();
    let e = omap::replicate_entry(&a, &b, &missing, &replica_id).unwrap_err();
    assert!(
        matches!(e, omap::OmapError::PrimaryEntryMissing { .. }),
        "{e}"
    );
}
