//! Address-space monitors: every `munmap`, `madvise`, `mprotect`, `mremap`, ... must
//! reach the registry's `invalidate_start` / `invalidate_end` before it takes effect.
//!
//! Sources, all feeding [`crate::Registry::invalidate_start`] /
//! [`crate::Registry::invalidate_end`] with a [`crate::Cause`]:
//! * [`seccomp`]: a seccomp filter traps the calls (unless they come from the driver's
//!   own syscall trampoline) and a SIGSYS handler in the calling thread runs the
//!   invalidation before performing the call: a complete pre-notifier, for libc
//!   wrappers, glibc-internal calls and raw `syscall()` alike;
//! * [`uffd`]: userfaultfd non-cooperative events, a kernel-sourced second opinion
//!   (asynchronous: see its module doc for what it cannot guarantee);
//! * [`preload`]: an LD_PRELOAD shim interposing the libc wrappers, for processes that
//!   cannot install a filter (blind to glibc-internal and raw calls);
//! * explicit: the application calls the registry itself around its own changes.
//!
//! Re-entrancy: while a thread runs driver code ([`crate::driver_section`]), the calls
//! it makes (freeing its own buffers, say) pass through unmonitored: the driver never
//! changes memory the application registered, and monitoring its own calls while it
//! holds its locks would deadlock.

pub mod advice;
pub mod preload;
pub mod seccomp;
pub mod uffd;
