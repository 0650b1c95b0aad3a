//! The primary side's snapshot scheduler: takes sync snapshots of primary
//! images on their schedule (`schedulingInterval`, `schedulingStartTime`),
//! in the pools whose lease this process holds.
//!
//! A new sync snapshot is taken only when the previous one has reached every
//! replica that reports (at most one pending sync point per image): snapshots
//! cannot pile up while a peer is down or slow, and the recovery point is
//! always measured from a sync point the replica actually has.
//!
//! Snapshots wait for a monitor round each (0.5-1 s on the test machine);
//! those due at about the same time, and the first ones of images just
//! enabled, are taken concurrently so that they share rounds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};

use csirr_ceph::{Image, IoCtx};
use csirr_csi::params::{StartTime, parse_interval};

use super::Engine;
use super::error::{CephContext, Result};
use super::registry::{ImageRecord, Registry, Role, Schedule, sync_snap_name, sync_snaps};
use super::replayer::{remove_snaps, surplus};
use super::slots::image_key;

/// Interval used when the VolumeReplicationClass gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// Snapshots taken at once: each waits for a monitor round (up to
/// `paxos_propose_interval`, 1 s), and the snapshots in flight together
/// share it. 16 at once took 200 first snapshots 13 s (one round per 16);
/// 256 take them in one or two rounds. Each is one blocking thread, mostly
/// waiting, and an open image handle while it runs.
pub const SNAPSHOT_BATCH: usize = 256;

/// How long a first sync snapshot waits for a busy image (a role change or
/// a scheduler pass on it) before leaving it to the scheduler.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(30);

/// An image Enable registered without a sync snapshot yet.
#[derive(Clone)]
pub struct FirstSync {
    /// Its pool and namespace.
    pub io: Arc<IoCtx>,
    /// Its RBD image id.
    pub image_id: String,
    /// Its name.
    pub image_name: String,
}

impl FirstSync {
    /// Its key in slots and logs.
    pub fn key(&self) -> String {
        image_key(self.io.pool(), self.io.namespace(), &self.image_name)
    }
}

/// A parsed schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Time between sync points.
    pub interval: Duration,
    /// Anchor of the grid of sync times, if any.
    pub start: Option<StartTime>,
}

impl Plan {
    /// The plan of a registry schedule; invalid stored values fall back to
    /// the default interval (they were validated when stored).
    pub fn of(s: &Schedule) -> Self {
        let interval = s
            .interval
            .as_deref()
            .and_then(|i| parse_interval(i).ok())
            .unwrap_or(DEFAULT_INTERVAL);
        let start = s
            .start_time
            .as_deref()
            .and_then(|t| StartTime::parse(t).ok());
        Self { interval, start }
    }

    /// When the sync point after one taken at `last` is due.
    pub fn next_after(&self, last: DateTime<Utc>) -> DateTime<Utc> {
        let step = chrono::TimeDelta::from_std(self.interval).unwrap_or(chrono::TimeDelta::MAX);
        match self.start {
            // The first grid point strictly after `last`.
            Some(st) => {
                st.next_at_or_after(last + chrono::TimeDelta::nanoseconds(1), self.interval)
            }
            None => last
                .checked_add_signed(step)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }
}

/// Due times the scheduler already knows, by image id, so that idle images
/// cost no Ceph calls between their sync points (and, for journal-mode
/// primaries, which take none, the next check of their journal's bound).
#[derive(Default)]
pub struct DueCache {
    due: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl DueCache {
    /// When image `id` is next due, if known.
    pub(crate) fn get(&self, id: &str) -> Option<DateTime<Utc>> {
        self.due.lock().get(id).copied()
    }

    /// Image `id` is next due `at`.
    pub(crate) fn set(&self, id: &str, at: DateTime<Utc>) {
        self.due.lock().insert(id.to_string(), at);
    }
}

impl Engine {
    /// Takes the sync snapshots that are due among `records`, the registry
    /// records of `io`'s pool and namespace. Returns how many were taken.
    /// Blocking.
    pub fn schedule_pool(
        &self,
        io: &Arc<IoCtx>,
        records: &[ImageRecord],
        cache: &DueCache,
    ) -> Result<usize> {
        let reg = Registry::new(Arc::clone(io));
        let now = Utc::now();
        let due: Vec<&ImageRecord> = records
            .iter()
            .filter(|r| r.role == Role::Primary)
            // Journal mode: the replica takes its bootstrap snapshot itself.
            .filter(|r| r.mode != super::journal_mode::MODE)
            .filter(|r| cache.get(&r.image_id).is_none_or(|d| d <= now))
            .collect();
        // Concurrently: each snapshot waits for a monitor round, and
        // snapshots in flight together share rounds.
        let next = AtomicUsize::new(0);
        let taken = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..due.len().min(SNAPSHOT_BATCH) {
                s.spawn(|| {
                    while let Some(rec) = due.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if self.schedule_one(io, &reg, rec, cache, now) {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        Ok(taken.into_inner())
    }

    /// One image of [`Engine::schedule_pool`]: whether a snapshot was taken.
    fn schedule_one(
        &self,
        io: &Arc<IoCtx>,
        reg: &Registry,
        rec: &ImageRecord,
        cache: &DueCache,
        now: DateTime<Utc>,
    ) -> bool {
        // A role change (Disable, Demote, Promote) on the image runs: leave
        // it alone. Disable removes the sync snapshots before the record,
        // and a snapshot taken in between would outlive both.
        let slot = self
            .slots
            .get(&image_key(io.pool(), io.namespace(), &rec.image_name));
        let Some(_guard) = slot.try_enter() else {
            return false;
        };
        // Re-read under the slot: the record may have changed since.
        let rec = match reg.get(&rec.image_id) {
            Ok(Some(r)) if r.role == Role::Primary => r,
            _ => return false,
        };
        match self.schedule_image(io, reg, &rec, now) {
            Ok((due, took)) => {
                cache.set(&rec.image_id, due);
                took
            }
            Err(e) => {
                tracing::warn!(
                    image = %image_key(io.pool(), io.namespace(), &rec.image_name),
                    error = %e,
                    "scheduling failed"
                );
                false
            }
        }
    }

    /// Takes the first sync snapshot of an image Enable registered, unless
    /// it has one by now or is no longer primary. Waits up to
    /// [`FIRST_SYNC_WAIT`] for the image's slot, then leaves it to the
    /// scheduler. Blocking.
    pub fn take_first_sync_point(&self, first: &FirstSync) -> Result<()> {
        let key = first.key();
        let slot = self.slots.get(&key);
        let deadline = Instant::now() + FIRST_SYNC_WAIT;
        let _guard = loop {
            if let Some(g) = slot.try_enter() {
                break g;
            }
            if Instant::now() >= deadline {
                tracing::info!(image = %key, "image busy; its first sync snapshot is left to the scheduler");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let reg = Registry::new(Arc::clone(&first.io));
        if reg
            .get(&first.image_id)?
            .is_none_or(|r| r.role != Role::Primary)
        {
            return Ok(());
        }
        let img = Image::open_by_id(&first.io, &first.image_id)
            .ctx(|| format!("opening primary {key}"))?;
        let snaps = img
            .snap_list()
            .ctx(|| format!("listing snapshots of {key}"))?;
        if sync_snaps(&snaps).is_empty() {
            self.take_sync_snapshot(&img, 1)?;
        }
        reg.announce();
        Ok(())
    }

    /// Takes the next sync snapshot of `rec` if due and the previous one has
    /// reached the replicas. Returns the next due time and whether a snapshot
    /// was taken.
    fn schedule_image(
        &self,
        io: &Arc<IoCtx>,
        reg: &Registry,
        rec: &ImageRecord,
        now: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, bool)> {
        let plan = Plan::of(&rec.schedule);
        // A live-migration of the image pauses its sync points (see
        // live_migration); its end is noticed a second later.
        match self.follow_live_migration(io, reg, rec)? {
            super::live_migration::Step::Continue => {}
            super::live_migration::Step::Paused | super::live_migration::Step::Rebound => {
                return Ok((now + chrono::TimeDelta::seconds(1), false));
            }
        }
        let img = Image::open_by_id(io, &rec.image_id)
            .ctx(|| format!("opening primary {}/{}", io.spec(), rec.image_name))?;
        let snaps = img
            .snap_list()
            .ctx(|| format!("listing snapshots of {}", img.spec()))?;
        let sync = sync_snaps(&snaps);
        let Some((&seq, snap)) = sync.iter().next_back() else {
            // Enable has it taken right after the record; a record
            // without one lost it (the process died in between, or it was
            // removed by hand): take it now.
            self.take_sync_snapshot(&img, 1)?;
            reg.announce();
            return Ok((plan.next_after(now), true));
        };
        let last = img
            .snap_timestamp(snap.id)
            .ok()
            .and_then(|t| Utc.timestamp_opt(t, 0).single())
            .unwrap_or(now);
        let due = plan.next_after(last);
        if due > now {
            return Ok((due, false));
        }
        // At most one pending sync point: wait until the replicas have it.
        let statuses = reg.statuses(&rec.image_id)?;
        let pending = statuses.is_empty()
            || statuses.iter().any(|s| {
                s.last_sync
                    .as_ref()
                    .is_none_or(|l| l.snap_name != snap.name)
            });
        if pending {
            tracing::debug!(image = %img.spec(), snapshot = %snap.name, "sync point due, previous not replicated yet");
            return Ok((now + chrono::TimeDelta::seconds(1), false));
        }
        // The bound on sync snapshots: the newest `--keep-snapshots` plus the
        // one taken now (the replayer usually pruned them already).
        let doomed = surplus(self.cfg.keep_snapshots, &sync, &[&snap.name]);
        remove_snaps(&img, &doomed, &img.spec(), "primary");
        self.take_sync_snapshot(&img, super::registry::next_sync_seq(seq)?)?;
        // The peer's replayer starts on it now rather than at its next poll.
        reg.announce();
        Ok((plan.next_after(now), true))
    }

    /// Takes sync snapshot number `seq` of `img`.
    pub fn take_sync_snapshot(&self, img: &Image, seq: u64) -> Result<String> {
        let name = sync_snap_name(seq);
        img.snap_create(&name)
            .ctx(|| format!("taking sync snapshot {name} of {}", img.spec()))?;
        tracing::info!(image = %img.spec(), snapshot = %name, "sync snapshot taken");
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn plain_interval_counts_from_the_last_sync_point() {
        let p = Plan::of(&Schedule {
            interval: Some("5m".into()),
            start_time: None,
        });
        assert_eq!(
            p.next_after(at("2024-05-01T10:00:07Z")),
            at("2024-05-01T10:05:07Z")
        );
    }

    #[test]
    fn missing_interval_uses_the_default() {
        let p = Plan::of(&Schedule::default());
        assert_eq!(p.interval, DEFAULT_INTERVAL);
    }

    #[test]
    fn future_start_time_delays_the_first_scheduled_sync() {
        let p = Plan::of(&Schedule {
            interval: Some("10s".into()),
            start_time: Some("2024-05-01T12:00:00Z".into()),
        });
        // Enabled (first snapshot) at 10:00: next is the start time itself.
        assert_eq!(
            p.next_after(at("2024-05-01T10:00:00Z")),
            at("2024-05-01T12:00:00Z")
        );
        // After that, the grid.
        assert_eq!(
            p.next_after(at("2024-05-01T12:00:00Z")),
            at("2024-05-01T12:00:10Z")
        );
        assert_eq!(
            p.next_after(at("2024-05-01T12:00:03Z")),
            at("2024-05-01T12:00:10Z")
        );
    }

    #[test]
    fn daily_start_time_anchors_the_grid() {
        let p = Plan::of(&Schedule {
            interval: Some("1d".into()),
            start_time: Some("14:00:00-05:00".into()),
        });
        assert_eq!(
            p.next_after(at("2024-05-01T10:00:00Z")),
            at("2024-05-01T19:00:00Z")
        );
        assert_eq!(
            p.next_after(at("2024-05-01T19:00:00Z")),
            at("2024-05-02T19:00:00Z")
        );
    }
}
