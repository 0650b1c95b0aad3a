//! Property tests of the copy planner and snapshot pruning: a model of one
//! volume's two snapshot lists driven through any interleaving of scheduler
//! ticks, user snapshots taken and removed on the primary, and syncs that a
//! crash may cut short between any two steps. The decisions are the
//! engine's own functions (`plan_points`, `surplus`, `replica_surplus`);
//! the model stands in for librbd's snapshot lists only.

use proptest::prelude::*;

use super::{plan_points, replica_surplus, surplus};
use crate::registry::{sync_snap_name, sync_snap_seq, sync_snaps};
use csirr_ceph::SnapInfo;

/// A step of the model.
#[derive(Debug, Clone)]
enum Op {
    /// The primary's scheduler at a due time.
    Tick,
    /// A user snapshot taken on the primary.
    UserSnap,
    /// The primary's n-th user snapshot (modulo their number) removed.
    UserRemove(usize),
    /// The replica's replayer syncs; `Some(k)`: the process dies before
    /// its k-th step (each copied point, the record, the replica's
    /// snapshot of the record, the replica's pruning).
    Sync(Option<usize>),
}

/// One site's snapshots; ids grow as librbd's do.
#[derive(Default)]
struct Side {
    snaps: Vec<SnapInfo>,
    next_id: u64,
}

impl Side {
    fn add(&mut self, name: &str) {
        if self.has(name) {
            return;
        }
        self.next_id += 1;
        self.snaps.push(SnapInfo {
            id: self.next_id,
            size: 1 << 30,
            name: name.to_owned(),
        });
    }

    fn remove(&mut self, names: &[String]) {
        self.snaps.retain(|s| !names.contains(&s.name));
    }

    fn has(&self, name: &str) -> bool {
        self.snaps.iter().any(|s| s.name == name)
    }

    fn users(&self) -> Vec<&str> {
        self.snaps
            .iter()
            .filter(|s| sync_snap_seq(&s.name).is_none())
            .map(|s| s.name.as_str())
            .collect()
    }
}

/// The primary, the replica and the replica's record of its newest sync
/// point (`pending`: recorded, its snapshot on the replica not taken yet).
struct Model {
    keep: usize,
    primary: Side,
    replica: Side,
    recorded: Option<String>,
    pending: Option<String>,
    users: u64,
    completed: usize,
}

impl Model {
    fn new(keep: usize) -> Model {
        Model {
            keep,
            primary: Side::default(),
            replica: Side::default(),
            recorded: None,
            pending: None,
            users: 0,
            completed: 0,
        }
    }

    fn tick(&mut self) {
        let sync = sync_snaps(&self.primary.snaps);
        let Some((&seq, snap)) = sync.iter().next_back() else {
            self.primary.add(&sync_snap_name(1));
            return;
        };
        // At most one sync point pending: the next waits for the replica.
        if self.recorded.as_deref() != Some(snap.name.as_str()) {
            return;
        }
        let doomed = surplus(self.keep, &sync, &[&snap.name]);
        self.primary.remove(&doomed);
        self.primary.add(&sync_snap_name(seq + 1));
    }

    fn sync(&mut self, crash: Option<usize>) -> Result<(), TestCaseError> {
        if let Some(p) = self.pending.take() {
            self.replica.add(&p);
        }
        let pall = self.primary.snaps.clone();
        let psync = sync_snaps(&pall);
        let Some((_, target)) = psync.iter().next_back() else {
            return Ok(());
        };
        if self.recorded.as_deref() == Some(target.name.as_str()) {
            return Ok(());
        }
        let rall = self.replica.snaps.clone();
        let (base, points) = plan_points(&pall, &psync, &rall, target);
        self.check_plan(base.as_ref(), &points, &pall, &rall, target)?;
        let protect: Vec<&str> = base
            .iter()
            .map(|b| b.name.as_str())
            .chain([target.name.as_str()])
            .collect();
        let doomed = surplus(self.keep, &psync, &protect);
        self.primary.remove(&doomed);

        let mut step = 0;
        let mut dies = || {
            step += 1;
            crash == Some(step - 1)
        };
        for p in &points[..points.len() - 1] {
            if dies() {
                return Ok(());
            }
            self.replica.add(&p.name);
        }
        if dies() {
            return Ok(());
        }
        self.recorded = Some(target.name.clone());
        self.pending = Some(target.name.clone());
        if dies() {
            return Ok(());
        }
        self.replica.add(&target.name);
        self.pending = None;
        if dies() {
            return Ok(());
        }
        let rall = self.replica.snaps.clone();
        let gone = replica_surplus(self.keep, &pall, &rall, &target.name);
        self.replica.remove(&gone);
        self.completed += 1;
        // Pruned: the replica's sync snapshots are bounded and its user
        // snapshots are the primary's.
        let rsync = sync_snaps(&self.replica.snaps).len();
        prop_assert!(
            rsync <= self.keep.max(1),
            "replica keeps {rsync} sync snapshots"
        );
        let pusers = self.primary.users();
        for u in self.replica.users() {
            prop_assert!(
                pusers.contains(&u),
                "replica keeps {u}, gone on the primary"
            );
        }
        Ok(())
    }

    /// What any plan must be: from the newest sync snapshot both sides
    /// hold (there is one once a sync point was recorded: no full copy
    /// after a crash), through every user snapshot the replica lacks in
    /// between, in order, to the target.
    fn check_plan(
        &self,
        base: Option<&SnapInfo>,
        points: &[SnapInfo],
        pall: &[SnapInfo],
        rall: &[SnapInfo],
        target: &SnapInfo,
    ) -> Result<(), TestCaseError> {
        let on_replica = |n: &str| rall.iter().any(|s| s.name == n);
        if self.recorded.is_some() {
            prop_assert!(base.is_some(), "no base after a recorded sync point");
        }
        if let Some(b) = base {
            prop_assert!(sync_snap_seq(&b.name).is_some() && on_replica(&b.name));
            prop_assert!(pall.iter().any(|s| s.name == b.name));
            let newer_common = sync_snaps(pall)
                .values()
                .any(|s| s.id > b.id && s.name != target.name && on_replica(&s.name));
            prop_assert!(!newer_common, "an older base than the newest common one");
        }
        prop_assert_eq!(&points.last().unwrap().name, &target.name);
        prop_assert!(points.windows(2).all(|w| w[0].id < w[1].id));
        let base_id = base.map_or(0, |b| b.id);
        let wanted: Vec<&str> = pall
            .iter()
            .filter(|s| {
                sync_snap_seq(&s.name).is_none()
                    && s.id > base_id
                    && s.id < target.id
                    && !on_replica(&s.name)
            })
            .map(|s| s.name.as_str())
            .collect();
        let got: Vec<&str> = points[..points.len() - 1]
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        prop_assert_eq!(got, wanted);
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Tick => self.tick(),
            Op::UserSnap => {
                self.users += 1;
                self.primary.add(&format!("user{}", self.users));
            }
            Op::UserRemove(n) => {
                let users: Vec<String> = self
                    .primary
                    .users()
                    .into_iter()
                    .map(str::to_owned)
                    .collect();
                if !users.is_empty() {
                    self.primary.remove(&[users[n % users.len()].clone()]);
                }
            }
            Op::Sync(crash) => self.sync(*crash)?,
        }
        // The recorded sync point stays on both sides (pruning protects
        // it), and the primary's sync snapshots are bounded.
        if let Some(r) = &self.recorded {
            prop_assert!(
                self.primary.has(r),
                "the primary lost the recorded point {r}"
            );
            prop_assert!(self.replica.has(r) || self.pending.as_ref() == Some(r));
        }
        let psync = sync_snaps(&self.primary.snaps).len();
        prop_assert!(
            psync <= self.keep.max(1) + 1,
            "primary keeps {psync} sync snapshots"
        );
        Ok(())
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::Tick),
        2 => Just(Op::UserSnap),
        1 => any::<usize>().prop_map(Op::UserRemove),
        2 => Just(Op::Sync(None)),
        2 => (0usize..6).prop_map(|k| Op::Sync(Some(k))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn plans_and_pruning_keep_a_base_under_any_interleaving(
        keep in 0usize..5,
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let mut m = Model::new(keep);
        for op in &ops {
            m.apply(op)?;
        }
    }
}

/// The model is not vacuous: a plain run completes syncs and copies user
/// snapshots in between.
#[test]
fn a_plain_run_completes_syncs_with_user_snapshots() {
    let mut m = Model::new(2);
    for op in [
        Op::Tick,
        Op::Sync(None),
        Op::UserSnap,
        Op::Tick,
        Op::Sync(Some(1)),
        Op::Sync(None),
        Op::UserRemove(0),
        Op::Tick,
        Op::Sync(None),
    ] {
        m.apply(&op).unwrap();
    }
    assert_eq!(m.completed, 3);
    assert!(
        m.replica.users().is_empty(),
        "user1 went with the primary's"
    );
    assert_eq!(sync_snaps(&m.replica.snaps).len(), 2);
}
