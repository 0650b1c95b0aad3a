//! Role changes of journal-mode images (`mirroringMode: journal`), with the
//! semantics of snapshot mode (see [`super::roles`]) and librbd's journal
//! tags as the record of who is primary, so that librbd itself agrees:
//!
//! - **Demote** (primary): the image's exclusive lock is taken (no writer
//!   left), then the demotion is appended as librbd's
//!   `journal::DemoteRequest` appends it: a tag owned by `<orphan>` whose
//!   predecessor is librbd's own client's newest commit position, holding
//!   one `DemotePromote` event (entry 0), committed for librbd's client.
//!   From then on librbd refuses the exclusive lock to every client
//!   ("local image not promoted", EPERM), so no write can land on the
//!   demoted image, and the replica's replay stops at that event
//!   ([`super::journal_replay::JournalReplayer::demoted`]) and records it
//!   in its registry record (`journal.demoted_at`).
//! - **Promote, planned** (replica): once the replica replayed the peer's
//!   demotion (UNAVAILABLE before), the replay loop is stopped, journaling
//!   is turned on, the old primary's client is registered in the new
//!   journal before anything is written to it, and two epochs are
//!   appended: an `<orphan>` one whose predecessor is the peer's demotion
//!   (mirror uuid = the peer cluster's fsid, its demotion tag), as
//!   rbd-mirror records a replayed demotion in the replica's own journal,
//!   then librbd's orderly promotion on top of it (`""`, predecessor
//!   `<orphan>`, that tag, entry 1). The old primary finds its demotion
//!   linked there and becomes a replica by itself, replaying the new
//!   primary's journal from its start: no copy.
//! - **Promote, forced**: the same without the peer; the replica is at an
//!   entry boundary (every poll ends with a flush). Unless the replay had
//!   applied the peer's demotion, the new epoch's predecessor is
//!   librbd's forced one (`""`, the current tag, entry 0), which no peer
//!   links to: the old site is a split-brain until it is demoted and
//!   resynced.
//! - **Resync** (demoted, peer primary): a linked old primary needs
//!   nothing (the replayer adopts it); otherwise, with force, journaling is
//!   turned off, the image rolled back to the newest sync snapshot both
//!   sides share and bootstrapped again from a new snapshot of the new
//!   primary (the snapshot-mode delta, then the journal replay).
//!
//! A replica never has journaling on (the replay writes it through librbd,
//! which would journal every write as a primary): a demoted image loses
//! its journal when it becomes a replica, and a replica gains one when it
//! is promoted.

use std::sync::Arc;

use chrono::Utc;

use csirr_ceph::{ErrorKind, Image, IoCtx, features};
use csirr_journal::entry::encode_entry;
use csirr_journal::event::EVENT_VERSION;
use csirr_journal::types::{LOCAL_MIRROR_UUID, ORPHAN_MIRROR_UUID};
use csirr_journal::{
    ClientData, Event, EventEntry, Journal, JournalError, MirrorPeerState, ObjectPosition,
    ObjectSetPosition, TagData, TagPredecessor,
};

use super::Engine;
use super::error::{CephContext, EngineError, Result};
use super::journal_mode::{client_id, peer_client_data};
use super::registry::{
    ImageRecord, JournalReplica, PrimaryRef, Registry, Role, RoleChange, Schedule,
};
use super::replayer;
use super::roles::{Divergence, demoted_peer, peer_not_primary};
use super::store::VolumeStore;

/// Prefix of the `demotion_snap` of a journal-mode image demoted at a
/// journal tag: `journal-tag.<tid>` (no snapshot of that name exists).
pub const DEMOTION_PREFIX: &str = "journal-tag.";

/// The `demotion_snap` marker of a demotion at journal tag `tid`.
pub fn demotion_marker(tid: u64) -> String {
    format!("{DEMOTION_PREFIX}{tid}")
}

/// The journal tag of a `demotion_snap` marker.
pub fn demotion_tag(marker: &str) -> Option<u64> {
    marker.strip_prefix(DEMOTION_PREFIX)?.parse().ok()
}

pub(crate) fn journal_err(e: JournalError, what: &str) -> EngineError {
    match e {
        JournalError::Ceph(source) => Err::<(), _>(source)
            .ctx(|| format!("the journal of {what}"))
            .unwrap_err(),
        e => EngineError::Internal(format!("the journal of {what}: {e}")),
    }
}

fn change(what: String) -> Option<RoleChange> {
    Some(RoleChange {
        at: Utc::now(),
        what,
    })
}

/// librbd's own client (`""`) of `journal` and its tag class.
fn image_client(journal: &Journal, key: &str) -> Result<(csirr_journal::Client, u64)> {
    let c = journal
        .client(LOCAL_MIRROR_UUID)
        .map_err(|e| journal_err(e, key))?
        .ok_or_else(|| {
            EngineError::Internal(format!("the journal of {key} has no librbd client"))
        })?;
    let class = match c.client_data() {
        Ok(ClientData::Image(m)) => m.tag_class,
        other => {
            return Err(EngineError::Internal(format!(
                "the journal of {key}: librbd's client data is {other:?}"
            )));
        }
    };
    Ok((c, class))
}

/// The newest tag of librbd's tag class in `journal`, with its data: who
/// owns the journal now (`""` primary, `<orphan>` demoted).
pub fn newest_tag(journal: &Journal, key: &str) -> Result<(u64, TagData)> {
    let (_, class) = image_client(journal, key)?;
    let tags = journal
        .tags(LOCAL_MIRROR_UUID, 0, Some(class))
        .map_err(|e| journal_err(e, key))?;
    let t = tags
        .last()
        .ok_or_else(|| EngineError::Internal(format!("the journal of {key} has no tag")))?;
    let data = t
        .tag_data()
        .map_err(|e| EngineError::Internal(format!("tag {} of {key}: {e}", t.tid)))?;
    Ok((t.tid, data))
}

/// Appends an epoch as librbd's demote and promote requests do: a tag of
/// librbd's class owned by `owner` after `predecessor`, its single
/// `DemotePromote` event (entry 0, offset 0 of the active object set),
/// and librbd's client's commit position moved to it. Returns the tag.
fn append_epoch(
    journal: &Journal,
    owner: &str,
    predecessor: TagPredecessor,
    key: &str,
) -> Result<u64> {
    let (client, class) = image_client(journal, key)?;
    let data = TagData {
        mirror_uuid: owner.to_string(),
        predecessor,
    };
    let tag = journal
        .create_tag(class, &data.encode())
        .map_err(|e| journal_err(e, key))?;
    let width = u64::from(journal.layout().splay_width.max(1));
    let (_, active) = journal.object_sets().map_err(|e| journal_err(e, key))?;
    let object = active * width;
    let payload = EventEntry {
        event: Event::DemotePromote,
        version: EVENT_VERSION,
        timestamp: None,
    }
    .encode();
    journal
        .append_entry(object, &encode_entry(tag.tid, 0, &payload))
        .map_err(|e| journal_err(e, key))?;
    let mut positions = vec![ObjectPosition {
        object_number: object,
        tag_tid: tag.tid,
        entry_tid: 0,
    }];
    positions.extend(
        client
            .commit_position
            .positions
            .iter()
            .filter(|p| p.object_number % width != 0)
            .cloned(),
    );
    positions.truncate(width as usize);
    journal
        .commit(LOCAL_MIRROR_UUID, &ObjectSetPosition { positions })
        .map_err(|e| journal_err(e, key))?;
    tracing::info!(image = key, tag = tag.tid, owner, pred = ?data.predecessor, "journal epoch appended");
    Ok(tag.tid)
}

pub(crate) fn open_journal(img: &Image, key: &str) -> Result<Journal> {
    let id = img.id().ctx(|| key.to_string())?;
    Journal::open(img.ioctx(), &id).map_err(|e| journal_err(e, key))
}

/// Demotes `img` in its journal as librbd does; idempotent (a journal
/// already demoted answers its demotion tag). The caller holds the image's
/// exclusive lock. Returns the demotion (`<orphan>`) tag.
pub fn demote_journal(img: &Image, key: &str) -> Result<u64> {
    let journal = open_journal(img, key)?;
    let (tid, data) = newest_tag(&journal, key)?;
    match data.mirror_uuid.as_str() {
        ORPHAN_MIRROR_UUID => return Ok(tid),
        LOCAL_MIRROR_UUID => {}
        other => {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} is not primary in its journal (its epoch belongs to {other})"
            )));
        }
    }
    let (client, _) = image_client(&journal, key)?;
    let predecessor = match client.commit_position.newest() {
        Some(p) => TagPredecessor {
            mirror_uuid: LOCAL_MIRROR_UUID.into(),
            commit_valid: true,
            tag_tid: p.tag_tid,
            entry_tid: p.entry_tid,
        },
        None => TagPredecessor::default(),
    };
    append_epoch(&journal, ORPHAN_MIRROR_UUID, predecessor, key)
}

/// Promotes `img` in its journal as librbd's promote request does: an
/// orderly promotion (current epoch `<orphan>`, not forced) links to it,
/// otherwise the new epoch follows the current tag at entry 0 (an epoch
/// no peer links to). With `link` (the peer cluster's fsid and its
/// demotion tag, replayed here), the peer's demotion is first recorded as
/// an `<orphan>` epoch of this journal, and the promotion links to that.
/// Returns the promotion tag.
pub fn promote_journal(
    img: &Image,
    key: &str,
    link: Option<(&str, u64)>,
    force: bool,
) -> Result<u64> {
    let journal = open_journal(img, key)?;
    if let Some((peer, peer_tag)) = link {
        let orphan = append_epoch(
            &journal,
            ORPHAN_MIRROR_UUID,
            TagPredecessor {
                mirror_uuid: peer.to_string(),
                commit_valid: true,
                tag_tid: peer_tag,
                entry_tid: 0,
            },
            key,
        )?;
        return append_epoch(
            &journal,
            LOCAL_MIRROR_UUID,
            TagPredecessor {
                mirror_uuid: ORPHAN_MIRROR_UUID.into(),
                commit_valid: true,
                tag_tid: orphan,
                entry_tid: 1,
            },
            key,
        );
    }
    let (tid, data) = newest_tag(&journal, key)?;
    let predecessor = if !force && data.mirror_uuid == ORPHAN_MIRROR_UUID {
        TagPredecessor {
            mirror_uuid: ORPHAN_MIRROR_UUID.into(),
            commit_valid: true,
            tag_tid: tid,
            entry_tid: 1,
        }
    } else {
        TagPredecessor {
            mirror_uuid: LOCAL_MIRROR_UUID.into(),
            commit_valid: true,
            tag_tid: tid,
            entry_tid: 0,
        }
    };
    append_epoch(&journal, LOCAL_MIRROR_UUID, predecessor, key)
}

/// The demotion tag of local image `image_id` when its journal's newest
/// epoch is a demotion; `None` without a journal or when it is not
/// demoted in it.
pub fn local_demotion(io: &Arc<IoCtx>, image_id: &str, key: &str) -> Result<Option<u64>> {
    let journal = match Journal::open(io, image_id) {
        Ok(j) => j,
        Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(journal_err(e, key)),
    };
    let (tid, data) = newest_tag(&journal, key)?;
    Ok((data.mirror_uuid == ORPHAN_MIRROR_UUID).then_some(tid))
}

/// Whether the new primary's `journal` links to demotion tag `demotion`
/// of the image of cluster `fsid` (an `<orphan>` epoch after it, and an
/// orderly promotion after that) and has that site's client registered:
/// the demoted image equals the new primary at its promotion and may
/// replay its journal from the client's position.
pub fn linked_to(journal: &Journal, fsid: &str, demotion: u64, key: &str) -> Result<bool> {
    let client = client_id(fsid);
    if journal
        .client(&client)
        .map_err(|e| journal_err(e, key))?
        .is_none()
    {
        return Ok(false);
    }
    let tags = journal
        .tags(&client, 0, None)
        .map_err(|e| journal_err(e, key))?;
    let data: Vec<(u64, TagData)> = tags
        .iter()
        .filter_map(|t| t.tag_data().ok().map(|d| (t.tid, d)))
        .collect();
    Ok(data.iter().any(|(o, d)| {
        d.mirror_uuid == ORPHAN_MIRROR_UUID
            && d.predecessor.mirror_uuid == fsid
            && d.predecessor.tag_tid == demotion
            && data.iter().any(|(_, p)| {
                p.mirror_uuid == LOCAL_MIRROR_UUID
                    && p.predecessor.mirror_uuid == ORPHAN_MIRROR_UUID
                    && p.predecessor.tag_tid == *o
            })
    }))
}

/// Turns journaling of `img` off (a replica is written by the replay
/// through librbd, which must not journal it; librbd removes the journal
/// and its clients). Already off is fine.
pub fn disable_journaling(img: &Image, key: &str) -> Result<()> {
    if img.features().ctx(|| key.to_string())? & features::JOURNALING == 0 {
        return Ok(());
    }
    img.update_features(features::JOURNALING, false)
        .ctx(|| format!("turning journaling of {key} off"))
}

/// DemoteVolume's steps on a journal-mode primary (the caller checked the
/// writers; `owners` hold its lock): the replayer kept off, the lock taken
/// (once held, nobody else writes, so the demotion follows the last write
/// of any client), the demotion epoch appended, the lock let go (librbd
/// refuses every writer of a demoted journal), then the record. A failure
/// before the record is written leaves it primary in the record; a
/// retry finds the journal demoted already and records that.
pub(crate) fn demote_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
    owners: &[String],
) -> Result<()> {
    let _pause = s.pause()?;
    if force {
        for o in owners {
            s.break_lock(o);
        }
    }
    s.hold_lock()?;
    let tid = s.journal_demote_epoch();
    s.release_lock();
    let tid = tid?;
    rec.role = Role::Demoted;
    rec.demotion_snap = Some(demotion_marker(tid));
    rec.role_change = change(format!("demoted at journal tag {tid}"));
    s.put(&mut rec)?;
    tracing::info!(
        tag = tid,
        "demoted in the journal; librbd refuses writers now"
    );
    Ok(())
}

/// PromoteVolume's steps on a journal-mode image that is not primary. A
/// replica: an orderly promotion once it replayed the peer's demotion
/// (UNAVAILABLE before); the replay stopped at an entry boundary, a
/// replica whose bootstrap never finished rolled back to its copy's sync
/// point, journaling turned on, the old primary's client registered (so it
/// can replay this journal from its start), the promotion epoch linked to
/// the peer's demotion (forced: linked to nothing), the record last.
pub(crate) fn promote_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
    schedule: Option<Schedule>,
) -> Result<()> {
    if rec.role == Role::Demoted {
        return promote_demoted(s, rec, force, schedule);
    }
    let key = s.key().to_string();
    let primary = rec.primary.clone().ok_or_else(|| {
        EngineError::Internal(format!("replica {key} has no primary in its record"))
    })?;
    let replayed = rec.journal.as_ref().and_then(|j| j.demoted_at);
    if !force {
        demotion_replayed(s, &primary.image_id, replayed, &key)?;
    }
    // Stops the replay loop: at an entry boundary, flushed.
    let _pause = s.pause()?;
    s.release_lock();
    s.break_foreign_locks();
    s.settle_pending(&mut rec)?;
    if rec.journal.is_none() {
        // The bootstrap did not finish: only its copy's sync point is
        // consistent.
        let Some(last) = rec.last_sync.as_ref().map(|l| l.snap_name.clone()) else {
            return Err(EngineError::FailedPrecondition(format!(
                "{key} never completed its bootstrap; it holds no consistent data to promote"
            )));
        };
        s.rollback_to(&last)?;
    }
    let added = s.enable_journal()?;
    let link = replayed.map(|t| (primary.fsid.as_str(), t));
    if link.is_some() {
        // The old primary equals this image now: it replays this journal
        // from its very start, so its client is registered before
        // anything is written to it.
        s.register_peer_client(&primary)?;
    }
    let tid = s.journal_promote_epoch(link, force)?;
    rec.role = Role::Primary;
    rec.primary = None;
    rec.checkpoint = None;
    rec.demotion_snap = None;
    rec.journal = None;
    rec.features_added = Some(rec.features_added.unwrap_or(added));
    rec.role_change = change(format!(
        "promoted{} at journal tag {tid}{}",
        if force { " (forced)" } else { "" },
        match replayed {
            Some(t) => format!(", linked to the peer's demotion (its tag {t})"),
            None => ", not linked to the peer (split-brain until it is resynced)".into(),
        }
    ));
    if let Some(sch) = schedule {
        rec.schedule = sch;
    }
    s.put(&mut rec)?;
    tracing::info!(
        tag = tid,
        linked = replayed.is_some(),
        "promoted; journaling on"
    );
    Ok(())
}

/// PromoteVolume of a journal-mode image this site demoted: its journal
/// gets an epoch owned by it again (`force`: whatever the peer says).
fn promote_demoted<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
    schedule: Option<Schedule>,
) -> Result<()> {
    if !force {
        peer_not_primary(s.peer_record(None), s.key())?;
    }
    let _pause = s.pause()?;
    let tid = s.journal_promote_epoch(None, force)?;
    rec.role = Role::Primary;
    rec.demotion_snap = None;
    rec.role_change = change(format!(
        "promoted{} from demoted at journal tag {tid}",
        if force { " (forced)" } else { "" }
    ));
    if let Some(sch) = schedule {
        rec.schedule = sch;
    }
    s.put(&mut rec)?;
    tracing::info!(tag = tid, "promoted from demoted");
    Ok(())
}

/// An orderly promotion's condition: the peer `primary_id` is demoted, and
/// this replica replayed its journal up to that demotion (`replayed`);
/// UNAVAILABLE while it still replays.
fn demotion_replayed<S: VolumeStore>(
    s: &S,
    primary_id: &str,
    replayed: Option<u64>,
    key: &str,
) -> Result<()> {
    let prec = demoted_peer(s.peer_record(Some(primary_id)), key)?;
    let want = prec
        .demotion_snap
        .as_deref()
        .and_then(demotion_tag)
        .ok_or_else(|| {
            EngineError::Internal(format!(
                "peer record of {key} is demoted without a journal demotion tag"
            ))
        })?;
    if replayed != Some(want) {
        return Err(EngineError::Unavailable(format!(
            "the replica of {key} is still replaying the peer's journal up to its demotion \
             (tag {want}); retry shortly"
        )));
    }
    Ok(())
}

/// ResyncVolume's steps on a journal-mode image. A demoted image whose
/// peer's new primary links to its demotion needs nothing (the replayer
/// adopts it); otherwise, with force, journaling is turned off, its client
/// leaves the new primary's journal, and the image is rolled back to the
/// newest sync point both sides share and made a replica (bootstrapped
/// from there by the replayer). Returns whether the replica is complete
/// (bootstrapped and replaying past its snapshot).
pub(crate) fn resync_volume<S: VolumeStore>(
    s: &S,
    mut rec: ImageRecord,
    force: bool,
) -> Result<bool> {
    let key = s.key().to_string();
    match rec.role {
        Role::Primary => {
            return Err(EngineError::FailedPrecondition(format!(
                "volume {key} is primary; demote it before resyncing it"
            )));
        }
        Role::Secondary => {
            return Ok(rec.journal.as_ref().is_some_and(|j| j.skip_until.is_none()));
        }
        Role::Demoted => {}
    }
    let prec = match s.peer_record(None)? {
        Some(p) if p.role == Role::Primary => p,
        other => {
            // Neither side is primary: settled once the peer's replica
            // replayed this side's demotion.
            let mine = rec.demotion_snap.as_deref().and_then(demotion_tag);
            let theirs = other
                .as_ref()
                .and_then(|p| p.journal.as_ref())
                .and_then(|j| j.demoted_at);
            let settled = mine.is_some() && mine == theirs;
            tracing::info!(ours = ?mine, theirs = ?theirs, settled, "the peer is not primary");
            return Ok(settled);
        }
    };
    let _pause = s.pause()?;
    if s.linked_by_peer(&prec.image_id)? {
        // An orderly switch: the replayer makes it a replica by itself.
        return Ok(false);
    }
    let (div, primary) = s.divergence_from(&prec.image_id)?;
    if !force {
        return Err(EngineError::FailedPrecondition(format!(
            "split-brain: the peer's {key} was promoted without linking to this side's \
             demotion (a forced promotion, or this side was written since); ResyncVolume \
             with force discards the local changes since {} and copies what differs",
            div.common
                .as_deref()
                .unwrap_or("the beginning (a full copy)")
        )));
    }
    s.release_lock();
    s.leave_journal(&prec.image_id)?;
    rec.journal = None;
    // Always roll back: the head may hold writes of this side's primary
    // epoch even where no sync snapshot says so.
    let div = Divergence {
        head_changed: div.common.is_some(),
        ..div
    };
    s.adopt_as_replica(&mut rec, primary, &div)?;
    Ok(false)
}

impl Engine {
    /// The replayer's side of an orderly switch: the local image of `rec`
    /// (demoted) becomes a replica of `primary_id` on `peer_fsid` whose
    /// journal links to its demotion; `None` when it is not linked (a
    /// split-brain until ResyncVolume with force) or a role change holds
    /// the image. The caller then replays from the client's position.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn journal_adopt_linked(
        &self,
        local_io: &Arc<IoCtx>,
        local_reg: &Registry,
        rec: &ImageRecord,
        primary_journal: &Journal,
        peer_fsid: &str,
        primary_id: &str,
        key: &str,
    ) -> Result<Option<ImageRecord>> {
        let local = self.local()?;
        let fsid = local.fsid().to_string();
        let Some(demotion) = local_demotion(local_io, &rec.image_id, key)? else {
            return Ok(None);
        };
        if !linked_to(primary_journal, &fsid, demotion, key)? {
            return Ok(None);
        }
        let slot = self.slots.get(key);
        let Some(_guard) = slot.try_enter() else {
            return Ok(None);
        };
        let Some(mut rec) = local_reg.get(&rec.image_id)? else {
            return Ok(None);
        };
        if rec.role != Role::Demoted {
            return Ok(None);
        }
        let img = Image::open_by_id(local_io, &rec.image_id).ctx(|| format!("opening {key}"))?;
        self.held.release(key);
        disable_journaling(&img, key)?;
        let client = client_id(&fsid);
        rec.role = Role::Secondary;
        rec.primary = Some(PrimaryRef {
            fsid: peer_fsid.to_string(),
            image_id: primary_id.to_string(),
        });
        rec.demotion_snap = None;
        rec.checkpoint = None;
        rec.journal = Some(JournalReplica {
            client_id: client.clone(),
            skip_until: None,
            demoted_at: None,
        });
        rec.role_change = change(format!(
            "replica again (orderly switch: the new primary's journal links to demotion tag \
             {demotion})"
        ));
        local_reg.put(&mut rec)?;
        local_reg.announce();
        replayer::lock_replica(&img).ctx(|| format!("locking replica {key} against writers"))?;
        self.held.put(key, img);
        primary_journal
            .update_client_data(
                &client,
                &peer_client_data(&rec.image_id, MirrorPeerState::Replaying),
            )
            .map_err(|e| journal_err(e, key))?;
        tracing::info!(
            image = key,
            demotion,
            "orderly switch: now a replica of the peer's new primary"
        );
        Ok(Some(rec))
    }
}

#[cfg(test)]
mod tests {
    //! Journal mode's role rules on two in-memory sites (`store::fake`,
    //! with its journal epochs): planned relocation linked through the
    //! journals, forced failover and the resync it needs, and a failure
    //! injected at every step of a demotion, a promotion and a resync.

    use super::*;
    use crate::store::fake::{MemVolume, at_every_step, code, demote, fsid, promote, resync};

    /// Site a demoted after writing "v2", its demotion replayed on b.
    fn demoted_and_replayed() -> (MemVolume, MemVolume) {
        let (a, b) = MemVolume::journal_pair();
        assert!(a.write("v2"));
        demote(&a, false).unwrap();
        a.replay_to(&b);
        (a, b)
    }

    /// Whether `b`'s journal links to site a's demotion (what a's resync
    /// and a's replayer look for).
    fn linked(a: &MemVolume) -> bool {
        a.linked_by_peer("id").unwrap()
    }

    #[test]
    fn demotion_markers_round_trip() {
        assert_eq!(demotion_tag(&demotion_marker(42)), Some(42));
        assert_eq!(demotion_tag("csirr-sync.0000000001"), None);
        assert_eq!(demotion_tag("journal-tag.x"), None);
    }

    #[test]
    fn planned_relocation_links_the_new_primary_to_the_demotion() {
        let (a, b) = MemVolume::journal_pair();
        assert!(a.write("v2"));
        assert_eq!(code(promote(&b, false)), "failed-precondition");
        demote(&a, false).unwrap();
        let ra = a.rec();
        let tag = a.site().demotion().expect("demoted in its journal");
        assert_eq!(ra.demotion_snap, Some(demotion_marker(tag)));
        assert!(
            !a.write("lost"),
            "librbd refuses writers of a demoted journal"
        );
        assert_eq!(a.site().lock, None, "the lock is let go: librbd refuses it");
        assert_eq!(
            code(promote(&b, false)),
            "unavailable",
            "retry until the demotion is replayed, never force"
        );
        a.replay_to(&b);
        promote(&b, false).unwrap();
        let (rb, site) = (b.rec(), b.site());
        assert_eq!(rb.role, Role::Primary);
        assert_eq!(rb.journal, None);
        assert_eq!(site.head, "v2", "everything a acknowledged is on b");
        assert!(
            site.journal_clients.contains(&fsid(0)),
            "a's client registered"
        );
        assert!(linked(&a), "b's journal links to a's demotion");
        // a needs no resync: the replayer adopts it without a copy.
        assert!(!resync(&a, false).unwrap());
        assert_eq!(a.rec().role, Role::Demoted, "left to the replayer");
        assert!(a.site().journal.is_some());
        // Idempotent; a cannot take the role back unforced.
        promote(&b, false).unwrap();
        demote(&a, false).unwrap();
        assert_eq!(code(promote(&a, false)), "failed-precondition");
    }

    #[test]
    fn a_demotion_undone_before_the_peer_took_over_keeps_the_journal() {
        let (a, b) = MemVolume::journal_pair();
        demote(&a, false).unwrap();
        let demotion = a.site().demotion().unwrap();
        promote(&a, false).unwrap();
        let epoch = a.site().epoch().unwrap();
        assert_eq!(a.rec().role, Role::Primary);
        assert_eq!(
            epoch.after,
            (ORPHAN_MIRROR_UUID.to_string(), demotion),
            "an orderly promotion after its own demotion"
        );
        assert!(a.write("v3"));
        // Not while the peer is primary.
        demote(&a, false).unwrap();
        a.replay_to(&b);
        promote(&b, false).unwrap();
        assert_eq!(code(promote(&a, false)), "failed-precondition");
    }

    #[test]
    fn forced_failover_splits_the_brain_until_a_forced_resync() {
        let (a, b) = MemVolume::journal_pair();
        assert!(a.write("v2"));
        a.with(|w| w.sites[0].reachable = false);
        assert_eq!(code(promote(&b, false)), "failed-precondition");
        promote(&b, true).unwrap();
        assert_eq!(b.rec().role, Role::Primary);
        let what = b.rec().role_change.unwrap().what;
        assert!(what.contains("not linked"), "{what}");
        // The old primary comes back, is demoted, and is not linked.
        a.with(|w| w.sites[0].reachable = true);
        demote(&a, false).unwrap();
        assert!(!linked(&a));
        let before = a.site();
        let err = resync(&a, false).unwrap_err().to_string();
        assert!(
            err.contains("split-brain") && err.contains("csirr-sync.1"),
            "{err}"
        );
        assert_eq!(a.site().journal, before.journal, "nothing changed");
        assert_eq!(a.rec().role, Role::Demoted);
        assert!(
            !resync(&a, true).unwrap(),
            "a replica now, to be bootstrapped"
        );
        let (ra, site) = (a.rec(), a.site());
        assert_eq!(ra.role, Role::Secondary);
        assert_eq!(ra.journal, None, "bootstrapped again by the replayer");
        assert_eq!(site.journal, None, "a replica has journaling off");
        assert_eq!(site.head, "v1", "rolled back to the common sync point");
        assert_eq!(site.lock.as_deref(), Some("me"));
        assert!(
            !b.site().journal_clients.contains(&fsid(0)),
            "a's old client gone"
        );
    }

    #[test]
    fn a_replica_that_never_finished_its_bootstrap_is_promoted_at_its_copy() {
        // `synced`: whether the bootstrap's copy completed its sync point.
        let cut_short = |synced: bool| {
            let (a, b) = MemVolume::journal_pair();
            b.with(|w| {
                let s = &mut w.sites[1];
                s.head = "v1+partial".into();
                let mut rec = s.record().unwrap();
                rec.journal = None;
                if !synced {
                    rec.last_sync = None;
                }
                s.store(&rec);
            });
            a.with(|w| w.sites[0].reachable = false);
            b
        };
        let b = cut_short(true);
        promote(&b, true).unwrap();
        assert_eq!(
            b.site().head,
            "v1",
            "back at the bootstrap copy's sync point"
        );
        assert!(b.site().journal.is_some(), "a primary journals");
        let b = cut_short(false);
        assert_eq!(code(promote(&b, true)), "failed-precondition");
        assert_eq!(b.rec().role, Role::Secondary);
        assert_eq!(b.site().journal, None, "nothing changed");
    }

    #[test]
    fn a_failure_at_any_step_of_a_demotion_leaves_a_primary_or_a_demoted_image() {
        at_every_step(
            5,
            &MemVolume::journal_pair,
            &|a, _| demote(a, false),
            &|at, a, _| {
                let (rec, site) = (a.rec(), a.site());
                match rec.role {
                    Role::Primary => assert_ne!(site.lock.as_deref(), Some("me"), "step {at}"),
                    Role::Demoted => assert_eq!(
                        rec.demotion_snap,
                        site.demotion().map(demotion_marker),
                        "step {at}: recorded demoted only once demoted in the journal"
                    ),
                    Role::Secondary => panic!("step {at}: a primary became a replica"),
                }
            },
            &|at, a, _| {
                let (rec, site) = (a.rec(), a.site());
                assert_eq!(rec.role, Role::Demoted, "step {at}");
                assert_eq!(rec.demotion_snap, site.demotion().map(demotion_marker));
                let journal = site.journal.unwrap();
                let orphans = journal
                    .iter()
                    .filter(|e| e.owner == ORPHAN_MIRROR_UUID)
                    .count();
                assert_eq!(orphans, 1, "step {at}: the retry demotes once");
            },
        );
    }

    #[test]
    fn a_failure_at_any_step_of_a_planned_promotion_leaves_a_replica_or_a_linked_primary() {
        at_every_step(
            8,
            &demoted_and_replayed,
            &|_, b| promote(b, false),
            &|at, a, b| match b.rec().role {
                Role::Primary => assert!(linked(a), "step {at}: primary only once linked"),
                Role::Secondary => {}
                Role::Demoted => panic!("step {at}"),
            },
            &|at, a, b| {
                assert_eq!(b.rec().role, Role::Primary, "step {at}");
                assert_eq!(b.site().head, "v2");
                assert!(linked(a), "step {at}: the retry links b to a's demotion");
            },
        );
    }

    #[test]
    fn a_failure_at_any_step_of_a_forced_resync_leaves_it_demoted_or_a_replica() {
        at_every_step(
            6,
            &|| {
                let (a, b) = MemVolume::journal_pair();
                a.with(|w| w.sites[0].reachable = false);
                promote(&b, true).unwrap();
                a.with(|w| w.sites[0].reachable = true);
                assert!(a.write("a-only"));
                demote(&a, false).unwrap();
                (a, b)
            },
            &|a, _| resync(a, true).map(drop),
            &|at, a, _| {
                let role = a.rec().role;
                assert!(
                    matches!(role, Role::Demoted | Role::Secondary),
                    "step {at}: {role:?}"
                );
            },
            &|at, a, b| {
                let site = a.site();
                assert_eq!(
                    (a.rec().role, site.head.as_str()),
                    (Role::Secondary, "v1"),
                    "step {at}"
                );
                assert_eq!(site.journal, None, "step {at}");
                assert!(!b.site().journal_clients.contains(&fsid(0)), "step {at}");
            },
        );
    }
}
