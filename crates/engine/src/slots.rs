//! Per-image mutual exclusion between the replayer and role changes.
//!
//! The replayer only *tries* an image's slot each round and skips the image
//! when it is taken. A role change (promote, resync, disable) *cancels* the
//! slot's holder and waits, boundedly, until it lets go: a running delta
//! checks the cancel flag between submissions and drains its in-flight I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

/// The slot of one image.
#[derive(Debug, Default)]
pub struct Slot {
    busy: AtomicBool,
    cancel: AtomicBool,
    /// How many times a role change entered (see [`Slot::generation`]).
    generation: AtomicU64,
}

/// Held while working on an image; frees the slot on drop.
#[derive(Debug)]
pub struct SlotGuard {
    slot: Arc<Slot>,
}

impl Slot {
    /// Takes the slot if it is free.
    pub fn try_enter(self: &Arc<Self>) -> Option<SlotGuard> {
        self.busy
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| SlotGuard {
                slot: Arc::clone(self),
            })
    }

    /// Asks the holder to stop and takes the slot once it has, within
    /// `timeout`; `None` if the holder did not let go in time.
    pub fn enter_cancelling(self: &Arc<Self>, timeout: Duration) -> Option<SlotGuard> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(g) = self.try_enter() {
                self.cancel.store(false, Ordering::Release);
                self.generation.fetch_add(1, Ordering::AcqRel);
                return Some(g);
            }
            self.cancel.store(true, Ordering::Release);
            if Instant::now() >= deadline {
                self.cancel.store(false, Ordering::Release);
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the current holder has been asked to stop.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    /// Counts the entries through [`Slot::enter_cancelling`] (role
    /// changes): a long-lived worker that only holds the slot now and then
    /// (a journal replay loop) compares it to see whether a role change
    /// ran while it did not hold the slot, even one that never had to
    /// cancel it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

impl SlotGuard {
    /// The slot held.
    pub fn slot(&self) -> &Slot {
        &self.slot
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.slot.busy.store(false, Ordering::Release);
    }
}

/// The slots of all images, by `pool/namespace/image`.
#[derive(Debug, Default)]
pub struct ImageSlots {
    map: Mutex<HashMap<String, Arc<Slot>>>,
}

impl ImageSlots {
    /// The slot of image `key`.
    pub fn get(&self, key: &str) -> Arc<Slot> {
        let mut m = self.map.lock();
        Arc::clone(m.entry(key.to_string()).or_default())
    }
}

/// The key of an image in [`ImageSlots`] and in logs: `pool/image` or
/// `pool/namespace/image`.
pub fn image_key(pool: &str, namespace: &str, image: &str) -> String {
    if namespace.is_empty() {
        format!("{pool}/{image}")
    } else {
        format!("{pool}/{namespace}/{image}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_enter_is_exclusive() {
        let s = ImageSlots::default();
        let a = s.get("p/i").try_enter().expect("free");
        assert!(s.get("p/i").try_enter().is_none());
        assert!(s.get("p/j").try_enter().is_some());
        drop(a);
        assert!(s.get("p/i").try_enter().is_some());
    }

    #[test]
    fn cancelling_waits_for_the_holder_to_let_go() {
        let s = Arc::new(ImageSlots::default());
        let held = s.get("p/i").try_enter().unwrap();
        let s2 = Arc::clone(&s);
        let worker = std::thread::spawn(move || {
            // The holder polls the cancel flag and lets go when asked.
            let slot = s2.get("p/i");
            while !slot.cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            drop(held);
        });
        let g = s.get("p/i").enter_cancelling(Duration::from_secs(5));
        assert!(g.is_some());
        assert!(!s.get("p/i").cancelled(), "cancel flag left set");
        worker.join().unwrap();
    }

    #[test]
    fn cancelling_gives_up_after_the_timeout() {
        let s = ImageSlots::default();
        let _held = s.get("p/i").try_enter().unwrap();
        let t = Instant::now();
        assert!(
            s.get("p/i")
                .enter_cancelling(Duration::from_millis(100))
                .is_none()
        );
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert!(!s.get("p/i").cancelled());
    }

    #[test]
    fn keys() {
        assert_eq!(image_key("p", "", "i"), "p/i");
        assert_eq!(image_key("p", "ns", "i"), "p/ns/i");
    }
}
