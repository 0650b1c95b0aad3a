//! Command-line glue of the omap generator: the `omap-generate` subcommand
//! and the `--watch-pvs` flags of `serve`. It lives in the binary (clap, and
//! the engine's credentials and connection); the logic it calls lives in the
//! library's `omap` module, which never imports the engine.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use csi_rbd_replicator::ceph::Cluster;
use csi_rbd_replicator::csi::config::{
    CLUSTER_MAPPING_PATH, CONFIG_PATH, ClusterMapping, CsiConfig,
};
use csi_rbd_replicator::csi::params::parse_interval;
use csi_rbd_replicator::engine::{Credentials, Engine};
use csi_rbd_replicator::omap::generate::{self, Options, PvOutcome};
use csi_rbd_replicator::omap::journal::{DEFAULT_INSTANCE, Outcome};
use csi_rbd_replicator::omap::manifest::{self, ManifestObject};
use csi_rbd_replicator::omap::plan::PlanContext;

fn duration(s: &str) -> Result<Duration, String> {
    parse_interval(s).map_err(|e| e.to_string())
}

/// `csi-rbd-replicator omap-generate`: create or repair ceph-csi's omap
/// journal entries on this cluster from PersistentVolume manifests, so that
/// ceph-csi finds restored PVs' replicated images.
#[derive(clap::Args, Debug)]
pub struct OmapGenerateArgs {
    /// PersistentVolume manifests: YAML or JSON, single objects or lists, as
    /// `kubectl get pv -o yaml` writes them; `-` reads standard input.
    #[arg(long = "pv", value_name = "FILE", required = true, num_args = 1..)]
    pub pv: Vec<PathBuf>,
    /// CSI driver whose PVs to handle (e.g. rook-ceph.rbd.csi.ceph.com);
    /// PVs of other drivers are skipped.
    #[arg(long)]
    pub drivername: String,
    /// ceph-csi's config.json (cluster IDs and monitors).
    #[arg(long, default_value = CONFIG_PATH)]
    pub csi_config: PathBuf,
    /// ceph-csi's cluster-mapping.json; ignored when absent.
    #[arg(long, default_value = CLUSTER_MAPPING_PATH)]
    pub cluster_mapping: PathBuf,
    /// The local cluster: an entry of config.json (optional with one entry).
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Directory with files `userID` and `userKey` (a mounted Kubernetes
    /// Secret) of a user that may read and write the pools' omaps.
    #[arg(long)]
    pub secret_dir: PathBuf,
    /// ceph-csi's `--instanceid`: the directory object is
    /// `csi.volumes.<instance>`.
    #[arg(long = "instance-id", default_value = DEFAULT_INSTANCE)]
    pub instance: String,
    /// Only print what would be written.
    #[arg(long)]
    pub dry_run: bool,
    /// Bound on each cluster operation, and on connecting.
    #[arg(long, default_value = "30s", value_parser = duration)]
    pub op_timeout: Duration,
}

/// Runs `omap-generate`: prints one line per object and a summary; fails
/// when any object (or file) failed. Blocking.
pub fn omap_generate(a: OmapGenerateArgs) -> Result<(), String> {
    let csi_config = CsiConfig::load(&a.csi_config).map_err(|e| e.to_string())?;
    let mapping = ClusterMapping::load(&a.cluster_mapping).map_err(|e| e.to_string())?;
    let local = match &a.cluster_id {
        Some(id) => csi_config.cluster(id),
        None => csi_config.default_cluster(),
    }
    .map_err(|e| e.to_string())?
    .clone();
    let creds = Credentials::from_dir(&a.secret_dir).map_err(|e| e.to_string())?;

    let (objects, file_failures) = read_manifests(&a.pv);
    let cluster = Cluster::connect(&creds.connect_config(&local.mon_host(), a.op_timeout))
        .map_err(|e| {
            format!(
                "connecting to cluster {:?} ({}) as client.{}: {e}",
                local.cluster_id,
                local.mon_host(),
                creds.user
            )
        })?;
    tracing::info!(
        mon_host = %local.mon_host(),
        user = %creds.user,
        instance_id = cluster.instance_id(),
        "connected to cluster"
    );
    let ctx = PlanContext {
        driver: &a.drivername,
        csi_config: &csi_config,
        mapping: &mapping,
        local: &local,
    };
    let opts = Options {
        instance: a.instance.clone(),
        dry_run: a.dry_run,
    };
    let mut counts = [0usize; 5]; // created, repaired, unchanged, skipped, failed
    for obj in &objects {
        let report = generate::generate_one(&cluster, &ctx, &opts, obj);
        println!("{report}");
        let i = match &report.outcome {
            PvOutcome::Done { outcome, .. } | PvOutcome::WouldDo { outcome, .. } => match outcome {
                Outcome::Created => 0,
                Outcome::Repaired(_) => 1,
                Outcome::Unchanged => 2,
            },
            PvOutcome::Ignored(_) => 3,
            PvOutcome::Failed(_) => 4,
        };
        counts[i] += 1;
    }
    let [created, repaired, unchanged, skipped, failed] = counts;
    println!(
        "{}{created} created, {repaired} repaired, {unchanged} unchanged, {skipped} skipped, \
         {failed} failed",
        if a.dry_run { "dry run: " } else { "" }
    );
    match (failed, file_failures) {
        (0, 0) => Ok(()),
        (f, 0) => Err(format!("{f} of {} objects failed", objects.len())),
        (f, ff) => Err(format!(
            "{f} of {} objects and {ff} of {} files failed",
            objects.len(),
            a.pv.len()
        )),
    }
}

/// The objects of the manifest files `paths` (`-`: standard input), and
/// how many files could not be read or parsed (each reported).
fn read_manifests(paths: &[std::path::PathBuf]) -> (Vec<ManifestObject>, usize) {
    let mut objects: Vec<ManifestObject> = Vec::new();
    let mut failures = 0usize;
    for path in paths {
        let read = if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| e.to_string())
                .and_then(|_| manifest::parse(&text, "<stdin>").map_err(|e| e.to_string()))
        } else {
            manifest::read_file(path).map_err(|e| e.to_string())
        };
        match read {
            Ok(mut o) => objects.append(&mut o),
            Err(e) => {
                println!("{e}: FAILED, nothing changed");
                failures += 1;
            }
        }
    }
    (objects, failures)
}

/// The `--watch-pvs` flags of `serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct WatchArgs {
    /// Watch PersistentVolumes and create or repair the omap journal entries
    /// of this driver's PVs on this cluster as they appear (what
    /// `omap-generate` does), in one leader-elected replica.
    #[arg(long)]
    pub watch_pvs: bool,
    /// Namespace of the leader-election Lease (default: the pod's, from
    /// POD_NAMESPACE or the service account).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "csi-rbd-replicator-pv-watch")]
    pub lease_name: String,
    /// ceph-csi's `--instanceid` for the PV watch.
    #[arg(long = "omap-instance-id", default_value = DEFAULT_INSTANCE)]
    pub instance: String,
    /// How often every known PV is checked again (images that had not
    /// arrived yet, entries changed behind our back).
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub pv_resync: Duration,
}

/// Starts the PV watch of `serve` if `--watch-pvs` is set; it runs until
/// `shutdown`. Fails when the flag is set but the binary was built without
/// the `kube` feature.
pub fn spawn_pv_watch(
    args: &WatchArgs,
    engine: Arc<Engine>,
    driver: String,
    shutdown: CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<()>>, String> {
    if !args.watch_pvs {
        return Ok(None);
    }
    #[cfg(feature = "kube")]
    {
        let cfg = engine.config();
        let watch = csi_rbd_replicator::omap::watch::WatchConfig {
            driver,
            csi_config: cfg.csi_config.clone(),
            mapping: cfg.mapping.clone(),
            local: cfg.local_cluster.clone(),
            instance: args.instance.clone(),
            lease_namespace: args.lease_namespace.clone(),
            lease_name: args.lease_name.clone(),
            resync: args.pv_resync,
        };
        let connect: csi_rbd_replicator::omap::watch::Connect =
            Arc::new(move || engine.local().map_err(|e| e.to_string()));
        Ok(Some(tokio::spawn(csi_rbd_replicator::omap::watch::run(
            watch, connect, shutdown,
        ))))
    }
    #[cfg(not(feature = "kube"))]
    {
        let _ = (engine, driver, shutdown);
        Err("--watch-pvs needs a build with the `kube` cargo feature".into())
    }
}
