//! The event reader and the handler threads.

use super::abi::*;
use super::counters::bump;
use super::watch::Shared;
use crate::registry::{Cause, Registry};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

/// An invalidation for the handler thread.
pub(super) type Job = (Range<u64>, Cause);

/// Jobs the queue holds before it has to grow. The reader must not allocate in steady
/// state: glibc trims a heap (`brk`, `madvise`) while holding that arena's lock, and
/// if the trimmed range is registered, the trimming thread waits for the reader while
/// holding the lock the reader's `malloc` could need.
pub(super) const QUEUE_RESERVE: usize = 4096;

/// The job queue and the progress of the two threads (for [`UffdMonitor::sync`]).
pub(super) struct Progress {
    pub(super) jobs: VecDeque<Job>,
    /// Read passes completed (each drains the userfaultfd until it is empty).
    pub(super) passes: u64,
    /// Jobs queued so far.
    pub(super) queued: u64,
    /// Jobs the handler completed.
    pub(super) handled: u64,
    pub(super) reader_done: bool,
    pub(super) handler_done: bool,
}

impl Progress {
    pub(super) fn new() -> Progress {
        Progress {
            jobs: VecDeque::with_capacity(QUEUE_RESERVE),
            passes: 0,
            queued: 0,
            handled: 0,
            reader_done: false,
            handler_done: false,
        }
    }
}

/// What the monitor and its threads share (not the registry's observer).
pub(super) struct Control {
    /// Wakes the reader: a stop request or a sync kick.
    pub(super) wake: OwnedFd,
    pub(super) stop: AtomicBool,
    pub(super) progress: Mutex<Progress>,
    /// Signalled on every change of `progress` (jobs queued or done, a pass, an exit).
    pub(super) changed: Condvar,
}

impl Control {
    pub(super) fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn kick(&self) {
        if let Err(e) = rustix::io::write(&self.wake, &1u64.to_ne_bytes()) {
            tracing::error!("waking the userfaultfd reader: {e}");
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress());
        self.changed.notify_all();
    }
}

/// Runs when the reader exits, even by unwinding: closes the userfaultfd (which
/// unregisters every range and releases any thread waiting on an event), and marks
/// the reader done: the handler ends once the queue is empty.
pub(super) struct ReaderExit<'a> {
    pub(super) shared: &'a Shared,
    pub(super) ctl: &'a Control,
}

impl Drop for ReaderExit<'_> {
    fn drop(&mut self) {
        let fd = self
            .shared
            .uffd
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        drop(fd);
        self.ctl.update(|p| p.reader_done = true);
    }
}

pub(super) fn reader(shared: Arc<Shared>, ctl: Arc<Control>) {
    // The reader's own calls (freeing its buffers) pass through other monitors.
    let _section = crate::driver_section::enter();
    let _exit = ReaderExit {
        shared: &shared,
        ctl: &ctl,
    };
    let mut buf = [0u8; MSG_SIZE * BATCH];
    loop {
        // Wait for an event or a kick.
        {
            let g = shared.uffd();
            let Some(uffd) = g.as_ref() else { return };
            let mut fds = [
                PollFd::new(uffd, PollFlags::IN),
                PollFd::new(&ctl.wake, PollFlags::IN),
            ];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => {
                    // Closing the fd (on return) unregisters everything: better than
                    // leaving ranges registered with nobody reading.
                    tracing::error!("userfaultfd monitor: poll failed ({e}); stopping");
                    return;
                }
            }
        }
        // Consume kicks (EAGAIN when there were none).
        let _ = rustix::io::read(&ctl.wake, &mut [0u8; 8]);
        loop {
            let r = {
                let g = shared.uffd();
                let Some(uffd) = g.as_ref() else { return };
                rustix::io::read(uffd, &mut buf)
            };
            let n = match r {
                Ok(0) | Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => continue,
                Err(e) => {
                    tracing::error!("userfaultfd monitor: read failed: {e}");
                    break;
                }
                Ok(n) => n,
            };
            if n % MSG_SIZE != 0 {
                tracing::error!("userfaultfd monitor: read {n} bytes, not whole messages");
            }
            ctl.update(|p| {
                for m in buf[..n].chunks_exact(MSG_SIZE) {
                    if let Some(job) = on_event(&shared, Event::parse(m)) {
                        // A dead handler (it panicked) takes no more work.
                        if !p.handler_done {
                            p.jobs.push_back(job);
                            p.queued += 1;
                        }
                    }
                }
            });
        }
        ctl.update(|p| p.passes += 1);
        // Acquire: pairs with the Release in `shutdown` (the eventfd and the progress
        // mutex order it too). Checked after a full drain, so events read before the
        // stop are all handed over.
        if ctl.stop.load(Ordering::Acquire) {
            return;
        }
    }
}

/// The reader's part of an event: count it, deal with what needs no registry, and
/// return the invalidation for the handler.
pub(super) fn on_event(shared: &Shared, ev: Event) -> Option<(Range<u64>, Cause)> {
    let c = &shared.counters;
    match ev {
        Event::Remove { start, end } => {
            bump(&c.remove);
            Some((start..end, Cause::Discard))
        }
        Event::Unmap { start, end } => {
            bump(&c.unmap);
            Some((start..end, Cause::Unmap))
        }
        Event::Remap { from, to, len } => {
            bump(&c.remap);
            Some((from..from.saturating_add(len), Cause::Remap { to }))
        }
        Event::Fork { ufd } => {
            bump(&c.fork);
            // SAFETY: reading the FORK message installed this fd in our table, for us
            // alone (no other code knows its number); we own it and close it now.
            // Closing releases the child's context: the child is unmonitored and has
            // no device mappings (see crate::fork).
            drop(unsafe { OwnedFd::from_raw_fd(ufd as i32) });
            None
        }
        Event::Pagefault { flags, address } => {
            bump(&c.pagefault);
            tracing::error!(
                "userfaultfd monitor: unexpected page fault at {address:#x} (flags {flags:#x}); \
                 un-protecting the page"
            );
            shared.unprotect(address);
            None
        }
        Event::Unknown(kind) => {
            bump(&c.unknown);
            tracing::warn!("userfaultfd monitor: unknown event {kind:#x}");
            None
        }
    }
}

/// Marks the handler done on exit, even by unwinding.
pub(super) struct HandlerExit<'a>(&'a Control);

impl Drop for HandlerExit<'_> {
    fn drop(&mut self) {
        self.0.update(|p| p.handler_done = true);
    }
}

pub(super) fn handler(registry: Registry, shared: Arc<Shared>, ctl: Arc<Control>) {
    let _section = crate::driver_section::enter();
    let _exit = HandlerExit(&ctl);
    loop {
        // Ends once the reader has exited and the queue is empty.
        let (range, cause) = {
            let mut p = ctl.progress();
            loop {
                if let Some(job) = p.jobs.pop_front() {
                    break job;
                }
                if p.reader_done {
                    return;
                }
                p = ctl.changed.wait(p).unwrap_or_else(PoisonError::into_inner);
            }
        };
        if let Err(e) = registry.invalidate(range.clone(), cause) {
            bump(&shared.counters.invalidation_errors);
            tracing::error!(
                "userfaultfd monitor: invalidating {:#x}..{:#x} ({cause:?}): {e}",
                range.start,
                range.end
            );
        }
        bump(&shared.counters.handled);
        ctl.update(|p| p.handled += 1);
    }
}
