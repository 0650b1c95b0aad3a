//! Registry records are changed by compare-and-swap only (issue 13.5): two
//! writers that read the same record and both write it cannot both win; the
//! loser gets a conflict, nothing it wrote lands, and after re-reading it
//! applies its change on top of the winner's. Every writer here has its own
//! RADOS connection, as two sidecars on one site have, and the records live
//! in a RADOS namespace of their own that no sidecar reads. Last, a role
//! change whose record changed under it decides again instead of
//! overwriting it.

mod common;

use std::sync::{Arc, Barrier, Mutex};

use chrono::Utc;
use common::*;
use csi_rbd_replicator::ceph::IoCtx;
use csi_rbd_replicator::engine::EngineError;
use csi_rbd_replicator::engine::registry::{
    ImageRecord, REGISTRY_OBJECT, Registry, Role, RoleChange, Schedule,
};

/// A registry on site-a in a fresh RADOS namespace (its object does not
/// exist yet), reached through a connection of its own.
fn registry(ns: &str) -> (Registry, Arc<IoCtx>) {
    let io = ioctx(Site::A, ns);
    (Registry::new(Arc::clone(&io)), io)
}

fn record(id: &str) -> ImageRecord {
    ImageRecord::new(
        format!("img-{id}"),
        id.into(),
        Role::Primary,
        "snapshot".into(),
        Schedule::default(),
    )
}

/// The writes a record carries, in `role_change.what` ("w1,w2,...").
fn marks(rec: &ImageRecord) -> Vec<String> {
    rec.role_change
        .as_ref()
        .map(|c| {
            c.what
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn add_mark(rec: &mut ImageRecord, mark: &str) {
    let mut m = marks(rec);
    m.push(mark.into());
    rec.role_change = Some(RoleChange {
        at: Utc::now(),
        what: m.join(","),
    });
}

fn is_conflict<T: std::fmt::Debug>(r: &Result<T, EngineError>) -> bool {
    matches!(r, Err(EngineError::Conflict(_)))
}

/// Two writers read one record and write it: the second write is refused,
/// the record is the winner's, and the loser's change lands after it
/// re-reads. Creating a record that another writer created meanwhile, and
/// removing one that changed since it was read, are refused the same way.
#[test]
fn the_second_of_two_writers_of_one_read_is_refused() {
    let ns = unique("cas");
    let (r1, io) = registry(&ns);
    let (r2, _) = registry(&ns);

    // Both create the same record: the registry object does not exist yet
    // (the first write creates it); one creation wins.
    let mut c1 = record("one");
    let mut c2 = record("one");
    add_mark(&mut c1, "created-by-1");
    add_mark(&mut c2, "created-by-2");
    r1.put(&mut c1).expect("the first creation");
    let lost = r2.put(&mut c2);
    assert!(
        is_conflict(&lost),
        "a second creation must conflict: {lost:?}"
    );
    assert_eq!(marks(&r2.get("one").unwrap().unwrap()), ["created-by-1"]);

    // Both read it, both change it.
    let mut a = r1.get("one").unwrap().unwrap();
    let mut b = r2.get("one").unwrap().unwrap();
    add_mark(&mut a, "a");
    add_mark(&mut b, "b");
    a.role = Role::Demoted;
    r1.put(&mut a).expect("the first write of the read");
    let lost = r2.put(&mut b);
    assert!(
        is_conflict(&lost),
        "the stale write must conflict: {lost:?}"
    );
    let now = r1.get("one").unwrap().unwrap();
    assert_eq!(marks(&now), ["created-by-1", "a"], "the winner's record");
    assert_eq!(now.role, Role::Demoted);
    // The winner may write again on what it wrote.
    add_mark(&mut a, "a2");
    r1.put(&mut a).expect("the winner writes on its own write");

    // The loser re-reads and decides again: nothing is lost.
    let mut b = r2.get("one").unwrap().unwrap();
    add_mark(&mut b, "b");
    r2.put(&mut b).expect("the write after a re-read");
    let last = r1.get("one").unwrap().unwrap();
    assert_eq!(marks(&last), ["created-by-1", "a", "a2", "b"]);
    assert_eq!(last.role, Role::Demoted, "b kept a's role change");

    // A removal based on an old read is refused; on the current one it works.
    let stale = a;
    let r = r1.remove(&stale);
    assert!(is_conflict(&r), "a stale removal must conflict: {r:?}");
    assert!(r1.get("one").unwrap().is_some(), "nothing was removed");
    r2.remove(&b).expect("removal of what was read");
    assert!(r1.get("one").unwrap().is_none());
    io.remove(REGISTRY_OBJECT).unwrap();
}

/// Four writers, each on its own connection, race on one record round
/// after round: all read, then all write at once. Exactly one write of each
/// round lands, the others conflict, and the record ends up holding every
/// write that was acknowledged and none that was refused.
#[test]
fn racing_writers_exactly_one_wins_each_round_and_nothing_acknowledged_is_lost() {
    const WRITERS: usize = 4;
    const ROUNDS: usize = 15;
    let ns = unique("casrace");
    let (r0, io) = registry(&ns);
    r0.put(&mut record("raced")).unwrap();
    let barrier = Arc::new(Barrier::new(WRITERS));
    let acked = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let refused = Arc::new(Mutex::new(Vec::<(usize, String)>::new()));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (reg, _) = registry(&ns);
            let (barrier, acked, refused) = (
                Arc::clone(&barrier),
                Arc::clone(&acked),
                Arc::clone(&refused),
            );
            std::thread::spawn(move || {
                for round in 0..ROUNDS {
                    let mut rec = reg.get("raced").unwrap().unwrap();
                    let mark = format!("w{w}r{round}");
                    add_mark(&mut rec, &mark);
                    // Everyone has read before anyone writes.
                    barrier.wait();
                    match reg.put(&mut rec) {
                        Ok(()) => acked.lock().unwrap().push((round, mark)),
                        Err(EngineError::Conflict(_)) => {
                            refused.lock().unwrap().push((round, mark))
                        }
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                    // Everyone has written before anyone reads again.
                    barrier.wait();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let acked = acked.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    for round in 0..ROUNDS {
        let won = acked.iter().filter(|(r, _)| *r == round).count();
        assert_eq!(won, 1, "round {round}: {won} writes of one read landed");
    }
    assert_eq!(refused.len(), ROUNDS * (WRITERS - 1));
    let last = marks(&r0.get("raced").unwrap().unwrap());
    let want: Vec<String> = acked.iter().map(|(_, m)| m.clone()).collect();
    assert_eq!(
        last, want,
        "the record holds every acknowledged write, in order"
    );
    for (_, m) in &refused {
        assert!(!last.contains(m), "refused write {m} landed");
    }
    io.remove(REGISTRY_OBJECT).unwrap();
}

/// Group records (`group.<uuid>`) are written by compare-and-swap like
/// image records: of two writers that read the same group record, the
/// second write is refused and changes nothing; a new record is refused
/// where one exists (two Enables of one group on two sidecars).
#[test]
fn group_records_are_compare_and_swap_too() {
    use csi_rbd_replicator::engine::group_repl::{GroupRecord, get_record, put_record};
    let ns = unique("casgroup");
    let (io1, io2) = (ioctx(Site::A, &ns), ioctx(Site::A, &ns));
    let fresh = || -> GroupRecord {
        serde_json::from_value(serde_json::json!({
            "uuid": "g1",
            "role": "primary",
            "schedule": {},
            "members": [],
            "enabled_at": Utc::now(),
        }))
        .expect("a group record")
    };
    put_record(&io1, &mut fresh()).expect("a new record");
    let err = put_record(&io2, &mut fresh()).expect_err("a second new record");
    assert!(matches!(err, EngineError::Conflict(_)), "{err}");
    let mut a = get_record(&io1, "g1").unwrap().expect("stored");
    let mut b = get_record(&io2, "g1").unwrap().expect("stored");
    a.schedule.interval = Some("1h".into());
    b.schedule.interval = Some("2h".into());
    put_record(&io1, &mut a).expect("the first writer");
    let err = put_record(&io2, &mut b).expect_err("the second writer of one read");
    assert!(matches!(err, EngineError::Conflict(_)), "{err}");
    let stored = get_record(&io2, "g1").unwrap().expect("stored");
    assert_eq!(stored.schedule.interval.as_deref(), Some("1h"));
    // Re-read, the second writer's change lands on top; and a writer's own
    // successive writes chain (its revision follows its write).
    let mut b = stored;
    b.schedule.start_time = Some("2026-01-01T00:00:00Z".into());
    put_record(&io2, &mut b).expect("after re-reading");
    b.schedule.interval = Some("3h".into());
    put_record(&io2, &mut b).expect("a second write of the same writer");
    let last = get_record(&io1, "g1").unwrap().expect("stored");
    assert_eq!(last.schedule.interval.as_deref(), Some("3h"));
    assert!(last.schedule.start_time.is_some());
    io1.remove(REGISTRY_OBJECT).unwrap();
}

/// Two sidecars of one site: a PromoteVolume on the first reads the record
/// and pauses (fault injection) while one on the second changes the
/// schedule; the first one's write conflicts, it re-reads and decides again,
/// and its own schedule lands on top of the other's instead of over it
/// blindly.
#[tokio::test]
#[cfg_attr(
    not(feature = "failpoints"),
    ignore = "uses fail points: cargo nextest run --features failpoints"
)]
async fn a_role_change_whose_record_changed_under_it_decides_again() {
    use csi_rbd_replicator::grpc::proto::replication::PromoteVolumeRequest;
    let pool = TestPool::new("casrpc");
    let args = ["--no-replayer", "--pools", &pool.name];
    let slow = Sidecar::start_with_env(
        Site::A,
        &args,
        &[("FAILPOINTS", "roles::after_record_read=sleep(8000)")],
    )
    .await;
    let fast = Sidecar::start(Site::A, &args).await;
    let aio = pool.ioctx(Site::A);
    let name = "vol";
    let vid = format!("{}/{name}", pool.name);
    create_image_in(&aio, name, 8 << 20, &[(0, 1 << 20)], 1);
    fast.controller()
        .await
        .enable_volume_replication(enable_req(Site::A, &vid, &[("schedulingInterval", "1h")]))
        .await
        .expect("enable");
    let promote = |site: Site, interval: &str| {
        let mut r = req::promote(site, &vid, false);
        r.parameters = [("schedulingInterval".to_string(), interval.to_string())].into();
        r
    };
    let interval = || {
        registry_record(&aio, name).unwrap()["schedule"]["interval"]
            .as_str()
            .map(str::to_string)
    };
    let mut cs = slow.controller().await;
    let req2: PromoteVolumeRequest = promote(Site::A, "2h");
    let first = tokio::spawn(async move { cs.promote_volume(req2).await });
    // The slow one has read the record and waits; the fast one writes.
    wait_until(
        "the slow promotion to read the record",
        std::time::Duration::from_secs(60),
        || slow.log_text().contains("registry record read"),
    )
    .await;
    fast.controller()
        .await
        .promote_volume(promote(Site::A, "3h"))
        .await
        .expect("the fast promotion");
    assert_eq!(interval().as_deref(), Some("3h"));
    assert!(
        !first.is_finished(),
        "the slow promotion finished before the fast one wrote: no race to judge"
    );
    first
        .await
        .unwrap()
        .expect("the slow promotion succeeds after deciding again");
    assert_eq!(interval().as_deref(), Some("2h"));
    assert!(
        slow.log_text().contains("deciding again"),
        "the slow promotion did not meet the conflict"
    );
}
