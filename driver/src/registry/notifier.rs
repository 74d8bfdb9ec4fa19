//! The notifier: userspace `mmu_interval_notifier`. This file is the contract.
//!
//! Two sides share a reader-writer lock (the *notifier lock*) and per-object sequence
//! counts (*epochs*):
//!
//! **Read side (submission).** For each userptr object a command references:
//! 1. `read_begin(range, epoch)`: snapshot the object's epoch, then wait until no
//!    invalidation window overlaps the range (in this order: see `read_begin`);
//! 2. make sure the object is pinned and mapped, **outside every lock** (pinning faults
//!    pages in, allocates and can block);
//! 3. take the **shared** side of the notifier lock;
//! 4. `read_retry(epoch, seq)`: if the epoch moved, an invalidation hit the object after
//!    step 1: release and start over (the pin may be stale);
//! 5. write the descriptors, attach this submission's fence to the objects, release.
//!
//! **Write side (invalidation).** `invalidate_start(range)` opens a *window* on the
//! range (from now on step 1 waits for overlapping ranges: no new device mapping of the
//! range can be established until `invalidate_end`), takes the **exclusive** side of
//! the lock, bumps the epoch of every overlapping object, collects their fences,
//! releases the lock, waits for the fences (the device stops using the pages), then
//! unmaps. `invalidate_end(range)` closes the window and wakes the waiters.
//!
//! Why it holds: an epoch only changes under the exclusive lock, and step 4 reads it
//! under the shared lock. So a submission either committed before the invalidation's
//! exclusive section (its fence was attached, so the invalidation waits for it), or
//! it commits after, sees the new epoch in step 4 and retries, and its retry's step 1
//! waits for the window to close, by which time the address space change is done and
//! the re-pin takes the new pages. A pin that began before the window opened is caught
//! the same way, because the object exists (epoch and all) before it is pinned.
//!
//! The model test `tests/loom_notifier.rs` checks exactly this protocol under loom
//! (build with `--cfg loom`): no commit of a stale pin after a window opened, and no
//! lost wake-up of a waiter when the window closes.

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

use std::ops::Range;

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

    /// Step 1 of the read side: snapshot `epoch`, then wait until no window overlaps
    /// `range`. Returns the snapshot and whether it had to wait.
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

    /// Wait until no window overlaps `range`. Returns whether it waited.
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

    /// Step 4 of the read side: whether the object was invalidated since `seq`
    /// (retry if true). Caller holds the shared guard.
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
