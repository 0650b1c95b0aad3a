//! What `migrate start --create-pools` and `migrate cleanup --remove-peers`
//! do with admin credentials of both clusters, which the sidecars do not
//! have: create the target pools (and namespaces) for RBD, put both sides
//! in image mirror mode and peer them with a bootstrap token, as the
//! runbook does with `ceph osd pool create`, `rbd pool init`, `rbd mirror
//! pool enable` and `rbd mirror pool peer bootstrap`; and remove those
//! peers again after the migration.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use csi_rbd_replicator::ceph::{self, Cluster, ConnectConfig, admin};

/// Admin access to both clusters.
#[derive(clap::Args, Clone, Default)]
pub struct ClusterAdmin {
    /// A ceph.conf of the source cluster with admin access (for
    /// --create-pools / --remove-peers).
    #[arg(long)]
    pub from_conf: Option<PathBuf>,
    /// Its keyring, if the ceph.conf does not name one.
    #[arg(long)]
    pub from_keyring: Option<PathBuf>,
    /// A ceph.conf of the target cluster with admin access.
    #[arg(long)]
    pub to_conf: Option<PathBuf>,
    /// Its keyring, if the ceph.conf does not name one.
    #[arg(long)]
    pub to_keyring: Option<PathBuf>,
    /// The cephx user of both (without `client.`).
    #[arg(long, default_value = "admin")]
    pub admin_user: String,
}

/// Bound on each cluster operation.
const OP_TIMEOUT: Duration = Duration::from_secs(60);

impl ClusterAdmin {
    fn connect(
        &self,
        conf: &Option<PathBuf>,
        keyring: &Option<PathBuf>,
        side: &str,
    ) -> Result<Arc<Cluster>, String> {
        let conf = conf.as_ref().ok_or_else(|| {
            format!("--{side}-conf is needed (admin access to the {side} cluster)")
        })?;
        Cluster::connect(&ConnectConfig {
            user: self.admin_user.clone(),
            conf_file: Some(conf.display().to_string()),
            keyring: keyring.as_ref().map(|k| k.display().to_string()),
            op_timeout: Some(OP_TIMEOUT),
            ..Default::default()
        })
        .map_err(|e| format!("connecting to the {side} cluster ({}): {e}", conf.display()))
    }

    /// Both clusters: (source, target).
    fn both(&self) -> Result<(Arc<Cluster>, Arc<Cluster>), String> {
        Ok((
            self.connect(&self.from_conf, &self.from_keyring, "from")?,
            self.connect(&self.to_conf, &self.to_keyring, "to")?,
        ))
    }
}

/// Creates what is missing for `pools` (`(pool, namespace)`) on the target
/// and peers each pool; returns one line per action taken. Blocking.
pub fn create_pools(a: &ClusterAdmin, pools: &[(String, String)]) -> Result<Vec<String>, String> {
    let (source, target) = a.both()?;
    let mut done = Vec::new();
    let mut existing = target.pool_list().map_err(|e| e.to_string())?;
    for (pool, ns) in pools {
        source
            .ioctx(pool, "")
            .map_err(|e| format!("source pool {pool}: {e}"))?;
        if !existing.contains(pool) {
            admin::create_rbd_pool(&target, pool).map_err(|e| format!("creating {pool}: {e}"))?;
            done.push(format!(
                "created pool {pool} on the target (rbd, initialised)"
            ));
            existing.push(pool.clone());
        }
        let tio = target.ioctx(pool, "").map_err(|e| e.to_string())?;
        if !ns.is_empty() && admin::ensure_namespace(&tio, ns).map_err(|e| e.to_string())? {
            done.push(format!("created namespace {pool}/{ns} on the target"));
        }
        for (side, c) in [("source", &source), ("target", &target)] {
            for n in std::iter::once("").chain((!ns.is_empty()).then_some(ns.as_str())) {
                let io = c.ioctx(pool, n).map_err(|e| e.to_string())?;
                if admin::ensure_mirror_image_mode(&io).map_err(|e| e.to_string())? {
                    done.push(format!("{side}: {} in image mirror mode", io.spec()));
                }
            }
        }
        if ceph::rbd::mirror_peer_list(&tio)
            .map_err(|e| e.to_string())?
            .is_empty()
        {
            let sio = source.ioctx(pool, "").map_err(|e| e.to_string())?;
            let token = admin::mirror_peer_bootstrap_create(&sio)
                .map_err(|e| format!("bootstrap token of {pool}: {e}"))?;
            admin::mirror_peer_bootstrap_import(&tio, &token)
                .map_err(|e| format!("peering {pool}: {e}"))?;
            done.push(format!("{pool}: peered both ways (bootstrap token, rx-tx)"));
        }
    }
    Ok(done)
}

/// Removes, for each pool, the mirror peer that names the other cluster on
/// both sides (other peers stay); returns one line per peer removed.
/// Blocking.
pub fn remove_peers(a: &ClusterAdmin, pools: &[(String, String)]) -> Result<Vec<String>, String> {
    let (source, target) = a.both()?;
    let names = [
        admin::mirror_site_name(&source).map_err(|e| e.to_string())?,
        admin::mirror_site_name(&target).map_err(|e| e.to_string())?,
    ];
    let mut done = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (pool, _) in pools {
        if !seen.insert(pool) {
            continue;
        }
        for (side, c, other) in [
            ("source", &source, &names[1]),
            ("target", &target, &names[0]),
        ] {
            let io = c.ioctx(pool, "").map_err(|e| e.to_string())?;
            for p in ceph::rbd::mirror_peer_list(&io).map_err(|e| e.to_string())? {
                if &p.site_name == other {
                    admin::mirror_peer_remove(&io, &p.uuid).map_err(|e| e.to_string())?;
                    done.push(format!("{side}: {pool}: removed peer {}", p.site_name));
                }
            }
        }
    }
    Ok(done)
}
