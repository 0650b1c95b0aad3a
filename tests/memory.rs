//! Per-image memory of what the replayer keeps open (issue 19): the
//! resident set of this process before and after opening N replica-like
//! images the way the engine holds them (a read-write librbd handle holding
//! the exclusive lock), and N read-only handles as a sync opens its primary.
//! A measurement, not a check of the engine: run on demand with
//!
//!     cargo nextest run --test memory --run-ignored all --no-capture
//!
//! (`CSIRR_MEM_IMAGES` images, default 100). It prints KiB per image for each
//! step; the figures are in docs/design.md ("Memory per image").

mod common;

use std::time::Instant;

use common::*;
use csi_rbd_replicator::ceph::{self, Image};

const MIB: u64 = 1 << 20;

/// A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, ...).
fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

fn threads() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

struct Step {
    rss: u64,
    anon: u64,
}

impl Step {
    fn now() -> Self {
        Step {
            rss: status_kib("VmRSS"),
            anon: status_kib("RssAnon"),
        }
    }

    fn report(&self, before: &Step, n: usize, what: &str) {
        let d = self.anon as i64 - before.anon as i64;
        println!(
            "{what:<44} RSS {:>7} KiB anon {:>7} KiB  delta anon {:>7} KiB = {:>5} KiB/image  threads {}",
            self.rss,
            self.anon,
            d,
            d / n as i64,
            threads()
        );
    }
}

#[test]
#[ignore = "a measurement: cargo nextest run --test memory --run-ignored all --no-capture"]
fn per_image_memory_of_held_replicas() {
    let n: usize = std::env::var("CSIRR_MEM_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let pool = TestPool::new("mem");
    let io = pool.ioctx(Site::B);
    let names: Vec<String> = (0..n).map(|i| format!("mem-{i}")).collect();
    for name in &names {
        ceph::rbd::create(
            &io,
            name,
            4 * MIB,
            &ceph::CreateOptions {
                features: Some(
                    ceph::features::LAYERING
                        | ceph::features::EXCLUSIVE_LOCK
                        | ceph::features::OBJECT_MAP
                        | ceph::features::FAST_DIFF
                        | ceph::features::DEEP_FLATTEN,
                ),
                ..Default::default()
            },
        )
        .expect("create");
    }
    // One open and close first: librbd's process-wide state (its asio
    // engine, thread pools) is not per image.
    drop(Image::open(&io, &names[0]).unwrap());
    let base = Step::now();
    base.report(&base, n, "connected, one image opened and closed");

    let t = Instant::now();
    let rw: Vec<Image> = names.iter().map(|m| Image::open(&io, m).unwrap()).collect();
    let opened = Step::now();
    opened.report(&base, n, "read-write handles open");
    for img in &rw {
        img.lock_acquire(ceph::LockMode::Exclusive).unwrap();
    }
    let locked = Step::now();
    locked.report(&base, n, "... holding the exclusive lock");
    println!("open+lock: {:.2} s", t.elapsed().as_secs_f64());

    let ro: Vec<Image> = names
        .iter()
        .map(|m| Image::open_read_only(&io, m, None).unwrap())
        .collect();
    let both = Step::now();
    both.report(&locked, n, "plus read-only handles (primary-like)");
    drop(ro);
    let ro_closed = Step::now();
    ro_closed.report(&base, n, "read-only handles closed");
    drop(rw);
    let closed = Step::now();
    closed.report(&base, n, "all closed");
    // glibc keeps what librbd freed in its arenas; trimming hands it back.
    csi_rbd_replicator::ceph::alloc::release_free_memory();
    let trimmed = Step::now();
    trimmed.report(&base, n, "after release_free_memory (malloc_trim)");
    // A connection of its own to the other cluster, as the replayer has to
    // its peer: not per image, for comparison.
    let peer = admin(Site::A);
    let _pio = peer.ioctx("rbd", "").ok();
    let connected = Step::now();
    connected.report(&trimmed, 1, "one more cluster connection");
    println!("VmHWM {} KiB", status_kib("VmHWM"));
    // Each held handle costs something: the figures above are real.
    assert!(locked.anon > base.anon, "opening {n} images cost no memory");
}
