//! Bad input gets the gRPC code the csi-addons spec gives, and changes
//! nothing in the clusters: per volume (`bad_requests_get_precise_codes_and_
//! change_nothing`), and over both whole clusters for every RPC
//! (`exclusive_malformed_requests_change_nothing_in_either_cluster`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;

use common::*;
use csi_rbd_replicator::engine::registry::REGISTRY_OBJECT;
use csi_rbd_replicator::grpc::proto::replication as pb;
use csi_rbd_replicator::grpc::proto::replication::controller_client::ControllerClient;
use tonic::Code;
use tonic::transport::Channel;

/// Registry keys and snapshots of an image: what must not change.
fn footprint(image: &str) -> (Vec<String>, Vec<String>) {
    let io = ioctx(Site::A, "");
    let id = csi_rbd_replicator::ceph::Image::open_read_only(&io, image, None)
        .and_then(|i| i.id())
        .expect("image id");
    let keys = io
        .omap_get_all(REGISTRY_OBJECT, "")
        .map(|m| m.into_keys().filter(|k| k.contains(&id)).collect())
        .unwrap_or_default();
    (keys, snapshots(Site::A, image))
}

#[tokio::test]
async fn bad_requests_get_precise_codes_and_change_nothing() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let name = unique("err");
    create_image(Site::A, &name, 8 << 20, &[(0, 4096)]);
    let (vol, _) = create_csi_volume(Site::A, 8 << 20, &[(0, 4096)]);
    let good = format!("{}/{name}", pool());
    let before_a = footprint(&name);
    let before_v = footprint(&vol.image);
    let mut c = a.controller().await;

    let missing_uuid = format!(
        "{}{}",
        &vol.handle[..vol.handle.len() - 36],
        uuid::Uuid::new_v4()
    );
    let cases: Vec<(&str, pb::EnableVolumeReplicationRequest, Code)> = vec![
        (
            "empty volume ID",
            enable_req(Site::A, "", &[]),
            Code::InvalidArgument,
        ),
        (
            "malformed handle",
            enable_req(
                Site::A,
                "0001-0006-site-a-zz-not-a-handle-at-all-00000000000000000000",
                &[],
            ),
            Code::InvalidArgument,
        ),
        (
            "snapshot spec",
            enable_req(Site::A, &format!("{good}@s"), &[]),
            Code::InvalidArgument,
        ),
        (
            "unknown mirroringMode",
            enable_req(Site::A, &good, &[("mirroringMode", "magic")]),
            Code::InvalidArgument,
        ),
        (
            "bad interval",
            enable_req(Site::A, &good, &[("schedulingInterval", "5x")]),
            Code::InvalidArgument,
        ),
        (
            "bad start time",
            enable_req(
                Site::A,
                &good,
                &[
                    ("schedulingInterval", "1h"),
                    ("schedulingStartTime", "yesterday"),
                ],
            ),
            Code::InvalidArgument,
        ),
        (
            "unknown image",
            enable_req(Site::A, &format!("{}/{}", pool(), unique("nope")), &[]),
            Code::NotFound,
        ),
        (
            "unknown pool",
            enable_req(Site::A, "no-such-pool/img", &[]),
            Code::NotFound,
        ),
        (
            "unknown uuid",
            enable_req(Site::A, &missing_uuid, &[]),
            Code::NotFound,
        ),
        (
            "handle of unknown cluster",
            enable_req(
                Site::A,
                &format!("0001-0004-nope-0000000000000001-{}", uuid::Uuid::new_v4()),
                &[],
            ),
            Code::NotFound,
        ),
        (
            "half secrets",
            pb::EnableVolumeReplicationRequest {
                secrets: HashMap::from([("userID".into(), "csi-rbd-provisioner".into())]),
                ..enable_req(Site::A, &good, &[])
            },
            Code::InvalidArgument,
        ),
        (
            "wrong key",
            pb::EnableVolumeReplicationRequest {
                secrets: HashMap::from([
                    ("userID".into(), "csi-rbd-provisioner".into()),
                    (
                        "userKey".into(),
                        "AQBrS0xgAAAAABAAq9pY4D4F6Nf2C4Mx3Xe6Mw==".into(),
                    ),
                ]),
                ..enable_req(Site::A, &good, &[])
            },
            Code::Unauthenticated,
        ),
        (
            "unknown user",
            pb::EnableVolumeReplicationRequest {
                secrets: HashMap::from([
                    ("userID".into(), "nobody".into()),
                    (
                        "userKey".into(),
                        "AQBrS0xgAAAAABAAq9pY4D4F6Nf2C4Mx3Xe6Mw==".into(),
                    ),
                ]),
                ..enable_req(Site::A, &good, &[])
            },
            Code::Unauthenticated,
        ),
    ];
    for (what, req, code) in cases {
        let err = c.enable_volume_replication(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(!err.message().is_empty(), "{what}: empty message");
    }
    // The same validation guards the other RPCs.
    let err = c
        .get_volume_replication_info(info_req(Site::A, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .get_volume_replication_info(info_req(Site::A, &good))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "not enabled: {err:?}");
    let err = c
        .promote_volume(pb::PromoteVolumeRequest {
            replication_source: source(&missing_uuid),
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    assert_eq!(
        footprint(&name),
        before_a,
        "a failed request changed the cluster"
    );
    assert_eq!(
        footprint(&vol.image),
        before_v,
        "a failed request changed the cluster"
    );
}

#[tokio::test]
async fn deprecated_volume_id_field_still_works() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let name = unique("old");
    create_image(Site::A, &name, 8 << 20, &[(0, 4096)]);
    let vid = format!("{}/{name}", pool());
    #[allow(deprecated)]
    let req = pb::EnableVolumeReplicationRequest {
        volume_id: vid.clone(),
        secrets: secrets(Site::A),
        ..Default::default()
    };
    a.controller()
        .await
        .enable_volume_replication(req)
        .await
        .expect("enable through volume_id = 1");
    // The first sync snapshot follows Enable in the background.
    first_sync(&ioctx(Site::A, ""), &name);
}

/// Everything of a cluster a request could change, read as admin: per pool
/// and RADOS namespace, every object's name (`rados ls --all`, the native
/// CLI), the omap keys and values of every object but RBD data objects
/// (this crate's registry and leases, ceph-csi's journal, `rbd_directory`,
/// `rbd_mirroring`, image headers: their snapshots, mirror state and
/// metadata), and the snapshot list of every image.
fn cluster_listing(site: Site) -> BTreeMap<String, String> {
    let cluster = admin(site);
    let mut out = BTreeMap::new();
    for pool in cluster.pool_list().expect("pools") {
        let ls = Command::new("rados")
            .arg("-c")
            .arg(site.conf())
            .arg("--keyring")
            .arg(site.keyring())
            .args(["-p", &pool, "ls", "--all"])
            .output()
            .expect("rados runs");
        assert!(
            ls.status.success(),
            "rados ls {pool}: {}",
            String::from_utf8_lossy(&ls.stderr)
        );
        for line in String::from_utf8_lossy(&ls.stdout).lines() {
            let (ns, obj) = line.split_once('\t').unwrap_or(("", line));
            let at = format!("{pool}/{ns}/{obj}");
            out.insert(at.clone(), "object".to_string());
            if obj.starts_with("rbd_data.") {
                continue;
            }
            let io = cluster.ioctx(&pool, ns).expect("ioctx");
            match io.omap_get_all(obj, "") {
                Ok(omap) => {
                    for (k, v) in omap {
                        out.insert(format!("{at} omap {k}"), format!("{v:?}"));
                    }
                }
                // Gone meanwhile: the object list says it differs anyway.
                Err(e) if e.is_not_found() => {}
                Err(e) => panic!("omap of {at}: {e}"),
            }
            if let Some(image) = obj.strip_prefix("rbd_id.") {
                let snaps = csi_rbd_replicator::ceph::Image::open_read_only(&io, image, None)
                    .and_then(|i| i.snap_list())
                    .map(|l| {
                        l.into_iter()
                            .map(|s| format!("{}@{}:{}", s.name, s.id, s.size))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|e| format!("cannot open: {e}"));
                out.insert(format!("{pool}/{ns}/{image} snapshots"), snaps);
            }
        }
    }
    out
}

/// The differences between two listings, for the assertion message.
fn listing_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut d = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => d.push(format!("- {k} = {v}")),
            Some(w) if w != v => d.push(format!("~ {k}: {v} -> {w}")),
            Some(_) => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            d.push(format!("+ {k} = {v}"));
        }
    }
    d.join("\n")
}

/// The RPCs of the replication Controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    Enable,
    Disable,
    Promote,
    Demote,
    Resync,
    Info,
    Destination,
}

const ALL_RPCS: [Rpc; 7] = [
    Rpc::Enable,
    Rpc::Disable,
    Rpc::Promote,
    Rpc::Demote,
    Rpc::Resync,
    Rpc::Info,
    Rpc::Destination,
];

/// The fields every request has (GetReplicationDestinationInfo has no
/// deprecated `volume_id`, and only Enable and Promote read parameters).
#[derive(Clone, Default)]
struct Fields {
    volume_id: String,
    source: Option<pb::ReplicationSource>,
    secrets: HashMap<String, String>,
    params: HashMap<String, String>,
}

async fn call(c: &mut ControllerClient<Channel>, rpc: Rpc, f: Fields) -> Result<(), tonic::Status> {
    #[allow(deprecated)]
    let r = match rpc {
        Rpc::Enable => c
            .enable_volume_replication(pb::EnableVolumeReplicationRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                parameters: f.params,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Disable => c
            .disable_volume_replication(pb::DisableVolumeReplicationRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                parameters: f.params,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Promote => c
            .promote_volume(pb::PromoteVolumeRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                parameters: f.params,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Demote => c
            .demote_volume(pb::DemoteVolumeRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                parameters: f.params,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Resync => c
            .resync_volume(pb::ResyncVolumeRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                parameters: f.params,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Info => c
            .get_volume_replication_info(pb::GetVolumeReplicationInfoRequest {
                volume_id: f.volume_id,
                replication_source: f.source,
                secrets: f.secrets,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Destination => c
            .get_replication_destination_info(pb::GetReplicationDestinationInfoRequest {
                replication_source: f.source,
                secrets: f.secrets,
            })
            .await
            .map(drop),
    };
    r
}

/// Parameters of a VolumeReplicationClass.
type Params<'a> = &'a [(&'a str, &'a str)];

/// `(what, rpc, request, code)` for every RPC and every bad input that
/// applies to it.
fn malformed_cases(good: &str, enabled: &str, handle: &str) -> Vec<(String, Rpc, Fields, Code)> {
    let ok = secrets(Site::A);
    let with = |vid: &str| Fields {
        source: source(vid),
        secrets: ok.clone(),
        ..Default::default()
    };
    let missing_uuid = format!("{}{}", &handle[..handle.len() - 36], uuid::Uuid::new_v4());
    let key = |user: &str, key: &str| {
        HashMap::from([
            ("userID".to_string(), user.to_string()),
            ("userKey".to_string(), key.to_string()),
        ])
    };
    // Wrong for every RPC alike: the volume and the secrets.
    let shapes: Vec<(&str, Fields, Code)> = vec![
        (
            "no volume at all",
            Fields {
                secrets: ok.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "replication_source without a type",
            Fields {
                source: Some(pb::ReplicationSource { r#type: None }),
                secrets: ok.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        ("empty volume ID", with(""), Code::InvalidArgument),
        (
            "volume group source with a malformed group ID",
            Fields {
                source: Some(pb::ReplicationSource {
                    r#type: Some(pb::replication_source::Type::Volumegroup(
                        pb::replication_source::VolumeGroupSource {
                            volume_group_id: "group-1".into(),
                        },
                    )),
                }),
                secrets: ok.clone(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            "malformed handle",
            with("0001-0006-site-a-zz-not-a-handle-at-all-00000000000000000000"),
            Code::InvalidArgument,
        ),
        (
            "handle with a NUL",
            with(&format!("{}\0", handle)),
            Code::InvalidArgument,
        ),
        (
            "snapshot spec",
            with(&format!("{good}@snap")),
            Code::InvalidArgument,
        ),
        (
            "too many path parts",
            with(&format!("{good}/x/y")),
            Code::InvalidArgument,
        ),
        (
            "empty image name",
            with(&format!("{}/", pool())),
            Code::InvalidArgument,
        ),
        (
            "64 KiB volume ID",
            with(&"x".repeat(64 << 10)),
            Code::InvalidArgument,
        ),
        ("unknown pool", with("no-such-pool/img"), Code::NotFound),
        (
            "unknown image",
            with(&format!("{}/{}", pool(), unique("nope"))),
            Code::NotFound,
        ),
        ("unknown uuid", with(&missing_uuid), Code::NotFound),
        (
            "handle of an unknown cluster",
            with(&format!(
                "0001-0004-nope-0000000000000001-{}",
                uuid::Uuid::new_v4()
            )),
            Code::NotFound,
        ),
        (
            "userID without userKey",
            Fields {
                secrets: HashMap::from([("userID".into(), "csi-rbd-provisioner".into())]),
                ..with(good)
            },
            Code::InvalidArgument,
        ),
        (
            "userKey without userID",
            Fields {
                secrets: HashMap::from([("userKey".into(), ok["userKey"].clone())]),
                ..with(good)
            },
            Code::InvalidArgument,
        ),
        (
            "a key that is not a cephx key",
            Fields {
                secrets: key("csi-rbd-provisioner", "bm90IGEga2V5"),
                ..with(good)
            },
            Code::InvalidArgument,
        ),
        (
            "a key with a newline inside",
            Fields {
                secrets: key(
                    "csi-rbd-provisioner",
                    "AQBrS0xgAAAAABAA\nq9pY4D4F6Nf2C4Mx3Xe6Mw==",
                ),
                ..with(good)
            },
            Code::InvalidArgument,
        ),
        (
            "wrong key",
            Fields {
                secrets: key(
                    "csi-rbd-provisioner",
                    "AQBrS0xgAAAAABAAq9pY4D4F6Nf2C4Mx3Xe6Mw==",
                ),
                ..with(enabled)
            },
            Code::Unauthenticated,
        ),
        (
            "unknown user",
            Fields {
                secrets: key("nobody", "AQBrS0xgAAAAABAAq9pY4D4F6Nf2C4Mx3Xe6Mw=="),
                ..with(enabled)
            },
            Code::Unauthenticated,
        ),
    ];
    let mut cases = Vec::new();
    for rpc in ALL_RPCS {
        for (what, f, code) in &shapes {
            cases.push((what.to_string(), rpc, f.clone(), *code));
        }
        if rpc != Rpc::Destination {
            // The deprecated field naming another volume than the source.
            let differ = Fields {
                volume_id: good.to_string(),
                ..with(enabled)
            };
            cases.push((
                "volume_id and source differ".into(),
                rpc,
                differ,
                Code::InvalidArgument,
            ));
            let deprecated_garbage = Fields {
                volume_id: "not//a/volume".into(),
                secrets: ok.clone(),
                ..Default::default()
            };
            cases.push((
                "garbage deprecated volume_id".into(),
                rpc,
                deprecated_garbage,
                Code::InvalidArgument,
            ));
        }
    }
    // Parameters: Enable and Promote read the class' parameters.
    let params: [(&str, Params, Code); 7] = [
        (
            "unknown mirroringMode",
            &[("mirroringMode", "magic")],
            Code::InvalidArgument,
        ),
        (
            "bad interval",
            &[("schedulingInterval", "5x")],
            Code::InvalidArgument,
        ),
        (
            "zero interval",
            &[("schedulingInterval", "0m")],
            Code::InvalidArgument,
        ),
        (
            "bad start time",
            &[
                ("schedulingInterval", "1h"),
                ("schedulingStartTime", "yesterday"),
            ],
            Code::InvalidArgument,
        ),
        (
            "bad flattenMode",
            &[("flattenMode", "sometimes")],
            Code::InvalidArgument,
        ),
        (
            "bad bandwidthLimit",
            &[("bandwidthLimit", "fast")],
            Code::InvalidArgument,
        ),
        (
            "journal mode on a snapshot-mode volume",
            &[("mirroringMode", "journal")],
            Code::FailedPrecondition,
        ),
    ];
    for rpc in [Rpc::Enable, Rpc::Promote] {
        for (what, p, code) in params {
            for vid in [good, enabled] {
                // A valid mode on a volume that is primary already: Promote
                // is the idempotent success the spec asks for (the mode is
                // Enable's business; journal mode ignores the schedule).
                if rpc == Rpc::Promote && vid == enabled && code == Code::FailedPrecondition {
                    continue;
                }
                // Journal mode on a volume not enabled yet is a valid request
                // (it enables it); on the snapshot-mode volume it is refused.
                if vid == good && code == Code::FailedPrecondition {
                    continue;
                }
                let f = Fields {
                    params: p
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    ..with(vid)
                };
                cases.push((format!("{what} on {vid}"), rpc, f, code));
            }
        }
    }
    cases
}

/// Every RPC with every kind of bad input gets its code, and neither
/// cluster changes: the listing of both (see [`cluster_listing`]) is the
/// same before and after. Exclusive: the listing covers the whole clusters,
/// so no other test may change them meanwhile.
#[tokio::test]
async fn exclusive_malformed_requests_change_nothing_in_either_cluster() {
    let a = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let _b = Sidecar::start(Site::B, &["--no-replayer"]).await;
    let name = unique("malformed");
    create_image(Site::A, &name, 8 << 20, &[(0, 4096)]);
    let good = format!("{}/{name}", pool());
    let (vol, _) = create_csi_volume(Site::A, 8 << 20, &[(0, 4096)]);
    let mut c = a.controller().await;
    // An enabled volume too: bad input must not touch its replication state.
    c.enable_volume_replication(enable_req(Site::A, &vol.handle, &[]))
        .await
        .expect("enable");
    // Its first sync snapshot follows Enable in the background: let it land
    // before the clusters are listed.
    first_sync(&ioctx(Site::A, ""), &vol.image);

    let before = [cluster_listing(Site::A), cluster_listing(Site::B)];
    // Nothing else changes the clusters meanwhile (else the comparison
    // below would blame the requests for it).
    let again = [cluster_listing(Site::A), cluster_listing(Site::B)];
    for i in 0..2 {
        assert!(
            before[i] == again[i],
            "the clusters change on their own:\n{}",
            listing_diff(&before[i], &again[i])
        );
    }
    assert!(before[0].keys().any(|k| k.contains(REGISTRY_OBJECT)));
    assert!(
        before[0]
            .keys()
            .any(|k| k.contains(&format!("csi.volume.{}", vol.uuid)))
    );

    let cases = malformed_cases(&good, &vol.handle, &vol.handle);
    let total = cases.len();
    let mut wrong = Vec::new();
    for (what, rpc, fields, code) in cases {
        match call(&mut c, rpc, fields).await {
            Ok(()) => wrong.push(format!("{rpc:?} {what}: succeeded, want {code:?}")),
            Err(s) if s.code() != code || s.message().is_empty() => wrong.push(format!(
                "{rpc:?} {what}: {:?} {:?}, want {code:?}",
                s.code(),
                s.message()
            )),
            Err(_) => {}
        }
    }
    // The peer's sidecar gets them too (site-a's handle names no replica
    // there: no entry for it in site-b's journal).
    let mut cb = _b.controller().await;
    for rpc in ALL_RPCS {
        let f = Fields {
            source: source(&vol.handle),
            secrets: secrets(Site::B),
            ..Default::default()
        };
        if let Ok(()) = call(&mut cb, rpc, f).await {
            wrong.push(format!("{rpc:?} on site-b of site-a's handle: succeeded"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {total} cases wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    let after = [cluster_listing(Site::A), cluster_listing(Site::B)];
    for (i, site) in [Site::A, Site::B].into_iter().enumerate() {
        assert!(
            before[i] == after[i],
            "{total} malformed requests changed {}:\n{}",
            site.id(),
            listing_diff(&before[i], &after[i])
        );
    }
    // The listing does see a change of one omap value (the kind of write a
    // registry or journal update is).
    let probe = unique("listing-probe");
    let io = ioctx(Site::B, "");
    io.omap_set(&probe, &[("k", b"v")]).unwrap();
    let seen = cluster_listing(Site::B);
    io.remove(&probe).unwrap();
    assert_ne!(seen, after[1], "the listing misses an omap write");
    eprintln!(
        "{total} malformed requests; listings of {} and {} entries unchanged",
        after[0].len(),
        after[1].len()
    );
}
