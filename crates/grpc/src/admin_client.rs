//! The client side of the admin API, for the `csi-rbd-replicator pool`
//! command: connecting to a sidecar's endpoint, collecting a pool
//! operation's stream into a report, the text and JSON renderings, and the
//! exit codes (0 every image ok, 1 some image failed or unhealthy, 2 usage
//! or connection error).
//!
//! Must not: act on Ceph itself; everything goes through the sidecar.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use super::proto::admin::{self as pb, pool_op_event::Event};
use super::server::Endpoint;
use csirr_engine::status::fmt_bytes;

/// Bound on connecting to the sidecar.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the commands reach a sidecar's tcp:// endpoint over TLS (the
/// sidecar's `--tls-cert`; unix sockets stay plain).
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// PEM CA certificates the sidecar's certificate must chain to.
    pub ca: PathBuf,
    /// PEM client certificate and key, for a sidecar that asks for one
    /// (`--tls-client-ca`).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the sidecar's certificate must carry (default: the
    /// endpoint's host).
    pub server_name: Option<String>,
}

static CLIENT_TLS: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
static SERVER_NAME: OnceLock<Option<String>> = OnceLock::new();

/// Makes every later [`connect`] to a tcp:// endpoint use TLS as `tls`
/// says; once per process, before the first connection.
pub fn use_tls(tls: &ClientTls) -> Result<(), String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca = read("--tls-ca", &tls.ca)?;
    for c in CertificateDer::pem_slice_iter(&ca) {
        let c = c.map_err(|e| format!("--tls-ca {}: {e}", tls.ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("--tls-ca {}: {e}", tls.ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--tls-ca {}: no certificate in it",
            tls.ca.display()
        ));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(&read("--tls-client-cert", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--tls-client-cert {}: {e}", cert.display()))?;
            // The key is never echoed: only the file's name in errors.
            let key = PrivateKeyDer::from_pem_slice(&read("--tls-client-key", key)?)
                .map_err(|_| format!("--tls-client-key {}: no PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    CLIENT_TLS
        .set(Arc::new(config))
        .map_err(|_| "TLS is configured once".to_string())?;
    let _ = SERVER_NAME.set(tls.server_name.clone());
    Ok(())
}

/// A channel to the sidecar at `endpoint`: plain HTTP/2 over a unix
/// socket; over TCP, TLS when [`use_tls`] was called, plain otherwise.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, String> {
    let fail = |e: tonic::transport::Error| {
        let detail = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
        format!("cannot connect to {endpoint}: {detail}")
    };
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            TonicEndpoint::from_static("http://localhost")
                .connect_timeout(CONNECT_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(TokioIo::new(s))
                    }
                }))
                .await
                .map_err(fail)
        }
        Endpoint::Tcp { host, port } if let Some(config) = CLIENT_TLS.get() => {
            connect_tls(endpoint, host, *port, Arc::clone(config)).await
        }
        Endpoint::Tcp { host, port } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            TonicEndpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(fail)?
                .connect_timeout(CONNECT_TIMEOUT)
                .connect()
                .await
                .map_err(fail)
        }
    }
}

/// A channel to `host:port` over TLS with `config`.
async fn connect_tls(
    endpoint: &Endpoint,
    host: &str,
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, String> {
    let name = SERVER_NAME
        .get()
        .cloned()
        .flatten()
        .unwrap_or_else(|| host.to_string());
    let name = rustls_pki_types::ServerName::try_from(name)
        .map_err(|e| format!("cannot connect to {endpoint}: server name: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let addr = (host.to_string(), port);
    TonicEndpoint::from_static("http://localhost")
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, addr, name) = (connector.clone(), addr.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let detail = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            format!("cannot connect to {endpoint} over TLS: {detail}")
        })
}

/// A health as `rbd mirror pool status` words it.
pub fn health_word(h: i32) -> &'static str {
    match pb::Health::try_from(h) {
        Ok(pb::Health::Ok) => "OK",
        Ok(pb::Health::Warning) => "WARNING",
        Ok(pb::Health::Error) => "ERROR",
        _ => "UNKNOWN",
    }
}

fn outcome_word(o: i32) -> &'static str {
    match pb::Outcome::try_from(o) {
        Ok(pb::Outcome::Changed) => "changed",
        Ok(pb::Outcome::Unchanged) => "unchanged",
        Ok(pb::Outcome::Skipped) => "skipped",
        Ok(pb::Outcome::Failed) => "failed",
        _ => "unknown",
    }
}

fn spec(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

fn time_of(t: Option<&prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    t.and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

fn sync_text(l: &pb::SyncPoint) -> String {
    let at = time_of(l.time.as_ref())
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "?".into());
    format!(
        "{} at {at} (took {:.1}s, {})",
        l.snapshot,
        l.duration_ms as f64 / 1000.0,
        fmt_bytes(l.bytes)
    )
}

fn field(out: &mut String, key: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "  {:<16}{value}", format!("{key}:"));
}

/// `pool status` as text, in the spirit of `rbd mirror pool status
/// --verbose`: the summary (health, images by role and by state), then one
/// block per image.
pub fn render_status(s: &pb::PoolStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "pool {}:", s.pool);
    let _ = writeln!(out, "health: {}", health_word(s.health));
    let mut roles: Vec<_> = s.roles.iter().collect();
    roles.sort();
    let roles: Vec<String> = roles.iter().map(|(r, n)| format!("{n} {r}")).collect();
    if roles.is_empty() {
        let _ = writeln!(out, "images: {} total", s.images);
    } else {
        let _ = writeln!(out, "images: {} total ({})", s.images, roles.join(", "));
    }
    let mut states: Vec<_> = s.states.iter().collect();
    states.sort();
    for (state, n) in states {
        let _ = writeln!(out, "    {n} {state}");
    }
    if s.image_statuses.is_empty() {
        return out;
    }
    out.push_str("\nIMAGES\n");
    for (k, i) in s.image_statuses.iter().enumerate() {
        if k > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}:", spec(&i.namespace, &i.name));
        field(&mut out, "role", &i.role);
        field(&mut out, "health", health_word(i.health));
        let state = match (i.state.as_str(), i.percent) {
            ("syncing", Some(p)) => format!("syncing {p:.0}%"),
            (s, _) => s.to_string(),
        };
        field(&mut out, "state", state);
        field(&mut out, "description", &i.description);
        match &i.last_sync {
            Some(l) => field(&mut out, "last sync", sync_text(l)),
            None => field(&mut out, "last sync", "none yet"),
        }
        if let Some(b) = i.seconds_behind {
            field(&mut out, "seconds behind", b);
        }
        if let Some(b) = i.bytes_pending.filter(|b| *b > 0) {
            field(&mut out, "bytes pending", format!("{b} ({})", fmt_bytes(b)));
        }
        field(
            &mut out,
            "schedule",
            format!(
                "every {}s, RPO threshold {}s",
                i.interval_seconds, i.rpo_threshold_seconds
            ),
        );
    }
    out
}

/// `pool status --json`.
pub fn status_json(s: &pb::PoolStatusResponse) -> Value {
    let images: Vec<Value> = s
        .image_statuses
        .iter()
        .map(|i| {
            json!({
                "namespace": i.namespace,
                "name": i.name,
                "image_id": i.image_id,
                "role": i.role,
                "health": health_word(i.health),
                "state": i.state,
                "description": i.description,
                "seconds_behind": i.seconds_behind,
                "percent": i.percent,
                "bytes_pending": i.bytes_pending,
                "interval_seconds": i.interval_seconds,
                "rpo_threshold_seconds": i.rpo_threshold_seconds,
                "last_sync": i.last_sync.as_ref().map(|l| json!({
                    "snapshot": l.snapshot,
                    "time": time_of(l.time.as_ref()).map(|t| t.to_rfc3339()),
                    "duration_ms": l.duration_ms,
                    "bytes": l.bytes,
                })),
            })
        })
        .collect();
    json!({
        "pool": s.pool,
        "health": health_word(s.health),
        "images": s.images,
        "states": s.states,
        "roles": s.roles,
        "image_statuses": images,
    })
}

/// `pool status`'s exit code: 0 when the pool is healthy, 1 otherwise.
pub fn status_exit_code(s: &pb::PoolStatusResponse) -> u8 {
    u8::from(s.health != pb::Health::Ok as i32)
}

/// `drill start|stop` as text: a line per drill image.
pub fn render_drill(op: &str, r: &pb::DrillResponse) -> String {
    let mut out = String::new();
    let verb = if op == "start" { "created" } else { "removed" };
    for d in &r.images {
        let _ = write!(
            out,
            "{}/{}: {}",
            r.pool,
            spec(&d.namespace, &d.drill_image),
            verb
        );
        if op == "start" {
            let at = time_of(d.sync_time.as_ref()).map_or_else(
                || "?".into(),
                |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            );
            let _ = write!(
                out,
                " from {} at sync point {} of {at} ({})",
                spec(&d.namespace, &d.image),
                d.snapshot,
                fmt_bytes(d.bytes)
            );
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "drill {op} on {}: {} drill images {verb}",
        r.cluster_id,
        r.images.len()
    );
    out
}

/// `drill start|stop --json`.
pub fn drill_json(op: &str, r: &pb::DrillResponse) -> Value {
    json!({
        "operation": format!("drill {op}"),
        "site": r.cluster_id,
        "pool": r.pool,
        "images": r.images.iter().map(|d| json!({
            "namespace": d.namespace,
            "image": d.image,
            "drill_image": d.drill_image,
            "snapshot": d.snapshot,
            "sync_time": time_of(d.sync_time.as_ref()).map(|t| t.to_rfc3339()),
            "bytes": d.bytes,
        })).collect::<Vec<_>>(),
    })
}

/// A pool operation's stream, collected.
#[derive(Debug, Default, Clone)]
pub struct OpReport {
    /// `promote` or `demote`.
    pub op: String,
    /// What the server said it acts on.
    pub start: Option<pb::PoolOpStart>,
    /// Per image, in the order they finished.
    pub results: Vec<pb::ImageResult>,
    /// The server's summary; `None` when the stream broke off first.
    pub summary: Option<pb::PoolOpSummary>,
    /// Why the stream broke off, if it did.
    pub broken: Option<String>,
}

impl OpReport {
    /// An empty report of `op`.
    pub fn new(op: &str) -> Self {
        Self {
            op: op.to_string(),
            ..Self::default()
        }
    }

    /// Adds one event of the stream.
    pub fn add(&mut self, e: pb::PoolOpEvent) {
        match e.event {
            Some(Event::Start(s)) => self.start = Some(s),
            Some(Event::Result(r)) => self.results.push(r),
            Some(Event::Summary(s)) => self.summary = Some(s),
            None => {}
        }
    }

    /// Images failed so far.
    pub fn failed(&self) -> usize {
        self.results
            .iter()
            .filter(|r| r.outcome == pb::Outcome::Failed as i32)
            .count()
    }

    /// 0: every image ok (changed, unchanged or skipped); 1: some image
    /// failed; 2: the stream broke off before the summary (outcome unknown).
    pub fn exit_code(&self) -> u8 {
        if self.summary.is_none() {
            2
        } else if self.failed() > 0 {
            1
        } else {
            0
        }
    }

    /// One line of progress for a terminal.
    pub fn progress_line(&self) -> String {
        let total = self.start.as_ref().map_or(0, |s| s.images);
        let mut line = format!(
            "pool {}: {}/{total} done, {} failed",
            self.op,
            self.results.len(),
            self.failed()
        );
        if let Some(r) = self.results.last() {
            let _ = write!(
                line,
                " (last: {} {})",
                spec(&r.namespace, &r.image),
                if r.outcome == pb::Outcome::Failed as i32 {
                    r.code.as_str()
                } else {
                    outcome_word(r.outcome)
                }
            );
        }
        line
    }

    /// The result list and a summary line, sorted by image.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.start {
            let _ = writeln!(
                out,
                "pool {}{}: {} {} images, {} at once",
                s.pool,
                if s.namespace.is_empty() {
                    String::new()
                } else {
                    format!("/{}", s.namespace)
                },
                self.op,
                s.images,
                s.parallel
            );
        }
        let mut results: Vec<&pb::ImageResult> = self.results.iter().collect();
        results.sort_by(|a, b| (&a.namespace, &a.image).cmp(&(&b.namespace, &b.image)));
        for r in results {
            let roles = if r.role_before == r.role_after {
                r.role_before.clone()
            } else {
                format!("{} -> {}", r.role_before, r.role_after)
            };
            let secs = r.duration_ms as f64 / 1000.0;
            let what = if r.outcome == pb::Outcome::Failed as i32 {
                format!("FAILED {}", r.code)
            } else {
                outcome_word(r.outcome).to_string()
            };
            let _ = write!(
                out,
                "  {}: {roles}, {what} ({secs:.1}s)",
                spec(&r.namespace, &r.image)
            );
            if r.message.is_empty() {
                out.push('\n');
            } else {
                let _ = writeln!(out, ": {}", r.message);
            }
        }
        match &self.summary {
            Some(s) => {
                let verb = if self.op == "promote" {
                    "Promoted"
                } else {
                    "Demoted"
                };
                let _ = writeln!(
                    out,
                    "{verb} {} of {} images: {} changed, {} unchanged, {} skipped, {} failed, in {:.1}s",
                    s.changed + s.unchanged,
                    self.start
                        .as_ref()
                        .map_or(self.results.len() as u32, |st| st.images),
                    s.changed,
                    s.unchanged,
                    s.skipped,
                    s.failed,
                    s.duration_ms as f64 / 1000.0
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "the operation's stream broke off after {} results ({}); the images not \
                     listed may or may not have changed: run `pool status`",
                    self.results.len(),
                    self.broken.as_deref().unwrap_or("no summary")
                );
            }
        }
        out
    }

    /// `pool promote|demote --json`.
    pub fn to_json(&self) -> Value {
        let mut results: Vec<&pb::ImageResult> = self.results.iter().collect();
        results.sort_by(|a, b| (&a.namespace, &a.image).cmp(&(&b.namespace, &b.image)));
        json!({
            "operation": self.op,
            "pool": self.start.as_ref().map(|s| s.pool.clone()),
            "namespace": self.start.as_ref().map(|s| s.namespace.clone()),
            "images": self.start.as_ref().map(|s| s.images),
            "parallel": self.start.as_ref().map(|s| s.parallel),
            "results": results.iter().map(|r| json!({
                "namespace": r.namespace,
                "image": r.image,
                "role_before": r.role_before,
                "role_after": r.role_after,
                "outcome": outcome_word(r.outcome),
                "code": r.code,
                "message": r.message,
                "duration_ms": r.duration_ms,
            })).collect::<Vec<_>>(),
            "summary": self.summary.as_ref().map(|s| json!({
                "changed": s.changed,
                "unchanged": s.unchanged,
                "skipped": s.skipped,
                "failed": s.failed,
                "duration_ms": s.duration_ms,
            })),
            "error": self.broken,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: pb::Outcome, code: &str, msg: &str) -> pb::PoolOpEvent {
        pb::PoolOpEvent {
            event: Some(Event::Result(pb::ImageResult {
                namespace: String::new(),
                image: name.into(),
                role_before: "primary".into(),
                role_after: if outcome == pb::Outcome::Changed {
                    "demoted".into()
                } else {
                    "primary".into()
                },
                outcome: outcome as i32,
                code: code.into(),
                message: msg.into(),
                duration_ms: 1200,
                ready: true,
            })),
        }
    }

    fn start(n: u32) -> pb::PoolOpEvent {
        pb::PoolOpEvent {
            event: Some(Event::Start(pb::PoolOpStart {
                pool: "replicapool".into(),
                namespace: String::new(),
                images: n,
                parallel: 8,
            })),
        }
    }

    fn summary(changed: u32, failed: u32) -> pb::PoolOpEvent {
        pb::PoolOpEvent {
            event: Some(Event::Summary(pb::PoolOpSummary {
                changed,
                failed,
                duration_ms: 2500,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_report_renders_every_image_and_sets_the_exit_code() {
        let mut r = OpReport::new("demote");
        r.add(start(2));
        r.add(result("b", pb::Outcome::Changed, "OK", ""));
        assert_eq!(
            r.progress_line(),
            "pool demote: 1/2 done, 0 failed (last: b changed)"
        );
        r.add(result(
            "a",
            pb::Outcome::Failed,
            "FAILED_PRECONDITION",
            "in use by client.4200",
        ));
        assert_eq!(r.exit_code(), 2, "no summary yet");
        r.add(summary(1, 1));
        assert_eq!(r.exit_code(), 1);
        let t = r.render_text();
        assert!(
            t.starts_with("pool replicapool: demote 2 images, 8 at once\n"),
            "{t}"
        );
        let a = t.find("  a: primary, FAILED FAILED_PRECONDITION (1.2s): in use by client.4200");
        let b = t.find("  b: primary -> demoted, changed (1.2s)");
        assert!(a.is_some() && b.is_some() && a < b, "sorted by image:\n{t}");
        assert!(
            t.contains(
                "Demoted 1 of 2 images: 1 changed, 0 unchanged, 0 skipped, 1 failed, in 2.5s"
            ),
            "{t}"
        );
        let j = r.to_json();
        assert_eq!(j["results"][0]["image"], "a");
        assert_eq!(j["results"][0]["code"], "FAILED_PRECONDITION");
        assert_eq!(j["summary"]["failed"], 1);
    }

    #[test]
    fn drill_reports_name_the_sync_point() {
        let r = pb::DrillResponse {
            cluster_id: "site-b".into(),
            pool: "rp".into(),
            images: vec![pb::DrillImage {
                namespace: String::new(),
                image: "vol".into(),
                drill_image: "csirr-drill-vol".into(),
                snapshot: "csirr-sync.0000000002".into(),
                sync_time: Some(prost_types::Timestamp {
                    seconds: 1_790_000_000,
                    nanos: 0,
                }),
                bytes: 3 << 20,
            }],
        };
        let t = render_drill("start", &r);
        assert!(
            t.starts_with(
                "rp/csirr-drill-vol: created from vol at sync point csirr-sync.0000000002 of 2026-09-21T"
            ),
            "{t}"
        );
        assert!(
            t.contains("(3.0 MiB)\ndrill start on site-b: 1 drill images created\n"),
            "{t}"
        );
        let j = drill_json("stop", &r);
        assert_eq!(j["operation"], "drill stop");
        assert_eq!(j["images"][0]["drill_image"], "csirr-drill-vol");
    }

    #[test]
    fn all_ok_is_exit_zero() {
        let mut r = OpReport::new("promote");
        r.add(start(1));
        r.add(result("a", pb::Outcome::Changed, "OK", ""));
        r.add(summary(1, 0));
        assert_eq!(r.exit_code(), 0);
        assert!(r.render_text().contains("Promoted 1 of 1 images"));
    }

    #[test]
    fn pool_status_renders_counts_and_image_lines() {
        let s = pb::PoolStatusResponse {
            pool: "replicapool".into(),
            health: pb::Health::Warning as i32,
            images: 2,
            states: [("idle".to_string(), 1), ("stopped".to_string(), 1)].into(),
            roles: [("primary".to_string(), 2)].into(),
            image_statuses: vec![pb::ImageStatus {
                namespace: "ns1".into(),
                name: "vol".into(),
                role: "primary".into(),
                health: pb::Health::Ok as i32,
                state: "idle".into(),
                description: "replaying, idle; 3s behind (csirr-sync.0000000002)".into(),
                seconds_behind: Some(3),
                last_sync: Some(pb::SyncPoint {
                    snapshot: "csirr-sync.0000000002".into(),
                    time: Some(prost_types::Timestamp {
                        seconds: 1_790_000_000,
                        nanos: 0,
                    }),
                    duration_ms: 1500,
                    bytes: 2 << 20,
                }),
                interval_seconds: 60,
                rpo_threshold_seconds: 120,
                ..Default::default()
            }],
        };
        let t = render_status(&s);
        for want in [
            "pool replicapool:\nhealth: WARNING\nimages: 2 total (2 primary)\n    1 idle\n    1 stopped\n",
            "\nIMAGES\nns1/vol:\n  role:           primary\n  health:         OK\n",
            "  description:    replaying, idle; 3s behind (csirr-sync.0000000002)\n",
            "  last sync:      csirr-sync.0000000002 at 2026-09-21T",
            "  seconds behind: 3\n",
        ] {
            assert!(t.contains(want), "{want:?} not in:\n{t}");
        }
        assert_eq!(status_exit_code(&s), 1);
        let j = status_json(&s);
        assert_eq!(j["health"], "WARNING");
        assert_eq!(j["image_statuses"][0]["seconds_behind"], 3);
        assert_eq!(j["states"]["idle"], 1);
    }
}
