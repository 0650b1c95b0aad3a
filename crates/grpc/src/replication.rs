//! The csi-addons replication Controller service. Every handler runs in one
//! frame (`ReplicationService::handle`): it validates the request into a
//! typed engine request, calls the engine, and maps its error through the one
//! `From<EngineError> for Status`. Requests are never logged whole: they
//! carry secrets.

use std::future::Future;
use std::sync::Arc;

use prost_types::{Duration as PbDuration, Timestamp};
use tonic::{Request, Response, Status};

use super::group_replication::{GroupRpc, group_request, group_source};
use super::proto::replication::controller_server::Controller;
use super::proto::replication::get_volume_replication_info_response::Status as PbHealth;
use super::proto::replication::*;
use super::status::from_engine;
use super::status::{Secrets, volume_request};
use csirr_csi::params::ReplicationParams;
use csirr_engine::{Engine, EngineError, Health, ReplicationInfo, VolumeRequest};

/// Replication Controller state.
pub struct ReplicationService {
    engine: Arc<Engine>,
}

impl ReplicationService {
    /// A service backed by `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn params(p: &std::collections::HashMap<String, String>) -> Result<ReplicationParams, EngineError> {
    let parsed =
        ReplicationParams::parse(p).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    if !parsed.ignored.is_empty() {
        tracing::debug!(keys = ?parsed.ignored, "ignoring parameters");
    }
    Ok(parsed)
}

/// What every replication request carries: a volume (or group) and the
/// secrets to reach it.
trait VolumeRpc: Send + 'static {
    /// The RPC's name in log lines.
    const NAME: &'static str;
    /// Polled often (GetVolumeReplicationInfo): log failures at debug only
    /// and successes not at all.
    const QUIET: bool = false;
    /// The deprecated `volume_id` field ("" where the request has none) and
    /// the replication source.
    fn target(&self) -> (&str, Option<&ReplicationSource>);
    /// The request's secrets.
    fn secrets(&mut self) -> &mut std::collections::HashMap<String, String>;
}

macro_rules! volume_rpc {
    ($($req:ty => $name:literal $(, quiet = $quiet:literal)?;)*) => {$(
        impl VolumeRpc for $req {
            const NAME: &'static str = $name;
            $(const QUIET: bool = $quiet;)?
            fn target(&self) -> (&str, Option<&ReplicationSource>) {
                (&self.volume_id, self.replication_source.as_ref())
            }
            fn secrets(&mut self) -> &mut std::collections::HashMap<String, String> {
                &mut self.secrets
            }
        }
    )*};
}

#[allow(deprecated)]
mod rpcs {
    use super::*;
    volume_rpc! {
        EnableVolumeReplicationRequest => "EnableVolumeReplication";
        DisableVolumeReplicationRequest => "DisableVolumeReplication";
        PromoteVolumeRequest => "PromoteVolume";
        DemoteVolumeRequest => "DemoteVolume";
        ResyncVolumeRequest => "ResyncVolume";
        GetVolumeReplicationInfoRequest => "GetVolumeReplicationInfo", quiet = true;
    }
}

impl VolumeRpc for GetReplicationDestinationInfoRequest {
    const NAME: &'static str = "GetReplicationDestinationInfo";
    fn target(&self) -> (&str, Option<&ReplicationSource>) {
        ("", self.replication_source.as_ref())
    }
    fn secrets(&mut self) -> &mut std::collections::HashMap<String, String> {
        &mut self.secrets
    }
}

impl ReplicationService {
    /// Every RPC's frame: takes the secrets out of the request, resolves the
    /// volume, runs `call` with the engine, maps its error through the one
    /// `From<EngineError> for Status` and logs the outcome with the volume.
    async fn handle<R, T, Fut>(
        &self,
        req: Request<R>,
        call: impl FnOnce(Arc<Engine>, VolumeRequest, R) -> Fut,
    ) -> Result<Response<T>, Status>
    where
        R: VolumeRpc + GroupRpc<Answer = T>,
        Fut: Future<Output = Result<T, EngineError>>,
    {
        let mut r = req.into_inner();
        let secrets = Secrets::take(r.secrets());
        let (deprecated, source) = r.target();
        let volume = volume_label(deprecated, source);
        // A volume group: the group's own path (group_replication.rs).
        let res = if let Some(g) = group_source(source) {
            match group_request(g, &secrets) {
                Ok(gr) => r.run_group(Arc::clone(&self.engine), gr).await,
                Err(e) => Err(e),
            }
        } else {
            match volume_request(deprecated, source, &secrets) {
                Ok(vr) => call(Arc::clone(&self.engine), vr, r).await,
                Err(e) => Err(e),
            }
        };
        match res {
            Ok(v) => {
                if !R::QUIET {
                    tracing::info!(rpc = R::NAME, volume, "ok");
                }
                Ok(Response::new(v))
            }
            Err(e) => {
                let s = from_engine(e);
                if R::QUIET {
                    tracing::debug!(rpc = R::NAME, volume, code = ?s.code(), message = s.message(), "failed");
                } else {
                    tracing::info!(rpc = R::NAME, volume, code = ?s.code(), message = s.message(), "failed");
                }
                Err(s)
            }
        }
    }
}

#[tonic::async_trait]
impl Controller for ReplicationService {
    async fn enable_volume_replication(
        &self,
        req: Request<EnableVolumeReplicationRequest>,
    ) -> Result<Response<EnableVolumeReplicationResponse>, Status> {
        self.handle(req, |engine, vr, r| async move {
            engine.enable(vr, params(&r.parameters)?).await?;
            Ok(EnableVolumeReplicationResponse {})
        })
        .await
    }

    async fn disable_volume_replication(
        &self,
        req: Request<DisableVolumeReplicationRequest>,
    ) -> Result<Response<DisableVolumeReplicationResponse>, Status> {
        self.handle(req, |engine, vr, r| async move {
            // Never fails on the class' parameters: a broken class must not
            // block the VolumeReplication's finalizer. Only `force` counts.
            let force = ReplicationParams::lenient_force(&r.parameters);
            engine.disable(vr, force).await?;
            Ok(DisableVolumeReplicationResponse {})
        })
        .await
    }

    async fn promote_volume(
        &self,
        req: Request<PromoteVolumeRequest>,
    ) -> Result<Response<PromoteVolumeResponse>, Status> {
        self.handle(req, |engine, vr, r| async move {
            engine.promote(vr, r.force, params(&r.parameters)?).await?;
            Ok(PromoteVolumeResponse {})
        })
        .await
    }

    async fn demote_volume(
        &self,
        req: Request<DemoteVolumeRequest>,
    ) -> Result<Response<DemoteVolumeResponse>, Status> {
        self.handle(req, |engine, vr, r| async move {
            engine.demote(vr, r.force).await?;
            Ok(DemoteVolumeResponse {})
        })
        .await
    }

    async fn resync_volume(
        &self,
        req: Request<ResyncVolumeRequest>,
    ) -> Result<Response<ResyncVolumeResponse>, Status> {
        self.handle(req, |engine, vr, r| async move {
            let ready = engine.resync(vr, r.force).await?;
            Ok(ResyncVolumeResponse { ready })
        })
        .await
    }

    async fn get_volume_replication_info(
        &self,
        req: Request<GetVolumeReplicationInfoRequest>,
    ) -> Result<Response<GetVolumeReplicationInfoResponse>, Status> {
        self.handle(req, |engine, vr, _| async move {
            Ok(info_response(engine.info(vr).await?))
        })
        .await
    }

    async fn get_replication_destination_info(
        &self,
        req: Request<GetReplicationDestinationInfoRequest>,
    ) -> Result<Response<GetReplicationDestinationInfoResponse>, Status> {
        self.handle(req, |engine, vr, _| async move {
            let volume_id = engine.destination(vr).await?;
            Ok(GetReplicationDestinationInfoResponse {
                replication_destination: Some(ReplicationDestination {
                    r#type: Some(replication_destination::Type::Volume(
                        replication_destination::VolumeDestination { volume_id },
                    )),
                }),
            })
        })
        .await
    }
}

/// The wire form of replication information (a volume's or a group's).
pub(crate) fn info_response(info: ReplicationInfo) -> GetVolumeReplicationInfoResponse {
    let status = match info.health {
        Health::Healthy => PbHealth::Healthy,
        Health::Degraded => PbHealth::Degraded,
        Health::Error => PbHealth::Error,
        Health::Unknown => PbHealth::Unknown,
    };
    let last = info.last_sync.as_ref();
    GetVolumeReplicationInfoResponse {
        // Unset until a sync point exists: the controller then
        // leaves lastSyncTime empty instead of showing a sync that
        // never happened.
        last_sync_time: last.map(|l| Timestamp {
            seconds: l.time.timestamp(),
            nanos: l.time.timestamp_subsec_nanos() as i32,
        }),
        last_sync_duration: last.map(|l| PbDuration {
            seconds: l.duration.as_secs() as i64,
            nanos: l.duration.subsec_nanos() as i32,
        }),
        last_sync_bytes: last.map_or(0, |l| i64::try_from(l.bytes).unwrap_or(i64::MAX)),
        status: status as i32,
        status_message: info.message,
    }
}

/// The volume ID for log lines (never the secrets).
fn volume_label(deprecated: &str, src: Option<&ReplicationSource>) -> String {
    match src.and_then(|s| s.r#type.as_ref()) {
        Some(replication_source::Type::Volume(v)) => v.volume_id.clone(),
        Some(replication_source::Type::Volumegroup(g)) => format!("group:{}", g.volume_group_id),
        None => deprecated.to_string(),
    }
}
