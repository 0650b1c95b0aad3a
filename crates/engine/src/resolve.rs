//! Volume resolution: from the volume ID a request carries to an open image.
//!
//! A ceph-csi volume handle names a cluster ID (monitors come from ceph-csi's
//! `config.json`, translated through the cluster-mapping file when the handle
//! was minted on the peer cluster), a pool ID and a uuid; the uuid's
//! `csi.volume.<uuid>` omap object in that pool and the cluster's RADOS
//! namespace names the image. A `pool[/namespace]/image` spec names the image
//! on the local cluster directly.

use std::sync::Arc;

use csirr_ceph::{ErrorKind, Image, IoCtx};
use csirr_csi::handle::VolumeHandle;
use csirr_csi::volume_id::VolumeId;

use super::Engine;
use super::conn::Credentials;
use super::error::{CephContext, EngineError, Result};

/// A resolved volume: its image, open read-write.
pub struct Resolved {
    /// The image.
    pub image: Image,
    /// librbd image id.
    pub image_id: String,
    /// The ceph-csi handle, when the volume was named by one.
    pub handle: Option<VolumeHandle>,
}

impl Resolved {
    /// The image's ioctx.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        self.image.ioctx()
    }
}

/// ceph-csi's per-volume journal keys, declared once in the omap module.
use csirr_omap::journal::keys::{IMAGE_ID as CSI_IMAGE_ID_KEY, IMAGE_NAME as CSI_IMAGE_KEY};

impl Engine {
    /// Resolves `vol` with `creds` (or the sidecar's own credentials) and
    /// opens its image. Blocking.
    pub fn resolve(&self, vol: &VolumeId, creds: Option<&Credentials>) -> Result<Resolved> {
        let creds = creds.unwrap_or(&self.cfg.local_creds);
        match vol {
            VolumeId::Spec {
                pool,
                namespace,
                image,
            } => {
                let cluster = self.conns.get(&self.cfg.local_cluster.mon_host(), creds)?;
                let ns = namespace.as_deref().unwrap_or("");
                let io = cluster
                    .ioctx(pool, ns)
                    .ctx(|| format!("volume {vol}: opening pool {pool}"))?;
                let img = Image::open(&io, image).ctx(|| format!("volume {vol}"))?;
                let image_id = img.id().ctx(|| format!("volume {vol}"))?;
                Ok(Resolved {
                    image: img,
                    image_id,
                    handle: None,
                })
            }
            VolumeId::Handle(h) => self.resolve_handle(h, creds),
        }
    }

    /// The pools (opened in the cluster's RADOS namespace) that handle-encoded
    /// `h` may name on the cluster this sidecar serves: its own cluster ID
    /// and pool ID, and those the cluster mapping translates them to. Each
    /// candidate is an ioctx, or the `NotFound` saying why it is none (its
    /// pool does not exist). `what` names the thing in messages ("volume",
    /// "volume group"). Blocking.
    pub(crate) fn handle_ioctxs(
        &self,
        what: &str,
        h: &VolumeHandle,
        creds: &Credentials,
    ) -> Result<Vec<Result<Arc<IoCtx>>>> {
        // This sidecar serves one Ceph cluster: only locations whose cluster
        // ID names it (by its monitors) are candidates. A handle minted on
        // the peer cluster reaches here through the cluster mapping.
        let local_mons = self.cfg.local_cluster.mon_host();
        let locations: Vec<_> = self
            .cfg
            .mapping
            .local_candidates(&self.cfg.csi_config, h.cluster_id(), h.pool_id())
            .map_err(|e| EngineError::NotFound(format!("{what} {h}: {e}")))?
            .into_iter()
            .filter_map(|loc| {
                let cc = self.cfg.csi_config.cluster(&loc.cluster_id).ok()?;
                (cc.mon_host() == local_mons).then(|| (loc, cc.clone()))
            })
            .collect();
        if locations.is_empty() {
            return Err(EngineError::NotFound(format!(
                "{what} {h}: cluster ID {:?} is not cluster {:?} that this sidecar serves, \
                 and no cluster mapping translates it",
                h.cluster_id(),
                self.cfg.local_cluster.cluster_id
            )));
        }
        let mut out = Vec::new();
        for (loc, cc) in locations {
            let cluster = self.conns.get(&cc.mon_host(), creds)?;
            let pool = match cluster.pool_reverse_lookup(loc.pool_id) {
                Ok(p) => p,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    out.push(Err(EngineError::NotFound(format!(
                        "{what} {h}: pool id {} does not exist on cluster {}",
                        loc.pool_id, loc.cluster_id
                    ))));
                    continue;
                }
                Err(e) => {
                    return Err(e).ctx(|| format!("{what} {h}: looking up pool {}", loc.pool_id));
                }
            };
            let ns = cc.rados_namespace.as_deref().unwrap_or("");
            out.push(Ok(cluster
                .ioctx_by_id(loc.pool_id, &pool, ns)
                .ctx(|| format!("{what} {h}: opening pool {pool}"))?));
        }
        Ok(out)
    }

    fn resolve_handle(&self, h: &VolumeHandle, creds: &Credentials) -> Result<Resolved> {
        let mut last = None;
        for io in self.handle_ioctxs("volume", h, creds)? {
            let io = match io {
                Ok(io) => io,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let oid = format!("csi.volume.{}", h.uuid());
            let vals = match io.omap_get_vals_by_keys(&oid, &[CSI_IMAGE_KEY, CSI_IMAGE_ID_KEY]) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    last = Some(EngineError::NotFound(format!(
                        "volume {h}: no ceph-csi journal entry {oid} in {}",
                        io.spec()
                    )));
                    continue;
                }
                Err(e) => return Err(e).ctx(|| format!("volume {h}: reading {oid}")),
            };
            let name = match vals.get(CSI_IMAGE_KEY) {
                Some(n) if !n.is_empty() => String::from_utf8_lossy(n).into_owned(),
                _ => {
                    last = Some(EngineError::NotFound(format!(
                        "volume {h}: journal entry {oid} in {} has no {CSI_IMAGE_KEY}",
                        io.spec()
                    )));
                    continue;
                }
            };
            let img = match Image::open(&io, &name) {
                Ok(i) => i,
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    last = Some(EngineError::NotFound(format!(
                        "volume {h}: image {}/{name} does not exist",
                        io.spec()
                    )));
                    continue;
                }
                Err(e) => return Err(e).ctx(|| format!("volume {h}: opening {name}")),
            };
            let image_id = img.id().ctx(|| format!("volume {h}"))?;
            return Ok(Resolved {
                image: img,
                image_id,
                handle: Some(h.clone()),
            });
        }
        Err(last.unwrap_or_else(|| EngineError::NotFound(format!("volume {h} not found"))))
    }
}
