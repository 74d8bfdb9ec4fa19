//! The notifier: userspace `mmu_interval_notifier`. This file is the contract.
//!
//! Submission and invalidation share a reader-writer lock (the *notifier lock*, which
//! protects the registry's index), per-object sequence counts (*epochs*, changed only
//! under the exclusive side), a generation count of invalidations with a short log of
//! their ranges ([`InvalidationLog`], kept in the index, so under the same lock), and
//! invalidation *windows* (ranges on which no new mapping may be established).
//!
//! **Submission, cache hit** (`Registry::submit`, `Registry::resolve`). Under the shared
//! lock, find the object in the index and snapshot its epoch there (an object in the
//! index has not been invalidated: invalidation removes it under the exclusive lock).
//! Release the lock and build the descriptors from the snapshot **outside every lock**
//! (the build callback is application code: it may change its own address space,
//! which invalidates under the exclusive lock). Then, under the shared lock again,
//! `read_retry(epoch, seq)` for every object: if an epoch moved, an invalidation hit
//! the object meanwhile: start over (and build again). Otherwise write the descriptors
//! and **attach this submission's fence to the objects before releasing the lock**.
//! The fast path (`submit_all_hits`) is the same sequence with every lookup in one
//! shared section.
//!
//! **Submission, cache miss: a fresh pin** (`Registry::pin`). The object does not exist
//! until it is installed, so it has no epoch to snapshot; the generation stands in:
//! 1. `gen = log.generation()` (shared lock);
//! 2. `wait_no_window_for(range, timeout)` (in this order: see [`InvalidationLog`]; a
//!    window still open at the timeout is an error, never an endless wait);
//! 3. pin and map the range **outside every lock** (pinning faults pages in,
//!    allocates and can block);
//! 4. take the **exclusive** lock; if `log.invalidated_since(gen, range)`, drop the pin
//!    and start over, else install the object (its epoch starts there).
//!
//! **Invalidation** (`Registry::invalidate_start`). `open_window(range)` (from now on
//! step 2 waits on overlapping ranges), take the **exclusive** lock, `log.record(range)`,
//! remove every overlapping object from the index, bump its epoch and *copy* its
//! fences, together with those of overlapping objects another invalidation retired and
//! is still waiting for (they stay listed until unmapped, so overlapping invalidations
//! each wait for the same work); release the lock; wait for those fences (the device
//! stops using the pages; on timeout the device is reset), then unmap. `invalidate_end`
//! closes the window and wakes the waiters. (A protection downgrade keeps the object in
//! the index: it copies the fences, marks the object's permission change pending and
//! bumps its epoch, waits, makes the mapping read-only, then clears the mark; a cache
//! hit on a marked object waits for that before it submits, and a second downgrade of
//! it waits for the first. Eviction removes only objects that are idle, checked in the
//! same exclusive section.)
//!
//! Why it holds:
//! * A submission to a cached object runs its check and its fence attach in one shared
//!   section, so it is wholly before or wholly after the invalidation's exclusive
//!   section: before, and the invalidation copied its fence and waits for it; after, and
//!   the object's epoch moved since the snapshot (`read_retry`). Nothing can slip in
//!   between, whatever ran between the snapshot and the check.
//! * A fresh pin: an invalidation recorded after step 1 is newer than `gen` in the log,
//!   so step 4 sees it (when the ranges overlap) and retries; one recorded before step 1
//!   opened its window before that, so step 2 waits until the window closes, by which
//!   time the address-space change is done and step 3 takes the new pages.
//!
//! `read_begin` is the read side for an object that exists, epoch and all, before it is
//! pinned (snapshot the epoch, then wait for windows). The registry does not call it:
//! hits snapshot under the lock, misses use the generation.
//!
//! Model checks (build with `--cfg loom`, which swaps in loom's lock, condvar and
//! atomics here): `tests/loom_registry.rs` runs the registry's sequences against the
//! real [`Notifier`], [`Epoch`] and [`InvalidationLog`]: a fresh pin against an
//! invalidation (no stale pin installed), a submission's fence attach, fast and general
//! path, with the build between the snapshot and the check, against the invalidation's
//! fence wait (no device access after `invalidate_start` returns, no lost wake-up),
//! a build that invalidates its own buffer, and eviction's idle and hold checks against
//! a submission. The steps around those types (the index lookup, the fence
//! list, the queue's completion wait) are copies in the test, because the registry
//! itself needs a device; the test says what each copy stands for.
//! `tests/loom_notifier.rs` checks `read_begin`/`read_retry` and the window wake-ups.

#[cfg(loom)]
use loom::sync::{
    atomic::{AtomicU64, Ordering},
    Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
};
#[cfg(not(loom))]
use std::sync::{
    atomic::{AtomicU64, Ordering},
    Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use std::collections::VecDeque;
use std::ops::Range;
use std::time::{Duration, Instant};

/// An object's sequence count. Changed only under the exclusive notifier lock.
#[derive(Debug, Default)]
pub struct Epoch(AtomicU64);

impl Epoch {
    /// A fresh epoch.
    pub fn new() -> Epoch {
        Epoch(AtomicU64::new(0))
    }

    /// The current value. Relaxed suffices wherever the notifier lock is held (the
    /// lock orders it); `read_begin` uses it unlocked only as a snapshot that
    /// `read_retry` later validates under the lock.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Invalidate: bump. Caller holds the exclusive guard (the parameter proves it).
    pub fn bump<T>(&self, _held: &WriteGuard<'_, T>) {
        // Release: pairs with read_begin's Acquire snapshot (which runs unlocked). In
        // read_retry the locks order it anyway.
        self.0.fetch_add(1, Ordering::Release);
    }
}

/// An active invalidation window.
#[derive(Debug)]
struct Window {
    id: u64,
    range: Range<u64>,
}

#[derive(Debug, Default)]
struct Windows {
    active: Vec<Window>,
    next_id: u64,
}

/// The shared side of the notifier lock, with the data it protects.
pub type ReadGuard<'a, T> = RwLockReadGuard<'a, T>;
/// The exclusive side of the notifier lock, with the data it protects.
pub type WriteGuard<'a, T> = RwLockWriteGuard<'a, T>;

/// The notifier lock (protecting `T`, the registry's index) and the invalidation
/// windows.
#[derive(Debug)]
pub struct Notifier<T> {
    lock: RwLock<T>,
    windows: Mutex<Windows>,
    closed: Condvar,
}

/// A window handle returned by `open_window`; pass it to `close_window`.
#[derive(Debug)]
#[must_use = "an open window blocks new mappings of its range until closed"]
pub struct WindowId(u64);

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

impl<T> Notifier<T> {
    /// A notifier protecting `data`, with no windows open.
    pub fn new(data: T) -> Notifier<T> {
        Notifier {
            lock: RwLock::new(data),
            windows: Mutex::new(Windows::default()),
            closed: Condvar::new(),
        }
    }

    /// The read side for an object that exists before it is pinned: snapshot `epoch`,
    /// then wait until no window overlaps `range`. Returns the snapshot and whether it
    /// had to wait. (Not used by the registry: see the module docs.)
    pub fn read_begin(&self, range: &Range<u64>, epoch: &Epoch) -> (u64, bool) {
        // Snapshot first, then wait: the other order lets a whole exclusive section
        // (window opened, epoch bumped) slip between the window check and the
        // snapshot, and the stale pin would then pass read_retry. Found by the loom
        // model. Acquire: a snapshot that sees a bump also sees the window opened
        // before it.
        let seq = epoch.0.load(Ordering::Acquire);
        let waited = self.wait_no_window(range);
        (seq, waited)
    }

    /// Wait until no window overlaps `range`, but no longer than `timeout`. Returns
    /// whether it waited, or `None` if a window was still open when the time ran out.
    /// This is the registry's window wait (every wait in the registry is bounded).
    pub fn wait_no_window_for(&self, range: &Range<u64>, timeout: Duration) -> Option<bool> {
        let deadline = crate::submitter::deadline_after(timeout);
        let mut w = self.windows.lock().expect("notifier windows poisoned");
        let mut waited = false;
        while w.active.iter().any(|x| overlaps(&x.range, range)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            waited = true;
            // (Under loom the wait never times out: a lost wake-up is then a deadlock
            // the model reports.)
            w = self
                .closed
                .wait_timeout(w, left)
                .expect("notifier windows poisoned")
                .0;
        }
        Some(waited)
    }

    /// Wait until no window overlaps `range`, however long. Returns whether it waited.
    /// (For `read_begin`; the registry uses [`Notifier::wait_no_window_for`].)
    pub fn wait_no_window(&self, range: &Range<u64>) -> bool {
        let mut w = self.windows.lock().expect("notifier windows poisoned");
        let mut waited = false;
        while w.active.iter().any(|x| overlaps(&x.range, range)) {
            waited = true;
            w = self.closed.wait(w).expect("notifier windows poisoned");
        }
        waited
    }

    /// Whether a window overlapping `range` is open now.
    pub fn window_open(&self, range: &Range<u64>) -> bool {
        let w = self.windows.lock().expect("notifier windows poisoned");
        w.active.iter().any(|x| overlaps(&x.range, range))
    }

    /// Whether the object was invalidated since its epoch read `seq` (retry if true).
    /// Caller holds the shared guard, and attaches its fence before releasing it.
    pub fn read_retry(&self, _held: &ReadGuard<'_, T>, epoch: &Epoch, seq: u64) -> bool {
        epoch.get() != seq
    }

    /// The shared side (submission commit sections, lookups).
    pub fn read(&self) -> ReadGuard<'_, T> {
        self.lock.read().expect("notifier lock poisoned")
    }

    /// The exclusive side (invalidation marking, index changes).
    pub fn write(&self) -> WriteGuard<'_, T> {
        self.lock.write().expect("notifier lock poisoned")
    }

    /// Open a window on `range`: from now until `close_window`, `read_begin` on an
    /// overlapping range waits.
    pub fn open_window(&self, range: Range<u64>) -> WindowId {
        let mut w = self.windows.lock().expect("notifier windows poisoned");
        let id = w.next_id;
        w.next_id += 1;
        w.active.push(Window { id, range });
        WindowId(id)
    }

    /// Close a window and wake every waiter (each re-checks its own range).
    pub fn close_window(&self, id: WindowId) {
        let mut w = self.windows.lock().expect("notifier windows poisoned");
        w.active.retain(|x| x.id != id.0);
        drop(w);
        self.closed.notify_all();
    }

    /// Windows open now.
    pub fn open_windows(&self) -> usize {
        self.windows
            .lock()
            .expect("notifier windows poisoned")
            .active
            .len()
    }
}

/// Invalidation starts a default [`InvalidationLog`] remembers the ranges of.
pub const LOG_LEN: usize = 4096;

/// The generation count of invalidation starts and the ranges of the most recent
/// ones: what a fresh pin is checked against (steps 1 and 4 of the miss path in the
/// module docs). It lives in the data the notifier lock protects, so `record` runs
/// under the exclusive side (it takes `&mut self`), `generation` under either side.
///
/// Why a pin reads the generation *before* waiting for windows: the other order lets a
/// whole invalidation start (window opened, range recorded) slip between the wait and
/// the read; the pin, taken before the address-space change, would then not be newer
/// than anything in the log and be installed stale. In this order, an invalidation
/// recorded after the read is in the log, and one recorded before it had opened its
/// window before it, so the wait covers it.
#[derive(Clone, Debug)]
pub struct InvalidationLog {
    /// Invalidations recorded so far (the generation).
    seq: u64,
    /// `(generation, range)` of the most recent ones, oldest first.
    log: VecDeque<(u64, Range<u64>)>,
    cap: usize,
}

impl Default for InvalidationLog {
    fn default() -> Self {
        InvalidationLog::with_capacity(LOG_LEN)
    }
}

impl InvalidationLog {
    /// A log remembering the ranges of the last `cap` invalidations (at least one).
    pub fn with_capacity(cap: usize) -> InvalidationLog {
        InvalidationLog {
            seq: 0,
            log: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// The generation now: how many invalidations were recorded.
    pub fn generation(&self) -> u64 {
        self.seq
    }

    /// Record an invalidation of `range` starting (under the exclusive lock, in the
    /// same section that removes the objects it hits). Returns its generation.
    pub fn record(&mut self, range: Range<u64>) -> u64 {
        self.seq += 1;
        self.log.push_back((self.seq, range));
        if self.log.len() > self.cap {
            self.log.pop_front();
        }
        self.seq
    }

    /// Whether an invalidation recorded after generation `gen` overlaps `r`. True as
    /// well when `gen` is older than the log remembers (assume the worst).
    pub fn invalidated_since(&self, gen: u64, r: &Range<u64>) -> bool {
        if gen < self.seq.saturating_sub(self.log.len() as u64) {
            return true; // too old to tell
        }
        self.log
            .iter()
            .rev()
            .take_while(|(s, _)| *s > gen)
            .any(|(_, x)| overlaps(x, r))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::InvalidationLog;

    #[test]
    fn log_reports_overlapping_invalidations_after_gen() {
        let mut l = InvalidationLog::with_capacity(4);
        let g0 = l.generation();
        assert!(!l.invalidated_since(g0, &(0..10)));
        l.record(20..30);
        assert!(!l.invalidated_since(g0, &(0..10)), "disjoint");
        assert!(l.invalidated_since(g0, &(25..26)));
        let g1 = l.generation();
        l.record(5..6);
        assert!(l.invalidated_since(g0, &(0..10)));
        assert!(l.invalidated_since(g1, &(0..10)));
        assert!(
            !l.invalidated_since(l.generation(), &(0..10)),
            "nothing newer"
        );
        assert!(!l.invalidated_since(g1, &(20..30)), "recorded before g1");
    }

    #[test]
    fn log_assumes_the_worst_when_gen_is_too_old() {
        let mut l = InvalidationLog::with_capacity(2);
        let g0 = l.generation();
        for _ in 0..3 {
            l.record(100..200);
        }
        // Three recorded, two remembered: whatever came right after g0 is forgotten.
        assert!(l.invalidated_since(g0, &(0..10)));
        assert!(!l.invalidated_since(g0 + 1, &(0..10)));
    }
}
