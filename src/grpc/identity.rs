//! The csi-addons Identity service: who we are, what we can do, whether we
//! are ready.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::proto::identity::capability::{self, service, volume_replication};
use super::proto::identity::identity_server::Identity;
use super::proto::identity::{
    Capability, GetCapabilitiesRequest, GetCapabilitiesResponse, GetIdentityRequest,
    GetIdentityResponse, ProbeRequest, ProbeResponse,
};
use crate::engine::Engine;

/// Identity service state.
pub struct IdentityService {
    driver_name: String,
    engine: Arc<Engine>,
    ready_within: Duration,
}

impl IdentityService {
    /// Answers as `driver_name`; ready while the local cluster answered
    /// within `ready_within`.
    pub fn new(driver_name: String, engine: Arc<Engine>, ready_within: Duration) -> Self {
        Self {
            driver_name,
            engine,
            ready_within,
        }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_identity(
        &self,
        _req: Request<GetIdentityRequest>,
    ) -> Result<Response<GetIdentityResponse>, Status> {
        let cfg = self.engine.config();
        let manifest = HashMap::from([
            (
                "implementation".to_string(),
                env!("CARGO_PKG_NAME").to_string(),
            ),
            (
                "cluster-id".to_string(),
                cfg.local_cluster.cluster_id.clone(),
            ),
            ("mirroring-modes".to_string(), "snapshot".to_string()),
        ]);
        Ok(Response::new(GetIdentityResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest,
        }))
    }

    async fn get_capabilities(
        &self,
        _req: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        let capabilities = vec![
            Capability {
                r#type: Some(capability::Type::Service(capability::Service {
                    r#type: service::Type::ControllerService as i32,
                })),
            },
            Capability {
                r#type: Some(capability::Type::VolumeReplication(
                    capability::VolumeReplication {
                        r#type: volume_replication::Type::VolumeReplication as i32,
                    },
                )),
            },
            Capability {
                r#type: Some(capability::Type::VolumeReplication(
                    capability::VolumeReplication {
                        r#type: volume_replication::Type::GetReplicationDestinationInfo as i32,
                    },
                )),
            },
        ];
        Ok(Response::new(GetCapabilitiesResponse { capabilities }))
    }

    async fn probe(&self, _req: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        // Not ready is an answer, not an error: the csi-addons sidecar
        // exits on any Probe error but a deadline, so a slow monitor would
        // turn into a crash loop.
        let ready = match self.engine.probe(self.ready_within) {
            Ok(()) => true,
            Err(reason) => {
                tracing::warn!(%reason, "probe: not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
