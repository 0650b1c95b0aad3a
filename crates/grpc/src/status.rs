//! The one mapping from engine and forwarding errors to gRPC status codes,
//! and the validation of request fields into the engine's typed requests.

use std::collections::HashMap;

use tonic::{Code, Status};
use zeroize::Zeroize;

use csirr_csi::group_id::VolumeGroupId;
use csirr_csi::volume_id::VolumeId;
use csirr_engine::group::CreateGroup;
use csirr_engine::{Credentials, EngineError, VolumeRequest};

use super::forward::ForwardError;
use super::proto::replication::ReplicationSource;
use super::proto::replication::replication_source::Type as SourceType;

/// The gRPC status of an engine error: its code, and its message as the
/// caller reads it.
pub fn from_engine(e: EngineError) -> Status {
    {
        let code = match &e {
            EngineError::InvalidArgument(_) => Code::InvalidArgument,
            EngineError::NotFound(_) => Code::NotFound,
            EngineError::AlreadyExists(_) => Code::AlreadyExists,
            // The csi-addons list RPCs' code for a bad starting_token.
            EngineError::InvalidToken(_) => Code::Aborted,
            EngineError::Unauthenticated(_) => Code::Unauthenticated,
            EngineError::PermissionDenied(_) => Code::PermissionDenied,
            EngineError::Busy(_) => Code::Aborted,
            // The record changed under a role change that retried: the
            // caller retries the (idempotent) request later.
            EngineError::Conflict(_) => Code::Aborted,
            EngineError::FailedPrecondition(_) => Code::FailedPrecondition,
            // The volume cannot be (or is already otherwise) replicated in
            // that mode: the caller must change the volume or the class.
            EngineError::JournalUnavailable { .. } => Code::FailedPrecondition,
            EngineError::ModeMismatch { .. } => Code::FailedPrecondition,
            EngineError::NotInJournalMode(_) => Code::FailedPrecondition,
            EngineError::Unavailable(_) => Code::Unavailable,
            // A cluster that does not answer: the caller should retry later.
            EngineError::Timeout(_) => Code::Unavailable,
            EngineError::Unsupported(_) => Code::Unimplemented,
            EngineError::Ceph { .. } => Code::Internal,
            EngineError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// A status as the CLI prints an RPC's failure: `CODE_NAME: message`.
pub fn describe(s: &tonic::Status) -> String {
    format!("{}: {}", code_name(client_code(s)), client_message(s))
}

/// The message a client reports for an answer (see [`client_code`]).
pub fn client_message(s: &tonic::Status) -> String {
    if connection_lost(s) {
        format!("the connection broke during the call ({})", chain(s))
    } else {
        s.message().to_string()
    }
}

/// The code a client reports for an answer: tonic turns a connection that
/// broke in the middle of a call (the server killed, the socket gone) into
/// UNKNOWN "transport error"; that is UNAVAILABLE to an operator.
pub fn client_code(s: &tonic::Status) -> Code {
    if connection_lost(s) {
        Code::Unavailable
    } else {
        s.code()
    }
}

/// Whether `s` is tonic's wrapping of a transport failure, not an answer.
fn connection_lost(s: &tonic::Status) -> bool {
    use std::error::Error as _;
    if s.code() != Code::Unknown {
        return false;
    }
    let mut cause = s.source();
    while let Some(e) = cause {
        if e.is::<hyper::Error>() || e.is::<tonic::transport::Error>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The message of `s` and its causes, `: `-separated.
fn chain(s: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut out = s.message().to_string();
    let mut cause = s.source();
    while let Some(e) = cause {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cause = e.source();
    }
    out
}

/// The canonical name of a gRPC code (`OK`, `UNAVAILABLE`, ...), as the
/// admin API reports per-image outcomes and grpcurl prints codes.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Validates the target of an admin pool request: the pool (required) and
/// the RBD namespace (empty: every namespace). INVALID_ARGUMENT through
/// `From<EngineError>` when malformed; whether they exist is the engine's
/// NOT_FOUND.
pub fn pool_request(pool: &str, namespace: &str) -> Result<Option<String>, EngineError> {
    pool_request_in(pool, namespace, false)
}

/// [`pool_request`], where an empty namespace with `default_only` means the
/// pool's default namespace alone (`default_namespace_only`).
pub fn pool_request_in(
    pool: &str,
    namespace: &str,
    default_only: bool,
) -> Result<Option<String>, EngineError> {
    csirr_engine::pool::validate_target(pool, namespace)?;
    Ok((default_only || !namespace.is_empty()).then(|| namespace.to_string()))
}

impl From<ForwardError> for Status {
    /// Every forwarding failure is a transport failure on the way to
    /// ceph-csi: the caller should retry.
    fn from(e: ForwardError) -> Self {
        Status::unavailable(e.to_string())
    }
}

/// An RPC's `secrets`, taken out of the request so that the values (the
/// cephx key) are wiped when the handler is done, whatever the outcome. The
/// copies in tonic's and prost's receive buffers are out of reach.
pub struct Secrets(HashMap<String, String>);

impl Secrets {
    /// Moves the map out of a request, leaving it empty.
    pub fn take(secrets: &mut HashMap<String, String>) -> Self {
        Self(std::mem::take(secrets))
    }
}

impl std::ops::Deref for Secrets {
    type Target = HashMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only, never values.
        f.debug_set().entries(self.0.keys()).finish()
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        for value in self.0.values_mut() {
            value.zeroize();
        }
    }
}

/// Validates the volume of a request: `replication_source.volume.volume_id`,
/// or the deprecated `volume_id` field older sidecars send; plus secrets.
pub fn volume_request(
    deprecated_volume_id: &str,
    source: Option<&ReplicationSource>,
    secrets: &HashMap<String, String>,
) -> Result<VolumeRequest, EngineError> {
    let from_source = match source.and_then(|s| s.r#type.as_ref()) {
        Some(SourceType::Volume(v)) => Some(v.volume_id.as_str()),
        Some(SourceType::Volumegroup(_)) => {
            return Err(EngineError::Unsupported(
                "this call takes a single volume, not a volume group (the replication \
                 service serves groups through its own path)"
                    .into(),
            ));
        }
        None => None,
    };
    let id = match (from_source, deprecated_volume_id) {
        (Some(s), d) if !d.is_empty() && d != s => {
            return Err(EngineError::InvalidArgument(format!(
                "volume_id {d:?} and replication_source.volume.volume_id {s:?} differ"
            )));
        }
        (Some(s), _) if !s.is_empty() => s,
        (_, d) => d,
    };
    let volume = VolumeId::parse(id).map_err(|e| EngineError::InvalidArgument(e.to_string()))?;
    let creds = Credentials::from_secrets(secrets)?;
    Ok(VolumeRequest { volume, creds })
}

/// Validates a request's `volume_group_id`.
pub fn group_id(id: &str) -> Result<VolumeGroupId, EngineError> {
    VolumeGroupId::parse(id).map_err(|e| EngineError::InvalidArgument(e.to_string()))
}

/// Validates a request's `volume_ids`; duplicates count once.
pub fn volume_ids(ids: &[String]) -> Result<Vec<VolumeId>, EngineError> {
    let mut out: Vec<VolumeId> = Vec::with_capacity(ids.len());
    for id in ids {
        let v = VolumeId::parse(id)
            .map_err(|e| EngineError::InvalidArgument(format!("volume_ids: {e}")))?;
        if !out.contains(&v) {
            out.push(v);
        }
    }
    Ok(out)
}

/// Validates a CreateVolumeGroup request: a name, well-formed volume IDs,
/// and the `pool` and `clusterID` parameters (other parameters, such as a
/// VolumeGroupReplicationClass' own, are ignored).
pub fn create_group_request(
    name: &str,
    parameters: &HashMap<String, String>,
    volume_ids_: &[String],
    secrets: &HashMap<String, String>,
) -> Result<CreateGroup, EngineError> {
    if name.is_empty() {
        return Err(EngineError::InvalidArgument(
            "name is required: CreateVolumeGroup is idempotent by name".into(),
        ));
    }
    let param = |key: &str| -> Result<Option<String>, EngineError> {
        match parameters.get(key).map(String::as_str) {
            None => Ok(None),
            Some("") => Err(EngineError::InvalidArgument(format!(
                "parameter {key} is empty"
            ))),
            Some(v) => Ok(Some(v.to_string())),
        }
    };
    Ok(CreateGroup {
        name: name.to_string(),
        pool: param("pool")?,
        cluster_id: param("clusterID")?,
        volumes: volume_ids(volume_ids_)?,
        creds: Credentials::from_secrets(secrets)?,
    })
}

/// Validates ListVolumeGroups' paging: `max_entries` (0: no limit) and
/// `starting_token` ("" or a `next_token` this sidecar handed out, which
/// is the last group ID of the previous page). A bad token is
/// `InvalidToken` (ABORTED: start again), as the spec asks.
pub fn list_page(
    max_entries: i32,
    starting_token: &str,
) -> Result<(usize, Option<VolumeGroupId>), EngineError> {
    let max = usize::try_from(max_entries).map_err(|_| {
        EngineError::InvalidArgument(format!("max_entries {max_entries} is negative"))
    })?;
    if starting_token.is_empty() {
        return Ok((max, None));
    }
    let after = VolumeGroupId::parse(starting_token).map_err(|e| {
        EngineError::InvalidToken(format!(
            "starting_token {starting_token:?} is not a next_token of ListVolumeGroups ({e}); \
             list again from the start"
        ))
    })?;
    Ok((max, Some(after)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::replication::replication_source::{VolumeGroupSource, VolumeSource};

    const H: &str = "0001-0009-rook-ceph-0000000000000002-b0285c97-a0ce-11eb-8c66-0242ac110002";

    fn src(id: &str) -> ReplicationSource {
        ReplicationSource {
            r#type: Some(SourceType::Volume(VolumeSource {
                volume_id: id.into(),
            })),
        }
    }

    #[test]
    fn every_engine_error_has_its_code() {
        let cases = [
            (
                EngineError::InvalidArgument("x".into()),
                Code::InvalidArgument,
            ),
            (EngineError::NotFound("x".into()), Code::NotFound),
            (EngineError::AlreadyExists("x".into()), Code::AlreadyExists),
            (EngineError::InvalidToken("x".into()), Code::Aborted),
            (
                EngineError::Unauthenticated("x".into()),
                Code::Unauthenticated,
            ),
            (
                EngineError::PermissionDenied("x".into()),
                Code::PermissionDenied,
            ),
            (EngineError::Busy("v".into()), Code::Aborted),
            (EngineError::Conflict("x".into()), Code::Aborted),
            (
                EngineError::FailedPrecondition("x".into()),
                Code::FailedPrecondition,
            ),
            (EngineError::Unavailable("x".into()), Code::Unavailable),
            (
                EngineError::JournalUnavailable {
                    volume: "v".into(),
                    reason: "r".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                EngineError::ModeMismatch {
                    volume: "v".into(),
                    enabled: "snapshot".into(),
                    requested: "journal".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                EngineError::NotInJournalMode("x".into()),
                Code::FailedPrecondition,
            ),
            (EngineError::Timeout("x".into()), Code::Unavailable),
            (EngineError::Unsupported("x".into()), Code::Unimplemented),
            (EngineError::Internal("x".into()), Code::Internal),
            (
                EngineError::Ceph {
                    context: "c".into(),
                    source: csirr_ceph::Error::from_errno(libc::EIO, "rbd_open", "p/i"),
                },
                Code::Internal,
            ),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = from_engine(e);
            assert_eq!(s.code(), code, "{msg}");
            assert_eq!(s.message(), msg);
        }
    }

    #[test]
    fn code_names_are_the_canonical_ones() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
        let s = from_engine(EngineError::Busy("p/i".into()));
        assert_eq!(code_name(s.code()), "ABORTED");
    }

    #[test]
    fn pool_requests_need_a_pool_name() {
        assert_eq!(pool_request("replicapool", "").unwrap(), None);
        assert_eq!(
            pool_request_in("replicapool", "", true).unwrap().as_deref(),
            Some("")
        );
        assert_eq!(
            pool_request("replicapool", "ns1").unwrap().as_deref(),
            Some("ns1")
        );
        let s = from_engine(pool_request("", "").unwrap_err());
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("pool name is empty"), "{s:?}");
        let s = from_engine(pool_request("a/b", "").unwrap_err());
        assert_eq!(s.code(), Code::InvalidArgument);
    }

    #[test]
    fn forwarding_errors_are_unavailable_and_name_the_endpoint() {
        let endpoint: crate::server::Endpoint =
            "unix:///csi/csi-addons-cephcsi.sock".parse().unwrap();
        let e = ForwardError::Connect {
            endpoint: endpoint.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let s = Status::from(e);
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("unix:///csi/csi-addons-cephcsi.sock"));
        let s = Status::from(ForwardError::ConnectTimeout {
            endpoint,
            timeout: std::time::Duration::from_secs(5),
        });
        assert_eq!(s.code(), Code::Unavailable);
    }

    #[test]
    fn volume_from_source_or_deprecated_field() {
        let none = HashMap::new();
        let r = volume_request("", Some(&src(H)), &none).unwrap();
        assert!(matches!(r.volume, VolumeId::Handle(_)));
        let r = volume_request("replicapool/img", None, &none).unwrap();
        assert_eq!(r.volume.to_string(), "replicapool/img");
        assert!(volume_request(H, Some(&src(H)), &none).is_ok());
        assert!(matches!(
            volume_request("replicapool/a", Some(&src("replicapool/b")), &none),
            Err(EngineError::InvalidArgument(_))
        ));
    }

    #[test]
    fn bad_volume_ids_are_invalid_argument() {
        let none = HashMap::new();
        for bad in [
            "",
            "0001-0009-rook-ceph-00000000000000zz-b0285c97-a0ce-11eb-8c66-0242ac110002",
            "a/b/c/d",
            "pool/img@snap",
        ] {
            assert!(
                matches!(
                    volume_request(bad, None, &none),
                    Err(EngineError::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
        let group = ReplicationSource {
            r#type: Some(SourceType::Volumegroup(VolumeGroupSource {
                volume_group_id: "g".into(),
            })),
        };
        assert!(matches!(
            volume_request("", Some(&group), &none),
            Err(EngineError::Unsupported(_))
        ));
    }

    #[test]
    fn secrets_leave_the_request_and_never_show_their_values() {
        let mut map = HashMap::from([
            ("userID".to_string(), "csi-rbd-provisioner".to_string()),
            (
                "userKey".to_string(),
                "AQBf4VdnAAAAABAAAAECAwQFBgcICQoLDA0ODw==".to_string(),
            ),
        ]);
        let secrets = Secrets::take(&mut map);
        assert!(map.is_empty(), "the request keeps no copy");
        assert_eq!(secrets.len(), 2);
        let shown = format!("{secrets:?}");
        assert!(shown.contains("userKey"), "{shown}");
        assert!(
            !shown.contains("AQB") && !shown.contains("csi-rbd"),
            "{shown}"
        );
    }

    #[test]
    fn group_requests_are_validated() {
        let none = HashMap::new();
        assert!(matches!(group_id(""), Err(EngineError::InvalidArgument(_))));
        assert!(matches!(
            group_id("grp"),
            Err(EngineError::InvalidArgument(_))
        ));
        assert_eq!(group_id(H).unwrap().to_string(), H);

        let ids = vec![H.to_string(), "replicapool/a".into(), H.to_string()];
        assert_eq!(volume_ids(&ids).unwrap().len(), 2, "duplicates count once");
        let bad = vec!["pool/img@snap".to_string()];
        assert!(matches!(
            volume_ids(&bad),
            Err(EngineError::InvalidArgument(_))
        ));

        let params = HashMap::from([("pool".to_string(), "replicapool".to_string())]);
        let c = create_group_request("vgrc-1", &params, &ids, &none).unwrap();
        assert_eq!(c.pool.as_deref(), Some("replicapool"));
        assert_eq!((c.cluster_id, c.volumes.len()), (None, 2));
        assert!(matches!(
            create_group_request("", &params, &ids, &none),
            Err(EngineError::InvalidArgument(_))
        ));
        let empty = HashMap::from([("clusterID".to_string(), String::new())]);
        assert!(matches!(
            create_group_request("n", &empty, &[], &none),
            Err(EngineError::InvalidArgument(_))
        ));
    }

    #[test]
    fn list_paging_codes() {
        assert_eq!(list_page(0, "").unwrap(), (0, None));
        assert_eq!(list_page(5, H).unwrap().1.unwrap().to_string(), H);
        assert_eq!(
            from_engine(list_page(-1, "").unwrap_err()).code(),
            Code::InvalidArgument
        );
        assert_eq!(
            from_engine(list_page(1, "page-2").unwrap_err()).code(),
            Code::Aborted
        );
    }
}
