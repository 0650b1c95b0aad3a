//! Role changes of replicated volume groups (DemoteVolume, PromoteVolume,
//! ResyncVolume with a `volumegroup` source), with the rules of
//! [`super::roles`] applied to a crash-consistent cut across the members
//! instead of one image's sync snapshot:
//!
//! - **Demote**: the scheduler's cuts stop, clients that have a member
//!   open refuse it (unless forced, which breaks their locks), a final
//!   cut is taken, every member is locked against writers, and the record
//!   says demoted at that cut. A member written between the cut and the
//!   lock (a client opened it meanwhile) answers UNAVAILABLE and the
//!   members go back to their application.
//! - **Promote, planned**: a replica whose last complete cut is the peer's
//!   demotion cut (UNAVAILABLE while it is copied); a demoted group whose
//!   peer did not take over.
//! - **Promote, forced**: every member rolled back to the last complete
//!   cut (only the extents written since), without the peer.
//! - **Resync**: a demoted group that holds the peer's cuts and was not
//!   written since its demotion cut becomes a replica (an orderly switch);
//!   after a split brain only with force, rolled back to the newest cut
//!   both sides hold (or emptied for a full copy).
//!
//! The steps run over [`GroupStore`]: [`CephGroup`] on the clusters, an
//! in-memory pair of sites in the tests, where a failure is injected at
//! every step.

use std::sync::Arc;

use chrono::Utc;

use csirr_ceph::{Image, IoCtx, group};
use csirr_csi::params::ReplicationParams;

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::group_repl::{
    Divergence, GroupRecord, GroupRequest, MemberRef, change, drop_snap, get_record, gname,
    group_cuts, member_cuts, put_record, rbd_members,
};
use super::registry::{Role, Schedule, SyncPoint};
use super::rollback::rollback_to;
use super::slots::SlotGuard;

/// One replicated group as its role changes see it. Every method may
/// block on Ceph.
pub(crate) trait GroupStore {
    /// What keeps the scheduler's cuts and the replayer off the group.
    type Pause;

    /// The group's name in messages (`volume group <id>`).
    fn name(&self) -> &str;
    /// The group's record (FAILED_PRECONDITION when it is not replicated).
    fn record(&self) -> Result<GroupRecord>;
    /// Writes the record if it is still what was read (else `Conflict`).
    fn put(&self, rec: &mut GroupRecord) -> Result<()>;
    /// The peer cluster's fsid and its record of the group; an error when
    /// the peer cannot be asked.
    fn peer(&self) -> Result<(String, Option<GroupRecord>)>;
    /// Stops the group's cuts and copies until the guard drops.
    fn pause(&self) -> Result<Self::Pause>;
    /// The RBD group's members now.
    fn members(&self) -> Result<Vec<MemberRef>>;
    /// Clients other than this process that have a member open.
    fn writers(&self) -> Result<Vec<String>>;
    /// Breaks every lock on `members` (forced; best effort, logged).
    fn break_locks(&self, members: &[MemberRef]);
    /// Takes a cut of the group now; returns its name.
    fn take_cut(&self) -> Result<String>;
    /// Locks `members` against writers, and keeps them locked.
    fn hold_members(&self, members: &[MemberRef]) -> Result<()>;
    /// Lets the locks of `members` go.
    fn release_members(&self, members: &[MemberRef]);
    /// UNAVAILABLE when one of `members` was written after cut `cut`.
    fn unwritten_since(&self, members: &[MemberRef], cut: &str) -> Result<()>;
    /// Rolls `members` back to cut `cut` (their locks broken first);
    /// returns the bytes rewritten.
    fn roll_back(&self, members: &[MemberRef], cut: &str) -> Result<u64>;
    /// How this demoted group relates to the peer's primary `peer`.
    fn divergence(&self, rec: &GroupRecord, peer: &GroupRecord) -> Result<Divergence>;
    /// A forced resync's reset: the group rolled back to cut `cut` (its
    /// members' cut snapshots made again from the rolled-back heads), newer
    /// cuts removed; with no cut, every cut removed for a full copy.
    /// Returns the members.
    fn reset_to_cut(&self, cut: Option<&str>) -> Result<Vec<MemberRef>>;
}

/// A replicated group on its cluster, with the engine that holds its locks.
pub(crate) struct CephGroup<'a> {
    /// The engine (held locks, slots, configuration, peers).
    pub engine: &'a Engine,
    /// The group's pool and namespace.
    pub io: &'a Arc<IoCtx>,
    /// The group's uuid.
    pub uuid: &'a str,
    /// `volume group <id>`.
    pub name: String,
}

impl GroupStore for CephGroup<'_> {
    type Pause = SlotGuard;

    fn name(&self) -> &str {
        &self.name
    }

    fn record(&self) -> Result<GroupRecord> {
        get_record(self.io, self.uuid)?.ok_or_else(|| {
            EngineError::FailedPrecondition(format!("replication is not enabled for {}", self.name))
        })
    }

    fn put(&self, rec: &mut GroupRecord) -> Result<()> {
        put_record(self.io, rec)
    }

    fn peer(&self) -> Result<(String, Option<GroupRecord>)> {
        let (cluster, pio) = self.engine.peer_of(self.io)?;
        Ok((cluster.fsid().to_string(), get_record(&pio, self.uuid)?))
    }

    fn pause(&self) -> Result<SlotGuard> {
        self.engine
            .take_slot(&Engine::group_slot_key(self.io, self.uuid))
    }

    fn members(&self) -> Result<Vec<MemberRef>> {
        Ok(rbd_members(self.io, self.uuid)?
            .into_iter()
            .map(|(m, _)| m)
            .collect())
    }

    fn writers(&self) -> Result<Vec<String>> {
        let me = self.io.cluster().instance_id();
        let mut writers = Vec::new();
        for (m, img) in rbd_members(self.io, self.uuid)? {
            for w in img
                .watchers()
                .ctx(|| format!("listing clients of {}", m.image_name))?
            {
                if u64::try_from(w.id).ok() != Some(me) {
                    writers.push(format!("{}: client.{} at {}", m.image_name, w.id, w.addr));
                }
            }
        }
        Ok(writers)
    }

    fn break_locks(&self, members: &[MemberRef]) {
        for m in members {
            if let Ok(img) = Image::open_by_id(self.io, &m.image_id) {
                break_all_locks(&img, &m.image_name);
            }
        }
    }

    fn take_cut(&self) -> Result<String> {
        Ok(self.engine.take_cut(self.io, self.uuid)?.0)
    }

    fn hold_members(&self, members: &[MemberRef]) -> Result<()> {
        self.engine.hold_members(self.io, members)
    }

    fn release_members(&self, members: &[MemberRef]) {
        self.engine.release_members(self.io, members);
    }

    fn unwritten_since(&self, members: &[MemberRef], cut: &str) -> Result<()> {
        self.engine.unwritten_since(self.io, members, cut)
    }

    fn roll_back(&self, members: &[MemberRef], cut: &str) -> Result<u64> {
        let mut rolled = 0;
        for m in members {
            let key = Engine::member_key(self.io, &m.image_name);
            self.engine.held.release(&key);
            let img = Image::open_by_id(self.io, &m.image_id)
                .ctx(|| format!("opening group member {key}"))?;
            break_all_locks(&img, &m.image_name);
            rolled += rollback_to(self.io, &img, cut, self.engine.cfg.limits, &|| false)?;
        }
        Ok(rolled)
    }

    fn divergence(&self, rec: &GroupRecord, peer: &GroupRecord) -> Result<Divergence> {
        let (_, pio) = self.engine.peer_of(self.io)?;
        self.engine.group_divergence(self.io, rec, &pio, peer)
    }

    fn reset_to_cut(&self, cut: Option<&str>) -> Result<Vec<MemberRef>> {
        let (io, uuid) = (self.io, self.uuid);
        let members = rbd_members(io, uuid)?;
        if let Some(c) = cut {
            group::snap_rollback(io, &gname(uuid), c)
                .ctx(|| format!("rolling {} back to {c}", self.name))?;
        }
        // The members' user snapshots of the common cut were taken before
        // its group snapshot: they are made again from the rolled-back
        // heads, so that the cut's snapshot here holds exactly what the
        // primary's holds. Newer cuts go.
        let cq = cut.and_then(super::group_repl::cut_seq);
        for (q, name) in &group_cuts(io, uuid)? {
            if cut.is_none() || cq.is_some_and(|cq| *q > cq) {
                let _ = group::snap_remove(io, &gname(uuid), name);
            }
        }
        for (_, img) in &members {
            for (_, s) in member_cuts(img)? {
                drop_snap(img, &s.name)?;
            }
            if let Some(c) = cut {
                img.snap_create(c)
                    .ctx(|| format!("snapshotting {}@{c}", img.spec()))?;
            }
        }
        Ok(members.into_iter().map(|(m, _)| m).collect())
    }
}

/// Breaks every lock on member `img` (`name`), best effort, logged.
fn break_all_locks(img: &Image, name: &str) {
    for o in img.lock_owners().unwrap_or_default() {
        tracing::warn!(image = %name, owner = %o, "breaking the lock of a group member (forced)");
        let _ = img.lock_break(&o);
    }
}

/// DemoteVolume's steps on a group (see the module doc). Idempotent: a
/// group already not primary only has its members locked again.
pub(crate) fn demote<S: GroupStore>(s: &S, force: bool) -> Result<()> {
    let rec = s.record()?;
    if rec.role != Role::Primary {
        return s.hold_members(&rec.members);
    }
    // The scheduler's cuts (its own connection, a client of the members
    // while it cuts) stop first, so that they are not taken for writers.
    let _pause = s.pause()?;
    // The record as it stands now that the scheduler is stopped: a cut it
    // took since the first read changed it.
    let mut rec = s.record()?;
    if rec.role != Role::Primary {
        return Err(EngineError::Conflict(format!(
            "the role of {} changed meanwhile",
            s.name()
        )));
    }
    let writers = s.writers()?;
    if !writers.is_empty() && !force {
        return Err(EngineError::FailedPrecondition(format!(
            "{} is still in use ({}); stop the application before demoting it",
            s.name(),
            writers.join(", ")
        )));
    }
    let members = s.members()?;
    if force {
        s.break_locks(&members);
    }
    // Nobody else has the members open: the final cut is the last state any
    // client wrote. librbd takes the members' locks for the group snapshot
    // itself; this process keeps them from then on.
    let name = s.take_cut()?;
    let demoted = s.hold_members(&members).and_then(|()| {
        s.unwritten_since(&members, &name)?;
        rec.role = Role::Demoted;
        rec.members = members.clone();
        rec.demotion_cut = Some(name.clone());
        rec.last_cut_at = Some(Utc::now());
        rec.role_change = change(format!("demoted at {name}"));
        s.put(&mut rec)
    });
    if let Err(e) = demoted {
        // Still primary: the members go back to their application (and a
        // retry's cut needs their locks free).
        s.release_members(&members);
        return Err(e);
    }
    tracing::info!(cut = %name, "group demoted; final cut taken");
    Ok(())
}

/// PromoteVolume's steps on a group (see the module doc); `schedule`, when
/// given, becomes the group's schedule of cuts.
pub(crate) fn promote<S: GroupStore>(s: &S, force: bool, schedule: Option<Schedule>) -> Result<()> {
    let mut rec = s.record()?;
    if let Some(sch) = schedule {
        rec.schedule = sch;
    }
    match rec.role {
        Role::Primary => return s.put(&mut rec),
        _ if !force => promotable(s, &rec)?,
        _ => {}
    }
    let _pause = s.pause()?;
    let mut rolled = 0;
    if force && rec.role == Role::Secondary {
        let Some(last) = rec.last_cut.clone() else {
            return Err(EngineError::FailedPrecondition(format!(
                "{} has no complete cut here: nothing consistent to fail over to",
                s.name()
            )));
        };
        rolled = s.roll_back(&rec.members, &last.snap_name)?;
    }
    s.release_members(&rec.members);
    let was = rec.role;
    rec.role = Role::Primary;
    rec.primary_fsid = None;
    rec.demotion_cut = None;
    rec.last_cut_at = Some(Utc::now());
    rec.role_change = change(match (was, force) {
        (Role::Secondary, true) => format!(
            "promoted (forced) at {}, rolled back {rolled} bytes",
            rec.last_cut.as_ref().map_or("?", |l| l.snap_name.as_str())
        ),
        (Role::Secondary, false) => "promoted (planned)".to_string(),
        _ => "demotion undone".to_string(),
    });
    s.put(&mut rec)?;
    tracing::info!(rolled_back_bytes = rolled, "group promoted");
    Ok(())
}

/// An orderly promotion's conditions on a group that is not primary: the
/// peer answers and is not primary, and a replica holds the peer's
/// demotion cut (UNAVAILABLE while it is copied).
fn promotable<S: GroupStore>(s: &S, rec: &GroupRecord) -> Result<()> {
    let name = s.name();
    let p = match s.peer() {
        Ok((_, p)) => p,
        Err(e) => {
            return Err(EngineError::FailedPrecondition(format!(
                "the peer site of {name} cannot be reached ({e}); promote with force to take \
                 over without it"
            )));
        }
    };
    if p.as_ref().is_some_and(|p| p.role == Role::Primary) {
        return Err(EngineError::FailedPrecondition(format!(
            "the peer site is primary for {name}; demote it first"
        )));
    }
    if rec.role != Role::Secondary {
        return Ok(());
    }
    let Some(p) = p else {
        return Err(EngineError::FailedPrecondition(format!(
            "the peer has no replication record for {name}"
        )));
    };
    let ours = rec.last_cut.as_ref().map(|l| l.snap_name.as_str());
    if p.demotion_cut.is_none() || ours != p.demotion_cut.as_deref() {
        return Err(EngineError::Unavailable(format!(
            "the peer's demotion cut {} of {name} is not complete here yet (last complete \
             cut: {}); retry",
            p.demotion_cut.as_deref().unwrap_or("?"),
            ours.unwrap_or("none")
        )));
    }
    Ok(())
}

/// ResyncVolume's steps on a group (see the module doc). Returns whether
/// the replica holds a complete cut.
pub(crate) fn resync<S: GroupStore>(s: &S, force: bool) -> Result<bool> {
    let mut rec = s.record()?;
    match rec.role {
        Role::Primary => {
            return Err(EngineError::FailedPrecondition(format!(
                "{} is primary; demote it before resyncing it",
                s.name()
            )));
        }
        Role::Secondary => return Ok(rec.last_cut.is_some()),
        Role::Demoted => {}
    }
    let (fsid, p) = s.peer()?;
    let Some(p) = p.clone().filter(|p| p.role == Role::Primary) else {
        // Neither side primary: settled once the peer holds our demotion
        // cut.
        let theirs = p.as_ref().and_then(|p| p.last_cut.as_ref());
        return Ok(
            rec.demotion_cut.is_some() && theirs.map(|l| &l.snap_name) == rec.demotion_cut.as_ref()
        );
    };
    let _pause = s.pause()?;
    match s.divergence(&rec, &p)? {
        Divergence::Clean(cut) => {
            adopt(s, &mut rec, &fsid, &cut, "replica again (orderly switch)")?;
            Ok(true)
        }
        Divergence::Diverged(c) if !force => Err(EngineError::FailedPrecondition(match c {
            Some(c) => format!(
                "split-brain: {} changed here after {c}, the newest cut both sites hold; \
                 ResyncVolume with force rolls it back to {c}",
                s.name()
            ),
            None => format!(
                "{} shares no cut with the new primary; ResyncVolume with force replaces it \
                 with a full copy",
                s.name()
            ),
        })),
        Divergence::Diverged(c) => {
            s.release_members(&rec.members);
            rec.members = s.reset_to_cut(c.as_deref())?;
            match c {
                Some(c) => adopt(s, &mut rec, &fsid, &c, "resync (forced)")?,
                None => {
                    rec.role = Role::Secondary;
                    rec.primary_fsid = Some(fsid);
                    rec.last_cut = None;
                    rec.demotion_cut = None;
                    rec.role_change = change("full resync (forced)");
                    s.hold_members(&rec.members)?;
                    s.put(&mut rec)?;
                }
            }
            Ok(false)
        }
    }
}

/// Makes the demoted group `rec` a replica of the peer (cluster `fsid`)
/// holding cut `cut` completely: its members locked, then recorded.
pub(crate) fn adopt<S: GroupStore>(
    s: &S,
    rec: &mut GroupRecord,
    fsid: &str,
    cut: &str,
    what: &str,
) -> Result<()> {
    rec.role = Role::Secondary;
    rec.primary_fsid = Some(fsid.to_string());
    rec.last_cut = Some(SyncPoint {
        snap_name: cut.to_string(),
        snap_time: Utc::now(),
        completed_at: Utc::now(),
        duration_ms: 0,
        bytes: 0,
    });
    rec.demotion_cut = None;
    rec.role_change = change(format!("{what} from {cut}"));
    // Locked before it is recorded: a replica's members are never left
    // writable (a demoted group's are locked already).
    s.hold_members(&rec.members)?;
    s.put(rec)?;
    tracing::info!(group = %rec.uuid, cut, "group is a replica of the peer's primary");
    Ok(())
}

impl Engine {
    /// Runs `f` on the group of `req` as a [`CephGroup`], in its span.
    fn on_group<T>(
        &self,
        req: &GroupRequest,
        what: &'static str,
        force: bool,
        f: impl FnOnce(&CephGroup<'_>) -> Result<T>,
    ) -> Result<T> {
        let g = self.locate_existing(&req.group, req.creds.as_ref())?;
        let span = tracing::info_span!("group_role", op = what, group = %g.id, force);
        let _s = span.enter();
        f(&CephGroup {
            engine: self,
            io: &g.io,
            uuid: g.id.uuid(),
            name: format!("volume group {}", g.id),
        })
    }

    /// DemoteVolume of a group: every member locked against writers, then
    /// a final cut. Refused while clients have a member open, unless
    /// `force`. Idempotent.
    pub async fn demote_group(self: &Arc<Self>, req: GroupRequest, force: bool) -> Result<()> {
        let key = format!("volume group {}", req.group);
        self.run_locked(key, move |e| {
            e.on_group(&req, "demote", force, |g| demote(g, force))
        })
        .await
    }

    /// PromoteVolume of a group. Planned: a replica whose last complete cut
    /// is the peer's demotion cut (UNAVAILABLE while it is copied,
    /// FAILED_PRECONDITION while the peer is primary or unreachable); a
    /// demoted group whose peer did not take over. Forced: every member
    /// rolled back to the last complete cut, without the peer.
    pub async fn promote_group(
        self: &Arc<Self>,
        req: GroupRequest,
        force: bool,
        params: ReplicationParams,
    ) -> Result<()> {
        let key = format!("volume group {}", req.group);
        let schedule = params
            .scheduling_interval
            .is_some()
            .then(|| Schedule::of(&params));
        let work = self.run_locked(key, move |e| {
            e.on_group(&req, "promote", force, |g| {
                promote(g, force, schedule.clone())
            })
        });
        self.within_promote_timeout(work).await
    }

    /// ResyncVolume of a group: a demoted group becomes a replica of the
    /// peer's primary from the newest cut both hold (after a split brain
    /// only with `force`). Returns whether the replica holds a complete cut.
    pub async fn resync_group(self: &Arc<Self>, req: GroupRequest, force: bool) -> Result<bool> {
        let key = format!("volume group {}", req.group);
        self.run_locked(key, move |e| {
            e.on_group(&req, "resync", force, |g| resync(g, force))
        })
        .await
    }
}

#[cfg(test)]
mod fake {
    //! Two sites of one group in memory: records (compare-and-swap on the
    //! serialized bytes), members with their heads, locks and cut
    //! snapshots, the group snapshots of the site's own cuts, and a step
    //! log with one injectable failure.

    use super::GroupStore;
    use crate::error::{EngineError, Result};
    use crate::group_repl::{Divergence, GroupRecord, MemberRef, cut_name};
    use crate::registry::{Role, Schedule, SyncPoint};
    use crate::store::fake::{Fake, PauseGuard, Sites, StepLog, load, save, swap};

    /// One member: its head's content, the holder of its lock, and its
    /// cut snapshots with what they froze.
    #[derive(Debug, Clone, Default)]
    pub struct Member {
        /// What the member holds now (a label of its content).
        pub head: String,
        /// Its exclusive lock's holder (`me` is this process).
        pub lock: Option<String>,
        /// Its cut snapshots: name, the head content they froze.
        pub snaps: Vec<(String, String)>,
    }

    impl Member {
        /// What cut snapshot `cut` froze.
        pub fn at(&self, cut: &str) -> Option<&String> {
            self.snaps.iter().find(|(n, _)| n == cut).map(|(_, c)| c)
        }

        /// Whether cut snapshot `cut` froze `content`.
        pub fn at_is(&self, cut: &str, content: &str) -> bool {
            self.at(cut).is_some_and(|c| c == content)
        }
    }

    /// One site of the group.
    #[derive(Debug, Clone, Default)]
    pub struct Site {
        /// The stored group record (serialized), if any.
        pub stored: Option<Vec<u8>>,
        /// The members, in the record's order.
        pub members: Vec<Member>,
        /// The group snapshots of the cuts this site took.
        pub cuts: Vec<String>,
        /// Clients other than this process with a member open.
        pub writers: Vec<String>,
        /// Whether the other site can ask this one.
        pub reachable: bool,
        /// Whether the group's cuts and copies are kept off.
        pub paused: bool,
    }

    impl Site {
        /// The record as stored, with its revision.
        pub fn record(&self) -> Option<GroupRecord> {
            load(&self.stored)
        }

        /// Writes `rec` as the stored record (the test's own hand).
        pub fn store(&mut self, rec: &GroupRecord) {
            save(&mut self.stored, rec);
        }

        /// The members' heads.
        pub fn heads(&self) -> Vec<String> {
            self.members.iter().map(|m| m.head.clone()).collect()
        }
    }

    /// Both sites and the failure to inject.
    #[derive(Debug, Default)]
    pub struct World {
        /// Site a (index 0) and b (index 1).
        pub sites: [Site; 2],
        /// The steps taken, and the one to fail.
        pub log: StepLog,
        /// Sequence of cut names.
        pub next_cut: u64,
    }

    impl Sites for World {
        fn log(&mut self) -> &mut StepLog {
            &mut self.log
        }

        fn paused(&mut self, me: usize) -> &mut bool {
            &mut self.sites[me].paused
        }
    }

    /// Site `me` of a shared [`World`].
    pub type MemGroup = Fake<World>;

    fn refs(n: usize) -> Vec<MemberRef> {
        (0..n)
            .map(|i| MemberRef {
                image_id: format!("id{i}"),
                image_name: format!("m{i}"),
            })
            .collect()
    }

    fn complete(cut: &str) -> SyncPoint {
        SyncPoint {
            snap_name: cut.into(),
            snap_time: chrono::Utc::now(),
            completed_at: chrono::Utc::now(),
            duration_ms: 1,
            bytes: 1,
        }
    }

    impl Fake<World> {
        /// Two members; site a primary with cut 1 ("v1" on both members),
        /// site b its replica holding cut 1.
        pub fn pair() -> (MemGroup, MemGroup) {
            let mut w = World {
                next_cut: 1,
                ..World::default()
            };
            let c1 = cut_name(1);
            for (i, s) in w.sites.iter_mut().enumerate() {
                s.reachable = true;
                s.members = vec![
                    Member {
                        head: "v1".into(),
                        lock: None,
                        snaps: vec![(c1.clone(), "v1".into())],
                    };
                    2
                ];
                let mut rec: GroupRecord = serde_json::from_value(serde_json::json!({
                    "uuid": "g",
                    "role": "primary",
                    "schedule": Schedule::default(),
                    "members": refs(2),
                    "enabled_at": chrono::Utc::now(),
                }))
                .expect("a record");
                if i == 0 {
                    s.cuts = vec![c1.clone()];
                } else {
                    rec.role = Role::Secondary;
                    rec.primary_fsid = Some("fsid-a".into());
                    rec.last_cut = Some(complete(&c1));
                    for m in &mut s.members {
                        m.lock = Some("me".into());
                    }
                }
                s.store(&rec);
            }
            Fake::both(w)
        }

        /// This site's state.
        pub fn site(&self) -> Site {
            self.with(|w| w.sites[self.me].clone())
        }

        /// This site's record.
        pub fn rec(&self) -> GroupRecord {
            self.site().record().expect("a record")
        }

        /// An application writes `content` to member `i` (refused while
        /// this process holds its lock).
        pub fn write(&self, i: usize, content: &str) -> bool {
            self.with(|w| {
                let m = &mut w.sites[self.me].members[i];
                if m.lock.as_deref() == Some("me") {
                    return false;
                }
                m.head = content.into();
                true
            })
        }

        /// The replayer copies this site's newest cut to `to` (members'
        /// snapshots and heads) and records it complete there.
        pub fn replicate_to(&self, to: &MemGroup) {
            self.with(|w| {
                let cut = w.sites[self.me].cuts.last().cloned().expect("a cut");
                let frozen: Vec<String> = w.sites[self.me]
                    .members
                    .iter()
                    .map(|m| m.at(&cut).cloned().expect("a member snapshot"))
                    .collect();
                let r = &mut w.sites[to.me];
                for (m, c) in r.members.iter_mut().zip(frozen) {
                    m.head = c.clone();
                    m.snaps.push((cut.clone(), c));
                }
                let mut rec = r.record().expect("a record");
                rec.last_cut = Some(complete(&cut));
                r.store(&rec);
            });
        }

        fn set_locks(&self, from: &[Option<&str>], to: Option<&str>) {
            self.with(|w| {
                for m in &mut w.sites[self.me].members {
                    if from.contains(&m.lock.as_deref()) {
                        m.lock = to.map(str::to_string);
                    }
                }
            });
        }
    }

    impl GroupStore for MemGroup {
        type Pause = PauseGuard<World>;

        fn name(&self) -> &str {
            "volume group g"
        }

        fn record(&self) -> Result<GroupRecord> {
            self.step("record")?;
            self.site()
                .record()
                .ok_or_else(|| EngineError::FailedPrecondition("not replicated".into()))
        }

        fn put(&self, rec: &mut GroupRecord) -> Result<()> {
            self.step("put")?;
            self.with(|w| swap(&mut w.sites[self.me].stored, rec))
        }

        fn peer(&self) -> Result<(String, Option<GroupRecord>)> {
            self.step("peer")?;
            let p = self.with(|w| w.sites[1 - self.me].clone());
            if !p.reachable {
                return Err(EngineError::Timeout("peer unreachable".into()));
            }
            Ok((["fsid-a", "fsid-b"][1 - self.me].into(), p.record()))
        }

        fn pause(&self) -> Result<PauseGuard<World>> {
            self.pause_site()
        }

        fn members(&self) -> Result<Vec<MemberRef>> {
            self.step("members")?;
            Ok(refs(self.site().members.len()))
        }

        fn writers(&self) -> Result<Vec<String>> {
            self.step("writers")?;
            Ok(self.site().writers)
        }

        fn break_locks(&self, _: &[MemberRef]) {
            self.set_locks(&[Some("client.7")], None);
        }

        fn take_cut(&self) -> Result<String> {
            self.step("take_cut")?;
            self.with(|w| {
                w.next_cut += 1;
                let name = cut_name(w.next_cut);
                let s = &mut w.sites[self.me];
                if s.members
                    .iter()
                    .any(|m| m.lock.as_deref() == Some("client.7"))
                {
                    return Err(EngineError::Unavailable("a member's lock is held".into()));
                }
                for m in &mut s.members {
                    let head = m.head.clone();
                    m.snaps.push((name.clone(), head));
                }
                s.cuts.push(name.clone());
                Ok(name)
            })
        }

        fn hold_members(&self, _: &[MemberRef]) -> Result<()> {
            self.step("hold_members")?;
            self.with(|w| {
                for m in &mut w.sites[self.me].members {
                    match m.lock.as_deref() {
                        None | Some("me") => m.lock = Some("me".into()),
                        Some(o) => return Err(EngineError::Unavailable(format!("held by {o}"))),
                    }
                }
                Ok(())
            })
        }

        fn release_members(&self, _: &[MemberRef]) {
            self.set_locks(&[Some("me")], None);
        }

        fn unwritten_since(&self, _: &[MemberRef], cut: &str) -> Result<()> {
            self.step("unwritten_since")?;
            let site = self.site();
            if site.members.iter().any(|m| m.at(cut) != Some(&m.head)) {
                return Err(EngineError::Unavailable("written after the cut".into()));
            }
            Ok(())
        }

        fn roll_back(&self, _: &[MemberRef], cut: &str) -> Result<u64> {
            self.step("roll_back")?;
            self.with(|w| {
                let mut rolled = 0;
                for m in &mut w.sites[self.me].members {
                    let c = m
                        .at(cut)
                        .cloned()
                        .ok_or_else(|| EngineError::NotFound(cut.into()))?;
                    rolled += u64::from(m.head != c);
                    m.head = c;
                    m.lock = None;
                }
                Ok(rolled)
            })
        }

        fn divergence(&self, rec: &GroupRecord, _: &GroupRecord) -> Result<Divergence> {
            self.step("divergence")?;
            let (me, peer) =
                self.with(|w| (w.sites[self.me].clone(), w.sites[1 - self.me].clone()));
            let common = me
                .cuts
                .iter()
                .rev()
                .find(|c| peer.members.iter().all(|m| m.at(c).is_some()))
                .cloned();
            let Some(c) = common else {
                return Ok(Divergence::Diverged(None));
            };
            let clean = rec.demotion_cut.as_deref() == Some(c.as_str())
                && me.members.iter().all(|m| m.at(&c) == Some(&m.head));
            Ok(if clean {
                Divergence::Clean(c)
            } else {
                Divergence::Diverged(Some(c))
            })
        }

        fn reset_to_cut(&self, cut: Option<&str>) -> Result<Vec<MemberRef>> {
            self.step("reset_to_cut")?;
            self.with(|w| {
                let s = &mut w.sites[self.me];
                let keep = cut.and_then(|c| s.cuts.iter().position(|n| n == c));
                s.cuts.truncate(keep.map_or(0, |k| k + 1));
                for m in &mut s.members {
                    if let Some(c) = cut {
                        m.head = m.at(c).cloned().expect("the cut's content");
                    }
                    let head = m.head.clone();
                    m.snaps = cut.map(|c| vec![(c.to_string(), head)]).unwrap_or_default();
                }
                Ok(refs(s.members.len()))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    //! The group role rules on two in-memory sites: relocation, forced
    //! failover and the resync after it, and a failure injected at every
    //! step of each.

    use super::fake::MemGroup;
    use super::*;
    use crate::store::fake::{at_every_step, code};

    fn all_locked(g: &MemGroup) -> bool {
        g.site()
            .members
            .iter()
            .all(|m| m.lock.as_deref() == Some("me"))
    }

    #[test]
    fn planned_relocation_waits_for_the_demotion_cut() {
        let (a, b) = MemGroup::pair();
        assert!(a.write(0, "v2") && a.write(1, "w2"));
        assert_eq!(code(promote(&b, false, None)), "failed-precondition");
        demote(&a, false).unwrap();
        let ra = a.rec();
        assert_eq!(ra.role, Role::Demoted);
        assert!(all_locked(&a), "every member locked");
        assert!(!a.write(0, "lost"));
        assert_eq!(
            code(promote(&b, false, None)),
            "unavailable",
            "retry, never force"
        );
        a.replicate_to(&b);
        assert_eq!(
            b.rec().last_cut.unwrap().snap_name,
            ra.demotion_cut.unwrap()
        );
        promote(&b, false, None).unwrap();
        assert_eq!(b.rec().role, Role::Primary);
        assert_eq!(b.site().heads(), ["v2", "w2"], "every member at the cut");
        assert!(b.write(0, "v3"), "the members are writable on b");
        // a becomes a replica without a copy; idempotent on both sides.
        assert!(resync(&a, false).unwrap());
        assert_eq!(a.rec().role, Role::Secondary);
        assert!(all_locked(&a));
        promote(&b, false, None).unwrap();
        demote(&a, false).unwrap();
    }

    #[test]
    fn demotion_refuses_open_members_unless_forced() {
        let (a, _b) = MemGroup::pair();
        a.with(|w| {
            w.sites[0].writers = vec!["m0: client.7".into()];
            w.sites[0].members[0].lock = Some("client.7".into());
        });
        let err = demote(&a, false).unwrap_err().to_string();
        assert!(err.contains("client.7"), "{err}");
        assert_eq!(a.rec().role, Role::Primary);
        assert_eq!(a.site().cuts.len(), 1, "no cut taken");
        demote(&a, true).unwrap();
        assert_eq!(a.rec().role, Role::Demoted);
        assert!(all_locked(&a));
    }

    #[test]
    fn an_unreachable_peer_refuses_an_unforced_promotion() {
        let (a, b) = MemGroup::pair();
        demote(&a, false).unwrap();
        b.with(|w| w.sites[1].reachable = false);
        assert_eq!(code(promote(&a, false, None)), "failed-precondition");
        assert_eq!(a.rec().role, Role::Demoted);
        b.with(|w| w.sites[1].reachable = true);
        promote(&a, false, None).unwrap();
        assert_eq!(a.rec().role, Role::Primary, "the demotion undone");
        assert!(a.write(0, "v2"));
    }

    /// a wrote after cut 1 and is lost; b is promoted by force; a comes
    /// back, writes more and is demoted: a split brain.
    fn split_brain() -> (MemGroup, MemGroup) {
        let (a, b) = MemGroup::pair();
        assert!(a.write(0, "a-only"));
        a.with(|w| w.sites[0].reachable = false);
        b.with(|w| w.sites[1].members[1].head = "v1+partial".into());
        promote(&b, true, None).unwrap();
        assert_eq!(
            b.site().heads(),
            ["v1", "v1"],
            "rolled back to the last cut"
        );
        a.with(|w| w.sites[0].reachable = true);
        demote(&a, false).unwrap();
        assert!(b.write(1, "b-only"));
        (a, b)
    }

    #[test]
    fn split_brain_is_resynced_only_with_force_from_the_common_cut() {
        let (a, _b) = split_brain();
        let c1 = a.site().cuts[0].clone();
        let err = resync(&a, false).unwrap_err().to_string();
        assert!(err.contains("split-brain") && err.contains(&c1), "{err}");
        assert_eq!(a.rec().role, Role::Demoted, "nothing changed");
        assert!(!resync(&a, true).unwrap());
        let (rec, site) = (a.rec(), a.site());
        assert_eq!(rec.role, Role::Secondary);
        assert_eq!(rec.last_cut.unwrap().snap_name, c1);
        assert_eq!(site.heads(), ["v1", "v1"]);
        assert_eq!(site.cuts, [c1], "a's own later cut removed");
        assert!(all_locked(&a));
    }

    #[test]
    fn a_failure_at_any_step_of_a_demotion_leaves_a_primary_or_a_demoted_group() {
        at_every_step(
            5,
            &|| {
                let (a, b) = MemGroup::pair();
                assert!(a.write(0, "v2"));
                (a, b)
            },
            &|a, _| demote(a, false),
            &|at, a, _| match a.rec().role {
                Role::Primary => assert!(
                    a.site().members.iter().all(|m| m.lock.is_none()),
                    "step {at}: the members go back to their application"
                ),
                Role::Demoted => assert!(all_locked(a), "step {at}"),
                Role::Secondary => panic!("step {at}"),
            },
            &|at, a, _| {
                let rec = a.rec();
                assert_eq!(rec.role, Role::Demoted, "step {at}");
                let cut = rec.demotion_cut.unwrap();
                assert!(
                    a.site().members.iter().all(|m| m.at_is(&cut, &m.head)),
                    "step {at}"
                );
            },
        );
    }

    #[test]
    fn a_failure_at_any_step_of_a_forced_promotion_leaves_a_replica_or_a_primary_at_the_cut() {
        at_every_step(
            3,
            &|| {
                let (a, b) = MemGroup::pair();
                a.with(|w| w.sites[0].reachable = false);
                b.with(|w| w.sites[1].members[0].head = "v1+partial".into());
                (a, b)
            },
            &|_, b| promote(b, true, None),
            &|at, _, b| {
                let rec = b.rec();
                if rec.role == Role::Primary {
                    assert_eq!(b.site().heads(), ["v1", "v1"], "step {at}");
                } else {
                    assert_eq!(rec.role, Role::Secondary, "step {at}");
                }
            },
            &|at, _, b| {
                assert_eq!(b.rec().role, Role::Primary, "step {at}");
                assert_eq!(b.site().heads(), ["v1", "v1"], "step {at}");
                assert!(
                    b.site().members.iter().all(|m| m.lock.is_none()),
                    "step {at}"
                );
            },
        );
    }

    #[test]
    fn a_failure_at_any_step_of_a_forced_resync_leaves_it_demoted_or_a_replica() {
        at_every_step(
            6,
            &split_brain,
            &|a, _| resync(a, true).map(drop),
            &|at, a, _| {
                let role = a.rec().role;
                assert!(
                    matches!(role, Role::Demoted | Role::Secondary),
                    "step {at}: {role:?}"
                );
            },
            &|at, a, _| {
                let rec = a.rec();
                assert_eq!(rec.role, Role::Secondary, "step {at}");
                assert_eq!(a.site().heads(), ["v1", "v1"], "step {at}");
                assert!(all_locked(a), "step {at}");
            },
        );
    }
}
