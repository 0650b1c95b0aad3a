//! Cluster administration for operator commands run with admin
//! credentials (a migration's `--create-pools`, its cleanup of peers):
//! monitor commands, RBD pool initialisation, namespaces, the pool's
//! mirror mode and mirror peers made by bootstrap tokens. The sidecars never
//! call these: their users cannot.

use std::ffi::c_char;
use std::ptr;

use zeroize::Zeroizing;

use super::error::{Error, Result, check};
use super::rados::{Cluster, IoCtx, cstring};
use csirr_ceph_sys as sys;

/// Runs a monitor command (`cmd` is its JSON, e.g.
/// `{"prefix":"osd pool create","pool":"rbd"}`); returns its output and
/// status text. An error carries the monitor's status text.
pub fn mon_command(cluster: &Cluster, cmd: &str) -> Result<(Vec<u8>, String)> {
    let c = cstring(cmd, "rados_mon_command")?;
    let mut cmds = [c.as_ptr()];
    let (mut out, mut out_len): (*mut c_char, usize) = (ptr::null_mut(), 0);
    let (mut outs, mut outs_len): (*mut c_char, usize) = (ptr::null_mut(), 0);
    // SAFETY: the cluster is connected; cmds holds one NUL-terminated
    // command that outlives the call; no input buffer; the out-pointers are
    // valid and librados allocates what it returns through them.
    let ret = unsafe {
        sys::rados_mon_command(
            cluster.raw(),
            cmds.as_mut_ptr(),
            1,
            ptr::null(),
            0,
            &mut out,
            &mut out_len,
            &mut outs,
            &mut outs_len,
        )
    };
    let take = |p: *mut c_char, n: usize| -> Vec<u8> {
        if p.is_null() {
            return Vec::new();
        }
        // SAFETY: librados returned p with n readable bytes; it is copied
        // out and then freed exactly once with rados_buffer_free.
        unsafe {
            let v = std::slice::from_raw_parts(p.cast::<u8>(), n).to_vec();
            sys::rados_buffer_free(p);
            v
        }
    };
    let out = take(out, out_len);
    let status = String::from_utf8_lossy(&take(outs, outs_len)).into_owned();
    check(ret, "rados_mon_command", || format!("{cmd}: {status}"))?;
    Ok((out, status))
}

/// Creates replicated pool `pool` for RBD as `ceph osd pool create` and
/// `rbd pool init` do: the pool (the monitor's default PG count and
/// autoscaling), the `rbd` application, librbd's initialisation. A pool
/// that exists already is initialised only.
pub fn create_rbd_pool(cluster: &std::sync::Arc<Cluster>, pool: &str) -> Result<()> {
    let quoted = json_string(pool);
    mon_command(
        cluster,
        &format!(r#"{{"prefix":"osd pool create","pool":{quoted}}}"#),
    )?;
    mon_command(
        cluster,
        &format!(r#"{{"prefix":"osd pool application enable","pool":{quoted},"app":"rbd"}}"#),
    )?;
    let io = cluster.ioctx(pool, "")?;
    // SAFETY: io is a live ioctx of the pool.
    let ret = unsafe { sys::rbd_pool_init(io.raw(), false) };
    check(ret, "rbd_pool_init", || pool.to_string()).map(|_| ())
}

/// Creates RBD namespace `namespace` in `io`'s pool unless it exists;
/// returns whether it created it.
pub fn ensure_namespace(io: &IoCtx, namespace: &str) -> Result<bool> {
    let c = cstring(namespace, "rbd_namespace_exists")?;
    let mut exists = false;
    // SAFETY: io is live; c is NUL-terminated; exists is a valid out-pointer.
    let ret = unsafe { sys::rbd_namespace_exists(io.raw(), c.as_ptr(), &mut exists) };
    check(ret, "rbd_namespace_exists", || {
        format!("{}/{namespace}", io.pool())
    })?;
    if exists {
        return Ok(false);
    }
    // SAFETY: io is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_namespace_create(io.raw(), c.as_ptr()) };
    check(ret, "rbd_namespace_create", || {
        format!("{}/{namespace}", io.pool())
    })?;
    Ok(true)
}

/// Puts `io`'s pool (or namespace) in image mirror mode (`rbd mirror pool
/// enable POOL image`) unless it is mirrored already; returns whether it
/// changed it.
pub fn ensure_mirror_image_mode(io: &IoCtx) -> Result<bool> {
    let mut mode: sys::rbd_mirror_mode_t = 0;
    // SAFETY: io is live; mode is a valid out-pointer.
    let ret = unsafe { sys::rbd_mirror_mode_get(io.raw(), &mut mode) };
    check(ret, "rbd_mirror_mode_get", || io.spec())?;
    if mode != sys::RBD_MIRROR_MODE_DISABLED {
        return Ok(false);
    }
    // SAFETY: io is live.
    let ret = unsafe { sys::rbd_mirror_mode_set(io.raw(), sys::RBD_MIRROR_MODE_IMAGE) };
    check(ret, "rbd_mirror_mode_set", || io.spec())?;
    Ok(true)
}

/// A bootstrap token of `io`'s pool (`rbd mirror pool peer bootstrap
/// create`): it holds a cephx key, so it is wiped on drop and never logged.
pub fn mirror_peer_bootstrap_create(io: &IoCtx) -> Result<Zeroizing<String>> {
    let mut len: usize = 4096;
    loop {
        let mut buf = Zeroizing::new(vec![0u8; len]);
        let mut n = len;
        // SAFETY: io is live; buf is writable for n bytes; librbd sets n to
        // the size it needs on -ERANGE.
        let ret = unsafe {
            sys::rbd_mirror_peer_bootstrap_create(io.raw(), buf.as_mut_ptr().cast(), &mut n)
        };
        if ret == -libc::ERANGE && n > len {
            len = n;
            continue;
        }
        check(ret, "rbd_mirror_peer_bootstrap_create", || {
            io.pool().to_string()
        })?;
        let end = buf.iter().position(|b| *b == 0).unwrap_or(n.min(len));
        return Ok(Zeroizing::new(
            String::from_utf8_lossy(&buf[..end]).into_owned(),
        ));
    }
}

/// Imports `token` into `io`'s pool as an rx-tx peer (`rbd mirror pool peer
/// bootstrap import --direction rx-tx`): the peer is registered on both
/// clusters.
pub fn mirror_peer_bootstrap_import(io: &IoCtx, token: &str) -> Result<()> {
    // Not `cstring`: its error would quote the token, which holds a key.
    let c = Zeroizing::new(
        std::ffi::CString::new(token)
            .map_err(|_| {
                Error::invalid_input(
                    "rbd_mirror_peer_bootstrap_import",
                    "a token with a NUL byte",
                )
            })?
            .into_bytes_with_nul(),
    );
    // SAFETY: io is live; c is NUL-terminated (into_bytes_with_nul) and
    // outlives the call.
    let ret = unsafe {
        sys::rbd_mirror_peer_bootstrap_import(
            io.raw(),
            sys::RBD_MIRROR_PEER_DIRECTION_RX_TX,
            c.as_ptr().cast(),
        )
    };
    check(ret, "rbd_mirror_peer_bootstrap_import", || {
        io.pool().to_string()
    })
    .map(|_| ())
}

/// Removes mirror peer `uuid` of `io`'s pool (`rbd mirror pool peer
/// remove`), its stored attributes included.
pub fn mirror_peer_remove(io: &IoCtx, uuid: &str) -> Result<()> {
    let c = cstring(uuid, "rbd_mirror_peer_site_remove")?;
    // SAFETY: io is live; c is NUL-terminated.
    let ret = unsafe { sys::rbd_mirror_peer_site_remove(io.raw(), c.as_ptr()) };
    check(ret, "rbd_mirror_peer_site_remove", || {
        format!("{} peer {uuid}", io.pool())
    })
    .map(|_| ())
}

/// The mirror mode of `io`'s pool or namespace (`RBD_MIRROR_MODE_*`: 0
/// disabled, 1 image, 2 pool).
pub fn mirror_mode(io: &IoCtx) -> Result<u32> {
    let mut mode: sys::rbd_mirror_mode_t = 0;
    // SAFETY: io is live; mode is a valid out-pointer.
    let ret = unsafe { sys::rbd_mirror_mode_get(io.raw(), &mut mode) };
    check(ret, "rbd_mirror_mode_get", || io.spec())?;
    Ok(mode)
}

/// The cluster's mirror site name (`rbd mirror pool info` shows it; the
/// fsid unless set), as the peers of other clusters name this one.
pub fn mirror_site_name(cluster: &Cluster) -> Result<String> {
    let mut buf = vec![0u8; 256];
    let mut n = buf.len();
    let out = buf.as_mut_ptr().cast();
    // SAFETY: the cluster is connected; buf (`out`) is writable for n bytes.
    let ret = unsafe { sys::rbd_mirror_site_name_get(cluster.raw(), out, &mut n) };
    check(ret, "rbd_mirror_site_name_get", || {
        cluster.fsid().to_string()
    })?;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(n.min(buf.len()));
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::json_string;

    #[test]
    fn monitor_command_arguments_are_json_strings() {
        assert_eq!(json_string("glance"), r#""glance""#);
        assert_eq!(json_string(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(json_string("x\ny"), r#""x\u000ay""#);
    }
}
