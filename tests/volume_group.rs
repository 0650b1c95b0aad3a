//! Volume groups against the real pair: the librbd group wrappers, and the
//! csi-addons VolumeGroup controller service driven through gRPC as the
//! csi-addons sidecar does, with the native `rbd group` CLI and the omap keys
//! ceph-csi reads as the oracle.

mod common;

use common::*;
use csi_rbd_replicator::ceph::{ErrorKind, group};

const MIB: u64 = 1 << 20;

/// Names of the groups of the test pool, as `rbd group list` sees them.
fn rbd_groups(pool: &str) -> Vec<String> {
    let v = json(&rbd(
        Site::A,
        &["group", "list", "-p", pool, "--format", "json"],
    ));
    let mut names: Vec<String> = v
        .as_array()
        .expect("group list")
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Image names of group `group`, as `rbd group image list` sees them.
fn rbd_group_images(pool: &str, group: &str) -> Vec<String> {
    let spec = format!("{pool}/{group}");
    let v = json(&rbd(
        Site::A,
        &["group", "image", "list", &spec, "--format", "json"],
    ));
    let mut names: Vec<String> = v
        .as_array()
        .expect("group image list")
        .iter()
        .map(|i| i["image"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn librbd_group_wrappers_agree_with_the_rbd_cli() {
    let pool = pool();
    let io = ioctx(Site::A, "");
    let (g1, g2) = (unique("grp"), unique("grp"));
    let (i1, i2) = (unique("gimg"), unique("gimg"));
    let a = create_image(Site::A, &i1, 4 * MIB, &[]);
    let b = create_image(Site::A, &i2, 4 * MIB, &[]);
    let _cleanup = scopeguard({
        let (g1, g2, i1, i2) = (g1.clone(), g2.clone(), i1.clone(), i2.clone());
        let pool = pool.clone();
        move || {
            for g in [&g1, &g2] {
                let _ = rbd(Site::A, &["group", "rm", &format!("{pool}/{g}")]);
            }
            for i in [&i1, &i2] {
                let _ = rbd(Site::A, &["rm", &format!("{pool}/{i}")]);
            }
        }
    });

    group::create(&io, &g1).unwrap();
    group::create(&io, &g2).unwrap();
    let err = group::create(&io, &g1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    let listed = group::list(&io).unwrap();
    assert!(listed.contains(&g1) && listed.contains(&g2), "{listed:?}");
    let cli = rbd_groups(&pool);
    assert!(cli.contains(&g1) && cli.contains(&g2), "{cli:?}");

    assert_eq!(a.group().unwrap(), None);
    group::image_add(&io, &g1, &io, &i1).unwrap();
    group::image_add(&io, &g1, &io, &i2).unwrap();
    let mut members = group::image_list(&io, &g1).unwrap();
    members.sort_by(|x, y| x.name.cmp(&y.name));
    let mut want = vec![i1.clone(), i2.clone()];
    want.sort();
    assert_eq!(
        members.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
        want
    );
    assert!(
        members
            .iter()
            .all(|m| m.pool_id == io.pool_id() && m.state == group::ImageState::Attached),
        "{members:?}"
    );
    assert_eq!(rbd_group_images(&pool, &g1), want);
    assert_eq!(
        a.group().unwrap(),
        Some(group::GroupInfo {
            name: g1.clone(),
            pool_id: io.pool_id()
        })
    );

    // An image belongs to at most one group: librbd refuses the second.
    let err = group::image_add(&io, &g2, &io, &i1).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists, "{err}");
    assert!(rbd_group_images(&pool, &g2).is_empty());

    group::image_remove(&io, &g1, &io, &i1).unwrap();
    assert_eq!(rbd_group_images(&pool, &g1), vec![i2.clone()]);
    assert_eq!(a.group().unwrap(), None);
    // Pacific lists no images for a group that does not exist.
    assert!(
        group::image_list(&io, &unique("no-such-group"))
            .unwrap()
            .is_empty()
    );

    group::remove(&io, &g2).unwrap();
    assert!(!rbd_groups(&pool).contains(&g2));
    // Pacific: removing a group that does not exist succeeds.
    group::remove(&io, &g2).unwrap();
    // Removing a non-empty group detaches its images.
    group::remove(&io, &g1).unwrap();
    assert_eq!(b.group().unwrap(), None);
    assert!(!rbd_groups(&pool).contains(&g1));
}
