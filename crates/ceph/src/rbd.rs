//! librbd: images (create, open, stat, features, resize), snapshots,
//! metadata, `diff_iterate2`, exclusive locks, watchers, trash, and the pool's
//! mirror peer list.
//!
//! An [`Image`] is a cheap clone of an `Arc` over the librbd handle; the
//! handle holds an `Arc<IoCtx>` so the ioctx outlives it, and in-flight aio
//! (see [`super::aio`]) holds the handle so it cannot be closed under them.

use std::collections::BTreeMap;
use std::ffi::{CStr, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::Arc;

use zeroize::{Zeroize, Zeroizing};

use super::error::{Error, ErrorKind, Result, check};
use super::rados::{IoCtx, cstring};
use csirr_ceph_sys as sys;

/// Image feature bits (`rbd/features.h`).
pub mod features {
    /// layering (clones).
    pub const LAYERING: u64 = 1 << 0;
    /// striping v2.
    pub const STRIPINGV2: u64 = 1 << 1;
    /// exclusive-lock.
    pub const EXCLUSIVE_LOCK: u64 = 1 << 2;
    /// object-map.
    pub const OBJECT_MAP: u64 = 1 << 3;
    /// fast-diff.
    pub const FAST_DIFF: u64 = 1 << 4;
    /// deep-flatten.
    pub const DEEP_FLATTEN: u64 = 1 << 5;
    /// journaling.
    pub const JOURNALING: u64 = 1 << 6;
    /// data-pool.
    pub const DATA_POOL: u64 = 1 << 7;
    /// Features that can only be set at creation time.
    pub const CREATE_ONLY: u64 = LAYERING | STRIPINGV2 | DATA_POOL;
}

/// Options for [`create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Feature bits; `None` uses the cluster default.
    pub features: Option<u64>,
    /// Object size order (22 = 4 MiB); `None` uses the default.
    pub order: Option<u64>,
    /// Stripe unit and count when striping v2 is used.
    pub stripe: Option<(u64, u64)>,
    /// Data pool name for images whose data lives in another pool.
    pub data_pool: Option<String>,
}

struct ImageOptions(sys::rbd_image_options_t);

impl ImageOptions {
    fn new() -> Self {
        let mut raw: sys::rbd_image_options_t = ptr::null_mut();
        // SAFETY: raw is a valid out-pointer; librbd allocates the options.
        unsafe { sys::rbd_image_options_create(&mut raw) };
        Self(raw)
    }

    fn set_u64(&mut self, opt: u32, v: u64) -> Result<()> {
        // SAFETY: self.0 is a live options handle.
        let ret = unsafe { sys::rbd_image_options_set_uint64(self.0, opt as c_int, v) };
        check(ret, "rbd_image_options_set_uint64", || opt.to_string()).map(|_| ())
    }

    fn set_str(&mut self, opt: u32, v: &str) -> Result<()> {
        let c = cstring(v, "rbd_image_options_set_string")?;
        // SAFETY: self.0 is live; c is NUL-terminated and copied by librbd.
        let ret = unsafe { sys::rbd_image_options_set_string(self.0, opt as c_int, c.as_ptr()) };
        check(ret, "rbd_image_options_set_string", || v.to_string()).map(|_| ())
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { sys::rbd_image_options_destroy(self.0) };
    }
}

/// Creates image `name` of `size` bytes. Blocking.
pub fn create(io: &IoCtx, name: &str, size: u64, opts: &CreateOptions) -> Result<()> {
    let c = cstring(name, "rbd_create4")?;
    let mut o = ImageOptions::new();
    o.set_u64(sys::RBD_IMAGE_OPTION_FORMAT, 2)?;
    if let Some(f) = opts.features {
        o.set_u64(sys::RBD_IMAGE_OPTION_FEATURES, f)?;
    }
    if let Some(order) = opts.order {
        o.set_u64(sys::RBD_IMAGE_OPTION_ORDER, order)?;
    }
    if let Some((unit, count)) = opts.stripe {
        o.set_u64(sys::RBD_IMAGE_OPTION_STRIPE_UNIT, unit)?;
        o.set_u64(sys::RBD_IMAGE_OPTION_STRIPE_COUNT, count)?;
    }
    if let Some(dp) = &opts.data_pool {
        o.set_str(sys::RBD_IMAGE_OPTION_DATA_POOL, dp)?;
    }
    // SAFETY: ioctx and options are live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_create4(io.raw(), c.as_ptr(), size, o.0) };
    check(ret, "rbd_create4", || format!("{}/{name}", io.spec())).map(|_| ())
}

/// Creates image `name` in `io` as a clone of `parent_name@parent_snap` in
/// `parent_io` (`rbd clone`), in clone format 2: the parent snapshot needs
/// no protection (whatever `rbd_default_clone_format` and the cluster's
/// minimum client release say) and stays removable (librbd moves it to the
/// trash namespace while clones hang off it). `opts` sets the child's
/// features, order and striping; its size is the parent snapshot's.
/// Blocking.
pub fn clone(
    parent_io: &IoCtx,
    parent_name: &str,
    parent_snap: &str,
    io: &IoCtx,
    name: &str,
    opts: &CreateOptions,
) -> Result<()> {
    let pn = cstring(parent_name, "rbd_clone3")?;
    let ps = cstring(parent_snap, "rbd_clone3")?;
    let c = cstring(name, "rbd_clone3")?;
    let mut o = ImageOptions::new();
    o.set_u64(sys::RBD_IMAGE_OPTION_FORMAT, 2)?;
    o.set_u64(sys::RBD_IMAGE_OPTION_CLONE_FORMAT, 2)?;
    if let Some(f) = opts.features {
        o.set_u64(sys::RBD_IMAGE_OPTION_FEATURES, f | features::LAYERING)?;
    }
    if let Some(order) = opts.order {
        o.set_u64(sys::RBD_IMAGE_OPTION_ORDER, order)?;
    }
    if let Some((unit, count)) = opts.stripe {
        o.set_u64(sys::RBD_IMAGE_OPTION_STRIPE_UNIT, unit)?;
        o.set_u64(sys::RBD_IMAGE_OPTION_STRIPE_COUNT, count)?;
    }
    if let Some(dp) = &opts.data_pool {
        o.set_str(sys::RBD_IMAGE_OPTION_DATA_POOL, dp)?;
    }
    // SAFETY: both ioctxs and the options handle are live for the call (the
    // borrows and `o` outlive it); the three names are NUL-terminated
    // CStrings owned by this frame, which librbd only reads during the call.
    let ret = unsafe {
        sys::rbd_clone3(
            parent_io.raw(),
            pn.as_ptr(),
            ps.as_ptr(),
            io.raw(),
            c.as_ptr(),
            o.0,
        )
    };
    check(ret, "rbd_clone3", || {
        format!(
            "{}/{name} from {}/{parent_name}@{parent_snap}",
            io.spec(),
            parent_io.spec()
        )
    })
    .map(|_| ())
}

/// `rbd migration prepare`: makes `dest_name` in `dest_io` the destination of
/// a live-migration of image `name` in `io` (the source goes to the trash;
/// its snapshots are linked by name; the destination reads through to it),
/// with the source's layout. librbd refuses a source that any client has
/// open (`Busy`). Blocking.
pub fn migration_prepare(io: &IoCtx, name: &str, dest_io: &IoCtx, dest_name: &str) -> Result<()> {
    let c = cstring(name, "rbd_migration_prepare")?;
    let d = cstring(dest_name, "rbd_migration_prepare")?;
    let o = ImageOptions::new();
    let (src, dst) = (io.raw(), dest_io.raw());
    // SAFETY: both ioctxs and the options are live; c and d are
    // NUL-terminated and outlive the call.
    let ret = unsafe { sys::rbd_migration_prepare(src, c.as_ptr(), dst, d.as_ptr(), o.0) };
    check(ret, "rbd_migration_prepare", || {
        format!("{}/{name} -> {}/{dest_name}", io.spec(), dest_io.spec())
    })
    .map(|_| ())
}

/// `rbd migration execute` of the destination `name` in `io`: copies every
/// object of the source into it. Blocking (as long as the copy).
pub fn migration_execute(io: &IoCtx, name: &str) -> Result<()> {
    let c = cstring(name, "rbd_migration_execute")?;
    // SAFETY: the ioctx is live and c is NUL-terminated.
    let ret = unsafe { sys::rbd_migration_execute(io.raw(), c.as_ptr()) };
    check(ret, "rbd_migration_execute", || {
        format!("{}/{name}", io.spec())
    })
    .map(|_| ())
}

/// `rbd migration commit` of the executed destination `name` in `io`:
/// removes the source. Blocking.
pub fn migration_commit(io: &IoCtx, name: &str) -> Result<()> {
    let c = cstring(name, "rbd_migration_commit")?;
    // SAFETY: the ioctx is live and c is NUL-terminated.
    let ret = unsafe { sys::rbd_migration_commit(io.raw(), c.as_ptr()) };
    check(ret, "rbd_migration_commit", || {
        format!("{}/{name}", io.spec())
    })
    .map(|_| ())
}

/// A live-migration (`rbd migration prepare|execute|commit|abort`) an image
/// takes part in, as `rbd status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationStatus {
    /// The source image's pool id, namespace, name and id.
    pub source_pool_id: i64,
    /// See `source_pool_id`.
    pub source_namespace: String,
    /// See `source_pool_id`.
    pub source_name: String,
    /// See `source_pool_id`.
    pub source_id: String,
    /// The destination image's pool id, namespace, name and id.
    pub dest_pool_id: i64,
    /// See `dest_pool_id`.
    pub dest_namespace: String,
    /// See `dest_pool_id`.
    pub dest_name: String,
    /// See `dest_pool_id`.
    pub dest_id: String,
    /// `preparing`, `prepared`, `executing`, `executed`, `aborting`,
    /// `error` or `unknown`.
    pub state: &'static str,
    /// librbd's description of the state (errors).
    pub description: String,
}

/// The live-migration image `name` of `io` takes part in (as source or
/// destination), `None` when it is in none. Blocking.
pub fn migration_status(io: &IoCtx, name: &str) -> Result<Option<MigrationStatus>> {
    let c = cstring(name, "rbd_migration_status")?;
    // SAFETY: the struct is plain C data (integers, pointers, an enum whose
    // zero is a valid variant) for which all-zero is valid; librbd fills it.
    let mut st: sys::rbd_image_migration_status_t = unsafe { std::mem::zeroed() };
    // SAFETY: the ioctx is live, c is NUL-terminated, st is a valid
    // out-pointer of exactly the size passed.
    let ret = unsafe {
        sys::rbd_migration_status(
            io.raw(),
            c.as_ptr(),
            &mut st,
            std::mem::size_of::<sys::rbd_image_migration_status_t>(),
        )
    };
    match check(ret, "rbd_migration_status", || {
        format!("{}/{name}", io.spec())
    }) {
        Ok(_) => {}
        // Not migrating: librbd finds no migration header.
        Err(e) if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound) => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    }
    let state = match st.state {
        sys::RBD_IMAGE_MIGRATION_STATE_ERROR => "error",
        sys::RBD_IMAGE_MIGRATION_STATE_PREPARING => "preparing",
        sys::RBD_IMAGE_MIGRATION_STATE_PREPARED => "prepared",
        sys::RBD_IMAGE_MIGRATION_STATE_EXECUTING => "executing",
        sys::RBD_IMAGE_MIGRATION_STATE_EXECUTED => "executed",
        sys::RBD_IMAGE_MIGRATION_STATE_ABORTING => "aborting",
        _ => "unknown",
    };
    // SAFETY: on success librbd set every string field to a NUL-terminated
    // string it owns until rbd_migration_status_cleanup below.
    let out = unsafe {
        MigrationStatus {
            source_pool_id: st.source_pool_id,
            source_namespace: lossy(st.source_pool_namespace),
            source_name: lossy(st.source_image_name),
            source_id: lossy(st.source_image_id),
            dest_pool_id: st.dest_pool_id,
            dest_namespace: lossy(st.dest_pool_namespace),
            dest_name: lossy(st.dest_image_name),
            dest_id: lossy(st.dest_image_id),
            state,
            description: lossy(st.state_description),
        }
    };
    // SAFETY: frees exactly what rbd_migration_status allocated, once.
    unsafe { sys::rbd_migration_status_cleanup(&mut st) };
    Ok(Some(out))
}

/// Where a clone reads through to: its parent image and snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentSpec {
    /// The parent's pool name.
    pub pool: String,
    /// The parent's RADOS namespace ("" for the default one).
    pub namespace: String,
    /// The parent image's name.
    pub image_name: String,
    /// The parent image's id.
    pub image_id: String,
    /// The parent snapshot's name.
    pub snap_name: String,
    /// The parent snapshot's id.
    pub snap_id: u64,
    /// The parent snapshot is a user snapshot (not one moved to the trash
    /// namespace after its removal, nor a group or mirror snapshot).
    pub user_snap: bool,
}

impl std::fmt::Display for ParentSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}@{}", self.pool, self.image_name, self.snap_name)
        } else {
            write!(
                f,
                "{}/{}/{}@{}",
                self.pool, self.namespace, self.image_name, self.snap_name
            )
        }
    }
}

/// One image of a pool/namespace listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// librbd image id.
    pub id: String,
    /// Image name.
    pub name: String,
}

/// Lists the images of the ioctx's pool and namespace. Blocking.
pub fn list(io: &IoCtx) -> Result<Vec<ImageSpec>> {
    let mut max: usize = 64;
    loop {
        let mut specs: Vec<sys::rbd_image_spec_t> = Vec::with_capacity(max);
        let mut n = max;
        // SAFETY: specs has room for n entries; librbd fills at most n and
        // sets n to the count (or the size needed, with -ERANGE).
        let ret = unsafe { sys::rbd_list2(io.raw(), specs.as_mut_ptr(), &mut n) };
        if ret == -libc::ERANGE {
            max = n.max(max * 2);
            continue;
        }
        check(ret, "rbd_list2", || io.spec())?;
        // SAFETY: librbd initialised the first n entries.
        unsafe { specs.set_len(n) };
        let out = specs
            .iter()
            .map(|s| ImageSpec {
                // SAFETY: librbd set both to NUL-terminated strings it owns
                // until rbd_image_spec_list_cleanup below.
                id: unsafe { lossy(s.id) },
                // SAFETY: as above.
                name: unsafe { lossy(s.name) },
            })
            .collect();
        // SAFETY: frees the strings of exactly the n entries librbd filled.
        unsafe { sys::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
        return Ok(out);
    }
}

/// Moves image `name` to the RBD trash (recoverable with `rbd trash restore`).
pub fn trash_move(io: &IoCtx, name: &str, delay_secs: u64) -> Result<()> {
    let c = cstring(name, "rbd_trash_move")?;
    // SAFETY: ioctx is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_trash_move(io.raw(), c.as_ptr(), delay_secs) };
    check(ret, "rbd_trash_move", || format!("{}/{name}", io.spec())).map(|_| ())
}

/// Removes image `name` for good.
pub fn remove(io: &IoCtx, name: &str) -> Result<()> {
    let c = cstring(name, "rbd_remove")?;
    // SAFETY: ioctx is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_remove(io.raw(), c.as_ptr()) };
    check(ret, "rbd_remove", || format!("{}/{name}", io.spec())).map(|_| ())
}

/// Lists the RBD namespaces of the ioctx's pool.
pub fn namespace_list(io: &IoCtx) -> Result<Vec<String>> {
    nul_list(
        "rbd_namespace_list",
        || io.pool().to_string(),
        |buf, n| {
            // SAFETY: buf is writable for *n bytes; librbd sets *n to the needed
            // size on -ERANGE.
            unsafe { sys::rbd_namespace_list(io.raw(), buf, n) }
        },
    )
}

/// Calls a librbd list function that fills a buffer with NUL-terminated
/// names (`f(buf, &mut size)`, `-ERANGE` with the needed size when the
/// buffer is too small), growing the buffer until it fits.
pub(crate) fn nul_list(
    op: &'static str,
    target: impl Fn() -> String,
    mut f: impl FnMut(*mut c_char, &mut usize) -> c_int,
) -> Result<Vec<String>> {
    let mut len: usize = 1024;
    loop {
        let mut buf = vec![0u8; len];
        let mut n = len;
        let ret = f(buf.as_mut_ptr().cast(), &mut n);
        if ret == -libc::ERANGE {
            len = n.max(len * 2);
            continue;
        }
        check(ret, op, &target)?;
        return Ok(buf[..n.min(len)]
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect());
    }
}

/// A mirror peer of a pool, as `rbd mirror pool peer add/bootstrap` records it.
#[derive(Debug, Clone)]
pub struct MirrorPeer {
    /// Peer uuid (key of its attributes).
    pub uuid: String,
    /// The peer's site name (its cluster name for `rbd --cluster`).
    pub site_name: String,
    /// Cephx client the peer is reached as, e.g. `client.rbd-mirror-peer`.
    pub client_name: String,
    /// rx-only, tx-only or rx-tx.
    pub direction: u32,
}

/// Lists the mirror peers of the ioctx's pool.
pub fn mirror_peer_list(io: &IoCtx) -> Result<Vec<MirrorPeer>> {
    let mut max: c_int = 8;
    loop {
        let mut peers: Vec<sys::rbd_mirror_peer_site_t> =
            // SAFETY: plain data (pointers and ints): all-zero is valid.
            vec![unsafe { std::mem::zeroed() }; max as usize];
        let mut n = max;
        // SAFETY: peers has room for n entries.
        let ret = unsafe { sys::rbd_mirror_peer_site_list(io.raw(), peers.as_mut_ptr(), &mut n) };
        if ret == -libc::ERANGE {
            max = n.max(max * 2);
            continue;
        }
        check(ret, "rbd_mirror_peer_site_list", || io.pool().to_string())?;
        let out = peers[..n as usize]
            .iter()
            .map(|p| MirrorPeer {
                // SAFETY: librbd set these to NUL-terminated strings it owns
                // until rbd_mirror_peer_site_list_cleanup below.
                uuid: unsafe { lossy(p.uuid) },
                // SAFETY: as above.
                site_name: unsafe { lossy(p.site_name) },
                // SAFETY: as above.
                client_name: unsafe { lossy(p.client_name) },
                direction: p.direction,
            })
            .collect();
        // SAFETY: frees exactly the n entries librbd filled.
        unsafe { sys::rbd_mirror_peer_site_list_cleanup(peers.as_mut_ptr(), n) };
        return Ok(out);
    }
}

/// A mirror peer's attributes (`mon_host`, `key`): the key is a secret, so
/// there is no `Debug`, and the values are wiped on drop.
pub struct PeerAttributes(BTreeMap<String, String>);

impl PeerAttributes {
    /// The value of attribute `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

impl Drop for PeerAttributes {
    fn drop(&mut self) {
        for value in self.0.values_mut() {
            value.zeroize();
        }
    }
}

/// Reads a mirror peer's attributes (`mon_host`, `key`). The key is a secret:
/// never log the result. The buffers librbd filled are wiped too.
pub fn mirror_peer_attributes(io: &IoCtx, uuid: &str) -> Result<PeerAttributes> {
    let u = cstring(uuid, "rbd_mirror_peer_site_get_attributes")?;
    let (mut klen, mut vlen) = (1024usize, 4096usize);
    loop {
        let mut keys = vec![0u8; klen];
        let mut vals = Zeroizing::new(vec![0u8; vlen]);
        let mut count = 0usize;
        let (mut kl, mut vl) = (klen, vlen);
        // SAFETY: keys/vals are writable for kl/vl bytes; librbd sets the
        // needed sizes on -ERANGE.
        let ret = unsafe {
            sys::rbd_mirror_peer_site_get_attributes(
                io.raw(),
                u.as_ptr(),
                keys.as_mut_ptr().cast(),
                &mut kl,
                vals.as_mut_ptr().cast(),
                &mut vl,
                &mut count,
            )
        };
        if ret == -libc::ERANGE {
            klen = kl.max(klen * 2);
            vlen = vl.max(vlen * 2);
            continue;
        }
        check(ret, "rbd_mirror_peer_site_get_attributes", || {
            format!("{} peer {uuid}", io.pool())
        })?;
        let split = |b: &[u8]| -> Vec<String> {
            b.split(|c| *c == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        };
        let ks = split(&keys[..kl.min(klen)]);
        // Every value copy is wiped: those not kept when `vs` drops, those
        // kept when the attributes drop.
        let mut vs: Vec<Zeroizing<String>> = split(&vals[..vl.min(vlen)])
            .into_iter()
            .map(Zeroizing::new)
            .collect();
        let mut attrs = PeerAttributes(BTreeMap::new());
        for (k, v) in ks.into_iter().zip(vs.iter_mut()).take(count) {
            if !k.is_empty()
                && let Some(mut old) = attrs.0.insert(k, std::mem::take(&mut **v))
            {
                old.zeroize();
            }
        }
        return Ok(attrs);
    }
}

/// A progress callback that ignores progress. librbd's `*2`/`*_with_progress`
/// calls invoke the callback unconditionally (its `CProgressContext` does not
/// check for NULL), so passing none crashes as soon as progress is reported.
extern "C" fn no_progress(_offset: u64, _total: u64, _arg: *mut c_void) -> c_int {
    0
}

/// Copies a C string owned by librbd into a `String`.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string valid for the call.
// SAFETY: callers pass null or a live NUL-terminated string (see # Safety).
pub(crate) unsafe fn lossy(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: guaranteed by the caller.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Size and layout of an image (`rbd_stat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageInfo {
    /// Size in bytes.
    pub size: u64,
    /// Object size in bytes.
    pub obj_size: u64,
    /// Number of objects.
    pub num_objs: u64,
    /// log2 of the object size.
    pub order: i32,
}

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapInfo {
    /// Snapshot id.
    pub id: u64,
    /// Image size at the snapshot.
    pub size: u64,
    /// Snapshot name.
    pub name: String,
}

/// Lock modes of [`Image::lock_acquire`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Exclusive: other clients' writes fail with `EROFS` while held.
    Exclusive,
}

/// A client that has the image open (a header watcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    /// Client address, e.g. `127.0.0.1:0/123456`.
    pub addr: String,
    /// Global client id (`client.<id>`).
    pub id: i64,
}

pub(crate) struct ImageHandle {
    raw: NonNull<c_void>,
    io: Arc<IoCtx>,
    name: String,
}

// librbd image handles are internally synchronised (ImageCtx owner and image
// locks); librbd documents and QEMU relies on issuing I/O and metadata calls
// on one handle from several threads. The handle is closed only in Drop.
// SAFETY: as above.
unsafe impl Send for ImageHandle {}
// SAFETY: see `Send`.
unsafe impl Sync for ImageHandle {}

impl ImageHandle {
    pub(crate) fn raw(&self) -> sys::rbd_image_t {
        self.raw.as_ptr()
    }

    pub(crate) fn name_for_aio(&self) -> String {
        format!("{}/{}", self.io.spec(), self.name)
    }
}

impl Drop for ImageHandle {
    fn drop(&mut self) {
        // Nothing useful can be done about a failed close: result ignored.
        // SAFETY: closed once; in-flight aio holds an Arc, so none is pending.
        unsafe { sys::rbd_close(self.raw()) };
    }
}

/// An open RBD image. Clones share the handle.
#[derive(Clone)]
pub struct Image {
    pub(crate) h: Arc<ImageHandle>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({})", self.spec())
    }
}

/// How to open an image.
enum OpenBy<'a> {
    Name(&'a str),
    Id(&'a str),
}

impl Image {
    fn open_impl(io: &Arc<IoCtx>, by: OpenBy<'_>, snap: Option<&str>, ro: bool) -> Result<Self> {
        let (what, op) = match by {
            OpenBy::Name(n) => (n, if ro { "rbd_open_read_only" } else { "rbd_open" }),
            OpenBy::Id(i) => (
                i,
                if ro {
                    "rbd_open_by_id_read_only"
                } else {
                    "rbd_open_by_id"
                },
            ),
        };
        let c = cstring(what, op)?;
        let s = snap.map(|s| cstring(s, op)).transpose()?;
        let sp = s.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut raw: sys::rbd_image_t = ptr::null_mut();
        // SAFETY: ioctx is live; c and sp are NUL-terminated or null; raw is a
        // valid out-pointer.
        let ret = unsafe {
            match (&by, ro) {
                (OpenBy::Name(_), false) => sys::rbd_open(io.raw(), c.as_ptr(), &mut raw, sp),
                (OpenBy::Name(_), true) => {
                    sys::rbd_open_read_only(io.raw(), c.as_ptr(), &mut raw, sp)
                }
                (OpenBy::Id(_), false) => sys::rbd_open_by_id(io.raw(), c.as_ptr(), &mut raw, sp),
                (OpenBy::Id(_), true) => {
                    sys::rbd_open_by_id_read_only(io.raw(), c.as_ptr(), &mut raw, sp)
                }
            }
        };
        check(ret, op, || format!("{}/{what}", io.spec()))?;
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::from_errno(libc::ENOMEM, op, what.to_string()))?;
        let mut img = Self {
            h: Arc::new(ImageHandle {
                raw,
                io: Arc::clone(io),
                name: what.to_string(),
            }),
        };
        if let OpenBy::Id(_) = by {
            let name = img.read_name()?;
            if let Some(h) = Arc::get_mut(&mut img.h) {
                h.name = name;
            }
        }
        Ok(img)
    }

    /// Opens image `name` read-write at its head. Blocking.
    pub fn open(io: &Arc<IoCtx>, name: &str) -> Result<Self> {
        Self::open_impl(io, OpenBy::Name(name), None, false)
    }

    /// Opens image `name` read-only, at snapshot `snap` or at its head.
    pub fn open_read_only(io: &Arc<IoCtx>, name: &str, snap: Option<&str>) -> Result<Self> {
        Self::open_impl(io, OpenBy::Name(name), snap, true)
    }

    /// Opens the image with librbd id `id` read-write.
    pub fn open_by_id(io: &Arc<IoCtx>, id: &str) -> Result<Self> {
        Self::open_impl(io, OpenBy::Id(id), None, false)
    }

    /// Opens the image with librbd id `id` read-only.
    pub fn open_by_id_read_only(io: &Arc<IoCtx>, id: &str, snap: Option<&str>) -> Result<Self> {
        Self::open_impl(io, OpenBy::Id(id), snap, true)
    }

    fn raw(&self) -> sys::rbd_image_t {
        self.h.raw()
    }

    fn target(&self) -> String {
        self.spec()
    }

    /// The ioctx the image was opened in.
    pub fn ioctx(&self) -> &Arc<IoCtx> {
        &self.h.io
    }

    /// Image name.
    pub fn name(&self) -> &str {
        &self.h.name
    }

    /// `pool[/namespace]/image`, for messages and logs.
    pub fn spec(&self) -> String {
        format!("{}/{}", self.h.io.spec(), self.h.name)
    }

    fn read_name(&self) -> Result<String> {
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            // SAFETY: buf is writable for n bytes; n is updated on -ERANGE.
            let ret = unsafe { sys::rbd_get_name(self.raw(), buf.as_mut_ptr().cast(), &mut n) };
            if ret == -libc::ERANGE {
                len = n.max(len * 2);
                continue;
            }
            check(ret, "rbd_get_name", || self.h.name.clone())?;
            return Ok(nul_terminated(&buf));
        }
    }

    /// The librbd image id.
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0u8; 128];
        // SAFETY: buf is writable for its length, which is passed.
        let ret = unsafe { sys::rbd_get_id(self.raw(), buf.as_mut_ptr().cast(), buf.len()) };
        check(ret, "rbd_get_id", || self.target())?;
        Ok(nul_terminated(&buf))
    }

    /// Size and layout.
    pub fn stat(&self) -> Result<ImageInfo> {
        // SAFETY: rbd_image_info_t is plain data; zero is a valid value.
        let mut info: sys::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid out-struct of the size passed.
        let ret = unsafe {
            sys::rbd_stat(
                self.raw(),
                &mut info,
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        };
        check(ret, "rbd_stat", || self.target())?;
        Ok(ImageInfo {
            size: info.size,
            obj_size: info.obj_size,
            num_objs: info.num_objs,
            order: info.order,
        })
    }

    /// Current size in bytes (of the head, or of the snapshot set).
    pub fn size(&self) -> Result<u64> {
        let mut s = 0u64;
        // SAFETY: s is a valid out-pointer.
        let ret = unsafe { sys::rbd_get_size(self.raw(), &mut s) };
        check(ret, "rbd_get_size", || self.target())?;
        Ok(s)
    }

    /// Feature bits (see [`features`]).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: f is a valid out-pointer.
        let ret = unsafe { sys::rbd_get_features(self.raw(), &mut f) };
        check(ret, "rbd_get_features", || self.target())?;
        Ok(f)
    }

    /// Bytes of the image (at the snapshot it was opened at) that read
    /// through to its parent: 0 without a parent.
    pub fn parent_overlap(&self) -> Result<u64> {
        let mut o = 0u64;
        // SAFETY: o is a valid out-pointer.
        let ret = unsafe { sys::rbd_get_overlap(self.raw(), &mut o) };
        match check(ret, "rbd_get_overlap", || self.target()) {
            Ok(_) => Ok(o),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The image's parent (at the snapshot it was opened at), `None` when
    /// it is not a clone (or was flattened).
    pub fn parent(&self) -> Result<Option<ParentSpec>> {
        // SAFETY: both structs are plain C data (integers, pointers, a bool)
        // for which all-zero is a valid value; librbd overwrites them.
        let mut img: sys::rbd_linked_image_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut snap: sys::rbd_snap_spec_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle is live; both are valid out-pointers that
        // librbd fills only on success (strings it allocates).
        let ret = unsafe { sys::rbd_get_parent(self.raw(), &mut img, &mut snap) };
        match check(ret, "rbd_get_parent", || self.target()) {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
        // SAFETY: on success librbd set every string field to a
        // NUL-terminated string it owns until the cleanups below.
        let out = unsafe {
            ParentSpec {
                pool: lossy(img.pool_name),
                namespace: lossy(img.pool_namespace),
                image_name: lossy(img.image_name),
                image_id: lossy(img.image_id),
                snap_name: lossy(snap.name),
                snap_id: snap.id,
                user_snap: snap.namespace_type == sys::RBD_SNAP_NAMESPACE_TYPE_USER,
            }
        };
        // SAFETY: frees exactly what rbd_get_parent allocated, once.
        unsafe {
            sys::rbd_linked_image_spec_cleanup(&mut img);
            sys::rbd_snap_spec_cleanup(&mut snap);
        }
        Ok(Some(out))
    }

    /// The prefix of the image's data object names, e.g.
    /// `rbd_data.10ab2ae8944a`.
    pub fn block_name_prefix(&self) -> Result<String> {
        let mut buf = vec![0u8; 64];
        // SAFETY: buf is writable for its length, which is passed.
        let ret = unsafe {
            sys::rbd_get_block_name_prefix(self.raw(), buf.as_mut_ptr().cast(), buf.len())
        };
        check(ret, "rbd_get_block_name_prefix", || self.target())?;
        Ok(nul_terminated(&buf))
    }

    /// The pool of the image's data objects, or -1 when it is the image's
    /// own pool.
    pub fn data_pool_id(&self) -> Result<i64> {
        // SAFETY: a live image handle; no pointers.
        let ret = unsafe { sys::rbd_get_data_pool_id(self.raw()) };
        if ret < -1 {
            let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
            return Err(Error::from_errno(
                errno,
                "rbd_get_data_pool_id",
                self.target(),
            ));
        }
        Ok(ret)
    }

    /// Stripe unit and count.
    pub fn stripe(&self) -> Result<(u64, u64)> {
        let (mut u, mut c) = (0u64, 0u64);
        // SAFETY: u and c are valid out-pointers.
        let ret = unsafe { sys::rbd_get_stripe_unit(self.raw(), &mut u) };
        check(ret, "rbd_get_stripe_unit", || self.target())?;
        // SAFETY: as above.
        let ret = unsafe { sys::rbd_get_stripe_count(self.raw(), &mut c) };
        check(ret, "rbd_get_stripe_count", || self.target())?;
        Ok((u, c))
    }

    /// Enables or disables features.
    pub fn update_features(&self, features: u64, enabled: bool) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_update_features(self.raw(), features, u8::from(enabled)) };
        check(ret, "rbd_update_features", || self.target()).map(|_| ())
    }

    /// Resizes the image (shrinking allowed).
    pub fn resize(&self, size: u64) -> Result<()> {
        let ret =
            // SAFETY: the handle is live; `no_progress` ignores its arguments.
            unsafe { sys::rbd_resize2(self.raw(), size, true, Some(no_progress), ptr::null_mut()) };
        check(ret, "rbd_resize2", || self.target()).map(|_| ())
    }

    /// Creates snapshot `name` without asking writers to quiesce.
    pub fn snap_create(&self, name: &str) -> Result<()> {
        let c = cstring(name, "rbd_snap_create2")?;
        // SAFETY: the handle is live; c is NUL-terminated; `no_progress`
        // ignores its arguments.
        let ret = unsafe {
            sys::rbd_snap_create2(
                self.raw(),
                c.as_ptr(),
                sys::RBD_SNAP_CREATE_SKIP_QUIESCE,
                Some(no_progress),
                ptr::null_mut(),
            )
        };
        check(ret, "rbd_snap_create2", || {
            format!("{}@{name}", self.target())
        })
        .map(|_| ())
    }

    /// Removes snapshot `name`.
    pub fn snap_remove(&self, name: &str) -> Result<()> {
        let c = cstring(name, "rbd_snap_remove")?;
        // SAFETY: the handle is live; c is NUL-terminated.
        let ret = unsafe { sys::rbd_snap_remove(self.raw(), c.as_ptr()) };
        check(ret, "rbd_snap_remove", || {
            format!("{}@{name}", self.target())
        })
        .map(|_| ())
    }

    /// Protects snapshot `name` (clones need it protected).
    pub fn snap_protect(&self, name: &str) -> Result<()> {
        self.snap_call(name, "rbd_snap_protect", sys::rbd_snap_protect)
    }

    /// Unprotects snapshot `name`.
    pub fn snap_unprotect(&self, name: &str) -> Result<()> {
        self.snap_call(name, "rbd_snap_unprotect", sys::rbd_snap_unprotect)
    }

    /// Rolls the head back to snapshot `name`. Blocking; as long as
    /// rewriting the image.
    pub fn snap_rollback(&self, name: &str) -> Result<()> {
        self.snap_call(name, "rbd_snap_rollback", sys::rbd_snap_rollback)
    }

    /// Renames snapshot `from` to `to`.
    pub fn snap_rename(&self, from: &str, to: &str) -> Result<()> {
        let f = cstring(from, "rbd_snap_rename")?;
        let t = cstring(to, "rbd_snap_rename")?;
        // SAFETY: the handle is live; f and t are NUL-terminated.
        let ret = unsafe { sys::rbd_snap_rename(self.raw(), f.as_ptr(), t.as_ptr()) };
        check(ret, "rbd_snap_rename", || {
            format!("{}@{from} -> {to}", self.target())
        })
        .map(|_| ())
    }

    /// Sets the most snapshots the image may have.
    pub fn snap_set_limit(&self, limit: u64) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_snap_set_limit(self.raw(), limit) };
        check(ret, "rbd_snap_set_limit", || self.target()).map(|_| ())
    }

    /// Calls a librbd `f(image, snap_name)`.
    fn snap_call(
        &self,
        name: &str,
        op: &'static str,
        // SAFETY: a function-pointer type: one of librbd's snapshot calls of
        // this signature on an open image.
        f: unsafe extern "C" fn(sys::rbd_image_t, *const c_char) -> c_int,
    ) -> Result<()> {
        let c = cstring(name, op)?;
        // SAFETY: the handle is live; c is NUL-terminated; `f` is one of
        // librbd's snapshot calls taking exactly these two arguments.
        let ret = unsafe { f(self.raw(), c.as_ptr()) };
        check(ret, op, || format!("{}@{name}", self.target())).map(|_| ())
    }

    /// Lists the user snapshots, oldest first.
    pub fn snap_list(&self) -> Result<Vec<SnapInfo>> {
        let mut max: c_int = 16;
        loop {
            let mut snaps: Vec<sys::rbd_snap_info_t> =
                // SAFETY: rbd_snap_info_t is plain data; zero is valid.
                vec![unsafe { std::mem::zeroed() }; max as usize + 1];
            let mut n = max;
            // SAFETY: snaps has room for max (+1 terminator) entries.
            let ret = unsafe { sys::rbd_snap_list(self.raw(), snaps.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            let count = check(ret, "rbd_snap_list", || self.target())? as usize;
            let out = snaps[..count]
                .iter()
                .map(|s| SnapInfo {
                    id: s.id,
                    size: s.size,
                    // SAFETY: librbd set name to a NUL-terminated string it
                    // owns until rbd_snap_list_end below.
                    name: unsafe { lossy(s.name) },
                })
                .collect();
            // SAFETY: frees the names of the entries librbd filled.
            unsafe { sys::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// Creation time of snapshot `id`, in seconds since the epoch.
    pub fn snap_timestamp(&self, id: u64) -> Result<i64> {
        let mut ts = sys::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer.
        let ret = unsafe { sys::rbd_snap_get_timestamp(self.raw(), id, &mut ts) };
        check(ret, "rbd_snap_get_timestamp", || self.target())?;
        Ok(ts.tv_sec)
    }

    /// Makes reads see snapshot `name` (or the head with `None`).
    pub fn snap_set(&self, name: Option<&str>) -> Result<()> {
        let c = name.map(|n| cstring(n, "rbd_snap_set")).transpose()?;
        let p = c.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: the handle is live; p is null or NUL-terminated.
        let ret = unsafe { sys::rbd_snap_set(self.raw(), p) };
        check(ret, "rbd_snap_set", || {
            format!("{}@{}", self.target(), name.unwrap_or("<head>"))
        })
        .map(|_| ())
    }

    /// Reads image metadata `key`; `None` when absent.
    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let k = cstring(key, "rbd_metadata_get")?;
        let mut len = 256usize;
        loop {
            let mut buf = vec![0u8; len];
            let mut n = len;
            // SAFETY: buf is writable for n bytes; n is updated on -ERANGE.
            let ret = unsafe {
                sys::rbd_metadata_get(self.raw(), k.as_ptr(), buf.as_mut_ptr().cast(), &mut n)
            };
            if ret == -libc::ERANGE {
                len = n.max(len * 2);
                continue;
            }
            if ret == -libc::ENOENT {
                return Ok(None);
            }
            check(ret, "rbd_metadata_get", || {
                format!("{} {key}", self.target())
            })?;
            return Ok(Some(nul_terminated(&buf[..n.min(len)])));
        }
    }

    /// Sets image metadata `key` to `value`.
    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let k = cstring(key, "rbd_metadata_set")?;
        let v = cstring(value, "rbd_metadata_set")?;
        // SAFETY: the handle is live; k and v are NUL-terminated.
        let ret = unsafe { sys::rbd_metadata_set(self.raw(), k.as_ptr(), v.as_ptr()) };
        check(ret, "rbd_metadata_set", || {
            format!("{} {key}", self.target())
        })
        .map(|_| ())
    }

    /// Removes image metadata `key` (absent is fine).
    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        let k = cstring(key, "rbd_metadata_remove")?;
        // SAFETY: the handle is live; k is NUL-terminated.
        let ret = unsafe { sys::rbd_metadata_remove(self.raw(), k.as_ptr()) };
        if ret == -libc::ENOENT {
            return Ok(());
        }
        check(ret, "rbd_metadata_remove", || {
            format!("{} {key}", self.target())
        })
        .map(|_| ())
    }

    /// Calls `f(offset, len, exists)` for every extent that differs between
    /// snapshot `from` (or nothing, for `None`) and the snapshot set on the
    /// handle (or the head), within `[ofs, ofs+len)`. `exists == false` means
    /// the extent became a hole (discarded). `whole_object` reports whole
    /// objects (fast with the object map). `include_parent` also reports,
    /// for a clone, the extents a reader sees through to its parent.
    /// Returning `Err` from `f` stops the iteration and is returned. Blocking.
    pub fn diff_iterate<F, E>(
        &self,
        from: Option<&str>,
        ofs: u64,
        len: u64,
        include_parent: bool,
        whole_object: bool,
        mut f: F,
    ) -> std::result::Result<(), DiffError<E>>
    where
        F: FnMut(u64, u64, bool) -> std::result::Result<(), E>,
    {
        struct State<'a, E> {
            f: &'a mut dyn FnMut(u64, u64, bool) -> std::result::Result<(), E>,
            err: Option<E>,
            panicked: bool,
        }
        extern "C" fn trampoline<E>(
            off: u64,
            len: usize,
            exists: c_int,
            arg: *mut c_void,
        ) -> c_int {
            // SAFETY: arg is the &mut State given to the (synchronous)
            // rbd_diff_iterate2 below, alive and exclusively ours meanwhile.
            let st = unsafe { &mut *arg.cast::<State<'_, E>>() };
            match catch_unwind(AssertUnwindSafe(|| (st.f)(off, len as u64, exists != 0))) {
                Ok(Ok(())) => 0,
                Ok(Err(e)) => {
                    st.err = Some(e);
                    -libc::ECANCELED
                }
                Err(_) => {
                    st.panicked = true;
                    -libc::ECANCELED
                }
            }
        }
        let from_c = from
            .map(|s| cstring(s, "rbd_diff_iterate2"))
            .transpose()
            .map_err(DiffError::Ceph)?;
        let fp = from_c.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        let mut st = State {
            f: &mut f,
            err: None,
            panicked: false,
        };
        // SAFETY: the handle is live; fp is null or NUL-terminated; the
        // callback and its state are valid for the whole (synchronous) call.
        let ret = unsafe {
            sys::rbd_diff_iterate2(
                self.raw(),
                fp,
                ofs,
                len,
                u8::from(include_parent),
                u8::from(whole_object),
                Some(trampoline::<E>),
                ptr::from_mut(&mut st).cast(),
            )
        };
        if st.panicked {
            return Err(DiffError::Ceph(Error::from_errno(
                libc::ECANCELED,
                "rbd_diff_iterate2 callback panicked",
                self.target(),
            )));
        }
        if let Some(e) = st.err {
            return Err(DiffError::Callback(e));
        }
        check(ret, "rbd_diff_iterate2", || self.target())
            .map(|_| ())
            .map_err(DiffError::Ceph)
    }

    /// Copies a clone's parent data into it and detaches it from the parent
    /// (`rbd flatten`). Blocking; as long as copying the overlap.
    pub fn flatten(&self) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_flatten(self.raw()) };
        check(ret, "rbd_flatten", || self.target()).map(|_| ())
    }

    /// Takes the image's exclusive lock and keeps it: other clients' writes
    /// then fail with `EROFS` until release, close, or a lock break.
    pub fn lock_acquire(&self, mode: LockMode) -> Result<()> {
        let m = match mode {
            LockMode::Exclusive => sys::RBD_LOCK_MODE_EXCLUSIVE,
        };
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_lock_acquire(self.raw(), m) };
        check(ret, "rbd_lock_acquire", || self.target()).map(|_| ())
    }

    /// Releases a lock taken with [`Image::lock_acquire`].
    pub fn lock_release(&self) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_lock_release(self.raw()) };
        check(ret, "rbd_lock_release", || self.target()).map(|_| ())
    }

    /// Whether this handle owns the exclusive lock.
    pub fn is_exclusive_lock_owner(&self) -> Result<bool> {
        let mut owner: c_int = 0;
        // SAFETY: owner is a valid out-pointer.
        let ret = unsafe { sys::rbd_is_exclusive_lock_owner(self.raw(), &mut owner) };
        check(ret, "rbd_is_exclusive_lock_owner", || self.target())?;
        Ok(owner != 0)
    }

    /// Clients holding the exclusive lock (empty when unlocked).
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut max = 8usize;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); max];
            let mut mode: sys::rbd_lock_mode_t = 0;
            let mut n = max;
            // SAFETY: owners has room for n pointers; librbd fills them.
            let ret = unsafe {
                sys::rbd_lock_get_owners(self.raw(), &mut mode, owners.as_mut_ptr(), &mut n)
            };
            if ret == -libc::ENOENT {
                return Ok(Vec::new());
            }
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check(ret, "rbd_lock_get_owners", || self.target())?;
            // SAFETY: librbd filled the first n entries with C strings.
            let out = owners[..n].iter().map(|p| unsafe { lossy(*p) }).collect();
            // SAFETY: frees exactly the n strings librbd allocated.
            unsafe { sys::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Breaks the exclusive lock held by `owner` (blocklisting it).
    pub fn lock_break(&self, owner: &str) -> Result<()> {
        let o = cstring(owner, "rbd_lock_break")?;
        let ret =
            // SAFETY: the handle is live; o is NUL-terminated.
            unsafe { sys::rbd_lock_break(self.raw(), sys::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr()) };
        check(ret, "rbd_lock_break", || self.target()).map(|_| ())
    }

    /// Clients watching the image header, i.e. that have it open.
    pub fn watchers(&self) -> Result<Vec<Watcher>> {
        let mut max = 8usize;
        loop {
            // SAFETY: rbd_image_watcher_t is plain data; zero is valid.
            let mut ws: Vec<sys::rbd_image_watcher_t> = vec![unsafe { std::mem::zeroed() }; max];
            let mut n = max;
            // SAFETY: ws has room for n entries.
            let ret = unsafe { sys::rbd_watchers_list(self.raw(), ws.as_mut_ptr(), &mut n) };
            if ret == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check(ret, "rbd_watchers_list", || self.target())?;
            let out = ws[..n]
                .iter()
                .map(|w| Watcher {
                    // SAFETY: librbd set addr to a C string it owns until
                    // rbd_watchers_list_cleanup below.
                    addr: unsafe { lossy(w.addr) },
                    id: w.id,
                })
                .collect();
            // SAFETY: frees exactly the n entries librbd filled.
            unsafe { sys::rbd_watchers_list_cleanup(ws.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Flushes writes cached by librbd. Blocking.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_flush(self.raw()) };
        check(ret, "rbd_flush", || self.target()).map(|_| ())
    }

    /// Synchronous read of `buf.len()` bytes at `off`; returns bytes read.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        // SAFETY: buf is writable for its length, which is passed.
        let ret = unsafe { sys::rbd_read(self.raw(), off, buf.len(), buf.as_mut_ptr().cast()) };
        let n = super::error::check_i64(ret as i64, "rbd_read", || self.target())?;
        Ok(n as usize)
    }

    /// Synchronous write of `buf` at `off`.
    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        // SAFETY: buf is readable for its length, which is passed.
        let ret = unsafe { sys::rbd_write(self.raw(), off, buf.len(), buf.as_ptr().cast()) };
        super::error::check_i64(ret as i64, "rbd_write", || self.target()).map(|_| ())
    }
}

/// Error of [`Image::diff_iterate`]: from librbd, or from the callback.
#[derive(Debug)]
pub enum DiffError<E> {
    /// librbd failed.
    Ceph(Error),
    /// The callback returned an error.
    Callback(E),
}

fn nul_terminated(buf: &[u8]) -> String {
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}
