//! RPC metrics of the csi-addons services: a tower layer that counts each
//! request by method and gRPC status code and times it, into
//! [`csirr_metrics::Metrics`].
//!
//! Owns: finding the status code of a response (the `grpc-status` header of
//! a trailers-only response, else the trailers; a response dropped before its
//! end counts as `Canceled`) and bounding the `method` label to the methods
//! of this crate's protos, forwarded ones included (anything else is
//! `unknown`), so a client cannot create series at will.
//!
//! Must not: change requests or responses, or name metrics (that is
//! `csirr_metrics`).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use prost::Message;
use tonic::Code;
use tonic::service::Routes;

use super::proto::ALL_FILE_DESCRIPTOR_SET;
use csirr_metrics::Metrics;

/// `method` label of paths that are not a method of this crate's services.
pub const UNKNOWN_METHOD: &str = "unknown";

/// `routes` with every request counted and timed in `metrics`. Services
/// added to the result afterwards (gRPC health, reflection) are not measured.
pub fn with_rpc_metrics(routes: Routes, metrics: Arc<Metrics>) -> Routes {
    Routes::from(
        routes
            .into_axum_router()
            .layer(RpcMetricsLayer::new(metrics)),
    )
}

/// The tower layer; see the module doc.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
    known: Arc<HashSet<String>>,
}

impl RpcMetricsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            known: Arc::new(known_methods(ALL_FILE_DESCRIPTOR_SET)),
        }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            metrics: Arc::clone(&self.metrics),
            known: Arc::clone(&self.known),
        }
    }
}

/// `package.Service/Method` of every method in an encoded
/// `FileDescriptorSet`.
fn known_methods(encoded: &[u8]) -> HashSet<String> {
    let Ok(set) = prost_types::FileDescriptorSet::decode(encoded) else {
        tracing::warn!("cannot decode the file descriptor set: RPC metrics name no method");
        return HashSet::new();
    };
    let mut known = HashSet::new();
    for file in &set.file {
        let package = file.package();
        for svc in &file.service {
            for m in &svc.method {
                let service = if package.is_empty() {
                    svc.name().to_string()
                } else {
                    format!("{package}.{}", svc.name())
                };
                known.insert(format!("{service}/{}", m.name()));
            }
        }
    }
    known
}

/// The `method` label of request path `path`.
fn method_label(known: &HashSet<String>, path: &str) -> String {
    match path.strip_prefix('/') {
        Some(m) if known.contains(m) => m.to_string(),
        _ => UNKNOWN_METHOD.to_string(),
    }
}

/// The service of [`RpcMetricsLayer`].
#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
    known: Arc<HashSet<String>>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<Request<B>> for RpcMetrics<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = Response<MeteredBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let mut rec = Recorder {
            metrics: Arc::clone(&self.metrics),
            method: method_label(&self.known, req.uri().path()),
            started: Instant::now(),
            code: None,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    // A trailers-only response (every error) has the status
                    // in its headers.
                    rec.code = grpc_status(resp.headers());
                    Ok(resp.map(|inner| MeteredBody { inner, rec }))
                }
                Err(e) => {
                    rec.code = Some(Code::Internal);
                    rec.finish();
                    Err(e)
                }
            }
        })
    }
}

fn grpc_status(headers: &HeaderMap) -> Option<Code> {
    let v = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(Code::from(v))
}

/// Records one request exactly once.
struct Recorder {
    metrics: Arc<Metrics>,
    method: String,
    started: Instant,
    code: Option<Code>,
    done: bool,
}

impl Recorder {
    /// Records with the code seen so far; none seen at the end of the body
    /// is `Unknown`.
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            let code = code_name(self.code.unwrap_or(Code::Unknown));
            self.metrics
                .rpc_finished(&self.method, code, self.started.elapsed());
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            // The body was dropped before its end: the client went away.
            if self.code.is_none() {
                self.code = Some(Code::Cancelled);
            }
            self.finish();
        }
    }
}

/// A response body that records its request when it ends.
pub struct MeteredBody<B> {
    inner: B,
    rec: Recorder,
}

impl<B> http_body::Body for MeteredBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.rec.code = Some(code);
                    this.rec.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.rec.code.get_or_insert(Code::Internal);
                this.rec.finish();
            }
            Poll::Ready(None) => this.rec.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `code` label: gRPC's canonical names, as grpc-go and its Prometheus
/// interceptors print them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, Service, ServiceExt};

    #[test]
    fn known_methods_come_from_the_protos() {
        let known = known_methods(ALL_FILE_DESCRIPTOR_SET);
        for m in [
            "fence.FenceController/FenceClusterNetwork",
            "reclaimspace.ReclaimSpaceNode/NodeReclaimSpace",
            "identity.Identity/Probe",
            "identity.Identity/GetIdentity",
            "replication.Controller/EnableVolumeReplication",
            "replication.Controller/GetVolumeReplicationInfo",
        ] {
            assert!(known.contains(m), "{m} not in {known:?}");
        }
        assert_eq!(
            method_label(&known, "/replication.Controller/PromoteVolume"),
            "replication.Controller/PromoteVolume"
        );
        assert_eq!(method_label(&known, "/x.Y/Z"), UNKNOWN_METHOD);
        assert_eq!(
            method_label(&known, "replication.Controller/PromoteVolume"),
            UNKNOWN_METHOD
        );
        assert!(known_methods(b"\xff\xff garbage").is_empty());
    }

    async fn call(
        metrics: &Arc<Metrics>,
        path: &str,
        resp: Response<tonic::body::Body>,
        read_body: bool,
    ) {
        let cell = parking_lot::Mutex::new(Some(resp));
        let svc = tower::service_fn(move |_req: Request<()>| {
            let r = cell.lock().take().unwrap();
            async move { Ok::<_, Infallible>(r) }
        });
        let mut svc = RpcMetricsLayer::new(Arc::clone(metrics)).layer(svc);
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(Request::builder().uri(path).body(()).unwrap())
            .await
            .unwrap();
        if read_body {
            use http_body_util::BodyExt;
            let _ = resp.into_body().collect().await;
        }
    }

    #[tokio::test]
    async fn codes_from_headers_trailers_and_drops() {
        let m = Arc::new(Metrics::new());
        // Trailers-only error.
        let err = tonic::Status::not_found("nope").into_http::<tonic::body::Body>();
        call(&m, "/replication.Controller/PromoteVolume", err, true).await;
        // Data then OK trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            vec![
                Ok::<_, tonic::Status>(http_body::Frame::data(Bytes::from_static(b"x"))),
                Ok(http_body::Frame::trailers(trailers)),
            ],
        )));
        call(&m, "/identity.Identity/Probe", Response::new(body), true).await;
        // Dropped before the end.
        call(
            &m,
            "/identity.Identity/GetIdentity",
            Response::new(tonic::body::Body::empty()),
            false,
        )
        .await;
        // Unknown path.
        call(
            &m,
            "/evil.Service/Random123",
            tonic::Status::unimplemented("").into_http(),
            true,
        )
        .await;
        let text = m.encode().unwrap();
        for want in [
            r#"rpc_requests_total{method="replication.Controller/PromoteVolume",code="NotFound"} 1"#,
            r#"rpc_requests_total{method="identity.Identity/Probe",code="OK"} 1"#,
            r#"rpc_requests_total{method="identity.Identity/GetIdentity",code="Canceled"} 1"#,
            r#"rpc_requests_total{method="unknown",code="Unimplemented"} 1"#,
            r#"rpc_duration_seconds_count{method="identity.Identity/Probe"} 1"#,
        ] {
            assert!(text.contains(want), "missing {want} in\n{text}");
        }
    }
}
