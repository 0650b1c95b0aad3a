//! The journal's metadata types: what cls `journal` keeps in the header's
//! omap (positions, clients, tags) and what librbd and rbd-mirror put in
//! the opaque `data` of clients and tags.
//!
//! cls types (`src/cls/journal/cls_journal_types.cc`) are versioned(1, 1).
//! librbd's client data is versioned(2, 1) around a `u32` type; tag data is
//! not versioned at all (`src/librbd/journal/Types.cc`).

use super::codec::{DecodeError, DecodeResult, Decoder, Encoder};

/// A point in the journal: the newest entry committed in one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectPosition {
    /// The object (set × splay width + splay offset).
    pub object_number: u64,
    /// The entry's tag.
    pub tag_tid: u64,
    /// The entry's number within its tag.
    pub entry_tid: u64,
}

impl ObjectPosition {
    fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(1, "ObjectPosition", |d, _| {
            Ok(Self {
                object_number: d.u64("ObjectPosition.object_number")?,
                tag_tid: d.u64("ObjectPosition.tag_tid")?,
                entry_tid: d.u64("ObjectPosition.entry_tid")?,
            })
        })
    }

    fn encode(&self, e: &mut Encoder) {
        e.versioned(1, 1, |e| {
            e.u64(self.object_number)
                .u64(self.tag_tid)
                .u64(self.entry_tid);
        });
    }
}

/// A client's commit position: at most one [`ObjectPosition`] per splay
/// offset, newest first. Empty for a client that committed nothing (it
/// pins the whole journal).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectSetPosition {
    /// The positions, newest first.
    pub positions: Vec<ObjectPosition>,
}

impl ObjectSetPosition {
    /// Decodes a versioned `ObjectSetPosition`.
    pub fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(1, "ObjectSetPosition", |d, _| {
            Ok(Self {
                positions: d.list(30, "ObjectSetPosition.positions", ObjectPosition::decode)?,
            })
        })
    }

    /// Encodes it (the input of cls `client_commit`).
    pub fn encode(&self, e: &mut Encoder) {
        e.versioned(1, 1, |e| {
            e.len(self.positions.len());
            for p in &self.positions {
                p.encode(e);
            }
        });
    }

    /// The newest position (the first), if any.
    pub fn newest(&self) -> Option<&ObjectPosition> {
        self.positions.first()
    }
}

/// Whether a client takes part in trimming and tag expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Connected: its position pins the journal.
    Connected,
    /// Disconnected (by librbd's laggy-client check or `rbd journal client
    /// disconnect`): it must resync.
    Disconnected,
}

/// A registered journal client (`client_<id>` in the header's omap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client id: `""` for librbd itself, a mirror uuid for a peer.
    pub id: String,
    /// Opaque data; for RBD an encoded [`ClientData`].
    pub data: Vec<u8>,
    /// What the client has committed.
    pub commit_position: ObjectSetPosition,
    /// Connected or not.
    pub state: ClientState,
}

impl Client {
    /// Decodes a versioned `cls::journal::Client`.
    pub fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(1, "Client", |d, _| {
            let id = d.string("Client.id")?;
            let data = d.bytes("Client.data")?.to_vec();
            let commit_position = ObjectSetPosition::decode(d)?;
            let state = match d.u8("Client.state")? {
                0 => ClientState::Connected,
                1 => ClientState::Disconnected,
                v => {
                    return Err(DecodeError::Invalid {
                        what: "Client.state",
                        value: u64::from(v),
                    });
                }
            };
            Ok(Self {
                id,
                data,
                commit_position,
                state,
            })
        })
    }

    /// The client's data decoded as librbd's [`ClientData`].
    pub fn client_data(&self) -> DecodeResult<ClientData> {
        ClientData::decode_all(&self.data)
    }
}

/// A tag (`tag_<tid as 16 hex digits>`): an epoch of one lock owner. Every
/// entry belongs to a tag; entry numbers restart at 0 in each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// The tag's id, increasing across the journal.
    pub tid: u64,
    /// Its class (librbd: one class per image's journal).
    pub tag_class: u64,
    /// Opaque data; for RBD an encoded [`TagData`].
    pub data: Vec<u8>,
}

impl Tag {
    /// Decodes a versioned `cls::journal::Tag`.
    pub fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(1, "Tag", |d, _| {
            Ok(Self {
                tid: d.u64("Tag.tid")?,
                tag_class: d.u64("Tag.tag_class")?,
                data: d.bytes("Tag.data")?.to_vec(),
            })
        })
    }

    /// The tag's data decoded as librbd's [`TagData`].
    pub fn tag_data(&self) -> DecodeResult<TagData> {
        TagData::decode_all(&self.data)
    }
}

/// `mirror_uuid` of tags written by the local image's own lock owner.
pub const LOCAL_MIRROR_UUID: &str = "";

/// `mirror_uuid` of the tag a demotion writes: nobody is primary.
pub const ORPHAN_MIRROR_UUID: &str = "<orphan>";

/// Where the epoch before a tag ended, as the tag's writer saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagPredecessor {
    /// Owner of the previous epoch.
    pub mirror_uuid: String,
    /// Whether `tag_tid`/`entry_tid` are meaningful.
    pub commit_valid: bool,
    /// The previous epoch's tag.
    pub tag_tid: u64,
    /// The last entry of the previous epoch.
    pub entry_tid: u64,
}

/// librbd's tag data: who owns the epoch and what came before it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagData {
    /// The owner: [`LOCAL_MIRROR_UUID`] (this image is primary),
    /// [`ORPHAN_MIRROR_UUID`] (demoted), or the primary peer's mirror uuid.
    pub mirror_uuid: String,
    /// The previous epoch.
    pub predecessor: TagPredecessor,
}

impl TagData {
    /// Decodes tag data that must fill `b`.
    pub fn decode_all(b: &[u8]) -> DecodeResult<Self> {
        let mut d = Decoder::new(b);
        let t = Self {
            mirror_uuid: d.string("TagData.mirror_uuid")?,
            predecessor: TagPredecessor {
                mirror_uuid: d.string("TagPredecessor.mirror_uuid")?,
                commit_valid: d.bool("TagPredecessor.commit_valid")?,
                tag_tid: d.u64("TagPredecessor.tag_tid")?,
                entry_tid: d.u64("TagPredecessor.entry_tid")?,
            },
        };
        d.finish("TagData")?;
        Ok(t)
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        let p = &self.predecessor;
        e.string(&self.mirror_uuid)
            .string(&p.mirror_uuid)
            .bool(p.commit_valid)
            .u64(p.tag_tid)
            .u64(p.entry_tid);
        e.into_bytes()
    }
}

/// A snapshot's namespace (`cls::rbd::SnapshotNamespace` as encoded on
/// disk: versioned(1, 1) around a `u32` kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotNamespace {
    /// A user snapshot (kind 0).
    User,
    /// A group snapshot (kind 1).
    Group {
        /// The group's pool.
        group_pool: i64,
        /// The group's id.
        group_id: String,
        /// The group snapshot's id.
        group_snapshot_id: String,
    },
    /// A snapshot moved to the trash (kind 2).
    Trash {
        /// Its name before.
        original_name: String,
        /// Its kind before.
        original_kind: u32,
    },
    /// A mirror snapshot (kind 3), kept as encoded: its layout changed
    /// between releases and journal mode never replays one.
    Mirror(Vec<u8>),
    /// A kind this code does not know, kept as encoded.
    Unknown {
        /// The kind.
        kind: u32,
        /// The fields after it.
        raw: Vec<u8>,
    },
}

impl SnapshotNamespace {
    /// Decodes an on-disk snapshot namespace.
    pub fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(1, "SnapshotNamespace", |d, _| {
            let kind = d.u32("SnapshotNamespace.kind")?;
            Ok(match kind {
                0 => Self::User,
                1 => Self::Group {
                    group_pool: d.i64("GroupSnapshotNamespace.group_pool")?,
                    group_id: d.string("GroupSnapshotNamespace.group_id")?,
                    group_snapshot_id: d.string("GroupSnapshotNamespace.group_snapshot_id")?,
                },
                2 => Self::Trash {
                    original_name: d.string("TrashSnapshotNamespace.original_name")?,
                    original_kind: d.u32("TrashSnapshotNamespace.original_kind")?,
                },
                3 => Self::Mirror(
                    d.take(d.remaining() as u64, "MirrorSnapshotNamespace")?
                        .to_vec(),
                ),
                kind => Self::Unknown {
                    kind,
                    raw: d.take(d.remaining() as u64, "SnapshotNamespace")?.to_vec(),
                },
            })
        })
    }

    /// Encodes it.
    pub fn encode(&self, e: &mut Encoder) {
        e.versioned(1, 1, |e| match self {
            Self::User => {
                e.u32(0);
            }
            Self::Group {
                group_pool,
                group_id,
                group_snapshot_id,
            } => {
                e.u32(1)
                    .i64(*group_pool)
                    .string(group_id)
                    .string(group_snapshot_id);
            }
            Self::Trash {
                original_name,
                original_kind,
            } => {
                e.u32(2).string(original_name).u32(*original_kind);
            }
            Self::Mirror(raw) => {
                e.u32(3).raw(raw);
            }
            Self::Unknown { kind, raw } => {
                e.u32(*kind).raw(raw);
            }
        });
    }
}

/// librbd's own client (`""`): which tag class the image's epochs use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageClientMeta {
    /// The tag class of the image's tags.
    pub tag_class: u64,
    /// Set by `rbd mirror image resync` on a non-primary image.
    pub resync_requested: bool,
}

/// Where an rbd-mirror peer is with its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPeerState {
    /// Copying the image from a sync point (state 0).
    Syncing,
    /// Replaying entries (state 1).
    Replaying,
}

/// A sync point of an rbd-mirror peer: a snapshot on the primary the
/// replica is being, or was, copied from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPeerSyncPoint {
    /// The snapshot's name.
    pub snap_name: String,
    /// The snapshot the copy starts from (`""` for a full copy).
    pub from_snap_name: String,
    /// How far the copy got (objects), if it started.
    pub object_number: Option<u64>,
    /// The snapshot's namespace (client data version 2 and later).
    pub snap_namespace: SnapshotNamespace,
}

/// An rbd-mirror peer's client data; the shape `rbd mirror image disable`
/// and rbd-mirror decode for every client that is not librbd's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorPeerClientMeta {
    /// The replica's image id (`""` before it exists).
    pub image_id: String,
    /// Syncing or replaying.
    pub state: MirrorPeerState,
    /// Objects copied by the current sync.
    pub sync_object_count: u64,
    /// Sync points, oldest first.
    pub sync_points: Vec<MirrorPeerSyncPoint>,
    /// Primary snapshot id to replica snapshot id.
    pub snap_seqs: Vec<(u64, u64)>,
}

/// librbd's client data: versioned(2, 1) around a `u32` type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientData {
    /// Type 0: librbd's own client `""`.
    Image(ImageClientMeta),
    /// Type 1: an rbd-mirror peer.
    MirrorPeer(MirrorPeerClientMeta),
    /// Type 2: the `rbd` CLI (journal export/import).
    Cli,
    /// A type this code does not know.
    Unknown(u32),
}

impl ClientData {
    /// Decodes client data that must fill `b`.
    pub fn decode_all(b: &[u8]) -> DecodeResult<Self> {
        let mut d = Decoder::new(b);
        let v = Self::decode(&mut d)?;
        d.finish("ClientData")?;
        Ok(v)
    }

    /// Decodes client data.
    pub fn decode(d: &mut Decoder<'_>) -> DecodeResult<Self> {
        d.versioned(2, "ClientData", |d, version| {
            Ok(match d.u32("ClientData.type")? {
                0 => Self::Image(ImageClientMeta {
                    tag_class: d.u64("ImageClientMeta.tag_class")?,
                    resync_requested: d.bool("ImageClientMeta.resync_requested")?,
                }),
                1 => Self::MirrorPeer(decode_mirror_peer(d, version)?),
                2 => Self::Cli,
                t => Self::Unknown(t),
            })
        })
    }

    /// Encodes it as librbd 16.2 does (version 2, compat 1).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.versioned(2, 1, |e| match self {
            Self::Image(m) => {
                e.u32(0).u64(m.tag_class).bool(m.resync_requested);
            }
            Self::MirrorPeer(m) => {
                e.u32(1)
                    .string(&m.image_id)
                    .u32(match m.state {
                        MirrorPeerState::Syncing => 0,
                        MirrorPeerState::Replaying => 1,
                    })
                    .u64(m.sync_object_count)
                    .len(m.sync_points.len());
                for p in &m.sync_points {
                    e.string(&p.snap_name)
                        .string(&p.from_snap_name)
                        .opt_u64(p.object_number);
                    p.snap_namespace.encode(e);
                }
                e.map_u64_u64(&m.snap_seqs);
            }
            Self::Cli => {
                e.u32(2);
            }
            Self::Unknown(t) => {
                e.u32(*t);
            }
        });
        e.into_bytes()
    }
}

fn decode_mirror_peer(d: &mut Decoder<'_>, version: u8) -> DecodeResult<MirrorPeerClientMeta> {
    let image_id = d.string("MirrorPeerClientMeta.image_id")?;
    let state = match d.u32("MirrorPeerClientMeta.state")? {
        0 => MirrorPeerState::Syncing,
        1 => MirrorPeerState::Replaying,
        v => {
            return Err(DecodeError::Invalid {
                what: "MirrorPeerClientMeta.state",
                value: u64::from(v),
            });
        }
    };
    let sync_object_count = d.u64("MirrorPeerClientMeta.sync_object_count")?;
    // Each sync point has two strings and an optional flag: 9 bytes at least.
    let sync_points = d.list(9, "MirrorPeerClientMeta.sync_points", |d| {
        Ok(MirrorPeerSyncPoint {
            snap_name: d.string("MirrorPeerSyncPoint.snap_name")?,
            from_snap_name: d.string("MirrorPeerSyncPoint.from_snap_name")?,
            object_number: d.opt_u64("MirrorPeerSyncPoint.object_number")?,
            snap_namespace: if version >= 2 {
                SnapshotNamespace::decode(d)?
            } else {
                SnapshotNamespace::User
            },
        })
    })?;
    let snap_seqs = d.map_u64_u64("MirrorPeerClientMeta.snap_seqs")?;
    Ok(MirrorPeerClientMeta {
        image_id,
        state,
        sync_object_count,
        sync_points,
        snap_seqs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// librbd's client `""` before its first commit, laid out as 16.2.15
    /// stores it in a header (`rados listomapvals journal.<id>`, `client_`).
    const IMAGE_CLIENT: &[u8] = &[
        0x01, 0x01, 0x26, 0, 0, 0, // Client v1
        0, 0, 0, 0, // id ""
        0x13, 0, 0, 0, // data: 19 bytes
        0x02, 0x01, 0x0d, 0, 0, 0, 0, 0, 0, 0, // ClientData v2, type 0
        0, 0, 0, 0, 0, 0, 0, 0, 0, // tag_class 0, resync false
        0x01, 0x01, 0x04, 0, 0, 0, 0, 0, 0, 0, // empty position
        0, // connected
    ];

    #[test]
    fn decodes_librbd_client() {
        let mut d = Decoder::new(IMAGE_CLIENT);
        let c = Client::decode(&mut d).unwrap();
        d.finish("client").unwrap();
        assert_eq!(c.id, "");
        assert_eq!(c.state, ClientState::Connected);
        assert!(c.commit_position.positions.is_empty());
        assert_eq!(
            c.client_data().unwrap(),
            ClientData::Image(ImageClientMeta::default())
        );
    }

    #[test]
    fn mirror_peer_round_trips() {
        let m = ClientData::MirrorPeer(MirrorPeerClientMeta {
            image_id: "abc".into(),
            state: MirrorPeerState::Syncing,
            sync_object_count: 3,
            sync_points: vec![MirrorPeerSyncPoint {
                snap_name: ".rbd-mirror.x".into(),
                from_snap_name: String::new(),
                object_number: Some(7),
                snap_namespace: SnapshotNamespace::User,
            }],
            snap_seqs: vec![(4, 9)],
        });
        assert_eq!(ClientData::decode_all(&m.encode()).unwrap(), m);
    }

    #[test]
    fn tag_data_round_trips_and_is_25_bytes_when_empty() {
        assert_eq!(TagData::default().encode().len(), 25);
        let t = TagData {
            mirror_uuid: ORPHAN_MIRROR_UUID.into(),
            predecessor: TagPredecessor {
                mirror_uuid: String::new(),
                commit_valid: true,
                tag_tid: 3,
                entry_tid: 40,
            },
        };
        assert_eq!(TagData::decode_all(&t.encode()).unwrap(), t);
        let mut long = t.encode();
        long.push(0);
        assert!(matches!(
            TagData::decode_all(&long),
            Err(DecodeError::Trailing { .. })
        ));
    }

    #[test]
    fn position_round_trips() {
        let p = ObjectSetPosition {
            positions: vec![
                ObjectPosition {
                    object_number: 1,
                    tag_tid: 2,
                    entry_tid: 5,
                },
                ObjectPosition {
                    object_number: 0,
                    tag_tid: 2,
                    entry_tid: 4,
                },
            ],
        };
        let mut e = Encoder::new();
        p.encode(&mut e);
        let b = e.into_bytes();
        assert_eq!(ObjectSetPosition::decode(&mut Decoder::new(&b)).unwrap(), p);
    }

    #[test]
    fn snapshot_namespaces_round_trip() {
        for ns in [
            SnapshotNamespace::User,
            SnapshotNamespace::Group {
                group_pool: 3,
                group_id: "g".into(),
                group_snapshot_id: "s".into(),
            },
            SnapshotNamespace::Trash {
                original_name: "old".into(),
                original_kind: 0,
            },
            SnapshotNamespace::Mirror(vec![1, 2, 3]),
            SnapshotNamespace::Unknown {
                kind: 9,
                raw: vec![4],
            },
        ] {
            let mut e = Encoder::new();
            ns.encode(&mut e);
            let b = e.into_bytes();
            assert_eq!(
                SnapshotNamespace::decode(&mut Decoder::new(&b)).unwrap(),
                ns
            );
        }
    }

    #[test]
    fn hostile_sync_point_count_is_refused() {
        let mut e = Encoder::new();
        e.versioned(2, 1, |e| {
            e.u32(1).string("id").u32(1).u64(0).u32(u32::MAX);
        });
        assert!(matches!(
            ClientData::decode_all(&e.into_bytes()),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
