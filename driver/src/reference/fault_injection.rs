//! Fault injection for the reference device's IOMMU: make pin attempts fail the way
//! the kernel can make them fail, so the error paths above (the registry's retry and
//! eviction, the tool's reporting, the release of IOVA space and buffer-table slots)
//! run under load, not only in unit tests.
//!
//! Modelled on the kernel's own fault-injection framework
//! (`Documentation/fault-injection/`): an `interval` (every Nth attempt fails) and a
//! switch, instead of a probability, so that a run is reproducible. The errno is
//! injected where the kernel's answer arrives (instead of calling
//! `io_uring_register`), so it flows through exactly the cleanup and errno→error
//! conversion a real failure takes: `ENOMEM` becomes [`crate::Error::PinLimit`], `EAGAIN`
//! [`crate::Error::PinAgain`]. Nothing is pinned for an injected failure.
//!
//! The counters are shared: keep a clone of the [`PinFaults`] put into
//! [`crate::UringIommuConfig::pin_faults`] to switch it and read what it injected.
//!
//! [`TransferFaults`] does the same for the device's transfers: the Nth request of a
//! pipelined command that moves data *out of* device memory (into an IOVA) is
//! submitted against no file (descriptor -1), so the kernel itself fails it
//! (`EBADF`) and whatever is linked behind it (`ECANCELED`), after the requests it is
//! linked behind have moved their bytes: a transfer failing half way through a
//! command, with its staging (a FIFO) holding a chunk that never went out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// A fault-injection point for pin attempts (see the module docs). Clones share state.
#[derive(Clone, Debug)]
pub struct PinFaults {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    interval: u64,
    errnos: Vec<i32>,
    enabled: AtomicBool,
    attempts: AtomicU64,
    failed: AtomicU64,
    enomem: AtomicU64,
    eagain: AtomicU64,
}

impl PinFaults {
    /// Fail every `interval`th pin attempt while enabled, starting with the first
    /// (`interval` ≥ 1; 1 fails every attempt), alternating `ENOMEM` and `EAGAIN`.
    /// Starts disabled; attempts made while disabled are not counted.
    pub fn every(interval: u64) -> PinFaults {
        PinFaults::with_errnos(interval, &[libc::ENOMEM, libc::EAGAIN])
    }

    /// Like [`PinFaults::every`], cycling through `errnos` (`ENOMEM` if empty).
    pub fn with_errnos(interval: u64, errnos: &[i32]) -> PinFaults {
        let errnos = if errnos.is_empty() {
            vec![libc::ENOMEM]
        } else {
            errnos.to_vec()
        };
        PinFaults {
            inner: Arc::new(Inner {
                interval: interval.max(1),
                errnos,
                enabled: AtomicBool::new(false),
                attempts: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                enomem: AtomicU64::new(0),
                eagain: AtomicU64::new(0),
            }),
        }
    }

    /// Switch injection on or off.
    pub fn set_enabled(&self, on: bool) {
        // Relaxed: a switch, not a publication; an attempt racing the switch may go
        // either way, which is fine for fault injection.
        self.inner.enabled.store(on, Ordering::Relaxed);
    }

    /// Pin attempts failed with `ENOMEM` so far.
    pub fn injected_enomem(&self) -> u64 {
        self.inner.enomem.load(Ordering::Relaxed)
    }

    /// Pin attempts failed with `EAGAIN` so far.
    pub fn injected_eagain(&self) -> u64 {
        self.inner.eagain.load(Ordering::Relaxed)
    }

    /// Called once per pin attempt: the errno to fail it with, if this one fails.
    pub(crate) fn next(&self) -> Option<i32> {
        // Relaxed everywhere: counters that order nothing.
        if !self.inner.enabled.load(Ordering::Relaxed) {
            return None;
        }
        let k = self.inner.attempts.fetch_add(1, Ordering::Relaxed);
        if k % self.inner.interval != 0 {
            return None;
        }
        let i = self.inner.failed.fetch_add(1, Ordering::Relaxed) as usize;
        let errno = self.inner.errnos[i % self.inner.errnos.len()];
        match errno {
            libc::ENOMEM => self.inner.enomem.fetch_add(1, Ordering::Relaxed),
            libc::EAGAIN => self.inner.eagain.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        Some(errno)
    }
}

/// A fault-injection point for the device's transfers out of device memory in
/// pipelined commands (see the module docs). Clones share state.
#[derive(Clone, Debug)]
pub struct TransferFaults {
    inner: Arc<TransferInner>,
}

#[derive(Debug)]
struct TransferInner {
    nth: u64,
    enabled: AtomicBool,
    requests: AtomicU64,
    failed: AtomicU64,
}

impl TransferFaults {
    /// Fail request `n` (counting from 0) out of device memory made after each
    /// enable, and only that one. Starts disabled; requests made while disabled are
    /// not counted.
    pub fn nth(n: u64) -> TransferFaults {
        TransferFaults {
            inner: Arc::new(TransferInner {
                nth: n,
                enabled: AtomicBool::new(false),
                requests: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
        }
    }

    /// Switch injection on (counting requests from 0 again) or off.
    pub fn set_enabled(&self, on: bool) {
        // Relaxed: a switch, as for PinFaults; a request racing it may go either way.
        if on {
            self.inner.requests.store(0, Ordering::Relaxed);
        }
        self.inner.enabled.store(on, Ordering::Relaxed);
    }

    /// Requests failed so far (over every enable).
    pub fn injected(&self) -> u64 {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Called once per request out of device memory: whether this one fails.
    pub(crate) fn next(&self) -> bool {
        // Relaxed everywhere: counters that order nothing.
        if !self.inner.enabled.load(Ordering::Relaxed) {
            return false;
        }
        if self.inner.requests.fetch_add(1, Ordering::Relaxed) != self.inner.nth {
            return false;
        }
        self.inner.failed.fetch_add(1, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfer_faults_fail_the_nth_request_only_while_enabled() {
        let f = TransferFaults::nth(2);
        assert!(!(0..10).any(|_| f.next()), "starts off, uncounted");
        f.set_enabled(true);
        let got: Vec<bool> = (0..6).map(|_| f.next()).collect();
        assert_eq!(got, [false, false, true, false, false, false]);
        assert_eq!(f.injected(), 1);
        f.set_enabled(false);
        assert!(!(0..10).any(|_| f.next()));
        f.set_enabled(true);
        let got: Vec<bool> = (0..4).map(|_| f.next()).collect();
        assert_eq!(got, [false, false, true, false], "counted again from 0");
        assert_eq!(f.injected(), 2);
    }

    #[test]
    fn fails_every_nth_attempt_alternating_errnos_only_while_enabled() {
        let f = PinFaults::every(3);
        assert_eq!((0..10).filter_map(|_| f.next()).count(), 0, "starts off");
        f.set_enabled(true);
        let got: Vec<Option<i32>> = (0..12).map(|_| f.next()).collect();
        let fails: Vec<i32> = got.iter().flatten().copied().collect();
        assert_eq!(
            fails,
            [libc::ENOMEM, libc::EAGAIN, libc::ENOMEM, libc::EAGAIN]
        );
        assert_eq!(got[0], Some(libc::ENOMEM), "the first attempt fails");
        assert_eq!(got[3], Some(libc::EAGAIN));
        assert_eq!((f.injected_enomem(), f.injected_eagain()), (2, 2));
        f.set_enabled(false);
        assert!(f.next().is_none());
    }
}
