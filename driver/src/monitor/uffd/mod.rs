//! The userfaultfd monitor: a kernel-sourced second opinion on address-space changes.
//!
//! A userfaultfd (handshake: `UFFD_FEATURE_EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP |
//! EVENT_FORK`) is told about every region the registry pins (it is a
//! [`RegionObserver`]): the region's range is registered with
//! `UFFDIO_REGISTER_MODE_WP`, and nothing is ever write-protected, so no page fault is
//! ever delivered; only the non-cooperative events are. The kernel reports them, and
//! the monitor turns them into registry invalidations:
//!
//! | event | raised by | invalidation |
//! |---|---|---|
//! | `UFFD_EVENT_REMOVE {start, end}` | `madvise(MADV_DONTNEED / MADV_FREE / MADV_REMOVE)` | `start..end`, [`Cause::Discard`] |
//! | `UFFD_EVENT_UNMAP {start, end}` | `munmap`, `mmap(MAP_FIXED)` over the range, `brk` shrink, `free()` of an mmapped block | `start..end`, [`Cause::Unmap`] |
//! | `UFFD_EVENT_REMAP {from, to, len}` | `mremap` that moves (followed by UNMAP of the old range) | `from..from+len`, [`Cause::Remap`] |
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

use crate::error::{Error, Result};
use crate::iommu::Perm;
use crate::registry::{Cause, RegionObserver, Registry, RegistryConfig};
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::ioctl::{opcode, Opcode, Updater};
use std::collections::VecDeque;
use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;

// ---- the kernel ABI (<linux/userfaultfd.h>) -------------------------------------

const UFFD_API: u64 = 0xaa;
/// `userfaultfd()` flag: handle user-mode faults only (needed without privilege when
/// `vm.unprivileged_userfaultfd` is 0).
const UFFD_USER_MODE_ONLY: u32 = 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;

const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;

/// Features the monitor cannot work without, with their names for the error.
const REQUIRED: [(u64, &str); 5] = [
    (
        UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        "UFFD_FEATURE_PAGEFAULT_FLAG_WP (write-protect registration)",
    ),
    (UFFD_FEATURE_EVENT_REMOVE, "UFFD_FEATURE_EVENT_REMOVE"),
    (UFFD_FEATURE_EVENT_UNMAP, "UFFD_FEATURE_EVENT_UNMAP"),
    (UFFD_FEATURE_EVENT_REMAP, "UFFD_FEATURE_EVENT_REMAP"),
    (UFFD_FEATURE_EVENT_FORK, "UFFD_FEATURE_EVENT_FORK"),
];
/// Requested when the kernel has them.
const OPTIONAL: u64 = UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
/// Required, but dropped when the kernel refuses it for lack of privilege: EVENT_FORK
/// needs CAP_SYS_PTRACE. Without it the kernel unregisters a fork child's ranges by
/// itself (`dup_userfaultfd` resets them), which is the same outcome as closing the
/// child's userfaultfd: the child is unmonitored. Only the FORK counter is lost.
const NEEDS_PTRACE: u64 = UFFD_FEATURE_EVENT_FORK;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

const UFFDIO_API: Opcode = opcode::read_write::<UffdioApi>(0xaa, 0x3f);
const UFFDIO_REGISTER: Opcode = opcode::read_write::<UffdioRegister>(0xaa, 0x00);
const UFFDIO_WRITEPROTECT: Opcode = opcode::read_write::<UffdioWriteprotect>(0xaa, 0x06);

// The values <linux/userfaultfd.h> gives on x86_64 and aarch64.
const _: () = assert!(UFFDIO_API as u64 == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER as u64 == 0xc020_aa00);
const _: () = assert!(UFFDIO_WRITEPROTECT as u64 == 0xc018_aa06);

/// Size of `struct uffd_msg`, which rustix does not define. Its layout (packed, 32
/// bytes):
///
/// ```text
/// offset 0   u8  event            (UFFD_EVENT_*)
/// offset 1   u8  reserved1, u16 reserved2, u32 reserved3
/// offset 8   union arg:
///              pagefault { u64 flags; u64 address; u32 ptid; }
///              fork      { u32 ufd; }
///              remap     { u64 from; u64 to; u64 len; }
///              remove    { u64 start; u64 end; }   (REMOVE and UNMAP)
/// ```
///
/// Messages are decoded from bytes ([`Event::parse`]): no unsafe cast.
const MSG_SIZE: usize = 32;
/// Messages read per `read()`.
const BATCH: usize = 64;

/// One decoded `struct uffd_msg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Remap { from: u64, to: u64, len: u64 },
    Fork { ufd: u32 },
    Pagefault { flags: u64, address: u64 },
    Unknown(u8),
}

impl Event {
    fn parse(m: &[u8]) -> Event {
        let u64_at = |o: usize| u64::from_ne_bytes(m[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_ne_bytes(m[o..o + 4].try_into().expect("4 bytes"));
        match m[0] {
            UFFD_EVENT_REMOVE => Event::Remove {
                start: u64_at(8),
                end: u64_at(16),
            },
            UFFD_EVENT_UNMAP => Event::Unmap {
                start: u64_at(8),
                end: u64_at(16),
            },
            UFFD_EVENT_REMAP => Event::Remap {
                from: u64_at(8),
                to: u64_at(16),
                len: u64_at(24),
            },
            UFFD_EVENT_FORK => Event::Fork { ufd: u32_at(8) },
            UFFD_EVENT_PAGEFAULT => Event::Pagefault {
                flags: u64_at(8),
                address: u64_at(16),
            },
            other => Event::Unknown(other),
        }
    }
}

fn uffdio_api(fd: &OwnedFd, features: u64) -> rustix::io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API is _IOWR with `struct uffdio_api`, which `UffdioApi` mirrors
    // (three u64s, repr(C)); the kernel reads and writes only that struct.
    unsafe { rustix::ioctl::ioctl(fd, Updater::<UFFDIO_API, UffdioApi>::new(&mut api))? };
    Ok(api)
}

/// Create a userfaultfd; returns it and whether it is user-mode-only.
fn open_uffd() -> Result<(OwnedFd, bool)> {
    use rustix::mm::UserfaultfdFlags as F;
    let flags = F::CLOEXEC | F::NONBLOCK;
    // SAFETY: creating the fd is harmless in itself; what makes userfaultfd unsafe is
    // registering memory whose faults nobody serves. This module registers in WP mode
    // only and never write-protects, so no fault is ever left waiting on it.
    match unsafe { rustix::mm::userfaultfd(flags) } {
        Ok(fd) => return Ok((fd, false)),
        Err(Errno::PERM) => {}
        Err(e) => {
            return Err(Error::MonitorUnavailable {
                monitor: "userfaultfd",
                reason: format!("userfaultfd() failed: {e}"),
            })
        }
    }
    // SAFETY: as above.
    match unsafe { rustix::mm::userfaultfd(flags | F::from_bits_retain(UFFD_USER_MODE_ONLY)) } {
        Ok(fd) => Ok((fd, true)),
        Err(e) => Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "userfaultfd() failed ({e}), also with UFFD_USER_MODE_ONLY: \
                 vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE, \
                 or a seccomp policy forbids it"
            ),
        }),
    }
}

/// Create a userfaultfd and complete the handshake with every required feature.
/// Returns the fd, whether it is user-mode-only, and the features granted.
fn open_with_features() -> Result<(OwnedFd, bool, u64)> {
    // The handshake can be done once per fd: probe what the kernel offers on one,
    // then ask for exactly what we use on another.
    let (probe, _) = open_uffd()?;
    let offered = uffdio_api(&probe, 0)
        .map_err(|e| Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!("UFFDIO_API handshake failed: {e}"),
        })?
        .features;
    drop(probe);
    let missing: Vec<&str> = REQUIRED
        .iter()
        .filter(|(f, _)| offered & f == 0)
        .map(|(_, n)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "the kernel lacks {} (offered features {offered:#x})",
                missing.join(", ")
            ),
        });
    }
    let mut want = REQUIRED.iter().fold(0, |a, (f, _)| a | f) | (OPTIONAL & offered);
    let (mut fd, mut user_mode_only) = open_uffd()?;
    let mut r = uffdio_api(&fd, want);
    if r.as_ref().err() == Some(&Errno::PERM) {
        // Unprivileged: no EVENT_FORK (see NEEDS_PTRACE). A fresh fd for the retry.
        want &= !NEEDS_PTRACE;
        (fd, user_mode_only) = open_uffd()?;
        r = uffdio_api(&fd, want);
    }
    let api = r.map_err(|e| Error::MonitorUnavailable {
        monitor: "userfaultfd",
        reason: format!("UFFDIO_API refused features {want:#x}: {e}"),
    })?;
    if api.features & want != want {
        return Err(Error::MonitorUnavailable {
            monitor: "userfaultfd",
            reason: format!(
                "UFFDIO_API granted features {:#x}, not all of {want:#x}",
                api.features
            ),
        });
    }
    Ok((fd, user_mode_only, want))
}

// ---- counters ---------------------------------------------------------------------

macro_rules! uffd_counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        /// Live counters, all Relaxed: they order nothing, a snapshot is a set of
        /// independent readings.
        #[derive(Debug, Default)]
        struct Counters {
            $($name: AtomicU64,)*
        }

        /// A reading of the monitor's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct UffdCounters {
            $(#[doc = $doc] pub $name: u64,)*
        }

        impl Counters {
            fn snapshot(&self) -> UffdCounters {
                UffdCounters { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl UffdCounters {
            /// `(name, value)` pairs, for printing and JSON.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

uffd_counters! {
    remove: "UFFD_EVENT_REMOVE events read (destructive madvise).",
    unmap: "UFFD_EVENT_UNMAP events read (munmap, mmap over, brk shrink).",
    remap: "UFFD_EVENT_REMAP events read (moving mremap).",
    fork: "UFFD_EVENT_FORK events read (each child's userfaultfd closed).",
    pagefault: "UFFD_EVENT_PAGEFAULT events read: never expected (logged, page un-protected).",
    unknown: "Events of a kind this monitor does not know.",
    handled: "Invalidations the handler thread completed.",
    invalidation_errors: "Invalidations that returned an error (logged).",
    registered: "Ranges registered with UFFDIO_REGISTER.",
    register_busy: "Ranges already registered with another userfaultfd (EBUSY): not monitored.",
    register_unsupported: "Ranges the kernel cannot register (EINVAL: file-backed, or shmem/hugetlb without WP support): not monitored.",
    register_failed: "Other registration failures (the range is gone, ...): not monitored.",
}

impl UffdCounters {
    /// Events read, every kind.
    pub fn events(&self) -> u64 {
        self.remove + self.unmap + self.remap + self.fork + self.pagefault + self.unknown
    }

    /// Registrations that failed, every reason.
    pub fn registration_failures(&self) -> u64 {
        self.register_busy + self.register_unsupported + self.register_failed
    }
}

impl std::fmt::Display for UffdCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, v) in self.fields() {
            writeln!(f, "{n:>24} {v}")?;
        }
        Ok(())
    }
}

fn bump(c: &AtomicU64) {
    // Relaxed: see Counters.
    c.fetch_add(1, Ordering::Relaxed);
}

// ---- shared state -----------------------------------------------------------------

/// What the observer (kept by the registry), the reader and the monitor share.
struct Shared {
    /// The userfaultfd; `None` once closed. Users hold the read side only for the
    /// duration of one syscall (or one `poll`), the reader's exit takes the write side
    /// to close it, so no syscall ever runs on a closed (or reused) fd number.
    uffd: RwLock<Option<OwnedFd>>,
    counters: Counters,
}

impl Shared {
    fn uffd(&self) -> std::sync::RwLockReadGuard<'_, Option<OwnedFd>> {
        self.uffd.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// UFFDIO_REGISTER `range` in write-protect mode.
    fn register(&self, range: &Range<u64>) {
        let g = self.uffd();
        let Some(fd) = g.as_ref() else { return }; // stopped
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: range.start,
                len: range.end - range.start,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER is _IOWR with `struct uffdio_register`, which
        // `UffdioRegister` mirrors (repr(C), 4 u64s). WP mode without ever
        // write-protecting delivers events only, never faults.
        let r = unsafe {
            rustix::ioctl::ioctl(
                fd,
                Updater::<UFFDIO_REGISTER, UffdioRegister>::new(&mut reg),
            )
        };
        let c = &self.counters;
        match r {
            Ok(()) => bump(&c.registered),
            Err(Errno::BUSY | Errno::EXIST) => bump(&c.register_busy),
            Err(Errno::INVAL) => {
                tracing::debug!(
                    "userfaultfd cannot watch {:#x}..{:#x} (file-backed or unsupported memory)",
                    range.start,
                    range.end
                );
                bump(&c.register_unsupported)
            }
            Err(e) => {
                tracing::debug!("UFFDIO_REGISTER {:#x}..{:#x}: {e}", range.start, range.end);
                bump(&c.register_failed)
            }
        }
    }

    /// Defensive: a WP fault should never happen (nothing is write-protected). Clear
    /// the protection on the page, which also wakes the faulting thread.
    fn unprotect(&self, address: u64) {
        let g = self.uffd();
        let Some(fd) = g.as_ref() else { return };
        let mut wp = UffdioWriteprotect {
            range: UffdioRange {
                start: address & !(PAGE - 1),
                len: PAGE,
            },
            mode: 0,
        };
        // SAFETY: UFFDIO_WRITEPROTECT is _IOWR with `struct uffdio_writeprotect`,
        // mirrored by `UffdioWriteprotect` (repr(C), 3 u64s); mode 0 removes the
        // protection and wakes waiters.
        let r = unsafe {
            rustix::ioctl::ioctl(
                fd,
                Updater::<UFFDIO_WRITEPROTECT, UffdioWriteprotect>::new(&mut wp),
            )
        };
        if let Err(e) = r {
            tracing::error!("UFFDIO_WRITEPROTECT(clear) at {address:#x}: {e}");
        }
    }
}

/// The registry's handle on the monitor: registers every newly pinned region.
struct Watcher(Arc<Shared>);

impl RegionObserver for Watcher {
    fn pinned(&self, range: Range<u64>) {
        self.0.register(&range);
    }
}

/// An invalidation for the handler thread.
type Job = (Range<u64>, Cause);

/// Jobs the queue holds before it has to grow. The reader must not allocate in steady
/// state: glibc trims a heap (`brk`, `madvise`) while holding that arena's lock, and
/// if the trimmed range is registered, the trimming thread waits for the reader while
/// holding the lock the reader's `malloc` could need.
const QUEUE_RESERVE: usize = 4096;

/// The job queue and the progress of the two threads (for [`UffdMonitor::sync`]).
struct Progress {
    jobs: VecDeque<Job>,
    /// Read passes completed (each drains the userfaultfd until it is empty).
    passes: u64,
    /// Jobs queued so far.
    queued: u64,
    /// Jobs the handler completed.
    handled: u64,
    reader_done: bool,
    handler_done: bool,
}

impl Progress {
    fn new() -> Progress {
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
struct Control {
    /// Wakes the reader: a stop request or a sync kick.
    wake: OwnedFd,
    stop: AtomicBool,
    progress: Mutex<Progress>,
    /// Signalled on every change of `progress` (jobs queued or done, a pass, an exit).
    changed: Condvar,
}

impl Control {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn kick(&self) {
        if let Err(e) = rustix::io::write(&self.wake, &1u64.to_ne_bytes()) {
            tracing::error!("waking the userfaultfd reader: {e}");
        }
    }

    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress());
        self.changed.notify_all();
    }
}

// ---- the threads ------------------------------------------------------------------

/// Runs when the reader exits, even by unwinding: closes the userfaultfd (which
/// unregisters every range and releases any thread waiting on an event), and marks
/// the reader done: the handler ends once the queue is empty.
struct ReaderExit<'a> {
    shared: &'a Shared,
    ctl: &'a Control,
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

fn reader(shared: Arc<Shared>, ctl: Arc<Control>) {
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
fn on_event(shared: &Shared, ev: Event) -> Option<(Range<u64>, Cause)> {
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
struct HandlerExit<'a>(&'a Control);

impl Drop for HandlerExit<'_> {
    fn drop(&mut self) {
        self.0.update(|p| p.handler_done = true);
    }
}

fn handler(registry: Registry, shared: Arc<Shared>, ctl: Arc<Control>) {
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

// ---- the monitor ------------------------------------------------------------------

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
        };
        let (s, c, r) = (shared.clone(), ctl.clone(), registry.clone());
        mon.handler = Some(
            std::thread::Builder::new()
                .name("userptr-uffd-inval".into())
                .spawn(move || handler(r, s, c))
                .map_err(|e| Error::sys("spawn(userfaultfd handler)", e))?,
        );
        let (s, c) = (shared.clone(), ctl.clone());
        // On failure `mon` drops: shutdown marks the missing reader done, so the
        // handler ends and is joined.
        mon.reader = Some(
            std::thread::Builder::new()
                .name("userptr-uffd".into())
                .spawn(move || reader(s, c))
                .map_err(|e| Error::sys("spawn(userfaultfd reader)", e))?,
        );
        // Observer first, then the existing regions: a region pinned in between is
        // seen by both, which is harmless (registering twice is a no-op).
        registry.add_observer(Arc::new(Watcher(shared.clone())));
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
        let deadline = Instant::now() + timeout;
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

    /// Stop: handle the events already delivered, close the userfaultfd (unregistering
    /// every range), and join both threads. The registry keeps a dead observer (there
    /// is no way to remove one), which does nothing.
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One private anonymous page, unmapped on drop.
struct Page(*mut std::ffi::c_void);

impl Page {
    fn new() -> Result<Page> {
        use rustix::mm::{MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                PAGE as usize,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE,
            )
        }
        .map_err(|e| Error::sys("mmap(measure_madvise)", e.into()))?;
        Ok(Page(p))
    }

    fn touch(&self) {
        // SAFETY: our own page, mapped read-write; a volatile store so the page is
        // really faulted in before each madvise.
        unsafe { std::ptr::write_volatile(self.0.cast::<u8>(), 1) };
    }

    /// Time one `madvise(MADV_DONTNEED)` of the page, in µs.
    fn time_dontneed(&self) -> Result<f64> {
        let t0 = Instant::now();
        // SAFETY: discarding our own page, which nothing references.
        unsafe { rustix::mm::madvise(self.0, PAGE as usize, rustix::mm::Advice::LinuxDontNeed) }
            .map_err(|e| Error::sys("madvise(measure_madvise)", e.into()))?;
        Ok(t0.elapsed().as_secs_f64() * 1e6)
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: our own mapping; nothing references it any more.
        let _ = unsafe { rustix::mm::munmap(self.0, PAGE as usize) };
    }
}

/// The price of the monitor on the calling thread, for the benchmark harness:
/// `(monitored, raw)`, the medians in µs over `iters` calls each of
/// `madvise(MADV_DONTNEED)` on a 4 KiB page, (1) registered with a registry on a fresh
/// reference device that has a running [`UffdMonitor`] (re-pinned before every call,
/// outside the timing, and the event handled before the next), and (2) on a page
/// nothing watches, with no monitor started yet. The difference is the userfaultfd
/// round trip: the caller sleeps until the reader thread has read the event.
pub fn measure_madvise(iters: usize) -> Result<(f64, f64)> {
    let iters = iters.max(1);
    let raw_page = Page::new()?;
    let mut raw = Vec::with_capacity(iters);
    for _ in 0..iters {
        raw_page.touch();
        raw.push(raw_page.time_dontneed()?);
    }
    drop(raw_page);

    let drv = crate::driver::Driver::reference()?;
    let reg = Registry::new(drv, RegistryConfig::default());
    let mon = UffdMonitor::start(&reg)?;
    let page = Page::new()?;
    let mut monitored = Vec::with_capacity(iters);
    for _ in 0..iters {
        page.touch();
        reg.register(page.0 as usize, PAGE as usize, Perm::READ_WRITE)?;
        monitored.push(page.time_dontneed()?);
        mon.sync(Duration::from_secs(5));
    }
    let handled = mon.counters().handled;
    mon.stop();
    reg.clear()?;
    drop(page);
    if handled < iters as u64 {
        tracing::warn!("measure_madvise: only {handled} of {iters} events were handled");
    }
    Ok((median(monitored), median(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, words: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut m = [0u8; MSG_SIZE];
        m[0] = kind;
        for (i, w) in words.iter().enumerate() {
            m[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn messages_decode() {
        assert_eq!(
            Event::parse(&msg(0x15, [0x1000, 0x3000, 0])),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            Event::parse(&msg(0x16, [0x1000, 0x3000, 0])),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        assert_eq!(
            Event::parse(&msg(0x14, [0x1000, 0x9000, 0x2000])),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        );
        // fork's ufd is a u32 at offset 8.
        assert_eq!(Event::parse(&msg(0x13, [7, 0, 0])), Event::Fork { ufd: 7 });
        assert_eq!(Event::parse(&msg(0x42, [0; 3])), Event::Unknown(0x42));
    }

    #[test]
    fn abi_struct_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
    }
}
