//! The driver-section guard: which address-space calls are the driver's own.
//!
//! While a thread runs driver code (a [`DriverSection`] is alive), the address-space
//! calls it makes (freeing its own buffers, say) are the driver's, not the
//! application's: the monitors (`monitor/`, a layer above) let them through
//! unmonitored. The driver never changes memory the application registered, and
//! monitoring its own calls while it holds its locks would deadlock.
//!
//! That is only true if *no application code* runs inside a section. Three ways it
//! could, and what closes each:
//! * a callback the driver calls (the commands `Registry::submit` builds): the driver
//!   runs it through [`outside`], which leaves the section for the call (and the
//!   registry runs it outside its locks, then re-checks, as the kernel's
//!   `read_retry` does);
//! * a signal handler that interrupts the thread inside the section: while a monitor
//!   that relies on sections is active ([`set_defer_signals`]), the outermost section
//!   blocks every asynchronous signal and its end restores the thread's mask, so a
//!   signal that arrives meanwhile is delivered when the section ends, to application
//!   code, monitored. The synchronous signals (a fault in driver code: `SIGSEGV`,
//!   `SIGBUS`, `SIGILL`, `SIGFPE`, `SIGTRAP`), `SIGSYS`, and glibc's two internal
//!   signals (cancellation, `setxid`) stay deliverable, as glibc's own
//!   `pthread_sigmask` keeps them;
//! * a process-directed signal the kernel hands to one of the driver's own threads
//!   (the reference device's engine, a monitor's worker): those threads call
//!   [`block_signals_for_thread`] when they start, so the kernel delivers such signals
//!   to an application thread instead.
//!
//! The masks are changed through the driver's own syscall site
//! ([`crate::trampoline`]), which no monitor traps.
//!
//! It sits in the core, below both the registry and the device models that enter it,
//! and below the monitors that read it.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, Ordering};

thread_local! {
    // const-initialised, no destructor: safe to touch from a signal handler.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The thread's own mask, saved by the outermost section that blocked signals.
    static SAVED_MASK: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Monitors that rely on sections and are active now.
static DEFERRING: AtomicU32 = AtomicU32::new(0);

const fn bit(sig: i32) -> u64 {
    1 << (sig - 1)
}

/// Every signal a section blocks: all but the synchronous ones, SIGSYS, the two that
/// cannot be blocked, and glibc's internal SIGCANCEL (32) and SIGSETXID (33).
const ASYNC_SIGNALS: u64 = !(bit(libc::SIGSEGV)
    | bit(libc::SIGBUS)
    | bit(libc::SIGILL)
    | bit(libc::SIGFPE)
    | bit(libc::SIGTRAP)
    | bit(libc::SIGSYS)
    | bit(libc::SIGKILL)
    | bit(libc::SIGSTOP)
    | bit(32)
    | bit(33));

/// `rt_sigprocmask` through the driver's own syscall site; returns the old mask.
fn sigprocmask(how: i32, set: Option<u64>) -> u64 {
    let mut old = 0u64;
    let set_ptr = set.as_ref().map_or(0, |s| s as *const u64 as u64);
    // SAFETY: rt_sigprocmask on this thread with an 8-byte set (or none) and an 8-byte
    // old set, both locals; changes only this thread's signal mask.
    let r = unsafe {
        crate::trampoline::syscall(
            libc::SYS_rt_sigprocmask,
            [how as u64, set_ptr, &mut old as *mut u64 as u64, 8, 0, 0],
        )
    };
    debug_assert_eq!(r, 0, "rt_sigprocmask with valid arguments");
    old
}

/// Marks the current thread as running driver code until dropped.
pub struct DriverSection(());

/// Enter a driver section (nests). The outermost one blocks asynchronous signals while
/// a deferring monitor is active (see the module doc).
pub fn enter() -> DriverSection {
    let d = DEPTH.with(|c| c.get());
    // Relaxed: a monitor installed concurrently protects sections entered after its
    // install returns; install happens-before those through the caller's own sync.
    if d == 0 && DEFERRING.load(Ordering::Relaxed) > 0 {
        let old = sigprocmask(libc::SIG_BLOCK, Some(ASYNC_SIGNALS));
        SAVED_MASK.with(|c| c.set(Some(old)));
    }
    DEPTH.with(|c| c.set(d + 1));
    DriverSection(())
}

impl Drop for DriverSection {
    fn drop(&mut self) {
        let d = DEPTH.with(|c| c.get()) - 1;
        DEPTH.with(|c| c.set(d));
        if d == 0 {
            if let Some(old) = SAVED_MASK.with(|c| c.take()) {
                // Pending signals are delivered as this returns, to application code.
                sigprocmask(libc::SIG_SETMASK, Some(old));
            }
        }
    }
}

/// Run application code `f` (a callback the driver was handed) outside the current
/// section: its calls are monitored and signals reach it as usual. Back in the section
/// afterwards, with the same depth.
pub fn outside<R>(f: impl FnOnce() -> R) -> R {
    struct Reenter(u32, bool);
    impl Drop for Reenter {
        fn drop(&mut self) {
            if self.1 {
                // The mask the section restores at its end is the one the application
                // code left (it may have changed its own mask).
                let now = sigprocmask(libc::SIG_BLOCK, Some(ASYNC_SIGNALS));
                SAVED_MASK.with(|c| c.set(Some(now)));
            }
            DEPTH.with(|c| c.set(self.0));
        }
    }
    let depth = DEPTH.with(|c| c.replace(0));
    let saved = SAVED_MASK.with(|c| c.take());
    if let Some(old) = saved {
        sigprocmask(libc::SIG_SETMASK, Some(old));
    }
    let _back = Reenter(depth, saved.is_some());
    f()
}

/// Whether the current thread is inside a driver section.
pub fn in_driver() -> bool {
    DEPTH.with(|c| c.get() > 0)
}

/// A monitor that relies on sections starts (`true`) or stops (`false`) needing
/// signals deferred in them. Counted: several may be active.
pub fn set_defer_signals(on: bool) {
    // Relaxed: see `enter`.
    if on {
        DEFERRING.fetch_add(1, Ordering::Relaxed);
    } else {
        DEFERRING.fetch_sub(1, Ordering::Relaxed);
    }
}

/// For a thread the driver owns for its whole life (the reference device's engine, a
/// monitor's worker): block every asynchronous signal, so that process-directed
/// signals go to application threads and no application handler ever runs here.
pub fn block_signals_for_thread() {
    sigprocmask(libc::SIG_BLOCK, Some(ASYNC_SIGNALS));
}

/// io_uring instances the driver owns (the reference device's), which a monitor leaves
/// alone: they never submit an opcode that changes mappings. A fixed table: noted and
/// forgotten by their owner, read by a monitor at install.
static OWN_RINGS: [std::sync::atomic::AtomicI32; 64] =
    [const { std::sync::atomic::AtomicI32::new(-1) }; 64];

/// Note `fd` as an io_uring instance of the driver's own.
pub fn note_own_ring(fd: i32) {
    for slot in &OWN_RINGS {
        // Relaxed: the table is read at monitor install, after the owner's construction
        // returned (ordered by the caller's own synchronisation).
        if slot
            .compare_exchange(-1, fd, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
    tracing::warn!("more than 64 driver io_uring instances: ring {fd} not noted as the driver's");
}

/// Forget `fd` (its owner closes it).
pub fn forget_own_ring(fd: i32) {
    for slot in &OWN_RINGS {
        // Relaxed: see `note_own_ring`.
        if slot
            .compare_exchange(fd, -1, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

/// Whether `fd` is an io_uring instance of the driver's own.
pub fn is_own_ring(fd: i32) -> bool {
    // Relaxed: see `note_own_ring`.
    OWN_RINGS.iter().any(|s| s.load(Ordering::Relaxed) == fd)
}

/// A lock guard that is also a driver section: while a driver lock is held, an
/// application signal handler must not run on this thread (its address-space call,
/// once monitored, would need an invalidation that waits for this very lock). Drops the
/// guard, then leaves the section (fields drop in declaration order).
pub struct Locked<G> {
    guard: G,
    _section: DriverSection,
}

impl<G: std::ops::Deref> std::ops::Deref for Locked<G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: std::ops::DerefMut> std::ops::DerefMut for Locked<G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

/// Lock `m` inside a driver section (see [`Locked`]). A poisoned lock is taken anyway:
/// a panic while a driver lock is held is a bug whichever way it is handled, and
/// taking the lock lets teardown still release pins and stop the device instead of
/// turning one panic into a cascade of them.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> Locked<std::sync::MutexGuard<'_, T>> {
    let section = enter();
    Locked {
        guard: m.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
        _section: section,
    }
}

/// Read-lock `l` inside a driver section.
pub fn read<T>(l: &std::sync::RwLock<T>) -> Locked<std::sync::RwLockReadGuard<'_, T>> {
    let section = enter();
    Locked {
        guard: l.read().unwrap_or_else(std::sync::PoisonError::into_inner),
        _section: section,
    }
}

/// Write-lock `l` inside a driver section.
pub fn write<T>(l: &std::sync::RwLock<T>) -> Locked<std::sync::RwLockWriteGuard<'_, T>> {
    let section = enter();
    Locked {
        guard: l.write().unwrap_or_else(std::sync::PoisonError::into_inner),
        _section: section,
    }
}
