//! Prometheus metrics: every metric name of the process, its labels and the
//! `/metrics` + `/healthz` HTTP endpoint (`serve --metrics-address`).
//!
//! Owns: the names (all prefixed `csi_rbd_replicator_`, unit-suffixed), the
//! label sets, and the removal of an image's series when the image goes away
//! ([`Metrics::forget_image`], [`Metrics::retain_images`]). The engine, the
//! replayer and the gRPC layer only call the methods of [`Metrics`]; nothing
//! outside this module names a metric.
//!
//! Must not: import the engine or gRPC layers (they import this), read Ceph,
//! or decide health. Values are fed by: the status collector
//! (`engine::status::collect_metrics`: lag, pending bytes, state, RPO
//! threshold of every image of the served pools, from the registries), the
//! replayer ([`Metrics::sync_finished`]), the gRPC layer
//! ([`Metrics::rpc_finished`]) and the local-cluster liveness loop
//! ([`Metrics::set_local_cluster_up`]).
//!
//! Exposed (OpenMetrics text; `namespace` is empty for the default RADOS
//! namespace):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `csi_rbd_replicator_syncs_total` | counter | pool, namespace, image, result (`ok`, `error`) |
//! | `csi_rbd_replicator_sync_bytes_total` | counter | pool, namespace, image |
//! | `csi_rbd_replicator_sync_duration_seconds` | histogram | pool, namespace |
//! | `csi_rbd_replicator_replica_lag_seconds` | gauge | pool, namespace, image |
//! | `csi_rbd_replicator_replica_pending_bytes` | gauge | pool, namespace, image |
//! | `csi_rbd_replicator_replica_transfer_rate_bytes_per_second` | gauge | pool, namespace, image |
//! | `csi_rbd_replicator_replica_rpo_threshold_seconds` | gauge | pool, namespace, image |
//! | `csi_rbd_replicator_replica_state` | gauge (1 for the current state, 0 for the others) | pool, namespace, image, state |
//! | `csi_rbd_replicator_rpc_requests_total` | counter | method, code |
//! | `csi_rbd_replicator_rpc_duration_seconds` | histogram | method |
//! | `csi_rbd_replicator_local_cluster_up` | gauge (0/1) | |
//! | `csi_rbd_replicator_leaked_write_bytes` | gauge | |

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Prefix of every metric name.
pub const PREFIX: &str = "csi_rbd_replicator";

/// Values of the `state` label of `csi_rbd_replicator_replica_state`, as the
/// status command prints them.
pub const REPLICA_STATES: [&str; 5] = ["starting", "syncing", "idle", "stopped", "error"];

/// Content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the sync duration buckets, seconds.
const SYNC_BUCKETS: [f64; 14] = [
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
];
/// Upper bounds of the RPC duration buckets, seconds.
const RPC_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Which image a per-image series is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, EncodeLabelSet)]
pub struct ImageLabels {
    /// Pool name.
    pub pool: String,
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub image: String,
}

impl ImageLabels {
    /// Labels of `pool/namespace/image`.
    pub fn new(pool: &str, namespace: &str, image: &str) -> Self {
        Self {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            image: image.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SyncLabels {
    pool: String,
    namespace: String,
    image: String,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
    namespace: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    pool: String,
    namespace: String,
    image: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WakeupLabels {
    pool: String,
    namespace: String,
    image: String,
    cause: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// How a replica is doing, as [`Metrics::replica_progress`] records it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReplicaProgress {
    /// Seconds behind the primary (age of the newest complete sync point);
    /// `None` before the first one (the series is then removed).
    pub lag_seconds: Option<f64>,
    /// Bytes of the running sync still to copy (0 when idle); `None`:
    /// unknown.
    pub pending_bytes: Option<u64>,
    /// Copy rate of the running sync; `None` when not syncing.
    pub bytes_per_second: Option<u64>,
    /// The lag above which the image counts as DEGRADED.
    pub rpo_threshold_seconds: f64,
    /// One of [`REPLICA_STATES`]; other values set no state series.
    pub state: &'static str,
}

/// What a journal-mode replay did since its last report, as
/// [`Metrics::journal_progress`] records it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JournalProgress {
    /// Journal entries taken since the last report.
    pub entries: u64,
    /// Bytes of IO events applied since the last report.
    pub io_bytes: u64,
    /// The start of the newest poll that found the replica caught up.
    pub caught_up: Option<chrono::DateTime<chrono::Utc>>,
    /// Object sets the replica is behind the primary's active set.
    pub sets_behind: Option<u64>,
    /// Bytes of the primary's journal not replayed yet (an estimate).
    pub bytes_behind: Option<u64>,
    /// Entries of the primary's journal not replayed yet.
    pub entries_behind: Option<u64>,
    /// The replica's committed position in the primary's journal: the
    /// newest entry's tag and entry numbers.
    pub committed: Option<(u64, u64)>,
    /// Full reads of the journal started by a notification on its header
    /// since the last report.
    pub watch_wakeups: u64,
    /// Full reads of the journal started by a probe that found a new entry
    /// since the last report.
    pub probe_hits: u64,
    /// Full reads of the journal started by the safety-net poll interval
    /// since the last report.
    pub timed_polls: u64,
}

/// The metrics of one process. Shared as an `Arc`; every method is cheap
/// and never blocks on I/O.
pub struct Metrics {
    registry: Registry,
    syncs: Family<SyncLabels, Counter>,
    sync_bytes: Family<ImageLabels, Counter>,
    sync_duration: HistogramFamily<PoolLabels>,
    lag: Family<ImageLabels, FloatGauge>,
    pending: Family<ImageLabels, Gauge>,
    rate: Family<ImageLabels, Gauge>,
    rpo_threshold: Family<ImageLabels, FloatGauge>,
    state: Family<StateLabels, Gauge>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabels>,
    local_up: Gauge,
    leaked_write_bytes: Gauge,
    journal_entries: Family<ImageLabels, Counter>,
    journal_bytes: Family<ImageLabels, Counter>,
    journal_caught_up: Family<ImageLabels, FloatGauge>,
    journal_resyncs: Counter,
    journal_behind: Family<ImageLabels, Gauge>,
    journal_bytes_behind: Family<ImageLabels, Gauge>,
    journal_entries_behind: Family<ImageLabels, Gauge>,
    journal_committed_tag: Family<ImageLabels, Gauge>,
    journal_committed_entry: Family<ImageLabels, Gauge>,
    journal_wakeups: Family<WakeupLabels, Counter>,
    /// Images with per-image series, for [`Metrics::retain_images`].
    images: Mutex<HashSet<ImageLabels>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn sync_histogram() -> Histogram {
    Histogram::new(SYNC_BUCKETS)
}

fn rpc_histogram() -> Histogram {
    Histogram::new(RPC_BUCKETS)
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Self {
            syncs: Family::default(),
            sync_bytes: Family::default(),
            sync_duration: Family::new_with_constructor(sync_histogram),
            lag: Family::default(),
            pending: Family::default(),
            rate: Family::default(),
            rpo_threshold: Family::default(),
            state: Family::default(),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(rpc_histogram),
            local_up: Gauge::default(),
            leaked_write_bytes: Gauge::default(),
            journal_entries: Family::default(),
            journal_bytes: Family::default(),
            journal_caught_up: Family::default(),
            journal_resyncs: Counter::default(),
            journal_behind: Family::default(),
            journal_bytes_behind: Family::default(),
            journal_entries_behind: Family::default(),
            journal_committed_tag: Family::default(),
            journal_committed_entry: Family::default(),
            journal_wakeups: Family::default(),
            images: Mutex::default(),
            registry: Registry::default(),
        };
        m.register_replication(&mut registry);
        m.register_process(&mut registry);
        m.register_journal(&mut registry);
        Self { registry, ..m }
    }

    /// The sync and per-replica metrics.
    fn register_replication(&self, r: &mut Registry) {
        r.register(
            "syncs",
            "Sync attempts that copied or failed, by result",
            self.syncs.clone(),
        );
        r.register_with_unit(
            "sync",
            "Bytes copied into replicas (read and written, or zeroed)",
            Unit::Bytes,
            self.sync_bytes.clone(),
        );
        r.register_with_unit(
            "sync_duration",
            "Duration of complete syncs (snapshot to replica snapshot)",
            Unit::Seconds,
            self.sync_duration.clone(),
        );
        r.register_with_unit(
            "replica_lag",
            "Seconds behind the primary: age of the newest complete sync point",
            Unit::Seconds,
            self.lag.clone(),
        );
        r.register_with_unit(
            "replica_pending",
            "Bytes of the running sync still to copy (0 when idle)",
            Unit::Bytes,
            self.pending.clone(),
        );
        r.register_with_unit(
            "replica_transfer_rate",
            "Copy rate of the running sync",
            Unit::Other("bytes_per_second".into()),
            self.rate.clone(),
        );
        r.register_with_unit(
            "replica_rpo_threshold",
            "Lag above which the image is DEGRADED (RPO exceeded)",
            Unit::Seconds,
            self.rpo_threshold.clone(),
        );
        r.register(
            "replica_state",
            "Replication state of the image: 1 for the current state",
            self.state.clone(),
        );
    }

    /// The RPC, cluster and buffer metrics of the process.
    fn register_process(&self, r: &mut Registry) {
        r.register(
            "rpc_requests",
            "csi-addons gRPC requests handled, by method and status code",
            self.rpc_requests.clone(),
        );
        r.register_with_unit(
            "rpc_duration",
            "Duration of csi-addons gRPC requests",
            Unit::Seconds,
            self.rpc_duration.clone(),
        );
        r.register(
            "local_cluster_up",
            "1 when the local Ceph cluster answered the last liveness check",
            self.local_up.clone(),
        );
        r.register(
            "leaked_write_bytes",
            "Bytes of copy buffers kept forever because a direct write failed and librados \
             may still reference them",
            self.leaked_write_bytes.clone(),
        );
    }

    /// The journal-mode metrics.
    fn register_journal(&self, r: &mut Registry) {
        r.register(
            "journal_entries",
            "Journal entries replayed into the replica (journal mode)",
            self.journal_entries.clone(),
        );
        r.register_with_unit(
            "journal_io",
            "Bytes of journaled IO applied to the replica (journal mode)",
            Unit::Bytes,
            self.journal_bytes.clone(),
        );
        r.register_with_unit(
            "journal_caught_up_timestamp",
            "Unix time of the newest poll that found the replica caught up with the primary's \
             journal: everything written before it is on the replica (journal mode)",
            Unit::Seconds,
            self.journal_caught_up.clone(),
        );
        r.register(
            "journal_resyncs",
            "Journal-mode replicas found too far behind and resynced from a new snapshot",
            self.journal_resyncs.clone(),
        );
        r.register(
            "journal_sets_behind",
            "Journal object sets the replica is behind the primary's active set (journal mode)",
            self.journal_behind.clone(),
        );
        r.register_with_unit(
            "journal_behind",
            "Bytes of the primary's journal the replica has not replayed yet, padding \
             included (journal mode)",
            Unit::Bytes,
            self.journal_bytes_behind.clone(),
        );
        r.register(
            "journal_behind_entries",
            "Entries of the primary's journal the replica has not replayed yet: counted in \
             up to 4 MiB of unread journal, estimated from their mean size beyond (journal mode)",
            self.journal_entries_behind.clone(),
        );
        r.register(
            "journal_committed_tag",
            "The tag of the newest entry the replica committed in the primary's journal \
             (journal mode; a new tag follows each promotion)",
            self.journal_committed_tag.clone(),
        );
        r.register(
            "journal_committed_entry",
            "The number, within its tag, of the newest entry the replica committed in the \
             primary's journal (journal mode)",
            self.journal_committed_entry.clone(),
        );
        r.register(
            "journal_wakeups",
            "Full reads of the primary's journal by the replay loop, by cause: watch (a \
             notification on the journal header), probe (the object where the next entry \
             lands grew), poll (the safety-net interval) (journal mode)",
            self.journal_wakeups.clone(),
        );
    }

    /// A journal-mode replica (`key`, for the log) was too far behind and is
    /// resynced.
    pub fn journal_resynced(&self, key: &str) {
        tracing::debug!(image = %key, "journal resync counted");
        self.journal_resyncs.inc();
    }

    /// Records what the journal replay of `img` did since its last report.
    pub fn journal_progress(&self, img: &ImageLabels, p: &JournalProgress) {
        self.remember(img);
        self.journal_entries.get_or_create(img).inc_by(p.entries);
        self.journal_bytes.get_or_create(img).inc_by(p.io_bytes);
        if let Some(b) = p.sets_behind {
            self.journal_behind.get_or_create(img).set(gauge_i64(b));
        }
        if let Some(b) = p.bytes_behind {
            self.journal_bytes_behind
                .get_or_create(img)
                .set(gauge_i64(b));
        }
        if let Some(n) = p.entries_behind {
            self.journal_entries_behind
                .get_or_create(img)
                .set(gauge_i64(n));
        }
        if let Some((tag, entry)) = p.committed {
            self.journal_committed_tag
                .get_or_create(img)
                .set(gauge_i64(tag));
            self.journal_committed_entry
                .get_or_create(img)
                .set(gauge_i64(entry));
        }
        for (cause, n) in [
            ("watch", p.watch_wakeups),
            ("probe", p.probe_hits),
            ("poll", p.timed_polls),
        ] {
            if n > 0 {
                self.journal_wakeups
                    .get_or_create(&WakeupLabels {
                        pool: img.pool.clone(),
                        namespace: img.namespace.clone(),
                        image: img.image.clone(),
                        cause,
                    })
                    .inc_by(n);
            }
        }
        if let Some(t) = p.caught_up {
            self.journal_caught_up
                .get_or_create(img)
                .set(t.timestamp_millis() as f64 / 1000.0);
        }
    }

    fn remember(&self, img: &ImageLabels) {
        let mut images = self.images.lock();
        if !images.contains(img) {
            images.insert(img.clone());
        }
    }

    /// A sync of `img` ended: `ok` when it completed a sync point of `bytes`
    /// copied in `duration`; a failed attempt counts only in `syncs_total`.
    pub fn sync_finished(&self, img: &ImageLabels, bytes: u64, duration: Duration, ok: bool) {
        self.remember(img);
        self.syncs
            .get_or_create(&SyncLabels {
                pool: img.pool.clone(),
                namespace: img.namespace.clone(),
                image: img.image.clone(),
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        if ok {
            self.sync_bytes.get_or_create(img).inc_by(bytes);
            self.sync_duration
                .get_or_create(&PoolLabels {
                    pool: img.pool.clone(),
                    namespace: img.namespace.clone(),
                })
                .observe(duration.as_secs_f64());
        }
    }

    /// Records how the replica of `img` is doing.
    pub fn replica_progress(&self, img: &ImageLabels, p: &ReplicaProgress) {
        self.remember(img);
        match p.lag_seconds {
            Some(s) if s.is_finite() => {
                self.lag.get_or_create(img).set(s.max(0.0));
            }
            _ => {
                self.lag.remove(img);
            }
        }
        match p.pending_bytes {
            Some(b) => {
                self.pending.get_or_create(img).set(gauge_i64(b));
            }
            None => {
                self.pending.remove(img);
            }
        }
        match p.bytes_per_second {
            Some(b) => {
                self.rate.get_or_create(img).set(gauge_i64(b));
            }
            None => {
                self.rate.remove(img);
            }
        }
        self.rpo_threshold
            .get_or_create(img)
            .set(p.rpo_threshold_seconds);
        for s in REPLICA_STATES {
            self.state
                .get_or_create(&state_labels(img, s))
                .set(i64::from(s == p.state));
        }
    }

    /// Removes every per-image series of `img` (the image is gone).
    pub fn forget_image(&self, img: &ImageLabels) {
        for result in ["ok", "error"] {
            self.syncs.remove(&SyncLabels {
                pool: img.pool.clone(),
                namespace: img.namespace.clone(),
                image: img.image.clone(),
                result,
            });
        }
        self.sync_bytes.remove(img);
        self.lag.remove(img);
        self.pending.remove(img);
        self.rate.remove(img);
        self.rpo_threshold.remove(img);
        self.journal_entries.remove(img);
        self.journal_bytes.remove(img);
        self.journal_caught_up.remove(img);
        self.journal_behind.remove(img);
        self.journal_bytes_behind.remove(img);
        self.journal_entries_behind.remove(img);
        self.journal_committed_tag.remove(img);
        self.journal_committed_entry.remove(img);
        for cause in ["watch", "probe", "poll"] {
            self.journal_wakeups.remove(&WakeupLabels {
                pool: img.pool.clone(),
                namespace: img.namespace.clone(),
                image: img.image.clone(),
                cause,
            });
        }
        for s in REPLICA_STATES {
            self.state.remove(&state_labels(img, s));
        }
        self.images.lock().remove(img);
    }

    /// Forgets every image with series for which `keep` is false (e.g. those
    /// no longer in any registry). Returns how many were forgotten.
    pub fn retain_images(&self, keep: impl Fn(&ImageLabels) -> bool) -> usize {
        let gone: Vec<ImageLabels> = self
            .images
            .lock()
            .iter()
            .filter(|i| !keep(i))
            .cloned()
            .collect();
        for img in &gone {
            self.forget_image(img);
        }
        gone.len()
    }

    /// A gRPC request to `method` (e.g. `replication.Controller/PromoteVolume`)
    /// ended with status `code` (e.g. `OK`, `NotFound`) after `duration`.
    pub fn rpc_finished(&self, method: &str, code: &'static str, duration: Duration) {
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method: method.to_string(),
                code,
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(duration.as_secs_f64());
    }

    /// Bytes of write buffers leaked after failed direct writes.
    pub fn set_leaked_write_bytes(&self, n: u64) {
        self.leaked_write_bytes
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether the local cluster answered the last liveness check.
    pub fn set_local_cluster_up(&self, up: bool) {
        self.local_up.set(i64::from(up));
    }

    /// The exposition in OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn state_labels(img: &ImageLabels, state: &'static str) -> StateLabels {
    StateLabels {
        pool: img.pool.clone(),
        namespace: img.namespace.clone(),
        image: img.image.clone(),
        state,
    }
}

/// Serves `GET /metrics` (the exposition of `metrics`) and `GET /healthz`
/// (200 `ok` when `health` says so, else 503 with the reason) on `listener`
/// until `shutdown` is cancelled.
pub async fn serve_http<H>(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    health: H,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    H: Fn() -> Result<(), String> + Clone + Send + Sync + 'static,
{
    use axum::http::{StatusCode, header};
    use axum::routing::get;

    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&metrics);
                async move {
                    match m.encode() {
                        Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            format!("cannot encode metrics: {e}\n"),
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let h = health.clone();
                async move {
                    match h() {
                        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
                        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(name: &str) -> ImageLabels {
        ImageLabels::new("rbd", "", name)
    }

    fn idle(lag: f64) -> ReplicaProgress {
        ReplicaProgress {
            lag_seconds: Some(lag),
            pending_bytes: Some(0),
            bytes_per_second: None,
            rpo_threshold_seconds: 600.0,
            state: "idle",
        }
    }

    fn lines(m: &Metrics, image: &str) -> Vec<String> {
        let needle = format!("image=\"{image}\"");
        m.encode()
            .unwrap()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn names_are_prefixed_and_unit_suffixed() {
        let m = Metrics::new();
        m.sync_finished(&img("a"), 4096, Duration::from_millis(1500), true);
        m.replica_progress(&img("a"), &idle(12.5));
        m.rpc_finished(
            "replication.Controller/EnableVolumeReplication",
            "OK",
            Duration::from_millis(20),
        );
        m.set_local_cluster_up(true);
        let text = m.encode().unwrap();
        for want in [
            "csi_rbd_replicator_syncs_total{pool=\"rbd\",namespace=\"\",image=\"a\",result=\"ok\"} 1",
            "csi_rbd_replicator_sync_bytes_total{pool=\"rbd\",namespace=\"\",image=\"a\"} 4096",
            "csi_rbd_replicator_sync_duration_seconds_count{pool=\"rbd\",namespace=\"\"} 1",
            "csi_rbd_replicator_sync_duration_seconds_bucket{le=\"2.5\",pool=\"rbd\",namespace=\"\"} 1",
            "csi_rbd_replicator_replica_lag_seconds{pool=\"rbd\",namespace=\"\",image=\"a\"} 12.5",
            "csi_rbd_replicator_replica_pending_bytes{pool=\"rbd\",namespace=\"\",image=\"a\"} 0",
            "csi_rbd_replicator_replica_rpo_threshold_seconds{pool=\"rbd\",namespace=\"\",image=\"a\"} 600.0",
            "csi_rbd_replicator_replica_state{pool=\"rbd\",namespace=\"\",image=\"a\",state=\"idle\"} 1",
            "csi_rbd_replicator_replica_state{pool=\"rbd\",namespace=\"\",image=\"a\",state=\"syncing\"} 0",
            "csi_rbd_replicator_rpc_requests_total{method=\"replication.Controller/EnableVolumeReplication\",code=\"OK\"} 1",
            "csi_rbd_replicator_rpc_duration_seconds_count{method=\"replication.Controller/EnableVolumeReplication\"} 1",
            "csi_rbd_replicator_local_cluster_up 1",
            "# TYPE csi_rbd_replicator_sync_duration_seconds histogram",
            "# UNIT csi_rbd_replicator_replica_lag_seconds seconds",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Every sample line carries the prefix.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(l.starts_with("csi_rbd_replicator_"), "{l}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn failed_sync_counts_only_the_attempt() {
        let m = Metrics::new();
        m.sync_finished(&img("b"), 999, Duration::from_secs(1), false);
        let l = lines(&m, "b");
        assert!(l.iter().any(|l| l.contains("result=\"error\"} 1")), "{l:?}");
        assert!(!l.iter().any(|l| l.contains("sync_bytes_total")), "{l:?}");
    }

    #[test]
    fn state_is_one_hot_and_lag_disappears_when_unknown() {
        let m = Metrics::new();
        m.replica_progress(&img("c"), &idle(3.0));
        m.replica_progress(
            &img("c"),
            &ReplicaProgress {
                lag_seconds: None,
                pending_bytes: Some(1 << 20),
                bytes_per_second: Some(4096),
                rpo_threshold_seconds: 60.0,
                state: "syncing",
            },
        );
        let l = lines(&m, "c");
        let ones: Vec<_> = l
            .iter()
            .filter(|l| l.contains("replica_state{") && l.ends_with(" 1"))
            .collect();
        assert_eq!(ones.len(), 1, "{l:?}");
        assert!(ones[0].contains("state=\"syncing\""), "{l:?}");
        assert_eq!(
            l.iter().filter(|l| l.contains("replica_state{")).count(),
            REPLICA_STATES.len()
        );
        assert!(
            !l.iter().any(|l| l.contains("replica_lag_seconds")),
            "{l:?}"
        );
        assert!(
            l.iter()
                .any(|l| l.contains("pending_bytes") && l.ends_with(" 1048576"))
        );
        assert!(
            l.iter()
                .any(|l| l.contains("rate_bytes_per_second") && l.ends_with(" 4096"))
        );
    }

    #[test]
    fn forget_image_removes_every_series_of_the_image() {
        let m = Metrics::new();
        for name in ["gone", "stays"] {
            m.sync_finished(&img(name), 1, Duration::from_secs(1), true);
            m.sync_finished(&img(name), 1, Duration::from_secs(1), false);
            m.replica_progress(&img(name), &idle(1.0));
        }
        assert!(!lines(&m, "gone").is_empty());
        m.forget_image(&img("gone"));
        assert_eq!(lines(&m, "gone"), Vec::<String>::new());
        assert!(lines(&m, "stays").len() >= 9, "{:?}", lines(&m, "stays"));
        // The per-pool histogram stays.
        assert!(m.encode().unwrap().contains("sync_duration_seconds_count"));
    }

    #[test]
    fn retain_images_forgets_only_images_not_kept() {
        let m = Metrics::new();
        let other = ImageLabels::new("other", "", "x");
        m.replica_progress(&img("a"), &idle(1.0));
        m.replica_progress(&img("b"), &idle(1.0));
        m.replica_progress(&other, &idle(1.0));
        assert_eq!(m.retain_images(|i| i.pool != "rbd" || i.image == "a"), 1);
        assert!(!lines(&m, "a").is_empty());
        assert!(lines(&m, "b").is_empty());
        assert!(!lines(&m, "x").is_empty());
    }

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::new();
        m.replica_progress(&ImageLabels::new("p", "n\"s", "i\nmg"), &idle(1.0));
        let text = m.encode().unwrap();
        assert!(text.contains(r#"namespace="n\"s",image="i\nmg""#), "{text}");
    }
}
