//! The hand-off between the SIGSYS handler and the monitor's worker thread.
//!
//! The handler may interrupt a thread inside `malloc`, so it never allocates or locks:
//! it posts its invalidation into a fixed table of slots (atomics), wakes the worker
//! through a futex word and waits on the slot with a futex. The worker runs the registry
//! side (`invalidate_start` / `invalidate_end`) and hands the slot back.
//!
//! Waking a thread blocked on an idle vCPU costs tens of microseconds, and the round
//! trip has two such wake-ups (the worker, then the handler), so both sides poll a
//! bounded while before they sleep, yielding the CPU between polls (a busy spin was
//! measured worse on the shared 2-core machine: the thread it waits for may need
//! the very CPU it spins on):
//! * the handler polls up to [`HANDLER_SPIN`] on its slot before it marks the slot
//!   [`START_WAITING`] and futex-waits; the worker futex-wakes only a slot so marked;
//! * the worker, once the table is empty, keeps polling it for [`WORKER_SPIN`] before
//!   it sleeps on its futex word [`WORKER_WORD`], and a handler makes the futex call
//!   only when the word says it sleeps (a Dekker handshake, see
//!   [`wake_worker_if_sleeping`]).
//!
//! Both polls only read atomics and the clock (the vDSO) and call `sched_yield`: the
//! handler still neither allocates nor locks.

use super::decode::shm_range;
use super::Shared;
use crate::registry::{Cause, Invalidation};
use crate::trampoline;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the handler polls its slot (yielding the CPU in between) before it
/// futex-waits for the worker.
pub(super) const HANDLER_SPIN: Duration = Duration::from_micros(50);
/// How long the worker keeps polling an empty table (yielding the CPU in between)
/// before it sleeps on its futex.
pub(super) const WORKER_SPIN: Duration = Duration::from_micros(100);

pub(super) const SLOTS: usize = 64;
pub(super) const FREE: u32 = 0;
pub(super) const CLAIMED: u32 = 1;
pub(super) const START: u32 = 2;
pub(super) const STARTED: u32 = 3;
pub(super) const END: u32 = 4;
/// START, with the handler asleep on the slot's futex: the worker must wake it.
pub(super) const START_WAITING: u32 = 5;

/// Cause encodings in a slot (a signal handler cannot build an enum in shared memory
/// portably; this is the wire format between handler and worker).
pub(super) const K_UNMAP: u32 = 0;
pub(super) const K_DISCARD: u32 = 1;
pub(super) const K_REMAP: u32 = 2;
pub(super) const K_PROTECT: u32 = 3;
pub(super) const K_SHMDT: u32 = 4;

pub(super) struct Slot {
    pub(super) state: AtomicU32,
    start: AtomicU64,
    end: AtomicU64,
    kind: AtomicU32,
    arg: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
pub(super) const EMPTY_SLOT: Slot = Slot {
    state: AtomicU32::new(FREE),
    start: AtomicU64::new(0),
    end: AtomicU64::new(0),
    kind: AtomicU32::new(0),
    arg: AtomicU64::new(0),
};

pub(super) static TABLE: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
/// The worker's futex word: [`ASLEEP`] while it sleeps (or is about to), else
/// [`AWAKE`]. A post that finds it asleep sets it awake and futex-wakes it.
pub(super) static WORKER_WORD: AtomicU32 = AtomicU32::new(AWAKE);
const AWAKE: u32 = 0;
const ASLEEP: u32 = 1;

// The futex and sched_yield calls below go through the driver's own syscall site,
// which no filter traps: from libc's `syscall`, they trap wherever an exec range
// covers libc's code, and a trapped call is counted as a handler user (see
// `handler::monitored`) while it blocks, so the worker asleep in a trapped futex
// wait would hold up `shutdown`, which waits for the users to leave before it wakes
// the worker (monitor_matrix's seccomp/mremap_exec_code hung so).

pub(super) fn futex_wait(word: &AtomicU32, expect: u32) {
    let op = (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64;
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 that lives for the program (a static
    // slot), no timeout; spurious wake-ups and EINTR are handled by the caller's loop.
    unsafe {
        trampoline::syscall(
            libc::SYS_futex,
            [word.as_ptr() as u64, op, expect as u64, 0, 0, 0],
        )
    };
}

pub(super) fn futex_wake(word: &AtomicU32) {
    let op = (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64;
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 (a static slot).
    unsafe {
        trampoline::syscall(
            libc::SYS_futex,
            [word.as_ptr() as u64, op, i32::MAX as u64, 0, 0, 0],
        )
    };
}

/// Give the CPU to another runnable thread, if any (`sched_yield`: async-signal-safe).
fn yield_cpu() {
    // SAFETY: sched_yield has no arguments and no effect beyond scheduling.
    unsafe { trampoline::syscall(libc::SYS_sched_yield, [0; 6]) };
}

/// Wake the worker whatever it is doing (shutdown: it must see `stop`).
pub(super) fn wake_worker() {
    // SeqCst: as in wake_worker_if_sleeping.
    WORKER_WORD.store(AWAKE, Ordering::SeqCst);
    futex_wake(&WORKER_WORD);
}

/// Wake the worker if it sleeps (or is about to). The caller has just stored a slot's
/// new state with SeqCst; the worker stores [`ASLEEP`] with SeqCst before its last
/// scan, so either this swap sees it asleep (and wakes it), or that scan sees the new
/// state. Async-signal-safe: an atomic and at most one futex call.
pub(super) fn wake_worker_if_sleeping() {
    // SeqCst: the Dekker handshake above.
    if WORKER_WORD.swap(AWAKE, Ordering::SeqCst) == ASLEEP {
        futex_wake(&WORKER_WORD);
    }
}

/// Post an invalidation to the worker and wait until it has started.
pub(super) fn start_invalidation((range, kind, arg): (Range<u64>, u32, u64)) -> &'static Slot {
    let slot = claim();
    slot.start.store(range.start, Ordering::Relaxed);
    slot.end.store(range.end, Ordering::Relaxed);
    slot.kind.store(kind, Ordering::Relaxed);
    slot.arg.store(arg, Ordering::Relaxed);
    // SeqCst (a Release at least): the fields above are visible to the worker that
    // sees START; SeqCst for the handshake of wake_worker_if_sleeping.
    slot.state.store(START, Ordering::SeqCst);
    wake_worker_if_sleeping();
    let spin_until = Instant::now() + HANDLER_SPIN;
    loop {
        // Acquire: pairs with the worker's Release store of STARTED.
        if slot.state.load(Ordering::Acquire) == STARTED {
            return slot;
        }
        if Instant::now() < spin_until {
            // Yield, not a busy spin: on a loaded machine the worker may be waiting
            // for this very CPU.
            yield_cpu();
            continue;
        }
        // Asleep from here on: the worker wakes a START_WAITING slot. The exchange
        // fails only when the worker already stored STARTED.
        // Acquire on failure: pairs with the worker's Release store of STARTED.
        match slot.state.compare_exchange(
            START,
            START_WAITING,
            Ordering::Relaxed,
            Ordering::Acquire,
        ) {
            Ok(_) | Err(START_WAITING) => futex_wait(&slot.state, START_WAITING),
            Err(_) => {}
        }
    }
}

pub(super) fn claim() -> &'static Slot {
    loop {
        for s in &TABLE {
            // Acquire: the slot's previous use is complete before we reuse it.
            if s.state
                .compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return s;
            }
        }
        // Every slot busy (64 threads inside trapped calls): wait for one to free.
        futex_wait(&TABLE[0].state, TABLE[0].state.load(Ordering::Relaxed));
    }
}

/// The worker: runs the registry side of trapped calls.
pub(super) fn worker(shared: &'static Shared, stop: Arc<AtomicBool>) {
    // The worker's own calls (its allocations) pass through.
    let _section = crate::driver_section::enter();
    let mut tokens: Vec<Option<Invalidation>> = (0..SLOTS).map(|_| None).collect();
    let mut idle_since: Option<Instant> = None;
    loop {
        // Acquire: pairs with stop()'s Release store.
        if stop.load(Ordering::Acquire) {
            break;
        }
        let mut worked = false;
        for (i, s) in TABLE.iter().enumerate() {
            // Acquire: pairs with the handler's Release stores of START / END.
            match s.state.load(Ordering::Acquire) {
                START | START_WAITING => {
                    worked = true;
                    let range = s.start.load(Ordering::Relaxed)..s.end.load(Ordering::Relaxed);
                    let arg = s.arg.load(Ordering::Relaxed);
                    let (range, cause) = match s.kind.load(Ordering::Relaxed) {
                        K_DISCARD => (range, Cause::Discard),
                        K_REMAP => (range, Cause::Remap { to: arg }),
                        K_PROTECT => (
                            range,
                            Cause::Protect {
                                new_prot: arg as i32,
                            },
                        ),
                        K_SHMDT => (shm_range(range.start).unwrap_or(range), Cause::Unmap),
                        _ => (range, Cause::Unmap),
                    };
                    match shared.registry().invalidate_start(range, cause) {
                        Ok(inv) => tokens[i] = Some(inv),
                        Err(e) => tracing::error!("seccomp monitor: invalidation failed: {e}"),
                    }
                    // Release: the invalidation happened before the call proceeds.
                    // The swap sees whether the handler went to sleep meanwhile.
                    if s.state.swap(STARTED, Ordering::Release) == START_WAITING {
                        futex_wake(&s.state);
                    }
                }
                END => {
                    worked = true;
                    if let Some(inv) = tokens[i].take() {
                        shared.registry().invalidate_end(inv);
                    }
                    s.state.store(FREE, Ordering::Release);
                    futex_wake(&s.state);
                    futex_wake(&TABLE[0].state);
                }
                _ => {}
            }
        }
        if worked {
            idle_since = None;
            continue;
        }
        // Nothing posted: keep polling a while, then sleep.
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < WORKER_SPIN {
            yield_cpu();
            continue;
        }
        idle_since = None;
        // SeqCst: the Dekker handshake of wake_worker_if_sleeping: a handler's post
        // stored before this is seen by the scan below; one stored after it finds
        // the word ASLEEP and wakes us.
        WORKER_WORD.store(ASLEEP, Ordering::SeqCst);
        let posted = TABLE.iter().any(|s| {
            // SeqCst: the handshake above.
            matches!(s.state.load(Ordering::SeqCst), START | START_WAITING | END)
        });
        // SeqCst: the same handshake with shutdown's store of `stop` (SeqCst), which
        // its wake_worker follows.
        if posted || stop.load(Ordering::SeqCst) {
            // SeqCst: the handshake above.
            WORKER_WORD.store(AWAKE, Ordering::SeqCst);
            continue;
        }
        // Sleep until a handler posts (or stop): a post after the scan above finds
        // the word ASLEEP and wakes us; FUTEX_WAIT returns at once if it did already.
        futex_wait(&WORKER_WORD, ASLEEP);
        // SeqCst: the handshake above.
        WORKER_WORD.store(AWAKE, Ordering::SeqCst);
    }
}
