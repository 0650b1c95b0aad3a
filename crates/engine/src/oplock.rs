//! In-process mutual exclusion of operations on one volume: a second RPC on a
//! volume that is already being worked on gets `Busy` (gRPC ABORTED) instead
//! of waiting. The guard travels with the work, so a dropped RPC future does
//! not release the volume while its blocking work still runs.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

use super::error::{EngineError, Result};

/// The set of volumes with an operation in flight.
#[derive(Debug, Default, Clone)]
pub struct OpLocks {
    held: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation on a volume runs; releases on drop.
#[derive(Debug)]
pub struct OpGuard {
    held: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpLocks {
    /// Takes the volume `key`, or fails with `Busy` if it is taken.
    pub fn try_lock(&self, key: &str) -> Result<OpGuard> {
        let mut set = self.held.lock();
        if !set.insert(key.to_string()) {
            return Err(EngineError::Busy(key.to_string()));
        }
        Ok(OpGuard {
            held: Arc::clone(&self.held),
            key: key.to_string(),
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut set = self.held.lock();
        set.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_busy_until_release() {
        let l = OpLocks::default();
        let g = l.try_lock("v1").unwrap();
        assert!(matches!(l.try_lock("v1"), Err(EngineError::Busy(_))));
        assert!(l.try_lock("v2").is_ok());
        drop(g);
        assert!(l.try_lock("v1").is_ok());
    }
}
