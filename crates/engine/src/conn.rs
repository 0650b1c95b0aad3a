//! Credentials and a cache of cluster connections.
//!
//! An RPC authenticates with the `userID`/`userKey` of its `secrets`;
//! background work uses the sidecar's own Secret directory. Connections are
//! cached by monitors, user and a digest of the key (kept in memory only), so
//! that a burst of RPCs does not reconnect each time, and dropped after a
//! while unused. Keys are never logged: [`Credentials`]' `Debug` redacts them.
//! Every copy of a key this crate makes (the credentials, the files read, the
//! librados configuration) is wiped when dropped (`zeroize`); librados keeps
//! its own copy for the life of the connection, out of reach.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use csirr_ceph::{Cluster, ConnectConfig, ErrorKind};

use super::error::{EngineError, Result};

/// A cephx user and key.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User without the `client.` prefix.
    pub user: String,
    /// Secret key (base64), wiped on drop.
    key: Zeroizing<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Credentials from a user and key; `client.` prefixes are stripped.
    pub fn new(user: &str, key: &str) -> Result<Self> {
        let user = user.trim();
        let user = user.strip_prefix("client.").unwrap_or(user);
        let key = key.trim();
        if user.is_empty() {
            return Err(EngineError::InvalidArgument(
                "secret userID is empty".into(),
            ));
        }
        if key.is_empty() {
            return Err(EngineError::InvalidArgument(
                "secret userKey is empty".into(),
            ));
        }
        if user.contains(['\0', '\n']) || key.contains(['\0', '\n']) {
            return Err(EngineError::InvalidArgument(
                "secret userID or userKey contains a NUL or newline".into(),
            ));
        }
        if !is_cephx_key(key) {
            // Named by its user, never shown.
            return Err(EngineError::InvalidArgument(format!(
                "secret userKey of client.{user} is not a cephx key (the base64 secret of \
                 `ceph auth get-key client.{user}`)"
            )));
        }
        Ok(Self {
            user: user.to_string(),
            key: Zeroizing::new(key.to_string()),
        })
    }

    /// From an RPC's secrets: `None` when it carries none (the sidecar's own
    /// credentials are used then), an error when only half is there.
    pub fn from_secrets(secrets: &HashMap<String, String>) -> Result<Option<Self>> {
        match (secrets.get("userID"), secrets.get("userKey")) {
            (None, None) => Ok(None),
            (Some(u), Some(k)) => Self::new(u, k).map(Some),
            (Some(_), None) => Err(EngineError::InvalidArgument(
                "secrets carry userID but no userKey".into(),
            )),
            (None, Some(_)) => Err(EngineError::InvalidArgument(
                "secrets carry userKey but no userID".into(),
            )),
        }
    }

    /// From a Kubernetes Secret volume: files `userID` and `userKey`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .map(Zeroizing::new)
                .map_err(|e| {
                    EngineError::InvalidArgument(format!(
                        "cannot read {}: {e}",
                        dir.join(f).display()
                    ))
                })
        };
        Self::new(&read("userID")?, &read("userKey")?)
    }

    fn digest(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.key.hash(&mut h);
        h.finish()
    }

    /// The librados configuration to connect to `mon_host` as this user.
    pub fn connect_config(&self, mon_host: &str, timeout: Duration) -> ConnectConfig {
        ConnectConfig {
            mon_host: Some(mon_host.to_string()),
            user: self.user.clone(),
            key: Some(self.key.clone()),
            op_timeout: Some(timeout),
            ..Default::default()
        }
    }
}

/// Whether `key` has the shape of a cephx secret: base64 of a 28-byte
/// `CryptoKey` (type 1 = AES, an 8-byte creation time, length 16, 16 bytes of
/// key), as `ceph auth get-key` prints it.
fn is_cephx_key(key: &str) -> bool {
    use base64::Engine as _;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(b) => b.len() == 28 && b[0..2] == [1, 0] && b[10..12] == [16, 0],
        Err(_) => false,
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ConnKey {
    mon_host: String,
    user: String,
    key_digest: u64,
}

/// Cache of connected clusters.
pub struct Connections {
    cache: Mutex<HashMap<ConnKey, (Arc<Cluster>, Instant)>>,
    timeout: Duration,
    idle: Duration,
}

impl Connections {
    /// A cache whose connections time out operations after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
            timeout,
            idle: Duration::from_secs(600),
        }
    }

    /// A connection to `mon_host` as `creds`, cached or new. Blocking.
    pub fn get(&self, mon_host: &str, creds: &Credentials) -> Result<Arc<Cluster>> {
        let key = ConnKey {
            mon_host: mon_host.to_string(),
            user: creds.user.clone(),
            key_digest: creds.digest(),
        };
        {
            let mut cache = self.cache.lock();
            let now = Instant::now();
            cache.retain(|_, (_, used)| now.duration_since(*used) < self.idle);
            if let Some((c, used)) = cache.get_mut(&key) {
                *used = now;
                return Ok(Arc::clone(c));
            }
        }
        let c = Cluster::connect(&creds.connect_config(mon_host, self.timeout))
            .map_err(|e| connect_error(e, mon_host, &creds.user))?;
        // Which cephx user each connection is: the monitors list their
        // sessions by this id (tests/least_privilege.rs checks them).
        tracing::info!(
            %mon_host,
            user = %creds.user,
            instance_id = c.instance_id(),
            "connected to cluster"
        );
        let mut cache = self.cache.lock();
        let entry = cache.entry(key).or_insert((c, Instant::now()));
        Ok(Arc::clone(&entry.0))
    }

    /// Drops every connection (this client was fenced): the next calls
    /// reconnect.
    pub fn forget_all(&self) {
        self.cache.lock().clear();
    }

    /// Drops a connection that failed, so the next call reconnects.
    pub fn forget(&self, cluster: &Arc<Cluster>) {
        let mut cache = self.cache.lock();
        cache.retain(|_, (c, _)| !Arc::ptr_eq(c, cluster));
    }
}

/// Classifies a failed connect: rejected credentials are `Unauthenticated`.
fn connect_error(e: csirr_ceph::Error, mon_host: &str, user: &str) -> EngineError {
    match e.kind() {
        ErrorKind::PermissionDenied => EngineError::Unauthenticated(format!(
            "cluster at {mon_host} rejected the credentials of client.{user}: {e}"
        )),
        ErrorKind::TimedOut => EngineError::Timeout(format!(
            "cluster at {mon_host} did not answer in time (as client.{user}): {e}"
        )),
        // librados refuses a key it cannot parse before it asks anyone.
        ErrorKind::InvalidInput => EngineError::InvalidArgument(format!(
            "the credentials of client.{user} are malformed: {e}"
        )),
        _ => EngineError::Ceph {
            context: format!("connecting to {mon_host} as client.{user}"),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed cephx key (not one of any cluster).
    const KEY: &str = "AQBf4VdnAAAAABAAAAECAwQFBgcICQoLDA0ODw==";

    #[test]
    fn malformed_keys_are_invalid_arguments_that_do_not_show_the_key() {
        assert!(is_cephx_key(KEY));
        for bad in [
            "not-base64!",
            "AQBsecretsecretsecretsecretsecretsecr==",
            "AQBf4VdnAAAAABAAAAECAwQFBgcICQoLDA0O",
            "AgBf4VdnAAAAABAAAAECAwQFBgcICQoLDA0ODw==",
        ] {
            match Credentials::new("csi-rbd-provisioner", bad) {
                Err(EngineError::InvalidArgument(m)) => {
                    assert!(m.contains("client.csi-rbd-provisioner"), "{m}");
                    assert!(!m.contains(bad), "{m}");
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn secrets_shapes() {
        let mut m = HashMap::new();
        assert!(Credentials::from_secrets(&m).unwrap().is_none());
        m.insert("userID".to_string(), "client.admin".to_string());
        assert!(matches!(
            Credentials::from_secrets(&m),
            Err(EngineError::InvalidArgument(_))
        ));
        m.insert("userKey".to_string(), format!("{KEY}\n"));
        let c = Credentials::from_secrets(&m).unwrap().unwrap();
        assert_eq!(c.user, "admin");
        assert!(!format!("{c:?}").contains("AQB"));
        m.insert("userKey".to_string(), String::new());
        assert!(Credentials::from_secrets(&m).is_err());
    }

    #[test]
    fn from_dir_reads_secret_volume_layout() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("userID"), "csi-rbd-provisioner").unwrap();
        std::fs::write(d.path().join("userKey"), KEY).unwrap();
        let c = Credentials::from_dir(d.path()).unwrap();
        assert_eq!(c.user, "csi-rbd-provisioner");
        assert!(Credentials::from_dir(&d.path().join("missing")).is_err());
    }
}
