//! The volume ID a replication request carries, classified.
//!
//! The csi-addons sidecar passes the PV's `volumeHandle` verbatim. For volumes
//! that ceph-csi provisioned that is a ceph-csi handle (see [`super::handle`]);
//! for statically provisioned volumes and for tests it may be an image spec,
//! `pool/image` or `pool/namespace/image`, as the `rbd` CLI writes it.
//!
//! This module only classifies and validates the string; it never checks that
//! the pool or image exists. A string that parses as a handle is a handle;
//! otherwise a string with a `/` is an image spec; anything else is reported
//! with the handle's own error when it starts like a handle
//! (`hhhh-hhhh-`), and as unrecognised otherwise.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::handle::{HandleError, VolumeHandle, echo};

/// The maximum length in bytes we accept for a pool, namespace or image name.
///
/// Ceph itself has no small limit (names end up in RADOS object names); 255
/// is far above what ceph-csi or an operator writes and keeps messages short.
pub const MAX_NAME_LEN: usize = 255;

/// A validated volume ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum VolumeId {
    /// A ceph-csi volume handle.
    Handle(VolumeHandle),
    /// An image spec, `pool/image` or `pool/namespace/image`.
    Spec {
        /// The pool name.
        pool: String,
        /// The RADOS namespace, if any (never empty).
        namespace: Option<String>,
        /// The image name.
        image: String,
    },
}

impl VolumeId {
    /// Parses the volume ID of a request.
    pub fn parse(s: &str) -> Result<Self, VolumeIdError> {
        if s.is_empty() {
            return Err(VolumeIdError::Empty);
        }
        let handle_err = match VolumeHandle::parse(s) {
            Ok(h) => return Ok(Self::Handle(h)),
            Err(e) => e,
        };
        if s.contains('/') {
            return parse_spec(s);
        }
        if looks_like_handle(s) {
            Err(VolumeIdError::Handle(handle_err))
        } else {
            Err(VolumeIdError::Unrecognized { input: echo(s) })
        }
    }

    /// Builds an image spec, validating each name.
    pub fn spec(
        pool: impl Into<String>,
        namespace: Option<String>,
        image: impl Into<String>,
    ) -> Result<Self, VolumeIdError> {
        let (pool, image) = (pool.into(), image.into());
        let input = match &namespace {
            Some(ns) => format!("{pool}/{ns}/{image}"),
            None => format!("{pool}/{image}"),
        };
        check_name(&input, NameKind::Pool, &pool)?;
        if let Some(ns) = &namespace {
            check_name(&input, NameKind::Namespace, ns)?;
        }
        check_name(&input, NameKind::Image, &image)?;
        Ok(Self::Spec {
            pool,
            namespace,
            image,
        })
    }

    /// The handle, if this is a ceph-csi handle.
    pub fn handle(&self) -> Option<&VolumeHandle> {
        match self {
            Self::Handle(h) => Some(h),
            Self::Spec { .. } => None,
        }
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Handle(h) => h.fmt(f),
            Self::Spec {
                pool,
                namespace: Some(ns),
                image,
            } => write!(f, "{pool}/{ns}/{image}"),
            Self::Spec {
                pool,
                namespace: None,
                image,
            } => write!(f, "{pool}/{image}"),
        }
    }
}

impl FromStr for VolumeId {
    type Err = VolumeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for VolumeId {
    type Error = VolumeIdError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<VolumeId> for String {
    fn from(v: VolumeId) -> String {
        v.to_string()
    }
}

impl From<VolumeHandle> for VolumeId {
    fn from(h: VolumeHandle) -> Self {
        Self::Handle(h)
    }
}

/// Which name of an image spec is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// The pool name.
    Pool,
    /// The RADOS namespace name.
    Namespace,
    /// The image name.
    Image,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Pool => "pool",
            NameKind::Namespace => "namespace",
            NameKind::Image => "image",
        })
    }
}

/// What is wrong with one name of an image spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameProblem {
    /// The name is empty.
    #[error("is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("is {len} bytes long; the maximum is {MAX_NAME_LEN}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains `@`, which separates a snapshot name in Ceph specs.
    #[error("contains '@', which Ceph reserves for snapshot names")]
    ContainsAt,
    /// The name contains a control character.
    #[error("contains a control character")]
    ControlChar,
}

/// A volume ID that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeIdError {
    /// The request carries no volume ID.
    #[error("volume ID is empty")]
    Empty,
    /// It looks like a ceph-csi handle but is not a valid one.
    #[error(transparent)]
    Handle(#[from] HandleError),
    /// It is neither a handle nor an image spec.
    #[error(
        "volume ID {input:?} is neither a ceph-csi volume handle \
         (<version>-<cluster ID length>-<cluster ID>-<pool ID>-<uuid>) nor an image spec \
         (pool/image or pool/namespace/image)"
    )]
    Unrecognized {
        /// The input (shortened if long).
        input: String,
    },
    /// An image spec with more than three parts.
    #[error(
        "volume ID {input:?} has {parts} '/'-separated parts; an image spec is \
         pool/image or pool/namespace/image"
    )]
    TooManyParts {
        /// The input (shortened if long).
        input: String,
        /// How many parts it has.
        parts: usize,
    },
    /// One name of an image spec is not valid.
    #[error("volume ID {input:?}: the {kind} name {problem}")]
    InvalidName {
        /// The input (shortened if long).
        input: String,
        /// Which name.
        kind: NameKind,
        /// What is wrong with it.
        problem: NameProblem,
    },
}

/// `hhhh-hhhh-`: the fixed start of every ceph-csi handle.
fn looks_like_handle(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_hexdigit)
        && b[4] == b'-'
        && b[5..9].iter().all(u8::is_ascii_hexdigit)
        && b[9] == b'-'
}

fn parse_spec(s: &str) -> Result<VolumeId, VolumeIdError> {
    let parts: Vec<&str> = s.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, None, *image),
        [pool, ns, image] => (*pool, Some(*ns), *image),
        _ => {
            return Err(VolumeIdError::TooManyParts {
                input: echo(s),
                parts: parts.len(),
            });
        }
    };
    check_name(s, NameKind::Pool, pool)?;
    if let Some(ns) = namespace {
        check_name(s, NameKind::Namespace, ns)?;
    }
    check_name(s, NameKind::Image, image)?;
    Ok(VolumeId::Spec {
        pool: pool.to_owned(),
        namespace: namespace.map(str::to_owned),
        image: image.to_owned(),
    })
}

fn check_name(input: &str, kind: NameKind, name: &str) -> Result<(), VolumeIdError> {
    let problem = if name.is_empty() {
        NameProblem::Empty
    } else if name.len() > MAX_NAME_LEN {
        NameProblem::TooLong { len: name.len() }
    } else if name.contains('@') {
        NameProblem::ContainsAt
    } else if name.chars().any(char::is_control) {
        NameProblem::ControlChar
    } else if name.contains('/') {
        // Only reachable through VolumeId::spec: parse splits on '/'.
        return Err(VolumeIdError::TooManyParts {
            input: echo(input),
            parts: input.split('/').count(),
        });
    } else {
        return Ok(());
    };
    Err(VolumeIdError::InvalidName {
        input: echo(input),
        kind,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handle::HandleErrorKind;
    use proptest::prelude::*;

    const HANDLE: &str =
        "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002";

    fn spec(pool: &str, ns: Option<&str>, image: &str) -> VolumeId {
        VolumeId::Spec {
            pool: pool.into(),
            namespace: ns.map(Into::into),
            image: image.into(),
        }
    }

    #[test]
    fn handle_is_recognised() {
        let v = VolumeId::parse(HANDLE).unwrap();
        let h = v.handle().unwrap();
        assert_eq!(h.cluster_id(), "rook-ceph");
        assert_eq!(v.to_string(), HANDLE);
    }

    #[test]
    fn image_specs() {
        assert_eq!(
            VolumeId::parse("rbd/img").unwrap(),
            spec("rbd", None, "img")
        );
        assert_eq!(
            VolumeId::parse("replicapool/ns-a/csi-vol-1").unwrap(),
            spec("replicapool", Some("ns-a"), "csi-vol-1")
        );
        for s in ["rbd/img", "p/n/i", "my pool/my image", "p.1/n_2/i-3"] {
            assert_eq!(VolumeId::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(VolumeId::parse("rbd/img").unwrap().handle(), None);
    }

    #[test]
    fn empty_volume_id() {
        let err = VolumeId::parse("").unwrap_err();
        assert_eq!(err, VolumeIdError::Empty);
        assert_eq!(err.to_string(), "volume ID is empty");
    }

    #[test]
    fn invalid_names() {
        let problem = |s: &str| match VolumeId::parse(s).unwrap_err() {
            VolumeIdError::InvalidName { kind, problem, .. } => (kind, problem),
            other => panic!("{s:?}: {other}"),
        };
        assert_eq!(problem("/img"), (NameKind::Pool, NameProblem::Empty));
        assert_eq!(problem("rbd/"), (NameKind::Image, NameProblem::Empty));
        assert_eq!(
            problem("rbd//img"),
            (NameKind::Namespace, NameProblem::Empty)
        );
        assert_eq!(
            problem("rbd/img@snap"),
            (NameKind::Image, NameProblem::ContainsAt)
        );
        assert_eq!(
            problem("rbd@x/img"),
            (NameKind::Pool, NameProblem::ContainsAt)
        );
        assert_eq!(
            problem("rbd/n\ts/img"),
            (NameKind::Namespace, NameProblem::ControlChar)
        );
        assert_eq!(
            problem(&format!("rbd/{}", "i".repeat(256))),
            (NameKind::Image, NameProblem::TooLong { len: 256 })
        );
        assert!(VolumeId::parse(&format!("rbd/{}", "i".repeat(255))).is_ok());

        let msg = VolumeId::parse("rbd/img@snap").unwrap_err().to_string();
        assert_eq!(
            msg,
            "volume ID \"rbd/img@snap\": the image name contains '@', which Ceph reserves \
             for snapshot names"
        );
    }

    #[test]
    fn too_many_parts() {
        let err = VolumeId::parse("a/b/c/d").unwrap_err();
        assert_eq!(
            err,
            VolumeIdError::TooManyParts {
                input: "a/b/c/d".into(),
                parts: 4
            }
        );
        assert!(err.to_string().contains("has 4 '/'-separated parts"));
    }

    #[test]
    fn bad_handles_report_the_handle_error() {
        let bad = HANDLE.replacen("0001", "0002", 1);
        match VolumeId::parse(&bad).unwrap_err() {
            VolumeIdError::Handle(e) => {
                assert_eq!(
                    e.kind(),
                    &HandleErrorKind::UnsupportedVersion { version: 2 }
                );
            }
            other => panic!("{other}"),
        }
        let msg = VolumeId::parse(&bad).unwrap_err().to_string();
        assert!(msg.starts_with("invalid volume handle \"0002-"), "{msg}");
    }

    #[test]
    fn unrecognized() {
        let err = VolumeId::parse("pvc-1234").unwrap_err();
        assert_eq!(
            err,
            VolumeIdError::Unrecognized {
                input: "pvc-1234".into()
            }
        );
        assert!(err.to_string().contains("neither a ceph-csi volume handle"));
    }

    #[test]
    fn spec_constructor_validates() {
        assert_eq!(
            VolumeId::spec("rbd", Some("ns".into()), "img").unwrap(),
            spec("rbd", Some("ns"), "img")
        );
        assert!(matches!(
            VolumeId::spec("rbd", Some(String::new()), "img"),
            Err(VolumeIdError::InvalidName {
                kind: NameKind::Namespace,
                problem: NameProblem::Empty,
                ..
            })
        ));
        assert!(matches!(
            VolumeId::spec("rbd", None, "a/b"),
            Err(VolumeIdError::TooManyParts { parts: 3, .. })
        ));
    }

    #[test]
    fn serde_as_string() {
        let v = VolumeId::parse("p/n/i").unwrap();
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "\"p/n/i\"");
        assert_eq!(serde_json::from_str::<VolumeId>(&json).unwrap(), v);
        let h: VolumeId = serde_json::from_str(&format!("\"{HANDLE}\"")).unwrap();
        assert!(h.handle().is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5_000))]

        #[test]
        fn property_display_parse_round_trips_and_never_panics(s in "[ab\\-_. 09/@é\t]{0,24}") {
            if let Ok(v) = VolumeId::parse(&s) {
                prop_assert_eq!(v.to_string(), s);
                prop_assert_eq!(VolumeId::parse(&v.to_string()).unwrap(), v);
            }
        }
    }
}
