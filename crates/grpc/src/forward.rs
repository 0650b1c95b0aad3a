//! Forwarding of the csi-addons services the sidecar does not serve itself
//! (NetworkFence, ReclaimSpace, EncryptionKeyRotation, VolumeGroup, ...) to
//! ceph-csi's own csi-addons endpoint (`serve --forward-endpoint`).
//!
//! The sidecar takes over the socket the csi-addons sidecar connects to, and
//! ceph-csi's server moves to another one. [`ForwardService`] is an HTTP/2
//! reverse proxy to that one: installed as the fallback of the gRPC routes
//! ([`with_fallback`]), it receives every request whose service has no route
//! here and sends it upstream unchanged on the wire: path, headers
//! (metadata, `grpc-timeout`), request and response bodies streamed frame by
//! frame, response headers and trailers (`grpc-status`, `grpc-message`).
//! Only the `:authority` is rewritten (to `localhost` for a unix socket, as
//! gRPC clients send). The identity service calls upstream through it too, to
//! merge capabilities.
//!
//! Owns: one multiplexed HTTP/2 connection to the upstream (a hyper client
//! over a tokio `UnixStream` or `TcpStream`), made on first use and again
//! whenever it has closed; the answer when the upstream cannot be reached
//! (UNAVAILABLE naming the endpoint, through `status.rs`), and a stream that
//! breaks mid-response ending in UNAVAILABLE trailers instead of a reset.
//!
//! Must not: look into messages, retry a request that reached the upstream,
//! or forward the services the sidecar serves itself (the routes decide).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body::Frame;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpStream, UnixStream};
use tonic::Status;
use tonic::body::Body;
use tonic::service::Routes;
use tracing::{debug, warn};

use super::server::Endpoint;

/// Bound on connecting to the upstream and the HTTP/2 handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request could not be forwarded; mapped to UNAVAILABLE in
/// `status.rs`.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Connecting to the upstream socket failed (no socket, refused, ...).
    #[error("forward endpoint {endpoint} unreachable: {source}")]
    Connect {
        /// The upstream.
        endpoint: Endpoint,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Connecting and the handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("forward endpoint {endpoint} unreachable: no connection within {timeout:?}")]
    ConnectTimeout {
        /// The upstream.
        endpoint: Endpoint,
        /// The bound that ran out.
        timeout: Duration,
    },
    /// The upstream does not speak HTTP/2 or closed during the handshake.
    #[error(
        "forward endpoint {endpoint}: HTTP/2 handshake failed: {}",
        chain(source)
    )]
    Handshake {
        /// The upstream.
        endpoint: Endpoint,
        /// The underlying error.
        source: hyper::Error,
    },
    /// The request could not be sent, or the connection failed before the
    /// response headers arrived.
    #[error("forward endpoint {endpoint}: {}", chain(source))]
    Request {
        /// The upstream.
        endpoint: Endpoint,
        /// The underlying error.
        source: hyper::Error,
    },
    /// The response stream broke after its headers.
    #[error(
        "forward endpoint {endpoint}: response stream broken: {}",
        chain(source)
    )]
    Stream {
        /// The upstream.
        endpoint: Endpoint,
        /// The underlying error.
        source: hyper::Error,
    },
}

/// `error` and its sources, `: `-separated (hyper's own message is terse:
/// "http2 error").
fn chain(error: &hyper::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The reverse proxy to one upstream endpoint; cheap to clone (clones share
/// the connection).
#[derive(Clone)]
pub struct ForwardService {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    authority: Authority,
    conn: tokio::sync::Mutex<Slot>,
}

/// The connection in use, numbered so that a caller can forget the one it
/// found broken without dropping a newer one.
#[derive(Default)]
struct Slot {
    next_id: u64,
    current: Option<(u64, SendRequest<Body>)>,
}

impl std::fmt::Debug for ForwardService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardService")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

/// `routes` with every request no route serves forwarded to `forward`
/// (instead of answering UNIMPLEMENTED).
pub fn with_fallback(routes: Routes, forward: ForwardService) -> Routes {
    Routes::from(routes.into_axum_router().fallback_service(forward))
}

impl ForwardService {
    /// A proxy to `endpoint`; nothing is connected until the first request.
    pub fn new(endpoint: Endpoint) -> Self {
        let authority = match &endpoint {
            Endpoint::Tcp { .. } => endpoint
                .to_string()
                .strip_prefix("tcp://")
                .and_then(|a| a.parse().ok()),
            Endpoint::Unix(_) => None,
        }
        .unwrap_or_else(|| Authority::from_static("localhost"));
        Self {
            inner: Arc::new(Inner {
                endpoint,
                authority,
                conn: tokio::sync::Mutex::new(Slot::default()),
            }),
        }
    }

    /// The upstream endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Forwards one request; any failure is a gRPC error response.
    async fn forward(self, request: Request<Body>) -> Response<Body> {
        let method = request.uri().path().to_owned();
        match self.send(request).await {
            Ok(response) => {
                debug!(%method, endpoint = %self.inner.endpoint, "forwarded");
                response.map(|body| {
                    Body::new(UpstreamBody {
                        inner: body,
                        endpoint: Some(self.inner.endpoint.clone()),
                    })
                })
            }
            Err(e) => {
                warn!(%method, error = %e, "cannot forward");
                Status::from(e).into_http()
            }
        }
    }

    /// Sends `request` upstream and returns the response headers. A request
    /// the connection refused before sending it is tried once more on a
    /// new connection.
    async fn send(&self, request: Request<Body>) -> Result<Response<Incoming>, ForwardError> {
        let mut request = self.upstream_request(request);
        let mut retried = false;
        loop {
            let (id, mut tx) = self.sender().await?;
            let error = match tx.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    // Refused before sending (closed, or going away): this
                    // connection is done for.
                    Some(unsent) if !retried => {
                        debug!(error = %e.error(), "upstream connection not usable; reconnecting");
                        request = unsent;
                        retried = true;
                        self.forget(id).await;
                        continue;
                    }
                    Some(_) => {
                        self.forget(id).await;
                        e.into_error()
                    }
                    None => e.into_error(),
                },
            };
            if tx.is_closed() {
                self.forget(id).await;
            }
            return Err(ForwardError::Request {
                endpoint: self.inner.endpoint.clone(),
                source: error,
            });
        }
    }

    /// The request as the upstream gets it: same method, path, headers and
    /// body; absolute URI with this endpoint's authority.
    fn upstream_request(&self, request: Request<Body>) -> Request<Body> {
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.inner.authority.clone());
        uri.path_and_query = Some(path);
        // Scheme, authority and path are all set: this cannot fail, and if
        // it did the path-only URI would still be valid for HTTP/2.
        if let Ok(uri) = Uri::from_parts(uri) {
            parts.uri = uri;
        }
        parts.version = Version::HTTP_2;
        parts.extensions = http::Extensions::new();
        Request::from_parts(parts, body)
    }

    /// The open connection and its number, or a new one.
    async fn sender(&self) -> Result<(u64, SendRequest<Body>), ForwardError> {
        let mut slot = self.inner.conn.lock().await;
        if let Some((id, tx)) = slot.current.as_ref().filter(|(_, tx)| !tx.is_closed()) {
            return Ok((*id, tx.clone()));
        }
        slot.current = None;
        let endpoint = &self.inner.endpoint;
        let tx = tokio::time::timeout(CONNECT_TIMEOUT, connect(endpoint))
            .await
            .map_err(|_| ForwardError::ConnectTimeout {
                endpoint: endpoint.clone(),
                timeout: CONNECT_TIMEOUT,
            })??;
        debug!(%endpoint, "connected to the forward endpoint");
        let id = slot.next_id;
        slot.next_id += 1;
        slot.current = Some((id, tx.clone()));
        Ok((id, tx))
    }

    /// Forgets connection `id` if it is still the current one; the next
    /// request connects anew.
    async fn forget(&self, id: u64) {
        let mut slot = self.inner.conn.lock().await;
        if slot
            .current
            .as_ref()
            .is_some_and(|(current, _)| *current == id)
        {
            slot.current = None;
        }
    }
}

/// Connects to `endpoint` and completes the HTTP/2 handshake.
async fn connect(endpoint: &Endpoint) -> Result<SendRequest<Body>, ForwardError> {
    let connect_err = |source| ForwardError::Connect {
        endpoint: endpoint.clone(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            let io = UnixStream::connect(path).await.map_err(connect_err)?;
            handshake(endpoint, io).await
        }
        Endpoint::Tcp { host, port } => {
            let io = TcpStream::connect((host.as_str(), *port))
                .await
                .map_err(connect_err)?;
            if let Err(error) = io.set_nodelay(true) {
                debug!(%error, "TCP_NODELAY");
            }
            handshake(endpoint, io).await
        }
    }
}

/// The HTTP/2 handshake on a connected stream; the connection then runs on
/// a task of its own until either side closes it.
async fn handshake<T>(endpoint: &Endpoint, io: T) -> Result<SendRequest<Body>, ForwardError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(io))
        .await
        .map_err(|source| ForwardError::Handshake {
            endpoint: endpoint.clone(),
            source,
        })?;
    let endpoint = endpoint.clone();
    tokio::spawn(async move {
        match conn.await {
            Ok(()) => debug!(%endpoint, "forward connection closed"),
            Err(error) => debug!(%endpoint, %error, "forward connection failed"),
        }
    });
    Ok(tx)
}

impl<B> tower::Service<Request<B>> for ForwardService
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { Ok(this.forward(request.map(Body::new)).await) })
    }
}

/// The upstream's response body, frames passed through; if the stream
/// breaks, it ends with UNAVAILABLE trailers instead.
struct UpstreamBody {
    inner: Incoming,
    /// Taken when the stream broke and the trailers were sent.
    endpoint: Option<Endpoint>,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(endpoint) = &this.endpoint else {
            return Poll::Ready(None);
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(source))) => {
                let error = ForwardError::Stream {
                    endpoint: endpoint.clone(),
                    source,
                };
                warn!(%error, "forwarded call broke off");
                this.endpoint = None;
                let mut trailers = HeaderMap::new();
                // add_header fails only for a message it cannot encode; the
                // code alone still ends the call.
                let status = Status::from(error);
                if status.add_header(&mut trailers).is_err() {
                    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.endpoint.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_of(endpoint: &str, request: Request<Body>) -> Request<Body> {
        ForwardService::new(endpoint.parse().unwrap()).upstream_request(request)
    }

    #[test]
    fn upstream_request_keeps_path_headers_and_sets_the_authority() {
        let request = || {
            let mut r = Request::builder()
                .method("POST")
                .uri("/fence.FenceController/FenceClusterNetwork")
                .header("content-type", "application/grpc")
                .header("grpc-timeout", "7S")
                .header("x-request-id", "req-42")
                .body(Body::empty())
                .unwrap();
            r.extensions_mut().insert(42_u32);
            r
        };
        for (endpoint, authority) in [
            ("unix:///csi/csi-addons-cephcsi.sock", "localhost"),
            ("tcp://127.0.0.1:9070", "127.0.0.1:9070"),
            ("tcp://[::1]:9070", "[::1]:9070"),
            ("tcp://ceph-csi.ns.svc:9070", "ceph-csi.ns.svc:9070"),
        ] {
            let up = upstream_of(endpoint, request());
            assert_eq!(
                up.uri().to_string(),
                format!("http://{authority}/fence.FenceController/FenceClusterNetwork"),
                "{endpoint}"
            );
            assert_eq!(up.method(), "POST");
            assert_eq!(up.version(), Version::HTTP_2);
            assert_eq!(up.headers(), request().headers());
            assert!(up.extensions().get::<u32>().is_none());
        }
        // A client that sent the socket path as :authority (see
        // authority.rs) is forwarded with `localhost` too.
        let mut r = request();
        *r.uri_mut() = "http://localhost/identity.Identity/Probe".parse().unwrap();
        let up = upstream_of("unix:///x.sock", r);
        assert_eq!(
            up.uri().to_string(),
            "http://localhost/identity.Identity/Probe"
        );
    }

    #[tokio::test]
    async fn an_absent_upstream_is_a_grpc_unavailable_response() {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("missing.sock"));
        let forward = ForwardService::new(endpoint.clone());
        let request = Request::builder()
            .uri("/fence.FenceController/ListClusterFence")
            .body(Body::empty())
            .unwrap();
        let response = forward.forward(request).await;
        // Trailers-only: the status is in the headers.
        let status = Status::from_header_map(response.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains(&endpoint.to_string()),
            "{}",
            status.message()
        );
    }
}
