//! The csi-addons VolumeGroup Controller service, served on the same socket
//! as replication. Every handler validates its request into typed values
//! (`status.rs`), calls the engine ([`csirr_engine::group`]) and maps its
//! error through the one `From<EngineError> for Status`. Requests are never
//! logged whole: they carry secrets.

use std::future::Future;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::proto::csi::v1::Volume;
use super::proto::volumegroup::controller_server::Controller;
use super::proto::volumegroup::*;
use super::status::from_engine;
use super::status::{self, Secrets};
use csirr_engine::group::GroupInfo;
use csirr_engine::{Credentials, Engine, EngineError};

/// VolumeGroup Controller state.
pub struct VolumeGroupService {
    engine: Arc<Engine>,
}

impl VolumeGroupService {
    /// A service backed by `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The wire form of a group.
fn to_pb(g: GroupInfo) -> VolumeGroup {
    VolumeGroup {
        volume_group_id: g.id.to_string(),
        volume_group_context: Default::default(),
        volumes: g
            .members
            .into_iter()
            .map(|m| Volume {
                capacity_bytes: i64::try_from(m.size).unwrap_or(i64::MAX),
                volume_id: m.volume_id,
                ..Default::default()
            })
            .collect(),
    }
}

/// Every RPC's frame: runs `call`, maps its error and logs the outcome with
/// the group (its ID, or the request name for Create).
async fn handle<T>(
    rpc: &'static str,
    group: &str,
    call: impl Future<Output = Result<T, EngineError>>,
) -> Result<Response<T>, Status> {
    match call.await {
        Ok(v) => {
            tracing::info!(rpc, group, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let s = from_engine(e);
            tracing::info!(rpc, group, code = ?s.code(), message = s.message(), "failed");
            Err(s)
        }
    }
}

/// The request's credentials; the secrets are wiped when the handler ends.
fn creds(secrets: &Secrets) -> Result<Option<Credentials>, EngineError> {
    Credentials::from_secrets(secrets)
}

#[tonic::async_trait]
impl Controller for VolumeGroupService {
    async fn create_volume_group(
        &self,
        req: Request<CreateVolumeGroupRequest>,
    ) -> Result<Response<CreateVolumeGroupResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let engine = Arc::clone(&self.engine);
        handle("CreateVolumeGroup", &r.name, async {
            let c = status::create_group_request(&r.name, &r.parameters, &r.volume_ids, &secrets)?;
            let g = engine.create_group(c).await?;
            Ok(CreateVolumeGroupResponse {
                volume_group: Some(to_pb(g)),
            })
        })
        .await
    }

    async fn modify_volume_group_membership(
        &self,
        req: Request<ModifyVolumeGroupMembershipRequest>,
    ) -> Result<Response<ModifyVolumeGroupMembershipResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let engine = Arc::clone(&self.engine);
        handle("ModifyVolumeGroupMembership", &r.volume_group_id, async {
            let id = status::group_id(&r.volume_group_id)?;
            let volumes = status::volume_ids(&r.volume_ids)?;
            let g = engine.modify_group(id, volumes, creds(&secrets)?).await?;
            Ok(ModifyVolumeGroupMembershipResponse {
                volume_group: Some(to_pb(g)),
            })
        })
        .await
    }

    async fn delete_volume_group(
        &self,
        req: Request<DeleteVolumeGroupRequest>,
    ) -> Result<Response<DeleteVolumeGroupResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let engine = Arc::clone(&self.engine);
        handle("DeleteVolumeGroup", &r.volume_group_id, async {
            let id = status::group_id(&r.volume_group_id)?;
            engine.delete_group(id, creds(&secrets)?).await?;
            Ok(DeleteVolumeGroupResponse {})
        })
        .await
    }

    async fn list_volume_groups(
        &self,
        req: Request<ListVolumeGroupsRequest>,
    ) -> Result<Response<ListVolumeGroupsResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let engine = Arc::clone(&self.engine);
        handle("ListVolumeGroups", "", async {
            let (max, after) = status::list_page(r.max_entries, &r.starting_token)?;
            let page = engine.list_groups(max, after, creds(&secrets)?).await?;
            Ok(ListVolumeGroupsResponse {
                entries: page
                    .groups
                    .into_iter()
                    .map(|g| list_volume_groups_response::Entry {
                        volume_group: Some(to_pb(g)),
                    })
                    .collect(),
                next_token: page.next.map(|id| id.to_string()).unwrap_or_default(),
            })
        })
        .await
    }

    async fn controller_get_volume_group(
        &self,
        req: Request<ControllerGetVolumeGroupRequest>,
    ) -> Result<Response<ControllerGetVolumeGroupResponse>, Status> {
        let mut r = req.into_inner();
        let secrets = Secrets::take(&mut r.secrets);
        let engine = Arc::clone(&self.engine);
        handle("ControllerGetVolumeGroup", &r.volume_group_id, async {
            let id = status::group_id(&r.volume_group_id)?;
            let g = engine.get_group(id, creds(&secrets)?).await?;
            Ok(ControllerGetVolumeGroupResponse {
                volume_group: Some(to_pb(g)),
            })
        })
        .await
    }
}
