//! TLS with client certificates on `tcp://` endpoints (`--tls-cert`,
//! `--tls-key`, `--tls-client-ca`). A CA, server and client certificates are
//! made at test time with rcgen; clients are tonic over tokio-rustls. No Ceph
//! needed: the in-process tests serve a small Identity service, the binary
//! tests run `serve --no-replayer` against a cluster that does not exist
//! (GetIdentity needs none; the operator commands' TLS flags are checked
//! against it too).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_rbd_replicator::grpc::proto::identity::identity_client::IdentityClient;
use csi_rbd_replicator::grpc::proto::identity::identity_server::{Identity, IdentityServer};
use csi_rbd_replicator::grpc::proto::identity::{
    GetCapabilitiesRequest, GetCapabilitiesResponse, GetIdentityRequest, GetIdentityResponse,
    ProbeRequest, ProbeResponse,
};
use csi_rbd_replicator::grpc::server::{Endpoint, Listeners};
use csi_rbd_replicator::grpc::tls::{TlsConfig, TlsFiles};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tonic_health::server::HealthReporter;

const NAME: &str = "tls.test.csi";
const TIMEOUT: Duration = Duration::from_secs(10);

struct TestIdentity;

#[tonic::async_trait]
impl Identity for TestIdentity {
    async fn get_identity(
        &self,
        _: Request<GetIdentityRequest>,
    ) -> Result<Response<GetIdentityResponse>, Status> {
        Ok(Response::new(GetIdentityResponse {
            name: NAME.into(),
            vendor_version: "1".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_capabilities(
        &self,
        _: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(GetCapabilitiesResponse::default()))
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        Ok(Response::new(ProbeResponse { ready: Some(true) }))
    }
}

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
struct Leaf {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `localhost` and 127.0.0.1.
    fn server(&self) -> Leaf {
        self.leaf(
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate.
    fn client(&self, name: &str) -> Leaf {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Leaf {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// Writes `content` to `path` as a Secret update would: a new file renamed
/// over the old one.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server's TLS files in a directory.
struct ServerFiles {
    dir: tempfile::TempDir,
}

impl ServerFiles {
    fn new(server: &Leaf, client_ca: Option<&Ca>) -> ServerFiles {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), &server.cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), &server.key).unwrap();
        if let Some(ca) = client_ca {
            std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        }
        ServerFiles { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tls_files(&self) -> TlsFiles {
        let ca = self.path("ca.crt");
        TlsFiles {
            cert: self.path("tls.crt"),
            key: self.path("tls.key"),
            client_ca: ca.exists().then_some(ca),
        }
    }
}

/// A server on a unix socket and on TLS TCP.
struct Running {
    tcp: SocketAddr,
    sock: PathBuf,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(files: &ServerFiles) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("x.sock");
    let endpoints = [
        Endpoint::Unix(sock.clone()),
        "tcp://127.0.0.1:0".parse().unwrap(),
    ];
    let listeners = Listeners::bind(&endpoints)
        .await
        .unwrap()
        .with_tls(TlsConfig::load(files.tls_files()).unwrap())
        .unwrap();
    let tcp = match &listeners.endpoints()[1] {
        Endpoint::Tcp { host, port } => format!("{host}:{port}").parse().unwrap(),
        other => panic!("unexpected {other}"),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(listeners.serve(
        Routes::new(IdentityServer::new(TestIdentity)),
        HealthReporter::new(),
        shutdown.clone(),
        Duration::from_secs(1),
    ));
    Running {
        tcp,
        sock,
        _dir: dir,
        shutdown,
    }
}

/// A client that trusts `ca` and presents `identity`, if any.
fn client_config(ca: &Ca, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// GetIdentity over TLS: the name, or the error (of the handshake, the
/// connection or the call) as text.
async fn tls_get_identity(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let connector = TlsConnector::from(config);
    let call = async move {
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let name = ServerName::try_from("localhost").unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        IdentityClient::new(channel)
            .get_identity(GetIdentityRequest {})
            .await
            .map(|r| r.into_inner().name)
            .map_err(|e| format!("call: {e:?}"))
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

/// GetIdentity in plain HTTP/2 over TCP.
async fn plain_get_identity(addr: SocketAddr) -> Result<String, String> {
    let call = async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        IdentityClient::new(channel)
            .get_identity(GetIdentityRequest {})
            .await
            .map(|r| r.into_inner().name)
            .map_err(|e| format!("call: {e:?}"))
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err("timed out".into()))
}

#[tokio::test]
async fn mutual_tls_answers_only_clients_with_a_certificate_of_the_ca() {
    let ca = Ca::new("test CA");
    let other = Ca::new("other CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let server = start(&files).await;

    // A client with a certificate of the CA gets answers, several times
    // (each call a new connection and handshake).
    for _ in 0..3 {
        let good = client_config(&ca, Some(&ca.client("replication-controller")));
        assert_eq!(
            tls_get_identity(server.tcp, good).await.as_deref(),
            Ok(NAME)
        );
    }

    // No client certificate.
    let anonymous = client_config(&ca, None);
    let err = tls_get_identity(server.tcp, anonymous).await.unwrap_err();
    assert!(
        err.contains("CertificateRequired"),
        "no client certificate: {err}"
    );

    // A certificate of another CA (that trusts our server, so only the
    // server's check can refuse it).
    let stranger = client_config(&ca, Some(&other.client("replication-controller")));
    let err = tls_get_identity(server.tcp, stranger).await.unwrap_err();
    assert!(
        err.contains("UnknownCA"),
        "certificate of another CA: {err}"
    );

    // A client that does not trust the server's CA refuses it.
    let distrustful = client_config(&other, Some(&ca.client("replication-controller")));
    let err = tls_get_identity(server.tcp, distrustful).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Plain HTTP/2 to the TLS port.
    let err = plain_get_identity(server.tcp).await.unwrap_err();
    assert!(err.starts_with("call: "), "plaintext client: {err}");

    // The server still answers good clients after the failures.
    let good = client_config(&ca, Some(&ca.client("again")));
    assert_eq!(
        tls_get_identity(server.tcp, good).await.as_deref(),
        Ok(NAME)
    );
}

#[tokio::test]
async fn unix_socket_stays_plain_when_tcp_serves_tls() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let server = start(&files).await;
    let path = server.sock.clone();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
        .unwrap();
    let reply = IdentityClient::new(channel)
        .get_identity(GetIdentityRequest {})
        .await
        .unwrap();
    assert_eq!(reply.into_inner().name, NAME);
}

#[tokio::test]
async fn server_tls_without_client_ca_accepts_anonymous_clients() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server(), None);
    let server = start(&files).await;
    let anonymous = client_config(&ca, None);
    assert_eq!(
        tls_get_identity(server.tcp, anonymous).await.as_deref(),
        Ok(NAME)
    );
    assert!(plain_get_identity(server.tcp).await.is_err());
}

#[tokio::test]
async fn changed_certificate_files_are_used_by_new_connections() {
    let ca = Ca::new("first CA");
    let next = Ca::new("second CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let server = start(&files).await;
    let first = || client_config(&ca, Some(&ca.client("c1")));
    let second = || client_config(&next, Some(&next.client("c2")));
    assert_eq!(
        tls_get_identity(server.tcp, first()).await.as_deref(),
        Ok(NAME)
    );
    assert!(tls_get_identity(server.tcp, second()).await.is_err());

    // Rotate everything to the second CA, as a cert-manager renewal would.
    let leaf = next.server();
    replace_file(&files.path("tls.key"), &leaf.key);
    replace_file(&files.path("tls.crt"), &leaf.cert);
    replace_file(&files.path("ca.crt"), &next.pem());
    assert_eq!(
        tls_get_identity(server.tcp, second()).await.as_deref(),
        Ok(NAME)
    );
    let err = tls_get_identity(server.tcp, first()).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");

    // A broken update (a key that does not match) is refused: the server
    // keeps the last good certificate.
    replace_file(&files.path("tls.key"), &ca.server().key);
    assert_eq!(
        tls_get_identity(server.tcp, second()).await.as_deref(),
        Ok(NAME)
    );
    // Garbage too.
    replace_file(&files.path("tls.crt"), "not a certificate");
    assert_eq!(
        tls_get_identity(server.tcp, second()).await.as_deref(),
        Ok(NAME)
    );
}

// --- the binary ----------------------------------------------------------------

/// Files for `serve` against a cluster that does not exist.
fn fake_cluster(dir: &Path) -> Vec<String> {
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"[{"clusterID": "nowhere", "monitors": ["v2:127.0.0.1:1"]}]"#,
    )
    .unwrap();
    let secret = dir.join("secret");
    std::fs::create_dir(&secret).unwrap();
    std::fs::write(secret.join("userID"), "csi-rbd-provisioner").unwrap();
    std::fs::write(
        secret.join("userKey"),
        "AQBf4VdnAAAAABAAAAECAwQFBgcICQoLDA0ODw==",
    )
    .unwrap();
    [
        "serve",
        "--no-replayer",
        "--drivername",
        NAME,
        "--csi-config",
        config.to_str().unwrap(),
        "--cluster-mapping",
        dir.join("no-mapping.json").to_str().unwrap(),
        "--secret-dir",
        secret.to_str().unwrap(),
        "--grace",
        "1s",
    ]
    .map(String::from)
    .to_vec()
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The running binary; killed on drop.
struct Served {
    child: std::process::Child,
    log: PathBuf,
}

impl Served {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log says `what`.
    fn wait_log(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if log.contains(what) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {what:?} in:\n{log}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_serve(dir: &Path, args: &[&str]) -> Served {
    let log = dir.join("serve.log");
    let child = bin()
        .args(fake_cluster(dir))
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Served { child, log }
}

#[tokio::test]
async fn serve_with_tls_flags_requires_client_certificates() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let port = free_port();
    let served = run_serve(
        files.dir.path(),
        &[
            "--endpoint",
            &format!("tcp://127.0.0.1:{port}"),
            "--tls-cert",
            files.path("tls.crt").to_str().unwrap(),
            "--tls-key",
            files.path("tls.key").to_str().unwrap(),
            "--tls-client-ca",
            files.path("ca.crt").to_str().unwrap(),
        ],
    );
    let log = served.wait_log("gRPC server listening");
    assert!(log.contains("TLS, client certificates required"), "{log}");
    assert!(!log.contains("PLAIN TCP"), "{log}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let good = client_config(&ca, Some(&ca.client("replication-controller")));
    assert_eq!(tls_get_identity(addr, good).await.as_deref(), Ok(NAME));
    assert!(
        tls_get_identity(addr, client_config(&ca, None))
            .await
            .is_err()
    );
    assert!(plain_get_identity(addr).await.is_err());
    // The failed handshakes are logged, without a secret to leak.
    served.wait_log("TLS handshake failed");
}

/// The operator commands reach a sidecar serving mutual TLS on tcp:// with
/// `--tls-ca`, `--tls-client-cert` and `--tls-client-key` (the call gets to
/// the sidecar, which answers from its fake cluster); without the client
/// certificate, or without TLS, they fail to connect and say so (exit 2).
#[tokio::test]
async fn commands_reach_a_tls_sidecar_with_the_tls_flags() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let port = free_port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let served = run_serve(
        files.dir.path(),
        &[
            "--endpoint",
            &endpoint,
            "--tls-cert",
            files.path("tls.crt").to_str().unwrap(),
            "--tls-key",
            files.path("tls.key").to_str().unwrap(),
            "--tls-client-ca",
            files.path("ca.crt").to_str().unwrap(),
            "--op-timeout",
            "2s",
        ],
    );
    served.wait_log("gRPC server listening");
    let operator = ca.client("operator");
    let (cert, key) = (
        files.dir.path().join("op.crt"),
        files.dir.path().join("op.key"),
    );
    std::fs::write(&cert, &operator.cert).unwrap();
    std::fs::write(&key, &operator.key).unwrap();
    let ca_file = files.path("ca.crt");
    let run = |tls: &[&str]| {
        let o = bin()
            .args([
                "pool",
                "status",
                "replicapool",
                "--endpoint",
                &endpoint,
                "--json",
            ])
            .args(tls)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    };
    let (ca_s, cert_s, key_s) = (
        ca_file.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    let (_, text) = run(&[
        "--tls-ca",
        ca_s,
        "--tls-client-cert",
        cert_s,
        "--tls-client-key",
        key_s,
    ]);
    // The sidecar answered: its (fake) cluster did not.
    assert!(text.contains("cluster at"), "{text}");
    // Without a client certificate the sidecar ends the handshake (with
    // TLS 1.3 the client learns it at its first call).
    let (code, text) = run(&["--tls-ca", ca_s]);
    assert_eq!(code, Some(2), "{text}");
    assert!(!text.contains("cluster at"), "{text}");
    let (code, text) = run(&[]);
    assert_eq!(code, Some(2), "{text}");
    assert!(!text.contains("cluster at"), "{text}");
    // A client certificate without its key is refused before connecting.
    let (code, text) = run(&["--tls-ca", ca_s, "--tls-client-cert", cert_s]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains("--tls-client-key"), "{text}");
    assert!(
        !text.contains("PRIVATE KEY"),
        "no key material echoed: {text}"
    );
}

#[tokio::test]
async fn serve_on_plain_tcp_warns_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let served = run_serve(
        dir.path(),
        &["--endpoint", &format!("tcp://127.0.0.1:{port}")],
    );
    let log = served.wait_log("gRPC server listening");
    assert!(log.contains("WARN") && log.contains("PLAIN TCP"), "{log}");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert_eq!(plain_get_identity(addr).await.as_deref(), Ok(NAME));
}

#[test]
fn serve_refuses_incomplete_tls_flags_at_startup() {
    let ca = Ca::new("test CA");
    let files = ServerFiles::new(&ca.server(), Some(&ca));
    let (cert, key, client_ca) = (
        files.path("tls.crt"),
        files.path("tls.key"),
        files.path("ca.crt"),
    );
    let (cert, key, client_ca) = (
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
        client_ca.to_str().unwrap(),
    );
    let tcp = "tcp://127.0.0.1:0";
    let sock = format!("unix://{}", files.path("x.sock").display());
    let missing = files.path("missing.pem");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--endpoint", tcp, "--tls-key", key],
            "--tls-key is given without --tls-cert".into(),
        ),
        (
            vec!["--endpoint", tcp, "--tls-cert", cert],
            "--tls-cert is given without --tls-key".into(),
        ),
        (
            vec!["--endpoint", tcp, "--tls-client-ca", client_ca],
            "--tls-client-ca is given without --tls-cert and --tls-key".into(),
        ),
        (
            vec!["--endpoint", &sock, "--tls-cert", cert, "--tls-key", key],
            "no --endpoint is tcp://host:port".into(),
        ),
        (
            vec![
                "--endpoint",
                tcp,
                "--tls-cert",
                cert,
                "--tls-key",
                missing.to_str().unwrap(),
            ],
            format!("--tls-key {}", missing.display()),
        ),
        (
            // The CA's certificate with the server's key: they do not match.
            vec!["--endpoint", tcp, "--tls-cert", client_ca, "--tls-key", key],
            "does not belong to the --tls-cert certificate".into(),
        ),
    ];
    for (args, want) in cases {
        let out = bin()
            .args(fake_cluster(tempfile::tempdir().unwrap().path()))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started:\n{stderr}");
        assert!(
            stderr.contains(&want),
            "{args:?}: want {want:?} in:\n{stderr}"
        );
        assert!(
            !stderr.contains("PRIVATE KEY"),
            "{args:?}: key material in the error:\n{stderr}"
        );
    }
}
