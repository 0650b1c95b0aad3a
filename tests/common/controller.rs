//! A test driver that calls a sidecar the way the csi-addons
//! VolumeReplication controller does: the same calls, in the same order, with
//! the same retry rules and requeue intervals (scaled down by [`SCALE`]), and
//! the VolumeReplication status it would write. On top of it, Ramen's
//! orchestrations drive two of them.
//!
//! The reconcile rules (kubernetes-csi-addons, volumereplication_controller):
//! - primary: while the status is not Primary, Enable, then Promote without
//!   force, and with force when the answer is FAILED_PRECONDITION; then
//!   GetVolumeReplicationInfo (NOT_FOUND and UNIMPLEMENTED are "no info";
//!   any other error fails the reconcile before the status is written) and
//!   a requeue at half the scheduling interval (the interval itself below
//!   two minutes);
//! - secondary: the first time Demote and a 15 s requeue; then Demote and
//!   Resync (force = autoResync), requeued after 30 s while not ready; an
//!   error while secondary requeues after 15 s;
//! - delete: Disable, NOT_FOUND counts as success;
//! - every call has a 3-minute deadline; a failed reconcile is retried with
//!   controller-runtime's exponential backoff.
//!
//! A VolumeReplication whose data source is a VolumeGroupReplication (what
//! the VolumeGroupReplication controller creates for a group, once its
//! content controller made the group with CreateVolumeGroup) reconciles the
//! same way with `replication_source.volumegroup`: [`VolumeReplication::group`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use csi_rbd_replicator::grpc::proto::replication as pb;
use tonic::Code;

use super::{Sidecar, Site, group_source, secrets, source};

/// Real controller time divided by this: 15 s requeues become 1.5 s.
pub const SCALE: u32 = 10;

/// The VolumeReplication's `spec.replicationState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Desired {
    /// `primary`.
    Primary,
    /// `secondary`.
    Secondary,
}

/// The VolumeReplication's `status.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum State {
    /// Not reconciled yet.
    #[default]
    Unknown,
    /// `Primary`.
    Primary,
    /// `Secondary`.
    Secondary,
}

/// The part of a VolumeReplication's status the controller writes.
#[derive(Debug, Clone, Default)]
pub struct VrStatus {
    /// `status.state`.
    pub state: State,
    /// `status.message`.
    pub message: String,
    /// Condition Degraded.
    pub degraded: bool,
    /// Condition Resyncing.
    pub resyncing: bool,
    /// `status.lastSyncTime`, seconds.
    pub last_sync_time: Option<i64>,
    /// Every call made, in order, with its outcome code (for assertions).
    pub calls: Vec<(String, Code)>,
}

/// One VolumeReplication and its reconcile loop, against one sidecar.
pub struct VolumeReplication<'a> {
    /// The sidecar of the VolumeReplication's cluster.
    pub sc: &'a Sidecar,
    /// The volume ID the PersistentVolume's handle carries.
    pub vid: String,
    /// The VolumeReplicationClass' parameters (prefixed keys removed).
    pub params: HashMap<String, String>,
    /// `spec.autoResync`.
    pub auto_resync: bool,
    /// `spec.replicationState`; `None` once deleted.
    pub desired: Option<Desired>,
    /// What the controller wrote.
    pub status: VrStatus,
    /// When the next reconcile is due.
    pub due: Instant,
    backoff: Duration,
    deleted: bool,
    /// `vid` is a volume group ID.
    group: bool,
}

/// One call's deadline: 3 minutes, scaled.
fn deadline() -> Duration {
    Duration::from_secs(180) / SCALE
}

fn scaled(secs: u64) -> Duration {
    Duration::from_secs(secs) / SCALE
}

impl<'a> VolumeReplication<'a> {
    /// A VolumeReplication of `vid` on `sc`'s cluster with class `params`.
    pub fn new(sc: &'a Sidecar, vid: &str, params: &[(&str, &str)], desired: Desired) -> Self {
        Self {
            sc,
            vid: vid.to_string(),
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            auto_resync: false,
            desired: Some(desired),
            status: VrStatus::default(),
            due: Instant::now(),
            backoff: Duration::from_millis(5),
            deleted: false,
            group: false,
        }
    }

    /// The VolumeReplication of volume group `group_id` on `sc`'s cluster,
    /// as the VolumeGroupReplication controller creates it.
    pub fn group(
        sc: &'a Sidecar,
        group_id: &str,
        params: &[(&str, &str)],
        desired: Desired,
    ) -> Self {
        Self {
            group: true,
            ..Self::new(sc, group_id, params, desired)
        }
    }

    /// The replication source of every call.
    fn src(&self) -> Option<pb::ReplicationSource> {
        if self.group {
            group_source(&self.vid)
        } else {
            source(&self.vid)
        }
    }

    /// The site of the sidecar.
    pub fn site(&self) -> Site {
        self.sc.site
    }

    /// Changes `spec.replicationState` (a generation change: reconciled now).
    pub fn set(&mut self, d: Desired) {
        self.desired = Some(d);
        self.due = Instant::now();
    }

    /// Deletes the VolumeReplication (its finalizer calls Disable).
    pub fn delete(&mut self) {
        self.desired = None;
        self.due = Instant::now();
    }

    /// Whether the deletion finished (the finalizer was removed).
    pub fn gone(&self) -> bool {
        self.deleted
    }

    fn note<T>(&mut self, rpc: &str, r: &Result<T, tonic::Status>) {
        let code = r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
        self.status.calls.push((rpc.to_string(), code));
    }

    /// One reconcile, then schedules the next.
    pub async fn reconcile(&mut self) {
        let outcome = match self.desired {
            None => self.finalize().await,
            Some(Desired::Primary) => self.primary().await,
            Some(Desired::Secondary) => self.secondary().await,
        };
        match outcome {
            Ok(Some(after)) => {
                self.backoff = Duration::from_millis(5);
                self.due = Instant::now() + after;
            }
            Ok(None) => {
                self.backoff = Duration::from_millis(5);
                // Nothing to requeue: reconciled again on the next change,
                // or on a resync period far away.
                self.due = Instant::now() + Duration::from_secs(3600);
            }
            Err(msg) => {
                // controller-runtime's rate limiter: exponential, capped.
                self.status.message = msg;
                self.due = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(scaled(300));
            }
        }
    }

    async fn finalize(&mut self) -> Result<Option<Duration>, String> {
        if self.deleted {
            return Ok(None);
        }
        let mut c = self.sc.controller().await;
        let mut rq = tonic::Request::new(pb::DisableVolumeReplicationRequest {
            replication_source: self.src(),
            secrets: secrets(self.site()),
            parameters: self.params.clone(),
            ..Default::default()
        });
        rq.set_timeout(deadline());
        let r = c.disable_volume_replication(rq).await;
        self.note("Disable", &r);
        match r {
            Ok(_) => {}
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(format!("disable: {s:?}")),
        }
        self.deleted = true;
        Ok(None)
    }

    async fn primary(&mut self) -> Result<Option<Duration>, String> {
        let mut c = self.sc.controller().await;
        if self.status.state != State::Primary {
            let mut rq = tonic::Request::new(pb::EnableVolumeReplicationRequest {
                replication_source: self.src(),
                secrets: secrets(self.site()),
                parameters: self.params.clone(),
                ..Default::default()
            });
            rq.set_timeout(deadline());
            let r = c.enable_volume_replication(rq).await;
            self.note("Enable", &r);
            if let Err(s) = r {
                return Err(format!("enable: {s:?}"));
            }
            let r = self.promote(&mut c, false).await;
            match r {
                Ok(()) => {}
                Err(s) if s.code() == Code::FailedPrecondition => {
                    self.promote(&mut c, true)
                        .await
                        .map_err(|s| format!("force promote: {s:?}"))?;
                }
                Err(s) => return Err(format!("promote: {s:?}")),
            }
        }
        let mut rq = tonic::Request::new(pb::GetVolumeReplicationInfoRequest {
            replication_source: self.src(),
            secrets: secrets(self.site()),
            ..Default::default()
        });
        rq.set_timeout(deadline());
        let r = c.get_volume_replication_info(rq).await;
        self.note("GetInfo", &r);
        match r {
            Ok(info) => {
                if let Some(t) = info.into_inner().last_sync_time {
                    self.status.last_sync_time = Some(t.seconds);
                }
            }
            Err(s) if matches!(s.code(), Code::NotFound | Code::Unimplemented) => {}
            // The status is not written: the reconcile fails.
            Err(s) => return Err(format!("get info: {s:?}")),
        }
        self.status.state = State::Primary;
        self.status.message = "volume is marked primary".into();
        self.status.degraded = false;
        self.status.resyncing = false;
        let interval = self
            .params
            .get("schedulingInterval")
            .and_then(|i| parse_go_duration(i))
            .unwrap_or(Duration::from_secs(300));
        let requeue = if interval < Duration::from_secs(120) {
            interval
        } else {
            interval / 2
        };
        Ok(Some(requeue / SCALE))
    }

    async fn promote(
        &mut self,
        c: &mut pb::controller_client::ControllerClient<tonic::transport::Channel>,
        force: bool,
    ) -> Result<(), tonic::Status> {
        let mut rq = tonic::Request::new(pb::PromoteVolumeRequest {
            replication_source: self.src(),
            secrets: secrets(self.site()),
            parameters: self.params.clone(),
            force,
            ..Default::default()
        });
        rq.set_timeout(deadline());
        let r = c.promote_volume(rq).await;
        self.note(if force { "Promote(force)" } else { "Promote" }, &r);
        r.map(|_| ())
    }

    async fn demote(
        &mut self,
        c: &mut pb::controller_client::ControllerClient<tonic::transport::Channel>,
    ) -> Result<(), tonic::Status> {
        let mut rq = tonic::Request::new(pb::DemoteVolumeRequest {
            replication_source: self.src(),
            secrets: secrets(self.site()),
            parameters: self.params.clone(),
            ..Default::default()
        });
        rq.set_timeout(deadline());
        let r = c.demote_volume(rq).await;
        self.note("Demote", &r);
        r.map(|_| ())
    }

    async fn secondary(&mut self) -> Result<Option<Duration>, String> {
        let mut c = self.sc.controller().await;
        if self.status.state != State::Secondary {
            return match self.demote(&mut c).await {
                Ok(()) => {
                    self.status.state = State::Secondary;
                    self.status.degraded = true;
                    self.status.message = "volume is marked secondary and is degraded".into();
                    Ok(Some(scaled(15)))
                }
                Err(s) => Err(format!("demote: {s:?}")),
            };
        }
        if let Err(s) = self.demote(&mut c).await {
            self.status.message = format!("demote: {s:?}");
            return Ok(Some(scaled(15)));
        }
        let mut rq = tonic::Request::new(pb::ResyncVolumeRequest {
            replication_source: self.src(),
            secrets: secrets(self.site()),
            parameters: self.params.clone(),
            force: self.auto_resync,
            ..Default::default()
        });
        rq.set_timeout(deadline());
        let r = c.resync_volume(rq).await;
        self.note("Resync", &r);
        match r {
            Ok(r) => {
                self.status.last_sync_time = None;
                if r.into_inner().ready {
                    self.status.degraded = false;
                    self.status.resyncing = false;
                    self.status.message = "volume is marked secondary".into();
                    Ok(None)
                } else {
                    self.status.degraded = true;
                    self.status.resyncing = true;
                    self.status.message = "volume is degraded".into();
                    Ok(Some(scaled(30)))
                }
            }
            Err(s) => {
                self.status.message = format!("resync: {s:?}");
                Ok(Some(scaled(15)))
            }
        }
    }
}

/// Go's `time.ParseDuration` for the shapes a schedulingInterval takes
/// (`10s`, `5m`, `1h`); `d` is not a Go unit, as in the controller.
fn parse_go_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    match unit {
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n * 60)),
        "h" => Some(Duration::from_secs(n * 3600)),
        _ => None,
    }
}

/// Runs the reconcile loops of `vrs` (each when it is due) until `done`
/// holds, or panics after `timeout` with every VolumeReplication's status.
pub async fn run_until(
    what: &str,
    vrs: &mut [&mut VolumeReplication<'_>],
    timeout: Duration,
    mut done: impl FnMut(&[&mut VolumeReplication<'_>]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        if done(vrs) {
            return;
        }
        if Instant::now() > deadline {
            let states: Vec<String> = vrs
                .iter()
                .map(|v| format!("{} {:?}: {:?}", v.site().id(), v.desired, v.status))
                .collect();
            panic!(
                "{what}: did not converge within {timeout:?}\n{}",
                states.join("\n")
            );
        }
        let Some(next) = vrs.iter_mut().min_by_key(|v| v.due) else {
            return;
        };
        let wait = next.due.saturating_duration_since(Instant::now());
        // Check `done` at least every 200 ms while waiting.
        if wait > Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        tokio::time::sleep(wait).await;
        next.reconcile().await;
    }
}
