//! `serve --forward-endpoint`: the sidecar binary forwards the csi-addons
//! services it does not serve to ceph-csi's endpoint. A stand-in for ceph-csi
//! (NetworkFence, ReclaimSpace controller and node, Identity, built from this
//! crate's copies of the csi-addons protos) listens on a second socket; the
//! tests call it through the sidecar's socket and check that requests
//! (secrets and parameters included), responses, error codes, details and
//! metadata come through intact, that GetCapabilities merges both servers'
//! capabilities, and that a missing or broken upstream answers UNAVAILABLE
//! at once. No Ceph needed: the sidecar is given a cluster that does not
//! exist, which only its Probe notices.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use csi_rbd_replicator::grpc::proto::csi::v1::VolumeCapability;
use csi_rbd_replicator::grpc::proto::csi::v1::volume_capability::{
    AccessMode, AccessType, MountVolume, access_mode,
};
use csi_rbd_replicator::grpc::proto::fence::fence_controller_client::FenceControllerClient;
use csi_rbd_replicator::grpc::proto::fence::fence_controller_server::{
    FenceController, FenceControllerServer,
};
use csi_rbd_replicator::grpc::proto::fence::{
    Cidr, ClientDetails, FenceClusterNetworkRequest, FenceClusterNetworkResponse,
    GetFenceClientsRequest, GetFenceClientsResponse, ListClusterFenceRequest,
    ListClusterFenceResponse, UnfenceClusterNetworkRequest, UnfenceClusterNetworkResponse,
};
use csi_rbd_replicator::grpc::proto::identity::capability::{
    self, network_fence, reclaim_space, service, volume_replication,
};
use csi_rbd_replicator::grpc::proto::identity::identity_client::IdentityClient;
use csi_rbd_replicator::grpc::proto::identity::identity_server::{Identity, IdentityServer};
use csi_rbd_replicator::grpc::proto::identity::{
    Capability, GetCapabilitiesRequest, GetCapabilitiesResponse, GetIdentityRequest,
    GetIdentityResponse, ProbeRequest, ProbeResponse,
};
use csi_rbd_replicator::grpc::proto::reclaimspace::reclaim_space_controller_client::ReclaimSpaceControllerClient;
use csi_rbd_replicator::grpc::proto::reclaimspace::reclaim_space_controller_server::{
    ReclaimSpaceController, ReclaimSpaceControllerServer,
};
use csi_rbd_replicator::grpc::proto::reclaimspace::reclaim_space_node_client::ReclaimSpaceNodeClient;
use csi_rbd_replicator::grpc::proto::reclaimspace::reclaim_space_node_server::{
    ReclaimSpaceNode, ReclaimSpaceNodeServer,
};
use csi_rbd_replicator::grpc::proto::reclaimspace::{
    ControllerReclaimSpaceRequest, ControllerReclaimSpaceResponse, NodeReclaimSpaceRequest,
    NodeReclaimSpaceResponse, StorageConsumption,
};
use futures::{FutureExt, StreamExt};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const DRIVER: &str = "forward.test.csi";
/// Every call here must finish well within this.
const QUICK: Duration = Duration::from_secs(10);

// ---- the stand-in for ceph-csi -------------------------------------------

/// What the stand-in received: method, metadata, encoded message.
#[derive(Default)]
struct Seen(Mutex<Vec<(String, MetadataMap, Vec<u8>)>>);

impl Seen {
    fn record<M: Message>(&self, method: &str, req: &Request<M>) {
        self.0.lock().unwrap().push((
            method.to_string(),
            req.metadata().clone(),
            req.get_ref().encode_to_vec(),
        ));
    }

    /// Asserts that the last request of `method` is `sent`, with the
    /// metadata of [`with_metadata`].
    fn assert_arrived<M: Message + Default + PartialEq + std::fmt::Debug>(
        &self,
        method: &str,
        sent: &M,
    ) {
        let (md, got) = self.last::<M>(method);
        assert_eq!(&got, sent, "{method}");
        assert_metadata_arrived(&md);
    }

    /// The last request of `method`, decoded, with its metadata.
    fn last<M: Message + Default>(&self, method: &str) -> (MetadataMap, M) {
        let seen = self.0.lock().unwrap();
        let (_, md, bytes) = seen
            .iter()
            .rev()
            .find(|(m, _, _)| m == method)
            .unwrap_or_else(|| panic!("the stand-in saw no {method}"));
        (md.clone(), M::decode(bytes.as_slice()).unwrap())
    }
}

#[derive(Clone, Default)]
struct StandIn {
    seen: Arc<Seen>,
}

fn cidr(c: &str) -> Cidr {
    Cidr { cidr: c.into() }
}

/// A response carrying metadata of the stand-in's own.
fn reply<T>(message: T) -> Response<T> {
    let mut r = Response::new(message);
    r.metadata_mut().insert(
        "x-upstream",
        MetadataValue::from_static("ceph-csi-stand-in"),
    );
    r
}

#[tonic::async_trait]
impl FenceController for StandIn {
    async fn fence_cluster_network(
        &self,
        req: Request<FenceClusterNetworkRequest>,
    ) -> Result<Response<FenceClusterNetworkResponse>, Status> {
        self.seen.record("FenceClusterNetwork", &req);
        Ok(reply(FenceClusterNetworkResponse {}))
    }

    async fn unfence_cluster_network(
        &self,
        req: Request<UnfenceClusterNetworkRequest>,
    ) -> Result<Response<UnfenceClusterNetworkResponse>, Status> {
        self.seen.record("UnfenceClusterNetwork", &req);
        let mut md = MetadataMap::new();
        md.insert("x-upstream", MetadataValue::from_static("refused"));
        Err(Status::with_details_and_metadata(
            Code::FailedPrecondition,
            "10.0.0.0/24 is not fenced",
            bytes::Bytes::from_static(b"\x08\x09details"),
            md,
        ))
    }

    async fn list_cluster_fence(
        &self,
        req: Request<ListClusterFenceRequest>,
    ) -> Result<Response<ListClusterFenceResponse>, Status> {
        self.seen.record("ListClusterFence", &req);
        if req.get_ref().parameters.contains_key("hang") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let mut cidrs = vec![cidr("10.1.0.0/16"), cidr("192.168.7.3/32")];
        // A large response too: the padding comes back.
        if let Some(padding) = req.get_ref().parameters.get("padding") {
            cidrs.push(cidr(padding));
        }
        Ok(reply(ListClusterFenceResponse { cidrs }))
    }

    async fn get_fence_clients(
        &self,
        req: Request<GetFenceClientsRequest>,
    ) -> Result<Response<GetFenceClientsResponse>, Status> {
        self.seen.record("GetFenceClients", &req);
        Ok(reply(GetFenceClientsResponse {
            clients: vec![ClientDetails {
                id: "c0ffee00-fsid".into(),
                addresses: vec![cidr("10.2.3.4/32")],
            }],
        }))
    }
}

#[tonic::async_trait]
impl ReclaimSpaceController for StandIn {
    async fn controller_reclaim_space(
        &self,
        req: Request<ControllerReclaimSpaceRequest>,
    ) -> Result<Response<ControllerReclaimSpaceResponse>, Status> {
        self.seen.record("ControllerReclaimSpace", &req);
        Ok(reply(ControllerReclaimSpaceResponse {
            pre_usage: Some(StorageConsumption {
                usage_bytes: 10 << 30,
            }),
            post_usage: Some(StorageConsumption {
                usage_bytes: 3 << 30,
            }),
        }))
    }
}

#[tonic::async_trait]
impl ReclaimSpaceNode for StandIn {
    async fn node_reclaim_space(
        &self,
        req: Request<NodeReclaimSpaceRequest>,
    ) -> Result<Response<NodeReclaimSpaceResponse>, Status> {
        self.seen.record("NodeReclaimSpace", &req);
        Err(Status::not_found(format!(
            "volume {} not staged",
            req.get_ref().volume_id
        )))
    }
}

/// ceph-csi's capabilities, as the stand-in reports them.
fn upstream_capabilities() -> Vec<Capability> {
    let cap = |t| Capability { r#type: Some(t) };
    vec![
        cap(capability::Type::Service(capability::Service {
            r#type: service::Type::ControllerService as i32,
        })),
        cap(capability::Type::NetworkFence(capability::NetworkFence {
            r#type: network_fence::Type::NetworkFence as i32,
        })),
        cap(capability::Type::NetworkFence(capability::NetworkFence {
            r#type: network_fence::Type::GetClientsToFence as i32,
        })),
        cap(capability::Type::ReclaimSpace(capability::ReclaimSpace {
            r#type: reclaim_space::Type::Offline as i32,
        })),
        // ceph-csi's own replication: the sidecar's replaces it.
        cap(capability::Type::VolumeReplication(
            capability::VolumeReplication {
                r#type: volume_replication::Type::GetReplicationDestinationInfo as i32,
            },
        )),
    ]
}

#[tonic::async_trait]
impl Identity for StandIn {
    async fn get_identity(
        &self,
        _: Request<GetIdentityRequest>,
    ) -> Result<Response<GetIdentityResponse>, Status> {
        Ok(Response::new(GetIdentityResponse {
            name: "stand-in.ceph-csi".into(),
            vendor_version: "0".into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_capabilities(
        &self,
        _: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(GetCapabilitiesResponse {
            capabilities: upstream_capabilities(),
        }))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// Serves the stand-in on `path` until the task is aborted.
fn serve_stand_in(path: &Path, stand_in: StandIn) -> JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tokio::spawn(
        stand_in_server(stand_in)
            .serve_with_incoming(incoming)
            .map(Result::unwrap),
    )
}

fn stand_in_server(stand_in: StandIn) -> tonic::transport::server::Router {
    tonic::transport::Server::builder()
        .add_service(FenceControllerServer::new(stand_in.clone()))
        .add_service(ReclaimSpaceControllerServer::new(stand_in.clone()))
        .add_service(ReclaimSpaceNodeServer::new(stand_in.clone()))
        .add_service(IdentityServer::new(stand_in))
}

// ---- the sidecar ------------------------------------------------------------

/// The sidecar binary, serving on `<dir>/csi-addons.sock`, pointed at a
/// cluster that does not exist; killed on drop.
struct Sidecar {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Sidecar {
    async fn start(dir: &Path, forward: Option<&str>) -> Sidecar {
        let config = dir.join("config.json");
        std::fs::write(
            &config,
            r#"[{"clusterID": "nowhere", "monitors": ["127.0.0.1:9"]}]"#,
        )
        .unwrap();
        let secret = dir.join("secret");
        std::fs::create_dir_all(&secret).unwrap();
        std::fs::write(secret.join("userID"), "nobody").unwrap();
        std::fs::write(
            secret.join("userKey"),
            "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA==",
        )
        .unwrap();
        let socket = dir.join("csi-addons.sock");
        let log = dir.join("sidecar.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"));
        cmd.arg("serve")
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--drivername={DRIVER}"))
            .arg(format!("--csi-config={}", config.display()))
            .arg(format!(
                "--cluster-mapping={}",
                dir.join("none.json").display()
            ))
            .arg(format!("--secret-dir={}", secret.display()))
            .args(["--no-replayer", "--op-timeout=1s", "--grace=1s"]);
        if let Some(f) = forward {
            cmd.arg(format!("--forward-endpoint={f}"));
        }
        let child = cmd
            .env("RUST_LOG", "info,csi_rbd_replicator=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the sidecar starts");
        let sc = Sidecar { child, socket, log };
        // GetIdentity needs no cluster: it answers as soon as gRPC serves.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(channel) = try_channel(&sc.socket).await
                && IdentityClient::new(channel)
                    .get_identity(GetIdentityRequest {})
                    .await
                    .is_ok()
            {
                return sc;
            }
            assert!(
                Instant::now() < deadline,
                "sidecar not serving in 30s:\n{}",
                sc.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn channel(&self) -> Channel {
        try_channel(&self.socket).await.expect("connect")
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "--- sidecar log ---\n{}",
                self.log_text()
            );
        }
    }
}

async fn try_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

/// Within [`QUICK`], or the test fails instead of hanging.
async fn quick<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(QUICK, f)
        .await
        .unwrap_or_else(|_| panic!("{what} took longer than {QUICK:?}"))
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("userID".into(), "csi-fence".into()),
        ("userKey".into(), "AQDsecretkeyfortests==".into()),
    ])
}

fn parameters() -> HashMap<String, String> {
    HashMap::from([
        ("clusterID".into(), "site-a".into()),
        // Larger than one HTTP/2 frame (16 KiB) and than the initial
        // window: the body is streamed across many frames both ways.
        ("padding".into(), "x".repeat(200_000)),
    ])
}

/// A request with custom ASCII and binary metadata and a deadline.
fn with_metadata<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("x-request-id", MetadataValue::from_static("req-42"));
    r.metadata_mut()
        .insert_bin("x-trace-bin", MetadataValue::from_bytes(&[0, 1, 2, 255]));
    r.set_timeout(Duration::from_secs(7));
    r
}

fn assert_metadata_arrived(md: &MetadataMap) {
    assert_eq!(md.get("x-request-id").unwrap(), "req-42");
    assert_eq!(
        md.get_bin("x-trace-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 255]
    );
    let timeout = md.get("grpc-timeout").expect("grpc-timeout passed on");
    assert!(!timeout.is_empty());
}

fn kinds(caps: &[Capability]) -> Vec<String> {
    caps.iter().map(|c| format!("{:?}", c.r#type)).collect()
}

// ---- the tests --------------------------------------------------------------

#[tokio::test]
async fn forward_passes_network_fence_and_reclaim_space_through_intact() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("csi-addons-cephcsi.sock");
    let stand_in = StandIn::default();
    let _server = serve_stand_in(&upstream, stand_in.clone());
    let sc = Sidecar::start(dir.path(), Some(&format!("unix://{}", upstream.display()))).await;
    let channel = sc.channel().await;
    let mut fence = FenceControllerClient::new(channel.clone());

    // FenceClusterNetwork: fields, secrets and metadata arrive; the
    // upstream's response metadata comes back.
    let sent = FenceClusterNetworkRequest {
        parameters: parameters(),
        secrets: secrets(),
        cidrs: vec![cidr("10.0.0.0/24"), cidr("fd00::/64")],
    };
    let r = quick(
        "FenceClusterNetwork",
        fence.fence_cluster_network(with_metadata(sent.clone())),
    )
    .await
    .unwrap();
    assert_eq!(r.metadata().get("x-upstream").unwrap(), "ceph-csi-stand-in");
    assert_eq!(r.into_inner(), FenceClusterNetworkResponse {});
    stand_in.seen.assert_arrived("FenceClusterNetwork", &sent);

    // UnfenceClusterNetwork: an error comes back with its code, message,
    // details and metadata (all carried in trailers).
    let sent = UnfenceClusterNetworkRequest {
        parameters: parameters(),
        secrets: secrets(),
        cidrs: vec![cidr("10.0.0.0/24")],
    };
    let e = quick(
        "UnfenceClusterNetwork",
        fence.unfence_cluster_network(with_metadata(sent.clone())),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(e.message(), "10.0.0.0/24 is not fenced");
    assert_eq!(e.details(), b"\x08\x09details");
    assert_eq!(e.metadata().get("x-upstream").unwrap(), "refused");
    stand_in.seen.assert_arrived("UnfenceClusterNetwork", &sent);

    // ListClusterFence and GetFenceClients: responses intact.
    let sent = ListClusterFenceRequest {
        parameters: parameters(),
        secrets: secrets(),
    };
    let r = quick(
        "ListClusterFence",
        fence.list_cluster_fence(with_metadata(sent.clone())),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.cidrs.len(), 3);
    assert_eq!(r.cidrs[..2], [cidr("10.1.0.0/16"), cidr("192.168.7.3/32")]);
    assert_eq!(r.cidrs[2].cidr, parameters()["padding"]);
    stand_in.seen.assert_arrived("ListClusterFence", &sent);
    let sent = GetFenceClientsRequest {
        parameters: parameters(),
        secrets: secrets(),
    };
    let r = quick(
        "GetFenceClients",
        fence.get_fence_clients(with_metadata(sent.clone())),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.clients.len(), 1);
    assert_eq!(r.clients[0].id, "c0ffee00-fsid");
    assert_eq!(r.clients[0].addresses, vec![cidr("10.2.3.4/32")]);
    stand_in.seen.assert_arrived("GetFenceClients", &sent);

    // ReclaimSpace, controller: usage figures come back.
    let sent = ControllerReclaimSpaceRequest {
        volume_id: "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002"
            .into(),
        parameters: parameters(),
        secrets: secrets(),
    };
    let r = quick(
        "ControllerReclaimSpace",
        ReclaimSpaceControllerClient::new(channel.clone())
            .controller_reclaim_space(with_metadata(sent.clone())),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.pre_usage.unwrap().usage_bytes, 10 << 30);
    assert_eq!(r.post_usage.unwrap().usage_bytes, 3 << 30);
    stand_in
        .seen
        .assert_arrived("ControllerReclaimSpace", &sent);

    // ReclaimSpace, node: nested CSI message intact, NOT_FOUND comes back.
    let sent = NodeReclaimSpaceRequest {
        volume_id: "replicapool/csi-vol-1".into(),
        volume_path: "/var/lib/kubelet/pods/p/volumes/v/mount".into(),
        staging_target_path: "/var/lib/kubelet/plugins/staging/v".into(),
        volume_capability: Some(VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec!["discard".into(), "noatime".into()],
                volume_mount_group: "65532".into(),
            })),
            access_mode: Some(AccessMode {
                mode: access_mode::Mode::SingleNodeWriter as i32,
            }),
        }),
        secrets: secrets(),
    };
    let e = quick(
        "NodeReclaimSpace",
        ReclaimSpaceNodeClient::new(channel.clone())
            .node_reclaim_space(with_metadata(sent.clone())),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert_eq!(e.message(), "volume replicapool/csi-vol-1 not staged");
    stand_in.seen.assert_arrived("NodeReclaimSpace", &sent);

    // A deadline the upstream does not meet ends the call on time.
    let mut hang = Request::new(ListClusterFenceRequest {
        parameters: HashMap::from([("hang".into(), "1".into())]),
        secrets: HashMap::new(),
    });
    hang.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let e = quick("a call past its deadline", fence.list_cluster_fence(hang))
        .await
        .unwrap_err();
    // tonic ends a call past its deadline with CANCELLED, grpc-go with
    // DEADLINE_EXCEEDED.
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    // Identity: ours (GetIdentity), merged capabilities.
    let mut identity = IdentityClient::new(channel);
    let id = identity.get_identity(GetIdentityRequest {}).await.unwrap();
    assert_eq!(id.into_inner().name, DRIVER);
    let caps = quick(
        "GetCapabilities",
        identity.get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .unwrap()
    .into_inner()
    .capabilities;
    let want = csi_rbd_replicator::grpc::identity::merge_capabilities(
        csi_rbd_replicator::grpc::identity::own_capabilities(),
        upstream_capabilities(),
    );
    assert_eq!(kinds(&caps), kinds(&want));
    let has = |t: capability::Type| caps.iter().any(|c| c.r#type.as_ref() == Some(&t));
    for t in [
        capability::Type::Service(capability::Service {
            r#type: service::Type::ControllerService as i32,
        }),
        capability::Type::VolumeReplication(capability::VolumeReplication {
            r#type: volume_replication::Type::VolumeReplication as i32,
        }),
        capability::Type::NetworkFence(capability::NetworkFence {
            r#type: network_fence::Type::NetworkFence as i32,
        }),
        capability::Type::NetworkFence(capability::NetworkFence {
            r#type: network_fence::Type::GetClientsToFence as i32,
        }),
        capability::Type::ReclaimSpace(capability::ReclaimSpace {
            r#type: reclaim_space::Type::Offline as i32,
        }),
    ] {
        assert!(has(t), "{t:?} missing from {caps:?}");
    }
    // Ours (controller, replication, destination info, the six VolumeGroup
    // ones) and ceph-csi's three others, once each.
    assert_eq!(
        caps.len(),
        csi_rbd_replicator::grpc::identity::own_capabilities().len() + 3,
        "duplicates or ceph-csi's replication: {caps:?}"
    );
}

#[tokio::test]
async fn forward_to_an_absent_upstream_answers_unavailable_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("csi-addons-cephcsi.sock");
    let endpoint = format!("unix://{}", upstream.display());
    let sc = Sidecar::start(dir.path(), Some(&endpoint)).await;
    let channel = sc.channel().await;
    let mut fence = FenceControllerClient::new(channel.clone());
    let list = || ListClusterFenceRequest {
        parameters: parameters(),
        secrets: secrets(),
    };

    // No socket at all.
    let e = quick(
        "a call to a missing upstream",
        fence.list_cluster_fence(list()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&endpoint), "{}", e.message());
    // Capabilities: ours only, answered anyway.
    let caps = quick(
        "GetCapabilities without upstream",
        IdentityClient::new(channel.clone()).get_capabilities(GetCapabilitiesRequest {}),
    )
    .await
    .unwrap()
    .into_inner()
    .capabilities;
    assert_eq!(caps, csi_rbd_replicator::grpc::identity::own_capabilities());

    // A socket file nobody listens on (ceph-csi crashed).
    drop(std::os::unix::net::UnixListener::bind(&upstream).unwrap());
    let e = quick(
        "a call to a dead upstream",
        fence.list_cluster_fence(list()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    std::fs::remove_file(&upstream).unwrap();

    // Something that accepts and hangs up without speaking HTTP/2.
    let mute = UnixListener::bind(&upstream).unwrap();
    let hangup = tokio::spawn(async move {
        loop {
            let (conn, _) = mute.accept().await.unwrap();
            drop(conn);
        }
    });
    let e = quick(
        "a call to a broken upstream",
        fence.list_cluster_fence(list()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    hangup.abort();
    let _ = hangup.await;
    std::fs::remove_file(&upstream).unwrap();

    // ceph-csi comes (back): the next call goes through, on the same client
    // connection to the sidecar.
    let stand_in = StandIn::default();
    let _server = serve_stand_in(&upstream, stand_in.clone());
    let r = quick(
        "a call once the upstream is there",
        fence.list_cluster_fence(list()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.cidrs.len(), 3);
    assert_eq!(
        stand_in
            .seen
            .last::<ListClusterFenceRequest>("ListClusterFence")
            .1,
        list()
    );
    assert!(sc.log_text().contains("cannot forward"));
}

#[tokio::test]
async fn forward_endpoint_unset_leaves_other_services_unimplemented() {
    let dir = tempfile::tempdir().unwrap();
    let sc = Sidecar::start(dir.path(), None).await;
    let channel = sc.channel().await;
    let e = quick(
        "FenceClusterNetwork without forwarding",
        FenceControllerClient::new(channel.clone())
            .fence_cluster_network(FenceClusterNetworkRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let caps = IdentityClient::new(channel)
        .get_capabilities(GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert_eq!(caps, csi_rbd_replicator::grpc::identity::own_capabilities());
}

#[tokio::test]
async fn forward_over_tcp_reaches_the_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let stand_in = StandIn::default();
    let _server = tokio::spawn(
        stand_in_server(stand_in.clone())
            .serve_with_incoming(incoming)
            .map(Result::unwrap),
    );
    let sc = Sidecar::start(dir.path(), Some(&format!("tcp://127.0.0.1:{port}"))).await;
    let sent = GetFenceClientsRequest {
        parameters: parameters(),
        secrets: secrets(),
    };
    let r = quick(
        "GetFenceClients over TCP",
        FenceControllerClient::new(sc.channel().await).get_fence_clients(sent.clone()),
    )
    .await
    .unwrap()
    .into_inner();
    assert_eq!(r.clients[0].id, "c0ffee00-fsid");
    assert_eq!(
        stand_in
            .seen
            .last::<GetFenceClientsRequest>("GetFenceClients")
            .1,
        sent
    );
}

/// An upstream that sends the response headers and one message, then
/// fails the stream (a crash in the middle of a response).
fn serve_breaking_upstream(path: &Path) -> JoinHandle<()> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let listener = UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let (conn, _) = listener.accept().await.unwrap();
            let service = hyper::service::service_fn(|_req| async {
                let message = ListClusterFenceResponse {
                    cidrs: vec![cidr("10.9.9.0/24")],
                }
                .encode_to_vec();
                let mut framed = vec![0u8];
                framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
                framed.extend_from_slice(&message);
                // The failure comes a moment later, once the headers and the
                // message are on their way (a reset discards frames still
                // queued).
                let message: Result<Frame<bytes::Bytes>, std::io::Error> =
                    Ok(Frame::data(framed.into()));
                let crash = async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Err(std::io::Error::other("upstream crashed"))
                };
                let frames = futures::stream::iter([message]).chain(futures::stream::once(crash));
                let body = StreamBody::new(frames);
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap();
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service),
            );
        }
    })
}

#[tokio::test]
async fn forward_stream_broken_mid_response_ends_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("csi-addons-cephcsi.sock");
    let _server = serve_breaking_upstream(&upstream);
    let endpoint = format!("unix://{}", upstream.display());
    let sc = Sidecar::start(dir.path(), Some(&endpoint)).await;
    let e = quick(
        "a call whose upstream breaks off",
        FenceControllerClient::new(sc.channel().await)
            .list_cluster_fence(ListClusterFenceRequest::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&endpoint), "{}", e.message());
    // Ended by the sidecar's trailers, after the headers and the message
    // had been passed on, not by a reset.
    assert!(
        e.message().contains("response stream broken"),
        "{}",
        e.message()
    );
}

#[tokio::test]
async fn forward_reconnects_after_ceph_csi_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = dir.path().join("csi-addons-cephcsi.sock");
    let sc = Sidecar::start(dir.path(), Some(&format!("unix://{}", upstream.display()))).await;
    let mut fence = FenceControllerClient::new(sc.channel().await);
    let list = || ListClusterFenceRequest {
        parameters: HashMap::from([("clusterID".into(), "site-a".into())]),
        secrets: secrets(),
    };
    for round in 0..3 {
        // A ceph-csi process: serves, then shuts down (GOAWAY, connections
        // closed, socket file removed) as a restarting container does.
        let listener = UnixListener::bind(&upstream).unwrap();
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        let stand_in = StandIn::default();
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(
            stand_in_server(stand_in.clone())
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );
        for _ in 0..2 {
            let r = quick(
                "a call to the current ceph-csi",
                fence.list_cluster_fence(list()),
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            assert_eq!(r.into_inner().cidrs.len(), 2);
        }
        assert_eq!(stand_in.seen.0.lock().unwrap().len(), 2, "round {round}");
        stop.cancel();
        quick("the stand-in's shutdown", server)
            .await
            .unwrap()
            .unwrap();
        std::fs::remove_file(&upstream).unwrap();
    }
}
