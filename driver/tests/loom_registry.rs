//! loom models of the protocol the registry (registry/mod.rs) runs, driving the real
//! `Notifier`, `Epoch` and `InvalidationLog` of registry/notifier.rs (built with
//! `--cfg loom`, so their lock, condvar and atomics are loom's).
//!
//! `Registry` itself needs a device, so the steps around those types are copies here,
//! one line each, in the order `Registry` runs them. What stands for what:
//!
//! | model                                   | registry                                        |
//! |-----------------------------------------|-------------------------------------------------|
//! | `Index::installed` / `Index::mapped`    | the region in `Index::maps`                     |
//! | `Index::invalidations`                  | `Index::invalidations` (the real type)          |
//! | `pages` (1 before the change, 2 after)  | which physical pages the process maps           |
//! | `pages.load()` between the locks        | `map_pinned` in `pin` (pins outside every lock) |
//! | `Region::inflight.lock().push(seqno)`   | `attach` (per-queue latest seqno)               |
//! | `region.inflight.clone()`               | `Region::inflight` (copied, not taken)          |
//! | `Region::idle`                          | `Region::idle` (drop done fences, then empty?)  |
//! | `Region::users` / `hold`                | `Region::users` / `region::Held`                |
//! | `build` (a closure, outside the lock)   | the build callback, run through `outside`      |
//! | `Queue::submit`                         | `Submitter::try_submit`                         |
//! | `Queue::wait_done`                      | `FenceTracker::wait_done` in `wait_fences`      |
//! | the device thread's access + `complete` | the engine's DMA, then its completion entry     |
//! | `unmapped`                              | `unmap_region` after the fence wait / eviction  |
//!
//! The queue's real wait (`QueueCore::wait_done`) polls: under the queue's state mutex
//! it reaps completions and compares `max_reaped` with the seqno, and between checks
//! it spins, yields or sleeps a bounded slice. Here the check is under the same kind of
//! mutex and the wait between checks is a condvar wait that the device's completion
//! notifies: a stricter primitive (a bounded poll cannot lose a wake-up for good, a
//! condvar wait can), so loom reports a deadlock if a wake-up could be lost.
//!
//! Each model names the removal it catches; every one of them was tried (removed, loom
//! found the failure, restored).
//!
//! Run with: `RUSTFLAGS="--cfg loom" cargo test -p userptr-driver --test loom_registry --release`
#![cfg(loom)]

use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use std::ops::Range;
use userptr_driver::registry::notifier::{Epoch, InvalidationLog, Notifier};

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

// ---------------------------------------------------------------------------------
// 1. A fresh pin (Registry::pin) against an invalidation (Registry::invalidate_start).
// ---------------------------------------------------------------------------------

/// What the notifier lock protects, for the pin model.
#[derive(Default)]
struct PinIndex {
    invalidations: InvalidationLog,
    /// The installed region: which pages it pinned (its range is the pinner's).
    installed: Option<u64>,
    /// Set in the invalidation's exclusive section.
    invalidated: bool,
}

/// The invalidator: `invalidate_start(range)`, the address-space change (pages 1 → 2,
/// only when `range` is the pinner's), `invalidate_end`.
fn invalidate(n: &Notifier<PinIndex>, pages: &AtomicU64, range: Range<u64>, pinned: &Range<u64>) {
    let w = n.open_window(range.clone());
    {
        let mut g = n.write();
        g.invalidations.record(range.clone());
        // Remove the overlapping region (its epoch bump and fences are model 2's).
        if overlaps(&range, pinned) {
            g.installed = None;
            g.invalidated = true;
        }
    }
    // invalidate_start returned: the kernel changes the mapping.
    if overlaps(&range, pinned) {
        pages.store(2, SeqCst);
    }
    n.close_window(w);
}

/// The pinner: `Registry::pin`'s loop for `range`. Returns the attempts it took.
fn pin(n: &Notifier<PinIndex>, pages: &AtomicU64, range: &Range<u64>) -> u32 {
    let mut attempts = 0;
    loop {
        attempts += 1;
        // The generation first, then the window wait (bounded in the registry; under
        // loom the timed wait never times out, so a lost wake-up is a deadlock).
        let gen = n.read().invalidations.generation();
        n.wait_no_window_for(range, std::time::Duration::from_secs(30))
            .expect("the window closes");
        // map_pinned: outside every lock.
        let pinned = pages.load(SeqCst);
        let mut g = n.write();
        if g.invalidations.invalidated_since(gen, range) {
            continue; // unmap the fresh pin, start over
        }
        if g.invalidated {
            assert_eq!(
                pinned, 2,
                "a stale pin was installed after the invalidation"
            );
        }
        g.installed = Some(pinned);
        return attempts;
    }
}

/// A pin of `0..10` racing an invalidation of the same range: under every interleaving
/// no region pinning the old pages is installed after the invalidation's exclusive
/// section (so none is left in the index at the end), a pin retries at most once, and
/// nobody waits forever (loom reports a deadlock otherwise).
///
/// Catches (each tried): `InvalidationLog::invalidated_since` always false (the check
/// removed); `record` not logging the range; the pinner waiting for windows *before*
/// reading the generation; the invalidator opening no window.
#[test]
fn fresh_pin_never_installs_stale_pages() {
    loom::model(|| {
        let n = Arc::new(Notifier::new(PinIndex::default()));
        let pages = Arc::new(AtomicU64::new(1));
        let range = 0..10;
        let inv = {
            let (n, pages, range) = (n.clone(), pages.clone(), range.clone());
            thread::spawn(move || invalidate(&n, &pages, range.clone(), &range))
        };
        let attempts = pin(&n, &pages, &range);
        assert!(attempts <= 2, "one invalidation forces at most one retry");
        inv.join().unwrap();
        let g = n.read();
        assert!(g.invalidated);
        assert_ne!(g.installed, Some(1), "a stale region is left in the index");
    });
}

/// An invalidation of a disjoint range neither blocks nor retries a pin.
#[test]
fn disjoint_invalidation_does_not_force_a_retry() {
    loom::model(|| {
        let n = Arc::new(Notifier::new(PinIndex::default()));
        let pages = Arc::new(AtomicU64::new(1));
        let inv = {
            let (n, pages) = (n.clone(), pages.clone());
            thread::spawn(move || invalidate(&n, &pages, 20..30, &(0..10)))
        };
        assert_eq!(pin(&n, &pages, &(0..10)), 1);
        inv.join().unwrap();
        assert_eq!(n.read().installed, Some(1));
    });
}

// ---------------------------------------------------------------------------------
// 2. A submission's fence attach against the invalidation's fence wait, and
//    eviction's idle check against a submission.
// ---------------------------------------------------------------------------------

/// What the notifier lock protects, for the submission models.
struct SubIndex {
    invalidations: InvalidationLog,
    /// The region is in the index.
    mapped: bool,
}

/// One cached region.
struct Region {
    epoch: Epoch,
    /// Seqnos of submissions that reference it (`Region::inflight`).
    inflight: Mutex<Vec<u64>>,
    /// Batches resolving it now (`Region::users`, taken by `Held::new`).
    users: AtomicU64,
}

impl Region {
    /// `Held::new`: the caller holds the notifier lock (either side).
    fn hold(&self) {
        self.users.fetch_add(1, SeqCst);
    }

    /// `Held::drop`.
    fn release(&self) {
        self.users.fetch_sub(1, SeqCst);
    }

    /// `Region::held`, read under the exclusive lock.
    fn held(&self) -> bool {
        self.users.load(SeqCst) > 0
    }

    fn attach(&self, seqno: u64) {
        self.inflight.lock().unwrap().push(seqno);
    }

    /// `Region::inflight`: a copy, so that an overlapping invalidation sees them too.
    fn inflight(&self) -> Vec<u64> {
        self.inflight.lock().unwrap().clone()
    }

    /// `Region::idle`: drop the fences that are done, then whether none is left.
    fn idle(&self, q: &Queue) -> bool {
        let mut f = self.inflight.lock().unwrap();
        f.retain(|s| !q.is_done(*s));
        f.is_empty()
    }
}

#[derive(Default)]
struct QueueState {
    /// The batch the submitter queued, if any.
    submitted: Option<u64>,
    /// The submitter finished without submitting (it would retry through a fresh pin).
    gave_up: bool,
    /// Completions reaped so far (`max_reaped`).
    reaped: u64,
}

/// One command queue and its device.
#[derive(Default)]
struct Queue {
    st: Mutex<QueueState>,
    cv: Condvar,
}

impl Queue {
    fn submit(&self) -> u64 {
        let mut st = self.st.lock().unwrap();
        st.submitted = Some(1);
        drop(st);
        self.cv.notify_all();
        1
    }

    fn give_up(&self) {
        self.st.lock().unwrap().gave_up = true;
        self.cv.notify_all();
    }

    fn is_done(&self, seqno: u64) -> bool {
        self.st.lock().unwrap().reaped >= seqno
    }

    /// `FenceTracker::wait_done`: check under the state mutex, sleep between checks.
    fn wait_done(&self, seqno: u64) {
        let mut st = self.st.lock().unwrap();
        while st.reaped < seqno {
            st = self.cv.wait(st).unwrap();
        }
    }

    /// The device: wait for a batch; access the pages; complete it and notify.
    fn run_device(&self, unmapped: &AtomicBool) {
        let mut st = self.st.lock().unwrap();
        while st.submitted.is_none() && !st.gave_up {
            st = self.cv.wait(st).unwrap();
        }
        let Some(seqno) = st.submitted else { return };
        drop(st);
        assert!(
            !unmapped.load(SeqCst),
            "the device accessed the pages after the region was unmapped"
        );
        self.st.lock().unwrap().reaped = seqno;
        self.cv.notify_all();
    }
}

struct World {
    n: Notifier<SubIndex>,
    region: Region,
    q: Queue,
    /// The region was unmapped (after the fence wait, or by eviction).
    unmapped: AtomicBool,
}

fn world() -> Arc<World> {
    Arc::new(World {
        n: Notifier::new(SubIndex {
            invalidations: InvalidationLog::default(),
            mapped: true,
        }),
        region: Region {
            epoch: Epoch::new(),
            inflight: Mutex::new(Vec::new()),
            users: AtomicU64::new(0),
        },
        q: Queue::default(),
        unmapped: AtomicBool::new(false),
    })
}

/// The commit half of `Registry::submit`, after the lookup snapshot `seq` and the
/// build (outside the lock): `read_retry`, then submit and attach in one shared
/// section. Returns the seqno if it submitted.
fn commit(w: &World, seq: u64) -> Option<u64> {
    let g = w.n.read();
    if w.n.read_retry(&g, &w.region.epoch, seq) {
        return None; // stale: start over, which misses and pins afresh
    }
    let seqno = w.q.submit();
    w.region.attach(seqno);
    drop(g);
    Some(seqno)
}

/// `Registry::submit`'s general path for one cached reference (`resolve`, then the
/// build, then the commit). Returns the seqno if it submitted.
fn submit_general(w: &World) -> Option<u64> {
    // resolve: the lookup, the hold and the epoch snapshot, under the shared lock.
    let seq = {
        let g = w.n.read();
        if !g.mapped {
            return None; // a miss: the pin path (model 1)
        }
        w.region.hold();
        w.region.epoch.get()
    };
    // (build the descriptors: outside the lock and the section)
    let s = commit(w, seq);
    w.region.release();
    s
}

/// `Registry::submit` through `lookup_all_hits`: every lookup in one shared section,
/// then the build outside it and the same commit (with its `read_retry`).
fn submit_fast(w: &World) -> Option<u64> {
    let seq = {
        let g = w.n.read();
        if !g.mapped {
            return None;
        }
        w.region.hold();
        w.region.epoch.get()
    };
    // (build)
    let s = commit(w, seq);
    w.region.release();
    s
}

/// `Registry::invalidate_start` + `invalidate_end` (Drop policy). Returns the fences it
/// waited for.
fn invalidate_region(w: &World) -> Vec<u64> {
    let range = 0..10;
    let win = w.n.open_window(range.clone());
    let fences = {
        let mut g = w.n.write();
        g.invalidations.record(range);
        if g.mapped {
            g.mapped = false;
            w.region.epoch.bump(&g);
            w.region.inflight()
        } else {
            Vec::new()
        }
    };
    // wait_fences: only those not done yet.
    for &s in fences.iter().filter(|&&s| !w.q.is_done(s)) {
        w.q.wait_done(s);
    }
    w.unmapped.store(true, SeqCst);
    w.n.close_window(win);
    fences
}

/// A submission (general path if `!fast`) against an invalidation of its region, with
/// the device running. Checked under every interleaving: a submission either saw the
/// invalidation (no submit) or attached its fence before the invalidation took the
/// fences, so the invalidation waited for it; the device never touches the pages after
/// `invalidate_start` returned; nobody waits forever (a lost wake-up is reported as a
/// deadlock: tried by dropping the device's notify after its completion).
fn submit_vs_invalidate(fast: bool) {
    loom::model(move || {
        let w = world();
        let sub = {
            let w = w.clone();
            thread::spawn(move || {
                let s = if fast {
                    submit_fast(&w)
                } else {
                    submit_general(&w)
                };
                if s.is_none() {
                    w.q.give_up();
                }
                s
            })
        };
        let inv = {
            let w = w.clone();
            thread::spawn(move || invalidate_region(&w))
        };
        w.q.run_device(&w.unmapped);
        let submitted = sub.join().unwrap();
        let waited = inv.join().unwrap();
        if let Some(s) = submitted {
            assert!(
                waited.contains(&s),
                "a submission slipped past the invalidation: its fence was not waited for"
            );
        }
    });
}

/// General path. Catches (each tried): `Notifier::read_retry` always false (the epoch
/// check removed); `Epoch::bump` removed from the invalidation; the fence attached
/// after the shared guard is dropped; the invalidation taking the fences before its
/// exclusive section.
#[test]
fn general_path_submission_is_waited_for_or_retries() {
    submit_vs_invalidate(false);
}

/// Fast path (lookups in one shared section, the build outside it, then the commit).
/// Catches (tried): the commit's `read_retry` dropped (as the old fast path, which
/// built under the lock, could do without it).
#[test]
fn fast_path_submission_is_waited_for_or_misses() {
    submit_vs_invalidate(true);
}

/// A build callback that invalidates its own buffer (the application changes the
/// range it submits, telling the registry with `invalidate_start` / `invalidate_end`
/// inside the callback). The build runs with no notifier lock held, so the
/// invalidation's exclusive section can run, and the commit sees the epoch moved and
/// starts over instead of submitting the unmapped region. Catches (tried): the build
/// under the shared lock (the old order: loom reports the deadlock); the commit's
/// `read_retry` dropped (the assertion).
#[test]
fn a_build_that_invalidates_its_own_buffer_starts_over() {
    loom::model(|| {
        let w = world();
        let dev = {
            let w = w.clone();
            thread::spawn(move || w.q.run_device(&w.unmapped))
        };
        // resolve
        let seq = {
            let g = w.n.read();
            assert!(g.mapped);
            w.region.hold();
            w.region.epoch.get()
        };
        // build: the callback munmaps its buffer, telling the registry.
        invalidate_region(&w);
        let s = commit(&w, seq);
        w.region.release();
        assert!(
            s.is_none(),
            "submitted a region its own build had invalidated"
        );
        w.q.give_up();
        dev.join().unwrap();
    });
}

/// `Inner::evict` for the one region: in one exclusive section, skip it if a batch
/// holds it or work is in flight, else remove it and bump its epoch; then unmap.
/// Returns whether it evicted.
fn evict(w: &World) -> bool {
    let mut g = w.n.write();
    if !g.mapped || w.region.held() || !w.region.idle(&w.q) {
        return false;
    }
    g.mapped = false;
    w.region.epoch.bump(&g);
    drop(g);
    w.unmapped.store(true, SeqCst);
    true
}

/// A batch that resolved a region against an eviction (the one its next reference's
/// pin triggers, or any other): once the lookup found it, the region is held, so the
/// eviction never takes it before the commit, and the batch commits on its first
/// attempt (the old registry evicted it, and the batch started over without end).
/// Catches (tried): the hold check dropped from `evict`; the hold taken after the
/// lookup's shared section instead of in it.
#[test]
fn eviction_never_takes_a_region_the_batch_holds() {
    loom::model(|| {
        let w = world();
        let sub = {
            let w = w.clone();
            thread::spawn(move || {
                // resolve the first reference: lookup, hold, snapshot.
                let seq = {
                    let g = w.n.read();
                    if !g.mapped {
                        drop(g);
                        w.q.give_up(); // evicted before the batch came: a plain miss
                        return None;
                    }
                    w.region.hold();
                    w.region.epoch.get()
                };
                // (resolving the other references pins, which evicts: the other thread)
                let s = commit(&w, seq);
                w.region.release();
                assert!(s.is_some(), "the batch lost a region it had resolved");
                s
            })
        };
        let ev = {
            let w = w.clone();
            thread::spawn(move || evict(&w))
        };
        w.q.run_device(&w.unmapped);
        let submitted = sub.join().unwrap();
        let evicted = ev.join().unwrap();
        if evicted && submitted.is_some() {
            assert!(w.q.is_done(1), "evicted before the work completed");
        }
    });
}

/// `Registry::evict` against a fast-path submission: the evictor checks `idle()` and
/// removes the region in one exclusive section, then unmaps. The device must never
/// touch an evicted region. Catches (tried): the idle check in a shared section before
/// the exclusive one that removes the region.
#[test]
fn eviction_never_unmaps_a_region_with_work_in_flight() {
    loom::model(|| {
        let w = world();
        let sub = {
            let w = w.clone();
            thread::spawn(move || {
                let s = submit_fast(&w);
                if s.is_none() {
                    w.q.give_up();
                }
                s
            })
        };
        let ev = {
            let w = w.clone();
            thread::spawn(move || evict(&w))
        };
        // The check is the device's: it never accesses an unmapped region. (Both a
        // submission and an eviction may happen: the eviction after the completion.)
        w.q.run_device(&w.unmapped);
        let submitted = sub.join().unwrap();
        let evicted = ev.join().unwrap();
        if evicted && submitted.is_some() {
            assert!(w.q.is_done(1), "evicted before the work completed");
        }
    });
}
