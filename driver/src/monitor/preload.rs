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
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

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

extern "C" fn on_start(ctx: *mut c_void, start: u64, end: u64, kind: u32, arg: u64) -> u64 {
    if crate::driver_section::in_driver() {
        return 0; // the driver's own calls pass through
    }
    // SAFETY: ctx is the Gate leaked by `PreloadMonitor::install`, never freed.
    let gate = unsafe { &*(ctx as *const Gate) };
    let Some(reg) = gate.enter() else { return 0 };
    let cause = match kind {
        1 => Cause::Discard,
        2 => Cause::Remap { to: arg },
        3 => Cause::Protect {
            new_prot: arg as i32,
        },
        _ => Cause::Unmap,
    };
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

/// The installed preload source.
pub struct PreloadMonitor {
    install: InstallFn,
    gate: &'static Gate,
}

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
    }
}
