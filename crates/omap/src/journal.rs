//! Reading and writing one volume's entries of ceph-csi's omap journal (the
//! layout is in the [module doc](super)).
//!
//! Writing is split in two: [`diff`] is pure and decides, from what is
//! stored, which keys to write and which guards must still hold when they are
//! written (or that the entry belongs to another volume); [`ensure`] reads
//! the stored state, calls [`diff`] and applies the result as compare-and-set
//! RADOS write ops, re-reading and re-deciding when a guard fails because
//! someone else wrote in between.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use csirr_ceph::{ErrorKind, IoCtx, OmapCmp, WriteOp};

use super::error::{Context, OmapError};

/// ceph-csi's default `--instanceid`: the directory is `csi.volumes.default`.
pub const DEFAULT_INSTANCE: &str = "default";
/// ceph-csi's default `volumeNamePrefix`.
pub const DEFAULT_VOLUME_NAME_PREFIX: &str = "csi-vol-";
/// Prefix of the directory object's name; the instance ID follows.
pub const DIRECTORY_PREFIX: &str = "csi.volumes.";
/// Prefix of the directory's keys; the PV name follows.
pub const NAME_KEY_PREFIX: &str = "csi.volume.";
/// Prefix of the per-volume object's name; the uuid follows.
pub const VOLUME_OBJECT_PREFIX: &str = "csi.volume.";

/// Keys of the per-volume object `csi.volume.<uuid>`.
pub mod keys {
    /// The PV name (ceph-csi's request name).
    pub const VOLNAME: &str = "csi.volname";
    /// The RBD image name.
    pub const IMAGE_NAME: &str = "csi.imagename";
    /// The librbd image id on this cluster.
    pub const IMAGE_ID: &str = "csi.imageid";
    /// The PVC's namespace.
    pub const OWNER: &str = "csi.volume.owner";
    /// 16 hex digits: the journal pool's id, when it is not the image pool.
    pub const JOURNAL_POOL: &str = "csi.journalpool";
    /// The KMS ID of an encrypted volume.
    pub const ENCRYPT_KMS: &str = "csi.volume.encryptKMS";
    /// `block` or `file`, for an encrypted volume.
    pub const ENCRYPTION_TYPE: &str = "csi.volume.encryptionType";
}

/// How many times [`ensure`] re-reads and re-decides after a concurrent
/// write made a guard fail.
const ATTEMPTS: u32 = 3;

/// `csi.volumes.<instance>`.
pub fn directory_oid(instance: &str) -> String {
    format!("{DIRECTORY_PREFIX}{instance}")
}

/// `csi.volume.<PV name>`, the directory key of a PV.
pub fn name_key(pv_name: &str) -> String {
    format!("{NAME_KEY_PREFIX}{pv_name}")
}

/// `csi.volume.<uuid>`.
pub fn volume_oid(uuid: &str) -> String {
    format!("{VOLUME_OBJECT_PREFIX}{uuid}")
}

/// A pool id as ceph-csi stores it: 16 lower-case hex digits (the 8 bytes
/// big-endian).
pub fn encode_pool_id(id: i64) -> String {
    format!("{:016x}", id as u64)
}

/// The inverse of [`encode_pool_id`]; `None` unless exactly 16 hex digits.
pub fn decode_pool_id(s: &str) -> Option<i64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().map(|v| v as i64)
}

/// The directory value of a volume: `<uuid>`, or `<image pool id>/<uuid>`
/// when the image lives in another pool than the journal.
pub fn directory_value(uuid: &str, journal_pool_id: i64, image_pool_id: i64) -> String {
    if journal_pool_id == image_pool_id {
        uuid.to_owned()
    } else {
        format!("{}/{uuid}", encode_pool_id(image_pool_id))
    }
}

/// A parsed directory value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryValue {
    /// The image pool, when it is not the journal pool.
    pub image_pool_id: Option<i64>,
    /// The volume's uuid.
    pub uuid: String,
}

impl DirectoryValue {
    /// Parses `<uuid>` or `<16 hex>/<uuid>`.
    pub fn parse(s: &str) -> Result<Self, OmapError> {
        let bad = || {
            OmapError::Invalid(format!(
                "directory value {s:?} is neither <uuid> nor <16 hex digit pool id>/<uuid>"
            ))
        };
        match s.split_once('/') {
            None if is_uuid(s) => Ok(Self {
                image_pool_id: None,
                uuid: s.to_owned(),
            }),
            Some((pool, uuid)) if is_uuid(uuid) => Ok(Self {
                image_pool_id: Some(decode_pool_id(pool).ok_or_else(bad)?),
                uuid: uuid.to_owned(),
            }),
            _ => Err(bad()),
        }
    }
}

/// Whether `s` is a uuid in the 8-4-4-4-12 hex form ceph-csi generates.
pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The uuid of an image named `<prefix><uuid>` (ceph-csi's `csi-vol-<uuid>`
/// and any `volumeNamePrefix`).
pub fn uuid_from_image_name(name: &str) -> Option<&str> {
    let start = name.len().checked_sub(36)?;
    let tail = name.get(start..)?;
    is_uuid(tail).then_some(tail)
}

/// Encryption settings of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encryption {
    /// `csi.volume.encryptKMS`.
    pub kms_id: String,
    /// `csi.volume.encryptionType` (`block` or `file`).
    pub kind: String,
}

/// One volume's journal entry, as it must be on a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The uuid (of the handle and the image name).
    pub uuid: String,
    /// The PV name.
    pub pv_name: String,
    /// The image name.
    pub image_name: String,
    /// The image's librbd id on this cluster.
    pub image_id: String,
    /// The PVC's namespace, when known (left as stored when `None`).
    pub owner: Option<String>,
    /// Encryption settings (left as stored when `None`).
    pub encryption: Option<Encryption>,
}

/// The stored `csi.volume.<uuid>` object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeAttrs {
    /// Every key under `csi.`, values as stored (lossy UTF-8).
    pub values: BTreeMap<String, String>,
}

impl VolumeAttrs {
    /// From raw omap pairs.
    pub fn from_omap(raw: BTreeMap<String, Vec<u8>>) -> Self {
        Self {
            values: raw
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect(),
        }
    }

    /// The value of `key`; an empty value counts as absent, as in ceph-csi.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// `csi.volname`.
    pub fn pv_name(&self) -> Option<&str> {
        self.get(keys::VOLNAME)
    }

    /// `csi.imagename`.
    pub fn image_name(&self) -> Option<&str> {
        self.get(keys::IMAGE_NAME)
    }

    /// `csi.imageid`.
    pub fn image_id(&self) -> Option<&str> {
        self.get(keys::IMAGE_ID)
    }

    /// `csi.volume.owner`.
    pub fn owner(&self) -> Option<&str> {
        self.get(keys::OWNER)
    }

    /// `csi.journalpool`, decoded.
    pub fn journal_pool_id(&self) -> Result<Option<i64>, OmapError> {
        self.get(keys::JOURNAL_POOL)
            .map(|s| {
                decode_pool_id(s).ok_or_else(|| {
                    OmapError::Invalid(format!(
                        "{} {s:?} is not a 16 hex digit pool id",
                        keys::JOURNAL_POOL
                    ))
                })
            })
            .transpose()
    }

    /// The encryption settings, if the volume is encrypted.
    pub fn encryption(&self) -> Option<Encryption> {
        self.get(keys::ENCRYPT_KMS).map(|kms| Encryption {
            kms_id: kms.to_owned(),
            kind: self.get(keys::ENCRYPTION_TYPE).unwrap_or("").to_owned(),
        })
    }
}

/// A journal entry as read from a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// The directory value, parsed.
    pub directory: DirectoryValue,
    /// `csi.volume.<uuid>`, `None` when the object does not exist.
    pub volume: Option<VolumeAttrs>,
}

/// The stored state [`diff`] decides from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// Whether the directory object exists.
    pub directory_exists: bool,
    /// The PV's directory value, `None` when the key is absent.
    pub directory_value: Option<String>,
    /// `csi.volume.<uuid>`, `None` when the object does not exist.
    pub volume: Option<VolumeAttrs>,
}

/// Where an entry goes: the journal (directory) pool and the image pool, in
/// one RADOS namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The directory's instance ID.
    pub instance: String,
    /// The journal pool's id.
    pub journal_pool_id: i64,
    /// `pool[/namespace]` of the journal, for messages.
    pub journal_spec: String,
    /// The image pool's id.
    pub image_pool_id: i64,
    /// `pool[/namespace]` of the image, for messages.
    pub image_spec: String,
}

impl Placement {
    /// The placement of the two ioctxs.
    pub fn of(journal: &IoCtx, image: &IoCtx, instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            journal_pool_id: journal.pool_id(),
            journal_spec: journal.spec(),
            image_pool_id: image.pool_id(),
            image_spec: image.spec(),
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `csi.volume.<uuid>` was created (and the directory key set if needed).
    Created,
    /// The entry existed and these fixes were made.
    Repaired(Vec<String>),
    /// The entry was already right; nothing was written.
    Unchanged,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Created => f.write_str("created"),
            Outcome::Repaired(fixes) => write!(f, "repaired ({})", fixes.join("; ")),
            Outcome::Unchanged => f.write_str("unchanged"),
        }
    }
}

/// How a write op treats the object's existence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existence {
    /// Create it; fail if it exists (a concurrent creator won).
    CreateExclusive,
    /// It must exist (guards compare against its keys).
    MustExist,
}

/// One guarded write to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectWrite {
    /// The object.
    pub oid: String,
    /// Existence requirement.
    pub existence: Existence,
    /// `(key, value)` pairs that must still be stored as read (`""` for an
    /// absent key) for the write to apply.
    pub guards: Vec<(String, String)>,
    /// `(key, value)` pairs to set.
    pub set: Vec<(String, String)>,
}

/// The writes that make the stored entry right, in order: the volume object
/// first, then the directory key (ceph-csi's order, so an interrupted write
/// leaves an unreferenced volume object, never a dangling directory key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePlan {
    /// Write to `csi.volume.<uuid>` in the image pool.
    pub volume: Option<ObjectWrite>,
    /// Whether the directory object must be created first.
    pub create_directory: bool,
    /// Write to `csi.volumes.<instance>` in the journal pool.
    pub directory: Option<ObjectWrite>,
    /// What applying it amounts to.
    pub outcome: Outcome,
}

/// Decides what to write so that `stored` becomes `entry` at `at`, or fails
/// with a conflict when the stored entry belongs to another volume. Pure.
pub fn diff(entry: &Entry, at: &Placement, stored: &Stored) -> Result<WritePlan, OmapError> {
    let want_dir = directory_value(&entry.uuid, at.journal_pool_id, at.image_pool_id);
    let dir_key = name_key(&entry.pv_name);
    let mut fixes = Vec::new();
    let directory = directory_write(entry, at, stored, &want_dir, &mut fixes)?;
    let volume = volume_write(entry, at, stored, &mut fixes)?;
    if directory.is_some()
        && stored.volume.is_some()
        && stored.directory_value.as_deref().is_none_or(str::is_empty)
    {
        fixes.push(format!("{dir_key} was missing, now {want_dir:?}"));
    }
    let outcome = if stored.volume.is_none() {
        Outcome::Created
    } else if volume.is_none() && directory.is_none() {
        Outcome::Unchanged
    } else {
        Outcome::Repaired(fixes)
    };
    Ok(WritePlan {
        create_directory: directory.is_some() && !stored.directory_exists,
        volume,
        directory,
        outcome,
    })
}

/// The write of the directory key (`csi.volume.<pv name>` in
/// `csi.volumes.<instance>`), if it needs one: absent (or empty) -> set;
/// another uuid -> conflict; same uuid with another pool prefix -> fix the
/// prefix (noted in `fixes`).
fn directory_write(
    entry: &Entry,
    at: &Placement,
    stored: &Stored,
    want_dir: &str,
    fixes: &mut Vec<String>,
) -> Result<Option<ObjectWrite>, OmapError> {
    let dir_key = name_key(&entry.pv_name);
    Ok(
        match stored.directory_value.as_deref().filter(|v| !v.is_empty()) {
            Some(v) if v == want_dir => None,
            Some(v) => {
                let other = DirectoryValue::parse(v).ok();
                if other.as_ref().is_none_or(|d| d.uuid != entry.uuid) {
                    return Err(OmapError::DirectoryConflict {
                        directory: directory_oid(&at.instance),
                        journal: at.journal_spec.clone(),
                        key: dir_key,
                        found: v.to_owned(),
                        expected: want_dir.to_owned(),
                    });
                }
                fixes.push(format!("{dir_key} was {v:?}, now {want_dir:?}"));
                Some(ObjectWrite {
                    oid: directory_oid(&at.instance),
                    existence: Existence::MustExist,
                    guards: vec![(dir_key.clone(), v.to_owned())],
                    set: vec![(dir_key, want_dir.to_owned())],
                })
            }
            None => Some(ObjectWrite {
                oid: directory_oid(&at.instance),
                existence: Existence::MustExist,
                guards: vec![(
                    dir_key.clone(),
                    stored.directory_value.clone().unwrap_or_default(),
                )],
                set: vec![(dir_key, want_dir.to_owned())],
            }),
        },
    )
}

/// The keys the volume object `csi.volume.<uuid>` must hold for `entry`.
fn wanted_volume_keys(entry: &Entry, at: &Placement) -> Vec<(&'static str, String)> {
    let mut want: Vec<(&'static str, String)> = vec![
        (keys::VOLNAME, entry.pv_name.clone()),
        (keys::IMAGE_NAME, entry.image_name.clone()),
        (keys::IMAGE_ID, entry.image_id.clone()),
    ];
    if let Some(owner) = &entry.owner {
        want.push((keys::OWNER, owner.clone()));
    }
    if at.journal_pool_id != at.image_pool_id {
        want.push((keys::JOURNAL_POOL, encode_pool_id(at.journal_pool_id)));
    }
    if let Some(enc) = &entry.encryption {
        want.push((keys::ENCRYPT_KMS, enc.kms_id.clone()));
        if !enc.kind.is_empty() {
            want.push((keys::ENCRYPTION_TYPE, enc.kind.clone()));
        }
    }

    want
}

/// The write of the volume object, if it needs one: created when absent;
/// otherwise the keys that differ are repaired (noted in `fixes`), except
/// those that identify the volume, which are a conflict.
fn volume_write(
    entry: &Entry,
    at: &Placement,
    stored: &Stored,
    fixes: &mut Vec<String>,
) -> Result<Option<ObjectWrite>, OmapError> {
    let oid = volume_oid(&entry.uuid);
    let want = wanted_volume_keys(entry, at);
    Ok(match &stored.volume {
        None => Some(ObjectWrite {
            oid: oid.clone(),
            existence: Existence::CreateExclusive,
            guards: Vec::new(),
            set: want.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }),
        Some(attrs) => {
            // Keys that identify the volume (and how its data is read) are
            // never overwritten; the others are repaired.
            const IDENTITY: [&str; 4] = [
                keys::VOLNAME,
                keys::IMAGE_NAME,
                keys::ENCRYPT_KMS,
                keys::ENCRYPTION_TYPE,
            ];
            let mut set = Vec::new();
            for (key, value) in want {
                match attrs.get(key) {
                    Some(cur) if cur == value => {}
                    Some(cur) if IDENTITY.contains(&key) => {
                        return Err(OmapError::VolumeConflict {
                            oid,
                            pool: at.image_spec.clone(),
                            field: key,
                            found: cur.to_owned(),
                            expected: value,
                        });
                    }
                    Some(cur) => {
                        fixes.push(format!("{key} was {cur:?}, now {value:?}"));
                        set.push((key.to_owned(), value));
                    }
                    None => {
                        fixes.push(format!("{key} was missing, now {value:?}"));
                        set.push((key.to_owned(), value));
                    }
                }
            }
            (!set.is_empty()).then(|| ObjectWrite {
                oid: oid.clone(),
                existence: Existence::MustExist,
                // Everything the decision read must still hold.
                guards: [
                    keys::VOLNAME,
                    keys::IMAGE_NAME,
                    keys::IMAGE_ID,
                    keys::OWNER,
                    keys::JOURNAL_POOL,
                    keys::ENCRYPT_KMS,
                    keys::ENCRYPTION_TYPE,
                ]
                .iter()
                .map(|k| {
                    let cur = attrs.values.get(*k).cloned().unwrap_or_default();
                    ((*k).to_owned(), cur)
                })
                .collect(),
                set,
            })
        }
    })
}

/// Reads the directory key of `pv_name`. Blocking.
pub fn read_directory(
    journal: &IoCtx,
    instance: &str,
    pv_name: &str,
) -> Result<(bool, Option<String>), OmapError> {
    let oid = directory_oid(instance);
    let key = name_key(pv_name);
    match journal.omap_get_vals_by_keys(&oid, &[&key]) {
        Ok(m) => Ok((
            true,
            m.get(&key).map(|v| String::from_utf8_lossy(v).into_owned()),
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok((false, None)),
        Err(e) => Err(e).ctx(|| format!("reading {oid} in {}", journal.spec())),
    }
}

/// Reads `csi.volume.<uuid>`; `None` when it does not exist. Blocking.
pub fn read_volume(image: &IoCtx, uuid: &str) -> Result<Option<VolumeAttrs>, OmapError> {
    let oid = volume_oid(uuid);
    match image.omap_get_all(&oid, "csi.") {
        Ok(m) => Ok(Some(VolumeAttrs::from_omap(m))),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("reading {oid} in {}", image.spec())),
    }
}

/// Reads the entry of PV `pv_name`: its directory key in `journal`, then
/// `csi.volume.<uuid>` in `image` (when the directory value names another
/// image pool, the caller must open that pool and call [`read_volume`]).
/// `None` when the PV has no directory key. Blocking.
pub fn read_entry(
    journal: &IoCtx,
    image: &IoCtx,
    instance: &str,
    pv_name: &str,
) -> Result<Option<StoredEntry>, OmapError> {
    let Some(value) = read_directory(journal, instance, pv_name)?
        .1
        .filter(|v| !v.is_empty())
    else {
        return Ok(None);
    };
    let directory = DirectoryValue::parse(&value)?;
    let volume = read_volume(image, &directory.uuid)?;
    Ok(Some(StoredEntry { directory, volume }))
}

/// Reads the stored state of `entry` at the two ioctxs. Blocking.
pub fn read_stored(
    journal: &IoCtx,
    image: &IoCtx,
    instance: &str,
    entry: &Entry,
) -> Result<Stored, OmapError> {
    let (directory_exists, directory_value) = read_directory(journal, instance, &entry.pv_name)?;
    Ok(Stored {
        directory_exists,
        directory_value,
        volume: read_volume(image, &entry.uuid)?,
    })
}

/// Why applying a plan stopped.
enum ApplyError {
    /// A guard failed or an exclusive create lost a race: re-read.
    Raced(String),
    /// Anything else.
    Failed(OmapError),
}

fn apply_one(io: &IoCtx, w: &ObjectWrite) -> Result<(), ApplyError> {
    let mut op = WriteOp::new().map_err(|source| {
        ApplyError::Failed(OmapError::Ceph {
            context: "creating a write op".into(),
            source,
        })
    })?;
    match w.existence {
        Existence::CreateExclusive => op.create(true),
        Existence::MustExist => op.assert_exists(),
    }
    for (k, v) in &w.guards {
        op.omap_cmp(k, OmapCmp::Eq, v.as_bytes());
    }
    let pairs: Vec<(&str, &[u8])> = w
        .set
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()))
        .collect();
    op.omap_set(&pairs);
    let what = || format!("{} in {}", w.oid, io.spec());
    match op.operate(io, &w.oid) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.kind(), ErrorKind::Canceled | ErrorKind::AlreadyExists) => {
            Err(ApplyError::Raced(what()))
        }
        // A MustExist object that vanished since it was read.
        Err(e) if e.kind() == ErrorKind::NotFound && w.existence == Existence::MustExist => {
            Err(ApplyError::Raced(what()))
        }
        Err(e) => Err(ApplyError::Failed(OmapError::Ceph {
            context: format!("writing {}", what()),
            source: e,
        })),
    }
}

fn apply(journal: &IoCtx, image: &IoCtx, plan: &WritePlan) -> Result<(), ApplyError> {
    if let Some(w) = &plan.volume {
        apply_one(image, w)?;
    }
    if let Some(w) = &plan.directory {
        if plan.create_directory {
            let mut op = WriteOp::new().map_err(|source| {
                ApplyError::Failed(OmapError::Ceph {
                    context: "creating a write op".into(),
                    source,
                })
            })?;
            op.create(false);
            op.operate(journal, &w.oid).map_err(|source| {
                ApplyError::Failed(OmapError::Ceph {
                    context: format!("creating {} in {}", w.oid, journal.spec()),
                    source,
                })
            })?;
        }
        apply_one(journal, w)?;
    }
    Ok(())
}

/// Makes `entry` stored in `journal` (directory) and `image` (volume
/// object): creates it, repairs it, or leaves it alone when it is right.
/// Never overwrites an entry of another volume ([`OmapError::is_conflict`]).
/// Both ioctxs must be in the same RADOS namespace. Blocking.
pub fn ensure(
    journal: &IoCtx,
    image: &IoCtx,
    instance: &str,
    entry: &Entry,
) -> Result<Outcome, OmapError> {
    if journal.namespace() != image.namespace() {
        return Err(OmapError::Invalid(format!(
            "journal {} and image pool {} are in different RADOS namespaces",
            journal.spec(),
            image.spec()
        )));
    }
    if !is_uuid(&entry.uuid) {
        return Err(OmapError::Invalid(format!(
            "{:?} is not a uuid in the 8-4-4-4-12 form",
            entry.uuid
        )));
    }
    let at = Placement::of(journal, image, instance);
    let mut first: Option<Outcome> = None;
    let mut last_race = String::new();
    for _ in 0..ATTEMPTS {
        let stored = read_stored(journal, image, instance, entry)?;
        let plan = diff(entry, &at, &stored)?;
        if plan.outcome == Outcome::Unchanged {
            return Ok(first.unwrap_or(Outcome::Unchanged));
        }
        match apply(journal, image, &plan) {
            Ok(()) => return Ok(merge(first, plan.outcome)),
            Err(ApplyError::Failed(e)) => return Err(e),
            Err(ApplyError::Raced(what)) => {
                // The volume object may have been written before the race on
                // the directory: remember that it was created.
                if plan.volume.is_some() && first.is_none() {
                    first = Some(plan.outcome.clone());
                }
                last_race = what;
            }
        }
    }
    Err(OmapError::Contended {
        what: last_race,
        attempts: ATTEMPTS,
    })
}

fn merge(first: Option<Outcome>, last: Outcome) -> Outcome {
    match (first, last) {
        (Some(Outcome::Created), _) | (_, Outcome::Created) => Outcome::Created,
        (Some(Outcome::Repaired(mut a)), Outcome::Repaired(b)) => {
            a.extend(b);
            Outcome::Repaired(a)
        }
        (Some(Outcome::Repaired(a)), Outcome::Unchanged) => Outcome::Repaired(a),
        (_, last) => last,
    }
}

/// Writes, on the replica's cluster, the journal entry of the ceph-csi volume
/// `uuid` whose primary image is in `primary`'s pool and namespace and whose
/// replica (id `replica_image_id`) is in `replica`'s: same uuid, PV name,
/// image name, owner and encryption settings as on the primary, the
/// replica's own image id. The directory goes into the pool of the same
/// name as the primary's journal pool. Idempotent; repairs a stale image id;
/// never overwrites another volume's entry. Blocking.
pub fn replicate_entry(
    primary: &IoCtx,
    replica: &IoCtx,
    uuid: &str,
    replica_image_id: &str,
) -> Result<Outcome, OmapError> {
    replicate_entry_in(primary, replica, uuid, replica_image_id, DEFAULT_INSTANCE)
}

/// [`replicate_entry`] for a ceph-csi `--instanceid` other than `default`.
pub fn replicate_entry_in(
    primary: &IoCtx,
    replica: &IoCtx,
    uuid: &str,
    replica_image_id: &str,
    instance: &str,
) -> Result<Outcome, OmapError> {
    if !is_uuid(uuid) {
        return Err(OmapError::Invalid(format!(
            "{uuid:?} is not a uuid in the 8-4-4-4-12 form"
        )));
    }
    if replica_image_id.is_empty() {
        return Err(OmapError::Invalid("the replica's image id is empty".into()));
    }
    let attrs = read_volume(primary, uuid)?.ok_or_else(|| OmapError::PrimaryEntryMissing {
        oid: volume_oid(uuid),
        pool: primary.spec(),
    })?;
    let pv_name = attrs.pv_name().ok_or_else(|| {
        OmapError::Invalid(format!(
            "{} in {} on the primary cluster has no {}: it is a reservation ceph-csi never \
             completed",
            volume_oid(uuid),
            primary.spec(),
            keys::VOLNAME
        ))
    })?;
    let entry = Entry {
        uuid: uuid.to_owned(),
        pv_name: pv_name.to_owned(),
        // ceph-csi's own fallback for entries written before csi.imagename.
        image_name: attrs.image_name().map_or_else(
            || format!("{DEFAULT_VOLUME_NAME_PREFIX}{uuid}"),
            str::to_owned,
        ),
        image_id: replica_image_id.to_owned(),
        owner: attrs.owner().map(str::to_owned),
        encryption: attrs.encryption(),
    };
    // The journal pool: the pool of the same name as the primary's.
    let opened: Arc<IoCtx>;
    let journal: &IoCtx = match attrs.journal_pool_id()? {
        Some(id) if id != primary.pool_id() => {
            let name = primary
                .cluster()
                .pool_reverse_lookup(id)
                .ctx(|| format!("looking up the primary's journal pool {id}"))?;
            opened = replica
                .cluster()
                .ioctx(&name, replica.namespace())
                .ctx(|| format!("opening journal pool {name} on the replica's cluster"))?;
            &opened
        }
        _ => replica,
    };
    ensure(journal, replica, instance, &entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "b0285c97-a0ce-11eb-8c66-0242ac110002";
    const OTHER: &str = "6e696bba-064f-11ec-a251-0242ac110002";

    fn entry() -> Entry {
        Entry {
            uuid: UUID.into(),
            pv_name: "pvc-1".into(),
            image_name: format!("csi-vol-{UUID}"),
            image_id: "10f6a2d1b3c".into(),
            owner: Some("apps".into()),
            encryption: None,
        }
    }

    fn at(journal: i64, image: i64) -> Placement {
        Placement {
            instance: DEFAULT_INSTANCE.into(),
            journal_pool_id: journal,
            journal_spec: "journal".into(),
            image_pool_id: image,
            image_spec: "images".into(),
        }
    }

    fn attrs(pairs: &[(&str, &str)]) -> VolumeAttrs {
        VolumeAttrs {
            values: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    fn complete() -> VolumeAttrs {
        attrs(&[
            (keys::VOLNAME, "pvc-1"),
            (keys::IMAGE_NAME, &format!("csi-vol-{UUID}")),
            (keys::IMAGE_ID, "10f6a2d1b3c"),
            (keys::OWNER, "apps"),
        ])
    }

    #[test]
    fn pool_ids_encode_like_ceph_csi() {
        assert_eq!(encode_pool_id(2), "0000000000000002");
        assert_eq!(decode_pool_id("000000000000001a"), Some(26));
        assert_eq!(decode_pool_id("1a"), None);
        assert_eq!(directory_value(UUID, 1, 1), UUID);
        assert_eq!(
            directory_value(UUID, 1, 3),
            format!("0000000000000003/{UUID}")
        );
        let d = DirectoryValue::parse(&format!("0000000000000003/{UUID}")).unwrap();
        assert_eq!(d.image_pool_id, Some(3));
        assert!(DirectoryValue::parse("not-a-uuid").is_err());
        assert!(DirectoryValue::parse(&format!("3/{UUID}")).is_err());
    }

    #[test]
    fn uuid_from_names() {
        assert_eq!(uuid_from_image_name(&format!("csi-vol-{UUID}")), Some(UUID));
        assert_eq!(uuid_from_image_name(&format!("team-a-{UUID}")), Some(UUID));
        assert_eq!(uuid_from_image_name("csi-vol-short"), None);
        assert_eq!(uuid_from_image_name("é"), None);
    }

    #[test]
    fn nothing_stored_creates_both() {
        let plan = diff(&entry(), &at(1, 1), &Stored::default()).unwrap();
        assert_eq!(plan.outcome, Outcome::Created);
        assert!(plan.create_directory);
        let v = plan.volume.unwrap();
        assert_eq!(v.existence, Existence::CreateExclusive);
        assert_eq!(v.oid, format!("csi.volume.{UUID}"));
        let set: BTreeMap<_, _> = v.set.into_iter().collect();
        assert_eq!(set.len(), 4, "{set:?}");
        assert_eq!(set[keys::IMAGE_ID], "10f6a2d1b3c");
        assert_eq!(set[keys::OWNER], "apps");
        let d = plan.directory.unwrap();
        assert_eq!(d.oid, "csi.volumes.default");
        assert_eq!(d.guards, vec![("csi.volume.pvc-1".into(), String::new())]);
        assert_eq!(d.set, vec![("csi.volume.pvc-1".into(), UUID.into())]);
    }

    #[test]
    fn separate_journal_pool_adds_prefix_and_journalpool() {
        let plan = diff(&entry(), &at(5, 2), &Stored::default()).unwrap();
        let set: BTreeMap<_, _> = plan.volume.unwrap().set.into_iter().collect();
        assert_eq!(set[keys::JOURNAL_POOL], "0000000000000005");
        assert_eq!(
            plan.directory.unwrap().set[0].1,
            format!("0000000000000002/{UUID}")
        );
    }

    #[test]
    fn complete_entry_is_unchanged() {
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(UUID.into()),
            volume: Some(complete()),
        };
        let plan = diff(&entry(), &at(1, 1), &stored).unwrap();
        assert_eq!(plan.outcome, Outcome::Unchanged);
        assert!(plan.volume.is_none() && plan.directory.is_none());
    }

    #[test]
    fn stale_image_id_is_repaired_under_guards() {
        let mut v = complete();
        v.values.insert(keys::IMAGE_ID.into(), "oldid".into());
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(UUID.into()),
            volume: Some(v),
        };
        let plan = diff(&entry(), &at(1, 1), &stored).unwrap();
        let Outcome::Repaired(fixes) = &plan.outcome else {
            panic!("{:?}", plan.outcome)
        };
        assert!(fixes[0].contains("\"oldid\""), "{fixes:?}");
        let w = plan.volume.unwrap();
        assert_eq!(w.existence, Existence::MustExist);
        assert_eq!(w.set, vec![(keys::IMAGE_ID.into(), "10f6a2d1b3c".into())]);
        assert!(w.guards.contains(&(keys::IMAGE_ID.into(), "oldid".into())));
        assert!(w.guards.contains(&(keys::VOLNAME.into(), "pvc-1".into())));
        assert!(plan.directory.is_none());
    }

    #[test]
    fn missing_directory_key_is_repaired() {
        let stored = Stored {
            directory_exists: true,
            directory_value: None,
            volume: Some(complete()),
        };
        let plan = diff(&entry(), &at(1, 1), &stored).unwrap();
        assert!(matches!(plan.outcome, Outcome::Repaired(_)));
        assert!(plan.volume.is_none());
        assert!(!plan.create_directory);
        assert!(plan.directory.is_some());
    }

    #[test]
    fn directory_key_of_another_volume_is_a_conflict() {
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(OTHER.into()),
            volume: None,
        };
        let e = diff(&entry(), &at(1, 1), &stored).unwrap_err();
        assert!(e.is_conflict());
        let msg = e.to_string();
        assert!(msg.contains(OTHER) && msg.contains(UUID), "{msg}");
        // Garbage is not ours either.
        let stored = Stored {
            directory_exists: true,
            directory_value: Some("garbage".into()),
            volume: None,
        };
        assert!(
            diff(&entry(), &at(1, 1), &stored)
                .unwrap_err()
                .is_conflict()
        );
    }

    #[test]
    fn volume_object_of_another_pv_or_image_is_a_conflict() {
        for (key, val) in [
            (keys::VOLNAME, "pvc-other"),
            (keys::IMAGE_NAME, "csi-vol-other"),
        ] {
            let mut v = complete();
            v.values.insert(key.into(), val.into());
            let stored = Stored {
                directory_exists: false,
                directory_value: None,
                volume: Some(v),
            };
            let e = diff(&entry(), &at(1, 1), &stored).unwrap_err();
            let msg = e.to_string();
            assert!(
                e.is_conflict() && msg.contains(val) && msg.contains(key),
                "{msg}"
            );
        }
    }

    #[test]
    fn encryption_is_never_overwritten() {
        let mut e = entry();
        e.encryption = Some(Encryption {
            kms_id: "vault".into(),
            kind: "block".into(),
        });
        let mut v = complete();
        v.values
            .insert(keys::ENCRYPT_KMS.into(), "other-kms".into());
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(UUID.into()),
            volume: Some(v),
        };
        assert!(diff(&e, &at(1, 1), &stored).unwrap_err().is_conflict());
        // Absent settings are filled in.
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(UUID.into()),
            volume: Some(complete()),
        };
        let plan = diff(&e, &at(1, 1), &stored).unwrap();
        assert_eq!(plan.volume.unwrap().set.len(), 2);
    }

    #[test]
    fn leaked_empty_volume_object_is_filled() {
        // ceph-csi creates the object first; a crash leaves it without keys.
        let stored = Stored {
            directory_exists: false,
            directory_value: None,
            volume: Some(VolumeAttrs::default()),
        };
        let plan = diff(&entry(), &at(1, 1), &stored).unwrap();
        assert!(matches!(plan.outcome, Outcome::Repaired(_)));
        assert!(plan.create_directory);
        assert_eq!(plan.volume.unwrap().set.len(), 4);
    }

    #[test]
    fn directory_prefix_of_same_uuid_is_repaired() {
        let stored = Stored {
            directory_exists: true,
            directory_value: Some(format!("0000000000000009/{UUID}")),
            volume: Some(complete()),
        };
        let plan = diff(&entry(), &at(1, 1), &stored).unwrap();
        assert!(matches!(plan.outcome, Outcome::Repaired(_)));
        let d = plan.directory.unwrap();
        assert_eq!(d.guards[0].1, format!("0000000000000009/{UUID}"));
    }

    #[test]
    fn outcome_display() {
        assert_eq!(Outcome::Created.to_string(), "created");
        assert_eq!(
            Outcome::Repaired(vec!["a".into(), "b".into()]).to_string(),
            "repaired (a; b)"
        );
    }
}
