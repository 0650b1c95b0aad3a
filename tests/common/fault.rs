//! Fault injection for the fault-class tests: a Ceph daemon hung (SIGSTOP) or
//! stopped, the netns pair's inter-site link cut. Each fault is a guard that
//! undoes it on drop, also when an assertion fails. [`Watch`] calls the
//! sidecars' RPCs all through a fault and [`check_calls`] asserts that every
//! call was answered within its deadline with a sensible answer.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use csi_rbd_replicator::grpc::proto::identity::ProbeRequest;
use csi_rbd_replicator::grpc::proto::identity::identity_client::IdentityClient;
use csi_rbd_replicator::grpc::proto::replication::controller_client::ControllerClient;

use super::{Sidecar, Site, channel_to, env, info_req};

/// A daemon of one site of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Daemon {
    /// The monitor (`mon.a`).
    Mon,
    /// The OSD (`osd.0`).
    Osd,
}

impl Daemon {
    /// The word `ceph-pair.sh stop|start` takes.
    pub fn word(self) -> &'static str {
        match self {
            Daemon::Mon => "mon",
            Daemon::Osd => "osd",
        }
    }

    fn id(self) -> &'static str {
        match self {
            Daemon::Mon => "mon.a",
            Daemon::Osd => "osd.0",
        }
    }
}

/// The pid of a running daemon, from its pid file.
pub fn daemon_pid(site: Site, d: Daemon) -> String {
    let pidf = format!("{}/{}/run/{}.pid", env("CSIRR_PAIR_DIR"), site.id(), d.id());
    std::fs::read_to_string(&pidf)
        .unwrap_or_else(|e| panic!("{pidf}: {e}"))
        .trim()
        .to_string()
}

/// `kill -SIG pid`; false if it failed.
fn signal(pid: &str, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), pid])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ceph-pair.sh ARGS` without panicking (for guards); false on failure.
fn pair_script(args: &[&str]) -> bool {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dev/ceph-pair.sh");
    match Command::new("bash").arg(script).args(args).output() {
        Ok(o) if o.status.success() => true,
        Ok(o) => {
            eprintln!(
                "ceph-pair.sh {args:?} failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            false
        }
        Err(e) => {
            eprintln!("ceph-pair.sh {args:?}: {e}");
            false
        }
    }
}

/// A daemon frozen with SIGSTOP (not a clean stop: its sockets stay open and
/// nothing answers); SIGCONT on drop.
pub struct Hung {
    what: String,
    pid: String,
}

impl Hung {
    /// Freezes `d` of `site`.
    pub fn new(site: Site, d: Daemon) -> Hung {
        let pid = daemon_pid(site, d);
        assert!(signal(&pid, "STOP"), "kill -STOP {pid}");
        let what = format!("{} {}", site.id(), d.id());
        eprintln!("fault: {what} (pid {pid}) hung");
        Hung { what, pid }
    }
}

impl Drop for Hung {
    fn drop(&mut self) {
        if signal(&self.pid, "CONT") {
            eprintln!("fault: {} resumed", self.what);
        } else {
            eprintln!("fault: SIGCONT to {} (pid {}) failed", self.what, self.pid);
        }
    }
}

/// A daemon killed (`ceph-pair.sh stop`); started again on drop, which
/// waits until it is back.
pub struct Stopped {
    site: Site,
    d: Daemon,
}

impl Stopped {
    /// Stops `d` of `site`.
    pub fn new(site: Site, d: Daemon) -> Stopped {
        super::pair_ctl(&["stop", site.id(), d.word()]);
        eprintln!("fault: {} {} stopped", site.id(), d.id());
        Stopped { site, d }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if pair_script(&["start", self.site.id(), self.d.word()]) {
            eprintln!("fault: {} {} started again", self.site.id(), self.d.id());
        }
    }
}

/// A PG as `ceph pg ls` lists it.
#[derive(Debug, Clone)]
struct Pg {
    id: String,
    state: String,
    primary: i64,
}

/// Every PG of `site` (`ceph pg ls`), as the mgr last heard of it; None if
/// the cluster did not answer.
fn pg_states(site: Site) -> Option<Vec<Pg>> {
    let o = super::ceph(site, &["--connect-timeout", "10", "pg", "ls", "-f", "json"]);
    if !o.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    let stats = v.get("pg_stats").unwrap_or(&v).as_array()?;
    stats
        .iter()
        .map(|p| {
            Some(Pg {
                id: p["pgid"].as_str()?.to_string(),
                state: p["state"].as_str()?.to_string(),
                primary: p["acting_primary"].as_i64().unwrap_or(-1),
            })
        })
        .collect()
}

/// Whether a PG state is active and clean, and serves reads: a scrub is
/// fine; laggy, wait (read leases), stale or anything peering is not.
fn clean(state: &str) -> bool {
    let flags: Vec<&str> = state.split('+').collect();
    flags.contains(&"active")
        && flags.contains(&"clean")
        && flags
            .iter()
            .all(|f| matches!(*f, "active" | "clean" | "scrubbing" | "deep" | "snaptrim"))
}

/// Whether a PG that is not clean gets there without help: the mgr has not
/// heard of it since its OSD returned, or it is peering or being created.
fn transient(state: &str) -> bool {
    state.split('+').any(|f| {
        matches!(
            f,
            "stale" | "unknown" | "peering" | "activating" | "creating" | "remapped"
        )
    })
}

/// Runs `ceph ARGS` on `site` without panicking; the error text if it failed.
fn ceph_try(site: Site, args: &[&str]) -> Result<(), String> {
    let o = super::ceph(site, args);
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

/// After an OSD of `site` was hung (SIGSTOP, then SIGCONT), re-peers every
/// PG that is not `active+clean` (scrubs aside) until all of them have been
/// `active+clean` for a settle window; panics after `timeout`. Returns what
/// it did, for the test's output.
///
/// On Ceph 16 (Pacific) a PG whose primary was paused can stay laggy,
/// "waiting for readable", after SIGCONT (read leases; ceph/ceph PR 71663):
/// reads of its objects hang until it re-peers. It is the operators'
/// workaround (README, Operations), not the sidecar's job. `ceph pg repeer`
/// needs another OSD to map the PG to: on a one-OSD cluster (the dev pair)
/// it fails with EAGAIN, and the OSD is marked down instead, once (it marks
/// itself up again at once and re-peers every PG, like a restart). The mgr
/// publishes PG states every few seconds, so a first clean listing right
/// after SIGCONT may predate the lease check: the window is 15 s.
pub async fn repeer_until_clean(site: Site, timeout: Duration) -> Vec<String> {
    const SETTLE: Duration = Duration::from_secs(15);
    // Time for a re-peer to show before the same PG is handled again.
    const AGAIN: Duration = Duration::from_secs(20);
    let deadline = Instant::now() + timeout;
    let mut clean_since: Option<Instant> = None;
    let mut acted: BTreeMap<String, Instant> = BTreeMap::new();
    let mut done = Vec::new();
    loop {
        let pgs = tokio::task::spawn_blocking(move || pg_states(site))
            .await
            .expect("pg ls");
        let unclean: Vec<Pg> = pgs
            .iter()
            .flatten()
            .filter(|p| !clean(&p.state))
            .cloned()
            .collect();
        if pgs.is_none() || !unclean.is_empty() {
            clean_since = None;
        } else if clean_since.get_or_insert_with(Instant::now).elapsed() >= SETTLE {
            return done;
        }
        for pg in unclean.iter().filter(|p| !transient(&p.state)) {
            let key = format!("pg {}", pg.id);
            let osd = format!("osd {}", pg.primary);
            // An OSD is marked down once per call: a second flap while
            // its PGs still re-peer helps nothing.
            if acted.get(&key).is_some_and(|t| t.elapsed() < AGAIN) || acted.contains_key(&osd) {
                continue;
            }
            eprintln!(
                "fault: {} pg {} is {}: ceph pg repeer",
                site.id(),
                pg.id,
                pg.state
            );
            acted.insert(key, Instant::now());
            let r = ceph_try(site, &["--connect-timeout", "10", "pg", "repeer", &pg.id]);
            match r {
                Ok(()) => done.push(format!("repeer {} ({})", pg.id, pg.state)),
                Err(e) if pg.primary >= 0 => {
                    eprintln!(
                        "fault: ceph pg repeer {}: {e}; ceph osd down {}",
                        pg.id, pg.primary
                    );
                    acted.insert(osd, Instant::now());
                    let id = pg.primary.to_string();
                    match ceph_try(site, &["--connect-timeout", "10", "osd", "down", &id]) {
                        Ok(()) => done.push(format!("osd down {id} for {} ({})", pg.id, pg.state)),
                        Err(e) => eprintln!("fault: ceph osd down {id}: {e}"),
                    }
                }
                Err(e) => eprintln!("fault: ceph pg repeer {}: {e}", pg.id),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}: PGs not all active+clean after {timeout:?} (done: {done:?}; not clean: {unclean:?})",
            site.id()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Whether the tests run against the netns pair (`CSIRR_PAIR_NETNS=1`).
pub fn netns_pair() -> bool {
    std::env::var("CSIRR_PAIR_NETNS").is_ok_and(|v| v == "1")
}

/// The netns pair's link between the sites dropping every packet, both
/// ways (`ceph-pair.sh partition`); healed on drop.
pub struct Partition(());

impl Partition {
    /// Cuts the sites apart.
    pub fn new() -> Partition {
        assert!(
            netns_pair(),
            "the partition tests need the netns pair: \
             CSIRR_PAIR_NETNS=1 deploy/dev/ceph-pair.sh up, its env, or deploy/dev/faults.sh"
        );
        super::pair_ctl(&["partition"]);
        eprintln!("fault: partition between the sites");
        Partition(())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if pair_script(&["heal"]) {
            eprintln!("fault: partition healed");
        }
    }
}

/// An RPC the watcher calls.
#[derive(Debug, Clone)]
pub enum Rpc {
    /// Identity.Probe.
    Probe,
    /// GetVolumeReplicationInfo of a volume; ask a primary (a replica
    /// answers FAILED_PRECONDITION, fault or not: it is reported on the
    /// primary).
    Info(String),
}

impl Rpc {
    fn name(&self) -> &'static str {
        match self {
            Rpc::Probe => "Probe",
            Rpc::Info(_) => "GetVolumeReplicationInfo",
        }
    }
}

/// How one call ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Answered OK; for Probe, whether ready.
    Ok(Option<bool>),
    /// Answered with an error code.
    Code(tonic::Code),
    /// No answer within the deadline (or no connection).
    NoAnswer,
}

/// One call of the watcher.
#[derive(Debug, Clone)]
pub struct Call {
    /// `site-a` or `site-b` (whose sidecar was called).
    pub site: &'static str,
    /// The RPC.
    pub rpc: &'static str,
    /// Its outcome.
    pub outcome: Outcome,
}

/// Calls RPCs of sidecars in a loop until [`Watch::finish`], each one
/// bounded by `deadline`.
pub struct Watch {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Call>>>,
}

impl Watch {
    /// A watcher calling nothing yet: see [`Watch::add`].
    pub fn start() -> Watch {
        Watch {
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
        }
    }

    /// Calls `rpcs` on `sc`, one task per RPC, each within `deadline`.
    pub fn add(&mut self, sc: &Sidecar, rpcs: &[Rpc], deadline: Duration) {
        for rpc in rpcs {
            let (stop, socket, site, rpc) = (
                Arc::clone(&self.stop),
                sc.socket.clone(),
                sc.site,
                rpc.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                let mut calls = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let outcome = call(&socket, site, &rpc, deadline).await;
                    calls.push(Call {
                        site: site.id(),
                        rpc: rpc.name(),
                        outcome,
                    });
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                calls
            }));
        }
    }

    /// Stops calling; every call made.
    pub async fn finish(self) -> Vec<Call> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.expect("watcher task"));
        }
        all
    }
}

async fn call(socket: &Path, site: Site, rpc: &Rpc, deadline: Duration) -> Outcome {
    let t0 = Instant::now();
    let work = async {
        let ch = match channel_to(socket).await {
            Ok(ch) => ch,
            Err(_) => return Outcome::NoAnswer,
        };
        let r = match rpc {
            Rpc::Probe => IdentityClient::new(ch)
                .probe(ProbeRequest {})
                .await
                .map(|r| r.into_inner().ready),
            Rpc::Info(vid) => ControllerClient::new(ch)
                .get_volume_replication_info(info_req(site, vid))
                .await
                .map(|_| None),
        };
        match r {
            Ok(ready) => Outcome::Ok(ready),
            Err(s) => Outcome::Code(s.code()),
        }
    };
    let out = tokio::time::timeout(deadline, work)
        .await
        .unwrap_or(Outcome::NoAnswer);
    if out == Outcome::NoAnswer {
        eprintln!(
            "{} {}: no answer after {:?}",
            site.id(),
            rpc.name(),
            t0.elapsed()
        );
    }
    out
}

/// Codes that say "a cluster is slow or unreachable, retry": what a call
/// during a fault may answer besides OK. ABORTED is the answer while a call
/// that timed out still holds the volume in the background.
pub fn sensible(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Aborted
    )
}

/// Prints a summary of `calls` and asserts: every call answered within its
/// deadline, Probe never an error (not ready is `ready=false`), every other
/// error a sensible code. Returns the counts per (site, rpc, outcome).
pub fn check_calls(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for c in calls {
        *counts
            .entry(format!("{} {} {:?}", c.site, c.rpc, c.outcome))
            .or_insert(0) += 1;
    }
    for (k, n) in &counts {
        eprintln!("calls during the fault: {k}: {n}");
    }
    assert!(!calls.is_empty(), "no RPC was called during the fault");
    for c in calls {
        match (&c.outcome, c.rpc) {
            (Outcome::NoAnswer, _) => {
                panic!("{} {} was not answered within its deadline", c.site, c.rpc)
            }
            (Outcome::Code(code), "Probe") => panic!(
                "{} Probe answered {code:?}: not ready must be ready=false, not an error \
                 (the csi-addons sidecar exits on a Probe error)",
                c.site
            ),
            (Outcome::Code(code), rpc) => assert!(
                sensible(*code),
                "{} {rpc} answered {code:?} during the fault",
                c.site
            ),
            (Outcome::Ok(_), _) => {}
        }
    }
    counts
}

/// Awaits `fut` (an RPC) within `deadline`; panics if it is not answered in
/// time or fails with a code that is neither [`sensible`] nor in `also`.
pub async fn answered<T>(
    what: &str,
    deadline: Duration,
    also: &[tonic::Code],
    fut: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let r = tokio::time::timeout(deadline, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} was not answered within {deadline:?}"));
    match &r {
        Ok(_) => eprintln!("{what}: OK"),
        Err(s) => {
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            assert!(
                sensible(s.code()) || also.contains(&s.code()),
                "{what} answered {s:?}"
            );
        }
    }
    r
}

/// The sidecar flags of the fault-class tests: short operation and RPC
/// deadlines, so that a fault is felt within seconds. [`DEADLINE`] is the
/// bound a caller waits.
pub const FAULT_ARGS: [&str; 6] = [
    "--op-timeout",
    "5s",
    "--rpc-timeout",
    "10s",
    "--promote-timeout",
    "15s",
];

/// How long a test waits for any one RPC answer during a fault: the
/// sidecar's `--promote-timeout` (the longest of its deadlines) plus room
/// for connecting and scheduling on a loaded machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Writes pattern `seq` at `off` on `site`'s `name` and takes sync snapshot
/// `seq` there, as the scheduler would; returns its name.
pub fn write_and_snap(
    pool: &super::TestPool,
    site: Site,
    name: &str,
    seq: u64,
    off: u64,
    len: usize,
) -> String {
    let img = csi_rbd_replicator::ceph::Image::open(&pool.ioctx(site), name).unwrap();
    super::write(&img, &[(off, len)], seq);
    let snap = format!("csirr-sync.{seq:010}.fault");
    img.snap_create(&snap).unwrap();
    snap
}

/// Waits until the replayer on `site` copies `snap` of `name` (its
/// checkpoint names it), or it is there already.
pub async fn copy_under_way(pool: &super::TestPool, site: Site, name: &str, snap: &str) {
    let io = pool.ioctx(site);
    super::wait_until("the copy to be under way", Duration::from_secs(150), || {
        super::registry_record(&io, name)
            .is_some_and(|r| r["checkpoint"]["to"].as_str() == Some(snap))
            || super::sync_snaps_in(&io, name).iter().any(|s| s == snap)
    })
    .await;
}

/// Waits until `site`'s copy of `name` has `snap`, and checks that both
/// sites read the same at it.
pub async fn replica_equal_at(pool: &super::TestPool, site: Site, name: &str, snap: &str) {
    let io = pool.ioctx(site);
    super::wait_until(
        &format!("{snap} on {}", site.id()),
        Duration::from_secs(150),
        || super::sync_snaps_in(&io, name).iter().any(|s| s == snap),
    )
    .await;
    let spec = format!("{}/{name}@{snap}", pool.name);
    assert_eq!(
        super::checksum(site, &spec),
        super::checksum(site.other(), &spec),
        "{spec} differs between the sites"
    );
}

/// What every healed fault must leave: the acknowledged sync point `first`
/// still reads `acked` on site-b, the replica reaches the interrupted point
/// `s2` and then a new one by itself, and neither sidecar died.
#[allow(clippy::too_many_arguments)]
pub async fn resumed_after_fault(
    pool: &super::TestPool,
    vid: &str,
    name: &str,
    first: &str,
    acked: &str,
    s2: &str,
    a: &mut super::Sidecar,
    b: &mut super::Sidecar,
) {
    assert_eq!(
        super::checksum(Site::B, &format!("{vid}@{first}")),
        acked,
        "the acknowledged sync point changed"
    );
    replica_equal_at(pool, Site::B, name, s2).await;
    let s3 = write_and_snap(pool, Site::A, name, 3, 96 << 20, 4 << 20);
    replica_equal_at(pool, Site::B, name, &s3).await;
    a.assert_alive();
    b.assert_alive();
}
