//! Pool migration to another Ceph cluster (issue 17), driven by the command
//! line through the admin APIs of both sites' sidecars, like site failover
//! (`super::site_client`): each sidecar acts on its own cluster only.
//!
//! - **start**: pool mode on the source for every pool (one-way: the
//!   target's replayer pulls every image, new ones included). A clone
//!   whose parent is in a migrated pool stays a clone on the target (of the
//!   parent's replica, which the pools holding parents are enabled first
//!   for); start refuses a clone whose parent is not migrated, unless
//!   `--flatten` makes every clone's replica a flat copy (parent data
//!   included, no parent link).
//! - **status**: per pool and image, from the source's registry (what the
//!   target's replayer reports there): state, bytes copied and pending, rate
//!   and ETA of a running sync, seconds behind, ready-to-switch.
//! - **switch**: refuses while an image is not ready or any client has an
//!   image open on the source (named); then pool mode off on the source,
//!   pool demote there (each image's final sync snapshot), planned pool
//!   promote on the target (waits for the final delta), optionally the
//!   checksums of every image at its final sync snapshot on both sites; the
//!   downtime window measured is from the first demotion to the last
//!   promotion.
//! - **cleanup**: after the switch, ends replication: on the source each
//!   image is detached (DisableVolumeReplication with force: a normal image
//!   at its last complete sync point, no sync snapshots, no record) and,
//!   with `--remove-source`, moved to the RBD trash; on the target each
//!   image's replication is disabled (sync snapshots and record removed).
//!
//! Must not: act on Ceph itself; everything goes through the sidecars.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;
use tonic::transport::Channel;

use super::admin_client::OpReport;
use super::proto::admin::{self as pb, admin_client::AdminClient};
use csirr_engine::pool_mode::RESERVED_PREFIX;
use csirr_engine::status::fmt_bytes;

/// An admin API client.
pub type Client = AdminClient<Channel>;

/// Exit code: done (status: every image ready to switch).
pub const EXIT_OK: u8 = 0;
/// Exit code: refused or some image failed (status: not ready yet).
pub const EXIT_NOT_DONE: u8 = 1;
/// Exit code: usage or connection error.
pub const EXIT_USAGE: u8 = 2;

/// What a migration acts on.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Cluster ID of the source site (its sidecar is `source`).
    pub from: String,
    /// `(pool, namespace)` pairs; namespace empty: the default one.
    pub pools: Vec<(String, String)>,
}

/// `POOL` or `POOL/NAMESPACE`.
pub fn parse_pool(s: &str) -> Result<(String, String), String> {
    let (p, ns) = s.split_once('/').unwrap_or((s, ""));
    csirr_engine::pool::validate_target(p, ns).map_err(|e| e.to_string())?;
    Ok((p.to_string(), ns.to_string()))
}

fn spec(pool: &str, ns: &str, image: &str) -> String {
    if ns.is_empty() {
        format!("{pool}/{image}")
    } else {
        format!("{pool}/{ns}/{image}")
    }
}

fn pool_spec(pool: &str, ns: &str) -> String {
    if ns.is_empty() {
        pool.to_string()
    } else {
        format!("{pool}/{ns}")
    }
}

fn rpc_error(what: &str, s: &tonic::Status) -> String {
    format!("{what}: {}", super::status::describe(s))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Both sidecars, checked: the source serves `plan.from`, the target
/// another cluster. Returns the target's cluster ID.
async fn check_sites(
    source: &mut Client,
    target: &mut Client,
    plan: &Plan,
) -> Result<String, String> {
    let s = source
        .site_info(pb::SiteInfoRequest {})
        .await
        .map_err(|e| rpc_error("source SiteInfo", &e))?
        .into_inner();
    if s.cluster_id != plan.from {
        return Err(format!(
            "the source endpoint serves cluster {:?}, not {:?}",
            s.cluster_id, plan.from
        ));
    }
    let t = target
        .site_info(pb::SiteInfoRequest {})
        .await
        .map_err(|e| rpc_error("target SiteInfo", &e))?
        .into_inner();
    if t.cluster_id == plan.from {
        return Err(format!(
            "source and target endpoints both serve cluster {:?}",
            plan.from
        ));
    }
    Ok(t.cluster_id)
}

async fn details(
    c: &mut Client,
    pool: &str,
    ns: &str,
    site: &str,
) -> Result<Vec<pb::ImageDetail>, String> {
    c.image_details(pb::SiteImagesRequest {
        pool: pool.to_string(),
        namespace: ns.to_string(),
        default_namespace_only: true,
    })
    .await
    .map(|r| {
        r.into_inner()
            .images
            .into_iter()
            .filter(|i| i.namespace == ns)
            .collect()
    })
    .map_err(|e| rpc_error(&format!("{site} {}", pool_spec(pool, ns)), &e))
}

/// `migrate start`'s report.
#[derive(Debug, Serialize)]
pub struct StartReport {
    /// Source cluster ID.
    pub from: String,
    /// Target cluster ID.
    pub to: String,
    /// Per pool.
    pub pools: Vec<StartPool>,
}

/// One pool of `migrate start`.
#[derive(Debug, Serialize)]
pub struct StartPool {
    /// `pool[/namespace]`.
    pub pool: String,
    /// Images on the source.
    pub images: usize,
    /// Images enabled by this call (the others were already).
    pub enrolled: u32,
    /// Clones, replicated as flat copies (`--flatten`).
    pub flattened_clones: Vec<String>,
    /// Clones that stay clones on the target (`image -> parent`).
    pub linked_clones: Vec<String>,
    /// The schedule of sync points.
    pub scheduling_interval: String,
}

/// One source pool checked for `migrate start`: its images, and its clones
/// with what becomes of them.
struct CheckedPool {
    pool: String,
    ns: String,
    /// How many images the pool holds.
    images: usize,
    /// Clones copied flat (`--flatten`).
    flat: Vec<String>,
    /// Clones that stay clones, `clone -> parent`.
    linked: Vec<String>,
    /// The pools (and namespaces) of the clones' parents.
    parents: Vec<(String, String)>,
}

/// Checks one pool of the plan before anything changes: the target has it,
/// and every clone's parent is migrated too (or `flatten`).
async fn check_pool(
    source: &mut Client,
    target: &mut Client,
    plan: &Plan,
    to: &str,
    pool: &str,
    ns: &str,
    flatten: bool,
) -> Result<CheckedPool, String> {
    let images = details(source, pool, ns, "source").await?;
    if let Err(e) = target
        .site_images(pb::SiteImagesRequest {
            pool: pool.to_string(),
            namespace: ns.to_string(),
            default_namespace_only: true,
        })
        .await
    {
        return Err(format!(
            "{}; create the pool (and namespace) on {to} and bootstrap its mirror peer with \
             {} (rbd mirror pool peer bootstrap create/import) first, or pass --create-pools",
            rpc_error(&format!("target {}", pool_spec(pool, ns)), &e),
            plan.from
        ));
    }
    let clones: Vec<&pb::ImageDetail> = images.iter().filter(|i| i.clone).collect();
    let orphans: Vec<String> = clones
        .iter()
        .filter(|i| {
            !plan
                .pools
                .iter()
                .any(|(p, n)| *p == i.parent_pool && *n == i.parent_namespace)
        })
        .map(|i| format!("{} (parent {})", spec(pool, ns, &i.name), i.parent))
        .collect();
    if !orphans.is_empty() && !flatten {
        return Err(format!(
            "{} clone(s) whose parent is not migrated: {}; add the parents' pools to the \
             migration (the clones then stay clones on the target), or pass --flatten \
             (every clone's replica a flat copy: parent data included, no parent link)",
            orphans.len(),
            orphans.join(", ")
        ));
    }
    let (flat, linked) = if flatten {
        (
            clones.iter().map(|i| spec(pool, ns, &i.name)).collect(),
            Vec::new(),
        )
    } else {
        (
            Vec::new(),
            clones
                .iter()
                .map(|i| format!("{} -> {}", spec(pool, ns, &i.name), i.parent))
                .collect(),
        )
    };
    let parents: Vec<(String, String)> = clones
        .iter()
        .map(|i| (i.parent_pool.clone(), i.parent_namespace.clone()))
        .collect();
    Ok(CheckedPool {
        pool: pool.to_string(),
        ns: ns.to_string(),
        images: images.len(),
        flat,
        linked,
        parents,
    })
}

/// `migrate start`: pool mode on the source for every pool, those holding
/// parents of clones first. Refuses before changing anything when a target
/// pool does not exist or (without `flatten`) a clone's parent is not in
/// a migrated pool.
pub async fn start(
    mut source: Client,
    mut target: Client,
    plan: &Plan,
    interval: &str,
    flatten: bool,
) -> Result<StartReport, String> {
    let to = check_sites(&mut source, &mut target, plan).await?;
    let mut checked = Vec::new();
    for (pool, ns) in &plan.pools {
        checked.push(check_pool(&mut source, &mut target, plan, &to, pool, ns, flatten).await?);
    }
    // Parents before their clones: a clone's replica is created from the
    // parent's, and a clone enrolled before its parent would be copied flat.
    let holds_parents: std::collections::HashSet<(String, String)> = checked
        .iter()
        .flat_map(|c| c.parents.iter().cloned())
        .collect();
    checked.sort_by_key(|c| !holds_parents.contains(&(c.pool.clone(), c.ns.clone())));
    let mut pools = Vec::new();
    for CheckedPool {
        pool,
        ns,
        images: n,
        flat: clones,
        linked,
        parents: _,
    } in checked
    {
        let r = source
            .pool_mode_enable(pb::PoolModeRequest {
                pool: pool.clone(),
                namespace: ns.clone(),
                scheduling_interval: interval.to_string(),
                scheduling_start_time: String::new(),
                label: format!("migration to {to}"),
                flatten_clones: flatten,
                mirroring_mode: String::new(),
            })
            .await
            .map_err(|e| rpc_error(&format!("pool mode on {}", pool_spec(&pool, &ns)), &e))?
            .into_inner();
        pools.push(StartPool {
            pool: pool_spec(&pool, &ns),
            images: n,
            enrolled: r.images_enrolled,
            flattened_clones: clones,
            linked_clones: linked,
            scheduling_interval: r.scheduling_interval,
        });
    }
    Ok(StartReport {
        from: plan.from.clone(),
        to,
        pools,
    })
}

impl StartReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let mut out = format!("migration {} -> {} started:\n", self.from, self.to);
        for p in &self.pools {
            let _ = writeln!(
                out,
                "  {}: pool mode on (every {}), {} images, {} enrolled now{}",
                p.pool,
                if p.scheduling_interval.is_empty() {
                    "5m"
                } else {
                    &p.scheduling_interval
                },
                p.images,
                p.enrolled,
                if p.flattened_clones.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; clones replicated as flat copies: {}",
                        p.flattened_clones.join(", ")
                    )
                } + &if p.linked_clones.is_empty() {
                    String::new()
                } else {
                    format!("; clones kept as clones: {}", p.linked_clones.join(", "))
                }
            );
        }
        out.push_str(
            "follow it with `migrate status`; images created from now on are replicated too\n",
        );
        out
    }
}

/// One image in `migrate status`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageState {
    /// `pool[/ns]/image`.
    pub image: String,
    /// Role on the source (`none`: not replicated yet).
    pub role: String,
    /// starting, syncing, idle, stopped, error (the replica's report).
    pub state: String,
    /// A clone.
    pub clone: bool,
    /// A clone's parent snapshot on the source (`pool[/ns]/image@snap`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub parent: String,
    /// Size.
    pub size: u64,
    /// Bytes of the running sync copied so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Bytes of the running sync still to copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_pending: Option<u64>,
    /// Copy rate of the running sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_per_sec: Option<u64>,
    /// Seconds until the running sync is complete.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// Age of the newest complete sync point on the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds_behind: Option<u64>,
    /// The newest complete sync point.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_sync: Option<String>,
    /// Clients that have it open on the source.
    pub clients: Vec<String>,
    /// A complete sync point is on the target: a switch needs only the
    /// final delta.
    pub ready: bool,
    /// The replica's one-line description.
    pub description: String,
}

/// One pool in `migrate status`.
#[derive(Debug, Serialize)]
pub struct PoolState {
    /// `pool[/namespace]`.
    pub pool: String,
    /// Pool mode on the source.
    pub pool_mode: bool,
    /// Per image.
    pub images: Vec<ImageState>,
    /// Every image ready.
    pub ready: bool,
}

/// `migrate status`'s report.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// Source cluster ID.
    pub from: String,
    /// Target cluster ID.
    pub to: String,
    /// Per pool.
    pub pools: Vec<PoolState>,
    /// Every pool ready to switch.
    pub ready: bool,
}

async fn pool_state(c: &mut Client, pool: &str, ns: &str) -> Result<PoolState, String> {
    let mode = c
        .pool_mode_get(pb::PoolModeRequest {
            pool: pool.to_string(),
            namespace: ns.to_string(),
            ..Default::default()
        })
        .await
        .map_err(|e| rpc_error(&format!("source {}", pool_spec(pool, ns)), &e))?
        .into_inner();
    let st = c
        .pool_status(pb::PoolStatusRequest {
            pool: pool.to_string(),
            namespace: ns.to_string(),
            default_namespace_only: true,
        })
        .await
        .map_err(|e| rpc_error(&format!("source {}", pool_spec(pool, ns)), &e))?
        .into_inner();
    let by_name: BTreeMap<&str, &pb::ImageStatus> = st
        .image_statuses
        .iter()
        .filter(|i| i.namespace == ns)
        .map(|i| (i.name.as_str(), i))
        .collect();
    let mut images = Vec::new();
    for d in details(c, pool, ns, "source").await? {
        // Drill images and the like are never replicated (pool mode
        // leaves them out) and are not the application's.
        if d.name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        let s = by_name.get(d.name.as_str());
        let role = if d.role.is_empty() {
            "none".to_string()
        } else {
            d.role.clone()
        };
        let last = s.and_then(|s| s.last_sync.as_ref());
        let pending = s.and_then(|s| s.bytes_pending);
        let done = s.and_then(|s| match (s.percent, s.bytes_pending) {
            (Some(p), Some(left)) if p > 0.0 && p < 100.0 => {
                let total = left as f64 / (1.0 - p / 100.0);
                Some((total - left as f64).max(0.0) as u64)
            }
            _ => None,
        });
        let ready = match role.as_str() {
            "primary" => last.is_some() && s.is_some_and(|s| s.state != "error"),
            "demoted" => true,
            _ => false,
        };
        images.push(ImageState {
            image: spec(pool, ns, &d.name),
            role,
            state: s.map_or_else(|| "not replicated".to_string(), |s| s.state.clone()),
            clone: d.clone,
            parent: d.parent.clone(),
            size: d.size,
            bytes_done: done,
            bytes_pending: pending.filter(|p| *p > 0),
            bytes_per_sec: s.and_then(|s| s.bytes_per_sec).filter(|r| *r > 0),
            eta_seconds: s.and_then(|s| s.eta_seconds),
            seconds_behind: s.and_then(|s| s.seconds_behind),
            last_sync: last.map(|l| l.snapshot.clone()),
            clients: d.clients,
            ready,
            description: s.map(|s| s.description.clone()).unwrap_or_default(),
        });
    }
    let ready = images.iter().all(|i| i.ready);
    Ok(PoolState {
        pool: pool_spec(pool, ns),
        pool_mode: mode.enabled,
        images,
        ready,
    })
}

/// `migrate status`.
pub async fn status(
    mut source: Client,
    mut target: Client,
    plan: &Plan,
) -> Result<StatusReport, String> {
    let to = check_sites(&mut source, &mut target, plan).await?;
    let mut pools = Vec::new();
    for (pool, ns) in &plan.pools {
        pools.push(pool_state(&mut source, pool, ns).await?);
    }
    let ready = pools.iter().all(|p| p.ready);
    Ok(StatusReport {
        from: plan.from.clone(),
        to,
        pools,
        ready,
    })
}

impl StatusReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let mut out = format!("migration {} -> {}:\n", self.from, self.to);
        for p in &self.pools {
            let ready = p.images.iter().filter(|i| i.ready).count();
            let _ = writeln!(
                out,
                "{}: pool mode {}, {} images, {ready} ready to switch",
                p.pool,
                if p.pool_mode { "on" } else { "off" },
                p.images.len()
            );
            for i in &p.images {
                let mut line = format!("  {}: {} {}", i.image, i.role, i.state);
                if let (Some(d), Some(left)) = (i.bytes_done, i.bytes_pending) {
                    let _ = write!(line, ", {} copied, {} to go", fmt_bytes(d), fmt_bytes(left));
                } else if let Some(left) = i.bytes_pending {
                    let _ = write!(line, ", {} to go", fmt_bytes(left));
                }
                if let Some(r) = i.bytes_per_sec {
                    let _ = write!(line, " at {}/s", fmt_bytes(r));
                }
                if let Some(e) = i.eta_seconds {
                    let _ = write!(line, ", ETA {e} s");
                }
                if let Some(b) = i.seconds_behind {
                    let _ = write!(line, ", {b} s behind");
                }
                if i.clone {
                    let _ = write!(line, ", clone of {}", i.parent);
                }
                if !i.clients.is_empty() {
                    let _ = write!(line, ", open by {}", i.clients.join(", "));
                }
                line.push_str(if i.ready { ", ready" } else { ", NOT READY" });
                out.push_str(&line);
                out.push('\n');
            }
        }
        let _ = writeln!(
            out,
            "{}",
            if self.ready {
                "ready to switch"
            } else {
                "not ready to switch yet"
            }
        );
        out
    }

    /// 0 ready to switch, 1 not yet.
    pub fn exit_code(&self) -> u8 {
        if self.ready { EXIT_OK } else { EXIT_NOT_DONE }
    }
}

/// One image in `migrate switch`.
#[derive(Debug, Clone, Serialize)]
pub struct SwitchImage {
    /// `pool[/ns]/image`.
    pub image: String,
    /// The final sync snapshot (the demotion's).
    pub snapshot: String,
    /// `--verify`: SHA-256 at that snapshot on the source and the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_sha256: Option<String>,
    /// See `source_sha256`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_sha256: Option<String>,
    /// `--verify`: the two are equal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identical: Option<bool>,
}

/// `migrate switch`'s report.
#[derive(Debug, Default, Serialize)]
pub struct SwitchReport {
    /// Source cluster ID.
    pub from: String,
    /// Target cluster ID.
    pub to: String,
    /// Why the switch was refused or stopped, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Per image.
    pub images: Vec<SwitchImage>,
    /// Pool demote on the source: each image's final sync snapshot,
    /// milliseconds.
    pub demote_ms: u64,
    /// Planned pool promote on the target, which waits for each final
    /// delta, milliseconds.
    pub final_delta_and_promote_ms: u64,
    /// The downtime window: first demotion to last promotion, milliseconds.
    pub downtime_ms: u64,
    /// `--verify`: how long the checksums took (not downtime), ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_ms: Option<u64>,
    /// Per-image failures of the demotion or promotion.
    pub failures: Vec<String>,
    /// Images of the source that were not replicated when it was demoted
    /// (created after the readiness check): not on the target.
    pub not_migrated: Vec<String>,
}

impl SwitchReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.refused {
            let _ = writeln!(out, "switch {} -> {} refused: {r}", self.from, self.to);
            return out;
        }
        for i in &self.images {
            let _ = write!(out, "  {}: final sync point {}", i.image, i.snapshot);
            match i.identical {
                Some(true) => {
                    let _ = write!(
                        out,
                        ", sha256 {} on both sites",
                        short(i.source_sha256.as_deref())
                    );
                }
                Some(false) => {
                    let _ = write!(
                        out,
                        ", DIFFERENT: source {} target {}",
                        short(i.source_sha256.as_deref()),
                        short(i.target_sha256.as_deref())
                    );
                }
                None => {}
            }
            out.push('\n');
        }
        for f in &self.failures {
            let _ = writeln!(out, "  FAILED {f}");
        }
        for n in &self.not_migrated {
            let _ = writeln!(
                out,
                "  NOT MIGRATED {n}: not replicated when the source was demoted (created during the switch?)"
            );
        }
        let _ = writeln!(
            out,
            "switched {} images {} -> {}: downtime {:.2} s (final sync snapshots {:.2} s, final delta \
             and promotion {:.2} s){}",
            self.images.len(),
            self.from,
            self.to,
            self.downtime_ms as f64 / 1000.0,
            self.demote_ms as f64 / 1000.0,
            self.final_delta_and_promote_ms as f64 / 1000.0,
            match (
                self.verify_ms,
                self.images.iter().all(|i| i.identical == Some(true))
            ) {
                (Some(ms), true) => format!(
                    "; verified, every image identical ({:.1} s)",
                    ms as f64 / 1000.0
                ),
                (Some(_), false) => "; VERIFY FOUND DIFFERENCES".to_string(),
                (None, _) => String::new(),
            }
        );
        out
    }

    /// 0 switched (and verified identical), 1 refused or failed.
    pub fn exit_code(&self) -> u8 {
        if self.refused.is_some()
            || !self.failures.is_empty()
            || !self.not_migrated.is_empty()
            || self.images.iter().any(|i| i.identical == Some(false))
        {
            EXIT_NOT_DONE
        } else {
            EXIT_OK
        }
    }
}

fn short(s: Option<&str>) -> &str {
    s.map_or("?", |s| &s[..s.len().min(16)])
}

async fn collect(
    stream: Result<tonic::Response<tonic::Streaming<pb::PoolOpEvent>>, tonic::Status>,
    op: &str,
) -> OpReport {
    let mut report = OpReport::new(op);
    match stream {
        Ok(s) => {
            let mut s = s.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(ev)) => report.add(ev),
                    Ok(None) => break,
                    Err(e) => {
                        report.broken = Some(rpc_error(op, &e));
                        break;
                    }
                }
            }
        }
        Err(e) => report.broken = Some(rpc_error(op, &e)),
    }
    report
}

fn failures(pool: &str, ns: &str, r: &OpReport, site: &str) -> Vec<String> {
    let mut out: Vec<String> = r
        .results
        .iter()
        .filter(|i| i.outcome == pb::Outcome::Failed as i32)
        .map(|i| {
            format!(
                "{} on {site}: {} {}: {}",
                r.op,
                spec(pool, ns, &i.image),
                i.code,
                i.message
            )
        })
        .collect();
    if let Some(b) = &r.broken {
        out.push(format!(
            "{} of {} on {site}: {b}",
            r.op,
            pool_spec(pool, ns)
        ));
    }
    out
}

/// `migrate switch`: see the module documentation. Returns the report
/// (refusals and failures included); `Err` only for usage and connection
/// errors.
pub async fn switch(
    mut source: Client,
    mut target: Client,
    plan: &Plan,
    parallel: u32,
    wait: Duration,
    verify: bool,
) -> Result<SwitchReport, String> {
    let to = check_sites(&mut source, &mut target, plan).await?;
    let mut report = SwitchReport {
        from: plan.from.clone(),
        to: to.clone(),
        ..SwitchReport::default()
    };
    // Refuse before anything changes.
    report.refused = switch_refusal(&mut source, plan, &to).await?;
    if report.refused.is_some() {
        return Ok(report);
    }
    let began = Instant::now();
    for (pool, ns) in &plan.pools {
        // Nothing new is enrolled on the source from now on.
        source
            .pool_mode_disable(pb::PoolModeRequest {
                pool: pool.clone(),
                namespace: ns.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| rpc_error(&format!("pool mode off on {}", pool_spec(pool, ns)), &e))?;
    }
    report.failures = demote_pools(&source, plan, parallel).await;
    report.demote_ms = millis(began.elapsed());
    if !report.failures.is_empty() {
        report.refused = Some(format!(
            "demotion failed on {} (nothing was promoted; images demoted so far stay demoted: \
             fix the cause and run switch again): {}",
            plan.from,
            report.failures.join("; ")
        ));
        return Ok(report);
    }
    // The final sync snapshots, before the source adopts the target's.
    let mut finals = Vec::new();
    for (pool, ns) in &plan.pools {
        for d in details(&mut source, pool, ns, "source").await? {
            if d.role == "demoted" {
                finals.push((pool.clone(), ns.clone(), d.name, d.demotion_snapshot));
            } else if d.role.is_empty() && !d.name.starts_with(RESERVED_PREFIX) {
                report.not_migrated.push(spec(pool, ns, &d.name));
            }
        }
    }
    let promoted_at = Instant::now();
    report.failures = promote_pools(&target, plan, parallel, wait, &to).await;
    report.final_delta_and_promote_ms = millis(promoted_at.elapsed());
    report.downtime_ms = millis(began.elapsed());
    report.images = finals
        .iter()
        .map(|(pool, ns, name, snap)| SwitchImage {
            image: spec(pool, ns, name),
            snapshot: snap.clone(),
            source_sha256: None,
            target_sha256: None,
            identical: None,
        })
        .collect();
    if verify && report.failures.is_empty() {
        let t = Instant::now();
        verify_finals(&source, &target, &finals, &mut report.images).await?;
        report.verify_ms = Some(millis(t.elapsed()));
    }
    Ok(report)
}

/// Why `migrate switch` must not start, if it must not: images not
/// replicated yet or without a complete sync point on the target, and
/// clients with images open on the source (named).
async fn switch_refusal(
    source: &mut Client,
    plan: &Plan,
    to: &str,
) -> Result<Option<String>, String> {
    let mut not_ready = Vec::new();
    let mut open = Vec::new();
    for (pool, ns) in &plan.pools {
        let p = pool_state(source, pool, ns).await?;
        for i in p.images {
            if !i.ready {
                not_ready.push(format!("{} ({} {})", i.image, i.role, i.state));
            }
            if !i.clients.is_empty() {
                open.push(format!("{} open by {}", i.image, i.clients.join(", ")));
            }
        }
    }
    Ok(if !open.is_empty() {
        Some(format!(
            "clients still have images open on {}: {}; stop them (unmap, shut the VMs down) first",
            plan.from,
            open.join("; ")
        ))
    } else if !not_ready.is_empty() {
        Some(format!(
            "not ready to switch (no complete sync point on {to} yet): {}",
            not_ready.join(", ")
        ))
    } else {
        None
    })
}

/// Demotes every pool of `plan` on the source at once (each demotion
/// waits for a monitor round); returns the failures.
async fn demote_pools(source: &Client, plan: &Plan, parallel: u32) -> Vec<String> {
    let demotes = plan.pools.iter().map(|(pool, ns)| {
        let mut c = source.clone();
        async move {
            let s = c
                .pool_demote(pb::PoolDemoteRequest {
                    pool: pool.clone(),
                    namespace: ns.clone(),
                    default_namespace_only: true,
                    parallel,
                })
                .await;
            (pool, ns, collect(s, "demote").await)
        }
    });
    let mut out = Vec::new();
    for (pool, ns, r) in futures::future::join_all(demotes).await {
        out.extend(failures(pool, ns, &r, &plan.from));
    }
    out
}

/// Promotes every pool of `plan` on the target at once, each image once
/// its final delta is copied (up to `wait`); returns the failures.
async fn promote_pools(
    target: &Client,
    plan: &Plan,
    parallel: u32,
    wait: Duration,
    to: &str,
) -> Vec<String> {
    let promotes = plan.pools.iter().map(|(pool, ns)| {
        let mut c = target.clone();
        async move {
            let s = c
                .pool_promote(pb::PoolPromoteRequest {
                    pool: pool.clone(),
                    namespace: ns.clone(),
                    default_namespace_only: true,
                    force: false,
                    parallel,
                    wait_seconds: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
                })
                .await;
            (pool, ns, collect(s, "promote").await)
        }
    });
    let mut out = Vec::new();
    for (pool, ns, r) in futures::future::join_all(promotes).await {
        out.extend(failures(pool, ns, &r, to));
    }
    out
}

/// Checksums of the final sync point of every image on both sides, into
/// `images` (in the order of `finals`).
async fn verify_finals(
    source: &Client,
    target: &Client,
    finals: &[(String, String, String, String)],
    images: &mut [SwitchImage],
) -> Result<(), String> {
    for ((pool, ns, name, snap), img) in finals.iter().zip(images.iter_mut()) {
        let req = pb::ImageChecksumRequest {
            pool: pool.clone(),
            namespace: ns.clone(),
            image: name.clone(),
            snapshot: snap.clone(),
        };
        let (mut sc, mut tc) = (source.clone(), target.clone());
        let (a, b) = tokio::join!(sc.image_checksum(req.clone()), tc.image_checksum(req));
        let a =
            a.map_err(|e| rpc_error(&format!("checksum of {} on the source", img.image), &e))?;
        let b =
            b.map_err(|e| rpc_error(&format!("checksum of {} on the target", img.image), &e))?;
        let (a, b) = (a.into_inner(), b.into_inner());
        img.identical = Some(a == b);
        img.source_sha256 = Some(a.sha256);
        img.target_sha256 = Some(b.sha256);
    }
    Ok(())
}

/// One image in `migrate cleanup`.
#[derive(Debug, Serialize)]
pub struct CleanupImage {
    /// `pool[/ns]/image`.
    pub image: String,
    /// What happened on the source: `detached`, `removed`, `not replicated`,
    /// or the error.
    pub source: String,
    /// What happened on the target: `disabled` or the error.
    pub target: String,
}

/// `migrate cleanup`'s report.
#[derive(Debug, Default, Serialize)]
pub struct CleanupReport {
    /// Source cluster ID.
    pub from: String,
    /// Target cluster ID.
    pub to: String,
    /// Why cleanup was refused, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Per image.
    pub images: Vec<CleanupImage>,
    /// Images that failed.
    pub failed: usize,
}

impl CleanupReport {
    /// The report as text.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        if let Some(r) = &self.refused {
            let _ = writeln!(out, "cleanup refused: {r}");
            return out;
        }
        for i in &self.images {
            let _ = writeln!(
                out,
                "  {}: source {}, target {}",
                i.image, i.source, i.target
            );
        }
        let _ = writeln!(
            out,
            "cleanup of the migration {} -> {}: {} images, {} failed",
            self.from,
            self.to,
            self.images.len(),
            self.failed
        );
        out
    }

    /// 0 done, 1 refused or some image failed.
    pub fn exit_code(&self) -> u8 {
        if self.refused.is_some() || self.failed > 0 {
            EXIT_NOT_DONE
        } else {
            EXIT_OK
        }
    }
}

/// `migrate cleanup`: refused unless every replicated image is primary on
/// the target (the switch is done). The source first (detached, so that
/// the target's Disable cannot send it to the trash), then the target.
pub async fn cleanup(
    mut source: Client,
    mut target: Client,
    plan: &Plan,
    remove_source: bool,
) -> Result<CleanupReport, String> {
    let to = check_sites(&mut source, &mut target, plan).await?;
    let mut report = CleanupReport {
        from: plan.from.clone(),
        to: to.clone(),
        ..CleanupReport::default()
    };
    let mut work = Vec::new();
    let mut not_switched = Vec::new();
    for (pool, ns) in &plan.pools {
        let t = details(&mut target, pool, ns, "target").await?;
        let s = details(&mut source, pool, ns, "source").await?;
        for d in &s {
            let on_target = t.iter().find(|x| x.name == d.name);
            if d.role == "primary"
                || on_target.is_some_and(|x| !x.role.is_empty() && x.role != "primary")
            {
                not_switched.push(spec(pool, ns, &d.name));
            }
        }
        work.push((pool.clone(), ns.clone(), s, t));
    }
    if !not_switched.is_empty() {
        report.refused = Some(format!(
            "not switched yet (primary on {} or not primary on {to}): {}; run `migrate switch` first",
            plan.from,
            not_switched.join(", ")
        ));
        return Ok(report);
    }
    for (pool, ns, s, t) in work {
        let _ = source
            .pool_mode_disable(pb::PoolModeRequest {
                pool: pool.clone(),
                namespace: ns.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| rpc_error(&format!("pool mode off on {}", pool_spec(&pool, &ns)), &e))?;
        let mut names: Vec<&str> = s
            .iter()
            .map(|d| d.name.as_str())
            .filter(|n| !n.starts_with(RESERVED_PREFIX))
            .collect();
        for d in &t {
            if !names.contains(&d.name.as_str()) && !d.name.starts_with(RESERVED_PREFIX) {
                names.push(&d.name);
            }
        }
        names.sort_unstable();
        for name in names {
            let src = s.iter().find(|d| d.name == name);
            let tgt = t.iter().find(|d| d.name == name);
            let (image, failed) = cleanup_image(
                (&mut source, &mut target),
                (&pool, &ns, name),
                (src, tgt),
                remove_source,
            )
            .await;
            if failed {
                report.failed += 1;
            }
            report.images.push(image);
        }
    }
    Ok(report)
}

/// `migrate cleanup` of one image (`src` and `tgt`: its details on each
/// side): the source detached first (so that the target's Disable cannot
/// send it to the trash), then replication disabled on the target. Returns
/// the image's line and whether a step failed.
async fn cleanup_image(
    (source, target): (&mut Client, &mut Client),
    (pool, ns, name): (&str, &str, &str),
    (src, tgt): (Option<&pb::ImageDetail>, Option<&pb::ImageDetail>),
    remove_source: bool,
) -> (CleanupImage, bool) {
    let mut failed = false;
    let source_result = match src {
        None => "absent".to_string(),
        Some(d) if d.role.is_empty() && tgt.is_none_or(|t| t.role.is_empty()) => {
            "not replicated, left alone".to_string()
        }
        Some(_) => match source
            .image_disable(pb::ImageDisableRequest {
                pool: pool.to_string(),
                namespace: ns.to_string(),
                image: name.to_string(),
                force: true,
                remove: remove_source,
            })
            .await
        {
            Ok(r) if r.get_ref().removed => "detached, moved to the trash".to_string(),
            Ok(_) => "detached (a plain image at the final sync point)".to_string(),
            Err(e) => {
                failed = true;
                rpc_error("FAILED", &e)
            }
        },
    };
    let target_result = match tgt {
        Some(d) if d.role == "primary" && !failed => match target
            .image_disable(pb::ImageDisableRequest {
                pool: pool.to_string(),
                namespace: ns.to_string(),
                image: name.to_string(),
                force: false,
                remove: false,
            })
            .await
        {
            Ok(_) => "replication disabled".to_string(),
            Err(e) => {
                failed = true;
                rpc_error("FAILED", &e)
            }
        },
        Some(d) if d.role == "primary" => "left replicated (the source failed)".to_string(),
        Some(_) => "not replicated".to_string(),
        None => "absent".to_string(),
    };
    let image = CleanupImage {
        image: spec(pool, ns, name),
        source: source_result,
        target: target_result,
    };
    (image, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_take_an_optional_namespace() {
        assert_eq!(
            parse_pool("glance").unwrap(),
            ("glance".into(), String::new())
        );
        assert_eq!(parse_pool("rbd/ns1").unwrap(), ("rbd".into(), "ns1".into()));
        assert!(parse_pool("").is_err());
        assert!(parse_pool("a/b/c").is_err());
    }

    #[test]
    fn a_switch_report_says_the_downtime_and_fails_on_differences() {
        let mut r = SwitchReport {
            from: "site-a".into(),
            to: "site-b".into(),
            images: vec![SwitchImage {
                image: "cinder/vol".into(),
                snapshot: "csirr-sync.0000000003.abcd".into(),
                source_sha256: Some("00".repeat(32)),
                target_sha256: Some("00".repeat(32)),
                identical: Some(true),
            }],
            demote_ms: 1100,
            final_delta_and_promote_ms: 900,
            downtime_ms: 2000,
            verify_ms: Some(300),
            ..SwitchReport::default()
        };
        let t = r.render_text();
        assert!(
            t.contains("switched 1 images site-a -> site-b: downtime 2.00 s"),
            "{t}"
        );
        assert!(t.contains("every image identical"), "{t}");
        assert_eq!(r.exit_code(), EXIT_OK);
        r.not_migrated = vec!["cinder/late".into()];
        assert!(r.render_text().contains("NOT MIGRATED cinder/late"));
        assert_eq!(r.exit_code(), EXIT_NOT_DONE);
        r.not_migrated.clear();
        r.images[0].identical = Some(false);
        assert_eq!(r.exit_code(), EXIT_NOT_DONE);
        r.refused = Some("clients".into());
        assert!(r.render_text().contains("refused: clients"));
    }
}
