//! Asynchronous image I/O: `rbd_aio_*` with a completion callback.
//!
//! Each submission boxes its state (the caller's callback, the data buffer and
//! a reference to the image handle) and hands the box to librbd as the
//! completion argument; the completion callback takes the box back exactly
//! once, releases the completion and calls the caller's callback with the
//! result and the buffer. The buffer therefore lives until librbd is done
//! with it, whatever the caller does meanwhile, and the image cannot be closed
//! while I/O is in flight. Callbacks run on librbd's completion thread: they
//! must not block (send on a channel and return).

use std::ffi::{c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;

use super::error::{Error, Result, check};
use super::rbd::{Image, ImageHandle};
use csirr_ceph_sys as sys;

/// Callback of an aio: the result (bytes for reads, 0 otherwise) and the
/// buffer that was submitted (empty for ops without data).
pub type AioCallback = Box<dyn FnOnce(Result<usize>, Vec<u8>) + Send + 'static>;

struct AioState {
    done: AioCallback,
    buf: Vec<u8>,
    img: Arc<ImageHandle>,
    op: &'static str,
    off: u64,
    /// Where compare-and-write reports the first mismatching byte.
    mismatch: u64,
}

extern "C" fn complete(c: sys::rbd_completion_t, arg: *mut c_void) {
    // SAFETY: arg is the Box<AioState> leaked in `submit`; librbd calls this
    // exactly once per completion, so the box is reclaimed exactly once.
    let st = unsafe { Box::from_raw(arg.cast::<AioState>()) };
    // SAFETY: c is the completion this callback was registered on; it is
    // valid until released, which happens right after.
    let ret = unsafe { sys::rbd_aio_get_return_value(c) };
    // SAFETY: we own the only reference the C API gave us; releasing inside
    // the callback is allowed (librbd keeps its own reference while calling).
    unsafe { sys::rbd_aio_release(c) };
    let AioState {
        done,
        buf,
        img,
        op,
        off,
        ..
    } = *st;
    let res = if ret < 0 {
        let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
        Err(Error::from_errno(
            errno,
            op,
            format!("{} at {off}", img.name_for_aio()),
        ))
    } else {
        Ok(ret as usize)
    };
    // A panic must not unwind into librbd.
    let _ = catch_unwind(AssertUnwindSafe(move || done(res, buf)));
    // Closing an image from librbd's own completion thread would deadlock;
    // if this was the last reference, the reaper thread closes it.
    if let Some(last) = Arc::into_inner(img) {
        super::reaper::drop_later(last);
    }
}

impl Image {
    /// Leaks the state into a completion and calls `submit_fn` with the raw
    /// image, the buffer pointer and the completion. On a submission error the
    /// state is reclaimed and the callback is not called.
    fn submit(
        &self,
        op: &'static str,
        off: u64,
        buf: Vec<u8>,
        done: AioCallback,
        submit_fn: impl FnOnce(
            sys::rbd_image_t,
            *mut u8,
            usize,
            sys::rbd_completion_t,
            *mut u64,
        ) -> c_int,
    ) -> Result<()> {
        let mut st = Box::new(AioState {
            done,
            buf,
            img: Arc::clone(&self.h),
            op,
            off,
            mismatch: 0,
        });
        let bp = st.buf.as_mut_ptr();
        let bl = st.buf.len();
        let mm = ptr::from_mut(&mut st.mismatch);
        let arg = Box::into_raw(st);
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: arg is a valid pointer that `complete` reclaims; c is a
        // valid out-pointer.
        let ret = unsafe { sys::rbd_aio_create_completion(arg.cast(), Some(complete), &mut c) };
        if ret < 0 {
            // SAFETY: no completion exists, so the box is still only ours.
            drop(unsafe { Box::from_raw(arg) });
            return check(ret, "rbd_aio_create_completion", || self.spec()).map(|_| ());
        }
        let ret = submit_fn(self.h.raw(), bp, bl, c, mm);
        if ret < 0 {
            // SAFETY: a failed submission never fires the completion: release
            // it and reclaim the box ourselves.
            unsafe {
                sys::rbd_aio_release(c);
                drop(Box::from_raw(arg));
            }
            return check(ret, op, || format!("{} at {off}", self.spec())).map(|_| ());
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off` into `buf`; `done` gets the byte count
    /// and the filled buffer.
    pub fn aio_read(&self, off: u64, buf: Vec<u8>, done: AioCallback) -> Result<()> {
        self.submit("rbd_aio_read", off, buf, done, |img, bp, bl, c, _| {
            // SAFETY: bp points to bl writable bytes owned by the boxed state,
            // which lives until the completion fires.
            unsafe { sys::rbd_aio_read2(img, off, bl, bp.cast(), c, 0) }
        })
    }

    /// Writes `buf` at `off`; `done` gets the buffer back for reuse.
    pub fn aio_write(&self, off: u64, buf: Vec<u8>, done: AioCallback) -> Result<()> {
        self.submit("rbd_aio_write", off, buf, done, |img, bp, bl, c, _| {
            // SAFETY: bp points to bl readable bytes owned by the boxed state,
            // which lives until the completion fires.
            unsafe { sys::rbd_aio_write2(img, off, bl, bp.cast_const().cast(), c, 0) }
        })
    }

    /// Zeroes exactly `[off, off+len)` (unlike discard, which may leave
    /// unaligned parts unzeroed).
    pub fn aio_write_zeroes(&self, off: u64, len: u64, done: AioCallback) -> Result<()> {
        let len = usize::try_from(len)
            .map_err(|_| Error::invalid_input("rbd_aio_write_zeroes", "len"))?;
        self.submit(
            "rbd_aio_write_zeroes",
            off,
            Vec::new(),
            done,
            |img, _, _, c, _| {
                // SAFETY: no buffer is involved; the image and completion are live.
                unsafe { sys::rbd_aio_write_zeroes(img, off, len, c, 0, 0) }
            },
        )
    }

    /// Discards `[off, off+len)`.
    pub fn aio_discard(&self, off: u64, len: u64, done: AioCallback) -> Result<()> {
        self.submit(
            "rbd_aio_discard",
            off,
            Vec::new(),
            done,
            |img, _, _, c, _| {
                // SAFETY: no buffer is involved; the image and completion are live.
                unsafe { sys::rbd_aio_discard(img, off, len, c) }
            },
        )
    }

    /// Writes `pattern` repeated over `[off, off+len)`; `len` must be a
    /// multiple of the pattern's length.
    pub fn aio_writesame(
        &self,
        off: u64,
        len: u64,
        pattern: Vec<u8>,
        done: AioCallback,
    ) -> Result<()> {
        let len =
            usize::try_from(len).map_err(|_| Error::invalid_input("rbd_aio_writesame", "len"))?;
        self.submit(
            "rbd_aio_writesame",
            off,
            pattern,
            done,
            |img, bp, bl, c, _| {
                // SAFETY: bp points to bl readable bytes owned by the boxed state,
                // which lives until the completion fires.
                unsafe { sys::rbd_aio_writesame(img, off, len, bp.cast_const().cast(), bl, c, 0) }
            },
        )
    }

    /// Compares `[off, off+len)` with the first half of `cmp_then_write`
    /// and, when equal, writes its second half there (`len` bytes each).
    /// A mismatch fails with `EILSEQ` and writes nothing.
    pub fn aio_compare_and_write(
        &self,
        off: u64,
        cmp_then_write: Vec<u8>,
        done: AioCallback,
    ) -> Result<()> {
        if !cmp_then_write.len().is_multiple_of(2) {
            return Err(Error::invalid_input(
                "rbd_aio_compare_and_write",
                "odd buffer length",
            ));
        }
        let op = "rbd_aio_compare_and_write";
        self.submit(op, off, cmp_then_write, done, |img, bp, bl, c, mm| {
            let len = bl / 2;
            // SAFETY: bp points to bl readable bytes owned by the boxed state
            // (compare bytes then write bytes, len each) and mm to a u64 in
            // it, both alive until the completion fires.
            let ret = unsafe {
                sys::rbd_aio_compare_and_write(
                    img,
                    off,
                    len,
                    bp.cast_const().cast(),
                    bp.add(len).cast_const().cast(),
                    c,
                    mm,
                    0,
                )
            };
            c_int::try_from(ret).unwrap_or(-libc::EIO)
        })
    }

    /// Flushes everything written so far.
    pub fn aio_flush(&self, done: AioCallback) -> Result<()> {
        self.submit("rbd_aio_flush", 0, Vec::new(), done, |img, _, _, c, _| {
            // SAFETY: no buffer is involved; the image and completion are live.
            unsafe { sys::rbd_aio_flush(img, c) }
        })
    }

    /// Async form of [`Image::aio_read`]: resolves to the filled buffer.
    pub async fn read_async(&self, off: u64, len: usize) -> Result<Vec<u8>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.aio_read(
            off,
            vec![0u8; len],
            Box::new(move |r, buf| {
                let _ = tx.send(r.map(|n| {
                    let mut buf = buf;
                    buf.truncate(n);
                    buf
                }));
            }),
        )?;
        rx.await.unwrap_or_else(|_| {
            Err(Error::from_errno(
                libc::ECANCELED,
                "rbd_aio_read",
                self.spec(),
            ))
        })
    }

    /// Async form of [`Image::aio_write`].
    pub async fn write_async(&self, off: u64, data: Vec<u8>) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.aio_write(
            off,
            data,
            Box::new(move |r, _| {
                let _ = tx.send(r.map(|_| ()));
            }),
        )?;
        rx.await.unwrap_or_else(|_| {
            Err(Error::from_errno(
                libc::ECANCELED,
                "rbd_aio_write",
                self.spec(),
            ))
        })
    }
}
