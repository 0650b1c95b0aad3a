//! The admin service (`csirr.admin.v1.Admin`, this project's own proto):
//! pool status, pool promote and pool demote, for operators and the
//! `csi-rbd-replicator pool` command. It validates the request, asks the
//! engine (`csirr_engine::pool`), and maps errors through the one
//! `From<EngineError> for Status` (`super::status`), per image as well.
//!
//! Calls carry no secrets: the engine acts with the sidecar's own
//! credentials. Bad input fails the call before anything is changed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost_types::Timestamp;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::proto::admin::admin_server::Admin;
use super::proto::admin::{self as pb, pool_op_event::Event};
use super::status::from_engine;
use super::status::{code_name, pool_request, pool_request_in};
use csirr_engine::drill::DrillImage;
use csirr_engine::pool::{
    DEFAULT_PARALLEL, ImageOutcome, MAX_PARALLEL, Outcome, PoolOp, validate_image_target,
};
use csirr_engine::pool_mode::{PoolModeOptions, PoolModeSettings};
use csirr_engine::registry::{Schedule, SyncPoint};
use csirr_engine::status::{ImageStatus, PoolStatus, role_name};
use csirr_engine::{Engine, Health};

/// The admin service.
pub struct AdminService {
    engine: Arc<Engine>,
}

impl AdminService {
    /// A service backed by `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    /// Validates, lists the pool's images and streams `op` on them. The
    /// listing's errors (no such pool or namespace) are the call's.
    async fn pool_op(
        &self,
        pool: String,
        (namespace, default_only): (String, bool),
        parallel: u32,
        op: PoolOp,
    ) -> Result<Response<ReceiverStream<Result<pb::PoolOpEvent, Status>>>, Status> {
        let ns = pool_request_in(&pool, &namespace, default_only).map_err(from_engine)?;
        let images = self
            .engine
            .pool_images(&pool, ns.as_deref())
            .await
            .map_err(|e| {
                let s = from_engine(e);
                tracing::info!(op = op.name(), pool, code = ?s.code(), message = s.message(), "pool operation refused");
                s
            })?;
        let parallel = match parallel as usize {
            0 => DEFAULT_PARALLEL,
            n => n.min(MAX_PARALLEL),
        };
        tracing::info!(
            op = op.name(),
            pool,
            namespace,
            images = images.len(),
            parallel,
            "pool operation started"
        );
        let (tx, rx) = mpsc::channel(64);
        let start = Event::Start(pb::PoolOpStart {
            pool: pool.clone(),
            namespace,
            images: images.len() as u32,
            parallel: parallel as u32,
        });
        let _ = tx.send(Ok(event(start))).await;
        let engine = Arc::clone(&self.engine);
        tokio::spawn(async move {
            let began = Instant::now();
            let (otx, mut orx) = mpsc::channel::<ImageOutcome>(64);
            let work = {
                let pool = pool.clone();
                async move {
                    engine
                        .pool_role_change(&pool, images, op, parallel, otx)
                        .await
                }
            };
            let ((), mut sum) = tokio::join!(work, forward_outcomes(&mut orx, &tx));
            sum.duration_ms = millis(began.elapsed());
            tracing::info!(
                op = op.name(),
                pool,
                changed = sum.changed,
                unchanged = sum.unchanged,
                skipped = sum.skipped,
                failed = sum.failed,
                duration_ms = sum.duration_ms,
                "pool operation done"
            );
            let _ = tx.send(Ok(event(Event::Summary(sum)))).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    /// DrillStart (`start`) or DrillStop.
    async fn drill(
        &self,
        r: pb::DrillRequest,
        start: bool,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        let ns = pool_request(&r.pool, &r.namespace).map_err(from_engine)?;
        let images = if start {
            self.engine
                .drill_start(&r.pool, ns.as_deref(), r.images)
                .await
                .map_err(from_engine)?
        } else {
            self.engine
                .drill_stop(&r.pool, ns.as_deref(), r.images)
                .await
                .map_err(from_engine)?
        };
        Ok(Response::new(self.drill_response(r.pool, images)))
    }

    /// A drill's images on the wire.
    fn drill_response(&self, pool: String, images: Vec<DrillImage>) -> pb::DrillResponse {
        pb::DrillResponse {
            cluster_id: self.engine.config().local_cluster.cluster_id.clone(),
            pool,
            images: images
                .into_iter()
                .map(|d| pb::DrillImage {
                    namespace: d.namespace,
                    image: d.image,
                    drill_image: d.drill_image,
                    snapshot: d.snapshot,
                    sync_time: d.sync_time.map(timestamp),
                    bytes: d.bytes,
                })
                .collect(),
        }
    }

    /// Validates and runs `op` on one image; the image's outcome is the
    /// result, the call fails only on bad input or an unknown image.
    async fn image_op(
        &self,
        rpc: &'static str,
        pool: &str,
        namespace: &str,
        image: &str,
        op: PoolOp,
    ) -> Result<Response<pb::ImageResult>, Status> {
        validate_image_target(pool, namespace, image).map_err(from_engine)?;
        match self.engine.image_op(pool, namespace, image, op).await {
            Ok(o) => {
                let r = image_result(o);
                tracing::info!(
                    rpc,
                    pool,
                    namespace,
                    image,
                    code = r.code,
                    ready = r.ready,
                    "image operation done"
                );
                Ok(Response::new(r))
            }
            Err(e) => {
                let s = from_engine(e);
                tracing::info!(rpc, pool, namespace, image, code = ?s.code(), message = s.message(), "image operation refused");
                Err(s)
            }
        }
    }
}

fn event(e: Event) -> pb::PoolOpEvent {
    pb::PoolOpEvent { event: Some(e) }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Streams each image's outcome to the caller as it comes, counting them;
/// once the caller went away the engine is told (closed channel) and starts
/// no more images. Returns the counts.
async fn forward_outcomes(
    orx: &mut mpsc::Receiver<ImageOutcome>,
    tx: &mpsc::Sender<Result<pb::PoolOpEvent, Status>>,
) -> pb::PoolOpSummary {
    let mut sum = pb::PoolOpSummary::default();
    while let Some(o) = orx.recv().await {
        let r = image_result(o);
        match pb::Outcome::try_from(r.outcome) {
            Ok(pb::Outcome::Changed) => sum.changed += 1,
            Ok(pb::Outcome::Unchanged) => sum.unchanged += 1,
            Ok(pb::Outcome::Skipped) => sum.skipped += 1,
            _ => sum.failed += 1,
        }
        if tx.send(Ok(event(Event::Result(r)))).await.is_err() {
            orx.close();
        }
    }
    sum
}

/// One image's outcome on the wire; errors get the code the per-volume RPC
/// would have answered.
fn image_result(o: ImageOutcome) -> pb::ImageResult {
    let (outcome, code, message) = match o.outcome {
        Outcome::Changed => (pb::Outcome::Changed, "OK", String::new()),
        Outcome::Unchanged => (pb::Outcome::Unchanged, "OK", String::new()),
        Outcome::Skipped(why) => (pb::Outcome::Skipped, "OK", why),
        Outcome::Failed(e) => {
            let s = from_engine(e);
            (
                pb::Outcome::Failed,
                code_name(s.code()),
                s.message().to_string(),
            )
        }
    };
    pb::ImageResult {
        namespace: o.image.namespace,
        image: o.image.name,
        role_before: role_name(o.image.role),
        role_after: role_name(o.role_after),
        outcome: outcome as i32,
        code: code.to_string(),
        message,
        duration_ms: millis(o.elapsed),
        ready: o.ready,
    }
}

fn health(h: Health) -> pb::Health {
    match h {
        Health::Healthy => pb::Health::Ok,
        Health::Degraded => pb::Health::Warning,
        Health::Error => pb::Health::Error,
        Health::Unknown => pb::Health::Unknown,
    }
}

fn timestamp(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

fn sync_point(l: &SyncPoint) -> pb::SyncPoint {
    pb::SyncPoint {
        snapshot: l.snap_name.clone(),
        time: Some(timestamp(l.snap_time)),
        duration_ms: l.duration_ms,
        bytes: l.bytes,
    }
}

fn image_status(i: &ImageStatus) -> pb::ImageStatus {
    let a = &i.status;
    pb::ImageStatus {
        namespace: i.namespace.clone(),
        name: i.name.clone(),
        image_id: i.image_id.clone(),
        role: role_name(i.role),
        health: health(a.health) as i32,
        state: a.state.as_str().to_string(),
        description: a.message.clone(),
        seconds_behind: a.seconds_behind,
        last_sync: a.last_sync.as_ref().map(sync_point),
        percent: a.percent,
        bytes_pending: a.bytes_pending,
        interval_seconds: i.interval_seconds,
        rpo_threshold_seconds: a.rpo_threshold_seconds,
        bytes_per_sec: a.bytes_per_sec,
        eta_seconds: a.eta_seconds,
    }
}

/// A pool's status on the wire.
pub fn pool_status(p: &PoolStatus) -> pb::PoolStatusResponse {
    let s = &p.summary;
    pb::PoolStatusResponse {
        pool: p.pool.clone(),
        health: health(s.health) as i32,
        images: s.images as u32,
        states: s
            .states
            .iter()
            .map(|(k, v)| (k.to_string(), *v as u32))
            .collect(),
        roles: s
            .roles
            .iter()
            .map(|(k, v)| (k.clone(), *v as u32))
            .collect(),
        image_statuses: p.images.iter().map(image_status).collect(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn pool_status(
        &self,
        req: Request<pb::PoolStatusRequest>,
    ) -> Result<Response<pb::PoolStatusResponse>, Status> {
        let r = req.into_inner();
        let ns = pool_request_in(&r.pool, &r.namespace, r.default_namespace_only)
            .map_err(from_engine)?;
        match self.engine.pool_status_of(&r.pool, ns.as_deref()).await {
            Ok(p) => Ok(Response::new(pool_status(&p))),
            Err(e) => {
                let s = from_engine(e);
                tracing::debug!(rpc = "PoolStatus", pool = r.pool, code = ?s.code(), message = s.message(), "failed");
                Err(s)
            }
        }
    }

    type PoolPromoteStream = ReceiverStream<Result<pb::PoolOpEvent, Status>>;

    async fn pool_promote(
        &self,
        req: Request<pb::PoolPromoteRequest>,
    ) -> Result<Response<Self::PoolPromoteStream>, Status> {
        let r = req.into_inner();
        let op = PoolOp::Promote {
            force: r.force,
            wait: Duration::from_secs(u64::from(r.wait_seconds)),
        };
        let ns = (r.namespace, r.default_namespace_only);
        self.pool_op(r.pool, ns, r.parallel, op).await
    }

    type PoolDemoteStream = ReceiverStream<Result<pb::PoolOpEvent, Status>>;

    async fn pool_demote(
        &self,
        req: Request<pb::PoolDemoteRequest>,
    ) -> Result<Response<Self::PoolDemoteStream>, Status> {
        let r = req.into_inner();
        let ns = (r.namespace, r.default_namespace_only);
        self.pool_op(r.pool, ns, r.parallel, PoolOp::Demote).await
    }

    async fn site_info(
        &self,
        _req: Request<pb::SiteInfoRequest>,
    ) -> Result<Response<pb::SiteInfoResponse>, Status> {
        let pools = self.engine.replicated_pools().await.map_err(from_engine)?;
        Ok(Response::new(pb::SiteInfoResponse {
            cluster_id: self.engine.config().local_cluster.cluster_id.clone(),
            pools,
        }))
    }

    async fn site_images(
        &self,
        req: Request<pb::SiteImagesRequest>,
    ) -> Result<Response<pb::SiteImagesResponse>, Status> {
        let r = req.into_inner();
        let ns = pool_request_in(&r.pool, &r.namespace, r.default_namespace_only)
            .map_err(from_engine)?;
        let images = self
            .engine
            .site_images(&r.pool, ns.as_deref())
            .await
            .map_err(from_engine)?;
        Ok(Response::new(pb::SiteImagesResponse {
            cluster_id: self.engine.config().local_cluster.cluster_id.clone(),
            pool: r.pool,
            images: images
                .into_iter()
                .map(|i| pb::SiteImage {
                    namespace: i.namespace,
                    name: i.name,
                    replicated: i.role.is_some(),
                    role: i.role.map(role_name).unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn image_promote(
        &self,
        req: Request<pb::ImagePromoteRequest>,
    ) -> Result<Response<pb::ImageResult>, Status> {
        let r = req.into_inner();
        let op = PoolOp::Promote {
            force: r.force,
            wait: Duration::from_secs(u64::from(r.wait_seconds)),
        };
        self.image_op("ImagePromote", &r.pool, &r.namespace, &r.image, op)
            .await
    }

    async fn image_demote(
        &self,
        req: Request<pb::ImageRequest>,
    ) -> Result<Response<pb::ImageResult>, Status> {
        // Tests: `admin::image_demote=3*off->return` makes this site stop
        // answering demotions part-way through a site failover.
        fail::fail_point!("admin::image_demote", |_| Err(Status::unavailable(
            "fail point admin::image_demote"
        )));
        let r = req.into_inner();
        self.image_op(
            "ImageDemote",
            &r.pool,
            &r.namespace,
            &r.image,
            PoolOp::Demote,
        )
        .await
    }

    async fn image_resync(
        &self,
        req: Request<pb::ImageResyncRequest>,
    ) -> Result<Response<pb::ImageResult>, Status> {
        let r = req.into_inner();
        let op = PoolOp::Resync { force: r.force };
        self.image_op("ImageResync", &r.pool, &r.namespace, &r.image, op)
            .await
    }

    async fn drill_start(
        &self,
        req: Request<pb::DrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        self.drill(req.into_inner(), true).await
    }

    async fn drill_stop(
        &self,
        req: Request<pb::DrillRequest>,
    ) -> Result<Response<pb::DrillResponse>, Status> {
        self.drill(req.into_inner(), false).await
    }

    async fn pool_mode_enable(
        &self,
        req: Request<pb::PoolModeRequest>,
    ) -> Result<Response<pb::PoolModeResponse>, Status> {
        let r = req.into_inner();
        let schedule = Schedule {
            interval: (!r.scheduling_interval.is_empty()).then(|| r.scheduling_interval.clone()),
            start_time: (!r.scheduling_start_time.is_empty())
                .then(|| r.scheduling_start_time.clone()),
        };
        let journal = match r.mirroring_mode.as_str() {
            "" | "snapshot" => false,
            "journal" => true,
            other => {
                return Err(from_engine(csirr_engine::EngineError::InvalidArgument(
                    format!("mirroring_mode {other:?}: snapshot or journal"),
                )));
            }
        };
        let opts = PoolModeOptions {
            schedule,
            label: r.label.clone(),
            flatten_clones: r.flatten_clones,
            journal,
        };
        let (s, n) = self
            .engine
            .pool_mode_enable(&r.pool, &r.namespace, opts)
            .await
            .map_err(from_engine)?;
        let mut out = pool_mode_response(&r, Some(&s));
        out.images_enrolled = u32::try_from(n).unwrap_or(u32::MAX);
        Ok(Response::new(out))
    }

    async fn pool_mode_disable(
        &self,
        req: Request<pb::PoolModeRequest>,
    ) -> Result<Response<pb::PoolModeResponse>, Status> {
        let r = req.into_inner();
        self.engine
            .pool_mode_disable(&r.pool, &r.namespace)
            .await
            .map_err(from_engine)?;
        Ok(Response::new(pool_mode_response(&r, None)))
    }

    async fn pool_mode_get(
        &self,
        req: Request<pb::PoolModeRequest>,
    ) -> Result<Response<pb::PoolModeResponse>, Status> {
        let r = req.into_inner();
        let s = self
            .engine
            .pool_mode_get(&r.pool, &r.namespace)
            .await
            .map_err(from_engine)?;
        Ok(Response::new(pool_mode_response(&r, s.as_ref())))
    }

    async fn image_details(
        &self,
        req: Request<pb::SiteImagesRequest>,
    ) -> Result<Response<pb::ImageDetailsResponse>, Status> {
        let r = req.into_inner();
        let ns = pool_request_in(&r.pool, &r.namespace, r.default_namespace_only)
            .map_err(from_engine)?;
        let images = self
            .engine
            .image_details(&r.pool, ns.as_deref())
            .await
            .map_err(from_engine)?;
        Ok(Response::new(pb::ImageDetailsResponse {
            cluster_id: self.engine.config().local_cluster.cluster_id.clone(),
            pool: r.pool,
            images: images
                .into_iter()
                .map(|i| pb::ImageDetail {
                    namespace: i.namespace,
                    name: i.name,
                    size: i.size,
                    clone: i.clone,
                    clients: i.clients,
                    role: i.role.map(role_name).unwrap_or_default(),
                    demotion_snapshot: i.demotion_snap.unwrap_or_default(),
                    newest_sync_snapshot: i.newest_sync_snap.unwrap_or_default(),
                    parent: i
                        .parent
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                    parent_pool: i
                        .parent
                        .as_ref()
                        .map(|p| p.pool.clone())
                        .unwrap_or_default(),
                    parent_namespace: i
                        .parent
                        .as_ref()
                        .map(|p| p.namespace.clone())
                        .unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn image_checksum(
        &self,
        req: Request<pb::ImageChecksumRequest>,
    ) -> Result<Response<pb::ImageChecksumResponse>, Status> {
        let r = req.into_inner();
        let c = self
            .engine
            .image_checksum(&r.pool, &r.namespace, &r.image, &r.snapshot)
            .await
            .map_err(from_engine)?;
        Ok(Response::new(pb::ImageChecksumResponse {
            sha256: c.sha256,
            size: c.size,
        }))
    }

    async fn image_disable(
        &self,
        req: Request<pb::ImageDisableRequest>,
    ) -> Result<Response<pb::ImageDisableResponse>, Status> {
        let r = req.into_inner();
        let removed = self
            .engine
            .image_disable(&r.pool, &r.namespace, &r.image, r.force, r.remove)
            .await
            .map_err(|e| {
                let s = from_engine(e);
                tracing::info!(rpc = "ImageDisable", pool = r.pool, namespace = r.namespace, image = r.image, code = ?s.code(), message = s.message(), "refused");
                s
            })?;
        Ok(Response::new(pb::ImageDisableResponse { removed }))
    }
}

/// A namespace's pool-mode settings on the wire (`None`: off).
fn pool_mode_response(
    r: &pb::PoolModeRequest,
    s: Option<&PoolModeSettings>,
) -> pb::PoolModeResponse {
    pb::PoolModeResponse {
        pool: r.pool.clone(),
        namespace: r.namespace.clone(),
        enabled: s.is_some(),
        scheduling_interval: s
            .and_then(|s| s.schedule.interval.clone())
            .unwrap_or_default(),
        scheduling_start_time: s
            .and_then(|s| s.schedule.start_time.clone())
            .unwrap_or_default(),
        label: s.map(|s| s.label.clone()).unwrap_or_default(),
        enabled_at: s.map(|s| timestamp(s.enabled_at)),
        images_enrolled: 0,
        mirroring_mode: s
            .map(|s| if s.journal { "journal" } else { "snapshot" })
            .unwrap_or_default()
            .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csirr_engine::pool::PoolImage;
    use csirr_engine::registry::Role;

    fn outcome(role: Role, after: Role, o: Outcome) -> pb::ImageResult {
        image_result(ImageOutcome {
            image: PoolImage {
                namespace: "ns1".into(),
                name: "vol".into(),
                role,
                volume_id: None,
            },
            role_after: after,
            outcome: o,
            elapsed: Duration::from_millis(1500),
            ready: true,
        })
    }

    #[test]
    fn image_results_carry_the_per_volume_code() {
        let r = outcome(Role::Primary, Role::Demoted, Outcome::Changed);
        assert_eq!(r.outcome, pb::Outcome::Changed as i32);
        assert_eq!((r.code.as_str(), r.role_before.as_str()), ("OK", "primary"));
        assert_eq!((r.role_after.as_str(), r.duration_ms), ("demoted", 1500));
        let r = outcome(
            Role::Secondary,
            Role::Secondary,
            Outcome::Failed(csirr_engine::EngineError::Unavailable(
                "the peer's demotion snapshot is still being replicated".into(),
            )),
        );
        assert_eq!(r.outcome, pb::Outcome::Failed as i32);
        assert_eq!(r.code, "UNAVAILABLE");
        assert!(r.message.contains("still being replicated"), "{r:?}");
        let r = outcome(
            Role::Primary,
            Role::Primary,
            Outcome::Failed(csirr_engine::EngineError::Busy("p/ns1/vol".into())),
        );
        assert_eq!(r.code, "ABORTED");
        let r = outcome(
            Role::Secondary,
            Role::Secondary,
            Outcome::Skipped("a replica".into()),
        );
        assert_eq!(
            (r.outcome, r.code.as_str()),
            (pb::Outcome::Skipped as i32, "OK")
        );
    }
}
