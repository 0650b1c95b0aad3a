//! Pool mode: replication of every image of a pool's RBD namespace,
//! including images created later, like `rbd mirror pool enable POOL pool`,
//! beside the per-image mode of EnableVolumeReplication.
//!
//! The setting lives on the primary's cluster, in the namespace's registry
//! object under the omap key [`POOL_MODE_KEY`] ([`PoolModeSettings`]: the
//! schedule new images get, and who turned it on). The replayer's local
//! pass ([`Engine::pool_mode_pass`], in the pools whose lease this process
//! holds) lists the images of each namespace in pool mode and enables every
//! image that has no registry record yet, through exactly the per-volume
//! [`Engine::enable`] (same per-volume lock, same first sync snapshot); so a
//! new image is picked up within one poll interval, or at once when
//! [`Engine::pool_mode_enable`] runs its first scan.
//!
//! Owns: the per-namespace setting and which images it enrolls. Must not:
//! enroll images whose names start with `csirr-` (drill images and the
//! like), or change an image any other way than Enable does. Turning pool
//! mode off enrolls nothing more; images already replicated stay so (their
//! DisableVolumeReplication ends that). Pool mode belongs on the primary's
//! site only: on the replica's site it would enroll a replica that the
//! replayer is creating before its record is written.

use std::collections::HashSet;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::error::{CephContext, EngineError, Result};
use super::registry::{REGISTRY_OBJECT, Registry, Schedule};
use super::{Engine, VolumeRequest};
use csirr_ceph::{ErrorKind, IoCtx};
use csirr_csi::params::{
    MIRRORING_MODE_KEY, ReplicationParams, SCHEDULING_INTERVAL_KEY, SCHEDULING_START_TIME_KEY,
};
use csirr_csi::volume_id::VolumeId;

/// The registry omap key that holds a namespace's pool-mode settings.
pub const POOL_MODE_KEY: &str = "pool_mode";
/// Images whose names start with this are never enrolled.
pub const RESERVED_PREFIX: &str = "csirr-";
/// Enables run at once by one scan.
const ENABLE_PARALLEL: usize = 8;

/// A namespace's pool-mode settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolModeSettings {
    /// Schedule of the images it enrolls.
    #[serde(default)]
    pub schedule: Schedule,
    /// Who turned it on and why (e.g. `migration to site-b`); free text.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub label: String,
    /// When it was turned on.
    pub enabled_at: DateTime<Utc>,
    /// The replicas of the clones it enrolls are flat copies
    /// (`replicaClones=flatten`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub flatten_clones: bool,
    /// The images it enrolls replicate in journal mode
    /// (`mirroringMode: journal`; the schedule is not used then).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub journal: bool,
}

impl PoolModeSettings {
    /// The Enable parameters of an image it enrolls.
    pub fn params(&self) -> Result<ReplicationParams> {
        let mut p = enable_params(&self.schedule, self.journal)?;
        p.flatten_replica = self.flatten_clones;
        Ok(p)
    }
}

/// How [`Engine::pool_mode_enable`] enrolls images.
#[derive(Debug, Clone, Default)]
pub struct PoolModeOptions {
    /// Schedule of the images it enrolls (snapshot mode).
    pub schedule: Schedule,
    /// Who turned it on and why; free text.
    pub label: String,
    /// Replicas of clones are flat copies.
    pub flatten_clones: bool,
    /// Journal mode instead of snapshot mode.
    pub journal: bool,
}

/// The validated Enable parameters of an enrolled image: `schedule` in
/// snapshot mode, or journal mode.
fn enable_params(schedule: &Schedule, journal: bool) -> Result<ReplicationParams> {
    let mut m = std::collections::HashMap::new();
    if journal {
        m.insert(MIRRORING_MODE_KEY.to_string(), "journal".to_string());
        return ReplicationParams::parse(&m)
            .map_err(|e| EngineError::InvalidArgument(e.to_string()));
    }
    if let Some(i) = &schedule.interval {
        m.insert(SCHEDULING_INTERVAL_KEY.to_string(), i.clone());
    }
    if let Some(s) = &schedule.start_time {
        m.insert(SCHEDULING_START_TIME_KEY.to_string(), s.clone());
    }
    ReplicationParams::parse(&m).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

/// The pool-mode settings of `io`'s namespace, if it is in pool mode.
/// Blocking.
pub fn read_settings(io: &IoCtx) -> Result<Option<PoolModeSettings>> {
    let m = match io.omap_get_vals_by_keys(REGISTRY_OBJECT, &[POOL_MODE_KEY]) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx(|| format!("reading the registry of {}", io.spec())),
    };
    m.get(POOL_MODE_KEY)
        .map(|v| {
            serde_json::from_slice(v).map_err(|e| {
                EngineError::Internal(format!(
                    "pool-mode settings in {} are corrupt: {e}",
                    io.spec()
                ))
            })
        })
        .transpose()
}

/// An image a scan enrolls.
struct Candidate {
    pool: String,
    namespace: String,
    image: String,
    params: ReplicationParams,
}

impl Engine {
    /// Turns pool mode on for `pool`'s namespace `namespace` (empty: the
    /// default one) with `schedule` (`flatten_clones`: the replicas of its
    /// clones are flat copies), and enrolls its images at once.
    /// Returns the settings and how many images were enabled now. Turning
    /// it on again replaces the schedule for images enrolled later.
    pub async fn pool_mode_enable(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
        opts: PoolModeOptions,
    ) -> Result<(PoolModeSettings, usize)> {
        super::pool::validate_target(pool, namespace)?;
        if opts.journal && (opts.schedule.interval.is_some() || opts.schedule.start_time.is_some())
        {
            return Err(EngineError::InvalidArgument(
                "journal mode replicates every write: it takes no schedule".into(),
            ));
        }
        enable_params(&opts.schedule, opts.journal)?;
        let settings = PoolModeSettings {
            schedule: opts.schedule,
            label: opts.label,
            enabled_at: Utc::now(),
            flatten_clones: opts.flatten_clones,
            journal: opts.journal,
        };
        let (p, ns, s) = (pool.to_string(), namespace.to_string(), settings.clone());
        self.run(move |e| {
            let io = e.namespace_ioctx(&p, &ns)?;
            let val =
                serde_json::to_vec(&s).map_err(|err| EngineError::Internal(err.to_string()))?;
            let mut op = csirr_ceph::WriteOp::new().ctx(|| "creating a write op".into())?;
            op.create(false);
            op.omap_set(&[(POOL_MODE_KEY, &val)]);
            op.operate(&io, REGISTRY_OBJECT)
                .ctx(|| format!("writing the pool-mode settings of {}", io.spec()))?;
            tracing::info!(pool = %io.spec(), schedule = ?s.schedule, label = %s.label, "pool mode enabled");
            Ok(())
        })
        .await?;
        let enabled = self.pool_mode_scan(vec![pool.to_string()]).await?;
        Ok((settings, enabled))
    }

    /// Turns pool mode off for the namespace (no image is enrolled any
    /// more; those replicated stay so). Returns the settings it had.
    pub async fn pool_mode_disable(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
    ) -> Result<Option<PoolModeSettings>> {
        super::pool::validate_target(pool, namespace)?;
        let (p, ns) = (pool.to_string(), namespace.to_string());
        self.run(move |e| {
            let io = e.namespace_ioctx(&p, &ns)?;
            let old = read_settings(&io)?;
            if old.is_some() {
                io.omap_rm_keys(REGISTRY_OBJECT, &[POOL_MODE_KEY])
                    .ctx(|| format!("removing the pool-mode settings of {}", io.spec()))?;
                tracing::info!(pool = %io.spec(), "pool mode disabled");
            }
            Ok(old)
        })
        .await
    }

    /// The namespace's pool-mode settings, if on.
    pub async fn pool_mode_get(
        self: &Arc<Self>,
        pool: &str,
        namespace: &str,
    ) -> Result<Option<PoolModeSettings>> {
        super::pool::validate_target(pool, namespace)?;
        let (p, ns) = (pool.to_string(), namespace.to_string());
        self.run(move |e| read_settings(&*e.namespace_ioctx(&p, &ns)?))
            .await
    }

    /// The ioctx of one namespace of `pool` (empty: the default one);
    /// `NotFound` when either does not exist. Blocking.
    pub(crate) fn namespace_ioctx(&self, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        let ns = (!namespace.is_empty()).then_some(namespace);
        self.pool_ioctxs(pool, ns)?
            .into_iter()
            .find(|i| i.namespace() == namespace)
            .ok_or_else(|| EngineError::NotFound(format!("pool {pool} has no namespace {ns:?}")))
    }

    /// The replayer's pass over the pools whose lease this process holds:
    /// enrolls the new images of every namespace in pool mode. Errors are
    /// logged per image and pool; the next pass tries again.
    pub async fn pool_mode_pass(self: &Arc<Self>, pools: Vec<String>) {
        if let Err(e) = self.pool_mode_scan(pools).await {
            tracing::warn!(error = %e, "pool-mode scan failed");
        }
    }

    /// Enrolls the images of `pools` in pool mode that have no registry
    /// record; returns how many were enabled.
    async fn pool_mode_scan(self: &Arc<Self>, pools: Vec<String>) -> Result<usize> {
        let found = self.run(move |e| e.pool_mode_candidates(&pools)).await?;
        if found.is_empty() {
            return Ok(0);
        }
        let enabled = futures::stream::iter(found)
            .map(|c| {
                let me = Arc::clone(self);
                async move {
                    let volume = VolumeId::Spec {
                        pool: c.pool.clone(),
                        namespace: (!c.namespace.is_empty()).then(|| c.namespace.clone()),
                        image: c.image.clone(),
                    };
                    let req = VolumeRequest {
                        volume: volume.clone(),
                        creds: None,
                    };
                    match me.enable(req, c.params).await {
                        Ok(()) => {
                            tracing::info!(volume = %volume, "pool mode: new image enrolled");
                            1
                        }
                        Err(e) => {
                            tracing::info!(volume = %volume, error = %e, "pool mode: cannot enroll the image yet");
                            0
                        }
                    }
                }
            })
            .buffer_unordered(ENABLE_PARALLEL)
            .collect::<Vec<usize>>()
            .await;
        Ok(enabled.into_iter().sum())
    }

    /// Images of `pools`' namespaces in pool mode without a registry
    /// record. Blocking.
    fn pool_mode_candidates(&self, pools: &[String]) -> Result<Vec<Candidate>> {
        let mut out = Vec::new();
        for pool in pools {
            // One pool that cannot be read does not hold the others up.
            let ios = match self.pool_ioctxs(pool, None) {
                Ok(i) => i,
                Err(e) => {
                    tracing::debug!(pool = %pool, error = %e, "pool mode: cannot list the namespaces");
                    continue;
                }
            };
            for io in ios {
                let settings = match read_settings(&io) {
                    Ok(Some(s)) => s,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(pool = %io.spec(), error = %e, "pool mode: cannot read the settings");
                        continue;
                    }
                };
                let params = settings.params()?;
                let known: HashSet<String> = Registry::new(Arc::clone(&io))
                    .list()?
                    .into_iter()
                    .map(|r| r.image_name)
                    .collect();
                for spec in csirr_ceph::rbd::list(&io)
                    .ctx(|| format!("listing the images of {}", io.spec()))?
                {
                    if known.contains(&spec.name) || spec.name.starts_with(RESERVED_PREFIX) {
                        continue;
                    }
                    out.push(Candidate {
                        pool: pool.clone(),
                        namespace: io.namespace().to_string(),
                        image: spec.name,
                        params: params.clone(),
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_give_enable_parameters() {
        let s = PoolModeSettings {
            schedule: Schedule {
                interval: Some("1m".into()),
                start_time: None,
            },
            label: "migration to site-b".into(),
            enabled_at: Utc::now(),
            flatten_clones: false,
            journal: false,
        };
        let j = serde_json::to_vec(&s).unwrap();
        let back: PoolModeSettings = serde_json::from_slice(&j).unwrap();
        assert_eq!(back, s);
        assert!(s.params().is_ok());
        let bad = Schedule {
            interval: Some("every minute".into()),
            start_time: None,
        };
        assert!(matches!(
            enable_params(&bad, false),
            Err(EngineError::InvalidArgument(_))
        ));
    }

    #[test]
    fn journal_pool_mode_enrolls_in_journal_mode() {
        use csirr_csi::params::MirroringMode;
        let mut s = PoolModeSettings {
            schedule: Schedule::default(),
            label: String::new(),
            enabled_at: Utc::now(),
            flatten_clones: true,
            journal: true,
        };
        let p = s.params().unwrap();
        assert_eq!(p.mirroring_mode, MirroringMode::Journal);
        assert!(p.flatten_replica);
        // Settings written before the mode existed read as snapshot mode.
        s.journal = false;
        let old = serde_json::to_value(&s).unwrap();
        assert!(old.get("journal").is_none(), "{old}");
        let back: PoolModeSettings = serde_json::from_value(old).unwrap();
        assert_eq!(
            back.params().unwrap().mirroring_mode,
            MirroringMode::Snapshot
        );
    }
}
