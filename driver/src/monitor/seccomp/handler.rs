//! The SIGSYS handler: runs in the thread that made a trapped call, before the call.

use super::decode::{decode, page_range};
use super::exec_ranges::{add_exec_range, new_exec_range};
use super::worker::{start_invalidation, wake_worker, END, K_REMAP, K_UNMAP};
use super::{Shared, User, ACTIVE, INSTALL_PID};
use std::ffi::c_void;
use std::ops::Range;
use std::sync::atomic::Ordering;

/// Perform a trapped call (the application's own, with its own arguments) through the
/// driver's syscall site, which the filter lets through.
pub(super) fn raw_syscall(nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: every caller passes the arguments of a call the application itself made
    // (or a query with no effect), so it has exactly that call's effects.
    unsafe { crate::trampoline::syscall(nr, a) }
}

/// Handle one trapped call; returns the value for `rax`.
pub(super) fn handle(nr: i64, a: [u64; 6], saved_mask: &mut u64) -> i64 {
    if nr == libc::SYS_rt_sigprocmask || nr == libc::SYS_rt_sigaction {
        return keep_sigsys_unblocked(nr, a, saved_mask);
    }
    let shared = ACTIVE.load(Ordering::Acquire);
    if shared.is_null() || crate::fork::in_forked_child() {
        return raw_syscall(nr, a);
    }
    // SAFETY: ACTIVE points at a leaked Shared, never freed.
    let s = unsafe { &*shared };
    // SeqCst: a Dekker handshake with `shutdown` (store ACTIVE = null, then load
    // users): either it sees us counted and waits, or we see ACTIVE cleared and leave.
    s.users.fetch_add(1, Ordering::SeqCst);
    let _user = User(&s.users);
    if ACTIVE.load(Ordering::SeqCst) != shared {
        return raw_syscall(nr, a);
    }
    // Relaxed: statistics.
    s.counters.traps.fetch_add(1, Ordering::Relaxed);
    if crate::driver_section::in_driver() {
        s.counters.reentrant.fetch_add(1, Ordering::Relaxed);
        return raw_syscall(nr, a);
    }
    let Some((range, kind, arg)) = decode(nr, a) else {
        s.counters.passthrough.fetch_add(1, Ordering::Relaxed);
        return perform(s, nr, a);
    };
    // mremap with MREMAP_FIXED also unmaps whatever was at the destination.
    let dest = (nr == libc::SYS_mremap && kind == K_REMAP && arg != 0)
        .then(|| page_range(arg, a[2]))
        .flatten();
    let hit = |r: &Range<u64>| s.registry().may_overlap(r);
    let first = hit(&range).then_some((range, kind, arg));
    let second = dest.filter(hit).map(|d| (d, K_UNMAP, 0));
    if first.is_none() && second.is_none() {
        s.counters.passthrough.fetch_add(1, Ordering::Relaxed);
        return perform(s, nr, a);
    }
    // A child that has not yet run the atfork handler (or a vfork child) has no worker:
    // recognise it by its pid (getpid is not trapped). Only here, on the slow path.
    if raw_syscall(libc::SYS_getpid, [0; 6]) as i32 != INSTALL_PID.load(Ordering::Relaxed) {
        return raw_syscall(nr, a);
    }
    s.counters.invalidating.fetch_add(1, Ordering::Relaxed);
    let slots = [
        first.map(start_invalidation),
        second.map(start_invalidation),
    ];
    let r = perform(s, nr, a);
    for slot in slots.into_iter().flatten() {
        // Release: hand the slot back for invalidate_end.
        slot.state.store(END, Ordering::Release);
    }
    wake_worker();
    r
}

/// Make the trapped call; if it made a range executable (`dlopen`, a JIT), cover that
/// code with a filter of its own before the caller can run it.
pub(super) fn perform(s: &Shared, nr: i64, a: [u64; 6]) -> i64 {
    let r = raw_syscall(nr, a);
    if let Some(range) = new_exec_range(nr, a, r) {
        add_exec_range(s, range);
    }
    r
}

pub(super) const SIGSYS_BIT: u64 = 1 << (libc::SIGSYS - 1);

/// Emulate `rt_sigprocmask` / perform `rt_sigaction` with SIGSYS kept out of every
/// mask, and refuse a foreign SIGSYS handler.
///
/// `rt_sigprocmask` cannot simply be performed from the handler: returning from the
/// handler (`rt_sigreturn`) restores the mask saved when SIGSYS was delivered, which
/// would undo the call. So the new mask is computed here and written into the
/// interrupted context's saved mask, which `rt_sigreturn` then installs.
pub(super) fn keep_sigsys_unblocked(nr: i64, a: [u64; 6], saved_mask: &mut u64) -> i64 {
    if nr == libc::SYS_rt_sigprocmask {
        let (how, set, oldset) = (a[0] as i32, a[1] as *const u64, a[2] as *mut u64);
        if a[3] != 8 {
            return -(libc::EINVAL as i64);
        }
        let cur = *saved_mask;
        let new = if set.is_null() {
            cur
        } else {
            // SAFETY: the caller passed an 8-byte sigset at `set` (checked size), which
            // the kernel would read the same way.
            let v = unsafe { std::ptr::read_volatile(set) };
            match how {
                libc::SIG_BLOCK => cur | v,
                libc::SIG_UNBLOCK => cur & !v,
                libc::SIG_SETMASK => v,
                _ => return -(libc::EINVAL as i64),
            }
        };
        if !oldset.is_null() {
            // SAFETY: the caller passed an 8-byte sigset to receive the old mask.
            unsafe { std::ptr::write_volatile(oldset, cur) };
        }
        let unblockable = SIGSYS_BIT | 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);
        *saved_mask = new & !unblockable;
        return 0;
    }
    // rt_sigaction(sig, act, oact, sigsetsize); the kernel's struct on x86_64 is
    // { handler, flags, restorer, mask }.
    let (sig, act) = (a[0] as i32, a[1] as *const [u64; 4]);
    if act.is_null() {
        return raw_syscall(nr, a);
    }
    // SAFETY: the caller passed a kernel sigaction at `act`; read it as the kernel would.
    let mut k = unsafe { std::ptr::read_volatile(act) };
    if sig == libc::SIGSYS && k[0] != on_sigsys as *const () as u64 {
        return -(libc::EINVAL as i64);
    }
    k[3] &= !SIGSYS_BIT;
    raw_syscall(nr, [a[0], &k as *const [u64; 4] as u64, a[2], a[3], 0, 0])
}

pub(super) extern "C" fn on_sigsys(
    _sig: libc::c_int,
    _info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    // SAFETY: __errno_location returns this thread's errno; a handler must preserve it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let g = &uc.uc_mcontext.gregs;
    // After a seccomp trap the kernel rolls rax back to the syscall number.
    let nr = g[libc::REG_RAX as usize];
    let a = [
        g[libc::REG_RDI as usize] as u64,
        g[libc::REG_RSI as usize] as u64,
        g[libc::REG_RDX as usize] as u64,
        g[libc::REG_R10 as usize] as u64,
        g[libc::REG_R8 as usize] as u64,
        g[libc::REG_R9 as usize] as u64,
    ];
    // The mask rt_sigreturn will restore: its first word holds signals 1..=64.
    let mask = &mut uc.uc_sigmask as *mut libc::sigset_t as *mut u64;
    // SAFETY: sigset_t is at least 8 bytes and suitably aligned inside ucontext_t.
    let mut saved = unsafe { *mask };
    let r = handle(nr, a, &mut saved);
    // SAFETY: as above.
    unsafe { *mask = saved };
    uc.uc_mcontext.gregs[libc::REG_RAX as usize] = r;
    // SAFETY: restore errno (see above).
    unsafe { *libc::__errno_location() = errno };
}
