//! Site failover and failback the Cinder way, driven by the command line
//! through the admin APIs of the two sites' sidecars.
//!
//! Why the command line talks to both sidecars (`--to-endpoint`,
//! `--from-endpoint`) instead of one sidecar demoting through the other:
//! each sidecar acts on its own cluster only, with its own credentials, and
//! a demotion must run in the old site's sidecar (it keeps the image's
//! exclusive lock in that process afterwards, and takes its per-volume
//! lock); sidecars never call each other. The operator's host, which can
//! reach both endpoints, is also the one place that can tell "the old site
//! stopped answering" apart from "this site cannot be reached".
//!
//! Failover to SITE: every replicated image not primary on SITE is demoted
//! on the old site while it answers, then promoted on SITE (planned, zero
//! data loss). On the first demotion that fails or exceeds the timeout the
//! old site is assumed gone: every image not yet demoted (the failed one
//! included) is promoted on SITE by force, at its last complete sync point.
//! Images already primary on SITE and images that are not replicated are
//! listed and never touched.
//!
//! Failback to SITE (the old site, back again): each image primary on both
//! sites (force-promoted elsewhere while SITE was gone) is demoted on SITE,
//! and each demoted image there is resynced from the current primary from
//! the newest sync point both share (only what diverged is copied; the
//! writes SITE took after that point are discarded); with relocation, once
//! every replica is complete, a planned failover back to SITE follows.
//!
//! Must not: act on Ceph itself; everything goes through the sidecars.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tonic::transport::Channel;

use super::proto::admin::{self as pb, admin_client::AdminClient};
use super::status::code_name;

/// An admin API client.
pub type Client = AdminClient<Channel>;

/// Pause between polls of a resync's readiness.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// What a site operation did to one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Demoted on the old site, then promoted (planned) on the new one.
    Clean,
    /// Promoted by force on the new site (the old site was gone).
    Forced,
    /// Already primary on the target site: untouched.
    AlreadyPrimary,
    /// Replication is not enabled for it: untouched.
    NotReplicated,
    /// Failback: demoted on the returning site (if it was primary there)
    /// and resynced from the current primary.
    Resynced,
    /// Failback: already a replica on the returning site.
    AlreadyReplica,
    /// Failback with relocation: resynced, then relocated back.
    Relocated,
    /// An operation failed; see the error.
    Failed,
}

impl Fate {
    /// The word the report uses.
    pub fn word(self) -> &'static str {
        match self {
            Fate::Clean => "clean",
            Fate::Forced => "forced",
            Fate::AlreadyPrimary => "already_primary",
            Fate::NotReplicated => "not_replicated",
            Fate::Resynced => "resynced",
            Fate::AlreadyReplica => "already_replica",
            Fate::Relocated => "relocated",
            Fate::Failed => "failed",
        }
    }
}

/// One call made for an image.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// The cluster it ran on.
    pub site: String,
    /// `demote`, `promote`, `promote --force` or `resync`.
    pub op: String,
    /// The per-volume gRPC code (`OK`, `UNAVAILABLE`, ...), or `TIMEOUT`
    /// when the call did not answer in time.
    pub code: String,
    /// The error, if any.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Time the call took, milliseconds.
    pub duration_ms: u64,
}

impl Step {
    fn ok(&self) -> bool {
        self.code == "OK"
    }
}

/// One image's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct ImageReport {
    /// Its pool.
    pub pool: String,
    /// RADOS namespace (empty: the default one).
    pub namespace: String,
    /// Image name.
    pub image: String,
    /// What happened.
    pub outcome: Fate,
    /// Its role on the target site before the operation (empty: not
    /// replicated there).
    pub role_before: String,
    /// The sites where it exists without replication (not replicated only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// The calls made, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// Why it failed, or why it was forced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time spent on it, milliseconds.
    pub duration_ms: u64,
}

impl ImageReport {
    fn new(pool: &str, img: &pb::SiteImage, outcome: Fate) -> Self {
        Self {
            pool: pool.to_string(),
            namespace: img.namespace.clone(),
            image: img.name.clone(),
            outcome,
            role_before: img.role.clone(),
            sites: Vec::new(),
            steps: Vec::new(),
            error: None,
            duration_ms: 0,
        }
    }

    /// `pool/[namespace/]image`.
    pub fn spec(&self) -> String {
        if self.namespace.is_empty() {
            format!("{}/{}", self.pool, self.image)
        } else {
            format!("{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }

    fn last_error(&self) -> Option<String> {
        self.steps
            .iter()
            .rev()
            .find(|s| !s.ok())
            .map(|s| format!("{} on {}: {} {}", s.op, s.site, s.code, s.message))
    }
}

/// A failover's or failback's report.
#[derive(Debug, Clone, Serialize)]
pub struct SiteReport {
    /// `failover` or `failback`.
    pub operation: String,
    /// The target site's cluster ID.
    pub to: String,
    /// The other site's cluster ID, when it answered.
    pub from: Option<String>,
    /// The pools acted on.
    pub pools: Vec<String>,
    /// Why the other site was assumed gone, if it was.
    pub from_lost: Option<String>,
    /// Images in scope (replicated or not), known once listed.
    pub images_total: usize,
    /// Every image, sorted by pool, namespace and name once done.
    pub images: Vec<ImageReport>,
    /// Images by outcome.
    pub totals: BTreeMap<String, usize>,
    /// Wall time, milliseconds.
    pub duration_ms: u64,
    /// Per-image time of the images that were acted on: median and
    /// maximum, milliseconds, by outcome.
    pub timings: BTreeMap<String, Timing>,
}

/// Median and maximum time per image.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Timing {
    /// Images.
    pub images: usize,
    /// Median, milliseconds.
    pub p50_ms: u64,
    /// Maximum, milliseconds.
    pub max_ms: u64,
}

/// Exit code: every image ok without force.
pub const EXIT_OK: u8 = 0;
/// Exit code: some image failed (it is not primary on the target site).
pub const EXIT_FAILED: u8 = 1;
/// Exit code: usage error, or the target site cannot be reached.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: every image ok, but some were promoted by force (the old
/// site was gone; they need a failback once it is back).
pub const EXIT_FORCED: u8 = 3;

impl SiteReport {
    fn new(operation: &str, to: String) -> Self {
        Self {
            operation: operation.to_string(),
            to,
            from: None,
            pools: Vec::new(),
            from_lost: None,
            images_total: 0,
            images: Vec::new(),
            totals: BTreeMap::new(),
            duration_ms: 0,
            timings: BTreeMap::new(),
        }
    }

    /// Images with `fate`.
    pub fn count(&self, fate: Fate) -> usize {
        self.images.iter().filter(|i| i.outcome == fate).count()
    }

    /// See [`EXIT_OK`], [`EXIT_FAILED`], [`EXIT_FORCED`].
    pub fn exit_code(&self) -> u8 {
        if self.count(Fate::Failed) > 0 {
            EXIT_FAILED
        } else if self.count(Fate::Forced) > 0 {
            EXIT_FORCED
        } else {
            EXIT_OK
        }
    }

    fn finish(&mut self, began: Instant) {
        self.images.sort_by(|a, b| {
            (&a.pool, &a.namespace, &a.image).cmp(&(&b.pool, &b.namespace, &b.image))
        });
        self.totals = BTreeMap::new();
        let mut times: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for i in &self.images {
            *self.totals.entry(i.outcome.word().into()).or_default() += 1;
            if !i.steps.is_empty() {
                times
                    .entry(i.outcome.word().into())
                    .or_default()
                    .push(i.duration_ms);
            }
        }
        self.timings = times
            .into_iter()
            .map(|(k, mut v)| {
                v.sort_unstable();
                let t = Timing {
                    images: v.len(),
                    p50_ms: v[v.len() / 2],
                    max_ms: v[v.len() - 1],
                };
                (k, t)
            })
            .collect();
        self.duration_ms = millis(began.elapsed());
    }

    /// One line of progress for a terminal.
    pub fn progress_line(&self) -> String {
        let mut line = format!(
            "{} to {}: {}/{} done",
            self.operation,
            self.to,
            self.images.len(),
            self.images_total
        );
        for f in [Fate::Clean, Fate::Forced, Fate::Resynced, Fate::Failed] {
            let n = self.count(f);
            if n > 0 {
                let _ = write!(line, ", {n} {}", f.word());
            }
        }
        if let Some(i) = self.images.last() {
            let _ = write!(line, " (last: {} {})", i.spec(), i.outcome.word());
        }
        line
    }

    /// Every image's line, then the totals.
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} to {} (from {}), pools {}:",
            self.operation,
            self.to,
            self.from.as_deref().unwrap_or("an unreachable site"),
            self.pools.join(", ")
        );
        if let Some(why) = &self.from_lost {
            let _ = writeln!(out, "old site assumed gone: {why}");
        }
        for i in &self.images {
            let _ = write!(
                out,
                "  {}: {} ({:.1}s)",
                i.spec(),
                i.outcome.word().replace('_', " "),
                i.duration_ms as f64 / 1000.0
            );
            if !i.sites.is_empty() {
                let _ = write!(out, " on {}", i.sites.join(", "));
            }
            match &i.error {
                Some(e) => {
                    let _ = writeln!(out, ": {e}");
                }
                None => out.push('\n'),
            }
        }
        let totals: Vec<String> = self
            .totals
            .iter()
            .map(|(k, v)| format!("{v} {}", k.replace('_', " ")))
            .collect();
        let _ = writeln!(
            out,
            "{} images: {}, in {:.1}s",
            self.images.len(),
            totals.join(", "),
            self.duration_ms as f64 / 1000.0
        );
        out
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a site operation acts on and how.
#[derive(Debug, Clone)]
pub struct SiteOptions {
    /// The cluster ID the target sidecar must serve.
    pub to: String,
    /// Pools; empty: every pool the target replicates.
    pub pools: Vec<String>,
    /// Bound on each demotion on the old site: past it the site is
    /// assumed gone.
    pub timeout: Duration,
    /// How long a planned promotion may wait for the demotion snapshot to
    /// be copied (and a failback for the resyncs to complete).
    pub wait: Duration,
    /// Images worked on at once.
    pub parallel: usize,
}

/// The two sidecars: the target site's and, when it answered, the other
/// one's.
pub struct Sites {
    /// The target site's admin API.
    pub to: Client,
    /// The other site's admin API; `None` when it could not be reached.
    pub from: Option<Client>,
    /// Why the other site could not be reached.
    pub from_error: Option<String>,
}

fn rpc_error(s: &tonic::Status) -> String {
    super::status::describe(s)
}

/// A call's answer as a step.
fn step(
    site: &str,
    op: &str,
    began: Instant,
    r: Result<Result<tonic::Response<pb::ImageResult>, tonic::Status>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> (Step, Option<pb::ImageResult>) {
    let (code, message, res) = match r {
        Ok(Ok(r)) => {
            let r = r.into_inner();
            (r.code.clone(), r.message.clone(), Some(r))
        }
        Ok(Err(s)) => (
            code_name(super::status::client_code(&s)).to_string(),
            super::status::client_message(&s),
            None,
        ),
        Err(_) => (
            "TIMEOUT".to_string(),
            format!("no answer within {timeout:?}"),
            None,
        ),
    };
    let s = Step {
        site: site.to_string(),
        op: op.to_string(),
        code,
        message,
        duration_ms: millis(began.elapsed()),
    };
    (s, res)
}

async fn call_promote(
    c: &mut Client,
    site: &str,
    img: &ImageReport,
    force: bool,
    wait: Duration,
) -> Step {
    let req = pb::ImagePromoteRequest {
        pool: img.pool.clone(),
        namespace: img.namespace.clone(),
        image: img.image.clone(),
        force,
        wait_seconds: u32::try_from(wait.as_secs()).unwrap_or(u32::MAX),
    };
    // The sidecar bounds a promotion itself; this only guards against a
    // sidecar that stops answering.
    let bound = wait + Duration::from_secs(300);
    let began = Instant::now();
    let r = tokio::time::timeout(bound, c.image_promote(req)).await;
    let op = if force { "promote --force" } else { "promote" };
    step(site, op, began, r, bound).0
}

async fn call_demote(c: &mut Client, site: &str, img: &ImageReport, timeout: Duration) -> Step {
    let mut req = tonic::Request::new(pb::ImageRequest {
        pool: img.pool.clone(),
        namespace: img.namespace.clone(),
        image: img.image.clone(),
    });
    req.set_timeout(timeout);
    let began = Instant::now();
    let r = tokio::time::timeout(timeout, c.image_demote(req)).await;
    step(site, "demote", began, r, timeout).0
}

async fn call_resync(
    c: &mut Client,
    site: &str,
    img: &ImageReport,
) -> (Step, Option<pb::ImageResult>) {
    let req = pb::ImageResyncRequest {
        pool: img.pool.clone(),
        namespace: img.namespace.clone(),
        image: img.image.clone(),
        force: true,
    };
    let bound = Duration::from_secs(300);
    let began = Instant::now();
    let r = tokio::time::timeout(bound, c.image_resync(req)).await;
    step(site, "resync", began, r, bound)
}

/// The images of `pool` on the target site (and on the other one when it
/// answers), paired by namespace and name: (target's, other's).
type Pairs = Vec<(pb::SiteImage, Option<pb::SiteImage>)>;

async fn list_pool(sites: &mut Sites, pool: &str) -> Result<(Pairs, Vec<pb::SiteImage>), String> {
    let req = pb::SiteImagesRequest {
        pool: pool.to_string(),
        namespace: String::new(),
        default_namespace_only: false,
    };
    let here = sites
        .to
        .site_images(req.clone())
        .await
        .map_err(|s| format!("listing pool {pool} on the target site: {}", rpc_error(&s)))?
        .into_inner()
        .images;
    let there = match &mut sites.from {
        Some(c) => c
            .site_images(req)
            .await
            .map(|r| r.into_inner().images)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let key = |i: &pb::SiteImage| (i.namespace.clone(), i.name.clone());
    let mut other: BTreeMap<_, _> = there.into_iter().map(|i| (key(&i), i)).collect();
    let pairs = here
        .into_iter()
        .map(|i| {
            let o = other.remove(&key(&i));
            (i, o)
        })
        .collect();
    Ok((pairs, other.into_values().collect()))
}

/// Connects the report to the target: checks its cluster ID and picks the
/// pools.
async fn begin(sites: &mut Sites, opts: &SiteOptions, op: &str) -> Result<SiteReport, String> {
    let info = sites
        .to
        .site_info(pb::SiteInfoRequest {})
        .await
        .map_err(|s| format!("the target site: {}", rpc_error(&s)))?
        .into_inner();
    if info.cluster_id != opts.to {
        return Err(format!(
            "--to-endpoint serves cluster {:?}, not {:?}",
            info.cluster_id, opts.to
        ));
    }
    let mut report = SiteReport::new(op, info.cluster_id);
    if let Some(c) = &mut sites.from {
        match c.site_info(pb::SiteInfoRequest {}).await {
            Ok(r) => {
                let id = r.into_inner().cluster_id;
                if id == opts.to {
                    return Err(format!(
                        "--from-endpoint serves the target cluster {id:?} too"
                    ));
                }
                report.from = Some(id);
            }
            Err(s) => {
                report.from_lost = Some(format!("the old site's sidecar: {}", rpc_error(&s)));
                sites.from = None;
            }
        }
    } else if let Some(e) = &sites.from_error {
        report.from_lost = Some(e.clone());
    }
    report.pools = if opts.pools.is_empty() {
        info.pools
    } else {
        opts.pools.clone()
    };
    Ok(report)
}

/// Lists what is not replicated (on either site) and returns the images
/// the target site replicates, paired with the other site's view.
async fn classify(sites: &mut Sites, report: &mut SiteReport) -> Result<Vec<ImageReport>, String> {
    let mut todo = Vec::new();
    let from_id = report.from.clone().unwrap_or_default();
    for pool in report.pools.clone() {
        let (pairs, only_there) = list_pool(sites, &pool).await?;
        for (here, there) in pairs {
            if here.replicated {
                let mut r = ImageReport::new(&pool, &here, Fate::Failed);
                // The other site's role rides along in `sites` until the
                // operation decides.
                if let Some(t) = there.filter(|t| t.replicated) {
                    r.sites = vec![t.role];
                }
                todo.push(r);
            } else {
                let mut r = ImageReport::new(&pool, &here, Fate::NotReplicated);
                r.sites.push(report.to.clone());
                if there.is_some_and(|t| !t.replicated) {
                    r.sites.push(from_id.clone());
                }
                report.images.push(r);
            }
        }
        for t in only_there.into_iter().filter(|t| !t.replicated) {
            let mut r = ImageReport::new(&pool, &t, Fate::NotReplicated);
            r.role_before.clear();
            r.sites.push(from_id.clone());
            report.images.push(r);
        }
    }
    report.images_total = report.images.len() + todo.len();
    Ok(todo)
}

/// Moves images to the target site: demote on the other site while it
/// answers, then planned promotion here. With `force_on_loss`, once a
/// demotion fails or times out every image not demoted yet is promoted by
/// force; without it such images fail (a relocation never forces).
async fn switch_over(
    sites: &Sites,
    report: &Arc<Mutex<SiteReport>>,
    images: Vec<ImageReport>,
    opts: &SiteOptions,
    force_on_loss: bool,
    progress: &(dyn Fn(&SiteReport) + Sync),
) {
    let to_id = report.lock().to.clone();
    let from_id = report.lock().from.clone().unwrap_or_default();
    let lost: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(report.lock().from_lost.clone()));
    let mut work = futures::stream::iter(images)
        .map(|mut img| {
            let (mut to, from) = (sites.to.clone(), sites.from.clone());
            let (lost, to_id, from_id) = (Arc::clone(&lost), to_id.clone(), from_id.clone());
            async move {
                let began = Instant::now();
                let gone = lost.lock().clone();
                let demoted = match (from, gone) {
                    (Some(mut from), None) => {
                        let s = call_demote(&mut from, &from_id, &img, opts.timeout).await;
                        let ok = s.ok();
                        if !ok {
                            let why = format!(
                                "demotion of {} failed: {} {}",
                                img.spec(),
                                s.code,
                                s.message
                            );
                            tracing::warn!(image = %img.spec(), reason = %why, "old site assumed gone");
                            lost.lock().get_or_insert(why);
                        }
                        img.steps.push(s);
                        ok
                    }
                    _ => false,
                };
                if demoted {
                    let s = call_promote(&mut to, &to_id, &img, false, opts.wait).await;
                    let ok = s.ok();
                    img.steps.push(s);
                    if ok {
                        img.outcome = Fate::Clean;
                    }
                }
                if img.outcome != Fate::Clean {
                    if force_on_loss {
                        let why = img.last_error().unwrap_or_else(|| {
                            lost.lock()
                                .clone()
                                .unwrap_or_else(|| "the old site is gone".into())
                        });
                        let s = call_promote(&mut to, &to_id, &img, true, Duration::ZERO).await;
                        if s.ok() {
                            img.outcome = Fate::Forced;
                            img.error = Some(why);
                        }
                        img.steps.push(s);
                    }
                    if img.outcome != Fate::Forced {
                        img.outcome = Fate::Failed;
                        img.error = img.last_error().or_else(|| {
                            Some("the old site is gone and forcing was not asked for".into())
                        });
                    }
                }
                img.duration_ms = millis(began.elapsed());
                tracing::info!(image = %img.spec(), outcome = img.outcome.word(), "site failover: image done");
                img
            }
        })
        .buffer_unordered(opts.parallel.max(1));
    while let Some(img) = work.next().await {
        let mut r = report.lock();
        r.images.push(img);
        progress(&r);
    }
    report.lock().from_lost.clone_from(&lost.lock());
}

fn take(report: Arc<Mutex<SiteReport>>) -> SiteReport {
    match Arc::try_unwrap(report) {
        Ok(m) => m.into_inner(),
        Err(a) => a.lock().clone(),
    }
}

/// Fails every replicated image of the pools over to `opts.to`, the Cinder
/// way (see the module docs). `progress` sees the report after each image.
/// Errors: the target site cannot be reached or is not `opts.to`.
pub async fn failover(
    mut sites: Sites,
    opts: &SiteOptions,
    progress: &(dyn Fn(&SiteReport) + Sync),
) -> Result<SiteReport, String> {
    let began = Instant::now();
    let mut report = begin(&mut sites, opts, "failover").await?;
    let todo = classify(&mut sites, &mut report).await?;
    let mut act = Vec::new();
    for mut img in todo {
        img.sites.clear();
        if img.role_before == "primary" {
            img.outcome = Fate::AlreadyPrimary;
            report.images.push(img);
        } else {
            act.push(img);
        }
    }
    tracing::info!(to = %report.to, images = act.len(), "site failover started");
    let report = Arc::new(Mutex::new(report));
    switch_over(&sites, &report, act, opts, true, progress).await;
    let mut report = take(report);
    report.finish(began);
    Ok(report)
}

/// Fails back to `opts.to`, the site that was lost and is back (see the
/// module docs); with `relocate`, once every image is a complete replica
/// there, relocates it back with a planned failover. `progress` sees the
/// report after each image.
pub async fn failback(
    mut sites: Sites,
    opts: &SiteOptions,
    relocate: bool,
    progress: &(dyn Fn(&SiteReport) + Sync),
) -> Result<SiteReport, String> {
    let began = Instant::now();
    let mut report = begin(&mut sites, opts, "failback").await?;
    let Some(from) = sites.from.clone() else {
        return Err(format!(
            "failback needs the current primary's sidecar: {}",
            report.from_lost.as_deref().unwrap_or("not reachable")
        ));
    };
    let from_id = report.from.clone().unwrap_or_default();
    let todo = classify(&mut sites, &mut report).await?;
    let mut resync = Vec::new();
    for mut img in todo {
        let there = img.sites.pop().unwrap_or_default();
        img.sites.clear();
        match (img.role_before.as_str(), there.as_str()) {
            ("secondary", _) => {
                img.outcome = Fate::AlreadyReplica;
                report.images.push(img);
            }
            ("primary", "primary") | ("demoted", _) => resync.push(img),
            _ => {
                img.outcome = Fate::AlreadyPrimary;
                report.images.push(img);
            }
        }
    }
    let to_id = report.to.clone();
    // Demote where needed and resync, then poll until complete.
    let mut work = futures::stream::iter(resync)
        .map(|img| {
            let to = sites.to.clone();
            let to_id = to_id.clone();
            async move { demote_and_resync(to, &to_id, img, opts).await }
        })
        .buffer_unordered(opts.parallel.max(1));
    let mut done = Vec::new();
    while let Some(img) = work.next().await {
        done.push(img);
        let mut view = report.clone();
        view.images.extend(done.iter().cloned());
        progress(&view);
    }
    drop(work);
    if relocate {
        let back = Sites {
            to: sites.to.clone(),
            from: Some(from),
            from_error: None,
        };
        report = relocate_back(&back, report, done, from_id, opts, progress).await;
    } else {
        report.images.extend(done);
    }
    report.finish(began);
    Ok(report)
}

/// One image of a failback: demoted on the returning site when it was
/// primary there, then resynced and polled until its replica is complete
/// (up to `opts.wait`).
async fn demote_and_resync(
    mut to: Client,
    to_id: &str,
    mut img: ImageReport,
    opts: &SiteOptions,
) -> ImageReport {
    let began = Instant::now();
    let wait = opts.wait;
    if img.role_before == "primary" {
        let s = call_demote(&mut to, to_id, &img, opts.timeout).await;
        let ok = s.ok();
        img.steps.push(s);
        if !ok {
            img.error = img.last_error();
            img.duration_ms = millis(began.elapsed());
            return img;
        }
    }
    let resync_began = Instant::now();
    let deadline = resync_began + wait;
    loop {
        let (mut s, r) = call_resync(&mut to, to_id, &img).await;
        let ready = s.ok() && r.is_some_and(|r| r.ready);
        let failed = !s.ok();
        // One step for the resync and the polls until it is complete: the
        // last answer, the whole time.
        s.duration_ms = millis(resync_began.elapsed());
        if img.steps.last().is_some_and(|l| l.op == "resync") {
            img.steps.pop();
        }
        img.steps.push(s);
        if ready {
            img.outcome = Fate::Resynced;
            break;
        }
        if failed || Instant::now() >= deadline {
            img.error = Some(
                img.last_error()
                    .unwrap_or_else(|| format!("the replica was not complete within {wait:?}")),
            );
            break;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    img.duration_ms = millis(began.elapsed());
    tracing::info!(image = %img.spec(), outcome = img.outcome.word(), "failback: image resynced");
    img
}

/// The relocation back at the end of `failback --relocate`: every complete
/// replica (resynced now, or a replica already) demoted on the current
/// primary and promoted on the returning site, planned only.
async fn relocate_back(
    back: &Sites,
    mut report: SiteReport,
    done: Vec<ImageReport>,
    from_id: String,
    opts: &SiteOptions,
    progress: &(dyn Fn(&SiteReport) + Sync),
) -> SiteReport {
    let (ready, other): (Vec<_>, Vec<_>) =
        done.into_iter().partition(|i| i.outcome == Fate::Resynced);
    report.images.extend(other);
    let (moved, staying): (Vec<_>, Vec<_>) = report
        .images
        .drain(..)
        .partition(|i| i.outcome == Fate::AlreadyReplica);
    report.images = staying;
    let mut batch: Vec<ImageReport> = ready.into_iter().chain(moved).collect();
    for i in &mut batch {
        i.outcome = Fate::Failed;
    }
    report.from = Some(from_id);
    let shared = Arc::new(Mutex::new(report));
    switch_over(back, &shared, batch, opts, false, progress).await;
    let mut r = take(shared);
    for i in &mut r.images {
        if i.outcome == Fate::Clean {
            i.outcome = Fate::Relocated;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(name: &str, fate: Fate, ms: u64, steps: usize) -> ImageReport {
        ImageReport {
            pool: "rp".into(),
            namespace: String::new(),
            image: name.into(),
            outcome: fate,
            role_before: "secondary".into(),
            sites: Vec::new(),
            steps: (0..steps)
                .map(|_| Step {
                    site: "site-a".into(),
                    op: "demote".into(),
                    code: "OK".into(),
                    message: String::new(),
                    duration_ms: ms,
                })
                .collect(),
            error: (fate == Fate::Forced).then(|| "demote on site-a: TIMEOUT".into()),
            duration_ms: ms,
        }
    }

    #[test]
    fn reports_count_time_and_choose_the_exit_code() {
        let mut r = SiteReport::new("failover", "site-b".into());
        r.from = Some("site-a".into());
        r.pools = vec!["rp".into()];
        r.images = vec![
            img("c", Fate::Clean, 3000, 2),
            img("a", Fate::Clean, 1000, 2),
            img("x", Fate::NotReplicated, 0, 0),
        ];
        r.finish(Instant::now());
        assert_eq!(r.exit_code(), EXIT_OK);
        assert_eq!(r.images[0].image, "a", "sorted");
        assert_eq!(r.totals["clean"], 2);
        assert_eq!(r.timings["clean"].p50_ms, 3000);
        assert_eq!(r.timings["clean"].max_ms, 3000);
        assert!(!r.timings.contains_key("not_replicated"));
        r.images.push(img("f", Fate::Forced, 500, 1));
        r.finish(Instant::now());
        assert_eq!(r.exit_code(), EXIT_FORCED);
        let t = r.render_text();
        assert!(
            t.starts_with("failover to site-b (from site-a), pools rp:\n"),
            "{t}"
        );
        assert!(
            t.contains("  rp/f: forced (0.5s): demote on site-a: TIMEOUT\n"),
            "{t}"
        );
        assert!(
            t.contains("4 images: 2 clean, 1 forced, 1 not replicated, in "),
            "{t}"
        );
        r.images.push(img("z", Fate::Failed, 10, 1));
        r.images_total = 5;
        r.finish(Instant::now());
        assert_eq!(r.exit_code(), EXIT_FAILED);
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["images"][1]["outcome"], "clean");
        assert_eq!(j["totals"]["failed"], 1);
        assert_eq!(
            r.progress_line(),
            "failover to site-b: 5/5 done, 2 clean, 1 forced, 1 failed (last: rp/z failed)"
        );
    }
}
