//! Operations at pool scale: the replicated images of a pool (or of one RBD
//! namespace of it) listed from the registries, and promotion or demotion of
//! all of them, each through the per-volume [`Engine::promote`] /
//! [`Engine::demote`] (same checks, same per-volume operation lock and image
//! slot as the csi-addons RPCs), at most `parallel` at once.
//!
//! Owns: which images a pool operation acts on, what counts as changed,
//! unchanged or skipped, the retry of a planned promotion while the peer's
//! demotion snapshot is still in flight, and the bound on parallelism.
//!
//! Must not: change an image any other way than the per-volume operations
//! do, or know gRPC (outcomes carry the [`EngineError`]; the gRPC layer maps
//! it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::error::{CephContext, EngineError, Result};
use super::registry::{Registry, Role, namespace_ioctxs};
use super::status::{PoolStatus, StatusOptions};
use super::{Engine, VolumeRequest};
use csirr_ceph::IoCtx;
use csirr_csi::params::ReplicationParams;
use csirr_csi::volume_id::VolumeId;

/// Images worked on at once when the caller does not say.
pub const DEFAULT_PARALLEL: usize = 8;
/// The most images worked on at once (each also takes one of the RPC slots).
pub const MAX_PARALLEL: usize = 64;
/// Pause between retries of a planned promotion answered UNAVAILABLE.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// One replicated image of a pool, as its registry record on this cluster
/// names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolImage {
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub name: String,
    /// Role on this cluster when listed.
    pub role: Role,
    /// The ceph-csi handle replication was enabled with, if any: the
    /// volume ID the csi-addons controller uses for it.
    pub volume_id: Option<String>,
}

impl PoolImage {
    /// `namespace/name`, or `name` in the default namespace.
    pub fn spec(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

/// A role change of every image of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolOp {
    /// PromoteVolume on each image; `wait`: how long to retry an image
    /// answered UNAVAILABLE (a planned promotion whose demotion snapshot is
    /// still being copied).
    Promote {
        /// Fail over without the peer.
        force: bool,
        /// Retry UNAVAILABLE answers for this long.
        wait: Duration,
    },
    /// DemoteVolume on each primary (and, idempotently, each demoted)
    /// image; replicas are skipped.
    Demote,
    /// ResyncVolume: a demoted image becomes a replica of the peer's
    /// primary from the newest sync point both share.
    Resync {
        /// Discard the local changes since that sync point.
        force: bool,
    },
}

impl PoolOp {
    /// `promote` or `demote`, for log lines.
    pub fn name(self) -> &'static str {
        match self {
            PoolOp::Promote { .. } => "promote",
            PoolOp::Demote => "demote",
            PoolOp::Resync { .. } => "resync",
        }
    }
}

/// What a pool operation did to one image.
#[derive(Debug)]
pub enum Outcome {
    /// Its role changed.
    Changed,
    /// It already had the role asked for.
    Unchanged,
    /// Not acted on, and why.
    Skipped(String),
    /// The per-volume operation failed.
    Failed(EngineError),
}

/// One image's result.
#[derive(Debug)]
pub struct ImageOutcome {
    /// The image.
    pub image: PoolImage,
    /// Its role as the operation left it (the listed role when it failed
    /// or was skipped).
    pub role_after: Role,
    /// What happened.
    pub outcome: Outcome,
    /// Time spent on it, retries included.
    pub elapsed: Duration,
    /// A resync: whether the replica holds a complete sync point of the
    /// primary yet. True after every other successful operation.
    pub ready: bool,
}

/// One RBD image of a pool, replicated or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteImage {
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub name: String,
    /// Its role here, when replication is enabled for it.
    pub role: Option<Role>,
}

/// Validates a pool operation's target: a pool name and an optional RBD
/// namespace, neither with a `/` (nothing is looked up yet).
pub fn validate_target(pool: &str, namespace: &str) -> Result<()> {
    if pool.is_empty() {
        return Err(EngineError::InvalidArgument(
            "pool name is empty; name the pool".into(),
        ));
    }
    for (what, v) in [("pool", pool), ("namespace", namespace)] {
        if v.contains('/') || v.contains('\0') || v.contains('@') {
            return Err(EngineError::InvalidArgument(format!(
                "{what} name {v:?} contains '/', '@' or NUL"
            )));
        }
    }
    Ok(())
}

/// Validates a one-image operation's target: [`validate_target`], and an
/// image name that is not empty and has no `/`, `@` or NUL.
pub fn validate_image_target(pool: &str, namespace: &str, image: &str) -> Result<()> {
    validate_target(pool, namespace)?;
    if image.is_empty() || image.contains(['/', '@', '\0']) {
        return Err(EngineError::InvalidArgument(format!(
            "image name {image:?} is empty or contains '/', '@' or NUL"
        )));
    }
    Ok(())
}

impl Engine {
    /// The ioctx of every RBD namespace of `pool` (`None`), or of the one
    /// named; `NotFound` when the pool or that namespace does not exist.
    /// Blocking.
    pub(crate) fn pool_ioctxs(
        &self,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<Arc<IoCtx>>> {
        let io = self
            .local()?
            .ioctx(pool, "")
            .ctx(|| format!("opening pool {pool}"))?;
        let all = namespace_ioctxs(&io)?;
        match namespace {
            None => Ok(all),
            Some(ns) => {
                let one: Vec<_> = all.into_iter().filter(|i| i.namespace() == ns).collect();
                if one.is_empty() {
                    Err(EngineError::NotFound(format!(
                        "pool {pool} has no RBD namespace {ns:?}"
                    )))
                } else {
                    Ok(one)
                }
            }
        }
    }

    /// The replicated images of `pool` (one namespace, or all), by namespace
    /// and name. Reads only.
    pub async fn pool_images(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<PoolImage>> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        self.run(move |e| {
            let mut out = Vec::new();
            for io in e.pool_ioctxs(&pool, namespace.as_deref())? {
                for rec in Registry::new(Arc::clone(&io)).list()? {
                    out.push(PoolImage {
                        namespace: io.namespace().to_string(),
                        name: rec.image_name,
                        role: rec.role,
                        volume_id: rec.volume_id,
                    });
                }
            }
            out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            Ok(out)
        })
        .await
    }

    /// Every RBD image of `pool` (one namespace, or all), replicated or
    /// not, by namespace and name. Reads only.
    pub async fn site_images(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<SiteImage>> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        self.run(move |e| {
            let mut out = Vec::new();
            for io in e.pool_ioctxs(&pool, namespace.as_deref())? {
                let roles: std::collections::HashMap<String, Role> = Registry::new(Arc::clone(&io))
                    .list()?
                    .into_iter()
                    .map(|r| (r.image_name, r.role))
                    .collect();
                let names = csirr_ceph::rbd::list(&io)
                    .ctx(|| format!("listing the images of {}", io.spec()))?;
                for spec in names {
                    out.push(SiteImage {
                        namespace: io.namespace().to_string(),
                        role: roles.get(&spec.name).copied(),
                        name: spec.name,
                    });
                }
            }
            out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
            Ok(out)
        })
        .await
    }

    /// The pools this sidecar replicates that hold replicated images,
    /// sorted. Pools that cannot be read (not RBD pools) are left out.
    pub async fn replicated_pools(self: &Arc<Self>) -> Result<Vec<String>> {
        let pools = self.run(|e| e.status_pools()).await?;
        let mut out = Vec::new();
        for p in pools {
            if self
                .pool_images(&p, None)
                .await
                .is_ok_and(|i| !i.is_empty())
            {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// `op` on one replicated image of `pool`, through the per-volume
    /// operation. `NotFound` when replication is not enabled for it here.
    pub async fn image_op(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
        image: &str,
        op: PoolOp,
    ) -> Result<ImageOutcome> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        let img = self
            .pool_images(pool, ns)
            .await?
            .into_iter()
            .find(|i| i.namespace == namespace && i.name == image)
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "replication is not enabled for {pool}/{} here",
                    PoolImage {
                        namespace: namespace.to_string(),
                        name: image.to_string(),
                        role: Role::Secondary,
                        volume_id: None,
                    }
                    .spec()
                ))
            })?;
        Ok(self.image_role_change(pool, img, op).await)
    }

    /// [`Engine::pool_status_in`] on the blocking pool, within the RPC
    /// deadline.
    pub async fn pool_status_of(
        self: &Arc<Self>,
        pool: &str,
        namespace: Option<&str>,
    ) -> Result<PoolStatus> {
        let (pool, namespace) = (pool.to_string(), namespace.map(str::to_string));
        let opts = StatusOptions::of(&self.cfg);
        self.run(move |e| e.pool_status_in(&pool, namespace.as_deref(), &opts))
            .await
    }

    /// Runs `op` on each of `images` (of `pool`), at most `parallel` at
    /// once, sending each image's outcome to `out` as it finishes. Once
    /// `out` is closed (the caller went away) no further image is started;
    /// those already started finish.
    pub async fn pool_role_change(
        self: &Arc<Self>,
        pool: &str,
        images: Vec<PoolImage>,
        op: PoolOp,
        parallel: usize,
        out: mpsc::Sender<ImageOutcome>,
    ) {
        let parallel = parallel.clamp(1, MAX_PARALLEL);
        let mut results = futures::stream::iter(images)
            .map(|img| {
                let (me, out) = (Arc::clone(self), out.clone());
                let pool = pool.to_string();
                async move {
                    if out.is_closed() {
                        return ImageOutcome {
                            role_after: img.role,
                            image: img,
                            outcome: Outcome::Skipped("not started: the caller went away".into()),
                            elapsed: Duration::ZERO,
                            ready: false,
                        };
                    }
                    me.image_role_change(&pool, img, op).await
                }
            })
            .buffer_unordered(parallel);
        while let Some(r) = results.next().await {
            match &r.outcome {
                Outcome::Failed(e) => tracing::info!(
                    op = op.name(),
                    pool,
                    image = %r.image.spec(),
                    error = %e,
                    "pool operation: image failed"
                ),
                o => tracing::info!(
                    op = op.name(),
                    pool,
                    image = %r.image.spec(),
                    outcome = ?o,
                    "pool operation: image done"
                ),
            }
            // A closed channel only stops new images (checked above).
            let _ = out.send(r).await;
        }
    }

    /// `op` on one image, through the per-volume operation.
    async fn image_role_change(
        self: &Arc<Self>,
        pool: &str,
        img: PoolImage,
        op: PoolOp,
    ) -> ImageOutcome {
        let started = Instant::now();
        let done = |img: PoolImage, role_after: Role, outcome: Outcome, ready: bool| ImageOutcome {
            image: img,
            role_after,
            outcome,
            elapsed: started.elapsed(),
            ready,
        };
        if op == PoolOp::Demote && img.role == Role::Secondary {
            let why = "a replica here; nothing to demote".to_string();
            return done(img.clone(), img.role, Outcome::Skipped(why), true);
        }
        let spec = VolumeId::Spec {
            pool: pool.to_string(),
            namespace: (!img.namespace.is_empty()).then(|| img.namespace.clone()),
            image: img.name.clone(),
        };
        // The handle it was enabled with first: the volume ID (and so the
        // per-volume lock) the csi-addons controller uses. When it does not
        // resolve here (no ceph-csi journal entry on this site), the
        // pool/namespace/image spec names the same image.
        let handle = img
            .volume_id
            .as_deref()
            .and_then(|h| VolumeId::parse(h).ok());
        let mut res = match &handle {
            Some(h) => self.role_change_of(h.clone(), op).await,
            None => self.role_change_of(spec.clone(), op).await,
        };
        if handle.is_some()
            && matches!(
                res,
                Err(EngineError::NotFound(_) | EngineError::InvalidArgument(_))
            )
        {
            res = self.role_change_of(spec, op).await;
        }
        let wanted = match op {
            PoolOp::Promote { .. } => Role::Primary,
            PoolOp::Demote => Role::Demoted,
            PoolOp::Resync { .. } => Role::Secondary,
        };
        let already = img.role == wanted;
        match res {
            Ok(ready) if already => done(img, wanted, Outcome::Unchanged, ready),
            Ok(ready) => done(img, wanted, Outcome::Changed, ready),
            Err(e) => done(img.clone(), img.role, Outcome::Failed(e), false),
        }
    }

    /// The per-volume operation; a planned promotion answered UNAVAILABLE
    /// is retried until `wait` has passed. Returns whether the image is
    /// ready (a resync: the replica holds a complete sync point).
    async fn role_change_of(self: &Arc<Self>, volume: VolumeId, op: PoolOp) -> Result<bool> {
        let req = VolumeRequest {
            volume,
            creds: None,
        };
        match op {
            PoolOp::Demote => self.demote(req, false).await.map(|()| true),
            PoolOp::Resync { force } => self.resync(req, force).await,
            PoolOp::Promote { force, wait } => {
                let deadline = Instant::now() + wait;
                loop {
                    match self
                        .promote(req.clone(), force, ReplicationParams::default())
                        .await
                    {
                        Err(EngineError::Unavailable(m)) if Instant::now() < deadline => {
                            tracing::debug!(volume = %req.volume, reason = %m, "promotion not possible yet; retrying");
                            tokio::time::sleep(RETRY_EVERY).await;
                        }
                        r => return r.map(|()| true),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_validated_before_any_lookup() {
        assert!(validate_target("replicapool", "").is_ok());
        assert!(validate_target("replicapool", "ns1").is_ok());
        for (pool, ns) in [
            ("", ""),
            ("a/b", ""),
            ("p", "x/y"),
            ("p@s", ""),
            ("p", "n\0"),
        ] {
            assert!(
                matches!(
                    validate_target(pool, ns),
                    Err(EngineError::InvalidArgument(_))
                ),
                "{pool:?} {ns:?}"
            );
        }
    }

    #[test]
    fn image_targets_need_an_image_name() {
        assert!(validate_image_target("p", "", "vol").is_ok());
        for (pool, ns, image) in [
            ("p", "", ""),
            ("p", "", "a/b"),
            ("", "", "vol"),
            ("p", "", "v@s"),
        ] {
            assert!(
                matches!(
                    validate_image_target(pool, ns, image),
                    Err(EngineError::InvalidArgument(_))
                ),
                "{pool:?} {ns:?} {image:?}"
            );
        }
    }

    #[test]
    fn image_specs_name_the_namespace() {
        let mut i = PoolImage {
            namespace: String::new(),
            name: "vol".into(),
            role: Role::Primary,
            volume_id: None,
        };
        assert_eq!(i.spec(), "vol");
        i.namespace = "ns1".into();
        assert_eq!(i.spec(), "ns1/vol");
    }
}
