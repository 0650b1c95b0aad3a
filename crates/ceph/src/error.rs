//! The one conversion from a librados/librbd return code (`-errno`) to a typed
//! [`Error`]. Expected Ceph conditions get their own [`ErrorKind`] so callers
//! can match on them instead of on numbers.

use std::fmt;

/// What kind of failure a Ceph call reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `ENOENT`: the pool, object, image, snapshot or key does not exist.
    NotFound,
    /// `EEXIST`: it exists already.
    AlreadyExists,
    /// `EBUSY`: in use (image has watchers, lock held by someone else).
    Busy,
    /// `EROFS`: the image is read-only for this client (lock held elsewhere).
    ReadOnly,
    /// `EPERM` / `EACCES`: the credentials are not allowed to do this, or
    /// were rejected at connect time.
    PermissionDenied,
    /// `ETIMEDOUT`: the cluster did not answer in time.
    TimedOut,
    /// `EINVAL` / `ERANGE` / `ENAMETOOLONG` or an interior NUL: bad input.
    InvalidInput,
    /// `EBLOCKLISTED` / `ESHUTDOWN`: this client was fenced by the cluster.
    Blocklisted,
    /// `ECANCELED`: the operation was cancelled (e.g. a failed compare).
    Canceled,
    /// Any other errno.
    Other,
}

/// A failed librados/librbd call: which call, on what, and the errno.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Error {
    kind: ErrorKind,
    op: &'static str,
    target: String,
    errno: i32,
}

impl Error {
    /// Builds an error from a positive errno.
    pub fn from_errno(errno: i32, op: &'static str, target: impl Into<String>) -> Self {
        let kind = match errno {
            libc::ENOENT => ErrorKind::NotFound,
            libc::EEXIST => ErrorKind::AlreadyExists,
            libc::EBUSY => ErrorKind::Busy,
            libc::EROFS => ErrorKind::ReadOnly,
            libc::EPERM | libc::EACCES => ErrorKind::PermissionDenied,
            libc::ETIMEDOUT => ErrorKind::TimedOut,
            libc::EINVAL | libc::ERANGE | libc::ENAMETOOLONG => ErrorKind::InvalidInput,
            // Ceph's EBLOCKLISTED is ESHUTDOWN on Linux.
            libc::ESHUTDOWN => ErrorKind::Blocklisted,
            libc::ECANCELED => ErrorKind::Canceled,
            _ => ErrorKind::Other,
        };
        Self {
            kind,
            op,
            target: target.into(),
            errno,
        }
    }

    /// An input that cannot be passed to C (interior NUL byte).
    pub fn invalid_input(op: &'static str, target: impl Into<String>) -> Self {
        Self::from_errno(libc::EINVAL, op, target)
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The positive errno the call returned.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// The librados/librbd call that failed.
    pub fn op(&self) -> &'static str {
        self.op
    }

    /// True when the thing looked for does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = std::io::Error::from_raw_os_error(self.errno);
        if self.target.is_empty() {
            write!(f, "{} failed: {msg}", self.op)
        } else {
            write!(f, "{} {} failed: {msg}", self.op, self.target)
        }
    }
}

/// Result of a Ceph call.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Turns a C return code into a `Result`: negative is `-errno`, zero or
/// positive is success and is returned unchanged.
pub(crate) fn check(ret: i32, op: &'static str, target: impl FnOnce() -> String) -> Result<i32> {
    if ret < 0 {
        Err(Error::from_errno(-ret, op, target()))
    } else {
        Ok(ret)
    }
}

/// Like [`check`] for calls returning `ssize_t`/`int64_t`.
pub(crate) fn check_i64(
    ret: i64,
    op: &'static str,
    target: impl FnOnce() -> String,
) -> Result<i64> {
    if ret < 0 {
        let errno = i32::try_from(-ret).unwrap_or(libc::EIO);
        Err(Error::from_errno(errno, op, target()))
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_expected_conditions() {
        assert_eq!(
            check(-libc::ENOENT, "rbd_open", || "pool/img".into())
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            check(-libc::EROFS, "rbd_aio_write", String::new)
                .unwrap_err()
                .kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            check(-libc::EACCES, "rados_connect", String::new)
                .unwrap_err()
                .kind(),
            ErrorKind::PermissionDenied
        );
        assert_eq!(check(7, "x", String::new).unwrap(), 7);
    }

    #[test]
    fn display_names_call_and_target() {
        let e = Error::from_errno(libc::ENOENT, "rbd_open", "replicapool/vol1");
        let s = e.to_string();
        assert!(s.starts_with("rbd_open replicapool/vol1 failed: "), "{s}");
        assert!(s.contains("No such file"), "{s}");
    }
}
