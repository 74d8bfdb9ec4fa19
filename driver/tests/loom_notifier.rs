//! loom model of the notifier protocol (registry/notifier.rs), driving the real
//! `Notifier` and `Epoch` with loom's lock, condvar and atomics:
//!
//! * a submitter runs the read side: `read_begin` → "pin" (read which pages the
//!   process maps) → shared lock → `read_retry` → commit the pin to the "device";
//! * an invalidator runs the write side: open a window → exclusive lock, bump the
//!   epoch → (the address-space change) → close the window.
//!
//! Checked under every interleaving: no submission commits a pin of the old pages
//! after the invalidation's exclusive section (a stale pin), and the submitter is
//! never left waiting on a closed window (loom reports a deadlock otherwise). Drop the
//! `read_retry` check and loom finds the stale commit.
//!
//! This is the read side for an object that exists before it is pinned
//! (`read_begin`), which the registry itself does not call. The sequences the registry
//! runs (a fresh pin checked against the invalidation log, a submission's fence attach
//! against the invalidation's fence wait, eviction's idle check) are modelled in
//! `tests/loom_registry.rs`.
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-driver --test loom_notifier --release`
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use loom::sync::Arc;
use loom::thread;
use userptr_driver::registry::notifier::{Epoch, Notifier};

#[test]
fn no_stale_pin_is_committed_after_invalidation_starts() {
    loom::model(|| {
        let n = Arc::new(Notifier::new(()));
        let epoch = Arc::new(Epoch::new());
        // Which pages back the range: 1 before the change, 2 after.
        let pages = Arc::new(AtomicU64::new(1));
        // Set inside the invalidation's exclusive section.
        let invalidated = Arc::new(AtomicBool::new(false));

        let inv = {
            let (n, epoch, pages, invalidated) =
                (n.clone(), epoch.clone(), pages.clone(), invalidated.clone());
            thread::spawn(move || {
                let w = n.open_window(0..10);
                {
                    let g = n.write();
                    epoch.bump(&g);
                    invalidated.store(true, Ordering::SeqCst);
                }
                // invalidate_start has returned: the kernel changes the mapping.
                pages.store(2, Ordering::SeqCst);
                n.close_window(w);
            })
        };

        let range = 0..10;
        let mut attempts = 0;
        let committed = loop {
            attempts += 1;
            assert!(
                attempts <= 3,
                "a submission retries at most once per invalidation"
            );
            let (seq, _) = n.read_begin(&range, &epoch);
            let pinned = pages.load(Ordering::SeqCst);
            let g = n.read();
            if n.read_retry(&g, &epoch, seq) {
                continue;
            }
            if invalidated.load(Ordering::SeqCst) {
                assert_eq!(
                    pinned, 2,
                    "a stale pin was committed after invalidation began"
                );
            }
            break pinned;
        };
        inv.join().unwrap();
        assert!(committed == 1 || committed == 2);
    });
}

#[test]
fn waiters_wake_when_the_window_closes() {
    loom::model(|| {
        let n = Arc::new(Notifier::new(()));
        let w = n.open_window(0..10);
        let waiter = {
            let n = n.clone();
            thread::spawn(move || {
                n.wait_no_window(&(5..6));
                assert!(!n.window_open(&(5..6)));
            })
        };
        // A disjoint range never waits.
        assert!(!n.wait_no_window(&(10..20)));
        n.close_window(w);
        waiter.join().unwrap();
    });
}
