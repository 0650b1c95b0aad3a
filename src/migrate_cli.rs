//! The command line of pool mode (`pool enable|disable`) and of pool
//! migration (`migrate start|status|switch|cleanup`); the orchestration is
//! in `grpc::migrate_client`, pool mode in `engine::pool_mode`.

use std::time::Duration;

use clap::Subcommand;

use csi_rbd_replicator::grpc::admin_client::connect;
use csi_rbd_replicator::grpc::migrate_client::{self as mc, Client, EXIT_USAGE, Plan};
use csi_rbd_replicator::grpc::proto::admin::PoolModeRequest;
use csi_rbd_replicator::grpc::server::Endpoint;

use crate::migrate_setup::{self, ClusterAdmin};
use crate::print_report;

/// `pool enable|disable`.
#[derive(clap::Args)]
pub struct PoolModeArgs {
    /// The pool.
    pub pool: String,
    /// The RBD namespace (default: the pool's default namespace).
    #[arg(long, default_value = "")]
    pub namespace: String,
    /// enable: schedulingInterval of the images enrolled (`^\d+[smhd]$`).
    #[arg(long, default_value = "5m")]
    pub schedule: String,
    /// enable: schedulingStartTime (ISO 8601), optional.
    #[arg(long, default_value = "")]
    pub start_time: String,
    /// enable: `snapshot` or `journal` (every write replayed; the images get
    /// exclusive-lock and journaling, and no schedule applies).
    #[arg(long, default_value = "snapshot", value_parser = ["snapshot", "journal"])]
    pub mode: String,
    /// The sidecar's endpoint (of the primary's site).
    #[arg(long, default_value = "unix:///csi/csi-addons.sock")]
    pub endpoint: Endpoint,
    /// Print the result (or the error) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `pool enable` (`enable`) or `pool disable`: exit code 0 done, 2 error.
pub async fn pool_mode(a: PoolModeArgs, enable: bool) -> std::process::ExitCode {
    let op = if enable { "enable" } else { "disable" };
    let fail = |msg: String| {
        if a.json {
            println!("{}", serde_json::json!({ "error": msg }));
        }
        eprintln!("csi-rbd-replicator pool {op}: {msg}");
        std::process::ExitCode::from(EXIT_USAGE)
    };
    let mut c = match connect(&a.endpoint).await {
        Ok(c) => Client::new(c),
        Err(e) => return fail(e),
    };
    // Journal mode takes no schedule.
    let schedule = |s: &String| {
        if a.mode == "journal" {
            String::new()
        } else {
            s.clone()
        }
    };
    let req = PoolModeRequest {
        pool: a.pool.clone(),
        namespace: a.namespace.clone(),
        scheduling_interval: schedule(&a.schedule),
        scheduling_start_time: schedule(&a.start_time),
        label: "pool enable".into(),
        flatten_clones: false,
        mirroring_mode: a.mode.clone(),
    };
    let r = if enable {
        c.pool_mode_enable(req).await
    } else {
        c.pool_mode_disable(req).await
    };
    let r = match r {
        Ok(r) => r.into_inner(),
        Err(s) => {
            return fail(csi_rbd_replicator::grpc::status::describe(&s));
        }
    };
    let target = if r.namespace.is_empty() {
        r.pool.clone()
    } else {
        format!("{}/{}", r.pool, r.namespace)
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "pool": r.pool, "namespace": r.namespace, "enabled": r.enabled,
                "scheduling_interval": r.scheduling_interval,
                "scheduling_start_time": r.scheduling_start_time,
                "mirroring_mode": r.mirroring_mode,
                "images_enrolled": r.images_enrolled,
            })
        );
    } else if enable && r.mirroring_mode == "journal" {
        println!(
            "{target}: pool mode on (journal mode), {} images enrolled now; images created later are replicated too",
            r.images_enrolled
        );
    } else if enable {
        println!(
            "{target}: pool mode on (every {}), {} images enrolled now; images created later are replicated too",
            r.scheduling_interval, r.images_enrolled
        );
    } else {
        println!("{target}: pool mode off; images already replicated stay replicated");
    }
    std::process::ExitCode::SUCCESS
}

/// What every `migrate` command names.
#[derive(clap::Args)]
pub struct MigrateTarget {
    /// The cluster ID of the source site (its sidecar is --from-endpoint).
    #[arg(long)]
    pub from: String,
    /// The admin endpoint of the source site's sidecar.
    #[arg(long)]
    pub from_endpoint: Endpoint,
    /// The admin endpoint of the target site's sidecar.
    #[arg(long)]
    pub to_endpoint: Endpoint,
    /// A pool to migrate, `POOL` or `POOL/NAMESPACE`; repeatable.
    #[arg(long = "pool", required = true)]
    pub pools: Vec<String>,
    /// Print the report (or the error) as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// `migrate start`.
#[derive(clap::Args)]
pub struct MigrateStartArgs {
    #[command(flatten)]
    pub target: MigrateTarget,
    /// schedulingInterval of the sync points while the migration runs.
    #[arg(long, default_value = "1m")]
    pub schedule: String,
    /// Migrate every clone as a flat copy (parent data included, no parent
    /// link on the target). Without it a clone stays a clone on the target
    /// when its parent's pool is migrated too, and a clone whose parent is
    /// not migrated is refused.
    #[arg(long)]
    pub flatten: bool,
    /// Create the target pools (and namespaces) that are missing, put both
    /// sides in image mirror mode and peer the pools, with admin access to
    /// both clusters (--from-conf, --to-conf): the sidecars cannot.
    #[arg(long)]
    pub create_pools: bool,
    #[command(flatten)]
    pub admin: ClusterAdmin,
}

/// `migrate switch`.
#[derive(clap::Args)]
pub struct MigrateSwitchArgs {
    #[command(flatten)]
    pub target: MigrateTarget,
    /// Images demoted and promoted at once per pool.
    #[arg(long, default_value_t = 8)]
    pub parallel: u32,
    /// How long the promotion waits for the final deltas.
    #[arg(long, default_value = "10m", value_parser = crate::duration)]
    pub wait: Duration,
    /// Compare SHA-256 checksums of every image at its final sync point on
    /// both sites (after the switch; not part of the downtime).
    #[arg(long)]
    pub verify: bool,
}

/// `migrate cleanup`.
#[derive(clap::Args)]
pub struct MigrateCleanupArgs {
    #[command(flatten)]
    pub target: MigrateTarget,
    /// Move the source images to the RBD trash (restorable for 7 days).
    #[arg(long)]
    pub remove_source: bool,
    /// Remove the mirror peers between the two clusters from the pools, on
    /// both sides, with admin access (--from-conf, --to-conf).
    #[arg(long)]
    pub remove_peers: bool,
    #[command(flatten)]
    pub admin: ClusterAdmin,
}

/// `migrate ...`.
#[derive(Subcommand)]
pub enum MigrateCmd {
    /// Pool mode on the source for every pool: the target replicates every
    /// image, new ones included. Exit code 0 started, 2 refused or error.
    Start(MigrateStartArgs),
    /// Progress per pool and image, ready-to-switch. Exit code 0 ready, 1
    /// not yet, 2 error.
    Status(MigrateTarget),
    /// Demote the source, promote the target after the final delta, print
    /// the downtime. Refused while clients have source images open. Exit
    /// code 0 switched, 1 refused or failed, 2 error.
    Switch(MigrateSwitchArgs),
    /// End replication after the switch: source images detached (or moved
    /// to the trash), the target's replication state and sync snapshots
    /// removed. Exit code 0 done, 1 refused or failed, 2 error.
    Cleanup(MigrateCleanupArgs),
}

/// `migrate ...`.
pub async fn migrate(cmd: MigrateCmd) -> std::process::ExitCode {
    let (t, op) = match &cmd {
        MigrateCmd::Start(a) => (&a.target, "start"),
        MigrateCmd::Status(a) => (a, "status"),
        MigrateCmd::Switch(a) => (&a.target, "switch"),
        MigrateCmd::Cleanup(a) => (&a.target, "cleanup"),
    };
    match run(&cmd, t).await {
        Ok(code) => std::process::ExitCode::from(code),
        Err(msg) => {
            if t.json {
                println!("{}", serde_json::json!({ "error": msg }));
            }
            eprintln!("csi-rbd-replicator migrate {op}: {msg}");
            std::process::ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Runs `cmd` (its common flags `t`): the plan, `--create-pools`, both
/// sidecars connected, then the step; returns its exit code.
async fn run(cmd: &MigrateCmd, t: &MigrateTarget) -> Result<u8, String> {
    let json = t.json;
    let plan = Plan {
        from: t.from.clone(),
        pools: t
            .pools
            .iter()
            .map(|p| mc::parse_pool(p))
            .collect::<Result<_, _>>()?,
    };
    if let MigrateCmd::Start(a) = cmd
        && a.create_pools
    {
        let lines = blocking(
            a.admin.clone(),
            plan.pools.clone(),
            migrate_setup::create_pools,
        )
        .await
        .map_err(|e| format!("--create-pools: {e}"))?;
        lines.iter().for_each(|l| eprintln!("create-pools: {l}"));
    }
    let source = Client::new(connect(&t.from_endpoint).await?);
    let target = Client::new(connect(&t.to_endpoint).await?);
    match cmd {
        MigrateCmd::Start(a) => {
            let r = mc::start(source, target, &plan, &a.schedule, a.flatten).await?;
            print_report(json, &r, || r.render_text()).map(|()| 0)
        }
        MigrateCmd::Status(_) => {
            let r = mc::status(source, target, &plan).await?;
            print_report(json, &r, || r.render_text()).map(|()| r.exit_code())
        }
        MigrateCmd::Switch(a) => {
            let r = mc::switch(source, target, &plan, a.parallel, a.wait, a.verify).await?;
            print_report(json, &r, || r.render_text()).map(|()| r.exit_code())
        }
        MigrateCmd::Cleanup(a) => {
            let r = mc::cleanup(source, target, &plan, a.remove_source).await?;
            if a.remove_peers && r.exit_code() == 0 {
                let lines = blocking(
                    a.admin.clone(),
                    plan.pools.clone(),
                    migrate_setup::remove_peers,
                )
                .await
                .map_err(|e| format!("--remove-peers: {e}"))?;
                lines.iter().for_each(|l| eprintln!("remove-peers: {l}"));
            }
            print_report(json, &r, || r.render_text()).map(|()| r.exit_code())
        }
    }
}

/// A setup step with admin access to both clusters over the plan's pools;
/// its lines of what it did.
type SetupStep = fn(&ClusterAdmin, &[(String, String)]) -> Result<Vec<String>, String>;

/// `f(admin, pools)` off the async runtime.
async fn blocking(
    admin: ClusterAdmin,
    pools: Vec<(String, String)>,
    f: SetupStep,
) -> Result<Vec<String>, String> {
    tokio::task::spawn_blocking(move || f(&admin, &pools))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r)
}
