//! Shared harness of the integration tests: the two-cluster pair started by
//! `deploy/dev/ceph-pair.sh`, sidecars run as real child processes, gRPC
//! clients over their unix sockets as the csi-addons sidecar would connect,
//! and checksums taken with the native `rbd export`, independent of this
//! crate's own code.
#![allow(dead_code)]

pub mod controller;
pub mod fault;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_rbd_replicator::ceph::{self, Cluster, ConnectConfig, Image, IoCtx};
use csi_rbd_replicator::grpc::proto::admin::admin_client::AdminClient;
use csi_rbd_replicator::grpc::proto::identity::identity_client::IdentityClient;
use csi_rbd_replicator::grpc::proto::replication::controller_client::ControllerClient;
use csi_rbd_replicator::grpc::proto::replication::{self as pb, ReplicationSource};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

/// Driver name the test sidecars report.
pub const DRIVER: &str = "test.rbd.csi.ceph.com";

/// One of the two clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// site-a, mon port 3300.
    A,
    /// site-b, mon port 3301.
    B,
}

impl Site {
    /// The cluster ID in csi-config.json.
    pub fn id(self) -> &'static str {
        match self {
            Site::A => "site-a",
            Site::B => "site-b",
        }
    }

    /// The other site.
    pub fn other(self) -> Site {
        match self {
            Site::A => Site::B,
            Site::B => Site::A,
        }
    }

    fn var(self, what: &str) -> String {
        let s = match self {
            Site::A => "A",
            Site::B => "B",
        };
        env(&format!("CSIRR_SITE_{s}_{what}"))
    }

    /// Path of the site's ceph.conf.
    pub fn conf(self) -> String {
        self.var("CONF")
    }

    /// Path of the site's admin keyring.
    pub fn keyring(self) -> String {
        self.var("KEYRING")
    }

    /// Secret directory of the site's least-privilege user.
    pub fn secret_dir(self) -> PathBuf {
        PathBuf::from(self.var("SECRET_DIR"))
    }

    /// The site's network namespace, with the netns pair.
    pub fn netns(self) -> Option<String> {
        let s = match self {
            Site::A => "A",
            Site::B => "B",
        };
        std::env::var(format!("CSIRR_SITE_{s}_NETNS"))
            .ok()
            .filter(|v| !v.is_empty())
    }
}

/// An environment variable that `ceph-pair.sh env` sets.
pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the two-cluster pair. Run \
             deploy/dev/test.sh, or `deploy/dev/ceph-pair.sh up` and \
             `eval \"$(deploy/dev/ceph-pair.sh env)\"` first"
        )
    })
}

/// The test pool.
pub fn pool() -> String {
    env("CSIRR_POOL")
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..12])
}

/// Admin connection to a site through our bindings (for setup only).
pub fn admin(site: Site) -> Arc<Cluster> {
    Cluster::connect(&ConnectConfig {
        conf_file: Some(site.conf()),
        keyring: Some(site.keyring()),
        user: "admin".into(),
        op_timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .expect("admin connection")
}

/// The test pool's ioctx on a site.
pub fn ioctx(site: Site, ns: &str) -> Arc<IoCtx> {
    admin(site).ioctx(&pool(), ns).expect("pool")
}

/// Runs the native `rbd` CLI against a site as admin.
pub fn rbd(site: Site, args: &[&str]) -> std::process::Output {
    Command::new("rbd")
        .arg("-c")
        .arg(site.conf())
        .arg("--keyring")
        .arg(site.keyring())
        .args(args)
        .output()
        .expect("rbd runs")
}

/// Like [`rbd`], asserting success; returns stdout.
pub fn rbd_ok(site: Site, args: &[&str]) -> String {
    let o = rbd(site, args);
    assert!(
        o.status.success(),
        "rbd {args:?} on {} failed: {}",
        site.id(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// sha256 of `spec` (e.g. `pool/img@snap`) as `rbd export` streams it.
pub fn checksum(site: Site, spec: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; rbd -c '{}' --keyring '{}' export --no-progress '{spec}' - | sha256sum",
            site.conf(),
            site.keyring()
        ))
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "export of {spec} on {} failed: {}",
        site.id(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Bytes allocated in `spec` according to `rbd diff` (sum of extents).
pub fn allocated(site: Site, spec: &str) -> u64 {
    let out = rbd_ok(site, &["diff", "--format", "json", spec]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("rbd diff json");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["exists"].as_str() == Some("true") || e["exists"] == true)
                .map(|e| e["length"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Snapshot names of `pool/image` on a site.
pub fn snapshots(site: Site, image: &str) -> Vec<String> {
    let io = ioctx(site, "");
    match Image::open_read_only(&io, image, None) {
        Ok(img) => img
            .snap_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect(),
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

/// Whether `pool/image` exists on a site.
pub fn image_exists(site: Site, image: &str) -> bool {
    Image::open_read_only(&ioctx(site, ""), image, None).is_ok()
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Creates `image` of `size` bytes on a site and writes `writes`
/// (offset, length) with pattern data.
pub fn create_image(site: Site, image: &str, size: u64, writes: &[(u64, usize)]) -> Image {
    create_image_in(&ioctx(site, ""), image, size, writes, 1)
}

/// Writes pattern data at each (offset, length) in pieces of at most 4 MiB.
pub fn write(img: &Image, writes: &[(u64, usize)], seed: u64) {
    for (i, &(off, len)) in writes.iter().enumerate() {
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(4 << 20);
            let buf = pattern(seed * 1000 + i as u64 * 7 + done as u64, n);
            img.write(off + done as u64, &buf).expect("write");
            done += n;
        }
    }
    img.flush().expect("flush");
}

/// A ceph-csi style volume: image `csi-vol-<uuid>` and its omap journal.
pub struct CsiVolume {
    /// The volume handle.
    pub handle: String,
    /// The image name.
    pub image: String,
    /// The uuid.
    pub uuid: String,
}

/// Creates a ceph-csi style volume on a site, as ceph-csi's CreateVolume
/// leaves it: the image and the `csi.volumes.default` / `csi.volume.<uuid>`
/// journal entries.
pub fn create_csi_volume(site: Site, size: u64, writes: &[(u64, usize)]) -> (CsiVolume, Image) {
    create_csi_volume_in(&ioctx(site, ""), site, size, writes)
}

/// [`create_csi_volume`] in the pool of `io`.
pub fn create_csi_volume_in(
    io: &Arc<IoCtx>,
    site: Site,
    size: u64,
    writes: &[(u64, usize)],
) -> (CsiVolume, Image) {
    let uuid = uuid::Uuid::new_v4().to_string();
    let image = format!("csi-vol-{uuid}");
    let img = create_image_in(io, &image, size, writes, 1);
    let pv = format!("pvc-{}", &uuid[..8]);
    let id = img.id().unwrap();
    io.omap_set(
        "csi.volumes.default",
        &[(&format!("csi.volume.{pv}"), uuid.as_bytes())],
    )
    .unwrap();
    io.omap_set(
        &format!("csi.volume.{uuid}"),
        &[
            ("csi.volname", pv.as_bytes()),
            ("csi.imagename", image.as_bytes()),
            ("csi.imageid", id.as_bytes()),
            ("csi.volume.owner", b"default"),
        ],
    )
    .unwrap();
    let cid = site.id();
    let handle = format!("0001-{:04x}-{cid}-{:016x}-{uuid}", cid.len(), io.pool_id());
    (
        CsiVolume {
            handle,
            image,
            uuid,
        },
        img,
    )
}

/// A running sidecar process.
pub struct Sidecar {
    /// Its site.
    pub site: Site,
    /// Its unix socket.
    pub socket: PathBuf,
    child: Child,
    /// Where its log goes.
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts a sidecar for `site` and waits until Probe says ready.
    pub async fn start(site: Site, extra: &[&str]) -> Sidecar {
        Self::start_with_env(site, extra, &[]).await
    }

    /// [`Sidecar::start`] with extra environment variables.
    pub async fn start_with_env(site: Site, extra: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        Self::launch(site, extra, envs).wait_probe(true).await
    }

    /// Starts a sidecar and waits until Probe answers (ready or not).
    pub async fn start_unready(site: Site, extra: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        Self::launch(site, extra, envs).wait_probe(false).await
    }

    /// The process, started.
    fn launch(site: Site, extra: &[&str], envs: &[(&str, &str)]) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("csi-addons.sock");
        let log =
            std::env::temp_dir().join(format!("{}.log", unique(&format!("sidecar-{}", site.id()))));
        let logf = std::fs::File::create(&log).unwrap();
        // With the netns pair (`CSIRR_PAIR_NETNS=1 ceph-pair.sh`), a sidecar
        // runs in its site's network namespace, as it would run in its site.
        let bin = env!("CARGO_BIN_EXE_csi-rbd-replicator");
        let mut cmd = match site.netns() {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("serve")
            .arg("--endpoint")
            .arg(format!("unix://{}", socket.display()))
            .args(["--drivername", DRIVER])
            .args(if extra.contains(&"--csi-config") {
                vec![]
            } else {
                vec!["--csi-config".to_string(), env("CSIRR_CSI_CONFIG")]
            })
            .args(if extra.contains(&"--cluster-mapping") {
                vec![]
            } else {
                vec![
                    "--cluster-mapping".to_string(),
                    env("CSIRR_CLUSTER_MAPPING"),
                ]
            })
            .args(["--cluster-id", site.id()])
            .arg("--secret-dir")
            .arg(site.secret_dir())
            .args(if extra.contains(&"--poll-interval") {
                vec![]
            } else {
                vec!["--poll-interval", "1s"]
            })
            .args(if extra.contains(&"--pools") {
                vec![]
            } else {
                vec!["--pools".to_string(), pool()]
            })
            // Drop stops the sidecar while the test runtime is blocked, so
            // its clients cannot answer the HTTP/2 shutdown handshake.
            .args(["--grace", "2s"])
            .args(extra)
            .env("RUST_LOG", "info,csi_rbd_replicator=debug,csirr=debug")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("sidecar starts");
        Sidecar {
            site,
            socket,
            child,
            log,
            _dir: dir,
        }
    }

    /// Waits until Probe answers, and says ready if `ready`.
    async fn wait_probe(self, ready: bool) -> Sidecar {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = self.try_identity().await {
                use csi_rbd_replicator::grpc::proto::identity::ProbeRequest;
                if let Ok(r) = c.probe(ProbeRequest {}).await
                    && (!ready || r.into_inner().ready == Some(true))
                {
                    return self;
                }
            }
            assert!(
                Instant::now() < deadline,
                "sidecar for {} not ready in 60s; log:\n{}",
                self.site.id(),
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sidecar's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn channel(&self) -> Result<Channel, tonic::transport::Error> {
        channel_to(&self.socket).await
    }

    /// Whether the process still runs (it did not exit or crash).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Asserts that the process runs and never panicked.
    pub fn assert_alive(&mut self) {
        assert!(self.alive(), "sidecar {} exited", self.site.id());
        assert!(
            !self.log_text().contains("panicked"),
            "sidecar {} panicked (see {})",
            self.site.id(),
            self.log.display()
        );
    }
}

/// A gRPC channel over the unix socket `path`.
pub async fn channel_to(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
}

impl Sidecar {
    async fn try_identity(&self) -> Result<IdentityClient<Channel>, tonic::transport::Error> {
        Ok(IdentityClient::new(self.channel().await?))
    }

    /// An Identity client.
    pub async fn identity(&self) -> IdentityClient<Channel> {
        self.try_identity().await.expect("connect")
    }

    /// A replication Controller client.
    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await.expect("connect"))
    }

    /// An admin API client (`csirr.admin.v1.Admin`, on the same socket).
    pub async fn admin_api(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await.expect("connect"))
    }

    /// Runs the built binary's `pool ARGS` command against this sidecar's
    /// socket (`--endpoint unix://...` appended).
    pub fn pool_cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_at("pool", args)
    }

    /// Runs the built binary's `CMD ARGS` with `--endpoint unix://...` of
    /// this sidecar appended.
    fn cli_at(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
            .arg(cmd)
            .args(args)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .output()
            .unwrap_or_else(|e| panic!("{cmd} command runs: {e}"))
    }

    /// Runs the built binary's `drill ARGS` command against this sidecar's
    /// socket (`--endpoint unix://...` appended).
    pub fn drill_cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_at("drill", args)
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) with the kill command.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} {}", self.child.id());
    }

    /// Kills the process (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the process with SIGTERM and waits.
    pub fn stop(&mut self) {
        // SIGTERM through the kill command: no unsafe in tests.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // A sidecar that ended by itself (a crash) says how, in the tail.
        let ended = self.child.try_wait().ok().flatten();
        self.stop();
        if std::thread::panicking() {
            // Never panic here (a panic while unwinding aborts): write what
            // can be written, the log's tail only.
            use std::io::Write;
            let text = self.log_text();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("GetVolumeReplicationInfo"))
                .collect();
            let tail = lines[lines.len().saturating_sub(150)..].join("\n");
            let ended = ended.map_or(String::new(), |s| format!(" (it had ended by itself: {s})"));
            let _ = writeln!(
                std::io::stderr(),
                "--- log of sidecar {} ({}){ended} ---\n{tail}",
                self.site.id(),
                self.log.display()
            );
        }
    }
}

/// `replication_source` naming one volume.
pub fn source(volume_id: &str) -> Option<ReplicationSource> {
    Some(ReplicationSource {
        r#type: Some(pb::replication_source::Type::Volume(
            pb::replication_source::VolumeSource {
                volume_id: volume_id.to_string(),
            },
        )),
    })
}

/// A replication source naming volume group `id`.
pub fn group_source(id: &str) -> Option<ReplicationSource> {
    Some(ReplicationSource {
        r#type: Some(pb::replication_source::Type::Volumegroup(
            pb::replication_source::VolumeGroupSource {
                volume_group_id: id.to_string(),
            },
        )),
    })
}

/// The least-privilege user's secrets of a site, as a VolumeReplicationClass
/// secret would carry them.
pub fn secrets(site: Site) -> HashMap<String, String> {
    let d = site.secret_dir();
    HashMap::from([
        (
            "userID".to_string(),
            std::fs::read_to_string(d.join("userID")).unwrap(),
        ),
        (
            "userKey".to_string(),
            std::fs::read_to_string(d.join("userKey")).unwrap(),
        ),
    ])
}

/// An EnableVolumeReplication request for `volume_id` with `params`.
pub fn enable_req(
    site: Site,
    volume_id: &str,
    params: &[(&str, &str)],
) -> pb::EnableVolumeReplicationRequest {
    pb::EnableVolumeReplicationRequest {
        replication_source: source(volume_id),
        secrets: secrets(site),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// A GetVolumeReplicationInfo request.
pub fn info_req(site: Site, volume_id: &str) -> pb::GetVolumeReplicationInfoRequest {
    pb::GetVolumeReplicationInfoRequest {
        replication_source: source(volume_id),
        secrets: secrets(site),
        ..Default::default()
    }
}

/// Polls GetVolumeReplicationInfo until it reports a sync point (or ERROR),
/// or panics after `timeout`.
pub async fn wait_synced(
    sc: &Sidecar,
    volume_id: &str,
    timeout: Duration,
) -> pb::GetVolumeReplicationInfoResponse {
    let (c, site) = (sc.controller().await, sc.site);
    let what = format!("{volume_id} to report a sync point");
    eventually(&what, timeout, Duration::from_millis(200), || {
        let mut c = c.clone();
        async move {
            match c
                .get_volume_replication_info(info_req(site, volume_id))
                .await
            {
                // A sync point, or an error reported before any.
                Ok(r) if r.get_ref().last_sync_time.is_some() || r.get_ref().status == 3 => {
                    Ok(r.into_inner())
                }
                Ok(r) => Err(format!("{:?}", r.into_inner())),
                Err(s) => panic!("GetVolumeReplicationInfo of {volume_id}: {s:?}"),
            }
        }
    })
    .await
}

/// Runs `attempt` every `every` until it returns `Ok`, for at most
/// `timeout`, then panics naming `what` and the last `Err` (what was seen
/// instead): the tests' one retry loop, for an RPC retried while it answers
/// UNAVAILABLE as for a state polled until it shows. [`wait_until`] is the
/// form for a plain condition.
pub async fn eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut attempt: F,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let seen = match attempt().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            let sep = if seen.is_empty() { "" } else { "; last seen: " };
            panic!("timed out after {timeout:?} waiting for {what}{sep}{seen}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Polls `f` every 200 ms until it returns true, for at most `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let every = Duration::from_millis(200);
    eventually(what, timeout, every, || {
        std::future::ready(f().then_some(()).ok_or_else(String::new))
    })
    .await
}

/// Path helper for messages.
pub fn show(p: &Path) -> String {
    p.display().to_string()
}

/// A pool of its own on both sites, mirror peers bootstrapped both ways with
/// Ceph's own commands, for tests that must be the only replayer of their
/// pool. Removed on drop (declare it before the sidecars that use it).
pub struct TestPool {
    /// The pool name (same on both sites).
    pub name: String,
}

impl TestPool {
    /// Creates the pool on both sites and bootstraps peers.
    pub fn new(prefix: &str) -> TestPool {
        let name = unique(prefix);
        for site in [Site::A, Site::B] {
            ceph_ok(site, &["osd", "pool", "create", &name, "8", "8"]);
            rbd_ok(site, &["pool", "init", &name]);
            rbd_ok(
                site,
                &[
                    "mirror",
                    "pool",
                    "enable",
                    &name,
                    "image",
                    "--site-name",
                    site.id(),
                ],
            );
        }
        let token = rbd_ok(
            Site::A,
            &[
                "mirror",
                "pool",
                "peer",
                "bootstrap",
                "create",
                "--site-name",
                "site-a",
                &name,
            ],
        );
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, token.trim()).unwrap();
        rbd_ok(
            Site::B,
            &[
                "mirror",
                "pool",
                "peer",
                "bootstrap",
                "import",
                "--site-name",
                "site-b",
                "--direction",
                "rx-tx",
                &name,
                tf.to_str().unwrap(),
            ],
        );
        TestPool { name }
    }

    /// The pool's ioctx on a site.
    pub fn ioctx(&self, site: Site) -> Arc<IoCtx> {
        admin(site).ioctx(&self.name, "").expect("pool")
    }

    /// `--pools NAME` for a sidecar serving only this pool.
    pub fn args(&self) -> [&str; 2] {
        ["--pools", &self.name]
    }
}

impl Drop for TestPool {
    fn drop(&mut self) {
        for site in [Site::A, Site::B] {
            let _ = ceph(
                site,
                &[
                    "osd",
                    "pool",
                    "rm",
                    &self.name,
                    &self.name,
                    "--yes-i-really-really-mean-it",
                ],
            );
        }
    }
}

/// Runs the `ceph` CLI against a site as admin.
pub fn ceph(site: Site, args: &[&str]) -> std::process::Output {
    Command::new("ceph")
        .arg("-c")
        .arg(site.conf())
        .arg("--keyring")
        .arg(site.keyring())
        .args(args)
        .output()
        .expect("ceph runs")
}

/// Like [`ceph`], asserting success; returns stdout.
pub fn ceph_ok(site: Site, args: &[&str]) -> String {
    let o = ceph(site, args);
    assert!(
        o.status.success(),
        "ceph {args:?} on {} failed: {}",
        site.id(),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Creates `image` in pool `io` with standard features and `writes`.
pub fn create_image_in(
    io: &Arc<IoCtx>,
    image: &str,
    size: u64,
    writes: &[(u64, usize)],
    seed: u64,
) -> Image {
    ceph::rbd::create(
        io,
        image,
        size,
        &ceph::CreateOptions {
            features: Some(
                ceph::features::LAYERING
                    | ceph::features::EXCLUSIVE_LOCK
                    | ceph::features::OBJECT_MAP
                    | ceph::features::FAST_DIFF
                    | ceph::features::DEEP_FLATTEN,
            ),
            ..Default::default()
        },
    )
    .expect("create image");
    let img = Image::open(io, image).expect("open image");
    write(&img, writes, seed);
    img
}

/// Discards `[off, off+len)` and waits for it.
pub fn discard(img: &Image, off: u64, len: u64) {
    let (tx, rx) = std::sync::mpsc::channel();
    img.aio_discard(
        off,
        len,
        Box::new(move |r, _| {
            let _ = tx.send(r.map(|_| ()));
        }),
    )
    .expect("submit discard");
    rx.recv().expect("discard completes").expect("discard");
}

/// Sync snapshot names of `image` in pool `io`, oldest first.
pub fn sync_snaps_in(io: &Arc<IoCtx>, image: &str) -> Vec<String> {
    match Image::open_read_only(io, image, None) {
        Ok(img) => img
            .snap_list()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .filter(|n| n.starts_with("csirr-sync."))
            .collect(),
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

/// Polls until the replica of `image` in `pool` on site-b has snapshot `snap`.
pub async fn wait_replica_snap(pool: &str, image: &str, snap: &str, timeout: Duration) {
    let io = admin(Site::B).ioctx(pool, "").expect("pool");
    let what = format!("replica {pool}/{image} to have {snap}");
    wait_until(&what, timeout, || {
        Image::open_read_only(&io, image, None).is_ok_and(|img| {
            img.snap_list()
                .unwrap_or_default()
                .iter()
                .any(|s| s.name == snap)
        })
    })
    .await
}

/// The registry record of `image` on a site, as JSON.
pub fn registry_record(io: &Arc<IoCtx>, image: &str) -> Option<serde_json::Value> {
    let id = Image::open_read_only(io, image, None).ok()?.id().ok()?;
    let m = io
        .omap_get_vals_by_keys("csi-rbd-replicator.registry", &[&format!("image.{id}")])
        .ok()?;
    m.values()
        .next()
        .and_then(|v| serde_json::from_slice(v).ok())
}

impl TestPool {
    /// Writes a ceph-csi cluster-mapping file that maps site-a to site-b and
    /// this pool's id on site-a to its id on site-b.
    pub fn mapping_file(&self, dir: &Path) -> PathBuf {
        let a = self.ioctx(Site::A).pool_id();
        let b = self.ioctx(Site::B).pool_id();
        let path = dir.join("cluster-mapping.json");
        let json = serde_json::json!([{
            "clusterIDMapping": { "site-a": "site-b" },
            "RBDPoolIDMapping": [{ a.to_string(): b.to_string() }],
        }]);
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }
}

/// The name of the first sync snapshot (sequence 1) of `image` in `io`'s
/// pool, which EnableVolumeReplication takes.
///
/// Enable answers before the snapshot exists (it follows in the
/// background): this waits up to a minute for it.
pub fn first_sync(io: &Arc<IoCtx>, image: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(n) = sync_snaps_in(io, image)
            .into_iter()
            .find(|n| n.starts_with("csirr-sync.0000000001"))
        {
            return n;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{image} has no first sync snapshot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Requests of the role RPCs, with the site's secrets.
pub mod req {
    use super::{Site, secrets, source};
    use csi_rbd_replicator::grpc::proto::replication as pb;

    /// PromoteVolume.
    pub fn promote(site: Site, vid: &str, force: bool) -> pb::PromoteVolumeRequest {
        pb::PromoteVolumeRequest {
            replication_source: source(vid),
            secrets: secrets(site),
            force,
            ..Default::default()
        }
    }

    /// DemoteVolume.
    pub fn demote(site: Site, vid: &str, force: bool) -> pb::DemoteVolumeRequest {
        pb::DemoteVolumeRequest {
            replication_source: source(vid),
            secrets: secrets(site),
            force,
            ..Default::default()
        }
    }

    /// ResyncVolume.
    pub fn resync(site: Site, vid: &str, force: bool) -> pb::ResyncVolumeRequest {
        pb::ResyncVolumeRequest {
            replication_source: source(vid),
            secrets: secrets(site),
            force,
            ..Default::default()
        }
    }

    /// DisableVolumeReplication.
    pub fn disable(site: Site, vid: &str) -> pb::DisableVolumeReplicationRequest {
        pb::DisableVolumeReplicationRequest {
            replication_source: source(vid),
            secrets: secrets(site),
            ..Default::default()
        }
    }
}

/// Promotes without force, retrying while the answer is UNAVAILABLE (the
/// peer's demotion snapshot still being copied), exactly as the csi-addons
/// controller would. Panics on any other error.
pub async fn promote_planned(sc: &Sidecar, vid: &str, timeout: Duration) {
    let (c, site) = (sc.controller().await, sc.site);
    let what = format!("a planned promotion of {vid} on {}", site.id());
    eventually(&what, timeout, Duration::from_millis(200), || {
        let mut c = c.clone();
        async move {
            match c.promote_volume(req::promote(site, vid, false)).await {
                Ok(_) => Ok(()),
                Err(s) if s.code() == tonic::Code::Unavailable => Err(s.message().to_string()),
                Err(s) => panic!("planned promotion of {vid} on {}: {s:?}", site.id()),
            }
        }
    })
    .await
}

/// Calls ResyncVolume until it answers ready.
pub async fn resync_until_ready(sc: &Sidecar, vid: &str, force: bool, timeout: Duration) {
    let (c, site) = (sc.controller().await, sc.site);
    let what = format!("a resync of {vid} on {} to be ready", site.id());
    eventually(&what, timeout, Duration::from_millis(300), || {
        let mut c = c.clone();
        async move {
            let r = c
                .resync_volume(req::resync(site, vid, force))
                .await
                .unwrap_or_else(|s| panic!("resync of {vid} on {}: {s:?}", site.id()));
            r.into_inner().ready.then_some(()).ok_or_else(String::new)
        }
    })
    .await
}

/// Runs `deploy/dev/ceph-pair.sh ARGS` (stop/start daemons).
pub fn pair_ctl(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/dev/ceph-pair.sh");
    let o = Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("ceph-pair.sh runs");
    assert!(
        o.status.success(),
        "ceph-pair.sh {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs the built binary's one-shot command `cmd` (`status`, `verify`,
/// `omap-generate`, ...) against `site` as its CSI user, like a sidecar would
/// be configured, with `args` after the connection flags.
pub fn cli(cmd: &str, site: Site, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_csi-rbd-replicator"))
        .arg(cmd)
        .arg("--csi-config")
        .arg(env("CSIRR_CSI_CONFIG"))
        .arg("--cluster-mapping")
        .arg(env("CSIRR_CLUSTER_MAPPING"))
        .args(["--cluster-id", site.id()])
        .arg("--secret-dir")
        .arg(site.secret_dir())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} runs: {e}"))
}

/// Exit code, stdout and stderr of a command, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A command's stdout as JSON.
pub fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// Runs `f` on drop (restarts daemons even when an assertion fails).
/// Site-a is lost: its sidecar `a` killed, its OSD and monitor stopped.
/// They come back (monitor first) when the guard drops, also on a failed
/// assertion. Only for `exclusive_` tests.
pub fn lose_site_a(a: &mut Sidecar) -> impl Drop {
    a.kill();
    pair_ctl(&["stop", "site-a", "osd"]);
    pair_ctl(&["stop", "site-a", "mon"]);
    scopeguard(|| {
        pair_ctl(&["start", "site-a", "mon"]);
        pair_ctl(&["start", "site-a", "osd"]);
    })
}

pub fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    G(Some(f))
}

/// Waits for a sync snapshot of `name` newer than `after` that both sides
/// hold, and checks that both read the same at it. Returns its name.
pub async fn converged_after(
    pool: &TestPool,
    from: Site,
    name: &str,
    after: Option<&str>,
) -> String {
    let (src, dst) = (pool.ioctx(from), pool.ioctx(from.other()));
    let mut found = None;
    wait_until(
        "a newer sync point on both sides",
        Duration::from_secs(150),
        || {
            let theirs = sync_snaps_in(&dst, name);
            found = sync_snaps_in(&src, name)
                .into_iter()
                .rev()
                .find(|s| after.is_none_or(|a| s.as_str() > a) && theirs.contains(s));
            found.is_some()
        },
    )
    .await;
    let snap = found.unwrap();
    let spec = format!("{}/{name}@{snap}", pool.name);
    assert_eq!(
        checksum(from, &spec),
        checksum(from.other(), &spec),
        "{spec} differs between the sites"
    );
    snap
}
