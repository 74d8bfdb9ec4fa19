//! The userfaultfd monitor: a kernel-sourced second opinion on address-space changes.
//!
//! A userfaultfd (handshake: `UFFD_FEATURE_EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP |
//! EVENT_FORK`) is told about every region the registry pins (it is a
//! [`RegionObserver`](crate::RegionObserver)): the region's range is registered with
//! `UFFDIO_REGISTER_MODE_WP`, and nothing is ever write-protected, so no page fault is
//! ever delivered; only the non-cooperative events are. The kernel reports them, and
//! the monitor turns them into registry invalidations:
//!
//! | event | raised by | invalidation |
//! |---|---|---|
//! | `UFFD_EVENT_REMOVE {start, end}` | `madvise(MADV_DONTNEED / MADV_FREE / MADV_REMOVE)` | `start..end`, [`Cause::Discard`](crate::Cause::Discard) |
//! | `UFFD_EVENT_UNMAP {start, end}` | `munmap`, `mmap(MAP_FIXED)` over the range, `brk` shrink, `free()` of an mmapped block | `start..end`, [`Cause::Unmap`](crate::Cause::Unmap) |
//! | `UFFD_EVENT_REMAP {from, to, len}` | `mremap` that moves (followed by UNMAP of the old range) | `from..from+len`, [`Cause::Remap`](crate::Cause::Remap) |
//! | `UFFD_EVENT_FORK {ufd}` | `fork` | none: the child's new userfaultfd is closed at once |
//!
//! Without privilege the userfaultfd is created with `UFFD_USER_MODE_ONLY` (needed when
//! `vm.unprivileged_userfaultfd` is 0; the events are the same), and `EVENT_FORK`,
//! which needs `CAP_SYS_PTRACE`, is left out: the kernel then unregisters a fork
//! child's ranges itself, the same outcome as closing the child's userfaultfd.
//!
//! # What it guarantees
//!
//! * Every change the kernel reports on a range that was pinned while the monitor ran
//!   (or was pinned before [`UffdMonitor::start`]) reaches the registry, whatever made
//!   it: libc wrappers, glibc-internal calls (`free()` → `munmap`), raw `syscall()`,
//!   static code, other libraries. After [`UffdMonitor::sync`] returns true, every event
//!   delivered before the call has been handled (its invalidation returned), so the
//!   next submission re-pins the pages the process maps now.
//! * The threads that make the changes are never held up by registry work: a *reader*
//!   thread only reads events (and closes fork fds) and queues them, a *handler*
//!   thread invalidates. A mutating thread waits for the reader, never for a registry
//!   lock, a window or a device fence (so explicit invalidation windows and the
//!   seccomp monitor can be used alongside without deadlock). The reader takes no
//!   registry lock and allocates nothing in steady state (the queue is reserved
//!   ahead), so it cannot wait on a malloc arena lock held by a thread that is itself
//!   waiting for the reader.
//! * A fork child gets no monitoring and no device mappings: its userfaultfd is closed
//!   as soon as the FORK event is read, which unregisters the child's ranges and
//!   releases any of its threads waiting on an event (without FORK events, the kernel
//!   never registers them). The parent's `fork` waits for the reader, not the handler.
//!
//! # What it cannot guarantee
//!
//! * **It is not a pre-notifier.** The thread making the change resumes once the event
//!   has been *read*, not once it has been handled: device work may still be running
//!   against the old pages when the kernel frees or replaces them (REMOVE is read
//!   before the pages go, but the zap does not wait for the invalidation; UNMAP and
//!   REMAP arrive after the change is done). It closes the window in which a stale pin
//!   would be *reused* by later submissions; it does not stop work already in flight.
//!   Use the seccomp monitor or explicit invalidation for that; this is a cross-check
//!   and a safety net.
//! * **No event for `mprotect`**: a protection downgrade of a registered range is not
//!   seen; the device keeps write access to a now read-only range.
//! * **UNMAP arrives after the range is gone** (the pages may already be reused).
//! * **Regular-file mappings cannot be registered** (the registry does not pin them
//!   either); shmem and hugetlb need `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`, requested when
//!   the kernel has it. Ranges that cannot be registered, or are registered with
//!   another userfaultfd, are counted ([`UffdCounters`]) and not monitored.
//! * **`MADV_FREE` also produces REMOVE**, although pinned pages keep their data: an
//!   innocent invalidation (a re-pin on next use).
//! * Registration is per region: registering part of a VMA splits it, and ranges stay
//!   registered after their region is unpinned, so later `madvise`/`munmap` calls on
//!   a once-pinned range keep paying the event round trip (tens of µs, see
//!   [`measure_madvise`]) until the monitor stops.
//! * Events are process-wide and asynchronous; a monitor thread must never change a
//!   registered range itself (a thread that does so while nobody reads the
//!   userfaultfd blocks in uninterruptible sleep). Neither thread here does, and both
//!   run inside a [`crate::driver_section`]. The same holds for anything that stops
//!   the reader (a debugger, `SIGSTOP` of that thread alone).
//! * When the monitor stops, events still queued are handled, then the userfaultfd is
//!   closed (unregistering every range); an event raised between the last read and
//!   the close is released by the close without being handled.
//!
//! Files, one concept each:
//! * this file: starting, syncing and stopping the monitor;
//! * `abi`: the kernel ABI (handshake, ioctls, event messages);
//! * `watch`: range bookkeeping (every newly pinned region is registered);
//! * `events`: the event reader and the handler threads;
//! * `counters`: what the monitor counts;
//! * `measure`: the cost of a monitored `madvise`, for the benchmark harness.

use crate::error::{Error, Result};
use crate::registry::{ObserverId, Registry};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod abi;
mod counters;
mod events;
mod measure;
mod watch;

pub use counters::UffdCounters;
pub use measure::measure_madvise;

use abi::{open_with_features, UFFD_FEATURE_EVENT_FORK};
use counters::Counters;
use events::{handler, reader, Control, Progress};
use watch::{Shared, Watcher};

const PAGE: u64 = 4096;

/// The userfaultfd monitor of one registry (see the module doc). Stops on drop.
pub struct UffdMonitor {
    shared: Arc<Shared>,
    ctl: Arc<Control>,
    reader: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
    user_mode_only: bool,
    features: u64,
    /// The process that started the threads (a fork child must not join them).
    pid: rustix::process::Pid,
    /// The registry's observer this monitor added, removed again on stop.
    observer: Option<(Registry, ObserverId)>,
}

impl std::fmt::Debug for UffdMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdMonitor")
            .field("user_mode_only", &self.user_mode_only)
            .field("features", &format_args!("{:#x}", self.features))
            .field("counters", &self.counters())
            .finish_non_exhaustive()
    }
}

impl UffdMonitor {
    /// Create the userfaultfd (retrying with `UFFD_USER_MODE_ONLY` on `EPERM`), do the
    /// feature handshake, start the reader and handler threads, and watch every region
    /// `registry` pins from now on, and those it has pinned already.
    ///
    /// Errors: [`Error::MonitorUnavailable`] naming what is missing (userfaultfd
    /// disallowed, a kernel feature absent).
    pub fn start(registry: &Registry) -> Result<UffdMonitor> {
        let (uffd, user_mode_only, features) = open_with_features()?;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| Error::sys("eventfd(userfaultfd monitor)", e.into()))?;
        let shared = Arc::new(Shared {
            uffd: RwLock::new(Some(uffd)),
            counters: Counters::default(),
        });
        let ctl = Arc::new(Control {
            wake,
            stop: AtomicBool::new(false),
            progress: Mutex::new(Progress::new()),
            changed: Condvar::new(),
        });
        let mut mon = UffdMonitor {
            shared: shared.clone(),
            ctl: ctl.clone(),
            reader: None,
            handler: None,
            user_mode_only,
            features,
            pid: rustix::process::getpid(),
            observer: None,
        };
        let (s, c, r) = (shared.clone(), ctl.clone(), registry.clone());
        mon.handler = Some(
            std::thread::Builder::new()
                .name("userptr-uffd-inval".into())
                .spawn(move || {
                    crate::driver_section::block_signals_for_thread();
                    handler(r, s, c)
                })
                .map_err(|e| Error::sys("spawn(userfaultfd handler)", e))?,
        );
        let (s, c) = (shared.clone(), ctl.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // On failure `mon` drops: shutdown marks the missing reader done, so the
        // handler ends and is joined.
        mon.reader = Some(
            std::thread::Builder::new()
                .name("userptr-uffd".into())
                .spawn(move || {
                    crate::driver_section::block_signals_for_thread();
                    let _ = ready_tx.send(());
                    reader(s, c)
                })
                .map_err(|e| Error::sys("spawn(userfaultfd reader)", e))?,
        );
        // Return only once the reader runs its loop, which allocates nothing: a thread
        // still starting up allocates (glibc's and Rust's thread set-up), and a fork in
        // the meantime holds malloc's locks while its own syscall waits for the reader
        // to read the FORK event: a deadlock.
        let _ = ready_rx.recv();
        // Observer first, then the existing regions: a region pinned in between is
        // seen by both, which is harmless (registering twice is a no-op).
        let id = registry.add_observer(Arc::new(Watcher(shared.clone())));
        mon.observer = Some((registry.clone(), id));
        for r in registry.regions() {
            shared.register(&r.range);
        }
        Ok(mon)
    }

    /// The counters.
    pub fn counters(&self) -> UffdCounters {
        self.shared.counters.snapshot()
    }

    /// Whether the userfaultfd had to be created with `UFFD_USER_MODE_ONLY`
    /// (unprivileged, `vm.unprivileged_userfaultfd = 0`). Events are the same.
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// The `UFFD_FEATURE_*` bits the handshake granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether FORK events are delivered (they need CAP_SYS_PTRACE). Either way a
    /// fork child ends up unmonitored: without them the kernel unregisters the child's
    /// ranges itself.
    pub fn fork_events(&self) -> bool {
        self.features & UFFD_FEATURE_EVENT_FORK != 0
    }

    /// Wait until every event the kernel delivered before this call has been handled
    /// (its invalidation returned). Because the thread that changed a range resumes
    /// only once the monitor has read the event, calling this after the change
    /// returned makes the change visible to the registry. Returns false on timeout or
    /// if the monitor has stopped.
    pub fn sync(&self, timeout: Duration) -> bool {
        let deadline = crate::submitter::deadline_after(timeout);
        let ctl = &*self.ctl;
        let mut p = ctl.progress();
        if p.reader_done || p.handler_done {
            return false;
        }
        // Any event already read was read by a pass that has completed (counted in
        // `passes`) or is in progress (completes as passes + 1); the kick makes sure
        // an idle reader makes that pass.
        let pass = p.passes + 1;
        ctl.kick();
        while p.passes < pass && !p.reader_done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = ctl
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if p.passes < pass {
            return false;
        }
        let target = p.queued;
        while p.handled < target && !p.handler_done {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            p = ctl
                .changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        p.handled >= target
    }

    /// Stop: remove the registry's observer, handle the events already delivered,
    /// close the userfaultfd (unregistering every range), and join both threads. What
    /// `start` added is gone: a start/stop cycle leaves nothing behind.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if rustix::process::getpid() != self.pid {
            // A fork child: the threads exist only in the parent. Leave the handles.
            for h in [self.reader.take(), self.handler.take()]
                .into_iter()
                .flatten()
            {
                std::mem::forget(h);
            }
            return;
        }
        // No new region is reported to a monitor that is going away.
        if let Some((registry, id)) = self.observer.take() {
            registry.remove_observer(id);
        }
        // Release: see the reader's Acquire.
        self.ctl.stop.store(true, Ordering::Release);
        self.ctl.kick();
        if self.reader.is_none() {
            // Never started (spawn failed): nothing will queue more work.
            self.ctl.update(|p| p.reader_done = true);
        }
        for h in [self.reader.take(), self.handler.take()]
            .into_iter()
            .flatten()
        {
            if h.join().is_err() {
                tracing::error!("a userfaultfd monitor thread panicked");
            }
        }
        // If the reader never started, the fd is still open: close it.
        drop(
            self.shared
                .uffd
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
    }
}

impl Drop for UffdMonitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}
