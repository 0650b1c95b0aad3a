//! librbd groups (`rbd group`, Ceph 16.2 Pacific): create, remove and list
//! groups, add, remove and list their images, and the group an image belongs
//! to, and group snapshots (create, list, remove, roll back). A group lives
//! in one pool and RADOS namespace (its ioctx); its images
//! may be in other pools, so image calls take both ioctxs. librbd itself
//! keeps an image in at most one group: adding an image that is in a group
//! already fails with `EEXIST`.
//!
//! Every call is blocking: async code runs them on the blocking pool.

use std::ffi::{c_char, c_int};
use std::ptr;

use super::error::{Result, check};
use super::rados::{IoCtx, cstring};
use super::rbd::{Image, lossy, nul_list};
use csirr_ceph_sys as sys;

/// librbd's pool id of "no group" (`RBD_GROUP_INVALID_POOL`).
const NO_GROUP_POOL: i64 = -1;

/// Whether an image's membership is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageState {
    /// Fully attached: the group and the image both record it.
    Attached,
    /// An add or remove was interrupted: only one side records it. Adding
    /// or removing the image again completes it.
    Incomplete,
}

/// One image of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupImage {
    /// Image name.
    pub name: String,
    /// Id of the image's pool.
    pub pool_id: i64,
    /// Membership state.
    pub state: ImageState,
}

/// The group an image belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Id of the group's pool.
    pub pool_id: i64,
}

/// Creates group `name` in the ioctx's pool and namespace (`EEXIST` when it
/// exists).
pub fn create(io: &IoCtx, name: &str) -> Result<()> {
    let c = cstring(name, "rbd_group_create")?;
    // SAFETY: the ioctx is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_group_create(io.raw(), c.as_ptr()) };
    check(ret, "rbd_group_create", || format!("{}/{name}", io.spec())).map(|_| ())
}

/// Removes group `name`; Pacific answers success when it does not exist.
/// librbd detaches the group's images and removes its snapshots: check
/// that it is empty first.
pub fn remove(io: &IoCtx, name: &str) -> Result<()> {
    let c = cstring(name, "rbd_group_remove")?;
    // SAFETY: the ioctx is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_group_remove(io.raw(), c.as_ptr()) };
    check(ret, "rbd_group_remove", || format!("{}/{name}", io.spec())).map(|_| ())
}

/// The names of the groups of the ioctx's pool and namespace.
pub fn list(io: &IoCtx) -> Result<Vec<String>> {
    nul_list(
        "rbd_group_list",
        || io.spec(),
        |buf, n| {
            // SAFETY: buf is writable for *n bytes; librbd sets *n to the needed
            // size on -ERANGE.
            unsafe { sys::rbd_group_list(io.raw(), buf, n) }
        },
    )
}

// SAFETY: a function-pointer type, no unsafe code: only librbd's group image
// calls (add, remove) of exactly this signature are passed as one.
type ImageCall = unsafe extern "C" fn(
    sys::rados_ioctx_t,
    *const c_char,
    sys::rados_ioctx_t,
    *const c_char,
) -> c_int;

/// Calls a librbd `f(group_io, group, image_io, image)`.
fn image_call(
    op: &'static str,
    f: ImageCall,
    group_io: &IoCtx,
    group: &str,
    image_io: &IoCtx,
    image: &str,
) -> Result<()> {
    let g = cstring(group, op)?;
    let i = cstring(image, op)?;
    // SAFETY: both ioctxs are live; g and i are NUL-terminated; `f` is one
    // of librbd's group image calls taking exactly these arguments.
    let ret = unsafe { f(group_io.raw(), g.as_ptr(), image_io.raw(), i.as_ptr()) };
    check(ret, op, || {
        format!(
            "{}/{group} image {}/{image}",
            group_io.spec(),
            image_io.spec()
        )
    })
    .map(|_| ())
}

/// Adds image `image` (in `image_io`) to group `group` (in `group_io`).
/// `EEXIST` when the image is in a group already (this one or another).
pub fn image_add(group_io: &IoCtx, group: &str, image_io: &IoCtx, image: &str) -> Result<()> {
    image_call(
        "rbd_group_image_add",
        sys::rbd_group_image_add,
        group_io,
        group,
        image_io,
        image,
    )
}

/// Removes image `image` (in `image_io`) from group `group` (in
/// `group_io`).
pub fn image_remove(group_io: &IoCtx, group: &str, image_io: &IoCtx, image: &str) -> Result<()> {
    image_call(
        "rbd_group_image_remove",
        sys::rbd_group_image_remove,
        group_io,
        group,
        image_io,
        image,
    )
}

/// The images of group `group`. Pacific answers an empty list, not
/// `ENOENT`, for a group that does not exist.
pub fn image_list(io: &IoCtx, group: &str) -> Result<Vec<GroupImage>> {
    let g = cstring(group, "rbd_group_image_list")?;
    list_entries(
        "rbd_group_image_list",
        || format!("{}/{group}", io.spec()),
        |infos, size, n| {
            // SAFETY: infos has room for *n entries of `size` bytes; librbd
            // fills at most *n and sets *n to the count.
            unsafe { sys::rbd_group_image_list(io.raw(), g.as_ptr(), infos, size, n) }
        },
        |i: &sys::rbd_group_image_info_t| GroupImage {
            // SAFETY: librbd set name to a NUL-terminated string it owns
            // until the cleanup call.
            name: unsafe { lossy(i.name) },
            pool_id: i.pool,
            state: if i.state == sys::RBD_GROUP_IMAGE_STATE_ATTACHED {
                ImageState::Attached
            } else {
                ImageState::Incomplete
            },
        },
        sys::rbd_group_image_list_cleanup,
    )
}

/// Calls a librbd group list function `fill(entries, entry_size, &mut n)`
/// (`-ERANGE` with the count needed when `n` is too small), maps every
/// entry librbd filled, and frees them with `cleanup(entries, entry_size,
/// n)`.
fn list_entries<T: Copy, U>(
    op: &'static str,
    target: impl Fn() -> String,
    mut fill: impl FnMut(*mut T, usize, &mut usize) -> c_int,
    map: impl Fn(&T) -> U,
    // SAFETY: a function-pointer type: librbd's cleanup of the entries `fill`
    // wrote (called once, on what librbd filled).
    cleanup: unsafe extern "C" fn(*mut T, usize, usize) -> c_int,
) -> Result<Vec<U>> {
    let size = std::mem::size_of::<T>();
    let mut max: usize = 16;
    loop {
        // SAFETY: T is one of librbd's plain-data info structs (pointers
        // and integers): all-zero is valid.
        let mut infos: Vec<T> = vec![unsafe { std::mem::zeroed() }; max];
        let mut n = max;
        let ret = fill(infos.as_mut_ptr(), size, &mut n);
        if ret == -libc::ERANGE {
            max = n.max(max * 2);
            continue;
        }
        check(ret, op, &target)?;
        let out = infos[..n].iter().map(&map).collect();
        // SAFETY: frees what librbd allocated in exactly the n entries it
        // filled, once.
        unsafe { cleanup(infos.as_mut_ptr(), size, n) };
        return Ok(out);
    }
}

impl Image {
    /// The group this image belongs to, if any.
    pub fn group(&self) -> Result<Option<GroupInfo>> {
        let size = std::mem::size_of::<sys::rbd_group_info_t>();
        let mut info = sys::rbd_group_info_t {
            name: ptr::null_mut(),
            pool: NO_GROUP_POOL,
        };
        // SAFETY: the handle is live; info is a valid out-pointer of `size`
        // bytes.
        let ret = unsafe { sys::rbd_get_group(self.h.raw(), &mut info, size) };
        check(ret, "rbd_get_group", || self.spec())?;
        let out = (info.pool != NO_GROUP_POOL).then(|| GroupInfo {
            // SAFETY: librbd set name to a NUL-terminated string it owns
            // until rbd_group_info_cleanup below.
            name: unsafe { lossy(info.name) },
            pool_id: info.pool,
        });
        // SAFETY: frees the name librbd allocated in `info`, once.
        unsafe { sys::rbd_group_info_cleanup(&mut info, size) };
        Ok(out)
    }
}

/// One snapshot of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnap {
    /// Snapshot name.
    pub name: String,
    /// Whether every member's snapshot was taken.
    pub complete: bool,
}

/// Calls a librbd `f(group_io, group, snap)`.
fn snap_call(
    op: &'static str,
    // SAFETY: a function-pointer type: one of librbd's group snapshot calls
    // of this signature (create, remove, rollback).
    f: unsafe extern "C" fn(sys::rados_ioctx_t, *const c_char, *const c_char) -> c_int,
    io: &IoCtx,
    group: &str,
    snap: &str,
) -> Result<()> {
    let g = cstring(group, op)?;
    let s = cstring(snap, op)?;
    // SAFETY: the ioctx is live; g and s are NUL-terminated; `f` is one of
    // librbd's group snapshot calls taking exactly these arguments.
    let ret = unsafe { f(io.raw(), g.as_ptr(), s.as_ptr()) };
    check(ret, op, || format!("{}/{group}@{snap}", io.spec())).map(|_| ())
}

/// Takes group snapshot `snap`: librbd opens every member, quiesces it and
/// takes its exclusive lock (holders flush and hand it over, so writes
/// pause on all members at once), snapshots each member in the group
/// snapshot namespace, releases, and marks the group snapshot complete.
/// Blocking; `EEXIST` when the name is taken.
pub fn snap_create(io: &IoCtx, group: &str, snap: &str) -> Result<()> {
    snap_call(
        "rbd_group_snap_create",
        sys::rbd_group_snap_create,
        io,
        group,
        snap,
    )
}

/// Removes group snapshot `snap` (and its member snapshots).
pub fn snap_remove(io: &IoCtx, group: &str, snap: &str) -> Result<()> {
    snap_call(
        "rbd_group_snap_remove",
        sys::rbd_group_snap_remove,
        io,
        group,
        snap,
    )
}

/// Rolls every member back to group snapshot `snap`. Blocking; as long as
/// rewriting the members. No client may be writing them.
pub fn snap_rollback(io: &IoCtx, group: &str, snap: &str) -> Result<()> {
    snap_call(
        "rbd_group_snap_rollback",
        sys::rbd_group_snap_rollback,
        io,
        group,
        snap,
    )
}

/// The snapshots of group `group`.
pub fn snap_list(io: &IoCtx, group: &str) -> Result<Vec<GroupSnap>> {
    let g = cstring(group, "rbd_group_snap_list")?;
    list_entries(
        "rbd_group_snap_list",
        || format!("{}/{group}", io.spec()),
        |infos, size, n| {
            // SAFETY: infos has room for *n entries of `size` bytes; librbd
            // fills at most *n and sets *n to the count.
            unsafe { sys::rbd_group_snap_list(io.raw(), g.as_ptr(), infos, size, n) }
        },
        |i: &sys::rbd_group_snap_info_t| GroupSnap {
            // SAFETY: librbd set name to a NUL-terminated string it owns
            // until the cleanup call.
            name: unsafe { lossy(i.name) },
            complete: i.state == sys::RBD_GROUP_SNAP_STATE_COMPLETE,
        },
        sys::rbd_group_snap_list_cleanup,
    )
}

impl Image {
    /// Makes reads see snapshot `id`, of any snapshot namespace (a group
    /// snapshot's member snapshot too, which has no user-visible name).
    /// `rbd_diff_iterate2` then diffs up to it.
    pub fn snap_set_by_id(&self, id: u64) -> Result<()> {
        // SAFETY: the handle is live.
        let ret = unsafe { sys::rbd_snap_set_by_id(self.h.raw(), id) };
        check(ret, "rbd_snap_set_by_id", || {
            format!("{}@{id}", self.spec())
        })
        .map(|_| ())
    }

    /// The id of this image's member snapshot of group snapshot `snap` of
    /// group `group` (in the pool with id `group_pool`); `None` when the
    /// image has none. Looks at every snapshot id of the header's snapshot
    /// context and asks librbd for the group namespace of those in one.
    pub fn group_snap_id(&self, group_pool: i64, group: &str, snap: &str) -> Result<Option<u64>> {
        let (_, ids) = super::objects::snap_context(self)?;
        for id in ids {
            let mut ty: sys::rbd_snap_namespace_type_t = 0;
            // SAFETY: the handle is live; ty is a valid out-pointer.
            let ret = unsafe { sys::rbd_snap_get_namespace_type(self.h.raw(), id, &mut ty) };
            if ret == -libc::ENOENT {
                // Removed since the snapshot context was read.
                continue;
            }
            check(ret, "rbd_snap_get_namespace_type", || {
                format!("{}@{id}", self.spec())
            })?;
            if ty != sys::RBD_SNAP_NAMESPACE_TYPE_GROUP {
                continue;
            }
            let size = std::mem::size_of::<sys::rbd_snap_group_namespace_t>();
            let mut ns = sys::rbd_snap_group_namespace_t {
                group_pool: NO_GROUP_POOL,
                group_name: ptr::null_mut(),
                group_snap_name: ptr::null_mut(),
            };
            // SAFETY: the handle is live; ns is a valid out-pointer of
            // `size` bytes.
            let ret = unsafe { sys::rbd_snap_get_group_namespace(self.h.raw(), id, &mut ns, size) };
            if ret == -libc::ENOENT {
                continue;
            }
            check(ret, "rbd_snap_get_group_namespace", || {
                format!("{}@{id}", self.spec())
            })?;
            // SAFETY: librbd set both names to NUL-terminated strings it owns
            // until the cleanup call below.
            let (g, s) = unsafe { (lossy(ns.group_name), lossy(ns.group_snap_name)) };
            let pool = ns.group_pool;
            // SAFETY: frees what librbd allocated in `ns`, once.
            unsafe { sys::rbd_snap_group_namespace_cleanup(&mut ns, size) };
            if pool == group_pool && g == group && s == snap {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }
}
