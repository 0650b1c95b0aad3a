//! What a pool migration to another cluster needs from one site's engine,
//! beside pool mode ([`super::pool_mode`]) and the per-image role changes
//! ([`super::pool`]): every image of a pool with the clients that have it
//! open, whether it is a clone, its role and sync snapshots (before a
//! switch); a checksum of one image at a snapshot (to compare the final
//! sync point on both sites); and the end of replication of one image, with
//! its removal if asked (cleanup).
//!
//! The orchestration (`migrate start|status|switch|cleanup`) runs in the
//! command line and drives both sites' sidecars through the admin API
//! (`csirr_grpc::migrate_client`): each sidecar acts on its own cluster
//! only. Data moves only through the replayer (pool mode, Demote, planned
//! Promote): there is no copy path of its own here.
//!
//! Must not: change an image other than through the per-volume operations
//! ([`Engine::disable`]) and, on explicit request, the RBD trash.

use std::sync::Arc;

use super::error::{CephContext, EngineError, Result};
use super::registry::{Registry, Role, sync_snapshots};
use super::{Engine, VolumeRequest};
use csirr_ceph::{Image, rbd};
use csirr_csi::volume_id::VolumeId;

/// Bytes read at once by a checksum.
const CHECKSUM_CHUNK: usize = 4 << 20;

/// One RBD image of a pool as a migration sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDetail {
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// A clone (reads through to a parent snapshot).
    pub clone: bool,
    /// A clone's parent snapshot.
    pub parent: Option<csirr_ceph::ParentSpec>,
    /// Clients that have it open, other than this sidecar
    /// (`client.ID at ADDR`).
    pub clients: Vec<String>,
    /// Its role here when replicated.
    pub role: Option<Role>,
    /// Demoted: the final sync snapshot its demotion took.
    pub demotion_snap: Option<String>,
    /// Its newest sync snapshot here.
    pub newest_sync_snap: Option<String>,
}

/// A checksum of one image at a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checksum {
    /// SHA-256 of the image's bytes at the snapshot, hex.
    pub sha256: String,
    /// The image's size at the snapshot.
    pub size: u64,
}

impl Engine {
    /// Every RBD image of `pool` (one namespace, or all), with its clients,
    /// clone flag, role and sync snapshots, by namespace and name. Reads
    /// only.
    pub async fn image_details(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<ImageDetail>> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        self.run(move |e| {
            let mut out = Vec::new();
            for io in e.pool_ioctxs(&pool, namespace.as_deref())? {
                let me = io.cluster().instance_id();
                let records = Registry::new(Arc::clone(&io)).list()?;
                for spec in rbd::list(&io).ctx(|| format!("listing the images of {}", io.spec()))? {
                    let key = format!("{}/{}", io.spec(), spec.name);
                    let img = match Image::open_read_only(&io, &spec.name, None) {
                        Ok(i) => i,
                        // Removed since the listing.
                        Err(err) if err.kind() == csirr_ceph::ErrorKind::NotFound => continue,
                        Err(err) => return Err(err).ctx(|| format!("opening {key}")),
                    };
                    let clients = img
                        .watchers()
                        .ctx(|| format!("listing clients of {key}"))?
                        .into_iter()
                        .filter(|w| u64::try_from(w.id).ok() != Some(me))
                        .map(|w| format!("client.{} at {}", w.id, w.addr))
                        .collect();
                    let rec = records.iter().find(|r| r.image_name == spec.name);
                    let snaps = img
                        .snap_list()
                        .ctx(|| format!("listing snapshots of {key}"))?;
                    let clone = img.parent_overlap().ctx(|| key.clone())? > 0;
                    let parent = if clone {
                        img.parent().ctx(|| key.clone())?
                    } else {
                        None
                    };
                    out.push(ImageDetail {
                        namespace: io.namespace().to_string(),
                        size: img.size().ctx(|| key.clone())?,
                        clone,
                        parent,
                        clients,
                        role: rec.map(|r| r.role),
                        demotion_snap: rec.and_then(|r| r.demotion_snap.clone()),
                        newest_sync_snap: sync_snapshots(&snaps).pop().map(|(_, s)| s.name),
                        name: spec.name,
                    });
                }
            }
            out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            Ok(out)
        })
        .await
    }

    /// SHA-256 of `pool[/namespace]/image` at snapshot `snap` (every byte,
    /// holes as zeroes, a clone's parent data included): what `rbd export
    /// IMAGE@SNAP - | sha256sum` prints. Reads only.
    pub async fn image_checksum(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
        image: &str,
        snap: &str,
    ) -> Result<Checksum> {
        super::pool::validate_image_target(pool, namespace, image)?;
        if snap.is_empty() {
            return Err(EngineError::InvalidArgument(
                "name the snapshot to checksum".into(),
            ));
        }
        let (p, ns, i, s) = (
            pool.to_string(),
            namespace.to_string(),
            image.to_string(),
            snap.to_string(),
        );
        self.run(move |e| {
            let io = e.namespace_ioctx(&p, &ns)?;
            let spec = format!("{}/{i}@{s}", io.spec());
            let img = Image::open_read_only(&io, &i, Some(&s)).ctx(|| format!("opening {spec}"))?;
            let size = img.size().ctx(|| spec.clone())?;
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut buf = vec![0u8; CHECKSUM_CHUNK];
            let mut off = 0u64;
            while off < size {
                let want = usize::try_from((size - off).min(CHECKSUM_CHUNK as u64))
                    .unwrap_or(CHECKSUM_CHUNK);
                let n = img
                    .read(off, &mut buf[..want])
                    .ctx(|| format!("reading {spec} at {off}"))?;
                if n == 0 {
                    return Err(EngineError::Internal(format!(
                        "{spec}: short read at {off} of {size}"
                    )));
                }
                ctx.update(&buf[..n]);
                off += n as u64;
            }
            let sha256 = ctx
                .finish()
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            Ok(Checksum { sha256, size })
        })
        .await
    }

    /// Ends replication of one image here through
    /// [`Engine::disable`] (with `force`: a replica or demoted image is
    /// detached as a normal image at its last complete sync point), then,
    /// with `remove`, moves the image to the RBD trash (restorable for
    /// seven days). Returns whether it was moved.
    pub async fn image_disable(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
        image: &str,
        force: bool,
        remove: bool,
    ) -> Result<bool> {
        super::pool::validate_image_target(pool, namespace, image)?;
        let volume = VolumeId::Spec {
            pool: pool.to_string(),
            namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
            image: image.to_string(),
        };
        self.disable(
            VolumeRequest {
                volume: volume.clone(),
                creds: None,
            },
            force,
        )
        .await?;
        if !remove {
            return Ok(false);
        }
        let (p, ns, i) = (pool.to_string(), namespace.to_string(), image.to_string());
        self.run(move |e| {
            let io = e.namespace_ioctx(&p, &ns)?;
            if Registry::new(Arc::clone(&io))
                .list()?
                .iter()
                .any(|r| r.image_name == i)
            {
                return Err(EngineError::FailedPrecondition(format!(
                    "{}/{i} is still replicated here; not removed",
                    io.spec()
                )));
            }
            rbd::trash_move(&io, &i, 7 * 86_400)
                .ctx(|| format!("moving {}/{i} to the trash", io.spec()))?;
            tracing::info!(volume = %volume, "image moved to the trash (migration cleanup)");
            Ok(true)
        })
        .await
    }
}
