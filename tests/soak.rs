//! Load soak (issue 13, Load): one sidecar per site replicating many small
//! volumes while concurrent gRPC callers drive a realistic mix of RPCs, a
//! writer keeps changing the primaries and a few volumes are relocated
//! (Demote, planned Promote on the other site, Resync) back and forth.
//!
//! The sidecars' resident memory and open file descriptors are sampled
//! throughout. The run fails on any RPC that misses its deadline, on an
//! unexpected answer, on memory or descriptors growing past the bounds
//! below after warm-up, or on a volume whose replica does not converge to
//! a sync point equal to its primary's at the end.
//!
//! Knobs (defaults: the bounded run CI does, about 2 minutes in all):
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CSIRR_SOAK_VOLUMES` | 30 | volumes (16 MiB images, 1 MiB written) |
//! | `CSIRR_SOAK_CALLERS` | 10 | concurrent gRPC callers |
//! | `CSIRR_SOAK_SECONDS` | 60 | length of the load phase |
//! | `CSIRR_SOAK_THINK_MS` | 200 | mean pause of a caller between calls |
//! | `CSIRR_SOAK_INTERVAL` | 1m | the volumes' `schedulingInterval` |
//! | `CSIRR_SOAK_RELOCATE_EVERY` | 20 | seconds between relocations (0: none) |
//! | `CSIRR_SOAK_SEED` | clock | caller randomness (printed) |
//!
//! `deploy/dev/soak.sh` runs the full soak (200 volumes, 50 callers, 30
//! minutes) and prints the report.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use csi_rbd_replicator::ceph::Image;
use csi_rbd_replicator::grpc::proto::replication::controller_client::ControllerClient;
use tokio::sync::Mutex;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
/// Every call's deadline, as the caller sets it (grpc-timeout). The
/// sidecars run with `--rpc-timeout 20s` and `--promote-timeout 20s`, so a
/// call they cannot finish is answered UNAVAILABLE well before it.
const DEADLINE: Duration = Duration::from_secs(30);
/// Resident memory may grow by this much over its warm-up peak...
const RSS_SLACK_BYTES: u64 = 32 << 20;
/// ...plus this fraction of it.
const RSS_SLACK_FRACTION: f64 = 0.20;
/// Open descriptors may grow by this many over their warm-up peak.
const FD_SLACK: u64 = 16;

fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not valid")),
        Err(_) => default,
    }
}

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Where a volume's primary is, and whether it is being relocated (then
/// only the relocation touches it).
struct Vol {
    name: String,
    primary: Site,
    relocating: bool,
}

/// What the callers saw, per method.
#[derive(Default)]
struct Calls {
    /// Latencies in microseconds.
    micros: BTreeMap<&'static str, Vec<u64>>,
    /// Answers by gRPC code, per method.
    codes: BTreeMap<(&'static str, String), u64>,
    /// Calls that missed their deadline: what and how.
    missed: Vec<String>,
    /// Answers no caller should get.
    unexpected: Vec<String>,
}

impl Calls {
    /// Records one call of `method` that took `took`; `expected` says
    /// which error codes are a normal answer to it.
    fn record<T>(
        &mut self,
        method: &'static str,
        vol: &str,
        took: Duration,
        r: &Result<T, tonic::Status>,
        expected: &[tonic::Code],
    ) {
        self.micros
            .entry(method)
            .or_default()
            .push(took.as_micros() as u64);
        let code = match r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        *self.codes.entry((method, format!("{code:?}"))).or_default() += 1;
        let timed_out = match r {
            Err(s) => {
                s.code() == tonic::Code::DeadlineExceeded
                    || s.message().contains("no answer within")
                    || s.message().contains("did not finish within")
            }
            Ok(_) => false,
        };
        if timed_out || took > DEADLINE {
            self.missed.push(format!(
                "{method} {vol}: {took:?}, {:?}",
                r.as_ref().err().map(|s| s.message().to_string())
            ));
        } else if let Err(s) = r
            && !expected.contains(&s.code())
        {
            self.unexpected
                .push(format!("{method} {vol}: {:?} {}", s.code(), s.message()));
        }
    }
}

/// Set by the sampler when a sidecar process is gone: the load stops and
/// the relocations' retry loops give up instead of retrying for minutes.
static SIDECAR_ENDED: AtomicBool = AtomicBool::new(false);

/// Fails the caller when a sidecar ended during the load.
fn assert_sidecars_alive() {
    assert!(
        !SIDECAR_ENDED.load(Ordering::Relaxed),
        "a sidecar process ended during the load (see the log tails)"
    );
}

fn with_deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(DEADLINE);
    r
}

/// Resident memory (bytes) and open descriptors of process `pid`.
fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((kib * 1024, fds))
}

/// Samples of one sidecar: (seconds since the load began, rss, fds).
#[derive(Default)]
struct Samples(Vec<(f64, u64, u64)>);

impl Samples {
    /// start, warm-up peak, peak, end of one column.
    fn figures(&self, warm_up: f64, col: impl Fn(&(f64, u64, u64)) -> u64) -> [u64; 4] {
        let start = self.0.first().map_or(0, &col);
        let warm = self
            .0
            .iter()
            .filter(|s| s.0 <= warm_up)
            .map(&col)
            .max()
            .unwrap_or(start);
        let peak = self.0.iter().map(&col).max().unwrap_or(0);
        let end = self.0.last().map_or(0, &col);
        [start, warm, peak, end]
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// Relocates `vol` from its primary site to the other one: Demote, planned
/// Promote (retried while the demotion snapshot is being copied), Resync of
/// the old primary until ready.
async fn relocate(
    vid: &str,
    from: Site,
    ctl: &BTreeMap<&'static str, ControllerClient<Channel>>,
    calls: &std::sync::Mutex<Calls>,
) {
    use tonic::Code::{Aborted, Unavailable};
    let to = from.other();
    let mut cf = ctl[from.id()].clone();
    let mut ct = ctl[to.id()].clone();
    let until = Instant::now() + Duration::from_secs(300);
    loop {
        let t = Instant::now();
        let r = cf
            .demote_volume(with_deadline(req::demote(from, vid, false)))
            .await;
        calls.lock().unwrap().record(
            "DemoteVolume",
            vid,
            t.elapsed(),
            &r,
            &[Unavailable, Aborted],
        );
        if r.is_ok() {
            break;
        }
        assert_sidecars_alive();
        assert!(Instant::now() < until, "demote of {vid}: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    loop {
        let t = Instant::now();
        let r = ct
            .promote_volume(with_deadline(req::promote(to, vid, false)))
            .await;
        calls.lock().unwrap().record(
            "PromoteVolume",
            vid,
            t.elapsed(),
            &r,
            &[Unavailable, Aborted],
        );
        if r.is_ok() {
            break;
        }
        assert_sidecars_alive();
        assert!(Instant::now() < until, "promote of {vid}: {r:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    loop {
        let t = Instant::now();
        let r = cf
            .resync_volume(with_deadline(req::resync(from, vid, false)))
            .await;
        calls.lock().unwrap().record(
            "ResyncVolume",
            vid,
            t.elapsed(),
            &r,
            &[Unavailable, Aborted],
        );
        if r.is_ok_and(|r| r.into_inner().ready) {
            break;
        }
        assert_sidecars_alive();
        assert!(Instant::now() < until, "resync of {vid} never ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The soak, bounded by its knobs (CI runs the defaults; the name puts it
/// in test.sh's serial pass, alone on the machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exclusive_soak_many_volumes_and_callers() {
    let n_vols: usize = knob("CSIRR_SOAK_VOLUMES", 30);
    let n_callers: usize = knob("CSIRR_SOAK_CALLERS", 10);
    let seconds: u64 = knob("CSIRR_SOAK_SECONDS", 60);
    let think_ms: u64 = knob("CSIRR_SOAK_THINK_MS", 200);
    let interval: String = knob("CSIRR_SOAK_INTERVAL", "1m".to_string());
    let relocate_every: u64 = knob("CSIRR_SOAK_RELOCATE_EVERY", 20);
    let seed: u64 = knob(
        "CSIRR_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    println!(
        "soak: {n_vols} volumes, {n_callers} callers, {seconds} s, think {think_ms} ms, \
         schedule {interval}, relocation every {relocate_every} s, seed {seed}"
    );
    let began = Instant::now();
    let pool = TestPool::new("soak");
    let args = [
        "--pools",
        &pool.name,
        "--rpc-timeout",
        "20s",
        "--promote-timeout",
        "20s",
    ];
    let quiet = [("RUST_LOG", "info")];
    let a = Sidecar::start_with_env(Site::A, &args, &quiet).await;
    let b = Sidecar::start_with_env(Site::B, &args, &quiet).await;
    let aio = pool.ioctx(Site::A);

    // Setup: the volumes, enabled, and their first sync complete.
    let mut ctl: BTreeMap<&'static str, ControllerClient<Channel>> = BTreeMap::new();
    ctl.insert(Site::A.id(), a.controller().await);
    ctl.insert(Site::B.id(), b.controller().await);
    let vols: Vec<String> = (0..n_vols).map(|i| format!("vol{i:04}")).collect();
    for (i, name) in vols.iter().enumerate() {
        create_image_in(&aio, name, 16 * MIB, &[(0, 1 << 20)], i as u64 + 1);
    }
    let params = [("schedulingInterval", interval.as_str())];
    let mut ca = ctl[Site::A.id()].clone();
    for name in &vols {
        let vid = format!("{}/{name}", pool.name);
        ca.enable_volume_replication(enable_req(Site::A, &vid, &params))
            .await
            .unwrap_or_else(|s| panic!("enable {vid}: {s:?}"));
    }
    for name in &vols {
        wait_replica_snap(
            &pool.name,
            name,
            &first_sync(&aio, name),
            Duration::from_secs(600),
        )
        .await;
    }
    let setup = began.elapsed();
    println!(
        "setup: {n_vols} volumes enabled and first-synced in {:.0} s",
        setup.as_secs_f64()
    );

    // The load phase.
    let state: Arc<Vec<Mutex<Vol>>> = Arc::new(
        vols.iter()
            .map(|n| {
                Mutex::new(Vol {
                    name: n.clone(),
                    primary: Site::A,
                    relocating: false,
                })
            })
            .collect(),
    );
    let calls = Arc::new(std::sync::Mutex::new(Calls::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let load_start = Instant::now();
    let pids = [(Site::A, a.pid()), (Site::B, b.pid())];
    let sampler = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut out: BTreeMap<&'static str, Samples> = BTreeMap::new();
            loop {
                let t = load_start.elapsed().as_secs_f64();
                for (site, pid) in pids {
                    let Some((rss, fds)) = sample(pid) else {
                        // Ends the load at once; the test fails with the
                        // sidecars' log tails (and how the process ended).
                        eprintln!("sidecar {} ended during the load, at {t:.0} s", site.id());
                        SIDECAR_ENDED.store(true, Ordering::Relaxed);
                        stop.store(true, Ordering::Relaxed);
                        return out;
                    };
                    out.entry(site.id()).or_default().0.push((t, rss, fds));
                }
                if stop.load(Ordering::Relaxed) {
                    return out;
                }
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for c in 0..n_callers {
        let (state, calls, stop, ctl) = (
            Arc::clone(&state),
            Arc::clone(&calls),
            Arc::clone(&stop),
            ctl.clone(),
        );
        let (pool_name, interval) = (pool.name.clone(), interval.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9));
            while !stop.load(Ordering::Relaxed) {
                let pause = rng.below(2 * think_ms + 1);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let i = rng.below(state.len() as u64) as usize;
                let v = state[i].lock().await;
                if v.relocating {
                    continue;
                }
                let vid = format!("{pool_name}/{}", v.name);
                let (p, r) = (v.primary, v.primary.other());
                let mut cp = ctl[p.id()].clone();
                let mut cr = ctl[r.id()].clone();
                // The csi-addons controller's mix: mostly status polls;
                // idempotent re-issues of the current state now and then.
                let roll = rng.below(100);
                let t = Instant::now();
                use tonic::Code::Aborted;
                if roll < 80 {
                    let res = cp
                        .get_volume_replication_info(with_deadline(info_req(p, &vid)))
                        .await;
                    let took = t.elapsed();
                    calls
                        .lock()
                        .unwrap()
                        .record("GetVolumeReplicationInfo", &vid, took, &res, &[]);
                } else if roll < 88 {
                    let res = cp
                        .enable_volume_replication(with_deadline(enable_req(
                            p,
                            &vid,
                            &[("schedulingInterval", interval.as_str())],
                        )))
                        .await;
                    let took = t.elapsed();
                    calls.lock().unwrap().record(
                        "EnableVolumeReplication",
                        &vid,
                        took,
                        &res,
                        &[Aborted],
                    );
                } else if roll < 94 {
                    let res = cp
                        .promote_volume(with_deadline(req::promote(p, &vid, false)))
                        .await;
                    let took = t.elapsed();
                    calls
                        .lock()
                        .unwrap()
                        .record("PromoteVolume", &vid, took, &res, &[Aborted]);
                } else {
                    let res = cr
                        .resync_volume(with_deadline(req::resync(r, &vid, false)))
                        .await;
                    let took = t.elapsed();
                    calls
                        .lock()
                        .unwrap()
                        .record("ResyncVolume", &vid, took, &res, &[Aborted]);
                }
                drop(v);
            }
            0u64
        }));
    }
    // A writer changes a random primary about every 300 ms (64 KiB).
    {
        let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
        let pool_name = pool.name.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ 0x5eed);
            let io: BTreeMap<&str, _> = [Site::A, Site::B]
                .into_iter()
                .map(|s| (s.id(), admin(s).ioctx(&pool_name, "").unwrap()))
                .collect();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let i = rng.below(state.len() as u64) as usize;
                let v = state[i].lock().await;
                if v.relocating {
                    continue;
                }
                n += 1;
                let io = Arc::clone(&io[v.primary.id()]);
                let name = v.name.clone();
                let off = rng.below(16 * 16) * 65536;
                // Held across the write: a relocation never starts with
                // the writer inside the image.
                tokio::task::spawn_blocking(move || {
                    let img = Image::open(&io, &name).expect("open primary");
                    write(&img, &[(off, 65536)], n);
                })
                .await
                .unwrap();
                drop(v);
            }
            n
        }));
    }
    // Relocations of the first few volumes, one at a time.
    let relocations = Arc::new(std::sync::atomic::AtomicU64::new(0));
    if relocate_every > 0 {
        let (state, calls, stop, ctl, done) = (
            Arc::clone(&state),
            Arc::clone(&calls),
            Arc::clone(&stop),
            ctl.clone(),
            Arc::clone(&relocations),
        );
        let pool_name = pool.name.clone();
        tasks.push(tokio::spawn(async move {
            let mut k = 0usize;
            loop {
                tokio::time::sleep(Duration::from_secs(relocate_every)).await;
                if stop.load(Ordering::Relaxed) {
                    return 0;
                }
                let i = k % state.len().min(3);
                k += 1;
                let from = {
                    let mut v = state[i].lock().await;
                    v.relocating = true;
                    v.primary
                };
                let vid = format!("{pool_name}/{}", vols_name(i));
                relocate(&vid, from, &ctl, &calls).await;
                let mut v = state[i].lock().await;
                v.primary = from.other();
                v.relocating = false;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut writes = 0;
    for t in tasks {
        writes += t.await.expect("load task");
    }
    let load = load_start.elapsed();
    let samples = sampler.await.unwrap();
    assert_sidecars_alive();

    // Convergence: a sync snapshot taken after the last write, on each
    // primary, must reach its replica with the same content.
    let conv_start = Instant::now();
    let mut befores = Vec::new();
    for v in state.iter() {
        let v = v.lock().await;
        let io = pool.ioctx(v.primary);
        let snaps = sync_snaps_in(&io, &v.name);
        let before = snaps.last().cloned().expect("a sync snapshot");
        let seq: u64 = before["csirr-sync.".len()..]
            .split('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let img = Image::open(&io, &v.name).unwrap();
        img.snap_create(&format!("csirr-sync.{:010}.soakend", seq + 1))
            .unwrap();
        befores.push((v.name.clone(), v.primary, before));
    }
    let mut mismatched = Vec::new();
    for (name, primary, before) in &befores {
        // Panics (fails the soak) on a replica that never gets there, or
        // whose content differs.
        let r = tokio::spawn({
            let (pool_name, name, primary, before) =
                (pool.name.clone(), name.clone(), *primary, before.clone());
            async move { converged_in(&pool_name, primary, &name, &before).await }
        })
        .await;
        if let Err(e) = r {
            mismatched.push(format!("{name}: {e}"));
        }
    }
    let conv = conv_start.elapsed();

    // The report.
    let calls = calls.lock().unwrap();
    let total: usize = calls.micros.values().map(Vec::len).sum();
    println!(
        "\n== soak report: {n_vols} volumes, {n_callers} callers, load {:.0} s (setup {:.0} s, \
         convergence check {:.0} s), seed {seed}",
        load.as_secs_f64(),
        setup.as_secs_f64(),
        conv.as_secs_f64()
    );
    println!(
        "RPCs: {total} ({:.1}/s), writes: {writes}, relocations: {}",
        total as f64 / load.as_secs_f64(),
        relocations.load(Ordering::Relaxed)
    );
    println!(
        "{:<26} {:>8} {:>9} {:>9} {:>9}  answers",
        "method", "count", "p50 ms", "p99 ms", "max ms"
    );
    for (m, v) in &calls.micros {
        let mut s = v.clone();
        s.sort_unstable();
        let answers: Vec<String> = calls
            .codes
            .iter()
            .filter(|((mm, _), _)| mm == m)
            .map(|((_, c), n)| format!("{c} {n}"))
            .collect();
        println!(
            "{:<26} {:>8} {:>9} {:>9} {:>9}  {}",
            m,
            s.len(),
            ms(percentile(&s, 0.50)),
            ms(percentile(&s, 0.99)),
            ms(*s.last().unwrap_or(&0)),
            answers.join(", ")
        );
    }
    println!(
        "deadline misses ({DEADLINE:?} deadline): {}",
        calls.missed.len()
    );
    let warm_up = (load.as_secs_f64() / 5.0).max(10.0);
    let mut growth = Vec::new();
    for (site, s) in &samples {
        let [r0, rw, rp, re] = s.figures(warm_up, |x| x.1);
        let [f0, fw, fp, fe] = s.figures(warm_up, |x| x.2);
        println!(
            "sidecar {site}: RSS MiB start {} / warm-up peak {} / peak {} / end {}; \
             fds start {f0} / warm-up peak {fw} / peak {fp} / end {fe} ({} samples)",
            r0 >> 20,
            rw >> 20,
            rp >> 20,
            re >> 20,
            s.0.len()
        );
        let rss_bound = rw + RSS_SLACK_BYTES + (rw as f64 * RSS_SLACK_FRACTION) as u64;
        if re > rss_bound {
            growth.push(format!(
                "{site}: RSS grew from {} MiB (warm-up peak) to {} MiB, bound {} MiB",
                rw >> 20,
                re >> 20,
                rss_bound >> 20
            ));
        }
        if fe > fw + FD_SLACK {
            growth.push(format!(
                "{site}: fds grew from {fw} (warm-up peak) to {fe}, bound {}",
                fw + FD_SLACK
            ));
        }
    }
    println!(
        "convergence: {} of {n_vols} volumes equal on both sides at a sync point after the \
         last write",
        n_vols - mismatched.len()
    );
    assert!(
        calls.missed.is_empty(),
        "deadline misses: {:#?}",
        calls.missed
    );
    assert!(
        calls.unexpected.is_empty(),
        "unexpected answers: {:#?}",
        calls.unexpected
    );
    assert!(growth.is_empty(), "growth after warm-up: {growth:#?}");
    assert!(mismatched.is_empty(), "not converged: {mismatched:#?}");
    assert!(total > 0, "no RPC was made");
    println!("soak passed");
}

fn vols_name(i: usize) -> String {
    format!("vol{i:04}")
}

/// Waits until a sync snapshot of `pool/name` newer than `after` is on both
/// sides (the primary on `primary`) and checks both read the same at it.
async fn converged_in(pool: &str, primary: Site, name: &str, after: &str) -> String {
    let src = admin(primary).ioctx(pool, "").unwrap();
    let dst = admin(primary.other()).ioctx(pool, "").unwrap();
    let mut found = None;
    wait_until(
        &format!("{name}: a sync point after {after} on both sides"),
        Duration::from_secs(600),
        || {
            let theirs = sync_snaps_in(&dst, name);
            found = sync_snaps_in(&src, name)
                .into_iter()
                .rev()
                .find(|s| s.as_str() > after && theirs.contains(s));
            found.is_some()
        },
    )
    .await;
    let snap = found.unwrap();
    let spec = format!("{pool}/{name}@{snap}");
    assert_eq!(
        checksum(primary, &spec),
        checksum(primary.other(), &spec),
        "{spec} differs between the sites"
    );
    snap
}
