//! The thin executor over [`super::plan`]: for each PV object, examine it,
//! look up pools and the image on the local cluster, and make the journal
//! entry right ([`super::journal::ensure`]). One report line per object.
//! Blocking: call from a blocking thread.

use std::fmt;
use std::sync::Arc;

use csirr_ceph::{Cluster, ErrorKind, Image, IoCtx};

use super::error::{Context, OmapError};
use super::journal::{self, Outcome, Placement};
use super::manifest::ManifestObject;
use super::plan::{self, IgnoreReason, Lookup, PlanContext, PvProblem, Resolved, Verdict};

/// [`Lookup`] backed by a connected cluster.
pub struct RadosLookup<'a> {
    cluster: &'a Arc<Cluster>,
}

impl<'a> RadosLookup<'a> {
    /// Lookups on `cluster`.
    pub fn new(cluster: &'a Arc<Cluster>) -> Self {
        Self { cluster }
    }

    fn ioctx(&self, pool_id: i64, pool: &str, ns: &str) -> Result<Arc<IoCtx>, OmapError> {
        self.cluster
            .ioctx_by_id(pool_id, pool, ns)
            .ctx(|| format!("opening pool {pool}"))
    }
}

impl Lookup for RadosLookup<'_> {
    fn pool_id(&self, name: &str) -> Result<Option<i64>, OmapError> {
        match self.cluster.pool_lookup(name) {
            Ok(id) => Ok(Some(id)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx(|| format!("looking up pool {name}")),
        }
    }

    fn image_id(
        &self,
        pool_id: i64,
        pool: &str,
        namespace: &str,
        image: &str,
    ) -> Result<Option<String>, OmapError> {
        let io = self.ioctx(pool_id, pool, namespace)?;
        match Image::open_read_only(&io, image, None) {
            Ok(img) => img
                .id()
                .map(Some)
                .ctx(|| format!("reading the id of {}/{image}", io.spec())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx(|| format!("opening {}/{image}", io.spec())),
        }
    }
}

/// What happened to one object.
#[derive(Debug)]
pub enum PvOutcome {
    /// The entry was written (or already right).
    Done {
        /// Created, repaired or unchanged.
        outcome: Outcome,
        /// Where it is.
        resolved: Box<Resolved>,
    },
    /// Dry run: what would be done.
    WouldDo {
        /// Created, repaired or unchanged.
        outcome: Outcome,
        /// Where it would be.
        resolved: Box<Resolved>,
    },
    /// Not ours; not a failure.
    Ignored(IgnoreReason),
    /// Nothing was changed for this object: a failure.
    Failed(PvProblem),
}

/// The report line of one object.
#[derive(Debug)]
pub struct PvReport {
    /// Where the object came from.
    pub source: String,
    /// Its name, if it has one.
    pub name: Option<String>,
    /// What happened.
    pub outcome: PvOutcome,
}

impl PvReport {
    /// Whether this object failed (ignored objects did not).
    pub fn is_failure(&self) -> bool {
        matches!(self.outcome, PvOutcome::Failed(_))
    }
}

impl fmt::Display for PvReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.name.as_deref().unwrap_or("(unnamed object)");
        let where_ = |r: &Resolved| {
            format!(
                "{} -> csi.volume.{} in {}, key csi.volume.{} in csi.volumes of {} \
                 (cluster ID {:?}, image id {})",
                r.image_spec(),
                r.entry.uuid,
                journal_spec(&r.image.name, &r.namespace),
                r.entry.pv_name,
                journal_spec(&r.journal.name, &r.namespace),
                r.cluster_id,
                r.entry.image_id
            )
        };
        match &self.outcome {
            PvOutcome::Done { outcome, resolved } => {
                write!(f, "{name}: {outcome}: {}", where_(resolved))?
            }
            PvOutcome::WouldDo { outcome, resolved } => {
                write!(f, "{name}: would be {outcome}: {}", where_(resolved))?
            }
            PvOutcome::Ignored(r) => write!(f, "{name}: skipped: {r}")?,
            PvOutcome::Failed(p) => write!(f, "{name}: FAILED, nothing changed: {p}")?,
        }
        write!(f, " [{}]", self.source)
    }
}

fn journal_spec(pool: &str, ns: &str) -> String {
    if ns.is_empty() {
        pool.to_owned()
    } else {
        format!("{pool}/{ns}")
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// ceph-csi's `--instanceid` (the directory is `csi.volumes.<instance>`).
    pub instance: String,
    /// Only report what would be written.
    pub dry_run: bool,
}

/// Handles one object against `cluster`. Blocking.
pub fn generate_one(
    cluster: &Arc<Cluster>,
    ctx: &PlanContext<'_>,
    opts: &Options,
    obj: &ManifestObject,
) -> PvReport {
    let name = plan::object_name(&obj.value).map(str::to_owned);
    let outcome = match plan::examine(&obj.value, ctx) {
        Verdict::Ignore(r) => PvOutcome::Ignored(r),
        Verdict::Reject(p) => PvOutcome::Failed(p),
        Verdict::Target(t) => match write(cluster, &t, opts) {
            Ok(o) => o,
            Err(p) => PvOutcome::Failed(p),
        },
    };
    PvReport {
        source: obj.source.clone(),
        name,
        outcome,
    }
}

fn write(
    cluster: &Arc<Cluster>,
    t: &plan::PvTarget,
    opts: &Options,
) -> Result<PvOutcome, PvProblem> {
    let lookup = RadosLookup::new(cluster);
    let r = plan::resolve(t, &lookup)?;
    let image = lookup.ioctx(r.image.id, &r.image.name, &r.namespace)?;
    let journal = if r.journal.id == r.image.id {
        Arc::clone(&image)
    } else {
        lookup.ioctx(r.journal.id, &r.journal.name, &r.namespace)?
    };
    if opts.dry_run {
        let stored = journal::read_stored(&journal, &image, &opts.instance, &r.entry)?;
        let plan = journal::diff(
            &r.entry,
            &Placement::of(&journal, &image, &opts.instance),
            &stored,
        )?;
        return Ok(PvOutcome::WouldDo {
            outcome: plan.outcome,
            resolved: Box::new(r),
        });
    }
    let outcome = journal::ensure(&journal, &image, &opts.instance, &r.entry)?;
    Ok(PvOutcome::Done {
        outcome,
        resolved: Box::new(r),
    })
}

/// Handles every object, in order. Blocking.
pub fn generate(
    cluster: &Arc<Cluster>,
    ctx: &PlanContext<'_>,
    opts: &Options,
    objects: &[ManifestObject],
) -> Vec<PvReport> {
    objects
        .iter()
        .map(|o| generate_one(cluster, ctx, opts, o))
        .collect()
}
