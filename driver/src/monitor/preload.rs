//! The LD_PRELOAD source: connects the `userptr-preload` shim (a `cdylib` that
//! interposes libc's `munmap`, `madvise`, `mprotect`, `mremap`, `mmap(MAP_FIXED)`,
//! `brk`, `sbrk` and `shmdt`) to the registry.
//!
//! For processes that cannot install a seccomp filter. It sees only calls that go
//! through libc's exported entry points: not glibc-internal calls (`free()` →
//! `munmap`, `realloc()` → `mremap`), not raw `syscall()`, not static code. The
//! coverage matrix in the README shows the consequences.
//!
//! The shim exports `userptr_preload_install(const Hooks*)`; this module finds it with
//! `dlsym(RTLD_DEFAULT)` and installs hooks that call `invalidate_start` before the
//! real function and `invalidate_end` after it.

use crate::error::{Error, Result};
use crate::registry::{Cause, Invalidation, Registry};
use std::ffi::c_void;

#[repr(C)]
struct Hooks {
    ctx: *mut c_void,
    start: extern "C" fn(*mut c_void, u64, u64, u32, u64) -> u64,
    end: extern "C" fn(*mut c_void, u64),
}

extern "C" fn on_start(ctx: *mut c_void, start: u64, end: u64, kind: u32, arg: u64) -> u64 {
    if super::in_driver() {
        return 0; // the driver's own calls pass through
    }
    // SAFETY: ctx is the Registry leaked by `PreloadMonitor::install`, never freed
    // while the hooks are installed.
    let reg = unsafe { &*(ctx as *const Registry) };
    let cause = match kind {
        1 => Cause::Discard,
        2 => Cause::Remap { to: arg },
        3 => Cause::Protect {
            new_prot: arg as i32,
        },
        _ => Cause::Unmap,
    };
    if !reg.may_overlap(&(start..end)) {
        return 0;
    }
    match reg.invalidate_start(start..end, cause) {
        Ok(inv) => Box::into_raw(Box::new(inv)) as u64,
        Err(e) => {
            tracing::error!("preload monitor: invalidation failed: {e}");
            0
        }
    }
}

extern "C" fn on_end(ctx: *mut c_void, token: u64) {
    // SAFETY: as in on_start.
    let reg = unsafe { &*(ctx as *const Registry) };
    // SAFETY: the token is the Box made in on_start, ended exactly once.
    let inv = unsafe { Box::from_raw(token as *mut Invalidation) };
    reg.invalidate_end(*inv);
}

type InstallFn = unsafe extern "C" fn(*const Hooks) -> i32;

/// The installed preload source.
pub struct PreloadMonitor {
    install: InstallFn,
    hooks: *mut Hooks,
}

// SAFETY: the hooks live until `stop`/drop; the raw pointers are only handed to the
// shim and freed after it let go of them.
unsafe impl Send for PreloadMonitor {}

impl PreloadMonitor {
    /// Connect the shim (which must have been loaded with `LD_PRELOAD`) to `registry`.
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
        // SAFETY: the shim's exported function has exactly this signature.
        let install: InstallFn = unsafe { std::mem::transmute::<*mut c_void, InstallFn>(sym) };
        let ctx = Box::into_raw(Box::new(registry.clone())) as *mut c_void;
        let hooks = Box::into_raw(Box::new(Hooks {
            ctx,
            start: on_start,
            end: on_end,
        }));
        // SAFETY: `hooks` stays valid until we uninstall it in `Drop`.
        unsafe { install(hooks) };
        Ok(PreloadMonitor { install, hooks })
    }

    /// Disconnect the shim.
    pub fn stop(self) {}
}

impl Drop for PreloadMonitor {
    fn drop(&mut self) {
        // SAFETY: uninstall first, so the shim no longer reads the hooks. A call
        // already inside a hook still holds the registry through `ctx`, which is
        // therefore leaked rather than freed (one Registry handle per install).
        unsafe { (self.install)(std::ptr::null()) };
        // SAFETY: the Box made in `install`; the shim no longer refers to it... except a
        // racing call that loaded it before the uninstall: keep it alive (leak) too.
        let _ = self.hooks;
    }
}
