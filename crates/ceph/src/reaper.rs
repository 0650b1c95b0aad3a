//! Drops values off librados' and librbd's completion threads: closing an
//! image or destroying an ioctx from inside one of their callbacks can
//! deadlock, so a completion that holds the last reference hands it to the
//! reaper, one long-lived thread (`csirr-reaper`) that drops what it is sent,
//! in order. A panicking drop is caught and logged; the thread carries on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, channel};

use parking_lot::Mutex;

type Doomed = Box<dyn Send>;

static REAPER: OnceLock<Option<Mutex<Sender<Doomed>>>> = OnceLock::new();

fn start() -> Option<Mutex<Sender<Doomed>>> {
    let (tx, rx) = channel::<Doomed>();
    let spawned = std::thread::Builder::new()
        .name("csirr-reaper".into())
        .spawn(move || {
            for doomed in rx {
                if catch_unwind(AssertUnwindSafe(move || drop(doomed))).is_err() {
                    tracing::error!("dropping a handle panicked on the reaper thread");
                }
            }
        });
    match spawned {
        Ok(_) => Some(Mutex::new(tx)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the reaper thread");
            None
        }
    }
}

/// Drops `v` on the reaper thread; never blocks. If the reaper could not
/// be started, `v` is dropped on a thread of its own.
pub(crate) fn drop_later<T: Send + 'static>(v: T) {
    let doomed: Doomed = Box::new(v);
    let rejected = match REAPER.get_or_init(start) {
        Some(tx) => match tx.lock().send(doomed) {
            Ok(()) => None,
            Err(e) => Some(e.0),
        },
        None => Some(doomed),
    };
    if let Some(doomed) = rejected {
        let _ = std::thread::Builder::new()
            .name("csirr-drop".into())
            .spawn(move || drop(doomed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc::sync_channel;

    /// Tells the test which thread dropped it.
    struct Tell(std::sync::mpsc::SyncSender<String>);

    impl Drop for Tell {
        fn drop(&mut self) {
            let name = std::thread::current().name().unwrap_or("?").to_string();
            let _ = self.0.send(name);
        }
    }

    #[test]
    fn drops_happen_on_the_reaper_thread_and_survive_a_panic() {
        struct Boom;
        impl Drop for Boom {
            fn drop(&mut self) {
                panic!("boom");
            }
        }
        drop_later(Boom);
        let (tx, rx) = sync_channel(1);
        drop_later(Arc::new(Tell(tx)));
        let by = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("dropped");
        assert_eq!(by, "csirr-reaper");
    }
}
