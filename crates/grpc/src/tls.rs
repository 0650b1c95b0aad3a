//! TLS for the `tcp://` endpoints: the server certificate and key, and the CA
//! that client certificates must chain to (`--tls-cert`, `--tls-key`,
//! `--tls-client-ca`).
//!
//! Owns: checking the flags' combination ([`TlsFiles::new`]), reading the PEM
//! files into a rustls [`ServerConfig`] (ring provider, TLS 1.2 and 1.3,
//! ALPN `h2`), and re-reading them when they change: every new connection
//! first compares the files' identity (device, inode, size, modification
//! time; `stat` follows the symlinks a mounted Kubernetes Secret swaps) with
//! the last load, and builds a new configuration if one differs. A change
//! that does not load (a half-written file, a key that does not match) is
//! logged and the previous configuration stays in use; connections already
//! open keep the certificate they were accepted with.
//!
//! The private key is read into a buffer that is wiped on drop, and the
//! decoded key is wiped once rustls holds its own signing key.
//!
//! Must not: accept connections (`server.rs` does), or touch unix sockets,
//! which stay plain (their access is the socket file's mode).

use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};
use zeroize::{Zeroize, Zeroizing};

/// Why the TLS flags or files were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// `--tls-key` without `--tls-cert`.
    #[error("--tls-key is given without --tls-cert: both are needed to serve TLS")]
    KeyWithoutCert,
    /// `--tls-cert` without `--tls-key`.
    #[error("--tls-cert is given without --tls-key: both are needed to serve TLS")]
    CertWithoutKey,
    /// `--tls-client-ca` without the server's own certificate and key.
    #[error(
        "--tls-client-ca is given without --tls-cert and --tls-key: client certificates \
         need a TLS server certificate"
    )]
    ClientCaWithoutCert,
    /// TLS flags, but no `tcp://` endpoint to apply them to.
    #[error(
        "--tls-cert is given but no --endpoint is tcp://host:port (unix sockets are not \
         served over TLS)"
    )]
    NoTcpEndpoint,
    /// A file could not be read.
    #[error("{what} {}: {source}", path.display())]
    Read {
        /// Which flag's file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file is not what its flag needs.
    #[error("{what} {}: {reason}", path.display())]
    Invalid {
        /// Which flag's file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key's content).
        reason: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// The TLS files of the `tcp://` endpoints, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain of the server, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the server (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// that chains to one of them.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The TLS files from the three optional flags: `None` when none is
    /// given (plain TCP), an error for an incomplete combination.
    pub fn new(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, TlsError> {
        match (cert, key, client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => Ok(Some(Self {
                cert,
                key,
                client_ca,
            })),
            (None, Some(_), _) => Err(TlsError::KeyWithoutCert),
            (Some(_), None, _) => Err(TlsError::CertWithoutKey),
            (None, None, Some(_)) => Err(TlsError::ClientCaWithoutCert),
        }
    }

    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
    }

    /// What identifies the files' current content without reading them.
    fn stamp(&self) -> Vec<Option<FileStamp>> {
        self.paths()
            .map(|p| {
                std::fs::metadata(p).ok().map(|m| FileStamp {
                    dev: m.dev(),
                    ino: m.ino(),
                    len: m.len(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                })
            })
            .collect()
    }

    /// Reads the files into a server configuration.
    fn load(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = read_certs("--tls-cert", &self.cert)?;
        let key = read_key(&self.key)?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs("--tls-client-ca", ca)? {
                    roots.add(c).map_err(|e| TlsError::Invalid {
                        what: "--tls-client-ca",
                        path: ca.clone(),
                        reason: e.to_string(),
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::Rustls(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let certified = certified_key(certs, key, &self.key)?;
        let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The signing key rustls keeps, made from `key`, which is wiped after.
fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    mut key: PrivateKeyDer<'static>,
    path: &Path,
) -> Result<CertifiedKey, TlsError> {
    // By reference: no copy of the DER is left behind in rustls.
    let signer = rustls::crypto::ring::sign::any_supported_type(&key);
    key.zeroize();
    let signer = signer.map_err(|e| TlsError::Invalid {
        what: "--tls-key",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let certified = CertifiedKey::new(certs, signer);
    certified.keys_match().map_err(|e| {
        TlsError::Rustls(format!(
            "--tls-key {} does not belong to the --tls-cert certificate: {e}",
            path.display()
        ))
    })?;
    Ok(certified)
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |reason: String| TlsError::Invalid {
        what,
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = Zeroizing::new(std::fs::read(path).map_err(|source| TlsError::Read {
        what: "--tls-key",
        path: path.to_path_buf(),
        source,
    })?);
    // The error names the file, never its content.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Invalid {
        what: "--tls-key",
        path: path.to_path_buf(),
        reason: format!("no usable PEM private key: {e}"),
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
}

/// The current server configuration, re-read when the files change.
pub struct TlsConfig {
    files: TlsFiles,
    current: Mutex<(Vec<Option<FileStamp>>, Arc<ServerConfig>)>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Loads the files; an error here is a startup error.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = files.stamp();
        let config = files.load()?;
        info!(
            cert = %files.cert.display(),
            client_ca = ?files.client_ca.as_ref().map(|p| p.display().to_string()),
            "TLS certificate loaded"
        );
        Ok(Self {
            files,
            current: Mutex::new((stamp, config)),
        })
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Whether clients must present a certificate.
    pub fn requires_client_cert(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for a new connection: re-read first if a file
    /// changed since the last load (a failed re-read keeps the last one).
    pub fn current(&self) -> Arc<ServerConfig> {
        let stamp = self.files.stamp();
        let mut current = self.current.lock();
        if current.0 != stamp {
            // Whatever the outcome, do not retry until the files change again.
            current.0 = stamp;
            match self.files.load() {
                Ok(config) => {
                    info!(cert = %self.files.cert.display(), "TLS files changed: reloaded");
                    current.1 = config;
                }
                Err(error) => warn!(
                    %error,
                    "TLS files changed but do not load; serving with the previous certificate"
                ),
            }
        }
        Arc::clone(&current.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Option<PathBuf> {
        Some(PathBuf::from(s))
    }

    #[test]
    fn flag_combinations() {
        assert_eq!(TlsFiles::new(None, None, None).unwrap(), None);
        let f = TlsFiles::new(p("c"), p("k"), None).unwrap().unwrap();
        assert_eq!(f.client_ca, None);
        let f = TlsFiles::new(p("c"), p("k"), p("ca")).unwrap().unwrap();
        assert_eq!(f.client_ca, p("ca"));
        assert!(matches!(
            TlsFiles::new(None, p("k"), None),
            Err(TlsError::KeyWithoutCert)
        ));
        assert!(matches!(
            TlsFiles::new(None, p("k"), p("ca")),
            Err(TlsError::KeyWithoutCert)
        ));
        assert!(matches!(
            TlsFiles::new(p("c"), None, p("ca")),
            Err(TlsError::CertWithoutKey)
        ));
        assert!(matches!(
            TlsFiles::new(None, None, p("ca")),
            Err(TlsError::ClientCaWithoutCert)
        ));
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let files = TlsFiles {
            cert: dir.path().join("missing.pem"),
            key: junk.clone(),
            client_ca: None,
        };
        let e = TlsConfig::load(files).unwrap_err().to_string();
        assert!(e.contains("--tls-cert") && e.contains("missing.pem"), "{e}");
        let files = TlsFiles {
            cert: junk.clone(),
            key: junk.clone(),
            client_ca: None,
        };
        let e = TlsConfig::load(files).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE block"), "{e}");
    }
}
