//! Reading (and registering with) an image's journal over librados: the
//! header through cls `journal` methods, the data objects with plain reads.
//!
//! Every call is blocking: run it on a thread of its own or through
//! `spawn_blocking`, never on a runtime worker thread.

use std::sync::Arc;
use std::time::Duration;

use super::codec::{DecodeError, Decoder, Encoder};
use super::entry::{EntryError, ScanEnd, scan_object};
use super::types::{Client, ClientData, ObjectSetPosition, Tag};
use csirr_ceph::{self as ceph, IoCtx};

/// What went wrong reading a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A librados call failed (`NotFound` on the header: no journal).
    #[error(transparent)]
    Ceph(#[from] ceph::Error),
    /// A reply or a stored value did not decode.
    #[error("{what} of journal {journal}: {source}")]
    Decode {
        /// The journal (image id).
        journal: String,
        /// What was decoded.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: DecodeError,
    },
    /// A data object holds bytes that are not journal entries.
    #[error("{object}: {source}")]
    Corrupt {
        /// The data object.
        object: String,
        /// What is wrong.
        #[source]
        source: EntryError,
    },
    /// Entries of a tag are missing: entry `expected` should come next,
    /// `found` is there instead (the journal was trimmed past this reader,
    /// or lost entries).
    #[error("journal {journal}: tag {tag_tid} skips from entry {expected} to {found}")]
    Gap {
        /// The journal (image id).
        journal: String,
        /// The tag.
        tag_tid: u64,
        /// The entry that should come next.
        expected: u64,
        /// The entry found in its place.
        found: u64,
    },
    /// The header holds a value librbd could not have written.
    #[error("journal {journal}: {what}")]
    BadHeader {
        /// The journal (image id).
        journal: String,
        /// What is wrong.
        what: String,
    },
}

/// An entry read by [`Journal::read_all`], with where it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEntry {
    /// Its data object.
    pub object_number: u64,
    /// Its offset in the object.
    pub offset: u64,
    /// Its tag.
    pub tag_tid: u64,
    /// Its number within the tag.
    pub entry_tid: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Result of a journal call.
pub type JournalResult<T> = Result<T, JournalError>;

/// Clients and tags asked for per cls call, as librbd's client does.
const PAGE: u64 = 256;

/// First output buffer of a cls call; grown on `ERANGE`.
const FIRST_REPLY: usize = 64 << 10;

/// Largest cls reply accepted.
const MAX_REPLY: usize = 64 << 20;

/// How long a header notify waits for watchers (librbd's own timeout).
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// The immutable layout of a journal, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Objects hold `1 << order` bytes before the writer moves to the next
    /// set (a soft limit: one append may go past it).
    pub order: u8,
    /// Objects per set; entry `n` of a tag goes to offset `n % splay_width`.
    pub splay_width: u8,
    /// Pool of the data objects; -1 for the image's pool.
    pub pool_id: i64,
}

impl Layout {
    /// The soft size limit of a data object.
    pub fn object_size(&self) -> u64 {
        1u64 << self.order
    }
}

/// An open journal: the header `journal.<image id>` in the image's pool and
/// namespace, and its data objects `journal_data.<image pool id>.<image
/// id>.<object number>` beside it, or, when the image has a journal pool,
/// in that pool's default namespace (named with the image pool's id all
/// the same).
pub struct Journal {
    header_io: Arc<IoCtx>,
    data_io: Arc<IoCtx>,
    image_id: String,
    layout: Layout,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field(
                "header",
                &format!("{}/{}", self.header_io.spec(), self.header_oid()),
            )
            .field("layout", &self.layout)
            .finish()
    }
}

/// The header object of image `image_id`'s journal.
pub fn header_oid(image_id: &str) -> String {
    format!("journal.{image_id}")
}

impl Journal {
    /// Opens the journal of image `image_id` in `io` (the image's pool and
    /// namespace): reads the layout. `NotFound` when the image has none.
    pub fn open(io: &Arc<IoCtx>, image_id: &str) -> JournalResult<Self> {
        let mut j = Self {
            header_io: Arc::clone(io),
            data_io: Arc::clone(io),
            image_id: image_id.to_string(),
            layout: Layout {
                order: 0,
                splay_width: 0,
                pool_id: -1,
            },
        };
        let order = j.call_u8("get_order")?;
        let splay_width = j.call_u8("get_splay_width")?;
        let pool_id = j.decode_reply("get_pool_id", &[], |d| d.i64("pool_id"))?;
        if !(12..=26).contains(&order) || splay_width == 0 {
            return Err(j.bad(format!("order {order}, splay width {splay_width}")));
        }
        j.layout = Layout {
            order,
            splay_width,
            pool_id,
        };
        if pool_id >= 0 && pool_id != io.pool_id() {
            // As `journal::Journaler` opens it: the journal pool's default
            // namespace, whatever the image's namespace.
            let cluster = io.cluster();
            let name = cluster.pool_reverse_lookup(pool_id)?;
            j.data_io = cluster.ioctx_by_id(pool_id, &name, "")?;
        }
        Ok(j)
    }

    /// The image id the journal belongs to.
    pub fn image_id(&self) -> &str {
        &self.image_id
    }

    /// The journal's layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The header object's name.
    pub fn header_oid(&self) -> String {
        header_oid(&self.image_id)
    }

    /// The name of data object `object_number`.
    pub fn object_oid(&self, object_number: u64) -> String {
        format!(
            "journal_data.{}.{}.{object_number}",
            self.header_io.pool_id(),
            self.image_id
        )
    }

    /// The I/O context of the data objects.
    pub fn data_ioctx(&self) -> &Arc<IoCtx> {
        &self.data_io
    }

    /// The header's I/O context (watch it for header updates).
    pub fn header_ioctx(&self) -> &Arc<IoCtx> {
        &self.header_io
    }

    /// cls `get_minimum_set`: the oldest object set not trimmed.
    pub fn minimum_set(&self) -> JournalResult<u64> {
        self.decode_reply("get_minimum_set", &[], |d| d.u64("minimum_set"))
    }

    /// cls `get_active_set`: the set being written. Sets below it are final.
    pub fn active_set(&self) -> JournalResult<u64> {
        self.decode_reply("get_active_set", &[], |d| d.u64("active_set"))
    }

    /// Minimum and active set in one round trip (the header's omap keys,
    /// which is what the two cls methods read).
    pub fn object_sets(&self) -> JournalResult<(u64, u64)> {
        let vals = self
            .header_io
            .omap_get_vals_by_keys(&self.header_oid(), &["minimum_set", "active_set"])?;
        let get = |k: &'static str| -> JournalResult<u64> {
            let v = vals
                .get(k)
                .ok_or_else(|| self.bad(format!("no {k} in the header")))?;
            let mut d = Decoder::new(v);
            let n = d.u64(k).and_then(|n| d.finish(k).map(|()| n));
            n.map_err(|source| self.decode_error(k, source))
        };
        Ok((get("minimum_set")?, get("active_set")?))
    }

    /// cls `get_client`: client `id`, `None` when it is not registered;
    /// `NotFound` when the journal itself is gone.
    pub fn client(&self, id: &str) -> JournalResult<Option<Client>> {
        let mut e = Encoder::new();
        e.string(id);
        match self.decode_reply("get_client", &e.into_bytes(), Client::decode) {
            Ok(c) => Ok(Some(c)),
            Err(JournalError::Ceph(e)) if e.is_not_found() => self.header_exists().map(|()| None),
            Err(e) => Err(e),
        }
    }

    /// cls `client_list`, every page: all registered clients, by id.
    pub fn clients(&self) -> JournalResult<Vec<Client>> {
        let mut out: Vec<Client> = Vec::new();
        loop {
            let mut e = Encoder::new();
            e.string(out.last().map_or("", |c| c.id.as_str())).u64(PAGE);
            let page = self.decode_reply("client_list", &e.into_bytes(), |d| {
                d.list(1, "clients", Client::decode)
            })?;
            let n = page.len();
            out.extend(page);
            if (n as u64) < PAGE {
                return Ok(out);
            }
        }
    }

    /// cls `get_tag`: tag `tid`, `None` when it does not exist (or expired);
    /// `NotFound` when the journal itself is gone.
    pub fn tag(&self, tid: u64) -> JournalResult<Option<Tag>> {
        let mut e = Encoder::new();
        e.u64(tid);
        match self.decode_reply("get_tag", &e.into_bytes(), Tag::decode) {
            Ok(t) => Ok(Some(t)),
            Err(JournalError::Ceph(e)) if e.is_not_found() => self.header_exists().map(|()| None),
            Err(e) => Err(e),
        }
    }

    /// cls `tag_list`, every page: the tags after `start_after` (of
    /// `tag_class` when given) that registered client `client_id` may still
    /// need, by tid. The client must be registered.
    pub fn tags(
        &self,
        client_id: &str,
        start_after: u64,
        tag_class: Option<u64>,
    ) -> JournalResult<Vec<Tag>> {
        let mut out: Vec<Tag> = Vec::new();
        let mut after = start_after;
        loop {
            let mut e = Encoder::new();
            e.u64(after).u64(PAGE).string(client_id).opt_u64(tag_class);
            let page = self.decode_reply("tag_list", &e.into_bytes(), |d| {
                d.list(1, "tags", Tag::decode)
            })?;
            let n = page.len();
            if let Some(t) = page.last() {
                after = t.tid;
            }
            out.extend(page);
            if (n as u64) < PAGE {
                return Ok(out);
            }
        }
    }

    /// cls `client_register`: registers client `id` with `data`, then
    /// notifies the header's watchers (librbd's journal reloads its client
    /// list on that, so that its trimmer sees the new client at once). The
    /// new client starts at the oldest commit position of the clients
    /// already there. `AlreadyExists` when `id` is registered.
    pub fn register_client(&self, id: &str, data: &ClientData) -> JournalResult<()> {
        self.register_client_raw(id, &data.encode())
    }

    /// Registers client `id` with `data` unless it is registered already,
    /// as rbd-mirror does for its peer client: returns the client as the
    /// header holds it (a new one at the oldest position of the connected
    /// clients; an existing one with its own data, position and state,
    /// which the caller checks).
    pub fn register_or_reuse(&self, id: &str, data: &ClientData) -> JournalResult<Client> {
        match self.register_client(id, data) {
            Ok(()) => {}
            Err(JournalError::Ceph(e)) if e.kind() == ceph::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        self.client(id)?
            .ok_or_else(|| self.bad(format!("client {id} vanished after registering")))
    }

    /// [`Journal::register_client`] with data as given, which librbd and
    /// rbd-mirror must be able to decode as [`ClientData`] (`rbd mirror
    /// image disable` fails on a client whose data does not decode).
    pub fn register_client_raw(&self, id: &str, data: &[u8]) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.string(id).bytes(data);
        self.update("client_register", &e.into_bytes())
    }

    /// cls `client_update_data`: replaces client `id`'s data; notifies.
    pub fn update_client_data(&self, id: &str, data: &ClientData) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.string(id).bytes(&data.encode());
        self.update("client_update_data", &e.into_bytes())
    }

    /// cls `client_commit`: records client `id`'s position (at most one
    /// per splay offset, newest first); notifies.
    pub fn commit(&self, id: &str, position: &ObjectSetPosition) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.string(id);
        position.encode(&mut e);
        self.update("client_commit", &e.into_bytes())
    }

    /// cls `client_unregister`: removes client `id` (and expires the tags
    /// only it pinned); notifies. `NotFound` when it is not registered.
    pub fn unregister_client(&self, id: &str) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.string(id);
        self.update("client_unregister", &e.into_bytes())
    }

    /// cls `client_update_state` to disconnected, as librbd does to a client
    /// too far behind (`rbd journal client disconnect`): trimming no longer
    /// waits for it, and its owner must resync.
    pub fn disconnect_client(&self, id: &str) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.string(id);
        e.u8(1);
        self.update("client_update_state", &e.into_bytes())
    }

    /// cls `get_next_tag_tid`: the tid the next tag will get.
    pub fn next_tag_tid(&self) -> JournalResult<u64> {
        self.decode_reply("get_next_tag_tid", &[], |d| d.u64("next_tag_tid"))
    }

    /// cls `tag_create` of a tag of `tag_class` holding `data` (librbd's
    /// [`super::TagData`]) with the next tid, retried while another writer
    /// takes that tid first (`ESTALE`), as libjournal's `allocate_tag`
    /// does; notifies. Returns the tag.
    pub fn create_tag(&self, tag_class: u64, data: &[u8]) -> JournalResult<Tag> {
        let mut tries = 0;
        loop {
            let tid = self.next_tag_tid()?;
            let mut e = Encoder::new();
            e.u64(tid).u64(tag_class).bytes(data);
            match self.update("tag_create", &e.into_bytes()) {
                Ok(()) => {
                    return Ok(Tag {
                        tid,
                        tag_class,
                        data: data.to_vec(),
                    });
                }
                Err(JournalError::Ceph(e)) if e.errno() == libc::ESTALE && tries < 16 => {
                    tries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Appends the framed `entry` ([`super::entry::encode_entry`]) to data
    /// object `object_number` with cls `append` (Octopus and later; it
    /// pads as librbd's own appends are padded), as libjournal's recorder
    /// appends. The object's soft size limit is not enforced: one entry may
    /// go past it, as a recorder's last append does.
    pub fn append_entry(&self, object_number: u64, entry: &[u8]) -> JournalResult<()> {
        let mut e = Encoder::new();
        e.u64(u64::MAX).bytes(entry);
        self.data_io.exec(
            &self.object_oid(object_number),
            "journal",
            "append",
            &e.into_bytes(),
            0,
        )?;
        Ok(())
    }

    /// Trims as librbd's `JournalTrimmer` does: finds the oldest object set
    /// any connected client still needs (the lowest set among its commit
    /// positions; `minimum_set` when one has committed nothing), removes
    /// the data objects of the sets below it, then moves `minimum_set` up
    /// (cls `set_minimum_set`, which notifies). Disconnected clients pin
    /// nothing. Returns the minimum set after the call. Another trimmer
    /// (librbd's) racing this one is fine: missing objects are skipped and
    /// a minimum set already past ours (`ESTALE`) is left as it is.
    pub fn trim(&self) -> JournalResult<u64> {
        let (minimum_set, active_set) = self.object_sets()?;
        let width = u64::from(self.layout.splay_width);
        let mut keep = active_set;
        for c in self.clients()? {
            if c.state == super::types::ClientState::Disconnected {
                continue;
            }
            if c.commit_position.positions.is_empty() {
                keep = minimum_set;
                break;
            }
            for p in &c.commit_position.positions {
                keep = keep.min(p.object_number / width);
            }
        }
        if keep <= minimum_set {
            return Ok(minimum_set);
        }
        for set in minimum_set..keep {
            for offset in 0..width {
                match self.data_io.remove(&self.object_oid(set * width + offset)) {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let mut e = Encoder::new();
        e.u64(keep);
        match self.update("set_minimum_set", &e.into_bytes()) {
            Ok(()) => {}
            Err(JournalError::Ceph(e)) if e.errno() == libc::ESTALE => {}
            Err(e) => return Err(e),
        }
        tracing::debug!(journal = %self.image_id, from = minimum_set, to = keep, "journal trimmed");
        Ok(keep)
    }

    /// The size of data object `object_number`; `None` when it does not
    /// exist (not written yet, or trimmed).
    pub fn data_object_size(&self, object_number: u64) -> JournalResult<Option<u64>> {
        match self.data_io.stat(&self.object_oid(object_number)) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads data object `object_number` from `offset`, at most `max_len`
    /// bytes, in reads of at most the object size. `None` when the object
    /// does not exist (not written yet, or trimmed).
    pub fn read_object(
        &self,
        object_number: u64,
        offset: u64,
        max_len: usize,
    ) -> JournalResult<Option<Vec<u8>>> {
        let oid = self.object_oid(object_number);
        let chunk = (self.layout.object_size() as usize).min(max_len).max(1);
        let mut out = Vec::new();
        loop {
            let want = chunk.min(max_len - out.len());
            if want == 0 {
                return Ok(Some(out));
            }
            let at = out.len();
            // Not zeroed first: an idle replica reads at the end of its
            // objects, where a read of `max_len` finds nothing.
            let part = match self.data_io.read_to_vec(&oid, offset + at as u64, want) {
                Ok(p) => p,
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let n = part.len();
            if out.is_empty() {
                out = part;
            } else {
                out.extend_from_slice(&part);
            }
            if n < want {
                return Ok(Some(out));
            }
        }
    }

    /// Reads every entry of the journal still on RADOS (sets from the
    /// minimum to the active one, every splay offset), ordered by tag and
    /// entry number; a duplicate (tag, entry) keeps the copy read last, as
    /// librbd's player does. For inspection and tests: a replayer reads
    /// incrementally instead. An entry still being written at the end of an
    /// object is left out; bytes that are not entries are an error.
    pub fn read_all(&self) -> JournalResult<Vec<RecordedEntry>> {
        let (min, active) = self.object_sets()?;
        let width = u64::from(self.layout.splay_width);
        let max = 2 * self.layout.object_size() as usize;
        let mut out = std::collections::BTreeMap::new();
        for set in min..=active {
            for offset in 0..width {
                let object_number = set * width + offset;
                let Some(buf) = self.read_object(object_number, 0, max)? else {
                    continue;
                };
                let scan = scan_object(&buf, 0, self.layout.object_size());
                if let ScanEnd::Corrupt(e) = scan.end {
                    return Err(JournalError::Corrupt {
                        object: self.object_oid(object_number),
                        source: e,
                    });
                }
                for e in scan.entries {
                    out.insert(
                        (e.tag_tid, e.entry_tid),
                        RecordedEntry {
                            object_number,
                            offset: e.offset,
                            tag_tid: e.tag_tid,
                            entry_tid: e.entry_tid,
                            payload: e.payload.to_vec(),
                        },
                    );
                }
            }
        }
        Ok(out.into_values().collect())
    }

    /// `NotFound` unless the header exists: cls methods answer `ENOENT`
    /// both for a missing key and for a missing object.
    fn header_exists(&self) -> JournalResult<()> {
        self.header_io
            .omap_get_vals_by_keys(&self.header_oid(), &["order"])?;
        Ok(())
    }

    fn update(&self, method: &'static str, input: &[u8]) -> JournalResult<()> {
        self.header_io
            .exec(&self.header_oid(), "journal", method, input, 0)?;
        self.header_io.notify(&self.header_oid(), NOTIFY_TIMEOUT)?;
        Ok(())
    }

    fn call_u8(&self, method: &'static str) -> JournalResult<u8> {
        self.decode_reply(method, &[], |d| d.u8(method))
    }

    /// Calls cls `journal.method` on the header and decodes the whole reply.
    fn decode_reply<T>(
        &self,
        method: &'static str,
        input: &[u8],
        f: impl FnOnce(&mut Decoder<'_>) -> Result<T, DecodeError>,
    ) -> JournalResult<T> {
        let reply = self.exec(method, input)?;
        let mut d = Decoder::new(&reply);
        let v = f(&mut d).map_err(|s| self.decode_error(method, s))?;
        d.finish(method).map_err(|s| self.decode_error(method, s))?;
        Ok(v)
    }

    fn exec(&self, method: &'static str, input: &[u8]) -> JournalResult<Vec<u8>> {
        let oid = self.header_oid();
        let mut size = FIRST_REPLY;
        loop {
            match self.header_io.exec(&oid, "journal", method, input, size) {
                Err(e) if e.errno() == libc::ERANGE && size < MAX_REPLY => size *= 4,
                r => return Ok(r?),
            }
        }
    }

    fn decode_error(&self, what: &'static str, source: DecodeError) -> JournalError {
        JournalError::Decode {
            journal: self.image_id.clone(),
            what,
            source,
        }
    }

    /// A header error of this journal: `what` is wrong with it.
    pub fn bad(&self, what: String) -> JournalError {
        JournalError::BadHeader {
            journal: self.image_id.clone(),
            what,
        }
    }
}
