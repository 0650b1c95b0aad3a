//! The csi-addons Identity service: who we are, what we can do, whether we
//! are ready. With a forward endpoint, the capabilities are ours plus
//! ceph-csi's (whose other services the sidecar forwards).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::warn;

use super::forward::ForwardService;
use super::proto::identity::capability::{self, service, volume_group, volume_replication};
use super::proto::identity::identity_client::IdentityClient;
use super::proto::identity::identity_server::Identity;
use super::proto::identity::{
    Capability, GetCapabilitiesRequest, GetCapabilitiesResponse, GetIdentityRequest,
    GetIdentityResponse, ProbeRequest, ProbeResponse,
};
use csirr_engine::Engine;

/// How long GetCapabilities waits for the upstream's capabilities.
pub const UPSTREAM_CAPABILITIES_TIMEOUT: Duration = Duration::from_secs(2);

/// Identity service state.
pub struct IdentityService {
    driver_name: String,
    engine: Arc<Engine>,
    ready_within: Duration,
    upstream: Option<ForwardService>,
}

impl IdentityService {
    /// Answers as `driver_name`; ready while the local cluster answered
    /// within `ready_within`.
    pub fn new(driver_name: String, engine: Arc<Engine>, ready_within: Duration) -> Self {
        Self {
            driver_name,
            engine,
            ready_within,
            upstream: None,
        }
    }

    /// Also reports the capabilities of the server behind `upstream` (the
    /// one the other csi-addons services are forwarded to).
    #[must_use]
    pub fn with_upstream(mut self, upstream: ForwardService) -> Self {
        self.upstream = Some(upstream);
        self
    }
}

/// What this sidecar serves itself.
pub fn own_capabilities() -> Vec<Capability> {
    let mut caps = vec![
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
    // The VolumeGroup service: an image is in one group at most, deleting
    // a group never deletes its volumes (a non-empty group is refused), and
    // every RPC of the service is served.
    caps.extend(
        [
            volume_group::Type::VolumeGroup,
            volume_group::Type::LimitVolumeToOneVolumeGroup,
            volume_group::Type::DoNotAllowVgToDeleteVolumes,
            volume_group::Type::ModifyVolumeGroup,
            volume_group::Type::GetVolumeGroup,
            volume_group::Type::ListVolumeGroups,
        ]
        .map(|t| Capability {
            r#type: Some(capability::Type::VolumeGroup(capability::VolumeGroup {
                r#type: t as i32,
            })),
        }),
    );
    caps
}

/// `ours` plus those of `theirs` that are new, in order. The upstream's
/// VolumeReplication and VolumeGroup capabilities are left out:
/// replication.Controller and volumegroup.Controller are this sidecar's,
/// whatever the upstream would offer for them.
pub fn merge_capabilities(ours: Vec<Capability>, theirs: Vec<Capability>) -> Vec<Capability> {
    let mut merged = ours;
    for cap in theirs {
        let ours_only = matches!(
            cap.r#type,
            Some(capability::Type::VolumeReplication(_) | capability::Type::VolumeGroup(_))
        );
        if !ours_only && cap.r#type.is_some() && !merged.contains(&cap) {
            merged.push(cap);
        }
    }
    merged
}

/// The upstream's capabilities, asked with a short deadline.
async fn upstream_capabilities(upstream: &ForwardService) -> Result<Vec<Capability>, Status> {
    let mut request = Request::new(GetCapabilitiesRequest {});
    request.set_timeout(UPSTREAM_CAPABILITIES_TIMEOUT);
    let mut client = IdentityClient::new(upstream.clone());
    let call = client.get_capabilities(request);
    match tokio::time::timeout(UPSTREAM_CAPABILITIES_TIMEOUT, call).await {
        Ok(reply) => Ok(reply?.into_inner().capabilities),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {UPSTREAM_CAPABILITIES_TIMEOUT:?}"
        ))),
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
                "csi-rbd-replicator".to_string(),
            ),
            (
                "cluster-id".to_string(),
                cfg.local_cluster.cluster_id.clone(),
            ),
            (
                "mirroring-modes".to_string(),
                "snapshot,journal".to_string(),
            ),
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
        let mut capabilities = own_capabilities();
        if let Some(upstream) = &self.upstream {
            match upstream_capabilities(upstream).await {
                Ok(theirs) => capabilities = merge_capabilities(capabilities, theirs),
                Err(status) => warn!(
                    endpoint = %upstream.endpoint(),
                    code = ?status.code(),
                    message = status.message(),
                    "upstream capabilities unavailable; answering with ours only"
                ),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::identity::capability::{network_fence, reclaim_space};

    fn fence() -> Capability {
        Capability {
            r#type: Some(capability::Type::NetworkFence(capability::NetworkFence {
                r#type: network_fence::Type::NetworkFence as i32,
            })),
        }
    }

    fn reclaim() -> Capability {
        Capability {
            r#type: Some(capability::Type::ReclaimSpace(capability::ReclaimSpace {
                r#type: reclaim_space::Type::Online as i32,
            })),
        }
    }

    #[test]
    fn merge_adds_new_capabilities_once_and_keeps_replication_ours() {
        let destination_info = Capability {
            r#type: Some(capability::Type::VolumeReplication(
                capability::VolumeReplication {
                    r#type: volume_replication::Type::GetReplicationDestinationInfo as i32,
                },
            )),
        };
        let their_group = Capability {
            r#type: Some(capability::Type::VolumeGroup(capability::VolumeGroup {
                r#type: volume_group::Type::VolumeGroup as i32,
            })),
        };
        let theirs = vec![
            own_capabilities()[0],
            fence(),
            destination_info,
            their_group,
            reclaim(),
            fence(),
            Capability { r#type: None },
        ];
        let mut want = own_capabilities();
        want.extend([fence(), reclaim()]);
        assert_eq!(merge_capabilities(own_capabilities(), theirs), want);
        assert_eq!(
            merge_capabilities(own_capabilities(), Vec::new()),
            own_capabilities()
        );
    }
}
