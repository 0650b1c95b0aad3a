//! DR drills on the secondary: a test image per replica, holding the
//! replica's newest complete sync point, for an application to be started
//! on while replication goes on; removed when the drill stops.
//!
//! The drill image is a **copy**, not a clone: a clone would make the
//! replica a parent whose sync snapshots the replayer could then only move
//! to the trash. The copy reads the
//! replica at its sync snapshot only (opened read-only), so the replica is
//! never written and its replayer keeps its lock and goes on; only the
//! extents the snapshot has allocated are copied.
//!
//! Owns: which replicas a drill covers, the drill images' names (prefix
//! [`DRILL_PREFIX`]) and their removal. Must not: touch the replicas or
//! their registry records.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::Engine;
use super::copy::{self, Extent};
use super::error::{CephContext, EngineError, Result};
use super::registry::{Registry, Role};
use csirr_ceph::{Image, IoCtx, rbd};

/// Name prefix of drill images: `csirr-drill-IMAGE`.
pub const DRILL_PREFIX: &str = "csirr-drill-";

/// One drill image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillImage {
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// The replica it was copied from.
    pub image: String,
    /// The drill image's name.
    pub drill_image: String,
    /// The sync snapshot it holds.
    pub snapshot: String,
    /// When that sync point was taken on the primary.
    pub sync_time: Option<DateTime<Utc>>,
    /// Bytes copied.
    pub bytes: u64,
}

/// The drill image's name for `image`.
pub fn drill_name(image: &str) -> String {
    format!("{DRILL_PREFIX}{image}")
}

impl Engine {
    /// Starts a drill in `pool` (one namespace, or all): copies each replica
    /// (those named in `only`, or every one) at its newest complete sync
    /// point into a drill image next to it. A replica without a complete
    /// sync point, or whose drill image exists already, fails the call
    /// before anything is created (`FailedPrecondition`);
    /// a named image that is not a replica here is `NotFound` /
    /// `FailedPrecondition`.
    pub async fn drill_start(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
        only: Vec<String>,
    ) -> Result<Vec<DrillImage>> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        self.run(move |e| {
            let mut plan = Vec::new();
            for io in e.pool_ioctxs(&pool, namespace.as_deref())? {
                let existing: Vec<String> = rbd::list(&io)
                    .ctx(|| format!("listing the images of {}", io.spec()))?
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                for rec in Registry::new(Arc::clone(&io)).list()? {
                    if !only.is_empty() && !only.contains(&rec.image_name) {
                        continue;
                    }
                    let key = format!("{}/{}", io.spec(), rec.image_name);
                    if rec.role != Role::Secondary {
                        if only.is_empty() {
                            continue;
                        }
                        return Err(EngineError::FailedPrecondition(format!(
                            "{key} is not a replica here; drills run on the secondary site"
                        )));
                    }
                    let Some(last) = rec.last_sync.clone() else {
                        return Err(EngineError::FailedPrecondition(format!(
                            "{key} has no complete sync point yet"
                        )));
                    };
                    let name = drill_name(&rec.image_name);
                    if existing.contains(&name) {
                        return Err(EngineError::FailedPrecondition(format!(
                            "{}/{name} exists: a drill is running; stop it first",
                            io.spec()
                        )));
                    }
                    plan.push((Arc::clone(&io), rec.image_name, name, last));
                }
            }
            if let Some(missing) = only
                .iter()
                .find(|n| !plan.iter().any(|(_, i, _, _)| i == *n))
            {
                return Err(EngineError::NotFound(format!(
                    "replication is not enabled for {missing} in pool {pool}"
                )));
            }
            plan.sort_by(|a, b| (a.0.namespace(), &a.1).cmp(&(b.0.namespace(), &b.1)));
            let mut out = Vec::new();
            for (io, image, name, last) in plan {
                let bytes = e.drill_copy(&io, &image, &name, &last.snap_name)?;
                tracing::info!(image = %format!("{}/{image}", io.spec()), drill_image = %name, snapshot = %last.snap_name, bytes, "drill image created");
                out.push(DrillImage {
                    namespace: io.namespace().to_string(),
                    image,
                    drill_image: name,
                    snapshot: last.snap_name,
                    sync_time: Some(last.snap_time),
                    bytes,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Copies `image` at `snap` into a new image `name`; returns the bytes
    /// copied. The new image is removed again when the copy fails.
    /// Blocking.
    fn drill_copy(&self, io: &Arc<IoCtx>, image: &str, name: &str, snap: &str) -> Result<u64> {
        let spec = format!("{}/{image}@{snap}", io.spec());
        let src = Image::open_read_only(io, image, Some(snap)).ctx(|| format!("opening {spec}"))?;
        let size = src.size().ctx(|| spec.clone())?;
        let obj_size = src.stat().ctx(|| spec.clone())?.obj_size;
        let opts = rbd::CreateOptions {
            order: Some(u64::from(obj_size.max(1).trailing_zeros())),
            ..rbd::CreateOptions::default()
        };
        rbd::create(io, name, size, &opts)
            .ctx(|| format!("creating drill image {}/{name}", io.spec()))?;
        let copied = (|| {
            let dst = Image::open(io, name).ctx(|| format!("opening {}/{name}", io.spec()))?;
            let limits = self.cfg.limits;
            let extents: Vec<Extent> =
                copy::changed_extents(&src, None, size, limits.chunk, false)?
                    .into_iter()
                    .filter(|e| e.data)
                    .collect();
            let stats = copy::copy_extents(
                (&src).into(),
                (&dst).into(),
                &extents,
                false,
                limits,
                None,
                &[],
                &|| false,
                &mut |_, _| {},
            )?;
            Ok(stats.transferred())
        })();
        if copied.is_err() {
            let _ = rbd::remove(io, name);
        }
        copied
    }

    /// Stops a drill in `pool` (one namespace, or all): removes every drill
    /// image (those of the images named in `only`, or all). Returns the
    /// images removed; none is not an error.
    pub async fn drill_stop(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
        only: Vec<String>,
    ) -> Result<Vec<DrillImage>> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        self.run(move |e| {
            let mut out = Vec::new();
            for io in e.pool_ioctxs(&pool, namespace.as_deref())? {
                for s in rbd::list(&io).ctx(|| format!("listing the images of {}", io.spec()))? {
                    let Some(image) = s.name.strip_prefix(DRILL_PREFIX) else {
                        continue;
                    };
                    if !only.is_empty() && !only.iter().any(|n| n == image) {
                        continue;
                    }
                    rbd::remove(&io, &s.name)
                        .ctx(|| format!("removing drill image {}/{}", io.spec(), s.name))?;
                    tracing::info!(image = %format!("{}/{image}", io.spec()), drill_image = %s.name, "drill image removed");
                    out.push(DrillImage {
                        namespace: io.namespace().to_string(),
                        image: image.to_string(),
                        drill_image: s.name.clone(),
                        snapshot: String::new(),
                        sync_time: None,
                        bytes: 0,
                    });
                }
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drill_images_are_named_by_prefix() {
        assert_eq!(drill_name("vol-1"), "csirr-drill-vol-1");
        assert_eq!(
            drill_name("vol-1").strip_prefix(DRILL_PREFIX),
            Some("vol-1")
        );
    }
}
