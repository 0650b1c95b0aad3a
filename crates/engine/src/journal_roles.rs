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
use super::journal_mode::{client_id, enable_journaling, peer_client_data};
use super::registry::{
    ImageRecord, JournalReplica, PrimaryRef, Registry, Role, RoleChange, Schedule,
};
use super::resolve::Resolved;
use super::rollback::rollback_to;
use super::{VolumeRequest, replayer};

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

fn journal_err(e: JournalError, what: &str) -> EngineError {
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

fn open_journal(img: &Image, key: &str) -> Result<Journal> {
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

impl Engine {
    /// DemoteVolume of a journal-mode primary (the caller checked the
    /// writers): lock, demotion epoch, lock released (librbd refuses every
    /// writer from then on), record.
    pub(crate) fn journal_demote(
        &self,
        vol: &Resolved,
        reg: &Registry,
        mut rec: ImageRecord,
        key: &str,
        force: bool,
        owners: &[String],
    ) -> Result<()> {
        let _slot = self.take_slot(key)?;
        if force {
            for o in owners {
                tracing::warn!(owner = %o, "breaking the lock of a writer (forced demotion)");
                let _ = vol.image.lock_break(o);
            }
        }
        // The lock first: once this process holds it nobody else can
        // write, so the demotion follows the last write of any client.
        self.hold_lock(key, &vol.image)?;
        let tid = demote_journal(&vol.image, key);
        self.held.release(key);
        let tid = tid?;
        rec.role = Role::Demoted;
        rec.demotion_snap = Some(demotion_marker(tid));
        rec.role_change = change(format!("demoted at journal tag {tid}"));
        reg.put(&mut rec)?;
        reg.announce();
        tracing::info!(
            tag = tid,
            "demoted in the journal; librbd refuses writers now"
        );
        Ok(())
    }

    /// PromoteVolume of a journal-mode image that is not primary.
    pub(crate) fn journal_promote(
        &self,
        req: &VolumeRequest,
        vol: &Resolved,
        reg: &Registry,
        mut rec: ImageRecord,
        force: bool,
        schedule: Option<Schedule>,
    ) -> Result<()> {
        let key = Self::key_of(vol);
        let key = key.as_str();
        if rec.role == Role::Demoted {
            return self.journal_promote_demoted(vol, reg, rec, force, schedule);
        }
        let primary = rec.primary.clone().ok_or_else(|| {
            EngineError::Internal(format!("replica {key} has no primary in its record"))
        })?;
        let replayed = rec.journal.as_ref().and_then(|j| j.demoted_at);
        if !force {
            self.check_demotion_replayed(vol, &primary.image_id, replayed, key)?;
        }
        // Stops the replay loop: at an entry boundary, flushed.
        let _slot = self.take_slot(key)?;
        self.held.release(key);
        self.break_foreign_locks(&vol.image, key);
        replayer::settle_pending_snap(&vol.image, reg, &mut rec)?;
        if rec.journal.is_none() {
            // The bootstrap did not finish: only its copy's sync point is
            // consistent.
            let last = rec.last_sync.as_ref().map(|l| l.snap_name.clone());
            let Some(last) = last else {
                return Err(EngineError::FailedPrecondition(format!(
                    "{key} never completed its bootstrap; it holds no consistent data to promote"
                )));
            };
            rollback_to(vol.ioctx(), &vol.image, &last, self.cfg.limits, &|| false)?;
        }
        let added = enable_journaling(&vol.image, &req.volume.to_string())?;
        let link = replayed.map(|t| (primary.fsid.as_str(), t));
        if link.is_some() {
            // The old primary equals this image now: it replays this
            // journal from its very start, so its client is registered
            // before anything is written to it.
            let journal = open_journal(&vol.image, key)?;
            journal
                .register_or_reuse(
                    &client_id(&primary.fsid),
                    &peer_client_data(&primary.image_id, MirrorPeerState::Replaying),
                )
                .map_err(|e| journal_err(e, key))?;
        }
        let tid = promote_journal(&vol.image, key, link, force)?;
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
        if let Some(s) = schedule {
            rec.schedule = s;
        }
        reg.put(&mut rec)?;
        reg.announce();
        tracing::info!(
            tag = tid,
            linked = replayed.is_some(),
            "promoted; journaling on"
        );
        Ok(())
    }

    /// PromoteVolume of a journal-mode image this site demoted: its journal
    /// gets a tag owned by it again (`force`: whatever the peer says).
    fn journal_promote_demoted(
        &self,
        vol: &Resolved,
        reg: &Registry,
        mut rec: ImageRecord,
        force: bool,
        schedule: Option<Schedule>,
    ) -> Result<()> {
        let key = Self::key_of(vol);
        let key = key.as_str();
        if !force {
            self.peer_not_primary(vol, key)?;
        }
        let _slot = self.take_slot(key)?;
        let tid = promote_journal(&vol.image, key, None, force)?;
        rec.role = Role::Primary;
        rec.demotion_snap = None;
        rec.role_change = change(format!(
            "promoted{} from demoted at journal tag {tid}",
            if force { " (forced)" } else { "" }
        ));
        if let Some(s) = schedule {
            rec.schedule = s;
        }
        reg.put(&mut rec)?;
        reg.announce();
        tracing::info!(tag = tid, "promoted from demoted");
        Ok(())
    }

    /// An orderly promotion's condition: the peer `primary_id` is demoted,
    /// and this replica replayed its journal up to that demotion
    /// (`replayed`); UNAVAILABLE while it still replays.
    fn check_demotion_replayed(
        &self,
        vol: &Resolved,
        primary_id: &str,
        replayed: Option<u64>,
        key: &str,
    ) -> Result<()> {
        let prec = self.demoted_peer(vol, Some(primary_id), key)?;
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
                "the replica of {key} is still replaying the peer's journal up to \
                         its demotion (tag {want}); retry shortly"
            )));
        }
        Ok(())
    }

    /// ResyncVolume of a journal-mode image. Returns whether the replica
    /// is complete (bootstrapped and replaying past its snapshot).
    pub(crate) fn journal_resync(
        &self,
        req: &VolumeRequest,
        vol: &Resolved,
        reg: &Registry,
        mut rec: ImageRecord,
        force: bool,
    ) -> Result<bool> {
        let key = Self::key_of(vol);
        let key = key.as_str();
        match rec.role {
            Role::Primary => {
                return Err(EngineError::FailedPrecondition(format!(
                    "volume {} is primary; demote it before resyncing it",
                    req.volume
                )));
            }
            Role::Secondary => {
                return Ok(rec.journal.as_ref().is_some_and(|j| j.skip_until.is_none()));
            }
            Role::Demoted => {}
        }
        let mine = rec.demotion_snap.as_deref().and_then(demotion_tag);
        let peer = self.peer_record(vol, None)?;
        let prec = match peer.rec {
            Some(p) if p.role == Role::Primary => p,
            other => {
                // Neither side is primary: settled once the peer's replica
                // replayed this side's demotion.
                let theirs = other
                    .as_ref()
                    .and_then(|p| p.journal.as_ref())
                    .and_then(|j| j.demoted_at);
                let settled = mine.is_some() && mine == theirs;
                tracing::info!(ours = ?mine, theirs = ?theirs, settled, "the peer is not primary");
                return Ok(settled);
            }
        };
        let _slot = self.take_slot(key)?;
        let local = self.local()?;
        let fsid = local.fsid().to_string();
        let pjournal = Journal::open(&peer.io, &prec.image_id).map_err(|e| journal_err(e, key))?;
        let here = local_demotion(vol.ioctx(), &vol.image_id, key)?;
        let linked = match here {
            Some(d) => linked_to(&pjournal, &fsid, d, key)?,
            None => false,
        };
        if linked {
            // An orderly switch: the replayer makes it a replica by itself.
            return Ok(false);
        }
        let pimg = Image::open_by_id_read_only(&peer.io, &prec.image_id, None)
            .ctx(|| format!("opening the peer's primary {key}"))?;
        let div = self.divergence(&vol.image, &pimg, key)?;
        drop(pimg);
        if !force {
            return Err(EngineError::FailedPrecondition(format!(
                "split-brain: the peer's {key} was promoted without linking to this side's \
                 demotion (a forced promotion, or this side was written since); \
                 ResyncVolume with force discards the local changes since {} and copies \
                 what differs",
                div.common
                    .as_deref()
                    .unwrap_or("the beginning (a full copy)")
            )));
        }
        let primary = PrimaryRef {
            fsid: peer.cluster.fsid().to_string(),
            image_id: prec.image_id.clone(),
        };
        self.resync_diverged(reg, &mut rec, vol, &pjournal, primary, div)?;
        Ok(false)
    }

    /// A forced resync of a diverged journal image: journaling off, this
    /// side's client gone from the new primary's journal, then the image
    /// rolled back to the newest common sync point and made a replica of
    /// `primary` (bootstrapped from there by the replayer).
    fn resync_diverged(
        &self,
        reg: &Registry,
        rec: &mut ImageRecord,
        vol: &Resolved,
        pjournal: &Journal,
        primary: PrimaryRef,
        div: super::roles::Divergence,
    ) -> Result<()> {
        let key = Self::key_of(vol);
        let key = key.as_str();
        let fsid = self.local()?.fsid().to_string();
        self.held.release(key);
        disable_journaling(&vol.image, key)?;
        match pjournal.unregister_client(&client_id(&fsid)) {
            Ok(()) => {}
            Err(JournalError::Ceph(e)) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(journal_err(e, key)),
        }
        rec.journal = None;
        // Always roll back: the head may hold writes of this side's
        // primary epoch even where no sync snapshot says so.
        let div = super::roles::Divergence {
            head_changed: div.common.is_some(),
            ..div
        };
        self.adopt_as_replica(reg, rec, &vol.image, key, primary, &div)?;
        Ok(())
    }

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
    use super::*;

    #[test]
    fn demotion_markers_round_trip() {
        assert_eq!(demotion_tag(&demotion_marker(42)), Some(42));
        assert_eq!(demotion_tag("csirr-sync.0000000001"), None);
        assert_eq!(demotion_tag("journal-tag.x"), None);
    }
}
