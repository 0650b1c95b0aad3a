//! The csi-rbd-replicator command line: `serve` runs the sidecar (gRPC
//! services and the replayer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use csi_rbd_replicator::csi::config::{ClusterMapping, CsiConfig};
use csi_rbd_replicator::csi::params::parse_interval;
use csi_rbd_replicator::engine::{self, CopyLimits, Credentials, Engine, EngineConfig};
use csi_rbd_replicator::grpc::identity::IdentityService;
use csi_rbd_replicator::grpc::proto::identity::identity_server::IdentityServer;
use csi_rbd_replicator::grpc::proto::replication::controller_server::ControllerServer;
use csi_rbd_replicator::grpc::replication::ReplicationService;
use csi_rbd_replicator::grpc::server::{self, Endpoint};

#[derive(Parser)]
#[command(
    version,
    about = "CSI-Addons sidecar that replicates Ceph RBD volumes between two clusters"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the csi-addons Identity and replication services and replicate.
    Serve(ServeArgs),
}

#[derive(Parser)]
struct ServeArgs {
    /// Where to listen: `unix:///path.sock` or `tcp://host:port`; repeatable.
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<Endpoint>,
    /// CSI driver name to report; must equal the driver the
    /// VolumeReplicationClass names (e.g. rook-ceph.rbd.csi.ceph.com).
    #[arg(long)]
    drivername: String,
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
    /// Bytes of copy buffers in flight per image (e.g. 64M).
    #[arg(long, default_value = "64M", value_parser = bytes)]
    max_inflight_bytes: usize,
    /// Aio operations in flight per image.
    #[arg(long, default_value_t = 32)]
    max_inflight_ops: usize,
    /// Images synced at once.
    #[arg(long, default_value_t = 4)]
    max_concurrent_syncs: usize,
    /// Serve gRPC only; do not replicate into this cluster.
    #[arg(long)]
    no_replayer: bool,
    /// How long to let in-flight RPCs finish on SIGTERM.
    #[arg(long, default_value = "30s", value_parser = duration)]
    grace: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

fn bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches(['I', 'B']) {
                "K" => 1usize << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "" => 1,
                u => return Err(format!("unknown size unit {u:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: usize = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
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
        Cmd::Serve(a) => rt.block_on(serve(a)),
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
    let csi_config = CsiConfig::load(&a.csi_config).map_err(|e| e.to_string())?;
    let mapping = if a.cluster_mapping.exists() {
        ClusterMapping::load(&a.cluster_mapping).map_err(|e| e.to_string())?
    } else {
        ClusterMapping::default()
    };
    let local_cluster = match &a.cluster_id {
        Some(id) => csi_config.cluster(id),
        None => csi_config.default_cluster(),
    }
    .map_err(|e| e.to_string())?
    .clone();
    let local_creds = Credentials::from_dir(&a.secret_dir).map_err(|e| e.to_string())?;
    let cfg = EngineConfig {
        csi_config,
        mapping,
        local_cluster,
        local_creds,
        op_timeout: a.op_timeout,
        limits: CopyLimits {
            max_inflight_bytes: a.max_inflight_bytes,
            max_ops: a.max_inflight_ops.max(1),
            ..CopyLimits::default()
        },
        poll_interval: a.poll_interval,
        pools: a.pools.clone(),
        max_concurrent_syncs: a.max_concurrent_syncs,
        peer_stale_after: (a.poll_interval * 6).max(Duration::from_secs(60)),
    };
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

    let (health, _) = tonic_health::server::health_reporter();
    // Local cluster liveness for Probe and gRPC health.
    {
        let (engine, health, token) = (Arc::clone(&engine), health.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                engine.check_local().await;
                let ok = engine.probe(Duration::from_secs(30)).is_ok();
                for svc in ["identity.Identity", "replication.Controller"] {
                    if ok {
                        health
                            .set_service_status(svc, tonic_health::ServingStatus::Serving)
                            .await;
                    } else {
                        health
                            .set_service_status(svc, tonic_health::ServingStatus::NotServing)
                            .await;
                    }
                }
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        });
    }
    let replayer = (!a.no_replayer)
        .then(|| tokio::spawn(engine::replayer::run(Arc::clone(&engine), shutdown.clone())));

    let routes = tonic::service::Routes::new(IdentityServer::new(IdentityService::new(
        a.drivername.clone(),
        Arc::clone(&engine),
        Duration::from_secs(30),
    )))
    .add_service(ControllerServer::new(ReplicationService::new(Arc::clone(
        &engine,
    ))));
    let served = server::serve(a.endpoints, routes, health, shutdown.clone(), a.grace)
        .await
        .map_err(|e| e.to_string());
    shutdown.cancel();
    if let Some(r) = replayer {
        let _ = r.await;
    }
    served
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
    fn sizes() {
        assert_eq!(bytes("64M").unwrap(), 64 << 20);
        assert_eq!(bytes("64MiB").unwrap(), 64 << 20);
        assert_eq!(bytes("1G").unwrap(), 1 << 30);
        assert_eq!(bytes("4096").unwrap(), 4096);
        assert!(bytes("12Q").is_err());
        assert!(bytes("M").is_err());
    }
}
