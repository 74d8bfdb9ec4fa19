//! Fork policy, and the one `pthread_atfork` handler that implements it.
//!
//! * The child gets **no device mappings and no device**: the reference device's
//!   engine thread does not exist in the child, and its io_uring instance (like a VFIO
//!   container fd) is *shared* with the parent through the inherited file descriptor,
//!   so a map or unmap from the child would change the parent's device. After fork,
//!   every driver entry point in the child fails with [`crate::Error::ForkedChild`] and
//!   teardown in the child releases nothing (the parent owns the pins).
//! * The parent keeps its mappings: since Linux 5.8 the kernel copies pinned anonymous
//!   pages for the child at fork (`page_needs_cow_for_dma`), so the parent's pages stay
//!   the ones the device reaches. A `Fork` invalidation cause therefore costs the parent
//!   nothing.
//! * No `MADV_DONTFORK` by default: applied per registration it splits VMAs until
//!   `vm.max_map_count` runs out.
//! * The handler takes no lock (a forking thread may hold any of ours): the `child`
//!   hook only stores to an atomic, which is async-signal-safe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

static FORKED_CHILD: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

extern "C" fn in_child() {
    // Relaxed: the child is single-threaded at this point; later reads are in program
    // order on this same thread or on threads it spawns (which synchronise with it).
    FORKED_CHILD.store(true, Ordering::Relaxed);
}

/// Install the atfork handler (once per process). Every domain constructor (the
/// reference device's io_uring domain, VFIO's `VfioDomain::new`) and `Registry::new`
/// call it, so [`in_forked_child`] holds whatever domain the driver runs on.
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: registers a plain extern "C" function with no captured state; it only
        // stores to a static atomic, which is async-signal-safe and lock-free.
        let r = unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        if r != 0 {
            tracing::warn!("pthread_atfork failed ({r}): fork children are not fenced off");
        }
    });
}

/// Whether this process is a fork child of a process that used the driver.
pub fn in_forked_child() -> bool {
    FORKED_CHILD.load(Ordering::Relaxed)
}
