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
//! So the replication of a migrating image pauses at its last sync point
//! (no sync snapshot is taken, the replayer copies nothing: the source's
//! newest sync snapshot is the replica's already), and the image's registry
//! record says so (`live_migration`, which status shows). After `abort` the
//! record is as it was and replication goes on. After `commit`, when the
//! destination is in the same pool, namespace and name (a new layout; the
//! replica lives at the same place on the peer), the record moves to the
//! destination's image id (`migrated_from` the old one) in one registry
//! operation, and the replayer follows it: the replica's newest sync
//! snapshot exists on the new image by name, so the next delta starts from
//! it (no full resync, no missing sync point). A destination elsewhere is
//! reported (the replica cannot follow it there): replication of the new
//! image is enabled anew.
//!
//! A migration is seen when the image's sync point is due (the scheduler
//! looks then); one prepared, executed and committed within one scheduling
//! interval is not seen: the record's image is then gone and the sync fails
//! with NOT_FOUND until replication is enabled on the new image.

use std::sync::Arc;

use chrono::Utc;

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::registry::{ImageRecord, LiveMigration, Registry};
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
        let status = ceph::rbd::migration_status(io, &rec.image_name)
            .ctx(|| format!("reading the migration status of {key}"))?;
        if let Some(st) = status.filter(|s| s.source_id == rec.image_id) {
            let seen = LiveMigration {
                dest_pool_id: st.dest_pool_id,
                dest_namespace: st.dest_namespace.clone(),
                dest_name: st.dest_name.clone(),
                dest_id: st.dest_id.clone(),
                state: st.state.to_string(),
                seen_at: Utc::now(),
            };
            let changed = rec
                .live_migration
                .as_ref()
                .is_none_or(|l| l.state != seen.state || l.dest_id != seen.dest_id);
            if changed {
                tracing::info!(
                    image = %key,
                    state = st.state,
                    destination = %st.dest_name,
                    destination_id = %st.dest_id,
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
    /// image id), or committed elsewhere (an error saying what to do).
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
        if !same_place || now_id.as_deref() != Some(lm.dest_id.as_str()) {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} was live-migrated to {}/{} in pool id {} (image id {}): its replica \
                 cannot follow it to another pool, namespace or name; disable replication and \
                 enable it on the new image",
                lm.dest_namespace, lm.dest_name, lm.dest_pool_id, lm.dest_id
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
}
