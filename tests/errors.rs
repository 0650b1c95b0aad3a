//! Bad input gets the gRPC code the csi-addons spec gives, and changes
//! nothing in the clusters.

mod common;

use std::collections::HashMap;

use common::*;
use csi_rbd_replicator::engine::registry::REGISTRY_OBJECT;
use csi_rbd_replicator::grpc::proto::replication as pb;
use tonic::Code;

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
    assert!(
        snapshots(Site::A, &name)
            .iter()
            .any(|s| s.starts_with("csirr-sync.0000000001"))
    );
}
