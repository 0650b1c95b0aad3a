//! The seam between the role changes' decisions and Ceph.
//!
//! [`VolumeStore`] is what DemoteVolume and PromoteVolume need of one volume:
//! its registry record (compare-and-swap), its peer's record, the clients
//! that have it open, its exclusive lock, its sync snapshots and a rollback.
//! [`CephVolume`] implements it over librbd and the registry; the tests'
//! in-memory pair of sites (`fake`, below) implements it too, so that the
//! role rules of `roles.rs` are unit-tested in every ordering and with a
//! failure injected between any two steps. Journal mode keeps its own
//! steps (`journal_roles.rs`): the store hands them over as a whole.

use csirr_ceph::Image;

use super::error::{CephContext, Result};
use super::registry::{ImageRecord, PrimaryRef, Registry, Schedule, sync_snapshots};
use super::replayer::settle_pending_snap;
use super::resolve::Resolved;
use super::roles::Divergence;
use super::rollback::rollback_to;
use super::slots::SlotGuard;
use super::{Engine, VolumeRequest};

/// One volume as the role changes see it. Every method may block on Ceph.
pub(crate) trait VolumeStore {
    /// What keeps the replayer and the scheduler off the volume while held.
    type Pause;

    /// The volume's name in messages (`pool/namespace/image`).
    fn key(&self) -> &str;
    /// Writes the record if it is still what was read (else `Conflict`) and
    /// wakes the replayers.
    fn put(&self, rec: &mut ImageRecord) -> Result<()>;
    /// The peer's record of the volume (`primary_id`: its image id there, when
    /// known); `None` when it has none, an error when it cannot be asked.
    fn peer_record(&self, primary_id: Option<&str>) -> Result<Option<ImageRecord>>;
    /// Clients other than this process that have the image open.
    fn writers(&self) -> Result<Vec<String>>;
    /// The holders of the image's exclusive lock.
    fn lock_owners(&self) -> Result<Vec<String>>;
    /// Breaks a holder's lock (best effort, logged).
    fn break_lock(&self, owner: &str);
    /// Breaks every lock this process does not hold (best effort).
    fn break_foreign_locks(&self);
    /// Takes the exclusive lock and keeps it, refusing other writers.
    fn hold_lock(&self) -> Result<()>;
    /// Lets the lock go (the image is writable by applications again).
    fn release_lock(&self);
    /// Stops the replayer's work on the volume until the guard drops.
    fn pause(&self) -> Result<Self::Pause>;
    /// The image's sync snapshots `(sequence, name)`, oldest first.
    fn sync_snapshots(&self) -> Result<Vec<(u64, String)>>;
    /// Takes sync snapshot number `seq`; returns its name.
    fn take_sync_snapshot(&self, seq: u64) -> Result<String>;
    /// Takes the replica's snapshot of a sync point recorded before it
    /// existed (`pending_snap`), and records that.
    fn settle_pending(&self, rec: &mut ImageRecord) -> Result<()>;
    /// Makes the head equal to sync snapshot `snap`; returns the bytes
    /// rewritten.
    fn rollback_to(&self, snap: &str) -> Result<u64>;
    /// How this (demoted) image relates to the peer's primary `primary_id`,
    /// and the reference to that primary.
    fn divergence_from(&self, primary_id: &str) -> Result<(Divergence, PrimaryRef)>;
    /// Makes the image a replica of `primary` (rolling back and removing
    /// what diverged), records it, and locks it against writers. Returns
    /// the bytes rolled back.
    fn adopt_as_replica(
        &self,
        rec: &mut ImageRecord,
        primary: PrimaryRef,
        div: &Divergence,
    ) -> Result<u64>;
    /// Journal mode's resync.
    fn journal_resync(&self, rec: ImageRecord, force: bool) -> Result<bool>;
    /// Journal mode's demotion (orphan tag, DemotePromote event).
    fn journal_demote(&self, rec: ImageRecord, force: bool, owners: &[String]) -> Result<()>;
    /// Journal mode's promotion (linked or forced tag).
    fn journal_promote(
        &self,
        rec: ImageRecord,
        force: bool,
        schedule: Option<Schedule>,
    ) -> Result<()>;
}

/// A resolved volume on its cluster, with the engine that holds its locks.
pub(crate) struct CephVolume<'a> {
    /// The engine (held locks, slots, configuration, peers).
    pub engine: &'a Engine,
    /// The request (its credentials reach the journal's steps).
    pub req: &'a VolumeRequest,
    /// The volume and its image.
    pub vol: &'a Resolved,
    /// The registry of the volume's pool and namespace.
    pub reg: &'a Registry,
    /// `pool/namespace/image`.
    pub key: String,
}

impl CephVolume<'_> {
    fn image(&self) -> &Image {
        &self.vol.image
    }
}

impl VolumeStore for CephVolume<'_> {
    type Pause = SlotGuard;

    fn key(&self) -> &str {
        &self.key
    }

    fn put(&self, rec: &mut ImageRecord) -> Result<()> {
        self.reg.put(rec)?;
        self.reg.announce();
        Ok(())
    }

    fn peer_record(&self, primary_id: Option<&str>) -> Result<Option<ImageRecord>> {
        Ok(self.engine.peer_record(self.vol, primary_id)?.rec)
    }

    fn writers(&self) -> Result<Vec<String>> {
        let me = self.image().ioctx().cluster().instance_id();
        Ok(self
            .image()
            .watchers()
            .ctx(|| format!("listing clients of {}", self.key))?
            .into_iter()
            .filter(|w| u64::try_from(w.id).ok() != Some(me))
            .map(|w| format!("client.{} at {}", w.id, w.addr))
            .collect())
    }

    fn lock_owners(&self) -> Result<Vec<String>> {
        self.image()
            .lock_owners()
            .ctx(|| format!("reading the lock of {}", self.key))
    }

    fn break_lock(&self, owner: &str) {
        tracing::warn!(image = %self.key, owner = %owner, "breaking the lock of a writer (forced)");
        if let Err(e) = self.image().lock_break(owner) {
            tracing::debug!(image = %self.key, owner = %owner, error = %e, "lock not broken");
        }
    }

    fn break_foreign_locks(&self) {
        self.engine.break_foreign_locks(self.image(), &self.key);
    }

    fn hold_lock(&self) -> Result<()> {
        self.engine.hold_lock(&self.key, self.image())
    }

    fn release_lock(&self) {
        self.engine.held.release(&self.key);
    }

    fn pause(&self) -> Result<SlotGuard> {
        self.engine.take_slot(&self.key)
    }

    fn sync_snapshots(&self) -> Result<Vec<(u64, String)>> {
        let snaps = self
            .image()
            .snap_list()
            .ctx(|| format!("listing snapshots of {}", self.image().spec()))?;
        Ok(sync_snapshots(&snaps)
            .into_iter()
            .map(|(q, s)| (q, s.name))
            .collect())
    }

    fn take_sync_snapshot(&self, seq: u64) -> Result<String> {
        self.engine.take_sync_snapshot(self.image(), seq)
    }

    fn settle_pending(&self, rec: &mut ImageRecord) -> Result<()> {
        settle_pending_snap(self.image(), self.reg, rec)
    }

    fn rollback_to(&self, snap: &str) -> Result<u64> {
        rollback_to(
            self.vol.ioctx(),
            self.image(),
            snap,
            self.engine.cfg.limits,
            &|| false,
        )
    }

    fn divergence_from(&self, primary_id: &str) -> Result<(Divergence, PrimaryRef)> {
        let (cluster, pio) = self.engine.peer_of(self.vol.ioctx())?;
        let pimg = Image::open_by_id_read_only(&pio, primary_id, None)
            .ctx(|| format!("opening the peer's primary {}", self.key))?;
        let div = self.engine.divergence(self.image(), &pimg, &self.key)?;
        let primary = PrimaryRef {
            fsid: cluster.fsid().to_string(),
            image_id: primary_id.to_string(),
        };
        Ok((div, primary))
    }

    fn adopt_as_replica(
        &self,
        rec: &mut ImageRecord,
        primary: PrimaryRef,
        div: &Divergence,
    ) -> Result<u64> {
        self.engine
            .adopt_as_replica(self.reg, rec, self.image(), &self.key, primary, div)
    }

    fn journal_resync(&self, rec: ImageRecord, force: bool) -> Result<bool> {
        self.engine
            .journal_resync(self.req, self.vol, self.reg, rec, force)
    }

    fn journal_demote(&self, rec: ImageRecord, force: bool, owners: &[String]) -> Result<()> {
        self.engine
            .journal_demote(self.vol, self.reg, rec, &self.key, force, owners)
    }

    fn journal_promote(
        &self,
        rec: ImageRecord,
        force: bool,
        schedule: Option<Schedule>,
    ) -> Result<()> {
        self.engine
            .journal_promote(self.req, self.vol, self.reg, rec, force, schedule)
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! Two sites of one volume in memory: records (compare-and-swap on the
    //! serialized bytes, as the registry does), snapshots with the content
    //! they froze, the head's content, the lock, open clients, and a step
    //! log with one injectable failure.

    use std::sync::Arc;

    use parking_lot::Mutex;

    use chrono::Utc;

    use super::VolumeStore;
    use crate::error::{EngineError, Result};
    use crate::registry::{ImageRecord, PrimaryRef, Revision, Role, Schedule, SyncPoint};
    use crate::roles::Divergence;

    /// One site's state of the volume.
    #[derive(Debug, Default, Clone)]
    pub struct Site {
        /// The stored record (serialized), if any.
        pub stored: Option<Vec<u8>>,
        /// Sync snapshots: sequence, name, the head content they froze.
        pub snaps: Vec<(u64, String, String)>,
        /// What the image holds now (a label of its content).
        pub head: String,
        /// The exclusive lock's holder (`me` is this process).
        pub lock: Option<String>,
        /// Clients other than this process with the image open.
        pub writers: Vec<String>,
        /// Whether the other site can ask this one.
        pub reachable: bool,
        /// Whether the replayer is kept off the volume.
        pub paused: bool,
    }

    impl Site {
        /// The record as stored, with its revision.
        pub fn record(&self) -> Option<ImageRecord> {
            let bytes = self.stored.as_ref()?;
            let mut rec: ImageRecord = serde_json::from_slice(bytes).expect("a record");
            rec.revision = Revision::of(bytes);
            Some(rec)
        }
    }

    /// Both sites and the failure to inject.
    #[derive(Debug, Default)]
    pub struct World {
        /// Site a (index 0) and b (index 1).
        pub sites: [Site; 2],
        /// The steps taken, as `site:step`.
        pub steps: Vec<String>,
        /// Fail the step with this number (counted from 0 over `steps`).
        pub fail_at: Option<usize>,
        /// Sequence of snapshot names.
        pub next_tag: u64,
    }

    /// Site `me` of a shared [`World`], as the role changes see it.
    #[derive(Clone)]
    pub struct MemVolume {
        /// The world.
        pub world: Arc<Mutex<World>>,
        /// 0 or 1.
        pub me: usize,
    }

    /// A record as Enable writes it, for a primary (`primary` none) or a
    /// replica of the image `primary`.
    pub fn record(role: Role, primary: Option<&str>) -> ImageRecord {
        let mut rec: ImageRecord = serde_json::from_value(serde_json::json!({
            "version": 1,
            "image_name": "vol",
            "image_id": "id",
            "role": "primary",
            "mode": "snapshot",
            "enabled_at": Utc::now(),
        }))
        .expect("a minimal record");
        rec.role = role;
        rec.primary = primary.map(|p| PrimaryRef {
            fsid: "fsid-a".into(),
            image_id: p.into(),
        });
        rec
    }

    impl MemVolume {
        /// A world with site a primary and site b its replica at sync
        /// point 1 (content "v1"), both reachable.
        pub fn pair() -> (MemVolume, MemVolume) {
            let mut w = World::default();
            for (i, s) in w.sites.iter_mut().enumerate() {
                s.reachable = true;
                s.head = "v1".into();
                s.snaps = vec![(1, "csirr-sync.1".into(), "v1".into())];
                let rec = if i == 0 {
                    record(Role::Primary, None)
                } else {
                    let mut r = record(Role::Secondary, Some("id"));
                    r.last_sync = Some(sync_point("csirr-sync.1"));
                    r
                };
                s.stored = Some(serde_json::to_vec(&rec).expect("serializes"));
            }
            let world = Arc::new(Mutex::new(w));
            (
                MemVolume {
                    world: world.clone(),
                    me: 0,
                },
                MemVolume { world, me: 1 },
            )
        }

        /// Runs `f` on the world.
        pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
            f(&mut self.world.lock())
        }

        /// This site's state.
        pub fn site(&self) -> Site {
            self.with(|w| w.sites[self.me].clone())
        }

        /// This site's record.
        pub fn rec(&self) -> ImageRecord {
            self.site().record().expect("a record")
        }

        /// An application writes `content` to this site (refused while
        /// another holder has the lock).
        pub fn write(&self, content: &str) -> bool {
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if s.lock.as_deref() == Some("me") {
                    return false;
                }
                s.head = content.into();
                true
            })
        }

        /// The replayer copies this site's newest sync snapshot to `to`
        /// and records it there as the newest complete sync point.
        pub fn replicate_to(&self, to: &MemVolume) {
            self.with(|w| {
                let (q, name, content) = w.sites[self.me].snaps.last().cloned().expect("a snap");
                let r = &mut w.sites[to.me];
                if !r.snaps.iter().any(|(_, n, _)| *n == name) {
                    r.snaps.push((q, name.clone(), content.clone()));
                }
                r.head = content;
                let mut rec = r.record().expect("a record");
                rec.last_sync = Some(sync_point(&name));
                r.stored = Some(serde_json::to_vec(&rec).expect("serializes"));
            });
        }

        /// Records a step; the injected failure, when it is this one.
        fn step(&self, what: &str) -> Result<()> {
            self.with(|w| {
                let n = w.steps.len();
                w.steps.push(format!("{}:{what}", self.me));
                if w.fail_at == Some(n) {
                    return Err(EngineError::Unavailable(format!(
                        "injected failure at {what}"
                    )));
                }
                Ok(())
            })
        }
    }

    /// A complete sync point of snapshot `name`.
    pub fn sync_point(name: &str) -> SyncPoint {
        SyncPoint {
            snap_name: name.into(),
            snap_time: Utc::now(),
            completed_at: Utc::now(),
            duration_ms: 1,
            bytes: 1,
        }
    }

    impl VolumeStore for MemVolume {
        type Pause = PauseGuard;

        fn key(&self) -> &str {
            "pool/vol"
        }

        fn put(&self, rec: &mut ImageRecord) -> Result<()> {
            self.step("put")?;
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if s.stored.as_deref() != rec.revision.stored() {
                    return Err(EngineError::Conflict("record changed".into()));
                }
                let bytes = serde_json::to_vec(&*rec).expect("serializes");
                rec.revision = Revision::of(&bytes);
                s.stored = Some(bytes);
                Ok(())
            })
        }

        fn peer_record(&self, _primary_id: Option<&str>) -> Result<Option<ImageRecord>> {
            self.step("peer_record")?;
            self.with(|w| {
                let p = &w.sites[1 - self.me];
                if !p.reachable {
                    return Err(EngineError::Timeout("peer unreachable".into()));
                }
                Ok(p.record())
            })
        }

        fn writers(&self) -> Result<Vec<String>> {
            self.step("writers")?;
            Ok(self.site().writers)
        }

        fn lock_owners(&self) -> Result<Vec<String>> {
            self.step("lock_owners")?;
            Ok(self.site().lock.into_iter().collect())
        }

        fn break_lock(&self, owner: &str) {
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if s.lock.as_deref() == Some(owner) {
                    s.lock = None;
                }
            });
        }

        fn break_foreign_locks(&self) {
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if s.lock.as_deref() != Some("me") {
                    s.lock = None;
                }
            });
        }

        fn hold_lock(&self) -> Result<()> {
            self.step("hold_lock")?;
            self.with(|w| {
                let s = &mut w.sites[self.me];
                match s.lock.as_deref() {
                    None | Some("me") => {
                        s.lock = Some("me".into());
                        Ok(())
                    }
                    Some(o) => Err(EngineError::Unavailable(format!("lock held by {o}"))),
                }
            })
        }

        fn release_lock(&self) {
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if s.lock.as_deref() == Some("me") {
                    s.lock = None;
                }
            });
        }

        fn pause(&self) -> Result<PauseGuard> {
            self.step("pause")?;
            self.with(|w| w.sites[self.me].paused = true);
            Ok(PauseGuard(self.clone()))
        }

        fn sync_snapshots(&self) -> Result<Vec<(u64, String)>> {
            self.step("sync_snapshots")?;
            Ok(self
                .site()
                .snaps
                .into_iter()
                .map(|(q, n, _)| (q, n))
                .collect())
        }

        fn take_sync_snapshot(&self, seq: u64) -> Result<String> {
            self.step("take_sync_snapshot")?;
            Ok(self.with(|w| {
                w.next_tag += 1;
                let name = format!("csirr-sync.{seq}.{}", w.next_tag);
                let s = &mut w.sites[self.me];
                let head = s.head.clone();
                s.snaps.push((seq, name.clone(), head));
                name
            }))
        }

        fn settle_pending(&self, rec: &mut ImageRecord) -> Result<()> {
            self.step("settle_pending")?;
            rec.pending_snap = None;
            Ok(())
        }

        fn rollback_to(&self, snap: &str) -> Result<u64> {
            self.step("rollback_to")?;
            self.with(|w| {
                let s = &mut w.sites[self.me];
                let content = s
                    .snaps
                    .iter()
                    .find(|(_, n, _)| n == snap)
                    .map(|(_, _, c)| c.clone())
                    .ok_or_else(|| EngineError::NotFound(snap.into()))?;
                let changed = u64::from(s.head != content);
                s.head = content;
                Ok(changed)
            })
        }

        fn divergence_from(&self, primary_id: &str) -> Result<(Divergence, PrimaryRef)> {
            self.step("divergence_from")?;
            let (ours, theirs, head, contents) = self.with(|w| {
                let (me, peer) = (&w.sites[self.me], &w.sites[1 - self.me]);
                let ours: Vec<(u64, String)> =
                    me.snaps.iter().map(|(q, n, _)| (*q, n.clone())).collect();
                let theirs: Vec<String> = peer.snaps.iter().map(|(_, n, _)| n.clone()).collect();
                (ours, theirs, me.head.clone(), me.snaps.clone())
            });
            let div = Divergence::of(&ours, &theirs, |c| {
                Ok(contents
                    .iter()
                    .any(|(_, n, content)| n == c && *content != head))
            })?;
            let primary = PrimaryRef {
                fsid: format!("fsid-{}", 1 - self.me),
                image_id: primary_id.into(),
            };
            Ok((div, primary))
        }

        fn adopt_as_replica(
            &self,
            rec: &mut ImageRecord,
            primary: PrimaryRef,
            div: &Divergence,
        ) -> Result<u64> {
            self.step("adopt_as_replica")?;
            let mut rolled = 0;
            if div.diverged() {
                self.release_lock();
                if let (Some(c), true) = (&div.common, div.head_changed) {
                    rolled = self.rollback_to(c)?;
                }
                self.with(|w| {
                    w.sites[self.me]
                        .snaps
                        .retain(|(_, n, _)| !div.newer_here.contains(n));
                });
            }
            rec.role = Role::Secondary;
            rec.primary = Some(primary);
            rec.demotion_snap = None;
            rec.last_sync = None;
            rec.checkpoint = None;
            self.hold_lock()?;
            self.put(rec)?;
            Ok(rolled)
        }

        fn journal_resync(&self, _: ImageRecord, _: bool) -> Result<bool> {
            Err(EngineError::Unsupported("journal mode in the fake".into()))
        }

        fn journal_demote(&self, _: ImageRecord, _: bool, _: &[String]) -> Result<()> {
            Err(EngineError::Unsupported("journal mode in the fake".into()))
        }

        fn journal_promote(&self, _: ImageRecord, _: bool, _: Option<Schedule>) -> Result<()> {
            Err(EngineError::Unsupported("journal mode in the fake".into()))
        }
    }

    /// Keeps the replayer off a fake volume until dropped.
    pub struct PauseGuard(MemVolume);

    impl Drop for PauseGuard {
        fn drop(&mut self) {
            self.0.with(|w| w.sites[self.0.me].paused = false);
        }
    }
}
