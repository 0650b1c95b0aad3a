//! Replication RPCs on a volume group (`replication_source.volumegroup`):
//! each request type says what it does for a whole group
//! ([`csirr_engine::group_repl`]); the replication service's frame
//! (`replication.rs`) validates the group ID and secrets, calls it, and maps
//! its error as for volumes.

use std::future::Future;
use std::sync::Arc;

use super::proto::replication::*;
use csirr_csi::params::ReplicationParams;
use csirr_engine::group_repl::GroupRequest;
use csirr_engine::{Credentials, Engine, EngineError};

use super::status::{Secrets, group_id};

/// The group a request names, if its source is a volume group.
pub(crate) fn group_source(src: Option<&ReplicationSource>) -> Option<&str> {
    match src.and_then(|s| s.r#type.as_ref()) {
        Some(replication_source::Type::Volumegroup(g)) => Some(g.volume_group_id.as_str()),
        _ => None,
    }
}

/// Validates a group request: a well-formed group ID and the secrets.
pub(crate) fn group_request(id: &str, secrets: &Secrets) -> Result<GroupRequest, EngineError> {
    if id.is_empty() {
        return Err(EngineError::InvalidArgument(
            "replication_source.volumegroup.volume_group_id is empty".into(),
        ));
    }
    Ok(GroupRequest {
        group: group_id(id)?,
        creds: Credentials::from_secrets(secrets)?,
    })
}

fn params(p: &std::collections::HashMap<String, String>) -> Result<ReplicationParams, EngineError> {
    ReplicationParams::parse(p).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

/// A replication request that can name a group, and what it does for one.
pub(crate) trait GroupRpc: Sized + Send + 'static {
    /// The RPC's answer.
    type Answer;
    /// Runs the request on group `req`.
    fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> impl Future<Output = Result<Self::Answer, EngineError>> + Send;
}

impl GroupRpc for EnableVolumeReplicationRequest {
    type Answer = EnableVolumeReplicationResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        engine.enable_group(req, params(&self.parameters)?).await?;
        Ok(EnableVolumeReplicationResponse {})
    }
}

impl GroupRpc for DisableVolumeReplicationRequest {
    type Answer = DisableVolumeReplicationResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        let force = ReplicationParams::lenient_force(&self.parameters);
        engine.disable_group(req, force).await?;
        Ok(DisableVolumeReplicationResponse {})
    }
}

impl GroupRpc for PromoteVolumeRequest {
    type Answer = PromoteVolumeResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        engine
            .promote_group(req, self.force, params(&self.parameters)?)
            .await?;
        Ok(PromoteVolumeResponse {})
    }
}

impl GroupRpc for DemoteVolumeRequest {
    type Answer = DemoteVolumeResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        engine.demote_group(req, self.force).await?;
        Ok(DemoteVolumeResponse {})
    }
}

impl GroupRpc for ResyncVolumeRequest {
    type Answer = ResyncVolumeResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        let ready = engine.resync_group(req, self.force).await?;
        Ok(ResyncVolumeResponse { ready })
    }
}

impl GroupRpc for GetVolumeReplicationInfoRequest {
    type Answer = GetVolumeReplicationInfoResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        let info = engine.group_replication_info(req).await?;
        Ok(super::replication::info_response(info))
    }
}

impl GroupRpc for GetReplicationDestinationInfoRequest {
    type Answer = GetReplicationDestinationInfoResponse;
    async fn run_group(
        self,
        engine: Arc<Engine>,
        req: GroupRequest,
    ) -> Result<Self::Answer, EngineError> {
        let (volume_group_id, volume_ids) = engine.group_destination(req).await?;
        Ok(GetReplicationDestinationInfoResponse {
            replication_destination: Some(ReplicationDestination {
                r#type: Some(replication_destination::Type::Volumegroup(
                    replication_destination::VolumeGroupDestination {
                        volume_group_id,
                        volume_ids: volume_ids.into_iter().collect(),
                    },
                )),
            }),
        })
    }
}
