//! Range bookkeeping: registering every newly pinned region with the userfaultfd.

use super::abi::*;
use super::counters::{bump, Counters};
use super::PAGE;
use crate::registry::RegionObserver;
use rustix::io::Errno;
use rustix::ioctl::Updater;
use std::ops::Range;
use std::os::fd::OwnedFd;
use std::sync::{Arc, PoisonError, RwLock};

/// What the observer (kept by the registry), the reader and the monitor share.
pub(super) struct Shared {
    /// The userfaultfd; `None` once closed. Users hold the read side only for the
    /// duration of one syscall (or one `poll`), the reader's exit takes the write side
    /// to close it, so no syscall ever runs on a closed (or reused) fd number.
    pub(super) uffd: RwLock<Option<OwnedFd>>,
    pub(super) counters: Counters,
}

impl Shared {
    pub(super) fn uffd(&self) -> std::sync::RwLockReadGuard<'_, Option<OwnedFd>> {
        self.uffd.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// UFFDIO_REGISTER `range` in write-protect mode.
    pub(super) fn register(&self, range: &Range<u64>) {
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
    pub(super) fn unprotect(&self, address: u64) {
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
pub(super) struct Watcher(pub(super) Arc<Shared>);

impl RegionObserver for Watcher {
    fn pinned(&self, range: Range<u64>) {
        self.0.register(&range);
    }
}
