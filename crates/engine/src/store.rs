//! The seam between the role changes' decisions and Ceph.
//!
//! [`VolumeStore`] is what DemoteVolume and PromoteVolume need of one volume:
//! its registry record (compare-and-swap), its peer's record, the clients
//! that have it open, its exclusive lock, its sync snapshots and a rollback.
//! [`CephVolume`] implements it over librbd and the registry; the tests'
//! in-memory pair of sites (`fake`, below) implements it too, so that the
//! role rules of `roles.rs` and `journal_roles.rs` are unit-tested in every
//! ordering and with a failure injected between any two steps. Journal
//! mode's primitives (epochs appended as librbd appends them, journaling
//! on and off, the peer's client, the link between a demotion and the
//! peer's promotion) are steps of the store too.

use csirr_ceph::{ErrorKind, Image};
use csirr_journal::{Journal, JournalError, MirrorPeerState};

use super::error::{CephContext, Result};
use super::journal_mode::{client_id, enable_journaling, peer_client_data};
use super::journal_roles::{
    demote_journal, disable_journaling, journal_err, linked_to, local_demotion, open_journal,
    promote_journal,
};
use super::registry::{ImageRecord, PrimaryRef, Registry, sync_snapshots};
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
    /// Journal mode: appends the demotion epoch to the image's journal (an
    /// `<orphan>` tag, as librbd demotes); idempotent. Returns its tag.
    fn journal_demote_epoch(&self) -> Result<u64>;
    /// Journal mode: turns journaling (and the exclusive lock) on; returns
    /// the features it added.
    fn enable_journal(&self) -> Result<u64>;
    /// Journal mode: registers the old primary `primary`'s client in this
    /// image's journal, to replay it from its start.
    fn register_peer_client(&self, primary: &PrimaryRef) -> Result<()>;
    /// Journal mode: appends the promotion epoch, linked to the peer's
    /// demotion `link` (the peer's fsid and its demotion tag) when given;
    /// orderly after a local demotion unless `force`. Returns its tag.
    fn journal_promote_epoch(&self, link: Option<(&str, u64)>, force: bool) -> Result<u64>;
    /// Journal mode: whether the peer's primary `primary_id` links its
    /// journal to this image's demotion (an orderly switch: the replayer
    /// makes this image its replica without a copy).
    fn linked_by_peer(&self, primary_id: &str) -> Result<bool>;
    /// Journal mode: turns journaling off and unregisters this site's
    /// client from the journal of the peer's primary `primary_id`.
    fn leave_journal(&self, primary_id: &str) -> Result<()>;
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

    /// The journal of the peer's primary `primary_id`.
    fn peer_journal(&self, primary_id: &str) -> Result<Journal> {
        let (_, pio) = self.engine.peer_of(self.vol.ioctx())?;
        Journal::open(&pio, primary_id).map_err(|e| journal_err(e, &self.key))
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
        self.engine.peer_record(self.vol, primary_id)
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

    fn journal_demote_epoch(&self) -> Result<u64> {
        demote_journal(self.image(), &self.key)
    }

    fn enable_journal(&self) -> Result<u64> {
        enable_journaling(self.image(), &self.req.volume.to_string())
    }

    fn register_peer_client(&self, primary: &PrimaryRef) -> Result<()> {
        open_journal(self.image(), &self.key)?
            .register_or_reuse(
                &client_id(&primary.fsid),
                &peer_client_data(&primary.image_id, MirrorPeerState::Replaying),
            )
            .map(drop)
            .map_err(|e| journal_err(e, &self.key))
    }

    fn journal_promote_epoch(&self, link: Option<(&str, u64)>, force: bool) -> Result<u64> {
        promote_journal(self.image(), &self.key, link, force)
    }

    fn linked_by_peer(&self, primary_id: &str) -> Result<bool> {
        let Some(demotion) = local_demotion(self.vol.ioctx(), &self.vol.image_id, &self.key)?
        else {
            return Ok(false);
        };
        let fsid = self.engine.local()?.fsid().to_string();
        linked_to(&self.peer_journal(primary_id)?, &fsid, demotion, &self.key)
    }

    fn leave_journal(&self, primary_id: &str) -> Result<()> {
        let fsid = self.engine.local()?.fsid().to_string();
        disable_journaling(self.image(), &self.key)?;
        match self
            .peer_journal(primary_id)?
            .unregister_client(&client_id(&fsid))
        {
            Ok(()) => Ok(()),
            Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(journal_err(e, &self.key)),
        }
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

    use csirr_journal::types::{LOCAL_MIRROR_UUID, ORPHAN_MIRROR_UUID};

    use super::VolumeStore;
    use crate::error::{EngineError, Result};
    use crate::journal_mode::{MODE as JOURNAL, client_id};
    use crate::registry::{ImageRecord, JournalReplica, PrimaryRef, Revision, Role, SyncPoint};
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
        /// Journal mode: the image's journal epochs, oldest first (`None`:
        /// journaling off).
        pub journal: Option<Vec<Epoch>>,
        /// Journal mode: the sites (fsids) whose clients are registered in
        /// this image's journal.
        pub journal_clients: Vec<String>,
    }

    /// An epoch of a journal (librbd's tag): its owner (`""` primary,
    /// `<orphan>` demoted) and what it follows (owner or peer fsid, tag).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Epoch {
        /// The tag.
        pub tid: u64,
        /// Who owns the journal in this epoch.
        pub owner: String,
        /// The predecessor: its owner (a peer's fsid for a replayed
        /// demotion) and its tag.
        pub after: (String, u64),
    }

    /// The fsid of site `i`.
    pub fn fsid(i: usize) -> String {
        ["fsid-a", "fsid-b"][i].to_string()
    }

    impl Site {
        /// The record as stored, with its revision.
        pub fn record(&self) -> Option<ImageRecord> {
            load(&self.stored)
        }

        /// Writes `rec` as the stored record (no compare-and-swap: the
        /// test's own hand).
        pub fn store(&mut self, rec: &ImageRecord) {
            save(&mut self.stored, rec);
        }

        /// The newest journal epoch, if journaling is on.
        pub fn epoch(&self) -> Option<Epoch> {
            self.journal.as_ref()?.last().cloned()
        }

        /// The demotion tag when the journal's newest epoch is a demotion.
        pub fn demotion(&self) -> Option<u64> {
            self.epoch()
                .filter(|e| e.owner == ORPHAN_MIRROR_UUID)
                .map(|e| e.tid)
        }
    }

    /// Both sites and the failure to inject.
    #[derive(Debug, Default)]
    pub struct World {
        /// Site a (index 0) and b (index 1).
        pub sites: [Site; 2],
        /// The steps taken, and the one to fail.
        pub log: StepLog,
        /// Sequence of snapshot names.
        pub next_tag: u64,
    }

    /// The steps a fake took, as `site:step`, and the one to fail.
    #[derive(Debug, Default)]
    pub struct StepLog {
        /// The steps taken.
        pub steps: Vec<String>,
        /// Fail the step with this number (counted from 0 over `steps`).
        pub fail_at: Option<usize>,
    }

    impl StepLog {
        /// Logs step `what` of site `who`; the injected failure, when it
        /// is this one.
        pub fn step(&mut self, who: usize, what: &str) -> Result<()> {
            let n = self.steps.len();
            self.steps.push(format!("{who}:{what}"));
            if self.fail_at == Some(n) {
                return Err(EngineError::Unavailable(format!(
                    "injected failure at {what}"
                )));
            }
            Ok(())
        }
    }

    /// A fake site whose steps can be made to fail.
    pub trait Injectable {
        /// Runs `f` on the world's step log.
        fn log<T>(&self, f: impl FnOnce(&mut StepLog) -> T) -> T;
        /// Whether the replayer is kept off (a role change forgot its guard).
        fn paused(&self) -> bool;
    }

    /// Runs `run` on a world from `setup` once per step it takes, failing
    /// that step: the call must fail, leave nothing paused and pass
    /// `after_failure`; the retry without a failure must succeed and pass
    /// `after_retry`. Both checks get the step number. `min` is the fewest
    /// steps `run` may take (so that a broken fake cannot pass by taking
    /// none).
    pub fn at_every_step<V: Injectable>(
        min: usize,
        setup: &dyn Fn() -> (V, V),
        run: &dyn Fn(&V, &V) -> Result<()>,
        after_failure: &dyn Fn(usize, &V, &V),
        after_retry: &dyn Fn(usize, &V, &V),
    ) {
        let n = {
            let (a, b) = setup();
            a.log(|l| l.steps.clear());
            run(&a, &b).expect("runs without a failure");
            a.log(|l| l.steps.len())
        };
        assert!(n >= min, "{n} steps, fewer than {min}");
        for at in 0..n {
            let (a, b) = setup();
            a.log(|l| {
                l.steps.clear();
                l.fail_at = Some(at);
            });
            assert!(run(&a, &b).is_err(), "step {at} fails");
            assert!(
                !a.paused() && !b.paused(),
                "step {at}: the replayer is let back"
            );
            after_failure(at, &a, &b);
            a.log(|l| l.fail_at = None);
            run(&a, &b).unwrap_or_else(|e| panic!("step {at}: the retry fails: {e}"));
            after_retry(at, &a, &b);
        }
    }

    /// A registry record as the fakes store it: serialized, with the
    /// revision it was read at.
    pub trait Revised: serde::Serialize + serde::de::DeserializeOwned {
        /// The revision the record was read at.
        fn revision(&mut self) -> &mut Revision;
    }

    impl Revised for ImageRecord {
        fn revision(&mut self) -> &mut Revision {
            &mut self.revision
        }
    }

    impl Revised for crate::group_repl::GroupRecord {
        fn revision(&mut self) -> &mut Revision {
            &mut self.revision
        }
    }

    /// The record `stored` holds, with its revision.
    pub fn load<R: Revised>(stored: &Option<Vec<u8>>) -> Option<R> {
        let bytes = stored.as_ref()?;
        let mut rec: R = serde_json::from_slice(bytes).expect("a record");
        *rec.revision() = Revision::of(bytes);
        Some(rec)
    }

    /// Writes `rec` into `stored` as it is (the test's own hand: no
    /// compare-and-swap).
    pub fn save<R: Revised>(stored: &mut Option<Vec<u8>>, rec: &R) {
        *stored = Some(serde_json::to_vec(rec).expect("serializes"));
    }

    /// Writes `rec` into `stored` if it still holds what `rec` was read
    /// from (else `Conflict`), as the registry does.
    pub fn swap<R: Revised>(stored: &mut Option<Vec<u8>>, rec: &mut R) -> Result<()> {
        if stored.as_deref() != rec.revision().stored() {
            return Err(EngineError::Conflict("record changed".into()));
        }
        let bytes = serde_json::to_vec(&*rec).expect("serializes");
        *rec.revision() = Revision::of(&bytes);
        *stored = Some(bytes);
        Ok(())
    }

    /// DemoteVolume of the fake volume `v` (its record as stored).
    pub fn demote(v: &MemVolume, force: bool) -> Result<()> {
        crate::roles::demote_volume(v, v.rec(), force)
    }

    /// PromoteVolume of the fake volume `v`.
    pub fn promote(v: &MemVolume, force: bool) -> Result<()> {
        crate::roles::promote_volume(v, v.rec(), force, None)
    }

    /// ResyncVolume of the fake volume `v`.
    pub fn resync(v: &MemVolume, force: bool) -> Result<bool> {
        crate::roles::resync_volume(v, v.rec(), force)
    }

    /// The gRPC-relevant kind of a role change's answer; panics on an
    /// error no role rule gives.
    pub fn code<T>(r: Result<T>) -> &'static str {
        match r {
            Ok(_) => "ok",
            Err(EngineError::Unavailable(_)) => "unavailable",
            Err(EngineError::FailedPrecondition(_)) => "failed-precondition",
            Err(e) => panic!("unexpected {e}"),
        }
    }

    /// A world of two sites with a step log.
    pub trait Sites: Send + 'static {
        /// The step log.
        fn log(&mut self) -> &mut StepLog;
        /// Whether site `me` is kept off by a role change.
        fn paused(&mut self, me: usize) -> &mut bool;
    }

    /// Site `me` (0 or 1) of a shared world of two sites.
    pub struct Fake<W> {
        /// The world.
        pub world: Arc<Mutex<W>>,
        /// 0 or 1.
        pub me: usize,
    }

    impl<W> Clone for Fake<W> {
        fn clone(&self) -> Self {
            Fake {
                world: Arc::clone(&self.world),
                me: self.me,
            }
        }
    }

    impl<W: Sites> Fake<W> {
        /// Both sites of `world`.
        pub fn both(world: W) -> (Self, Self) {
            let world = Arc::new(Mutex::new(world));
            (
                Fake {
                    world: Arc::clone(&world),
                    me: 0,
                },
                Fake { world, me: 1 },
            )
        }

        /// Runs `f` on the world.
        pub fn with<T>(&self, f: impl FnOnce(&mut W) -> T) -> T {
            f(&mut self.world.lock())
        }

        /// Records a step; the injected failure, when it is this one.
        pub fn step(&self, what: &str) -> Result<()> {
            self.with(|w| w.log().step(self.me, what))
        }

        /// Keeps the replayer off this site until the guard drops (a step).
        pub fn pause_site(&self) -> Result<PauseGuard<W>> {
            self.step("pause")?;
            self.with(|w| *w.paused(self.me) = true);
            Ok(PauseGuard(self.clone()))
        }
    }

    impl<W: Sites> Injectable for Fake<W> {
        fn log<T>(&self, f: impl FnOnce(&mut StepLog) -> T) -> T {
            self.with(|w| f(w.log()))
        }

        fn paused(&self) -> bool {
            self.with(|w| *w.paused(self.me))
        }
    }

    /// Keeps the replayer off a fake site until dropped.
    pub struct PauseGuard<W: Sites>(Fake<W>);

    impl<W: Sites> Drop for PauseGuard<W> {
        fn drop(&mut self) {
            self.0.with(|w| *w.paused(self.0.me) = false);
        }
    }

    impl Sites for World {
        fn log(&mut self) -> &mut StepLog {
            &mut self.log
        }

        fn paused(&mut self, me: usize) -> &mut bool {
            &mut self.sites[me].paused
        }
    }

    /// Site `me` of a shared [`World`], as the role changes see it.
    pub type MemVolume = Fake<World>;

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
            fsid: fsid(0),
            image_id: p.into(),
        });
        rec
    }

    impl Fake<World> {
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
                s.store(&rec);
            }
            Fake::both(w)
        }

        /// The pair in journal mode: site a's journal in its first primary
        /// epoch with site b's client registered; site b a replica that
        /// finished its bootstrap (journaling off, as every replica).
        pub fn journal_pair() -> (MemVolume, MemVolume) {
            let (a, b) = Self::pair();
            a.with(|w| {
                w.next_tag = 1;
                for (i, s) in w.sites.iter_mut().enumerate() {
                    let mut rec = s.record().expect("a record");
                    rec.mode = JOURNAL.into();
                    if i == 1 {
                        rec.journal = Some(JournalReplica {
                            client_id: client_id(&fsid(1)),
                            skip_until: None,
                            demoted_at: None,
                        });
                    }
                    s.store(&rec);
                }
                let s = &mut w.sites[0];
                s.journal = Some(vec![Epoch {
                    tid: 1,
                    owner: LOCAL_MIRROR_UUID.into(),
                    after: (String::new(), 0),
                }]);
                s.journal_clients = vec![fsid(1)];
            });
            (a, b)
        }

        /// The replay of this site's journal on `to` catches up: `to` holds
        /// this head, and records this site's demotion once replayed.
        pub fn replay_to(&self, to: &MemVolume) {
            self.with(|w| {
                let (head, demotion) = (w.sites[self.me].head.clone(), w.sites[self.me].demotion());
                let r = &mut w.sites[to.me];
                r.head = head;
                let mut rec = r.record().expect("a record");
                if let Some(j) = rec.journal.as_mut() {
                    j.demoted_at = demotion;
                }
                r.store(&rec);
            });
        }

        /// Appends an epoch to this site's journal (a step: a failure can
        /// fall between two appends).
        fn append(&self, owner: &str, after: (String, u64)) -> Result<u64> {
            self.step("append_epoch")?;
            self.with(|w| {
                w.next_tag += 1;
                let tid = w.next_tag;
                let journal = w.sites[self.me]
                    .journal
                    .as_mut()
                    .ok_or_else(|| EngineError::NotFound("no journal".into()))?;
                journal.push(Epoch {
                    tid,
                    owner: owner.into(),
                    after,
                });
                Ok(tid)
            })
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
                // librbd refuses every writer of a demoted journal.
                if s.lock.as_deref() == Some("me") || s.demotion().is_some() {
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
                r.store(&rec);
            });
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
        type Pause = PauseGuard<World>;

        fn key(&self) -> &str {
            "pool/vol"
        }

        fn put(&self, rec: &mut ImageRecord) -> Result<()> {
            self.step("put")?;
            self.with(|w| swap(&mut w.sites[self.me].stored, rec))
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

        fn pause(&self) -> Result<PauseGuard<World>> {
            self.pause_site()
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
                fsid: fsid(1 - self.me),
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

        fn journal_demote_epoch(&self) -> Result<u64> {
            let epoch = self
                .site()
                .epoch()
                .ok_or_else(|| EngineError::FailedPrecondition("journaling is off".into()))?;
            match epoch.owner.as_str() {
                ORPHAN_MIRROR_UUID => Ok(epoch.tid),
                LOCAL_MIRROR_UUID => {
                    self.append(ORPHAN_MIRROR_UUID, (LOCAL_MIRROR_UUID.into(), epoch.tid))
                }
                other => Err(EngineError::FailedPrecondition(format!(
                    "the journal belongs to {other}"
                ))),
            }
        }

        fn enable_journal(&self) -> Result<u64> {
            self.step("enable_journal")?;
            self.with(|w| {
                w.next_tag += 1;
                let tid = w.next_tag;
                let s = &mut w.sites[self.me];
                if s.journal.is_some() {
                    return Ok(0);
                }
                s.journal = Some(vec![Epoch {
                    tid,
                    owner: LOCAL_MIRROR_UUID.into(),
                    after: (String::new(), 0),
                }]);
                Ok(1)
            })
        }

        fn register_peer_client(&self, primary: &PrimaryRef) -> Result<()> {
            self.step("register_peer_client")?;
            self.with(|w| {
                let s = &mut w.sites[self.me];
                if !s.journal_clients.contains(&primary.fsid) {
                    s.journal_clients.push(primary.fsid.clone());
                }
            });
            Ok(())
        }

        fn journal_promote_epoch(&self, link: Option<(&str, u64)>, force: bool) -> Result<u64> {
            if let Some((peer, tag)) = link {
                let orphan = self.append(ORPHAN_MIRROR_UUID, (peer.into(), tag))?;
                return self.append(LOCAL_MIRROR_UUID, (ORPHAN_MIRROR_UUID.into(), orphan));
            }
            let epoch = self
                .site()
                .epoch()
                .ok_or_else(|| EngineError::NotFound("no journal".into()))?;
            let after = if !force && epoch.owner == ORPHAN_MIRROR_UUID {
                ORPHAN_MIRROR_UUID
            } else {
                LOCAL_MIRROR_UUID
            };
            self.append(LOCAL_MIRROR_UUID, (after.into(), epoch.tid))
        }

        fn linked_by_peer(&self, _primary_id: &str) -> Result<bool> {
            self.step("linked_by_peer")?;
            Ok(self.with(|w| {
                let (me, peer) = (&w.sites[self.me], &w.sites[1 - self.me]);
                let (Some(demotion), Some(journal)) = (me.demotion(), peer.journal.as_ref()) else {
                    return false;
                };
                let mine = fsid(self.me);
                peer.journal_clients.contains(&mine)
                    && journal.iter().any(|o| {
                        o.owner == ORPHAN_MIRROR_UUID
                            && o.after == (mine.clone(), demotion)
                            && journal.iter().any(|p| {
                                p.owner == LOCAL_MIRROR_UUID
                                    && p.after == (ORPHAN_MIRROR_UUID.into(), o.tid)
                            })
                    })
            }))
        }

        fn leave_journal(&self, _primary_id: &str) -> Result<()> {
            self.step("leave_journal")?;
            self.with(|w| {
                w.sites[self.me].journal = None;
                let mine = fsid(self.me);
                w.sites[1 - self.me].journal_clients.retain(|c| *c != mine);
            });
            Ok(())
        }
    }
}
