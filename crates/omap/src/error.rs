//! The omap generator's typed errors.

use csirr_ceph as ceph;

/// What reading or writing ceph-csi's omap journal can fail with.
#[derive(Debug, thiserror::Error)]
pub enum OmapError {
    /// The PV-name key of the directory points to another volume.
    #[error(
        "{directory} in {journal}: key {key} points to volume {found:?}, not to {expected:?}: \
         it belongs to another volume; not overwriting it"
    )]
    DirectoryConflict {
        /// The directory object, `csi.volumes.<instance>`.
        directory: String,
        /// `pool[/namespace]` of the journal.
        journal: String,
        /// The key, `csi.volume.<PV name>`.
        key: String,
        /// Its current value (`<uuid>` or `<pool id>/<uuid>`).
        found: String,
        /// The value this volume needs.
        expected: String,
    },
    /// `csi.volume.<uuid>` exists and describes another volume (another PV
    /// name, another image, other encryption settings).
    #[error(
        "{oid} in {pool}: {field} is {found:?}, but this volume needs {expected:?}: the entry \
         belongs to another volume; not overwriting it"
    )]
    VolumeConflict {
        /// The object, `csi.volume.<uuid>`.
        oid: String,
        /// `pool[/namespace]` of the image.
        pool: String,
        /// The key that disagrees.
        field: &'static str,
        /// Its current value.
        found: String,
        /// The value this volume needs.
        expected: String,
    },
    /// Someone else kept changing the entry while we wrote it.
    #[error("{what} changed concurrently {attempts} times while being written; giving up")]
    Contended {
        /// The object and key.
        what: String,
        /// Attempts made.
        attempts: u32,
    },
    /// The primary image has no ceph-csi journal entry to copy.
    #[error(
        "{oid} does not exist in {pool} on the primary cluster: the image is not a ceph-csi \
         volume there (or its journal entry was lost)"
    )]
    PrimaryEntryMissing {
        /// The object, `csi.volume.<uuid>`.
        oid: String,
        /// `pool[/namespace]` on the primary.
        pool: String,
    },
    /// A stored value or an argument is not what ceph-csi writes.
    #[error("{0}")]
    Invalid(String),
    /// A Ceph call failed.
    #[error("{context}: {source}")]
    Ceph {
        /// What was being done.
        context: String,
        /// The failed call.
        #[source]
        source: ceph::Error,
    },
}

impl OmapError {
    /// Whether the error says that the entry belongs to another volume (the
    /// caller must not retry; a human must look).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Self::DirectoryConflict { .. } | Self::VolumeConflict { .. }
        )
    }
}

/// Adds context to a Ceph error.
pub(crate) trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, OmapError>;
}

impl<T> Context<T> for ceph::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, OmapError> {
        self.map_err(|source| OmapError::Ceph {
            context: context(),
            source,
        })
    }
}
