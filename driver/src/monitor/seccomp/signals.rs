//! SIGSYS is never blocked, by any means: the calls through which a thread's signal
//! mask changes, emulated or sanitised.
//!
//! A seccomp trap raised while SIGSYS is blocked makes the kernel reset SIGSYS to its
//! default action and kill the process (`force_sig_info_to_task`). So every way a
//! thread's mask can come to include SIGSYS is closed:
//! * `rt_sigprocmask` (and i386 `rt_sigprocmask`, `sigprocmask`, `ssetmask`): emulated
//!   on the interrupted context's saved mask, which `rt_sigreturn` then installs (the
//!   call cannot be performed from the handler: returning from the handler restores the
//!   saved mask and would undo it). Errors come in the kernel's order (size, then the
//!   set's address, then `how`, then the old set's address, after the new mask applies).
//! * `rt_sigaction` (and i386 `rt_sigaction`, `sigaction`, `signal`): SIGSYS is
//!   stripped from the handler's mask before the call; a handler, `SIG_DFL` or `SIG_IGN`
//!   for SIGSYS itself is refused with `EINVAL`. Handlers installed before the monitor
//!   get the same treatment once, at install ([`sweep_handler_masks`]).
//! * `rt_sigreturn` (and i386 `rt_sigreturn`, `sigreturn`): a handler may have written
//!   SIGSYS into the saved mask of its frame. The frame's mask is cleaned, and the call
//!   is sent to the driver's sigreturn gate: the handler returns with the interrupted
//!   context's instruction pointer at the gate, which performs `rt_sigreturn` on the
//!   application's frame. The monitor's own handler returns through the same gate (its
//!   restorer), so its own `rt_sigreturn` is never trapped.
//! * calls that install a mask for their duration (`rt_sigsuspend`, `ppoll`,
//!   `pselect6`, `epoll_pwait`, `epoll_pwait2`, `io_uring_enter`; i386 `sigsuspend` and
//!   the `_time64` variants): performed with a copy of the mask without SIGSYS. A
//!   signal arriving meanwhile runs its handler under that mask, so one that makes a
//!   trapped call is not killed. `io_uring_enter` with `IORING_ENTER_EXT_ARG_REG` takes
//!   its mask from a registered region the handler cannot redirect: refused (`EINVAL`).
//!
//! The application's pointers are read and written through [`super::user_memory`]: a bad
//! one gives `EFAULT` as the kernel would. i386 copies live in the scratch page below
//! 4 GiB (a 32-bit pointer cannot reach the handler's stack).

use super::abi::{Abi, Op};
use super::user_memory::{self, LowCell};
use crate::trampoline;

/// SIGSYS in a signal set's first word.
pub(super) const SIGSYS_BIT: u64 = 1 << (libc::SIGSYS - 1);
/// What no mask may hold: SIGSYS, and the two signals the kernel never blocks.
const UNBLOCKABLE: u64 = SIGSYS_BIT | 1 << (libc::SIGKILL - 1) | 1 << (libc::SIGSTOP - 1);
const SA_RESTORER: u64 = 0x0400_0000;
const EINVAL: i64 = -(libc::EINVAL as i64);
const EFAULT: i64 = -(libc::EFAULT as i64);
const ENOMEM: i64 = -(libc::ENOMEM as i64);
/// `offsetof(struct ucontext, uc_sigmask)` on x86_64, the kernel's and libc's alike.
const UC_SIGMASK: u64 = 296;
const _: () = assert!(std::mem::offset_of!(libc::ucontext_t, uc_sigmask) == UC_SIGMASK as usize);
/// The saved mask of an i386 `rt_sigreturn` frame, from the stack pointer at the call
/// (`frame = sp - 4`, then `pretcode, sig, pinfo, puc`, a 128-byte compat siginfo, and
/// the ucontext whose mask sits after flags, link, a 12-byte stack and an 88-byte
/// `sigcontext_32`).
const I386_RT_SIGMASK: u64 = 248;
/// The saved mask's first word of an i386 `sigreturn` frame (`frame = sp - 8`:
/// `pretcode, sig`, then `sigcontext_32`, whose `oldmask` is at 80).
const I386_SIGMASK: u64 = 80;

fn perform(abi: Abi, nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: the application's own call (or its sanitised equivalent, pointing at our
    // copies), with its own effects.
    unsafe {
        match abi {
            Abi::X86_64 => trampoline::syscall(nr, a),
            Abi::I386 => trampoline::syscall_i386(nr, a),
        }
    }
}

/// Emulate a mask call on the interrupted context's `saved` mask. Returns the value for
/// the caller's `rax`.
pub(super) fn sigprocmask(op: Op, a: [u64; 6], saved: &mut u64) -> i64 {
    let cur = *saved;
    match op {
        Op::RtSigprocmask => {
            let (how, set, oset) = (a[0] as i32, a[1], a[2]);
            if a[3] != 8 {
                return EINVAL;
            }
            if set != 0 {
                let Some(v) = user_memory::read_u64(set) else {
                    return EFAULT;
                };
                *saved = match how {
                    libc::SIG_BLOCK => cur | v,
                    libc::SIG_UNBLOCK => cur & !v,
                    libc::SIG_SETMASK => v,
                    _ => return EINVAL,
                } & !UNBLOCKABLE;
            }
            if oset != 0 && !user_memory::write(oset, &cur.to_le_bytes()) {
                return EFAULT;
            }
            0
        }
        Op::Sigprocmask => {
            // i386 sigprocmask: 32-bit old-style sets, the first 32 signals.
            let (how, set, oset) = (a[0] as i32, a[1], a[2]);
            if set != 0 {
                let Some(v) = user_memory::read_u32(set) else {
                    return EFAULT;
                };
                let v = v as u64;
                *saved = match how {
                    libc::SIG_BLOCK => cur | v,
                    libc::SIG_UNBLOCK => cur & !v,
                    libc::SIG_SETMASK => (cur & !0xffff_ffff) | v,
                    _ => return EINVAL,
                } & !UNBLOCKABLE;
            }
            if oset != 0 && !user_memory::write(oset, &(cur as u32).to_le_bytes()) {
                return EFAULT;
            }
            0
        }
        Op::Ssetmask => {
            // i386 ssetmask(new): the whole mask becomes `new` (first 32 signals);
            // returns the old first word.
            *saved = (a[0] as u32 as u64) & !UNBLOCKABLE;
            cur as u32 as i32 as i64
        }
        _ => EINVAL,
    }
}

/// `rt_sigaction`, `sigaction` and `signal` with SIGSYS kept out of every handler's
/// mask, and SIGSYS itself left to the monitor.
pub(super) fn sigaction(abi: Abi, op: Op, nr: i64, a: [u64; 6], ours: u64) -> i64 {
    let sig = a[0] as i32;
    match (abi, op) {
        (Abi::X86_64, Op::RtSigaction) => {
            // (sig, act, oact, sigsetsize); struct { handler, flags, restorer, mask }.
            if a[3] != 8 || a[1] == 0 {
                return perform(abi, nr, a);
            }
            let mut raw = [0u8; 32];
            if !user_memory::read(a[1], &mut raw) {
                return EFAULT;
            }
            let word = |i: usize| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().unwrap());
            let (handler, mut k) = (word(0), [word(0), word(1), word(2), word(3)]);
            if sig == libc::SIGSYS {
                if handler != ours {
                    return EINVAL;
                }
                // Our handler, whoever installs it: with our flags and restorer.
                k = our_sigaction(ours);
            }
            k[3] &= !SIGSYS_BIT;
            perform(abi, nr, [a[0], k.as_ptr() as u64, a[2], a[3], 0, 0])
        }
        (Abi::I386, Op::RtSigaction) => {
            // compat: { u32 handler, u32 flags, u32 restorer, u64 mask }.
            if a[3] != 8 || a[1] == 0 {
                return perform(abi, nr, a);
            }
            if sig == libc::SIGSYS {
                return EINVAL;
            }
            let mut raw = [0u8; 20];
            if !user_memory::read(a[1], &mut raw) {
                return EFAULT;
            }
            let mask = u64::from_le_bytes(raw[12..20].try_into().unwrap()) & !SIGSYS_BIT;
            raw[12..20].copy_from_slice(&mask.to_le_bytes());
            let Some(cell) = LowCell::claim() else {
                return ENOMEM;
            };
            perform(abi, nr, [a[0], cell.put(&raw), a[2], a[3], 0, 0])
        }
        (Abi::I386, Op::Sigaction) => {
            // old compat: { u32 handler, u32 mask, u32 flags, u32 restorer }.
            if a[1] == 0 {
                return perform(abi, nr, a);
            }
            if sig == libc::SIGSYS {
                return EINVAL;
            }
            let mut raw = [0u8; 16];
            if !user_memory::read(a[1], &mut raw) {
                return EFAULT;
            }
            let mask = u32::from_le_bytes(raw[4..8].try_into().unwrap()) & !(SIGSYS_BIT as u32);
            raw[4..8].copy_from_slice(&mask.to_le_bytes());
            let Some(cell) = LowCell::claim() else {
                return ENOMEM;
            };
            perform(abi, nr, [a[0], cell.put(&raw), a[2], 0, 0, 0])
        }
        (Abi::I386, Op::Signal) if sig == libc::SIGSYS => EINVAL,
        _ => perform(abi, nr, a),
    }
}

/// The monitor's own SIGSYS disposition: its handler, `SA_NODEFER` (a trapped call made
/// by a handler that interrupted ours is handled too), returning through the sigreturn
/// gate, blocking nothing.
pub(super) fn our_sigaction(handler: u64) -> [u64; 4] {
    let flags = (libc::SA_SIGINFO | libc::SA_NODEFER) as u64 | SA_RESTORER;
    [handler, flags, trampoline::sigreturn_gate(), 0]
}

/// Install the monitor's SIGSYS disposition (through the driver's syscall site, so that
/// libc does not substitute its own restorer). Returns 0 or -errno.
pub(super) fn install_handler(handler: u64) -> i64 {
    let k = our_sigaction(handler);
    // SAFETY: rt_sigaction for SIGSYS with a complete kernel sigaction on our stack.
    unsafe {
        trampoline::syscall(
            libc::SYS_rt_sigaction,
            [libc::SIGSYS as u64, k.as_ptr() as u64, 0, 8, 0, 0],
        )
    }
}

/// Clean the frame of a trapped `rt_sigreturn` / `sigreturn` (the application's, at
/// `sp`) and return the gate the interrupted context must continue at.
pub(super) fn sigreturn(abi: Abi, op: Op, sp: u64) -> u64 {
    let (at, width, gate) = match (abi, op) {
        (Abi::X86_64, _) => (sp + UC_SIGMASK, 8, trampoline::sigreturn_gate()),
        (Abi::I386, Op::RtSigreturn) => (
            sp.wrapping_add(I386_RT_SIGMASK),
            8,
            trampoline::i386_sigreturn_gates()[0].0,
        ),
        (Abi::I386, _) => (
            sp.wrapping_add(I386_SIGMASK),
            4,
            trampoline::i386_sigreturn_gates()[1].0,
        ),
    };
    let mut b = [0u8; 8];
    if user_memory::read(at, &mut b[..width]) {
        let m = u64::from_le_bytes(b);
        if m & SIGSYS_BIT != 0 {
            let clean = (m & !SIGSYS_BIT).to_le_bytes();
            // A frame we cannot write is one the kernel cannot read either: the
            // sigreturn then fails as it would have (SIGSEGV), not our concern.
            let _ = user_memory::write(at, &clean[..width]);
        }
    }
    gate
}

/// A call that installs a mask for its duration, performed with SIGSYS taken out of
/// that mask.
pub(super) fn masked_wait(abi: Abi, op: Op, nr: i64, a: [u64; 6]) -> i64 {
    // Where the set's pointer and size are: (pointer argument, size argument).
    let (ptr_arg, size) = match op {
        Op::RtSigsuspend => (0, a[1]),
        Op::Sigsuspend => {
            // i386 sigsuspend(unused, unused, mask): the mask by value.
            let mut b = a;
            b[2] = (a[2] as u32 & !(SIGSYS_BIT as u32)) as u64;
            return perform(abi, nr, b);
        }
        Op::Ppoll => (3, a[4]),
        Op::EpollPwait | Op::EpollPwait2 => (4, a[5]),
        Op::Pselect6 => return pselect6(abi, nr, a),
        Op::IoUringEnter => return io_uring_enter(abi, nr, a),
        _ => return perform(abi, nr, a),
    };
    let set = a[ptr_arg];
    if set == 0 || size != 8 {
        return perform(abi, nr, a); // no mask, or the kernel refuses the size
    }
    let Some(v) = user_memory::read_u64(set) else {
        return EFAULT;
    };
    let clean = (v & !SIGSYS_BIT).to_le_bytes();
    let mut b = a;
    match abi {
        Abi::X86_64 => {
            b[ptr_arg] = clean.as_ptr() as u64;
            perform(abi, nr, b)
        }
        Abi::I386 => {
            let Some(cell) = LowCell::claim() else {
                return ENOMEM;
            };
            b[ptr_arg] = cell.put(&clean);
            perform(abi, nr, b)
        }
    }
}

/// `pselect6(n, in, out, ex, tsp, sig)`: `sig` points at `{ sigset pointer, size }`.
fn pselect6(abi: Abi, nr: i64, a: [u64; 6]) -> i64 {
    if a[5] == 0 {
        return perform(abi, nr, a);
    }
    let word = if abi == Abi::X86_64 { 8 } else { 4 };
    let mut s = [0u8; 16];
    if !user_memory::read(a[5], &mut s[..2 * word]) {
        return EFAULT;
    }
    let field = |i: usize| {
        let mut w = [0u8; 8];
        w[..word].copy_from_slice(&s[i * word..(i + 1) * word]);
        u64::from_le_bytes(w)
    };
    let (set, len) = (field(0), field(1));
    if set == 0 || len != 8 {
        return perform(abi, nr, a);
    }
    let Some(v) = user_memory::read_u64(set) else {
        return EFAULT;
    };
    let clean = (v & !SIGSYS_BIT).to_le_bytes();
    let mut b = a;
    match abi {
        Abi::X86_64 => {
            let arg = [clean.as_ptr() as u64, 8u64];
            b[5] = arg.as_ptr() as u64;
            perform(abi, nr, b)
        }
        Abi::I386 => {
            let Some(cell) = LowCell::claim() else {
                return ENOMEM;
            };
            let mut buf = [0u8; 16];
            buf[8..].copy_from_slice(&clean);
            let base = cell.addr();
            buf[0..4].copy_from_slice(&((base + 8) as u32).to_le_bytes());
            buf[4..8].copy_from_slice(&8u32.to_le_bytes());
            b[5] = cell.put(&buf);
            perform(abi, nr, b)
        }
    }
}

const IORING_ENTER_EXT_ARG: u64 = 1 << 3;
const IORING_ENTER_EXT_ARG_REG: u64 = 1 << 6;

/// `io_uring_enter(fd, to_submit, min_complete, flags, argp, argsz)`: `argp` is the
/// set (or, with `EXT_ARG`, a `struct io_uring_getevents_arg` holding its pointer).
fn io_uring_enter(abi: Abi, nr: i64, a: [u64; 6]) -> i64 {
    let (flags, argp, argsz) = (a[3], a[4], a[5]);
    if argp == 0 || abi == Abi::I386 {
        return perform(abi, nr, a);
    }
    if flags & IORING_ENTER_EXT_ARG_REG != 0 {
        return EINVAL;
    }
    if flags & IORING_ENTER_EXT_ARG == 0 {
        if argsz != 8 {
            return perform(abi, nr, a);
        }
        let Some(v) = user_memory::read_u64(argp) else {
            return EFAULT;
        };
        let clean = (v & !SIGSYS_BIT).to_le_bytes();
        return perform(abi, nr, [a[0], a[1], a[2], a[3], clean.as_ptr() as u64, 8]);
    }
    // struct io_uring_getevents_arg { u64 sigmask; u32 sigmask_sz; u32 min_wait_usec;
    // u64 ts; }
    if argsz != 24 {
        return perform(abi, nr, a);
    }
    let mut g = [0u8; 24];
    if !user_memory::read(argp, &mut g) {
        return EFAULT;
    }
    let set = u64::from_le_bytes(g[0..8].try_into().unwrap());
    let len = u32::from_le_bytes(g[8..12].try_into().unwrap());
    if set == 0 || len != 8 {
        return perform(abi, nr, a);
    }
    let Some(v) = user_memory::read_u64(set) else {
        return EFAULT;
    };
    let clean = (v & !SIGSYS_BIT).to_le_bytes();
    g[0..8].copy_from_slice(&(clean.as_ptr() as u64).to_le_bytes());
    perform(abi, nr, [a[0], a[1], a[2], a[3], g.as_ptr() as u64, 24])
}

/// At install: take SIGSYS out of the masks of the handlers installed before the
/// monitor (a trapped call in such a handler would otherwise be fatal). Runs after the
/// filter is in, so a concurrent `sigaction` is sanitised by the handler.
pub(super) fn sweep_handler_masks() {
    for sig in 1..=64u64 {
        if [libc::SIGKILL, libc::SIGSTOP, libc::SIGSYS].contains(&(sig as i32)) {
            continue;
        }
        let mut old = [0u64; 4];
        // SAFETY: a query into a local kernel sigaction.
        let r = unsafe {
            trampoline::syscall(
                libc::SYS_rt_sigaction,
                [sig, 0, old.as_mut_ptr() as u64, 8, 0, 0],
            )
        };
        if r != 0 || old[3] & SIGSYS_BIT == 0 {
            continue;
        }
        old[3] &= !SIGSYS_BIT;
        // SAFETY: re-installs the same disposition with SIGSYS out of its mask.
        unsafe {
            trampoline::syscall(
                libc::SYS_rt_sigaction,
                [sig, old.as_ptr() as u64, 0, 8, 0, 0],
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigprocmask_emulation_follows_the_kernel() {
        let set: u64 = SIGSYS_BIT | 1 << (libc::SIGUSR1 - 1);
        let mut old = 0u64;
        let mut saved = 0u64;
        let a = |how: i32, set: &u64, old: &mut u64| {
            [
                how as u64,
                set as *const u64 as u64,
                old as *mut u64 as u64,
                8,
                0,
                0,
            ]
        };
        assert_eq!(
            sigprocmask(
                Op::RtSigprocmask,
                a(libc::SIG_BLOCK, &set, &mut old),
                &mut saved
            ),
            0
        );
        assert_eq!(saved, 1 << (libc::SIGUSR1 - 1), "SIGSYS stays unblocked");
        // The kernel's order: size first, then the set's address, then `how`.
        let mut bad = a(libc::SIG_BLOCK, &set, &mut old);
        bad[3] = 7;
        assert_eq!(sigprocmask(Op::RtSigprocmask, bad, &mut saved), EINVAL);
        let mut bad = a(99, &set, &mut old);
        bad[1] = 8;
        assert_eq!(sigprocmask(Op::RtSigprocmask, bad, &mut saved), EFAULT);
        assert_eq!(
            sigprocmask(Op::RtSigprocmask, a(99, &set, &mut old), &mut saved),
            EINVAL
        );
        // A bad old-set address: the new mask applies, then EFAULT.
        let mut bad = a(libc::SIG_SETMASK, &0, &mut old);
        bad[2] = 16;
        assert_eq!(sigprocmask(Op::RtSigprocmask, bad, &mut saved), EFAULT);
        assert_eq!(saved, 0);
        assert_eq!(
            sigprocmask(Op::Ssetmask, [u64::MAX, 0, 0, 0, 0, 0], &mut saved),
            0
        );
        assert_eq!(saved & SIGSYS_BIT, 0);
    }
}
