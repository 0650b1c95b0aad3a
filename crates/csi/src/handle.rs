//! The ceph-csi RBD volume handle codec.
//!
//! ceph-csi names every volume it provisions with a handle of the form
//!
//! ```text
//! <version>-<cluster ID length>-<cluster ID>-<pool ID>-<uuid>
//!   0001   -      0009         - rook-ceph  -0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002
//! ```
//!
//! - version: 4 hex digits, only `0001` exists;
//! - cluster ID length: 4 hex digits, the cluster ID's length in bytes;
//! - cluster ID: the `clusterID` of the StorageClass; it may itself contain
//!   dashes, so only the length field delimits it;
//! - pool ID: 16 hex digits, the big-endian two's complement of the pool's
//!   64-bit id (ceph-csi's "location id");
//! - uuid: 36 characters in the 8-4-4-4-12 form; it names the image
//!   (`csi-vol-<uuid>` by default) and the omap entries of the journal.
//!
//! The whole handle is at most 128 bytes, so a cluster ID has at most 64.
//!
//! This module owns the textual format only: it never resolves a pool ID or
//! looks at Ceph. Parsing is strict where ceph-csi is lax (it checks neither
//! the separators nor the uuid's shape) so that a malformed handle becomes a
//! precise INVALID_ARGUMENT message instead of a confusing lookup failure.
//! Like ceph-csi (Go's `hex.DecodeString`), hex digits are accepted in either
//! case; [`VolumeHandle::encode`] writes lowercase. The uuid is kept verbatim
//! because it is part of RADOS object names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The only encoding version ceph-csi has ever written.
pub const ENCODING_VERSION: u16 = 1;

/// The maximum length of a handle in bytes (ceph-csi's `maxVolIDLen`).
pub const MAX_HANDLE_LEN: usize = 128;

/// The bytes of a handle that are not the cluster ID: 4 + 1 + 4 + 1 + 1 + 16 + 1 + 36.
const FIXED_LEN: usize = 64;

/// The maximum length of a cluster ID in bytes.
pub const MAX_CLUSTER_ID_LEN: usize = MAX_HANDLE_LEN - FIXED_LEN;

/// The length of the uuid field.
const UUID_LEN: usize = 36;

/// How much of a bad input an error message echoes back.
const ECHO_LIMIT: usize = 160;

/// A parsed ceph-csi volume handle.
///
/// The fields are private so that every value is valid: [`VolumeHandle::encode`]
/// always produces a string that [`VolumeHandle::parse`] accepts and that
/// parses back to an equal value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeHandle {
    cluster_id: String,
    pool_id: i64,
    uuid: String,
}

impl VolumeHandle {
    /// Builds a handle from its parts, checking each the way [`parse`](Self::parse) does.
    pub fn new(
        cluster_id: impl Into<String>,
        pool_id: i64,
        uuid: impl Into<String>,
    ) -> Result<Self, HandleError> {
        let cluster_id = cluster_id.into();
        let uuid = uuid.into();
        let check = || -> Result<(), HandleErrorKind> {
            validate_cluster_id(&cluster_id)?;
            if pool_id < 0 {
                return Err(HandleErrorKind::NegativePoolId { pool_id });
            }
            validate_uuid(&uuid)
        };
        check().map_err(|kind| HandleError { input: None, kind })?;
        Ok(Self {
            cluster_id,
            pool_id,
            uuid,
        })
    }

    /// Parses a handle, rejecting anything ceph-csi would not have written.
    pub fn parse(s: &str) -> Result<Self, HandleError> {
        parse_handle(s.as_bytes(), s).map_err(|kind| HandleError {
            input: Some(echo(s)),
            kind,
        })
    }

    /// Encodes the handle in ceph-csi's format (lowercase hex).
    pub fn encode(&self) -> String {
        self.to_string()
    }

    /// The cluster ID (the `clusterID` of the StorageClass and of `config.json`).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The id of the pool that holds the image (and, by default, the journal).
    pub fn pool_id(&self) -> i64 {
        self.pool_id
    }

    /// The uuid that names the image and its journal entries, as written.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The same volume addressed through another cluster ID and pool ID, as a
    /// cluster mapping translates a handle issued by the peer site.
    pub fn with_location(&self, cluster_id: &str, pool_id: i64) -> Result<Self, HandleError> {
        Self::new(cluster_id, pool_id, self.uuid.clone())
    }
}

impl fmt::Display for VolumeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The pool ID is written as the bits of a u64, as ceph-csi does; new()
        // and parse() guarantee it is non-negative.
        write!(
            f,
            "{:04x}-{:04x}-{}-{:016x}-{}",
            ENCODING_VERSION,
            self.cluster_id.len(),
            self.cluster_id,
            self.pool_id as u64,
            self.uuid
        )
    }
}

impl FromStr for VolumeHandle {
    type Err = HandleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for VolumeHandle {
    type Error = HandleError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<VolumeHandle> for String {
    fn from(h: VolumeHandle) -> String {
        h.encode()
    }
}

/// A field of the handle, named in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The 4-hex-digit encoding version.
    Version,
    /// The 4-hex-digit cluster ID length.
    ClusterIdLength,
    /// The cluster ID.
    ClusterId,
    /// The 16-hex-digit pool ID.
    PoolId,
    /// The 36-character uuid.
    Uuid,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Version => "version",
            Field::ClusterIdLength => "cluster ID length",
            Field::ClusterId => "cluster ID",
            Field::PoolId => "pool ID",
            Field::Uuid => "uuid",
        })
    }
}

/// A handle that is not valid, with the offending input (shortened if long).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid volume handle{}: {kind}", quoted(.input))]
pub struct HandleError {
    input: Option<String>,
    kind: HandleErrorKind,
}

impl HandleError {
    /// What exactly is wrong.
    pub fn kind(&self) -> &HandleErrorKind {
        &self.kind
    }

    /// The input that was parsed (shortened if long); `None` for [`VolumeHandle::new`].
    pub fn input(&self) -> Option<&str> {
        self.input.as_deref()
    }
}

/// What is wrong with a handle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleErrorKind {
    /// The input is the empty string.
    #[error("it is empty")]
    Empty,
    /// The input is longer than [`MAX_HANDLE_LEN`].
    #[error("it is {len} bytes long; a ceph-csi volume handle is at most {MAX_HANDLE_LEN}")]
    TooLong {
        /// The input's length in bytes.
        len: usize,
    },
    /// The input ends inside or before a field.
    #[error("it ends before the end of the {field} field")]
    Truncated {
        /// The field that is cut short.
        field: Field,
    },
    /// A fixed-width hex field holds something else.
    #[error("the {field} field {found:?} is not {digits} hexadecimal digits")]
    BadHex {
        /// The field.
        field: Field,
        /// What the field holds.
        found: String,
        /// How many hex digits it must have.
        digits: usize,
    },
    /// A `-` separator is missing.
    #[error("expected '-' after the {after} field at byte {offset}, found {found}")]
    MissingSeparator {
        /// The field the separator should follow.
        after: Field,
        /// Where the separator should be.
        offset: usize,
        /// What is there instead, escaped.
        found: String,
    },
    /// The version is well-formed but unknown.
    #[error("encoding version {version:04x} is not supported; the only known version is 0001")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// The cluster ID is empty.
    #[error("the cluster ID is empty")]
    EmptyClusterId,
    /// The cluster ID is longer than [`MAX_CLUSTER_ID_LEN`].
    #[error("the cluster ID is {len} bytes long; the maximum is {MAX_CLUSTER_ID_LEN}")]
    ClusterIdTooLong {
        /// The cluster ID's (declared) length in bytes.
        len: usize,
    },
    /// The cluster ID length field disagrees with the input's length.
    #[error(
        "the cluster ID length field says {declared} bytes, so the handle should be \
         {expected} bytes long, but it is {actual}"
    )]
    LengthMismatch {
        /// The length the length field declares.
        declared: usize,
        /// The handle length that implies.
        expected: usize,
        /// The handle's actual length.
        actual: usize,
    },
    /// The bytes the length field selects are not UTF-8 (a multi-byte
    /// character is cut in two).
    #[error("the cluster ID is not valid UTF-8 (its length field cuts a character in two)")]
    ClusterIdNotUtf8,
    /// The cluster ID contains a control character.
    #[error("the cluster ID contains a control character")]
    ClusterIdControlChar,
    /// The pool ID decodes to a negative number; Ceph pool ids are not negative.
    #[error("the pool ID {pool_id} is negative")]
    NegativePoolId {
        /// The decoded value.
        pool_id: i64,
    },
    /// The uuid does not have the 8-4-4-4-12 hex form.
    #[error("the uuid {found:?} {reason}")]
    BadUuid {
        /// The uuid field (shortened if long).
        found: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn quoted(input: &Option<String>) -> String {
    match input {
        Some(s) => format!(" {s:?}"),
        None => String::new(),
    }
}

/// Shortens `s` to at most [`ECHO_LIMIT`] bytes on a character boundary.
pub(crate) fn echo(s: &str) -> String {
    if s.len() <= ECHO_LIMIT {
        return s.to_owned();
    }
    let mut end = ECHO_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn parse_handle(b: &[u8], s: &str) -> Result<VolumeHandle, HandleErrorKind> {
    use HandleErrorKind as K;

    if b.is_empty() {
        return Err(K::Empty);
    }
    if b.len() > MAX_HANDLE_LEN {
        return Err(K::TooLong { len: b.len() });
    }

    let version = hex_field(b, 0, 4, Field::Version)?;
    expect_dash(b, 4, Field::Version)?;
    if version != u64::from(ENCODING_VERSION) {
        return Err(K::UnsupportedVersion {
            version: u16::try_from(version).unwrap_or(u16::MAX),
        });
    }

    let declared =
        usize::try_from(hex_field(b, 5, 4, Field::ClusterIdLength)?).unwrap_or(usize::MAX);
    expect_dash(b, 9, Field::ClusterIdLength)?;
    if declared == 0 {
        return Err(K::EmptyClusterId);
    }
    if declared > MAX_CLUSTER_ID_LEN {
        return Err(K::ClusterIdTooLong { len: declared });
    }
    let expected = FIXED_LEN + declared;
    if b.len() != expected {
        return Err(K::LengthMismatch {
            declared,
            expected,
            actual: b.len(),
        });
    }

    let cid_end = 10 + declared;
    let cluster_id = s.get(10..cid_end).ok_or(K::ClusterIdNotUtf8)?;
    validate_cluster_id(cluster_id)?;
    expect_dash(b, cid_end, Field::ClusterId)?;

    let pool_bits = hex_field(b, cid_end + 1, 16, Field::PoolId)?;
    // Reinterpreting the bits is ceph-csi's own encoding (int64 -> uint64).
    let pool_id = pool_bits as i64;
    if pool_id < 0 {
        return Err(K::NegativePoolId { pool_id });
    }
    expect_dash(b, cid_end + 17, Field::PoolId)?;

    let uuid = s
        .get(cid_end + 18..)
        .ok_or(K::Truncated { field: Field::Uuid })?;
    validate_uuid(uuid)?;

    Ok(VolumeHandle {
        cluster_id: cluster_id.to_owned(),
        pool_id,
        uuid: uuid.to_owned(),
    })
}

/// Reads `digits` hex digits at `offset`.
fn hex_field(b: &[u8], offset: usize, digits: usize, field: Field) -> Result<u64, HandleErrorKind> {
    let raw = b
        .get(offset..offset + digits)
        .ok_or(HandleErrorKind::Truncated { field })?;
    let bad = || HandleErrorKind::BadHex {
        field,
        found: String::from_utf8_lossy(raw).into_owned(),
        digits,
    };
    if !raw.iter().all(u8::is_ascii_hexdigit) {
        return Err(bad());
    }
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    u64::from_str_radix(text, 16).map_err(|_| bad())
}

fn expect_dash(b: &[u8], offset: usize, after: Field) -> Result<(), HandleErrorKind> {
    match b.get(offset) {
        Some(b'-') => Ok(()),
        Some(&c) => Err(HandleErrorKind::MissingSeparator {
            after,
            offset,
            found: describe_byte(c),
        }),
        None => Err(HandleErrorKind::Truncated { field: after }),
    }
}

fn describe_byte(c: u8) -> String {
    if c.is_ascii_graphic() || c == b' ' {
        format!("'{}'", char::from(c))
    } else {
        format!("byte 0x{c:02x}")
    }
}

fn validate_cluster_id(cluster_id: &str) -> Result<(), HandleErrorKind> {
    if cluster_id.is_empty() {
        return Err(HandleErrorKind::EmptyClusterId);
    }
    if cluster_id.len() > MAX_CLUSTER_ID_LEN {
        return Err(HandleErrorKind::ClusterIdTooLong {
            len: cluster_id.len(),
        });
    }
    if cluster_id.chars().any(char::is_control) {
        return Err(HandleErrorKind::ClusterIdControlChar);
    }
    Ok(())
}

fn validate_uuid(uuid: &str) -> Result<(), HandleErrorKind> {
    let bad = |reason| HandleErrorKind::BadUuid {
        found: echo(uuid),
        reason,
    };
    if uuid.len() != UUID_LEN {
        return Err(bad("is not 36 characters long"));
    }
    for (i, c) in uuid.bytes().enumerate() {
        let dash_here = matches!(i, 8 | 13 | 18 | 23);
        if dash_here && c != b'-' {
            return Err(bad("is not in the 8-4-4-4-12 form (a '-' is missing)"));
        }
        if !dash_here && !c.is_ascii_hexdigit() {
            return Err(bad("contains a character that is not a hexadecimal digit"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str =
        "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002";
    const UUID: &str = "b0285c97-a0ce-11eb-8c66-0242ac110002";

    fn kind(s: &str) -> HandleErrorKind {
        match VolumeHandle::parse(s) {
            Ok(h) => panic!("{s:?} parsed as {h:?}"),
            Err(e) => e.kind().clone(),
        }
    }

    #[test]
    fn parses_the_ceph_csi_example() {
        let h: VolumeHandle = EXAMPLE.parse().unwrap();
        assert_eq!(h.cluster_id(), "rook-ceph");
        assert_eq!(h.pool_id(), 2);
        assert_eq!(h.uuid(), UUID);
        assert_eq!(h.encode(), EXAMPLE);
        assert_eq!(h.to_string(), EXAMPLE);
    }

    #[test]
    fn encodes_from_parts() {
        let h = VolumeHandle::new("rook-ceph", 2, UUID).unwrap();
        assert_eq!(h.encode(), EXAMPLE);
        let h = VolumeHandle::new("c", 0x1234_5678_9abc, UUID).unwrap();
        assert_eq!(
            h.encode(),
            "0001-0001-c-0000123456789abc-b0285c97-a0ce-11eb-8c66-0242ac110002"
        );
    }

    #[test]
    fn cluster_id_with_dashes_and_fsid() {
        // An fsid as cluster ID: 36 bytes full of dashes, as in non-Rook setups.
        let fsid = "7635de36-ab1f-4a70-98a2-a1bd80ba77c4";
        let s = format!("0001-0024-{fsid}-0000000000000006-6e696bba-064f-11ec-a251-0242ac110002");
        let h = VolumeHandle::parse(&s).unwrap();
        assert_eq!(h.cluster_id(), fsid);
        assert_eq!(h.pool_id(), 6);
        assert_eq!(h.uuid(), "6e696bba-064f-11ec-a251-0242ac110002");
        assert_eq!(h.encode(), s);

        let h = VolumeHandle::new("a-b--c-", 1, UUID).unwrap();
        assert_eq!(VolumeHandle::parse(&h.encode()).unwrap(), h);
    }

    #[test]
    fn longest_cluster_id_gives_128_bytes() {
        let cid = "x".repeat(MAX_CLUSTER_ID_LEN);
        let h = VolumeHandle::new(cid.as_str(), i64::MAX, UUID).unwrap();
        let s = h.encode();
        assert_eq!(s.len(), MAX_HANDLE_LEN);
        assert!(s.contains("-7fffffffffffffff-"));
        assert_eq!(VolumeHandle::parse(&s).unwrap(), h);

        let err = VolumeHandle::new("x".repeat(65), 1, UUID).unwrap_err();
        assert_eq!(err.kind(), &HandleErrorKind::ClusterIdTooLong { len: 65 });
        assert_eq!(
            err.to_string(),
            "invalid volume handle: the cluster ID is 65 bytes long; the maximum is 64"
        );
    }

    #[test]
    fn uppercase_hex_is_accepted_and_uuid_kept_verbatim() {
        let upper_uuid = "B0285C97-A0CE-11EB-8C66-0242AC110002";
        let s = format!("0001-000A-rook-ceph1-00000000000000FF-{upper_uuid}");
        let h = VolumeHandle::parse(&s).unwrap();
        assert_eq!(h.cluster_id(), "rook-ceph1");
        assert_eq!(h.pool_id(), 255);
        assert_eq!(h.uuid(), upper_uuid);
        assert_eq!(
            h.encode(),
            format!("0001-000a-rook-ceph1-00000000000000ff-{upper_uuid}")
        );
    }

    #[test]
    fn non_ascii_cluster_id() {
        let h = VolumeHandle::new("séte-ä", 3, UUID).unwrap();
        assert!(h.encode().starts_with("0001-0008-séte-ä-"));
        assert_eq!(VolumeHandle::parse(&h.encode()).unwrap(), h);

        // A length that cuts 'é' (2 bytes) in two, padded so lengths agree.
        let s = format!("0001-0002-sé-0000000000000003-{UUID}");
        // "sé" is 3 bytes, so a declared 2 leaves the handle one byte too long.
        assert_eq!(
            kind(&s),
            HandleErrorKind::LengthMismatch {
                declared: 2,
                expected: 66,
                actual: 67
            }
        );
        let s = format!("0001-0001-é-0000000000000003-{UUID}");
        // "é" is 2 bytes: declared 1 -> 65 expected, 66 actual.
        assert!(matches!(kind(&s), HandleErrorKind::LengthMismatch { .. }));
        let s = format!("0001-0001-é0000000000000003-{UUID}");
        assert_eq!(kind(&s), HandleErrorKind::ClusterIdNotUtf8);
    }

    #[test]
    fn empty_and_too_long() {
        assert_eq!(kind(""), HandleErrorKind::Empty);
        let long = format!("0001-0041-{}-0000000000000002-{UUID}", "x".repeat(65));
        assert_eq!(kind(&long), HandleErrorKind::TooLong { len: 129 });
        let msg = VolumeHandle::parse("").unwrap_err().to_string();
        assert_eq!(msg, "invalid volume handle \"\": it is empty");
    }

    #[test]
    fn version_errors() {
        assert_eq!(
            kind(&EXAMPLE.replacen("0001", "0002", 1)),
            HandleErrorKind::UnsupportedVersion { version: 2 }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0001", "00g1", 1)),
            HandleErrorKind::BadHex {
                field: Field::Version,
                found: "00g1".into(),
                digits: 4
            }
        );
        assert_eq!(
            kind("001"),
            HandleErrorKind::Truncated {
                field: Field::Version
            }
        );
        assert_eq!(
            kind("0001"),
            HandleErrorKind::Truncated {
                field: Field::Version
            }
        );
        assert_eq!(
            kind("0001_0009"),
            HandleErrorKind::MissingSeparator {
                after: Field::Version,
                offset: 4,
                found: "'_'".into()
            }
        );
        let msg = VolumeHandle::parse(&EXAMPLE.replacen("0001", "ffff", 1))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!(
                "invalid volume handle {:?}: encoding version ffff is not supported; \
                 the only known version is 0001",
                EXAMPLE.replacen("0001", "ffff", 1)
            )
        );
    }

    #[test]
    fn length_field_errors() {
        assert_eq!(
            kind("0001-00"),
            HandleErrorKind::Truncated {
                field: Field::ClusterIdLength
            }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0009", "000x", 1)),
            HandleErrorKind::BadHex {
                field: Field::ClusterIdLength,
                found: "000x".into(),
                digits: 4
            }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("-0009-", "-0009+", 1)),
            HandleErrorKind::MissingSeparator {
                after: Field::ClusterIdLength,
                offset: 9,
                found: "'+'".into()
            }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0009", "0008", 1)),
            HandleErrorKind::LengthMismatch {
                declared: 8,
                expected: 72,
                actual: 73
            }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0009", "000a", 1)),
            HandleErrorKind::LengthMismatch {
                declared: 10,
                expected: 74,
                actual: 73
            }
        );
        assert_eq!(
            kind(&format!("0001-0000--0000000000000002-{UUID}")),
            HandleErrorKind::EmptyClusterId
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0009", "0041", 1)),
            HandleErrorKind::ClusterIdTooLong { len: 65 }
        );
        assert_eq!(
            kind(&EXAMPLE.replacen("0009", "ffff", 1)),
            HandleErrorKind::ClusterIdTooLong { len: 65535 }
        );
        let msg = VolumeHandle::parse(&EXAMPLE.replacen("0009", "0008", 1))
            .unwrap_err()
            .to_string();
        assert!(
            msg.ends_with(
                "the cluster ID length field says 8 bytes, so the handle should be 72 bytes \
                 long, but it is 73"
            ),
            "{msg}"
        );
    }

    #[test]
    fn cluster_id_control_char() {
        let s = format!("0001-0005-ab\ncd-0000000000000002-{UUID}");
        assert_eq!(kind(&s), HandleErrorKind::ClusterIdControlChar);
        let msg = VolumeHandle::parse(&s).unwrap_err().to_string();
        assert!(
            msg.contains("ab\\ncd"),
            "control characters are escaped: {msg}"
        );
    }

    #[test]
    fn pool_id_errors() {
        // Same length, separator moved after the cluster ID.
        let s = format!("0001-0009-rook-ceph00000000000000002-{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::MissingSeparator {
                after: Field::ClusterId,
                offset: 19,
                found: "'0'".into()
            }
        );
        let s = format!("0001-0008-rook-ceph-000000000000002-{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::MissingSeparator {
                after: Field::ClusterId,
                offset: 18,
                found: "'h'".into()
            }
        );
        let s = format!("0001-0009-rook-ceph-00000000000000zz-{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::BadHex {
                field: Field::PoolId,
                found: "00000000000000zz".into(),
                digits: 16
            }
        );
        let s = format!("0001-0009-rook-ceph-8000000000000000-{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::NegativePoolId { pool_id: i64::MIN }
        );
        let s = format!("0001-0009-rook-ceph-ffffffffffffffff-{UUID}");
        assert_eq!(kind(&s), HandleErrorKind::NegativePoolId { pool_id: -1 });
        let s = format!("0001-0009-rook-ceph-000000000000002-x{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::BadHex {
                field: Field::PoolId,
                found: "000000000000002-".into(),
                digits: 16
            }
        );
        let s = format!("0001-0009-rook-ceph-0000000000000002_{UUID}");
        assert_eq!(
            kind(&s),
            HandleErrorKind::MissingSeparator {
                after: Field::PoolId,
                offset: 36,
                found: "'_'".into()
            }
        );
        assert_eq!(
            VolumeHandle::new("c", -5, UUID).unwrap_err().kind(),
            &HandleErrorKind::NegativePoolId { pool_id: -5 }
        );
    }

    #[test]
    fn uuid_errors() {
        let with_uuid = |u: &str| format!("0001-0009-rook-ceph-0000000000000002-{u}");
        assert!(matches!(
            kind(&with_uuid("b0285c97-a0ce-11eb-8c66-0242ac11000g")),
            HandleErrorKind::BadUuid { reason, .. } if reason.contains("hexadecimal")
        ));
        assert!(matches!(
            kind(&with_uuid("b0285c97a-0ce-11eb-8c66-0242ac110002")),
            HandleErrorKind::BadUuid { reason, .. } if reason.contains("8-4-4-4-12")
        ));
        assert!(matches!(
            kind(&with_uuid("b0285c97-a0ce-11eb-8c66_0242ac110002")),
            HandleErrorKind::BadUuid { .. }
        ));
        // Wrong uuid length shows up as a length mismatch: the length field is
        // what tells where the uuid starts.
        assert!(matches!(
            kind(&with_uuid("b0285c97-a0ce-11eb-8c66-0242ac11000")),
            HandleErrorKind::LengthMismatch { .. }
        ));
        let err = VolumeHandle::new("c", 1, "not-a-uuid").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid volume handle: the uuid \"not-a-uuid\" is not 36 characters long"
        );
    }

    #[test]
    fn with_location_keeps_the_uuid() {
        let h = VolumeHandle::parse(EXAMPLE).unwrap();
        let m = h.with_location("site-b", 7).unwrap();
        assert_eq!(m.cluster_id(), "site-b");
        assert_eq!(m.pool_id(), 7);
        assert_eq!(m.uuid(), h.uuid());
        assert!(h.with_location("", 7).is_err());
    }

    #[test]
    fn serde_as_string() {
        let h = VolumeHandle::parse(EXAMPLE).unwrap();
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(json, format!("\"{EXAMPLE}\""));
        let back: VolumeHandle = serde_json::from_str(&json).unwrap();
        assert_eq!(back, h);
        assert!(serde_json::from_str::<VolumeHandle>("\"0002-x\"").is_err());
    }

    #[test]
    fn long_input_is_shortened_in_messages() {
        let long = "z".repeat(10_000);
        let msg = VolumeHandle::parse(&long).unwrap_err().to_string();
        assert!(msg.len() < 300, "{}", msg.len());
        assert!(msg.contains("it is 10000 bytes long"));
    }

    /// Cluster IDs of 1 to [`MAX_CLUSTER_ID_LEN`] bytes from an alphabet
    /// with separators and multi-byte characters.
    fn cluster_id() -> impl Strategy<Value = String> {
        "[abcXYZ019\\-_.:/@ é日]{1,64}".prop_map(|s| {
            let mut out = String::new();
            for c in s.chars() {
                if out.len() + c.len_utf8() > MAX_CLUSTER_ID_LEN {
                    break;
                }
                out.push(c);
            }
            out
        })
    }

    /// Byte strings near a valid handle: arbitrary pieces of handle-like
    /// text, a valid handle with bytes replaced, removed or inserted, and
    /// random bytes.
    fn handle_like() -> impl Strategy<Value = String> {
        let valid = VolumeHandle::new("rook-ceph", 2, UUID).unwrap().encode();
        let pieces = prop::sample::select(vec![
            "0001", "-", "0009", "ffff", "é", "\0", "0", "f", "--", "日本",
        ]);
        let edits =
            prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, any::<u8>()), 1..=5);
        prop_oneof![
            prop::collection::vec(pieces, 0..140).prop_map(|p| p.concat()),
            edits.prop_map(move |edits| {
                let mut b = valid.clone().into_bytes();
                for (at, op, byte) in edits {
                    let i = at.index(b.len() + 1);
                    match op {
                        0 if i < b.len() => b[i] = byte,
                        1 if i < b.len() => {
                            b.remove(i);
                        }
                        _ => b.insert(i, byte),
                    }
                }
                String::from_utf8_lossy(&b).into_owned()
            }),
            prop::collection::vec(any::<u8>(), 0..200)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn property_encode_parse_round_trips(
            cid in cluster_id(),
            pool in prop_oneof![0..1_000i64, 0..=i64::MAX],
            uuid in "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
        ) {
            let h = VolumeHandle::new(cid.as_str(), pool, uuid.as_str()).unwrap();
            let s = h.encode();
            prop_assert!(s.len() <= MAX_HANDLE_LEN, "{}", s);
            let back = VolumeHandle::parse(&s).unwrap();
            prop_assert_eq!(&back, &h);
            prop_assert_eq!(back.encode(), s);
        }

        #[test]
        fn property_parse_never_panics(s in handle_like()) {
            if let Ok(h) = VolumeHandle::parse(&s) {
                // Anything accepted re-encodes to an equivalent handle.
                prop_assert_eq!(VolumeHandle::parse(&h.encode()).unwrap(), h.clone());
                prop_assert!(s.eq_ignore_ascii_case(&h.encode()), "{:?}", s);
            }
        }
    }
}
