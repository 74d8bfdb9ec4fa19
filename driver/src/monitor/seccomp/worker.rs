//! The hand-off between the SIGSYS handler and the monitor's worker thread.
//!
//! The handler may interrupt a thread inside `malloc`, so it never allocates or locks:
//! it posts its invalidation into a fixed table of slots (atomics), wakes the worker
//! through an eventfd and waits on the slot with a futex. The worker runs the registry
//! side (`invalidate_start` / `invalidate_end`) and hands the slot back.

use super::decode::shm_range;
use super::Shared;
use crate::registry::{Cause, Invalidation};
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub(super) const SLOTS: usize = 64;
pub(super) const FREE: u32 = 0;
pub(super) const CLAIMED: u32 = 1;
pub(super) const START: u32 = 2;
pub(super) const STARTED: u32 = 3;
pub(super) const END: u32 = 4;

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
/// The worker's eventfd, -1 when no worker runs.
pub(super) static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

pub(super) fn futex_wait(word: &AtomicU32, expect: u32) {
    // SAFETY: FUTEX_WAIT on a valid, aligned u32 that lives for the program (a static
    // slot); spurious wake-ups and EINTR are handled by the caller's loop.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expect,
            std::ptr::null::<libc::timespec>(),
        );
    }
}

pub(super) fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE on a valid, aligned u32 (a static slot).
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

pub(super) fn wake_worker() {
    let fd = WAKE_FD.load(Ordering::Acquire);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) of 8 bytes from a local to an eventfd: async-signal-safe.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Post an invalidation to the worker and wait until it has started.
pub(super) fn start_invalidation((range, kind, arg): (Range<u64>, u32, u64)) -> &'static Slot {
    let slot = claim();
    slot.start.store(range.start, Ordering::Relaxed);
    slot.end.store(range.end, Ordering::Relaxed);
    slot.kind.store(kind, Ordering::Relaxed);
    slot.arg.store(arg, Ordering::Relaxed);
    // Release: the fields above are visible to the worker that sees START.
    slot.state.store(START, Ordering::Release);
    wake_worker();
    loop {
        // Acquire: pairs with the worker's Release store of STARTED.
        let st = slot.state.load(Ordering::Acquire);
        if st == STARTED {
            return slot;
        }
        futex_wait(&slot.state, st);
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
pub(super) fn worker(shared: &'static Shared, wake: OwnedFd, stop: Arc<AtomicBool>) {
    // The worker's own calls (its allocations) pass through.
    let _section = crate::driver_section::enter();
    let mut tokens: Vec<Option<Invalidation>> = (0..SLOTS).map(|_| None).collect();
    let mut buf = [0u8; 8];
    loop {
        // Acquire: pairs with stop()'s Release store.
        if stop.load(Ordering::Acquire) {
            break;
        }
        for (i, s) in TABLE.iter().enumerate() {
            // Acquire: pairs with the handler's Release stores of START / END.
            match s.state.load(Ordering::Acquire) {
                START => {
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
                    s.state.store(STARTED, Ordering::Release);
                    futex_wake(&s.state);
                }
                END => {
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
        // Sleep until a handler posts (or stop); a post that raced the scan above left
        // the eventfd readable, so nothing is lost.
        let mut fds = [rustix::event::PollFd::new(
            &wake,
            rustix::event::PollFlags::IN,
        )];
        let _ = rustix::event::poll(&mut fds, None);
        let _ = rustix::io::read(&wake, &mut buf);
    }
}
