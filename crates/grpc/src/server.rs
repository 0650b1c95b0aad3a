//! The gRPC transport: listens on unix sockets and TCP at once, serves the given
//! routes plus gRPC health (`grpc.health.v1`) and server reflection (`v1` and
//! `v1alpha`), and shuts down gracefully.
//!
//! Owns: parsing `--endpoint` values ([`Endpoint`]), the unix socket file's life
//! (replace a stale one, chmod 0660, remove on shutdown), the accept loops, the
//! TLS handshakes of TCP connections when [`Listeners::with_tls`] is set (the
//! certificates themselves are `tls.rs`'s), the `:authority` fix for
//! unix-socket clients (see `authority.rs` and `docs/authority.md`), and the
//! drain with a grace period.
//!
//! Must not: implement RPC handlers, decide per-service health (the caller holds
//! the [`HealthReporter`]), or install signal handlers: the caller cancels the
//! [`CancellationToken`] on SIGTERM/SIGINT.
//!
//! Shutdown, once the token is cancelled: the overall health status (`""`) turns
//! NOT_SERVING, the listeners close and unix socket files are removed (new
//! connections are refused), open connections get a GOAWAY and in-flight RPCs run
//! to completion. After `grace`, whatever is still running is logged and abandoned.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::Ipv6Addr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo, UdsConnectInfo};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::{debug, info, warn};

use super::authority::AuthorityFix;
use super::proto::FILE_DESCRIPTOR_SET;
use super::tls::{TlsConfig, TlsError};

/// Mode of a unix socket file once bound.
const SOCKET_MODE: u32 = 0o660;
/// How long to wait when probing whether an existing socket has a live server.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` (e.g. out of file descriptors) before retrying.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Bound on a TLS handshake, so that a client that connects and says nothing
/// does not hold a socket forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to listen, parsed from `--endpoint`.
///
/// Accepted forms:
/// - `unix:///abs/path.sock` and `unix:/abs/path.sock`: a unix socket at an
///   absolute path; a bare `/abs/path.sock` means the same (as in csi-lib-utils).
/// - `unix:relative/path.sock`: relative to the working directory (gRPC naming).
///   `unix://relative.sock` is refused: after `//` comes an authority, so gRPC
///   clients would read it differently (grpc-go rejects it).
/// - `tcp://host:port` with an IPv4 address, a bracketed IPv6 address
///   (`tcp://[::1]:50051`) or a host name (`tcp://localhost:50051`, bound to the
///   first address it resolves to). Port 0 picks a free port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address; `host` has no brackets.
    Tcp {
        /// IP address or host name.
        host: String,
        /// Port; 0 asks the kernel for a free one.
        port: u16,
    },
}

/// Why an `--endpoint` value was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// Neither `unix:`, `tcp://` nor an absolute path.
    #[error(
        "unsupported endpoint {0:?}: expected unix:///abs/path.sock, unix:relative.sock, \
         /abs/path.sock or tcp://host:port"
    )]
    Unsupported(String),
    /// `unix:` with no path.
    #[error("endpoint {0:?} has an empty socket path")]
    EmptyPath(String),
    /// `unix://x` where `x` is not an absolute path.
    #[error(
        "endpoint {0:?}: unix:// must be followed by an absolute path (unix:///abs/path.sock); \
         write a relative path as unix:relative.sock"
    )]
    UnixAuthority(String),
    /// A NUL byte in the socket path.
    #[error("endpoint {0:?}: socket path contains a NUL byte")]
    NulInPath(String),
    /// `tcp://host` without `:port`.
    #[error("endpoint {0:?}: missing :port")]
    MissingPort(String),
    /// The port is not a number from 0 to 65535.
    #[error("endpoint {0:?}: port must be a number from 0 to 65535")]
    InvalidPort(String),
    /// The host is neither an IP address nor a host name.
    #[error("endpoint {input:?}: invalid host: {reason}")]
    InvalidHost {
        /// The whole endpoint.
        input: String,
        /// What is wrong with the host.
        reason: &'static str,
    },
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unix_path = if let Some(rest) = s.strip_prefix("unix:") {
            match rest.strip_prefix("//") {
                Some("") => return Err(EndpointError::EmptyPath(s.into())),
                Some(after) if !after.starts_with('/') => {
                    return Err(EndpointError::UnixAuthority(s.into()));
                }
                Some(after) => after,
                None => rest,
            }
        } else if s.starts_with('/') {
            s
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            return parse_tcp(s, rest);
        } else {
            return Err(EndpointError::Unsupported(s.into()));
        };
        if unix_path.is_empty() {
            return Err(EndpointError::EmptyPath(s.into()));
        }
        if unix_path.contains('\0') {
            return Err(EndpointError::NulInPath(s.into()));
        }
        Ok(Endpoint::Unix(PathBuf::from(unix_path)))
    }
}

fn parse_tcp(input: &str, rest: &str) -> Result<Endpoint, EndpointError> {
    let invalid_host = |reason| EndpointError::InvalidHost {
        input: input.into(),
        reason,
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, tail) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid_host("unclosed '['"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| invalid_host("not an IPv6 address inside [ ]"))?;
        let port = tail
            .strip_prefix(':')
            .ok_or_else(|| EndpointError::MissingPort(input.into()))?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::MissingPort(input.into()))?;
        if host.contains(':') {
            return Err(invalid_host(
                "an IPv6 address needs brackets: tcp://[::1]:port",
            ));
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if host.is_empty() {
            return Err(invalid_host("empty host"));
        }
        if host.len() > 253 || !host.split('.').all(label_ok) {
            return Err(invalid_host("not an IP address or host name"));
        }
        (host, port)
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EndpointError::InvalidPort(input.into()));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| EndpointError::InvalidPort(input.into()))?;
    Ok(Endpoint::Tcp {
        host: host.into(),
        port,
    })
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) if path.is_absolute() => write!(f, "unix://{}", path.display()),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
        }
    }
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// `serve` was called with no endpoints.
    #[error("no endpoints to listen on")]
    NoEndpoints,
    /// Something that is not a socket is in the way of a unix endpoint.
    #[error("{}: exists and is a {kind}, not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The socket path.
        path: PathBuf,
        /// What is there instead.
        kind: &'static str,
    },
    /// Another server accepts connections on the socket.
    #[error("{}: another server is listening on this socket", path.display())]
    SocketInUse {
        /// The socket path.
        path: PathBuf,
    },
    /// A file system or socket call on a unix endpoint failed.
    #[error("{}: {action}: {source}", path.display())]
    Unix {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// Binding a TCP endpoint failed.
    #[error("{endpoint}: bind: {source}")]
    TcpBind {
        /// The endpoint as given.
        endpoint: Endpoint,
        /// The underlying error.
        source: io::Error,
    },
    /// The reflection service could not load the file descriptor sets.
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The tonic server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Serves `routes` plus health and reflection on every endpoint until
/// `shutdown` is cancelled, then drains for at most `grace`.
///
/// `health` is the reporter whose statuses the health service serves; keep a
/// clone to set `identity.Identity` and `replication.Controller`. Returns `Ok`
/// after a drain, also one cut short by `grace` (what was abandoned is logged;
/// its connection tasks stay on the runtime, so the caller should then exit).
pub async fn serve(
    endpoints: Vec<Endpoint>,
    routes: Routes,
    health: HealthReporter,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    Listeners::bind(&endpoints)
        .await?
        .serve(routes, health, shutdown, grace)
        .await
}

/// Bound listeners, ready to serve: [`serve`] in two steps, for callers that
/// need the bound addresses first (e.g. TCP port 0).
pub struct Listeners {
    tcp: Vec<TcpListener>,
    unix: Vec<(UnixListener, SocketFile)>,
    endpoints: Vec<Endpoint>,
    tls: Option<Arc<TlsConfig>>,
}

impl fmt::Debug for Listeners {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listeners")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl Listeners {
    /// Binds every endpoint, or none: on error, sockets bound so far are closed
    /// and their files removed.
    pub async fn bind(endpoints: &[Endpoint]) -> Result<Self, ServeError> {
        if endpoints.is_empty() {
            return Err(ServeError::NoEndpoints);
        }
        let mut bound = Listeners {
            tcp: Vec::new(),
            unix: Vec::new(),
            endpoints: Vec::new(),
            tls: None,
        };
        for endpoint in endpoints {
            match endpoint {
                Endpoint::Unix(path) => {
                    let (listener, file) = bind_unix(path).await?;
                    bound.unix.push((listener, file));
                    bound.endpoints.push(endpoint.clone());
                }
                Endpoint::Tcp { host, port } => {
                    let bind_err = |source| ServeError::TcpBind {
                        endpoint: endpoint.clone(),
                        source,
                    };
                    let listener = TcpListener::bind((host.as_str(), *port))
                        .await
                        .map_err(bind_err)?;
                    let local = listener.local_addr().map_err(bind_err)?;
                    bound.tcp.push(listener);
                    bound.endpoints.push(Endpoint::Tcp {
                        host: local.ip().to_string(),
                        port: local.port(),
                    });
                }
            }
        }
        Ok(bound)
    }

    /// The endpoints as bound, in the order given; TCP ones carry the actual
    /// address and port.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Serves every TCP endpoint over TLS with `tls` (unix sockets stay
    /// plain). Refused when no endpoint is TCP: the flags would do nothing.
    pub fn with_tls(mut self, tls: TlsConfig) -> Result<Self, ServeError> {
        if self.tcp.is_empty() {
            return Err(TlsError::NoTcpEndpoint.into());
        }
        self.tls = Some(Arc::new(tls));
        Ok(self)
    }

    /// Serves on the bound listeners; see [`serve`].
    pub async fn serve(
        self,
        routes: Routes,
        health: HealthReporter,
        shutdown: CancellationToken,
        grace: Duration,
    ) -> Result<(), ServeError> {
        let routes = with_health_and_reflection(routes, health.clone())?;
        for endpoint in &self.endpoints {
            match (endpoint, &self.tls) {
                (Endpoint::Unix(_), _) => info!(%endpoint, "gRPC server listening"),
                (Endpoint::Tcp { .. }, None) => warn!(
                    %endpoint,
                    "gRPC server listening on PLAIN TCP: anyone who can reach this address can \
                     call every RPC, and secrets (cephx keys) cross the network unencrypted; \
                     give --tls-cert, --tls-key and --tls-client-ca"
                ),
                (Endpoint::Tcp { .. }, Some(tls)) if !tls.requires_client_cert() => warn!(
                    %endpoint,
                    "gRPC server listening on TLS WITHOUT client certificates: anyone who can \
                     reach this address can call every RPC; give --tls-client-ca"
                ),
                (Endpoint::Tcp { .. }, Some(_)) => {
                    info!(%endpoint, "gRPC server listening (TLS, client certificates required)");
                }
            }
        }
        let open = OpenConns::default();
        let in_flight = InFlight::default();
        let incoming = self.incoming(&open);

        let server = tonic::transport::Server::builder()
            .layer(TrackLayer(in_flight.clone()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        tokio::pin!(server);

        tokio::select! {
            result = &mut server => return result.map_err(ServeError::from),
            () = shutdown.cancelled() => {}
        }
        info!(
            ?grace,
            open_connections = open.count(),
            in_flight = in_flight.len(),
            "shutting down: refusing new connections, draining in-flight RPCs"
        );
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        match tokio::time::timeout(grace, &mut server).await {
            Ok(result) => {
                info!("gRPC server drained");
                result.map_err(ServeError::from)
            }
            Err(_) => {
                let calls = in_flight.snapshot();
                warn!(
                    ?grace,
                    open_connections = open.count(),
                    in_flight = calls.len(),
                    "grace period over: abandoning connections that are still open"
                );
                for (method, running) in calls {
                    warn!(%method, ?running, "abandoned in-flight RPC");
                }
                Ok(())
            }
        }
    }

    /// One stream of accepted connections over all listeners. Dropping it (tonic
    /// does on shutdown) closes the listeners and removes the socket files.
    fn incoming(self, open: &OpenConns) -> BoxStream<'static, Result<Conn, Infallible>> {
        let mut streams: Vec<BoxStream<'static, Result<Conn, Infallible>>> = Vec::new();
        for listener in self.tcp {
            if let Some(tls) = &self.tls {
                streams.push(tls_incoming(listener, Arc::clone(tls), open.clone()));
                continue;
            }
            let open = open.clone();
            streams.push(Box::pin(stream::unfold(listener, move |listener| {
                let open = open.clone();
                async move {
                    loop {
                        match listener.accept().await {
                            Ok((tcp, _)) => {
                                if let Err(e) = tcp.set_nodelay(true) {
                                    debug!(error = %e, "TCP_NODELAY");
                                }
                                let conn = Conn::new(ConnIo::Tcp(tcp), &open);
                                return Some((Ok(conn), listener));
                            }
                            Err(e) => accept_failed(&e).await,
                        }
                    }
                }
            })));
        }
        for (listener, file) in self.unix {
            let open = open.clone();
            streams.push(Box::pin(stream::unfold(
                (listener, file),
                move |(listener, file)| {
                    let open = open.clone();
                    async move {
                        loop {
                            match listener.accept().await {
                                Ok((unix, _)) => {
                                    let io = ConnIo::Unix(Box::new(AuthorityFix::new(unix)));
                                    return Some((Ok(Conn::new(io, &open)), (listener, file)));
                                }
                                Err(e) => accept_failed(&e).await,
                            }
                        }
                    }
                },
            )));
        }
        stream::select_all(streams).boxed()
    }
}

/// Accepted TLS connections of `listener`: handshakes run concurrently (one
/// slow client does not hold up the others), each bounded in time, and a
/// failed one is logged and dropped.
fn tls_incoming(
    listener: TcpListener,
    tls: Arc<TlsConfig>,
    open: OpenConns,
) -> BoxStream<'static, Result<Conn, Infallible>> {
    type Handshake = Pin<Box<dyn Future<Output = Option<Conn>> + Send>>;
    let handshakes = stream::FuturesUnordered::<Handshake>::new();
    Box::pin(stream::unfold(
        (listener, handshakes),
        move |(listener, mut handshakes)| {
            let (tls, open) = (Arc::clone(&tls), open.clone());
            async move {
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, peer)) => {
                                if let Err(e) = tcp.set_nodelay(true) {
                                    debug!(error = %e, "TCP_NODELAY");
                                }
                                let acceptor = TlsAcceptor::from(tls.current());
                                let open = open.clone();
                                handshakes.push(Box::pin(async move {
                                    let shake = acceptor.accept(tcp);
                                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, shake).await {
                                        Ok(Ok(s)) => {
                                            Some(Conn::new(ConnIo::Tls(Box::new(s)), &open))
                                        }
                                        Ok(Err(error)) => {
                                            warn!(%peer, %error, "TLS handshake failed");
                                            None
                                        }
                                        Err(_) => {
                                            warn!(%peer, ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                                            None
                                        }
                                    }
                                }));
                            }
                            Err(e) => accept_failed(&e).await,
                        },
                        Some(done) = handshakes.next(), if !handshakes.is_empty() => {
                            if let Some(conn) = done {
                                return Some((Ok(conn), (listener, handshakes)));
                            }
                        }
                    }
                }
            }
        },
    ))
}

async fn accept_failed(error: &io::Error) {
    warn!(%error, "accept failed");
    tokio::time::sleep(ACCEPT_BACKOFF).await;
}

/// Adds gRPC health and both reflection versions to `routes`.
fn with_health_and_reflection(
    routes: Routes,
    health: HealthReporter,
) -> Result<Routes, ServeError> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    Ok(routes
        .add_service(HealthServer::new(HealthService::from_health_reporter(
            health,
        )))
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

/// Makes `path` free for a new socket: creates the parent directory if missing,
/// removes a stale socket, refuses anything else; then binds and chmods.
async fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), ServeError> {
    let unix_err = |action| {
        move |source| ServeError::Unix {
            path: path.to_path_buf(),
            action,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await;
            match probe {
                Ok(Ok(_)) | Err(_) => {
                    return Err(ServeError::SocketInUse {
                        path: path.to_path_buf(),
                    });
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(unix_err("remove stale socket"))?;
                    info!(path = %path.display(), "removed stale socket file");
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Ok(Err(e)) => return Err(unix_err("probe existing socket")(e)),
            }
        }
        Ok(meta) => {
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_file() {
                "regular file"
            } else if ft.is_symlink() {
                "symbolic link"
            } else {
                "special file"
            };
            return Err(ServeError::NotASocket {
                path: path.to_path_buf(),
                kind,
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(unix_err("create parent directory"))?;
            }
        }
        Err(e) => return Err(unix_err("inspect path")(e)),
    }
    let listener = UnixListener::bind(path).map_err(unix_err("bind"))?;
    // From here on the guard removes the file if anything fails.
    let mut file = SocketFile {
        path: path.to_path_buf(),
        id: None,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(unix_err("chmod"))?;
    let meta = std::fs::symlink_metadata(path).map_err(unix_err("inspect bound socket"))?;
    file.id = Some((meta.dev(), meta.ino()));
    Ok((listener, file))
}

/// Removes the socket file it was created for on drop, unless it has been
/// replaced since (by a non-socket, or a socket with another inode).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the bound socket; `None` until known.
    id: Option<(u64, u64)>,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let path = self.path.display();
        match std::fs::symlink_metadata(&self.path) {
            Ok(meta)
                if meta.file_type().is_socket()
                    && self.id.is_none_or(|id| id == (meta.dev(), meta.ino())) =>
            {
                match std::fs::remove_file(&self.path) {
                    Ok(()) => debug!(%path, "removed socket file"),
                    Err(error) => warn!(%path, %error, "could not remove socket file"),
                }
            }
            Ok(_) => warn!(%path, "socket file was replaced by another; leaving it"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(error) => warn!(%path, %error, "could not inspect socket file"),
        }
    }
}

/// Counts open connections, for the shutdown log.
#[derive(Clone, Default)]
struct OpenConns(Arc<AtomicUsize>);

impl OpenConns {
    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// Holds one count in [`OpenConns`] while a connection lives.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection of either kind.
struct Conn {
    io: ConnIo,
    _open: OpenGuard,
}

enum ConnIo {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(Box<AuthorityFix<UnixStream>>),
}

impl Conn {
    fn new(io: ConnIo, open: &OpenConns) -> Self {
        open.0.fetch_add(1, Ordering::Relaxed);
        Conn {
            io,
            _open: OpenGuard(open.0.clone()),
        }
    }
}

/// Peer information tonic puts in each request's extensions.
#[derive(Clone, Debug)]
pub enum ConnInfo {
    /// A TCP peer (over TLS or not).
    Tcp(TcpConnectInfo),
    /// A unix socket peer (with its credentials when available).
    Unix(UdsConnectInfo),
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        match &self.io {
            ConnIo::Tcp(s) => ConnInfo::Tcp(s.connect_info()),
            ConnIo::Tls(s) => ConnInfo::Tcp(s.get_ref().0.connect_info()),
            ConnIo::Unix(s) => ConnInfo::Unix(s.connect_info()),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Tls(s) => Pin::new(s).poll_write(cx, buf),
            ConnIo::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            ConnIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ConnIo::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Tcp(s) => s.is_write_vectored(),
            ConnIo::Tls(s) => s.is_write_vectored(),
            ConnIo::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Tls(s) => Pin::new(s).poll_flush(cx),
            ConnIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            ConnIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
            ConnIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The RPCs in progress (method path and start), until their response body ends.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<Calls>>);

#[derive(Default)]
struct Calls {
    next_id: u64,
    active: HashMap<u64, (String, Instant)>,
}

impl InFlight {
    fn begin(&self, method: &str) -> CallGuard {
        let mut calls = self.0.lock();
        let id = calls.next_id;
        calls.next_id += 1;
        calls.active.insert(id, (method.to_owned(), Instant::now()));
        CallGuard {
            calls: self.0.clone(),
            id,
        }
    }

    fn len(&self) -> usize {
        self.0.lock().active.len()
    }

    /// Method and running time of each call, longest first.
    fn snapshot(&self) -> Vec<(String, Duration)> {
        let calls = self.0.lock();
        let mut list: Vec<_> = calls
            .active
            .values()
            .map(|(method, start)| (method.clone(), start.elapsed()))
            .collect();
        list.sort_by_key(|call| std::cmp::Reverse(call.1));
        list
    }
}

/// Removes one call from [`InFlight`] when dropped.
struct CallGuard {
    calls: Arc<Mutex<Calls>>,
    id: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.calls.lock().active.remove(&self.id);
    }
}

/// Tower layer recording each request in [`InFlight`].
#[derive(Clone)]
struct TrackLayer(InFlight);

impl<S> tower::Layer<S> for TrackLayer {
    type Service = Track<S>;

    fn layer(&self, inner: S) -> Track<S> {
        Track {
            inner,
            in_flight: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Track<S> {
    inner: S,
    in_flight: InFlight,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Track<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let guard = self.in_flight.begin(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| {
                Body::new(TrackedBody {
                    inner,
                    _guard: guard,
                })
            }))
        })
    }
}

/// A response body that keeps its call in [`InFlight`] until it is done.
struct TrackedBody {
    inner: Body,
    _guard: CallGuard,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(p: &str) -> Endpoint {
        Endpoint::Unix(PathBuf::from(p))
    }

    fn tcp(host: &str, port: u16) -> Endpoint {
        Endpoint::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_accepted_endpoint_forms() {
        let cases = [
            ("unix:///csi/csi-addons.sock", unix("/csi/csi-addons.sock")),
            ("unix:/csi/csi-addons.sock", unix("/csi/csi-addons.sock")),
            ("/run/csi-addons/socket", unix("/run/csi-addons/socket")),
            ("unix:relative.sock", unix("relative.sock")),
            ("unix:./run/x.sock", unix("./run/x.sock")),
            ("tcp://127.0.0.1:50051", tcp("127.0.0.1", 50051)),
            ("tcp://0.0.0.0:0", tcp("0.0.0.0", 0)),
            ("tcp://[::1]:9070", tcp("::1", 9070)),
            ("tcp://[::]:65535", tcp("::", 65535)),
            ("tcp://localhost:50051", tcp("localhost", 50051)),
            (
                "tcp://csi-addons.ns.svc:9070",
                tcp("csi-addons.ns.svc", 9070),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Endpoint>(), Ok(want.clone()), "{input}");
            // Display gives a form that parses back to the same endpoint.
            assert_eq!(want.to_string().parse::<Endpoint>(), Ok(want), "{input}");
        }
        assert_eq!(unix("/a.sock").to_string(), "unix:///a.sock");
        assert_eq!(unix("a.sock").to_string(), "unix:a.sock");
        assert_eq!(tcp("::1", 1).to_string(), "tcp://[::1]:1");
    }

    #[test]
    fn rejects_other_endpoint_forms_with_typed_errors() {
        use EndpointError as E;
        let s = |x: &str| x.to_string();
        let host = |x: &str, reason| E::InvalidHost {
            input: x.into(),
            reason,
        };
        let cases = [
            ("", E::Unsupported(s(""))),
            ("relative.sock", E::Unsupported(s("relative.sock"))),
            (
                "http://localhost:80",
                E::Unsupported(s("http://localhost:80")),
            ),
            ("localhost:50051", E::Unsupported(s("localhost:50051"))),
            ("unix-abstract:foo", E::Unsupported(s("unix-abstract:foo"))),
            ("unix:", E::EmptyPath(s("unix:"))),
            ("unix://", E::EmptyPath(s("unix://"))),
            (
                "unix://relative.sock",
                E::UnixAuthority(s("unix://relative.sock")),
            ),
            (
                "unix://host/x.sock",
                E::UnixAuthority(s("unix://host/x.sock")),
            ),
            ("unix:/a\0b", E::NulInPath(s("unix:/a\0b"))),
            ("tcp://localhost", E::MissingPort(s("tcp://localhost"))),
            ("tcp://[::1]", E::MissingPort(s("tcp://[::1]"))),
            ("tcp://localhost:", E::InvalidPort(s("tcp://localhost:"))),
            (
                "tcp://localhost:65536",
                E::InvalidPort(s("tcp://localhost:65536")),
            ),
            (
                "tcp://localhost:+80",
                E::InvalidPort(s("tcp://localhost:+80")),
            ),
            (
                "tcp://localhost:80/",
                E::InvalidPort(s("tcp://localhost:80/")),
            ),
            ("tcp://:80", host("tcp://:80", "empty host")),
            (
                "tcp://::1:80",
                host(
                    "tcp://::1:80",
                    "an IPv6 address needs brackets: tcp://[::1]:port",
                ),
            ),
            ("tcp://[::1:80", host("tcp://[::1:80", "unclosed '['")),
            (
                "tcp://[localhost]:80",
                host("tcp://[localhost]:80", "not an IPv6 address inside [ ]"),
            ),
            (
                "tcp://a_b:80",
                host("tcp://a_b:80", "not an IP address or host name"),
            ),
            (
                "tcp://a..b:80",
                host("tcp://a..b:80", "not an IP address or host name"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Endpoint>(), Err(want), "{input:?}");
        }
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn bind_creates_parent_chmods_and_removes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/x.sock");
        let (listener, file) = bind_unix(&path).await.unwrap();
        assert!(
            std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_socket()
        );
        assert_eq!(mode(&path), SOCKET_MODE);
        drop(listener);
        drop(file);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        // A stale socket: bound by a listener that is gone, file left behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, file) = bind_unix(&path).await.unwrap();
        // Now it is live: a second bind must refuse.
        match bind_unix(&path).await {
            Err(ServeError::SocketInUse { path: p }) => assert_eq!(p, path),
            other => panic!("expected SocketInUse, got {other:?}"),
        }
        assert!(path.exists(), "the live socket must not be removed");
        drop((listener, file));
    }

    #[tokio::test]
    async fn bind_refuses_to_replace_files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file.sock");
        std::fs::write(&file, b"data").unwrap();
        let subdir = dir.path().join("dir.sock");
        std::fs::create_dir(&subdir).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for (path, want) in [
            (&file, "regular file"),
            (&subdir, "directory"),
            (&link, "symbolic link"),
        ] {
            match bind_unix(path).await {
                Err(ServeError::NotASocket { kind, .. }) => assert_eq!(kind, want),
                other => panic!("{}: expected NotASocket, got {other:?}", path.display()),
            }
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        assert!(subdir.is_dir());
    }

    #[tokio::test]
    async fn socket_file_replaced_by_another_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.sock");
        let (listener, file) = bind_unix(&path).await.unwrap();
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
    }

    #[tokio::test]
    async fn failed_bind_releases_earlier_endpoints() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.sock");
        let bad = dir.path().join("bad.sock");
        std::fs::write(&bad, b"").unwrap();
        let err = Listeners::bind(&[Endpoint::Unix(good.clone()), Endpoint::Unix(bad)])
            .await
            .unwrap_err();
        assert!(matches!(err, ServeError::NotASocket { .. }), "{err}");
        assert!(!good.exists());
        assert!(matches!(
            Listeners::bind(&[]).await,
            Err(ServeError::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn tcp_port_zero_reports_the_bound_port() {
        let bound = Listeners::bind(&[tcp("127.0.0.1", 0)]).await.unwrap();
        match &bound.endpoints()[0] {
            Endpoint::Tcp { host, port } => {
                assert_eq!(host, "127.0.0.1");
                assert_ne!(*port, 0);
            }
            other => panic!("{other}"),
        }
    }
}
