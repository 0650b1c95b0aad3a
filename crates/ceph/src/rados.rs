//! librados: cluster connections, I/O contexts (pool + RADOS namespace),
//! omap reads and writes, and cls advisory locks.
//!
//! Ownership: a [`Cluster`] is shared through `Arc`; every [`IoCtx`] holds an
//! `Arc<Cluster>` so the connection outlives its I/O contexts, and every
//! image (see [`super::rbd`]) holds an `Arc<IoCtx>`.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, c_char, c_int};
use std::ptr::{self, NonNull};
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::error::{Error, Result, check, check_i64};
use csirr_ceph_sys as sys;

/// Converts a Rust string for C, refusing interior NUL bytes.
pub(crate) fn cstring(s: &str, op: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid_input(op, s.replace('\0', "\\0")))
}

/// How to reach and authenticate to a cluster.
#[derive(Clone, Default)]
pub struct ConnectConfig {
    /// Monitor addresses (`mon_host`), e.g. `v2:10.0.0.1:3300,10.0.0.2:6789`.
    pub mon_host: Option<String>,
    /// Cephx user without the `client.` prefix, e.g. `csi-rbd-provisioner`.
    pub user: String,
    /// Cephx secret key (base64). Never logged; wiped on drop.
    pub key: Option<Zeroizing<String>>,
    /// A ceph.conf to read instead of (or before) `mon_host`.
    pub conf_file: Option<String>,
    /// A keyring file instead of `key`.
    pub keyring: Option<String>,
    /// Bound on connecting and on monitor/OSD operations, so that an
    /// unreachable cluster fails instead of hanging.
    pub op_timeout: Option<Duration>,
}

impl std::fmt::Debug for ConnectConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is deliberately left out.
        f.debug_struct("ConnectConfig")
            .field("mon_host", &self.mon_host)
            .field("user", &self.user)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("conf_file", &self.conf_file)
            .field("keyring", &self.keyring)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// A connected librados cluster handle (`rados_t`).
pub struct Cluster {
    handle: NonNull<std::ffi::c_void>,
    fsid: String,
}

// librados documents `rados_t` as thread-safe once connected: all calls made
// through it may come from any thread concurrently. This type only exposes
// calls that are valid after `rados_connect`, and configuration setters are
// only used inside `connect` before the handle is shared.
// SAFETY: as above.
unsafe impl Send for Cluster {}
// SAFETY: see `Send`; no method takes the handle mutably after connect.
unsafe impl Sync for Cluster {}

impl Cluster {
    /// Creates a handle, applies `cfg`, and connects. Blocking: call from a
    /// blocking thread.
    pub fn connect(cfg: &ConnectConfig) -> Result<Arc<Self>> {
        let cluster_name = cstring("ceph", "rados_create2")?;
        let client = cstring(&format!("client.{}", cfg.user), "rados_create2")?;
        let mut raw: sys::rados_t = ptr::null_mut();
        let ret =
            // SAFETY: valid out-pointer; NUL-terminated strings, copied by librados.
            unsafe { sys::rados_create2(&mut raw, cluster_name.as_ptr(), client.as_ptr(), 0) };
        check(ret, "rados_create2", || cfg.user.clone())?;
        let handle = NonNull::new(raw)
            .ok_or_else(|| Error::from_errno(libc::ENOMEM, "rados_create2", cfg.user.clone()))?;
        // From here on the guard shuts the handle down on any error path.
        let mut this = Self {
            handle,
            fsid: String::new(),
        };
        if let Some(conf) = &cfg.conf_file {
            let path = cstring(conf, "rados_conf_read_file")?;
            // SAFETY: handle is a created, not yet connected rados_t; path is
            // NUL-terminated and valid for the call.
            let ret = unsafe { sys::rados_conf_read_file(this.raw(), path.as_ptr()) };
            check(ret, "rados_conf_read_file", || conf.clone())?;
        }
        if let Some(mon) = &cfg.mon_host {
            this.conf_set("mon_host", mon)?;
        }
        if let Some(keyring) = &cfg.keyring {
            this.conf_set("keyring", keyring)?;
        }
        if let Some(key) = &cfg.key {
            this.conf_set_secret("key", key)?;
        }
        if let Some(t) = cfg.op_timeout {
            let secs = t.as_secs().max(1).to_string();
            this.conf_set("client_mount_timeout", &secs)?;
            this.conf_set("rados_mon_op_timeout", &secs)?;
            this.conf_set("rados_osd_op_timeout", &secs)?;
        }
        // No librbd write-back cache: copies are large aio streams flushed at
        // the end, and every image held open would otherwise keep up to
        // rbd_cache_size (32 MiB) of dirty data in this process.
        this.conf_set("rbd_cache", "false")?;
        // Zero-copy aio writes: librbd sends the caller's buffer instead of a
        // copy, and holds the completion back until it released it; our aio
        // wrappers keep every buffer alive until its completion fires, so
        // this only saves a copy (memory and CPU) of everything replicated.
        this.conf_set("rbd_disable_zero_copy_writes", "false")?;
        // No client admin socket, whatever a ceph.conf says: the socket would
        // answer `config show` (the cephx key included) to anyone who can
        // open it. The default for clients is none; this holds it.
        this.conf_set("admin_socket", "")?;
        // Quiet librados' own stderr logging; errors come back as codes.
        this.conf_set("log_to_stderr", "false")?;
        this.conf_set("err_to_stderr", "false")?;
        // SAFETY: handle is created and configured; connect may be called once.
        let ret = unsafe { sys::rados_connect(this.raw()) };
        check(ret, "rados_connect", || {
            cfg.mon_host
                .clone()
                .or(cfg.conf_file.clone())
                .unwrap_or_default()
        })?;
        this.fsid = this.read_fsid()?;
        Ok(Arc::new(this))
    }

    fn conf_set(&mut self, option: &str, value: &str) -> Result<()> {
        let o = cstring(option, "rados_conf_set")?;
        let v = cstring(value, "rados_conf_set")?;
        // SAFETY: handle is created and not yet connected (only called from
        // `connect`); both strings are NUL-terminated and outlive the call.
        let ret = unsafe { sys::rados_conf_set(self.raw(), o.as_ptr(), v.as_ptr()) };
        check(ret, "rados_conf_set", || format!("{option}={value}")).map(|_| ())
    }

    /// Like `conf_set`, but the value never appears in an error message,
    /// and the C copy of it is wiped after librados has taken its own.
    fn conf_set_secret(&mut self, option: &str, value: &str) -> Result<()> {
        let o = cstring(option, "rados_conf_set")?;
        let v = Zeroizing::new(
            CString::new(value)
                .map_err(|_| Error::invalid_input("rados_conf_set", option.to_string()))?
                .into_bytes_with_nul(),
        );
        // SAFETY: as in `conf_set`: `v` is NUL-terminated (into_bytes_with_nul)
        // and outlives the call; librados copies the value.
        let ret = unsafe { sys::rados_conf_set(self.raw(), o.as_ptr(), v.as_ptr().cast()) };
        check(ret, "rados_conf_set", || option.to_string()).map(|_| ())
    }

    fn read_fsid(&self) -> Result<String> {
        let mut buf = [0u8; 64];
        // SAFETY: buf is writable for its full length, which is passed.
        let ret = unsafe {
            sys::rados_cluster_fsid(self.raw(), buf.as_mut_ptr().cast::<c_char>(), buf.len())
        };
        let n = check(ret, "rados_cluster_fsid", String::new)? as usize;
        Ok(String::from_utf8_lossy(&buf[..n.min(buf.len())])
            .trim_end_matches('\0')
            .to_string())
    }

    pub(crate) fn raw(&self) -> sys::rados_t {
        self.handle.as_ptr()
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// This client's global instance id (unique per connection).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: handle is connected; the call only reads client state.
        unsafe { sys::rados_get_instance_id(self.raw()) }
    }

    /// Asks the monitors for the newest OSD map: a cheap liveness check that
    /// any cephx user may do. Blocking.
    pub fn ping(&self) -> Result<()> {
        // SAFETY: handle is connected.
        let ret = unsafe { sys::rados_wait_for_latest_osdmap(self.raw()) };
        check(ret, "rados_wait_for_latest_osdmap", String::new).map(|_| ())
    }

    /// Names of all pools.
    pub fn pool_list(&self) -> Result<Vec<String>> {
        let mut len = 4096usize;
        loop {
            let mut buf = vec![0u8; len];
            let ret =
                // SAFETY: buf is writable for `len` bytes.
                unsafe { sys::rados_pool_list(self.raw(), buf.as_mut_ptr().cast::<c_char>(), len) };
            let need = check(ret, "rados_pool_list", String::new)? as usize;
            if need > len {
                len = need;
                continue;
            }
            return Ok(split_nul_list(&buf[..need]));
        }
    }

    /// Pool id of a pool name.
    pub fn pool_lookup(&self, name: &str) -> Result<i64> {
        let c = cstring(name, "rados_pool_lookup")?;
        // SAFETY: c is NUL-terminated and valid for the call.
        let ret = unsafe { sys::rados_pool_lookup(self.raw(), c.as_ptr()) };
        check_i64(ret, "rados_pool_lookup", || name.to_string())
    }

    /// Pool name of a pool id.
    pub fn pool_reverse_lookup(&self, id: i64) -> Result<String> {
        let mut buf = vec![0u8; 512];
        // SAFETY: buf is writable for its full length, which is passed.
        let ret = unsafe {
            sys::rados_pool_reverse_lookup(
                self.raw(),
                id,
                buf.as_mut_ptr().cast::<c_char>(),
                buf.len(),
            )
        };
        let n = check(ret, "rados_pool_reverse_lookup", || id.to_string())? as usize;
        Ok(String::from_utf8_lossy(&buf[..n.min(buf.len())])
            .trim_end_matches('\0')
            .to_string())
    }

    /// Opens an I/O context on `pool`, in RADOS namespace `namespace` (empty
    /// for the default namespace).
    pub fn ioctx(self: &Arc<Self>, pool: &str, namespace: &str) -> Result<Arc<IoCtx>> {
        let id = self.pool_lookup(pool)?;
        self.ioctx_by_id(id, pool, namespace)
    }

    /// Opens an I/O context by pool id.
    pub fn ioctx_by_id(
        self: &Arc<Self>,
        pool_id: i64,
        pool_name: &str,
        namespace: &str,
    ) -> Result<Arc<IoCtx>> {
        self.new_ioctx(pool_id, pool_name, namespace, None, None)
            .map(Arc::new)
    }

    /// Opens an I/O context by pool id whose writes carry the self-managed
    /// snapshot context `seq`, `snaps` (ids, newest first), as librbd's
    /// writes to an image's data objects do.
    pub fn ioctx_with_snapc(
        self: &Arc<Self>,
        pool_id: i64,
        pool_name: &str,
        namespace: &str,
        seq: u64,
        snaps: &[u64],
    ) -> Result<IoCtx> {
        self.new_ioctx(pool_id, pool_name, namespace, None, Some((seq, snaps)))
    }

    /// Opens an I/O context by pool id whose reads see the pool snapshot
    /// (or self-managed snapshot, as RBD's) `snap_id`.
    pub fn ioctx_at_snap(
        self: &Arc<Self>,
        pool_id: i64,
        pool_name: &str,
        namespace: &str,
        snap_id: u64,
    ) -> Result<IoCtx> {
        self.new_ioctx(pool_id, pool_name, namespace, Some(snap_id), None)
    }

    fn new_ioctx(
        self: &Arc<Self>,
        pool_id: i64,
        pool_name: &str,
        namespace: &str,
        read_snap: Option<u64>,
        write_snapc: Option<(u64, &[u64])>,
    ) -> Result<IoCtx> {
        let ns = cstring(namespace, "rados_ioctx_set_namespace")?;
        let snapc = match write_snapc {
            Some((seq, snaps)) => {
                let n = c_int::try_from(snaps.len()).map_err(|_| {
                    Error::invalid_input("rados_ioctx_selfmanaged_snap_set_write_ctx", pool_name)
                })?;
                Some((seq, snaps.to_vec(), n))
            }
            None => None,
        };
        let mut raw: sys::rados_ioctx_t = ptr::null_mut();
        // SAFETY: handle is connected; raw is a valid out-pointer.
        let ret = unsafe { sys::rados_ioctx_create2(self.raw(), pool_id, &mut raw) };
        check(ret, "rados_ioctx_create2", || pool_name.to_string())?;
        let handle = NonNull::new(raw).ok_or_else(|| {
            Error::from_errno(libc::ENOMEM, "rados_ioctx_create2", pool_name.to_string())
        })?;
        // SAFETY: the new ioctx is not shared yet, so no I/O races the change;
        // ns is NUL-terminated and copied by librados.
        unsafe { sys::rados_ioctx_set_namespace(handle.as_ptr(), ns.as_ptr()) };
        if let Some(snap) = read_snap {
            // SAFETY: as above, the ioctx is not shared yet.
            unsafe { sys::rados_ioctx_snap_set_read(handle.as_ptr(), snap) };
        }
        if let Some((seq, mut ids, n)) = snapc {
            // SAFETY: as above, the ioctx is not shared yet; the ids are
            // valid for the call (librados copies them).
            let ret = unsafe {
                sys::rados_ioctx_selfmanaged_snap_set_write_ctx(
                    handle.as_ptr(),
                    seq,
                    ids.as_mut_ptr(),
                    n,
                )
            };
            if ret < 0 {
                // SAFETY: created above, not shared, destroyed once.
                unsafe { sys::rados_ioctx_destroy(handle.as_ptr()) };
                check(ret, "rados_ioctx_selfmanaged_snap_set_write_ctx", || {
                    pool_name.to_string()
                })?;
            }
        }
        Ok(IoCtx {
            handle,
            pool_id,
            pool: pool_name.to_string(),
            namespace: namespace.to_string(),
            cluster: Arc::clone(self),
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create2 and is shut down
        // exactly once; every IoCtx holds an Arc<Cluster>, so none is alive.
        unsafe { sys::rados_shutdown(self.raw()) };
    }
}

/// Splits a buffer of NUL-terminated strings ending with an empty string.
fn split_nul_list(buf: &[u8]) -> Vec<String> {
    buf.split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// An I/O context: one pool and one RADOS namespace.
pub struct IoCtx {
    handle: NonNull<std::ffi::c_void>,
    pool_id: i64,
    pool: String,
    namespace: String,
    cluster: Arc<Cluster>,
}

// librados documents I/O on one ioctx from several threads as safe; only
// changing its settings (namespace, snap context, locator) is not. The
// namespace and read snapshot are set once in `Cluster::new_ioctx` before the
// ioctx is shared and no method changes settings afterwards.
// SAFETY: as above.
unsafe impl Send for IoCtx {}
// SAFETY: see `Send`.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create2, destroyed exactly once; every
        // image holds an Arc<IoCtx>, so no image uses it any more.
        unsafe { sys::rados_ioctx_destroy(self.raw()) };
    }
}

/// Comparison operators for [`WriteOp::omap_cmp`].
#[derive(Debug, Clone, Copy)]
pub enum OmapCmp {
    /// The stored value equals the given one.
    Eq,
}

impl IoCtx {
    pub(crate) fn raw(&self) -> sys::rados_ioctx_t {
        self.handle.as_ptr()
    }

    /// The cluster this ioctx belongs to.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Pool name.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Pool id.
    pub fn pool_id(&self) -> i64 {
        self.pool_id
    }

    /// RADOS namespace ("" for the default one).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `pool` or `pool/namespace`, for messages.
    pub fn spec(&self) -> String {
        if self.namespace.is_empty() {
            self.pool.clone()
        } else {
            format!("{}/{}", self.pool, self.namespace)
        }
    }

    /// Reads up to `max` omap pairs of `oid` with keys after `start_after`
    /// and starting with `prefix`. Returns the pairs and whether more remain.
    pub fn omap_get_vals(
        &self,
        oid: &str,
        start_after: &str,
        prefix: &str,
        max: u64,
    ) -> Result<(BTreeMap<String, Vec<u8>>, bool)> {
        let o = cstring(oid, "rados_read_op_omap_get_vals2")?;
        let after = cstring(start_after, "rados_read_op_omap_get_vals2")?;
        let pre = cstring(prefix, "rados_read_op_omap_get_vals2")?;
        let op = ReadOp::new()?;
        let mut iter: sys::rados_omap_iter_t = ptr::null_mut();
        let mut more: u8 = 0;
        let mut prval: i32 = 0;
        // SAFETY: op is a live read op; the strings, iter, more and prval
        // outlive `operate` below, which is when librados fills them.
        unsafe {
            sys::rados_read_op_omap_get_vals2(
                op.raw(),
                after.as_ptr(),
                pre.as_ptr(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            )
        };
        let target = || format!("{}/{oid}", self.spec());
        op.operate(self, &o, target)?;
        let iter = OmapIter::new(iter);
        check(prval, "rados_read_op_omap_get_vals2", target)?;
        Ok((iter.collect_all()?, more != 0))
    }

    /// Reads every omap pair of `oid` whose key starts with `prefix`.
    pub fn omap_get_all(&self, oid: &str, prefix: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut after = String::new();
        loop {
            let (page, more) = self.omap_get_vals(oid, &after, prefix, 512)?;
            if let Some(last) = page.keys().next_back() {
                after = last.clone();
            }
            let empty = page.is_empty();
            out.extend(page);
            if !more || empty {
                return Ok(out);
            }
        }
    }

    /// Reads the given omap keys of `oid`; missing keys are absent from the
    /// result. `NotFound` when the object does not exist.
    pub fn omap_get_vals_by_keys(
        &self,
        oid: &str,
        keys: &[&str],
    ) -> Result<BTreeMap<String, Vec<u8>>> {
        let o = cstring(oid, "rados_read_op_omap_get_vals_by_keys2")?;
        let ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr().cast()).collect();
        let lens: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        let op = ReadOp::new()?;
        let mut iter: sys::rados_omap_iter_t = ptr::null_mut();
        let mut prval: i32 = 0;
        // SAFETY: keys are passed with explicit lengths (no NUL needed); the
        // key buffers, ptrs, lens, iter and prval outlive `operate` below.
        unsafe {
            sys::rados_read_op_omap_get_vals_by_keys2(
                op.raw(),
                ptrs.as_ptr(),
                keys.len(),
                lens.as_ptr(),
                &mut iter,
                &mut prval,
            )
        };
        let target = || format!("{}/{oid}", self.spec());
        op.operate(self, &o, target)?;
        let iter = OmapIter::new(iter);
        check(prval, "rados_read_op_omap_get_vals_by_keys2", target)?;
        iter.collect_all()
    }

    /// Sets omap pairs on `oid`, creating the object if needed.
    pub fn omap_set(&self, oid: &str, pairs: &[(&str, &[u8])]) -> Result<()> {
        let mut op = WriteOp::new()?;
        op.create(false);
        op.omap_set(pairs);
        op.operate(self, oid)
    }

    /// Removes omap keys from `oid` (missing keys are not an error).
    pub fn omap_rm_keys(&self, oid: &str, keys: &[&str]) -> Result<()> {
        let mut op = WriteOp::new()?;
        op.omap_rm_keys(keys);
        op.operate(self, oid)
    }

    /// Runs object class method `cls.method` on `oid` with `input`; returns
    /// its output (at most `out_max` bytes, else `InvalidInput`). Blocking.
    pub fn exec(
        &self,
        oid: &str,
        cls: &str,
        method: &str,
        input: &[u8],
        out_max: usize,
    ) -> Result<Vec<u8>> {
        let o = cstring(oid, "rados_exec")?;
        let c = cstring(cls, "rados_exec")?;
        let m = cstring(method, "rados_exec")?;
        let mut out = vec![0u8; out_max];
        // SAFETY: ioctx is live; the strings are NUL-terminated, the input
        // and the output buffer valid for the call with their lengths.
        let ret = unsafe {
            sys::rados_exec(
                self.raw(),
                o.as_ptr(),
                c.as_ptr(),
                m.as_ptr(),
                input.as_ptr().cast(),
                input.len(),
                out.as_mut_ptr().cast(),
                out.len(),
            )
        };
        let n = check(ret, "rados_exec", || {
            format!("{}/{oid} {cls}.{method}", self.spec())
        })?;
        out.truncate(usize::try_from(n).unwrap_or(0));
        Ok(out)
    }

    /// Reads up to `buf.len()` bytes of object `oid` from offset `off`;
    /// returns how many were read (fewer at the end of the object, 0 past
    /// it). `NotFound` when the object does not exist. Blocking.
    pub fn read(&self, oid: &str, off: u64, buf: &mut [u8]) -> Result<usize> {
        let o = cstring(oid, "rados_read")?;
        // SAFETY: ioctx is live; o is NUL-terminated; buf is writable for
        // the length passed, and librados writes at most that many bytes
        // before returning (the call is synchronous).
        let ret = unsafe {
            sys::rados_read(
                self.raw(),
                o.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off,
            )
        };
        let n = check(ret, "rados_read", || format!("{}/{oid}", self.spec()))?;
        Ok(usize::try_from(n).unwrap_or(0).min(buf.len()))
    }

    /// Reads up to `len` bytes of object `oid` from offset `off` into a new
    /// vector of what was read (shorter at the end of the object, empty past
    /// it), without zeroing `len` bytes first: a read that usually finds
    /// little (a journal object read at its end) costs no memset of its
    /// whole bound. `NotFound` when the object does not exist. Blocking.
    pub fn read_to_vec(&self, oid: &str, off: u64, len: usize) -> Result<Vec<u8>> {
        let o = cstring(oid, "rados_read")?;
        let mut out: Vec<u8> = Vec::with_capacity(len);
        // SAFETY: ioctx is live; o is NUL-terminated; the vector's spare
        // capacity is writable for `len` bytes (it was reserved above), and
        // librados writes at most that many bytes before the synchronous
        // call returns. Nothing reads the spare capacity before `set_len`.
        let ret = unsafe {
            sys::rados_read(
                self.raw(),
                o.as_ptr(),
                out.spare_capacity_mut().as_mut_ptr().cast(),
                len,
                off,
            )
        };
        let n = check(ret, "rados_read", || format!("{}/{oid}", self.spec()))?;
        let n = usize::try_from(n).unwrap_or(0).min(len);
        // SAFETY: librados initialized the first `n` bytes (its return
        // value), and `n <= len <= capacity`.
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// The size of object `oid`. `NotFound` when it does not exist.
    /// Blocking.
    pub fn stat(&self, oid: &str) -> Result<u64> {
        let o = cstring(oid, "rados_stat")?;
        let mut size: u64 = 0;
        let mut mtime: sys::time_t = 0;
        // SAFETY: ioctx is live; o is NUL-terminated and valid for the call;
        // size and mtime are writable locals that librados fills before the
        // synchronous call returns.
        let ret = unsafe { sys::rados_stat(self.raw(), o.as_ptr(), &mut size, &mut mtime) };
        check(ret, "rados_stat", || format!("{}/{oid}", self.spec()))?;
        Ok(size)
    }

    /// Removes object `oid`.
    pub fn remove(&self, oid: &str) -> Result<()> {
        let o = cstring(oid, "rados_remove")?;
        // SAFETY: ioctx is live; o is NUL-terminated and valid for the call.
        let ret = unsafe { sys::rados_remove(self.raw(), o.as_ptr()) };
        check(ret, "rados_remove", || format!("{}/{oid}", self.spec())).map(|_| ())
    }

    /// Takes (or renews, with the same cookie) an exclusive cls lock on `oid`
    /// that expires after `duration` unless renewed: a lease.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        name: &str,
        cookie: &str,
        desc: &str,
        duration: Option<Duration>,
    ) -> Result<()> {
        let o = cstring(oid, "rados_lock_exclusive")?;
        let n = cstring(name, "rados_lock_exclusive")?;
        let c = cstring(cookie, "rados_lock_exclusive")?;
        let d = cstring(desc, "rados_lock_exclusive")?;
        let mut tv = duration.map(|d| libc::timeval {
            tv_sec: d.as_secs() as libc::time_t,
            tv_usec: d.subsec_micros() as libc::suseconds_t,
        });
        let tvp = tv
            .as_mut()
            .map_or(ptr::null_mut(), |t| ptr::from_mut(t).cast::<sys::timeval>());
        // Flag 1 is LOCK_FLAG_MAY_RENEW: renewing our own lock is not EEXIST.
        // SAFETY: NUL-terminated strings; tvp is null or a live timeval.
        let ret = unsafe {
            sys::rados_lock_exclusive(
                self.raw(),
                o.as_ptr(),
                n.as_ptr(),
                c.as_ptr(),
                d.as_ptr(),
                tvp,
                1,
            )
        };
        check(ret, "rados_lock_exclusive", || {
            format!("{}/{oid}", self.spec())
        })
        .map(|_| ())
    }

    /// Releases a cls lock taken with [`IoCtx::lock_exclusive`].
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<()> {
        let o = cstring(oid, "rados_unlock")?;
        let n = cstring(name, "rados_unlock")?;
        let c = cstring(cookie, "rados_unlock")?;
        // SAFETY: all strings are NUL-terminated and valid for the call.
        let ret = unsafe { sys::rados_unlock(self.raw(), o.as_ptr(), n.as_ptr(), c.as_ptr()) };
        check(ret, "rados_unlock", || format!("{}/{oid}", self.spec())).map(|_| ())
    }
}

/// A compound write on one object, applied atomically.
pub struct WriteOp {
    handle: NonNull<std::ffi::c_void>,
    /// Buffers that must stay alive until `operate` (librados keeps pointers).
    keep: Vec<Vec<u8>>,
    #[allow(clippy::vec_box)] // each i32 needs a stable address librados writes to
    cmp_rvals: Vec<Box<i32>>,
}

impl WriteOp {
    /// A new empty write op.
    pub fn new() -> Result<Self> {
        // SAFETY: no preconditions; returns null on allocation failure.
        let raw = unsafe { sys::rados_create_write_op() };
        let handle = NonNull::new(raw)
            .ok_or_else(|| Error::from_errno(libc::ENOMEM, "rados_create_write_op", ""))?;
        Ok(Self {
            handle,
            keep: Vec::new(),
            cmp_rvals: Vec::new(),
        })
    }

    fn raw(&self) -> sys::rados_write_op_t {
        self.handle.as_ptr()
    }

    /// Creates the object; with `exclusive`, fails with `AlreadyExists` if it
    /// exists.
    pub fn create(&mut self, exclusive: bool) {
        // SAFETY: op is live; category may be null.
        unsafe { sys::rados_write_op_create(self.raw(), i32::from(exclusive), ptr::null()) };
    }

    /// Fails the whole op with `NotFound` unless the object exists.
    pub fn assert_exists(&mut self) {
        // SAFETY: op is live.
        unsafe { sys::rados_write_op_assert_exists(self.raw()) };
    }

    /// Removes the object.
    pub fn remove(&mut self) {
        // SAFETY: op is live.
        unsafe { sys::rados_write_op_remove(self.raw()) };
    }

    /// Sets omap pairs.
    pub fn omap_set(&mut self, pairs: &[(&str, &[u8])]) {
        let mut keys: Vec<Vec<u8>> = pairs.iter().map(|(k, _)| k.as_bytes().to_vec()).collect();
        let mut vals: Vec<Vec<u8>> = pairs.iter().map(|(_, v)| v.to_vec()).collect();
        let kp: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr().cast()).collect();
        let vp: Vec<*const c_char> = vals.iter().map(|v| v.as_ptr().cast()).collect();
        let kl: Vec<usize> = keys.iter().map(Vec::len).collect();
        let vl: Vec<usize> = vals.iter().map(Vec::len).collect();
        // SAFETY: op is live; librados copies keys and values during the call
        // (and `self.keep` holds them until `operate` anyway).
        unsafe {
            sys::rados_write_op_omap_set2(
                self.raw(),
                kp.as_ptr(),
                vp.as_ptr(),
                kl.as_ptr(),
                vl.as_ptr(),
                pairs.len(),
            )
        };
        self.keep.append(&mut keys);
        self.keep.append(&mut vals);
    }

    /// Removes omap keys.
    pub fn omap_rm_keys(&mut self, keys: &[&str]) {
        let kp: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr().cast()).collect();
        let kl: Vec<usize> = keys.iter().map(|k| k.len()).collect();
        // SAFETY: op is live; librados copies the keys during this call.
        unsafe {
            sys::rados_write_op_omap_rm_keys2(self.raw(), kp.as_ptr(), kl.as_ptr(), keys.len())
        };
    }

    /// Fails the whole op with `Canceled` unless omap `key` compares as
    /// `cmp` to `val` (a missing key compares as an empty value).
    pub fn omap_cmp(&mut self, key: &str, cmp: OmapCmp, val: &[u8]) {
        let op = match cmp {
            OmapCmp::Eq => sys::LIBRADOS_CMPXATTR_OP_EQ as u8,
        };
        let mut rval = Box::new(0i32);
        // SAFETY: op is live; key and val are copied now; rval is boxed and kept
        // until `operate`, so librados writes the result to a stable address.
        unsafe {
            sys::rados_write_op_omap_cmp2(
                self.raw(),
                key.as_ptr().cast(),
                op,
                val.as_ptr().cast(),
                key.len(),
                val.len(),
                &mut *rval,
            )
        };
        self.cmp_rvals.push(rval);
    }

    /// Applies the op to `oid`. Blocking.
    pub fn operate(self, io: &IoCtx, oid: &str) -> Result<()> {
        let o = cstring(oid, "rados_write_op_operate2")?;
        // SAFETY: op and ioctx are live; o is NUL-terminated; mtime may be
        // null; every buffer the op references is owned by `self`.
        let ret = unsafe {
            sys::rados_write_op_operate2(self.raw(), io.raw(), o.as_ptr(), ptr::null_mut(), 0)
        };
        check(ret, "rados_write_op_operate", || {
            format!("{}/{oid}", io.spec())
        })
        .map(|_| ())
    }
}

impl Drop for WriteOp {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_write_op, released exactly once.
        unsafe { sys::rados_release_write_op(self.raw()) };
    }
}

/// A compound read on one object.
struct ReadOp {
    handle: NonNull<std::ffi::c_void>,
}

impl ReadOp {
    fn new() -> Result<Self> {
        // SAFETY: no preconditions; returns null on allocation failure.
        let raw = unsafe { sys::rados_create_read_op() };
        let handle = NonNull::new(raw)
            .ok_or_else(|| Error::from_errno(libc::ENOMEM, "rados_create_read_op", ""))?;
        Ok(Self { handle })
    }

    fn raw(&self) -> sys::rados_read_op_t {
        self.handle.as_ptr()
    }

    fn operate(&self, io: &IoCtx, oid: &CStr, target: impl FnOnce() -> String) -> Result<()> {
        // SAFETY: op and ioctx are live; oid is NUL-terminated; the outputs
        // registered on the op are owned by the caller's stack frame.
        let ret = unsafe { sys::rados_read_op_operate(self.raw(), io.raw(), oid.as_ptr(), 0) };
        check(ret, "rados_read_op_operate", target).map(|_| ())
    }
}

impl Drop for ReadOp {
    fn drop(&mut self) {
        // SAFETY: created by rados_create_read_op, released exactly once.
        unsafe { sys::rados_release_read_op(self.raw()) };
    }
}

/// Owns a `rados_omap_iter_t` filled by a read op.
struct OmapIter {
    raw: sys::rados_omap_iter_t,
}

impl OmapIter {
    fn new(raw: sys::rados_omap_iter_t) -> Self {
        Self { raw }
    }

    fn collect_all(&self) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        if self.raw.is_null() {
            return Ok(out);
        }
        loop {
            let mut k: *mut c_char = ptr::null_mut();
            let mut v: *mut c_char = ptr::null_mut();
            let mut kl = 0usize;
            let mut vl = 0usize;
            let ret =
                // SAFETY: a live iterator of a completed read op; valid out-pointers.
                unsafe { sys::rados_omap_get_next2(self.raw, &mut k, &mut v, &mut kl, &mut vl) };
            check(ret, "rados_omap_get_next2", String::new)?;
            if k.is_null() {
                return Ok(out);
            }
            // SAFETY: `kl` bytes owned by the iterator, valid until the next
            // get_next2/get_end call; copied out before that.
            let key = unsafe { std::slice::from_raw_parts(k.cast::<u8>(), kl) };
            let val = if v.is_null() {
                Vec::new()
            } else {
                // SAFETY: as above.
                unsafe { std::slice::from_raw_parts(v.cast::<u8>(), vl) }.to_vec()
            };
            out.insert(String::from_utf8_lossy(key).into_owned(), val);
        }
    }
}

impl Drop for OmapIter {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: the iterator came from a read op and is freed once.
            unsafe { sys::rados_omap_get_end(self.raw) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_list_split() {
        assert_eq!(split_nul_list(b"a\0bb\0\0"), vec!["a", "bb"]);
        assert!(split_nul_list(b"\0").is_empty());
    }

    #[test]
    fn debug_redacts_key() {
        let cfg = ConnectConfig {
            user: "u".into(),
            key: Some(Zeroizing::new("AQDsecret==".into())),
            ..Default::default()
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("AQDsecret"), "{s}");
    }

    #[test]
    fn cstring_rejects_nul() {
        assert!(cstring("a\0b", "x").is_err());
    }
}
