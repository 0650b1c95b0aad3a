//! The csi-addons replication Controller service. Each handler validates the
//! request into a typed engine request, calls the engine, and maps its error
//! through the one `From<EngineError> for Status`. Requests are never logged
//! whole: they carry secrets.

use std::sync::Arc;

use prost_types::{Duration as PbDuration, Timestamp};
use tonic::{Request, Response, Status};

use super::proto::replication::controller_server::Controller;
use super::proto::replication::get_volume_replication_info_response::Status as PbHealth;
use super::proto::replication::*;
use super::status::{Secrets, volume_request};
use crate::csi::params::ReplicationParams;
use crate::engine::{Engine, EngineError, Health};

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

/// Logs the outcome of an RPC with its volume.
fn logged<T>(
    rpc: &'static str,
    volume: &str,
    r: Result<T, EngineError>,
) -> Result<Response<T>, Status> {
    match r {
        Ok(v) => {
            tracing::info!(rpc, volume, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let s = Status::from(e);
            tracing::info!(rpc, volume, code = ?s.code(), message = s.message(), "failed");
            Err(s)
        }
    }
}

#[allow(deprecated)]
#[tonic::async_trait]
impl Controller for ReplicationService {
    async fn enable_volume_replication(
        &self,
        req: Request<EnableVolumeReplicationRequest>,
    ) -> Result<Response<EnableVolumeReplicationResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            let p = params(&r.parameters)?;
            self.engine.enable(vr, p).await?;
            Ok(EnableVolumeReplicationResponse {})
        }
        .await;
        logged(
            "EnableVolumeReplication",
            &volume_label(&r.volume_id, r.replication_source.as_ref()),
            res,
        )
    }

    async fn disable_volume_replication(
        &self,
        req: Request<DisableVolumeReplicationRequest>,
    ) -> Result<Response<DisableVolumeReplicationResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            // Never fails on the class' parameters: a broken class must not
            // block the VolumeReplication's finalizer. Only `force` counts.
            let force = ReplicationParams::lenient_force(&r.parameters);
            self.engine.disable(vr, force).await?;
            Ok(DisableVolumeReplicationResponse {})
        }
        .await;
        logged(
            "DisableVolumeReplication",
            &volume_label(&r.volume_id, r.replication_source.as_ref()),
            res,
        )
    }

    async fn promote_volume(
        &self,
        req: Request<PromoteVolumeRequest>,
    ) -> Result<Response<PromoteVolumeResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            let p = params(&r.parameters)?;
            self.engine.promote(vr, r.force, p).await?;
            Ok(PromoteVolumeResponse {})
        }
        .await;
        logged(
            "PromoteVolume",
            &volume_label(&r.volume_id, r.replication_source.as_ref()),
            res,
        )
    }

    async fn demote_volume(
        &self,
        req: Request<DemoteVolumeRequest>,
    ) -> Result<Response<DemoteVolumeResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            self.engine.demote(vr, r.force).await?;
            Ok(DemoteVolumeResponse {})
        }
        .await;
        logged(
            "DemoteVolume",
            &volume_label(&r.volume_id, r.replication_source.as_ref()),
            res,
        )
    }

    async fn resync_volume(
        &self,
        req: Request<ResyncVolumeRequest>,
    ) -> Result<Response<ResyncVolumeResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            let ready = self.engine.resync(vr, r.force).await?;
            Ok(ResyncVolumeResponse { ready })
        }
        .await;
        logged(
            "ResyncVolume",
            &volume_label(&r.volume_id, r.replication_source.as_ref()),
            res,
        )
    }

    async fn get_volume_replication_info(
        &self,
        req: Request<GetVolumeReplicationInfoRequest>,
    ) -> Result<Response<GetVolumeReplicationInfoResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request(&r.volume_id, r.replication_source.as_ref(), &secrets)?;
            let info = self.engine.info(vr).await?;
            let status = match info.health {
                Health::Healthy => PbHealth::Healthy,
                Health::Degraded => PbHealth::Degraded,
                Health::Error => PbHealth::Error,
                Health::Unknown => PbHealth::Unknown,
            };
            let last = info.last_sync.as_ref();
            Ok(GetVolumeReplicationInfoResponse {
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
            })
        }
        .await;
        let res: Result<GetVolumeReplicationInfoResponse, EngineError> = res;
        // Polled often: log failures only at debug.
        match res {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                let s = Status::from(e);
                tracing::debug!(rpc = "GetVolumeReplicationInfo", code = ?s.code(), message = s.message(), "failed");
                Err(s)
            }
        }
    }

    async fn get_replication_destination_info(
        &self,
        req: Request<GetReplicationDestinationInfoRequest>,
    ) -> Result<Response<GetReplicationDestinationInfoResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let res = async {
            let vr = volume_request("", r.replication_source.as_ref(), &secrets)?;
            let volume_id = self.engine.destination(vr).await?;
            Ok(GetReplicationDestinationInfoResponse {
                replication_destination: Some(ReplicationDestination {
                    r#type: Some(replication_destination::Type::Volume(
                        replication_destination::VolumeDestination { volume_id },
                    )),
                }),
            })
        }
        .await;
        logged(
            "GetReplicationDestinationInfo",
            &volume_label("", r.replication_source.as_ref()),
            res,
        )
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
