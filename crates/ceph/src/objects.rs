//! Direct I/O on an image's data objects: reads at a snapshot, writes at
//! the head.
//!
//! librbd issues one RADOS operation per extent. A delta of scattered small
//! writes has several extents in each 4 MiB object; reading them, and
//! writing them, all the extents of an object in one compound operation
//! costs the OSDs and this process a fraction of the per-operation work
//! (measured on two cores: 4096 writes of 64 KiB in 0.47 s instead of 1.6 s;
//! the replica's OSD used a third of the CPU).
//!
//! A first sync reads whole objects, mostly holes on a thin volume: it reads
//! them with sparse reads (`object_io.cc`, a shim over librados' C++ API,
//! whose C API has none), which return the allocated extents and their data
//! only, so neither the wire nor this process carries the zeroes.
//!
//! Direct writes carry the image's snapshot context, as librbd's do (the OSD
//! preserves a snapshot's data before the first write after it). What librbd
//! would also do is the caller's: mark the objects in the object map first
//! ([`mark_objects_exist`]), hold the exclusive lock, and make librbd reload
//! its map afterwards (its copy in memory does not see the marks).
//!
//! Only images whose data maps linearly onto `rbd_data.<id>.<objno>` objects
//! qualify: format 2, no fancy striping, and no parent data at the snapshot
//! (a clone's unwritten objects live in its parent).

use std::ffi::{CString, c_char, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::error::{Error, Result, check};
use super::rados::{IoCtx, cstring};
use super::rbd::Image;
use csirr_ceph_sys as sys;

/// Callback of [`DataObjects::aio_read`]: the result and the buffer, filled
/// with the extents one after the other.
pub type ObjectReadCallback = Box<dyn FnOnce(Result<()>, Vec<u8>) + Send + 'static>;

/// Callback of [`DataObjects::aio_sparse_read`].
pub type SparseReadCallback = Box<dyn FnOnce(Result<SparseData>) + Send + 'static>;

/// Callback of [`DataObjects::aio_write`]: the result and the buffers back
/// (none when the write failed: librados may still reference them).
pub type ObjectWriteCallback = Box<dyn FnOnce(Result<()>, Vec<Vec<u8>>) + Send + 'static>;

/// What a sparse read returned: the allocated extents of the range read
/// (offsets within the object, in order) and their data, one after the
/// other. Everything else in the range reads as zeroes. Owns librados'
/// buffer: no copy is made until the caller makes one.
pub struct SparseData {
    read: NonNull<c_void>,
    extents: Vec<(u64, u64)>,
    data: *const u8,
    len: usize,
}

// SAFETY: the read completed: librados no longer touches it, and the data
// it owns is only read through `&self`.
unsafe impl Send for SparseData {}

impl std::fmt::Debug for SparseData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SparseData")
            .field("extents", &self.extents)
            .field("bytes", &self.len)
            .finish()
    }
}

impl SparseData {
    /// Takes a completed read, checking that its extents lie inside
    /// `[off, off + len)`, in order, and match its data.
    fn from_completed(read: NonNull<c_void>, off: u64, len: u64, target: &str) -> Result<Self> {
        let mut out = Self {
            read,
            extents: Vec::new(),
            data: ptr::null(),
            len: 0,
        };
        // SAFETY: the read completed and is ours until dropped.
        let ret = unsafe { sys::csirr_sparse_read_result(read.as_ptr()) };
        check(ret, "rados_aio_sparse_read", || target.to_string())?;
        // SAFETY: as above.
        let n = unsafe { sys::csirr_sparse_read_extent_count(read.as_ptr()) };
        let mut pairs = vec![0u64; n * 2];
        // SAFETY: `pairs` holds the 2 * n values the call writes.
        unsafe { sys::csirr_sparse_read_extents(read.as_ptr(), pairs.as_mut_ptr()) };
        out.extents = pairs.chunks_exact(2).map(|p| (p[0], p[1])).collect();
        let mut dlen = 0usize;
        // SAFETY: the read is live; the block stays valid and unchanged
        // until it is released (on drop).
        let data = unsafe { sys::csirr_sparse_read_data(read.as_ptr(), &mut dlen) };
        if data.is_null() {
            return Err(Error::from_errno(
                libc::ENOMEM,
                "rados_aio_sparse_read",
                target,
            ));
        }
        out.data = data.cast();
        out.len = dlen;
        let mut pos = off;
        let mut sum = 0u64;
        for &(o, l) in &out.extents {
            if o < pos || o.saturating_add(l) > off.saturating_add(len) {
                return Err(Error::from_errno(
                    libc::EIO,
                    "rados_aio_sparse_read",
                    target,
                ));
            }
            pos = o + l;
            sum += l;
        }
        if sum != dlen as u64 {
            return Err(Error::from_errno(
                libc::EIO,
                "rados_aio_sparse_read",
                target,
            ));
        }
        Ok(out)
    }

    /// The allocated extents: offset in the object and length.
    pub fn extents(&self) -> &[(u64, u64)] {
        &self.extents
    }

    /// The data of all extents, one after the other.
    pub fn data(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `data` points to `len` bytes owned by the read, which
        // lives (unchanged) as long as `self`.
        unsafe { std::slice::from_raw_parts(self.data, self.len) }
    }

    /// Each extent with its data: (offset in the object, bytes).
    pub fn pieces(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let data = self.data();
        let mut pos = 0usize;
        self.extents.iter().map(move |&(off, len)| {
            let l = len as usize;
            let piece = data.get(pos..pos + l).unwrap_or(&[]);
            pos += l;
            (off, piece)
        })
    }
}

impl Drop for SparseData {
    fn drop(&mut self) {
        // SAFETY: the read completed; released exactly once, here.
        unsafe { sys::csirr_sparse_read_release(self.read.as_ptr()) };
    }
}

/// The data objects of an image, read directly at one snapshot or written
/// directly at the head.
pub struct DataObjects {
    /// Data pool and namespace of the image, reading at the snapshot or
    /// writing with the head's snapshot context.
    io: Arc<IoCtx>,
    prefix: String,
    obj_size: u64,
    spec: String,
}

impl std::fmt::Debug for DataObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DataObjects({} at {})", self.spec, self.prefix)
    }
}

impl DataObjects {
    /// The data objects of `image` (opened at snapshot `snap_id`), or `None`
    /// when its layout needs librbd to read it (see the module doc).
    /// Blocking.
    pub fn open(image: &Image, snap_id: u64) -> Result<Option<Self>> {
        Self::open_at(image, Some(snap_id))
    }

    /// The data objects of `image` at its head, to write them (see the
    /// module doc), or `None` when its layout needs librbd. Writes carry
    /// the image's snapshot context as it is now, as librbd's do (the OSD
    /// preserves each snapshot's data before the first write after it):
    /// only valid until the next snapshot of the image. Blocking.
    pub fn open_head(image: &Image) -> Result<Option<Self>> {
        Self::open_at(image, None)
    }

    fn open_at(image: &Image, snap_id: Option<u64>) -> Result<Option<Self>> {
        let info = image.stat()?;
        let (_, stripe_count) = image.stripe()?;
        if stripe_count > 1 || info.obj_size == 0 || image.parent_overlap()? > 0 {
            return Ok(None);
        }
        let prefix = image.block_name_prefix()?;
        if !prefix.starts_with("rbd_data.") {
            return Ok(None);
        }
        let home = image.ioctx();
        let pool_id = match image.data_pool_id()? {
            id if id >= 0 => id,
            _ => home.pool_id(),
        };
        let pool = if pool_id == home.pool_id() {
            home.pool().to_string()
        } else {
            home.cluster().pool_reverse_lookup(pool_id)?
        };
        let io = match snap_id {
            Some(snap) => {
                Arc::new(
                    home.cluster()
                        .ioctx_at_snap(pool_id, &pool, home.namespace(), snap)?,
                )
            }
            None => {
                let (seq, snaps) = snap_context(image)?;
                Arc::new(home.cluster().ioctx_with_snapc(
                    pool_id,
                    &pool,
                    home.namespace(),
                    seq,
                    &snaps,
                )?)
            }
        };
        Ok(Some(Self {
            io,
            prefix,
            obj_size: info.obj_size,
            spec: image.spec(),
        }))
    }

    /// Object size in bytes: image offset `off` is in object
    /// `off / object_size()`.
    pub fn object_size(&self) -> u64 {
        self.obj_size
    }

    /// Reads `extents` (offset and length within object `objno`, each) in one
    /// operation into `buf`, one after the other; `buf` must be as long as
    /// the extents together. Bytes beyond the object's end read as zeroes,
    /// as through librbd. A missing object is an error of kind `NotFound`,
    /// never zeroes: the caller reads through librbd, which knows what stands
    /// behind it (and a wrong ioctx or snapshot cannot pass for holes).
    /// `done` runs on librados' completion thread: it must not block.
    pub fn aio_read(
        &self,
        objno: u64,
        extents: &[(u64, usize)],
        mut buf: Vec<u8>,
        done: ObjectReadCallback,
    ) -> Result<()> {
        let oid = self.oid(objno, "rados_aio_read_op_operate")?;
        let total: usize = extents.iter().map(|e| e.1).sum();
        if total != buf.len() {
            return Err(Error::invalid_input(
                "rados_aio_read_op_operate",
                "buffer length",
            ));
        }
        // SAFETY: no preconditions; null on allocation failure.
        let op = NonNull::new(unsafe { sys::rados_create_read_op() }).ok_or_else(|| {
            Error::from_errno(libc::ENOMEM, "rados_create_read_op", self.spec.clone())
        })?;
        let n = extents.len();
        let base = buf.as_mut_ptr();
        let mut st = Box::new(ReadState {
            op,
            lens: extents.iter().map(|e| e.1).collect(),
            nread: vec![0; n],
            rvals: vec![0; n],
            buf: Vec::new(),
            done,
            io: Some(Arc::clone(&self.io)),
            target: format!("{} object {objno:#x}", self.spec),
        });
        let mut pos = 0usize;
        for (i, &(off, len)) in extents.iter().enumerate() {
            // base + pos .. + len lies inside `buf` (the lengths sum to its
            // length), whose heap block moves into the boxed state below and
            // lives until the completion; the out pointers point into vectors
            // of the boxed state, which are never resized.
            // SAFETY: as above; op is live.
            unsafe {
                sys::rados_read_op_read(
                    op.as_ptr(),
                    off,
                    len,
                    base.add(pos).cast(),
                    &mut st.nread[i],
                    &mut st.rvals[i],
                );
            }
            pos += len;
        }
        // Moving the vector keeps its heap block where the reads point.
        st.buf = buf;
        let arg = Box::into_raw(st);
        let mut c: sys::rados_completion_t = ptr::null_mut();
        let cb: sys::rados_callback_t = Some(read_complete);
        // SAFETY: arg is reclaimed by `read_complete` (or below on failure).
        let ret = unsafe { sys::rados_aio_create_completion2(arg.cast(), cb, &mut c) };
        if ret < 0 {
            // SAFETY: no completion exists: the box is still only ours.
            drop(unsafe { Box::from_raw(arg) });
            return check(ret, "rados_aio_create_completion2", || self.spec.clone()).map(|_| ());
        }
        // SAFETY: op, ioctx and completion are live; oid is NUL-terminated
        // and copied by librados before the call returns.
        let ret = unsafe {
            sys::rados_aio_read_op_operate(op.as_ptr(), self.io.raw(), c, oid.as_ptr(), 0)
        };
        if ret < 0 {
            // SAFETY: a failed submission never fires the completion: release
            // it and reclaim the box ourselves.
            unsafe {
                sys::rados_aio_release(c);
                drop(Box::from_raw(arg));
            }
            return check(ret, "rados_aio_read_op_operate", || self.spec.clone()).map(|_| ());
        }
        Ok(())
    }

    /// Reads `[off, off + len)` of object `objno` sparsely: `done` gets the
    /// allocated extents and their data (see [`SparseData`]). A missing
    /// object is an error of kind `NotFound`, as in [`Self::aio_read`].
    /// `done` runs on librados' completion thread: it must not block.
    pub fn aio_sparse_read(
        &self,
        objno: u64,
        off: u64,
        len: u64,
        done: SparseReadCallback,
    ) -> Result<()> {
        let oid = self.oid(objno, "rados_aio_sparse_read")?;
        let st = Box::new(SparseState {
            off,
            len,
            done,
            io: Some(Arc::clone(&self.io)),
            target: format!("{} object {objno:#x}", self.spec),
        });
        let arg = Box::into_raw(st);
        // The ioctx is live (and kept so by the state until the callback);
        // oid is NUL-terminated and copied before the call returns; arg is
        // reclaimed by `sparse_complete`, which the shim calls exactly once
        // if and only if the start succeeded.
        // SAFETY: as above.
        let ret = unsafe {
            sys::csirr_sparse_read_start(
                self.io.raw(),
                oid.as_ptr(),
                off,
                len,
                sparse_complete,
                arg.cast(),
            )
        };
        if ret < 0 {
            // SAFETY: nothing was started: the box is still only ours.
            drop(unsafe { Box::from_raw(arg) });
            return check(ret, "rados_aio_sparse_read", || self.spec.clone()).map(|_| ());
        }
        Ok(())
    }

    /// Writes `parts` (offset in object `objno`, length, data or `None` for
    /// zeroes) in one operation; `done` gets the result and the data
    /// buffers back. `done` runs on librados' completion thread: it must
    /// not block.
    pub fn aio_write(
        &self,
        objno: u64,
        parts: Vec<(u64, u64, Option<Vec<u8>>)>,
        done: ObjectWriteCallback,
    ) -> Result<()> {
        let mut spans = Vec::with_capacity(parts.len());
        let mut bufs = Vec::with_capacity(parts.len());
        for (off, len, data) in parts {
            match data {
                Some(b) => {
                    // The pointer is into the vector's heap block, which
                    // moves with the vector into the write's state.
                    spans.push((off, b.len(), b.as_ptr()));
                    bufs.push(b);
                }
                None => spans.push((off, self.part_len(len)?, ptr::null())),
            }
        }
        self.start_write(objno, &spans, bufs, None, done)
    }

    /// Writes `parts` of what a sparse read returned, without copying it:
    /// (offset in object `objno`, length, `Some(at)`: the bytes at `at` in
    /// [`SparseData::data`], or `None` for zeroes). `read` lives until the
    /// write completes; `done` gets no buffers back. `done` runs on
    /// librados' completion thread: it must not block.
    pub fn aio_write_from_read(
        &self,
        objno: u64,
        parts: &[(u64, u64, Option<usize>)],
        read: SparseData,
        done: ObjectWriteCallback,
    ) -> Result<()> {
        let data = read.data();
        let mut spans = Vec::with_capacity(parts.len());
        for &(off, len, at) in parts {
            let n = self.part_len(len)?;
            let p = match at {
                Some(at) => match data.get(at..at.saturating_add(n)) {
                    Some(bytes) => bytes.as_ptr(),
                    None => {
                        return Err(Error::invalid_input(
                            "rados_aio_write_op_operate",
                            self.spec.clone(),
                        ));
                    }
                },
                None => ptr::null(),
            };
            spans.push((off, n, p));
        }
        self.start_write(objno, &spans, Vec::new(), Some(read), done)
    }

    /// The name of data object `objno` (`op` names the call in errors).
    fn oid(&self, objno: u64, op: &'static str) -> Result<CString> {
        cstring(&format!("{}.{objno:016x}", self.prefix), op)
    }

    fn part_len(&self, len: u64) -> Result<usize> {
        usize::try_from(len)
            .map_err(|_| Error::invalid_input("rados_aio_write_op_operate", self.spec.clone()))
    }

    /// Starts a compound write of `spans` (offset, length, data or null
    /// for zeroes) whose data lives in `bufs` or `read`, both kept until
    /// the completion.
    fn start_write(
        &self,
        objno: u64,
        spans: &[(u64, usize, *const u8)],
        bufs: Vec<Vec<u8>>,
        read: Option<SparseData>,
        done: ObjectWriteCallback,
    ) -> Result<()> {
        let oid = self.oid(objno, "rados_aio_write_op_operate")?;
        let offs: Vec<u64> = spans.iter().map(|s| s.0).collect();
        let lens: Vec<usize> = spans.iter().map(|s| s.1).collect();
        let ptrs: Vec<*const c_char> = spans.iter().map(|s| s.2.cast()).collect();
        let st = Box::new(WriteState {
            bufs,
            read,
            done,
            io: Some(Arc::clone(&self.io)),
            target: format!("{} object {objno:#x}", self.spec),
        });
        let arg = Box::into_raw(st);
        // The data pointers point into the heap blocks of `bufs` (a moved
        // vector keeps its block) or into the read's buffer (owned by
        // librados, unchanged until released), both moved into the boxed
        // state and kept until `write_complete`; the shim does not copy
        // them. The arrays are read during the call only. The ioctx is live
        // (and kept so by the state); oid is NUL-terminated; arg is
        // reclaimed by `write_complete`, which the shim calls exactly once
        // if and only if the start succeeded.
        // SAFETY: as above.
        let ret = unsafe {
            sys::csirr_write_extents_start(
                self.io.raw(),
                oid.as_ptr(),
                offs.len(),
                offs.as_ptr(),
                ptrs.as_ptr(),
                lens.as_ptr(),
                write_complete,
                arg.cast(),
            )
        };
        if ret < 0 {
            // SAFETY: nothing was started: the box is still only ours.
            drop(unsafe { Box::from_raw(arg) });
            return check(ret, "rados_aio_write_op_operate", || self.spec.clone()).map(|_| ());
        }
        Ok(())
    }
}

/// What a compound write needs until its completion: the buffers or the
/// read it writes from (the shim does not copy them; buffers go back to the
/// caller for reuse), and the ioctx it runs on.
struct WriteState {
    bufs: Vec<Vec<u8>>,
    read: Option<SparseData>,
    done: ObjectWriteCallback,
    io: Option<Arc<IoCtx>>,
    target: String,
}

// SAFETY: called by librados/the shim only, with the argument registered
// for it (see the first statement).
unsafe extern "C" fn write_complete(arg: *mut c_void, ret: c_int) {
    // SAFETY: arg is the Box<WriteState> leaked in `aio_write`; the shim
    // calls this exactly once per started write.
    let st = unsafe { Box::from_raw(arg.cast::<WriteState>()) };
    let WriteState {
        bufs,
        read,
        done,
        io,
        target,
    } = *st;
    let res = check(ret, "rados_aio_write_op_operate", || target).map(|_| ());
    release_io(io);
    // A write that failed (an operation timeout above all) can complete
    // while its message still sits in the messenger's queue, pointing into
    // these buffers, and Pacific's public headers offer no deleter to learn
    // when librados lets go. Such buffers are never reused nor freed: they
    // are leaked, counted in `LEAKED_WRITE_BYTES`. A write that succeeded
    // was sent and answered: nothing references them any more.
    let bufs = if res.is_err() {
        let n = bufs.iter().map(Vec::capacity).sum::<usize>() + read.as_ref().map_or(0, |r| r.len);
        LEAKED_WRITE_BYTES.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            bytes = n,
            "a direct write failed; its buffers are kept, never reused (librados may still \
             reference them)"
        );
        bufs.into_iter().for_each(std::mem::forget);
        std::mem::forget(read);
        Vec::new()
    } else {
        // Not released on librados' completion thread: the read holds a
        // reference to its (other) cluster's ioctx.
        if let Some(r) = read {
            super::reaper::drop_later(r);
        }
        bufs
    };
    // A panic must not unwind into librados.
    let _ = catch_unwind(AssertUnwindSafe(move || done(res, bufs)));
}

/// Bytes of write buffers kept forever because their write failed and
/// librados may still reference them (see `write_complete`).
pub static LEAKED_WRITE_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The snapshot context of `image` (its header's: the newest snapshot id
/// ever and the ids of its snapshots, newest first), as librbd writes with.
pub(crate) fn snap_context(image: &Image) -> Result<(u64, Vec<u64>)> {
    let oid = format!("rbd_header.{}", image.id()?);
    let out = image
        .ioctx()
        .exec(&oid, "rbd", "get_snapcontext", &[], 64 << 10)?;
    decode_snap_context(&out)
        .ok_or_else(|| Error::from_errno(libc::EIO, "rbd.get_snapcontext", image.spec()))
}

/// Decodes a `SnapContext`: seq (u64), then a vector of snapshot ids (u32
/// count, u64 each), little endian.
pub(crate) fn decode_snap_context(b: &[u8]) -> Option<(u64, Vec<u64>)> {
    let u64_at = |at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));
    let seq = u64_at(0)?;
    let n = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?) as usize;
    if b.len() != 12 + n * 8 {
        return None;
    }
    let snaps = (0..n)
        .map(|i| u64_at(12 + i * 8))
        .collect::<Option<Vec<_>>>()?;
    Some((seq, snaps))
}

/// Object map state of an object that may exist (librbd's `OBJECT_EXISTS`).
const OBJECT_EXISTS: u8 = 1;

/// Object map updates in flight at once.
const MARK_PARALLEL: usize = 16;

/// Marks the objects in `runs` (each `start..end`) of `image` as existing
/// in its object map on disk (cls_rbd `object_map_update`, one call a run,
/// [`MARK_PARALLEL`] calls in flight),
/// before they are written directly: librbd skips reading an object its map
/// says does not exist. An object marked but never written reads as zeroes.
/// librbd's in-memory copy of the map does not see this: the caller makes
/// librbd reload it (re-acquiring the exclusive lock does) before librbd
/// writes or discards on the image. No-op without the object-map feature.
/// Blocking.
pub fn mark_objects_exist(image: &Image, runs: &[(u64, u64)]) -> Result<()> {
    if image.features()? & super::rbd::features::OBJECT_MAP == 0 {
        return Ok(());
    }
    let oid = format!("rbd_object_map.{}", image.id()?);
    let runs: Vec<(u64, u64)> = runs.iter().copied().filter(|r| r.0 < r.1).collect();
    let mark = |&(start, end): &(u64, u64)| -> Result<()> {
        // start, end (u64 little endian), the new state, and no current
        // state to compare with (an absent optional: one zero byte).
        let mut input = Vec::with_capacity(18);
        input.extend_from_slice(&start.to_le_bytes());
        input.extend_from_slice(&end.to_le_bytes());
        input.push(OBJECT_EXISTS);
        input.push(0);
        image
            .ioctx()
            .exec(&oid, "rbd", "object_map_update", &input, 0)
            .map(|_| ())
    };
    if runs.len() <= 1 {
        return runs.iter().try_for_each(mark);
    }
    // Several calls in flight rather than one round trip after the other
    // (256 scattered objects of a thin 1 TiB image took 1.3 s one by one).
    // Never several in one compound operation: each call reads the map as
    // it was before the operation, and the last one's write would undo the
    // others' marks.
    let next = AtomicUsize::new(0);
    let failed = parking_lot::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..runs.len().min(MARK_PARALLEL) {
            s.spawn(|| {
                while let Some(r) = runs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if let Err(e) = mark(r) {
                        failed.lock().get_or_insert(e);
                        // Stop the others at their next run.
                        next.store(runs.len(), Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    match failed.into_inner() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What a sparse read needs until its completion.
struct SparseState {
    off: u64,
    len: u64,
    done: SparseReadCallback,
    /// Keeps the ioctx alive while the read runs.
    io: Option<Arc<IoCtx>>,
    target: String,
}

// SAFETY: called by librados/the shim only, with the argument registered
// for it (see the first statement).
unsafe extern "C" fn sparse_complete(arg: *mut c_void, read: *mut c_void) {
    // SAFETY: arg is the Box<SparseState> leaked in `aio_sparse_read`; the
    // shim calls this exactly once per started read.
    let st = unsafe { Box::from_raw(arg.cast::<SparseState>()) };
    let SparseState {
        off,
        len,
        done,
        io,
        target,
    } = *st;
    let res = match NonNull::new(read) {
        Some(r) => SparseData::from_completed(r, off, len, &target),
        None => Err(Error::from_errno(
            libc::EIO,
            "rados_aio_sparse_read",
            target,
        )),
    };
    release_io(io);
    // A panic must not unwind into librados.
    let _ = catch_unwind(AssertUnwindSafe(move || done(res)));
}

/// Drops a reference to an ioctx from librados' completion thread: if it is
/// the last one, on the reaper thread (destroying an ioctx there could
/// deadlock).
pub(super) fn release_io(io: Option<Arc<IoCtx>>) {
    if let Some(last) = io.and_then(Arc::into_inner) {
        super::reaper::drop_later(last);
    }
}

/// What a compound read needs until its completion: the op and its output
/// slots, the buffer the reads fill, and the ioctx it runs on.
struct ReadState {
    op: NonNull<c_void>,
    lens: Vec<usize>,
    nread: Vec<usize>,
    rvals: Vec<c_int>,
    buf: Vec<u8>,
    done: ObjectReadCallback,
    /// Keeps the ioctx alive while the operation runs.
    io: Option<Arc<IoCtx>>,
    target: String,
}

impl Drop for ReadState {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_read_op, released exactly once,
        // after its operation completed or was never submitted.
        unsafe { sys::rados_release_read_op(self.op.as_ptr()) };
    }
}

impl ReadState {
    /// The result of the whole operation (`ret`) and of each read; short
    /// reads are zero-filled.
    fn finish(&mut self, ret: c_int) -> Result<()> {
        check(ret, "rados_aio_read_op_operate", || self.target.clone())?;
        let mut pos = 0usize;
        for ((&len, &got), &rv) in self.lens.iter().zip(&self.nread).zip(&self.rvals) {
            check(rv, "rados_read_op_read", || self.target.clone())?;
            if let Some(tail) = self.buf.get_mut(pos + got.min(len)..pos + len) {
                tail.fill(0);
            }
            pos += len;
        }
        Ok(())
    }
}

extern "C" fn read_complete(c: sys::rados_completion_t, arg: *mut c_void) {
    // SAFETY: arg is the Box<ReadState> leaked in `aio_read`; librados calls
    // this exactly once per completion, so the box is reclaimed once.
    let mut st = unsafe { Box::from_raw(arg.cast::<ReadState>()) };
    // SAFETY: c is the completion this callback was registered on; valid
    // until released right after.
    let ret = unsafe { sys::rados_aio_get_return_value(c) };
    // SAFETY: our only reference; librados keeps its own while calling back.
    unsafe { sys::rados_aio_release(c) };
    let res = st.finish(ret);
    let buf = std::mem::take(&mut st.buf);
    let done = std::mem::replace(&mut st.done, Box::new(|_, _| {}));
    let io = st.io.take();
    // The op goes before the caller hears of it.
    drop(st);
    release_io(io);
    // A panic must not unwind into librados.
    let _ = catch_unwind(AssertUnwindSafe(move || done(res, buf)));
}

/// Fuzz entry point (`fuzz/`): the `SnapContext` decoder (replies of
/// cls_rbd `get_snapcontext`) on arbitrary bytes. Not an API.
#[doc(hidden)]
pub fn fuzz_snap_context(data: &[u8]) {
    if let Some((seq, snaps)) = decode_snap_context(data) {
        assert_eq!(data.len(), 12 + snaps.len() * 8, "seq {seq}");
    }
}

#[cfg(test)]
mod tests {
    use super::decode_snap_context;

    #[test]
    fn snap_contexts_decode_and_reject_bad_lengths() {
        let mut b = 9u64.to_le_bytes().to_vec();
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&9u64.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        assert_eq!(decode_snap_context(&b), Some((9, vec![9, 4])));
        assert_eq!(decode_snap_context(&b[..b.len() - 1]), None);
        let mut empty = 0u64.to_le_bytes().to_vec();
        empty.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(decode_snap_context(&empty), Some((0, vec![])));
        assert_eq!(decode_snap_context(&[1, 2, 3]), None);
    }
}
