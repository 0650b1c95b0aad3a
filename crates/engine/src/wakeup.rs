//! Event-driven wake-ups of the replayer.
//!
//! The replayer watches, on each peer, the registry object of every pool and
//! namespace it replays; the engine notifies it whenever there is something
//! to replay: Enable, a scheduled sync snapshot, a demotion, a promotion,
//! Disable. Any notification wakes the replayer for a pass right away; its
//! poll interval remains the safety net for a lost watch, which is
//! re-registered on the next pass.
//!
//! Image header objects are deliberately not watched: a watch there counts
//! as a client of the image, and would make "is the volume still in use?"
//! checks (DemoteVolume's, ceph-csi's before deleting) see the replayer.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use csirr_ceph::{ErrorKind, IoCtx, Watch, WriteOp};

/// An object to watch: where it is, and a key naming it across passes.
pub struct WatchTarget {
    /// Unique name: cluster fsid, pool id, namespace and object.
    pub key: String,
    /// The pool and namespace holding the object.
    pub io: Arc<IoCtx>,
    /// The object.
    pub oid: String,
    /// Create the object (empty) if it does not exist yet: a registry
    /// before the first Enable, so that the first Enable wakes the replayer
    /// too.
    pub create: bool,
}

impl WatchTarget {
    /// The object `oid` in `io`.
    pub fn new(io: &Arc<IoCtx>, oid: String) -> Self {
        Self {
            key: format!(
                "{}/{}/{}/{oid}",
                io.cluster().fsid(),
                io.pool_id(),
                io.namespace()
            ),
            io: Arc::clone(io),
            oid,
            create: false,
        }
    }

    /// The registry object in `io`, created if missing.
    pub fn registry(io: &Arc<IoCtx>) -> Self {
        Self {
            create: true,
            ..Self::new(io, super::registry::REGISTRY_OBJECT.to_string())
        }
    }
}

/// The replayer's wake-up signal and the watches that raise it.
#[derive(Default)]
pub struct Wakeups {
    signal: Arc<Notify>,
    watches: Mutex<HashMap<String, Watch>>,
}

impl Wakeups {
    /// Wakes the replayer (or makes its next wait return at once).
    pub fn wake(&self) {
        self.signal.notify_one();
    }

    /// Waits for a wake-up.
    pub async fn wait(&self) {
        self.signal.notified().await;
    }

    /// Keeps exactly the watches of `targets`: registers missing and broken
    /// ones and drops the others. A target that cannot be watched is logged
    /// and retried on the next call. Blocking.
    pub fn watch_only(&self, targets: Vec<WatchTarget>) {
        let mut current = std::mem::take(&mut *self.watches.lock());
        let mut next = HashMap::with_capacity(targets.len());
        for t in targets {
            if let Some(w) = current.remove(&t.key).filter(Watch::healthy) {
                next.insert(t.key, w);
                continue;
            }
            match self.register(&t) {
                Ok(w) => {
                    tracing::debug!(object = %t.oid, pool = %t.io.spec(), "watching");
                    next.insert(t.key, w);
                }
                Err(e) => {
                    tracing::debug!(object = %t.oid, pool = %t.io.spec(), error = %e, "cannot watch; polling")
                }
            }
        }
        // Unwatch outside the lock: dropping a watch waits for its callbacks.
        *self.watches.lock() = next;
        drop(current);
    }

    fn register(&self, t: &WatchTarget) -> csirr_ceph::Result<Watch> {
        let watch = || {
            let signal = Arc::clone(&self.signal);
            Watch::new(&t.io, &t.oid, Box::new(move || signal.notify_one()))
        };
        match watch() {
            Err(e) if t.create && e.kind() == ErrorKind::NotFound => {
                let mut op = WriteOp::new()?;
                op.create(false);
                op.operate(&t.io, &t.oid)?;
                watch()
            }
            r => r,
        }
    }

    /// Drops every watch (shutdown). Blocking.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.watches.lock());
        drop(all);
    }
}

/// Tells the watchers of `oid` in `io` (the peers' replayers) that it
/// changed, without waiting for their acks (librados collects them in the
/// background): a lost notification only delays the peer until its next
/// poll.
pub fn announce(io: &Arc<IoCtx>, oid: &str) {
    if let Err(e) = io.notify_in_background(oid, Duration::from_secs(5)) {
        tracing::debug!(object = %oid, pool = %io.spec(), error = %e, "notify failed");
    }
}
