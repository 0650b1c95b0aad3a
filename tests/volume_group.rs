//! Volume groups against the real pair: the librbd group wrappers, and the
//! csi-addons VolumeGroup controller service driven through gRPC as the
//! csi-addons sidecar does, with the native `rbd group` CLI and the omap keys
//! ceph-csi reads as the oracle.

mod common;

use std::collections::BTreeMap;

use common::*;
use csi_rbd_replicator::ceph::{ErrorKind, IoCtx, group};
use csi_rbd_replicator::grpc::proto::volumegroup as vg;
use csi_rbd_replicator::grpc::proto::volumegroup::controller_client::ControllerClient as VgClient;
use tonic::Code;
use tonic::transport::Channel;

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

// --- the VolumeGroup service through gRPC ---

/// A VolumeGroup client to a sidecar.
async fn vg_client(sc: &Sidecar) -> VgClient<Channel> {
    VgClient::new(channel_to(&sc.socket).await.expect("connect"))
}

fn create_req(
    name: &str,
    volumes: &[&str],
    params: &[(&str, &str)],
) -> vg::CreateVolumeGroupRequest {
    vg::CreateVolumeGroupRequest {
        name: name.to_string(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        secrets: secrets(Site::A),
        volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
    }
}

fn modify_req(id: &str, volumes: &[&str]) -> vg::ModifyVolumeGroupMembershipRequest {
    vg::ModifyVolumeGroupMembershipRequest {
        volume_group_id: id.to_string(),
        volume_ids: volumes.iter().map(|v| v.to_string()).collect(),
        secrets: secrets(Site::A),
        ..Default::default()
    }
}

fn get_req(id: &str) -> vg::ControllerGetVolumeGroupRequest {
    vg::ControllerGetVolumeGroupRequest {
        volume_group_id: id.to_string(),
        secrets: secrets(Site::A),
    }
}

fn delete_req(id: &str) -> vg::DeleteVolumeGroupRequest {
    vg::DeleteVolumeGroupRequest {
        volume_group_id: id.to_string(),
        secrets: secrets(Site::A),
    }
}

/// Empties group `id` and deletes it, through the service.
async fn empty_and_delete(c: &mut VgClient<Channel>, id: &str) {
    c.modify_volume_group_membership(modify_req(id, &[]))
        .await
        .expect("empty the group");
    c.delete_volume_group(delete_req(id))
        .await
        .expect("delete the group");
}

/// The member volume IDs of a reply, in order.
fn member_ids(g: &vg::VolumeGroup) -> Vec<String> {
    g.volumes.iter().map(|v| v.volume_id.clone()).collect()
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

/// The uuid at the end of a group ID.
fn uuid_of(id: &str) -> &str {
    &id[id.len() - 36..]
}

/// The omap of `oid` in `io` as strings (empty when the object is absent).
fn omap(io: &IoCtx, oid: &str) -> BTreeMap<String, String> {
    match io.omap_get_all(oid, "") {
        Ok(m) => m
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
            .collect(),
        Err(e) if e.kind() == ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => panic!("{oid}: {e}"),
    }
}

/// Removes whatever a test left of its groups (members first).
fn remove_groups(pool: &str, groups: &[String]) {
    for g in groups {
        let spec = format!("{pool}/{g}");
        let _ = rbd(Site::A, &["group", "rm", &spec]);
    }
}

#[tokio::test]
async fn volume_group_lifecycle_with_rbd_and_the_omap_journal_as_oracle() {
    let pool = pool();
    let io = ioctx(Site::A, "");
    let vols: Vec<(CsiVolume, _)> = (0..3)
        .map(|_| create_csi_volume(Site::A, 8 * MIB, &[(0, 4096)]))
        .collect();
    let [v1, v2, v3] = [0, 1, 2].map(|i| vols[i].0.handle.as_str());
    let [i1, i2, i3] = [0, 1, 2].map(|i| vols[i].0.image.as_str());
    let mut sc = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut c = vg_client(&sc).await;
    let name = unique("vgrc");
    let other = unique("vgrc");
    let mut made: Vec<String> = Vec::new();

    // Create with two volumes.
    let g = c
        .create_volume_group(create_req(&name, &[v1, v2], &[]))
        .await
        .expect("create")
        .into_inner()
        .volume_group
        .unwrap();
    let id = g.volume_group_id.clone();
    let uuid = uuid_of(&id).to_string();
    let rbd_group = format!("csi-vol-group-{uuid}");
    made.push(rbd_group.clone());
    let _cleanup = scopeguard({
        let (pool, made) = (pool.clone(), made.clone());
        move || remove_groups(&pool, &made)
    });
    assert_eq!(
        id,
        format!("0001-0006-site-a-{:016x}-{uuid}", io.pool_id()),
        "ceph-csi's group ID encoding"
    );
    assert_eq!(member_ids(&g), sorted(&[v1, v2]));
    assert!(
        g.volumes
            .iter()
            .all(|v| v.capacity_bytes == (8 * MIB) as i64),
        "{g:?}"
    );
    assert!(rbd_groups(&pool).contains(&rbd_group));
    assert_eq!(rbd_group_images(&pool, &rbd_group), sorted(&[i1, i2]));

    // The journal, as ceph-csi writes and reads it.
    let dir = omap(&io, "csi.groups.default");
    assert_eq!(dir.get(&format!("csi.volume.group.{name}")), Some(&uuid));
    let obj = omap(&io, &format!("csi.volume.group.{uuid}"));
    assert_eq!(obj.get("csi.volname"), Some(&name));
    assert_eq!(obj.get("csi.groupname"), Some(&rbd_group));
    let created = obj.get("csi.creationtime").expect("creation time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok() && created.ends_with('Z'),
        "{created}"
    );
    let members: BTreeMap<&str, &str> = obj
        .iter()
        .filter(|(k, _)| !k.starts_with("csi."))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(members, BTreeMap::from([(v1, ""), (v2, "")]));

    // Idempotent by name: the same volumes in another order, the same group.
    let again = c
        .create_volume_group(create_req(&name, &[v2, v1, v2], &[]))
        .await
        .expect("create again")
        .into_inner()
        .volume_group
        .unwrap();
    assert_eq!(again.volume_group_id, id);
    assert_eq!(member_ids(&again), sorted(&[v1, v2]));
    // The name with fewer volumes than the group has: another request.
    let err = c
        .create_volume_group(create_req(&name, &[v1], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    assert_eq!(rbd_group_images(&pool, &rbd_group), sorted(&[i1, i2]));

    // Modify: v1 out, v3 in.
    let g = c
        .modify_volume_group_membership(modify_req(&id, &[v2, v3]))
        .await
        .expect("modify")
        .into_inner()
        .volume_group
        .unwrap();
    assert_eq!(member_ids(&g), sorted(&[v2, v3]));
    assert_eq!(rbd_group_images(&pool, &rbd_group), sorted(&[i2, i3]));
    let obj = omap(&io, &format!("csi.volume.group.{uuid}"));
    assert!(
        !obj.contains_key(v1) && obj.contains_key(v2) && obj.contains_key(v3),
        "{obj:?}"
    );
    // Again: nothing to do, the same answer.
    let g2 = c
        .modify_volume_group_membership(modify_req(&id, &[v3, v2]))
        .await
        .expect("modify again")
        .into_inner()
        .volume_group
        .unwrap();
    assert_eq!(g2, g);
    let got = c
        .controller_get_volume_group(get_req(&id))
        .await
        .expect("get")
        .into_inner()
        .volume_group
        .unwrap();
    assert_eq!(got, g);

    // v1 is free again: another group takes it.
    let g_other = c
        .create_volume_group(create_req(&other, &[v1], &[]))
        .await
        .expect("create the other group")
        .into_inner()
        .volume_group
        .unwrap();
    let other_rbd = format!("csi-vol-group-{}", uuid_of(&g_other.volume_group_id));
    let _cleanup_other = scopeguard({
        let (pool, g) = (pool.clone(), other_rbd.clone());
        move || remove_groups(&pool, &[g])
    });
    assert_eq!(rbd_group_images(&pool, &other_rbd), vec![i1.to_string()]);

    // An image is in one group at most, and a refused change changes nothing.
    let err = c
        .modify_volume_group_membership(modify_req(&g_other.volume_group_id, &[v1, v2]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("already in RBD group"), "{err:?}");
    assert_eq!(rbd_group_images(&pool, &other_rbd), vec![i1.to_string()]);
    assert_eq!(rbd_group_images(&pool, &rbd_group), sorted(&[i2, i3]));
    let third = unique("vgrc");
    let groups_before = rbd_groups(&pool);
    let err = c
        .create_volume_group(create_req(&third, &[v3], &[]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(rbd_groups(&pool), groups_before);
    assert!(!omap(&io, "csi.groups.default").contains_key(&format!("csi.volume.group.{third}")));

    // Deleting a non-empty group is refused; it never deletes volumes.
    let err = c.delete_volume_group(delete_req(&id)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(rbd_groups(&pool).contains(&rbd_group));

    // Emptied, then deleted: RBD group and journal gone, volumes kept.
    let g = c
        .modify_volume_group_membership(modify_req(&id, &[]))
        .await
        .expect("empty")
        .into_inner()
        .volume_group
        .unwrap();
    assert!(g.volumes.is_empty());
    assert!(rbd_group_images(&pool, &rbd_group).is_empty());
    c.delete_volume_group(delete_req(&id))
        .await
        .expect("delete");
    assert!(!rbd_groups(&pool).contains(&rbd_group));
    assert!(omap(&io, &format!("csi.volume.group.{uuid}")).is_empty());
    assert!(!omap(&io, "csi.groups.default").contains_key(&format!("csi.volume.group.{name}")));
    for i in [i1, i2, i3] {
        assert!(image_exists(Site::A, i), "{i}");
    }
    // Delete of a group that does not exist: OK. Get and Modify: NOT_FOUND.
    c.delete_volume_group(delete_req(&id))
        .await
        .expect("delete again");
    let err = c
        .controller_get_volume_group(get_req(&id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c
        .modify_volume_group_membership(modify_req(&id, &[v2]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // The other group, emptied and deleted through the service too.
    empty_and_delete(&mut c, &g_other.volume_group_id).await;
    assert!(!rbd_groups(&pool).contains(&other_rbd));
    sc.assert_alive();
}

/// A well-formed group ID (or volume handle) on site-a that names nothing.
fn unknown_id(io: &IoCtx) -> String {
    let uuid = uuid::Uuid::new_v4();
    format!("0001-0006-site-a-{:016x}-{uuid}", io.pool_id())
}

#[tokio::test]
async fn volume_group_bad_input_gets_its_code_and_changes_nothing() {
    let pool = pool();
    let io = ioctx(Site::A, "");
    let (vol, _img) = create_csi_volume(Site::A, 4 * MIB, &[]);
    let mut sc = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut c = vg_client(&sc).await;
    let groups_before = rbd_groups(&pool);
    let dir_before = omap(&io, "csi.groups.default");
    let nothing = unknown_id(&io);
    let name = unique("vgrc");

    // Malformed IDs.
    for bad in ["", "group-1", "0001-0006-site-a-00000000000000zz-x"] {
        let e = c
            .controller_get_volume_group(get_req(bad))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "get {bad:?}: {e:?}");
        let e = c.delete_volume_group(delete_req(bad)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "delete {bad:?}: {e:?}");
        let e = c
            .modify_volume_group_membership(modify_req(bad, &[]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "modify {bad:?}: {e:?}");
    }
    let e = c
        .create_volume_group(create_req(&name, &["pool/img@snap"], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Create: no name; no volumes and no pool; a volume that does not
    // exist; another cluster; a pool that does not exist.
    let e = c
        .create_volume_group(create_req("", &[&vol.handle], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .create_volume_group(create_req(&name, &[], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("pool"), "{e:?}");
    let e = c
        .create_volume_group(create_req(&name, &[&vol.handle, &nothing], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .create_volume_group(create_req(
            &name,
            &[&vol.handle],
            &[("clusterID", "site-b")],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .create_volume_group(create_req(&name, &[], &[("pool", "no-such-pool")]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // Unknown groups: Delete is OK, Get and Modify are NOT_FOUND.
    c.delete_volume_group(delete_req(&nothing))
        .await
        .expect("delete of an unknown group is OK");
    let elsewhere = format!("0001-0004-nope-0000000000000001-{}", uuid::Uuid::new_v4());
    c.delete_volume_group(delete_req(&elsewhere))
        .await
        .expect("delete of a group of an unknown cluster is OK");
    let e = c
        .controller_get_volume_group(get_req(&elsewhere))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .controller_get_volume_group(get_req(&nothing))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .modify_volume_group_membership(modify_req(&nothing, &[&vol.handle]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");

    // Paging: a negative size, a token this sidecar never handed out.
    let e = c
        .list_volume_groups(vg::ListVolumeGroupsRequest {
            max_entries: -1,
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .list_volume_groups(vg::ListVolumeGroupsRequest {
            max_entries: 1,
            starting_token: "page-2".into(),
            secrets: secrets(Site::A),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e:?}");

    // None of it changed the cluster.
    assert_eq!(rbd_groups(&pool), groups_before);
    assert_eq!(omap(&io, "csi.groups.default"), dir_before);

    // Modify with a volume that does not exist: NOT_FOUND, group unchanged.
    let g = c
        .create_volume_group(create_req(&name, &[&vol.handle], &[]))
        .await
        .expect("create")
        .into_inner()
        .volume_group
        .unwrap();
    let rbd_group = format!("csi-vol-group-{}", uuid_of(&g.volume_group_id));
    let _cleanup = scopeguard({
        let (pool, g) = (pool.clone(), rbd_group.clone());
        move || remove_groups(&pool, &[g])
    });
    let e = c
        .modify_volume_group_membership(modify_req(&g.volume_group_id, &[&nothing]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert_eq!(rbd_group_images(&pool, &rbd_group), vec![vol.image.clone()]);
    empty_and_delete(&mut c, &g.volume_group_id).await;
    sc.assert_alive();
}

#[tokio::test]
async fn list_volume_groups_pages_through_every_group_once() {
    let pool = pool();
    let mut sc = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut c = vg_client(&sc).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let g = c
            .create_volume_group(create_req(&unique("vgrc"), &[], &[("pool", &pool)]))
            .await
            .expect("create an empty group")
            .into_inner()
            .volume_group
            .unwrap();
        assert!(g.volumes.is_empty());
        ids.push(g.volume_group_id);
    }
    let _cleanup = scopeguard({
        let pool = pool.clone();
        let groups: Vec<String> = ids
            .iter()
            .map(|id| format!("csi-vol-group-{}", uuid_of(id)))
            .collect();
        move || remove_groups(&pool, &groups)
    });

    let mut seen: Vec<String> = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volume_groups(vg::ListVolumeGroupsRequest {
                max_entries: 1,
                starting_token: token.clone(),
                secrets: secrets(Site::A),
            })
            .await
            .expect("list")
            .into_inner();
        assert!(page.entries.len() <= 1, "{page:?}");
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume_group.as_ref().unwrap().volume_group_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut unique_seen = seen.clone();
    unique_seen.dedup();
    assert_eq!(unique_seen, seen, "a group listed twice: {seen:?}");
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "ordered by ID: {seen:?}"
    );
    for id in &ids {
        assert!(seen.contains(id), "{id} missing from {seen:?}");
    }
    // Without a limit: one page with all of them.
    let all = c
        .list_volume_groups(vg::ListVolumeGroupsRequest {
            secrets: secrets(Site::A),
            ..Default::default()
        })
        .await
        .expect("list all")
        .into_inner();
    assert!(all.next_token.is_empty());
    for id in &ids {
        assert!(
            all.entries
                .iter()
                .any(|e| &e.volume_group.as_ref().unwrap().volume_group_id == id),
            "{id}"
        );
        c.delete_volume_group(delete_req(id)).await.expect("delete");
    }
    sc.assert_alive();
}

/// Groups live in the pool of their volumes: volumes of two pools cannot be
/// grouped, and a name already used in one pool is not reused in another.
#[tokio::test]
async fn volume_groups_stay_in_one_pool() {
    let pool = pool();
    let other = unique("vgpool");
    ceph_ok(Site::A, &["osd", "pool", "create", &other, "8", "8"]);
    let _drop_pool = scopeguard({
        let other = other.clone();
        move || {
            let _ = ceph(
                Site::A,
                &[
                    "osd",
                    "pool",
                    "rm",
                    &other,
                    &other,
                    "--yes-i-really-really-mean-it",
                ],
            );
        }
    });
    rbd_ok(Site::A, &["pool", "init", &other]);
    let other_io = admin(Site::A).ioctx(&other, "").unwrap();
    let (here, _a) = create_csi_volume(Site::A, 4 * MIB, &[]);
    let (there, _b) = create_csi_volume_in(&other_io, Site::A, 4 * MIB, &[]);
    let mut sc = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let mut c = vg_client(&sc).await;
    let name = unique("vgrc");

    let e = c
        .create_volume_group(create_req(&name, &[&here.handle, &there.handle], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .create_volume_group(create_req(&name, &[&here.handle], &[("pool", &other)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(rbd_groups(&other).is_empty());

    let g = c
        .create_volume_group(create_req(&name, &[&there.handle], &[]))
        .await
        .expect("create in the other pool")
        .into_inner()
        .volume_group
        .unwrap();
    assert_eq!(
        &g.volume_group_id[..33],
        format!("0001-0006-site-a-{:016x}", other_io.pool_id()),
        "the group ID names the volumes' pool"
    );
    let gname = format!("csi-vol-group-{}", uuid_of(&g.volume_group_id));
    assert_eq!(rbd_group_images(&other, &gname), vec![there.image.clone()]);
    let _cleanup = scopeguard({
        let (other, gname) = (other.clone(), gname.clone());
        move || remove_groups(&other, &[gname])
    });
    // The same name for volumes of the test pool: incompatible.
    let before = rbd_groups(&pool);
    let e = c
        .create_volume_group(create_req(&name, &[&here.handle], &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    assert_eq!(rbd_groups(&pool), before);
    // Modify cannot bring in a volume of another pool either.
    let e = c
        .modify_volume_group_membership(modify_req(
            &g.volume_group_id,
            &[&there.handle, &here.handle],
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(rbd_group_images(&other, &gname), vec![there.image.clone()]);

    empty_and_delete(&mut c, &g.volume_group_id).await;
    sc.assert_alive();
}

#[tokio::test]
async fn identity_advertises_the_volume_group_service() {
    use csi_rbd_replicator::grpc::proto::identity::{GetCapabilitiesRequest, capability};
    let mut sc = Sidecar::start(Site::A, &["--no-replayer"]).await;
    let caps = sc
        .identity()
        .await
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let mut group: Vec<i32> = caps
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(capability::Type::VolumeGroup(g)) => Some(g.r#type),
            _ => None,
        })
        .collect();
    group.sort_unstable();
    use capability::volume_group::Type as T;
    assert_eq!(
        group,
        [
            T::VolumeGroup,
            T::LimitVolumeToOneVolumeGroup,
            T::DoNotAllowVgToDeleteVolumes,
            T::ModifyVolumeGroup,
            T::GetVolumeGroup,
            T::ListVolumeGroups
        ]
        .map(|t| t as i32)
    );
    sc.assert_alive();
}

/// The sequence number at the start of an image (0 when never written).
fn seq_of(img: &csi_rbd_replicator::ceph::Image) -> u64 {
    let mut b = [0u8; 8];
    img.read(0, &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// A writer interleaves sequence numbers across a "log" and a "data" volume
/// (each write acknowledged before the next: log n, then data n, then log
/// n+1); a crash-consistent cut must show a state that existed at one
/// instant: data never ahead of log, log at most one ahead of data. Each cut
/// is checked by rolling the group back to it and reading the heads.
#[test]
fn group_cut_never_shows_one_member_ahead_of_another() {
    use csi_rbd_replicator::csi::VolumeGroupId;
    use csi_rbd_replicator::engine::group::consistent_cut;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let pool = pool();
    let io = ioctx(Site::A, "");
    let id = VolumeGroupId::new("site-a", io.pool_id(), uuid::Uuid::new_v4().to_string()).unwrap();
    let gname = id.group_name();
    let (log, data) = (unique("log"), unique("data"));
    drop(create_image(Site::A, &log, 4 * MIB, &[]));
    drop(create_image(Site::A, &data, 4 * MIB, &[]));
    let _cleanup = scopeguard({
        let (pool, gname, log, data) = (pool.clone(), gname.clone(), log.clone(), data.clone());
        move || {
            let _ = rbd(Site::A, &["group", "rm", &format!("{pool}/{gname}")]);
            for i in [&log, &data] {
                let _ = rbd(Site::A, &["rm", &format!("{pool}/{i}")]);
            }
        }
    });
    group::create(&io, &gname).unwrap();
    group::image_add(&io, &gname, &io, &log).unwrap();
    group::image_add(&io, &gname, &io, &data).unwrap();

    // The writer is another client (its own connection), as an application.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = std::thread::spawn({
        let (stop, written) = (Arc::clone(&stop), Arc::clone(&written));
        let (pool, log, data) = (pool.clone(), log.clone(), data.clone());
        move || -> Result<(), String> {
            let wio = admin(Site::A).ioctx(&pool, "").unwrap();
            let l = csi_rbd_replicator::ceph::Image::open(&wio, &log).unwrap();
            let d = csi_rbd_replicator::ceph::Image::open(&wio, &data).unwrap();
            let mut block = vec![0u8; 4096];
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                block[..8].copy_from_slice(&n.to_le_bytes());
                for img in [&l, &d] {
                    img.write(0, &block)
                        .map_err(|e| format!("write {n}: {e}"))?;
                    img.flush().map_err(|e| format!("flush {n}: {e}"))?;
                }
                written.store(n, Ordering::SeqCst);
            }
            Ok(())
        }
    });
    let mut cuts = Vec::new();
    for k in 0..4 {
        let before = written.load(Ordering::SeqCst);
        while written.load(Ordering::SeqCst) < before + 20 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let snap = format!("cut-{k}");
        consistent_cut(&io, &id, &snap).unwrap();
        cuts.push(snap);
    }
    // The control: one member's snapshot after the other's, with writes in
    // between, shows data ahead of log; the check below would catch it.
    let naive = "naive";
    for (k, image) in [&log, &data].into_iter().enumerate() {
        if k == 1 {
            let before = written.load(Ordering::SeqCst);
            while written.load(Ordering::SeqCst) < before + 5 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let img = csi_rbd_replicator::ceph::Image::open(&io, image).unwrap();
        img.snap_create(naive).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    let total = written.load(Ordering::SeqCst);
    writer
        .join()
        .unwrap()
        .expect("the writer's I/O pauses during a cut; it never fails");
    let listed = group::snap_list(&io, &gname).unwrap();
    assert_eq!(listed.len(), cuts.len(), "{listed:?}");
    assert!(listed.iter().all(|s| s.complete), "{listed:?}");

    let at = |image: &str| {
        seq_of(&csi_rbd_replicator::ceph::Image::open_read_only(&io, image, Some(naive)).unwrap())
    };
    let (ls, ds) = (at(&log), at(&data));
    assert!(ds > ls + 1, "the naive cut shows log {ls}, data {ds}");
    for image in [&log, &data] {
        let img = csi_rbd_replicator::ceph::Image::open(&io, image).unwrap();
        img.snap_remove(naive).unwrap();
    }

    let mut seen = Vec::new();
    for snap in &cuts {
        group::snap_rollback(&io, &gname, snap).unwrap();
        // Fresh handles: nothing cached from before the rollback.
        let l = csi_rbd_replicator::ceph::Image::open(&io, &log).unwrap();
        let d = csi_rbd_replicator::ceph::Image::open(&io, &data).unwrap();
        let (ls, ds) = (seq_of(&l), seq_of(&d));
        seen.push((ls, ds));
        assert!(
            ds <= ls && ls <= ds + 1,
            "cut {snap}: log at {ls}, data at {ds}: not a state that existed at one instant"
        );
    }
    eprintln!("cuts (log, data) after {total} interleaved writes: {seen:?}");
    // Each cut was taken after 20 more writes: they are all different.
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
    for snap in &cuts {
        group::snap_remove(&io, &gname, snap).unwrap();
    }
    assert!(group::snap_list(&io, &gname).unwrap().is_empty());
}
