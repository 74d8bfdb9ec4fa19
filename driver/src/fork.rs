//! Fork policy, and how the driver recognises a fork child: by its address space.
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
//!
//! **Which tasks are a fork child.** Not the ones a `pthread_atfork` handler ran in: a
//! child made by a raw `syscall(SYS_fork)` or `clone` without `CLONE_VM` runs no
//! handler. Not the ones with another pid either: a `vfork` or `clone(CLONE_VM)` child
//! has its own pid but *shares* the parent's address space, so it can change the
//! parent's registered memory and must be monitored like a thread. The driver decides
//! by the address space itself: [`install`] maps one page with `MADV_WIPEONFORK` and
//! writes a token into it. The kernel hands every new address space made by copying
//! this one (any fork, whatever the syscall) a zero page there, and every task that
//! shares this address space sees the token. [`in_forked_child`] is one load: cheap on
//! every submission, and async-signal-safe (the seccomp monitor's handler asks it).

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Once;

/// The token page (null until [`install`] ran).
static TOKEN: AtomicPtr<u64> = AtomicPtr::new(std::ptr::null_mut());
static INSTALL: Once = Once::new();
/// What the page holds in the address space that made it (never 0).
const MAGIC: u64 = 0x7573_7270_7472_2d6d; // "usrptr-m"

/// Map the token page (once per process). Every domain constructor (the reference
/// device's io_uring domain, VFIO's `VfioDomain::new`), `Registry::new` and the
/// monitors call it, so [`in_forked_child`] holds whatever the driver runs on.
pub fn install() {
    INSTALL.call_once(|| {
        // SAFETY: a fresh private anonymous page of our own; nothing aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::error!(
                "mapping the fork token page failed ({}): fork children are not recognised",
                std::io::Error::last_os_error()
            );
            return;
        }
        // SAFETY: MADV_WIPEONFORK on the page just mapped (Linux 4.14+; io_uring,
        // which the driver needs, came later).
        let r = unsafe {
            libc::madvise(p, 4096, 18 /* MADV_WIPEONFORK */)
        };
        if r != 0 {
            tracing::error!(
                "MADV_WIPEONFORK failed ({}): fork children are not recognised",
                std::io::Error::last_os_error()
            );
            // SAFETY: unmapping the page just mapped, which nothing else uses.
            unsafe { libc::munmap(p, 4096) };
            return;
        }
        let token = p.cast::<u64>();
        // SAFETY: the page is ours, writable and aligned.
        unsafe { token.write_volatile(MAGIC) };
        // Release: a task that sees the pointer sees the token written.
        TOKEN.store(token, Ordering::Release);
    });
}

/// Whether this task runs in a fork child's address space (a copy of the one the
/// driver was set up in), however it was made. False in the original address space,
/// in every thread of it and in every task sharing it (`vfork`, `clone(CLONE_VM)`).
pub fn in_forked_child() -> bool {
    // Acquire: pairs with the Release in `install`.
    let t = TOKEN.load(Ordering::Acquire);
    if t.is_null() {
        return false;
    }
    // SAFETY: the page stays mapped for the life of the address space (never
    // unmapped), and in a fork child the copy of the mapping is there too, zeroed.
    unsafe { t.read_volatile() != MAGIC }
}
