//! Incremental rollback: brings an image's head back to one of its
//! snapshots by rewriting only the extents written since that snapshot
//! (`rbd_diff_iterate2` from the snapshot to the head), instead of
//! `rbd_snap_rollback`, which rewrites every object of the image.

use std::sync::Arc;

use csirr_ceph::{Image, IoCtx};

use super::copy::{self, CopyLimits, Extent};
use super::error::{CephContext, Result};

/// Rolls the head of `img` back to snapshot `snap`; returns the bytes
/// rewritten. `img` must be writable by this client (its exclusive lock held
/// or free). Blocking.
pub fn rollback_to(
    io: &Arc<IoCtx>,
    img: &Image,
    snap: &str,
    limits: CopyLimits,
    cancelled: &dyn Fn() -> bool,
) -> Result<u64> {
    let spec = img.spec();
    let at = Image::open_read_only(io, img.name(), Some(snap))
        .ctx(|| format!("opening {spec}@{snap}"))?;
    let size = at.size().ctx(|| format!("{spec}@{snap}"))?;
    if img.size().ctx(|| spec.clone())? != size {
        img.resize(size)
            .ctx(|| format!("resizing {spec} back to {snap}"))?;
    }
    // Whole objects at a time: an object the snapshot does not have is then
    // zeroed in one request, which removes it, instead of being left behind
    // full of zeroes for the next delta to carry.
    let obj_size = at.stat().ctx(|| format!("{spec}@{snap}"))?.obj_size;
    let limits = CopyLimits {
        chunk: limits.chunk.max(obj_size),
        ..limits
    };
    // What changed on the head since the snapshot; every such extent gets
    // the snapshot's content back (zeroes where the snapshot has none).
    let changed = copy::changed_extents(img, Some(snap), size, limits.chunk, false)?;
    let extents: Vec<Extent> = changed
        .into_iter()
        .map(|e| Extent { data: true, ..e })
        .collect();
    if extents.is_empty() {
        return Ok(0);
    }
    let stats = copy::copy_extents(
        (&at).into(),
        img.into(),
        &extents,
        false,
        limits,
        None,
        &[],
        cancelled,
        &mut |_, _| {},
    )?;
    tracing::info!(image = %spec, snapshot = snap, bytes = stats.transferred(), "rolled back");
    Ok(stats.transferred())
}
