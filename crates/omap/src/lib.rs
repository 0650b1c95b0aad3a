//! The omap generator: ceph-csi's omap journal, read and written so that
//! ceph-csi on the replica's cluster finds a replicated volume by the handle
//! and the PV it already has.
//!
//! This module owns the journal entries of one volume on one cluster: it
//! reads them, creates them, repairs a stale image id, and refuses to touch
//! an entry that belongs to another volume. It must not create, delete or
//! modify images, must not delete volume journal entries (ceph-csi's
//! DeleteVolume does that), and must not write a key ceph-csi does not know.
//! The volume group journal ([`group`]) is the exception that proves the
//! rule: the VolumeGroup service creates and deletes groups, so it writes
//! and deletes their entries, in ceph-csi's layout and order.
//!
//! # Layout on RADOS (as ceph-csi's `internal/journal/voljournal.go` keeps it)
//!
//! Every object is in the RADOS namespace of the cluster ID's `radosNamespace`
//! in ceph-csi's `config.json` ("" for the default namespace); values are raw
//! strings, not length-prefixed.
//!
//! | object | pool | key | value |
//! |---|---|---|---|
//! | `csi.volumes.<instance>` (directory; instance is ceph-csi's `--instanceid`, default `default`) | journal pool (`journalPool` of the StorageClass, default the image pool) | `csi.volume.<PV name>` | `<uuid>`, or `<image pool id>/<uuid>` when the image pool is not the journal pool (pool id: 16 hex digits, the 8 bytes big-endian) |
//! | `csi.volume.<uuid>` (per volume) | image pool | `csi.volname` | PV name (ceph-csi's request name) |
//! | | | `csi.imagename` | image name: `volumeNamePrefix` (default `csi-vol-`) + uuid |
//! | | | `csi.imageid` | librbd image id on this cluster |
//! | | | `csi.volume.owner` | the PVC's namespace (optional) |
//! | | | `csi.journalpool` | journal pool id, 16 hex digits, only when it is not the image pool |
//! | | | `csi.volume.encryptKMS` | KMS ID of an encrypted volume (optional) |
//! | | | `csi.volume.encryptionType` | `block` or `file` (optional, with the KMS ID) |
//!
//! The volume handle `0001-<len>-<cluster ID>-<pool id>-<uuid>` names the
//! image pool by id; ceph-csi resolves it by reading `csi.volume.<uuid>` in
//! that pool (through the cluster mapping when the handle was minted on the
//! peer). The directory maps the PV name back to the uuid for CreateVolume's
//! idempotence and DeleteVolume's cleanup.
//!
//! Lifecycle: ceph-csi's CreateVolume creates `csi.volume.<uuid>` first
//! (exclusively, which reserves the uuid), then the directory key, then the
//! per-volume keys, then the image, and stores `csi.imageid` once the image
//! exists; DeleteVolume removes them in the reverse order. Its PV controller
//! (`RegenerateJournal`) does the same for a PV whose image arrived by
//! mirroring, reusing the handle's uuid.
//!
//! One deliberate difference: when the journal pool is not the image pool,
//! ceph-csi creates the `csi.volume.<uuid>` object in the image pool but
//! writes its keys into an object of the same name in the journal pool,
//! while every reader (volume handle resolution, CreateVolume's reservation
//! check) reads the image pool. We write the keys where they are read: the
//! image pool. With one pool (the usual case) the two agree.
//!
//! # Writes
//!
//! [`journal::ensure`] writes in ceph-csi's order (the volume object, then
//! the directory key) with compare-and-set RADOS ops: an exclusive create, or
//! `omap_cmp` guards on every key the decision read, so that a concurrent
//! writer makes the write fail and be re-decided instead of being
//! overwritten. Writing the same content again writes nothing.
//!
//! # Parts
//!
//! - [`group`]: ceph-csi's volume group journal (`csi.groups.<instance>`,
//!   `csi.volume.group.<uuid>`), for the VolumeGroup service.
//! - [`journal`]: the layout, the pure [`journal::diff`], RADOS reads and
//!   writes, and [`journal::replicate_entry`] for the replayer.
//! - [`manifest`] and [`plan`]: the pure core of `omap-generate`, from
//!   PersistentVolume objects to entries.
//! - [`generate`]: the executor against a cluster.
//! - [`lease`]: the leader-election decision of `--watch-pvs`.
//!
//! The command-line glue (`omap-generate`, `--watch-pvs`) is the binary's
//! (`src/omap_cli.rs`).

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod error;
pub mod generate;
pub mod group;
pub mod journal;
pub mod lease;
pub mod manifest;
pub mod plan;
#[cfg(feature = "kube")]
pub mod watch;

pub use error::OmapError;
pub use journal::{Entry, Outcome, ensure, replicate_entry, uuid_from_image_name};
