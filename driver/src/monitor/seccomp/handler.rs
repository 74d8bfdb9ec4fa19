//! The SIGSYS handler: runs in the thread that made a trapped call, before the call.
//!
//! What it does with a call, in order:
//! 1. a SIGSYS our filter did not raise (another filter's `TRAP` data): `ENOSYS`, since
//!    no other SIGSYS handler may exist;
//! 2. the signal-mask calls keep SIGSYS unblocked (`signals`), whatever the monitor's
//!    state: the filter outlives the monitor;
//! 3. unknown syscalls (newer than the table) and `personality` turning on
//!    `ADDR_NO_RANDOMIZE` or `READ_IMPLIES_EXEC` are refused;
//! 4. with the monitor stopped, in a fork child (its own address space: a copy, see
//!    [`crate::fork`]), or in a driver section (the driver's own call): the call is
//!    performed as it is;
//! 5. otherwise it is the application's: io_uring rings are restricted (`io_uring`), a
//!    call that could make code executable beyond the exec-range table is refused, and
//!    a call that changes a range which may be registered is bracketed by the worker's
//!    `invalidate_start` / `invalidate_end` (`worker`);
//! 6. whatever it performs, a range the call made executable gets a filter of its own.
//!
//! It never allocates and never takes a lock: it may have interrupted `malloc`.

use super::abi::{self, Abi, Op, AUDIT_ARCH_I386, AUDIT_ARCH_X86_64};
use super::bpf::TRAP_DATA;
use super::decode::{decode, Change};
use super::worker::{start_invalidation, wake_worker_if_sleeping, END};
use super::{exec_ranges, io_uring, signals, User, ACTIVE, COUNTERS};
use crate::trampoline;
use std::ffi::c_void;
use std::sync::atomic::Ordering;

const ENOSYS: i64 = -(libc::ENOSYS as i64);
const EPERM: i64 = -(libc::EPERM as i64);
const ENOMEM: i64 = -(libc::ENOMEM as i64);

/// What the interrupted context does next.
enum Outcome {
    /// Continue after the call with this result in `rax`.
    Return(i64),
    /// Continue at this address (a sigreturn gate) with the registers as they are.
    Jump(u64),
}

/// Perform the application's call (or its sanitised form) through the driver's
/// syscall site for its ABI.
pub(super) fn perform(abi: Abi, nr: i64, a: [u64; 6]) -> i64 {
    // SAFETY: every caller passes the arguments of a call the application itself made,
    // so it has exactly that call's effects.
    unsafe {
        match abi {
            Abi::X86_64 => trampoline::syscall(nr, a),
            Abi::I386 => trampoline::syscall_i386(nr, a),
        }
    }
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    // Relaxed: statistics.
    c.fetch_add(1, Ordering::Relaxed);
}

/// Perform, and cover whatever the call made executable.
fn perform_tracked(abi: Abi, op: Op, nr: i64, a: [u64; 6]) -> i64 {
    let r = perform(abi, nr, a);
    if let Some(range) = exec_ranges::made_executable(abi, op, a, r) {
        exec_ranges::cover(range, &COUNTERS);
    }
    r
}

fn dispatch(data: u32, arch: u32, nr: u32, a: [u64; 6], saved: &mut u64, sp: u64) -> Outcome {
    if data != TRAP_DATA {
        return Outcome::Return(ENOSYS);
    }
    let abi = match arch {
        AUDIT_ARCH_X86_64 => Abi::X86_64,
        AUDIT_ARCH_I386 => Abi::I386,
        _ => return Outcome::Return(ENOSYS),
    };
    bump(&COUNTERS.traps);
    if abi == Abi::I386 {
        bump(&COUNTERS.i386_calls);
    }
    let op = abi::op(abi, nr);
    let nr = nr as i64;
    let r = match op {
        Op::RtSigreturn | Op::Sigreturn => {
            return Outcome::Jump(signals::sigreturn(abi, op, sp));
        }
        Op::RtSigprocmask | Op::Sigprocmask | Op::Ssetmask => signals::sigprocmask(op, a, saved),
        Op::RtSigaction | Op::Sigaction | Op::Signal => {
            let r = signals::sigaction(abi, op, nr, a, on_sigsys as *const () as u64);
            if r == -(libc::EINVAL as i64) && a[0] as i32 == libc::SIGSYS && a[1] != 0 {
                bump(&COUNTERS.sigsys_refused);
            }
            r
        }
        Op::IoUringEnter | Op::IoUringSetup | Op::IoUringRegister if abi == Abi::I386 => {
            bump(&COUNTERS.refused);
            ENOSYS
        }
        Op::RtSigsuspend
        | Op::Sigsuspend
        | Op::Ppoll
        | Op::Pselect6
        | Op::EpollPwait
        | Op::EpollPwait2
        | Op::IoUringEnter => signals::masked_wait(abi, op, nr, a),
        Op::Unknown => {
            bump(&COUNTERS.refused);
            ENOSYS
        }
        Op::Personality => personality(abi, nr, a),
        _ => monitored(abi, op, nr, a),
    };
    Outcome::Return(r)
}

/// `personality(persona)`: queries pass; turning on address-space randomisation off
/// (`ADDR_NO_RANDOMIZE`: an exec'd image would land on the trapped code ranges with no
/// handler) or `READ_IMPLIES_EXEC` (every readable mapping becomes code the exec
/// tracking cannot follow) is refused with `EPERM`.
fn personality(abi: Abi, nr: i64, a: [u64; 6]) -> i64 {
    const ADDR_NO_RANDOMIZE: u64 = 0x004_0000;
    const READ_IMPLIES_EXEC: u64 = 0x040_0000;
    let p = a[0] as u32 as u64;
    if p != 0xffff_ffff && p & (ADDR_NO_RANDOMIZE | READ_IMPLIES_EXEC) != 0 {
        bump(&COUNTERS.refused);
        return EPERM;
    }
    perform(abi, nr, a)
}

/// An address-space call the application made: told to the registry first.
fn monitored(abi: Abi, op: Op, nr: i64, a: [u64; 6]) -> i64 {
    let shared = ACTIVE.load(Ordering::Acquire);
    if shared.is_null() || crate::fork::in_forked_child() {
        return perform_tracked(abi, op, nr, a);
    }
    // SAFETY: ACTIVE points at a leaked Shared, never freed.
    let s = unsafe { &*shared };
    // SeqCst: a Dekker handshake with `shutdown` (store ACTIVE = null, then load
    // users): either it sees us counted and waits, or we see ACTIVE cleared and leave.
    s.users.fetch_add(1, Ordering::SeqCst);
    let _user = User(&s.users);
    if ACTIVE.load(Ordering::SeqCst) != shared {
        return perform_tracked(abi, op, nr, a);
    }
    if crate::driver_section::in_driver() {
        bump(&COUNTERS.reentrant);
        return perform_tracked(abi, op, nr, a);
    }
    match op {
        Op::IoUringSetup => {
            bump(&COUNTERS.rings_restricted);
            return io_uring::setup(a);
        }
        Op::IoUringRegister => return io_uring::register(a),
        _ => {}
    }
    if !exec_ranges::room_for(op, a) {
        bump(&COUNTERS.exec_ranges_unmonitored);
        bump(&COUNTERS.refused);
        return ENOMEM;
    }
    let keep = |c: Option<Change>| c.filter(|c| s.registry().may_overlap(&c.0));
    let [first, second] = decode(abi, op, a);
    let (first, second) = (keep(first), keep(second));
    if first.is_none() && second.is_none() {
        bump(&COUNTERS.passthrough);
        return perform_tracked(abi, op, nr, a);
    }
    bump(&COUNTERS.invalidating);
    let slots = [
        first.map(start_invalidation),
        second.map(start_invalidation),
    ];
    let r = perform_tracked(abi, op, nr, a);
    for slot in slots.into_iter().flatten() {
        // SeqCst (a Release at least): hand the slot back for invalidate_end; SeqCst
        // for the handshake of wake_worker_if_sleeping.
        slot.state.store(END, Ordering::SeqCst);
    }
    wake_worker_if_sleeping();
    r
}

/// The registers a call's arguments are in: x86_64 `rdi rsi rdx r10 r8 r9`, i386 `ebx
/// ecx edx esi edi ebp` (32 bits).
fn arguments(abi: Abi, g: &[i64; 23]) -> [u64; 6] {
    let r = |i: libc::c_int| g[i as usize] as u64;
    match abi {
        Abi::X86_64 => [
            r(libc::REG_RDI),
            r(libc::REG_RSI),
            r(libc::REG_RDX),
            r(libc::REG_R10),
            r(libc::REG_R8),
            r(libc::REG_R9),
        ],
        Abi::I386 => [
            r(libc::REG_RBX) & 0xffff_ffff,
            r(libc::REG_RCX) & 0xffff_ffff,
            r(libc::REG_RDX) & 0xffff_ffff,
            r(libc::REG_RSI) & 0xffff_ffff,
            r(libc::REG_RDI) & 0xffff_ffff,
            r(libc::REG_RBP) & 0xffff_ffff,
        ],
    }
}

/// The SIGSYS handler the monitor installs.
pub(super) extern "C" fn on_sigsys(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    // SAFETY: __errno_location returns this thread's errno; a handler must preserve it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: for SIGSYS the kernel fills `si_errno` (the filter's data) and the
    // `_sigsys` union member: `_call_addr` at 16, `_syscall` at 24, `_arch` at 28.
    let (data, nr, arch) = unsafe {
        let b = info as *const u8;
        (
            (*info).si_errno as u32,
            b.add(24).cast::<i32>().read_unaligned() as u32,
            b.add(28).cast::<u32>().read_unaligned(),
        )
    };
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
    let abi = if arch == AUDIT_ARCH_I386 {
        Abi::I386
    } else {
        Abi::X86_64
    };
    let a = arguments(abi, &uc.uc_mcontext.gregs);
    let sp = uc.uc_mcontext.gregs[libc::REG_RSP as usize] as u64;
    // The mask rt_sigreturn will restore: its first word holds signals 1..=64.
    let mask = &mut uc.uc_sigmask as *mut libc::sigset_t as *mut u64;
    // SAFETY: sigset_t is at least 8 bytes and suitably aligned inside ucontext_t.
    let mut saved = unsafe { *mask };
    match dispatch(data, arch, nr, a, &mut saved, sp) {
        Outcome::Return(r) => uc.uc_mcontext.gregs[libc::REG_RAX as usize] = r,
        Outcome::Jump(ip) => uc.uc_mcontext.gregs[libc::REG_RIP as usize] = ip as i64,
    }
    // SAFETY: as above.
    unsafe { *mask = saved & !signals::SIGSYS_BIT };
    // SAFETY: restore errno (see above).
    unsafe { *libc::__errno_location() = errno };
}
