//! Background jobs the engine starts and does not wait for: pruning the
//! primary's surplus sync snapshots after a sync, taking the first sync
//! snapshot Enable left behind. Each job is owned by [`Background`] (no
//! detached thread or task): a job that panics is logged with its name and
//! image and counted, one job per (name, image) runs at a time (a second
//! request while one runs is dropped: the running one does the same work,
//! and the next sync asks again), and shutdown waits for the running jobs.
//!
//! Long-lived loops (the replayer, the metrics collector) run under
//! [`supervise`]: restarted with backoff when they die, readiness down with
//! the reason until they run again.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Engine;

/// The engine's background jobs.
#[derive(Default)]
pub struct Background {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Running jobs; finished ones are collected at the next spawn.
    tasks: Mutex<JoinSet<()>>,
    /// `name image` of every running job.
    running: Mutex<HashSet<String>>,
    /// Jobs that panicked since the process started.
    panicked: AtomicU64,
}

impl Inner {
    fn tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock()
    }

    fn running(&self) -> MutexGuard<'_, HashSet<String>> {
        self.running.lock()
    }
}

/// Takes the job's (name, image) off the running set when the job ends,
/// also by panic.
struct Running {
    inner: Arc<Inner>,
    id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.inner.running().remove(&self.id);
    }
}

impl Background {
    /// Runs blocking `f` on the runtime's blocking pool as job `name` for
    /// `image`. Without a runtime (a blocking caller outside one) `f` runs
    /// right here. Returns false when the same job for the same image is
    /// still running (then `f` is dropped unrun).
    pub fn spawn_blocking(
        &self,
        name: &'static str,
        image: &str,
        f: impl FnOnce() + Send + 'static,
    ) -> bool {
        let Some(running) = self.claim(name, image) else {
            return false;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let span = tracing::info_span!("background", job = name, image = %image);
                let mut tasks = self.inner.tasks();
                self.reap(&mut tasks);
                tasks.spawn_blocking_on(
                    move || {
                        let _e = span.enter();
                        let _running = running;
                        f();
                    },
                    &rt,
                );
            }
            Err(_) => {
                let _running = running;
                f();
            }
        }
        true
    }

    /// Runs `fut` on the runtime as job `name` for `image`; false (and
    /// `fut` dropped) when the same job for the same image still runs or
    /// there is no runtime.
    pub fn spawn(
        &self,
        name: &'static str,
        image: &str,
        fut: impl Future<Output = ()> + Send + 'static,
    ) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(job = name, image = %image, "no runtime for a background job");
            return false;
        };
        let Some(running) = self.claim(name, image) else {
            return false;
        };
        let mut tasks = self.inner.tasks();
        self.reap(&mut tasks);
        tasks.spawn_on(
            async move {
                let _running = running;
                fut.await;
            },
            &rt,
        );
        true
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.inner.running().len()
    }

    /// Jobs that panicked since the process started.
    pub fn panicked(&self) -> u64 {
        self.inner.panicked.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the running jobs to end (shutdown); the
    /// ones still running then are aborted where they await (a blocking
    /// job runs to its end in any case). Returns how many were cut off.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let mut set = std::mem::take(&mut *self.inner.tasks());
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, set.join_next()).await {
                Ok(Some(res)) => self.note(res),
                Ok(None) => return 0,
                Err(_) => {
                    let left = set.len();
                    tracing::warn!(left, "background jobs still running at shutdown");
                    set.abort_all();
                    // Aborted tasks end at their next await; blocking ones
                    // cannot be stopped and are left to finish.
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while set.join_next().await.is_some() {}
                    })
                    .await;
                    return left;
                }
            }
        }
    }

    fn claim(&self, name: &'static str, image: &str) -> Option<Running> {
        let id = format!("{name} {image}");
        if !self.inner.running().insert(id.clone()) {
            tracing::debug!(job = name, image = %image, "background job already running");
            return None;
        }
        Some(Running {
            inner: Arc::clone(&self.inner),
            id,
        })
    }

    /// Collects the jobs that ended, logging the ones that panicked.
    fn reap(&self, tasks: &mut JoinSet<()>) {
        while let Some(res) = tasks.try_join_next() {
            self.note(res);
        }
    }

    fn note(&self, res: Result<(), tokio::task::JoinError>) {
        if let Err(e) = res
            && e.is_panic()
        {
            self.inner.panicked.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "a background job panicked");
        }
    }
}

/// Runs the loop `make()` returns until `cancel`, as task `name`: when it
/// dies (a panic, or an end before `cancel`) it is logged, readiness
/// ([`Engine::probe`]) goes down with the reason, and a new loop starts
/// after a backoff (1 s, doubling to 30 s; back to 1 s after a minute of
/// running).
pub async fn supervise<F, Fut>(
    engine: Arc<Engine>,
    name: &'static str,
    cancel: CancellationToken,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    const MAX_BACKOFF: Duration = Duration::from_secs(30);
    let mut backoff = Duration::from_secs(1);
    loop {
        engine.set_down(name, None);
        let started = tokio::time::Instant::now();
        let ended = tokio::spawn(make()).await;
        if cancel.is_cancelled() {
            break;
        }
        let why = match ended {
            Ok(()) => format!("the {name} stopped unexpectedly"),
            Err(e) => format!("the {name} failed: {e}"),
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tracing::error!(task = name, reason = %why, restart_in = ?backoff, "{name} down; restarting it");
        engine.set_down(name, Some(format!("{why}; restarting in {backoff:?}")));
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    engine.set_down(name, None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_job_per_name_and_image_and_panics_are_counted() {
        let bg = Background::default();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        assert!(bg.spawn_blocking("prune", "p/a", move || {
            go_rx.recv().ok();
        }));
        // The same job for the same image waits its turn (dropped);
        // another image or another job runs.
        assert!(!bg.spawn_blocking("prune", "p/a", || {}));
        assert!(bg.spawn_blocking("prune", "p/b", || {}));
        assert!(bg.spawn_blocking("other", "p/a", || panic!("boom")));
        go_tx.send(()).unwrap();
        assert_eq!(bg.drain(Duration::from_secs(10)).await, 0);
        assert_eq!(bg.running(), 0);
        assert_eq!(bg.panicked(), 1);
        // Once it ended, the job can run again.
        assert!(bg.spawn_blocking("prune", "p/a", || {}));
        assert_eq!(bg.drain(Duration::from_secs(10)).await, 0);
    }

    #[tokio::test]
    async fn drain_cuts_off_a_job_that_does_not_end() {
        let bg = Background::default();
        assert!(bg.spawn("wait", "p/a", std::future::pending()));
        assert_eq!(bg.drain(Duration::from_millis(50)).await, 1);
        assert_eq!(bg.running(), 0, "the aborted job left the running set");
    }

    /// An engine that never connects (the supervisor only uses its
    /// readiness).
    fn idle_engine() -> Arc<Engine> {
        use csirr_csi::config::{ClusterConfig, ClusterMapping, CsiConfig};
        let local = ClusterConfig {
            cluster_id: "here".into(),
            monitors: vec!["127.0.0.1:1".into()],
            rados_namespace: None,
        };
        let creds = super::super::conn::Credentials::new(
            "admin",
            "AQAAAAAAAAAAABAAAAAAAAAAAAAAAAAAAAAAAA==",
        )
        .expect("credentials");
        Engine::new(super::super::EngineConfig::new(
            CsiConfig::default(),
            ClusterMapping::default(),
            local,
            creds,
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn a_dying_loop_is_restarted_with_readiness_down_meanwhile() {
        let engine = idle_engine();
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU64::new(0));
        let (s, c) = (Arc::clone(&starts), cancel.clone());
        let sup = tokio::spawn(supervise(
            Arc::clone(&engine),
            "loop",
            cancel.clone(),
            move || {
                let (s, c) = (Arc::clone(&s), c.clone());
                async move {
                    // The first two runs die at once (a panic, then an early
                    // end); the third runs until cancelled.
                    match s.fetch_add(1, Ordering::SeqCst) {
                        0 => panic!("first run dies"),
                        1 => {}
                        _ => c.cancelled().await,
                    }
                }
            },
        ));
        // Between the runs readiness names the loop and why it is down.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        let why = engine.probe(Duration::from_secs(30)).unwrap_err();
        assert!(
            why.contains("the loop failed") && why.contains("restarting"),
            "{why}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        let why = engine.probe(Duration::from_secs(30)).unwrap_err();
        assert!(why.contains("the loop stopped unexpectedly"), "{why}");
        // The backoff doubled: 2 s until the third run.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        let why = engine.probe(Duration::from_secs(30)).unwrap_err();
        assert!(
            !why.contains("loop"),
            "running again, so only the cluster is missing: {why}"
        );
        cancel.cancel();
        sup.await.unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "not restarted after cancel"
        );
    }

    #[test]
    fn without_a_runtime_a_blocking_job_runs_in_place() {
        let bg = Background::default();
        let ran = Arc::new(AtomicU64::new(0));
        let r = Arc::clone(&ran);
        assert!(bg.spawn_blocking("prune", "p/a", move || {
            r.fetch_add(1, Ordering::Relaxed);
        }));
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert!(!bg.spawn("first-sync", "p/a", async {}));
    }
}
