//! The csi-rbd-replicator command line: `serve` runs the sidecar (gRPC
//! services and the replayer); `verify` compares a volume with its replica;
//! `status` reads the registries; `pool` drives a running sidecar's admin
//! API (pool status, promote, demote); `failover` and `failback` drive both
//! sites' sidecars' admin APIs (`grpc::site_client`); `migrate` moves pools
//! to the other cluster through both (`grpc::migrate_client`).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;

use csi_rbd_replicator::csi::config::{ClusterConfig, ClusterMapping, CsiConfig};
use csi_rbd_replicator::csi::params::parse_size;
use csi_rbd_replicator::csi::volume_id::VolumeId;
use csi_rbd_replicator::engine::{self, CopyLimits, Credentials, Engine, EngineConfig};
use csi_rbd_replicator::grpc::admin::AdminService;
use csi_rbd_replicator::grpc::forward::{self, ForwardService};
use csi_rbd_replicator::grpc::identity::IdentityService;
use csi_rbd_replicator::grpc::proto::admin::admin_server::AdminServer;
use csi_rbd_replicator::grpc::proto::identity::identity_server::IdentityServer;
use csi_rbd_replicator::grpc::proto::replication::controller_server::ControllerServer;
use csi_rbd_replicator::grpc::proto::volumegroup::controller_server::ControllerServer as VolumeGroupServer;
use csi_rbd_replicator::grpc::replication::ReplicationService;
use csi_rbd_replicator::grpc::server::{Endpoint, Listeners};
use csi_rbd_replicator::grpc::tls::{TlsConfig, TlsError, TlsFiles};
use csi_rbd_replicator::grpc::volumegroup::VolumeGroupService;
use csi_rbd_replicator::metrics::Metrics;

mod migrate_cli;
mod migrate_setup;
mod omap_cli;

#[derive(Parser)]
#[command(
    version,
    about = "CSI-Addons sidecar that replicates Ceph RBD volumes between two clusters"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Commands that talk to sidecars (pool, failover, failback, drill,
    /// migrate): reach tcp:// endpoints over TLS, trusting these PEM CA
    /// certificates (unix sockets stay plain).
    #[arg(long, global = true)]
    tls_ca: Option<PathBuf>,
    /// With --tls-ca: a PEM client certificate, for sidecars serving with
    /// --tls-client-ca (mutual TLS). Needs --tls-client-key.
    #[arg(long, global = true, requires = "tls_client_key")]
    tls_client_cert: Option<PathBuf>,
    /// The PEM private key of --tls-client-cert.
    #[arg(long, global = true, requires = "tls_client_cert")]
    tls_client_key: Option<PathBuf>,
    /// With --tls-ca: the name the sidecars' certificates carry (default:
    /// the endpoint's host).
    #[arg(long, global = true)]
    tls_server_name: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the csi-addons Identity and replication services and replicate.
    Serve(Box<ServeArgs>),
    /// Compare a volume with its replica on the peer cluster at a sync
    /// snapshot, reading only. Exit code 0: identical, 1: different, 2: error.
    Verify(VerifyArgs),
    /// Create or repair ceph-csi's omap journal entries on this cluster from
    /// PersistentVolume manifests (e.g. restored PVs of replicated volumes).
    OmapGenerate(omap_cli::OmapGenerateArgs),
    /// Replication status of the pools of this cluster, in the spirit of
    /// `rbd mirror pool status`. Exit code 0: healthy, 1: an image is
    /// degraded or in error, 2: cannot read.
    Status(StatusArgs),
    /// Pool-scale operations through a running sidecar's admin API: status,
    /// promote, demote. Exit code 0: every image ok (status: healthy), 1:
    /// some image failed (status: degraded or in error), 2: usage or
    /// connection error.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Fail every replicated image of the pools over to site SITE, the
    /// Cinder way: demote on the old site while it answers, promote (planned)
    /// on SITE; on the first demotion that fails or times out, force-promote
    /// the rest on SITE. Exit code 0: every image clean (or already primary),
    /// 3: some were forced, 1: some failed, 2: usage or SITE unreachable.
    Failover(SiteArgs),
    /// Fail back to site SITE, the old site once it is back: demote there
    /// the images primary on both sites, resync every demoted image from
    /// the current primary (only what diverged is copied), and with
    /// --relocate make SITE primary again (planned). Exit codes as failover.
    Failback(FailbackArgs),
    /// DR drill on the secondary site, through its sidecar: `start` copies
    /// each replica at its newest complete sync point into a test image
    /// `csirr-drill-IMAGE` (the replica is only read; replication goes on),
    /// `stop` removes them. Exit code 0: done, 2: error (nothing created).
    #[command(subcommand)]
    Drill(DrillCmd),
    /// Migrate whole pools to the other cluster with minimal downtime
    /// through both sites' sidecars: `start` (one-way pool-mode
    /// replication), `status`, `switch` (final delta, demote, promote,
    /// measured downtime), `cleanup`.
    #[command(subcommand)]
    Migrate(migrate_cli::MigrateCmd),
}

#[derive(Subcommand)]
enum DrillCmd {
    /// Create the drill images.
    Start(DrillArgs),
    /// Remove the drill images.
    Stop(DrillArgs),
}

#[derive(clap::Args)]
struct DrillArgs {
    #[command(flatten)]
    target: PoolTarget,
    /// Only this replica; repeatable (default: every replica of the pool).
    #[arg(long = "image")]
    images: Vec<String>,
}

/// Both sites' sidecars and what a site operation acts on.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["pools", "all"])))]
struct SiteArgs {
    /// The cluster ID of the site that becomes primary (its sidecar is
    /// --to-endpoint).
    #[arg(long)]
    to: String,
    /// The admin endpoint of SITE's sidecar: `unix:///path.sock` or
    /// `tcp://host:port`.
    #[arg(long)]
    to_endpoint: Endpoint,
    /// The admin endpoint of the other site's sidecar. When it cannot be
    /// reached every image is promoted by force.
    #[arg(long)]
    from_endpoint: Endpoint,
    /// A pool to act on; repeatable.
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Every pool SITE's sidecar replicates.
    #[arg(long)]
    all: bool,
    /// Bound on each demotion on the other site; past it the site is
    /// assumed gone.
    #[arg(long, default_value = "30s", value_parser = duration)]
    timeout: Duration,
    /// How long a planned promotion waits for the demotion snapshot to be
    /// copied (failback: for the resyncs to complete).
    #[arg(long, default_value = "5m", value_parser = duration)]
    wait: Duration,
    /// Images worked on at once.
    #[arg(long, default_value_t = engine::pool::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Print the report (or the error) as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct FailbackArgs {
    #[command(flatten)]
    site: SiteArgs,
    /// Once resynced, relocate the images back to SITE (planned demotion
    /// on the other site, promotion on SITE).
    #[arg(long)]
    relocate: bool,
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Replication status of a pool, like `rbd mirror pool status
    /// --verbose`: health, images by role and state, one block per image.
    Status(PoolTarget),
    /// Promote every replicated image of the pool on this site.
    Promote(PoolPromoteArgs),
    /// Demote every primary image of the pool on this site (replicas are
    /// skipped).
    Demote(PoolDemoteArgs),
    /// Pool mode on (like `rbd mirror pool enable POOL pool`): every image
    /// of the pool's namespace is replicated, images created later
    /// included, with the schedule given. On the primary's site.
    Enable(migrate_cli::PoolModeArgs),
    /// Pool mode off: no new image is enrolled; replicated images stay so.
    Disable(migrate_cli::PoolModeArgs),
}

/// The sidecar to talk to and the pool.
#[derive(clap::Args)]
struct PoolTarget {
    /// The pool.
    pool: String,
    /// Only this RBD namespace of the pool (default: every namespace).
    #[arg(long, default_value = "")]
    namespace: String,
    /// The sidecar's endpoint: `unix:///path.sock` or `tcp://host:port`
    /// (plain, no TLS).
    #[arg(long, default_value = "unix:///csi/csi-addons.sock")]
    endpoint: Endpoint,
    /// Print the result (or the error) as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct PoolPromoteArgs {
    #[command(flatten)]
    target: PoolTarget,
    /// Fail over without the peer (PromoteVolume with force).
    #[arg(long)]
    force: bool,
    /// Images promoted at once.
    #[arg(long, default_value_t = engine::pool::DEFAULT_PARALLEL as u32)]
    parallel: u32,
    /// Retry an image whose planned promotion answers UNAVAILABLE (the
    /// peer's demotion snapshot still being copied) for this long.
    #[arg(long, default_value = "2m", value_parser = duration)]
    wait: Duration,
}

#[derive(clap::Args)]
struct PoolDemoteArgs {
    #[command(flatten)]
    target: PoolTarget,
    /// Images demoted at once.
    #[arg(long, default_value_t = engine::pool::DEFAULT_PARALLEL as u32)]
    parallel: u32,
}

#[derive(Parser)]
struct StatusArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Pool to report; default: every pool with replicated images.
    #[arg(long)]
    pool: Option<String>,
    /// One block per image: role, state, replicas, recovery point.
    #[arg(long, short)]
    verbose: bool,
    /// Print the status (or the error) as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// A replica that has not reported for this long is a silent peer.
    #[arg(long, default_value = "60s", value_parser = duration)]
    stale_after: Duration,
    /// RPO threshold, as a multiple of each image's schedule interval.
    #[arg(long, default_value_t = engine::status::DEFAULT_RPO_FACTOR)]
    rpo_factor: f64,
    /// Bound on each cluster operation, and on connecting.
    #[arg(long, default_value = "30s", value_parser = duration)]
    op_timeout: Duration,
}

/// How to reach the local cluster (shared by the commands).
#[derive(clap::Args)]
struct ClusterArgs {
    /// ceph-csi's config.json (cluster IDs and monitors).
    #[arg(long, default_value = "/etc/ceph-csi-config/config.json")]
    csi_config: PathBuf,
    /// ceph-csi's cluster-mapping.json; ignored when absent.
    #[arg(long, default_value = "/etc/ceph-csi-config/cluster-mapping.json")]
    cluster_mapping: PathBuf,
    /// The local cluster: an entry of config.json (optional with one entry).
    #[arg(long)]
    cluster_id: Option<String>,
    /// Directory with files `userID` and `userKey` (a mounted Kubernetes
    /// Secret) for background work on the local cluster.
    #[arg(long)]
    secret_dir: PathBuf,
}

impl ClusterArgs {
    /// ceph-csi's config, the mapping, the local cluster and credentials.
    fn load(&self) -> Result<(CsiConfig, ClusterMapping, ClusterConfig, Credentials), String> {
        let csi_config = CsiConfig::load(&self.csi_config).map_err(|e| e.to_string())?;
        let mapping = if self.cluster_mapping.exists() {
            ClusterMapping::load(&self.cluster_mapping).map_err(|e| e.to_string())?
        } else {
            ClusterMapping::default()
        };
        let local_cluster = match &self.cluster_id {
            Some(id) => csi_config.cluster(id),
            None => csi_config.default_cluster(),
        }
        .map_err(|e| e.to_string())?
        .clone();
        let local_creds = Credentials::from_dir(&self.secret_dir).map_err(|e| e.to_string())?;
        Ok((csi_config, mapping, local_cluster, local_creds))
    }
}

#[derive(Parser)]
struct VerifyArgs {
    /// The volume: a ceph-csi volume handle, or `pool[/namespace]/image` on
    /// the local cluster.
    volume: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Snapshot to compare; default: the newest sync snapshot both sides have.
    #[arg(long)]
    snapshot: Option<String>,
    /// Mirror peer (site name) to compare with, when several have the image.
    #[arg(long)]
    peer: Option<String>,
    /// Differing extents to list at most.
    #[arg(long, default_value_t = engine::verify::DEFAULT_MAX_EXTENTS)]
    max_extents: usize,
    /// Chunks (RBD objects) compared at once; each holds a buffer per side.
    #[arg(long, default_value_t = engine::verify::DEFAULT_PARALLEL)]
    parallel: usize,
    /// Also read chunks that neither side has allocated (e.g. for clones,
    /// whose parent data the allocation listing does not show).
    #[arg(long)]
    full: bool,
    /// Print the report (or the error) as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Bound on each cluster operation, and on connecting.
    #[arg(long, default_value = "30s", value_parser = duration)]
    op_timeout: Duration,
}

#[derive(Parser)]
struct ServeArgs {
    #[command(flatten)]
    pv_watch: omap_cli::WatchArgs,
    /// Where to listen: `unix:///path.sock` or `tcp://host:port`; repeatable.
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<Endpoint>,
    /// PEM certificate chain for the tcp:// endpoints: they serve TLS (unix
    /// sockets stay plain). Re-read when the file changes. Needs --tls-key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): tcp:// clients must present a certificate
    /// signed by one of them (mutual TLS). Needs --tls-cert and --tls-key.
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// ceph-csi's own csi-addons endpoint (`unix:///path.sock` or
    /// `tcp://host:port`): every service this sidecar does not serve
    /// (NetworkFence, ReclaimSpace, ...) is forwarded there, and
    /// GetCapabilities adds its capabilities. Default: such calls answer
    /// UNIMPLEMENTED.
    #[arg(long)]
    forward_endpoint: Option<Endpoint>,
    /// CSI driver name to report; must equal the driver the
    /// VolumeReplicationClass names (e.g. rook-ceph.rbd.csi.ceph.com).
    #[arg(long)]
    drivername: String,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Pools to replicate (comma separated); default: every pool with mirror
    /// peers.
    #[arg(long, value_delimiter = ',')]
    pools: Option<Vec<String>>,
    /// How often the replayer looks for new sync snapshots (`Ns`, `Nm`).
    #[arg(long, default_value = "5s", value_parser = duration)]
    poll_interval: Duration,
    /// Bound on each cluster operation, and on connecting.
    #[arg(long, default_value = "30s", value_parser = duration)]
    op_timeout: Duration,
    /// Bytes of copy buffers in flight in all, shared by the syncs running
    /// at once (a lone one may use all of it): memory stays flat whatever the
    /// images. At the default the resident size peaks under 100 MiB in the
    /// benchmark's shapes (docs/design.md, "Memory").
    #[arg(long, default_value = "16M", value_parser = bytes)]
    max_inflight_bytes: usize,
    /// Aio operations in flight per image.
    #[arg(long, default_value_t = 32)]
    max_inflight_ops: usize,
    /// Sync snapshots kept on each side per image (at least 1).
    #[arg(long, default_value_t = 3)]
    keep_snapshots: usize,
    /// How often a running delta records its progress, so that a restart
    /// resumes it.
    #[arg(long, default_value = "5s", value_parser = duration)]
    checkpoint_interval: Duration,
    /// Byte-rate cap of all replication into this cluster (e.g. 200M;
    /// 0: unlimited). Per image: the `bandwidthLimit` parameter.
    #[arg(long, default_value = "0", value_parser = bytes)]
    max_bytes_per_second: usize,
    /// Bound on PromoteVolume (a forced promotion never waits for the peer).
    #[arg(long, default_value = "60s", value_parser = duration)]
    promote_timeout: Duration,
    /// Bound on every other RPC: past it the caller gets UNAVAILABLE (the
    /// work goes on and holds the volume until done). Below the csi-addons
    /// controller's 3-minute call deadline.
    #[arg(long, default_value = "150s", value_parser = duration)]
    rpc_timeout: Duration,
    /// RPCs doing cluster work at once; more wait (within their deadline),
    /// so that a flood of calls cannot starve replication of threads.
    #[arg(long, default_value_t = 32)]
    max_concurrent_rpcs: usize,
    /// RPO threshold, as a multiple of each image's schedule interval: a
    /// replica further behind is DEGRADED ("RPO exceeded").
    #[arg(long, default_value_t = engine::status::DEFAULT_RPO_FACTOR)]
    rpo_factor: f64,
    /// Journal mode: a replica more than this many journal object sets
    /// behind the primary's active set is resynced from a new snapshot
    /// instead of pinning the primary's journal (a primary's sidecar
    /// disconnects such a client whose site is down).
    #[arg(long, default_value_t = engine::journal_mode::DEFAULT_MAX_SETS_BEHIND)]
    journal_max_sets_behind: u64,
    /// Journal mode: how often a replica reads the primary's journal in
    /// full when nothing woke it (the safety net for a notification lost on
    /// the journal header: new tags and object sets are notified there).
    #[arg(long, default_value = "1s", value_parser = duration)]
    journal_poll_interval: Duration,
    /// Journal mode: how often a replica checks (one stat of one object)
    /// whether the primary appended an entry where the next one lands;
    /// appends notify nobody, so this bounds the lag of a write at rest.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    journal_probe_interval: Duration,
    /// Journal mode: the probe interval of a replica that found no entry for
    /// a while (2 s): the first write after a quiet spell waits at most this
    /// long, the writes after it the probe interval again.
    #[arg(long, default_value = "250ms", value_parser = duration)]
    journal_idle_probe_interval: Duration,
    /// Images synced at once.
    #[arg(long, default_value_t = 6)]
    max_concurrent_syncs: usize,
    /// Serve gRPC only; do not replicate into this cluster.
    #[arg(long)]
    no_replayer: bool,
    /// Serve Prometheus metrics (`/metrics`) and `/healthz` over HTTP on
    /// this `host:port`; default: off.
    #[arg(long)]
    metrics_address: Option<String>,
    /// How long to let in-flight RPCs finish on SIGTERM.
    #[arg(long, default_value = "30s", value_parser = duration)]
    grace: Duration,
}

/// A flag's duration, humantime style (`500ms`, `30s`, `1h 30m`); zero is
/// refused, as no flag means "never".
fn duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?}: must be greater than zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{s:?}: {e} (e.g. 500ms, 30s, 5m, 1h 30m)")),
    }
}

fn bytes(s: &str) -> Result<usize, String> {
    parse_size(s)
}

/// Copy buffers mapped apart from glibc's arenas (see `ceph::alloc`).
#[global_allocator]
static ALLOCATOR: csi_rbd_replicator::ceph::alloc::ProcessAllocator =
    csi_rbd_replicator::ceph::alloc::ProcessAllocator;

/// Logs to stderr for every command (one-shot commands keep stdout for
/// their report; stderr is what container runtimes and the test harness
/// collect), as text or JSON (`--log-format`); `RUST_LOG` or, by default,
/// `info` for the sidecar and `warn` for one-shot commands.
fn init_logging(cli: &Cli) {
    // One-shot commands (`verify` and the others) log warnings only.
    let oneshot = matches!(
        cli.cmd,
        Cmd::Verify(_)
            | Cmd::OmapGenerate(_)
            | Cmd::Status(_)
            | Cmd::Pool(_)
            | Cmd::Failover(_)
            | Cmd::Failback(_)
            | Cmd::Drill(_)
            | Cmd::Migrate(_)
    );
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if oneshot { "warn" } else { "info" }));
    let writer = BoxMakeWriter::new(std::io::stderr);
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(writer)
            .init();
    } else {
        // Colours only on a terminal: a container runtime's log file or a
        // log collector gets plain text.
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(writer)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn main() -> std::process::ExitCode {
    csi_rbd_replicator::ceph::alloc::tune_allocator(CopyLimits::DEFAULT_CHUNK as usize);
    let cli = Cli::parse();
    init_logging(&cli);
    // Tests configure fail points through FAILPOINTS (`failpoints` feature).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    #[cfg(not(feature = "failpoints"))]
    if std::env::var_os("FAILPOINTS").is_some() {
        tracing::warn!(
            "FAILPOINTS is set but this build has no fail points (feature `failpoints`)"
        );
    }
    if let Err(e) = client_tls(&cli) {
        eprintln!("csi-rbd-replicator: {e}");
        return std::process::ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = match cli.cmd {
        Cmd::Serve(a) => rt.block_on(serve(*a)),
        Cmd::Verify(a) => return verify(a),
        Cmd::Status(a) => return status(a),
        Cmd::Pool(PoolCmd::Enable(a)) => return rt.block_on(migrate_cli::pool_mode(a, true)),
        Cmd::Pool(PoolCmd::Disable(a)) => return rt.block_on(migrate_cli::pool_mode(a, false)),
        Cmd::Pool(c) => return rt.block_on(pool(c)),
        Cmd::Migrate(c) => return rt.block_on(migrate_cli::migrate(c)),
        Cmd::Failover(a) => return rt.block_on(site(a, None)),
        Cmd::Failback(a) => return rt.block_on(site(a.site, Some(a.relocate))),
        Cmd::Drill(c) => return rt.block_on(drill(c)),
        Cmd::OmapGenerate(a) => omap_cli::omap_generate(a),
    };
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("csi-rbd-replicator: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    // Flags first: a bad TLS setup fails at once, before any cluster work.
    let tls = load_tls(&a)?;
    let cfg = engine_config(&a)?;
    tracing::info!(
        cluster_id = %cfg.local_cluster.cluster_id,
        monitors = %cfg.local_cluster.mon_host(),
        user = %cfg.local_creds.user,
        driver = %a.drivername,
        "starting"
    );
    let engine = Engine::new(cfg);
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());

    let metrics = Arc::clone(engine.metrics());
    let metrics_server = match &a.metrics_address {
        Some(addr) => Some(
            spawn_metrics(addr, &engine, &metrics, a.poll_interval, &shutdown)
                .await
                .map_err(|e| format!("--metrics-address {addr}: {e}"))?,
        ),
        None => None,
    };
    let (health, _) = tonic_health::server::health_reporter();
    spawn_liveness(&engine, health.clone(), &shutdown);
    let pv_watch = omap_cli::spawn_pv_watch(
        &a.pv_watch,
        Arc::clone(&engine),
        a.drivername.clone(),
        shutdown.clone(),
    )?;
    let replayer = (!a.no_replayer).then(|| {
        tokio::spawn(engine::replayer::supervise(
            Arc::clone(&engine),
            shutdown.clone(),
        ))
    });

    let routes = routes(&a, &engine);
    let served = async {
        let mut listeners = Listeners::bind(&a.endpoints).await?;
        if let Some(tls) = tls {
            listeners = listeners.with_tls(tls)?;
        }
        listeners
            .serve(routes, health, shutdown.clone(), a.grace)
            .await
    }
    .await
    .map_err(|e| e.to_string());
    shutdown.cancel();
    if let Some(r) = replayer {
        let _ = r.await;
    }
    if let Some(w) = pv_watch {
        let _ = w.await;
    }
    if let Some(m) = metrics_server {
        let _ = m.await;
    }
    served
}

/// The TLS configuration of `--tls-cert`/`--tls-key`/`--tls-client-ca`,
/// refused without a tcp:// endpoint to use it on.
fn load_tls(a: &ServeArgs) -> Result<Option<TlsConfig>, String> {
    let tls = TlsFiles::new(
        a.tls_cert.clone(),
        a.tls_key.clone(),
        a.tls_client_ca.clone(),
    )
    .map_err(|e| e.to_string())?;
    if tls.is_some()
        && !a
            .endpoints
            .iter()
            .any(|e| matches!(e, Endpoint::Tcp { .. }))
    {
        return Err(TlsError::NoTcpEndpoint.to_string());
    }
    tls.map(TlsConfig::load)
        .transpose()
        .map_err(|e| e.to_string())
}

/// The engine's configuration from the flags and the cluster files.
fn engine_config(a: &ServeArgs) -> Result<EngineConfig, String> {
    let (csi_config, mapping, local_cluster, local_creds) = a.cluster.load()?;
    Ok(EngineConfig {
        op_timeout: a.op_timeout,
        limits: CopyLimits {
            // One budget shared by all syncs: a lone image may use all of
            // it (at least two objects' worth).
            max_inflight_bytes: a.max_inflight_bytes.max(8 << 20),
            max_ops: a.max_inflight_ops.max(1),
            ..CopyLimits::default()
        },
        poll_interval: a.poll_interval,
        pools: a.pools.clone(),
        max_concurrent_syncs: a.max_concurrent_syncs,
        peer_stale_after: (a.poll_interval * 6).max(Duration::from_secs(60)),
        keep_snapshots: a.keep_snapshots.max(1),
        checkpoint_interval: a.checkpoint_interval,
        max_bytes_per_second: a.max_bytes_per_second as u64,
        promote_timeout: a.promote_timeout,
        rpc_timeout: a.rpc_timeout,
        max_concurrent_rpcs: a.max_concurrent_rpcs.max(1),
        rpo_factor: a.rpo_factor,
        journal_max_sets_behind: a.journal_max_sets_behind.max(1),
        journal_poll_interval: a.journal_poll_interval,
        journal_probe_interval: a.journal_probe_interval,
        journal_idle_probe_interval: a.journal_idle_probe_interval,
        ..EngineConfig::new(csi_config, mapping, local_cluster, local_creds)
    })
}

/// Checks the local cluster every 10 s until `shutdown`: Probe's answer,
/// the gRPC health of the served services and the liveness metrics.
fn spawn_liveness(
    engine: &Arc<Engine>,
    health: tonic_health::server::HealthReporter,
    shutdown: &CancellationToken,
) {
    let (engine, token) = (Arc::clone(engine), shutdown.clone());
    tokio::spawn(async move {
        loop {
            engine.check_local().await;
            let ok = engine.probe(Duration::from_secs(30)).is_ok();
            let metrics = engine.metrics();
            metrics.set_local_cluster_up(ok);
            metrics.set_leaked_write_bytes(
                csi_rbd_replicator::ceph::objects::LEAKED_WRITE_BYTES
                    .load(std::sync::atomic::Ordering::Relaxed),
            );
            let status = if ok {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for svc in [
                "identity.Identity",
                "replication.Controller",
                "csirr.admin.v1.Admin",
            ] {
                health.set_service_status(svc, status).await;
            }
            tokio::select! {
                () = token.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(10)) => {}
            }
        }
    });
}

/// The served gRPC services (identity, replication, volume group, admin),
/// with ceph-csi behind them for the rest when `--forward-endpoint` is set,
/// and the RPC metrics around all.
fn routes(a: &ServeArgs, engine: &Arc<Engine>) -> tonic::service::Routes {
    let forward = a.forward_endpoint.clone().map(ForwardService::new);
    let mut identity = IdentityService::new(
        a.drivername.clone(),
        Arc::clone(engine),
        Duration::from_secs(30),
    );
    if let Some(f) = &forward {
        tracing::info!(endpoint = %f.endpoint(), "forwarding other csi-addons services");
        identity = identity.with_upstream(f.clone());
    }
    let mut routes = tonic::service::Routes::new(IdentityServer::new(identity))
        .add_service(ControllerServer::new(ReplicationService::new(Arc::clone(
            engine,
        ))))
        .add_service(VolumeGroupServer::new(VolumeGroupService::new(Arc::clone(
            engine,
        ))))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(engine))));
    if let Some(f) = forward {
        routes = forward::with_fallback(routes, f);
    }
    csi_rbd_replicator::grpc::metrics::with_rpc_metrics(routes, Arc::clone(engine.metrics()))
}

/// Binds `addr` and serves `/metrics` and `/healthz` there until `shutdown`;
/// starts the status collector that feeds the per-image gauges.
async fn spawn_metrics(
    addr: &str,
    engine: &Arc<Engine>,
    metrics: &Arc<Metrics>,
    every: Duration,
    shutdown: &CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(address = %listener.local_addr()?, "metrics server listening");
    let opts = engine::status::StatusOptions::of(engine.config());
    let (e, m, c) = (Arc::clone(engine), Arc::clone(metrics), shutdown.clone());
    tokio::spawn(engine::background::supervise(
        Arc::clone(engine),
        "metrics collector",
        shutdown.clone(),
        move || {
            engine::status::collect_metrics(
                Arc::clone(&e),
                Arc::clone(&m),
                opts,
                every.max(Duration::from_secs(1)),
                c.clone(),
            )
        },
    ));
    let e = Arc::clone(engine);
    let health = move || e.probe(Duration::from_secs(30));
    let serving = csi_rbd_replicator::metrics::serve_http(
        listener,
        Arc::clone(metrics),
        health,
        shutdown.clone().cancelled_owned(),
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "metrics server failed");
        }
    }))
}

/// `status`: exit code 0 when every image is healthy, 1 when one is
/// degraded or in error, 2 when a pool cannot be read.
fn status(a: StatusArgs) -> std::process::ExitCode {
    use engine::status::{StatusOptions, render_text};
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("csi-rbd-replicator status: {msg}");
        std::process::ExitCode::from(2)
    };
    let (csi_config, mapping, local_cluster, local_creds) = match a.cluster.load() {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let engine = Engine::new(EngineConfig {
        op_timeout: a.op_timeout,
        ..EngineConfig::new(csi_config, mapping, local_cluster, local_creds)
    });
    let opts = StatusOptions {
        stale_after: a.stale_after,
        rpo_factor: a.rpo_factor,
    };
    let report = match engine.status_report(a.pool.as_deref(), &opts) {
        Ok(r) => r,
        Err(e) => return fail(e.to_string()),
    };
    if let Err(e) = print_report(a.json, &report, || render_text(&report, a.verbose)) {
        return fail(e);
    }
    for e in &report.errors {
        eprintln!("csi-rbd-replicator status: pool {}: {}", e.pool, e.error);
    }
    std::process::ExitCode::from(report.exit_code())
}

/// `pool status|promote|demote`: talks to the sidecar's admin API. Exit code
/// 0 every image ok, 1 some image failed (status: not healthy), 2 usage or
/// connection error.
async fn pool(cmd: PoolCmd) -> std::process::ExitCode {
    let (t, op) = match &cmd {
        PoolCmd::Status(t) => (t, "status"),
        PoolCmd::Promote(a) => (&a.target, "promote"),
        PoolCmd::Demote(a) => (&a.target, "demote"),
        PoolCmd::Enable(_) | PoolCmd::Disable(_) => unreachable!("dispatched in main"),
    };
    match pool_op(&cmd, t, op).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(msg) => {
            if t.json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("csi-rbd-replicator pool {op}: {msg}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The admin call of `pool status|promote|demote`, its output printed;
/// the exit code, or the message of an error (exit code 2).
async fn pool_op(cmd: &PoolCmd, t: &PoolTarget, op: &str) -> Result<u8, String> {
    use csi_rbd_replicator::grpc::admin_client::{self as ac, OpReport};
    use csi_rbd_replicator::grpc::proto::admin::admin_client::AdminClient;
    use csi_rbd_replicator::grpc::proto::admin::{
        PoolDemoteRequest, PoolPromoteRequest, PoolStatusRequest,
    };
    let rpc_error = |s: tonic::Status| csi_rbd_replicator::grpc::status::describe(&s);
    let mut client = AdminClient::new(ac::connect(&t.endpoint).await?);
    let stream = match cmd {
        PoolCmd::Status(t) => {
            let req = PoolStatusRequest {
                pool: t.pool.clone(),
                namespace: t.namespace.clone(),
                default_namespace_only: false,
            };
            let s = client
                .pool_status(req)
                .await
                .map_err(rpc_error)?
                .into_inner();
            print_report(t.json, &ac::status_json(&s), || ac::render_status(&s))?;
            return Ok(ac::status_exit_code(&s));
        }
        PoolCmd::Promote(a) => {
            let req = PoolPromoteRequest {
                pool: a.target.pool.clone(),
                namespace: a.target.namespace.clone(),
                default_namespace_only: false,
                force: a.force,
                parallel: a.parallel,
                wait_seconds: u32::try_from(a.wait.as_secs()).unwrap_or(u32::MAX),
            };
            client.pool_promote(req).await
        }
        PoolCmd::Demote(a) => {
            let req = PoolDemoteRequest {
                pool: a.target.pool.clone(),
                namespace: a.target.namespace.clone(),
                default_namespace_only: false,
                parallel: a.parallel,
            };
            client.pool_demote(req).await
        }
        PoolCmd::Enable(_) | PoolCmd::Disable(_) => unreachable!("dispatched in main"),
    };
    let mut stream = stream.map_err(rpc_error)?.into_inner();
    let mut report = OpReport::new(op);
    let line = TermLine::stderr();
    loop {
        match stream.message().await {
            Ok(Some(ev)) => {
                report.add(ev);
                line.show(&report.progress_line());
            }
            Ok(None) => break,
            Err(e) => {
                report.broken = Some(rpc_error(e));
                break;
            }
        }
    }
    line.clear();
    print_report(t.json, &report.to_json(), || report.render_text())?;
    if let Some(b) = &report.broken {
        eprintln!("csi-rbd-replicator pool {op}: {b}");
    }
    Ok(report.exit_code())
}

/// Sets up TLS to the sidecars from `--tls-ca` and friends, if given.
fn client_tls(cli: &Cli) -> Result<(), String> {
    use csi_rbd_replicator::grpc::admin_client::{ClientTls, use_tls};
    let Some(ca) = cli.tls_ca.clone() else {
        if cli.tls_client_cert.is_some() || cli.tls_server_name.is_some() {
            return Err("--tls-client-cert and --tls-server-name need --tls-ca".into());
        }
        return Ok(());
    };
    use_tls(&ClientTls {
        ca,
        identity: cli.tls_client_cert.clone().zip(cli.tls_client_key.clone()),
        server_name: cli.tls_server_name.clone(),
    })
}

/// `failover` (`relocate` is `None`) or `failback`: talks to both sites'
/// sidecars (see `grpc::site_client`).
async fn site(a: SiteArgs, relocate: Option<bool>) -> std::process::ExitCode {
    use csi_rbd_replicator::grpc::admin_client::connect;
    use csi_rbd_replicator::grpc::site_client::{
        self as sc, Client, EXIT_USAGE, SiteOptions, SiteReport, Sites,
    };
    let op = if relocate.is_some() {
        "failback"
    } else {
        "failover"
    };
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("csi-rbd-replicator {op}: {msg}");
        std::process::ExitCode::from(EXIT_USAGE)
    };
    let to = match connect(&a.to_endpoint).await {
        Ok(c) => Client::new(c),
        Err(e) => return fail(e),
    };
    let (from, from_error) = match connect(&a.from_endpoint).await {
        Ok(c) => (Some(Client::new(c)), None),
        Err(e) => (None, Some(e)),
    };
    let sites = Sites {
        to,
        from,
        from_error,
    };
    let opts = SiteOptions {
        to: a.to.clone(),
        pools: a.pools.clone(),
        timeout: a.timeout,
        wait: a.wait,
        parallel: a.parallel.clamp(1, engine::pool::MAX_PARALLEL),
    };
    let line = TermLine::stderr();
    let progress = |r: &SiteReport| line.show(&r.progress_line());
    let res = match relocate {
        None => sc::failover(sites, &opts, &progress).await,
        Some(relocate) => sc::failback(sites, &opts, relocate, &progress).await,
    };
    line.clear();
    let report = match res {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if let Err(e) = print_report(a.json, &report, || report.render_text()) {
        return fail(e);
    }
    std::process::ExitCode::from(report.exit_code())
}

/// `drill start|stop`: exit code 0 done, 2 error.
async fn drill(cmd: DrillCmd) -> std::process::ExitCode {
    use csi_rbd_replicator::grpc::admin_client::{self as ac, drill_json, render_drill};
    use csi_rbd_replicator::grpc::proto::admin::DrillRequest;
    use csi_rbd_replicator::grpc::proto::admin::admin_client::AdminClient;
    let (a, op) = match &cmd {
        DrillCmd::Start(a) => (a, "start"),
        DrillCmd::Stop(a) => (a, "stop"),
    };
    let fail = |msg: String| {
        if a.target.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("csi-rbd-replicator drill {op}: {msg}");
        std::process::ExitCode::from(2)
    };
    let mut client = match ac::connect(&a.target.endpoint).await {
        Ok(c) => AdminClient::new(c),
        Err(e) => return fail(e),
    };
    let req = DrillRequest {
        pool: a.target.pool.clone(),
        namespace: a.target.namespace.clone(),
        images: a.images.clone(),
    };
    let res = match &cmd {
        DrillCmd::Start(_) => client.drill_start(req).await,
        DrillCmd::Stop(_) => client.drill_stop(req).await,
    };
    let r = match res {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return fail(csi_rbd_replicator::grpc::status::describe(&s));
        }
    };
    if let Err(e) = print_report(a.target.json, &drill_json(op, &r), || render_drill(op, &r)) {
        return fail(e);
    }
    std::process::ExitCode::SUCCESS
}

/// `verify`: exit code 0 when identical, 1 when different, 2 on errors.
fn verify(a: VerifyArgs) -> std::process::ExitCode {
    use engine::verify::{ProgressPrinter, VerifyOptions, render_text};
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("csi-rbd-replicator verify: {msg}");
        std::process::ExitCode::from(2)
    };
    let vol = match VolumeId::parse(&a.volume) {
        Ok(v) => v,
        Err(e) => return fail(format!("volume {:?}: {e}", a.volume)),
    };
    let (csi_config, mapping, local_cluster, local_creds) = match a.cluster.load() {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    let engine = Engine::new(EngineConfig {
        op_timeout: a.op_timeout,
        ..EngineConfig::new(csi_config, mapping, local_cluster, local_creds)
    });
    let opts = VerifyOptions {
        snapshot: a.snapshot.clone(),
        peer: a.peer.clone(),
        max_extents: a.max_extents,
        parallel: a.parallel.max(1),
        full: a.full,
    };
    let mut printer = ProgressPrinter::stderr();
    let res = engine.verify(&vol, &opts, &mut |p| printer.update(p));
    printer.finish();
    match res {
        Ok(r) => {
            if let Err(e) = print_report(a.json, &r, || render_text(&r)) {
                return fail(e);
            }
            std::process::ExitCode::from(if r.identical { 0 } else { 1 })
        }
        Err(e) => fail(e.to_string()),
    }
}

/// A progress line on standard error, rewritten in place as work finishes;
/// nothing when standard error is not a terminal.
struct TermLine {
    tty: bool,
}

impl TermLine {
    fn stderr() -> Self {
        Self {
            tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        }
    }

    /// Replaces the line with `text`.
    fn show(&self, text: &str) {
        if self.tty {
            eprint!("\r\x1b[K{text}");
        }
    }

    /// Erases the line.
    fn clear(&self) {
        if self.tty {
            eprint!("\r\x1b[K");
        }
    }
}

/// Prints `value` as pretty JSON (`--json`) or else `text()`, on standard
/// output; an error message when the JSON cannot be made.
pub(crate) fn print_report(
    json: bool,
    value: &impl serde::Serialize,
    text: impl FnOnce() -> String,
) -> Result<(), String> {
    if json {
        let j = serde_json::to_string_pretty(value)
            .map_err(|e| format!("cannot encode the report: {e}"))?;
        println!("{j}");
    } else {
        print!("{}", text());
    }
    Ok(())
}

fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        token.cancel();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_durations_take_humantime_units_and_refuse_zero() {
        assert_eq!(duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(duration("0s").unwrap_err().contains("greater than zero"));
        assert!(duration("soon").unwrap_err().contains("e.g. 500ms"));
    }

    #[test]
    fn grace_accepts_milliseconds() {
        let cli = Cli::try_parse_from([
            "csi-rbd-replicator",
            "serve",
            "--endpoint",
            "unix:///tmp/x.sock",
            "--drivername",
            "rbd.csi.ceph.com",
            "--secret-dir",
            "/tmp",
            "--cluster-id",
            "x",
            "--grace",
            "500ms",
        ]);
        assert!(cli.is_ok(), "{:?}", cli.err());
    }
}
