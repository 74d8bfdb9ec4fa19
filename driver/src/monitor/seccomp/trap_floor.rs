//! The physical floor of a seccomp trap, for the benchmark harness.

use super::abi::AUDIT_ARCH_X86_64;
use super::INSTALLED;
use crate::error::{Error, Result};
use std::ffi::c_void;
use std::sync::atomic::Ordering;

/// For measuring the physical floor of a seccomp trap on this machine: from now on,
/// `getppid` is trapped by a filter with `SECCOMP_RET_TRAP` and answered (with 1) by a
/// SIGSYS handler that does nothing else, so a timed `getppid` costs signal delivery,
/// the handler call and `rt_sigreturn` — what every trapped call pays before the
/// monitor does any work.
///
/// For benchmarks only, in a process of its own: the filter cannot be removed, and it
/// takes SIGSYS, so the monitor can never be installed in that process afterwards.
pub fn install_trap_floor() -> Result<()> {
    extern "C" fn answer(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut c_void) {
        // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
        let uc = unsafe { &mut *(ctx as *mut libc::ucontext_t) };
        uc.uc_mcontext.gregs[libc::REG_RAX as usize] = 1;
    }
    if INSTALLED.load(Ordering::Acquire) {
        return Err(Error::MonitorConflict {
            what: "the seccomp monitor is installed in this process; measure the floor in another",
        });
    }
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let ins = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 4),
        ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        ins(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, libc::SYS_getppid as u32),
        ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_TRAP),
        ins(BPF_RET | BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut _,
    };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut c_void) = answer;
    // SAFETY: installs a SIGSYS handler that only writes the saved rax of the trapped
    // call, then NO_NEW_PRIVS and a filter for this thread; `prog` and `filter`
    // outlive the calls.
    let r = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as usize;
        // The monitor's flags, so that the two traps compare like for like.
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0
            || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
        {
            -1
        } else {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &prog as *const libc::sock_fprog,
            ) as i32
        }
    };
    if r != 0 {
        return Err(Error::MonitorUnavailable {
            monitor: "seccomp",
            reason: format!(
                "installing the floor filter failed ({})",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}
