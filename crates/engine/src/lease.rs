//! The replayer's leases, as this process last saw them: one per pool, a cls
//! lock with a duration on the pool's registry object. The renewal runs on
//! its own timer, apart from the replayer's passes (a pass can take longer
//! than the lease), and every sync checks its pool's lease before it writes:
//! a replayer that lost it stops, so two never write one replica.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Until when this process may act on each pool it holds the lease of.
#[derive(Default)]
pub struct LeaseTable {
    valid_until: Mutex<HashMap<String, Instant>>,
}

impl LeaseTable {
    /// Records a lease on `pool` taken or renewed by a call that started at
    /// `asked` for `ttl`. Only three quarters of it count: the cluster's
    /// clock started later, and acting must stop before anyone else may.
    pub fn renewed(&self, pool: &str, asked: Instant, ttl: Duration) {
        self.map().insert(pool.to_string(), asked + ttl * 3 / 4);
    }

    /// Whether this process still holds the lease on `pool`.
    pub fn ok(&self, pool: &str) -> bool {
        self.map()
            .get(pool)
            .is_some_and(|until| Instant::now() < *until)
    }

    /// Forgets the lease on `pool`; whether it was held.
    pub fn lost(&self, pool: &str) -> bool {
        self.map().remove(pool).is_some()
    }

    /// Forgets every lease (the client was fenced).
    pub fn clear(&self) {
        self.map().clear();
    }

    /// The pools whose lease this process holds or held last.
    pub fn pools(&self) -> Vec<String> {
        self.map().keys().cloned().collect()
    }

    fn map(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Instant>> {
        self.valid_until.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_counts_for_three_quarters_of_its_ttl_from_the_ask() {
        let t = LeaseTable::default();
        assert!(!t.ok("p"));
        t.renewed("p", Instant::now(), Duration::from_secs(40));
        assert!(t.ok("p"));
        t.renewed(
            "q",
            Instant::now() - Duration::from_secs(31),
            Duration::from_secs(40),
        );
        assert!(!t.ok("q"), "past 3/4 of the ttl");
        assert!(t.lost("p"));
        assert!(!t.ok("p"));
        assert!(!t.lost("p"));
        t.clear();
        assert!(t.pools().is_empty());
    }
}
