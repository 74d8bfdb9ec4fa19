//! The LD_PRELOAD source: connects the `userptr-preload` shim (a `cdylib` that
//! interposes libc's entry points that change mappings: `munmap`, `mmap`/`mmap64`
//! (`MAP_FIXED`), `mremap`, `madvise`, `posix_madvise`, `process_madvise`, `mprotect`,
//! `pkey_mprotect`, `brk`, `sbrk`/`__sbrk`, `shmat` (`SHM_REMAP`), `shmdt`,
//! `remap_file_pages`) to the registry.
//!
//! For processes that cannot install a seccomp filter. The shim exports
//! `userptr_preload_install(const Hooks*)`; this module finds it with
//! `dlsym(RTLD_DEFAULT)`, asks it for its hook ABI (the call with null installs
//! nothing and returns the version), refuses any other version than
//! [`SHIM_ABI`] with [`Error::MonitorUnavailable`], and installs hooks that call
//! `invalidate_start` before the real function and `invalidate_end` after it.
//!
//! **Fail safe.** The shim classifies nothing: every `madvise`, `posix_madvise` and
//! `process_madvise` reaches the hooks with its advice, and this module decides with
//! [`crate::monitor::advice::is_destructive`], the classification every monitor uses
//! (harmless advice returns before the registry is touched; everything else, advice a
//! newer kernel added included, invalidates). A kind this module does not know is
//! taken as an unmap. The hooks may be called from any thread at any time, before,
//! during and after [`PreloadMonitor::install`] and its drop: a gate (below) turns
//! calls away once the monitor stops, and keeps the registry alive while one is in.
//!
//! **What it cannot see**, by construction (the reason seccomp is the default source),
//! each a way the pages behind a registered range change unmonitored:
//! * glibc-internal calls: `free()` → `munmap`, `realloc()` → `mremap`, malloc's heap
//!   trimming (`brk`, `madvise`), thread stacks at thread exit, `dlclose()`;
//! * raw `syscall(SYS_munmap, …)` and any other call through `syscall()`;
//! * statically linked code (a static binary, or a library with its own copy of the
//!   wrappers): it never binds to the shim;
//! * inline `syscall` instructions (assembly, JITs, runtimes that skip libc such as
//!   Go's);
//! * io_uring (`IORING_OP_MADVISE` and friends): the kernel does the work;
//! * 32-bit `int 0x80` calls: they never pass through a 64-bit libc;
//! * `CLONE_VM` children (raw `clone`, `vfork`) that call the kernel directly;
//! * anything bound before or around the shim: a shim `dlopen`ed late, a library
//!   loaded with `RTLD_DEEPBIND` (it binds to libc first), `dlsym` on libc's handle;
//! * the file behind a shared mapping shrinking or losing pages (`ftruncate`,
//!   `fallocate(PUNCH_HOLE)`, by this process or another): no address-space call;
//! * every call made before `install` returned, or after the monitor dropped.
//!
//! The coverage matrix in the README shows the consequences.

use crate::error::{Error, Result};
use crate::monitor::advice;
use crate::registry::{Cause, Invalidation, Registry};
use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The shim's hook ABI this module speaks: `userptr_preload_install` must return it
/// (ABI 1, whose shim classified advice itself, is refused).
pub const SHIM_ABI: i32 = 2;

// The kinds the shim passes (its `KIND_*`; kind 1, ABI 1's destructive advice, is
// retired).
const KIND_UNMAP: u32 = 0;
const KIND_REMAP: u32 = 2;
const KIND_PROTECT: u32 = 3;
const KIND_ADVISE: u32 = 4;

/// One preload monitor per process: the shim holds one set of hooks.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// What the hooks reach through `ctx`. The gate itself is leaked (a few bytes: a call
/// that loaded the hooks just before the uninstall may still come in), but the
/// registry handle it holds is released once no hook uses it.
struct Gate {
    active: AtomicBool,
    /// Hook calls between their check of `active` and their last use of `registry`,
    /// plus invalidations between `on_start` and `on_end`.
    users: AtomicU32,
    registry: std::cell::UnsafeCell<Option<Registry>>,
}

// SAFETY: `registry` is taken only by `PreloadMonitor::drop`, after `active` is
// cleared and `users` drained (the handshake below); everything else is atomics.
unsafe impl Sync for Gate {}

impl Gate {
    /// Enter: `None` if the monitor is stopping. SeqCst on both sides: a Dekker
    /// handshake with `drop` (clear `active`, then read `users`): either drop sees
    /// this call counted and waits, or this call sees `active` cleared and leaves.
    fn enter(&self) -> Option<&Registry> {
        self.users.fetch_add(1, Ordering::SeqCst);
        if !self.active.load(Ordering::SeqCst) {
            self.leave();
            return None;
        }
        // SAFETY: counted in `users` while `active`: drop has not taken it.
        unsafe { (*self.registry.get()).as_ref() }
    }

    fn leave(&self) {
        // Release: our uses of the registry happen before drop sees the count fall.
        self.users.fetch_sub(1, Ordering::Release);
    }
}

#[repr(C)]
struct Hooks {
    ctx: *mut c_void,
    start: extern "C" fn(*mut c_void, u64, u64, u32, u64) -> u64,
    end: extern "C" fn(*mut c_void, u64),
}

/// The cause a reported call stands for; `None`: nothing to invalidate.
fn cause(kind: u32, arg: u64) -> Option<Cause> {
    Some(match kind {
        KIND_ADVISE if !advice::is_destructive(arg as i32) => return None,
        KIND_ADVISE => Cause::Discard,
        KIND_REMAP => Cause::Remap { to: arg },
        KIND_PROTECT => Cause::Protect {
            new_prot: arg as i32,
        },
        KIND_UNMAP => Cause::Unmap,
        // A kind this module does not know: the pages may go (fail safe).
        _ => Cause::Unmap,
    })
}

extern "C" fn on_start(ctx: *mut c_void, start: u64, end: u64, kind: u32, arg: u64) -> u64 {
    if crate::driver_section::in_driver() {
        return 0; // the driver's own calls pass through
    }
    // Harmless advice costs no invalidation (and no look at the registry).
    let Some(cause) = cause(kind, arg) else {
        return 0;
    };
    // SAFETY: ctx is the Gate leaked by `PreloadMonitor::install`, never freed.
    let gate = unsafe { &*(ctx as *const Gate) };
    let Some(reg) = gate.enter() else { return 0 };
    if !reg.may_overlap(&(start..end)) {
        gate.leave();
        return 0;
    }
    // A token keeps the call counted until `on_end`.
    match reg.invalidate_start(start..end, cause) {
        Ok(inv) => Box::into_raw(Box::new(inv)) as u64,
        Err(e) => {
            tracing::error!("preload monitor: invalidation failed: {e}");
            gate.leave();
            0
        }
    }
}

extern "C" fn on_end(ctx: *mut c_void, token: u64) {
    // SAFETY: as in on_start.
    let gate = unsafe { &*(ctx as *const Gate) };
    // SAFETY: the token is the Box made in on_start, ended exactly once; its call is
    // still counted in `users`, so the registry is there.
    let inv = unsafe { Box::from_raw(token as *mut Invalidation) };
    // SAFETY: see above.
    if let Some(reg) = unsafe { (*gate.registry.get()).as_ref() } {
        reg.invalidate_end(*inv);
    }
    gate.leave();
}

type InstallFn = unsafe extern "C" fn(*const Hooks) -> i32;

/// Accept the shim's hook ABI `found`, or say why not.
fn check_abi(found: i32) -> Result<()> {
    if found == SHIM_ABI {
        return Ok(());
    }
    let what = if found < SHIM_ABI {
        "an older shim: it decides itself which madvise advice is destructive, and \
         misses some of the libc entry points that change mappings"
    } else {
        "a newer shim than this driver"
    };
    Err(Error::MonitorUnavailable {
        monitor: "preload",
        reason: format!(
            "the preloaded libuserptr_preload.so speaks hook ABI {found}, this driver \
             ABI {SHIM_ABI} ({what}): preload the shim built from the same source \
             (`cargo build -p userptr-preload`)"
        ),
    })
}

/// The installed preload source.
pub struct PreloadMonitor {
    install: InstallFn,
    gate: &'static Gate,
}

impl PreloadMonitor {
    /// Connect the shim (which must have been loaded with `LD_PRELOAD`) to `registry`.
    ///
    /// Refused with [`Error::MonitorUnavailable`] when the shim is not loaded or speaks
    /// another hook ABI than [`SHIM_ABI`], and with [`Error::MonitorConflict`] while
    /// another preload monitor is installed in the process.
    pub fn install(registry: &Registry) -> Result<PreloadMonitor> {
        // SAFETY: looking up a symbol by a NUL-terminated name.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"userptr_preload_install".as_ptr()) };
        if sym.is_null() {
            return Err(Error::MonitorUnavailable {
                monitor: "preload",
                reason: "the shim is not loaded: run the program with \
                         LD_PRELOAD=/path/to/libuserptr_preload.so"
                    .into(),
            });
        }
        // SAFETY: the shim's exported function has exactly this signature (every ABI).
        let install: InstallFn = unsafe { std::mem::transmute::<*mut c_void, InstallFn>(sym) };
        // AcqRel: the previous monitor's uninstall happens before this install.
        if INSTALLED.swap(true, Ordering::AcqRel) {
            return Err(Error::MonitorConflict {
                what: "a preload monitor is already installed in this process \
                       (the shim holds one set of hooks)",
            });
        }
        // SAFETY: null installs nothing (no monitor is installed: INSTALLED) and
        // returns the ABI version, in every ABI.
        let abi = unsafe { install(std::ptr::null()) };
        if let Err(e) = check_abi(abi) {
            // Release: pairs with the AcqRel swap of the next install.
            INSTALLED.store(false, Ordering::Release);
            return Err(e);
        }
        let gate: &'static Gate = Box::leak(Box::new(Gate {
            active: AtomicBool::new(true),
            users: AtomicU32::new(0),
            registry: std::cell::UnsafeCell::new(Some(registry.clone())),
        }));
        let hooks: &'static Hooks = Box::leak(Box::new(Hooks {
            ctx: gate as *const Gate as *mut c_void,
            start: on_start,
            end: on_end,
        }));
        // Application signal handlers must not run inside driver code (their calls
        // would pass through as the driver's).
        crate::driver_section::set_defer_signals(true);
        // SAFETY: `hooks` is leaked: valid for the rest of the process.
        unsafe { install(hooks) };
        Ok(PreloadMonitor { install, gate })
    }

    /// Disconnect the shim.
    pub fn stop(self) {}
}

impl Drop for PreloadMonitor {
    fn drop(&mut self) {
        // SAFETY: uninstall first, so that no new call reads the hooks. A call that
        // loaded them just before still reaches the (leaked) gate, which turns it away.
        unsafe { (self.install)(std::ptr::null()) };
        // SeqCst: the handshake with Gate::enter.
        self.gate.active.store(false, Ordering::SeqCst);
        while self.gate.users.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
        // SAFETY: inactive and no user left: nothing reads the registry any more.
        // Dropping our handle releases the registry (and its pins) once the
        // application drops its own.
        let reg = unsafe { (*self.gate.registry.get()).take() };
        drop(reg);
        crate::driver_section::set_defer_signals(false);
        // Release: this monitor's uninstall happens before the next install.
        INSTALLED.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_abi_is_accepted() {
        assert!(check_abi(SHIM_ABI).is_ok());
        for old in [0, 1, SHIM_ABI - 1] {
            match check_abi(old) {
                Err(Error::MonitorUnavailable { monitor, reason }) => {
                    assert_eq!(monitor, "preload");
                    assert!(reason.contains(&format!("ABI {old}")), "{reason}");
                    assert!(reason.contains("older shim"), "{reason}");
                }
                r => panic!("ABI {old} accepted: {r:?}"),
            }
        }
        assert!(check_abi(SHIM_ABI + 1).is_err());
        assert!(check_abi(-1).is_err());
    }

    #[test]
    fn advice_is_classified_here_fail_safe() {
        // Harmless advice: no cause, so no invalidation.
        for (a, name) in advice::HARMLESS {
            assert_eq!(cause(KIND_ADVISE, *a as i64 as u64), None, "{name}");
        }
        // Destructive, unknown and future advice: a discard.
        for a in [
            libc::MADV_DONTNEED,
            libc::MADV_FREE,
            24,
            102,
            103,
            26,
            77,
            -1,
            i32::MAX,
        ] {
            assert_eq!(
                cause(KIND_ADVISE, a as i64 as u64),
                Some(Cause::Discard),
                "{a}"
            );
        }
        assert_eq!(cause(KIND_UNMAP, 0), Some(Cause::Unmap));
        assert_eq!(cause(KIND_REMAP, 7), Some(Cause::Remap { to: 7 }));
        assert_eq!(
            cause(KIND_PROTECT, libc::PROT_READ as u64),
            Some(Cause::Protect {
                new_prot: libc::PROT_READ
            })
        );
        // ABI 1's kind and kinds of a newer shim: an unmap.
        for k in [1, 5, u32::MAX] {
            assert_eq!(cause(k, 0), Some(Cause::Unmap), "{k}");
        }
    }
}
