//! RBD image journals (the `journaling` feature), as librbd 16.2 writes them
//! and rbd-mirror reads them: decoders and encoders for every on-RADOS
//! structure, and librados access to one image's journal. Not to be
//! confused with ceph-csi's omap "journal" ([`csirr_omap::journal`]).
//!
//! This module owns the format and the reading: it decodes entries,
//! events, positions, tags and client data, reads the header and data
//! objects, registers clients, and [`reader`] hands out a journal's entries
//! in replay order from a commit position. Applying them to a replica and
//! deciding what to commit belong to the engine
//! (`csirr_engine::journal_replay`). No `unsafe` here: librados is
//! reached through [`csirr_ceph`].
//!
//! # On RADOS
//!
//! For image id `ID` in pool `P` (id `N`), namespace `NS`:
//!
//! - `journal.ID` in `P`/`NS`, the header. Omap keys: `order` (u8, objects
//!   of `1 << order` bytes, 24 by default), `splay_width` (u8, 4), `pool_id`
//!   (i64, -1 = `P`), `minimum_set` and `active_set` (u64), `next_tag_tid`,
//!   `next_tag_class` (u64), `client_<id>` ([`Client`]; librbd's own id is
//!   `""`), `tag_<tid as 16 lowercase hex digits>` ([`Tag`]). Changed only
//!   through cls `journal` methods, each followed by an empty notify on the
//!   header. Appends to data objects are not notified.
//! - `journal_data.N.ID.<object number>`, the data objects, in the journal
//!   pool if one is set (still named with `N`). Object number = set ×
//!   splay width + `entry_tid % splay_width`: entries of a tag are spread
//!   round-robin over the objects of the active set, which moves on when an
//!   object passes `1 << order` bytes. Sets below `minimum_set` are trimmed.
//!   Each object is a sequence of [`entry`] framings, possibly with zero
//!   padding between them, whose payloads are [`EventEntry`]s.
//!
//! The format details, and what was checked on 16.2.15 clusters, are in
//! `docs/journal.md`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod codec;
pub mod entry;
pub mod event;
pub mod io;
pub mod reader;
pub mod types;

pub use codec::{DecodeError, Decoder, Encoder};
pub use entry::{Entry, EntryError, ObjectScan, ScanEnd, scan_object};
pub use event::{Event, EventEntry, SnapEvent, UTime};
pub use io::{Journal, JournalError, JournalResult, Layout, RecordedEntry};
pub use reader::{Behind, CommitTracker, JournalReader, ReadEntry, ReaderStats};
pub use types::{
    Client, ClientData, ClientState, ImageClientMeta, MirrorPeerClientMeta, MirrorPeerState,
    MirrorPeerSyncPoint, ObjectPosition, ObjectSetPosition, SnapshotNamespace, Tag, TagData,
    TagPredecessor,
};
