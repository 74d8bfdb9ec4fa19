//! Monitor handles: the seccomp trap, userfaultfd and the LD_PRELOAD shim, each
//! telling a registry about the address-space changes the application makes, so that
//! registered memory may be freed, unmapped or madvised while registered.

use crate::boundary::{arg, close_handle, into_handle, Out};
use crate::code::UserptrCode;
use crate::failure::{guard, Failure};
use crate::registry::UserptrRegistry;
use std::time::Duration;
use userptr::driver::monitor::preload::PreloadMonitor;
use userptr::driver::monitor::seccomp::SeccompMonitor;
use userptr::driver::monitor::uffd::UffdMonitor;
use userptr::Registry;

/// Which monitor.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserptrMonitorKind {
    /// A seccomp filter traps every call that can change mappings (libc, raw
    /// `syscall()`, glibc-internal), and the registry is told before the call runs.
    /// Process-wide and permanent: the filter stays after the monitor stops. One at a
    /// time; install it before creating io_uring instances of your own.
    Seccomp = 1,
    /// userfaultfd events (unmap, discard, remap, fork), asynchronous: call
    /// `userptr_monitor_sync` after a change before relying on it. Blind to
    /// `mprotect`.
    Uffd = 2,
    /// The `LD_PRELOAD` shim (`libuserptr_preload.so`, loaded at start-up): libc
    /// wrappers only.
    Preload = 3,
}

/// An installed monitor; stops when dropped.
pub enum Monitor {
    /// The seccomp monitor.
    Seccomp(SeccompMonitor),
    /// The userfaultfd monitor.
    Uffd(UffdMonitor),
    /// The preload monitor.
    Preload(PreloadMonitor),
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Monitor::Seccomp(_) => "Monitor::Seccomp",
            Monitor::Uffd(_) => "Monitor::Uffd",
            Monitor::Preload(_) => "Monitor::Preload",
        })
    }
}

impl Monitor {
    /// Install monitor `kind` (a `userptr_monitor_kind` value) on `registry`.
    pub fn install(kind: u32, registry: &Registry) -> Result<Monitor, Failure> {
        Ok(match kind {
            1 => Monitor::Seccomp(SeccompMonitor::install(registry)?),
            2 => Monitor::Uffd(UffdMonitor::start(registry)?),
            3 => Monitor::Preload(PreloadMonitor::install(registry)?),
            _ => {
                return Err(Failure::invalid(format!(
                    "{kind} is not a userptr_monitor_kind (SECCOMP = 1, UFFD = 2, PRELOAD = 3)"
                )))
            }
        })
    }

    /// Wait until the changes made before this call have reached the registry. Only
    /// userfaultfd lags behind (its events are read asynchronously); the others tell
    /// the registry before the change is made.
    pub fn sync(&self, timeout: Duration) -> Result<(), Failure> {
        match self {
            Monitor::Uffd(m) if !m.sync(timeout) => Err(Failure::new(
                UserptrCode::Timeout,
                format!(
                    "the userfaultfd monitor did not handle its pending events within {} ms \
                     (or it has stopped)",
                    timeout.as_millis()
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// An installed monitor (opaque). Made by `userptr_monitor_install`, stopped by
/// `userptr_monitor_stop`.
pub struct UserptrMonitor {
    monitor: Monitor,
}

/// Install monitor `kind` (a `userptr_monitor_kind` value) on `registry`; `*out`
/// receives it. From then on, memory registered there may be freed, unmapped,
/// madvised, remapped or protected while registered: the registry drops (or
/// downgrades) the pins first, and pins the new pages at their next use.
///
/// Errors: `USERPTR_CODE_MONITOR_UNAVAILABLE` (the message says what is missing: the
/// kernel refused userfaultfd, the shim is not loaded, the process runs with ASLR
/// off, ...), `USERPTR_CODE_MONITOR_CONFLICT` (another SIGSYS handler, a second
/// seccomp or preload monitor), `USERPTR_CODE_INVALID_ARGUMENT` (a bad `kind`).
///
/// # Safety
/// `registry` is NULL or a live registry handle; `out` is NULL or valid for writing
/// one pointer.
#[no_mangle]
pub unsafe extern "C" fn userptr_monitor_install(
    registry: *const UserptrRegistry,
    kind: u32,
    out: *mut *mut UserptrMonitor,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promises on `registry` and `out`.
        let (r, out) = unsafe { (arg(registry, "registry")?, Out::new(out, "out")?) };
        let monitor = Monitor::install(kind, &r.registry)?;
        out.put(into_handle(UserptrMonitor { monitor }));
        Ok(())
    })
}

/// Wait up to `timeout_ms` until every change made before this call has reached the
/// registry (only the userfaultfd monitor can lag; for the others this returns at
/// once). `USERPTR_CODE_TIMEOUT` if it did not catch up.
///
/// # Safety
/// `monitor` is NULL or a live monitor handle.
#[no_mangle]
pub unsafe extern "C" fn userptr_monitor_sync(
    monitor: *const UserptrMonitor,
    timeout_ms: u32,
) -> UserptrCode {
    guard(|| {
        // SAFETY: the caller's promise on `monitor`.
        let m = unsafe { arg(monitor, "monitor") }?;
        m.monitor.sync(Duration::from_millis(timeout_ms.into()))
    })
}

/// Stop a monitor and free its handle (NULL: nothing). A seccomp filter cannot be
/// removed: it stays, passing calls through.
///
/// # Safety
/// `monitor` is NULL or a handle from `userptr_monitor_install`, not stopped before,
/// and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn userptr_monitor_stop(monitor: *mut UserptrMonitor) {
    guard(|| {
        // SAFETY: the caller's promise.
        unsafe { close_handle(monitor) };
        Ok(())
    });
}
