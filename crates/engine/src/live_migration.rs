//! Live-migration (`rbd migration prepare|execute|commit|abort`) of a
//! replicated primary image, on the primary's cluster.
//!
//! What librbd does (Pacific 16.2.15, checked on the dev pair):
//! - `prepare` creates the destination image (a new image id) and moves the
//!   source to the trash (source `MIGRATION`); the destination takes the
//!   name given (for a new layout in the same pool: the same name). Every
//!   snapshot is copied to the destination by name, our sync snapshots
//!   (`csirr-sync.*`) included, with new snapshot ids. The source can still
//!   be opened by id and read, at its snapshots too.
//! - Until `execute` has copied the data, `diff_iterate2` on the
//!   destination reports nothing (between two copied snapshots, and from one
//!   to the head) although reads go through to the source: a delta read
//!   there would silently miss data. After `execute` it reports the changes.
//! - `commit` removes the source; `abort` removes the destination and gives
//!   the source its name back, snapshots as they were (snapshots taken on
//!   the destination meanwhile are lost with it).
//!
//! - A source in another pool (or namespace, or renamed) has no name left
//!   in its pool: `rbd_migration_status` cannot find it. Its header still
//!   says where it goes (omap key `migration`, cls_rbd's MigrationSpec, with
//!   the destination's pool id, namespace, name, id and the state), which
//!   is what the scheduler reads, for every migration.
//!
//! So the replication of a migrating image pauses at its last sync point
//! (no sync snapshot is taken, the replayer copies nothing: the source's
//! newest sync snapshot is the replica's already), and the image's registry
//! record says so (`live_migration`, which status shows). After `abort` the
//! record is as it was and replication goes on. After `commit`:
//! - to the same pool, namespace and name (a new layout), the record moves
//!   to the destination's image id (`migrated_from` the old one) in one
//!   registry operation, and the replayer follows it: the replica's newest
//!   sync snapshot exists on the new image by name, so the next delta starts
//!   from it (no full resync, no missing sync point);
//! - to another pool, namespace or name, the record moves to the
//!   destination's registry (`moved_from` the old place; put there first,
//!   then removed here, so a crash in between only leaves the removal to
//!   do), and the peer's replayer moves the replica the same way on its own
//!   cluster (`rbd migration prepare|execute|commit` there, see
//!   `replayer::follow_moved_primary`): the copy stays inside that cluster,
//!   the replica keeps its sync snapshots by name, and replication goes on
//!   from the newest one. The destination pool must be replicated like the
//!   source (a mirror peer on both sites, in the sidecars' `--pools`).
//!
//! A migration is seen when the image's sync point is due (the scheduler
//! looks then); one prepared, executed and committed within one scheduling
//! interval is not seen: the record's image is then gone and the sync fails
//! with NOT_FOUND until replication is enabled on the new image.

use std::sync::Arc;

use chrono::Utc;

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::registry::{ImageRecord, LiveMigration, Place, Registry};
use super::slots::image_key;
use csirr_ceph::{self as ceph, ErrorKind, Image, IoCtx};

/// What the scheduler does with a primary after looking for a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// No migration: schedule as usual.
    Continue,
    /// A migration runs: no sync snapshot now.
    Paused,
    /// A migration was committed: the record moved to the new image id.
    Rebound,
}

impl Engine {
    /// Looks for a live-migration of the primary `rec` in `io` and records
    /// it, or its end (see the module doc). Blocking; the caller holds the
    /// image's slot.
    pub(crate) fn follow_live_migration(
        &self,
        io: &Arc<IoCtx>,
        reg: &Registry,
        rec: &ImageRecord,
    ) -> Result<Step> {
        let key = image_key(io.pool(), io.namespace(), &rec.image_name);
        if let Some(seen) = source_spec(io, &rec.image_id)
            .ctx(|| format!("reading the migration header of {key}"))?
        {
            let changed = rec
                .live_migration
                .as_ref()
                .is_none_or(|l| l.state != seen.state || l.dest_id != seen.dest_id);
            if changed {
                tracing::info!(
                    image = %key,
                    state = %seen.state,
                    destination = %seen.dest_name,
                    destination_id = %seen.dest_id,
                    "live-migration of the primary: replication paused at its last sync point"
                );
                let mut r = rec.clone();
                r.live_migration = Some(seen);
                reg.put(&mut r)?;
                reg.announce();
            }
            return Ok(Step::Paused);
        }
        match rec.live_migration.clone() {
            None => Ok(Step::Continue),
            Some(lm) => self.migration_over(io, reg, rec, &lm),
        }
    }

    /// The end of the live-migration `lm` recorded for `rec`: aborted
    /// (replication goes on), committed in place (the record moves to the new
    /// image id), or committed elsewhere (the record moves there).
    fn migration_over(
        &self,
        io: &Arc<IoCtx>,
        reg: &Registry,
        rec: &ImageRecord,
        lm: &LiveMigration,
    ) -> Result<Step> {
        let key = image_key(io.pool(), io.namespace(), &rec.image_name);
        // The migration is over: aborted (the name is the record's image
        // again) or committed (the source is gone).
        let now_id = match Image::open_read_only(io, &rec.image_name, None) {
            Ok(img) => Some(img.id().ctx(|| key.clone())?),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e).ctx(|| format!("opening {key}")),
        };
        if now_id.as_deref() == Some(rec.image_id.as_str()) {
            tracing::info!(image = %key, "live-migration aborted: replication goes on");
            let mut r = rec.clone();
            r.live_migration = None;
            reg.put(&mut r)?;
            reg.announce();
            return Ok(Step::Continue);
        }
        match Image::open_by_id_read_only(io, &rec.image_id, None) {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            // Still there (aborting, or an error state): wait.
            Ok(_) => return Ok(Step::Paused),
            Err(e) => return Err(e).ctx(|| format!("opening {key} by id")),
        }
        let same_place = lm.dest_pool_id == io.pool_id()
            && lm.dest_namespace == io.namespace()
            && lm.dest_name == rec.image_name;
        if !same_place {
            return self.moved_elsewhere(io, reg, rec, lm);
        }
        if now_id.as_deref() != Some(lm.dest_id.as_str()) {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} was live-migrated to image id {} but its name now holds another image; \
                 disable replication and enable it on the image you want replicated",
                lm.dest_id
            )));
        }
        if reg.get(&lm.dest_id)?.is_some() {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} was live-migrated to image id {} which has a registry record of its \
                 own; not moving the record",
                lm.dest_id
            )));
        }
        let mut new = rec.clone();
        new.image_id = lm.dest_id.clone();
        new.live_migration = None;
        new.migrated_from = Some(rec.image_id.clone());
        new.revision = Default::default();
        reg.rebind(rec, &mut new)?;
        reg.announce();
        tracing::info!(
            image = %key,
            from = %rec.image_id,
            to = %new.image_id,
            "live-migration committed: replication follows the new image"
        );
        Ok(Step::Rebound)
    }

    /// A live-migration `lm` of `rec` committed to another pool, namespace
    /// or name: the record moves to the destination's registry (with
    /// `moved_from`, so that the peer's sidecar moves the replica the same
    /// way) and leaves this one. Put first, removed second: a crash in
    /// between finds the new record and only removes the old one.
    fn moved_elsewhere(
        &self,
        io: &Arc<IoCtx>,
        reg: &Registry,
        rec: &ImageRecord,
        lm: &LiveMigration,
    ) -> Result<Step> {
        let key = image_key(io.pool(), io.namespace(), &rec.image_name);
        let pool = io.cluster().pool_reverse_lookup(lm.dest_pool_id).ctx(|| {
            format!(
                "looking up pool id {} ({key}'s destination)",
                lm.dest_pool_id
            )
        })?;
        let dest = io
            .cluster()
            .ioctx(&pool, &lm.dest_namespace)
            .ctx(|| format!("opening {pool}/{} ({key}'s destination)", lm.dest_namespace))?;
        let to = image_key(&pool, &lm.dest_namespace, &lm.dest_name);
        let img = Image::open_read_only(&dest, &lm.dest_name, None)
            .ctx(|| format!("opening {to}, where {key} was live-migrated"))?;
        if img.id().ctx(|| to.clone())? != lm.dest_id {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} was live-migrated to {to} (image id {}), but {to} is another image now; \
                 disable replication and enable it on the image you want replicated",
                lm.dest_id
            )));
        }
        drop(img);
        let dreg = Registry::new(Arc::clone(&dest));
        if dreg.get(&lm.dest_id)?.is_none() {
            let mut new = rec.clone();
            new.image_id = lm.dest_id.clone();
            new.image_name = lm.dest_name.clone();
            new.live_migration = None;
            new.migrated_from = Some(rec.image_id.clone());
            new.moved_from = Some(Place {
                pool: io.pool().to_string(),
                namespace: io.namespace().to_string(),
                name: rec.image_name.clone(),
            });
            new.revision = Default::default();
            dreg.put(&mut new)?;
        }
        reg.remove(rec)?;
        reg.announce();
        dreg.announce();
        tracing::info!(
            image = %key,
            to = %to,
            from_id = %rec.image_id,
            to_id = %lm.dest_id,
            "live-migration committed to another place: replication follows the new image there"
        );
        Ok(Step::Rebound)
    }
}

/// The live-migration image `image_id` of `io` is the source of, from its
/// header (`rbd_header.<id>`, omap key `migration`: cls_rbd's
/// MigrationSpec): `None` when it is the source of none (or is gone).
/// Unlike `rbd_migration_status` it needs no name (a source moved to
/// another pool has none left) and opens no image. Blocking.
fn source_spec(io: &IoCtx, image_id: &str) -> ceph::Result<Option<LiveMigration>> {
    let vals = match io.omap_get_vals_by_keys(&format!("rbd_header.{image_id}"), &["migration"]) {
        Ok(v) => v,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(vals.get("migration").and_then(|b| decode_source_spec(b)))
}

/// Decodes a MigrationSpec (Pacific: version 3, `ENCODE_START` framing)
/// when it is a source's (header type 1); `None` for a destination's or
/// bytes that do not decode.
fn decode_source_spec(b: &[u8]) -> Option<LiveMigration> {
    let mut d = SpecReader(b);
    let _version = d.u8()?;
    let _compat = d.u8()?;
    let len = d.u32()? as usize;
    let mut d = SpecReader(d.0.get(..len)?);
    if d.u8()? != 1 {
        return None;
    }
    let dest_pool_id = d.u64()? as i64;
    let dest_namespace = d.string()?;
    let dest_name = d.string()?;
    let dest_id = d.string()?;
    let snap_seqs = d.u32()? as usize;
    d.skip(snap_seqs.checked_mul(16)?)?;
    let _overlap = d.u64()?;
    let _flatten = d.u8()?;
    let _mirroring = d.u8()?;
    let state = match d.u8()? {
        0 => "error",
        1 => "preparing",
        2 => "prepared",
        3 => "executing",
        4 => "executed",
        5 => "aborting",
        _ => "unknown",
    };
    Some(LiveMigration {
        dest_pool_id,
        dest_namespace,
        dest_name,
        dest_id,
        state: state.to_string(),
        seen_at: Utc::now(),
    })
}

/// A little-endian cursor over Ceph-encoded bytes.
struct SpecReader<'a>(&'a [u8]);

impl SpecReader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = rest;
        Some(head)
    }

    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `migration` key of a source header as Ceph 16.2.15 wrote it
    /// (`rbd migration prepare lmtest/img1 lmtest2/img1`, then `rados
    /// getomapval rbd_header.<id> migration`; lmtest2 had pool id 30).
    const PREPARED_SOURCE: &[u8] = &[
        0x03, 0x01, 0x3d, 0x00, 0x00, 0x00, 0x01, 0x1e, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, b'i', b'm', b'g', b'1', 0x0c, 0x00, 0x00,
        0x00, b'3', b'7', b'4', b'8', b'e', b'6', b'0', b'6', b'4', b'4', b'c', b'0', 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn a_prepared_source_names_its_destination() {
        let m = decode_source_spec(PREPARED_SOURCE).expect("decodes");
        assert_eq!(m.dest_pool_id, 30);
        assert_eq!(m.dest_namespace, "");
        assert_eq!(m.dest_name, "img1");
        assert_eq!(m.dest_id, "3748e60644c0");
        assert_eq!(m.state, "prepared");
    }

    #[test]
    fn a_destination_header_or_short_bytes_are_not_a_source() {
        let mut dst = PREPARED_SOURCE.to_vec();
        dst[6] = 2;
        assert!(decode_source_spec(&dst).is_none());
        for n in 0..PREPARED_SOURCE.len() {
            assert!(
                decode_source_spec(&PREPARED_SOURCE[..n]).is_none(),
                "{n} bytes"
            );
        }
    }
}
