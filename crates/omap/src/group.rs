//! ceph-csi's volume group journal (`internal/journal/volumegroupjournal.go`),
//! read and written exactly as ceph-csi keeps it, so that either can find a
//! group the other created.
//!
//! # Layout on RADOS
//!
//! Both objects are in the group's pool (the pool of its ID) and in the RADOS
//! namespace of the cluster ID's `radosNamespace`; values are raw strings.
//!
//! | object | key | value |
//! |---|---|---|
//! | `csi.groups.<instance>` (directory; instance is ceph-csi's `--instanceid`, default `default`) | `csi.volume.group.<request name>` | `<uuid>` |
//! | `csi.volume.group.<uuid>` (per group) | `csi.volname` | the request name (CreateVolumeGroup's `name`) |
//! | | `csi.groupname` | the RBD group's name, `csi-vol-group-<uuid>` |
//! | | `csi.creationtime` | creation time as Go's `time.MarshalText` writes it (RFC 3339, nanoseconds without trailing zeros) |
//! | | `<volume ID>` (one key a member) | `""` |
//!
//! Lifecycle, in ceph-csi's order: [`reserve`] creates `csi.volume.group.<uuid>`
//! exclusively (which reserves the uuid), then the directory key, then the
//! group's own keys; members are added and removed one key at a time; [`remove`]
//! deletes the per-group object first and the directory key last.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};

use csirr_ceph::{ErrorKind, IoCtx, WriteOp};

use super::error::{Context, OmapError};

/// Prefix of the directory object's name; the instance ID follows.
pub const DIRECTORY_PREFIX: &str = "csi.groups.";
/// Prefix of the directory's keys; the request name follows.
pub const NAME_KEY_PREFIX: &str = "csi.volume.group.";
/// Prefix of the per-group object's name; the uuid follows.
pub const GROUP_OBJECT_PREFIX: &str = "csi.volume.group.";

/// Keys of the per-group object that are not members.
pub mod keys {
    /// The request name.
    pub const VOLNAME: &str = "csi.volname";
    /// The RBD group's name.
    pub const GROUP_NAME: &str = "csi.groupname";
    /// The creation time.
    pub const CREATION_TIME: &str = "csi.creationtime";
}

/// `csi.groups.<instance>`.
pub fn directory_oid(instance: &str) -> String {
    format!("{DIRECTORY_PREFIX}{instance}")
}

/// `csi.volume.group.<request name>`, the directory key of a group.
pub fn name_key(request_name: &str) -> String {
    format!("{NAME_KEY_PREFIX}{request_name}")
}

/// `csi.volume.group.<uuid>`.
pub fn group_oid(uuid: &str) -> String {
    format!("{GROUP_OBJECT_PREFIX}{uuid}")
}

/// `t` as Go's `time.Time.MarshalText` writes a UTC time: RFC 3339 with the
/// nanoseconds, trailing zeros (and a bare dot) dropped, `Z` for UTC.
pub fn go_time_text(t: DateTime<Utc>) -> String {
    let mut s = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// The stored `csi.volume.group.<uuid>` object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupAttrs {
    /// `csi.volname`: the request name ("" when missing).
    pub request_name: String,
    /// `csi.groupname`: the RBD group's name ("" when missing).
    pub group_name: String,
    /// `csi.creationtime`, as stored.
    pub creation_time: Option<String>,
    /// The member volume IDs: every other key.
    pub members: BTreeSet<String>,
}

impl GroupAttrs {
    /// From the object's raw omap pairs.
    pub fn from_omap(raw: BTreeMap<String, Vec<u8>>) -> Self {
        let mut attrs = Self::default();
        for (k, v) in raw {
            let v = String::from_utf8_lossy(&v).into_owned();
            match k.as_str() {
                keys::VOLNAME => attrs.request_name = v,
                keys::GROUP_NAME => attrs.group_name = v,
                keys::CREATION_TIME => attrs.creation_time = Some(v),
                _ => {
                    attrs.members.insert(k);
                }
            }
        }
        attrs
    }
}

/// The keys [`reserve`] writes into a new group's object.
pub fn new_group_keys(
    request_name: &str,
    group_name: &str,
    created: DateTime<Utc>,
) -> Vec<(&'static str, String)> {
    vec![
        (keys::VOLNAME, request_name.to_string()),
        (keys::GROUP_NAME, group_name.to_string()),
        (keys::CREATION_TIME, go_time_text(created)),
    ]
}

/// The uuid the directory of `instance` records for `request_name`.
pub fn lookup(io: &IoCtx, instance: &str, request_name: &str) -> Result<Option<String>, OmapError> {
    let dir = directory_oid(instance);
    let key = name_key(request_name);
    match io.omap_get_vals_by_keys(&dir, &[&key]) {
        Ok(mut vals) => Ok(vals
            .remove(&key)
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .filter(|v| !v.is_empty())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("reading {key} of {dir} in {}", io.spec())),
    }
}

/// Every group the directory of `instance` records: request name -> uuid.
pub fn list(io: &IoCtx, instance: &str) -> Result<BTreeMap<String, String>, OmapError> {
    let dir = directory_oid(instance);
    match io.omap_get_all(&dir, NAME_KEY_PREFIX) {
        Ok(all) => Ok(all
            .into_iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix(NAME_KEY_PREFIX)?.to_string();
                Some((name, String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).ctx(|| format!("reading {dir} in {}", io.spec())),
    }
}

/// The group object of `uuid`; `None` when it does not exist.
pub fn read(io: &IoCtx, uuid: &str) -> Result<Option<GroupAttrs>, OmapError> {
    let oid = group_oid(uuid);
    match io.omap_get_all(&oid, "") {
        Ok(raw) => Ok(Some(GroupAttrs::from_omap(raw))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("reading {oid} in {}", io.spec())),
    }
}

/// Records a new group in ceph-csi's order: the group object, created
/// exclusively (`AlreadyExists` inside [`OmapError::Ceph`] when the uuid is
/// taken), then the directory key, then the group's keys.
pub fn reserve(
    io: &IoCtx,
    instance: &str,
    request_name: &str,
    uuid: &str,
    group_name: &str,
    created: DateTime<Utc>,
) -> Result<(), OmapError> {
    let oid = group_oid(uuid);
    let mut op = WriteOp::new().ctx(|| "allocating a write op".into())?;
    op.create(true);
    op.operate(io, &oid)
        .ctx(|| format!("reserving {oid} in {}", io.spec()))?;
    let dir = directory_oid(instance);
    let key = name_key(request_name);
    io.omap_set(&dir, &[(&key, uuid.as_bytes())])
        .ctx(|| format!("writing {key} of {dir} in {}", io.spec()))?;
    let kv = new_group_keys(request_name, group_name, created);
    let pairs: Vec<(&str, &[u8])> = kv.iter().map(|(k, v)| (*k, v.as_bytes())).collect();
    io.omap_set(&oid, &pairs)
        .ctx(|| format!("writing {oid} in {}", io.spec()))
}

/// Adds member keys (volume IDs, empty values) to the group object, which
/// must exist.
pub fn add_members(io: &IoCtx, uuid: &str, volume_ids: &[&str]) -> Result<(), OmapError> {
    let oid = group_oid(uuid);
    let mut op = WriteOp::new().ctx(|| "allocating a write op".into())?;
    op.assert_exists();
    let pairs: Vec<(&str, &[u8])> = volume_ids.iter().map(|id| (*id, &b""[..])).collect();
    op.omap_set(&pairs);
    op.operate(io, &oid)
        .ctx(|| format!("adding members to {oid} in {}", io.spec()))
}

/// Removes member keys from the group object (absent keys are fine).
pub fn remove_members(io: &IoCtx, uuid: &str, volume_ids: &[&str]) -> Result<(), OmapError> {
    let oid = group_oid(uuid);
    io.omap_rm_keys(&oid, volume_ids)
        .ctx(|| format!("removing members from {oid} in {}", io.spec()))
}

/// Removes a group's entries, the reverse of [`reserve`]: the group object,
/// then the directory key. Entries already gone are fine.
pub fn remove(io: &IoCtx, instance: &str, uuid: &str, request_name: &str) -> Result<(), OmapError> {
    let oid = group_oid(uuid);
    match io.remove(&oid) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).ctx(|| format!("removing {oid} in {}", io.spec()));
        }
        _ => {}
    }
    if request_name.is_empty() {
        return Ok(());
    }
    let dir = directory_oid(instance);
    let key = name_key(request_name);
    match io.omap_rm_keys(&dir, &[&key]) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(e).ctx(|| format!("removing {key} of {dir} in {}", io.spec()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn names_are_ceph_csis() {
        assert_eq!(directory_oid("default"), "csi.groups.default");
        assert_eq!(name_key("vgrc-1"), "csi.volume.group.vgrc-1");
        assert_eq!(
            group_oid("b0285c97-a0ce-11eb-8c66-0242ac110002"),
            "csi.volume.group.b0285c97-a0ce-11eb-8c66-0242ac110002"
        );
    }

    #[test]
    fn creation_time_is_gos_marshal_text() {
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 10, 2, 3).unwrap();
        assert_eq!(go_time_text(t), "2024-05-01T10:02:03Z");
        let t = t + chrono::Duration::nanoseconds(120_000_000);
        assert_eq!(go_time_text(t), "2024-05-01T10:02:03.12Z");
        let t = t + chrono::Duration::nanoseconds(7);
        assert_eq!(go_time_text(t), "2024-05-01T10:02:03.120000007Z");
        // What Go writes parses back as RFC 3339.
        assert_eq!(DateTime::parse_from_rfc3339(&go_time_text(t)).unwrap(), t);
    }

    #[test]
    fn group_object_splits_attributes_from_members() {
        let t = Utc.with_ymd_and_hms(2024, 5, 1, 10, 2, 3).unwrap();
        let mut raw: BTreeMap<String, Vec<u8>> = new_group_keys("vgrc-1", "csi-vol-group-u", t)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_bytes()))
            .collect();
        let keys: Vec<&str> = raw.keys().map(String::as_str).collect();
        assert_eq!(keys, ["csi.creationtime", "csi.groupname", "csi.volname"]);
        let vol = "0001-0006-site-a-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002";
        raw.insert(vol.to_string(), Vec::new());
        raw.insert("replicapool/img".to_string(), Vec::new());
        let attrs = GroupAttrs::from_omap(raw);
        assert_eq!(attrs.request_name, "vgrc-1");
        assert_eq!(attrs.group_name, "csi-vol-group-u");
        assert_eq!(attrs.creation_time.as_deref(), Some("2024-05-01T10:02:03Z"));
        assert_eq!(
            attrs.members.iter().map(String::as_str).collect::<Vec<_>>(),
            [vol, "replicapool/img"]
        );
    }
}
