//! RADOS watch/notify: a [`Watch`] calls a function whenever a client
//! notifies the watched object. librbd notifies `rbd_header.<id>` when an
//! image's snapshots or size change; the engine notifies its registry object
//! when a record changes. The replayer uses both to start a sync the moment
//! there is something to copy instead of at its next poll.

use std::ffi::{CString, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::ptr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::error::{Result, check};
use super::rados::{IoCtx, cstring};
use csirr_ceph_sys as sys;

/// What a watch callback needs; boxed, and freed only after the watch is
/// gone and librados flushed its callbacks.
struct WatchState {
    /// The watched object, for the acks.
    oid: CString,
    /// The ioctx the watch was registered on; the [`Watch`] keeps it alive.
    io: sys::rados_ioctx_t,
    on_event: Box<dyn Fn() + Send + Sync>,
    /// Set when librados reports the watch lost (disconnect, timeout).
    broken: AtomicBool,
}

/// A registered watch on one object. Dropping it unregisters the watch and
/// waits until no callback of it runs any more (so never drop one from
/// inside its own callback).
pub struct Watch {
    io: Arc<IoCtx>,
    cookie: u64,
    state: *mut WatchState,
    oid: String,
}

// The state is only read (Send + Sync callback, atomic flag), and librados
// allows watch calls on an ioctx from any thread.
// SAFETY: see above; nothing in the state is tied to a thread.
unsafe impl Send for Watch {}
// SAFETY: see `Send`; no method mutates through `&self`.
unsafe impl Sync for Watch {}

/// Acknowledges a notification and calls the owner's function.
// SAFETY: called by librados/the shim only, with the argument registered
// for it (see the first statement).
unsafe extern "C" fn on_notify(
    arg: *mut c_void,
    notify_id: u64,
    handle: u64,
    _notifier_id: u64,
    _data: *mut c_void,
    _data_len: usize,
) {
    // SAFETY: `arg` is the WatchState registered with this watch; it is freed
    // only after rados_unwatch2 and rados_watch_flush, so it is live here.
    let st = unsafe { &*arg.cast::<WatchState>() };
    // An empty ack: librbd ignores empty replies from watchers that do not
    // own the image's lock. Acking first keeps the notifier's wait short.
    // SAFETY: the ioctx outlives the watch (the Watch holds it); oid is a
    // live NUL-terminated string; a null buffer of length 0 is allowed.
    unsafe { sys::rados_notify_ack(st.io, st.oid.as_ptr(), notify_id, handle, ptr::null(), 0) };
    let _ = catch_unwind(AssertUnwindSafe(|| (st.on_event)()));
}

/// Marks the watch broken and wakes the owner, which re-registers it.
// SAFETY: called by librados/the shim only, with the argument registered
// for it (see the first statement).
unsafe extern "C" fn on_error(arg: *mut c_void, _cookie: u64, _err: i32) {
    // SAFETY: as in `on_notify`: the state is live until after the flush.
    let st = unsafe { &*arg.cast::<WatchState>() };
    st.broken.store(true, Ordering::Release);
    let _ = catch_unwind(AssertUnwindSafe(|| (st.on_event)()));
}

impl Watch {
    /// Watches `oid` in `io`: `on_event` runs (on a librados thread; keep it
    /// short and non-blocking) on every notification and when the watch
    /// breaks. Blocking.
    pub fn new(io: &Arc<IoCtx>, oid: &str, on_event: Box<dyn Fn() + Send + Sync>) -> Result<Self> {
        let c = cstring(oid, "rados_watch3")?;
        let state = Box::into_raw(Box::new(WatchState {
            oid: c,
            io: io.raw(),
            on_event,
            broken: AtomicBool::new(false),
        }));
        let mut cookie = 0u64;
        // The oid lives in the boxed state, allocated until Drop (or just below
        // on failure). Timeout 30 s is Ceph's default watch timeout.
        // SAFETY: live ioctx and oid; callbacks match librados' signatures.
        let ret = unsafe {
            sys::rados_watch3(
                io.raw(),
                (*state).oid.as_ptr(),
                &mut cookie,
                Some(on_notify),
                Some(on_error),
                30,
                state.cast(),
            )
        };
        if let Err(e) = check(ret, "rados_watch3", || format!("{}/{oid}", io.spec())) {
            // SAFETY: the watch was not registered, so no callback can see
            // the state; it came from Box::into_raw above.
            drop(unsafe { Box::from_raw(state) });
            return Err(e);
        }
        Ok(Self {
            io: Arc::clone(io),
            cookie,
            state,
            oid: oid.to_string(),
        })
    }

    /// Whether the watch is still registered: false once librados reported
    /// an error or the OSD no longer knows it; the owner then drops it and
    /// watches again.
    pub fn healthy(&self) -> bool {
        // SAFETY: the state is live while self is.
        if unsafe { &*self.state }.broken.load(Ordering::Acquire) {
            return false;
        }
        // SAFETY: the ioctx is live and the cookie came from rados_watch3.
        unsafe { sys::rados_watch_check(self.io.raw(), self.cookie) >= 0 }
    }

    /// The watched object, for logs.
    pub fn object(&self) -> &str {
        &self.oid
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // The flush waits for queued callbacks; after it none can see the state.
        // SAFETY: cookie from rados_watch3 on this live ioctx; state freed once.
        unsafe {
            sys::rados_unwatch2(self.io.raw(), self.cookie);
            sys::rados_watch_flush(self.io.cluster().raw());
            drop(Box::from_raw(self.state));
        }
    }
}

impl IoCtx {
    /// Notifies the watchers of `oid` (an empty message) and waits up to
    /// `timeout` for their acks. A watcher that does not ack in time is not
    /// an error of the caller: the result is `Ok` once the notify was sent.
    /// Blocking.
    pub fn notify(&self, oid: &str, timeout: Duration) -> Result<()> {
        let o = cstring(oid, "rados_notify2")?;
        let mut reply: *mut std::os::raw::c_char = ptr::null_mut();
        let mut reply_len = 0usize;
        // The empty message is a null pointer of length 0.
        // SAFETY: live ioctx, NUL-terminated o, reply out-pointers are locals.
        let ret = unsafe {
            sys::rados_notify2(
                self.raw(),
                o.as_ptr(),
                ptr::null(),
                0,
                timeout.as_millis() as u64,
                &mut reply,
                &mut reply_len,
            )
        };
        if !reply.is_null() {
            // SAFETY: librados allocated the reply buffer; freed once.
            unsafe { sys::rados_buffer_free(reply) };
        }
        match check(ret, "rados_notify2", || format!("{}/{oid}", self.spec())) {
            Ok(_) => Ok(()),
            Err(e) if ret == -libc::ETIMEDOUT => {
                tracing::debug!(error = %e, "a watcher did not ack a notify in time");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// What a notify sent with [`IoCtx::notify_in_background`] needs until its
/// completion: the reply librados fills in, and the ioctx it runs on.
struct NotifyState {
    reply: *mut std::os::raw::c_char,
    reply_len: usize,
    io: Option<Arc<IoCtx>>,
    oid: String,
}

impl IoCtx {
    /// Notifies the watchers of `oid` (an empty message) without waiting:
    /// librados collects their acks for up to `timeout` in the background.
    /// The result is only logged (at debug): callers use it where a lost
    /// notification merely delays the watchers until their next poll.
    /// Fails only when the notify cannot be submitted.
    pub fn notify_in_background(self: &Arc<Self>, oid: &str, timeout: Duration) -> Result<()> {
        let o = cstring(oid, "rados_aio_notify")?;
        let st = Box::new(NotifyState {
            reply: ptr::null_mut(),
            reply_len: 0,
            io: Some(Arc::clone(self)),
            oid: oid.to_string(),
        });
        let arg = Box::into_raw(st);
        let mut c: sys::rados_completion_t = ptr::null_mut();
        let cb: sys::rados_callback_t = Some(notify_complete);
        // SAFETY: arg is reclaimed by `notify_complete` (or below on failure).
        let ret = unsafe { sys::rados_aio_create_completion2(arg.cast(), cb, &mut c) };
        if ret < 0 {
            // SAFETY: no completion exists: the box is still only ours.
            drop(unsafe { Box::from_raw(arg) });
            return check(ret, "rados_aio_create_completion2", || self.spec()).map(|_| ());
        }
        // SAFETY: live ioctx and completion; o is NUL-terminated and copied
        // before the call returns; the empty message is a null pointer of
        // length 0; the reply out-pointers are fields of the boxed state,
        // which stays where it is until `notify_complete` reclaims it, after
        // librados wrote them.
        let ret = unsafe {
            sys::rados_aio_notify(
                self.raw(),
                o.as_ptr(),
                c,
                ptr::null(),
                0,
                timeout.as_millis() as u64,
                &raw mut (*arg).reply,
                &raw mut (*arg).reply_len,
            )
        };
        if ret < 0 {
            // SAFETY: a failed submission never fires the completion:
            // release it and reclaim the box ourselves.
            unsafe {
                sys::rados_aio_release(c);
                drop(Box::from_raw(arg));
            }
            return check(ret, "rados_aio_notify", || format!("{}/{oid}", self.spec())).map(|_| ());
        }
        Ok(())
    }
}

extern "C" fn notify_complete(c: sys::rados_completion_t, arg: *mut c_void) {
    // SAFETY: arg is the Box<NotifyState> leaked in `notify_in_background`;
    // librados calls this exactly once per completion.
    let mut st = unsafe { Box::from_raw(arg.cast::<NotifyState>()) };
    // SAFETY: c is the completion this callback was registered on; valid
    // until released right after.
    let ret = unsafe { sys::rados_aio_get_return_value(c) };
    // SAFETY: our only reference; librados keeps its own while calling back.
    unsafe { sys::rados_aio_release(c) };
    if !st.reply.is_null() {
        // SAFETY: librados allocated the reply buffer; freed once.
        unsafe { sys::rados_buffer_free(st.reply) };
    }
    if ret < 0 && ret != -libc::ETIMEDOUT {
        // No panic may unwind into librados; logging does not panic.
        tracing::debug!(object = %st.oid, errno = -ret, "notify failed");
    }
    super::objects::release_io(st.io.take());
}
