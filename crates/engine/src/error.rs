//! The engine's typed errors. Each variant says what went wrong in terms an
//! operator understands; `csirr_grpc::status` maps them to gRPC codes in one
//! place.

use csirr_ceph as ceph;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed (volume ID, parameter, secrets shape).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, pool or image does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already, incompatibly with the request (a volume group of
    /// that name with other parameters or members).
    #[error("{0}")]
    AlreadyExists(String),
    /// A list request's page token is not one this sidecar handed out:
    /// start the listing again.
    #[error("{0}")]
    InvalidToken(String),
    /// The cluster rejected the credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credentials lack a capability for this operation.
    #[error("{0}")]
    PermissionDenied(String),
    /// Another operation on the same volume is running.
    #[error("an operation on volume {0} is already in progress")]
    Busy(String),
    /// A registry record changed between the read a decision was based on
    /// and the conditional write of that decision (another sidecar on this
    /// site wrote it); re-read and decide again.
    #[error("{0}")]
    Conflict(String),
    /// The volume is not in a state that allows this (e.g. not enabled).
    #[error("{0}")]
    FailedPrecondition(String),
    /// `mirroringMode: journal` asked for an image that cannot have
    /// exclusive-lock and journaling (nothing was changed).
    #[error("volume {volume} cannot be replicated in journal mode: {reason}")]
    JournalUnavailable {
        /// The volume.
        volume: String,
        /// Why (Ceph's answer to enabling the features).
        reason: String,
    },
    /// Enable asked for another mirroring mode than the one the volume is
    /// already replicated in (switching is not supported).
    #[error(
        "volume {volume} is already replicated in mirroringMode {enabled}, not {requested}; \
         switching modes is not supported: disable replication first, then enable it with \
         mirroringMode {requested}"
    )]
    ModeMismatch {
        /// The volume.
        volume: String,
        /// The mode it is replicated in.
        enabled: String,
        /// The mode asked for.
        requested: String,
    },
    /// The operation is not served for images replicated in journal mode
    /// (yet); the image is fine.
    #[error("{0}")]
    NotInJournalMode(String),
    /// Retry later (e.g. a demotion snapshot is still being replayed).
    #[error("{0}")]
    Unavailable(String),
    /// A cluster did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// Not supported by this version.
    #[error("{0}")]
    Unsupported(String),
    /// A Ceph call failed unexpectedly.
    #[error("{context}: {source}")]
    Ceph {
        /// What the engine was doing.
        context: String,
        /// The failed call.
        #[source]
        source: ceph::Error,
    },
    /// A bug or an unexpected condition (e.g. a corrupt registry record).
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    /// Whether the cluster fenced this client (`EBLOCKLISTED`): nothing it
    /// sends through that connection will be accepted again.
    pub fn is_blocklisted(&self) -> bool {
        matches!(self, Self::Ceph { source, .. } if source.kind() == ceph::ErrorKind::Blocklisted)
    }
}

/// Result of an engine operation.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Adds context to a Ceph error, keeping expected kinds typed.
pub trait CephContext<T> {
    /// Wraps a Ceph error with what the engine was doing.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CephContext<T> for ceph::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| EngineError::from_ceph(context(), e))
    }
}

impl EngineError {
    /// A Ceph error with what the engine was doing; expected kinds stay
    /// typed (not found, permission denied, timed out).
    pub fn from_ceph(context: String, e: ceph::Error) -> Self {
        match e.kind() {
            ceph::ErrorKind::NotFound => EngineError::NotFound(format!("{context}: {e}")),
            ceph::ErrorKind::PermissionDenied => {
                EngineError::PermissionDenied(format!("{context}: {e}"))
            }
            ceph::ErrorKind::TimedOut => EngineError::Timeout(format!("{context}: {e}")),
            _ => EngineError::Ceph { context, source: e },
        }
    }
}

impl From<csirr_omap::OmapError> for EngineError {
    /// Journal errors: Ceph failures keep their kind; an entry that belongs
    /// to something else or holds what ceph-csi would not write is a
    /// precondition a human must look at.
    fn from(e: csirr_omap::OmapError) -> Self {
        match e {
            csirr_omap::OmapError::Ceph { context, source } => Self::from_ceph(context, source),
            other => EngineError::FailedPrecondition(other.to_string()),
        }
    }
}
