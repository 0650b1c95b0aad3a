//! `serve --watch-pvs` (cargo feature `kube`): watches PersistentVolumes with
//! kube-rs and generates the journal entries of this driver's PVs on the
//! local cluster as they appear, through the same tested core as
//! `omap-generate` ([`super::plan`], [`super::generate`]). One replica works
//! at a time: the holder of a `coordination.k8s.io/v1` Lease
//! ([`super::lease`] decides). Besides the watch events, every known PV is
//! checked again every `--pv-resync`, so that a PV whose image had not been
//! replicated yet gets its entry once the image arrives.
//!
//! Thin on purpose: no Kubernetes runs in this project's tests, so all the
//! logic that can be wrong lives in the pure modules, which are tested.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use csirr_ceph::Cluster;
use csirr_csi::config::{ClusterConfig, ClusterMapping, CsiConfig};

use super::generate::{self, Options, PvOutcome};
use super::journal::Outcome;
use super::lease::{self, Decision, LeaseState};
use super::manifest::ManifestObject;
use super::plan::{self, PlanContext, PvProblem, Verdict};

/// How long a Lease lasts unless renewed.
const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews it (and a follower retries).
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// Connects (or returns the cached connection) to the local cluster.
pub type Connect = Arc<dyn Fn() -> Result<Arc<Cluster>, String> + Send + Sync>;

/// Configuration of the watch.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// The CSI driver whose PVs are ours.
    pub driver: String,
    /// ceph-csi's `config.json`.
    pub csi_config: CsiConfig,
    /// ceph-csi's cluster mapping.
    pub mapping: ClusterMapping,
    /// The local cluster.
    pub local: ClusterConfig,
    /// ceph-csi's `--instanceid`.
    pub instance: String,
    /// Namespace of the Lease; `None`: the client's default namespace.
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    pub lease_name: String,
    /// How often every known PV is checked again.
    pub resync: Duration,
}

impl WatchConfig {
    fn ctx(&self) -> PlanContext<'_> {
        PlanContext {
            driver: &self.driver,
            csi_config: &self.csi_config,
            mapping: &self.mapping,
            local: &self.local,
        }
    }
}

/// Runs the leader election and, while leading, the watch, until `cancel`.
pub async fn run(cfg: WatchConfig, connect: Connect, cancel: CancellationToken) {
    let cfg = Arc::new(cfg);
    let me = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "csi-rbd-replicator".into()),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                tracing::warn!(error = %e, "PV watch: cannot reach the Kubernetes API; retrying");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(10)) => {}
                }
            }
        }
    };
    let ns = cfg
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    tracing::info!(lease = %cfg.lease_name, namespace = %ns, identity = %me, "PV watch: electing a leader");
    let mut worker: Option<(CancellationToken, tokio::task::JoinHandle<()>)> = None;
    let mut last_renewed: Option<Instant> = None;
    loop {
        let leads = match try_lead(&leases, &cfg.lease_name, &me).await {
            Ok(l) => {
                if l {
                    last_renewed = Some(Instant::now());
                }
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, "PV watch: cannot read or renew the Lease");
                // Keep working only while our last renewal surely holds.
                worker.is_some()
                    && last_renewed.is_some_and(|t| t.elapsed() < LEASE_DURATION * 2 / 3)
            }
        };
        match (leads, worker.is_some()) {
            (true, false) => {
                tracing::info!("PV watch: leading; watching PersistentVolumes");
                let token = cancel.child_token();
                let task = tokio::spawn(work(
                    Arc::clone(&cfg),
                    client.clone(),
                    Arc::clone(&connect),
                    token.clone(),
                ));
                worker = Some((token, task));
            }
            (false, true) => {
                tracing::info!("PV watch: lost the Lease; stopping the watch");
                if let Some((token, task)) = worker.take() {
                    token.cancel();
                    let _ = task.await;
                }
            }
            _ => {}
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(RENEW_EVERY) => {}
        }
    }
    if let Some((token, task)) = worker.take() {
        token.cancel();
        let _ = task.await;
        release(&leases, &cfg.lease_name, &me).await;
    }
}

fn micro(t: DateTime<Utc>) -> Option<MicroTime> {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32)
        .ok()
        .map(MicroTime)
}

fn chrono_of(t: &MicroTime) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.0.as_second(), t.0.subsec_nanosecond().max(0) as u32)
}

fn state_of(l: &Lease) -> LeaseState {
    let spec = l.spec.as_ref();
    LeaseState {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renew_time: spec.and_then(|s| s.renew_time.as_ref()).and_then(chrono_of),
        duration: spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|d| u64::try_from(d).ok())
            .map(Duration::from_secs),
    }
}

/// One round of the election: create, take over or renew the Lease if the
/// decision says so. `Ok(true)` when we hold it afterwards.
async fn try_lead(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Utc::now();
    let current = api.get_opt(name).await?;
    let decision = lease::decide(
        current.as_ref().map(state_of).as_ref(),
        me,
        now,
        LEASE_DURATION,
    );
    let secs = LEASE_DURATION.as_secs() as i32;
    let res = match (decision, current) {
        (Decision::Follow { .. }, _) => return Ok(false),
        (Decision::Create, _) | (_, None) => {
            let l = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_owned()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: micro(now),
                    renew_time: micro(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &l).await
        }
        (d, Some(mut l)) => {
            let spec = l.spec.get_or_insert_with(Default::default);
            if d == Decision::TakeOver {
                spec.holder_identity = Some(me.to_owned());
                spec.acquire_time = micro(now);
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.renew_time = micro(now);
            spec.lease_duration_seconds = Some(secs);
            // `l` carries the resourceVersion read above: a concurrent
            // writer makes this a conflict instead of two leaders.
            api.replace(name, &PostParams::default(), &l).await
        }
    };
    match res {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up on shutdown so that another replica takes over at once.
async fn release(api: &Api<Lease>, name: &str, me: &str) {
    let Ok(Some(mut l)) = api.get_opt(name).await else {
        return;
    };
    let Some(spec) = l.spec.as_mut() else { return };
    if spec.holder_identity.as_deref() != Some(me) {
        return;
    }
    spec.holder_identity = None;
    if let Err(e) = api.replace(name, &PostParams::default(), &l).await {
        tracing::debug!(error = %e, "PV watch: could not release the Lease");
    }
}

/// The watch itself, while leading.
async fn work(cfg: Arc<WatchConfig>, client: Client, connect: Connect, cancel: CancellationToken) {
    let pvs: Api<PersistentVolume> = Api::all(client);
    let (store, writer) = reflector::store();
    let stream = reflector(writer, watcher(pvs, watcher::Config::default()))
        .default_backoff()
        .applied_objects();
    let mut stream = pin!(stream);
    let mut resync = tokio::time::interval(cfg.resync);
    resync.tick().await;
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = stream.next() => match ev {
                Some(Ok(pv)) => handle(&cfg, &connect, &pv).await,
                Some(Err(e)) => tracing::warn!(error = %e, "PV watch: watch error; retrying"),
                None => break,
            },
            _ = resync.tick() => {
                for pv in store.state() {
                    if cancel.is_cancelled() {
                        break;
                    }
                    handle(&cfg, &connect, &pv).await;
                }
            }
        }
    }
}

/// Generates the entry of one PV (on the blocking pool) and logs the result.
async fn handle(cfg: &Arc<WatchConfig>, connect: &Connect, pv: &PersistentVolume) {
    let name = pv.metadata.name.clone().unwrap_or_default();
    let mut value = match serde_json::to_value(pv) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(pv = %name, error = %e, "PV watch: cannot encode the PV");
            return;
        }
    };
    if let Some(o) = value.as_object_mut() {
        o.entry("kind").or_insert_with(|| "PersistentVolume".into());
    }
    // Not ours: decided without touching Ceph.
    if let Verdict::Ignore(reason) = plan::examine(&value, &cfg.ctx()) {
        tracing::trace!(pv = %name, %reason, "PV watch: skipped");
        return;
    }
    let (cfg2, connect2) = (Arc::clone(cfg), Arc::clone(connect));
    let res = tokio::task::spawn_blocking(move || {
        let cluster = connect2()?;
        let opts = Options {
            instance: cfg2.instance.clone(),
            dry_run: false,
        };
        let obj = ManifestObject {
            source: "watch".into(),
            value,
        };
        Ok::<_, String>(generate::generate_one(&cluster, &cfg2.ctx(), &opts, &obj))
    })
    .await;
    match res {
        Ok(Ok(report)) => match &report.outcome {
            PvOutcome::Done {
                outcome: Outcome::Unchanged,
                ..
            }
            | PvOutcome::Ignored(_) => tracing::debug!(pv = %name, "{report}"),
            PvOutcome::Failed(PvProblem::ImageMissing { .. }) => {
                tracing::info!(pv = %name, "{report}")
            }
            PvOutcome::Failed(_) => tracing::warn!(pv = %name, "{report}"),
            _ => tracing::info!(pv = %name, "{report}"),
        },
        Ok(Err(e)) => {
            tracing::warn!(pv = %name, error = %e, "PV watch: cannot reach the local cluster")
        }
        Err(e) => tracing::error!(pv = %name, error = %e, "PV watch: task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_times_round_trip() {
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_000).unwrap();
        let m = micro(t).unwrap();
        assert_eq!(chrono_of(&m), Some(t));
        let l = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some("a".into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(m),
                ..Default::default()
            }),
        };
        let s = state_of(&l);
        assert_eq!(s.holder.as_deref(), Some("a"));
        assert_eq!(s.renew_time, Some(t));
        assert_eq!(s.duration, Some(Duration::from_secs(15)));
    }

    #[test]
    fn k8s_openapi_pv_reads_like_kubectl_output() {
        // What the watcher hands over must look like `kubectl get pv -o
        // json` to the pure core.
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": "pvc-1"},
            "spec": {"csi": {"driver": "other.csi", "volumeHandle": "x"}}
        }))
        .unwrap();
        let v = serde_json::to_value(&pv).unwrap();
        assert_eq!(v["kind"], "PersistentVolume");
        assert_eq!(v["spec"]["csi"]["driver"], "other.csi");
    }
}
