//! The CPU side of a migration: the gate table and the SIGSEGV handler (the only
//! `unsafe` here: `sigaction`, `futex`, `gettid`, `write`).
//!
//! Every buffer object owns a *gate*: a slot of a fixed, process-wide table holding
//! its CPU range and a 32-bit word that is odd while the object is moving. A migration
//! closes the gate (the word becomes odd, the migrating thread's id is recorded)
//! *before* it takes CPU access away (`mprotect(PROT_NONE)`), and opens it (the word
//! becomes even, every waiter is woken with `FUTEX_WAKE`) *after* the range is mapped
//! again on the new backing. A CPU access in between faults; the handler finds the
//! gate by the faulting address and sleeps on the word with `FUTEX_WAIT` (in slices,
//! bounded in total), then returns, and the access is executed again: against the new
//! backing, or it faults again if another migration began meanwhile.
//!
//! The handler takes no lock, allocates nothing, and calls only async-signal-safe
//! system calls; the table is a fixed array of atomics. So a thread that faults while
//! it holds any lock of its own (or of the driver) cannot be waited for by the
//! migration through that lock: the migration itself never touches the CPU range
//! and never waits for a CPU thread, only for the device (fences) and for its own
//! `mprotect`/`mmap` calls, which the kernel completes without the faulting thread
//! (it dropped its `mmap_lock` before the signal was delivered).
//!
//! Two waits could never end, and are reported instead of hanging: a fault by the
//! very thread that migrates the object (an application signal handler run on it in
//! the middle of the move, touching the object), and a wait past [`WAIT_LIMIT`]. The
//! handler writes a line to stderr naming the case, puts `SIGSEGV` back to its default
//! action and returns: the access faults again and the process dies of `SIGSEGV`.
//! A fault outside every gate goes to the handler that was installed before (or to
//! the default action).

use crate::error::{Error, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Gates in the table: the most buffer objects alive at once in a process.
pub const MAX_OBJECTS: usize = 4096;
/// The longest a CPU access waits for a migration before the process is stopped.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// One `FUTEX_WAIT` slice.
const SLICE_NS: i64 = 20_000_000;

struct Slot {
    start: AtomicUsize,
    /// 0: free; `usize::MAX`: claimed, not yet published.
    len: AtomicUsize,
    /// Odd while the object is moving.
    word: AtomicU32,
    /// The migrating thread (while `word` is odd).
    migrator: AtomicI32,
}

static TABLE: [Slot; MAX_OBJECTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        word: AtomicU32::new(0),
        migrator: AtomicI32::new(0),
    }
}; MAX_OBJECTS];

static INSTALLED: AtomicBool = AtomicBool::new(false);
static PREV: OnceLock<libc::sigaction> = OnceLock::new();
/// CPU accesses that waited for a migration.
static WAITS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// The last (address, word) this thread retried on a gate that was open: a second
    /// fault there is not a migration's.
    static LAST: Cell<(usize, u32)> = const { Cell::new((0, u32::MAX)) };
}

/// Install the buffer objects' `SIGSEGV` handler (process-wide, once; idempotent).
/// Call it before any seccomp monitor is installed and before other threads exist,
/// like every process-wide setting; a handler installed earlier is chained for faults
/// outside buffer objects.
pub fn install_fault_handler() -> Result<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // Acquire: pairs with the Release below.
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: a zeroed sigaction is a valid "no handler, empty mask" value; the fields
    // set below make it a SA_SIGINFO handler whose function has the right signature.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: zeroed, as above.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; replaces the process's SIGSEGV disposition,
    // which is this function's documented purpose.
    let r = unsafe {
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSEGV, &sa, &mut old)
    };
    if r != 0 {
        return Err(Error::sys(
            "sigaction(SIGSEGV)",
            std::io::Error::last_os_error(),
        ));
    }
    let _ = PREV.set(old);
    // Release: a manager created after this sees the handler in place.
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether [`install_fault_handler`] has run in this process.
pub fn fault_handler_installed() -> bool {
    // Acquire: pairs with the Release in install_fault_handler.
    INSTALLED.load(Ordering::Acquire)
}

/// CPU accesses that have waited for a migration, process-wide.
pub fn cpu_waits() -> u64 {
    // Relaxed: a counter.
    WAITS.load(Ordering::Relaxed)
}

/// A buffer object's gate (see the module docs). Released on drop.
#[derive(Debug)]
pub(super) struct Gate {
    slot: usize,
}

impl Gate {
    /// Claim a gate for the CPU range `[start, start + len)`.
    pub(super) fn claim(start: usize, len: usize) -> Result<Gate> {
        for (i, s) in TABLE.iter().enumerate() {
            // Acquire/Relaxed: claiming a free slot publishes nothing yet.
            if s.len
                .compare_exchange(0, usize::MAX, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                s.start.store(start, Ordering::Relaxed);
                s.word.store(0, Ordering::Relaxed);
                // Release: the handler reads len with Acquire, then start.
                s.len.store(len, Ordering::Release);
                return Ok(Gate { slot: i });
            }
        }
        Err(Error::BoLimit {
            limit: MAX_OBJECTS as u64,
        })
    }

    fn s(&self) -> &'static Slot {
        &TABLE[self.slot]
    }

    /// Close the gate: CPU accesses that fault from now on wait. Called before the
    /// CPU range loses its access.
    pub(super) fn close(&self) {
        let s = self.s();
        s.migrator.store(gettid(), Ordering::Relaxed);
        // SeqCst: ordered before the mprotect that follows (a system call, a full
        // barrier in practice too) and visible to every thread that faults after it;
        // the migrator store above is published with it.
        s.word.fetch_add(1, Ordering::SeqCst);
    }

    /// Open the gate and wake every waiting access. Called after the CPU range is
    /// accessible again.
    pub(super) fn open(&self) {
        let s = self.s();
        // SeqCst: the remap before it is complete; a waiter that loads the new value
        // (Acquire) retries against the new mapping.
        s.word.fetch_add(1, Ordering::SeqCst);
        futex_wake(&s.word);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let s = self.s();
        // Release: the slot is free for a new claim only after its fields are reset.
        s.start.store(0, Ordering::Relaxed);
        s.len.store(0, Ordering::Release);
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and no side effects.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn futex_wake(w: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a word of a static; affects only waiters on it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            0,
            0,
        );
    }
}

fn futex_wait(w: &AtomicU32, val: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: SLICE_NS,
    };
    // SAFETY: FUTEX_WAIT on a word of a static, with a relative timeout on the stack;
    // returns at once if the word is no longer `val`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            w.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            &ts as *const libc::timespec,
            0,
            0,
        );
    }
}

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the local timespec; async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn say(parts: &[&[u8]]) {
    for p in parts {
        // SAFETY: write(2) of a byte slice; async-signal-safe.
        unsafe { libc::write(2, p.as_ptr().cast(), p.len()) };
    }
}

fn hex(v: usize, buf: &mut [u8; 18]) -> &[u8] {
    buf[0] = b'0';
    buf[1] = b'x';
    for i in 0..16 {
        let d = (v >> ((15 - i) * 4)) & 0xf;
        buf[2 + i] = b"0123456789abcdef"[d];
    }
    &buf[..]
}

/// Put SIGSEGV back to its default action: the access faults again on return and the
/// process dies of it.
fn default_action() {
    // SAFETY: zeroed = SIG_DFL with an empty mask; sigaction is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSEGV, &sa, std::ptr::null_mut());
    }
}

fn find(addr: usize) -> Option<&'static Slot> {
    TABLE.iter().find(|s| {
        // Acquire: pairs with the Release in claim; start is read after it.
        let len = s.len.load(Ordering::Acquire);
        if len == 0 || len == usize::MAX {
            return false;
        }
        let start = s.start.load(Ordering::Relaxed);
        addr >= start && addr - start < len
    })
}

/// What the handler did for a fault in a gate.
enum Outcome {
    Retry,
    Fatal,
}

/// What a fault on a gate comes to, decided from what the handler read: the gate's
/// `word` (loaded once, `SeqCst`), its `migrator`, the faulting thread `me`, the
/// thread's `last` retry on an open gate, and the faulting address. The handler's
/// whole policy, kept a pure function so that `driver/tests/loom_bo.rs` runs the same
/// decision against its model of the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateDecision {
    /// The gate is closed: sleep on the word until it changes, then retry.
    Wait,
    /// The gate is open: the migration finished between the fault and the load.
    /// Retry once, remembering `(addr, word)`.
    Retry {
        /// What the thread records as its last retry.
        last: (usize, u32),
    },
    /// A second fault at the same address with the same open word: no migration
    /// explains it (an application bug, or a CPU range that stayed inaccessible).
    NotMigration,
    /// The migrating thread itself touched the object mid-move: it would wait for
    /// itself.
    SelfDeadlock,
}

/// The handler's decision (see [`GateDecision`]).
pub fn decide(word: u32, migrator: i32, me: i32, last: (usize, u32), addr: usize) -> GateDecision {
    if word & 1 == 0 {
        if last == (addr, word) {
            return GateDecision::NotMigration;
        }
        return GateDecision::Retry { last: (addr, word) };
    }
    if migrator == me {
        return GateDecision::SelfDeadlock;
    }
    GateDecision::Wait
}

fn wait_gate(s: &Slot, addr: usize) -> Outcome {
    // SeqCst: pairs with close/open.
    let w = s.word.load(Ordering::SeqCst);
    let mut buf = [0u8; 18];
    // Relaxed on migrator: published with the SeqCst increment that closed the gate,
    // and only compared with this thread's own id.
    let migrator = s.migrator.load(Ordering::Relaxed);
    match decide(w, migrator, gettid(), LAST.with(Cell::get), addr) {
        GateDecision::Retry { last } => {
            LAST.with(|c| c.set(last));
            return Outcome::Retry;
        }
        GateDecision::NotMigration => return Outcome::Fatal,
        GateDecision::SelfDeadlock => {
            say(&[
                b"userptr: CPU access at ",
                hex(addr, &mut buf),
                b" to a buffer object by the thread that is migrating it: it would wait for \
                  itself (deadlock); stopping the process\n",
            ]);
            default_action();
            return Outcome::Retry;
        }
        GateDecision::Wait => {}
    }
    // Relaxed: a counter.
    WAITS.fetch_add(1, Ordering::Relaxed);
    let deadline = now_ns() + WAIT_LIMIT.as_nanos() as u64;
    loop {
        futex_wait(&s.word, w);
        if s.word.load(Ordering::SeqCst) != w {
            return Outcome::Retry;
        }
        if now_ns() > deadline {
            say(&[
                b"userptr: CPU access at ",
                hex(addr, &mut buf),
                b" waited 10 s for a buffer object's migration to finish; stopping the \
                  process\n",
            ]);
            default_action();
            return Outcome::Retry;
        }
    }
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is this thread's; saved and restored around the handler.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    match find(addr) {
        Some(s) => match wait_gate(s, addr) {
            Outcome::Retry => {}
            Outcome::Fatal => chain(sig, info, ctx),
        },
        None => chain(sig, info, ctx),
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// A fault that is not a migration's: the handler installed before, or the default
/// action.
fn chain(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let Some(prev) = PREV.get() else {
        default_action();
        return;
    };
    let h = prev.sa_sigaction;
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        default_action();
    } else if prev.sa_flags & libc::SA_SIGINFO != 0 {
        // SAFETY: a SA_SIGINFO handler has this signature; it gets what we got.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
}
